"""The SQLite store in tables: the same decisions as the in-memory state, a grant's cost independent of the window,
and a database of the first (whole-state JSON) format carried over with one log line."""

from __future__ import annotations

import json
import logging
import random
import sqlite3
from pathlib import Path

import pytest

from batchrunner.cli.main import main
from batchrunner.limits.account import (
    AccountState,
    Decision,
    Lease,
    TimeList,
    View,
    expire,
    join,
    record_history,
    request,
    settle_grant,
    view,
)
from batchrunner.limits.sqlitestore import SqliteStore, _Times, account_id
from tests.conftest import SECRET_KEY, fast_sim, images_in, run_args, write_manifest
from tests.test_account_e2e import SimFactory


def lease(name: str, *, count: int = 3, period: float = 1.0, label: str | None = None) -> Lease:
    return Lease(
        id=name,
        label=label or f"/out/{name}",
        pid=1,
        host="",
        pid_start="",
        started=0.0,
        beat=0.0,
        ttl=10.0,
        hold=2.0,
        timeout=5.0,
        count=count,
        period=period,
        margin=0.0,
        concurrency=2,
    )


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "account-x.sqlite3"


def test_the_grants_table_answers_as_the_sorted_list_does(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "t.sqlite3", isolation_level=None)
    conn.execute("CREATE TABLE grants (t REAL NOT NULL)")
    conn.execute("CREATE INDEX grants_t ON grants (t)")
    table, memory = _Times(conn, 0), TimeList()
    rng = random.Random(7)
    for step in range(400):
        op = rng.random()
        if op < 0.6:
            t = round(rng.uniform(0, 50), 1)
            table.add(t)
            memory.add(t)
        elif op < 0.7:
            cut, keep = rng.uniform(0, 30), rng.randint(1, 40)
            table.trim(cut, keep)
            memory.trim(cut, keep)
        elif op < 0.75:
            now = rng.uniform(20, 50)
            table.clamp(now)
            memory.clamp(now)
        assert len(table) == len(memory), step
        if memory:
            index = rng.randrange(-len(memory), len(memory))
            assert table.nth(index) == memory.nth(index)
            probe = rng.uniform(0, 50)
            assert table.count_le(probe) == memory.count_le(probe)
            assert table.run(index % len(memory), 5) == memory.run(index % len(memory), 5)
    assert list(table) == list(memory)


async def test_decisions_through_sqlite_are_the_in_memory_ones(db: Path) -> None:
    """The same random run of three leases on the tables and on the in-memory state: every decision, grant id and
    view the same."""
    clock = [0.0]
    store = SqliteStore.open(db, clock=lambda: clock[0])
    memory = AccountState()
    rng = random.Random(3)
    try:
        for name in ("a", "b", "c"):
            entered = lease(name)
            await store.transact(lambda state, now, entered=entered: join(state, now, entered))  # type: ignore[misc]
            join(memory, 0.0, lease(name))
        on_wire: list[str] = []
        for _ in range(300):
            clock[0] += rng.uniform(0.0, 0.2)
            now = clock[0]
            name = rng.choice("abc")

            settle = bool(on_wire) and rng.random() < 0.5

            def step(state: AccountState, now: float, name: str = name, settle: bool = settle) -> tuple[Decision, View]:
                expire(state, now)
                state.leases[name].beat = now
                if settle:
                    settle_grant(state, now, on_wire[0])
                return request(state, now, name, grant=True, slot=False), view(state, now, name)

            got = await store.transact(step)
            assert got == step(memory, now)
            decision = got[0]
            if settle:
                on_wire.pop(0)
            if decision.grant_id is not None:
                on_wire.append(decision.grant_id)
    finally:
        await store.close()


class _Steps:
    """SQLite virtual-machine steps, counted by the progress handler: the work a statement does, whatever its
    wall time on a loaded machine."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.n = 0
        conn.set_progress_handler(self._tick, 1)

    def _tick(self) -> int:
        self.n += 1
        return 0


@pytest.mark.parametrize("count", [60, 6000])
async def test_a_grant_costs_the_same_however_many_grants_the_window_holds(db: Path, count: int) -> None:
    store = SqliteStore.open(db, clock=lambda: 100.0)
    try:
        await store.transact(lambda state, now: join(state, now, lease("a", count=2 * count, period=10.0)))
        await store.transact(lambda state, now: record_history(state, now, [95.0 + i / count for i in range(count)]))
        steps = _Steps(store._conn)

        def take(state: AccountState, now: float) -> tuple[Decision, View]:
            expire(state, now)
            state.leases["a"].beat = now
            return request(state, now, "a", grant=True, slot=False), view(state, now, "a")

        decision, seen = await store.transact(take)
        assert decision.granted and seen.in_window == count
        # About 2,000 steps at either size (an index seek is a few dozen): a walk over the window would be 10^5.
        assert steps.n < 4000, steps.n
    finally:
        await store.close()


def old_format_state() -> dict[str, object]:
    """What the first version of the store kept in the ``account`` row: the whole state, as JSON."""
    state = AccountState()
    join(state, 10.0, lease("killed", label="/out/x"))
    request(state, 10.0, "killed", grant=False, slot=True)
    granted = request(state, 10.0, "killed", grant=True, slot=False)
    assert granted.grant_id is not None
    settle_grant(state, 10.5, granted.grant_id)
    request(state, 10.6, "killed", grant=True, slot=False)  # on the wire when it was killed
    return state.to_json()


def write_old_db(path: Path, data: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE account (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER, state TEXT)")
        conn.execute("INSERT INTO account VALUES (1, 7, ?)", (json.dumps(data),))


async def test_a_database_of_the_first_format_is_carried_over_with_one_log_line(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_old_db(db, old_format_state())
    with caplog.at_level(logging.WARNING, logger="batchrunner"):
        store = SqliteStore.open(db, clock=lambda: 11.0)
        try:
            state_of = await store.transact(
                lambda state, now: (dict(state.leases), list(state.times), len(state.pending))
            )
            again = await store.transact(lambda state, now: list(state.leases))
        finally:
            await store.close()
    leases, times, pending = state_of
    assert list(leases) == ["killed"] and leases["killed"].held == 1
    assert times == [10.5] and pending == 1
    assert again == ["killed"]
    carried = [r for r in caplog.records if "earlier version" in r.getMessage()]
    assert len(carried) == 1 and "\n" not in carried[0].getMessage()
    row = sqlite3.connect(db).execute("SELECT state FROM account").fetchone()[0]
    assert json.loads(row)["v"] == 2


def test_a_run_on_a_database_of_the_first_format_goes_on_with_one_line(
    tmp_path: Path, threaded_sim: SimFactory, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("EACHLABS_API_KEY", SECRET_KEY)
    sim = threaded_sim(fast_sim())
    path = tmp_path / "state" / "batchrunner" / f"account-{account_id(sim.url, SECRET_KEY)}.sqlite3"
    write_old_db(path, old_format_state())
    manifest = write_manifest(tmp_path, 2)
    assert main(run_args(manifest, sim.url, tmp_path / "out")) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert sum("earlier version" in line for line in err.splitlines()) == 1
    assert len(images_in(tmp_path / "out")) == 2
