"""The pure replay of a ledger into per-job state, and the streaming read of a ledger file.

A run killed mid-write leaves at most one torn last line (see ``ledger.py``): replay skips such lines (and any
other garbage) and counts them in ``bad_lines``.

A create whose answer never arrived (or was not a readable yes or no) may still have made a billed prediction:
such a job is *in doubt* (``doubt_open``: an intent with no answer, or a ``create_failed`` with ``in_doubt``)
until the account's listing settles it with ``recovered`` or ``not_created`` (see reconcile.py). A new
``submitting`` while a doubt is still open was sent without that settling (the listing failed, or an older
version wrote the ledger): it is counted in ``lost_answers``, the creates possibly paid twice. So is a ``submitting``
after a ``failed`` with ``still_running`` (a cancelled prediction given up while it may still run and be billed).

Reading holds one line of at most ``MAX_LINE`` bytes at a time (a longer one is a bad line), and opens the file as
the output folder's own (``files.py``): without following a link, and only as a regular file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from batchrunner.errors import OutputError
from batchrunner.store.events import (
    CREATE_FAILED,
    FAILED,
    JOB_EVENTS,
    NOT_CREATED,
    RECOVERED,
    RESET,
    SUBMITTED,
    SUBMITTING,
    SUCCEEDED,
    UPLOAD_DELETED,
    UPLOADED,
)
from batchrunner.store.files import MAX_LINE, BoundedLines, open_own

__all__ = ["JobState", "JobStatus", "LedgerState", "Upload", "parse_ts", "read_ledger", "replay"]


class JobStatus(StrEnum):
    """Where a job stands after replaying the ledger. A str: ``str(status)`` and JSON give its value."""

    PENDING = "pending"  # nothing sent, or the last create failed without a prediction
    IN_DOUBT = "in_doubt"  # a create was (maybe) sent and its answer never arrived
    IN_FLIGHT = "in_flight"  # a prediction exists; poll it
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(slots=True)
class JobState:
    """The replayed state of one job. Mutable because replay updates it in place, event by event."""

    fingerprint: str
    job: str
    status: JobStatus = JobStatus.PENDING
    prediction_id: str | None = None
    attempts: int = 0  # failed predictions so far
    lost_answers: int = 0  # creates sent again while an earlier one was in doubt: possibly paid twice
    recovered: int = 0  # in-doubt creates whose prediction the listing found and adopted
    retryable: bool = True
    error: str | None = None
    error_code: str | None = None
    file: str | None = None
    cost: float | None = None
    submitted_at: float | None = None  # epoch seconds of the `submitted` event
    finished_at: float | None = None  # epoch seconds of the `succeeded`/`failed` event
    # Epoch seconds of the latest create whose answer may be lost (an intent with no answer yet, or one answered by a
    # dropped connection): such a prediction may be running, so a resumed run holds an in-flight slot for it a while.
    doubt_at: float | None = None
    intent_at: float | None = None  # epoch seconds of the latest `submitting`: when its create was sent
    doubt_open: bool = False  # a create in doubt that no `recovered`/`not_created`/answer has settled
    # The last attempt's prediction was given up after a cancel while it may still run (`failed` with
    # `still_running`): the next `submitting` is possibly paid twice.
    still_running: bool = False


@dataclass(frozen=True, slots=True)
class Upload:
    """An input image already uploaded; ``uploaded_at`` in epoch seconds tells whether it has expired."""

    sha256: str
    public_url: str
    uploaded_at: float
    id: str | None = None  # the API's file id (ledgers before clean-uploads did not record it)
    file: str | None = None  # the local file's name, for people


@dataclass(slots=True)
class LedgerState:
    """Everything a ledger replays to."""

    jobs: dict[str, JobState] = field(default_factory=dict)  # by fingerprint
    uploads: dict[str, Upload] = field(default_factory=dict)  # by sha256, latest wins
    durations: list[float] = field(default_factory=list)  # prediction durations (s), in ledger order
    spend: float = 0.0  # sum of `cost` over succeeded and failed events
    bad_lines: int = 0  # unparsable lines (torn tail, garbage), skipped
    lost_answers: int = 0  # total over jobs
    recovered: int = 0  # total over jobs
    predictions: set[str] = field(default_factory=set)  # every prediction id the ledger names

    def in_doubt(self) -> list[JobState]:
        """The jobs whose last create may have made a prediction nobody has settled: reconcile before creating."""
        return [state for state in self.jobs.values() if state.doubt_open]

    def in_flight(self) -> list[JobState]:
        """The jobs with a prediction that was created and has not finished: the ones to poll on resume."""
        return [state for state in self.jobs.values() if state.status is JobStatus.IN_FLIGHT]


def parse_ts(value: str) -> float:
    """Parse an ISO 8601 time (``2024-05-01T12:00:00.123Z``) into epoch seconds; no zone means UTC.

    Raises ValueError when ``value`` is not such a time.
    """
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _ts(event: dict[str, Any]) -> float | None:
    # A ledger edited by hand or written by a future version may carry anything here: never stop a replay.
    value = event.get("ts")
    if type(value) is not str:
        return None
    try:
        return parse_ts(value)
    except (ValueError, OverflowError):
        return None


_MAX_INT = 2**1023


def _number(value: Any) -> float | None:
    # Exact type checks: bool is an int subclass, and a `true` cost is garbage, not 1.0. JSON also reads
    # Infinity, NaN and integers too large for a float: garbage too, and they would poison the sums.
    if type(value) is int:
        value = float(value) if -_MAX_INT < value < _MAX_INT else None
    return value if type(value) is float and math.isfinite(value) else None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


# Fields an event cannot do without: a `submitted` without its prediction id, or a `succeeded` without its
# file, would break the invariants the scheduler relies on (IN_FLIGHT has an id, SUCCEEDED has a file).
_REQUIRED = {SUBMITTED: "prediction_id", SUCCEEDED: "file", RECOVERED: "prediction_id"}


def _submitting(state: JobState, event: dict[str, Any]) -> None:
    if state.doubt_open:
        # A new intent while the last create is still in doubt: sent without knowing, possibly paid twice.
        state.lost_answers += 1
    if state.still_running:
        # A new intent while the cancelled prediction of the last attempt may still run: possibly paid twice.
        state.lost_answers += 1
        state.still_running = False
    state.status = JobStatus.IN_DOUBT
    state.doubt_at = state.intent_at = _ts(event)
    state.doubt_open = True
    # A new create abandons any earlier prediction; its id must not be polled as this attempt's.
    state.prediction_id = None


def _submitted(state: JobState, event: dict[str, Any]) -> None:
    state.status = JobStatus.IN_FLIGHT
    state.prediction_id = event["prediction_id"]
    state.submitted_at = _ts(event)
    state.doubt_at = None
    state.doubt_open = False


def _recovered(state: JobState, event: dict[str, Any]) -> None:
    _submitted(state, event)
    state.recovered += 1


def _not_created(state: JobState, event: dict[str, Any]) -> None:
    if state.status is JobStatus.IN_DOUBT:
        state.status = JobStatus.PENDING
    state.doubt_at = None
    state.doubt_open = False


def _succeeded(state: JobState, event: dict[str, Any]) -> None:
    state.status = JobStatus.SUCCEEDED
    state.file = event["file"]
    prediction_id = event.get("prediction_id")
    if type(prediction_id) is str:
        state.prediction_id = prediction_id
    state.cost = _number(event.get("cost"))
    state.finished_at = _ts(event)
    state.error = state.error_code = None
    state.doubt_open = state.still_running = False


def _failed(state: JobState, event: dict[str, Any]) -> None:
    state.status = JobStatus.FAILED
    state.attempts += 1
    state.error = _text(event.get("error"))
    state.error_code = _text(event.get("error_code"))
    # Without a word from the writer, assume the failure is permanent rather than pay for repeats.
    state.retryable = event.get("retryable") is True
    state.prediction_id = None
    state.finished_at = _ts(event)
    state.doubt_at = None
    state.doubt_open = False
    state.still_running = event.get("still_running") is True


def _create_failed(state: JobState, event: dict[str, Any]) -> None:
    state.status = JobStatus.PENDING
    state.prediction_id = None
    state.error = _text(event.get("error"))
    if event.get("in_doubt") is True:
        state.doubt_at = _ts(event)
        state.doubt_open = True
    else:
        state.doubt_at = None
        state.doubt_open = False


def _reset(state: JobState, event: dict[str, Any]) -> None:
    state.attempts = 0
    if state.status is JobStatus.FAILED:
        state.status = JobStatus.PENDING


# What each well-formed job event does to its job (one function per event, as the table in events.py reads).
_APPLY: dict[str, Callable[[JobState, dict[str, Any]], None]] = {
    SUBMITTING: _submitting,
    SUBMITTED: _submitted,
    RECOVERED: _recovered,
    NOT_CREATED: _not_created,
    SUCCEEDED: _succeeded,
    FAILED: _failed,
    CREATE_FAILED: _create_failed,
    RESET: _reset,
}


_DECODER = json.JSONDecoder()
_BLANK = object()


def _parse_leniently(line: str | bytes) -> Any:
    """What json.loads makes of a line the fast path refused (leading space, BOM), ``_BLANK`` or None."""
    if not line.strip():
        return _BLANK
    try:
        return json.loads(line)
    except (ValueError, RecursionError):
        return None


def _decode(line: str | bytes, decode: Callable[[str], tuple[Any, int]]) -> Any:
    """What a line holds: usually a dict; None for garbage, ``_BLANK`` for a blank line."""
    # raw_decode on the decoded text parses twice as fast as json.loads, which spends as long again in
    # Python-level encoding detection and whitespace regexes as in the C scanner.
    try:
        text = line if isinstance(line, str) else line.decode()
        event, end = decode(text)
        if end != len(text) and not text[end:].isspace():
            return None  # trailing garbage after the object
        return event
    except (ValueError, RecursionError):  # ValueError covers bad JSON and bad UTF-8
        return _parse_leniently(line)


def _fold_job_event(ledger: LedgerState, name: str, event: dict[str, Any]) -> None:
    """Apply one job event to its job, and to the ledger's totals; a malformed one is skipped."""
    fingerprint, job = event.get("fingerprint"), event.get("job")
    if type(fingerprint) is not str or type(job) is not str:
        return
    required = _REQUIRED.get(name)
    if required is not None and type(event.get(required)) is not str:
        return
    state = ledger.jobs.get(fingerprint)
    if state is None:
        state = ledger.jobs[fingerprint] = JobState(fingerprint, job)
    else:
        state.job = job  # the manifest may have renamed the job; the latest name is the one to report
    _APPLY[name](state, event)
    prediction_id = event.get("prediction_id")
    if type(prediction_id) is str:
        ledger.predictions.add(prediction_id)
    if name in (SUCCEEDED, FAILED):
        cost = _number(event.get("cost"))
        if cost is not None:
            ledger.spend += cost
        duration = _number(event.get("duration"))
        if duration is not None:
            ledger.durations.append(duration)


def _fold_upload_event(uploads: dict[str, Upload], name: object, event: dict[str, Any]) -> None:
    """Record an ``uploaded`` or ``upload_deleted`` event; any other event is ignored."""
    if name == UPLOADED:
        sha256, url = event.get("sha256"), event.get("public_url")
        if type(sha256) is str and type(url) is str:
            file_id, file = event.get("id"), event.get("file")
            # No usable ts: treat the upload as ancient, so it is uploaded again rather than trusted.
            uploads[sha256] = Upload(
                sha256,
                url,
                _ts(event) or 0.0,
                file_id if type(file_id) is str else None,
                file if type(file) is str else None,
            )
    elif name == UPLOAD_DELETED:
        sha256, file_id = event.get("sha256"), event.get("id")
        found = uploads.get(sha256) if type(sha256) is str else None
        # Only the upload deleted: a newer upload of the same image (another id) stays usable.
        if found is not None and found.id == file_id:
            del uploads[found.sha256]


def replay(lines: Iterable[str | bytes]) -> LedgerState:
    """Fold ledger lines, in order, into the state they describe. Pure: no I/O, never raises on bad content.

    Lines that are not JSON objects are skipped and counted in ``bad_lines``; blank lines are skipped quietly.
    """
    ledger = LedgerState()
    decode = _DECODER.raw_decode  # hoisted: this loop runs once per line, for hundreds of thousands of lines
    for line in lines:
        event = _decode(line, decode)
        if type(event) is not dict:
            if event is not _BLANK:
                ledger.bad_lines += 1
            continue
        name = event.get("event")
        if name in JOB_EVENTS:
            _fold_job_event(ledger, name, event)
        else:
            _fold_upload_event(ledger.uploads, name, event)
    for state in ledger.jobs.values():
        # A job still IN_DOUBT at the end (killed between sending a create and hearing back) is not yet a duplicate:
        # the next run settles it from the listing before it creates anything.
        ledger.lost_answers += state.lost_answers
        ledger.recovered += state.recovered
    return ledger


def read_ledger(path: Path, *, max_line: int = MAX_LINE) -> LedgerState:
    """Replay the ledger at ``path``, streaming it line by line; a missing file is an empty ledger.

    A line longer than ``max_line`` bytes is skipped and counted in ``bad_lines``; no more than one line is held in
    memory. A link or a special file in the ledger's place is an OutputError, never followed or read.
    """
    try:
        fd = open_own(path, os.O_RDONLY)
    except FileNotFoundError:
        return LedgerState()
    except OSError as exc:
        raise OutputError(f"cannot read ledger {path}: {exc.strerror or exc}") from exc
    try:
        # Binary: lines split on b"\n" only, and bytes that are not UTF-8 make a bad line, not an error.
        with os.fdopen(fd, "rb") as source:
            lines = BoundedLines(source, max_line)
            state = replay(lines)
    except OSError as exc:
        raise OutputError(f"cannot read ledger {path}: {exc.strerror or exc}") from exc
    state.bad_lines += lines.overlong
    return state
