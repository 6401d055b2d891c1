"""What the command line accepts: the subcommands, their options in groups, and the checks of each value.

The command modules do what the commands say; this module only reads them. Every value that cannot be read ends in one
line and exit code 2, like every other usage error.
"""

from __future__ import annotations

import argparse
import math
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from batchrunner import __version__
from batchrunner.api.client import DEFAULT_API_URL
from batchrunner.errors import UsageError
from batchrunner.limits.window import parse_duration, parse_rate
from batchrunner.sim.server import Faults, SimConfig

__all__ = ["EXIT_CODES", "build_parser", "sim_config"]

EXIT_USAGE = 2

EXIT_CODES = """\
exit codes:
  0        every job is done (or the manifest has no jobs)
  1        finished, but some jobs failed for good (then: batchrunner retry)
  2        bad manifest, arguments, input image or key: nothing was submitted
  74       the output folder cannot be written (disk full, permissions)
  75       incomplete, resumable: --max-runtime, --max-jobs or --budget reached,
           out of credit, the API unavailable, or another run holds the folder
  130/143  interrupted by Ctrl-C / SIGTERM: resumable, rerun to continue
"""

DURATIONS = """\
durations: 90s, 14m, 1h, 1h30m (a plain number is seconds), at most a year.
"""

_RUN_EPILOG = (
    DURATIONS
    + "\n"
    + EXIT_CODES
    + """
A run resumes where an earlier one stopped: finished jobs are skipped,
predictions left in flight are polled, and nothing is paid twice. It writes
<output>/report.html at its end.
"""
)

# Makes one subcommand's parser: name, one-line summary, description, epilog.
_Command = Callable[..., argparse.ArgumentParser]


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Help at 80 columns, with the epilogs' tables kept as written."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=80)


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


def _common(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    p.add_argument("manifest", type=Path, help="the manifest (YAML)")
    where = p.add_argument_group("where")
    where.add_argument("--output", "-o", type=Path, help="output folder (default: output/<manifest stem>)")
    where.add_argument("--allow-large", action="store_true", help="allow a manifest of more than 10,000 jobs")
    return where


def _run_options(p: argparse.ArgumentParser, where: argparse._ArgumentGroup) -> None:
    """Every option of ``run``: ``plan`` and ``validate`` take them all, so scripts pass the same flags to each."""
    _where_options(where)
    _limit_options(p)
    _stop_options(p)
    _input_options(p)
    _polling_options(p)
    _shown_options(p)
    sim = p.add_argument_group("the simulator (with --simulate)")
    _simulator_options(sim)


def _where_options(where: argparse._ArgumentGroup) -> None:
    where.add_argument(
        "--simulate", action="store_true", help="run against the built-in simulator (no key, no network)"
    )
    where.add_argument("--api-url", default=None, help=f"API base URL (env EACHLABS_API_URL; {DEFAULT_API_URL})")
    where.add_argument(
        "--limits-store",
        default=None,
        metavar="STORE",
        help="where the key's limits are shared with its other runs: sqlite (default, this machine), "
        "redis://HOST:PORT/DB (several machines), or local (this run alone); env BATCHRUNNER_LIMITS_STORE",
    )


def _limit_options(p: argparse.ArgumentParser) -> None:
    limits = p.add_argument_group("limits")
    limits.add_argument("--concurrency", type=_positive_int, default=10, help="predictions in flight at most (10)")
    limits.add_argument(
        "--rate-limit",
        type=_rate,
        default=(60, 60.0),
        metavar="COUNT/SECONDS",
        help="requests to the API host in any window of SECONDS (60/60)",
    )
    limits.add_argument(
        "--rate-limit-scope",
        choices=("all", "creates"),
        default="all",
        help="which requests the rate limit counts (all)",
    )
    limits.add_argument("--max-attempts", type=_positive_int, default=3, help="predictions per job at most (3)")


def _stop_options(p: argparse.ArgumentParser) -> None:
    stops = p.add_argument_group("when to stop (each exits 75; rerun to continue)")
    stops.add_argument(
        "--max-runtime", type=_positive_duration, default=None, metavar="D", help="stop by this time (e.g. 14m)"
    )
    stops.add_argument("--max-jobs", type=_positive_int, default=None, metavar="N", help="new predictions this run")
    stops.add_argument(
        "--budget", type=_non_negative_float, default=None, metavar="USD", help="USD this manifest may spend in all"
    )
    stops.add_argument(
        "--price", type=_non_negative_float, default=None, metavar="USD", help="USD per prediction (or `price:`)"
    )
    stops.add_argument(
        "--job-timeout",
        type=_positive_duration,
        default=600.0,
        metavar="D",
        help="cancel a prediction running this long (10m)",
    )
    stops.add_argument(
        "--drain-timeout",
        type=_duration,
        default=60.0,
        metavar="D",
        help="after Ctrl-C/SIGTERM, finish what is in flight this long (60s; 0: at once)",
    )


def _input_options(p: argparse.ArgumentParser) -> None:
    inputs = p.add_argument_group("inputs")
    inputs.add_argument(
        "--inline-images", action="store_true", help="send local images as data URIs instead of uploading them"
    )
    inputs.add_argument("--check-urls", action="store_true", help="check each input URL once before submitting")
    inputs.add_argument("--retry-failed", action="store_true", help="give failed jobs their attempts back first")


def _polling_options(p: argparse.ArgumentParser) -> None:
    polling = p.add_argument_group("polling and requests")
    polling.add_argument(
        "--poll-initial",
        type=_positive_duration,
        default=None,
        metavar="D",
        help="first poll this long after a create, until times are learnt (3s)",
    )
    polling.add_argument(
        "--poll-min-interval",
        type=_duration,
        default=None,
        metavar="D",
        help="never poll one prediction more often (0; 1s with scope creates)",
    )
    polling.add_argument(
        "--timeout", type=_positive_duration, default=30.0, metavar="D", help="HTTP timeout per request (30s)"
    )
    polling.add_argument(
        "--watch",
        choices=("auto", "list", "poll"),
        default="auto",
        help="watch predictions through the executions listing, one request for all (auto: poll each while it "
        "fails; list: never fall back; poll: poll each)",
    )
    polling.add_argument(
        "--reconcile-wait",
        type=_positive_duration,
        default=None,
        metavar="D",
        help="look for a create in doubt D x 0.5, 1.5, 3.5 after it (2s)",
    )


def _shown_options(p: argparse.ArgumentParser) -> None:
    shown = p.add_argument_group("what it shows")
    shown.add_argument("--log-format", choices=("text", "json"), default="text", help="log lines (text)")
    shown.add_argument("--log-file", type=Path, default=None, metavar="PATH", help="append log lines here too")
    shown.add_argument("--quiet", "-q", action="store_true", help="warnings, errors and the summary; nothing when idle")
    shown.add_argument(
        "--progress",
        choices=("auto", "bar", "lines", "none"),
        default="auto",
        help="a bar on a terminal, a line every 10 s otherwise (auto)",
    )
    shown.add_argument("--json", action="store_true", help="plan and validate: machine-readable output")


def _simulator_options(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--sim-rate-limit", type=_rate, default=(60, 60.0), metavar="COUNT/SECONDS")
    p.add_argument("--sim-concurrency", type=_positive_int, default=10, metavar="N")
    p.add_argument("--sim-min-seconds", type=_non_negative_float, default=0.3, metavar="S")
    p.add_argument("--sim-max-seconds", type=_non_negative_float, default=1.5, metavar="S")
    p.add_argument("--sim-failure-rate", type=_fraction, default=0.0, metavar="P")
    p.add_argument("--sim-seed", type=int, default=0, metavar="N")
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="batchrunner",
        description="Bulk image edits on the Eachlabs prediction API, from a YAML manifest.",
        epilog=DURATIONS + "\n" + EXIT_CODES + "\n`batchrunner COMMAND --help` for a command's options.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"batchrunner {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    def command(name: str, summary: str, description: str, epilog: str = "") -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=summary,
            description=textwrap.fill(description, 79),
            epilog=epilog or None,
            formatter_class=_Formatter,
        )

    _batch_commands(command)
    _ledger_commands(command)
    _upkeep_commands(command)
    return parser


def _batch_commands(command: _Command) -> None:
    """run, and the two that take every option of run: plan and validate."""
    run = command(
        "run",
        "run a manifest's batch (resumes where an earlier run stopped)",
        "Turn each job of the manifest into one prediction and one image file, within the API's limits. "
        "Resumable at any instant; nothing is paid twice.",
        _RUN_EPILOG,
    )
    _run_options(run, _common(run))
    run.add_argument("--dry-run", action="store_true", help="say what the run would do and stop (the same as `plan`)")

    plan = command(
        "plan",
        "what a run would do: counts, requests, time and cost (no request)",
        "What `run` would do with the same options: the jobs done and to go, the requests, how long and how much. "
        "It takes every option `run` takes. No request is made and no key is needed.",
        DURATIONS,
    )
    _run_options(plan, _common(plan))

    validate = command(
        "validate",
        "every check a run makes before spending, then the plan",
        "Check the manifest, the local images, the input URLs' hosts and the output names, and name every "
        "problem found (up to 20), then print the plan. With --check-urls each input URL is fetched once.",
        "exit codes: 0 when everything is fine, 2 when something is not.",
    )
    _run_options(validate, _common(validate))


def _ledger_commands(command: _Command) -> None:
    """The commands that read (or reset) what the ledger holds: status, retry, report, export."""
    status = command(
        "status",
        "where a batch stands, and whether a run is active (no request)",
        "Where a manifest's batch stands, from the ledger alone: jobs done, failed, in flight, in doubt and "
        "pending; whether a run holds the folder now, or how the last one ended; the latest failed attempts.",
    )
    _common(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--max-attempts", type=_positive_int, default=3, help="as given to run (3)")

    retry = command(
        "retry",
        "give failed jobs their attempts back (the next run tries them again)",
        "Give every job that failed its attempts back, so that the next run tries it again. "
        "`retry MANIFEST` is `retry MANIFEST --failed`.",
    )
    _common(retry)
    retry.add_argument("--failed", action="store_true", help="reset every failed job (the default)")

    report = command(
        "report",
        "write <output>/report.html: inputs beside outputs",
        "Write <output>/report.html, a page of every job's input beside its output with its prompt, seed, status "
        "and the model's time, searchable and filterable; thumbnails go to <output>/thumbs/. A run writes it "
        "at its end too.",
    )
    _common(report)
    report.add_argument("--max-attempts", type=_positive_int, default=3, help="as given to run (3)")
    report.add_argument("--open", action="store_true", help="open the report in the web browser")

    export = command(
        "export",
        "one row per job, as CSV or JSON lines (no request)",
        "One row per job: id, output file, status, every input field (prompt, input_image, seed, aspect_ratio ...), "
        "attempts, prediction id, cost, the model's time and the last error. To stdout, or to --to FILE.",
    )
    _common(export)
    export.add_argument("--format", choices=("csv", "jsonl"), default="csv", help="csv (default) or jsonl")
    export.add_argument("--to", type=Path, default=None, metavar="FILE", help="write here instead of stdout")
    export.add_argument("--max-attempts", type=_positive_int, default=3, help="as given to run (3)")


def _upkeep_commands(command: _Command) -> None:
    """The commands around a batch: clean-uploads, account, simulate."""
    clean = command(
        "clean-uploads",
        "delete the batch's uploaded input images from the API once no job needs them",
        "Delete from the API's storage (DELETE /v1/files/{id}) every input image this batch uploaded whose jobs are "
        "all done or failed for good; images that pending, in-flight or in-doubt jobs still need are kept and named. "
        "Each deletion is recorded in the ledger, so a later run uploads the image again. Takes the output folder's "
        "lock. With --dry-run nothing is sent and no key is needed.",
        "exit codes:\n  0   every upload no job needs is deleted (or there was none)\n"
        "  1   the API refused a deletion\n  2   bad manifest, arguments or key\n"
        "  74  the output folder cannot be written\n"
        "  75  some uploads are still needed (run the batch first), the API was busy or\n"
        "      unavailable, or a run holds the folder: run it again later\n",
    )
    clean_where = _common(clean)
    clean_where.add_argument("--api-url", default=None, help=f"API base URL (env EACHLABS_API_URL; {DEFAULT_API_URL})")
    clean.add_argument("--dry-run", action="store_true", help="say what would be deleted and kept; send nothing")
    clean.add_argument("--max-attempts", type=_positive_int, default=3, help="as given to run (3)")
    clean.add_argument(
        "--rate-limit",
        type=_rate,
        default=(60, 60.0),
        metavar="COUNT/SECONDS",
        help="requests to the API host in any window of SECONDS (60/60)",
    )
    clean.add_argument(
        "--timeout", type=_positive_duration, default=30.0, metavar="D", help="HTTP timeout per request (30s)"
    )

    account = command(
        "account",
        "the runs now on this key, their slots and the window's use",
        "The runs now sharing this API key's limits (from the limits store, no request to the API): each run's "
        "in-flight slots, and the account's request window.",
    )
    account.add_argument("--api-url", default=None, help=f"API base URL (env EACHLABS_API_URL; {DEFAULT_API_URL})")
    account.add_argument("--json", action="store_true", help="machine-readable output")
    account.add_argument(
        "--limits-store",
        default=None,
        metavar="STORE",
        help="sqlite (default), redis://HOST:PORT/DB; env BATCHRUNNER_LIMITS_STORE",
    )

    sim = command(
        "simulate",
        "serve the built-in API simulator, for experiments",
        "Serve the built-in simulator of the API on HOST:PORT until Ctrl-C.",
    )
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=_port, default=8787)
    _simulator_options(sim)


def sim_config(args: argparse.Namespace) -> SimConfig:
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
