"""The command line: each command's wiring and its exit code. No business logic lives here.

What the command line accepts is in ``options.py``; each command's wiring in a module of its own (``run``,
``plan``, ``validate``, ``status``, ``retry``, ``report`` (and export), ``uploads``, ``account``, ``simulate``), what
they all read from their arguments in ``args.py``. What a run shows is in ``views/progress.py`` and
``views/display.py``; how it logs, in ``views/logs.py``.

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
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from batchrunner.api.redact import Redactor
from batchrunner.cli.account import cmd_account
from batchrunner.cli.args import EXIT_INTERRUPTED, EXIT_OK
from batchrunner.cli.options import build_parser
from batchrunner.cli.plan import cmd_plan
from batchrunner.cli.report import cmd_export, cmd_report
from batchrunner.cli.retry import cmd_retry
from batchrunner.cli.run import cmd_run
from batchrunner.cli.simulate import cmd_simulate
from batchrunner.cli.status import cmd_status
from batchrunner.cli.uploads import cmd_clean_uploads
from batchrunner.cli.validate import cmd_validate
from batchrunner.errors import BatchrunnerError
from batchrunner.views.logs import RedactingFilter, setup_logging

__all__ = ["build_parser", "main"]

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
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
