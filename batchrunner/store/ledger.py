"""The append-only JSONL event log of a run, its pure replay into per-job state, and the request log.

``<output>/ledger.jsonl`` holds one JSON object per line. Each line is built whole, written with one ``write``
call, and fsynced before the runner acts on it, so a run killed at any instant (kill -9, power loss) leaves at
most one torn last line. Replay skips such lines (and any other garbage) and counts them in ``bad_lines``; the
next append starts on a fresh line so the fragment stays isolated.

Jobs are keyed by their fingerprint (sha256 of the full request), never by their position in the manifest, so
editing the manifest between runs neither loses nor confuses finished work.

Job events (each also carries ``ts``, ``event``, ``job`` and ``fingerprint``) and the state they lead to::

    submitting     {attempt, request_id}              -> IN_DOUBT   intent, written before the create is sent
    submitted      {prediction_id}                    -> IN_FLIGHT  the create's answer
    create_failed  {error, in_doubt}                  -> PENDING    a create that did not answer with an id
    recovered      {prediction_id}                    -> IN_FLIGHT  an in-doubt create did make this prediction
    not_created    {}                                 -> PENDING    an in-doubt create made nothing (listing searched)
    succeeded      {file, prediction_id?, cost?, duration?}   -> SUCCEEDED
    failed         {error, retryable, error_code?, prediction_id?, cost?, duration?, still_running?}
                                                      -> FAILED, attempts + 1
    reset          {}                                 attempts = 0; FAILED -> PENDING

``uploaded {sha256, public_url, file, id}`` records an uploaded input image (``id``: the API's file id, for a later
``DELETE /v1/files/{id}``); ``upload_deleted {sha256, id}`` records that ``clean-uploads`` deleted it, so a later run
uploads the image again instead of reusing a URL that now answers 404. ``run_started``, ``run_finished`` and any
event this version does not know are ignored, so an older runner can resume a newer runner's ledger.

A create whose answer never arrived (or was not a readable yes or no) may still have made a billed prediction:
such a job is *in doubt* (``doubt_open``: an intent with no answer, or a ``create_failed`` with ``in_doubt``)
until the account's listing settles it with ``recovered`` or ``not_created`` (see reconcile.py). A new
``submitting`` while a doubt is still open was sent without that settling (the listing failed, or an older
version wrote the ledger): it is counted in ``lost_answers``, the creates possibly paid twice. So is a ``submitting``
after a ``failed`` with ``still_running`` (a cancelled prediction given up while it may still run and be billed).

``RequestLog`` (``<output>/requests.log``) remembers when API requests were made, so a restarted run does not
burst past a rate window that the killed run partly used.

Both files are the output folder's own: opened without following a link, and only as regular files (``files.py``).
Reading holds one line of at most ``MAX_LINE`` bytes at a time (a longer one is a bad line), and the request log is
read from its tail only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from batchrunner.errors import OutputError
from batchrunner.store.files import MAX_LINE, BoundedLines, open_own, read_tail

__all__ = [
    "CREATE_FAILED",
    "FAILED",
    "NOT_CREATED",
    "RECOVERED",
    "RESET",
    "RUN_FINISHED",
    "RUN_STARTED",
    "SUBMITTED",
    "SUBMITTING",
    "SUCCEEDED",
    "UPLOADED",
    "UPLOAD_DELETED",
    "JobState",
    "JobStatus",
    "Ledger",
    "LedgerState",
    "RequestLog",
    "Upload",
    "parse_ts",
    "read_ledger",
    "replay",
]

SUBMITTING = "submitting"
SUBMITTED = "submitted"
CREATE_FAILED = "create_failed"
RECOVERED = "recovered"
NOT_CREATED = "not_created"
SUCCEEDED = "succeeded"
FAILED = "failed"
RESET = "reset"
UPLOADED = "uploaded"
UPLOAD_DELETED = "upload_deleted"
RUN_STARTED = "run_started"
RUN_FINISHED = "run_finished"

log = logging.getLogger("batchrunner")


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


def _format_ts(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
_JOB_EVENTS = frozenset({SUBMITTING, SUBMITTED, CREATE_FAILED, SUCCEEDED, FAILED, RESET, RECOVERED, NOT_CREATED})


def _apply(state: JobState, name: str, event: dict[str, Any]) -> None:
    """Apply one well-formed job event to its job. The order of the branches follows the usual frequency."""
    if name == SUBMITTING:
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
    elif name in (SUBMITTED, RECOVERED):
        state.status = JobStatus.IN_FLIGHT
        state.prediction_id = event["prediction_id"]
        state.submitted_at = _ts(event)
        state.doubt_at = None
        state.doubt_open = False
        if name == RECOVERED:
            state.recovered += 1
    elif name == NOT_CREATED:
        if state.status is JobStatus.IN_DOUBT:
            state.status = JobStatus.PENDING
        state.doubt_at = None
        state.doubt_open = False
    elif name == SUCCEEDED:
        state.status = JobStatus.SUCCEEDED
        state.file = event["file"]
        prediction_id = event.get("prediction_id")
        if type(prediction_id) is str:
            state.prediction_id = prediction_id
        state.cost = _number(event.get("cost"))
        state.finished_at = _ts(event)
        state.error = state.error_code = None
        state.doubt_open = state.still_running = False
    elif name == FAILED:
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
    elif name == CREATE_FAILED:
        state.status = JobStatus.PENDING
        state.prediction_id = None
        state.error = _text(event.get("error"))
        if event.get("in_doubt") is True:
            state.doubt_at = _ts(event)
            state.doubt_open = True
        else:
            state.doubt_at = None
            state.doubt_open = False
    elif name == RESET:
        state.attempts = 0
        if state.status is JobStatus.FAILED:
            state.status = JobStatus.PENDING


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


def replay(lines: Iterable[str | bytes]) -> LedgerState:
    """Fold ledger lines, in order, into the state they describe. Pure: no I/O, never raises on bad content.

    Lines that are not JSON objects are skipped and counted in ``bad_lines``; blank lines are skipped quietly.
    """
    jobs: dict[str, JobState] = {}
    uploads: dict[str, Upload] = {}
    durations: list[float] = []
    spend = 0.0
    bad_lines = 0
    predictions: set[str] = set()
    decode = _DECODER.raw_decode  # hoisted: this loop runs once per line, for hundreds of thousands of lines
    for line in lines:
        # raw_decode on the decoded text parses twice as fast as json.loads, which spends as long again in
        # Python-level encoding detection and whitespace regexes as in the C scanner.
        try:
            text = line if isinstance(line, str) else line.decode()
            event, end = decode(text)
            if end != len(text) and not text[end:].isspace():
                event = None  # trailing garbage after the object
        except (ValueError, RecursionError):  # ValueError covers bad JSON and bad UTF-8
            event = _parse_leniently(line)
        if type(event) is not dict:
            if event is not _BLANK:
                bad_lines += 1
            continue
        name = event.get("event")
        if name not in _JOB_EVENTS:
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
            continue
        fingerprint, job = event.get("fingerprint"), event.get("job")
        if type(fingerprint) is not str or type(job) is not str:
            continue
        required = _REQUIRED.get(name)
        if required is not None and type(event.get(required)) is not str:
            continue
        state = jobs.get(fingerprint)
        if state is None:
            state = jobs[fingerprint] = JobState(fingerprint, job)
        else:
            state.job = job  # the manifest may have renamed the job; the latest name is the one to report
        _apply(state, name, event)
        prediction_id = event.get("prediction_id")
        if type(prediction_id) is str:
            predictions.add(prediction_id)
        if name in (SUCCEEDED, FAILED):
            cost = _number(event.get("cost"))
            if cost is not None:
                spend += cost
            duration = _number(event.get("duration"))
            if duration is not None:
                durations.append(duration)
    lost_answers = recovered = 0
    for state in jobs.values():
        # A job still IN_DOUBT at the end (killed between sending a create and hearing back) is not yet a duplicate:
        # the next run settles it from the listing before it creates anything.
        lost_answers += state.lost_answers
        recovered += state.recovered
    return LedgerState(jobs, uploads, durations, spend, bad_lines, lost_answers, recovered, predictions)


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


def _open_append(path: Path) -> tuple[int, bool]:
    """Open ``path`` for appending (creating it); return the descriptor and whether it ends in a torn line."""
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0)
    fd = open_own(path, flags, 0o644)
    try:
        return fd, _ends_torn(fd)
    except BaseException:
        os.close(fd)
        raise


def _ends_torn(fd: int) -> bool:
    size = os.fstat(fd).st_size
    if size == 0:
        return False
    os.lseek(fd, size - 1, os.SEEK_SET)  # reads honour the offset; O_APPEND writes still go to the end
    return os.read(fd, 1) != b"\n"


def _write_all(fd: int, data: bytes) -> None:
    # One write call writes a whole line on any local file system; the loop only guards against a short write.
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(directory: Path) -> None:
    # A new file survives a power loss only once its directory entry is on disk too.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms that cannot open a directory (Windows) have no such thing to sync
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# The fields that carry messages from the API or the network, the only ones that could quote the key.
_FREE_TEXT = ("error",)


class Ledger:
    """Appends events to the ledger file, each one written whole before ``append`` returns and, by default, fsynced.

    A kill of the process loses nothing that was written (the kernel has it); fsync is for a power loss. An event
    appended with ``durable=False`` is made durable by the next ``commit()`` (or durable append, or close): one
    fsync, in a worker thread, serves every event written before it, so a run making hundreds of creates a second
    pays a few fsyncs, not five per job, and never blocks its event loop on the disk.

    ``clock`` gives the epoch time stamped on each event; ``fsync=False`` trades crash safety for speed.
    ``redact`` is applied to the free-text fields (the API's error messages), so no piece of the key they may quote
    is written. Any OSError becomes an OutputError carrying one line.
    """

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.time,
        fsync: bool = True,
        redact: Callable[[str], str] | None = None,
    ) -> None:
        self.path = path
        self._clock = clock
        self._fsync = fsync
        self._redact = redact
        self._fd: int | None = None
        self._torn: bool | None = None  # None: unknown, look at the file's last byte before the next write
        self._written = 0  # lines written so far
        self._synced = 0  # lines known to be on disk
        self._syncing: asyncio.Task[None] | None = None
        try:
            existed = path.exists()
            self._fd, self._torn = _open_append(path)
            if fsync and not existed:
                _fsync_dir(path.parent)
        except OSError as exc:
            raise self._error(exc) from exc

    def _error(self, exc: OSError) -> OutputError:
        return OutputError(f"cannot write ledger {self.path}: {exc.strerror or exc}")

    def append(self, event: str, /, *, durable: bool = True, **fields: Any) -> dict[str, Any]:
        """Write ``{"ts", "event", **fields}`` as one line (fsynced too unless ``durable=False``); return the record."""
        if self._fd is None:
            raise ValueError(f"ledger {self.path} is closed")
        record: dict[str, Any] = {"ts": _format_ts(self._clock()), "event": event, **fields}
        if self._redact is not None:
            # Only free text: ids and fingerprints are keys of the replay, and must stay as they were written.
            for name in _FREE_TEXT:
                if isinstance(record.get(name), str):
                    record[name] = self._redact(record[name])
        # Serialise before touching the file, so a field that is not JSON cannot leave half a line behind.
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        try:
            if self._torn is None:
                self._torn = _ends_torn(self._fd)
            if self._torn:
                line = b"\n" + line  # isolate an earlier torn fragment on its own (bad) line
            _write_all(self._fd, line)
            self._torn = False
            self._written += 1
            if self._fsync and durable:
                os.fsync(self._fd)
                self._synced = self._written
        except OSError as exc:
            self._torn = None  # a failed write may have left part of the line; look again before the next one
            raise self._error(exc) from exc
        return record

    async def commit(self) -> None:
        """Make every event written so far durable: one fsync in a worker thread, shared by every caller waiting."""
        if not self._fsync:
            return
        target = self._written
        while self._synced < target and self._fd is not None:
            if self._syncing is None:
                self._syncing = asyncio.get_running_loop().create_task(self._sync(self._fd, self._written))
            await asyncio.shield(self._syncing)

    async def _sync(self, fd: int, upto: int) -> None:
        try:
            await asyncio.to_thread(os.fsync, fd)
        except OSError as exc:
            raise self._error(exc) from exc
        finally:
            self._syncing = None
        self._synced = max(self._synced, upto)

    def close(self) -> None:
        """Make what was written durable and close the file; safe to call twice."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                if self._fsync and self._synced < self._written:
                    os.fsync(fd)
                    self._synced = self._written
            except OSError as exc:
                raise self._error(exc) from exc
            finally:
                os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# Request times ahead of the clock by more than this are no clock's jitter: the clock stepped back, or the file is
# corrupt. Counted, such a time would hold the window shut until it passed (forever, for 1e308).
FUTURE_TOLERANCE = 1.0
# A time as this runner writes it takes about 20 bytes: the tail read gives room for ``max_times`` of them.
_BYTES_PER_TIME = 32


class RequestLog:
    """When API requests were made: one epoch time per line, appended as each request goes out.

    Written without fsync: it only has to survive the process being killed (the kernel keeps what was
    written); after a reboot the rate window it protects has long passed. Read from its tail only: of the
    times in a window only the latest ``max_times`` (the window's count) can decide a delay.
    """

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time, max_times: int = 1000) -> None:
        self.path = path
        self._clock = clock
        self._max_bytes = max(1, max_times) * _BYTES_PER_TIME + 4096
        self._fd: int | None = None
        self._torn = False
        self._warned = False

    def _error(self, exc: OSError, verb: str = "write") -> OutputError:
        return OutputError(f"cannot {verb} request log {self.path}: {exc.strerror or exc}")

    def recent(self, period: float) -> list[float]:
        """The request times (epoch seconds, ascending) within the last ``period`` seconds.

        Torn or garbage lines are skipped. Times more than ``FUTURE_TOLERANCE`` ahead of the clock (a clock
        stepped back, a corrupt file) are dropped, with one warning per log: each would hold the rate window
        shut until it came.
        """
        now = self._clock()
        cutoff, latest = now - period, now + FUTURE_TOLERANCE
        times = self._read()
        ahead = sum(1 for when in times if when > latest)
        if ahead and not self._warned:
            self._warned = True
            log.warning(
                "%s: ignoring %d request time%s later than now (the clock stepped back, or the file is corrupt)",
                self.path,
                ahead,
                "" if ahead == 1 else "s",
            )
        return [when for when in times if cutoff <= when <= latest]

    def _read(self) -> list[float]:
        try:
            fd = open_own(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise self._error(exc, "read") from exc
        try:
            data = read_tail(fd, self._max_bytes)
        except OSError as exc:
            raise self._error(exc, "read") from exc
        finally:
            os.close(fd)
        times: list[float] = []
        for raw in data.split(b"\n"):
            if len(raw) > 64:
                continue  # no time is written this long; float() of a huge digit string is slow
            try:
                when = float(raw)
            except ValueError:
                continue
            if math.isfinite(when):
                times.append(when)
        times.sort()
        return times

    def record(self, when: float | None = None) -> None:
        """Append a request time (default: now) and hand it to the kernel at once."""
        line = f"{float(self._clock() if when is None else when)!r}\n".encode()
        try:
            if self._fd is None:
                self._fd, self._torn = _open_append(self.path)
            _write_all(self._fd, b"\n" + line if self._torn else line)
            self._torn = False
        except OSError as exc:
            self.close()  # reopen, and look at the tail again, on the next record
            raise self._error(exc) from exc

    def compact(self, period: float) -> None:
        """Rewrite the file atomically, keeping only the times within the last ``period`` seconds."""
        keep = self.recent(period)
        self.close()  # the open descriptor would keep appending to the replaced file
        if not keep and not os.path.lexists(self.path):
            return
        # A fresh name, created exclusively and not through a link: nothing but this file is written.
        tmp = self.path.with_name(f"{self.path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            try:
                _write_all(fd, "".join(f"{when!r}\n" for when in keep).encode())
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise self._error(exc) from exc

    def close(self) -> None:
        """Close the file; safe to call twice. A later ``record`` opens it again."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
