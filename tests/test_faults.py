"""Faults of the API, the network and the disk, each switched on in the simulator or the test, end to end."""

from __future__ import annotations

import errno
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from batchrunner.cli.main import main
from batchrunner.sim.server import Faults
from batchrunner.store.ledger import read_ledger
from tests.conftest import (
    SECRET_KEY,
    ThreadedSimulator,
    fast_sim,
    images_in,
    run_args,
    start_runner,
    wait_for_ledger,
    write_manifest,
)

SimFactory = Callable[..., ThreadedSimulator]
pytestmark = pytest.mark.usefixtures("api_key")


@pytest.mark.parametrize(
    ("name", "faults"),
    [
        ("429 with Retry-After", Faults(rate_limit=0.15)),
        ("429 without Retry-After", Faults(rate_limit_no_retry_after=0.2)),
        ("502 with an HTML page", Faults(server_error_html=0.2)),
        ("500/503 with an empty body", Faults(server_error_empty=0.2)),
        ("malformed JSON", Faults(malformed_json=0.1)),
        ("reset before the request was read", Faults(reset_before=0.2)),
        ("reset after a create was acted on", Faults(reset_after=0.2)),
        ("download cut short", Faults(truncated_download=0.4)),
        ("download not there yet", Faults(download_404_seconds=0.05)),
        ("prediction failing with PROVIDER_RATE_LIMIT", Faults(provider_rate_limit=0.3)),
    ],
)
def test_transient_fault_ends_with_every_image_and_no_unexplained_duplicate(
    name: str, faults: Faults, tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = threaded_sim(fast_sim(faults=faults, seed=11))
    manifest = write_manifest(tmp_path, 16, image=False)
    out = tmp_path / "out"
    code = main(run_args(manifest, sim.url, out, "--max-attempts", "6"))
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Traceback" not in err
    assert len(images_in(out)) == 16
    stats = sim.stats()
    assert sum(stats["faults_injected"].values()) > 0, name
    state = read_ledger(out / "ledger.jsonl")
    # A second create of the same request is explained by a failed prediction tried again, or by an answer lost.
    retries = sum(st.attempts for st in state.jobs.values())
    assert stats["duplicates"] <= state.lost_answers + retries
    assert stats["paid_twice"] == 0
    if not faults.provider_rate_limit:
        assert retries == 0
    if faults.reset_after:
        # Every create whose answer the simulator dropped was found in the listing and adopted, not paid again.
        assert state.recovered == stats["lost_answers"] > 0
        assert state.lost_answers == 0


def test_slow_answers_past_the_client_timeout_are_retried(tmp_path: Path, threaded_sim: SimFactory) -> None:
    sim = threaded_sim(fast_sim(faults=Faults(slow=0.2, slow_seconds=0.3), seed=5))
    manifest = write_manifest(tmp_path, 6, image=False)
    out = tmp_path / "out"
    assert main(run_args(manifest, sim.url, out, "--timeout", "0.1s")) == 0
    assert len(images_in(out)) == 6
    assert sim.stats()["duplicates"] <= read_ledger(out / "ledger.jsonl").lost_answers


def test_payment_required_stops_submitting_finishes_in_flight_and_exits_75(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = threaded_sim(fast_sim(faults=Faults(payment_required_after=3)))
    manifest = write_manifest(tmp_path, 8, image=False)
    out = tmp_path / "out"
    assert main(run_args(manifest, sim.url, out)) == 75
    err = capsys.readouterr().err
    assert "out of credit" in err and "Traceback" not in err
    assert len(images_in(out)) == 3
    state = read_ledger(out / "ledger.jsonl")
    assert not state.in_flight()
    assert all(st.attempts == 0 for st in state.jobs.values())  # a 402 is not the job's fault


def test_prediction_that_never_finishes_is_cancelled_and_counted_as_a_failed_attempt(
    tmp_path: Path, threaded_sim: SimFactory
) -> None:
    sim = threaded_sim(fast_sim(faults=Faults(never_finish=1.0)))
    manifest = write_manifest(tmp_path, 2, image=False)
    out = tmp_path / "out"
    assert main(run_args(manifest, sim.url, out, "--job-timeout", "0.1s", "--max-attempts", "2")) == 1
    stats = sim.stats()
    assert stats["cancels"] == 4 and stats["creates"] == 4
    state = read_ledger(out / "ledger.jsonl")
    assert all(st.attempts == 2 and st.error_code == "TIMEOUT" for st in state.jobs.values())


def test_disk_full_while_saving_exits_74_and_the_next_run_completes(
    tmp_path: Path, threaded_sim: SimFactory, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = threaded_sim(fast_sim())
    manifest = write_manifest(tmp_path, 4, image=False)
    out = tmp_path / "out"

    def full(*_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    # Renames into the output folder fail as on a full disk (the ledger line after it is never written).
    monkeypatch.setattr(os, "replace", full)
    assert main(run_args(manifest, sim.url, out)) == 74
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("batchrunner: ") and "no space left on device" in err[-1]
    assert not any("Traceback" in line for line in err)
    monkeypatch.undo()
    monkeypatch.setenv("EACHLABS_API_KEY", SECRET_KEY)
    creates = sim.stats()["creates"]
    assert main(run_args(manifest, sim.url, out)) == 0
    assert len(images_in(out)) == 4
    # Predictions paid for before the disk filled up were polled again, not created again.
    assert sim.stats()["creates"] - creates <= 4 - len(read_ledger(out / "ledger.jsonl").jobs) + 4
    assert sim.stats()["duplicates"] == 0


def test_output_folder_that_cannot_be_written_exits_74_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = write_manifest(tmp_path, 2, image=False)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the output folder should be")
    args = ["run", str(manifest), "--output", str(blocker / "out"), "--api-url", "http://127.0.0.1:9"]
    assert main(args) == 74
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(blocker) in err[0]


def test_sigterm_drains_and_exits_143(tmp_path: Path, threaded_sim: SimFactory) -> None:
    sim = threaded_sim(fast_sim(min_seconds=0.05, max_seconds=0.1, concurrency=2))
    manifest = write_manifest(tmp_path, 30, image=False)
    out = tmp_path / "out"
    proc = start_runner(manifest, sim.url, out, "--concurrency", "2")
    wait_for_ledger(out, b'"succeeded"', proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 143, err.decode()
    assert not read_ledger(out / "ledger.jsonl").in_flight()


def test_second_ctrl_c_stops_at_once_with_a_consistent_ledger(tmp_path: Path, threaded_sim: SimFactory) -> None:
    # Predictions far longer than the test: only the second Ctrl-C can end the run quickly.
    sim = threaded_sim(fast_sim(min_seconds=30, max_seconds=30, concurrency=2))
    manifest = write_manifest(tmp_path, 4, image=False)
    out = tmp_path / "out"
    proc = start_runner(manifest, sim.url, out, "--concurrency", "2")
    wait_for_ledger(out, b'"submitted"', proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    assert proc.poll() is None  # draining: polling the predictions in flight
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 130, err.decode()
    state = read_ledger(out / "ledger.jsonl")
    assert state.bad_lines == 0
    assert len(state.in_flight()) == 2  # recorded, for the next run to poll


def test_status_counts_possibly_duplicated_creates_when_the_listing_is_down(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = threaded_sim(fast_sim(faults=Faults(reset_after=0.5, listing_error=1.0), seed=4))
    manifest = write_manifest(tmp_path, 6, image=False)
    out = tmp_path / "out"
    assert main(run_args(manifest, sim.url, out)) == 0
    assert "possibly duplicated" in capsys.readouterr().err
    assert main(["status", str(manifest), "--output", str(out), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["possibly_duplicated"] == sim.stats()["lost_answers"] > 0
    assert counts["recovered"] == 0
