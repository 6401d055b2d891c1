"""``python -m batchrunner.bench``: the arguments, the runs, the table."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import resource
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from batchrunner.bench.measure import measure, redis_server, store_variants
from batchrunner.bench.regimes import CLIENTS, REGIMES, Measurement, Regime
from batchrunner.bench.report import HEADER, LEGEND, format_row, plan_vs_run
from batchrunner.bench.scale import (
    _scale_child,
    cpu_per_job_external,
    output_check_ms,
    request_cpu_ms,
    resume_check,
    scale_check,
)
from batchrunner.bench.shared import measure_shared, shared_child, shared_line


def _folder(root: Path, prefix: str) -> Path:
    """A measurement's own folder under the benchmark's ``root``, removed with it when the benchmark ends.

    Not removed as soon as its measurement ends: on a filesystem without a journal (ext4 so mounted, as on this
    project's machines), allocating an inode passes over every inode freed in the last 30 seconds, so removing one
    run's 10,000 outputs just before the next run made each of that run's creates cost about 0.45 ms of kernel CPU
    (2.56 ms a job at (d) instead of 1.90), the benchmark's own clean-up charged to the runner."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root))


async def _bench(
    regimes: Sequence[Regime],
    jobs: int,
    seed: int,
    repeat: int,
    clients: Sequence[str] = ("runner", "baseline"),
    shared: int = 0,
    *,
    root: Path,
) -> list[Measurement]:
    rows: list[Measurement] = []
    for regime in [v for r in regimes for v in store_variants(r)]:
        if regime.store == "redis":
            with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp, redis_server(Path(tmp)) as url:
                if url is None:
                    print(f"{regime.name:<16} skipped: redis-server is not installed", flush=True)
                    continue
                variant = [dataclasses.replace(regime, store=url)]
                rows += await _bench(variant, jobs, seed, repeat, clients, shared, root=root)
            continue
        for k in range(repeat):
            for who in clients:
                m = await measure(regime, who, jobs, seed + k, _folder(root, "run-"))
                rows.append(m)
                print(format_row(m), flush=True)
                if (versus := plan_vs_run(regime, m)) is not None:
                    print(versus, flush=True)
                if shared > 1 and who == "runner" and regime.external and regime.store != "local":
                    together = await measure_shared(regime, shared, seed + k, _folder(root, "shared-"))
                    print(format_row(together), flush=True)
                    print(shared_line(together, m), flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its table (and, with ``--scale``, the scale checks)."""
    from batchrunner import bench

    summary = (bench.__doc__ or "").split("\n\n")[0]
    p = argparse.ArgumentParser(prog="python -m batchrunner.bench", description=summary)
    p.add_argument("--jobs", type=int, default=100)
    p.add_argument("--regimes", default="a,b,c,e", help="comma-separated, from: " + ", ".join(REGIMES))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--repeat", type=int, default=1, help="runs per regime, with seeds SEED, SEED+1, ...")
    p.add_argument("--clients", default="runner,baseline", help="comma-separated, from: " + ", ".join(CLIENTS))
    p.add_argument("--scale", action="store_true", help="also run the scale and CPU checks")
    p.add_argument(
        "--shared",
        type=int,
        default=0,
        metavar="N",
        help="also run (d)'s jobs as N runs at once sharing its store, each in its own process, beside one run of all",
    )
    p.add_argument("--scale-child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--shared-child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.scale_child is not None:
        return _scale_child(args.scale_child)
    if args.shared_child is not None:
        return shared_child(args.shared_child)
    names = [n.strip() for n in args.regimes.split(",") if n.strip()]
    unknown = [n for n in names if n not in REGIMES]
    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    if unknown or args.jobs < 1 or args.repeat < 1:
        p.error(f"unknown regime(s) {unknown}" if unknown else "--jobs and --repeat must be at least 1")
    if args.shared < 0 or args.shared == 1:
        p.error(f"--shared {args.shared}: expected 2 or more runs (or 0, the default: none)")
    if not clients or any(c not in CLIENTS for c in clients):
        p.error(f"--clients: expected some of {', '.join(CLIENTS)}, not {args.clients!r}")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; times in seconds (scaled x10); seed {args.seed}")
    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-") as root:
        rows = asyncio.run(
            _bench(
                [REGIMES[n] for n in names], args.jobs, args.seed, args.repeat, clients, args.shared, root=Path(root)
            )
        )
    print(LEGEND)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  peak RSS of this process (the client; the simulator too where it runs in-process): {peak_mb:.0f} MB")
    if args.repeat > 1:
        print("means:")
        for regime in names:
            for who in clients:
                sel = [m for m in rows if m.regime == REGIMES[regime].name and m.client == who]
                eff = sum(m.efficiency for m in sel) / len(sel)
                print(f"  {REGIMES[regime].name:<16} {who:<8} efficiency {eff:.3f} over {len(sel)} runs")
    if args.scale:
        print("scale checks:", flush=True)
        print("  " + scale_check(), flush=True)
        print("  " + resume_check(), flush=True)
        for name in ("a", "b"):
            regime = REGIMES[name]
            ms, span = cpu_per_job_external(regime, args.jobs, args.seed)
            verdict = "PASS" if ms < 2.0 else "FAIL"
            print(
                f"  runner CPU, regime {regime.name}, simulator in another process: {ms:.2f} ms/job "
                f"(makespan {span:.1f} s) -> {verdict} (< 2 ms)",
                flush=True,
            )
        tight, paced = request_cpu_ms()
        print(
            f"  floor: one bare poll costs {tight:.2f} ms CPU sent back to back, {paced:.2f} ms with the process idle "
            "0.1 s between polls (waking costs more than the request)",
            flush=True,
        )
        print(
            f"  checking one 1024x1024 PNG output (Pillow decode, in a worker thread): {output_check_ms():.1f} ms "
            "CPU per job, on top of the above (runs above use 32-pixel outputs)",
            flush=True,
        )
    return 0
