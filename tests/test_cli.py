"""The commands around a run: status, plan and run --dry-run, validate, retry, export, and --help."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from batchrunner.cli.main import build_parser, main
from batchrunner.manifest import load_manifest
from batchrunner.sim.server import Faults
from batchrunner.store.ledger import Ledger
from batchrunner.store.output import RunLock
from tests.conftest import ThreadedSimulator, fast_sim, make_image, run_args, write_manifest

SimFactory = Callable[..., ThreadedSimulator]
pytestmark = pytest.mark.usefixtures("api_key")

RUN_FLAGS = [
    "--concurrency", "4", "--rate-limit", "30/60", "--rate-limit-scope", "creates", "--max-attempts", "2",
    "--job-timeout", "5m", "--drain-timeout", "0", "--max-runtime", "14m", "--max-jobs", "2", "--budget", "5",
    "--price", "0.5", "--inline-images", "--check-urls", "--retry-failed", "--poll-initial", "2s",
    "--poll-min-interval", "1s", "--timeout", "20s", "--reconcile-wait", "3s", "--log-format", "json",
    "--quiet", "--progress", "lines", "--simulate", "--sim-seed", "3", "--api-url", "http://127.0.0.1:9",
]  # fmt: skip


# --------------------------------------------------------------------------------------------------- status
def test_status_says_a_run_is_active_with_the_holders_pid_and_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = write_manifest(tmp_path, 2, image=False)
    out = tmp_path / "out"
    out.mkdir()
    with RunLock(out / ".batchrunner.lock"):
        assert main(["status", str(manifest), "--output", str(out)]) == 0
        text = capsys.readouterr().out
        assert f"a run is active (pid {os.getpid()}, started 20" in text
        assert "next:" not in text  # the active run is doing it
        assert main(["status", str(manifest), "--output", str(out), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["active"] is True
    assert main(["status", str(manifest), "--output", str(out)]) == 0
    assert "active" not in capsys.readouterr().out  # released: the probe took nothing


def test_status_says_the_last_run_ended_unfinished_and_labels_failed_attempts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = write_manifest(tmp_path, 3, image=False)
    jobs = load_manifest(manifest).jobs
    out = tmp_path / "out"
    out.mkdir()
    with Ledger(out / "ledger.jsonl") as ledger:
        ledger.append("run_started", pid=4242, jobs=3)  # a run killed before it could write its end
        for job, retryable in ((jobs[0], True), (jobs[1], False)):
            ledger.append("submitting", job=job.id, fingerprint=job.fingerprint, attempt=1)
            ledger.append("submitted", job=job.id, fingerprint=job.fingerprint, prediction_id=f"p-{job.id}")
            ledger.append(
                "failed", job=job.id, fingerprint=job.fingerprint, error="boom", error_code="E", retryable=retryable
            )
    assert main(["status", str(manifest), "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "0/3 done, 1 failed, 0 in flight, 2 pending" in text
    assert "the last run ended unfinished (pid 4242, started " in text
    assert "recent failed attempts:" in text
    assert f"  {jobs[0].id}: attempt 1 failed (will be tried again): boom [E]" in text
    assert f"  {jobs[1].id}: attempt 1 failed (failed for good): boom [E]" in text
    assert "next: 1 failed for good: batchrunner retry" in text


def test_status_after_a_finished_run_and_one_vocabulary(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = threaded_sim(fast_sim())
    manifest = write_manifest(tmp_path, 3, image=False, extra="price: 0.08")
    out = tmp_path / "out"
    assert main(run_args(manifest, sim.url, out, "--max-jobs", "2")) == 75
    capsys.readouterr()
    assert main(["status", str(manifest), "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2/3 done, 0 failed, 0 in flight, 1 pending" in text
    assert "the last run ended " in text and "with work left (stopped: --max-jobs reached)" in text
    assert "succeeded" not in text and "max_jobs" not in text


# --------------------------------------------------------------------------------------------------- plan
def test_plan_takes_every_option_run_takes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_manifest(tmp_path, 5, image=False)
    for command in ("plan", "validate"):
        assert main([command, str(manifest), "--output", str(tmp_path / "o"), *RUN_FLAGS, "--json"]) == 0, command
    plan = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert plan["this_run"] == 2 and plan["limited_by"] == "--max-jobs 2" and plan["expected_cost"] == 1.0


def test_run_dry_run_is_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_manifest(tmp_path, 5, image=False, extra="price: 0.08")
    out = tmp_path / "o"
    assert main(["plan", str(manifest), "--output", str(out), "--max-jobs", "3"]) == 0
    planned = capsys.readouterr().out
    assert main(["run", str(manifest), "--output", str(out), "--max-jobs", "3", "--dry-run"]) == 0
    assert capsys.readouterr().out == planned
    assert "a run would create 3, then stop (--max-jobs 3)" in planned and "about $0.24" in planned
    assert not out.exists()  # nothing was written, let alone sent


def test_plan_says_when_combinations_collapse_and_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_image(tmp_path / "img" / "red.jpg", (255, 0, 0))
    (tmp_path / "img" / "red-copy.jpg").write_bytes((tmp_path / "img" / "red.jpg").read_bytes())
    make_image(tmp_path / "img" / "blue.jpg", (0, 0, 255))
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "matrix:\n  input_image: [img/red.jpg, img/red-copy.jpg, img/blue.jpg, img/blue.jpg]\n  prompt: [a, b]\n",
        encoding="utf-8",
    )
    assert main(["plan", str(manifest), "--output", str(tmp_path / "o")]) == 0
    assert "8 combinations, 4 distinct requests: img/red-copy.jpg has the same bytes as img/red.jpg" in (
        capsys.readouterr().out
    )


# --------------------------------------------------------------------------------------------------- validate
def test_validate_names_every_problem_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.png").write_bytes(b"not an image")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "matrix:\n"
        "  prompt: [snow]\n"
        "  seed: [1, abc, -2]\n"
        "jobs:\n"
        "  - {id: x, prompt: p, seed: 010, aspect_ratio: '7:3'}\n"
        "  - {id: y, promt: p}\n"
        "  - {id: z, prompt: p, input_image: missing.png}\n"
        "  - {id: w, prompt: p, input_image: bad.png}\n",
        encoding="utf-8",
    )
    assert main(["validate", str(manifest), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert all(line.startswith("batchrunner: ") for line in err)
    text = "\n".join(err)
    for needle in ("'abc'", "got -2", "'010'", "'7:3'", "did you mean 'prompt'", "missing.png: no such file"):
        assert needle in text, needle
    assert len(err) == 6  # bad.png is judged once the manifest itself is right
    manifest.write_text(
        "jobs:\n  - {id: w, prompt: p, input_image: bad.png}\n  - {id: v, prompt: p, input_image: http://localhost/a.png}\n",
        encoding="utf-8",
    )
    assert main(["validate", str(manifest), "--output", str(tmp_path / "o")]) == 2
    text = capsys.readouterr().err
    assert "bad.png" in text and "localhost" in text


def test_validate_stops_naming_at_a_sensible_number(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "matrix:\n  prompt: [a]\n  seed: [" + ", ".join(f"x{i}" for i in range(50)) + "]\n", encoding="utf-8"
    )
    assert main(["validate", str(manifest), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 21 and "stopped after 20 problems" in err[-1]


def test_validate_ok_counts_jobs_and_local_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_manifest(tmp_path, 3)
    assert main(["validate", str(manifest), "--output", str(tmp_path / "o")]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "OK: 3 jobs, 1 local images checked"


# --------------------------------------------------------------------------------------------------- retry
def test_retry_alone_means_failed(tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]) -> None:
    sim = threaded_sim(fast_sim(faults=Faults(input_error=1.0)))
    manifest = write_manifest(tmp_path, 2, image=False)
    out = tmp_path / "out"
    assert main(run_args(manifest, sim.url, out)) == 1
    capsys.readouterr()
    assert main(["retry", str(manifest), "--output", str(out)]) == 0
    assert "2 failed jobs will be tried again: batchrunner run" in capsys.readouterr().err
    assert main(["status", str(manifest), "--output", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pending"] == 2


# --------------------------------------------------------------------------------------------------- export
def test_export_has_one_row_per_job_with_its_inputs_and_results(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = threaded_sim(fast_sim())
    manifest = write_manifest(tmp_path, 3, extra="defaults: {safety_tolerance: 2}")
    out = tmp_path / "out"
    assert main(run_args(manifest, sim.url, out, "--max-jobs", "2")) == 75
    capsys.readouterr()
    assert main(["export", str(manifest), "--output", str(out)]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert list(rows[0])[:7] == ["id", "file", "status", "prompt", "input_image", "seed", "aspect_ratio"]
    assert "safety_tolerance" in rows[0] and list(rows[0])[-6:] == [
        "attempts", "prediction_id", "cost", "model_time", "error_code", "error",
    ]  # fmt: skip
    assert [r["status"] for r in rows] == ["done", "done", "pending"]
    by_file = {r["file"]: r for r in rows if r["file"]}
    for name in os.listdir(out):
        if name.endswith(".png"):  # a spreadsheet user finds the prompt of every output file
            assert by_file[name]["prompt"] == "Turn the scene into a snowy winter evening"
            assert by_file[name]["input_image"] == "images/in.png"
            assert float(by_file[name]["model_time"]) > 0 and by_file[name]["prediction_id"]
    assert rows[2]["file"] == "" and rows[2]["attempts"] == "0" and rows[2]["seed"] == "2"
    target = tmp_path / "jobs.jsonl"
    assert main(["export", str(manifest), "--output", str(out), "--format", "jsonl", "--to", str(target)]) == 0
    records = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["id"] for r in records] == [r["id"] for r in rows] and records[0]["seed"] == 0


def test_export_to_a_folder_that_cannot_be_written_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = write_manifest(tmp_path, 1, image=False)
    assert main(["export", str(manifest), "--to", str(tmp_path / "no" / "such" / "x.csv")]) == 74
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("batchrunner: cannot write ")


# --------------------------------------------------------------------------------------------------- help
@pytest.mark.parametrize("command", ["run", "plan", "validate", "status", "retry", "report", "export", "simulate"])
def test_every_subcommand_has_a_description(command: str) -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    child = sub.choices[command]  # type: ignore[index]
    assert child.description and len(child.description) > 40
    assert command in parser.format_help()


def test_run_help_groups_options_and_explains_durations_and_exit_codes() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    text = sub.choices["run"].format_help()  # type: ignore[index]
    for heading in ("limits:", "when to stop", "polling and requests:", "what it shows:", "inputs:"):
        assert heading in text
    assert "durations: 90s, 14m, 1h, 1h30m" in text
    assert "75       incomplete, resumable" in text and "130/143" in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_report_open_opens_the_page_in_the_browser(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    opened: list[str] = []

    def browse(url: str) -> bool:
        opened.append(url)
        return True

    monkeypatch.setattr("webbrowser.open", browse)
    manifest = write_manifest(tmp_path, 2, image=False)
    out = tmp_path / "out"
    assert main(["report", str(manifest), "--output", str(out), "--open"]) == 0
    assert opened == [(out / "report.html").resolve().as_uri()]
    assert capsys.readouterr().out.strip() == str(out / "report.html")
    monkeypatch.setattr("webbrowser.open", lambda url: False)
    assert main(["report", str(manifest), "--output", str(out), "--open"]) == 0
    assert "no web browser could be started" in capsys.readouterr().err
