"""The Redis store as a moving window in sorted sets, against a real redis-server: the same decisions as the
in-memory state, a window trimmed to what can matter, a transaction's work independent of the window, and a key of
the first (one JSON value) format carried over or replaced with one log line."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from batchrunner.limits.account import (
    AccountState,
    Decision,
    Lease,
    View,
    expire,
    join,
    record_history,
    request,
    settle_grant,
    view,
)
from batchrunner.limits.redisstore import RedisStore
from tests.test_account_e2e import needs_redis, redis_server

pytestmark = needs_redis


def lease(name: str, *, count: int = 3, period: float = 1.0) -> Lease:
    return Lease(
        id=name,
        label=f"/out/{name}",
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
def url(tmp_path: Path) -> Iterator[str]:
    with redis_server(tmp_path / "redis") as served:
        yield served


@pytest.fixture
async def clocked(url: str) -> AsyncIterator[tuple[RedisStore, list[float]]]:
    clock = [1000.0]
    store = await RedisStore.open(url, "acct", clock=lambda: clock[0])
    try:
        yield store, clock
    finally:
        await store.close()


@pytest.mark.parametrize("counts", [(3, 3, 3), (3, 2, 5)])
async def test_decisions_through_redis_are_the_in_memory_ones(
    clocked: tuple[RedisStore, list[float]], counts: tuple[int, int, int]
) -> None:
    """The same random run of three leases (their limits the same, or disagreeing: the account's change as they
    join) on the sorted sets and on the in-memory state: every decision, grant id and view the same."""
    store, clock = clocked
    memory = AccountState()
    rng = random.Random(5)
    for name, count in zip("abc", counts, strict=True):
        entered = lease(name, count=count)
        await store.transact(lambda state, now, entered=entered: join(state, now, entered))  # type: ignore[misc]
        join(memory, clock[0], lease(name, count=count))
    on_wire: list[str] = []
    for _ in range(250):
        clock[0] += rng.uniform(0.0, 0.2)
        now = clock[0]
        name = rng.choice("abc")
        settle = bool(on_wire) and rng.random() < 0.5
        late = rng.random() < 0.05  # a killed run's request log, seeded: times anywhere in the window

        def step(
            state: AccountState, now: float, name: str = name, settle: bool = settle, late: bool = late
        ) -> tuple[Decision, View]:
            expire(state, now)
            state.leases[name].beat = now
            if settle:
                settle_grant(state, now, on_wire[0])
            if late:
                record_history(state, now, [now - 0.5, now - 0.1])
            return request(state, now, name, grant=True, slot=False), view(state, now, name)

        got = await store.transact(step)
        assert got == step(memory, now)
        if settle:
            on_wire.pop(0)
        if got[0].grant_id is not None:
            on_wire.append(got[0].grant_id)


async def test_the_window_is_a_sorted_set_trimmed_to_what_can_matter(
    url: str, clocked: tuple[RedisStore, list[float]]
) -> None:
    store, clock = clocked
    await store.transact(lambda state, now: join(state, now, lease("a", count=5, period=1.0)))
    for _ in range(40):
        clock[0] += 0.05
        decision = await store.transact(lambda state, now: request(state, now, "a", grant=True, slot=False))
        if decision.grant_id is not None:
            await store.transact(lambda state, now, g=decision.grant_id: settle_grant(state, now, g))  # type: ignore[misc]
    client = redis.Redis.from_url(url)
    try:
        pairs: list[tuple[bytes, float]] = client.zrange("batchrunner:account:acct:times", 0, -1, withscores=True)  # type: ignore[assignment]
        scores = [score for _, score in pairs]
        assert 0 < len(scores) <= 5  # at most COUNT (the largest any run used)
        assert all(score > clock[0] - 1.0 - 1e-9 for score in scores)  # none older than the longest window
        assert client.hlen("batchrunner:account:acct:pending") == 0
    finally:
        client.close()


def _wire_bytes(client: redis.Redis) -> int:
    stats = client.info("stats")
    return int(stats["total_net_input_bytes"]) + int(stats["total_net_output_bytes"])


async def _bytes_per_grant(url: str, client: redis.Redis, count: int) -> float:
    clock = [1000.0]
    store = await RedisStore.open(url, f"acct-{count}", clock=lambda: clock[0])
    try:
        await store.transact(lambda state, now: join(state, now, lease("a", count=count, period=60.0)))
        await store.transact(lambda state, now: record_history(state, now, [now - 30.0] * (count // 2)))
        await store.transact(lambda state, now: view(state, now, "a"))  # the run's read is around its limits now
        before = _wire_bytes(client)
        for _ in range(20):
            clock[0] += 0.001
            decision = await store.transact(lambda state, now: request(state, now, "a", grant=True, slot=False))
            await store.transact(lambda state, now, g=decision.grant_id: settle_grant(state, now, g))  # type: ignore[misc]
        return (_wire_bytes(client) - before) / 20
    finally:
        await store.close()


async def test_a_grant_moves_the_same_bytes_however_many_grants_the_window_holds(url: str) -> None:
    """Its take and its answer read and write a few grants and the leases, never the window: 3000 grants in it
    cost what 30 do (one JSON value of the whole state moved about 25 bytes a grant, both ways, per transaction)."""
    client = redis.Redis.from_url(url)
    try:
        small = await _bytes_per_grant(url, client, 60)
        large = await _bytes_per_grant(url, client, 6000)
    finally:
        client.close()
    assert large < 1.3 * small, (small, large)


async def test_a_key_of_the_first_format_is_carried_over_with_one_log_line(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    old = AccountState()
    join(old, 999.0, lease("gone", count=3))
    old.times.add(999.5)
    client = redis.Redis.from_url(url)
    client.set("batchrunner:account:acct", json.dumps(old.to_json()))
    clock = [1000.0]
    with caplog.at_level(logging.WARNING, logger="batchrunner"):
        store = await RedisStore.open(url, "acct", clock=lambda: clock[0])
    try:
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and "earlier version" in lines[0] and "carried over" in lines[0]
        seen = await store.transact(lambda state, now: view(state, now, None))
        assert seen.recorded == 1 and seen.times == (999.5,)
        assert client.get("batchrunner:account:acct") is None
        assert client.zcard("batchrunner:account:acct:times") == 1
    finally:
        await store.close()
        client.close()


async def test_a_key_of_the_first_format_that_does_not_parse_is_replaced_with_one_log_line(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = redis.Redis.from_url(url)
    client.set("batchrunner:account:acct", "{not json")
    with caplog.at_level(logging.WARNING, logger="batchrunner"):
        store = await RedisStore.open(url, "acct")
    try:
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and "replaced" in lines[0]
        assert client.get("batchrunner:account:acct") is None
    finally:
        await store.close()
        client.close()


async def test_a_runs_own_transactions_never_race_each_other(
    clocked: tuple[RedisStore, list[float]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twenty at once from one run (its background and its acquires overlap like this): each reads once and writes
    once. Run on the event loop, each write after the first found the version moved and decided again."""
    store, _ = clocked
    reads = [0]
    load = store._load

    def counted(wider: Any) -> Any:
        reads[0] += 1
        return load(wider)

    monkeypatch.setattr(store, "_load", counted)
    await store.transact(lambda state, now: join(state, now, lease("a", count=100)))

    def take(state: AccountState, now: float) -> Decision:
        expire(state, now)
        return request(state, now, "a", grant=True, slot=False)

    reads[0] = 0
    decisions = await asyncio.gather(*(store.transact(take) for _ in range(20)))
    assert all(d.granted for d in decisions)
    assert len({d.grant_id for d in decisions}) == 20
    assert reads[0] == 20
