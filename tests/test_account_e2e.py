"""Several runs on one key at once, as processes, against one simulator whose limits bind: through the local SQLite
store, and through a real redis-server (each process with a state folder of its own, so only Redis coordinates them).

The helpers here are also the benchmark's (``tests/account_bench.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from batchrunner.cli.main import main
from batchrunner.sim.config import SimConfig
from tests.conftest import SECRET_KEY, ThreadedSimulator, fast_sim, images_in, run_args, write_manifest

SimFactory = Callable[..., ThreadedSimulator]
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
needs_redis = pytest.mark.skipif(not os.path.exists(REDIS_SERVER), reason="redis-server is not installed")
# The account's limits in these tests: small enough to bind within a second or two.
RATE = "60/1"
SLOTS = 4


# --------------------------------------------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    """A real redis-server on a free loopback port, no persistence, for as long as the block lasts; yields its URL."""
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with (folder / "redis.log").open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=folder, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.ping():
                    break
            except redis.RedisError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start: {(folder / 'redis.log').read_text()}") from None
                time.sleep(0.02)
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Run:
    """One ``batchrunner run`` process and where it writes."""

    proc: subprocess.Popen[bytes]
    out: Path
    jobs: int
    stderr: Path

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout=timeout)

    def log(self) -> str:
        return self.stderr.read_text(encoding="utf-8", errors="replace")


def start_run(
    folder: Path, url: str, jobs: int, *extra: str, store: str | None = None, state: Path | None = None
) -> Run:
    """A run of a manifest of ``jobs`` jobs of its own in ``folder``, at the account's limits, as a process."""
    manifest = write_manifest(folder, jobs)
    out = folder / "out"
    env = {**os.environ, "EACHLABS_API_KEY": SECRET_KEY, "XDG_STATE_HOME": str(state or folder.parent / "state")}
    env.pop("BATCHRUNNER_LIMITS_STORE", None)
    # The first polls, before a run has learnt prediction times, go at --poll-initial: each run learns on its own,
    # so a first poll far below the simulator's typical time would cost three runs three times the union's.
    limits = ("--rate-limit", RATE, "--concurrency", str(SLOTS), "--poll-initial", "0.05")
    args = run_args(manifest, url, out, *limits, *extra)
    if store is not None:
        args += ["--limits-store", store]
    stderr = folder / "stderr.log"
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "batchrunner", *args], env=env, stdout=subprocess.DEVNULL, stderr=err
        )
    return Run(proc, out, jobs, stderr)


def ledger_events(out: Path) -> list[dict[str, Any]]:
    lines = (out / "ledger.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def batch_seconds(outs: Sequence[Path]) -> float:
    """From the first ``run_started`` to the last ``run_finished`` of the runs' ledgers: the batch's makespan, without
    the interpreter's start-up, which says nothing of the limiter."""
    starts, ends = [], []
    for out in outs:
        for event in ledger_events(out):
            moment = datetime.fromisoformat(event["ts"]).timestamp()
            if event["event"] == "run_started":
                starts.append(moment)
            elif event["event"] == "run_finished":
                ends.append(moment)
    return max(ends) - min(starts)


def sim_config(**overrides: Any) -> SimConfig:
    """The API's limits, binding: the same as the runs'."""
    base: dict[str, Any] = {"rate_count": 60, "rate_period": 1.0, "concurrency": SLOTS, "max_seconds": 0.12}
    base.update(overrides)
    return fast_sim(**base)


@contextlib.contextmanager
def account_store(kind: str, tmp_path: Path) -> Iterator[tuple[str | None, Callable[[int], Path]]]:
    """The store the runs share, and each run's state folder: one for all with SQLite (the database is the store),
    one per run with Redis (so that only Redis can coordinate them)."""
    if kind == "sqlite":
        yield None, lambda i: tmp_path / "state"
    else:
        with redis_server(tmp_path / "redis") as url:
            yield url, lambda i: tmp_path / f"state-{i}"


def run_three(
    sim: ThreadedSimulator, tmp_path: Path, store: str | None, state: Callable[[int], Path], jobs: int
) -> list[Run]:
    runs = [start_run(tmp_path / f"run{i}", sim.url, jobs, store=store, state=state(i)) for i in range(3)]
    for run in runs:
        assert run.wait() == 0, run.log()
    return runs


# --------------------------------------------------------------------------------------------------- done when
@pytest.mark.parametrize("kind", ["sqlite", pytest.param("redis", marks=needs_redis)])
def test_three_runs_on_one_key_keep_the_accounts_limits_and_lose_little_time(
    kind: str, tmp_path: Path, threaded_sim: SimFactory
) -> None:
    jobs = 16
    with account_store(kind, tmp_path) as (store, state):
        sim = threaded_sim(sim_config())
        runs = run_three(sim, tmp_path / "three", store, state, jobs)
        stats = sim.stats()
        union_sim = threaded_sim(sim_config())
        union = start_run(tmp_path / "union", union_sim.url, 3 * jobs, store=store, state=state(9))
        assert union.wait() == 0, union.log()
    assert stats["rate_limited"] == 0 and stats["concurrency_rejected"] == 0
    assert stats["max_window"] <= 60 and stats["max_in_flight"] <= SLOTS
    for run in runs:
        assert len(images_in(run.out)) == jobs
        assert "refused with 429" not in run.log()
    # How long the three take against one run of the union is measured by `python -m tests.account_bench`, not
    # asserted here: a timed test on a shared machine says more about the machine than about the runner. What must
    # hold every time: the three finish together in no more time than three runs one after the other would take.
    three, one = batch_seconds([run.out for run in runs]), batch_seconds([union.out])
    assert three < 3 * one, (three, one)


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("redis", marks=needs_redis)])
def test_a_run_killed_mid_batch_keeps_its_running_predictions_slots_from_the_others(
    kind: str, tmp_path: Path, threaded_sim: SimFactory
) -> None:
    # Predictions long enough to outlive the kill: if the others took their slots, the server would refuse creates.
    sim = threaded_sim(sim_config(min_seconds=0.3, max_seconds=0.6))
    with account_store(kind, tmp_path) as (store, state):
        runs = [start_run(tmp_path / f"run{i}", sim.url, 8, store=store, state=state(i)) for i in range(3)]
        victim = runs[0]
        deadline = time.monotonic() + 20
        while victim.proc.poll() is None and time.monotonic() < deadline:
            ledger = victim.out / "ledger.jsonl"
            if ledger.exists() and ledger.read_bytes().count(b'"submitted"') >= 2:
                break
            time.sleep(0.005)
        victim.proc.send_signal(signal.SIGKILL)
        victim.wait()
        for run in runs[1:]:
            assert run.wait() == 0, run.log()
        stats = sim.stats()
        # Nothing is left behind that blocks a later run: the killed one resumes and finishes.
        again = start_run(tmp_path / "run0", sim.url, 8, store=store, state=state(0))
        assert again.wait() == 0, again.log()
    assert stats["concurrency_rejected"] == 0 and stats["rate_limited"] == 0, stats
    assert stats["max_in_flight"] <= SLOTS and stats["max_window"] <= 60
    for run in runs:
        assert len(images_in(run.out)) == 8


# --------------------------------------------------------------------------------------------------- sharing
def test_runs_that_disagree_on_the_limits_keep_the_strictest_and_say_so(
    tmp_path: Path, threaded_sim: SimFactory
) -> None:
    sim = threaded_sim(sim_config(concurrency=2, min_seconds=0.05, max_seconds=0.15))
    # The strict run is on the key first and has more to do: the loose one is never on the key alone.
    strict = start_run(tmp_path / "strict", sim.url, 40, "--concurrency", "2")
    time.sleep(0.3)
    loose = start_run(tmp_path / "loose", sim.url, 3, "--concurrency", "6")
    assert strict.wait() == 0 and loose.wait() == 0, loose.log()
    stats = sim.stats()
    assert stats["concurrency_rejected"] == 0 and stats["max_in_flight"] <= 2
    assert "the account keeps the strictest" in loose.log()


def test_account_shows_the_runs_on_the_key_and_their_slots(
    tmp_path: Path, threaded_sim: SimFactory, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("EACHLABS_API_KEY", SECRET_KEY)
    sim = threaded_sim(sim_config(min_seconds=0.3, max_seconds=0.5))
    run = start_run(tmp_path / "run", sim.url, 12)
    seen: dict[str, Any] = {}
    deadline = time.monotonic() + 20
    while run.proc.poll() is None and time.monotonic() < deadline:
        assert main(["account", "--api-url", sim.url, "--json"]) == 0
        seen = json.loads(capsys.readouterr().out)
        if seen["live_runs"] == 1 and seen["in_flight"] > 0:
            break
        time.sleep(0.05)
    assert run.wait() == 0
    assert seen["live_runs"] == 1 and 0 < seen["in_flight"] <= SLOTS
    (mine,) = seen["runs"]
    assert mine["folder"] == str((tmp_path / "run" / "out").resolve()) and mine["this_machine"]
    assert seen["rate_limit"] == RATE and seen["concurrency"] == SLOTS
    assert main(["account", "--api-url", sim.url]) == 0
    text = capsys.readouterr().out
    assert "no run is on this key now" in text and SECRET_KEY not in text


# --------------------------------------------------------------------------------------------------- 429s
def test_every_429_is_counted_in_the_summary_the_json_logs_and_the_ledger(
    tmp_path: Path, threaded_sim: SimFactory, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("EACHLABS_API_KEY", SECRET_KEY)
    # Something else spends the key: the server has room for one prediction, the run thinks four.
    sim = threaded_sim(fast_sim(concurrency=1, min_seconds=0.05, max_seconds=0.1))
    manifest = write_manifest(tmp_path, 6)
    out = tmp_path / "out"
    code = main(run_args(manifest, sim.url, out, "--concurrency", "2", "--log-format", "json", "--quiet"))
    assert code == 0
    refused = sim.stats()["concurrency_rejected"] + sim.stats()["rate_limited"]
    assert refused > 0
    records = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    summary = next(r for r in records if r["message"].startswith("summary:"))
    assert summary["rate_limited"] == refused and summary["level"] == "warning"
    assert f"{refused} refused with 429" in summary["message"]
    finished = [e for e in ledger_events(out) if e["event"] == "run_finished"]
    assert finished[-1]["rate_limited"] == refused


# --------------------------------------------------------------------------------------------------- failures
def test_redis_unreachable_at_start_is_one_line_and_exit_2(
    tmp_path: Path, threaded_sim: SimFactory, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("EACHLABS_API_KEY", SECRET_KEY)
    sim = threaded_sim(fast_sim())
    manifest = write_manifest(tmp_path, 2)
    store = f"redis://127.0.0.1:{free_port()}/0"
    assert main(run_args(manifest, sim.url, tmp_path / "out", "--limits-store", store)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("batchrunner: cannot reach the limits store redis://127.0.0.1:")
    assert sim.stats()["requests"] == 0
    monkeypatch.setenv("BATCHRUNNER_LIMITS_STORE", "memcached://x")
    assert main(run_args(manifest, sim.url, tmp_path / "out")) == 2
    assert "--limits-store 'memcached://x'" in capsys.readouterr().err


def test_a_corrupt_sqlite_store_is_one_line_and_exit_74(
    tmp_path: Path, threaded_sim: SimFactory, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from batchrunner.limits.sqlitestore import account_id

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("EACHLABS_API_KEY", SECRET_KEY)
    sim = threaded_sim(fast_sim())
    path = tmp_path / "state" / "batchrunner" / f"account-{account_id(sim.url, SECRET_KEY)}.sqlite3"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00garbage" * 512)
    manifest = write_manifest(tmp_path, 2)
    assert main(run_args(manifest, sim.url, tmp_path / "out")) == 74
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "limits store" in err[0] and "Traceback" not in err[0]
    assert sim.stats()["requests"] == 0


@needs_redis
def test_redis_lost_mid_run_stops_submitting_finishes_what_is_in_flight_and_exits_75(
    tmp_path: Path, threaded_sim: SimFactory
) -> None:
    sim = threaded_sim(sim_config(min_seconds=0.2, max_seconds=0.4))
    with redis_server(tmp_path / "redis") as url:
        run = start_run(tmp_path / "run", sim.url, 40, store=url, state=tmp_path / "state")
        deadline = time.monotonic() + 20
        while run.proc.poll() is None and time.monotonic() < deadline:
            ledger = run.out / "ledger.jsonl"
            if ledger.exists() and ledger.read_bytes().count(b'"submitted"') >= 3:
                break
            time.sleep(0.005)
    # The server is gone; the run finishes the predictions it has running, within the last limits it saw.
    assert run.wait() == 75, run.log()
    log = run.log()
    assert "Traceback" not in log and "the limits store redis://127.0.0.1:" in log
    assert "the store of the key's limits was lost" in log
    stats = sim.stats()
    assert stats["rate_limited"] == 0 and stats["concurrency_rejected"] == 0
    events = ledger_events(run.out)
    finished = events[-1]
    assert finished["event"] == "run_finished" and finished["in_flight"] == 0 and finished["pending"] > 0
    submitted = sum(1 for e in events if e["event"] == "submitted")
    assert finished["succeeded"] == submitted  # every prediction it made was seen through
