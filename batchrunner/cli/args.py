"""What the commands read from their arguments: the manifest, the output folder, the key, the plan, the exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
from pathlib import Path

from batchrunner.api.redact import check_api_key
from batchrunner.cli.options import sim_config
from batchrunner.engine.estimate import PAGE_SECONDS, TYPICAL_SECONDS
from batchrunner.errors import UsageError
from batchrunner.limits.limiter import check_store_spec
from batchrunner.manifest import Manifest, load_manifest
from batchrunner.store.ledger import LedgerState, read_ledger
from batchrunner.store.output import OutputDir
from batchrunner.views.status import Plan, make_plan

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_IO = 74
EXIT_INCOMPLETE = 75
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

log = logging.getLogger("batchrunner")


def output_dir(args: argparse.Namespace) -> OutputDir:
    if args.output is not None:
        return OutputDir(args.output)
    return OutputDir(Path("output") / args.manifest.stem)


def load(args: argparse.Namespace, *, collect: int = 0) -> Manifest:
    return load_manifest(args.manifest, allow_large=args.allow_large, collect=collect)


def command_tail(args: argparse.Namespace) -> str:
    """The manifest and output as written, for the commands a next step suggests."""
    words = [str(args.manifest)]
    if args.output is not None:
        words += ["--output", str(args.output)]
    return shlex.join(words)


def read_api_key(simulate: bool) -> str:
    """The key from the environment, checked before anything is opened or sent (UsageError never quotes it)."""
    key = os.environ.get("EACHLABS_API_KEY", "")
    if not key.strip():
        if simulate:
            return "simulated-key"
        raise UsageError("EACHLABS_API_KEY is not set (export it, or pass --simulate for the built-in simulator)")
    return check_api_key(key)


def price_of(args: argparse.Namespace, manifest: Manifest) -> float | None:
    return args.price if args.price is not None else manifest.price


def plan_of(args: argparse.Namespace, manifest: Manifest, out: OutputDir, state: LedgerState | None = None) -> Plan:
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
        price=price_of(args, manifest),
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


def limits_store(args: argparse.Namespace) -> str | None:
    """The store of ``--limits-store`` or the environment; the built-in simulator is an account of its own."""
    if getattr(args, "simulate", False):
        return "local"
    spec = args.limits_store or os.environ.get("BATCHRUNNER_LIMITS_STORE", "").strip() or None
    return None if spec is None else check_store_spec(spec)
