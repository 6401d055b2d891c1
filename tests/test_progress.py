"""The run's display on its timer, with an injected clock: cron lines on a fixed 10 s grid, the bar redrawn while
the scheduler sleeps, the bar starting at the done count, log lines above the bar."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from collections.abc import Iterator

import pytest

from batchrunner.engine.runstate import Snapshot
from batchrunner.views.logs import JsonFormatter, setup_logging
from batchrunner.views.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def snap(**changes: object) -> Snapshot:
    base = Snapshot(total=20, done=5, failed=0, in_flight=3, pending=12, requests=9, elapsed=0.0, slots=10)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
def logged() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    setup_logging(stream, fmt="json")
    yield stream
    logging.getLogger("batchrunner").handlers.clear()


def records(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_cron_lines_come_every_ten_seconds_on_a_fixed_grid_never_twice(logged: io.StringIO) -> None:
    clock = Clock()
    progress = Progress("lines", stream=io.StringIO(), clock=clock)
    current = [snap()]
    progress.attach(lambda: current[0])
    progress(current[0])  # the first snapshot: the start line, and the grid begins
    seen: list[float] = []
    # The timer wakes at whatever moments the loop gives it, some late, some in bursts; one tick blocked 25 s.
    for at in (3.0, 9.99, 10.0, 10.2, 10.5, 19.7, 21.3, 29.0, 55.0, 59.9, 60.1):
        clock.now = 1000.0 + at
        current[0] = snap(elapsed=at, done=5 + int(at // 10))
        before = len(records(logged))
        progress.tick()
        if len(records(logged)) > before:
            seen.append(at)
    assert seen == [10.0, 21.3, 55.0, 60.1]  # one per 10 s slot reached; the missed slots 30-50 are not made up
    lines = [r for r in records(logged) if r["event"] == "progress"]
    assert [r["done"] for r in lines] == [6, 7, 10, 11]  # each from a fresh snapshot, not the last one pushed


def test_due_is_the_time_to_the_next_slot_of_the_grid() -> None:
    clock = Clock()
    progress = Progress("lines", stream=io.StringIO(), clock=clock)
    progress(snap())
    clock.now += 3.5
    assert progress.due() == pytest.approx(6.5)
    clock.now += 6.5
    progress.tick()
    assert progress.due() == pytest.approx(10.0)


def test_every_progress_record_has_counts_that_add_up(logged: io.StringIO) -> None:
    clock = Clock()
    progress = Progress("lines", stream=io.StringIO(), clock=clock)
    progress(snap(in_doubt=1, pending=11))
    clock.now += 10
    progress.tick()
    for record in records(logged):
        total = sum(int(record[k]) for k in ("done", "failed", "in_flight", "in_doubt", "pending"))  # type: ignore[call-overload]
        assert total == record["total"] == 20
        assert {"event", "requests", "spend"} <= set(record)
    assert [r["event"] for r in records(logged)] == ["resume", "progress"]


def test_the_bar_is_redrawn_by_the_timer_while_the_scheduler_sleeps() -> None:
    clock = Clock()
    stream = io.StringIO()
    progress = Progress("bar", stream=stream, clock=clock, width=lambda: 80)
    current = [snap()]
    progress.attach(lambda: current[0])
    with progress.shown():
        progress(current[0])
        # The scheduler waits 25 s for the window and calls nothing: the timer still redraws, with the wait.
        for second in range(1, 4):
            clock.now += 1
            current[0] = snap(elapsed=float(second), window_wait=25.0 - second, window_limit=60)
            progress.tick()
            assert f"next request in {25 - second}s" in stream.getvalue()
            assert f"{second}s, " in stream.getvalue()  # the clock moves


def test_the_bar_of_a_resumed_run_starts_at_the_done_count() -> None:
    clock = Clock()
    progress = Progress("bar", stream=io.StringIO(), clock=clock, width=lambda: 80)
    with progress.shown():
        progress(snap(done=92, total=200, pending=98, in_flight=10))
        bar = progress._bar
        assert bar.initial == 92 and bar.n == 92
        assert bar.format_dict["rate"] is None  # no 7617 img/s: nothing was done by this run yet


def test_log_lines_go_above_the_bar_through_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)  # logging_redirect_tqdm takes over the handler of the console
    setup_logging(stream, terminal=True)
    try:
        clock = Clock()
        progress = Progress("bar", stream=stream, clock=clock, width=lambda: 80)
        with progress.shown():
            progress(snap())
            logging.getLogger("batchrunner").warning("job j1 failed: boom")
            assert not any(
                isinstance(h, logging.StreamHandler) and h.stream is stream and type(h) is logging.StreamHandler
                for h in logging.getLogger("batchrunner").handlers
            )
        text = stream.getvalue()
        # tqdm.write clears the bar, writes the line, redraws the bar: the line stands on its own.
        line = next(part for part in text.split("\n") if "job j1 failed" in part)
        assert line.rsplit("\r", 1)[-1].split(" ", 1)[1] == "warning: job j1 failed: boom"
    finally:
        logging.getLogger("batchrunner").handlers.clear()


def test_json_formatter_puts_fields_beside_the_message() -> None:
    record = logging.LogRecord("batchrunner", logging.ERROR, __file__, 1, "job %s failed", ("j1",), None)
    record.fields = {"event": "job_failed", "job": "j1", "error_code": "X", "error": "boom"}
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "job j1 failed" and entry["event"] == "job_failed" and entry["job"] == "j1"
