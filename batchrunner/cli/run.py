"""``run``: the batch within the API's limits, its progress shown, Ctrl-C and SIGTERM as a drain, then the summary."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time

from batchrunner.api.client import DEFAULT_API_URL
from batchrunner.cli.args import (
    EXIT_FAILED,
    EXIT_INCOMPLETE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    command_tail,
    limits_store,
    load,
    output_dir,
    plan_of,
    price_of,
    read_api_key,
)
from batchrunner.cli.options import sim_config
from batchrunner.cli.plan import cmd_plan
from batchrunner.engine.runner import Endpoint, check_input_urls, run_batch
from batchrunner.engine.scheduler import RunConfig, RunResult, Scheduler, Snapshot, StopReason
from batchrunner.errors import BatchrunnerError, UsageError
from batchrunner.manifest import Manifest
from batchrunner.sim.server import Simulator
from batchrunner.store.ledger import read_ledger
from batchrunner.store.output import OutputDir
from batchrunner.views.display import next_steps, summary_fields, summary_line
from batchrunner.views.logs import NOTICE
from batchrunner.views.progress import Progress
from batchrunner.views.report import write_report

log = logging.getLogger("batchrunner")


def _config(
    args: argparse.Namespace, manifest: Manifest, poll_initial: float | None, reconcile: float | None
) -> RunConfig:
    count, period = args.rate_limit
    config = RunConfig(
        concurrency=args.concurrency,
        rate_count=count,
        rate_period=period,
        rate_scope=args.rate_limit_scope,
        max_attempts=args.max_attempts,
        job_timeout=args.job_timeout,
        drain_timeout=args.drain_timeout,
        max_runtime=args.max_runtime,
        max_jobs=args.max_jobs,
        budget=args.budget,
        price=price_of(args, manifest),
        poll_initial=poll_initial if poll_initial is not None else 3.0,
        inline_images=args.inline_images,
        poll_min_interval=(
            args.poll_min_interval
            if args.poll_min_interval is not None
            else (1.0 if args.rate_limit_scope == "creates" else 0.0)
        ),
        reconcile_wait=reconcile if reconcile is not None else 2.0,
        watch=args.watch,
        limits_store=limits_store(args),
    )
    if config.budget is not None and config.price is None:
        raise UsageError("--budget needs a price per prediction: pass --price or set `price:` in the manifest")
    return config


def _progress_mode(args: argparse.Namespace) -> str:
    mode: str = args.progress
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() and not args.quiet and args.log_format == "text" else "lines"
    return mode


async def _run_async(
    args: argparse.Namespace, manifest: Manifest, out: OutputDir, deadline: float | None = None
) -> int:
    api_key = read_api_key(args.simulate)
    sim, base_url, poll_initial, reconcile_wait = await _api_endpoint(args)
    try:
        config = _config(args, manifest, poll_initial, reconcile_wait)
        progress = Progress(_progress_mode(args), stream=sys.stderr)
        timer: list[asyncio.Task[None]] = []

        schedulers: list[Scheduler] = []

        def on_progress(snap: Snapshot) -> None:
            if progress.latest is None and schedulers:
                # Every check has passed and nothing is spent yet: the one line of plan, from the ledger the run read.
                plan = plan_of(args, manifest, out, schedulers[0].state)
                c = plan.counts
                if plan.creates or c.in_flight or c.in_doubt:
                    log.info(plan.line(f"{out.path}/"), extra={"fields": {"event": "plan", **plan.to_json()}})
                else:
                    progress.mode = "off"  # nothing to do: an idle cron tick says nothing more
            progress(snap)

        def on_scheduler(scheduler: Scheduler) -> None:
            schedulers.append(scheduler)
            _install_signals(scheduler)
            progress.attach(scheduler.snapshot)
            timer.append(asyncio.get_running_loop().create_task(progress.timer()))

        try:
            with progress.shown():
                result, _ = await run_batch(
                    manifest,
                    out,
                    config,
                    Endpoint(base_url, api_key, args.timeout),
                    retry_failed=args.retry_failed,
                    on_progress=on_progress,
                    on_scheduler=on_scheduler,
                    deadline=deadline,
                )
        finally:
            for task in timer:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            _remove_signals()
    finally:
        if sim is not None:
            await sim.stop()
    _summarise(args, result, config, report=_end_report(manifest, out, args.max_attempts))
    return _exit_code(result)


async def _api_endpoint(args: argparse.Namespace) -> tuple[Simulator | None, str, float | None, float | None]:
    """The simulator started (with --simulate) or the API's URL, and the first-poll and reconcile waits for it."""
    poll_initial, reconcile_wait = args.poll_initial, args.reconcile_wait
    if not args.simulate:
        return None, args.api_url or os.environ.get("EACHLABS_API_URL") or DEFAULT_API_URL, poll_initial, reconcile_wait
    simulated = sim_config(args)
    sim = Simulator(simulated)
    base_url = await sim.start()
    if reconcile_wait is None:
        # The simulator lists a prediction the moment it is made (unless told to lag).
        reconcile_wait = max(0.05, simulated.min_seconds)
    if poll_initial is None:
        # The simulator's shortest prediction time: the demo needs no three-second prior.
        poll_initial = max(0.05, simulated.min_seconds)
    return sim, base_url, poll_initial, reconcile_wait


def _summarise(args: argparse.Namespace, result: RunResult, config: RunConfig, *, report: str | None) -> None:
    """The run's summary line and its next steps, at a level that says whether anything needs a look."""
    # A 429 means something else spends the key: worth a warning even on a clean run.
    clean = result.complete and not result.failed and not result.rate_limited
    # --quiet shows the summary of a run that did something or left something to look at; an idle cron tick is silent.
    did_nothing = clean and result.requests == 0 and result.succeeded == 0
    level = (logging.INFO if did_nothing else NOTICE) if clean else logging.WARNING
    log.log(level, summary_line(result, report=report), extra={"fields": summary_fields(result)})
    for step in next_steps(result, config, command=command_tail(args)):
        log.log(level, "next: %s", step, extra={"fields": {"event": "next", "next": step}})


def _exit_code(result: RunResult) -> int:
    if result.stop_reason is StopReason.INTERRUPTED:
        return EXIT_INTERRUPTED
    if result.stop_reason is StopReason.TERMINATED:
        return EXIT_TERMINATED
    if not result.complete:
        return EXIT_INCOMPLETE
    return EXIT_FAILED if result.failed else EXIT_OK


def _end_report(manifest: Manifest, out: OutputDir, max_attempts: int) -> str | None:
    """Write the report at the end of a run; a report that cannot be written is a warning, never the run's failure."""
    try:
        return str(write_report(manifest, read_ledger(out.ledger), out, max_attempts=max_attempts))
    except BatchrunnerError as exc:
        log.warning("the report was not written: %s", exc)
        return None


def _install_signals(scheduler: Scheduler) -> None:
    loop = asyncio.get_running_loop()
    seen: dict[str, int] = {"n": 0}
    words = {StopReason.INTERRUPTED: "Ctrl-C", StopReason.TERMINATED: "SIGTERM"}

    def handler(reason: StopReason) -> None:
        seen["n"] += 1
        if seen["n"] == 1:
            log.warning("%s: no new creates; finishing what is in flight (again to stop at once)", words[reason])
            scheduler.request_stop(reason)
        else:
            log.warning("stopping at once; the ledger is consistent and the next run resumes")
            scheduler.abort()

    loop.add_signal_handler(signal.SIGINT, handler, StopReason.INTERRUPTED)
    loop.add_signal_handler(signal.SIGTERM, handler, StopReason.TERMINATED)


def _remove_signals() -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, RuntimeError):
            loop.remove_signal_handler(sig)


def cmd_run(args: argparse.Namespace) -> int:
    if args.dry_run:
        return cmd_plan(args)
    # --max-runtime holds for the whole command: the checks before the run spend from it too.
    deadline = None if args.max_runtime is None else time.monotonic() + args.max_runtime
    manifest = load(args)
    out = output_dir(args)
    if not manifest.jobs:
        print(f"{args.manifest}: the manifest has no jobs; nothing to do", file=sys.stderr)
        return EXIT_OK
    read_api_key(args.simulate)  # a bad key ends the command before the URL checks spend any time
    if args.check_urls:
        try:
            asyncio.run(asyncio.wait_for(check_input_urls(manifest), _left(deadline)))
        except TimeoutError:
            log.warning("--max-runtime reached while checking input URLs; nothing was submitted")
            return EXIT_INCOMPLETE
    return asyncio.run(_run_async(args, manifest, out, deadline))


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())
