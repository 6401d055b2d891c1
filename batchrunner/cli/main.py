"""The command line: each command's wiring and its exit code. No business logic lives here.

What the command line accepts is in ``options.py``; what a run shows, in ``progress.py`` and ``display.py``; how
it logs, in ``logs.py``.

Exit codes (also in the README and in ``--help``):
    0    every job succeeded
    1    the run finished but some jobs failed for good
    2    bad manifest, arguments, input image or API key; nothing was submitted
    74   the output folder cannot be written (disk full, permissions); the ledger stays readable
    75   incomplete but resumable: time, job or budget limit reached, out of credit, API unavailable,
         or another run holds the output folder
    130  interrupted by Ctrl-C (SIGINT), resumable
    143  terminated by SIGTERM, resumable
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shlex
import signal
import sys
import time
import webbrowser
from collections.abc import Sequence
from pathlib import Path

from batchrunner.api.client import DEFAULT_API_URL
from batchrunner.api.redact import Redactor, check_api_key
from batchrunner.cli.options import build_parser, sim_config
from batchrunner.cli.validate import MAX_PROBLEMS, check_all
from batchrunner.engine.cleanup import Cleanup, clean_uploads, plan_cleanup
from batchrunner.engine.estimate import PAGE_SECONDS, TYPICAL_SECONDS
from batchrunner.engine.runner import Endpoint, check_input_urls, reset_failed, run_batch
from batchrunner.engine.scheduler import RunConfig, RunResult, Scheduler, Snapshot, StopReason
from batchrunner.errors import AuthError, BatchrunnerError, UsageError
from batchrunner.limits.limiter import check_store_spec
from batchrunner.manifest.parse import Manifest, load_manifest
from batchrunner.sim.server import Simulator, serve_forever
from batchrunner.store.ledger import Ledger, LedgerState, read_ledger
from batchrunner.store.output import OutputDir, RunLock, describe_os_error, lock_holder
from batchrunner.views.account import account_report, describe_account
from batchrunner.views.display import next_steps, summary_fields, summary_line
from batchrunner.views.export import write_export
from batchrunner.views.history import read_history
from batchrunner.views.logs import NOTICE, RedactingFilter, setup_logging
from batchrunner.views.progress import Progress
from batchrunner.views.report import write_report
from batchrunner.views.status import Plan, count_status, make_plan, run_activity

__all__ = ["build_parser", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_IO = 74
EXIT_INCOMPLETE = 75
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

log = logging.getLogger("batchrunner")


# --------------------------------------------------------------------------------------------------- helpers
def _output_dir(args: argparse.Namespace) -> OutputDir:
    if args.output is not None:
        return OutputDir(args.output)
    return OutputDir(Path("output") / args.manifest.stem)


def _load(args: argparse.Namespace, *, collect: int = 0) -> Manifest:
    return load_manifest(args.manifest, allow_large=args.allow_large, collect=collect)


def _command_tail(args: argparse.Namespace) -> str:
    """The manifest and output as written, for the commands a next step suggests."""
    words = [str(args.manifest)]
    if args.output is not None:
        words += ["--output", str(args.output)]
    return shlex.join(words)


def _exit_code(result: RunResult) -> int:
    if result.stop_reason is StopReason.INTERRUPTED:
        return EXIT_INTERRUPTED
    if result.stop_reason is StopReason.TERMINATED:
        return EXIT_TERMINATED
    if not result.complete:
        return EXIT_INCOMPLETE
    return EXIT_FAILED if result.failed else EXIT_OK


def _api_key(simulate: bool) -> str:
    """The key from the environment, checked before anything is opened or sent (UsageError never quotes it)."""
    key = os.environ.get("EACHLABS_API_KEY", "")
    if not key.strip():
        if simulate:
            return "simulated-key"
        raise UsageError("EACHLABS_API_KEY is not set (export it, or pass --simulate for the built-in simulator)")
    return check_api_key(key)


def _price(args: argparse.Namespace, manifest: Manifest) -> float | None:
    return args.price if args.price is not None else manifest.price


def _plan(args: argparse.Namespace, manifest: Manifest, out: OutputDir, state: LedgerState | None = None) -> Plan:
    count, period = args.rate_limit
    typical, poll_initial, page = TYPICAL_SECONDS, args.poll_initial, PAGE_SECONDS
    if args.simulate:  # the simulator's prediction times, its answers on loopback, and a simulated run's first poll
        simulated = sim_config(args)
        typical, page = (simulated.min_seconds, simulated.max_seconds), 0.01
        poll_initial = poll_initial if poll_initial is not None else max(0.05, simulated.min_seconds)
    min_interval = args.poll_min_interval
    return make_plan(
        manifest,
        state if state is not None else read_ledger(out.ledger),
        out,
        max_attempts=args.max_attempts,
        concurrency=args.concurrency,
        rate_count=count,
        rate_period=period,
        price=_price(args, manifest),
        inline_images=args.inline_images,
        max_jobs=args.max_jobs,
        budget=args.budget,
        scope=args.rate_limit_scope,
        watch=args.watch,
        poll_initial=poll_initial if poll_initial is not None else 3.0,
        poll_min_interval=min_interval
        if min_interval is not None
        else (1.0 if args.rate_limit_scope == "creates" else 0.0),
        typical=typical,
        page_seconds=page,
    )


# --------------------------------------------------------------------------------------------------- run
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
        price=_price(args, manifest),
        poll_initial=poll_initial if poll_initial is not None else 3.0,
        inline_images=args.inline_images,
        poll_min_interval=(
            args.poll_min_interval
            if args.poll_min_interval is not None
            else (1.0 if args.rate_limit_scope == "creates" else 0.0)
        ),
        reconcile_wait=reconcile if reconcile is not None else 2.0,
        watch=args.watch,
        limits_store=_limits_store(args),
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
    sim: Simulator | None = None
    poll_initial, reconcile_wait = args.poll_initial, args.reconcile_wait
    api_key = _api_key(args.simulate)
    if args.simulate:
        simulated = sim_config(args)
        sim = Simulator(simulated)
        base_url = await sim.start()
        if reconcile_wait is None:
            # The simulator lists a prediction the moment it is made (unless told to lag).
            reconcile_wait = max(0.05, simulated.min_seconds)
        if poll_initial is None:
            # The simulator's shortest prediction time: the demo needs no three-second prior.
            poll_initial = max(0.05, simulated.min_seconds)
    else:
        base_url = args.api_url or os.environ.get("EACHLABS_API_URL") or DEFAULT_API_URL
    try:
        config = _config(args, manifest, poll_initial, reconcile_wait)
        progress = Progress(_progress_mode(args), stream=sys.stderr)
        timer: list[asyncio.Task[None]] = []

        schedulers: list[Scheduler] = []

        def on_progress(snap: Snapshot) -> None:
            if progress.latest is None and schedulers:
                # Every check has passed and nothing is spent yet: the one line of plan, from the ledger the run read.
                plan = _plan(args, manifest, out, schedulers[0].state)
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
    report = _end_report(manifest, out, args.max_attempts)
    # A 429 means something else spends the key: worth a warning even on a clean run.
    clean = result.complete and not result.failed and not result.rate_limited
    # --quiet shows the summary of a run that did something or left something to look at; an idle cron tick is silent.
    did_nothing = clean and result.requests == 0 and result.succeeded == 0
    level = (logging.INFO if did_nothing else NOTICE) if clean else logging.WARNING
    log.log(level, summary_line(result, report=report), extra={"fields": summary_fields(result)})
    for step in next_steps(result, config, command=_command_tail(args)):
        log.log(level, "next: %s", step, extra={"fields": {"event": "next", "next": step}})
    return _exit_code(result)


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
    manifest = _load(args)
    out = _output_dir(args)
    if not manifest.jobs:
        print(f"{args.manifest}: the manifest has no jobs; nothing to do", file=sys.stderr)
        return EXIT_OK
    _api_key(args.simulate)  # a bad key ends the command before the URL checks spend any time
    if args.check_urls:
        try:
            asyncio.run(asyncio.wait_for(check_input_urls(manifest), _left(deadline)))
        except TimeoutError:
            log.warning("--max-runtime reached while checking input URLs; nothing was submitted")
            return EXIT_INCOMPLETE
    return asyncio.run(_run_async(args, manifest, out, deadline))


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


# --------------------------------------------------------------------------------------------------- the others
def cmd_status(args: argparse.Namespace) -> int:
    manifest = _load(args)
    out = _output_dir(args)
    counts = count_status(manifest, read_ledger(out.ledger), out, max_attempts=args.max_attempts)
    holder = lock_holder(out.lock)
    activity = run_activity(holder, read_history(out.ledger).last_run, now=time.time())
    if args.json:
        print(json.dumps({**counts.to_json(), "active": holder is not None, "run": activity}))
        return EXIT_OK
    lines = [counts.describe(str(out.path))]
    if activity:
        lines.append(activity)
    if counts.failed:
        lines.append(f"next: {counts.failed} failed for good: batchrunner retry {_command_tail(args)}")
    elif holder is None and (counts.pending or counts.in_flight or counts.in_doubt):
        lines.append(f"next: batchrunner run {_command_tail(args)}")
    print("\n".join(lines))
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    manifest = _load(args, collect=MAX_PROBLEMS)
    out = _output_dir(args)
    api_url = args.api_url or os.environ.get("EACHLABS_API_URL") or DEFAULT_API_URL
    images = check_all(manifest, out, read_ledger(out.ledger), api_url)
    if args.check_urls:
        asyncio.run(check_input_urls(manifest))
    what = f"OK: {len(manifest.jobs)} jobs, {images} local images checked"
    if not args.json:
        print(what + (", input URLs answer" if args.check_urls else ""))
    return cmd_plan(args, manifest)


def cmd_plan(args: argparse.Namespace, manifest: Manifest | None = None) -> int:
    manifest = manifest or _load(args)
    out = _output_dir(args)
    if args.budget is not None and _price(args, manifest) is None:
        raise UsageError("--budget needs a price per prediction: pass --price or set `price:` in the manifest")
    plan = _plan(args, manifest, out)
    print(json.dumps(plan.to_json()) if args.json else plan.describe(str(out.path)))
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    manifest = _load(args)
    out = _output_dir(args)
    out.create()
    with RunLock(out.lock), Ledger(out.ledger) as ledger:
        count = reset_failed(manifest, read_ledger(out.ledger), ledger)
    if count:
        print(f"{count} failed jobs will be tried again: batchrunner run {_command_tail(args)}", file=sys.stderr)
    else:
        print("no failed jobs: nothing to retry", file=sys.stderr)
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    manifest = _load(args)
    out = _output_dir(args)
    path = write_report(manifest, read_ledger(out.ledger), out, max_attempts=args.max_attempts)
    print(path)
    if args.open and not webbrowser.open(path.resolve().as_uri()):
        print(f"no web browser could be started; open {path} yourself", file=sys.stderr)
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    manifest = _load(args)
    out = _output_dir(args)
    write_export(
        manifest,
        read_ledger(out.ledger),
        out,
        read_history(out.ledger),
        fmt=args.format,
        to=args.to,
        stdout=sys.stdout,
        max_attempts=args.max_attempts,
    )
    return EXIT_OK


def cmd_simulate(args: argparse.Namespace) -> int:
    config = sim_config(args)

    def ready(url: str) -> None:
        print(f"simulator listening on {url} (Ctrl-C to stop)", file=sys.stderr, flush=True)

    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_forever(config, args.host, args.port, ready=ready))
    except OSError as exc:  # a busy port, a host that is not this machine's, a privileged port
        # asyncio words a bind error at length, address included: the errno says it in the usual words.
        reason = os.strerror(exc.errno) if isinstance(exc.errno, int) and exc.errno > 0 else describe_os_error(exc)
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {reason}") from None
    return EXIT_OK


def cmd_clean_uploads(args: argparse.Namespace) -> int:
    manifest = _load(args)
    out = _output_dir(args)
    if args.dry_run:
        plan = plan_cleanup(manifest, read_ledger(out.ledger), out, max_attempts=args.max_attempts)
        for verdict in plan.of("delete"):
            print(f"would delete {verdict.name} (file {verdict.file_id})")
        _print_kept(plan)
        print(
            f"dry run: {len(plan.of('delete'))} would be deleted, {len(plan.of('keep'))} kept (still needed), "
            f"{len(plan.of('unknown'))} without a file id; nothing was sent"
        )
        return EXIT_INCOMPLETE if plan.of("keep") else EXIT_OK
    if not read_ledger(out.ledger).uploads:
        print(f"{out.path}: no uploads recorded: nothing to delete")
        return EXIT_OK
    key = _api_key(False)
    api_url = args.api_url or os.environ.get("EACHLABS_API_URL") or DEFAULT_API_URL
    plan, result = asyncio.run(
        clean_uploads(
            manifest,
            out,
            max_attempts=args.max_attempts,
            base_url=api_url,
            api_key=key,
            request_timeout=args.timeout,
            rate=args.rate_limit,
        )
    )
    for verdict in result.deleted:
        print(f"deleted {verdict.name} (file {verdict.file_id})")
    for verdict in result.gone:
        print(f"{verdict.name} (file {verdict.file_id}) was already gone from the API; recorded as deleted")
    for verdict, exc in result.failed:
        print(f"could not delete {verdict.name} (file {verdict.file_id}): {exc}", file=sys.stderr)
    _print_kept(plan)
    done = len(result.deleted) + len(result.gone)
    left = len(plan.of("delete")) - done - len(result.failed)
    print(
        f"{done} deleted, {len(plan.of('keep'))} kept (still needed), {len(result.failed)} failed"
        + (f", {left} not tried" if left else "")
    )
    if result.stopped is not None:
        if isinstance(result.stopped, AuthError):
            raise result.stopped
        print(f"stopped: {result.stopped}; run it again later", file=sys.stderr)
        return EXIT_INCOMPLETE
    if result.failed:
        return EXIT_FAILED
    return EXIT_INCOMPLETE if plan.of("keep") else EXIT_OK


def _print_kept(plan: Cleanup) -> None:
    for verdict in plan.of("keep"):
        shown = ", ".join(verdict.waiting[:3]) + (
            f" and {len(verdict.waiting) - 3} more" if len(verdict.waiting) > 3 else ""
        )
        print(f"kept {verdict.name}: {len(verdict.waiting)} job(s) not done yet need it ({shown})")
    for verdict in plan.of("unknown"):
        print(f"kept {verdict.name}: uploaded before file ids were recorded; it expires on the API's schedule")


def _limits_store(args: argparse.Namespace) -> str | None:
    """The store of ``--limits-store`` or the environment; the built-in simulator is an account of its own."""
    if getattr(args, "simulate", False):
        return "local"
    spec = args.limits_store or os.environ.get("BATCHRUNNER_LIMITS_STORE", "").strip() or None
    return None if spec is None else check_store_spec(spec)


def cmd_account(args: argparse.Namespace) -> int:
    spec = _limits_store(args)
    if spec == "local":
        raise UsageError("--limits-store local keeps no account: each run has its own limits")
    key = _api_key(False)
    api_url = args.api_url or os.environ.get("EACHLABS_API_URL") or DEFAULT_API_URL
    report = asyncio.run(account_report(spec, api_url=api_url, api_key=key))
    print(json.dumps(report) if args.json else describe_account(report))
    return EXIT_OK


COMMANDS = {
    "run": cmd_run,
    "status": cmd_status,
    "plan": cmd_plan,
    "validate": cmd_validate,
    "retry": cmd_retry,
    "report": cmd_report,
    "export": cmd_export,
    "simulate": cmd_simulate,
    "account": cmd_account,
    "clean-uploads": cmd_clean_uploads,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Whatever the key holds, no piece of it is written: by our handlers, by Python's last-resort one, or below.
    redact = Redactor(os.environ.get("EACHLABS_API_KEY", "").strip())
    if redact and logging.lastResort is not None:
        logging.lastResort.filters.clear()
        logging.lastResort.addFilter(RedactingFilter(redact))
    try:
        setup_logging(
            sys.stderr,
            fmt=getattr(args, "log_format", "text"),
            file=getattr(args, "log_file", None),
            quiet=getattr(args, "quiet", False),
            redact=redact,
            terminal=sys.stderr.isatty(),
        )
        return COMMANDS[args.command](args)
    except BatchrunnerError as exc:
        for line in str(exc).splitlines() or [type(exc).__name__]:  # validate's problems: one line each
            print(f"batchrunner: {redact(line)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("batchrunner: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `batchrunner export ... | head`: the reader has all it wanted
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
