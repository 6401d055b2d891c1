"""The CPU of the dispatcher's decisions alone, with many predictions in flight (no request is sent).

    python tests/dispatch_bench.py [--flights 1000] [--turns 3000] [--seed 1]

Builds a Scheduler over fake flights on a fake clock with every slot taken (no create can go, so each turn asks the
cancels, the doubts, the creates and the watching, as at the limits of a large account), then times turns of its
choice: a poll chosen is answered at once with "still running" (so the flight's plan and its chance of being done move
on, as in a run), a listing page is left unsent. Two watch modes: ``poll`` (every flight polled on its own: the due
polls and the spare poll decide) and ``auto`` (every flight watched by the listing: the deadlines decide). Prints the
milliseconds per turn for each.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from batchrunner.api.answers import Phase, Prediction
from batchrunner.api.client import Client
from batchrunner.engine.runstate import Flight, RunConfig
from batchrunner.engine.scheduler import Scheduler
from batchrunner.manifest import load_manifest
from batchrunner.store.ledger import Ledger, read_ledger
from batchrunner.store.output import OutputDir


class Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


def running(prediction_id: str) -> Prediction:
    return Prediction(prediction_id, "processing", Phase.RUNNING, (), None, None, False, None, None)


async def measure(mode: str, flights: int, turns: int, seed: int, folder: Path) -> tuple[float, dict[str, int]]:
    """Milliseconds per turn of the dispatcher's choice, and what it chose how often."""
    rng = random.Random(seed)
    manifest_path = folder / f"{mode}.yaml"
    manifest_path.write_text(
        "model: flux-kontext-max\nmatrix:\n  prompt: [a snowy winter evening]\n  seed: [0]\n", encoding="utf-8"
    )
    manifest = load_manifest(manifest_path)
    out = OutputDir(folder / f"out-{mode}")
    out.create()
    out.prepare()
    state = read_ledger(out.ledger)
    state.durations.extend(rng.uniform(1.0, 6.0) for _ in range(500))
    clock = Clock()
    config = RunConfig(
        concurrency=flights, rate_count=6000, rate_period=6.0, poll_initial=0.3, job_timeout=600.0, watch=mode
    )
    job = manifest.jobs[0]
    chosen: dict[str, int] = {}
    with Ledger(out.ledger) as ledger:
        async with aiohttp.ClientSession() as session:
            client = Client(session, base_url="http://127.0.0.1:9", api_key="unused")
            sched = Scheduler(manifest, client, ledger, out, state, config, clock=clock)
            for i in range(flights):
                created = -rng.uniform(0.0, 6.0)
                checked = rng.choice([None, rng.uniform(0.0, -created)])
                flight = Flight(
                    job.id,
                    job.fingerprint,
                    f"p-{i}",
                    created_at=created,
                    job=job,
                    last_running_age=checked,
                    next_poll_at=created + rng.uniform(0.0, 8.0),
                    listed=mode != "poll",
                )
                sched.watching.add(flight)
                sched.ctx.gate.in_flight += 1
            # Between two listing rounds (the next is far off): each turn asks every collaborator.
            sched.watching.watch.next_at = 1e9
            start = time.perf_counter()
            for _ in range(turns):
                clock.t += 0.001
                action, _ = sched._choose(clock.t)
                kind = "none" if action is None else action[0]
                chosen[kind] = chosen.get(kind, 0) + 1
                if action is not None and kind == "poll":
                    target: Flight = action[1]
                    target.busy = True
                    sched.watching.observe(target, running(target.prediction_id))
            elapsed = time.perf_counter() - start
    return elapsed / turns * 1000.0, chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flights", type=int, default=1000)
    parser.add_argument("--turns", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("poll", "auto"):
            ms, chosen = asyncio.run(measure(mode, args.flights, args.turns, args.seed, Path(tmp)))
            picks = ", ".join(f"{k} {v}" for k, v in sorted(chosen.items()))
            print(f"watch={mode:4}  {args.flights} in flight: {ms:.4f} ms per turn  ({picks})")


if __name__ == "__main__":
    main()
