"""The clients measured: the runner as ``batchrunner run`` drives it, and a naive baseline."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from batchrunner.api.client import Client, ExecutionsPage, Phase, Prediction, classify_status
from batchrunner.bench.regimes import KEY, TIME_SCALE, Regime, scaled_defaults, write_manifest
from batchrunner.engine.runstate import CONNECTIONS
from batchrunner.engine.scheduler import Scheduler, Snapshot
from batchrunner.errors import RateLimited
from batchrunner.limits.limiter import AccountLimiter, LocalLimits, RunLimits, open_limits
from batchrunner.manifest import Job, Manifest, load_manifest
from batchrunner.store.ledger import Ledger, RequestLog, read_ledger
from batchrunner.store.output import OutputDir, save_download


class WatchedClient(Client):
    """The real client, noting when each prediction was first seen finished (for the loss breakdown)."""

    seen: dict[str, float]

    async def get(self, prediction_id: str, *, kind: str = "poll", request_id: str | None = None) -> Prediction:
        prediction = await super().get(prediction_id, kind=kind, request_id=request_id)
        if prediction.phase is not Phase.RUNNING:
            self.seen.setdefault(prediction_id, asyncio.get_running_loop().time())
        return prediction

    async def executions(
        self, *, model: str, start: float, end: float, limit: int = 100, offset: int = 0, kind: str = "list"
    ) -> ExecutionsPage:
        page = await super().executions(model=model, start=start, end=end, limit=limit, offset=offset, kind=kind)
        now = asyncio.get_running_loop().time()
        for row in page.rows:
            if classify_status(row.status) is not Phase.RUNNING:  # the status word alone: cheap, as it must be here
                self.seen.setdefault(row.id, now)
        return page


@dataclass(slots=True)
class RunRecord:
    """What a client's run leaves for :func:`measure.measure_record`: its start, successes and what it saw."""

    started: float
    successes: list[float] = field(default_factory=list)
    seen: dict[str, float] = field(default_factory=dict)


def _prepare(folder: Path, jobs: int, name: str, seeds: Sequence[int] | None = None) -> tuple[Manifest, OutputDir]:
    manifest = load_manifest(write_manifest(folder, jobs, seeds))
    out = OutputDir(folder / name)
    out.create()
    out.prepare()
    return manifest, out


async def run_runner(
    regime: Regime,
    jobs: int,
    base_url: str,
    folder: Path,
    watch: str = "auto",
    *,
    seeds: Sequence[int] | None = None,
    state: Path | None = None,
) -> RunRecord:
    """Run the Scheduler as ``cli._run_async`` does against ``base_url``; returns start, successes, sightings.

    With the regime's store ``sqlite`` or a ``redis://`` URL its limits are the account's, through that store, as a
    user's run has them (``runner.run_batch``); with ``local`` they are its own, as ``--simulate`` keeps them. The
    SQLite database is a fresh one under ``folder``, or the one in ``state`` (runs sharing an account); ``seeds`` are
    the jobs' (0 to ``jobs`` - 1 by default)."""
    if regime.store == "local":
        return await _run_runner(regime, jobs, base_url, folder, watch, None, seeds)
    spec = None if regime.store == "sqlite" else regime.store
    config = dataclasses.replace(scaled_defaults(regime, watch), limits_store=spec)
    saved = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(state or folder / "state")  # a fresh database, as a first run has
    try:
        limits_cm = open_limits(
            RunLimits(config.rate_count, config.rate_period, config.concurrency, spec, config.poll_initial),
            api_url=base_url,
            api_key=KEY,
            request_timeout=30.0 * TIME_SCALE,
            label=str((folder / "runner").resolve()),
        )
        async with limits_cm as limits:
            return await _run_runner(regime, jobs, base_url, folder, watch, limits, seeds)
    finally:
        if saved is None:
            os.environ.pop("XDG_STATE_HOME", None)
        else:
            os.environ["XDG_STATE_HOME"] = saved


async def _run_runner(
    regime: Regime,
    jobs: int,
    base_url: str,
    folder: Path,
    watch: str,
    limits: AccountLimiter | LocalLimits | None,
    seeds: Sequence[int] | None = None,
) -> RunRecord:
    manifest, out = _prepare(folder, jobs, "runner", seeds)
    config = scaled_defaults(regime, watch)
    loop = asyncio.get_running_loop()
    run = RunRecord(started=loop.time())
    done = [0]

    def progress(snap: Snapshot) -> None:
        if snap.done > done[0]:
            # Two downloads may finish in one loop turn: one time per success.
            run.successes.extend([loop.time()] * (snap.done - done[0]))
            done[0] = snap.done

    request_log = RequestLog(out.requests)
    try:
        with Ledger(out.ledger) as ledger:
            # The run's own pool, as batchrunner run opens it (engine/runner.py).
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONNECTIONS)) as session:
                client = WatchedClient(session, base_url=base_url, api_key=KEY, timeout=30.0 * TIME_SCALE)
                client.seen = run.seen
                state = read_ledger(out.ledger)
                scheduler = Scheduler(
                    manifest,
                    client,
                    ledger,
                    out,
                    state,
                    config,
                    request_log=request_log,
                    on_progress=progress,
                    limits=limits,
                )
                run.started = loop.time()
                await scheduler.run()
    finally:
        request_log.close()
    return run


async def run_baseline(regime: Regime, jobs: int, base_url: str, folder: Path) -> RunRecord:
    """A naive client: up to C in flight, each polled every ``baseline_poll`` s, only 429s slow it (Retry-After)."""
    manifest, out = _prepare(folder, jobs, "baseline")
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(regime.concurrency)

    async def one(client: Client, job: Job, run: RunRecord) -> None:
        async with slots:
            while True:
                try:
                    pid = await client.create(manifest.model, manifest.version, dict(job.input))
                    break
                except RateLimited as exc:
                    await asyncio.sleep(exc.retry_after or 1.0)
            while True:
                await asyncio.sleep(regime.baseline_poll)
                try:
                    prediction = await client.get(pid)
                except RateLimited as exc:
                    await asyncio.sleep(exc.retry_after or 1.0)
                    continue
                if prediction.phase is not Phase.RUNNING:
                    break
        if prediction.urls:
            url = prediction.urls[0]
            await save_download(out, job.id, lambda sink: client.download(url, sink))
            run.successes.append(loop.time())

    async with aiohttp.ClientSession() as session:
        client = WatchedClient(session, base_url=base_url, api_key=KEY)
        run = RunRecord(started=loop.time())
        client.seen = run.seen
        await asyncio.gather(*(one(client, job, run) for job in manifest.jobs))
    return run
