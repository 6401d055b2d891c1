"""Running from cron and for people: plan, status, retry, budgets, deadlines, logs, overlapping runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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
    write_manifest,
)

SimFactory = Callable[..., ThreadedSimulator]
pytestmark = pytest.mark.usefixtures("api_key")


def test_plan_makes_no_request_and_counts_what_a_run_would_do(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = threaded_sim(fast_sim())
    manifest = write_manifest(tmp_path, 5, extra="price: 0.5")
    out = tmp_path / "out"
    assert main(run_args(manifest, sim.url, out, "--max-jobs", "2")) == 75
    requests = sim.stats()["requests"]
    capsys.readouterr()
    assert main(["plan", str(manifest), "--output", str(out), "--json", "--rate-limit", "60/60"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert sim.stats()["requests"] == requests  # not one request
    assert plan["succeeded"] == 2 and plan["new"] == 3 and plan["expected_cost"] == 1.5
    assert plan["expected_requests"] >= 6
    assert main(["plan", str(manifest), "--output", str(out)]) == 0
    assert "3 pending" in capsys.readouterr().out


def test_plan_needs_no_key_and_no_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("EACHLABS_API_KEY")
    monkeypatch.setenv("EACHLABS_API_URL", "http://127.0.0.1:9")  # nothing listens: a request would fail
    manifest = write_manifest(tmp_path, 3)
    assert main(["plan", str(manifest), "--output", str(tmp_path / "out"), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["new"] == 3
    # No prediction times known yet: the model's typical 8-15 s; 3 jobs fit the 10 slots, so the run waits for the
    # slowest of three (13.3 s expected) and the listing round that sees it; 3 creates, 1 upload and the rounds.
    assert 13.3 < plan["expected_seconds"] < 16.0 and plan["uploads"] == 1
    assert 3 + 1 < plan["expected_requests"] < 3 + 1 + 16.0 / 1.0


def test_retry_failed_gives_failed_jobs_another_run(tmp_path: Path, threaded_sim: SimFactory) -> None:
    failing = threaded_sim(fast_sim(faults=Faults(input_error=1.0)))
    manifest = write_manifest(tmp_path, 2, image=False)
    out = tmp_path / "out"
    assert main(run_args(manifest, failing.url, out)) == 1
    healthy = threaded_sim(fast_sim())
    assert main(run_args(manifest, healthy.url, out)) == 1  # failed for good: nothing is sent
    assert healthy.stats()["creates"] == 0
    assert main(["retry", str(manifest), "--output", str(out), "--failed"]) == 0
    assert main(run_args(manifest, healthy.url, out)) == 0
    assert healthy.stats()["creates"] == 2 and len(images_in(out)) == 2


def test_run_retry_failed_flag(tmp_path: Path, threaded_sim: SimFactory) -> None:
    failing = threaded_sim(fast_sim(faults=Faults(input_error=1.0)))
    manifest = write_manifest(tmp_path, 2, image=False)
    out = tmp_path / "out"
    assert main(run_args(manifest, failing.url, out)) == 1
    healthy = threaded_sim(fast_sim())
    assert main(run_args(manifest, healthy.url, out, "--retry-failed")) == 0
    assert len(images_in(out)) == 2


def test_budget_is_never_exceeded_and_holds_across_runs(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = threaded_sim(fast_sim())  # reports metrics.cost 0.08 per prediction
    manifest = write_manifest(tmp_path, 10, extra="price: 0.08", image=False)
    out = tmp_path / "out"
    assert main(run_args(manifest, sim.url, out, "--budget", "0.25")) == 75
    assert sim.stats()["creates"] == 3  # 3 x 0.08 = 0.24; a fourth would pass 0.25
    assert "budget" in capsys.readouterr().err
    assert main(run_args(manifest, sim.url, out, "--budget", "0.25")) == 75
    assert sim.stats()["creates"] == 3  # the ledger remembers the spend
    assert main(run_args(manifest, sim.url, out, "--budget", "0.40")) == 75
    assert sim.stats()["creates"] == 5
    assert read_ledger(out / "ledger.jsonl").spend == pytest.approx(0.40)


def test_budget_without_a_price_is_a_usage_error(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, 2, image=False)
    args = ["run", str(manifest), "--output", str(tmp_path / "o"), "--api-url", "http://127.0.0.1:9"]
    assert main([*args, "--budget", "1"]) == 2


def test_max_runtime_stops_by_the_deadline_with_75_and_the_next_run_finishes(
    tmp_path: Path, threaded_sim: SimFactory
) -> None:
    sim = threaded_sim(fast_sim(min_seconds=0.1, max_seconds=0.2, concurrency=2))
    manifest = write_manifest(tmp_path, 12, image=False)
    out = tmp_path / "out"
    started = time.monotonic()
    assert main(run_args(manifest, sim.url, out, "--concurrency", "2", "--max-runtime", "0.6s")) == 75
    assert time.monotonic() - started < 1.5
    first = len(images_in(out))
    assert 0 < first < 12
    assert main(run_args(manifest, sim.url, out, "--concurrency", "2")) == 0
    assert len(images_in(out)) == 12
    assert sim.stats()["duplicates"] == 0


def test_max_jobs_limits_new_predictions_per_run(tmp_path: Path, threaded_sim: SimFactory) -> None:
    sim = threaded_sim(fast_sim())
    manifest = write_manifest(tmp_path, 5, image=False)
    out = tmp_path / "out"
    assert main(run_args(manifest, sim.url, out, "--max-jobs", "2")) == 75
    assert sim.stats()["creates"] == 2
    assert main(run_args(manifest, sim.url, out, "--max-jobs", "3")) == 0
    assert sim.stats()["creates"] == 5


def test_json_logs_have_one_line_per_failure_with_job_and_message_and_a_summary(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = threaded_sim(fast_sim(faults=Faults(input_error=1.0)))
    manifest = write_manifest(tmp_path, 2, image=False)
    out = tmp_path / "out"
    log_file = tmp_path / "logs" / "run.log"
    assert main(run_args(manifest, sim.url, out, "--log-format", "json", "--log-file", str(log_file))) == 1
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    failures = [e for e in lines if e["event"] == "job_failed"]
    assert len(failures) == 2
    assert all(e["error_code"] == "INPUT_DOWNLOAD_ERROR" and e["job"] and e["error"] for e in failures)
    assert all("INPUT_DOWNLOAD_ERROR" in e["message"] for e in failures)
    summary = next(e for e in lines if e["event"] == "summary")
    assert summary["message"].startswith("summary: 0/2 done")
    counted = ("total", "done", "failed", "in_flight", "in_doubt", "pending", "requests", "spend")
    for record in [e for e in lines if e["event"] in ("start", "resume", "progress", "summary")]:
        assert set(counted) <= set(record)
        assert sum(record[k] for k in counted[1:6]) == record["total"]
    assert [e["event"] for e in lines][:2] == ["plan", "start"]
    assert lines[-1]["event"] == "next" and "batchrunner retry" in lines[-1]["next"]
    assert all(json.loads(line) for line in log_file.read_text().splitlines())


def test_text_logs_are_timestamped_plain_lines(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = threaded_sim(fast_sim())
    manifest = write_manifest(tmp_path, 2, image=False)
    assert main(run_args(manifest, sim.url, tmp_path / "out")) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(line[:4].isdigit() and line[10] == "T" for line in lines)
    assert "summary: 2/2 done" in lines[-1]


def test_cron_line_overlapping_then_sequential_runs(tmp_path: Path, threaded_sim: SimFactory) -> None:
    """The README's cron line, twice overlapping and then in sequence."""
    sim = threaded_sim(fast_sim(min_seconds=0.1, max_seconds=0.2, concurrency=2))
    # 20 jobs two at a time take at least 1.5 s. The first run is stopped (SIGSTOP) while the second starts, so it
    # still holds the folder then however slowly a loaded machine starts the second interpreter.
    manifest = write_manifest(tmp_path, 20, image=False)
    out = tmp_path / "out"
    env = {**os.environ, "EACHLABS_API_KEY": SECRET_KEY}
    cron = [sys.executable, "-m", "batchrunner", *run_args(manifest, sim.url, out, "--concurrency", "2")]
    first = subprocess.Popen([*cron, "--max-runtime", "1s"], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not (out / "ledger.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)
    try:
        overlapping = subprocess.run(cron, env=env, stderr=subprocess.PIPE, timeout=30, check=False)
    finally:
        first.send_signal(signal.SIGCONT)
    assert overlapping.returncode == 75
    assert b"another run holds" in overlapping.stderr and b"pid" in overlapping.stderr
    _, err = first.communicate(timeout=30)
    assert first.returncode in (0, 75), err.decode()
    sequential = subprocess.run(cron, env=env, stderr=subprocess.PIPE, timeout=30, check=False)
    assert sequential.returncode == 0, sequential.stderr.decode()
    assert len(images_in(out)) == 20
    assert sim.stats()["duplicates"] == 0


def test_quiet_run_prints_only_the_summary(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = threaded_sim(fast_sim())
    manifest = write_manifest(tmp_path, 3, image=False)
    assert main(run_args(manifest, sim.url, tmp_path / "out", "--quiet")) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "summary: 3/3 done" in lines[0]


def test_quiet_run_with_nothing_to_do_prints_nothing(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = threaded_sim(fast_sim())
    manifest = write_manifest(tmp_path, 3, image=False)
    assert main(run_args(manifest, sim.url, tmp_path / "out", "--quiet")) == 0
    capsys.readouterr()
    assert main(run_args(manifest, sim.url, tmp_path / "out", "--quiet")) == 0  # the next cron tick: idle
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""
    assert main(run_args(manifest, sim.url, tmp_path / "out")) == 0  # without --quiet it still says so
    assert "summary: 3/3 done" in capsys.readouterr().err


def test_a_run_writes_the_report_and_names_it_in_the_summary(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = threaded_sim(fast_sim())
    manifest = write_manifest(tmp_path, 2)
    out = tmp_path / "out"
    assert main(run_args(manifest, sim.url, out, "--max-jobs", "1")) == 75
    err = capsys.readouterr().err
    assert f"report {out / 'report.html'}" in err and (out / "report.html").is_file()
    assert len(list((out / "thumbs").iterdir())) == 2  # the input and the one output
    assert "next: stopped by --max-jobs 1: rerun to continue: batchrunner run" in err
