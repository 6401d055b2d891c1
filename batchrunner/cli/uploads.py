"""``clean-uploads``: delete the batch's uploaded input images once no job needs them, or say what would go."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from batchrunner.api.client import DEFAULT_API_URL
from batchrunner.cli.args import (
    EXIT_FAILED,
    EXIT_INCOMPLETE,
    EXIT_OK,
    load,
    output_dir,
    read_api_key,
)
from batchrunner.engine.cleanup import Cleanup, clean_uploads, plan_cleanup
from batchrunner.errors import AuthError
from batchrunner.store.ledger import read_ledger


def cmd_clean_uploads(args: argparse.Namespace) -> int:
    manifest = load(args)
    out = output_dir(args)
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
    key = read_api_key(False)
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
