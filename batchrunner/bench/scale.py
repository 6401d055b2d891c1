"""The scale checks: a large manifest against a large ledger, a resume with 10,000 in flight, CPU floors."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
from PIL import Image

from batchrunner.api.client import Client
from batchrunner.bench.clients import run_runner
from batchrunner.bench.measure import external_simulator
from batchrunner.bench.regimes import KEY, REGIMES, Regime, scaled_defaults
from batchrunner.engine.scheduler import Scheduler, classify
from batchrunner.manifest import load_manifest
from batchrunner.store.ledger import Ledger, read_ledger
from batchrunner.store.output import OutputDir, image_extension


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
