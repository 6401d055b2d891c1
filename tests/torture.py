"""Torture test: a simulated batch SIGKILLed at many random moments, resumed, and checked.

    python tests/torture.py --kills 200 [--jobs N] [--concurrency 4] [--faults] [--listing-broken] [--seed S]
                            [--max-seconds-per-run 0.5] [--job-timeout SECONDS]

The simulator runs as a separate process (``python -m batchrunner simulate``). The runner is started as
``python -m batchrunner run`` against it and killed with SIGKILL after a random time (seeded), again and again,
until ``--kills`` kills are done or the batch is complete; a last run then goes to completion. The checks:

- the last run exits 0 and every job has its image, which Pillow decodes;
- no prediction was paid twice: the simulator's ``paid_twice`` (predictions made for an input that already had one
  that did not fail) is zero, although gateway 504s after creates, dropped answers and kills leave creates in doubt:
  each is settled from the executions listing before the job is created again. With ``--listing-broken`` the
  listing answers 500, the runner falls back on creating again, and the check becomes that the ledger's
  ``possibly_duplicated`` (``lost_answers``) is at least ``paid_twice``: no second payment goes uncounted;
- the simulator created no job twice except where the ledger can explain it: in all, ``duplicates`` is at most the
  ledger's ``lost_answers`` plus its failed predictions; and per job, its creates beyond the first are at most its
  own lost answers plus its failed predictions;
- the simulator never had more than ``--concurrency`` predictions in flight, and never refused a create for its
  concurrency cap (which is the runner's cap unless ``--sim-concurrency`` says otherwise): with the caps equal,
  such a refusal is the moment the runner tried to put more than ``--concurrency`` in flight.

``--faults`` adds the fault mix of ``FAULTS`` (retryable failures among them) and a ``--job-timeout`` of
``FAULTS_JOB_TIMEOUT``, below the longest prediction, so that some predictions are cancelled while they run; the
simulator's cancels are only recorded (those predictions complete and are billed), so ``paid_twice`` is zero only if
the runner waits for a cancelled prediction instead of creating its job again. ``--fault NAME=VALUE`` (repeatable)
sets a mix of your own, ``--job-timeout SECONDS`` a timeout of your own.

It prints a one-line JSON summary (the figures and the checks) on stdout and exits 0 when every check passes,
1 otherwise. ``torture(...)`` does the same for the test suite and returns the summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from batchrunner.engine.uploads import data_uri
from batchrunner.manifest import Manifest, load_manifest
from batchrunner.sim.server import input_key
from batchrunner.store.ledger import SUCCEEDED, UPLOADED, JobStatus, LedgerState, read_ledger, replay

# The fault mix of ``--faults``: lost, garbled and late answers, cut-off downloads, gateway errors, predictions that
# fail but deserve another attempt, and (with ``FAULTS_JOB_TIMEOUT``) predictions cancelled while they run.
FAULTS: tuple[str, ...] = (
    # Creates left in doubt: the prediction is made, and the answer is a gateway 504 or never comes.
    "gateway_timeout_after_create=0.1",
    "reset_after=0.1",
    "server_error_html=0.05",
    "truncated_download=0.05",
    "reset_before=0.05",
    "malformed_json=0.02",
    # Some answers come late, so that kills also fall between a create's intent and its answer.
    "slow=0.03",
    "slow_seconds=0.15",
    # Failures whose envelope says retryable: true (seen in the listing, confirmed by a GET).
    "retryable_failure=0.1",
)
# The runner's --job-timeout under --faults: below the longest simulated prediction (0.15 s), so about a third of
# them are cancelled while they run; the simulator's cancel is only recorded (they complete and are billed), so
# the runner must wait for them, not create their jobs again.
FAULTS_JOB_TIMEOUT = 0.1
FAULTS_MAX_ATTEMPTS = 8
# Any key passes the simulator; a fixed made-up one, so no real key is ever read or passed on.
API_KEY = "torture-not-a-real-key"
_LISTENING = re.compile(r"listening on (http://\S+)")


@dataclass(frozen=True, slots=True)
class Settings:
    """One torture session: the batch, the limits both sides share, and how the kills fall."""

    kills: int
    jobs: int = 40
    concurrency: int = 4
    faults: bool = False
    seed: int = 0
    min_seconds_per_run: float = 0.005
    max_seconds_per_run: float = 0.5
    rate_count: int = 100
    rate_period: float = 1.0
    sim_concurrency: int | None = None  # the simulator's own cap; None: the runner's --concurrency
    fault_mix: tuple[str, ...] = FAULTS  # NAME=VALUE items for --sim-fault, when ``faults`` is on
    sim_min_seconds: float = 0.02
    sim_max_seconds: float = 0.15
    final_timeout: float = 120.0
    listing_broken: bool = False  # the executions listing answers 500: reconciliation falls back
    job_timeout: float | None = None  # the runner's --job-timeout; None: FAULTS_JOB_TIMEOUT with faults, else default

    @property
    def rate(self) -> str:
        return f"{self.rate_count}/{self.rate_period:g}"


# --------------------------------------------------------------------------------------------------- the checks
def job_input_keys(manifest: Manifest, ledger_lines: Sequence[bytes]) -> dict[str, set[str]]:
    """For each job fingerprint, every ``input_key`` under which the simulator may have counted its creates.

    A local image travels either inline (a data URI) or as the public URL of an upload the ledger recorded, so a
    job has one key per way its image may have been sent.
    """
    urls: dict[str, set[str]] = {}
    for raw in ledger_lines:
        try:
            event = json.loads(raw)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == UPLOADED:
            sha, url = event.get("sha256"), event.get("public_url")
            if isinstance(sha, str) and isinstance(url, str):
                urls.setdefault(sha, set()).add(url)
    keys: dict[str, set[str]] = {}
    for job in manifest.jobs:
        body = dict(job.input)
        if job.image_path is None or job.image_sha256 is None:
            keys[job.fingerprint] = {input_key(manifest.model, body)}
            continue
        images = {data_uri(job.image_path.read_bytes(), job.image_path.name), *urls.get(job.image_sha256, ())}
        keys[job.fingerprint] = {input_key(manifest.model, {**body, "input_image": image}) for image in images}
    return keys


def unrecorded_duplicates(
    creates_by_input: Mapping[str, int], keys: Mapping[str, set[str]], state: LedgerState
) -> tuple[dict[str, int], int]:
    """Jobs created more often than their ledger can explain, with the excess; and creates no job accounts for.

    A job may be created once, plus once per lost answer (the create may have run although its answer never came)
    and once per failed prediction (a new attempt is a new create). Anything beyond is a create the runner paid for
    twice without knowing it.
    """
    excess: dict[str, int] = {}
    mapped = 0
    for fingerprint, job_keys in keys.items():
        creates = sum(creates_by_input.get(key, 0) for key in job_keys)
        mapped += creates
        st = state.jobs.get(fingerprint)
        allowed = 1 + (st.lost_answers + st.attempts if st is not None else 0)
        if creates > allowed:
            excess[st.job if st is not None else fingerprint] = creates - allowed
    return excess, sum(creates_by_input.values()) - mapped


def evaluate(figures: Mapping[str, Any]) -> dict[str, bool]:
    """The verdict of each check on a session's figures."""
    if figures.get("listing_broken"):
        payments = {"second_payments_all_counted": figures["possibly_duplicated"] >= figures["paid_twice"]}
    else:
        payments = {"no_prediction_paid_twice": figures["paid_twice"] == 0}
    return {
        "final_run_exit_0": figures["final_exit"] == 0,
        "every_job_has_its_image": figures["images"] == figures["jobs"],
        **payments,
        "duplicates_explained": figures["duplicates"] <= figures["lost_answers_ledger"] + figures["failed_attempts"],
        "no_job_created_twice_unrecorded": not figures["unrecorded_duplicates"] and figures["unmapped_creates"] == 0,
        "in_flight_within_cap": figures["max_in_flight"] <= figures["concurrency"],
        # With the simulator's cap at the runner's, the simulator never shows more than the cap in flight: a create
        # it refuses for its cap is the moment the runner tried to go over.
        "no_create_refused_for_concurrency": figures["concurrency_429s"] == 0,
    }


# --------------------------------------------------------------------------------------------------- I/O
def write_batch(folder: Path, jobs: int) -> Path:
    """A manifest of ``jobs`` jobs (one small local PNG x ``jobs`` seeds) in ``folder``."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (48, 32), (30, 120, 200)).save(images / "in.png")
    seeds = ", ".join(str(i) for i in range(jobs))
    text = (
        "model: flux-kontext-max\n"
        "matrix:\n"
        "  input_image: [images/in.png]\n"
        '  prompt: ["Paint the harbour at dusk"]\n'
        f"  seed: [{seeds}]\n"
    )
    path = folder / "torture.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@contextlib.contextmanager
def simulator(settings: Settings, folder: Path) -> Iterator[str]:
    """Serve ``batchrunner simulate`` on a free loopback port in its own process; yields its base URL."""
    cmd = [
        sys.executable,
        "-m",
        "batchrunner",
        "simulate",
        "--port",
        "0",  # the simulator picks a free port and names it in its ready line: no race for the port
        "--sim-rate-limit",
        settings.rate,
        "--sim-concurrency",
        str(settings.sim_concurrency or settings.concurrency),
        "--sim-min-seconds",
        str(settings.sim_min_seconds),
        "--sim-max-seconds",
        str(settings.sim_max_seconds),
        "--sim-seed",
        str(settings.seed),
    ]
    if settings.faults:
        for fault in settings.fault_mix:
            cmd += ["--sim-fault", fault]
    if settings.listing_broken:
        cmd += ["--sim-fault", "listing_error=1"]
    log_path = folder / "simulator.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15.0
        while True:
            found = _LISTENING.search(log_path.read_text(encoding="utf-8", errors="replace"))
            if found:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the simulator did not start: {log_path.read_text(errors='replace')[-500:]}")
            time.sleep(0.02)
        yield found.group(1)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def runner_command(settings: Settings, manifest: Path, url: str, out: Path) -> list[str]:
    """The ``batchrunner run`` command line of every run of the session."""
    return [
        sys.executable,
        "-m",
        "batchrunner",
        "run",
        str(manifest),
        "--api-url",
        url,
        "--output",
        str(out),
        "--concurrency",
        str(settings.concurrency),
        "--rate-limit",
        settings.rate,
        "--poll-initial",
        "0.01",
        # The simulator lists a prediction as soon as it is made: no need to wait seconds between looks.
        "--reconcile-wait",
        "0.05s",
        "--progress",
        "none",
        *(["--job-timeout", f"{timeout:g}s"] if (timeout := job_timeout(settings)) is not None else []),
        # Retryable failures (0.1) and cut-off downloads (0.05) each cost an attempt: at the default 3, some job of
        # 120 fails for good in about one session in three (120 x 0.15^3 = 0.4), by chance, not by the runner's fault.
        *(["--max-attempts", str(FAULTS_MAX_ATTEMPTS)] if settings.faults else []),
    ]


def job_timeout(settings: Settings) -> float | None:
    """The runner's --job-timeout for the session, when not its default."""
    if settings.job_timeout is not None:
        return settings.job_timeout
    return FAULTS_JOB_TIMEOUT if settings.faults else None


def fetch_stats(url: str) -> dict[str, Any]:
    """The simulator's counters (``GET /_sim/stats``)."""
    with urllib.request.urlopen(f"{url}/_sim/stats", timeout=10) as answer:
        stats: dict[str, Any] = json.load(answer)
    return stats


def count_images(manifest: Manifest, state: LedgerState, out: Path) -> tuple[int, list[str]]:
    """How many jobs have a succeeded ledger entry whose file is there and decodes; and the jobs that do not."""
    good = 0
    missing: list[str] = []
    for job in manifest.jobs:
        st = state.jobs.get(job.fingerprint)
        if st is None or st.status is not JobStatus.SUCCEEDED or st.file is None:
            missing.append(job.id)
            continue
        try:
            with Image.open(out / st.file) as image:
                image.load()
        except (OSError, ValueError):
            missing.append(job.id)
            continue
        good += 1
    return good, missing


def _complete(manifest: Manifest, state: LedgerState, out: Path) -> bool:
    return all(
        (st := state.jobs.get(job.fingerprint)) is not None
        and st.status is JobStatus.SUCCEEDED
        and st.file is not None
        and (out / st.file).is_file()
        for job in manifest.jobs
    )


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            return fh.read()
    except FileNotFoundError:
        return b""


def _succeeded_lines(ledger: Path) -> int:
    try:
        return ledger.read_bytes().count(f'"event":"{SUCCEEDED}"'.encode())
    except FileNotFoundError:
        return 0


def torture(
    kills: int,
    jobs: int = 40,
    concurrency: int = 4,
    faults: bool = False,
    seed: int = 0,
    *,
    max_seconds_per_run: float = 0.5,
    min_seconds_per_run: float = 0.005,
    rate_count: int = 100,
    rate_period: float = 1.0,
    sim_concurrency: int | None = None,
    fault_mix: Sequence[str] = FAULTS,
    workdir: Path | None = None,
    final_timeout: float = 120.0,
    echo: bool = False,
    listing_broken: bool = False,
    job_timeout: float | None = None,
) -> dict[str, Any]:
    """Run one torture session (see the module docstring) and return its summary: figures, checks and ``ok``.

    ``workdir`` keeps the manifest, output folder and logs (default: a temporary folder, removed afterwards).
    ``echo`` writes a line per kill to stderr.
    """
    settings = Settings(
        kills=kills,
        jobs=jobs,
        concurrency=concurrency,
        faults=faults,
        seed=seed,
        min_seconds_per_run=min_seconds_per_run,
        max_seconds_per_run=max_seconds_per_run,
        rate_count=rate_count,
        rate_period=rate_period,
        sim_concurrency=sim_concurrency,
        fault_mix=tuple(fault_mix),
        final_timeout=final_timeout,
        listing_broken=listing_broken,
        job_timeout=job_timeout,
    )
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        return _session(settings, workdir, echo)
    with tempfile.TemporaryDirectory(prefix="batchrunner-torture-") as tmp:
        return _session(settings, Path(tmp), echo)


def _session(settings: Settings, folder: Path, echo: bool) -> dict[str, Any]:
    started = time.monotonic()
    rng = random.Random(settings.seed)
    manifest_path = write_batch(folder, settings.jobs)
    manifest = load_manifest(manifest_path)
    out = folder / "out"
    ledger_path = out / "ledger.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("EACHLABS_API_KEY", "EACHLABS_API_URL")}
    env["EACHLABS_API_KEY"] = API_KEY
    kills_done = 0
    active = 0  # kills that fell after the run had written to its ledger
    cut_creates = 0  # creates in progress at a kill: their answer is lost to the runner
    left_in_flight = 0  # predictions a kill left running, for the next run to poll
    exits: Counter[str] = Counter()
    with simulator(settings, folder) as url, (folder / "runner.log").open("ab") as log:
        cmd = runner_command(settings, manifest_path, url, out)
        # Runs that end on their own (not complete) are bounded too, so a runner that cannot start ends the session.
        while (
            kills_done < settings.kills
            and sum(exits.values()) < max(10, settings.kills)
            and not _complete(manifest, read_ledger(ledger_path), out)
        ):
            before = ledger_path.stat().st_size if ledger_path.exists() else 0
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
            try:
                proc.wait(timeout=rng.uniform(settings.min_seconds_per_run, settings.max_seconds_per_run))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills_done += 1
                written = _read_from(ledger_path, before)
                # Replaying only what this run wrote counts the creates it left unanswered, not older ones.
                doubt = sum(st.status is JobStatus.IN_DOUBT for st in replay(written.splitlines()).jobs.values())
                flying = len(read_ledger(ledger_path).in_flight()) if written else 0
                active += bool(written)
                cut_creates += doubt
                left_in_flight += flying
                if echo:
                    print(
                        f"kill {kills_done}: {_succeeded_lines(ledger_path)} succeeded lines, "
                        f"{doubt} creates cut off, {flying} in flight",
                        file=sys.stderr,
                        flush=True,
                    )
                continue
            exits[str(proc.returncode)] += 1
            if proc.returncode == 0:
                break  # the batch finished before the kill: nothing left to kill
        final = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        try:
            final_exit: int | None = final.wait(timeout=settings.final_timeout)
        except subprocess.TimeoutExpired:
            final.send_signal(signal.SIGKILL)
            final.wait()
            final_exit = None
        stats = fetch_stats(url)
    lines = ledger_path.read_bytes().splitlines() if ledger_path.exists() else []
    state = read_ledger(ledger_path)
    images, missing = count_images(manifest, state, out)
    excess, unmapped = unrecorded_duplicates(stats.get("creates_by_input", {}), job_input_keys(manifest, lines), state)
    figures: dict[str, Any] = {
        "kills": kills_done,
        "kills_requested": settings.kills,
        "kills_after_start": active,
        "creates_cut_by_kills": cut_creates,
        "predictions_left_in_flight": left_in_flight,
        "runs": kills_done + sum(exits.values()) + 1,
        "early_exits": dict(exits),
        "final_exit": final_exit,
        "jobs": settings.jobs,
        "images": images,
        "missing_images": missing[:10],
        "creates": stats["creates"],
        "duplicates": stats["duplicates"],
        "lost_answers_sim": stats["lost_answers"],
        "lost_answers_ledger": state.lost_answers,
        "possibly_duplicated": state.lost_answers,
        "recovered": state.recovered,
        "not_created": sum(1 for raw in lines if b'"event":"not_created"' in raw),
        "paid_twice": stats["paid_twice"],
        "cancels": stats["cancels"],
        "job_timeout": job_timeout(settings),
        "failed_attempts": sum(st.attempts for st in state.jobs.values()),
        "listing_broken": settings.listing_broken,
        "listings": stats.get("listings", 0),
        "unrecorded_duplicates": excess,
        "unmapped_creates": unmapped,
        "max_in_flight": stats["max_in_flight"],
        "concurrency": settings.concurrency,
        "sim_concurrency": settings.sim_concurrency or settings.concurrency,
        "concurrency_429s": stats["concurrency_rejected"],
        "window_429s": stats["rate_limited"],
        "max_window": stats["max_window"],
        "rate_limit": settings.rate,
        "requests": stats["requests"],
        "faults": list(settings.fault_mix) if settings.faults else [],
        "faults_injected": stats.get("faults_injected", {}),
        "ledger_lines": len(lines),
        "ledger_bad_lines": state.bad_lines,
        "seed": settings.seed,
        "max_seconds_per_run": settings.max_seconds_per_run,
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    checks = evaluate(figures)
    return {**figures, "checks": checks, "ok": all(checks.values())}


def main(argv: Sequence[str] | None = None) -> int:
    """The script: run one session, print its one-line JSON summary, exit 0 when every check passed."""
    parser = argparse.ArgumentParser(description="SIGKILL a simulated batch at random moments, resume, check.")
    parser.add_argument("--kills", type=int, required=True, help="how many times to SIGKILL the runner at most")
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="jobs in the batch (default: 2 x kills, at least 40: it outlasts the kills)",
    )
    parser.add_argument("--concurrency", type=int, default=4, help="the runner's cap, and the simulator's")
    parser.add_argument("--faults", action="store_true", help="switch on the simulator's faults: " + ", ".join(FAULTS))
    parser.add_argument(
        "--fault",
        action="append",
        default=None,
        metavar="NAME=VALUE",
        help="a fault mix of your own (implies --faults)",
    )
    parser.add_argument("--seed", type=int, default=None, help="seeds the kill times and the simulator (random)")
    parser.add_argument("--max-seconds-per-run", type=float, default=0.5)
    parser.add_argument("--min-seconds-per-run", type=float, default=0.005)
    parser.add_argument("--rate-limit", default="100/1", metavar="COUNT/SECONDS", help="both sides' window (100/1)")
    parser.add_argument("--sim-concurrency", type=int, default=None, help="the simulator's cap (--concurrency)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the batch, output and logs here")
    parser.add_argument(
        "--listing-broken",
        action="store_true",
        help="the executions listing answers 500: check that every second payment is counted",
    )
    parser.add_argument(
        "--job-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"the runner's --job-timeout (with --faults: {FAULTS_JOB_TIMEOUT:g}, below the longest prediction)",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="a line per kill on stderr")
    args = parser.parse_args(argv)
    count, _, period = args.rate_limit.partition("/")
    try:
        rate_count, rate_period = int(count), float(period or 1)
    except ValueError:
        parser.error(f"--rate-limit {args.rate_limit!r}: expected COUNT/SECONDS, e.g. 100/1")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    summary = torture(
        args.kills,
        args.jobs if args.jobs is not None else max(40, 2 * args.kills),
        args.concurrency,
        args.faults or bool(args.fault),
        seed,
        max_seconds_per_run=args.max_seconds_per_run,
        min_seconds_per_run=args.min_seconds_per_run,
        rate_count=rate_count,
        rate_period=rate_period,
        sim_concurrency=args.sim_concurrency,
        fault_mix=args.fault or FAULTS,
        workdir=args.workdir,
        echo=args.verbose,
        listing_broken=args.listing_broken,
        job_timeout=args.job_timeout,
    )
    print(json.dumps(summary, sort_keys=False))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
