"""The request log: when API requests were made, so a restarted run does not burst past a rate window that the
killed run partly used.

``<output>/requests.log`` is the output folder's own file (``files.py``): opened without following a link, only as a
regular file, and read from its tail only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from batchrunner.errors import OutputError
from batchrunner.store.files import open_append, open_own, read_tail, write_all

__all__ = ["FUTURE_TOLERANCE", "RequestLog"]

log = logging.getLogger("batchrunner")

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
                self._fd, self._torn = open_append(self.path)
            write_all(self._fd, b"\n" + line if self._torn else line)
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
                write_all(fd, "".join(f"{when!r}\n" for when in keep).encode())
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
