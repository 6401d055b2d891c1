"""``report`` and ``export``: what a batch produced, as a page of inputs beside outputs or as rows."""

from __future__ import annotations

import argparse
import sys
import webbrowser

from batchrunner.cli.args import (
    EXIT_OK,
    load,
    output_dir,
)
from batchrunner.store.ledger import read_ledger
from batchrunner.views.export import write_export
from batchrunner.views.history import read_history
from batchrunner.views.report import write_report


def cmd_report(args: argparse.Namespace) -> int:
    manifest = load(args)
    out = output_dir(args)
    path = write_report(manifest, read_ledger(out.ledger), out, max_attempts=args.max_attempts)
    print(path)
    if args.open and not webbrowser.open(path.resolve().as_uri()):
        print(f"no web browser could be started; open {path} yourself", file=sys.stderr)
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    manifest = load(args)
    out = output_dir(args)
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
