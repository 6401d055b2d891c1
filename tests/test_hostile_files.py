"""Hostile files in the output folder: links and special files are refused, never followed; every read is bounded.

Each case plants something in a fresh output folder and runs the CLI in-process against the simulator. A refusal is
exit 74 and one line naming the file, before any request, with whatever the link points to left as it was.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import os
import socket
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from batchrunner.cli.main import main
from batchrunner.errors import LockHeld, OutputError
from batchrunner.manifest import load_manifest
from batchrunner.manifest.schema import cached_schema_path
from batchrunner.store.files import BoundedLines, open_own, read_small, read_tail
from batchrunner.store.ledger import RequestLog, read_ledger
from batchrunner.store.output import OutputDir, RunLock
from batchrunner.views.export import write_rows
from tests.conftest import ThreadedSimulator, fast_sim, images_in, run_args, write_manifest

SimFactory = Callable[..., ThreadedSimulator]
pytestmark = pytest.mark.usefixtures("api_key")

OUTSIDE_TEXT = b"precious: not the runner's to touch\n"


@contextlib.contextmanager
def unblock_fifo(path: Path, after: float = 5.0) -> Iterator[None]:
    """If code under test blocks opening the FIFO at ``path`` (the bug), open its other end after ``after`` seconds so
    the test fails on its assertions instead of hanging."""
    done = threading.Event()

    def rescue() -> None:
        if done.wait(after):
            return
        for flags in (os.O_WRONLY | os.O_NONBLOCK, os.O_RDONLY | os.O_NONBLOCK):
            with contextlib.suppress(OSError):
                os.close(os.open(path, flags))

    thread = threading.Thread(target=rescue, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# --- links in the folder's own places --------------------------------------------------------------------------

OWN_FILES = ["ledger.jsonl", "requests.log", ".batchrunner.lock"]


@pytest.mark.parametrize("name", OWN_FILES)
@pytest.mark.parametrize("target_kind", ["file", "dangling", "dev-zero", "dev-full", "dev-null"])
def test_a_link_in_place_of_an_own_file_is_refused_with_74_and_its_target_is_untouched(
    tmp_path: Path,
    threaded_sim: SimFactory,
    capsys: pytest.CaptureFixture[str],
    name: str,
    target_kind: str,
) -> None:
    sim = threaded_sim(fast_sim())
    manifest = write_manifest(tmp_path, 2, image=False)
    out = tmp_path / "out"
    out.mkdir()
    outside = tmp_path / "elsewhere" / "target"
    outside.parent.mkdir()
    target = {"file": outside, "dangling": outside, "dev-zero": Path("/dev/zero"), "dev-full": Path("/dev/full")}.get(
        target_kind, Path("/dev/null")
    )
    if target_kind == "file":
        outside.write_bytes(OUTSIDE_TEXT)
    if not target.exists() and target_kind.startswith("dev"):
        pytest.skip(f"needs {target}")
    (out / name).symlink_to(target)

    assert main(run_args(manifest, sim.url, out)) == 74
    line = _one_line(capsys.readouterr().err)
    assert line == f"batchrunner: {out / name} is a symbolic link: refusing to follow it"
    assert sim.stats()["requests"] == 0
    assert (out / name).is_symlink()
    if target_kind == "file":
        assert outside.read_bytes() == OUTSIDE_TEXT
    if target_kind == "dangling":
        assert not outside.exists()


@pytest.mark.parametrize("command", ["status", "plan", "report", "retry"])
def test_other_commands_refuse_a_ledger_link_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    manifest = write_manifest(tmp_path, 1, image=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "ledger.jsonl").symlink_to("/dev/zero")
    extra = ["--failed"] if command == "retry" else []
    assert main([command, str(manifest), "--output", str(out), *extra]) == 74
    assert _one_line(capsys.readouterr().err).endswith("is a symbolic link: refusing to follow it")


def test_a_partial_link_is_refused_and_nothing_in_its_target_is_deleted(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = threaded_sim(fast_sim())
    manifest = write_manifest(tmp_path, 1, image=False)
    out = tmp_path / "out"
    out.mkdir()
    precious = tmp_path / "photos"
    precious.mkdir()
    for n in range(3):
        (precious / f"{n}.jpg").write_bytes(OUTSIDE_TEXT)
    (out / ".partial").symlink_to(precious)

    assert main(run_args(manifest, sim.url, out)) == 74
    assert (
        _one_line(capsys.readouterr().err)
        == f"batchrunner: {out / '.partial'} is a symbolic link: refusing to follow it"
    )
    assert sorted(p.name for p in precious.iterdir()) == ["0.jpg", "1.jpg", "2.jpg"]
    assert sim.stats()["requests"] == 0


def test_links_inside_partial_are_unlinked_not_followed(tmp_path: Path, threaded_sim: SimFactory) -> None:
    sim = threaded_sim(fast_sim())
    manifest = write_manifest(tmp_path, 1, image=False)
    out = tmp_path / "out"
    (out / ".partial" / "sub").mkdir(parents=True)
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "keep.jpg").write_bytes(OUTSIDE_TEXT)
    (out / ".partial" / "left.part").symlink_to(precious / "keep.jpg")
    (out / ".partial" / "dir.part").symlink_to(precious)
    (out / ".partial" / "sub" / "inner").write_bytes(b"x")

    assert main(run_args(manifest, sim.url, out)) == 0
    assert (precious / "keep.jpg").read_bytes() == OUTSIDE_TEXT
    assert not (out / ".partial" / "left.part").exists() and not (out / ".partial" / "dir.part").is_symlink()
    assert (out / ".partial" / "sub" / "inner").exists()  # a folder is not ours to empty


@pytest.mark.parametrize("planted", ["requests.log.tmp", "probe"])
def test_scratch_names_in_the_folder_are_never_written_through(
    tmp_path: Path, threaded_sim: SimFactory, planted: str
) -> None:
    sim = threaded_sim(fast_sim())
    manifest = write_manifest(tmp_path, 1, image=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "requests.log").write_text(f"{time.time()!r}\n")  # so that the log is compacted
    outside = tmp_path / "outside.txt"
    outside.write_bytes(OUTSIDE_TEXT)
    name = f".probe-{os.getpid()}" if planted == "probe" else planted
    (out / name).symlink_to(outside)
    assert main(run_args(manifest, sim.url, out)) == 0
    assert outside.read_bytes() == OUTSIDE_TEXT


@pytest.mark.parametrize("kind", ["link-to-file", "dangling-link", "link-to-folder"])
def test_an_output_image_name_held_by_a_link_gets_the_image_and_the_link_target_is_untouched(
    tmp_path: Path, threaded_sim: SimFactory, kind: str
) -> None:
    sim = threaded_sim(fast_sim())
    manifest_path = write_manifest(tmp_path, 1, image=False)
    job = load_manifest(manifest_path).jobs[0]
    out = tmp_path / "out"
    out.mkdir()
    outside = tmp_path / "outside.png"
    if kind == "link-to-file":
        outside.write_bytes(OUTSIDE_TEXT)
    elif kind == "link-to-folder":
        outside.mkdir()
    (out / f"{job.id}.png").symlink_to(outside)

    assert main(run_args(manifest_path, sim.url, out)) == 0
    final = out / f"{job.id}.png"
    assert not final.is_symlink() and final.stat().st_size > 0
    assert images_in(out) == [final]
    if kind == "link-to-file":
        assert outside.read_bytes() == OUTSIDE_TEXT
    elif kind == "dangling-link":
        assert not outside.exists()
    else:
        assert list(outside.iterdir()) == []


@pytest.mark.parametrize(
    ("kind", "present"),
    [
        ("regular", True),
        ("link-to-file", False),
        ("link-to-image-in-folder", False),
        ("dangling-link", False),
        ("link-to-dev-zero", False),
        ("fifo", False),
        ("directory", False),
        ("missing", False),
    ],
)
def test_has_file_counts_only_a_regular_file_of_the_folders_own(tmp_path: Path, kind: str, present: bool) -> None:
    out = OutputDir(tmp_path / "out")
    out.path.mkdir()
    name = "job.png"
    outside = tmp_path / "outside.png"
    outside.write_bytes(OUTSIDE_TEXT)
    (out.path / "other.png").write_bytes(OUTSIDE_TEXT)
    target = {
        "link-to-file": outside,
        "link-to-image-in-folder": Path("other.png"),
        "dangling-link": tmp_path / "nowhere.png",
        "link-to-dev-zero": Path("/dev/zero"),
    }.get(kind)
    if target is not None:
        (out.path / name).symlink_to(target)
    elif kind == "regular":
        (out.path / name).write_bytes(OUTSIDE_TEXT)
    elif kind != "missing":
        _plant(out.path / name, kind)
    assert out.has_file(name) is present
    assert out.has_file("a\x00b.png") is False


def test_a_link_in_place_of_a_saved_image_is_not_a_done_job_and_is_replaced_by_a_new_image(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    # The ledger says the job's image is saved; the user (or anyone) puts a link at its name. The runner counts only
    # what it saved: the job is not done, the next run makes it again, and the image is renamed over the link.
    sim = threaded_sim(fast_sim())
    manifest_path = write_manifest(tmp_path, 1, image=False)
    out = tmp_path / "out"
    assert main(run_args(manifest_path, sim.url, out)) == 0
    (saved,) = images_in(out)
    outside = tmp_path / "elsewhere.png"
    saved.rename(outside)
    saved.symlink_to(outside)
    before = outside.read_bytes()
    capsys.readouterr()

    assert main(["status", str(manifest_path), "--output", str(out)]) == 0
    assert "0/1 done" in capsys.readouterr().out
    assert main(run_args(manifest_path, sim.url, out)) == 0
    assert len(sim.sim.prediction_times()) == 2  # made again
    assert not saved.is_symlink() and saved.stat().st_size > 0
    assert outside.read_bytes() == before  # the link's target is left as it was


def test_an_output_folder_that_is_a_link_is_the_users_choice_and_is_followed(
    tmp_path: Path, threaded_sim: SimFactory
) -> None:
    sim = threaded_sim(fast_sim())
    manifest = write_manifest(tmp_path, 2, image=False)
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "out").symlink_to(real)
    assert main(run_args(manifest, sim.url, tmp_path / "out")) == 0
    assert len(images_in(real)) == 2 and (real / "ledger.jsonl").is_file()


# --- special files where a regular one belongs -----------------------------------------------------------------


def _plant(path: Path, kind: str) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()


SPECIAL_WORDS = {"fifo": "a named pipe", "directory": "a directory", "socket": "a socket"}


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("ledger.jsonl", "fifo"),
        ("ledger.jsonl", "socket"),
        (".batchrunner.lock", "fifo"),
        (".batchrunner.lock", "socket"),
        (".batchrunner.lock", "directory"),
        ("requests.log", "fifo"),
        ("requests.log", "socket"),
        (".partial", "fifo"),
    ],
)
def test_a_special_file_in_place_of_an_own_file_is_refused_with_74_without_hanging(
    threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str], name: str, kind: str
) -> None:
    # A short folder: a socket's path must fit in 108 bytes.
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="br-") as tmp:
        folder = Path(tmp)
        sim = threaded_sim(fast_sim())
        manifest = write_manifest(folder, 1, image=False)
        out = folder / "o"
        out.mkdir()
        _plant(out / name, kind)
        with unblock_fifo(out / name):
            code = main(run_args(manifest, sim.url, out))
        assert code == 74
        expected = "a directory" if name == ".partial" else "a regular file"
        line = _one_line(capsys.readouterr().err)
        assert line == f"batchrunner: {out / name} is {SPECIAL_WORDS[kind]}, not {expected}: refusing it"
        assert sim.stats()["requests"] == 0


def test_status_of_a_fifo_ledger_is_refused_without_hanging(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_manifest(tmp_path, 1, image=False)
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "ledger.jsonl")
    with unblock_fifo(out / "ledger.jsonl"):
        assert main(["status", str(manifest), "--output", str(out)]) == 74
    assert "is a named pipe, not a regular file" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory", "dev-zero-link"])
def test_a_schema_cache_that_is_not_a_regular_file_is_refused_before_any_request(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    sim = threaded_sim(fast_sim())
    manifest = tmp_path / "other.yaml"
    manifest.write_text("model: some-other-model\njobs:\n  - prompt: a cat\n")
    out = tmp_path / "out"
    out.mkdir()
    cache = cached_schema_path(out, "some-other-model")
    outside = tmp_path / "schema.json"
    outside.write_text(json.dumps({"slug": "some-other-model", "schema": {"type": "object"}}))
    if kind == "symlink":
        cache.symlink_to(outside)
    elif kind == "dev-zero-link":
        cache.symlink_to("/dev/zero")
    else:
        _plant(cache, kind)
    with unblock_fifo(cache):
        assert main(run_args(manifest, sim.url, out)) == 74
    assert _one_line(capsys.readouterr().err).startswith(f"batchrunner: {cache} is ")
    assert sim.stats()["requests"] == 0


# --- open_own by table -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "flags", "message"),
    [
        ("link-file", os.O_RDONLY, "is a symbolic link: refusing to follow it"),
        ("link-file", os.O_RDWR | os.O_APPEND | os.O_CREAT, "is a symbolic link: refusing to follow it"),
        ("link-dangling", os.O_RDWR | os.O_CREAT, "is a symbolic link: refusing to follow it"),
        ("link-dir", os.O_RDONLY, "is a symbolic link: refusing to follow it"),
        ("fifo", os.O_RDONLY, "is a named pipe, not a regular file: refusing it"),
        ("fifo", os.O_WRONLY | os.O_APPEND, "is a named pipe, not a regular file: refusing it"),
        ("fifo", os.O_RDWR | os.O_CREAT, "is a named pipe, not a regular file: refusing it"),
        ("directory", os.O_RDONLY, "is a directory, not a regular file: refusing it"),
        ("directory", os.O_RDWR | os.O_CREAT, "is a directory, not a regular file: refusing it"),
        ("dev-null", os.O_RDONLY, "is a character device, not a regular file: refusing it"),
    ],
)
def test_open_own_refuses_links_and_special_files(tmp_path: Path, setup: str, flags: int, message: str) -> None:
    path = tmp_path / "own"
    outside = tmp_path / "outside"
    if setup == "link-file":
        outside.write_bytes(OUTSIDE_TEXT)
        path.symlink_to(outside)
    elif setup == "link-dangling":
        path.symlink_to(outside)
    elif setup == "link-dir":
        outside.mkdir()
        path.symlink_to(outside)
    elif setup == "dev-null":
        path = Path("/dev/null")
    else:
        _plant(path, setup)
    with unblock_fifo(path), pytest.raises(OutputError) as caught:
        os.close(open_own(path, flags))
    assert str(caught.value) == f"{path} {message}"
    assert caught.value.exit_code == 74
    if setup == "link-file":
        assert outside.read_bytes() == OUTSIDE_TEXT
    if setup == "link-dangling":
        assert not outside.exists()


def test_open_own_passes_other_errors_on_for_the_caller_to_word(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        open_own(tmp_path / "missing", os.O_RDONLY)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(NotADirectoryError):
        open_own(blocker / "below", os.O_RDWR | os.O_CREAT)


def test_open_own_gives_a_blocking_descriptor_for_a_regular_file(tmp_path: Path) -> None:
    fd = open_own(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
    finally:
        os.close(fd)


# --- bounded reads ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "max_line", "lines", "overlong"),
    [
        pytest.param(b"", 10, [], 0, id="empty"),
        pytest.param(b"\n\n", 10, [b"\n", b"\n"], 0, id="blank-lines"),
        pytest.param(b"abcdefghi\n", 10, [b"abcdefghi\n"], 0, id="exactly-the-limit"),
        pytest.param(b"abcdefghij\nok\n", 10, [b"ok\n"], 1, id="one-over-the-limit"),
        pytest.param(b"ok\n" + b"x" * 50 + b"\nok2", 10, [b"ok\n", b"ok2"], 1, id="long-line-in-the-middle"),
        pytest.param(b"ok\n" + b"x" * 50, 10, [b"ok\n"], 1, id="long-torn-tail"),
        pytest.param(b"x" * 11, 10, [], 1, id="long-line-without-newline"),
        pytest.param(b"x" * 30 + b"\n" + b"y" * 30 + b"\n", 10, [], 2, id="two-long-lines"),
        pytest.param(b"abc", 10, [b"abc"], 0, id="short-tail-without-newline"),
    ],
)
def test_bounded_lines_skip_and_count_what_is_too_long(
    data: bytes, max_line: int, lines: list[bytes], overlong: int
) -> None:
    reader = BoundedLines(io.BytesIO(data), max_line)
    assert list(reader) == lines
    assert reader.overlong == overlong


def test_bounded_lines_across_read_chunks() -> None:
    good = b"g" * 100_000 + b"\n"
    data = good + b"b" * 300_000 + b"\n" + good + b"h" * 70_000
    reader = BoundedLines(io.BytesIO(data), 200_000)
    assert list(reader) == [good, good, b"h" * 70_000]
    assert reader.overlong == 1


class _Endless(io.RawIOBase):
    """/dev/zero as a file object, for a bounded number of bytes so a buggy reader ends too."""

    def __init__(self, total: int) -> None:
        self.left = total

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self.left)
        buffer[:n] = b"\0" * n
        self.left -= n
        return n


def _peak(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_reading_a_line_without_end_never_holds_more_than_one_line() -> None:
    reader = BoundedLines(io.BufferedReader(_Endless(64 << 20)), 1 << 20)
    assert _peak(lambda: list(reader)) < 4 << 20
    assert reader.overlong == 1


@pytest.mark.parametrize("size_mib", [8, 24])
def test_a_ledger_with_a_huge_line_is_read_in_bounded_memory_and_the_line_counted_bad(
    tmp_path: Path, size_mib: int
) -> None:
    path = tmp_path / "ledger.jsonl"
    good = json.dumps({"ts": "2024-01-01T00:00:00Z", "event": "reset", "job": "j", "fingerprint": "f" * 64}) + "\n"
    with path.open("wb") as fh:
        fh.write(good.encode())
        fh.write(b"x" * (size_mib << 20) + b"\n")
        fh.write(good.encode())
    peak = _peak(lambda: read_ledger(path))
    assert peak < 4 << 20
    state = read_ledger(path)
    assert state.bad_lines == 1 and len(state.jobs) == 1


def test_read_ledger_with_a_small_line_limit_counts_longer_lines_bad(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    line = json.dumps({"ts": "2024-01-01T00:00:00Z", "event": "reset", "job": "j", "fingerprint": "f" * 64})
    path.write_text(line + "\n" + line + " " * 200 + "\n")
    assert read_ledger(path, max_line=len(line) + 10).bad_lines == 1


REQUEST_LOGS: dict[str, tuple[Callable[[], bytes], list[float]]] = {
    "huge-garbage-head": (lambda: b"x" * (20 << 20) + b"\n990.0\n995.0\n", [990.0, 995.0]),
    "huge-number-line": (lambda: b"9" * (20 << 20) + b"\n995.0\n", [995.0]),
    "long-log": (lambda: b"".join(b"%r\n" % (100.0 + i / 10_000) for i in range(1_000_000)) + b"996.0\n", [996.0]),
}


@pytest.mark.parametrize("case", list(REQUEST_LOGS))
def test_the_request_log_is_read_from_its_tail_in_bounded_memory(tmp_path: Path, case: str) -> None:
    make, expected = REQUEST_LOGS[case]
    path = tmp_path / "requests.log"
    path.write_bytes(make())  # built here, not at collection: tens of MB
    log = RequestLog(path, clock=lambda: 1000.0, max_times=60)
    peak = _peak(lambda: log.recent(60))
    assert peak < 2 << 20
    assert log.recent(60) == expected


def test_the_request_log_tail_keeps_enough_times_for_the_window(tmp_path: Path) -> None:
    path = tmp_path / "requests.log"
    times = [900.0 + i * 0.01 for i in range(5000)]
    path.write_text("".join(f"{t!r}\n" for t in times))
    log = RequestLog(path, clock=lambda: 960.0, max_times=1000)
    got = log.recent(100)
    assert got[-1000:] == times[-1000:]  # the latest `count` times are all there


@pytest.mark.parametrize(
    ("content", "limit", "expected"),
    [
        (b"", 10, b""),
        (b"abc\n", 10, b"abc\n"),
        (b"0123456789\nabc\n", 6, b"abc\n"),
        (b"0123456789\nabc\n", 4, b"abc\n"),
        (b"0123456789\nabc", 5, b"abc"),
        (b"0123456789", 5, b""),
        (b"01234\nabc\n", 4, b"abc\n"),
    ],
)
def test_read_tail_gives_whole_lines_only(tmp_path: Path, content: bytes, limit: int, expected: bytes) -> None:
    path = tmp_path / "f"
    path.write_bytes(content)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert read_tail(fd, limit) == expected
    finally:
        os.close(fd)


@pytest.mark.parametrize(("content", "limit", "expected"), [(b"", 4, b""), (b"abcd", 4, b"abcd"), (b"abcde", 4, None)])
def test_read_small_refuses_what_is_over_its_limit(
    tmp_path: Path, content: bytes, limit: int, expected: bytes | None
) -> None:
    path = tmp_path / "f"
    path.write_bytes(content)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert read_small(fd, limit) == expected
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("content", "shown"),
    [
        pytest.param(None, "pid unknown", id="huge"),
        pytest.param(
            b'{"pid": 7, "started": "' + b"y" * 3000 + b'"}', "pid 7, started at an unknown time", id="long-start"
        ),
        pytest.param(b'{"pid": 7, "started": "a\\nb"}', "pid 7, started at an unknown time", id="newline-in-start"),
        pytest.param(
            b'{"pid": 7, "started": "2024-01-01T00:00:00Z"}', "pid 7, started 2024-01-01T00:00:00Z", id="fine"
        ),
        pytest.param(b"[" * 100_000, "pid unknown", id="deep-json"),
    ],
)
def test_a_held_lock_is_read_bounded_and_named_in_one_line(tmp_path: Path, content: bytes | None, shown: str) -> None:
    path = tmp_path / ".batchrunner.lock"
    path.write_bytes(b"x" * (32 << 20) if content is None else content)
    with path.open("rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock = RunLock(path)
        caught: list[LockHeld] = []

        def acquire() -> None:
            try:
                lock.acquire()
            except LockHeld as exc:
                caught.append(exc)

        peak = _peak(acquire)
    assert caught and f"({shown})" in str(caught[0]) and "\n" not in str(caught[0])
    assert peak < 2 << 20


def test_a_full_disk_under_the_ledger_mid_run_is_one_line_74_and_the_ledger_stops_growing(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = threaded_sim(fast_sim())
    manifest = write_manifest(tmp_path, 6, image=False)
    out = tmp_path / "out"
    real_write = os.write
    ledger_fds: set[int] = set()
    real_open = os.open
    writes = {"n": 0}

    def tracking_open(path: object, flags: int, *args: object, **kwargs: object) -> int:
        fd = real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]
        if str(path).endswith("ledger.jsonl"):
            ledger_fds.add(fd)
        return fd

    def full_after_three(fd: int, data: bytes) -> int:
        if fd in ledger_fds:
            writes["n"] += 1
            if writes["n"] > 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "open", tracking_open)
    monkeypatch.setattr(os, "write", full_after_three)
    assert main(run_args(manifest, sim.url, out)) == 74
    err = capsys.readouterr().err
    assert "Traceback" not in err
    final = [line for line in err.splitlines() if line.startswith("batchrunner: ")]
    assert final == [f"batchrunner: cannot write ledger {out / 'ledger.jsonl'}: {os.strerror(errno.ENOSPC)}"]
    size = (out / "ledger.jsonl").stat().st_size
    monkeypatch.setattr(os, "write", real_write)
    monkeypatch.setattr(os, "open", real_open)
    assert len((out / "ledger.jsonl").read_bytes().splitlines()) == 3
    assert (out / "ledger.jsonl").stat().st_size == size
    assert main(run_args(manifest, sim.url, out)) == 0  # the next run, on a disk with room, finishes the batch


def test_output_dir_prepare_refuses_a_file_in_place_of_partial(tmp_path: Path) -> None:
    out = OutputDir(tmp_path / "out")
    out.create()
    (out.path / ".partial").write_text("x")
    with pytest.raises(OutputError, match=r"\.partial is a regular file, not a directory: refusing it"):
        out.prepare()


# --- cells a spreadsheet would run: CSV export ---------------------------------------------------------------------

FORMULAS = ['=HYPERLINK("http://x")', "+SUM(A1:A9)", "-2+3+cmd|' /C calc'!A0", "@SUM(1)", "\t=1+1", "\r=1+1"]


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        *((text, "'" + text) for text in FORMULAS),
        ("Make it snow = winter", "Make it snow = winter"),  # only the first character counts
        (" =1+1", " =1+1"),  # OWASP's rule names the six characters, not a leading space
        ("", ""),
        (-2, "-2"),  # a number is never a formula: it stays a number
        (-0.5, "-0.5"),
        (None, ""),
        (True, "true"),
        (["=x"], '["=x"]'),  # another model's list: JSON, starts with [
    ],
)
def test_csv_export_neutralises_every_text_cell_that_could_start_a_formula(value: object, cell: str) -> None:
    sink = io.StringIO()
    assert write_rows("csv", ["prompt"], iter([{"prompt": value}]), sink) == 1
    rows = list(csv.reader(io.StringIO(sink.getvalue(), newline="")))
    assert rows == [["prompt"], [cell]]


def test_csv_export_of_a_run_neutralises_its_prompts_and_jsonl_keeps_them(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = threaded_sim(fast_sim())
    lines = "".join(f"  - {{id: j{i}, prompt: {json.dumps(text)}}}\n" for i, text in enumerate(FORMULAS))
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"model: flux-kontext-max\njobs:\n{lines}", encoding="utf-8")
    out = tmp_path / "out"
    assert main(run_args(manifest, sim.url, out)) == 0
    capsys.readouterr()
    assert main(["export", str(manifest), "--output", str(out)]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out, newline="")))
    assert [r["prompt"] for r in rows] == ["'" + text for text in FORMULAS]
    assert all(r["status"] == "done" for r in rows)
    assert main(["export", str(manifest), "--output", str(out), "--format", "jsonl"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in records] == FORMULAS
