"""Runs sharing one account: a regime's jobs split among N runs, each in its own process, all on one limits store
(the default SQLite database of one state folder, or one redis-server), against one simulator in a process of its own.

This is cron at a large account: several batches on one key at once. The runs must keep the account's limits between
them (the simulator counts every 429) and, together, take about as long as one run of all their jobs would: the
benchmark prints their makespan (first run's start to last run's last success) beside that one run's.

A run is ``python -m batchrunner.bench --shared-child FOLDER``: it reads ``FOLDER/child.json`` (the simulator's URL, the
regime, its seeds, the state folder), runs the runner as ``run_runner`` does and prints its record as JSON. Times are
the loop's, ``time.monotonic()``, which every process on the machine shares.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
from pathlib import Path

import aiohttp

from batchrunner.bench.clients import RunRecord, run_runner
from batchrunner.bench.measure import ServerSeen, external_simulator, measure_record, simulator_args
from batchrunner.bench.regimes import Measurement, Regime
from batchrunner.sim.server import Faults

__all__ = ["SHARED_TARGET", "measure_shared", "shared_child", "shared_line", "split_seeds"]

# Runs sharing the account together within this factor of one run of the union (the target).
SHARED_TARGET = 1.15


def split_seeds(jobs: int, runs: int) -> list[list[int]]:
    """The seeds 0 .. jobs - 1 dealt to ``runs`` runs in turn: no job in two runs, sizes within one."""
    if runs < 1:
        raise ValueError("runs must be at least 1")
    return [list(range(k, jobs, runs)) for k in range(runs)]


async def measure_shared(regime: Regime, runs: int, seed: int, folder: Path) -> Measurement:
    """``regime``'s jobs as ``runs`` runs at once, each its own process, sharing the regime's store."""
    jobs = regime.jobs or 100
    state = folder / "state"
    with external_simulator(simulator_args(regime, seed)) as url:
        procs = []
        for k, seeds in enumerate(split_seeds(jobs, runs)):
            child = folder / f"run{k}"
            child.mkdir(parents=True)
            spec = {"url": url, "regime": dataclasses.asdict(regime), "seeds": seeds, "state": str(state)}
            (child / "child.json").write_text(json.dumps(spec), encoding="utf-8")
            cmd = [sys.executable, "-m", "batchrunner.bench", "--shared-child", str(child)]
            procs.append(await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE))
        outs = await asyncio.gather(*(proc.communicate() for proc in procs))
        if any(proc.returncode != 0 for proc in procs):
            raise RuntimeError(f"a shared run failed (exits {[proc.returncode for proc in procs]})")
        records = [json.loads(out) for out, _ in outs]
        async with aiohttp.ClientSession() as session:
            seen = await ServerSeen.fetch(session, url)
    run = RunRecord(started=min(r["started"] for r in records))
    for r in records:
        run.successes += r["successes"]
        run.seen.update(r["seen"])
    cpu = sum(r["cpu"] for r in records)
    return measure_record(regime, f"{runs} runs", jobs, seen, run, cpu)


def shared_child(folder: Path) -> int:
    """One of the shared runs (in its own process): run, then print the record as JSON."""
    spec = json.loads((folder / "child.json").read_text(encoding="utf-8"))
    fields = spec["regime"]
    fields["faults"] = Faults(**fields["faults"])
    fields["variants"] = tuple(fields["variants"])
    regime = Regime(**fields)
    seeds = [int(s) for s in spec["seeds"]]
    cpu0 = time.process_time()
    run = asyncio.run(run_runner(regime, len(seeds), spec["url"], folder, seeds=seeds, state=Path(spec["state"])))
    cpu = time.process_time() - cpu0
    print(json.dumps({"started": run.started, "successes": run.successes, "seen": run.seen, "cpu": cpu}))
    return 0


def shared_line(shared: Measurement, alone: Measurement) -> str:
    """The shared runs against one run of the union: the ratio of makespans, the 429s, the verdict."""
    ratio = shared.makespan / max(1e-9, alone.makespan)
    ok = ratio <= SHARED_TARGET and shared.rejected == 0 and shared.succeeded == shared.jobs
    return (
        f"  {shared.client} sharing one store: {shared.makespan:.1f} s against {alone.makespan:.1f} s for one run "
        f"of the union ({ratio:.2f}x), {shared.rejected} 429s -> {'PASS' if ok else 'FAIL'} "
        f"(within {SHARED_TARGET:g}x, no 429)"
    )
