"""The limiter a run's scheduler talks to: its own window and gate, or the account's, shared through a store.

The scheduler asks the same questions of either (``window.delay/take/settle/used/remaining/next_free_times``,
``gate.free/try_acquire/release/in_flight``) and, when the limits are shared, first ``await acquire(grant=, slot=)``
for the request it chose: one transaction of the store (``account.request``) that takes the grant and the slot
together, so a create never holds a window place while it waits for a slot. Between transactions the run plans on
its last ``View`` of the account. A background task keeps that view fresh (``refresh_wait``: fast while it can help),
sends the run's answers and releases to the store as they happen, and beats the run's lease; it wakes the
scheduler when the account frees something. When the store fails the run keeps going on its own within the last
limits it saw (its view of the window and of the slots held), and the scheduler is told to stop submitting.

At large limits a transaction takes a few grants and slots ahead (``account.request``'s ``extra``): the run's stock,
used by the next requests with no transaction, and given back when it goes unused.

``LocalLimits`` (``handles.py``, re-exported here) is a run's own (``--limits-store local``, the built-in simulator, and
tests); the scheduler's handles on the account's window and gate are there too, and the ``/proc`` checks of runs on
this machine in ``processes.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

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
    record_history,
    release,
    request,
    settle_grant,
    view,
)
from batchrunner.limits.handles import AccountGate, AccountWindow, GateLike, LocalLimits, RunLimits, WindowLike
from batchrunner.limits.processes import gone_here, host_id, process_start
from batchrunner.limits.window import InFlightGate, SlidingWindow, answer_margin

__all__ = [
    "AccountLimiter",
    "GateLike",
    "LocalLimits",
    "RunLimits",
    "WindowLike",
    "check_store_spec",
    "host_id",
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


def refresh_wait(seen: View | None, own_held: int) -> float:
    """How long the background task waits before it refreshes the run's view unasked. Pure.

    Soon (``TIGHT_REFRESH``) while the window is full, or while no slot is free and one another run frees could be
    this run's: other runs hold slots and this one holds less than its share (the concurrency over the live runs).
    Otherwise nothing another run does changes what this one may do soon: the slots are all its own (those it frees
    it knows of at once), or it holds its share already (beyond it, slots are for the others). Anything the run has
    to tell the store wakes the task at once, whatever the wait."""
    if seen is None:
        return IDLE_REFRESH
    if seen.used() >= seen.limits.count:
        return TIGHT_REFRESH
    if seen.free() > 0:
        return IDLE_REFRESH
    others_hold = seen.held > own_held
    return TIGHT_REFRESH if others_hold and own_held < seen.share() else IDLE_REFRESH


def flush_at_once(kind: str, seen: View | None) -> bool:
    """Whether an op the run queued wakes the background task now (True) or rides its next transaction, at most
    ``IDLE_REFRESH`` later. Pure.

    A settle (a grant's answer) records the grant at the transaction's time instead of the pending grant's: a later
    time, so the account's window frees that grant later, never sooner. While the window is less than half full
    that costs nothing (no run is near the count), and a settle per answer was most of a run's transactions; once it
    is half full the run's answers go at once. Anything else (slots given back, grants cancelled, slots adopted, a
    killed run's history) changes what this run or another may do now, and goes at once."""
    if kind != "settle" or seen is None:
        return True
    return seen.used() * 2 >= seen.limits.count


# --------------------------------------------------------------------------------------------------- the account
class AccountLimiter:
    """The account's limits, through a store shared by every run on the key. Open with ``open_limits``."""

    shared = True

    def __init__(self, store: Store, lease: Lease, *, loop_time: Callable[[], float] | None = None) -> None:
        self.store = store
        self.lease = lease  # the run's own copy: ``held`` is what it holds, the rest what it says of itself
        self._loop_time = loop_time
        self.window: WindowLike = AccountWindow(self)
        gate = AccountGate(self)
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
            if flush_at_once(kind, self.view):
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
                mark_gone(state, gone_here(state, lease))
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
        if not self._warned_limits:
            self._warned_limits = _warn_other_limits(self.lease, fresh.limits)
        if self.gate.free() > before or (opened and fresh.used() < fresh.limits.count):
            self._wake()

    def _lose(self, exc: StoreLost) -> None:
        """Go on alone within the last limits seen, and tell the scheduler to stop submitting."""
        if self.lost is not None:
            return
        self.lost = exc
        sent = sum(1 for kind, _ in self.tickets.values() if kind == "store")
        self.fallback = _fallback(self.view, self.limits, self.offset, self.now(), sent, self.lease.held)
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
        # What the stock lacks is asked of the store; the rest comes from the stock.
        ask_grant, ask_slot = grant and not self.stock, slot and not self.stock_slots
        if (grant or slot) and not ask_grant and not ask_slot:
            self._take_stock(grant=grant, slot=slot)
            return True
        extra = self.burst
        fn, _ = self._tx(
            lambda state, now: request(state, now, self.lease.id, grant=ask_grant, slot=ask_slot, extra=extra)
        )
        try:
            decision, fresh = await self.store.transact(fn)
        except StoreLost as exc:
            self._lose(exc)
            return False
        assert isinstance(decision, Decision)
        if decision.granted:
            until = started + STOCK_TTL - STOCK_GUARD
            self.stock += [(grant_id, until) for grant_id in decision.more]
            self.stock_slots += [until] * decision.more_slots
            self.burst = min(STOCK_MAX, self.burst * 2)  # the stock ran out (or there was none): ask for more
            if ask_slot:
                self.lease.held += 1 + decision.more_slots
                self._slot_claim_until = -math.inf
            from_stock_grant, from_stock_slot = grant and not ask_grant, slot and not ask_slot
            if (from_stock_grant and not self.stock) or (from_stock_slot and not self.stock_slots):
                # The stock this request counted on went stale while the store answered (the background task gave
                # it back): what the store gave joins the stock, and the scheduler asks again at once.
                if ask_grant and decision.grant_id is not None:
                    self.stock.insert(0, (decision.grant_id, until))
                if ask_slot:
                    self.stock_slots.insert(0, until)
                self._set_view(fresh)
                return False
            self._take_stock(grant=from_stock_grant, slot=from_stock_slot)
            if ask_grant:
                self.held_grant, self._held_grant_until = decision.grant_id, None
            if ask_slot:
                self.held_slot, self._held_slot_until = True, None
        self._set_view(fresh)
        if not decision.granted:
            if decision.why == "slots":
                self._slot_claim_until = self.now() + SLOT_GRACE
            else:
                self.retry_at = self.now() + decision.wait
        return decision.granted

    def _take_stock(self, *, grant: bool, slot: bool) -> None:
        if grant:  # the oldest first: it is the first to go stale
            self.held_grant, self._held_grant_until = self.stock.pop(0)
        if slot:
            self._held_slot_until = self.stock_slots.pop(0)
            self.held_slot = True

    def keep_slot(self) -> bool:
        """Whether a slot the run's prediction just freed stays the run's, as stock for its next create (True), or
        goes back to the account (False, the caller releases it).

        It stays while the run has jobs to create and, as last seen, is the only run on the account (the account
        would give the slot straight back to it), holds less than its share of the slots (the concurrency over the
        live runs), or holds its share while no other run waits in the slot line. Keeping it saves two transactions
        (the release and the next take). The share is what keeps the account fair: a run that sees no slot free does
        not ask for one, so it shows in no line, and only slots the others give back bring it in; every run beyond
        its share gives back each slot its predictions free. A run below its share keeps its slots even while another
        waits: with every slot held and the waiter below its share too, the runs left hold more than their shares
        between them, so one of them is beyond its share and gives back each slot it frees. (Three runs at about their
        shares took turns below them, so one was nearly always in the line: giving back at any place in line sent
        half of each run's creates through the store.) The slot stays held in the store all along, so the account's
        count never drops below what is in flight; unused within ``STOCK_TTL`` it goes back like any stock slot."""
        seen = self.view
        if self.fallback is not None or seen is None or len(self.stock_slots) >= STOCK_MAX:
            return False
        if seen.runs > 1:
            in_line = seen.slots_ahead < seen.slot_line  # the run's own place (ahead counts the line when it has none)
            share, held = seen.share(), self.lease.held  # held: the freed slot counted, until it is given back
            if held > share or (held == share and seen.slot_line > int(in_line)):
                return False
        if not self._wants_slot():
            return False
        self.stock_slots.append(self.now() + STOCK_TTL - STOCK_GUARD)
        return True

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
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(refresh_wait(self.view, self.lease.held)):
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


# --------------------------------------------------------------------------------------------------- opening
def _warn_other_limits(lease: Lease, limits: AccountLimits) -> bool:
    """Say once that the account keeps stricter limits than this run asked for; whether it was said."""
    if limits == AccountLimits(lease.count, lease.period, lease.margin, lease.concurrency):
        return False
    log.warning(
        "another run on this key asks for other limits: the account keeps the strictest, "
        "--rate-limit %d/%g --concurrency %d (this run asked for %d/%g and %d)",
        limits.count,
        limits.period,
        limits.concurrency,
        lease.count,
        lease.period,
        lease.concurrency,
    )
    return True


def _fallback(
    seen: View | None, lim: AccountLimits, offset: float, now: float, sent: int, own_held: int
) -> tuple[SlidingWindow, InFlightGate]:
    """A run's own window and gate, for going on alone after the store failed: every grant its last view saw in the
    window (loop times; those it does not carry at ``now``), every pending one, its own ``sent`` ones, every slot
    held."""
    history: list[float] = []
    if seen is not None:
        start = seen.now - lim.window
        history = [min(now, t - offset) for t in seen.times if t > start]
        history += [now] * max(0, seen.in_window - len(history))  # those it does not carry: at most now
        history += [now] * max(0, seen.pending - sent)
    history += [now] * sent
    window = SlidingWindow(lim.count, lim.period, margin=lim.margin, history=history)
    held = max(seen.held if seen is not None else 0, own_held)
    return window, InFlightGate(lim.concurrency, initial=held)


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
