"""The output folder: the run lock, atomic image files, and the checks that keep files inside the folder.

Disk errors are translated to ``OutputError`` here, so a full disk or a read-only folder ends the run with one line and
a ledger that the next run reads. The folder's own files are opened through ``files.open_own``: a symbolic link or a
special file in the place of the lock or the partial-download area is refused, never followed. An image is renamed
into place, which replaces whatever link may have held its name and never writes through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import io
import itertools
import json
import os
import secrets
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

from PIL import Image, UnidentifiedImageError

from batchrunner.errors import DownloadRejected, LockHeld, OutputError
from batchrunner.manifest.localpaths import read_local
from batchrunner.store.files import check_own, open_own, read_small
from batchrunner.store.groupsync import GroupSync

LEDGER_NAME = "ledger.jsonl"
REQUESTS_NAME = "requests.log"
LOCK_NAME = ".batchrunner.lock"
PARTIAL_DIR = ".partial"

# The lock file holds one short JSON line; more is not ours to read.
_MAX_LOCK_BYTES = 4096

# Pillow's format name -> the extension the file gets.
IMAGE_EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif"}
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def describe_os_error(exc: OSError) -> str:
    """A short reason for an OSError, naming the disk-full case plainly."""
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied" if exc.errno != errno.EROFS else "read-only file system"
    return exc.strerror or type(exc).__name__


@dataclass(frozen=True, slots=True)
class OutputDir:
    """Where one manifest's results live."""

    path: Path

    @property
    def ledger(self) -> Path:
        return self.path / LEDGER_NAME

    @property
    def requests(self) -> Path:
        return self.path / REQUESTS_NAME

    @property
    def lock(self) -> Path:
        return self.path / LOCK_NAME

    @property
    def partial(self) -> Path:
        return self.path / PARTIAL_DIR

    def create(self) -> None:
        """Make the folder (before taking the lock that lives in it)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create output folder {self.path}: {describe_os_error(exc)}") from exc

    def prepare(self) -> None:
        """Create the folder (and its partial-download area), and clear what a killed run left half-written.

        ``.partial`` must be the folder's own directory: a link there would have every file it points to deleted, so
        it is refused (OutputError) rather than followed; what is cleared inside it is unlinked, never followed.
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if not check_own(self.partial, directory=True):
                self.partial.mkdir()
            _clear_partial(self.partial)
            probe = self.path / f".probe-{os.getpid()}-{secrets.token_hex(4)}"
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644))
            probe.unlink()
        except OSError as exc:
            raise OutputError(f"cannot write to output folder {self.path}: {describe_os_error(exc)}") from exc

    def file_for(self, job_id: str, ext: str) -> Path:
        """The final path of a job's image; refuses any name that would land outside the folder.

        Checked on the name alone: the image is renamed into place, and a rename replaces a link of that name instead
        of following it, so a link planted there cannot send the file elsewhere.
        """
        name = f"{job_id}.{ext}"
        if "/" in name or "\\" in name or "\x00" in name or name.startswith("."):
            raise OutputError(f"refusing output file name {name!r}: it would escape {self.path}")
        return self.path / name

    def has_file(self, name: str | None) -> bool:
        """Whether a file the ledger names is still there as the run left it: a regular file of the folder's own.

        A user may have deleted it. Judged with ``lstat``, never following a link: a link at an image's name is not
        the image the run saved (it may point anywhere, outside the folder or at a device), so the job is not done,
        nothing reads through the link, and the job's next image is renamed over the link, leaving its target as it
        was.
        """
        if not name or "/" in name or "\\" in name or "\x00" in name:
            return False
        try:
            return stat.S_ISREG(os.lstat(self.path / name).st_mode)
        except OSError:
            return False


class RunLock:
    """An exclusive ``flock`` on a file in the output folder: the OS drops it when the process dies, however it dies."""

    def __init__(self, path: Path, *, wall: Callable[[], float] = time.time) -> None:
        self._path = path
        self._wall = wall
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        try:
            fd = open_own(self._path, os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            raise OutputError(f"cannot open lock file {self._path}: {describe_os_error(exc)}") from exc
        handle = os.fdopen(fd, "r+", encoding="utf-8")  # held for the whole run
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = _read_holder(read_small(handle.fileno(), _MAX_LOCK_BYTES))
            except OSError:
                holder = "pid unknown"
            handle.close()
            raise LockHeld(f"another run holds {self._path.parent} ({holder}); exiting") from None
        except OSError as exc:
            handle.close()
            raise OutputError(f"cannot lock {self._path}: {describe_os_error(exc)}") from exc
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._wall()))
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "started": started}) + "\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_holder(path: Path) -> str | None:
    """``pid 1234, started 2026-...Z`` when a run holds the lock at ``path``, else None; takes nothing and writes
    nothing. The probe is a shared lock held for an instant: a run starting in that instant is told another holds
    the folder, as two overlapping runs are."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None  # no lock file: no run ever held the folder, or it is not ours to open
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return _read_holder(read_small(fd, _MAX_LOCK_BYTES))
            except OSError:
                return "pid unknown"
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_holder(data: bytes | None) -> str:
    # Whatever the file holds, only a short, well-formed line is shown: it ends up in the one-line message.
    try:
        info = json.loads(data or b"")
        pid, started = int(info["pid"]), str(info["started"])
    except (ValueError, KeyError, TypeError, RecursionError):
        return "pid unknown"
    if len(started) > 40 or not started.isprintable():
        started = "at an unknown time"
    return f"pid {pid}, started {started}"


def _clear_partial(partial: Path) -> None:
    """Unlink what a killed run left in ``partial`` (opened without following a link, as the folder's own)."""
    fd = os.open(partial, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW)
    try:
        with os.scandir(fd) as entries:
            names = [entry.name for entry in entries if not entry.is_dir(follow_symlinks=False)]
        for name in names:
            # Relative to the open folder: a name is unlinked there, whatever link it may be.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=fd)
    finally:
        os.close(fd)


def image_extension(source: Path | BinaryIO) -> str:
    """Decode the file (or the bytes) fully with Pillow and return its extension; ``DownloadRejected`` if it is not a
    usable image."""
    try:
        with Image.open(source) as img:
            fmt = img.format or ""
            img.load()  # a truncated file fails here, not later in the user's viewer
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DownloadRejected(f"output is not a readable image ({type(exc).__name__})") from exc
    ext = IMAGE_EXTENSIONS.get(fmt)
    if ext is None:
        raise DownloadRejected(f"output is a {fmt or 'unknown'} image; expected PNG, JPEG, WebP or GIF")
    return ext


_PART_NUMBERS = itertools.count()
# Downloads at once hold up to this many bytes in memory between them; past it a download goes to its temporary file
# as it arrives. An image held whole is written, fsynced, checked and renamed in one worker-thread call.
SPOOL_BUDGET = 64 << 20


class _Spool:
    """A download's sink: its bytes in memory while the shared budget lasts, else in the temporary file."""

    spooled = 0  # bytes held in memory by every spool (one event loop writes them)

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.chunks: list[bytes] = []
        self.held = 0
        self.file: BinaryIO | None = None

    def write(self, chunk: bytes, /) -> int:
        if self.file is None and _Spool.spooled + len(chunk) <= SPOOL_BUDGET:
            self.chunks.append(chunk)
            self.held += len(chunk)
            _Spool.spooled += len(chunk)
            return len(chunk)
        if self.file is None:  # over the budget: the rest streams to disk (a rare, large output)
            try:
                self.file = os.fdopen(_open_part(self.tmp), "wb")
                self.file.writelines(self.chunks)
            except OSError as exc:
                raise OutputError(f"cannot write {self.tmp}: {describe_os_error(exc)}") from exc
            self.free()
        try:
            return self.file.write(chunk)
        except OSError as exc:
            raise OutputError(f"cannot write {self.tmp}: {describe_os_error(exc)}") from exc

    def free(self) -> None:
        _Spool.spooled -= self.held
        self.chunks, self.held = [], 0

    def close(self) -> None:
        self.free()
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
            self.file = None


def _open_part(tmp: Path) -> int:
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)


def _store(spool: _Spool, out: OutputDir, job_id: str) -> Path:
    """In a worker thread: the temporary file written whole and fsynced, checked to decode, renamed into place."""
    tmp = spool.tmp
    try:
        if spool.file is None:
            with os.fdopen(_open_part(tmp), "wb") as sink:
                sink.writelines(spool.chunks)
                sink.flush()
                os.fsync(sink.fileno())
        else:
            spool.file.flush()
            os.fsync(spool.file.fileno())
            spool.file.close()  # the budget is the loop's own: the bytes held are freed there, after this returns
            spool.file = None
    except OSError as exc:
        raise OutputError(f"cannot write {tmp}: {describe_os_error(exc)}") from exc
    # The bytes held in memory are checked there (they are the file's, just written): no second open and read.
    final = out.file_for(job_id, image_extension(io.BytesIO(b"".join(spool.chunks)) if spool.chunks else tmp))
    try:
        os.replace(tmp, final)
        _dir_sync(out.path).sync()
    except OSError as exc:
        raise OutputError(f"cannot write {final}: {describe_os_error(exc)}") from exc
    return final


async def save_download(out: OutputDir, job_id: str, fetch: Callable[[_Spool], Awaitable[int]]) -> str:
    """Fetch a download, write it to a temporary file, fsync it, check it decodes, then rename it into place.

    Returns the final file name (relative to the folder). A kill at any point leaves either no file or the whole file;
    the ledger records success only after this returns. The loop only gathers the bytes: every call that waits on
    the disk (open, write, fsync, the decode, the rename) is one worker-thread call.
    """
    # Unique within the folder: a run holds its lock, and within the run a counter (a random name cost a syscall).
    spool = _Spool(out.partial / f"{job_id}.{os.getpid()}-{next(_PART_NUMBERS)}.part")
    moved = False
    try:
        await fetch(spool)
        final = await asyncio.to_thread(_store, spool, out, job_id)
        moved = True
        return final.name
    finally:
        spool.close()
        if not moved:  # renamed into place, there is nothing left to remove (and no syscall to spend on it)
            with contextlib.suppress(OSError):
                spool.tmp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_DIR_SYNCS: dict[Path, GroupSync] = {}
_DIR_SYNCS_LOCK = threading.Lock()


def _dir_sync(path: Path) -> GroupSync:
    """The folder's one group sync (renames into it made durable together: ``groupsync``)."""
    with _DIR_SYNCS_LOCK:
        group = _DIR_SYNCS.get(path)
        if group is None:
            group = _DIR_SYNCS[path] = GroupSync(lambda: _fsync_dir(path))
        return group


def read_bytes(path: Path) -> bytes:
    """Read a local input file (to upload it, or for inline data URIs): never blocks on a FIFO put in its place, and
    never reads past the upload limit (``localpaths.read_local``)."""
    return read_local(path)


__all__ = [
    "IMAGE_EXTENSIONS",
    "OutputDir",
    "RunLock",
    "describe_os_error",
    "image_extension",
    "read_bytes",
    "save_download",
]
