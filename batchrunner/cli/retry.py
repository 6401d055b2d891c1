"""``retry``: give failed jobs their attempts back, under the folder's lock."""

from __future__ import annotations

import argparse
import sys

from batchrunner.cli.args import (
    EXIT_OK,
    command_tail,
    load,
    output_dir,
)
from batchrunner.engine.runner import reset_failed
from batchrunner.store.ledger import Ledger, read_ledger
from batchrunner.store.output import RunLock


def cmd_retry(args: argparse.Namespace) -> int:
    manifest = load(args)
    out = output_dir(args)
    out.create()
    with RunLock(out.lock), Ledger(out.ledger) as ledger:
        count = reset_failed(manifest, read_ledger(out.ledger), ledger)
    if count:
        print(f"{count} failed jobs will be tried again: batchrunner run {command_tail(args)}", file=sys.stderr)
    else:
        print("no failed jobs: nothing to retry", file=sys.stderr)
    return EXIT_OK
