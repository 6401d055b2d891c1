"""The command line: argparse, exit codes, logging and progress. No business logic lives here.

Exit codes (also in the README):
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
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from batchrunner import __version__
from batchrunner.accountlimits import check_store_spec
from batchrunner.accountreport import account_report, describe_account
from batchrunner.client import DEFAULT_API_URL
from batchrunner.errors import BatchrunnerError, UsageError
from batchrunner.ledger import Ledger, read_ledger
from batchrunner.limits import parse_duration, parse_rate
from batchrunner.manifest import Manifest, load_manifest
from batchrunner.output import OutputDir, RunLock, describe_os_error
from batchrunner.redact import Redactor, check_api_key
from batchrunner.report import write_report
from batchrunner.runner import Endpoint, check_before_paying, check_input_urls, content_types, reset_failed, run_batch
from batchrunner.scheduler import RunConfig, RunResult, Scheduler, Snapshot, StopReason
from batchrunner.simulator import Faults, SimConfig, Simulator, serve_forever
from batchrunner.status import count_status, make_plan

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_IO = 74
EXIT_INCOMPLETE = 75
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

log = logging.getLogger("batchrunner")
# Between INFO and WARNING: the summary of a clean run, which --quiet still shows.
NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")


# --------------------------------------------------------------------------------------------------- arguments
class _Parser(argparse.ArgumentParser):
    """argparse that ends with exit code 2 and one line, like every other usage error."""

    def error(self, message: str) -> Any:
        self.exit(EXIT_USAGE, f"batchrunner: error: {message}\n")


def _whole(text: str) -> int:
    # int() also takes "1_000", "+5", " 5" and digits of other scripts; arguments are plain ASCII decimals.
    digits = text.strip()
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 18:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
    return int(digits)


def _positive_int(text: str) -> int:
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _port(text: str) -> int:
    value = _whole(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port (0 to 65535): {text!r}")
    return value


def _image_size(text: str) -> int:
    value = _positive_int(text)
    if value > 4096:
        raise argparse.ArgumentTypeError(f"must be at most 4096 pixels: {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    # float() reads "inf" and "nan" (and 1e999 as inf): no such value may reach a sum or the JSON we write.
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number: {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more: {text!r}")
    return value


def _fraction(text: str) -> float:
    value = _non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1: {text!r}")
    return value


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_duration(text: str) -> float:
    """A duration above zero: a zero poll delay, job timeout or HTTP timeout makes every wait expire at once."""
    try:
        return parse_duration(text, positive=True)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _rate(text: str) -> tuple[int, float]:
    try:
        return parse_rate(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _output_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", "-o", type=Path, help="output folder (default: output/<manifest stem>)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="batchrunner", description="Bulk image edits on the Eachlabs prediction API.")
    parser.add_argument("--version", action="version", version=f"batchrunner {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run a manifest's batch (resumes where an earlier run stopped)")
    run.add_argument("manifest", type=Path)
    _output_option(run)
    run.add_argument("--simulate", action="store_true", help="run against the built-in simulator (no key, no network)")
    run.add_argument("--api-url", default=None, help=f"API base URL (env EACHLABS_API_URL; default {DEFAULT_API_URL})")
    _limit_options(run)
    run.add_argument(
        "--rate-limit-scope",
        choices=("all", "creates"),
        default="all",
        help="which requests the rate limit counts (all)",
    )
    run.add_argument(
        "--job-timeout", type=_positive_duration, default=600.0, help="cancel a prediction after this (10m)"
    )
    run.add_argument(
        "--drain-timeout",
        type=_duration,
        default=60.0,
        help="after Ctrl-C/SIGTERM, keep polling in-flight predictions this long (60s; 0 stops at once)",
    )
    run.add_argument(
        "--max-runtime", type=_positive_duration, default=None, help="stop by this time, resumable (e.g. 14m)"
    )
    run.add_argument("--max-jobs", type=_positive_int, default=None, help="new predictions this run at most")
    run.add_argument("--budget", type=_non_negative_float, default=None, help="USD this manifest may spend in all")
    run.add_argument(
        "--poll-initial",
        type=_positive_duration,
        default=None,
        help="first poll this long after a create, until prediction times are learnt (3s)",
    )
    run.add_argument(
        "--poll-min-interval",
        type=_duration,
        default=None,
        help="never poll one prediction more often than this (default 1s with --rate-limit-scope creates, else 0)",
    )
    run.add_argument("--timeout", type=_positive_duration, default=30.0, help="HTTP timeout per request (30s)")
    run.add_argument(
        "--reconcile-wait",
        type=_positive_duration,
        default=None,
        help="a create in doubt is looked for in the account's executions this x 0.5, 1.5 and 3.5 after it (2s)",
    )
    run.add_argument("--check-urls", action="store_true", help="check each input URL once before submitting")
    run.add_argument("--retry-failed", action="store_true", help="give failed jobs their attempts back first")
    run.add_argument("--allow-large", action="store_true", help="allow a manifest of more than 10,000 jobs")
    _logging_options(run)
    _simulator_options(run)
    _limits_store_option(run)

    status = sub.add_parser("status", help="where a manifest's batch stands (no request is made)")
    status.add_argument("manifest", type=Path)
    _output_option(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--max-attempts", type=_positive_int, default=3)
    status.add_argument("--allow-large", action="store_true")

    plan = sub.add_parser("plan", help="what a run would do: counts, requests, time and cost (no request is made)")
    plan.add_argument("manifest", type=Path)
    _output_option(plan)
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    _limit_options(plan)
    plan.add_argument("--allow-large", action="store_true")

    validate = sub.add_parser(
        "validate",
        help="every check a run makes before spending (manifest, images; URLs with --check-urls), then the plan",
    )
    validate.add_argument("manifest", type=Path)
    _output_option(validate)
    validate.add_argument("--json", action="store_true", help="machine-readable plan")
    validate.add_argument("--check-urls", action="store_true", help="check each input URL once (HEAD, then GET)")
    _limit_options(validate)
    validate.add_argument("--allow-large", action="store_true")

    retry = sub.add_parser("retry", help="give failed jobs their attempts back, so the next run tries them again")
    retry.add_argument("manifest", type=Path)
    _output_option(retry)
    retry.add_argument("--failed", action="store_true", required=True, help="reset every failed job of the manifest")
    retry.add_argument("--allow-large", action="store_true")

    report = sub.add_parser("report", help="write <output>/report.html, a contact sheet of inputs and outputs")
    report.add_argument("manifest", type=Path)
    _output_option(report)
    report.add_argument("--max-attempts", type=_positive_int, default=3)
    report.add_argument("--allow-large", action="store_true")

    _account_parser(sub)

    sim = sub.add_parser("simulate", help="serve the built-in API simulator for experiments")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=_port, default=8787)
    _simulator_options(sim)
    return parser


def _limit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concurrency", type=_positive_int, default=10, help="predictions in flight at most (10)")
    p.add_argument(
        "--rate-limit",
        type=_rate,
        default=(60, 60.0),
        metavar="COUNT/SECONDS",
        help="requests to the API host in any window (60/60)",
    )
    p.add_argument("--max-attempts", type=_positive_int, default=3, help="predictions per job at most (3)")
    p.add_argument("--price", type=_non_negative_float, default=None, help="USD per prediction (or `price:`)")
    p.add_argument(
        "--inline-images",
        action="store_true",
        help="send local images as base64 data URIs instead of uploading them (for servers that accept them)",
    )


def _logging_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("--log-file", type=Path, default=None, help="append log lines to this file too")
    p.add_argument("--quiet", "-q", action="store_true", help="only warnings, errors and the summary")
    p.add_argument(
        "--progress",
        choices=("auto", "bar", "lines", "none"),
        default="auto",
        help="progress: a bar on a terminal, log lines otherwise (auto)",
    )


def _simulator_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sim-rate-limit", type=_rate, default=(60, 60.0), metavar="COUNT/SECONDS")
    p.add_argument("--sim-concurrency", type=_positive_int, default=10)
    p.add_argument("--sim-min-seconds", type=_non_negative_float, default=0.3)
    p.add_argument("--sim-max-seconds", type=_non_negative_float, default=1.5)
    p.add_argument("--sim-failure-rate", type=_fraction, default=0.0)
    p.add_argument("--sim-seed", type=int, default=0)
    p.add_argument(
        "--sim-image-size", type=_image_size, default=256, metavar="PIXELS", help="longest side of output images"
    )
    p.add_argument(
        "--sim-fault",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="switch on a simulator fault, e.g. reset_after=0.05 (repeatable)",
    )


def _sim_config(args: argparse.Namespace) -> SimConfig:
    faults: dict[str, Any] = {}
    known = set(Faults.__dataclass_fields__)
    for item in args.sim_fault:
        name, _, value = item.partition("=")
        if name not in known or not value:
            raise UsageError(f"--sim-fault {item!r}: expected NAME=VALUE with NAME one of {', '.join(sorted(known))}")
        try:
            faults[name] = int(value) if name == "payment_required_after" else float(value)
        except ValueError:
            raise UsageError(f"--sim-fault {item!r}: {value!r} is not a number") from None
    count, period = args.sim_rate_limit
    return SimConfig(
        rate_count=count,
        rate_period=period,
        concurrency=args.sim_concurrency,
        min_seconds=args.sim_min_seconds,
        max_seconds=max(args.sim_min_seconds, args.sim_max_seconds),
        failure_rate=args.sim_failure_rate,
        seed=args.sim_seed,
        image_size=args.sim_image_size,
        faults=Faults(**faults),
    )


# --------------------------------------------------------------------------------------------------- logging
class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        return json.dumps(entry, ensure_ascii=False)


class _RedactingFilter(logging.Filter):
    """Masks the API key, and every piece of it, in each record a handler writes: the last line of defence."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self._redact = redact
        self._formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        redact = self._redact
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed call: logging reports it; mask what it would print
            message = str(record.msg)
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            record.fields = {k: redact(v) if isinstance(v, str) else v for k, v in fields.items()}
        return True


class _LogFile(logging.FileHandler):
    """The ``--log-file``. When it cannot be written mid-run (a full disk, a vanished mount) that is said once, on the
    other handlers, and the file gets no more lines: a run does not give up paid work because its log broke."""

    broken = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.broken:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        if self.broken:
            return
        self.broken = True
        exc = sys.exc_info()[1]
        reason = describe_os_error(exc) if isinstance(exc, OSError) else type(exc).__name__
        with contextlib.suppress(Exception):
            self.close()  # flushing again may fail the same way
        log.error("cannot write log file %s: %s; logging on to stderr only, the run goes on", self.baseFilename, reason)


def _setup_logging(args: argparse.Namespace, stream: TextIO, redact: Redactor | None = None) -> None:
    root = logging.getLogger("batchrunner")
    root.handlers.clear()
    root.propagate = False
    root.setLevel(NOTICE if args.quiet else logging.INFO)
    fmt: logging.Formatter
    if args.log_format == "json":
        fmt = _JsonFormatter()
    else:
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S%z")
    handlers: list[logging.Handler] = [logging.StreamHandler(stream)]
    if args.log_file is not None:
        try:
            args.log_file.parent.mkdir(parents=True, exist_ok=True)
            handlers.append(_LogFile(args.log_file, encoding="utf-8"))
        except OSError as exc:
            raise UsageError(f"cannot open log file {args.log_file}: {describe_os_error(exc)}") from exc
    for h in handlers:
        h.setFormatter(fmt)
        if redact:
            h.addFilter(_RedactingFilter(redact))
        root.addHandler(h)


class _Progress:
    """A tqdm bar on a terminal; otherwise a plain log line every few seconds."""

    def __init__(self, mode: str, total: int, *, window: str = "", interval: float = 10.0) -> None:
        self.mode = mode
        self.window = window  # the rate limit, e.g. "60/60s": the bar shows the requests in the current window
        self.interval = interval
        self._last = 0.0
        self._bar: Any = None
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="img", dynamic_ncols=True, file=sys.stderr)

    def __call__(self, snap: Snapshot) -> None:
        if self._bar is not None:
            now = time.monotonic()
            if now - self._last < 0.1 and snap.done + snap.failed < snap.total:
                return  # redraw at most ten times a second: the dispatcher calls this on every decision
            self._last = now
            self._bar.n = snap.done + snap.failed
            self._bar.set_postfix_str(
                f"done={snap.done} failed={snap.failed} in-flight={snap.in_flight} "
                f"requests={snap.window_used}/{self.window}",
                refresh=False,
            )
            self._bar.refresh()
            return
        if self.mode == "lines":
            now = time.monotonic()
            if now - self._last >= self.interval:
                self._last = now
                log.info(
                    "progress: %d/%d done, %d failed, %d in flight, %d pending, %d requests",
                    snap.done,
                    snap.total,
                    snap.failed,
                    snap.in_flight,
                    snap.pending,
                    snap.requests,
                )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# --------------------------------------------------------------------------------------------------- commands
def _output_dir(args: argparse.Namespace) -> OutputDir:
    if args.output is not None:
        return OutputDir(args.output)
    return OutputDir(Path("output") / args.manifest.stem)


def _load(args: argparse.Namespace) -> Manifest:
    return load_manifest(args.manifest, allow_large=args.allow_large)


def _exit_code(result: RunResult) -> int:
    if result.stop_reason is StopReason.INTERRUPTED:
        return EXIT_INTERRUPTED
    if result.stop_reason is StopReason.TERMINATED:
        return EXIT_TERMINATED
    if not result.complete:
        return EXIT_INCOMPLETE
    return EXIT_FAILED if result.failed else EXIT_OK


def _summary(result: RunResult, out: OutputDir) -> str:
    parts = [
        f"summary: {result.succeeded + result.skipped}/{result.total} done",
        f"({result.succeeded} new, {result.skipped} skipped)",
        f"{result.failed} failed",
        f"{result.pending} pending",
        f"{result.in_flight} in flight",
        f"{result.requests} requests",
        f"{result.elapsed:.1f}s",
        f"spend ${result.spend:.2f}",
    ]
    if result.in_doubt:
        parts.append(f"{result.in_doubt} in doubt (the next run looks for them in the listing)")
    if result.recovered:
        parts.append(f"{result.recovered} recovered")
    if result.lost_answers:
        parts.append(f"{result.lost_answers} possibly duplicated")
    if result.rate_limited:
        parts.append(f"{result.rate_limited} refused with 429 (something else spends the key)")
    if result.stop_reason is not None:
        parts.append(f"stopped: {result.stop_reason.value}")
    return ", ".join(parts) + f" -> {out.path}"


def _api_key(simulate: bool) -> str:
    """The key from the environment, checked before anything is opened or sent (UsageError never quotes it)."""
    key = os.environ.get("EACHLABS_API_KEY", "")
    if not key.strip():
        if simulate:
            return "simulated-key"
        raise UsageError("EACHLABS_API_KEY is not set (export it, or pass --simulate for the built-in simulator)")
    return check_api_key(key)


async def _run_async(
    args: argparse.Namespace, manifest: Manifest, out: OutputDir, deadline: float | None = None
) -> int:
    sim: Simulator | None = None
    poll_initial, reconcile_wait = args.poll_initial, args.reconcile_wait
    api_key = _api_key(args.simulate)
    if args.simulate:
        sim_config = _sim_config(args)
        sim = Simulator(sim_config)
        base_url = await sim.start()
        if reconcile_wait is None:
            # The simulator lists a prediction the moment it is made (unless told to lag).
            reconcile_wait = max(0.05, sim_config.min_seconds)
        if poll_initial is None:
            # The simulator's shortest prediction time: the demo needs no three-second prior.
            poll_initial = max(0.05, sim_config.min_seconds)
    else:
        base_url = args.api_url or os.environ.get("EACHLABS_API_URL") or DEFAULT_API_URL
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
        price=args.price if args.price is not None else manifest.price,
        poll_initial=poll_initial if poll_initial is not None else 3.0,
        inline_images=args.inline_images,
        poll_min_interval=(
            args.poll_min_interval
            if args.poll_min_interval is not None
            else (1.0 if args.rate_limit_scope == "creates" else 0.0)
        ),
        reconcile_wait=reconcile_wait if reconcile_wait is not None else 2.0,
        limits_store=_limits_store(args),
    )
    if config.budget is not None and config.price is None:
        raise UsageError("--budget needs a price per prediction: pass --price or set `price:` in the manifest")
    mode = args.progress
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() and not args.quiet else "lines"
    progress = _Progress(mode, len(manifest.jobs), window=f"{count}/{period:g}s")
    try:
        result, _ = await run_batch(
            manifest,
            out,
            config,
            Endpoint(base_url, api_key, args.timeout),
            retry_failed=args.retry_failed,
            on_progress=progress,
            on_scheduler=_install_signals,
            deadline=deadline,
        )
    finally:
        progress.close()
        _remove_signals()
        if sim is not None:
            await sim.stop()
    # The summary line is always written (--quiet included): a warning when something is left to look at.
    clean = result.complete and not result.failed and not result.rate_limited
    fields = {"rate_limited": result.rate_limited, "requests": result.requests}
    log.log(NOTICE if clean else logging.WARNING, _summary(result, out), extra={"fields": fields})
    return _exit_code(result)


def _install_signals(scheduler: Scheduler) -> None:
    loop = asyncio.get_running_loop()
    seen: dict[str, int] = {"n": 0}

    def handler(reason: StopReason) -> None:
        seen["n"] += 1
        if seen["n"] == 1:
            log.warning("%s: no new submissions; finishing what is in flight (again to stop at once)", reason.value)
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


def cmd_status(args: argparse.Namespace) -> int:
    manifest = _load(args)
    out = _output_dir(args)
    counts = count_status(manifest, read_ledger(out.ledger), out, max_attempts=args.max_attempts)
    if args.json:
        print(json.dumps(counts.to_json()))
    else:
        print(counts.describe(str(out.path)))
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    manifest = _load(args)
    content_types(manifest)
    out = _output_dir(args)
    api_url = os.environ.get("EACHLABS_API_URL") or DEFAULT_API_URL
    check_before_paying(manifest, out, read_ledger(out.ledger), api_url)
    if args.check_urls:
        asyncio.run(check_input_urls(manifest))
    return cmd_plan(args, manifest)


def cmd_plan(args: argparse.Namespace, manifest: Manifest | None = None) -> int:
    manifest = manifest or _load(args)
    out = _output_dir(args)
    count, period = args.rate_limit
    plan = make_plan(
        manifest,
        read_ledger(out.ledger),
        out,
        max_attempts=args.max_attempts,
        concurrency=args.concurrency,
        rate_count=count,
        rate_period=period,
        price=args.price if args.price is not None else manifest.price,
        inline_images=args.inline_images,
    )
    print(json.dumps(plan.to_json()) if args.json else plan.describe(str(out.path)))
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    manifest = _load(args)
    out = _output_dir(args)
    out.create()
    with RunLock(out.lock), Ledger(out.ledger) as ledger:
        count = reset_failed(manifest, read_ledger(out.ledger), ledger)
    print(f"{count} failed jobs will be tried again by the next run", file=sys.stderr)
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    manifest = _load(args)
    out = _output_dir(args)
    path = write_report(manifest, read_ledger(out.ledger), out, max_attempts=args.max_attempts)
    print(path)
    return EXIT_OK


def cmd_simulate(args: argparse.Namespace) -> int:
    config = _sim_config(args)

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


# --------------------------------------------------------------------------------------------------- the account
def _limits_store_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--limits-store",
        default=None,
        metavar="STORE",
        help="where the key's limits are shared with its other runs: sqlite (default, this machine), "
        "redis://HOST:PORT/DB (several machines), or local (this run alone); env BATCHRUNNER_LIMITS_STORE",
    )


def _limits_store(args: argparse.Namespace) -> str | None:
    """The store of ``--limits-store`` or the environment; the built-in simulator is an account of its own."""
    if getattr(args, "simulate", False):
        return "local"
    spec = args.limits_store or os.environ.get("BATCHRUNNER_LIMITS_STORE", "").strip() or None
    return None if spec is None else check_store_spec(spec)


def _account_parser(sub: Any) -> None:
    account = sub.add_parser("account", help="the runs now on this key, their slots and the window's use")
    account.add_argument(
        "--api-url", default=None, help=f"API base URL (env EACHLABS_API_URL; default {DEFAULT_API_URL})"
    )
    account.add_argument("--json", action="store_true", help="machine-readable output")
    _limits_store_option(account)


def cmd_account(args: argparse.Namespace) -> int:
    spec = _limits_store(args)
    if spec == "local":
        raise UsageError("--limits-store local keeps no account: each run has its own limits")
    key = _api_key(False)
    api_url = args.api_url or os.environ.get("EACHLABS_API_URL") or DEFAULT_API_URL
    report = asyncio.run(account_report(spec, api_url=api_url, api_key=key))
    print(json.dumps(report) if args.json else describe_account(report))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Whatever the key holds, no piece of it is written: by our handlers, by Python's last-resort one, or below.
    redact = Redactor(os.environ.get("EACHLABS_API_KEY", "").strip())
    if redact and logging.lastResort is not None:
        logging.lastResort.filters.clear()
        logging.lastResort.addFilter(_RedactingFilter(redact))
    try:
        if hasattr(args, "log_format"):
            _setup_logging(args, sys.stderr, redact)
        commands = {
            "run": cmd_run,
            "status": cmd_status,
            "plan": cmd_plan,
            "validate": cmd_validate,
            "retry": cmd_retry,
            "report": cmd_report,
            "simulate": cmd_simulate,
            "account": cmd_account,
        }
        return commands[args.command](args)
    except BatchrunnerError as exc:
        print(f"batchrunner: {redact(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("batchrunner: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
