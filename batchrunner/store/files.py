"""The output folder's own files: opened without following symbolic links, refused unless regular, read within bounds.

Every file the runner keeps in the output folder (the ledger, the request log, the lock, the partial-download area,
the schema cache) is opened here with ``O_NOFOLLOW``: a link planted in the folder, or a special file where a regular
one belongs, ends the run with one line (``OutputError``, exit 74) instead of writing to, deleting in or reading
forever from what it points to. The folder itself may be a link: the user named it, and the runner goes where it
leads.

Reads are bounded: a line of at most ``MAX_LINE`` bytes is held in memory at a time, a tail or a small file at most a
given number of bytes. Opening uses ``O_NONBLOCK`` so that a named pipe cannot hang the open; the flag is cleared on
the regular files that pass.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from batchrunner.errors import OutputError

__all__ = [
    "MAX_LINE",
    "BoundedLines",
    "check_own",
    "describe_kind",
    "ends_torn",
    "fsync_dir",
    "open_append",
    "open_own",
    "read_small",
    "read_tail",
    "write_all",
]

# A ledger line is a few hundred bytes; one of a mebibyte is garbage however it came about.
MAX_LINE = 1 << 20
_CHUNK = 1 << 16
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# What open(O_NOFOLLOW) says of a link: ELOOP on Linux and macOS, EMLINK on FreeBSD.
_LINK_ERRNOS = frozenset({errno.ELOOP, errno.EMLINK})


def describe_kind(mode: int) -> str:
    """What a file of this ``st_mode`` is, in words."""
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISREG(mode):
        return "a regular file"
    return "a special file"


def _refusal(path: Path, mode: int, expected: str) -> OutputError:
    if stat.S_ISLNK(mode):
        return OutputError(f"{path} is a symbolic link: refusing to follow it")
    return OutputError(f"{path} is {describe_kind(mode)}, not {expected}: refusing it")


def check_own(path: Path, *, directory: bool = False) -> bool:
    """Whether ``path`` exists as the folder's own regular file (or directory); False when it does not exist.

    Raises OutputError, one line, for a link or for anything else in its place. For paths the runner hands to code
    that opens them itself; a file the runner opens goes through ``open_own``, which has no gap between look and open.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    ok = stat.S_ISDIR(mode) if directory else stat.S_ISREG(mode)
    if not ok:
        raise _refusal(path, mode, "a directory" if directory else "a regular file")
    return True


def open_own(path: Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` of one of the folder's own files: never through a link, and only a regular file.

    Raises OutputError, one line naming ``path``, for a link or a special file (a device, a pipe, a socket, a
    directory); any other OSError (missing, permissions, disk full) propagates for the caller to word.
    """
    try:
        fd = os.open(path, flags | _NOFOLLOW | _NONBLOCK | _CLOEXEC, mode)
    except OSError as exc:
        # A link (ELOOP), a pipe without a reader (ENXIO), a directory (EISDIR): say what is there, if anything.
        try:
            found = os.lstat(path).st_mode
        except OSError:
            raise exc from None
        if stat.S_ISLNK(found) or not stat.S_ISREG(found) or exc.errno in _LINK_ERRNOS:
            raise _refusal(path, found, "a regular file") from None
        raise
    try:
        found = os.fstat(fd).st_mode
        if not stat.S_ISREG(found):
            raise _refusal(path, found, "a regular file")
        if _NONBLOCK:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_tail(fd: int, limit: int) -> bytes:
    """The whole lines among the last ``limit`` bytes of the open file ``fd`` (the last one may lack its newline)."""
    size = os.fstat(fd).st_size
    start = max(0, size - limit)
    chunks: list[bytes] = []
    got = 0
    while got < limit:
        chunk = os.pread(fd, min(_CHUNK, limit - got), start + got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    data = b"".join(chunks)
    if start > 0 and os.pread(fd, 1, start - 1) != b"\n":
        # The read began inside a line: what precedes the first newline is a fragment, not a line.
        cut = data.find(b"\n")
        data = b"" if cut < 0 else data[cut + 1 :]
    return data


def read_small(fd: int, limit: int) -> bytes | None:
    """The whole content of the open file ``fd`` from its start, or None when it holds more than ``limit`` bytes."""
    chunks: list[bytes] = []
    got = 0
    while got <= limit:
        chunk = os.pread(fd, min(_CHUNK, limit + 1 - got), got)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        got += len(chunk)
    return None


class BoundedLines:
    """The lines of a binary file, each at most ``max_line`` bytes (its newline included), one in memory at a time.

    A longer line is skipped whole, however long, and counted in ``overlong``: to the reader it is garbage, like a
    torn line. Lines are yielded with their newline, as iterating over a file would; the last may lack one.
    """

    def __init__(self, source: BinaryIO, max_line: int = MAX_LINE) -> None:
        self._source = source
        self._max = max_line
        self.overlong = 0

    def __iter__(self) -> Iterator[bytes]:
        pending = b""
        skipping = False  # inside an overlong line: drop bytes until its newline
        read = self._source.read
        while chunk := read(_CHUNK):
            start = 0
            while True:
                end = chunk.find(b"\n", start)
                if end < 0:
                    break
                if skipping:
                    skipping = False
                elif len(pending) + end + 1 - start > self._max:
                    self.overlong += 1
                else:
                    yield pending + chunk[start : end + 1]
                pending = b""
                start = end + 1
            if not skipping:
                pending += chunk[start:]
                if len(pending) > self._max:
                    self.overlong += 1
                    pending = b""
                    skipping = True
        if pending and not skipping:
            yield pending


def open_append(path: Path) -> tuple[int, bool]:
    """Open ``path`` (the output folder's own) for appending, creating it; the descriptor, and whether it ends in a
    torn line (one a later append must start after a newline of its own)."""
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0)
    fd = open_own(path, flags, 0o644)
    try:
        return fd, ends_torn(fd)
    except BaseException:
        os.close(fd)
        raise


def ends_torn(fd: int) -> bool:
    """Whether the file ``fd`` is non-empty and does not end in a newline (a killed writer left a fragment)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return False
    os.lseek(fd, size - 1, os.SEEK_SET)  # reads honour the offset; O_APPEND writes still go to the end
    return os.read(fd, 1) != b"\n"


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd``."""
    # One write call writes a whole line on any local file system; the loop only guards against a short write.
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def fsync_dir(directory: Path) -> None:
    """Sync ``directory`` itself, where the platform can."""
    # A new file survives a power loss only once its directory entry is on disk too.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms that cannot open a directory (Windows) have no such thing to sync
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
