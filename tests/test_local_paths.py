"""Hostile local paths named by a manifest: judged by lstat/stat before they are opened, read or hashed.

The table tests plant each kind of thing at a path (real link loops, FIFOs, sockets, devices, a 20 GB sparse file) and
ask :func:`local_file_problem` about it. The command tests name the same paths as ``input_image`` and run ``run``,
``plan`` and ``validate`` in-process against the simulator under a deadline: exit 2, one line naming the manifest's
line and the job, no traceback, and not one request at the simulator.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import pytest

from batchrunner.cli.main import main
from batchrunner.errors import InputImageError
from batchrunner.manifest import parse_manifest
from batchrunner.manifest.images import inspect_image
from batchrunner.manifest.localpaths import (
    LocalFileRefused,
    LocalPathError,
    local_file_problem,
    open_local,
    read_local,
    sha256_local,
    stat_problem,
)
from batchrunner.store.output import read_bytes
from tests.conftest import SECRET_KEY, ThreadedSimulator, fast_sim, make_image, run_args

SimFactory = Callable[..., ThreadedSimulator]

SPARSE_BYTES = 20 * 1024**3  # 20 GB that take no disk: hashing them would read 20 GB of zeros


# --- planting each kind ------------------------------------------------------------------------------------------


def _regular(path: Path) -> None:
    make_image(path)


def _link_to_regular(path: Path) -> None:
    make_image(path.with_name("target.png"))
    path.symlink_to("target.png")


def _loop(path: Path) -> None:
    path.symlink_to(path.name)  # a link to itself


def _loop_of_two(path: Path) -> None:
    other = path.with_name("other.png")
    path.symlink_to(other.name)
    other.symlink_to(path.name)


def _through_loop(path: Path) -> None:
    # The path's folder is a loop: lstat of the path itself fails with ELOOP.
    folder = path.parent / "loopdir"
    folder.symlink_to("loopdir")
    path.parent.joinpath("through.png").symlink_to("loopdir/in.png")


def _dangling(path: Path) -> None:
    path.symlink_to("nowhere.png")


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _socket(path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))  # the socket file stays after the socket closes


def _directory(path: Path) -> None:
    path.mkdir()


def _link_to_dev_zero(path: Path) -> None:
    path.symlink_to("/dev/zero")


def _link_to_dev_null(path: Path) -> None:
    path.symlink_to("/dev/null")


def _link_to_directory(path: Path) -> None:
    path.symlink_to(path.parent)


def _sparse(path: Path) -> None:
    with path.open("wb") as fh:
        fh.truncate(SPARSE_BYTES)


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _under_a_file(path: Path) -> None:
    make_image(path.parent / "file.png")


KINDS: dict[str, tuple[Callable[[Path], None], str, str | None]] = {
    # kind: (plant at path, name written in the manifest, the reason; None when the path is fine)
    "regular file": (_regular, "in.png", None),
    "link to a regular file": (_link_to_regular, "in.png", None),
    "link loop": (_loop, "in.png", "is a symbolic link loop (following it never ends)"),
    "loop of two links": (_loop_of_two, "in.png", "is a symbolic link loop (following it never ends)"),
    "path through a loop": (_through_loop, "through.png", "is a symbolic link loop (following it never ends)"),
    "folder that is a loop": (_through_loop, "loopdir/in.png", "leads through a symbolic link loop"),
    "dangling link": (_dangling, "in.png", "is a dangling link: it points to 'nowhere.png', which does not exist"),
    "fifo": (_fifo, "in.png", "is a named pipe (FIFO), not an image file"),
    "socket": (_socket, "in.png", "is a socket, not an image file"),
    "directory": (_directory, "in.png", "is a directory, not an image file"),
    "link to /dev/zero": (
        _link_to_dev_zero,
        "in.png",
        "is a link to '/dev/zero', which is a character device, not an image file",
    ),
    "link to /dev/null": (
        _link_to_dev_null,
        "in.png",
        "is a link to '/dev/null', which is a character device, not an image file",
    ),
    "link to a directory": (_link_to_directory, "in.png", "which is a directory, not an image file"),
    "20 GB sparse file": (_sparse, "in.png", "is 20 GB; the API takes at most 100 MB"),
    "empty file": (_empty, "in.png", "is empty"),
    "missing": (lambda p: None, "in.png", "no such file"),
    "path under a file": (_under_a_file, "file.png/in.png", "no such file"),
}


def _planted(tmp_path: Path, kind: str) -> Path:
    plant, written, _ = KINDS[kind]
    plant(tmp_path / "in.png")
    return tmp_path / written


@pytest.mark.parametrize("kind", list(KINDS))
def test_local_file_problem_names_each_kind_in_one_line(tmp_path: Path, kind: str) -> None:
    path = _planted(tmp_path, kind)
    expected = KINDS[kind][2]
    started = time.monotonic()
    problem = local_file_problem(path)
    assert time.monotonic() - started < 1.0
    if expected is None:
        assert problem is None
    else:
        assert problem is not None and expected in problem
        assert "\n" not in problem


def test_a_device_named_directly_is_refused() -> None:
    assert local_file_problem(Path("/dev/null")) == "is a character device, not an image file"
    assert local_file_problem(Path("/dev/zero")) == "is a character device, not an image file"


def test_a_nul_in_the_name_is_a_reason_not_a_value_error() -> None:
    assert local_file_problem(Path("a\x00b.png")) == "contains a NUL character, which no file name can hold"


@contextlib.contextmanager
def _world_traversable_dir() -> Iterator[Path]:
    """A folder another user can reach (pytest's tmp_path sits in a 0700 folder of root's)."""
    folder = Path(tempfile.mkdtemp(prefix="br-perm-", dir="/tmp"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _as_nobody(fn: Callable[[], str | None]) -> str | None:
    """``fn()`` as it comes out for an unprivileged user: in a forked child that drops root (root reads any file)."""
    if os.geteuid() != 0:
        return fn()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            answer = fn()
            os.write(write, ("\x01" if answer is None else "\x00" + answer).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        data = fh.read().decode()
    os.waitpid(pid, 0)
    assert data, "the child said nothing"
    return None if data == "\x01" else data[1:]


def test_a_file_that_cannot_be_read_is_permission_denied() -> None:
    with _world_traversable_dir() as folder:
        path = folder / "in.png"
        make_image(path)
        path.chmod(0)
        assert _as_nobody(lambda: local_file_problem(path)) == "cannot read: permission denied"
        assert _as_nobody(lambda: local_file_problem(folder / "none.png")) == "no such file"


def test_a_folder_that_cannot_be_entered_is_permission_denied() -> None:
    with _world_traversable_dir() as folder:
        inner = folder / "closed"
        inner.mkdir()
        make_image(inner / "in.png")
        inner.chmod(0o700)
        assert _as_nobody(lambda: local_file_problem(inner / "in.png")) == "cannot read: permission denied"


def test_the_size_limit_is_inclusive(tmp_path: Path) -> None:
    path = tmp_path / "in.bin"
    path.write_bytes(b"x" * 100)
    assert local_file_problem(path, max_bytes=100) is None
    assert local_file_problem(path, max_bytes=99) == "is 100 bytes; the API takes at most 99 bytes"


@pytest.mark.parametrize(
    ("mode", "size", "expected"),
    [
        (stat.S_IFREG | 0o644, 10, None),
        (stat.S_IFREG | 0o644, 0, "is empty"),
        (stat.S_IFREG | 0o644, 101, "is 101 bytes; the API takes at most 100 bytes"),
        (stat.S_IFDIR | 0o755, 4096, "is a directory, not an image file"),
        (stat.S_IFIFO | 0o644, 0, "is a named pipe (FIFO), not an image file"),
        (stat.S_IFSOCK | 0o755, 0, "is a socket, not an image file"),
        (stat.S_IFCHR | 0o666, 0, "is a character device, not an image file"),
        (stat.S_IFBLK | 0o660, 0, "is a block device, not an image file"),
    ],
)
def test_stat_problem_judges_kind_then_size(mode: int, size: int, expected: str | None) -> None:
    st = os.stat_result((mode, 0, 0, 1, 0, 0, size, 0, 0, 0))
    assert stat_problem(st, max_bytes=100) == expected


# --- reading after the check ---------------------------------------------------------------------------------------


def test_open_local_never_blocks_on_a_fifo_put_in_place_of_a_file(tmp_path: Path) -> None:
    path = tmp_path / "in.png"
    os.mkfifo(path)  # as if swapped in between the check and the read
    started = time.monotonic()
    for read in (open_local, read_local, sha256_local, read_bytes):  # read_bytes: what uploads send
        with pytest.raises(LocalFileRefused, match="named pipe"):
            read(path)
    assert time.monotonic() - started < 1.0


def test_reads_stop_at_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "in.bin"
    path.write_bytes(b"x" * 10)
    with pytest.raises(LocalFileRefused, match="is 10 bytes; the API takes at most 9 bytes"):
        sha256_local(path, max_bytes=9)
    assert read_local(path, max_bytes=10) == b"x" * 10


def test_a_refusal_is_an_os_error_for_callers_that_word_those() -> None:
    assert isinstance(LocalFileRefused("x"), OSError)


@pytest.mark.parametrize("kind", ["link loop", "fifo", "link to /dev/zero", "20 GB sparse file", "dangling link"])
def test_inspect_image_refuses_before_opening(tmp_path: Path, kind: str) -> None:
    path = _planted(tmp_path, kind)
    with pytest.raises(InputImageError) as caught:
        inspect_image(path)
    expected = KINDS[kind][2]
    assert expected is not None and expected in str(caught.value)


# --- the manifest --------------------------------------------------------------------------------------------------


def _manifest_text(written: str) -> str:
    return (
        "model: flux-kontext-max\n"
        "jobs:\n"
        "  - id: first\n"
        "    prompt: Make it snow\n"
        f"    input_image: {json.dumps(written)}\n"
        f"  - {{id: second, prompt: Make it rain, input_image: {json.dumps(written)}}}\n"
    )


def test_the_manifest_never_hashes_what_it_refuses(tmp_path: Path) -> None:
    _sparse(tmp_path / "in.png")
    hashed: list[Path] = []

    def hash_file(path: Path) -> str:
        hashed.append(path)
        return "0" * 64

    with pytest.raises(LocalPathError) as caught:
        parse_manifest(_manifest_text("in.png"), path=tmp_path / "m.yaml", hash_file=hash_file)
    assert hashed == []
    error = caught.value
    assert (error.line, error.jobs, error.file, error.exit_code) == (5, ("first", "second"), "in.png", 2)
    assert str(error) == (
        f"{tmp_path / 'm.yaml'}:5: job 'first': field 'input_image': in.png: is 20 GB; the API takes at most 100 MB "
        "(also used by second)"
    )


def test_a_link_to_a_regular_file_is_the_users_choice_and_is_hashed(tmp_path: Path) -> None:
    _link_to_regular(tmp_path / "in.png")
    manifest = parse_manifest(_manifest_text("in.png"), path=tmp_path / "m.yaml")
    assert {job.image_path for job in manifest.jobs} == {tmp_path / "target.png"}


def test_a_name_with_a_newline_stays_on_one_line(tmp_path: Path) -> None:
    (tmp_path / "in\n.png").symlink_to("in\n.png")
    with pytest.raises(LocalPathError) as caught:
        parse_manifest(_manifest_text("in\n.png"), path=tmp_path / "m.yaml")
    assert "\n" not in str(caught.value) and "'in\\n.png'" in str(caught.value)


# --- the commands, end to end --------------------------------------------------------------------------------------


class _Deadline(BaseException):
    """Raised in the main thread when a command outlives its deadline (a hang on a FIFO, a 20 GB read)."""


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: FrameType | None) -> None:
        raise _Deadline(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


REFUSED = [kind for kind, (_, _, reason) in KINDS.items() if reason is not None]


@pytest.mark.usefixtures("api_key")
@pytest.mark.parametrize("command", ["run", "plan", "validate"])
@pytest.mark.parametrize("kind", REFUSED)
def test_each_command_refuses_a_hostile_path_in_one_line_before_any_request(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str], kind: str, command: str
) -> None:
    sim = threaded_sim(fast_sim())
    path = _planted(tmp_path, kind)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(_manifest_text(os.path.relpath(path, tmp_path)), encoding="utf-8")
    out = tmp_path / "out"
    if command == "run":
        args = run_args(manifest, sim.url, out)
    else:
        args = [command, str(manifest), "--output", str(out), "--api-url", sim.url]
    started = time.monotonic()
    with _deadline(10.0):
        code = main(args)
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    expected = KINDS[kind][2]
    assert expected is not None and expected in lines[0]
    assert f"{manifest}:5: job 'first': field 'input_image'" in lines[0]
    assert sim.stats()["requests"] == 0
    assert elapsed < 5.0


@pytest.mark.parametrize("kind", ["link loop", "20 GB sparse file"])
def test_the_cli_process_answers_a_loop_and_a_sparse_file_in_one_line_quickly(tmp_path: Path, kind: str) -> None:
    # The two cases as first reported: a traceback, and no answer in 30 s. Here as a real process under a timeout.
    _planted(tmp_path, kind)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(_manifest_text("in.png"), encoding="utf-8")
    env = {**os.environ, "EACHLABS_API_KEY": SECRET_KEY}
    env.pop("EACHLABS_API_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "batchrunner", "validate", str(manifest), "--output", str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    expected = KINDS[kind][2]
    assert expected is not None and expected in done.stderr
