"""One client over one regime against a fresh simulator (in this process or its own), and what it saw."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from batchrunner.bench.bounds import max_in_window, request_bound, slot_bound
from batchrunner.bench.clients import RunRecord, run_baseline, run_runner
from batchrunner.bench.regimes import Measurement, Regime, sim_config
from batchrunner.sim.server import Simulator


def prediction_records(sim: Simulator) -> list[tuple[str, float, float, float]]:
    """(id, created_at, duration, finish_at) of every prediction, in creation order.

    Read through the simulator's ``prediction_times()``.
    """
    return sim.prediction_times()


@dataclass(frozen=True, slots=True)
class ServerSeen:
    """What the simulator saw, from its object or from its test endpoints in another process."""

    records: list[tuple[str, float, float, float]]
    creates: int
    polls: int
    listings: int
    cancels: int
    rate_limited: int
    concurrency_rejected: int
    max_window: int
    max_in_flight: int

    @classmethod
    def of(cls, sim: Simulator) -> ServerSeen:
        st = sim.stats
        return cls(
            prediction_records(sim),
            st.creates,
            st.polls,
            st.listings,
            st.cancels,
            st.rate_limited,
            st.concurrency_rejected,
            st.max_window,
            st.max_in_flight,
        )

    @classmethod
    async def fetch(cls, session: aiohttp.ClientSession, url: str) -> ServerSeen:
        async with session.get(f"{url}/_sim/stats") as answer:
            st = await answer.json()
        async with session.get(f"{url}/_sim/predictions") as answer:
            rows = (await answer.json())["predictions"]
        records = [(pid, c, d, math.inf if f is None else f) for pid, c, d, f in rows]
        return cls(
            records,
            creates=int(st["creates"]),
            polls=int(st["polls"]),
            listings=int(st["listings"]),
            cancels=int(st["cancels"]),
            rate_limited=int(st["rate_limited"]),
            concurrency_rejected=int(st["concurrency_rejected"]),
            max_window=int(st["max_window"]),
            max_in_flight=int(st["max_in_flight"]),
        )


def measure_record(regime: Regime, who: str, jobs: int, seen: ServerSeen, run: RunRecord, cpu: float) -> Measurement:
    records = seen.records
    durations = [d for _, _, d, _ in records]
    creates = sorted(c for _, c, _, _ in records)
    finishes = {pid: f for pid, _, _, f in records}
    delays = [run.seen[pid] - finishes[pid] for pid in run.seen if pid in finishes]
    freed = sorted(run.seen.values())
    c = regime.concurrency
    refills = [creates[k] - freed[k - c] for k in range(c, min(len(creates), len(freed) + c))]
    last = max(run.successes, default=run.started)
    stats = seen
    window = stats.max_window if regime.scope == "all" else max_in_window(creates, regime.rate_period)
    return Measurement(
        regime=regime.name,
        client=who,
        jobs=jobs,
        succeeded=len(run.successes),
        makespan=last - run.started,
        request_bound=request_bound(jobs, regime.rate_count, regime.rate_period, per_job=regime.per_job),
        slot_bound=slot_bound(durations, c),
        requests=stats.creates
        + stats.concurrency_rejected
        + stats.polls
        + stats.listings
        + stats.cancels
        + stats.rate_limited,
        creates=stats.creates,
        rejected=stats.rate_limited + stats.concurrency_rejected,
        max_window=window,
        max_in_flight=stats.max_in_flight,
        cpu=cpu,
        startup=(creates[0] - run.started) if creates else 0.0,
        detect=sum(delays) / len(delays) if delays else 0.0,
        refill=sum(refills) / len(refills) if refills else 0.0,
        tail=last - max(finishes.values(), default=last),
    )


async def measure(regime: Regime, who: str, jobs: int, seed: int, folder: Path, watch: str = "auto") -> Measurement:
    """One client (``runner``, ``runner-poll`` or ``baseline``) over ``jobs`` jobs of ``regime`` against a fresh
    in-process simulator. ``runner-poll`` is the runner with ``--watch poll``: each prediction polled."""
    jobs = regime.jobs or jobs
    if regime.external:
        return await _measure_external(regime, who, jobs, seed, folder, watch)
    async with Simulator(sim_config(regime, seed)) as sim:
        cpu0 = time.process_time()
        if who == "baseline":
            run = await run_baseline(regime, jobs, sim.base_url, folder)
        else:
            run = await run_runner(regime, jobs, sim.base_url, folder, "poll" if who == "runner-poll" else watch)
        return measure_record(regime, who, jobs, ServerSeen.of(sim), run, time.process_time() - cpu0)


def simulator_args(regime: Regime, seed: int) -> list[str]:
    """``batchrunner simulate``'s options for ``regime`` (32-pixel outputs: the runner's work is what is measured)."""
    args = ["--sim-rate-limit", f"{regime.rate_count}/{regime.rate_period:g}", "--sim-seed", str(seed)]
    args += ["--sim-concurrency", str(regime.concurrency), "--sim-image-size", "32"]
    return [*args, "--sim-min-seconds", str(regime.min_seconds), "--sim-max-seconds", str(regime.max_seconds)]


async def _measure_external(regime: Regime, who: str, jobs: int, seed: int, folder: Path, watch: str) -> Measurement:
    """As ``measure``, with the simulator in its own process: at 100x the limits one process cannot serve both, and
    the CPU column is then the client's alone."""
    with external_simulator(simulator_args(regime, seed)) as url:
        cpu0 = time.process_time()
        if who == "baseline":
            run = await run_baseline(regime, jobs, url, folder)
        else:
            run = await run_runner(regime, jobs, url, folder, "poll" if who == "runner-poll" else watch)
        cpu = time.process_time() - cpu0
        async with aiohttp.ClientSession() as session:
            seen = await ServerSeen.fetch(session, url)
    return measure_record(regime, who, jobs, seen, run, cpu)


@contextlib.contextmanager
def external_simulator(args: Sequence[str]) -> Iterator[str]:
    """``batchrunner simulate`` in its own process (so its CPU is not ours); yields its base URL."""
    cmd = [sys.executable, "-m", "batchrunner", "simulate", "--port", "0", *args]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()  # "simulator listening on URL (Ctrl-C to stop)"
        if "listening on" not in line:
            raise RuntimeError(f"simulator did not start: {line.strip()}")
        yield line.split("listening on ", 1)[1].split()[0]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextlib.contextmanager
def redis_server(folder: Path) -> Iterator[str | None]:
    """A redis-server on a free loopback port, no persistence, while the block lasts; yields its URL (None when
    redis-server is not installed)."""
    exe = shutil.which("redis-server")
    if exe is None:
        yield None
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10.0
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def store_variants(regime: Regime) -> list[Regime]:
    """The regime as measured: with its store, then each variant's (named by store, so every row says which)."""
    out = [regime]
    base = regime.name.rsplit(" ", 1)[0]
    out += [dataclasses.replace(regime, name=f"{base} {v}", store=v, variants=()) for v in regime.variants]
    return out
