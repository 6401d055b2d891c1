"""The account's pure decisions (account.py) by table on a fake clock, and the SQLite store on a tmp state folder."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from batchrunner.limits import limiter as limiter_module
from batchrunner.limits.account import (
    FULL_RETRY,
    STOCK_TTL,
    AccountLimits,
    AccountState,
    Lease,
    StoreBroken,
    View,
    Waiter,
    account_limits,
    adopt,
    beat,
    decide,
    expire,
    grant_times,
    join,
    leave,
    mark_gone,
    release,
    request,
    settle_grant,
    slots_held,
    view,
)
from batchrunner.limits.limiter import IDLE_REFRESH, TIGHT_REFRESH, AccountLimiter, flush_at_once, refresh_wait
from batchrunner.limits.sqlitestore import SqliteStore, account_id, state_dir

T = TypeVar("T")


def lease(
    name: str,
    *,
    count: int = 3,
    period: float = 1.0,
    concurrency: int = 4,
    label: str | None = None,
    ttl: float = 10.0,
    hold: float = 2.0,
    timeout: float = 5.0,
) -> Lease:
    made = Lease(
        id=name,
        label=label or f"/out/{name}",
        pid=1,
        host="",
        pid_start="",
        started=0.0,
        beat=0.0,
        ttl=ttl,
        hold=hold,
        timeout=timeout,
        count=count,
        period=period,
        margin=0.0,
        concurrency=concurrency,
    )
    _MADE[name] = made
    return made


_MADE: dict[str, Lease] = {}


def account(*leases: Lease, now: float = 0.0) -> AccountState:
    state = AccountState()
    for one in leases:
        join(state, now, one)
    return state


def ask(state: AccountState, now: float, name: str, *, grant: bool = True, slot: bool = False) -> tuple[bool, float]:
    """One transaction of run ``name``: beat, expire, request; the answer as (granted, wait)."""
    expire(state, now)
    beat(state, now, state.leases.get(name) or _MADE[name])
    decision = request(state, now, name, grant=grant, slot=slot)
    return decision.granted, decision.wait


# --------------------------------------------------------------------------------------------------- grants
def test_a_run_alone_has_the_whole_window_and_waits_for_the_first_answer_to_leave_it() -> None:
    state = account(lease("a"))
    ids = []
    for _ in range(3):
        decision = request(state, 0.0, "a", grant=True, slot=False)
        assert decision.granted
        ids.append(decision.grant_id)
    for at, grant_id in zip((0.1, 0.2, 0.3), ids, strict=True):
        settle_grant(state, at, str(grant_id))
    granted, wait = ask(state, 0.5, "a")
    assert not granted and wait == pytest.approx(0.6)  # the first answer, at 0.1, leaves the 1 s window at 1.1
    assert ask(state, 1.1, "a")[0]


def test_grants_on_the_wire_fill_the_window_until_their_answers() -> None:
    state = account(lease("a", ttl=100.0, timeout=100.0))
    for _ in range(3):
        assert ask(state, 0.0, "a")[0]
    assert ask(state, 50.0, "a") == (False, FULL_RETRY)  # unanswered: inside every window, however late


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        # a and b want grants of a 2-per-second window full until 1.0 and 1.1: a asked first, b's time is 1.1.
        ([("a", 0.2), ("b", 0.3), ("b", 1.0), ("a", 1.0), ("b", 1.1)], [False, False, False, True, True]),
        # a dawdles: b's own time (room for a and for b) comes at 1.1, and b takes it; a still has its place.
        ([("a", 0.2), ("b", 0.3), ("b", 1.1), ("a", 1.15)], [False, False, True, True]),
    ],
)
def test_runs_are_served_in_the_order_they_asked(steps: list[tuple[str, float]], expected: list[bool]) -> None:
    state = full_window()
    got = [ask(state, t, name)[0] for name, t in steps]
    assert got == expected


def full_window() -> AccountState:
    """Runs a and b on a 2-per-second window whose answers came at 0.0 and 0.1."""
    state = account(lease("a", count=2), lease("b", count=2))
    for t in (0.0, 0.1):
        settle_grant(state, t, str(request(state, t, "a", grant=True, slot=False).grant_id))
    return state


def test_a_run_told_to_wait_for_its_turn_is_told_when() -> None:
    state = full_window()
    granted, wait = ask(state, 0.2, "a")
    assert not granted and wait == pytest.approx(0.8)  # the 0.0 answer leaves at 1.0
    granted, wait = ask(state, 0.3, "b")
    assert not granted and wait == pytest.approx(0.8)  # behind a: the 0.1 answer leaves at 1.1
    assert decide(state, 0.3, "b", grant=True, slot=False).why == "turn"


def test_a_place_in_line_lapses_when_its_run_does_not_come_back_in_time() -> None:
    state = full_window()
    ask(state, 0.2, "a")  # told 1.0; its place is kept until 1.0 + TURN_GRACE
    ask(state, 0.3, "b")
    expire(state, 1.05)
    assert [w.lease for w in state.line] == ["a", "b"]
    expire(state, 1.15)
    assert [w.lease for w in state.line] == ["b"]


def test_no_run_starves_among_three_that_ask_all_the_time() -> None:
    state = account(lease("a", count=2), lease("b", count=2), lease("c", count=2))
    got = {"a": 0, "b": 0, "c": 0}
    t = 0.0
    while t < 30.0:
        for name in ("a", "b", "c"):  # a always asks first within a tick: a plain race would give it everything
            expire(state, t)
            beat(state, t, state.leases[name])
            decision = request(state, t, name, grant=True, slot=False)
            if decision.granted:
                got[name] += 1
                settle_grant(state, t + 0.01, str(decision.grant_id))
        t = round(t + 0.01, 2)
    assert sum(got.values()) == pytest.approx(60, abs=2)
    assert min(got.values()) >= 18


def test_randomised_runs_never_put_more_than_count_in_any_window_the_server_sees() -> None:
    """Several runs, random latencies: the server stamps each request between its grant and its answer."""
    for seed in range(20):
        rng = random.Random(seed)
        names = ["a", "b", "c"]
        state = account(*(lease(n, count=4, period=1.0) for n in names))
        arrivals: list[float] = []
        wire: list[tuple[float, str, float]] = []  # (answer time, grant id, arrival)
        t = 0.0
        while t < 10.0:
            for answer, grant_id, _arrival in [w for w in wire if w[0] <= t]:
                settle_grant(state, answer, grant_id)
            wire = [w for w in wire if w[0] > t]
            name = rng.choice(names)
            expire(state, t)
            beat(state, t, state.leases[name])
            decision = request(state, t, name, grant=True, slot=False)
            if decision.granted:
                latency = rng.uniform(0.001, 0.3)
                arrival = t + rng.uniform(0.0, latency)
                arrivals.append(arrival)
                wire.append((t + latency, str(decision.grant_id), arrival))
            t += rng.uniform(0.0, 0.05)
        arrivals.sort()
        busiest = max(sum(1 for a in arrivals if s - 1.0 < a <= s) for s in arrivals)
        assert busiest <= 4, seed
        assert len(arrivals) > 30


def test_at_large_limits_a_granted_run_takes_a_stock_ahead_that_counts_as_pending() -> None:
    state = account(lease("a", count=6000, period=6.0, concurrency=1000))
    decision = request(state, 0.0, "a", grant=True, slot=True, extra=64)
    assert decision.granted and len(decision.more) == 64 and decision.more_slots == 64
    assert len(state.pending) == 65 and state.leases["a"].held == 65
    assert state.pending.take(decision.more[0]).deadline == pytest.approx(STOCK_TTL + 5.0)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("count", "concurrency", "extra", "grants", "slots"),
    [
        (3, 4, 64, 0, 0),  # small limits: an eighth of what is free is nothing
        (6000, 4, 64, 0, 0),  # a create's stock is bounded by the slots free
        (6000, 1000, 0, 0, 0),  # not asked for
        (160, 1000, 64, 19, 19),  # an eighth of the 159 grants left free
    ],
)
def test_a_stock_is_a_sliver_of_what_is_free_now(
    count: int, concurrency: int, extra: int, grants: int, slots: int
) -> None:
    state = account(lease("a", count=count, concurrency=concurrency))
    decision = request(state, 0.0, "a", grant=True, slot=True, extra=extra)
    assert decision.granted and (len(decision.more), decision.more_slots) == (grants, slots)


def test_no_stock_is_taken_while_another_run_waits_in_line() -> None:
    state = account(lease("a", count=6000, concurrency=1), lease("b", count=6000, concurrency=1))
    assert ask(state, 0.0, "a", slot=True)[0]
    assert not ask(state, 0.0, "b", slot=True)[0]  # b waits for a slot
    release(state, "a")
    assert request(state, 0.0, "a", grant=True, slot=True, extra=64).more == ()  # b is first for the slot
    assert len(request(state, 0.0, "a", grant=True, slot=False, extra=64).more) > 0  # grants alone: b is not in line
    state.line.append(Waiter("b", 1.0))
    assert request(state, 0.0, "a", grant=True, slot=False, extra=64).more == ()


def test_grant_times_plan_the_next_grants_without_taking_them() -> None:
    limits = AccountLimits(count=2, period=1.0, margin=0.0, concurrency=1)
    assert grant_times([0.0, 0.5], 0.5, 0, 0.2, 3, limits) == [1.0, 1.5, 2.0]
    assert grant_times([], -math.inf, 2, 0.2, 1, limits) == [math.inf]


# --------------------------------------------------------------------------------------------------- limits
def test_the_account_keeps_the_strictest_of_each_part_of_the_runs_limits() -> None:
    state = account(lease("a", count=60, period=60.0, concurrency=10), lease("b", count=10, period=5.0, concurrency=4))
    assert account_limits(state, 1.0) == AccountLimits(count=10, period=60.0, margin=0.0, concurrency=4)
    leave(state, 2.0, "b")
    assert account_limits(state, 2.0) == AccountLimits(count=60, period=60.0, margin=0.0, concurrency=10)


# --------------------------------------------------------------------------------------------------- slots
def test_slots_are_the_sum_over_every_run() -> None:
    state = account(lease("a", concurrency=3), lease("b", concurrency=3))
    assert ask(state, 0.0, "a", grant=False, slot=True)[0]
    assert ask(state, 0.0, "b", grant=False, slot=True)[0]
    assert ask(state, 0.0, "b", grant=False, slot=True)[0]
    assert slots_held(state, 0.0) == 3
    assert decide(state, 0.0, "a", grant=True, slot=True).why == "slots"
    release(state, "b")
    assert ask(state, 0.1, "a", grant=False, slot=True)[0]


def test_a_slot_goes_to_the_run_that_waited_for_it_first() -> None:
    state = account(lease("a", concurrency=1), lease("b", concurrency=1), lease("c", concurrency=1))
    assert ask(state, 0.0, "c", grant=False, slot=True)[0]
    assert not ask(state, 0.1, "a", grant=False, slot=True)[0]  # a waits first
    assert not ask(state, 0.2, "b", grant=False, slot=True)[0]
    release(state, "c")
    assert not ask(state, 0.3, "b", grant=False, slot=True)[0]  # b is behind a
    assert view(state, 0.3, "b").free() == 0 and view(state, 0.3, "a").free() == 1
    assert ask(state, 0.35, "a", grant=False, slot=True)[0]


@pytest.mark.parametrize(
    ("now", "held"),
    [
        (5.0, 2),  # killed at 0.5 (its last beat), but still live by its ttl
        (10.4, 2),  # not live any more: its predictions may still run until its last beat + hold (12.5)
        (12.6, 0),  # they have surely finished
    ],
)
def test_a_killed_runs_slots_stay_held_until_its_predictions_have_surely_finished(now: float, held: int) -> None:
    state = account(lease("dead", hold=12.0), lease("other"))
    ask(state, 0.5, "dead", grant=False, slot=True)
    ask(state, 0.5, "dead", grant=False, slot=True)
    beat(state, now, state.leases["other"])
    expire(state, now)
    assert slots_held(state, now) == held


def test_a_run_seen_dead_on_this_machine_holds_its_slots_for_its_hold_only() -> None:
    state = account(lease("dead", hold=2.0), lease("other"))
    ask(state, 0.5, "dead", grant=False, slot=True)
    mark_gone(state, {"dead"})
    assert slots_held(state, 2.4) == 1
    expire(state, 2.6)
    assert slots_held(state, 2.6) == 0 and "dead" not in state.leases


@pytest.mark.parametrize(
    ("now", "pending", "recorded"),
    [
        (3.0, 1, []),  # killed at 1.0, still live by its ttl (10 s): on the wire
        (11.5, 1, []),  # gone, but before send + timeout: the request may still be on the wire
        (16.5, 0, [16.0]),  # counted as answered at send + timeout
    ],
)
def test_a_killed_runs_pending_grants_count_as_answered_at_send_plus_timeout(
    now: float, pending: int, recorded: list[float]
) -> None:
    state = account(lease("dead", timeout=15.0, hold=0.0), lease("other"))
    ask(state, 1.0, "dead")
    beat(state, now, state.leases["other"])
    expire(state, now)
    assert len(state.pending) == pending
    assert [t for t in state.times if t > 0] == recorded


def test_no_stale_state_blocks_a_later_run() -> None:
    state = account(lease("old"))
    ask(state, 1.0, "old", grant=False, slot=True)
    for _ in range(2):
        ask(state, 1.0, "old")
    later = lease("new")
    join(state, 100.0, later)
    assert ask(state, 100.0, "new", slot=True)[0]
    assert list(state.leases) == ["new"]


def test_a_resumed_run_takes_over_the_slots_of_the_killed_run_of_its_folder() -> None:
    state = account(lease("killed", label="/out/x"), lease("other"))
    for _ in range(3):  # two predictions and one lost answer
        ask(state, 0.5, "killed", grant=False, slot=True)
    resumed = lease("resumed", label="/out/x")
    join(state, 1.0, resumed)  # the folder's lock says the killed run is gone, though it looks live
    assert not state.leases["killed"].live(1.0)
    adopt(state, 1.0, "resumed", 2)  # its ledger shows two predictions in flight
    assert state.leases["resumed"].held == 2 and state.leases["killed"].held == 1
    assert slots_held(state, 1.0) == 3


def test_a_run_that_leaves_with_predictions_running_keeps_their_slots_for_its_hold() -> None:
    state = account(lease("a", hold=2.0), lease("b"))
    ask(state, 0.0, "a", grant=False, slot=True)
    granted = request(state, 0.0, "a", grant=True, slot=False)
    leave(state, 1.0, "a")
    assert not state.pending and state.times[-1] == 1.0
    assert slots_held(state, 2.9) == 1
    expire(state, 3.1)
    assert "a" not in state.leases
    assert granted.grant_id is not None


def test_a_clock_stepped_back_delays_a_run_one_window_at_most() -> None:
    state = account(lease("a"))
    for _ in range(3):
        ask(state, 500.0, "a")
    for grant_id in list(state.pending):
        settle_grant(state, 500.0, grant_id)
    granted, wait = ask(state, 10.0, "a")  # the clock went back from 500 to 10
    assert not granted and wait <= 1.0 + 1e-9


def test_the_state_reads_back_what_it_wrote() -> None:
    state = account(lease("a"), lease("b"))
    ask(state, 0.0, "a", slot=True)
    ask(state, 0.0, "b")
    ask(state, 0.0, "a")
    back = AccountState.from_json(json.loads(json.dumps(state.to_json())))
    assert back == state
    with pytest.raises(ValueError):
        AccountState.from_json({"v": 99})


# --------------------------------------------------------------------------------------------------- SQLite
@pytest.fixture
def state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return tmp_path / "state" / "batchrunner"


def test_the_state_folder_follows_xdg_and_the_name_never_holds_the_key(state_home: Path) -> None:
    assert state_dir() == state_home
    assert state_dir({"XDG_STATE_HOME": "relative"}) == Path.home() / ".local" / "state" / "batchrunner"
    name = account_id("https://api.example/", "sk-secret-123")
    assert name == account_id("https://api.example", "sk-secret-123") and "secret" not in name
    assert name != account_id("https://api.example", "sk-secret-124")


async def test_two_stores_on_one_file_share_one_state_in_wal_mode(state_home: Path) -> None:
    path = state_home / "account-x.sqlite3"
    one, two = SqliteStore.open(path, clock=lambda: 5.0), SqliteStore.open(path, clock=lambda: 5.0)
    try:
        await one.transact(lambda state, now: join(state, now, lease("a")))
        assert await two.transact(lambda state, now: list(state.leases)) == ["a"]
        mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"
        assert oct(path.stat().st_mode & 0o777) == "0o600"
    finally:
        await one.close()
        await two.close()


def test_a_corrupt_store_is_one_line_and_exit_74(state_home: Path) -> None:
    path = state_home / "account-x.sqlite3"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreBroken) as info:
        SqliteStore.open(path)
    assert info.value.exit_code == 74 and "\n" not in str(info.value)


def test_a_state_row_that_does_not_parse_is_one_line_and_exit_74(state_home: Path) -> None:
    path = state_home / "account-x.sqlite3"
    SqliteStore.open(path)
    with sqlite3.connect(path) as conn:
        conn.execute('UPDATE account SET state = \'{"v": 1, "times": "x"}\'')
    with pytest.raises(StoreBroken) as info:
        SqliteStore.open(path)
    assert info.value.exit_code == 74


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_state_folder_is_one_line_and_exit_74(state_home: Path) -> None:
    state_home.mkdir(parents=True)
    state_home.chmod(0o500)
    try:
        with pytest.raises(StoreBroken) as info:
            SqliteStore.open(state_home / "account-x.sqlite3")
        assert info.value.exit_code == 74
    finally:
        state_home.chmod(0o700)


def test_a_state_folder_that_is_a_file_is_one_line_and_exit_74(state_home: Path) -> None:
    state_home.parent.mkdir(parents=True)
    state_home.write_text("not a folder")
    with pytest.raises(StoreBroken) as info:
        SqliteStore.open(state_home / "account-x.sqlite3")
    assert info.value.exit_code == 74


# --------------------------------------------------------------------------------------------------- the limiter
class _MemoryStore:
    """``Store`` over one in-memory state, counting its transactions."""

    description = "memory"

    def __init__(self) -> None:
        self.state = AccountState()
        self.transactions = 0

    async def transact(self, fn: Callable[[AccountState, float], T]) -> T:
        self.transactions += 1
        return fn(self.state, 100.0)

    async def close(self) -> None:
        pass


@pytest.mark.parametrize(("count", "concurrency", "most"), [(6000, 1000, 20), (60, 4, 100)])
async def test_a_run_at_large_limits_takes_many_requests_per_transaction(
    count: int, concurrency: int, most: int
) -> None:
    store = _MemoryStore()
    limiter = AccountLimiter(store, lease("a", count=count, period=6.0, concurrency=concurrency), loop_time=lambda: 0.0)
    await limiter.join()
    try:
        store.transactions = 0
        taken = 0
        for _ in range(100):
            if await limiter.acquire(grant=True, slot=True):
                limiter.window.take(0.0, pending=True)
                assert limiter.gate.try_acquire()
                taken += 1
        assert taken == min(100, concurrency)
        assert store.transactions <= most
    finally:
        await limiter.close()
    # What was taken ahead and not used went back when the run left: only the requests sent count (recorded at the
    # leave, since none was answered), only the slots used stay held (their predictions may still run).
    assert len(store.state.pending) == 0 and len(store.state.times) == taken
    assert store.state.leases["a"].held == taken


async def _joined(store: _MemoryStore, clock: list[float], *, wants_slot: bool = True) -> AccountLimiter:
    """Run "a" on the account (6000/6, 4 slots), its loop time ``clock[0]``: moved past STOCK_TTL, it makes the run's
    next acquire a transaction (its stock gone stale)."""
    limiter = AccountLimiter(store, lease("a", count=6000, period=6.0, concurrency=4), loop_time=lambda: clock[0])
    limiter.bind(wake=lambda: None, on_lost=lambda exc: None, wants_slot=lambda: wants_slot)
    await limiter.join()
    return limiter


async def _full(limiter: AccountLimiter, concurrency: int) -> None:
    """Take every slot of the account, each with a request sent on its grant."""
    for _ in range(concurrency):
        assert await limiter.acquire(grant=True, slot=True)
        limiter.window.take(0.0, pending=True)
        assert limiter.gate.try_acquire()


async def _gives_back(limiter: AccountLimiter, store: _MemoryStore, clock: list[float], *, held: int) -> None:
    """A prediction of the run frees its slot: the slot is not kept as stock, and the next transaction (a grant's,
    one second later) carries its release to the store, where the run then holds ``held``."""
    in_flight = limiter.gate.in_flight
    limiter.gate.release()
    assert limiter.stock_slots == [] and limiter.gate.in_flight == in_flight - 1
    clock[0] += 1.0
    await limiter.acquire(grant=True, slot=False)
    limiter.give_back()
    assert store.state.leases["a"].held == held


async def _creates_in_freed_slots(limiter: AccountLimiter, creates: int, at: float) -> None:
    """``creates`` times: a prediction of the run finishes, and its next create starts in the slot it freed."""
    for _ in range(creates):
        in_flight = limiter.gate.in_flight
        limiter.gate.release()
        assert limiter.gate.free() >= 1
        assert await limiter.acquire(grant=True, slot=True)
        limiter.window.take(at, pending=True)
        assert limiter.gate.try_acquire()
        assert limiter.gate.in_flight == in_flight


async def test_a_slot_the_run_frees_while_it_has_jobs_to_create_serves_its_next_create_without_a_transaction() -> None:
    store = _MemoryStore()
    clock = [0.0]
    limiter = await _joined(store, clock)
    try:
        await _full(limiter, 4)
        store.transactions = 0
        await _creates_in_freed_slots(limiter, 100, 0.0)
        # Without the reuse each create's slot is a transaction (and each release one more, batched): 100 at least.
        # With it only the grants' stock is refilled, 64 at a time at most.
        assert store.transactions <= 5
        assert store.state.leases["a"].held == 4  # the account never saw the slot free, so no other run took it
    finally:
        await limiter.close()


async def test_a_freed_slot_goes_back_to_the_account_while_another_run_waits_for_one() -> None:
    store = _MemoryStore()
    clock = [0.0]
    limiter = await _joined(store, clock)
    try:
        await _full(limiter, 4)
        join(store.state, 100.0, lease("b", count=6000, period=6.0, concurrency=4))
        refused = request(store.state, 100.0, "b", grant=True, slot=True)
        assert not refused.granted and refused.why == "slots"  # b waits in the slot line
        clock[0] = 1.0
        seen = store.transactions
        assert await limiter.acquire(grant=True, slot=False)
        assert store.transactions == seen + 1  # a's view now shows b waiting
        limiter.give_back()
        await _gives_back(limiter, store, clock, held=3)
        assert request(store.state, 100.0, "b", grant=True, slot=True).granted  # and b gets it
    finally:
        await limiter.close()


async def test_a_freed_slot_goes_back_to_the_account_when_the_run_has_nothing_left_to_create() -> None:
    store = _MemoryStore()
    clock = [0.0]
    limiter = await _joined(store, clock, wants_slot=False)
    try:
        await _full(limiter, 4)
        await _gives_back(limiter, store, clock, held=3)
    finally:
        await limiter.close()


class _StaleningStore(_MemoryStore):
    """A store during whose transaction the run's background task gives its whole stock back (it went stale)."""

    def __init__(self) -> None:
        super().__init__()
        self.limiter: AccountLimiter | None = None
        self.stale_next = False

    async def transact(self, fn: Callable[[AccountState, float], T]) -> T:
        if self.stale_next and self.limiter is not None:
            self.stale_next = False
            self.limiter._drop_stale(0.0, every=True)
        return await super().transact(fn)


@pytest.mark.parametrize("stocked", ["grant", "slot"])
async def test_a_stock_that_goes_stale_while_the_store_answers_is_asked_for_again_not_a_crash(stocked: str) -> None:
    store = _StaleningStore()
    clock = [0.0]
    limiter = await _joined(store, clock)
    store.limiter = limiter
    try:
        await _full(limiter, 1)
        if stocked == "slot":  # a stock slot and no stock grant: the next transaction asks for the grant alone
            limiter.gate.release()
            while limiter.stock:
                assert await limiter.acquire(grant=True, slot=False)
                limiter.window.take(0.0, pending=True)
            assert limiter.stock_slots and limiter.gate.in_flight == 0
        else:  # a stock grant and no stock slot: the next transaction asks for the slot alone
            assert await limiter.acquire(grant=True, slot=False)  # a poll's grant, and grants ahead
            limiter.window.take(0.0, pending=True)
            assert limiter.stock and not limiter.stock_slots
        store.stale_next = True
        assert not await limiter.acquire(grant=True, slot=True)  # what it counted on is gone: it asks again
        assert await limiter.acquire(grant=True, slot=True)
        limiter.window.take(0.0, pending=True)
        assert limiter.gate.try_acquire()
        in_flight = limiter.gate.in_flight
    finally:
        await limiter.close()
    # Nothing was lost or counted twice: the slots still held are those in flight.
    assert in_flight == (1 if stocked == "slot" else 2)
    assert store.state.leases["a"].held == in_flight


async def test_a_freed_slot_goes_back_to_the_account_while_another_run_is_on_it_even_if_it_does_not_ask() -> None:
    # A run that sees no slot free does not ask for one, so it is in no line: a run keeping every slot it frees while
    # another is live would starve it (and leave it alone on the key, with its own limits, only at the end). Beyond
    # its share (4 slots over 2 runs) a run gives each freed slot back.
    store = _MemoryStore()
    clock = [0.0]
    limiter = await _joined(store, clock)
    try:
        await _full(limiter, 4)
        join(store.state, 100.0, lease("b", count=6000, period=6.0, concurrency=4))
        assert not store.state.slot_line  # b is on the account, and asks for nothing
        clock[0] = 1.0
        assert await limiter.acquire(grant=True, slot=False)  # a's view now shows two runs
        limiter.give_back()
        await _gives_back(limiter, store, clock, held=3)
        assert view(store.state, 100.0, "b").free() == 1  # b sees the slot free
    finally:
        await limiter.close()


async def _sharing(
    store: _MemoryStore, clock: list[float], *, b_holds: int, b_waits: bool = False, a_holds: int = 2
) -> AccountLimiter:
    """Run "a" holding ``a_holds`` of the account's 4 slots, and run "b" on the account holding ``b_holds`` (waiting
    in the slot line if ``b_waits``); a's view is fresh."""
    limiter = await _joined(store, clock)
    await _full(limiter, a_holds)
    join(store.state, 100.0, lease("b", count=6000, period=6.0, concurrency=4))
    for _ in range(b_holds):
        assert request(store.state, 100.0, "b", grant=False, slot=True).granted
    if b_waits:
        assert not request(store.state, 100.0, "b", grant=False, slot=True).granted
        assert len(store.state.slot_line) == 1
    clock[0] = 1.0
    assert await limiter.acquire(grant=True, slot=False)  # a's view now shows b
    limiter.give_back()
    assert limiter.view is not None and limiter.view.runs == 2
    return limiter


async def test_a_run_within_its_share_of_the_slots_keeps_those_it_frees_while_another_run_is_on_the_account() -> None:
    store = _MemoryStore()
    clock = [1.0]
    limiter = await _sharing(store, clock, b_holds=2)
    try:
        store.transactions = 0
        await _creates_in_freed_slots(limiter, 50, 1.0)
        assert store.transactions <= 3  # the grants' stock only: no release and no take per create
        assert store.state.leases["a"].held == 2 and store.state.leases["b"].held == 2
    finally:
        await limiter.close()


async def test_a_run_within_its_share_gives_a_freed_slot_back_while_another_run_waits_in_the_slot_line() -> None:
    store = _MemoryStore()
    clock = [1.0]
    limiter = await _sharing(store, clock, b_holds=2, b_waits=True)
    try:
        await _gives_back(limiter, store, clock, held=1)
    finally:
        await limiter.close()


async def test_a_run_below_its_share_keeps_the_slots_it_frees_even_while_another_run_waits_in_the_slot_line() -> None:
    # a holds 1 of 4 slots (its share is 2), b holds 3 and waits for more: b is beyond its share, so the slots b frees
    # go back and a's would only swap places in the line. a keeps its own: no release and no take per create.
    store = _MemoryStore()
    clock = [1.0]
    limiter = await _sharing(store, clock, b_holds=3, b_waits=True, a_holds=1)
    try:
        assert limiter.view is not None and limiter.view.slot_line == 1
        store.transactions = 0
        await _creates_in_freed_slots(limiter, 50, 1.0)
        assert store.transactions <= 6  # the grants' stock only (a slot given back would be one at least per create)
        assert store.state.leases["a"].held == 1 and store.state.leases["b"].held == 3
    finally:
        await limiter.close()


def _seen(*, held: int, runs: int, used: int = 0, concurrency: int = 4) -> View:
    """A view of an account of ``concurrency`` slots (``held`` of them held) and a window of 10 (``used`` of it)."""
    return View(
        now=0.0,
        limits=AccountLimits(10, 1.0, 0.0, concurrency),
        times=(),
        first=0,
        recorded=used,
        in_window=used,
        latest=0.0,
        pending=0,
        held=held,
        own_held=0,
        slots_ahead=0,
        runs=runs,
    )


@pytest.mark.parametrize(
    ("seen", "own", "wait"),
    [
        (None, 0, IDLE_REFRESH),
        (_seen(held=4, runs=1, used=10), 4, TIGHT_REFRESH),  # the window is full: it empties on its own
        (_seen(held=2, runs=1), 2, IDLE_REFRESH),  # slots free: a create needs no refresh to take one
        (_seen(held=4, runs=1), 4, IDLE_REFRESH),  # every slot the run's own: it knows of each it frees
        (_seen(held=4, runs=1), 3, TIGHT_REFRESH),  # a gone run's slot: it frees when its hold ends
        (_seen(held=4, runs=2), 1, TIGHT_REFRESH),  # below its share (2): a slot the other run frees is for it
        (_seen(held=4, runs=2), 2, IDLE_REFRESH),  # at its share: the other run's slots are the other run's
        (_seen(held=4, runs=2), 3, IDLE_REFRESH),  # beyond it
    ],
)
def test_the_view_is_refreshed_soon_only_while_what_another_run_does_can_serve_this_one(
    seen: View | None, own: int, wait: float
) -> None:
    assert refresh_wait(seen, own) == wait


@pytest.mark.parametrize(
    ("kind", "seen", "now"),
    [
        ("settle", None, True),  # nothing seen yet: the run knows nothing of the window
        ("settle", _seen(held=0, runs=1, used=0), False),  # an empty window: the answer can wait
        ("settle", _seen(held=0, runs=1, used=4), False),  # less than half full
        ("settle", _seen(held=0, runs=1, used=5), True),  # half full: recorded later would free it later
        ("settle", _seen(held=0, runs=1, used=10), True),
        ("release", _seen(held=4, runs=1, used=0), True),  # a slot given back is for someone now
        ("cancel", _seen(held=0, runs=1, used=0), True),
        ("adopt", _seen(held=0, runs=1, used=0), True),
        ("seed", _seen(held=0, runs=1, used=0), True),
    ],
)
def test_only_a_grants_answer_waits_for_the_next_transaction_and_only_while_the_window_is_less_than_half_full(
    kind: str, seen: View | None, now: bool
) -> None:
    assert flush_at_once(kind, seen) is now


async def test_answers_ride_the_next_transaction_while_the_window_is_loose_and_a_slot_given_back_goes_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A settle per answer was most of a run's transactions at a large account's limits, where the window stays far
    # from full: each woke the background task for a transaction of its own.
    monkeypatch.setattr(limiter_module, "IDLE_REFRESH", 60.0)  # no refresh unasked: what happens is what was asked
    store = _MemoryStore()
    limiter = AccountLimiter(store, lease("a", count=6000, period=6.0, concurrency=4))
    wants = [True]
    limiter.bind(wake=lambda: None, on_lost=lambda exc: None, wants_slot=lambda: wants[0])
    await limiter.join()
    try:
        await _full(limiter, 4)
        await asyncio.sleep(0.05)  # the background task's first transaction, then it waits
        store.transactions = 0
        for ticket in list(limiter.tickets):
            limiter.window.settle(ticket, 0.0)
        await asyncio.sleep(0.05)
        assert store.transactions == 0 and len(limiter._ops) == 4
        wants[0] = False  # nothing left to create: the slot a prediction frees goes back to the account
        limiter.gate.release()
        await asyncio.sleep(0.05)
        assert store.transactions >= 1 and limiter._ops == []
        assert len(store.state.pending) == len(limiter.stock)  # the answers went with the release
    finally:
        await limiter.close()


async def test_a_run_holding_every_slot_itself_does_not_refresh_its_view_every_few_milliseconds() -> None:
    # At a large account's limits every slot is in flight all the time: a refresh every 20 ms (plus the gap between
    # transactions) was 30 transactions a second that could tell the run nothing.
    store = _MemoryStore()
    limiter = AccountLimiter(store, lease("a", count=6000, period=6.0, concurrency=4))
    limiter.bind(wake=lambda: None, on_lost=lambda exc: None)
    await limiter.join()
    try:
        await _full(limiter, 4)
        store.transactions = 0
        await asyncio.sleep(0.2)
        assert store.transactions <= 1
    finally:
        await limiter.close()
