"""One run of a manifest, wired together: checks before spending, the lock, the ledger, the client, the scheduler.

The command line parses arguments and reports; the scheduler decides; this module owns the order in which a run's
resources are opened and closed, so that every check that can fail does so before the first paid request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from batchrunner.api.client import Client
from batchrunner.api.redact import Redactor
from batchrunner.engine.createpath import load_create_path, save_create_path
from batchrunner.engine.runstate import CONNECTIONS
from batchrunner.engine.scheduler import RunConfig, RunResult, Scheduler, Snapshot
from batchrunner.errors import ApiError, ManifestError, UsageError
from batchrunner.limits.limiter import AccountLimiter, LocalLimits, RunLimits, open_limits
from batchrunner.manifest import DEFAULT_MODEL, Manifest
from batchrunner.manifest.images import check_url_hosts, check_urls, local_images, url_inputs
from batchrunner.manifest.schema import cached_schema_path, load_cached_schema, save_cached_schema, validate_input
from batchrunner.store.filenames import check_output_names
from batchrunner.store.files import check_own
from batchrunner.store.ledger import RESET, JobStatus, Ledger, LedgerState, RequestLog, read_ledger
from batchrunner.store.output import OutputDir, RunLock

log = logging.getLogger("batchrunner")

# Stands in for a local image when an input is checked against a model's schema: the API will see an uploaded URL.
PLACEHOLDER_URL = "https://uploads.invalid/placeholder.png"
# Seconds the check of every input against a model's schema may take in all (a real schema takes milliseconds).
SCHEMA_TIME_LIMIT = 30.0


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where the API is and how to authenticate to it."""

    base_url: str
    api_key: str
    timeout: float = 30.0


def content_types(manifest: Manifest) -> dict[str, str]:
    """Check every local image before anything is spent (``InputImageError`` names the file and its jobs)."""
    return {sha: image.content_type for sha, image in local_images(manifest).items()}


def check_before_paying(manifest: Manifest, out: OutputDir, state: LedgerState, api_url: str) -> None:
    """The checks of a run that need the API's address and the ledger: input URLs the API can fetch, and output
    names that land on no paid image and no input. Raises ManifestError (exit 2) naming the job and line."""
    check_url_hosts(manifest, api_url)
    check_output_names(manifest, state, out)


def reset_failed(manifest: Manifest, state: LedgerState, ledger: Ledger) -> int:
    """Append a ``reset`` for every failed job of the manifest; replay then gives them their attempts back."""
    count = 0
    for job in manifest.jobs:
        st = state.jobs.get(job.fingerprint)
        if st is not None and st.status is JobStatus.FAILED:
            ledger.append(RESET, job=job.id, fingerprint=job.fingerprint)
            count += 1
    return count


def schema_problems(
    manifest: Manifest, schema: Mapping[str, Any], *, time_limit: float | None = None
) -> ManifestError | None:
    """The first job whose input the model's JSON Schema refuses, as a manifest error; jobs left when
    ``time_limit`` seconds (default SCHEMA_TIME_LIMIT) have passed go unchecked, with a warning."""
    deadline = time.monotonic() + (SCHEMA_TIME_LIMIT if time_limit is None else time_limit)
    for index, job in enumerate(manifest.jobs):
        if time.monotonic() > deadline:
            log.warning(
                "checking inputs against the schema of model %r took too long; %d of %d jobs go unchecked",
                manifest.model,
                len(manifest.jobs) - index,
                len(manifest.jobs),
            )
            return None
        body = dict(job.input)
        if job.image_path is not None:
            body["input_image"] = PLACEHOLDER_URL
        problems = validate_input(body, schema)
        if problems:
            return ManifestError(f"{problems[0]} (the model's schema)", file=manifest.path, job=job.id, line=job.line)
    return None


async def check_schema(manifest: Manifest, out: OutputDir, scheduler: Scheduler) -> None:
    """For models other than flux-kontext-max (checked by the manifest itself), check inputs against the model's
    published JSON Schema, cached in the output folder. When it cannot be had, warn and pass through.

    The check runs in a worker thread, so the event loop (and the signal handlers on it) stays free however long
    a hostile schema makes it; patterns are bounded per match (schema.PATTERN_TIMEOUT) and the whole check by
    SCHEMA_TIME_LIMIT, after which the remaining jobs go unchecked with a warning."""
    if manifest.model == DEFAULT_MODEL:
        return
    # The cache is the folder's own file: a link or a pipe in its place is refused here, not followed or waited on.
    check_own(cached_schema_path(out.path, manifest.model))
    schema = load_cached_schema(out.path, manifest.model)
    if schema is None:
        try:
            schema = await scheduler.fetch_schema(manifest.model)
        except ApiError as exc:
            log.warning("cannot fetch the schema of model %r (%s); inputs go unchecked", manifest.model, exc)
            return
        if schema is None:
            log.warning("model %r publishes no input schema; inputs go unchecked", manifest.model)
            return
        save_cached_schema(out.path, manifest.model, schema)
    problem = await asyncio.to_thread(schema_problems, manifest, schema)
    if problem is not None:
        raise problem


async def check_input_urls(manifest: Manifest) -> None:
    """Reach each input URL once (HEAD, falling back to a ranged GET); an unreachable one is a usage error."""
    urls = url_inputs(manifest)
    if not urls:
        return
    async with aiohttp.ClientSession() as session:
        answers = await check_urls(session, urls)
    problems = {url: why for url, why in answers.items() if why}
    if problems:
        url, why = next(iter(problems.items()))
        more = f" (and {len(problems) - 1} more URLs)" if len(problems) > 1 else ""
        raise UsageError(f"{manifest.path}: input_image {url} is unreachable: {why}; used by {urls[url][0]}{more}")
    log.info("all %d input URLs answer", len(urls))


def make_client(session: aiohttp.ClientSession, endpoint: Endpoint, out: OutputDir) -> Client:
    """The run's API client, with the create path this folder learnt for the endpoint (createpath.py)."""
    return Client(
        session,
        base_url=endpoint.base_url,
        api_key=endpoint.api_key,
        timeout=endpoint.timeout,
        create_path=load_create_path(out.path, endpoint.base_url),
        on_create_path=lambda path: save_create_path(out.path, endpoint.base_url, path),
    )


async def _run_scheduler(
    manifest: Manifest,
    out: OutputDir,
    state: LedgerState,
    config: RunConfig,
    endpoint: Endpoint,
    ledger: Ledger,
    request_log: RequestLog,
    limits: AccountLimiter | LocalLimits,
    on_progress: Callable[[Snapshot], None] | None,
    on_scheduler: Callable[[Scheduler], None] | None,
) -> tuple[RunResult, Scheduler]:
    """The run proper, once the folder is locked and the ledger open: the schema's check, then the scheduler."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONNECTIONS)) as session:
        scheduler = Scheduler(
            manifest,
            make_client(session, endpoint, out),
            ledger,
            out,
            state,
            config,
            request_log=request_log,
            on_progress=on_progress,
            content_types=content_types(manifest),
            limits=limits,
        )
        if on_scheduler is not None:
            on_scheduler(scheduler)
        await check_schema(manifest, out, scheduler)
        return await scheduler.run(), scheduler


async def run_batch(
    manifest: Manifest,
    out: OutputDir,
    config: RunConfig,
    endpoint: Endpoint,
    *,
    retry_failed: bool = False,
    on_progress: Callable[[Snapshot], None] | None = None,
    on_scheduler: Callable[[Scheduler], None] | None = None,
    deadline: float | None = None,
) -> tuple[RunResult, Scheduler]:
    """Run a manifest's batch into ``out``; raises the error tree for what ends a run early.

    ``deadline`` (``time.monotonic()``) is when the whole command must be done, checks before the run included: the
    scheduler gets what is left of it as its ``max_runtime``.
    """
    out.create()
    label = str(out.path.resolve())
    with RunLock(out.lock):
        # Under the lock, so no other run appends meanwhile; before prepare(), which empties .partial/.
        state = read_ledger(out.ledger)
        check_before_paying(manifest, out, state, endpoint.base_url)
        out.prepare()
        request_log = RequestLog(out.requests, max_times=config.rate_count)
        request_log.compact(config.rate_period + 5.0)
        if deadline is not None:
            config = dataclasses.replace(config, max_runtime=max(0.0, deadline - time.monotonic()))
        # Under the folder's lock: a lease of this folder still in the store is a killed run's (account.join). Opened
        # before the ledger, so that a store that cannot be used ends the run before anything is written or sent.
        limits_cm = open_limits(
            RunLimits(
                config.rate_count, config.rate_period, config.concurrency, config.limits_store, config.poll_initial
            ),
            api_url=endpoint.base_url,
            api_key=endpoint.api_key,
            request_timeout=endpoint.timeout,
            label=label,
        )
        try:
            async with limits_cm as limits:
                with Ledger(out.ledger, redact=Redactor(endpoint.api_key)) as ledger:
                    if retry_failed and reset_failed(manifest, state, ledger):
                        state = read_ledger(out.ledger)
                    ledger.append("run_started", pid=os.getpid(), jobs=len(manifest.jobs))
                    parts = (manifest, out, state, config, endpoint, ledger, request_log, limits)
                    result, scheduler = await _run_scheduler(*parts, on_progress, on_scheduler)
                    if scheduler.fatal is not None:
                        raise scheduler.fatal
                    ledger.append("run_finished", **result_fields(result))
        finally:
            request_log.close()
    return result, scheduler


def result_fields(result: RunResult) -> dict[str, Any]:
    """The summary of a run as ledger fields."""
    return {
        "succeeded": result.succeeded,
        "skipped": result.skipped,
        "failed": result.failed,
        "pending": result.pending,
        "in_flight": result.in_flight,
        "requests": result.requests,
        "requests_by_kind": dict(sorted(result.by_kind.items())),
        "in_doubt": result.in_doubt,
        "recovered": result.recovered,
        "possibly_duplicated": result.lost_answers,
        "rate_limited": result.rate_limited,
        "lost_answers": result.lost_answers,  # the name before 0.2, for readers of older ledgers
        "elapsed": round(result.elapsed, 3),
        "stop_reason": result.stop_reason.value if result.stop_reason else None,
    }


__all__ = [
    "Endpoint",
    "check_before_paying",
    "check_input_urls",
    "check_schema",
    "content_types",
    "reset_failed",
    "result_fields",
    "run_batch",
]
