"""The environment the command runs in: a log file that breaks, a port it cannot have. One line, never a traceback."""

from __future__ import annotations

import errno
import io
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from batchrunner.cli.main import main
from batchrunner.views.logs import LogFile
from tests.conftest import ThreadedSimulator, fast_sim, images_in, run_args, write_manifest

SimFactory = Callable[..., ThreadedSimulator]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_log_file_on_a_full_disk_is_one_line_and_the_run_goes_on(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str], api_key: str, fmt: str
) -> None:
    sim = threaded_sim(fast_sim())
    manifest = write_manifest(tmp_path, 3, image=False)
    out = tmp_path / "out"
    assert main(run_args(manifest, sim.url, out, "--log-file", "/dev/full", "--log-format", fmt)) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err
    broken = [line for line in err.splitlines() if "cannot write log file /dev/full" in line]
    assert len(broken) == 1 and "no space left on device" in broken[0]
    assert "summary: 3/3 done" in err
    assert len(images_in(out)) == 3


class _Breaks(io.StringIO):
    """A stream that takes ``good`` writes, then fails as a disk that filled up does."""

    def __init__(self, good: int) -> None:
        super().__init__()
        self.good = good

    def write(self, text: str) -> int:
        if self.good <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.good -= 1
        return super().write(text)


@pytest.mark.parametrize("good", [0, 1, 5])
def test_a_log_file_that_breaks_mid_run_is_reported_once_and_gets_no_more_lines(tmp_path: Path, good: int) -> None:
    log = logging.getLogger("batchrunner.test-log-file")
    log.propagate = False
    other = io.StringIO()
    log.addHandler(logging.StreamHandler(other))
    handler = LogFile(tmp_path / "run.log", encoding="utf-8")
    handler.stream = _Breaks(good)  # type: ignore[assignment]  # any text stream will do
    log.addHandler(handler)
    # The handler reports through the runner's logger: give it the same place to write.
    runner_log = logging.getLogger("batchrunner")
    saved = runner_log.handlers[:]
    runner_log.handlers[:] = [logging.StreamHandler(other)]
    try:
        for n in range(10):
            log.warning("line %d", n)
    finally:
        runner_log.handlers[:] = saved
        log.handlers.clear()
    text = other.getvalue()
    assert text.count("cannot write log file") == 1 and "no space left on device" in text
    assert text.count("line ") == 10  # the other handler got every line
    assert handler.broken


@pytest.mark.parametrize(
    ("port", "message"),
    [
        ("99999", "not a TCP port (0 to 65535)"),
        ("65536", "not a TCP port (0 to 65535)"),
        ("-1", "not a whole number"),
        ("http", "not a whole number"),
        ("8787.5", "not a whole number"),
    ],
)
def test_simulate_on_an_invalid_port_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], port: str, message: str
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["simulate", f"--port={port}"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_simulate_on_a_busy_port_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str], host: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["simulate", "--host", host, "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"batchrunner: cannot listen on {host}:{port}: {os.strerror(errno.EADDRINUSE)}"


def test_simulate_on_a_host_that_is_not_this_machine_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--host", "192.0.2.1", "--port", "0"]) == 2  # TEST-NET-1: never a local address
    err = capsys.readouterr().err
    assert err.startswith("batchrunner: cannot listen on 192.0.2.1:0: ") and len(err.strip().splitlines()) == 1
