"""The benchmark: the runner and a naive baseline against the simulator, each measured against the theoretical bound.

With R requests per W seconds, C in flight and prediction times d_i, a batch of N jobs needs at least one create and
one poll per job, and a sliding window admits request k+R no sooner than W after request k: the makespan is at least
``W * (ceil(2N/R) - 1)`` (``N`` in place of ``2N`` when only creates count). It is also at least the makespan of the
d_i packed greedily, in creation order, into C slots by a client that saw every completion the instant it happened.
The larger of the two is the bound; efficiency is ``bound / makespan``.

Regimes are the real limits scaled x10 in time (60/60 -> 60/6, predictions 10-60 s -> 1-6 s), so each run takes
seconds. ``--scale`` adds the scale checks (a 100,000-job manifest against a 300,000-line ledger, in a subprocess so
its peak memory is its own) and the runner's CPU per job with the simulator in another process.

    python -m batchrunner.bench [--jobs 100] [--regimes a,b,c,d,e] [--clients runner,runner-poll,baseline]
                                [--seed N] [--repeat K] [--scale]

(d) is 100x the limits (6000/6, 1000 in flight, 10,000 jobs) with the simulator in its own process; (e) is (b) with
the executions listing answering 500. The runner runs with its defaults, time-like ones x0.1 (``scaled_defaults``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import heapq
import json
import logging
import math
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
from PIL import Image

from batchrunner.api.client import Client, ExecutionsPage, Phase, Prediction, classify_status
from batchrunner.engine.estimate import PAGE_SECONDS, estimate_run, spread_times
from batchrunner.engine.runstate import CONNECTIONS
from batchrunner.engine.scheduler import RunConfig, Scheduler, Snapshot, classify
from batchrunner.errors import RateLimited
from batchrunner.limits.limiter import AccountLimiter, LocalLimits, RunLimits, open_limits
from batchrunner.manifest import Job, Manifest, load_manifest
from batchrunner.sim.server import Faults, SimConfig, Simulator
from batchrunner.store.ledger import Ledger, RequestLog, read_ledger
from batchrunner.store.output import OutputDir, image_extension, save_download

KEY = "bench-key"
# runner-poll: the runner with --watch poll (each prediction polled, as before the listing watcher).
CLIENTS = ("runner", "runner-poll", "baseline")
# A window no client reaches: the simulator counts every request, so "polls free" is modelled by a loose server
# window plus a check, from the server's own create times, that creates stayed within R per W.
UNLIMITED = 1_000_000


# ----------------------------------------------------------------------------------------------- the bound (pure)
def request_bound(n_jobs: int, count: int, period: float, *, per_job: int = 2) -> float:
    """``period * (ceil(per_job * n_jobs / count) - 1)``, never below 0: the window's floor on the makespan."""
    if n_jobs <= 0:
        return 0.0
    return max(0.0, period * (math.ceil(per_job * n_jobs / count) - 1))


def slot_bound(durations: Sequence[float], concurrency: int) -> float:
    """Makespan of ``durations`` packed greedily in list order into ``concurrency`` slots, all free at 0."""
    slots = [0.0] * max(1, concurrency)
    finish = 0.0
    for d in durations:
        end = heapq.heappop(slots) + d
        finish = max(finish, end)
        heapq.heappush(slots, end)
    return finish


def bound(durations: Sequence[float], count: int, period: float, concurrency: int, *, per_job: int = 2) -> float:
    """The larger of :func:`request_bound` (one job per duration) and :func:`slot_bound`."""
    return max(request_bound(len(durations), count, period, per_job=per_job), slot_bound(durations, concurrency))


def efficiency(bound_s: float, makespan: float) -> float:
    """``bound / makespan``; 1.0 for an empty batch, 0.0 for a makespan of zero against a positive bound."""
    if makespan <= 0:
        return 1.0 if bound_s <= 0 else 0.0
    return bound_s / makespan


def max_in_window(times: Sequence[float], period: float) -> int:
    """The most ``times`` inside any half-open window ``(t - period, t]``."""
    ordered = sorted(times)
    best = start = 0
    for end, t in enumerate(ordered):
        while ordered[start] <= t - period:
            start += 1
        best = max(best, end - start + 1)
    return best


# ----------------------------------------------------------------------------------------------- regimes and records
@dataclass(frozen=True, slots=True)
class Regime:
    """One benchmark setting: limits, prediction times, the runner's priors, the baseline's poll interval."""

    name: str
    rate_count: int
    rate_period: float
    concurrency: int
    min_seconds: float
    max_seconds: float
    scope: str = "all"
    baseline_poll: float = 0.1
    jobs: int | None = None  # the regime's own batch size, when --jobs does not apply
    external: bool = False  # the simulator in its own process (the CPU column is then the client's alone)
    faults: Faults = field(default_factory=Faults)
    # The runner's limits store: ``local`` (a run's own limits, as ``--simulate`` keeps them), ``sqlite`` (the default
    # every user gets: the state folder's database, here a temporary one), ``redis`` (a redis-server the bench starts).
    store: str = "local"
    variants: tuple[str, ...] = ()  # other stores the regime is also measured with

    @property
    def per_job(self) -> int:
        return 2 if self.scope == "all" else 1


REGIMES: dict[str, Regime] = {
    "a": Regime("a realistic", 60, 6.0, 10, 1.0, 6.0),
    "b": Regime("b request-bound", 60, 6.0, 10, 0.2, 1.0),
    "c": Regime("c polls free", 60, 6.0, 10, 1.0, 6.0, scope="creates"),
    "d": Regime(
        "d 100x sqlite", 6000, 6.0, 1000, 1.0, 6.0, jobs=10_000, external=True, store="sqlite", variants=("redis",)
    ),
    "e": Regime("e listing down", 60, 6.0, 10, 0.2, 1.0, faults=Faults(listing_error=1.0)),
}
# Regimes run at a tenth of real time, and so do the runner's time-like defaults: the runner is benchmarked with its
# defaults, never with settings picked for a regime.
TIME_SCALE = 0.1


def scaled_defaults(regime: Regime, watch: str = "auto") -> RunConfig:
    """The runner's defaults (``RunConfig()``, as the CLI fills them), times x ``TIME_SCALE``, the regime's limits."""
    d = RunConfig()
    min_interval = 1.0 if regime.scope == "creates" else 0.0  # the CLI's default for --rate-limit-scope creates
    return RunConfig(
        concurrency=regime.concurrency,
        rate_count=regime.rate_count,
        rate_period=regime.rate_period,
        rate_scope=regime.scope,
        job_timeout=d.job_timeout * TIME_SCALE,
        drain_timeout=d.drain_timeout * TIME_SCALE,
        poll_initial=d.poll_initial * TIME_SCALE,
        poll_min_interval=min_interval * TIME_SCALE,
        retry_base=d.retry_base * TIME_SCALE,
        retry_cap=d.retry_cap * TIME_SCALE,
        reconcile_wait=d.reconcile_wait * TIME_SCALE,
        clock_skew=d.clock_skew * TIME_SCALE,
        listing_probe=d.listing_probe * TIME_SCALE,
        watch=watch,
    )


@dataclass(frozen=True, slots=True)
class Measurement:
    """One client's run of one regime, with the bound from the durations the simulator actually drew."""

    regime: str
    client: str
    jobs: int
    succeeded: int
    makespan: float
    request_bound: float
    slot_bound: float
    requests: int
    creates: int
    rejected: int  # 429s the server sent (window + concurrency)
    max_window: int  # busiest window of the counted requests (creates only when polls are free)
    max_in_flight: int
    cpu: float  # process CPU seconds over the run (simulator included when it is in-process)
    startup: float  # run start -> first create at the server
    detect: float  # mean seconds from a prediction's finish to the poll that saw it
    refill: float  # mean seconds from a slot seen free to the next create
    tail: float  # last finish at the server -> last success (detection + download of the last job)

    @property
    def bound(self) -> float:
        return max(self.request_bound, self.slot_bound)

    @property
    def efficiency(self) -> float:
        return efficiency(self.bound, self.makespan)

    @property
    def requests_per_job(self) -> float:
        return self.requests / max(1, self.jobs)


class _Watch(Client):
    """The real client, noting when each prediction was first seen finished (for the loss breakdown)."""

    seen: dict[str, float]

    async def get(self, prediction_id: str, *, kind: str = "poll", request_id: str | None = None) -> Prediction:
        prediction = await super().get(prediction_id, kind=kind, request_id=request_id)
        if prediction.phase is not Phase.RUNNING:
            self.seen.setdefault(prediction_id, asyncio.get_running_loop().time())
        return prediction

    async def executions(
        self, *, model: str, start: float, end: float, limit: int = 100, offset: int = 0, kind: str = "list"
    ) -> ExecutionsPage:
        page = await super().executions(model=model, start=start, end=end, limit=limit, offset=offset, kind=kind)
        now = asyncio.get_running_loop().time()
        for row in page.rows:
            if classify_status(row.status) is not Phase.RUNNING:  # the status word alone: cheap, as it must be here
                self.seen.setdefault(row.id, now)
        return page


@dataclass(slots=True)
class _Run:
    """What a client's run leaves for :func:`_measure`: its start, successes and what it saw."""

    started: float
    successes: list[float] = field(default_factory=list)
    seen: dict[str, float] = field(default_factory=dict)


def write_manifest(folder: Path, jobs: int) -> Path:
    """A prompt-only matrix of ``jobs`` seeds: no image I/O in the measurement."""
    seeds = ", ".join(str(i) for i in range(jobs))
    path = folder / "bench.yaml"
    path.write_text(
        f'model: flux-kontext-max\nmatrix:\n  prompt: ["Turn the scene into a snowy winter evening"]\n'
        f"  seed: [{seeds}]\n",
        encoding="utf-8",
    )
    return path


def sim_config(regime: Regime, seed: int) -> SimConfig:
    """The simulator for ``regime``; when polls are free its window is loose (see ``UNLIMITED``)."""
    count = regime.rate_count if regime.scope == "all" else UNLIMITED
    return SimConfig(
        rate_count=count,
        rate_period=regime.rate_period,
        concurrency=regime.concurrency,
        min_seconds=regime.min_seconds,
        max_seconds=regime.max_seconds,
        seed=seed,
        image_size=32,
        faults=regime.faults,
    )


def prediction_records(sim: Simulator) -> list[tuple[str, float, float, float]]:
    """(id, created_at, duration, finish_at) of every prediction, in creation order.

    Read through the simulator's ``prediction_times()``.
    """
    return sim.prediction_times()


@dataclass(frozen=True, slots=True)
class _Seen:
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
    def of(cls, sim: Simulator) -> _Seen:
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
    async def fetch(cls, session: aiohttp.ClientSession, url: str) -> _Seen:
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


def _measure(regime: Regime, who: str, jobs: int, seen: _Seen, run: _Run, cpu: float) -> Measurement:
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


def _prepare(folder: Path, jobs: int, name: str) -> tuple[Manifest, OutputDir]:
    manifest = load_manifest(write_manifest(folder, jobs))
    out = OutputDir(folder / name)
    out.create()
    out.prepare()
    return manifest, out


async def run_runner(regime: Regime, jobs: int, base_url: str, folder: Path, watch: str = "auto") -> _Run:
    """Run the Scheduler as ``cli._run_async`` does against ``base_url``; returns start, successes, sightings.

    With the regime's store ``sqlite`` or a ``redis://`` URL its limits are the account's, through that store, as a
    user's run has them (``runner.run_batch``); with ``local`` they are its own, as ``--simulate`` keeps them."""
    if regime.store == "local":
        return await _run_runner(regime, jobs, base_url, folder, watch, None)
    spec = None if regime.store == "sqlite" else regime.store
    config = dataclasses.replace(scaled_defaults(regime, watch), limits_store=spec)
    saved = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(folder / "state")  # a fresh account database, as a first run has
    try:
        limits_cm = open_limits(
            RunLimits(config.rate_count, config.rate_period, config.concurrency, spec, config.poll_initial),
            api_url=base_url,
            api_key=KEY,
            request_timeout=30.0 * TIME_SCALE,
            label=str((folder / "runner").resolve()),
        )
        async with limits_cm as limits:
            return await _run_runner(regime, jobs, base_url, folder, watch, limits)
    finally:
        if saved is None:
            os.environ.pop("XDG_STATE_HOME", None)
        else:
            os.environ["XDG_STATE_HOME"] = saved


async def _run_runner(
    regime: Regime,
    jobs: int,
    base_url: str,
    folder: Path,
    watch: str,
    limits: AccountLimiter | LocalLimits | None,
) -> _Run:
    manifest, out = _prepare(folder, jobs, "runner")
    config = scaled_defaults(regime, watch)
    loop = asyncio.get_running_loop()
    run = _Run(started=loop.time())
    done = [0]

    def progress(snap: Snapshot) -> None:
        if snap.done > done[0]:
            # Two downloads may finish in one loop turn: one time per success.
            run.successes.extend([loop.time()] * (snap.done - done[0]))
            done[0] = snap.done

    request_log = RequestLog(out.requests)
    try:
        with Ledger(out.ledger) as ledger:
            # The run's own pool, as batchrunner run opens it (engine/runner.py).
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONNECTIONS)) as session:
                client = _Watch(session, base_url=base_url, api_key=KEY, timeout=30.0 * TIME_SCALE)
                client.seen = run.seen
                state = read_ledger(out.ledger)
                scheduler = Scheduler(
                    manifest,
                    client,
                    ledger,
                    out,
                    state,
                    config,
                    request_log=request_log,
                    on_progress=progress,
                    limits=limits,
                )
                run.started = loop.time()
                await scheduler.run()
    finally:
        request_log.close()
    return run


async def run_baseline(regime: Regime, jobs: int, base_url: str, folder: Path) -> _Run:
    """A naive client: up to C in flight, each polled every ``baseline_poll`` s, only 429s slow it (Retry-After)."""
    manifest, out = _prepare(folder, jobs, "baseline")
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(regime.concurrency)

    async def one(client: Client, job: Job, run: _Run) -> None:
        async with slots:
            while True:
                try:
                    pid = await client.create(manifest.model, manifest.version, dict(job.input))
                    break
                except RateLimited as exc:
                    await asyncio.sleep(exc.retry_after or 1.0)
            while True:
                await asyncio.sleep(regime.baseline_poll)
                try:
                    prediction = await client.get(pid)
                except RateLimited as exc:
                    await asyncio.sleep(exc.retry_after or 1.0)
                    continue
                if prediction.phase is not Phase.RUNNING:
                    break
        if prediction.urls:
            url = prediction.urls[0]
            await save_download(out, job.id, lambda sink: client.download(url, sink))
            run.successes.append(loop.time())

    async with aiohttp.ClientSession() as session:
        client = _Watch(session, base_url=base_url, api_key=KEY)
        run = _Run(started=loop.time())
        client.seen = run.seen
        await asyncio.gather(*(one(client, job, run) for job in manifest.jobs))
    return run


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
        return _measure(regime, who, jobs, _Seen.of(sim), run, time.process_time() - cpu0)


async def _measure_external(regime: Regime, who: str, jobs: int, seed: int, folder: Path, watch: str) -> Measurement:
    """As ``measure``, with the simulator in its own process: at 100x the limits one process cannot serve both, and
    the CPU column is then the client's alone."""
    args = ["--sim-rate-limit", f"{regime.rate_count}/{regime.rate_period:g}", "--sim-seed", str(seed)]
    args += ["--sim-concurrency", str(regime.concurrency), "--sim-image-size", "32"]
    args += ["--sim-min-seconds", str(regime.min_seconds), "--sim-max-seconds", str(regime.max_seconds)]
    with external_simulator(args) as url:
        cpu0 = time.process_time()
        if who == "baseline":
            run = await run_baseline(regime, jobs, url, folder)
        else:
            run = await run_runner(regime, jobs, url, folder, "poll" if who == "runner-poll" else watch)
        cpu = time.process_time() - cpu0
        async with aiohttp.ClientSession() as session:
            seen = await _Seen.fetch(session, url)
    return _measure(regime, who, jobs, seen, run, cpu)


# ----------------------------------------------------------------------------------------------- scale checks
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


def cpu_per_job_external(regime: Regime, jobs: int, seed: int, image_size: int = 32) -> tuple[float, float]:
    """(runner CPU ms per job, makespan s) with the simulator in its own process (``batchrunner simulate``)."""
    args = ["--sim-rate-limit", f"{regime.rate_count}/{regime.rate_period:g}", "--sim-seed", str(seed)]
    args += ["--sim-min-seconds", str(regime.min_seconds), "--sim-max-seconds", str(regime.max_seconds)]
    args += ["--sim-image-size", str(image_size)]
    with external_simulator(args) as url, tempfile.TemporaryDirectory(prefix="bench-cpu-") as tmp:
        cpu0 = time.process_time()
        run = asyncio.run(run_runner(regime, jobs, url, Path(tmp)))
        cpu = time.process_time() - cpu0
    return cpu / jobs * 1000, max(run.successes, default=run.started) - run.started


def request_cpu_ms(gaps: Sequence[float] = (0.0, 0.1), count: int = 100) -> list[float]:
    """CPU ms of this process per bare poll (``Client.get``) to an external simulator, sent back to back (gap 0) or
    with the process idle ``gap`` seconds between requests, as a paced runner is. The floor under the runner's CPU."""

    async def measure_gaps(url: str) -> list[float]:
        out = []
        async with aiohttp.ClientSession() as session:
            client = Client(session, base_url=url, api_key=KEY)
            pid = await client.create("flux-kontext-max", "0.0.1", {"prompt": "a poll target for the CPU floor"})
            for _ in range(10):
                await client.get(pid)  # warm the connection
            for gap in gaps:
                cpu0 = time.process_time()
                for _ in range(count):
                    await client.get(pid)
                    if gap:
                        await asyncio.sleep(gap)
                out.append((time.process_time() - cpu0) / count * 1000)
        return out

    with external_simulator(["--sim-rate-limit", "1000000/1", "--sim-image-size", "32"]) as url:
        return asyncio.run(measure_gaps(url))


def output_check_ms(size: int = 1024, repeat: int = 5) -> float:
    """CPU ms to check one ``size``-pixel square PNG output the way a download is checked (a full Pillow decode).

    Reported apart from the runner's CPU: it grows with the image, not with the scheduling, and runs in a worker
    thread. The bench's runs use 32-pixel outputs so that the runner's own work is what they measure.
    """
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        path = Path(tmp) / "out.png"
        Image.effect_noise((size, size), 64).convert("RGB").save(path)
        image_extension(path)  # warm: plugin registration is a one-off
        cpu0 = time.process_time()
        for _ in range(repeat):
            image_extension(path)
        return (time.process_time() - cpu0) / repeat * 1000


def write_scale_inputs(folder: Path, jobs: int = 100_000, present: int = 10) -> tuple[Path, Path]:
    """A ``jobs``-job matrix manifest, a ledger of 3 events per job (submitting, submitted, succeeded), and the
    output files of one job in ``present`` (the others count as deleted: both lookups are exercised)."""
    prompts = 100
    lines = ["model: flux-kontext-max", "matrix:", "  prompt:"]
    lines += [f'    - "Turn the scene into a snowy winter evening, variant {i}"' for i in range(prompts)]
    lines.append(f"  seed: [{', '.join(str(i) for i in range(jobs // prompts))}]")
    manifest = folder / "large.yaml"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    ledger = folder / "ledger.jsonl"
    (folder / "out").mkdir()
    ts = "2024-05-01T12:00:00.000Z"
    with ledger.open("w", encoding="utf-8") as fh:
        for i, job in enumerate(load_manifest(manifest, allow_large=True).jobs):
            head = f'{{"ts":"{ts}","event":"%s","job":"{job.id}","fingerprint":"{job.fingerprint}"'
            fh.write(head % "submitting" + ',"attempt":1}\n')
            fh.write(head % "submitted" + f',"prediction_id":"p{i:08d}"}}\n')
            fh.write(head % "succeeded" + f',"prediction_id":"p{i:08d}","file":"{job.id}.png","duration":3.1}}\n')
            if i % present == 0:
                (folder / "out" / f"{job.id}.png").touch()
    return manifest, ledger


def _scale_child(folder: Path) -> int:
    """In a fresh process: expand, replay and match as ``Scheduler._load`` does; print the timings as JSON."""
    t0 = time.perf_counter()
    manifest = load_manifest(folder / "large.yaml", allow_large=True)
    t1 = time.perf_counter()
    state = read_ledger(folder / "ledger.jsonl")
    t2 = time.perf_counter()
    out = OutputDir(folder / "out")
    verdicts: dict[str, int] = {}
    for job in manifest.jobs:
        st = state.jobs.get(job.fingerprint)
        verdict = classify(st, file_present=st is not None and out.has_file(st.file), max_attempts=3)
        verdicts[verdict] = verdicts.get(verdict, 0) + 1
    t3 = time.perf_counter()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    times = {"expand": t1 - t0, "replay": t2 - t1, "match": t3 - t2, "total": t3 - t0}
    print(json.dumps({**times, "peak_mb": peak_mb, "jobs": len(manifest.jobs), "verdicts": verdicts}))
    return 0


def resume_check(in_flight: int = 10_000) -> str:
    """A run resuming with ``in_flight`` predictions left in flight: seconds from the start (ledger read, manifest
    matched, scheduler set up) to its first request, which must come within 3 s; the simulator in its own process."""

    async def go(url: str, folder: Path) -> tuple[float, float]:
        started = time.monotonic()
        first: list[float] = []
        manifest = load_manifest(folder / "large.yaml", allow_large=True)
        out = OutputDir(folder / "out")
        out.prepare()
        state = read_ledger(folder / "out" / "ledger.jsonl")
        regime = REGIMES["d"]
        config = replace(scaled_defaults(regime), max_runtime=1.0)
        with Ledger(out.ledger) as ledger:
            async with aiohttp.ClientSession() as session:
                client = Client(
                    session, base_url=url, api_key=KEY, on_request=lambda kind: first.append(time.monotonic())
                )
                scheduler = Scheduler(manifest, client, ledger, out, state, config)
                await scheduler.run()
        return (first[0] - started) if first else math.inf, time.monotonic() - started

    with (
        tempfile.TemporaryDirectory(prefix="bench-resume-") as tmp,
        external_simulator(
            ["--sim-rate-limit", "6000/6", "--sim-concurrency", "1000", "--sim-image-size", "32"]
        ) as url,
    ):
        folder = Path(tmp)
        write_resume_inputs(folder, in_flight)
        quiet = logging.getLogger("batchrunner")
        level, quiet.level = quiet.level, logging.ERROR  # the predictions are unknown to this simulator: 404s
        try:
            delay, _ = asyncio.run(go(url, folder))
        finally:
            quiet.setLevel(level)
    verdict = "PASS" if delay < 3.0 else "FAIL"
    return f"resume with {in_flight:,} in flight: first request after {delay:.2f} s -> {verdict} (< 3 s)"


def write_resume_inputs(folder: Path, jobs: int) -> None:
    """A ``jobs``-job manifest and a ledger leaving every job's prediction in flight (submitted seconds ago)."""
    prompts = 100
    lines = ["model: flux-kontext-max", "matrix:", "  prompt:"]
    lines += [f'    - "Turn the scene into a snowy winter evening, variant {i}"' for i in range(prompts)]
    lines.append(f"  seed: [{', '.join(str(i) for i in range(jobs // prompts))}]")
    (folder / "large.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "out").mkdir()
    ts = datetime.fromtimestamp(time.time() - 5, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    with (folder / "out" / "ledger.jsonl").open("w", encoding="utf-8") as fh:
        for i, job in enumerate(load_manifest(folder / "large.yaml", allow_large=True).jobs):
            head = f'{{"ts":"{ts}","event":"%s","job":"{job.id}","fingerprint":"{job.fingerprint}"'
            fh.write(head % "submitting" + ',"attempt":1}\n')
            fh.write(head % "submitted" + f',"prediction_id":"resumed-{i:08d}"}}\n')


def scale_check() -> str:
    """Run the large-manifest check in a subprocess (its peak RSS is then its own); one line of results."""
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        folder = Path(tmp)
        write_scale_inputs(folder)
        with (folder / "ledger.jsonl").open("rb") as fh:
            lines = sum(1 for _ in fh)
        cmd = [sys.executable, "-m", "batchrunner.bench", "--scale-child", str(folder)]
        r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    ok = r["total"] < 3.0 and r["peak_mb"] < 300.0
    return (
        f"{r['jobs']:,}-job manifest vs {lines:,}-line ledger: {r['total']:.2f} s (expand {r['expand']:.2f}, "
        f"replay {r['replay']:.2f}, match {r['match']:.2f}), peak RSS {r['peak_mb']:.0f} MB -> "
        f"{'PASS' if ok else 'FAIL'} (< 3 s, < 300 MB); verdicts {r['verdicts']}"
    )


# ----------------------------------------------------------------------------------------------- output and CLI
HEADER = (
    f"{'regime':<16} {'client':<8} {'jobs':>4} {'makespan s':>10} {'bound s':>8} {'effic.':>6} "
    f"{'req/job':>7} {'429s':>5} {'maxwin':>6} {'startup':>7} {'detect':>6} {'refill':>6} {'tail':>5} "
    f"{'cpu ms/job*':>11}"
)


LEGEND = """\
  bound s: r = request bound binds, s = slot bound; 429s: window + concurrency rejections the server sent;
  maxwin: busiest window of counted requests at the server (creates only in c), rejected ones included;
  startup: start -> first create; detect: mean finish -> first poll that saw it; refill: mean slot seen free ->
  next create; tail: last server finish -> last success; * CPU of the whole process, simulator included."""


def format_row(m: Measurement) -> str:
    """One table line; ``bound s`` marks which bound binds (r: requests, s: slots)."""
    which = "r" if m.request_bound >= m.slot_bound else "s"
    jobs = f"{m.succeeded}" if m.succeeded == m.jobs else f"{m.succeeded}/{m.jobs}"
    return (
        f"{m.regime:<16} {m.client:<8} {jobs:>4} {m.makespan:>10.2f} {m.bound:>7.2f}{which} {m.efficiency:>6.3f} "
        f"{m.requests_per_job:>7.2f} {m.rejected:>5} {m.max_window:>6} {m.startup:>7.2f} {m.detect:>6.2f} "
        f"{m.refill:>6.2f} {m.tail:>5.2f} {m.cpu / max(1, m.jobs) * 1000:>11.2f}"
    )


def plan_vs_run(regime: Regime, m: Measurement) -> str | None:
    """The plan's requests and seconds for this regime (``estimate.estimate_run`` at the runner's scaled defaults,
    prediction times the simulator's range) beside what the run measured, with the ratio; None for the baseline."""
    watch = {"runner": "auto", "runner-poll": "poll"}.get(m.client)
    if watch is None:
        return None
    config = scaled_defaults(regime, watch)
    e = estimate_run(
        jobs=m.jobs,
        concurrency=regime.concurrency,
        rate_count=regime.rate_count,
        rate_period=regime.rate_period,
        times=spread_times(regime.min_seconds, regime.max_seconds),
        scope=regime.scope,
        watch=watch,
        poll_initial=config.poll_initial,
        poll_min_interval=config.poll_min_interval,
        page_seconds=PAGE_SECONDS * TIME_SCALE,
    )
    req, span = e.requests / max(1, m.requests), e.seconds / max(1e-9, m.makespan)
    return (
        f"  plan vs run: {e.requests} requests planned, {m.requests} made ({req:.2f}); "
        f"{e.seconds:.1f} s planned, {m.makespan:.1f} s taken ({span:.2f})"
    )


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


async def _bench(
    regimes: Sequence[Regime], jobs: int, seed: int, repeat: int, clients: Sequence[str] = ("runner", "baseline")
) -> list[Measurement]:
    rows: list[Measurement] = []
    for regime in [v for r in regimes for v in store_variants(r)]:
        if regime.store == "redis":
            with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp, redis_server(Path(tmp)) as url:
                if url is None:
                    print(f"{regime.name:<16} skipped: redis-server is not installed", flush=True)
                    continue
                rows += await _bench([dataclasses.replace(regime, store=url)], jobs, seed, repeat, clients)
            continue
        for k in range(repeat):
            for who in clients:
                with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
                    m = await measure(regime, who, jobs, seed + k, Path(tmp))
                rows.append(m)
                print(format_row(m), flush=True)
                if (versus := plan_vs_run(regime, m)) is not None:
                    print(versus, flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its table (and, with ``--scale``, the scale checks)."""
    p = argparse.ArgumentParser(prog="python -m batchrunner.bench", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=100)
    p.add_argument("--regimes", default="a,b,c,e", help="comma-separated, from: " + ", ".join(REGIMES))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--repeat", type=int, default=1, help="runs per regime, with seeds SEED, SEED+1, ...")
    p.add_argument("--clients", default="runner,baseline", help="comma-separated, from: " + ", ".join(CLIENTS))
    p.add_argument("--scale", action="store_true", help="also run the scale and CPU checks")
    p.add_argument("--scale-child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.scale_child is not None:
        return _scale_child(args.scale_child)
    names = [n.strip() for n in args.regimes.split(",") if n.strip()]
    unknown = [n for n in names if n not in REGIMES]
    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    if unknown or args.jobs < 1 or args.repeat < 1:
        p.error(f"unknown regime(s) {unknown}" if unknown else "--jobs and --repeat must be at least 1")
    if not clients or any(c not in CLIENTS for c in clients):
        p.error(f"--clients: expected some of {', '.join(CLIENTS)}, not {args.clients!r}")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; times in seconds (scaled x10); seed {args.seed}")
    print(HEADER, flush=True)
    rows = asyncio.run(_bench([REGIMES[n] for n in names], args.jobs, args.seed, args.repeat, clients))
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


if __name__ == "__main__":
    raise SystemExit(main())
