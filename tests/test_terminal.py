"""The terminal display end to end: ``batchrunner run`` in a real pseudo-terminal of 80 columns, read back through a
terminal emulator (pyte), with warnings and failures while the bar runs, and a resume."""

from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from batchrunner.cli.main import main
from tests.conftest import SECRET_KEY, ThreadedSimulator, fast_sim, write_manifest

pyte = pytest.importorskip("pyte")

SimFactory = Callable[..., ThreadedSimulator]
pytestmark = pytest.mark.usefixtures("api_key")
COLUMNS, ROWS = 80, 24


def run_in_pty(args: list[str], *, timeout: float = 60.0) -> tuple[int, list[str], list[list[str]]]:
    """Run batchrunner with a pty as its terminal; return its exit code, every line the screen ever held (scrolled
    off included) and the screens seen while it ran."""
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
    env = {**os.environ, "EACHLABS_API_KEY": SECRET_KEY, "TERM": "xterm", "COLUMNS": str(COLUMNS)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchrunner", *args], stdin=follower, stdout=follower, stderr=follower, env=env
    )
    os.close(follower)
    screen = pyte.HistoryScreen(COLUMNS, ROWS, history=2000)
    stream = pyte.ByteStream(screen)
    screens: list[list[str]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.1)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not data:
                break
            stream.feed(data)
            screens.append(list(screen.display))
        elif proc.poll() is not None:
            break
    code = proc.wait(timeout=10)
    os.close(leader)
    scrolled = ["".join(char.data for char in (line[x] for x in range(COLUMNS))) for line in screen.history.top]
    lines = [line.rstrip() for line in [*scrolled, *screen.display]]
    return code, lines, screens


def test_bar_in_a_real_terminal_at_80_columns_with_warnings_and_a_resume(
    tmp_path: Path, threaded_sim: SimFactory
) -> None:
    sim = threaded_sim(fast_sim(failure_rate=0.25, seed=3))
    manifest = write_manifest(tmp_path, 16, image=False)
    out = tmp_path / "out"
    base = ["--api-url", sim.url, "--output", str(out), "--poll-initial", "0.01", "--reconcile-wait", "0.02s"]
    # A first run (no terminal) makes 4: the terminal run resumes.
    assert main(["run", str(manifest), *base, "--progress", "none", "--rate-limit", "1000/1", "--max-jobs", "4"]) == 75
    code, lines, screens = run_in_pty(["run", str(manifest), *base, "--rate-limit", "12/1"])
    text = "\n".join(lines)
    assert code in (0, 1), text
    resume = [line for line in lines if "resuming: " in line]
    assert len(resume) == 1 and "4 done, 12 to go" in resume[0], text
    # The bar is left once, at the end, with its counts whole; no stale copies of it anywhere above.
    bars = [line for line in lines if "█" in line]
    assert len(bars) == 1, text
    assert bars[0].startswith("16/16 ") and "100% in " in bars[0]
    # Failures while the bar ran are lines of their own, in the short format: 12:03:04 error: job ...
    failed = [line for line in lines if ": job " in line and " failed" in line]
    assert failed, text
    assert all(line[2] == line[5] == ":" and line[8] == " " for line in failed)
    assert all(("error: job " in line or "warning: job " in line) for line in failed)
    assert any(line.startswith("summary: ") or " summary: " in line for line in lines), text
    # While it ran, the screen said what the run was waiting for (the window of 12 per second binds) and the counts.
    seen = "\n".join("\n".join(s) for s in screens)
    assert "in flight" in seen and "pending" in seen
    assert "waiting for the rate window" in seen or "sending: " in seen
