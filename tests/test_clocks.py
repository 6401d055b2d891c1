"""Clocks that lie: request times and ledger stamps from the future, and a deadline that holds whatever is awaited.

No case here may stall a run: a time from the future is dropped (the request log) or counted as now (the ledger),
no wait the limiter computes is longer than one window, and ``--max-runtime`` ends every wait.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest

from batchrunner.api.client import Client
from batchrunner.cli.main import main
from batchrunner.engine.runstate import RunConfig
from batchrunner.engine.scheduler import Scheduler
from batchrunner.errors import ApiTimeout
from batchrunner.limits.window import SlidingWindow, default_margin, seed_history
from batchrunner.manifest import load_manifest
from batchrunner.sim.server import Faults
from batchrunner.store.ledger import FUTURE_TOLERANCE, Ledger, RequestLog, read_ledger
from batchrunner.store.output import OutputDir
from tests.conftest import (
    SECRET_KEY,
    ThreadedSimulator,
    fast_sim,
    images_in,
    run_args,
    wait_for_ledger,
    write_manifest,
)

SimFactory = Callable[..., ThreadedSimulator]
pytestmark = pytest.mark.usefixtures("api_key")

NOW = 1_700_000_000.0
WINDOW = 60.0


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- the request log drops times from the future ---------------------------------------------------------------

FUTURE_STAMPS = [
    pytest.param("1e308", id="1e308"),
    pytest.param("9e9", id="year-2255"),
    pytest.param(repr(NOW + 3600), id="an-hour-ahead"),
    pytest.param(repr(NOW + WINDOW * 0.5), id="half-a-window-ahead"),
    pytest.param(repr(NOW + FUTURE_TOLERANCE + 0.5), id="just-past-the-tolerance"),
    pytest.param("1.7976931348623157e308", id="largest-float"),
]


@pytest.mark.parametrize("stamp", FUTURE_STAMPS)
def test_request_times_from_the_future_are_dropped_with_one_warning(
    tmp_path: Path, stamp: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "requests.log"
    path.write_text(f"{NOW - 10}\n{stamp}\n{stamp}\n{NOW - 5}\n")
    log = RequestLog(path, clock=lambda: NOW)
    with caplog.at_level(logging.WARNING, logger="batchrunner"):
        assert log.recent(WINDOW) == [NOW - 10, NOW - 5]
        assert log.recent(WINDOW) == [NOW - 10, NOW - 5]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "ignoring 2 request times later than now" in warnings[0].getMessage()
    assert str(path) in warnings[0].getMessage()


def test_compacting_drops_future_times_so_the_next_run_does_not_warn_again(tmp_path: Path) -> None:
    path = tmp_path / "requests.log"
    path.write_text(f"{NOW - 1}\n1e308\n{NOW + 3600}\n")
    RequestLog(path, clock=lambda: NOW).compact(WINDOW)
    assert path.read_text() == f"{NOW - 1!r}\n"


# --- no limiter wait longer than one window --------------------------------------------------------------------


@pytest.mark.parametrize(
    "ahead",
    [
        pytest.param([0.0] * 60, id="a-full-window-just-now"),
        pytest.param([FUTURE_TOLERANCE * 0.9] * 60, id="a-full-window-within-the-tolerance"),
        pytest.param([FUTURE_TOLERANCE * 0.5], id="one-within-the-tolerance"),
        pytest.param([-30.0] * 59 + [FUTURE_TOLERANCE * 0.9], id="an-old-window-and-one-ahead"),
    ],
)
async def test_a_window_seeded_from_the_request_log_never_waits_longer_than_one_window(
    tmp_path: Path, ahead: list[float]
) -> None:
    out = OutputDir(tmp_path / "out")
    out.create()
    out.prepare()
    log_path = out.requests
    log_path.write_text("".join(f"{NOW + a!r}\n" for a in ahead))
    manifest = load_manifest(write_manifest(tmp_path, 1, image=False))
    config = RunConfig(rate_count=60, rate_period=WINDOW)
    loop_now = 500.0
    with Ledger(out.ledger) as ledger:
        async with aiohttp.ClientSession() as session:
            client = Client(session, base_url="http://127.0.0.1:9", api_key="unused")
            sched = Scheduler(
                manifest,
                client,
                ledger,
                out,
                read_ledger(out.ledger),
                config,
                request_log=RequestLog(log_path, clock=lambda: NOW),
                clock=lambda: loop_now,
                wall=lambda: NOW,
            )
            sched._seed_window()
            assert sched.window.used(loop_now) == len(ahead) - sum(1 for a in ahead if a < -WINDOW)
            # One window, give or take the rounding of times near 1.7e9 s.
            assert 0.0 <= sched.window.delay(loop_now) <= sched.window.window + 1e-6


@pytest.mark.parametrize(
    "stamps",
    [
        pytest.param([1e308], id="1e308"),
        pytest.param([9e9] * 60, id="a-full-window-in-2255"),
        pytest.param([NOW + 3600.0] * 5, id="an-hour-ahead"),
        pytest.param([NOW + WINDOW * 0.5] * 60, id="half-a-window-ahead"),
        pytest.param([NOW - 1.0] * 59 + [math.nextafter(math.inf, 0)], id="largest-float-last"),
        pytest.param([math.nan, math.inf, -math.inf, NOW], id="not-numbers"),
    ],
)
def test_seed_history_bounds_every_wait_by_one_window_whatever_the_log_holds(stamps: list[float]) -> None:
    late = default_margin(WINDOW)
    history = seed_history(stamps, now=10.0, wall_now=NOW, late=late)
    assert all(t <= 10.0 for t in history)
    window = SlidingWindow(60, WINDOW, margin=0.065, history=history)
    assert 0.0 <= window.delay(10.0) <= window.window + 1e-6


def test_seed_history_counts_each_past_send_as_answered_late_after_it() -> None:
    assert seed_history([NOW - 10.0, NOW - 0.1], now=100.0, wall_now=NOW, late=0.5) == [90.5, 100.0]


# --- end to end: a future request time never stalls a run ------------------------------------------------------


@pytest.mark.parametrize("stamp", ["1e308", "9e9", "now+3600", "now+30"])
def test_a_run_with_request_times_from_the_future_finishes_and_warns_once(
    tmp_path: Path, threaded_sim: SimFactory, stamp: str
) -> None:
    sim = threaded_sim(fast_sim())
    manifest = write_manifest(tmp_path, 3, image=False)
    out = tmp_path / "out"
    out.mkdir()
    value = stamp if not stamp.startswith("now") else repr(time.time() + float(stamp[4:]))
    (out / "requests.log").write_text(f"{value}\n" * 70)
    env = {**os.environ, "EACHLABS_API_KEY": SECRET_KEY}
    # A child process: before the fix this run never ended, even under --max-runtime.
    args = [sys.executable, "-m", "batchrunner", *run_args(manifest, sim.url, out, "--rate-limit", "60/60")]
    done = subprocess.run([*args, "--max-runtime", "20s"], env=env, capture_output=True, timeout=40, check=False)
    err = done.stderr.decode()
    assert done.returncode == 0, err
    assert err.count("request time") == 1 and "later than now" in err
    assert len(images_in(out)) == 3


# --- the ledger's stamps from the future bound no hold ---------------------------------------------------------

ORPHAN = "f" * 64


@pytest.mark.parametrize(
    "ledger_lines",
    [
        pytest.param([("submitting", 365 * 86400.0)], id="intent-next-year"),
        pytest.param([("submitting", 86400.0)], id="intent-tomorrow"),
        pytest.param([("submitting", 600.0)], id="intent-ten-minutes-ahead"),
        pytest.param([("submitting", None)], id="intent-in-9999"),
        pytest.param([("create_failed", 365 * 86400.0)], id="lost-answer-next-year"),
        pytest.param([("succeeded-1e300", 0.0)] * 3 + [("submitting", 0.0)], id="durations-of-1e300-s"),
    ],
)
def test_a_ledger_stamp_from_the_future_holds_no_slot_beyond_one_hold(
    tmp_path: Path, threaded_sim: SimFactory, ledger_lines: list[tuple[str, float | None]]
) -> None:
    sim = threaded_sim(fast_sim())
    manifest = write_manifest(tmp_path, 2, image=False)
    out = tmp_path / "out"
    out.mkdir()
    lines = []
    for n, (event, ahead) in enumerate(ledger_lines):
        ts = "9999-12-31T23:59:59.999Z" if ahead is None else _iso(time.time() + ahead)
        record: dict[str, object] = {"ts": ts, "job": f"orphan-{n}", "fingerprint": ORPHAN[:-2] + f"{n:02d}"}
        if event == "succeeded-1e300":
            record.update(event="succeeded", file=f"orphan-{n}.png", duration=1e300)
        elif event == "create_failed":
            record.update(event="create_failed", error="reset", in_doubt=True)
        else:
            record.update(event=event, attempt=1)
        lines.append(json.dumps(record))
    (out / "ledger.jsonl").write_text("\n".join(lines) + "\n")
    started = time.monotonic()
    # One slot: a phantom holding it until its stamp came would stall the batch until the deadline.
    assert main(run_args(manifest, sim.url, out, "--concurrency", "1", "--max-runtime", "8s")) == 0
    assert time.monotonic() - started < 6
    assert len(images_in(out)) == 2


# --- the deadline holds whatever the run waits for -------------------------------------------------------------


def test_the_deadline_ends_a_wait_for_the_request_window(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = threaded_sim(fast_sim())
    manifest = write_manifest(tmp_path, 2, image=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "requests.log").write_text(f"{time.time() - 1!r}\n" * 60)  # a killed run filled the window a second ago
    started = time.monotonic()
    assert main(run_args(manifest, sim.url, out, "--rate-limit", "60/60", "--max-runtime", "0.5s")) == 75
    assert time.monotonic() - started < 3
    assert "stopped by --max-runtime" in capsys.readouterr().err
    assert sim.stats()["requests"] == 0


def test_the_deadline_ends_a_wait_for_a_slow_answer(tmp_path: Path, threaded_sim: SimFactory) -> None:
    sim = threaded_sim(fast_sim(faults=Faults(slow=1.0, slow_seconds=20.0)))
    manifest = write_manifest(tmp_path, 2, image=False)
    started = time.monotonic()
    assert main(run_args(manifest, sim.url, tmp_path / "out", "--max-runtime", "0.5s")) == 75
    assert time.monotonic() - started < 3


def test_a_drain_after_sigterm_still_ends_by_the_deadline(tmp_path: Path, threaded_sim: SimFactory) -> None:
    sim = threaded_sim(fast_sim(faults=Faults(never_finish=1.0)))
    manifest = write_manifest(tmp_path, 2, image=False)
    out = tmp_path / "out"
    env = {**os.environ, "EACHLABS_API_KEY": SECRET_KEY}
    extra = ("--max-runtime", "2s", "--drain-timeout", "60s")
    args = [sys.executable, "-m", "batchrunner", *run_args(manifest, sim.url, out, *extra)]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_ledger(out, b'"event":"submitted"', proc, 2)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 143, err.decode()
    assert time.monotonic() - started < 4
    assert b"2 in flight" in err


@pytest.fixture
async def schema_scheduler(tmp_path: Path) -> AsyncIterator[Callable[[str, RunConfig], Scheduler]]:
    """Factory of schedulers against a client at ``url``, for the schema fetch that comes before a run."""
    manifest = load_manifest(write_manifest(tmp_path, 1, image=False))
    out = OutputDir(tmp_path / "out")
    out.create()
    out.prepare()
    async with aiohttp.ClientSession() as session:
        with Ledger(out.ledger) as ledger:

            def make(url: str, config: RunConfig) -> Scheduler:
                client = Client(session, base_url=url, api_key="k", timeout=30.0)
                return Scheduler(
                    manifest, client, ledger, out, read_ledger(out.ledger), config, request_log=RequestLog(out.requests)
                )

            yield make


async def test_the_schema_fetch_waits_for_the_window_only_until_the_deadline(
    tmp_path: Path, schema_scheduler: Callable[[str, RunConfig], Scheduler]
) -> None:
    (tmp_path / "out" / "requests.log").write_text(f"{time.time() - 1!r}\n" * 60)
    sched = schema_scheduler("http://127.0.0.1:9", RunConfig(rate_count=60, rate_period=60.0, max_runtime=0.3))
    started = time.monotonic()
    with pytest.raises(ApiTimeout, match="deadline"):
        await asyncio.wait_for(sched.fetch_schema("some-model"), 10)
    assert time.monotonic() - started < 2
    assert sched.counters.requests == 0


async def test_the_schema_fetch_waits_for_its_answer_only_until_the_deadline(
    threaded_sim: SimFactory, schema_scheduler: Callable[[str, RunConfig], Scheduler]
) -> None:
    sim = threaded_sim(fast_sim(faults=Faults(slow=1.0, slow_seconds=20.0)))
    sched = schema_scheduler(sim.url, RunConfig(max_runtime=0.3))
    started = time.monotonic()
    with pytest.raises(ApiTimeout, match="deadline"):
        await asyncio.wait_for(sched.fetch_schema("flux-kontext-pro"), 10)
    assert time.monotonic() - started < 2
    # The run that follows keeps the same deadline: it stops at once instead of starting a new clock.
    result = await asyncio.wait_for(sched.run(), 5)
    assert result.stop_reason is not None and result.stop_reason.value == "deadline"
    assert result.creates == 0
