"""``status``: where a batch stands, from the ledger alone, and whether a run holds the folder."""

from __future__ import annotations

import argparse
import json
import time

from batchrunner.cli.args import (
    EXIT_OK,
    command_tail,
    load,
    output_dir,
)
from batchrunner.store.ledger import read_ledger
from batchrunner.store.output import lock_holder
from batchrunner.views.history import read_history
from batchrunner.views.status import count_status, run_activity


def cmd_status(args: argparse.Namespace) -> int:
    manifest = load(args)
    out = output_dir(args)
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
        lines.append(f"next: {counts.failed} failed for good: batchrunner retry {command_tail(args)}")
    elif holder is None and (counts.pending or counts.in_flight or counts.in_doubt):
        lines.append(f"next: batchrunner run {command_tail(args)}")
    print("\n".join(lines))
    return EXIT_OK
