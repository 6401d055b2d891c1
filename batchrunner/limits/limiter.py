"""The limiter a run's scheduler talks to: its own window and gate, or the account's, shared through a store.

The scheduler asks the same questions of either (``window.delay/take/settle/used/remaining/next_free_times``,
``gate.free/try_acquire/release/in_flight``) and, when the limits are shared, first ``await acquire(grant=, slot=)``
for the request it chose: one transaction of the store (``account.request``) that takes the grant and the slot
together, so a create never holds a window place while it waits for a slot. Between transactions the run plans on
its last ``View`` of the account. A background task keeps that view fresh (fast while the account is at a limit),
sends the run's answers and releases to the store as they happen, and beats the run's lease; it wakes the
scheduler when the account frees something. When the store fails the run keeps going on its own within the last
limits it saw (its view of the window and of the slots held), and the scheduler is told to stop submitting.

``LocalLimits`` is today's limiter, a run's own (``--limits-store local``, the built-in simulator, and tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from batchrunner.errors import UsageError
from batchrunner.limits.account import (
    SLOT_GRACE,
    STOCK_TTL,
    AccountLimits,
    AccountState,
    Decision,
    Lease,
    Store,
    StoreLost,
    View,
    adopt,
    beat,
    cancel_grant,
    expire,
    join,
    leave,
    mark_gone,
    plan_grants,
    record_history,
    release,
    request,
    settle_grant,
    view,
)
from batchrunner.limits.window import InFlightGate, SlidingWindow, answer_margin

__all__ = [
    "AccountLimiter",
    "GateLike",
    "LocalLimits",
    "RunLimits",
    "WindowLike",
    "check_store_spec",
    "open_limits",
    "open_store",
]

log = logging.getLogger("batchrunner")

# A run's lease beats this often (every transaction beats it too) and counts as gone after TTL without a beat.
BEAT_EVERY = 1.0
LEASE_TTL = 10.0
# How often the background task refreshes the run's view: while the account is at a limit, and otherwise.
TIGHT_REFRESH = 0.02
IDLE_REFRESH = 0.25
# Added to a run's hold: a prediction is created a moment after the transaction that gave its slot (a beat).
HOLD_SLACK = 0.5
# The background task's transactions (answers, releases, the view) are at most this often: what it sends waits a
# few milliseconds and goes in one transaction, instead of one per answer.
OPS_GAP = 0.01
# The most grants (and slots) a run asks to take ahead in one transaction; it doubles its ask each time its stock ran
# out and halves it each time some went unused (``account.request``).
STOCK_MAX = 64
# A stock grant is used this long before its STOCK_TTL ends at the latest (the request must be on the wire by then).
STOCK_GUARD = 0.02


@dataclass(frozen=True, slots=True)
class RunLimits:
    """What a run asks of the limits: its window and cap, its store (``--limits-store``; None: the default SQLite),
    and its first poll interval, from which the hold of its slots after it is gone follows."""

    count: int
    period: float
    concurrency: int
    store: str | None = None
    poll_initial: float = 1.0


class WindowLike(Protocol):
    """What the scheduler asks of a request window (``SlidingWindow``'s methods)."""

    @property
    def margin(self) -> float: ...

    @property
    def window(self) -> float: ...

    def delay(self, now: float) -> float: ...

    def take(self, now: float, *, pending: bool = False) -> int: ...

    def settle(self, ticket: int, at: float) -> None: ...

    def used(self, now: float) -> int: ...

    def remaining(self, now: float) -> int: ...

    def next_free_times(self, now: float, k: int) -> list[float]: ...


class GateLike(Protocol):
    """What the scheduler asks of an in-flight gate (``InFlightGate``'s methods)."""

    in_flight: int
    max_seen: int

    def free(self) -> int: ...

    def try_acquire(self) -> bool: ...

    def release(self) -> None: ...


class LocalLimits:
    """A run's own window and gate: no other run shares them."""

    shared = False

    def __init__(self, config: RunLimits) -> None:
        # Requests count at their answers (see SlidingWindow.settle), so the margin covers clock drift only.
        self.window: WindowLike = SlidingWindow(config.count, config.period, margin=answer_margin(config.period))
        self.gate: GateLike = InFlightGate(config.concurrency)

    def sharing(self) -> int:
        """Runs sharing the limits: this one alone."""
        return 1

    def bind(self, **_: Any) -> None:
        """Nothing to wake or stop: a run's own limits never change behind its back."""

    async def acquire(self, *, grant: bool, slot: bool) -> bool:
        return True

    def give_back(self) -> None:
        """Nothing was taken ahead."""

    def seed(self, history: list[float]) -> None:
        """The scheduler seeds its own window (``SlidingWindow(history=...)``)."""

    def count_rate_limited(self) -> None:
        """A 429 is in the run's counters already; nothing else to tell."""


# --------------------------------------------------------------------------------------------------- processes
def host_id() -> str:
    """This machine's boot and pid namespace, so that runs on it can tell each other's pids; "" without /proc."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""
    return hashlib.sha256(f"{boot}:{namespace}".encode()).hexdigest()[:16]


def process_start(pid: int) -> str:
    """The start time of process ``pid`` (clock ticks since boot), "" when unknown; None-like "" also for zombies."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return ""
    fields = text.rpartition(")")[2].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return ""
    return fields[19]


def process_gone(pid: int, start: str) -> bool:
    """Whether the process that took a lease is surely not running (a pid reused by another process counts)."""
    if not start:
        return False  # no /proc: leave it to the lease's ttl
    return process_start(pid) != start


# --------------------------------------------------------------------------------------------------- the account
class _Window:
    """The account's window as the scheduler sees it (loop times); see AccountLimiter."""

    def __init__(self, owner: AccountLimiter) -> None:
        self._o = owner

    @property
    def margin(self) -> float:
        return self._o.limits.margin

    @property
    def window(self) -> float:
        return self._o.limits.window

    def delay(self, now: float) -> float:
        o = self._o
        if o.fallback is not None:
            return o.fallback[0].delay(now)
        if o.stock:
            return 0.0  # grants in hand
        return max(0.0, o.retry_at - now)

    def take(self, now: float, *, pending: bool = False) -> int:
        o = self._o
        o.ticket += 1
        if o.fallback is not None:
            o.tickets[o.ticket] = ("local", o.fallback[0].take(now, pending=pending))
            return o.ticket
        if o.held_grant is None:
            raise RuntimeError("a grant taken that the account's store did not give")
        o.tickets[o.ticket] = ("store", o.held_grant)
        o.held_grant = None
        return o.ticket

    def settle(self, ticket: int, at: float) -> None:
        o = self._o
        entry = o.tickets.pop(ticket, None)
        if entry is None:
            return
        kind, value = entry
        if kind == "local" and o.fallback is not None:
            assert isinstance(value, int)
            o.fallback[0].settle(value, at)
        elif kind == "store":
            o.queue_op("settle", value)

    def used(self, now: float) -> int:
        o = self._o
        if o.fallback is not None:
            return o.fallback[0].used(now)
        # The run's stock is pending in the view, but it is the run's to use.
        return max(0, o.view.used() - len(o.stock)) if o.view is not None else 0

    def remaining(self, now: float) -> int:
        return self._o.limits.count - self.used(now)

    def next_free_times(self, now: float, k: int) -> list[float]:
        o = self._o
        if o.fallback is not None:
            return o.fallback[0].next_free_times(now, k)
        if o.view is None:
            return [now] * k
        shift, seen = o.offset, o.view
        pending = max(0, seen.pending - len(o.stock))
        return plan_grants(lambda i: seen.nth(i) - shift, seen.recorded, seen.latest - shift, pending, now, k, o.limits)


class _Gate:
    """The account's slots as the scheduler sees them: ``in_flight`` is this run's, ``free()`` the account's."""

    def __init__(self, owner: AccountLimiter) -> None:
        self._o = owner
        self.max_seen = 0

    @property
    def in_flight(self) -> int:
        return self._o.lease.held - len(self._o.stock_slots)

    @in_flight.setter
    def in_flight(self, value: int) -> None:
        # Only the scheduler's load sets it: predictions (and doubts) it takes over from the folder's ledger.
        o = self._o
        delta = value - self.in_flight
        if delta > 0:
            o.lease.held += delta
            o.queue_op("adopt", delta)
            if o.fallback is not None:
                o.fallback[1].in_flight += delta
        elif delta < 0:
            for _ in range(-delta):
                self.release()

    def free(self) -> int:
        o = self._o
        if o.fallback is not None:
            return o.fallback[1].free()
        if o.view is None:
            return 0
        # A slot acquire() took for the create the scheduler is about to start is this run's to use.
        return max(0, o.view.free() + o.released_since_view) + int(o.held_slot) + len(o.stock_slots)

    def try_acquire(self) -> bool:
        o = self._o
        if o.fallback is not None:
            if not o.fallback[1].try_acquire():
                return False
        elif not o.held_slot:
            return False
        o.held_slot = False
        self.max_seen = max(self.max_seen, self.in_flight)
        return True

    def release(self) -> None:
        o = self._o
        if self.in_flight <= 0:
            raise RuntimeError("release() of the account's gate without a matching acquire")
        o.lease.held -= 1
        o.released_since_view += 1
        o.queue_op("release", 1)
        if o.fallback is not None:
            o.fallback[1].release()


class AccountLimiter:
    """The account's limits, through a store shared by every run on the key. Open with ``open_limits``."""

    shared = True

    def __init__(self, store: Store, lease: Lease, *, loop_time: Callable[[], float] | None = None) -> None:
        self.store = store
        self.lease = lease  # the run's own copy: ``held`` is what it holds, the rest what it says of itself
        self._loop_time = loop_time
        self.window: WindowLike = _Window(self)
        gate = _Gate(self)
        self.gate: GateLike = gate
        self.view: View | None = None
        self.offset = 0.0  # store time minus loop time, at the last view
        self.retry_at = -math.inf  # loop time before which asking for a grant is pointless
        self.held_grant: str | None = None  # taken by acquire(), for the window's take()
        self.held_slot = False  # taken by acquire(), for the gate's try_acquire()
        # Grants and slots taken ahead (account.request's ``extra``), each with the loop time it must be used by;
        # where the held grant or slot came from (None: taken for this request), so an unused one goes back there.
        self.stock: list[tuple[str, float]] = []
        self.stock_slots: list[float] = []
        self.burst = 1
        self._held_grant_until: float | None = None
        self._held_slot_until: float | None = None
        self.tickets: dict[int, tuple[str, str | int]] = {}
        self.ticket = 0
        self.released_since_view = 0
        self.fallback: tuple[SlidingWindow, InFlightGate] | None = None
        self.lost: StoreLost | None = None
        self.rate_limited = 0
        self._ops: list[tuple[str, Any]] = []
        self._kick = asyncio.Event()
        self._slot_claim_until = -math.inf
        self._last_beat = -math.inf
        self._warned_limits = False
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._wake: Callable[[], None] = lambda: None
        self._on_lost: Callable[[StoreLost], None] = lambda exc: None
        self._hold: Callable[[], float] | None = None
        self._wants_slot: Callable[[], bool] = lambda: True

    # ------------------------------------------------------------------------------------------- wiring
    def now(self) -> float:
        return self._loop_time() if self._loop_time is not None else asyncio.get_running_loop().time()

    def bind(
        self,
        *,
        wake: Callable[[], None],
        on_lost: Callable[[StoreLost], None],
        hold: Callable[[], float] | None = None,
        wants_slot: Callable[[], bool] | None = None,
    ) -> None:
        """The scheduler's hooks: ``wake`` when the account frees something, ``on_lost`` when the store fails,
        ``hold`` the seconds its predictions may still run (its lost answers' hold), ``wants_slot`` whether it has
        jobs to create (a run keeps its place in the slot line only while it does)."""
        self._wake, self._on_lost, self._hold = wake, on_lost, hold
        if wants_slot is not None:
            self._wants_slot = wants_slot

    @property
    def limits(self) -> AccountLimits:
        if self.view is not None:
            return self.view.limits
        lease = self.lease
        return AccountLimits(lease.count, lease.period, lease.margin, lease.concurrency)

    def queue_op(self, kind: str, value: Any) -> None:
        if self.lost is None:
            self._ops.append((kind, value))
            self._kick.set()

    def sharing(self) -> int:
        """Live runs on the account as last seen (1 before the first view): each gets about its share."""
        return max(1, self.view.runs) if self.view is not None else 1

    def count_rate_limited(self) -> None:
        self.rate_limited += 1

    def seed(self, history: list[float]) -> None:
        """Requests a killed run made (loop times, from its folder's request log) count in the account's window.

        A run killed under this store has them in the store already; counting them twice only delays the run
        that resumes it, within one window."""
        self.queue_op("seed", [t + self.offset for t in history])

    # ------------------------------------------------------------------------------------------- transactions
    def _tx(
        self, then: Callable[[AccountState, float], Any] | None = None, *, check_pids: bool = False
    ) -> tuple[Callable[[AccountState, float], tuple[Any, View]], list[tuple[str, Any]]]:
        ops, self._ops = self._ops, []
        lease = self.lease
        hold = None
        if self._hold is not None:
            hold = self._hold() + HOLD_SLACK
        waiting = self._slot_claim_until > -math.inf
        wants = waiting and self._wants_slot()
        claim = wants and self._slot_claim_until > self.now()
        if waiting and not wants:
            self._slot_claim_until = -math.inf  # nothing left to create: its place goes to the next run now
        rate_limited = self.rate_limited

        def fn(state: AccountState, now: float) -> tuple[Any, View]:
            expire(state, now)
            if check_pids:
                mark_gone(state, _gone_here(state, lease))
            mine = beat(state, now, lease, hold=hold)
            mine.rate_limited = rate_limited
            for kind, value in ops:
                if kind == "settle":
                    settle_grant(state, now, value)
                elif kind == "cancel":
                    cancel_grant(state, value)
                elif kind == "release":
                    release(state, lease.id, value)
                elif kind == "adopt":
                    adopt(state, now, lease.id, value)
                elif kind == "seed":
                    record_history(state, now, value)
            if claim:
                for waiter in state.slot_line:
                    if waiter.lease == lease.id:
                        waiter.until = max(waiter.until, now + SLOT_GRACE)
            elif waiting and not wants:
                state.slot_line[:] = [w for w in state.slot_line if w.lease != lease.id]
            result = then(state, now) if then is not None else None
            return result, view(state, now, lease.id)

        return fn, ops

    def _set_view(self, fresh: View) -> None:
        before = self.gate.free() if self.view is not None else 0
        opened = self.view is not None and self.view.used() >= self.view.limits.count
        self.view = fresh
        self.offset = fresh.now - self.now()
        self.released_since_view = 0
        if self._slot_claim_until > -math.inf and fresh.free() <= 0 and self._wants_slot():
            self._slot_claim_until = self.now() + SLOT_GRACE  # still waiting: keep the place in the slot line
        lease = self.lease
        if not self._warned_limits and fresh.limits != AccountLimits(
            lease.count, lease.period, lease.margin, lease.concurrency
        ):
            self._warned_limits = True
            lim = fresh.limits
            log.warning(
                "another run on this key asks for other limits: the account keeps the strictest, "
                "--rate-limit %d/%g --concurrency %d (this run asked for %d/%g and %d)",
                lim.count,
                lim.period,
                lim.concurrency,
                lease.count,
                lease.period,
                lease.concurrency,
            )
        if self.gate.free() > before or (opened and fresh.used() < fresh.limits.count):
            self._wake()

    def _lose(self, exc: StoreLost) -> None:
        """Go on alone within the last limits seen, and tell the scheduler to stop submitting."""
        if self.lost is not None:
            return
        self.lost = exc
        now = self.now()
        lim = self.limits
        history: list[float] = []
        if self.view is not None:
            seen = self.view
            start = seen.now - lim.window
            history = [min(now, t - self.offset) for t in seen.times if t > start]
            history += [now] * max(0, seen.in_window - len(history))  # those it does not carry: at most now
            others_pending = self.view.pending - sum(1 for kind, _ in self.tickets.values() if kind == "store")
            history += [now] * max(0, others_pending)
        history += [now] * sum(1 for kind, _ in self.tickets.values() if kind == "store")
        window = SlidingWindow(lim.count, lim.period, margin=lim.margin, history=history)
        held = max(self.view.held if self.view is not None else 0, self.lease.held)
        gate = InFlightGate(lim.concurrency, initial=held)
        self.fallback = (window, gate)
        self.held_grant, self.held_slot = None, False
        self.lease.held -= len(self.stock_slots)  # taken ahead, never used: they are not in flight
        self.stock, self.stock_slots = [], []
        self._on_lost(exc)
        self._wake()

    async def join(self) -> None:
        """Enter the run on the account (raises StoreLost)."""
        lease = self.lease

        def enter(state: AccountState, now: float) -> None:
            entered = dataclasses.replace(lease, started=now)
            join(state, now, entered)

        fn, _ = self._tx(enter)
        _, fresh = await self.store.transact(fn)
        self._last_beat = self.now()
        self._set_view(fresh)
        self._task = asyncio.create_task(self._background())

    async def acquire(self, *, grant: bool, slot: bool) -> bool:
        """Take a grant and/or a slot from the account for the request the scheduler chose; False when it must wait
        (the window's ``delay`` or the gate's ``free`` then says how long or why)."""
        if self.fallback is not None:
            return not slot or self.fallback[1].free() > 0
        if self.held_grant is not None or self.held_slot:
            self.give_back()
        started = self.now()
        self._drop_stale(started)
        if (grant or slot) and (not grant or self.stock) and (not slot or self.stock_slots):
            if grant:  # the oldest first: it is the first to go stale
                self.held_grant, self._held_grant_until = self.stock.pop(0)
            if slot:
                self._held_slot_until = self.stock_slots.pop(0)
                self.held_slot = True
            return True
        extra = self.burst
        fn, _ = self._tx(lambda state, now: request(state, now, self.lease.id, grant=grant, slot=slot, extra=extra))
        try:
            decision, fresh = await self.store.transact(fn)
        except StoreLost as exc:
            self._lose(exc)
            return False
        assert isinstance(decision, Decision)
        if decision.granted:
            self.held_grant, self._held_grant_until = decision.grant_id, None
            until = started + STOCK_TTL - STOCK_GUARD
            self.stock += [(grant_id, until) for grant_id in decision.more]
            self.stock_slots += [until] * decision.more_slots
            self.burst = min(STOCK_MAX, self.burst * 2)  # the stock ran out (or there was none): ask for more
            if slot:
                self.held_slot, self._held_slot_until = True, None
                self.lease.held += 1 + decision.more_slots
                self._slot_claim_until = -math.inf
        self._set_view(fresh)
        if not decision.granted:
            if decision.why == "slots":
                self._slot_claim_until = self.now() + SLOT_GRACE
            else:
                self.retry_at = self.now() + decision.wait
        return decision.granted

    def give_back(self) -> None:
        """Return what ``acquire`` took and the scheduler did not use (it chose otherwise meanwhile): no request was
        sent, so the grant counts nowhere."""
        if self.held_grant is not None:
            if self._held_grant_until is not None:
                self.stock.insert(0, (self.held_grant, self._held_grant_until))
            else:
                self.queue_op("cancel", self.held_grant)
            self.held_grant = None
        if self.held_slot:
            self.held_slot = False
            if self._held_slot_until is not None:
                self.stock_slots.insert(0, self._held_slot_until)
            else:
                self.lease.held -= 1
                self.queue_op("release", 1)

    def _drop_stale(self, now: float, *, every: bool = False) -> None:
        """Give back what the stock holds past its time (or all of it): the run had no request for it."""
        stale = [g for g in self.stock if every or g[1] <= now]
        if stale:
            self.stock = [g for g in self.stock if not (every or g[1] <= now)]
            for grant_id, _ in stale:
                self.queue_op("cancel", grant_id)
        slots = sum(1 for t in self.stock_slots if every or t <= now)
        if slots:
            self.stock_slots = [t for t in self.stock_slots if not (every or t <= now)]
            self.lease.held -= slots
            self.queue_op("release", slots)
        if stale or slots:
            self.burst = max(1, self.burst // 2)

    async def _background(self) -> None:
        while self.lost is None and not self._closing:
            tight = self.view is not None and (self.view.free() <= 0 or self.view.used() >= self.view.limits.count)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TIGHT_REFRESH if tight else IDLE_REFRESH):
                    await self._kick.wait()
            self._kick.clear()
            if self._closing:
                return
            now = self.now()
            self._drop_stale(now)
            due = now - self._last_beat >= BEAT_EVERY
            fn, _ = self._tx(check_pids=due)
            try:
                _, fresh = await self.store.transact(fn)
            except StoreLost as exc:
                self._lose(exc)
                return
            if due:
                self._last_beat = now
            self._set_view(fresh)
            if not self._closing:
                await asyncio.sleep(OPS_GAP)

    async def close(self) -> None:
        """Leave the account: slots still held (predictions left running) stay held for the run's hold."""
        if self._task is not None:
            # Let the background task end between transactions: a command cancelled on the wire can leave the Redis
            # client's connection waiting for an answer that belongs to nobody.
            self._closing = True
            self._kick.set()
            try:
                async with asyncio.timeout(2 * BEAT_EVERY):
                    await self._task
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        if self.lost is None:
            self.give_back()
            self._drop_stale(self.now(), every=True)
            fn, _ = self._tx(lambda state, now: leave(state, now, self.lease.id))
            try:
                await self.store.transact(fn)
            except StoreLost as exc:
                log.warning("could not leave the account's limits store cleanly (%s); its lease expires by itself", exc)
        await self.store.close()


def _gone_here(state: AccountState, mine: Lease) -> set[str]:
    """Leases of runs on this machine whose process is not running any more."""
    if not mine.host:
        return set()
    return {
        lease.id
        for lease in state.leases.values()
        if lease.host == mine.host
        and lease.id != mine.id
        and not lease.left
        and process_gone(lease.pid, lease.pid_start)
    }


# --------------------------------------------------------------------------------------------------- opening
def check_store_spec(spec: str) -> str:
    """``local``, ``sqlite`` or a ``redis://``/``rediss://``/``unix://`` URL; UsageError (one line) otherwise."""
    text = spec.strip()
    if text in ("local", "sqlite") or text.startswith(("redis://", "rediss://", "unix://")):
        return text
    raise UsageError(f"--limits-store {spec!r}: expected sqlite (the default), local, or redis://HOST:PORT/DB")


async def open_store(spec: str | None, *, api_url: str, api_key: str) -> Store:
    """The account's store for ``spec`` (None or "sqlite": the local SQLite database)."""
    from batchrunner.limits.sqlitestore import SqliteStore, account_id, state_dir

    account = account_id(api_url, api_key)
    if spec is not None and spec != "sqlite":
        from batchrunner.limits.redisstore import RedisStore

        return await RedisStore.open(spec, account)
    return SqliteStore.open(state_dir() / f"account-{account}.sqlite3")


@contextlib.asynccontextmanager
async def open_limits(
    config: RunLimits, *, api_url: str, api_key: str, request_timeout: float, label: str
) -> AsyncIterator[AccountLimiter | LocalLimits]:
    """The run's limiter: its own for ``--limits-store local``, else the account's, entered for the run's length.

    Raises StoreUnavailable (Redis unreachable, exit 2) or StoreBroken (SQLite unusable, exit 74) before anything is
    sent.
    """
    spec = config.store
    if spec == "local":
        yield LocalLimits(config)
        return
    store = await open_store(spec, api_url=api_url, api_key=api_key)
    me = os.getpid()
    lease = Lease(
        id=uuid.uuid4().hex[:16],
        label=label,
        pid=me,
        host=host_id(),
        pid_start=process_start(me),
        started=0.0,
        beat=0.0,
        ttl=LEASE_TTL,
        hold=max(1.0, config.poll_initial * 10) + HOLD_SLACK,
        timeout=request_timeout,
        count=config.count,
        period=config.period,
        margin=answer_margin(config.period),
        concurrency=config.concurrency,
    )
    limiter = AccountLimiter(store, lease)
    try:
        await limiter.join()
    except StoreLost as exc:
        await store.close()
        raise _at_start(exc, store) from None
    try:
        yield limiter
    finally:
        await limiter.close()


def _at_start(exc: StoreLost, store: Store) -> Exception:
    from batchrunner.limits.account import StoreBroken, StoreUnavailable

    if store.description.startswith("SQLite"):
        return StoreBroken(str(exc))
    return StoreUnavailable(str(exc))
