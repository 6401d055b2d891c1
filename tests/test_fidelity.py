"""The API as its documents describe it, end to end: creates in doubt, failure envelopes, record-only cancels, odd
reads, both auth headers and documented uploads, each against a simulator switched to behave so."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from batchrunner.cli.main import main
from batchrunner.sim.server import Faults
from batchrunner.store.ledger import read_ledger
from tests.conftest import (
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


def events(out: Path, name: str) -> list[dict[str, Any]]:
    lines = (out / "ledger.jsonl").read_text(encoding="utf-8").splitlines()
    found = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == name:
            found.append(event)
    return found


def run(sim: ThreadedSimulator, folder: Path, jobs: int, *extra: str, image: bool = False) -> tuple[int, Path]:
    manifest = write_manifest(folder, jobs, image=image)
    out = folder / "out"
    return main(run_args(manifest, sim.url, out, *extra)), out


# --- creates in doubt ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "faults"),
    [
        ("gateway 504 after the create was made", Faults(gateway_timeout_after_create=0.3)),
        ("connection reset after the create was made", Faults(reset_after=0.3)),
        # Only creates: garbling every answer at this rate would break the listing's too, and the fallback, not the
        # recovery, would be under test (see test_a_broken_listing_...).
        ("a 200 whose body is cut off", Faults(malformed_create=0.3)),
    ],
)
def test_a_create_in_doubt_that_made_a_prediction_is_recovered_and_not_paid_twice(
    name: str, faults: Faults, tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = threaded_sim(fast_sim(faults=faults, seed=3))
    code, out = run(sim, tmp_path, 10)
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Traceback" not in err
    assert len(images_in(out)) == 10
    stats = sim.stats()
    assert stats["lost_answers"] > 0, name
    assert stats["paid_twice"] == 0
    assert stats["creates"] == 10
    state = read_ledger(out / "ledger.jsonl")
    assert state.lost_answers == 0
    assert state.recovered == stats["lost_answers"]
    recovered = events(out, "recovered")
    assert len(recovered) == stats["lost_answers"]
    assert all(isinstance(e["prediction_id"], str) for e in recovered)
    assert f"{stats['lost_answers']} recovered" in err
    assert main(["status", str(tmp_path / "batch.yaml"), "--output", str(out), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["recovered"], shown["possibly_duplicated"], shown["in_doubt"]) == (stats["lost_answers"], 0, 0)


def test_a_create_in_doubt_that_made_nothing_is_created_again_and_is_no_duplicate(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    # A reset before the server read the request: the client cannot tell it from a reset after.
    sim = threaded_sim(fast_sim(faults=Faults(reset_before_create=0.5), seed=4))
    code, out = run(sim, tmp_path, 8)
    err = capsys.readouterr().err
    assert code == 0, err
    assert len(images_in(out)) == 8
    stats = sim.stats()
    assert stats["paid_twice"] == 0
    not_created = events(out, "not_created")
    assert len(not_created) == stats["faults_injected"]["reset_before_create"] > 0
    state = read_ledger(out / "ledger.jsonl")
    assert state.lost_answers == 0
    assert stats["creates"] == 8


def test_a_prediction_that_appears_late_in_the_listing_is_still_found(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    faults = Faults(gateway_timeout_after_create=0.4, listing_lag=0.05)
    sim = threaded_sim(fast_sim(faults=faults, seed=6))
    code, out = run(sim, tmp_path, 6, "--reconcile-wait", "0.05s")
    assert code == 0, capsys.readouterr().err
    stats = sim.stats()
    assert stats["lost_answers"] > 0
    assert stats["paid_twice"] == 0
    assert read_ledger(out / "ledger.jsonl").recovered == stats["lost_answers"]
    assert not events(out, "not_created")


def test_a_broken_listing_falls_back_and_counts_every_second_payment(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    faults = Faults(gateway_timeout_after_create=0.3, listing_error=1.0)
    sim = threaded_sim(fast_sim(faults=faults, seed=3))
    code, out = run(sim, tmp_path, 10)
    err = capsys.readouterr().err
    assert code == 0, err
    assert len(images_in(out)) == 10
    stats = sim.stats()
    state = read_ledger(out / "ledger.jsonl")
    assert stats["paid_twice"] > 0
    assert state.lost_answers >= stats["paid_twice"]
    assert state.recovered == 0
    assert "executions listing failed" in err
    assert f"{state.lost_answers} possibly duplicated" in err


def test_a_resumed_run_settles_a_create_killed_before_its_answer(tmp_path: Path, threaded_sim: SimFactory) -> None:
    # Every answer is slow: the first run is killed while its first create waits for its answer (the prediction is
    # made on the server already; until the API has answered once, one request at a time).
    sim = threaded_sim(fast_sim(faults=Faults(slow=1.0, slow_seconds=3.0), seed=2))
    manifest = write_manifest(tmp_path, 4, image=False)
    out = tmp_path / "out"
    proc = start_runner(manifest, sim.url, out)
    try:
        wait_for_ledger(out, b'"event":"submitting"', proc)
        deadline = time.monotonic() + 5
        while sim.stats()["creates"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait()
    assert sim.stats()["creates"] == 1
    assert read_ledger(out / "ledger.jsonl").in_doubt()
    sim.call(lambda: setattr(sim.sim, "config", replace(sim.sim.config, faults=Faults())))
    assert main(run_args(manifest, sim.url, out)) == 0
    assert len(images_in(out)) == 4
    stats = sim.stats()
    assert stats["paid_twice"] == 0
    assert stats["creates"] == 4
    state = read_ledger(out / "ledger.jsonl")
    assert state.recovered == 1
    assert state.lost_answers == 0


# --- failure envelopes --------------------------------------------------------------------------------------


def test_a_failure_marked_retryable_gets_a_new_attempt_and_its_envelope_is_kept(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = threaded_sim(fast_sim(faults=Faults(retryable_failure=0.4), seed=8))
    code, out = run(sim, tmp_path, 8, "--max-attempts", "8")
    assert code == 0, capsys.readouterr().err
    assert len(images_in(out)) == 8
    failed = events(out, "failed")
    assert failed, "some predictions should have failed"
    for event in failed:
        assert event["retryable"] is True
        assert event["error_code"]
        assert event["error_message"] == event["error"]
        assert event["error_category"]


def test_a_failure_not_marked_retryable_is_final(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = threaded_sim(fast_sim(failure_rate=1.0, seed=8))
    code, out = run(sim, tmp_path, 6, "--max-attempts", "3")
    err = capsys.readouterr().err
    assert code == 1, err
    assert sim.stats()["creates"] == 6  # nothing tried again
    failed = events(out, "failed")
    assert len(failed) == 6
    assert all(event["retryable"] is False for event in failed)
    # Every shape names its reason: the envelope's message, a dispatch failure's error, or the last log line.
    assert all(event["error"] and event["error"] != "failed" for event in failed)


# --- cancels, odd reads -------------------------------------------------------------------------------------


def test_a_record_only_cancel_is_watched_on_and_its_success_saved(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = threaded_sim(fast_sim(min_seconds=0.25, max_seconds=0.3, seed=1))
    code, out = run(sim, tmp_path, 3, "--job-timeout", "0.2s")
    err = capsys.readouterr().err
    assert code == 0, err
    assert len(images_in(out)) == 3
    stats = sim.stats()
    assert stats["cancels"] >= 1
    assert stats["creates"] == 3  # nothing paid again
    assert stats["paid_twice"] == 0
    assert not events(out, "failed")
    assert "still watching" in err


def test_a_cancel_that_stops_the_prediction_is_a_failed_attempt(tmp_path: Path, threaded_sim: SimFactory) -> None:
    sim = threaded_sim(fast_sim(min_seconds=0.5, max_seconds=0.6, faults=Faults(cancel_stops=1.0), seed=1))
    code, out = run(sim, tmp_path, 2, "--job-timeout", "0.05s", "--max-attempts", "2")
    assert code == 1
    failed = events(out, "failed")
    assert len(failed) == 4
    assert {e["error_code"] for e in failed} == {"TIMEOUT"}
    assert sim.stats()["creates"] == 4


def test_a_second_timeout_after_a_record_only_cancel_is_a_failed_attempt(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = threaded_sim(fast_sim(faults=Faults(never_finish=1.0), seed=1))
    code, out = run(sim, tmp_path, 2, "--job-timeout", "0.05s", "--max-attempts", "1")
    err = capsys.readouterr().err
    assert code == 1, err
    failed = events(out, "failed")
    assert len(failed) == 2
    assert all("still running after a cancel" in e["error"] for e in failed)
    assert sim.stats()["cancels"] == 2


def test_a_fresh_prediction_answering_404_is_looked_at_again_not_created_again(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = threaded_sim(fast_sim(faults=Faults(fresh_404_seconds=0.03), seed=1))
    code, out = run(sim, tmp_path, 4)
    assert code == 0, capsys.readouterr().err
    assert sim.stats()["creates"] == 4
    assert not events(out, "failed")


def test_a_success_without_an_output_url_gets_one_more_look(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = threaded_sim(fast_sim(faults=Faults(success_without_output=1.0), seed=1))
    code, out = run(sim, tmp_path, 4)
    assert code == 0, capsys.readouterr().err
    assert len(images_in(out)) == 4
    assert sim.stats()["creates"] == 4
    assert not events(out, "failed")


# --- auth, uploads, request ids -----------------------------------------------------------------------------


@pytest.mark.parametrize("accepted", ["bearer", "x-api-key", "both"])
def test_a_server_that_takes_only_one_auth_header_is_served(
    accepted: str, tmp_path: Path, threaded_sim: SimFactory
) -> None:
    sim = threaded_sim(fast_sim(auth_headers=accepted, api_key="sk-test-SECRET-4f1c9a7e"))
    code, out = run(sim, tmp_path, 2)
    assert code == 0
    assert len(images_in(out)) == 2


@pytest.mark.parametrize("faults", [Faults(), Faults(presign_empty_headers=1.0)], ids=["documented", "empty"])
def test_local_images_upload_as_the_documents_say(faults: Faults, tmp_path: Path, threaded_sim: SimFactory) -> None:
    sim = threaded_sim(fast_sim(faults=faults))
    code, out = run(sim, tmp_path, 3, image=True)
    assert code == 0
    assert len(images_in(out)) == 3
    assert sim.stats()["uploads"] == 1
    assert len(events(out, "uploaded")) == 1


def test_each_create_intent_records_the_request_id_it_sent(tmp_path: Path, threaded_sim: SimFactory) -> None:
    sim = threaded_sim(fast_sim())
    code, out = run(sim, tmp_path, 2)
    assert code == 0
    intents = events(out, "submitting")
    ids = [e["request_id"] for e in intents]
    assert len(set(ids)) == 2
    for event in intents:
        assert event["request_id"] == f"br-{event['fingerprint'][:12]}-a1-t1"
