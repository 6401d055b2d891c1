"""End-to-end runs of the command line against the simulator on 127.0.0.1, with millisecond predictions."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from batchrunner.cli.main import main
from batchrunner.manifest import load_manifest
from batchrunner.sim.server import Faults
from batchrunner.store.ledger import read_ledger
from batchrunner.store.output import OutputDir, RunLock
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


def test_fifty_jobs_under_binding_limits_all_finish_with_zero_429s(tmp_path: Path, threaded_sim: SimFactory) -> None:
    sim = threaded_sim(fast_sim(rate_count=30, rate_period=0.3, concurrency=4))
    manifest = write_manifest(tmp_path, 50)
    out = tmp_path / "out"
    code = main(run_args(manifest, sim.url, out, "--rate-limit", "30/0.3", "--concurrency", "4"))
    stats = sim.stats()
    assert code == 0
    assert len(images_in(out)) == 50
    assert stats["rate_limited"] == 0 and stats["concurrency_rejected"] == 0
    assert stats["max_window"] <= 30
    assert stats["max_in_flight"] <= 4
    assert stats["creates"] == 50 and stats["duplicates"] == 0
    # The request budget binds: at least one create and one poll per job, and the runner did not waste many more.
    assert 100 <= stats["requests"] <= 200


def test_requests_slow_on_the_wire_never_push_a_window_past_its_count(tmp_path: Path, threaded_sim: SimFactory) -> None:
    # Half the requests reach the server 60 ms late: far more than a send-time margin would cover at 10/0.2 s
    # (22 ms), so counting requests at their sends would let request k+10 be stamped less than 0.2 s after
    # request k. Counted at their answers, the window holds whatever the latency.
    faults = Faults(late_arrival=0.5, late_arrival_seconds=0.06)
    sim = threaded_sim(fast_sim(rate_count=10, rate_period=0.2, concurrency=4, faults=faults, seed=3))
    manifest = write_manifest(tmp_path, 20, image=False)
    out = tmp_path / "out"
    code = main(run_args(manifest, sim.url, out, "--rate-limit", "10/0.2", "--concurrency", "4"))
    stats = sim.stats()
    assert code == 0
    assert len(images_in(out)) == 20
    assert stats["faults_injected"].get("late_arrival", 0) > 10
    assert stats["rate_limited"] == 0
    assert stats["max_window"] <= 10


def test_rerun_after_completion_makes_no_request(tmp_path: Path, threaded_sim: SimFactory) -> None:
    sim = threaded_sim(fast_sim())
    manifest = write_manifest(tmp_path, 6)
    out = tmp_path / "out"
    assert main(run_args(manifest, sim.url, out)) == 0
    before = sim.stats()["requests"]
    assert main(run_args(manifest, sim.url, out)) == 0
    assert sim.stats()["requests"] == before


def test_deleted_output_file_is_made_again(tmp_path: Path, threaded_sim: SimFactory) -> None:
    sim = threaded_sim(fast_sim())
    manifest = write_manifest(tmp_path, 3)
    out = tmp_path / "out"
    assert main(run_args(manifest, sim.url, out)) == 0
    images_in(out)[0].unlink()
    assert main(run_args(manifest, sim.url, out)) == 0
    assert sim.stats()["creates"] == 4
    assert len(images_in(out)) == 3


def test_wrong_key_ends_after_one_request_with_exit_2(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = threaded_sim(fast_sim(api_key="the-right-key"))
    manifest = write_manifest(tmp_path, 5)
    out = tmp_path / "out"
    assert main(run_args(manifest, sim.url, out)) == 2
    assert sim.stats()["requests"] == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("batchrunner: ") and "key" in last.lower()
    assert "Traceback" not in err and SECRET_KEY not in err


def test_missing_key_is_a_usage_error_before_any_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("EACHLABS_API_KEY")
    manifest = write_manifest(tmp_path, 2)
    assert main(["run", str(manifest), "--output", str(tmp_path / "out"), "--api-url", "http://127.0.0.1:9"]) == 2
    assert "EACHLABS_API_KEY" in capsys.readouterr().err


def test_bad_manifest_exits_2_with_one_line_and_no_request(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = threaded_sim(fast_sim())
    manifest = tmp_path / "bad.yaml"
    manifest.write_text('matrix:\n  prompt: ["Make it snow on the roofs"]\n  seed: [1, two]\n', encoding="utf-8")
    assert main(run_args(manifest, sim.url, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.yaml:3" in err[0] and "seed" in err[0]
    assert sim.stats()["requests"] == 0


def test_empty_batch_says_so_and_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "empty.yaml"
    manifest.write_text("model: flux-kontext-max\njobs: []\n", encoding="utf-8")
    assert main(["run", str(manifest), "--output", str(tmp_path / "out")]) == 0
    assert "no jobs" in capsys.readouterr().err


def test_failed_jobs_are_retried_up_to_max_attempts_then_exit_1(tmp_path: Path, threaded_sim: SimFactory) -> None:
    sim = threaded_sim(fast_sim(faults=Faults(provider_rate_limit=1.0)))
    manifest = write_manifest(tmp_path, 3)
    out = tmp_path / "out"
    assert main(run_args(manifest, sim.url, out, "--max-attempts", "2")) == 1
    assert sim.stats()["creates"] == 6
    state = read_ledger(out / "ledger.jsonl")
    assert all(st.attempts == 2 and st.error_code == "PROVIDER_RATE_LIMIT" for st in state.jobs.values())
    # Out of attempts: a rerun submits nothing.
    assert main(run_args(manifest, sim.url, out, "--max-attempts", "2")) == 1
    assert sim.stats()["creates"] == 6


def test_permanent_prediction_failure_is_not_retried(tmp_path: Path, threaded_sim: SimFactory) -> None:
    sim = threaded_sim(fast_sim(faults=Faults(input_error=1.0)))
    manifest = write_manifest(tmp_path, 2)
    out = tmp_path / "out"
    assert main(run_args(manifest, sim.url, out)) == 1
    assert sim.stats()["creates"] == 2
    status = read_ledger(out / "ledger.jsonl")
    assert {st.error_code for st in status.jobs.values()} == {"INPUT_DOWNLOAD_ERROR"}


def test_transient_api_faults_still_finish_every_job(tmp_path: Path, threaded_sim: SimFactory) -> None:
    faults = Faults(
        server_error_html=0.1,
        server_error_empty=0.1,
        reset_before=0.1,
        rate_limit_no_retry_after=0.05,
        malformed_json=0.05,
        # Six cut-short downloads of one image leave it to the next run (by design). The simulator's faults come
        # from one seeded sequence, so a run whose last download retries alone meets the same stretch of it each
        # time: at 0.2 a stretch there cut one image six times in about one run in twenty on a loaded machine.
        truncated_download=0.1,
    )
    sim = threaded_sim(fast_sim(faults=faults, seed=3))
    manifest = write_manifest(tmp_path, 12)
    out = tmp_path / "out"
    assert main(run_args(manifest, sim.url, out)) == 0
    assert len(images_in(out)) == 12
    stats = sim.stats()
    state = read_ledger(out / "ledger.jsonl")
    # Creates whose answer was lost may have been paid twice; nothing else may be.
    assert stats["duplicates"] <= state.lost_answers
    assert sum(stats["faults_injected"].values()) > 0


def test_an_image_cut_short_six_times_is_left_in_flight_and_fetched_by_the_next_run_unpaid(
    tmp_path: Path, threaded_sim: SimFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The retries' backoff is the download loop's own; the test waits milliseconds, not the 6 s it adds up to.
    monkeypatch.setattr("batchrunner.engine.results.backoff", lambda *args, **kwargs: 0.001)
    sim = threaded_sim(fast_sim(faults=Faults(truncated_download=1.0)))
    manifest = write_manifest(tmp_path, 2)
    out = tmp_path / "out"
    assert main(run_args(manifest, sim.url, out)) == 75  # paid outputs left to fetch: run again
    assert images_in(out) == []
    assert sim.stats()["downloads"] == 12  # six tries an image, then left, not failed
    assert all(st.prediction_id for st in read_ledger(out / "ledger.jsonl").jobs.values())
    sim.call(lambda: setattr(sim.sim, "config", replace(sim.sim.config, faults=Faults())))
    assert main(run_args(manifest, sim.url, out)) == 0
    assert len(images_in(out)) == 2
    stats = sim.stats()
    assert stats["creates"] == 2  # the next run fetched the paid outputs; it made nothing again
    assert stats["paid_twice"] == 0


def test_key_never_reaches_ledger_logs_or_files(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = threaded_sim(fast_sim(faults=Faults(server_error_html=0.2, input_error=0.3), seed=1))
    manifest = write_manifest(tmp_path, 8)
    out = tmp_path / "out"
    log_file = tmp_path / "run.log"
    main(run_args(manifest, sim.url, out, "--log-file", str(log_file), "--log-format", "json"))
    captured = capsys.readouterr()
    assert SECRET_KEY not in captured.out + captured.err
    for path in [log_file, *out.rglob("*")]:
        if path.is_file():
            assert SECRET_KEY.encode() not in path.read_bytes(), path


def test_resume_polls_prediction_left_in_flight_instead_of_creating_it(
    tmp_path: Path, threaded_sim: SimFactory
) -> None:
    import urllib.request

    sim = threaded_sim(fast_sim())
    manifest_path = write_manifest(tmp_path, 2)
    manifest = load_manifest(manifest_path)
    out = tmp_path / "out"
    out.mkdir()
    job = manifest.jobs[0]
    # An earlier run created this prediction and was killed before it saw the result.
    body = json.dumps({"model": "flux-kontext-max", "version": "0.0.1", "input": {"prompt": job.input["prompt"]}})
    request = urllib.request.Request(
        f"{sim.url}/v1/prediction/", data=body.encode(), headers={"X-API-Key": "k", "Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request) as answer:
        prediction_id = json.load(answer)["predictionID"]
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    record = {"ts": now, "job": job.id, "fingerprint": job.fingerprint}
    with open(out / "ledger.jsonl", "w", encoding="utf-8") as fh:
        fh.write(json.dumps({**record, "event": "submitting", "attempt": 1}) + "\n")
        fh.write(json.dumps({**record, "event": "submitted", "prediction_id": prediction_id}) + "\n")
    assert main(run_args(manifest_path, sim.url, out)) == 0
    stats = sim.stats()
    assert stats["creates"] == 2  # the one above, and the other job: never the resumed one again
    state = read_ledger(out / "ledger.jsonl")
    assert state.jobs[job.fingerprint].file is not None


def test_second_run_on_a_locked_output_exits_75_naming_the_holder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = write_manifest(tmp_path, 2)
    out = OutputDir(tmp_path / "out")
    out.create()
    with RunLock(out.lock):
        assert main(["run", str(manifest), "--output", str(out.path), "--api-url", "http://127.0.0.1:9"]) == 75
        # status still works while a run holds the lock
        assert main(["status", str(manifest), "--output", str(out.path), "--json"]) == 0
    captured = capsys.readouterr()
    assert f"pid {os.getpid()}" in captured.err
    assert json.loads(captured.out.strip())["pending"] == 2


def test_status_json_counts(tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]) -> None:
    sim = threaded_sim(fast_sim())
    manifest = write_manifest(tmp_path, 4)
    out = tmp_path / "out"
    assert main(run_args(manifest, sim.url, out, "--max-jobs", "3")) == 75
    capsys.readouterr()
    assert main(["status", str(manifest), "--output", str(out), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert {k: counts[k] for k in ("total", "succeeded", "failed", "pending", "in_flight")} == {
        "total": 4,
        "succeeded": 3,
        "failed": 0,
        "pending": 1,
        "in_flight": 0,
    }


def test_sigkill_mid_batch_then_rerun_finishes_without_paying_twice(tmp_path: Path, threaded_sim: SimFactory) -> None:
    sim = threaded_sim(fast_sim(min_seconds=0.05, max_seconds=0.2, rate_count=40, rate_period=0.4, concurrency=3))
    manifest = write_manifest(tmp_path, 20)
    out = tmp_path / "out"
    limits = ("--rate-limit", "40/0.4", "--concurrency", "3")
    proc = start_runner(manifest, sim.url, out, *limits)
    wait_for_ledger(out, b'"event":"succeeded"', proc, 4)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert main(run_args(manifest, sim.url, out, *limits)) == 0
    assert len(images_in(out)) == 20
    stats = sim.stats()
    state = read_ledger(out / "ledger.jsonl")
    assert stats["duplicates"] <= state.lost_answers
    assert stats["max_in_flight"] <= 3
    assert stats["rate_limited"] == 0 and stats["concurrency_rejected"] == 0


def test_sigint_stops_submitting_drains_and_exits_130(tmp_path: Path, threaded_sim: SimFactory) -> None:
    sim = threaded_sim(fast_sim(min_seconds=0.05, max_seconds=0.15, rate_count=30, rate_period=0.5, concurrency=2))
    manifest = write_manifest(tmp_path, 20)
    out = tmp_path / "out"
    limits = ("--rate-limit", "30/0.5", "--concurrency", "2")
    proc = start_runner(manifest, sim.url, out, *limits)
    wait_for_ledger(out, b'"event":"succeeded"', proc, 2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, err.decode()
    assert b"Traceback" not in err
    state = read_ledger(out / "ledger.jsonl")
    # Drained: nothing left in flight, and not every job was submitted.
    assert not state.in_flight()
    assert len(images_in(out)) < 20
    assert main(run_args(manifest, sim.url, out, *limits)) == 0
    assert len(images_in(out)) == 20
    assert sim.stats()["duplicates"] == 0


def max_in_window(times: list[float], period: float) -> int:
    times = sorted(times)
    return max((sum(1 for u in times[i:] if u < t + period) for i, t in enumerate(times)), default=0)


def test_rate_scope_creates_limits_creates_only(tmp_path: Path, threaded_sim: SimFactory) -> None:
    sim = threaded_sim(fast_sim(min_seconds=0.05, max_seconds=0.1))
    manifest = write_manifest(tmp_path, 12, image=False)
    out = tmp_path / "out"
    extra = ("--rate-limit", "4/0.4", "--rate-limit-scope", "creates", "--poll-min-interval", "0.02s")
    assert main(run_args(manifest, sim.url, out, *extra)) == 0
    created = [created_at for _, created_at, _, _ in sim.sim.prediction_times()]
    assert len(created) == 12
    assert max_in_window(created, 0.4) <= 4  # creates keep the window...
    assert sim.stats()["requests"] > 12 + 4  # ...while polls went beyond it


def test_long_polling_server_needs_one_poll_per_job(tmp_path: Path, threaded_sim: SimFactory) -> None:
    sim = threaded_sim(fast_sim(min_seconds=0.1, max_seconds=0.2, long_poll=2.0))
    manifest = write_manifest(tmp_path, 6, image=False)
    # Polling each prediction (no listing): a long poll answers when the prediction ends, so one poll a job is enough.
    assert main(run_args(manifest, sim.url, tmp_path / "out", "--watch", "poll")) == 0
    stats = sim.stats()
    assert stats["creates"] == 6 and stats["polls"] == 6


def test_drain_timeout_bounds_the_wait_after_ctrl_c(tmp_path: Path, threaded_sim: SimFactory) -> None:
    sim = threaded_sim(fast_sim(min_seconds=30, max_seconds=30, concurrency=2))
    manifest = write_manifest(tmp_path, 4, image=False)
    out = tmp_path / "out"
    proc = start_runner(manifest, sim.url, out, "--concurrency", "2", "--drain-timeout", "0.3s")
    deadline = time.monotonic() + 20
    while b'"submitted"' not in ((out / "ledger.jsonl").read_bytes() if (out / "ledger.jsonl").exists() else b""):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    started = time.monotonic()
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, err.decode()
    assert time.monotonic() - started < 3
    assert read_ledger(out / "ledger.jsonl").in_flight()  # left for the next run to poll
