"""What a run says, by table: durations, counts that add up, the bar at 80 columns, the start line, the summary."""

from __future__ import annotations

import dataclasses
import math

import pytest

from batchrunner.engine.runstate import RunConfig, RunResult, Snapshot, StopReason
from batchrunner.views.display import (
    bar_texts,
    eta,
    fit,
    next_steps,
    progress_fields,
    progress_line,
    start_line,
    status_text,
    summary_line,
    wait_text,
    waiting_for,
)
from batchrunner.views.words import Tally, duration, money, tally_text

SNAP = Snapshot(
    total=200,
    done=92,
    failed=3,
    in_flight=10,
    pending=93,
    requests=131,
    elapsed=123.0,
    window_used=13,
    in_doubt=2,
    skipped=52,
    spend=7.36,
    spend_before=4.16,
    slots_used=10,
    slots=10,
    window_limit=60,
    window_period=60.0,
)


def result(**changes: object) -> RunResult:
    base = RunResult(
        total=10,
        skipped=4,
        succeeded=3,
        failed=0,
        pending=3,
        in_flight=0,
        requests=12,
        creates=3,
        polls=9,
        lost_answers=0,
        rate_limited=0,
        spend=1.0,
        elapsed=386.0,
        stop_reason=None,
        max_in_flight=3,
        by_kind={},
        spend_before=0.76,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.25, "0.2s"),
        (0, "0s"),
        (7, "7s"),
        (59.4, "59s"),
        (59.6, "1m 00s"),
        (386, "6m 26s"),
        (3600 + 5 * 60, "1h 05m"),
        (3 * 86400 + 4 * 3600, "3d 4h"),
        (None, "?"),
        (math.inf, "?"),
        (-1, "?"),
    ],
)
def test_durations_read_as_people_write_them(seconds: float | None, text: str) -> None:
    assert duration(seconds) == text


@pytest.mark.parametrize(("usd", "text"), [(3.2, "$3.20"), (0.004, "$0.004"), (0, "$0.00"), (1234.5, "$1,234.50")])
def test_money(usd: float, text: str) -> None:
    assert money(usd) == text


def test_snapshot_counts_add_up_and_every_line_says_so() -> None:
    t = Tally(SNAP.total, SNAP.done, SNAP.failed, SNAP.in_flight, SNAP.in_doubt, SNAP.pending)
    assert t.adds_up
    assert tally_text(t) == "92/200 done, 3 failed, 10 in flight, 2 in doubt, 93 pending"
    line = progress_line(SNAP, finished_at_start=55)
    assert line.startswith("progress: 92/200 done, 3 failed, 10 in flight, 2 in doubt, 93 pending; 131 requests")
    assert "$3.20 this run ($7.36 in all)" in line
    fields = progress_fields(SNAP, 55)
    parts = ("done", "failed", "in_flight", "in_doubt", "pending")
    assert sum(fields[k] for k in parts) == fields["total"] == 200
    assert {"event", "requests", "spend"} <= set(fields)


def test_eta_is_this_runs_pace_not_the_resumed_count() -> None:
    # 95 finished of which 55 before this run: 40 in 123 s, 105 left.
    assert eta(SNAP, 55) == pytest.approx(105 * 123 / 40)
    assert eta(SNAP, 95) is None  # nothing finished yet this run: no rate, no made-up ETA
    assert eta(dataclasses.replace(SNAP, done=197, in_flight=0, in_doubt=0, pending=0), 0) == 0.0


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"window_wait": 23.0}, "waiting for the rate window: next request in 23s"),
        ({"window_wait": math.inf}, "waiting for answers: all 60 requests of the rate window are on the wire"),
        ({"creates_paused": 12.0}, "the API asked to slow down: creates resume in 12s"),
        ({}, "10/10 in flight: the next create waits for a slot"),
        ({"slots_used": 4, "pending": 0, "in_doubt": 2}, "looking for 2 creates in doubt in the account's executions"),
        ({"slots_used": 4, "in_doubt": 0}, None),
        ({"stopping": "interrupted"}, "stopping (Ctrl-C): finishing 12 jobs in flight, no new creates"),
    ],
)
def test_the_display_says_what_it_waits_for(changes: dict[str, object], words: str | None) -> None:
    assert waiting_for(dataclasses.replace(SNAP, **changes)) == words  # type: ignore[arg-type]


@pytest.mark.parametrize("width", [40, 60, 79, 160])
def test_bar_and_status_line_fit_the_terminal_and_keep_the_counts(width: int) -> None:
    snap = dataclasses.replace(SNAP, window_wait=23.0)
    left, right = bar_texts(snap, width, 55)
    assert len(left) + len(right) <= width - max(10, width // 5)  # the bar keeps a fifth of the line
    assert left == "95/200 "
    status = status_text(snap, width)
    assert len(status) <= width
    assert status.startswith("92 done, 3 failed, 10 in flight, 2 in doubt, 93 pending"[: width - 1])
    assert "done=" not in status and "/60/60s" not in status  # no repeated count, nothing that reads as a fraction
    if width >= 160:
        assert "$3.20 this run" in status and "window 13 of 60 used" in status
    wait = wait_text(snap, width)
    assert len(wait) <= width
    if width >= 60:
        assert wait == "waiting for the rate window: next request in 23s"


def test_at_80_columns_the_bar_says_how_long_and_how_long_left() -> None:
    _, right = bar_texts(SNAP, 79, 55)
    assert right == f"  48% 2m 03s, about {duration(105 * 123 / 40)} left"


def test_fit_drops_the_least_important_parts_first() -> None:
    assert fit(["counts", "waiting", "spend"], 17) == "counts · waiting"
    assert fit(["a long first part"], 8) == "a long …"


@pytest.mark.parametrize(
    ("changes", "line"),
    [
        ({"done": 0, "failed": 0, "in_flight": 0, "in_doubt": 0, "pending": 200}, "starting: 200 jobs"),
        (
            {"done": 92, "failed": 0, "in_flight": 10, "in_doubt": 0, "pending": 98},
            "resuming: 92 done, 108 to go, 10 in flight from the last run",
        ),
        (
            {"in_doubt": 2},
            "resuming: 92 done, 3 failed for good, 105 to go, 10 in flight from the last run, "
            "2 in doubt from the last run (looked for in the executions listing first)",
        ),
    ],
)
def test_start_line_says_where_a_resumed_run_starts(changes: dict[str, int], line: str) -> None:
    assert start_line(dataclasses.replace(SNAP, **changes)) == line  # type: ignore[arg-type]


def test_summary_has_one_vocabulary_this_runs_spend_and_the_report() -> None:
    line = summary_line(result(), report="out/report.html")
    assert line == (
        "summary: 7/10 done, 0 failed, 0 in flight, 3 pending; "
        "this run: 3 made, 12 requests, 6m 26s, $0.24 spent ($1.00 in all); report out/report.html"
    )
    doubt = summary_line(result(pending=1, in_doubt=2, recovered=1, lost_answers=1))
    assert "2 in doubt, 1 pending" in doubt
    assert "1 recovered" in doubt and "1 possibly duplicated" in doubt


@pytest.mark.parametrize(
    ("changes", "config", "steps"),
    [
        ({"pending": 0}, RunConfig(), []),
        (
            {"pending": 0, "failed": 3},
            RunConfig(),
            ["3 failed for good: batchrunner retry jobs/x.yaml, then run again"],
        ),
        (
            {"stop_reason": StopReason.BUDGET},
            RunConfig(budget=5.0, price=0.08),
            ["stopped by --budget $5.00 ($1.00 spent in all): raise it to continue"],
        ),
        (
            {"stop_reason": StopReason.MAX_JOBS},
            RunConfig(max_jobs=3),
            ["stopped by --max-jobs 3: rerun to continue: batchrunner run jobs/x.yaml"],
        ),
        (
            {"stop_reason": StopReason.DEADLINE},
            RunConfig(max_runtime=840),
            ["stopped by --max-runtime: rerun to continue: batchrunner run jobs/x.yaml"],
        ),
        (
            {"stop_reason": StopReason.INTERRUPTED},
            RunConfig(),
            ["stopped by Ctrl-C: rerun to continue: batchrunner run jobs/x.yaml"],
        ),
        (
            {"stop_reason": StopReason.PAYMENT},
            RunConfig(),
            [
                "stopped: the account is out of credit (HTTP 402); add credit, "
                "then rerun to continue: batchrunner run jobs/x.yaml"
            ],
        ),
    ],
)
def test_next_step_names_the_option_and_the_command_never_an_internal_name(
    changes: dict[str, object], config: RunConfig, steps: list[str]
) -> None:
    got = next_steps(result(**changes), config, command="jobs/x.yaml")
    assert got == steps
    assert not any(name in " ".join(got) for name in ("max_jobs", "payment_required", "api_unavailable"))
