"""Shared fixtures: manifests on disk, the simulator in a background thread, and a runner driven in-process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from batchrunner.sim.server import SimConfig, Simulator

# A key that must never show up in any log line, ledger line or error message.
SECRET_KEY = "sk-test-SECRET-4f1c9a7e"


def make_image(path: Path, colour: tuple[int, int, int] = (200, 80, 40), size: tuple[int, int] = (64, 48)) -> Path:
    """A small real image on disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def write_manifest(folder: Path, jobs: int, *, name: str = "batch", extra: str = "", image: bool = True) -> Path:
    """A manifest of ``jobs`` jobs: one local image (optional) x ``jobs`` seeds."""
    lines = ["model: flux-kontext-max"]
    if extra:
        lines.append(extra)
    lines.append("matrix:")
    if image:
        make_image(folder / "images" / "in.png")
        lines.append("  input_image: [images/in.png]")
    lines.append('  prompt: ["Turn the scene into a snowy winter evening"]')
    lines.append(f"  seed: [{', '.join(str(i) for i in range(jobs))}]")
    path = folder / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@dataclass
class ThreadedSimulator:
    """A simulator serving from its own thread and event loop, so blocking code (the CLI, subprocesses) can use it."""

    sim: Simulator
    url: str
    loop: asyncio.AbstractEventLoop

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the simulator's loop (for reading consistent stats)."""

        async def wrapper() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(timeout=10)

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call(self.sim.stats.to_json)
        return result


@contextlib.contextmanager
def serve_in_thread(config: SimConfig | None = None) -> Iterator[ThreadedSimulator]:
    """A simulator on 127.0.0.1 in its own thread and loop, for as long as the ``with`` block lasts."""
    loop = asyncio.new_event_loop()
    sim = Simulator(config or SimConfig())
    ready = threading.Event()
    box: dict[str, str] = {}

    def serve() -> None:
        asyncio.set_event_loop(loop)
        box["url"] = loop.run_until_complete(sim.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10), "simulator did not start"
    try:
        yield ThreadedSimulator(sim, box["url"], loop)
    finally:
        asyncio.run_coroutine_threadsafe(sim.stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@pytest.fixture
def threaded_sim() -> Iterator[Callable[..., ThreadedSimulator]]:
    """Factory: ``threaded_sim(SimConfig(...))`` starts a simulator on 127.0.0.1 in a thread; all stop at teardown."""
    with contextlib.ExitStack() as stack:

        def start(config: SimConfig | None = None) -> ThreadedSimulator:
            return stack.enter_context(serve_in_thread(config))

        yield start


def fast_sim(**overrides: Any) -> SimConfig:
    """A simulator with millisecond predictions and limits loose enough not to bind unless a test says so."""
    base: dict[str, Any] = {
        "min_seconds": 0.005,
        "max_seconds": 0.03,
        "rate_count": 1000,
        "rate_period": 1.0,
        "concurrency": 10,
        "image_size": 32,
    }
    base.update(overrides)
    return SimConfig(**base)


def run_args(manifest: Path, url: str, out: Path, *extra: str) -> list[str]:
    """Command-line arguments for a fast run against a simulator at ``url``."""
    return [
        "run",
        str(manifest),
        "--api-url",
        url,
        "--output",
        str(out),
        "--poll-initial",
        "0.01",
        "--progress",
        "none",
        "--rate-limit",
        "1000/1",
        "--reconcile-wait",
        "0.02s",
        *extra,
    ]


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    """The test key in the environment, and no API URL from the outside world."""
    monkeypatch.setenv("EACHLABS_API_KEY", SECRET_KEY)
    monkeypatch.delenv("EACHLABS_API_URL", raising=False)
    return SECRET_KEY


def images_in(out: Path) -> list[Path]:
    """The result images in an output folder."""
    return sorted(p for p in out.iterdir() if p.suffix in {".png", ".jpg", ".webp", ".gif"})


def start_runner(manifest: Path, url: str, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    """``batchrunner run`` in a child process, so a test can signal or kill it."""
    env = {**os.environ, "EACHLABS_API_KEY": SECRET_KEY}
    args = [sys.executable, "-m", "batchrunner", *run_args(manifest, url, out, *extra)]
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for_ledger(out: Path, needle: bytes, proc: subprocess.Popen[bytes], count: int = 1) -> None:
    """Wait until the ledger holds ``needle`` ``count`` times (or the runner has ended)."""
    deadline = time.monotonic() + 20
    ledger = out / "ledger.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if ledger.exists() and ledger.read_bytes().count(needle) >= count:
            return
        time.sleep(0.01)
    if proc.poll() is None:
        raise AssertionError(f"never saw {needle!r} {count} times")
