"""The append-only JSONL event log of a run: the writer, its group fsync.

``<output>/ledger.jsonl`` holds one JSON object per line. Each line is built whole, written with one ``write``
call, and fsynced before the runner acts on it, so a run killed at any instant (kill -9, power loss) leaves at
most one torn last line. Replay skips such lines (and any other garbage) and counts them in ``bad_lines``; the
next append starts on a fresh line so the fragment stays isolated.

The events and what they carry are ``events.py``; their replay into per-job state is ``replay.py``; the request log
is ``requestlog.py``. Their names are also exported here, where the runner and the views import them from.

The ledger is the output folder's own file: opened without following a link, and only as a regular file
(``files.py``).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from batchrunner.errors import OutputError
from batchrunner.store.events import (
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
    UPLOAD_DELETED,
    UPLOADED,
)
from batchrunner.store.files import ends_torn, fsync_dir, open_append, write_all
from batchrunner.store.replay import JobState, JobStatus, LedgerState, Upload, parse_ts, read_ledger, replay
from batchrunner.store.requestlog import FUTURE_TOLERANCE, RequestLog

__all__ = [
    "CREATE_FAILED",
    "FAILED",
    "FUTURE_TOLERANCE",
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


def _format_ts(epoch: float) -> str:
    """``epoch`` as RFC 3339 UTC to the millisecond (``2024-05-01T12:00:00.123Z``), exactly as
    ``datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")`` writes it (rounded to the microsecond
    half to even, then cut to the millisecond), at a third of its cost: every event of a run is stamped (30,000 at 100x
    the limits), and the text of the second changes once a second."""
    frac, whole = math.modf(epoch)
    micros = round(frac * 1e6)
    if micros >= 1_000_000:
        micros -= 1_000_000
        whole += 1.0
    elif micros < 0:
        micros += 1_000_000
        whole -= 1.0
    second = int(whole)
    head = _SECOND_TEXT.get(second)
    if head is None:
        head = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _SECOND_TEXT.clear()  # one entry: events come in time order
        _SECOND_TEXT[second] = head
    return f"{head}.{micros // 1000:03d}Z"


_SECOND_TEXT: dict[int, str] = {}


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
            self._fd, self._torn = open_append(path)
            if fsync and not existed:
                fsync_dir(path.parent)
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
                self._torn = ends_torn(self._fd)
            if self._torn:
                line = b"\n" + line  # isolate an earlier torn fragment on its own (bad) line
            write_all(self._fd, line)
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
