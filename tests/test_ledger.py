"""Tests of the ledger: event effects by table, torn and garbage lines, durable appends, the request log,
and property tests that replay survives a cut at any byte and keeps its invariants."""

from __future__ import annotations

import errno
import io
import json
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchrunner.errors import OutputError
from batchrunner.store import ledger as ledger_module
from batchrunner.store.ledger import (
    CREATE_FAILED,
    FAILED,
    NOT_CREATED,
    RECOVERED,
    RESET,
    RUN_FINISHED,
    RUN_STARTED,
    SUBMITTED,
    SUBMITTING,
    SUCCEEDED,
    UPLOADED,
    JobState,
    JobStatus,
    Ledger,
    LedgerState,
    RequestLog,
    Upload,
    parse_ts,
    read_ledger,
    replay,
)

FP_A = "a" * 64
FP_B = "b" * 64
FP_C = "c" * 64
T0 = 1_700_000_000.0
ISO_MS_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ev(event: str, fp: str = FP_A, job: str = "job-a", at: float = T0, **fields: Any) -> dict[str, Any]:
    """A job event as Ledger.append would write it."""
    return {"ts": iso(at), "event": event, "job": job, "fingerprint": fp, **fields}


def encode(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def replay_events(*events: dict[str, Any]) -> LedgerState:
    return replay(encode(e) for e in events)


def assert_same_but_bad_lines(got: LedgerState, want: LedgerState, extra_bad: int) -> None:
    assert got.jobs == want.jobs
    assert got.uploads == want.uploads
    assert got.durations == want.durations
    assert got.spend == want.spend
    assert got.lost_answers == want.lost_answers
    assert got.bad_lines == want.bad_lines + extra_bad


# --- each event's effect, by table -------------------------------------------------------------------------

PID = "pred-1"

EVENT_EFFECTS: list[tuple[str, list[dict[str, Any]], dict[str, Any]]] = [
    (
        "submitting_without_answer_is_an_open_doubt_not_yet_a_duplicate",
        [ev(SUBMITTING, attempt=1)],
        {"status": JobStatus.IN_DOUBT, "prediction_id": None, "lost_answers": 0, "doubt_open": True, "intent_at": T0},
    ),
    (
        "submitted_is_in_flight_with_id_and_time",
        [ev(SUBMITTING, attempt=1), ev(SUBMITTED, at=T0 + 1.5, prediction_id=PID)],
        {"status": JobStatus.IN_FLIGHT, "prediction_id": PID, "submitted_at": T0 + 1.5, "lost_answers": 0},
    ),
    (
        "create_failed_with_answer_is_pending_and_not_lost",
        [ev(SUBMITTING), ev(CREATE_FAILED, error="HTTP 429", in_doubt=False)],
        {"status": JobStatus.PENDING, "error": "HTTP 429", "lost_answers": 0, "attempts": 0},
    ),
    (
        "create_failed_in_doubt_leaves_the_doubt_open",
        [ev(SUBMITTING), ev(CREATE_FAILED, error="timeout", in_doubt=True)],
        {"status": JobStatus.PENDING, "error": "timeout", "lost_answers": 0, "doubt_open": True},
    ),
    (
        "create_failed_in_doubt_then_submitting_again_counts_a_possible_duplicate",
        [ev(SUBMITTING), ev(CREATE_FAILED, error="timeout", in_doubt=True), ev(SUBMITTING)],
        {"status": JobStatus.IN_DOUBT, "lost_answers": 1, "doubt_open": True},
    ),
    (
        "recovered_adopts_the_prediction_and_settles_the_doubt",
        [
            ev(SUBMITTING),
            ev(CREATE_FAILED, error="HTTP 504", in_doubt=True),
            ev(RECOVERED, at=T0 + 3, prediction_id=PID),
        ],
        {
            "status": JobStatus.IN_FLIGHT,
            "prediction_id": PID,
            "submitted_at": T0 + 3,
            "lost_answers": 0,
            "recovered": 1,
            "doubt_open": False,
        },
    ),
    (
        "recovered_after_a_killed_create_is_in_flight",
        [ev(SUBMITTING), ev(RECOVERED, prediction_id=PID)],
        {"status": JobStatus.IN_FLIGHT, "prediction_id": PID, "recovered": 1, "doubt_open": False},
    ),
    (
        "not_created_settles_the_doubt_and_a_new_create_is_no_duplicate",
        [ev(SUBMITTING), ev(CREATE_FAILED, error="reset", in_doubt=True), ev(NOT_CREATED), ev(SUBMITTING)],
        {"status": JobStatus.IN_DOUBT, "lost_answers": 0, "recovered": 0},
    ),
    (
        "not_created_after_a_killed_create_is_pending",
        [ev(SUBMITTING), ev(NOT_CREATED)],
        {"status": JobStatus.PENDING, "doubt_open": False, "lost_answers": 0},
    ),
    (
        "recovered_without_a_prediction_id_is_ignored",
        [ev(SUBMITTING), ev(RECOVERED)],
        {"status": JobStatus.IN_DOUBT, "doubt_open": True},
    ),
    (
        "succeeded_sets_file_cost_and_finish_time",
        [
            ev(SUBMITTED, prediction_id=PID),
            ev(SUCCEEDED, at=T0 + 9, file="out/a.png", prediction_id=PID, cost=0.08, duration=8.5),
        ],
        {
            "status": JobStatus.SUCCEEDED,
            "file": "out/a.png",
            "cost": 0.08,
            "finished_at": T0 + 9,
            "prediction_id": PID,
            "error": None,
        },
    ),
    (
        "succeeded_without_prediction_id_keeps_the_known_one",
        [ev(SUBMITTED, prediction_id=PID), ev(SUCCEEDED, file="out/a.png")],
        {"status": JobStatus.SUCCEEDED, "prediction_id": PID, "cost": None},
    ),
    (
        "succeeded_after_a_failure_clears_the_error",
        [ev(FAILED, error="boom", retryable=True, error_code="X"), ev(SUCCEEDED, file="f.png")],
        {"status": JobStatus.SUCCEEDED, "error": None, "error_code": None, "attempts": 1},
    ),
    (
        "failed_counts_an_attempt_and_clears_the_prediction",
        [
            ev(SUBMITTED, prediction_id=PID),
            ev(FAILED, at=T0 + 4, error="bad input", retryable=False, error_code="INPUT_DOWNLOAD_ERROR"),
        ],
        {
            "status": JobStatus.FAILED,
            "attempts": 1,
            "prediction_id": None,
            "error": "bad input",
            "error_code": "INPUT_DOWNLOAD_ERROR",
            "retryable": False,
            "finished_at": T0 + 4,
        },
    ),
    (
        "failed_twice_counts_two_attempts",
        [ev(FAILED, error="e1", retryable=True), ev(FAILED, error="e2", retryable=True)],
        {"status": JobStatus.FAILED, "attempts": 2, "error": "e2", "retryable": True},
    ),
    (
        "failed_without_retryable_is_taken_as_permanent",
        [ev(FAILED, error="e")],
        {"retryable": False},
    ),
    (
        "reset_makes_a_failed_job_pending_with_no_attempts",
        [ev(FAILED, error="e", retryable=False), ev(RESET)],
        {"status": JobStatus.PENDING, "attempts": 0, "error": "e"},
    ),
    (
        "reset_leaves_a_succeeded_job_succeeded",
        [ev(FAILED, error="e", retryable=True), ev(SUCCEEDED, file="f.png"), ev(RESET)],
        {"status": JobStatus.SUCCEEDED, "attempts": 0, "file": "f.png"},
    ),
    (
        "second_submitting_before_an_answer_loses_the_first",
        [ev(SUBMITTING, attempt=1), ev(SUBMITTING, attempt=1)],
        {"status": JobStatus.IN_DOUBT, "lost_answers": 1},
    ),
    (
        "resubmitting_after_a_lost_answer_keeps_the_count",
        [ev(SUBMITTING), ev(SUBMITTING), ev(SUBMITTED, prediction_id=PID)],
        {"status": JobStatus.IN_FLIGHT, "lost_answers": 1},
    ),
    (
        "submitting_again_abandons_the_old_prediction",
        [ev(SUBMITTED, prediction_id=PID), ev(SUBMITTING)],
        {"status": JobStatus.IN_DOUBT, "prediction_id": None, "lost_answers": 0},
    ),
    (
        "full_lifecycle_ends_succeeded",
        [
            ev(SUBMITTING, attempt=1),
            ev(SUBMITTED, prediction_id=PID),
            ev(FAILED, error="PROVIDER_RATE_LIMIT", retryable=True),
            ev(SUBMITTING, attempt=2),
            ev(SUBMITTED, prediction_id="pred-2"),
            ev(SUCCEEDED, file="f.png", prediction_id="pred-2"),
        ],
        {"status": JobStatus.SUCCEEDED, "attempts": 1, "prediction_id": "pred-2", "lost_answers": 0},
    ),
    (
        "latest_job_name_wins",
        [ev(SUBMITTING, job="old-name"), ev(SUBMITTED, job="new-name", prediction_id=PID)],
        {"job": "new-name"},
    ),
]


@pytest.mark.parametrize(
    ("events", "expected"),
    [pytest.param(events, expected, id=name) for name, events, expected in EVENT_EFFECTS],
)
def test_event_sequence_replays_to_expected_job_state(events: list[dict[str, Any]], expected: dict[str, Any]) -> None:
    state = replay_events(*events)
    job = state.jobs[FP_A]
    assert {key: getattr(job, key) for key in expected} == expected
    assert state.lost_answers == job.lost_answers
    assert state.bad_lines == 0


def test_job_state_defaults_for_a_new_job() -> None:
    assert replay_events(ev(RESET)).jobs[FP_A] == JobState(FP_A, "job-a")


def _without(record: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != key}


@pytest.mark.parametrize(
    "record",
    [
        pytest.param({"ts": iso(T0), "event": RUN_STARTED, "pid": 1}, id="run_started"),
        pytest.param({"ts": iso(T0), "event": RUN_FINISHED}, id="run_finished"),
        pytest.param(ev("teleported", prediction_id=PID), id="unknown_event"),
        pytest.param(_without(ev(SUBMITTING), "event"), id="no_event_name"),
        pytest.param(_without(ev(SUBMITTING), "fingerprint"), id="no_fingerprint"),
        pytest.param(_without(ev(SUBMITTING), "job"), id="no_job"),
        pytest.param(ev(SUBMITTING, fp=42), id="fingerprint_not_a_string"),  # type: ignore[arg-type]
        pytest.param(ev(SUBMITTED), id="submitted_without_prediction_id"),
        pytest.param(ev(SUCCEEDED, cost=1.0), id="succeeded_without_file"),
        pytest.param({"ts": iso(T0), "event": UPLOADED, "sha256": "x"}, id="uploaded_without_url"),
    ],
)
def test_ignored_event_changes_nothing(record: dict[str, Any]) -> None:
    before = replay_events(ev(SUBMITTED, fp=FP_B, prediction_id=PID))
    after = replay_events(ev(SUBMITTED, fp=FP_B, prediction_id=PID), record)
    assert after == before


def test_uploads_are_kept_by_sha256_latest_wins() -> None:
    state = replay_events(
        {"ts": iso(T0), "event": UPLOADED, "sha256": "s1", "public_url": "https://x/1"},
        {"ts": iso(T0 + 1), "event": UPLOADED, "sha256": "s2", "public_url": "https://x/2"},
        {"ts": iso(T0 + 2), "event": UPLOADED, "sha256": "s1", "public_url": "https://x/1b"},
        {"ts": "not a time", "event": UPLOADED, "sha256": "s3", "public_url": "https://x/3"},
    )
    assert state.uploads == {
        "s1": Upload("s1", "https://x/1b", T0 + 2),
        "s2": Upload("s2", "https://x/2", T0 + 1),
        "s3": Upload("s3", "https://x/3", 0.0),  # unknown age: treated as expired
    }
    assert state.jobs == {}


def test_durations_and_spend_come_from_succeeded_and_failed_in_ledger_order() -> None:
    state = replay_events(
        ev(SUBMITTED, prediction_id=PID, cost=5.0, duration=1.0),  # not a finishing event: ignored
        ev(FAILED, error="e", retryable=True, cost=0.25, duration=3),
        ev(SUCCEEDED, fp=FP_B, file="b.png", cost=0.5, duration=2.5),
        ev(SUCCEEDED, fp=FP_C, file="c.png"),  # no cost, no duration
        ev(SUCCEEDED, file="a.png", cost="free", duration=True),  # garbage values are skipped
        ev(SUCCEEDED, file="a.png", cost=math.inf, duration=math.nan),  # JSON reads Infinity and NaN
        ev(SUCCEEDED, file="a.png", cost=10**400),  # too large for a float
    )
    assert state.durations == [3.0, 2.5]
    assert state.spend == pytest.approx(0.75)
    assert state.jobs[FP_A].cost is None


def test_in_flight_lists_only_jobs_with_a_live_prediction() -> None:
    state = replay_events(
        ev(SUBMITTED, fp=FP_A, prediction_id="p-a"),
        ev(SUBMITTED, fp=FP_B, prediction_id="p-b"),
        ev(SUCCEEDED, fp=FP_B, file="b.png"),
        ev(SUBMITTING, fp=FP_C),
    )
    assert [job.fingerprint for job in state.in_flight()] == [FP_A]


def test_lost_answers_total_sums_over_jobs() -> None:
    state = replay_events(
        ev(SUBMITTING, fp=FP_A),  # killed before the answer: open, not counted
        ev(SUBMITTING, fp=FP_A),  # sent again while in doubt: 1
        ev(SUBMITTING, fp=FP_B),
        ev(CREATE_FAILED, fp=FP_B, error="timeout", in_doubt=True),
        ev(SUBMITTING, fp=FP_B),  # 1
        ev(CREATE_FAILED, fp=FP_B, error="timeout", in_doubt=True),
        ev(SUBMITTING, fp=FP_B),  # 2
        ev(SUBMITTING, fp=FP_C),
        ev(CREATE_FAILED, fp=FP_C, error="HTTP 504", in_doubt=True),
        ev(RECOVERED, fp=FP_C, prediction_id=PID),  # 0, recovered
    )
    assert [state.jobs[fp].lost_answers for fp in (FP_A, FP_B, FP_C)] == [1, 2, 0]
    assert state.lost_answers == 3
    assert state.recovered == 1
    assert state.predictions == {PID}
    assert [job.fingerprint for job in state.in_doubt()] == [FP_A, FP_B]


def test_str_and_bytes_lines_replay_alike() -> None:
    lines = [encode(ev(SUBMITTED, job="café ☕", prediction_id=PID)), encode(ev(SUCCEEDED, file="f.png"))]
    assert replay(line.decode() for line in lines) == replay(lines)


def test_empty_ledger_replays_to_empty_state() -> None:
    assert replay([]) == LedgerState()


@pytest.mark.parametrize(
    ("value", "epoch"),
    [
        ("2023-11-14T22:13:20.000Z", T0),
        ("2023-11-14T22:13:20.250Z", T0 + 0.25),
        ("2023-11-14T22:13:20+00:00", T0),
        ("2023-11-15T00:13:20+02:00", T0),
        ("2023-11-14T22:13:20", T0),  # no zone: UTC
    ],
)
def test_parse_ts_reads_iso_8601(value: str, epoch: float) -> None:
    assert parse_ts(value) == epoch


def test_parse_ts_rejects_what_is_not_a_time() -> None:
    with pytest.raises(ValueError):
        parse_ts("yesterday")


def test_job_status_is_a_string() -> None:
    assert JobStatus("in_flight") is JobStatus.IN_FLIGHT
    assert isinstance(JobStatus.IN_FLIGHT, str)
    assert json.dumps(JobStatus.IN_FLIGHT) == '"in_flight"'
    assert f"{JobStatus.FAILED}" == "failed"


# --- torn and garbage lines -------------------------------------------------------------------------------

COMPLETE = [
    encode(ev(SUBMITTING, attempt=1)),
    encode(ev(SUBMITTED, prediction_id=PID)),
    encode(ev(SUBMITTING, fp=FP_B, job="b")),
]
# Non-ASCII so that some cuts fall inside a multi-byte UTF-8 character.
LAST = encode(ev(SUCCEEDED, file="sortie/é☕🙂.png", cost=0.08, duration=7.5))


@pytest.mark.parametrize("cut", range(len(LAST) - 1))  # every byte offset short of the whole record
def test_torn_last_line_replays_as_the_complete_lines_before_it(cut: int) -> None:
    state = replay(io.BytesIO(b"".join(COMPLETE) + LAST[:cut]))
    assert_same_but_bad_lines(state, replay(COMPLETE), extra_bad=1 if cut else 0)


def test_last_line_without_newline_is_still_applied() -> None:
    state = replay(io.BytesIO(b"".join(COMPLETE) + LAST.rstrip(b"\n")))
    assert state == replay([*COMPLETE, LAST])
    assert state.jobs[FP_A].status is JobStatus.SUCCEEDED


@pytest.mark.parametrize(
    ("line", "bad"),
    [
        pytest.param(b"garbage\n", 1, id="text"),
        pytest.param(b"[1, 2]\n", 1, id="array"),
        pytest.param(b'"a string"\n', 1, id="string"),
        pytest.param(b"null\n", 1, id="null"),
        pytest.param(b'{"event":\n', 1, id="torn_object"),
        pytest.param(b'{"a":1} trailing\n', 1, id="trailing_garbage"),
        pytest.param(b'{"a":1}{"b":2}\n', 1, id="two_objects_glued"),
        pytest.param(b"\xff\xfe{}\n", 1, id="not_utf8"),
        pytest.param(b"[" * 100_000 + b"\n", 1, id="deeply_nested"),
        pytest.param(b"\n", 0, id="blank"),
        pytest.param(b"  \t \n", 0, id="whitespace"),
        pytest.param(b'{"event":"run_started"}\n', 0, id="object"),
        pytest.param(b'   {"event":"run_started"}\n', 0, id="object_after_spaces"),
        pytest.param(b'\xef\xbb\xbf{"event":"run_started"}\n', 0, id="object_after_bom"),
    ],
)
def test_garbage_in_the_middle_is_skipped_and_counted(line: bytes, bad: int) -> None:
    state = replay([*COMPLETE[:2], line, COMPLETE[2]])
    assert_same_but_bad_lines(state, replay(COMPLETE), extra_bad=bad)


def test_object_line_after_spaces_is_applied() -> None:
    state = replay([b"  " + COMPLETE[1]])
    assert state.jobs[FP_A].prediction_id == PID


# --- read_ledger and Ledger.append --------------------------------------------------------------------------


class Clock:
    """A settable clock."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fsync_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def counting_fsync(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    return calls


@pytest.fixture
def make_ledger(tmp_path: Path) -> Iterator[Callable[..., Ledger]]:
    made: list[Ledger] = []

    def make(path: Path | None = None, **kwargs: Any) -> Ledger:
        ledger = Ledger(path or tmp_path / "ledger.jsonl", **kwargs)
        made.append(ledger)
        return ledger

    yield make
    for ledger in made:
        ledger.close()


def test_read_ledger_of_a_missing_file_is_empty(tmp_path: Path) -> None:
    assert read_ledger(tmp_path / "nope.jsonl") == LedgerState()


def test_read_ledger_of_a_directory_is_an_output_error(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="is a directory, not a regular file"):
        read_ledger(tmp_path)


def test_append_writes_one_json_line_per_event_and_fsyncs_each(
    tmp_path: Path, make_ledger: Callable[..., Ledger], fsync_calls: list[int]
) -> None:
    clock = Clock(T0 + 0.123)
    ledger = make_ledger(clock=clock)
    fsync_calls.clear()  # creating the file also syncs its directory
    first = ledger.append(SUBMITTING, job="a", fingerprint=FP_A, attempt=1)
    clock.now += 2
    second = ledger.append(SUBMITTED, job="a", fingerprint=FP_A, prediction_id=PID)

    assert len(fsync_calls) == 2
    lines = (tmp_path / "ledger.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b""
    records = [json.loads(line) for line in lines[:-1]]
    assert records == [first, second]
    assert first == {"ts": first["ts"], "event": SUBMITTING, "job": "a", "fingerprint": FP_A, "attempt": 1}
    assert ISO_MS_Z.match(first["ts"])
    assert parse_ts(first["ts"]) == pytest.approx(T0 + 0.123)
    assert parse_ts(second["ts"]) == pytest.approx(T0 + 2.123)
    assert read_ledger(tmp_path / "ledger.jsonl").jobs[FP_A].submitted_at == pytest.approx(T0 + 2.123)


def test_creating_the_ledger_syncs_its_directory_once(
    tmp_path: Path, make_ledger: Callable[..., Ledger], fsync_calls: list[int]
) -> None:
    make_ledger().close()
    make_ledger().close()  # the file exists now: nothing more to sync
    assert len(fsync_calls) == 1


def test_append_without_fsync_never_syncs(make_ledger: Callable[..., Ledger], fsync_calls: list[int]) -> None:
    ledger = make_ledger(fsync=False)
    ledger.append(RUN_STARTED)
    assert fsync_calls == []


def test_append_after_a_torn_tail_isolates_the_fragment(tmp_path: Path, make_ledger: Callable[..., Ledger]) -> None:
    path = tmp_path / "ledger.jsonl"
    torn = encode(ev(SUCCEEDED, file="x.png"))[:25]
    path.write_bytes(COMPLETE[0] + torn)
    record = make_ledger(fsync=False).append(SUBMITTED, job="job-a", fingerprint=FP_A, prediction_id=PID)

    assert path.read_bytes() == COMPLETE[0] + torn + b"\n" + encode(record)
    state = read_ledger(path)
    assert state.bad_lines == 1
    assert state.jobs[FP_A].status is JobStatus.IN_FLIGHT


@pytest.mark.parametrize("existing", [b"", COMPLETE[0]], ids=["empty", "ends_with_newline"])
def test_append_adds_no_blank_line_to_a_clean_file(
    tmp_path: Path, make_ledger: Callable[..., Ledger], existing: bytes
) -> None:
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(existing)
    record = make_ledger(fsync=False).append(RUN_STARTED)
    assert path.read_bytes() == existing + encode(record)


def test_append_after_a_failed_write_looks_at_the_tail_again(
    tmp_path: Path, make_ledger: Callable[..., Ledger], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ledger.jsonl"
    ledger = make_ledger()
    ledger.append(RUN_STARTED)

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OutputError):
        ledger.append(RUN_FINISHED)
    with path.open("ab") as file:  # what a write cut short by the full disk would have left
        file.write(b'{"ts":"20')
    monkeypatch.undo()

    ledger.append(SUBMITTING, job="job-a", fingerprint=FP_A)
    state = read_ledger(path)
    assert state.bad_lines == 1
    assert state.jobs[FP_A].status is JobStatus.IN_DOUBT


def test_append_of_a_field_that_is_not_json_writes_nothing(tmp_path: Path, make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger(fsync=False)
    with pytest.raises(TypeError):
        ledger.append(RUN_STARTED, when=object())
    assert (tmp_path / "ledger.jsonl").read_bytes() == b""


def _assert_one_line_output_error(exc: OutputError, path: Path) -> None:
    assert str(exc).startswith(f"cannot write ledger {path}: ")
    assert "\n" not in str(exc)
    assert exc.exit_code == 74
    assert isinstance(exc.__cause__, OSError)


def test_ledger_under_a_file_is_an_output_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(OutputError) as caught:
        Ledger(blocker / "ledger.jsonl")
    _assert_one_line_output_error(caught.value, blocker / "ledger.jsonl")


def test_full_disk_on_write_is_an_output_error(
    tmp_path: Path, make_ledger: Callable[..., Ledger], monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = make_ledger(fsync=False)

    def full_disk(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OutputError) as caught:
        ledger.append(RUN_STARTED)
    _assert_one_line_output_error(caught.value, tmp_path / "ledger.jsonl")
    assert os.strerror(errno.ENOSPC) in str(caught.value)


def test_failed_fsync_is_an_output_error(
    tmp_path: Path, make_ledger: Callable[..., Ledger], monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = make_ledger()

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OutputError) as caught:
        ledger.append(RUN_STARTED)
    _assert_one_line_output_error(caught.value, tmp_path / "ledger.jsonl")


def test_closed_ledger_refuses_appends_and_closes_twice(tmp_path: Path) -> None:
    with Ledger(tmp_path / "ledger.jsonl", fsync=False) as ledger:
        ledger.append(RUN_STARTED)
    ledger.close()
    with pytest.raises(ValueError, match="closed"):
        ledger.append(RUN_FINISHED)


# --- RequestLog ---------------------------------------------------------------------------------------------


@pytest.fixture
def clock() -> Clock:
    return Clock(1000.0)


@pytest.fixture
def request_log(tmp_path: Path, clock: Clock) -> Iterator[RequestLog]:
    log = RequestLog(tmp_path / "requests.log", clock=clock)
    yield log
    log.close()


def test_request_log_recent_keeps_the_window(request_log: RequestLog, clock: Clock) -> None:
    for when in (900.0, 939.5, 940.0, 990.0):
        request_log.record(when)
    request_log.record()  # now: 1000.0
    assert request_log.recent(60) == [940.0, 990.0, 1000.0]
    clock.now = 1050.0
    assert request_log.recent(60) == [990.0, 1000.0]


def test_request_log_of_a_missing_file_is_empty(tmp_path: Path, request_log: RequestLog) -> None:
    assert request_log.recent(60) == []
    request_log.compact(60)
    assert not (tmp_path / "requests.log").exists()


def test_request_log_tolerates_torn_and_garbage_lines(tmp_path: Path, request_log: RequestLog) -> None:
    (tmp_path / "requests.log").write_bytes(b"990.5\nabc\n\nnan\ninf\n\xff\n995.0\n99")
    request_log.record(998.0)  # must not glue itself to the torn "99"
    assert request_log.recent(60) == [990.5, 995.0, 998.0]


def test_request_log_keeps_times_just_ahead_of_the_clock(request_log: RequestLog) -> None:
    request_log.record(1000.5)  # within the tolerance: a clock's jitter, counted
    assert request_log.recent(60) == [1000.5]


def test_request_log_record_is_flushed_at_once(tmp_path: Path, request_log: RequestLog) -> None:
    request_log.record(999.25)
    assert (tmp_path / "requests.log").read_text() == "999.25\n"


def test_request_log_compact_keeps_only_recent_entries(tmp_path: Path, request_log: RequestLog, clock: Clock) -> None:
    path = tmp_path / "requests.log"
    for when in (100.0, 500.0, 950.0, 999.0):
        request_log.record(when)
    request_log.compact(60)
    assert path.read_text() == "950.0\n999.0\n"
    assert not path.with_name("requests.log.tmp").exists()
    request_log.record(1000.0)  # goes to the new file, not the replaced one
    assert path.read_text() == "950.0\n999.0\n1000.0\n"
    assert request_log.recent(60) == [950.0, 999.0, 1000.0]


def test_request_log_under_a_file_is_an_output_error(tmp_path: Path, clock: Clock) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    log = RequestLog(blocker / "requests.log", clock=clock)
    with pytest.raises(OutputError, match="cannot write request log") as caught:
        log.record()
    assert "\n" not in str(caught.value)


# --- properties -------------------------------------------------------------------------------------------

fingerprints = st.sampled_from([FP_A, FP_B, FP_C])
names = st.text(min_size=1, max_size=8)  # any Unicode, so cuts land inside multi-byte characters
times = st.floats(min_value=0, max_value=4e9, allow_nan=False)
money = st.floats(min_value=0, max_value=100, allow_nan=False)


@st.composite
def job_events(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(
        st.sampled_from([SUBMITTING, SUBMITTED, CREATE_FAILED, SUCCEEDED, FAILED, RESET, RECOVERED, NOT_CREATED])
    )
    fields: dict[str, Any] = {}
    if kind == SUBMITTING:
        fields["attempt"] = draw(st.integers(1, 5))
    elif kind in (SUBMITTED, RECOVERED):
        fields["prediction_id"] = draw(names)
    elif kind == CREATE_FAILED:
        fields = {"error": draw(names), "in_doubt": draw(st.booleans())}
    elif kind == SUCCEEDED:
        fields["file"] = draw(names)
    elif kind == FAILED:
        fields = {"error": draw(names), "retryable": draw(st.booleans())}
        if draw(st.booleans()):
            fields["error_code"] = draw(st.sampled_from(["PROVIDER_RATE_LIMIT", "INPUT_DOWNLOAD_ERROR"]))
    if kind in (SUCCEEDED, FAILED):
        for key, values in (("prediction_id", names), ("cost", money), ("duration", money)):
            if draw(st.booleans()):
                fields[key] = draw(values)
    return ev(kind, fp=draw(fingerprints), job=draw(names), at=draw(times), **fields)


other_events = st.one_of(
    st.builds(
        lambda sha, url, at: {"ts": iso(at), "event": UPLOADED, "sha256": sha, "public_url": url},
        st.sampled_from(["s1", "s2"]),
        names,
        times,
    ),
    st.builds(lambda name: {"ts": iso(T0), "event": name}, st.sampled_from([RUN_STARTED, RUN_FINISHED, "new"])),
)
events = st.lists(st.one_of(job_events(), job_events(), other_events), max_size=25)


@settings(max_examples=200, deadline=None)
@given(events=events, data=st.data())
def test_replay_of_a_ledger_cut_at_any_byte_equals_the_complete_lines_before_the_cut(
    events: list[dict[str, Any]], data: st.DataObject
) -> None:
    lines = [encode(e) for e in events]
    blob = b"".join(lines)
    cut = data.draw(st.integers(0, len(blob)), label="cut")

    complete: list[bytes] = []
    torn = False
    start = 0
    for line in lines:
        content_end = start + len(line) - 1  # without its newline
        if content_end <= cut:
            complete.append(line)
        elif start < cut:
            torn = True
        start += len(line)

    state = replay(io.BytesIO(blob[:cut]))
    assert_same_but_bad_lines(state, replay(complete), extra_bad=1 if torn else 0)


@dataclass(frozen=True)
class _Garbage:
    line: bytes


garbage_lines = st.builds(_Garbage, st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"") + b"\n"))
# Events of known names whose fields hold any JSON value: what a hand-edited ledger may contain.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=5,
)
ODD_FIELDS = [
    "ts",
    "prediction_id",
    "file",
    "error",
    "error_code",
    "retryable",
    "in_doubt",
    "cost",
    "duration",
]
ODD_FIELDS += ["sha256", "public_url", "attempt"]
odd_events = st.builds(
    lambda kind, fp, rest: {**rest, "event": kind, "job": "j", "fingerprint": fp},
    st.sampled_from([SUBMITTING, SUBMITTED, CREATE_FAILED, SUCCEEDED, FAILED, RESET, UPLOADED, RECOVERED, NOT_CREATED]),
    fingerprints,
    st.dictionaries(
        st.sampled_from(ODD_FIELDS),
        json_values,
    ),
)


@settings(max_examples=200, deadline=None)
@given(items=st.lists(st.one_of(job_events(), job_events(), other_events, odd_events, garbage_lines)))
def test_replay_of_any_events_keeps_its_invariants(items: list[dict[str, Any] | _Garbage]) -> None:
    state = replay(item.line if isinstance(item, _Garbage) else encode(item) for item in items)

    assert state.lost_answers == sum(job.lost_answers for job in state.jobs.values())
    assert state.recovered == sum(job.recovered for job in state.jobs.values())
    assert math.isfinite(state.spend)
    assert all(math.isfinite(d) for d in state.durations)
    for fingerprint, job in state.jobs.items():
        assert job.fingerprint == fingerprint
        assert job.attempts >= 0
        assert job.lost_answers >= 0
        assert isinstance(job.status, JobStatus)
        if job.status is JobStatus.IN_FLIGHT:
            assert job.prediction_id is not None
        if job.status is JobStatus.SUCCEEDED:
            assert job.file is not None
        if job.status is JobStatus.IN_DOUBT:
            assert job.doubt_open


def _isoformat_ms(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@settings(max_examples=2000)
@given(
    st.one_of(
        st.floats(min_value=0.0, max_value=4e9, allow_nan=False),
        # Halfway and near-boundary fractions, where rounding to the microsecond decides the millisecond or second.
        st.builds(
            lambda s, f: s + f,
            st.integers(min_value=0, max_value=4_000_000_000),
            st.sampled_from([0.0, 0.0005, 0.0009995, 0.9995, 0.9999995, 0.9999996, 0.5, 0.0000005, 0.1234565]),
        ),
    )
)
def test_an_events_time_stamp_is_written_as_datetime_writes_it_to_the_millisecond(epoch: float) -> None:
    assert ledger_module._format_ts(epoch) == _isoformat_ms(epoch)


def test_events_a_second_apart_get_each_their_own_second() -> None:
    base = 1_714_564_800.0  # 2024-05-01T12:00:00Z
    stamps = [ledger_module._format_ts(base + k * 0.4) for k in range(6)]
    assert stamps == [_isoformat_ms(base + k * 0.4) for k in range(6)]
    assert stamps[0] == "2024-05-01T12:00:00.000Z" and stamps[3] == "2024-05-01T12:00:01.200Z"
