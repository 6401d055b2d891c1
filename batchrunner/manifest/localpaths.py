"""Local files a manifest names, judged by ``lstat``/``stat`` before anything opens, reads or hashes them.

A manifest's ``input_image`` may name any path, and what is at that path may be hostile or a slip: a link that points
at itself (a loop), a link to nothing, a directory, a named pipe (opening it waits for a writer forever), a socket, a
device (``/dev/zero`` reads without end), or a sparse file of 20 GB (hashing it reads 20 GB of zeros). Each is
refused from what ``lstat`` and ``stat`` say of it, with a one-line reason, before a byte is read:
:func:`local_file_problem` is that judgement. The kinds and sizes are judged by the pure :func:`stat_problem`.

Decisions:

- **A link to a regular file is followed**: the user chose it (an image library of links is common). Its target is
  judged like any file, and the reason names the link when the target is what is wrong.
- **The size limit is the API's upload limit** (100 MB, ``storage/upload-file.mdx``): a larger file could not be
  uploaded, so it is refused before it is hashed. An empty file is refused too: it is never an image.
- **Reading re-checks what was judged.** :func:`open_local` opens without blocking (a FIFO put in the file's place
  after the check cannot hang the run), checks the open file is still a regular file within the limit, and
  :func:`read_local` and :func:`sha256_local` stop reading past the limit should it grow meanwhile.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import BinaryIO

from batchrunner.errors import InputImageError, UsageError

__all__ = [
    "MAX_UPLOAD_BYTES",
    "NO_SUCH_FILE",
    "LocalFileRefused",
    "LocalPathError",
    "local_file_problem",
    "open_local",
    "read_local",
    "sha256_local",
    "shown_name",
    "size_text",
    "stat_problem",
]

MAX_UPLOAD_BYTES = 100 * 1024 * 1024
NO_SUCH_FILE = "no such file"

_MB = 1024 * 1024
_CHUNK = 1024 * 1024
_SHOWN_CHARS = 200
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


class LocalFileRefused(OSError):
    """A local file refused when it was opened or read (its kind or size changed since it was judged).

    An OSError, so code that already turns a failed read into one line does so for this too; ``reason`` is the line.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(errno.EINVAL, reason)
        self.reason = reason


def size_text(n: int) -> str:
    """A byte count for people: ``20 GB``, ``3.2 MB``, ``12.5 KB``, ``17 bytes``."""
    for unit, scale in (("GB", 1024 * _MB), ("MB", _MB), ("KB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f}".removesuffix(".0") + f" {unit}"
    return f"{n} bytes"


def stat_problem(st: os.stat_result, *, max_bytes: int = MAX_UPLOAD_BYTES) -> str | None:
    """Why a file with this ``stat`` cannot be an input image (its kind, or its size), or None. Pure."""
    mode = st.st_mode
    for test, kind in _KINDS:
        if test(mode):
            return f"is {kind}, not an image file"
    if not stat.S_ISREG(mode):
        return "is not a regular file"
    if st.st_size == 0:
        return "is empty"
    if st.st_size > max_bytes:
        return f"is {size_text(st.st_size)}; the API takes at most {size_text(max_bytes)}"
    return None


def local_file_problem(path: Path, *, max_bytes: int = MAX_UPLOAD_BYTES) -> str | None:
    """Why ``path`` cannot be read as an input image, in one line, or None when it is a readable regular file.

    ``lstat`` first: a link is followed only to judge its target with ``stat`` (a loop, or a link to nothing, is named
    as such). Kind and size are judged before the file is opened; only a regular file within ``max_bytes`` is opened,
    without blocking and without reading, to learn whether it may be read at all.
    """
    if "\x00" in str(path):
        return "contains a NUL character, which no file name can hold"
    try:
        lst = os.lstat(path)
    except OSError as exc:
        return _os_reason(exc)
    st = lst
    via = ""
    if stat.S_ISLNK(lst.st_mode):
        target = _readlink(path)
        try:
            st = os.stat(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return "is a symbolic link loop (following it never ends)"
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return f"is a dangling link: it points to {target}, which does not exist"
            return f"is a link to {target}, which {_os_reason(exc)}"
        via = f"is a link to {target}, which "
    problem = stat_problem(st, max_bytes=max_bytes)
    if problem is not None:
        return via + problem if via else problem
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        return _os_reason(exc)
    try:
        now = os.fstat(fd)
    finally:
        os.close(fd)
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        return "changed while it was being checked; try again"
    return None


def open_local(path: Path, *, max_bytes: int = MAX_UPLOAD_BYTES) -> BinaryIO:
    """Open a local input file for reading: never blocks, and refuses (LocalFileRefused) anything but a regular file
    within ``max_bytes``, judged on the open file itself. Other failures raise OSError as ``open`` would."""
    if "\x00" in str(path):
        raise LocalFileRefused("contains a NUL character, which no file name can hold")
    fd = os.open(path, _OPEN_FLAGS)
    try:
        problem = stat_problem(os.fstat(fd), max_bytes=max_bytes)
        if problem is not None:
            raise LocalFileRefused(problem)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_local(path: Path, *, max_bytes: int = MAX_UPLOAD_BYTES) -> bytes:
    """The bytes of a local input file (see :func:`open_local`), never more than ``max_bytes`` of them."""
    with open_local(path, max_bytes=max_bytes) as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise LocalFileRefused(f"grew past {size_text(max_bytes)} while it was being read")
    return data


def sha256_local(path: Path, *, max_bytes: int = MAX_UPLOAD_BYTES) -> str:
    """Hex sha256 of a local input file, read in chunks; refused should it grow past ``max_bytes`` while read."""
    digest = hashlib.sha256()
    total = 0
    with open_local(path, max_bytes=max_bytes) as fh:
        while chunk := fh.read(_CHUNK):
            total += len(chunk)
            if total > max_bytes:
                raise LocalFileRefused(f"grew past {size_text(max_bytes)} while it was being read")
            digest.update(chunk)
    return digest.hexdigest()


def _readlink(path: Path) -> str:
    try:
        return repr(os.readlink(path))
    except OSError:
        return "somewhere unreadable"


def _os_reason(exc: OSError) -> str:
    """``lstat``/``stat``/``open`` failures in words: what is wrong with the path, not Python's message."""
    code = exc.errno
    if code in (errno.ENOENT, errno.ENOTDIR):
        return NO_SUCH_FILE
    if code in (errno.EACCES, errno.EPERM):
        return "cannot read: permission denied"
    if code == errno.ELOOP:
        return "leads through a symbolic link loop"
    if code == errno.ENAMETOOLONG:
        return "has a name too long for the file system"
    text = (exc.strerror or type(exc).__name__).lower()
    return f"cannot read: {text}"


class LocalPathError(InputImageError):
    """A local ``input_image`` refused for what is at its path, located like a ManifestError: the manifest's file and
    line, the first job using it (and how many more), the field, the path as written and why."""

    def __init__(
        self, reason: str, *, written: str, jobs: tuple[str, ...], manifest: Path | str, line: int | None
    ) -> None:
        self.file = written
        self.jobs = jobs
        self.manifest = str(manifest)
        self.line = line
        self.reason = reason
        where = self.manifest if line is None else f"{self.manifest}:{line}"
        job = f" job {jobs[0]!r}:" if jobs else ""
        others = jobs[1:]
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        also = f" (also used by {shown})" if others else ""
        UsageError.__init__(self, f"{where}:{job} field 'input_image': {shown_name(written)}: {reason}{also}")


def shown_name(text: str | Path) -> str:
    """A file name for a one-line message: as it is when printable and short, else quoted (newlines escaped)."""
    text = str(text)
    return text if text.isprintable() and len(text) <= _SHOWN_CHARS else repr(text[:_SHOWN_CHARS])
