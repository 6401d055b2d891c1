"""Kill-and-resume torture: a batch SIGKILLed at random moments, and ledgers cut and reshuffled at random.

The first test drives ``tests/torture.py`` (separate simulator and runner processes). The property test takes the
ledger of one complete run, cuts it at any byte (a torn last line included), optionally interleaves the events of
different jobs in any order (each job's own events keep theirs), keeps or loses the images, and checks that a run
from there completes with every image and without creating again a job whose prediction the ledger knows.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from batchrunner.cli.main import main
from batchrunner.manifest import load_manifest
from batchrunner.sim.server import Faults
from batchrunner.store.ledger import SUBMITTING, JobStatus, read_ledger, replay
from tests.conftest import SECRET_KEY, ThreadedSimulator, fast_sim, run_args, serve_in_thread, write_manifest
from tests.torture import FAULTS, FAULTS_JOB_TIMEOUT, evaluate, torture

JOBS = 6


@pytest.fixture(scope="module", autouse=True)
def api_key() -> Iterator[str]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EACHLABS_API_KEY", SECRET_KEY)
        mp.delenv("EACHLABS_API_URL", raising=False)
        yield SECRET_KEY


@dataclass(frozen=True)
class Recorded:
    """One complete run: its manifest, output folder and ledger lines, and the simulator that ran it (still up)."""

    sim: ThreadedSimulator
    manifest: Path
    out: Path
    lines: list[bytes]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recorded]:
    folder = tmp_path_factory.mktemp("recorded")
    # Faults while recording: with seed 5 the ledger holds a lost answer and a failed create too. Not a failed
    # prediction: a resumed run that polls one waits out a backoff of 0.25 s or more, too slow for many examples.
    faults = Faults(reset_after=0.1, server_error_html=0.05, truncated_download=0.1)
    with serve_in_thread(fast_sim(faults=faults, seed=5)) as sim:
        manifest = write_manifest(folder, JOBS)
        out = folder / "out"
        assert main(run_args(manifest, sim.url, out)) == 0
        # Resumed runs meet no faults: they are about the ledger, and each fault costs a backoff of 0.25 s or more.
        sim.call(lambda: setattr(sim.sim, "config", replace(sim.sim.config, faults=Faults())))
        yield Recorded(sim, manifest, out, (out / "ledger.jsonl").read_bytes().splitlines(keepends=True))


def test_batch_killed_at_random_moments_resumes_with_every_image_and_nothing_paid_twice() -> None:
    # Retryable failures more often than in the CLI's mix: 16 jobs at 0.1 meet none about one session in five, and
    # the session must prove they are tried again (later --sim-fault items override earlier ones).
    mix = (*FAULTS, "retryable_failure=0.35")
    summary = torture(8, jobs=16, concurrency=3, faults=True, seed=5, max_seconds_per_run=0.4, fault_mix=mix)
    checks = dict(summary["checks"])
    assert checks == dict.fromkeys(checks, True), json.dumps(summary)
    assert summary["kills"] >= 1
    assert summary["images"] == 16
    assert summary["paid_twice"] == 0
    assert summary["recovered"] >= 1  # creates were left in doubt, and settled from the listing
    # Retryable failures were tried again, and predictions past the job timeout were cancelled (record-only: they
    # completed and were billed) without their jobs being created again.
    assert summary["faults_injected"].get("retryable_failure", 0) >= 1
    assert summary["cancels"] >= 1 and summary["job_timeout"] == FAULTS_JOB_TIMEOUT


def test_with_the_listing_broken_every_second_payment_is_counted() -> None:
    summary = torture(6, jobs=12, concurrency=3, faults=True, seed=7, max_seconds_per_run=0.4, listing_broken=True)
    checks = dict(summary["checks"])
    assert checks == dict.fromkeys(checks, True), json.dumps(summary)
    assert "second_payments_all_counted" in checks
    assert summary["recovered"] == 0


@pytest.mark.parametrize(
    ("changes", "failed_check"),
    [
        ({}, None),
        ({"final_exit": 75}, "final_run_exit_0"),
        ({"final_exit": None}, "final_run_exit_0"),
        ({"images": 15}, "every_job_has_its_image"),
        ({"duplicates": 3, "lost_answers_ledger": 1, "failed_attempts": 1}, "duplicates_explained"),
        ({"paid_twice": 1}, "no_prediction_paid_twice"),
        ({"listing_broken": True, "paid_twice": 3, "possibly_duplicated": 3}, None),
        ({"listing_broken": True, "paid_twice": 3, "possibly_duplicated": 2}, "second_payments_all_counted"),
        ({"unrecorded_duplicates": {"job-a": 1}}, "no_job_created_twice_unrecorded"),
        ({"unmapped_creates": 1}, "no_job_created_twice_unrecorded"),
        ({"max_in_flight": 5}, "in_flight_within_cap"),
        ({"concurrency_429s": 1}, "no_create_refused_for_concurrency"),
    ],
)
def test_evaluate_fails_exactly_the_check_the_figures_break(changes: dict[str, Any], failed_check: str | None) -> None:
    good: dict[str, Any] = {
        "final_exit": 0,
        "images": 16,
        "jobs": 16,
        "duplicates": 2,
        "lost_answers_ledger": 1,
        "failed_attempts": 1,
        "paid_twice": 0,
        "possibly_duplicated": 1,
        "listing_broken": False,
        "unrecorded_duplicates": {},
        "unmapped_creates": 0,
        "max_in_flight": 4,
        "concurrency": 4,
        "concurrency_429s": 0,
    }
    checks = evaluate({**good, **changes})
    assert [name for name, ok in checks.items() if not ok] == ([failed_check] if failed_check else [])


def test_garbled_create_answer_is_recorded_as_a_lost_answer(tmp_path: Path) -> None:
    # Seed 30 garbles the first answer of this simulator (the first create) and none of the next eleven.
    with serve_in_thread(fast_sim(faults=Faults(malformed_json=0.25), seed=30)) as sim:
        manifest = write_manifest(tmp_path, 1, image=False)
        out = tmp_path / "out"
        assert main(run_args(manifest, sim.url, out)) == 0
        stats = sim.stats()
    state = read_ledger(out / "ledger.jsonl")
    assert stats["faults_injected"] == {"malformed_json": 1} and stats["lost_answers"] == 1
    # The simulator made two predictions for the one job: the ledger must own up to the first one.
    assert stats["duplicates"] <= state.lost_answers


def test_create_whose_answer_was_lost_keeps_its_slot_while_its_prediction_may_run(tmp_path: Path) -> None:
    # Seed 30 drops the answer to the first create and to none of the next eleven; predictions take 0.2 s.
    config = fast_sim(faults=Faults(reset_after=0.3), seed=30, concurrency=2, min_seconds=0.2, max_seconds=0.2)
    with serve_in_thread(config) as sim:
        manifest = write_manifest(tmp_path, 4, image=False)
        assert main(run_args(manifest, sim.url, tmp_path / "out", "--concurrency", "2")) == 0
        stats = sim.stats()
    assert stats["faults_injected"] == {"reset_after": 1} and stats["lost_answers"] == 1
    assert stats["concurrency_rejected"] == 0


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _create_at(url: str, inputs: dict[str, Any]) -> str:
    """Create a prediction behind the runner's back, as a killed run would have; returns its id."""
    body = json.dumps({"model": "flux-kontext-max", "version": "0.0.1", "input": inputs}).encode()
    headers = {"X-API-Key": "k", "Content-Type": "application/json"}
    with urllib.request.urlopen(urllib.request.Request(f"{url}/v1/prediction/", data=body, headers=headers)) as answer:
        prediction_id: str = json.load(answer)["predictionID"]
    return prediction_id


def test_a_full_account_is_waited_for_not_taken_for_an_outage(tmp_path: Path) -> None:
    with serve_in_thread(fast_sim(concurrency=2, min_seconds=0.3, max_seconds=0.3)) as sim:
        # Another batch on the same account holds both slots for 0.3 s.
        for n in range(2):
            _create_at(sim.url, {"prompt": f"another batch {n}"})
        manifest = write_manifest(tmp_path, 14, image=False)
        code = main(run_args(manifest, sim.url, tmp_path / "out", "--concurrency", "2"))
        stats = sim.stats()
    assert stats["concurrency_rejected"] >= 1
    assert code == 0


def test_resumed_predictions_do_not_teach_the_downtime_as_their_duration(tmp_path: Path) -> None:
    downtime = 0.6
    with serve_in_thread(fast_sim(min_seconds=0.04, max_seconds=0.05)) as sim:
        manifest_path = write_manifest(tmp_path, 6, image=False)
        jobs = load_manifest(manifest_path).jobs
        out = tmp_path / "out"
        out.mkdir()
        # A run killed `downtime` seconds ago left five predictions in flight (enough samples for a learnt plan).
        at = _iso(time.time() - downtime)
        with (out / "ledger.jsonl").open("w", encoding="utf-8") as ledger:
            for job in jobs[:5]:
                record = {"ts": at, "job": job.id, "fingerprint": job.fingerprint}
                prediction_id = _create_at(sim.url, dict(job.input))
                ledger.write(json.dumps({**record, "event": "submitting", "attempt": 1}) + "\n")
                ledger.write(json.dumps({**record, "event": "submitted", "prediction_id": prediction_id}) + "\n")
        assert main(run_args(manifest_path, sim.url, out)) == 0
    durations = {
        event["job"]: event.get("duration")
        for event in map(json.loads, (out / "ledger.jsonl").read_bytes().splitlines())
        if event["event"] == "succeeded"
    }
    assert len(durations) == 6
    # Every prediction took 0.05 s at most on the server; none may be taken for one that took the downtime.
    assert all(d is None or d < downtime / 2 for d in durations.values()), durations


def interleave(lines: list[bytes], order: list[int]) -> list[bytes]:
    """The lines in an order led by ``order`` (a permutation), each job's own lines keeping their relative order.

    Slot k goes to the job of line ``order[k]``, and gets that job's next line: events of different jobs
    interleave in any way, a job's history never runs backwards. Lines of no job move freely.
    """

    def group(index: int) -> str:
        try:
            event = json.loads(lines[index])
        except ValueError:
            return f"line {index}"
        fingerprint = event.get("fingerprint") if isinstance(event, dict) else None
        return fingerprint if isinstance(fingerprint, str) else f"line {index}"

    queues: dict[str, list[bytes]] = {}
    for index, line in enumerate(lines):
        queues.setdefault(group(index), []).append(line)
    return [queues[group(index)].pop(0) for index in order]


def stamp(lines: list[bytes], now: float) -> list[bytes]:
    """The lines with every ``ts`` set to ``now``."""
    stamped = []
    for line in lines:
        event = json.loads(line)
        event["ts"] = _iso(now)
        stamped.append((json.dumps(event, ensure_ascii=False, separators=(",", ":")) + "\n").encode())
    return stamped


@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_ledger_cut_anywhere_and_interleaved_any_way_resumes_to_every_image(
    recorded: Recorded, data: st.DataObject
) -> None:
    lines = recorded.lines
    if data.draw(st.booleans(), label="interleave"):
        lines = interleave(lines, data.draw(st.permutations(range(len(lines))), label="order"))
    # As if all of it had happened a moment ago, as after a kill: the predictions it names are still fresh.
    blob = b"".join(stamp(lines, time.time()))
    cut = data.draw(st.integers(0, len(blob)), label="cut")
    prefix = blob[:cut]
    before = replay(prefix.splitlines())
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        out.mkdir()
        (out / "ledger.jsonl").write_bytes(prefix)
        kept: set[str] = set()
        for st_ in before.jobs.values():
            done = st_.status is JobStatus.SUCCEEDED and st_.file is not None
            if done and data.draw(st.booleans(), label=f"keep {st_.file}"):
                shutil.copy(recorded.out / str(st_.file), out / str(st_.file))
                kept.add(st_.fingerprint)

        assert main(run_args(recorded.manifest, recorded.sim.url, out)) == 0

        after = read_ledger(out / "ledger.jsonl")
        for job in load_manifest(recorded.manifest).jobs:
            st_ = after.jobs[job.fingerprint]
            assert st_.status is JobStatus.SUCCEEDED and st_.file is not None, job.id
            with Image.open(out / st_.file) as image:
                image.load()
        # What the prefix already knew is not paid for again: a job done with its file is left alone, and a
        # prediction in flight is polled, not created again (unless it then failed).
        appended = [json.loads(line) for line in (out / "ledger.jsonl").read_bytes()[cut:].splitlines() if line.strip()]
        first_event: dict[str, str] = {}
        for event in appended:
            first_event.setdefault(event.get("fingerprint"), event["event"])
        for fingerprint in kept:
            assert fingerprint not in first_event
        for st_ in before.in_flight():
            assert first_event.get(st_.fingerprint) != SUBMITTING, st_.job
