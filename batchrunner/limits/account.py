"""The account's limits, shared by every run on one API key: the pure decisions on the state a store keeps
(``accountstate.py``: the records, their collections and the ``Store`` interface; their names are re-exported here).

The API's window and in-flight cap belong to the account, so every run on a key takes its grants and slots from one
``AccountState`` kept in a store (``sqlitestore.py`` on one machine, ``redisstore.py`` across machines). A store does
one thing: it runs a function on the state atomically (``Store.transact``), with ``now`` read from the store's own
clock, so every run decides on the same state and the same time. Every decision is a function here, taking the state
and ``now``; the stores never decide anything, so the two stores mean the same by construction.

What the state holds, and the rules:

- **Grants** (the request window). A grant is *pending* from its take until its answer, and inside every window
  meanwhile; then it is recorded at its answer (today's exactness of ``SlidingWindow``, account-wide). A pending grant
  whose run is gone counts as answered at its send plus the run's request timeout: the client gives up by then.
- **Slots** (predictions in flight). Each run's lease holds ``held`` slots: its predictions, its creates on the wire,
  those it took over on resume, and those held for lost answers. A lease is *live* while it beats (every transaction
  of the run is a beat) within ``ttl``, or until it leaves. Once it is not live its slots stay held until ``hold``
  seconds after its last beat: every prediction it had running then has surely finished by that time.
- **Limits**. Each run says its own; the account's are the strictest of each part among live runs: the smallest
  COUNT, the longest SECONDS (and margin), the smallest concurrency. Any window of the runs' periods then holds at
  most its COUNT.
- **Turns**. A run that asks and may not take now joins a line and is told when to come back: the time at which the
  window will have room for it and for every run ahead of it. Whoever comes back by its time takes its grant, so none
  starves and none waits on a run ahead that dawdles. A place in line lapses when its run does not come back in time.
  Slots have a line of their own, on the same rule.

Times are the store's seconds (wall clock for SQLite, the Redis server's clock for Redis). A time ahead of ``now``
(a clock stepped back, an edited file) counts as ``now``, so stale state never blocks a run for more than one window.
"""

from __future__ import annotations

import dataclasses
import math
from bisect import insort
from collections.abc import Callable

from batchrunner.limits.accountstate import (
    AccountLimits,
    AccountState,
    Decision,
    Lease,
    Pending,
    PendingMap,
    Pendings,
    Store,
    StoreBroken,
    StoreLost,
    StoreUnavailable,
    TimeList,
    Times,
    View,
    Waiter,
    lease_from_json,
    lease_to_json,
)
from batchrunner.limits.window import earliest_grant

__all__ = [
    "AccountLimits",
    "AccountState",
    "Decision",
    "Lease",
    "Pending",
    "PendingMap",
    "Pendings",
    "Store",
    "StoreBroken",
    "StoreLost",
    "StoreUnavailable",
    "TimeList",
    "Times",
    "View",
    "Waiter",
    "account_limits",
    "adopt",
    "beat",
    "cancel_grant",
    "decide",
    "expire",
    "grant_times",
    "join",
    "lease_from_json",
    "lease_to_json",
    "leave",
    "mark_gone",
    "plan_grants",
    "record_history",
    "release",
    "request",
    "settle_grant",
    "slots_held",
    "view",
]


# Seconds a place in the grant line is kept past the time its run was told to come back (a loop's lag, a transaction).
TURN_GRACE = 0.1
# Seconds a place in the slot line is kept since its run last asked (the run renews it while it waits; see limiter).
SLOT_GRACE = 0.25
# When requests on the wire fill the window, only answers open it, and another run's answer wakes no one here: look
# again this soon.
FULL_RETRY = 0.02
# How soon a run refused a slot looks again on its own (the background refresh wakes it sooner when one frees).
SLOT_RETRY = 0.05
# Seconds within which a run sends a request on a grant it took ahead (its stock; see ``request``) or gives it back:
# a stock grant's deadline is this much later than a grant taken for a request sent at once.
STOCK_TTL = 0.1
# A run takes ahead at most this share of what is free now (divided among the live runs), so a stock is never more
# than a sliver of the account's room; at small limits that is nothing, and each request is its own transaction.
STOCK_SHARE = 8
# Recorded grants a view carries: those the next grants a run plans between transactions wait for.
VIEW_TIMES = 32


# --------------------------------------------------------------------------------------------------- decisions
def account_limits(state: AccountState, now: float) -> AccountLimits | None:
    """The strictest of each part of the live runs' limits; None while no run is live."""
    live = [lease for lease in state.leases.values() if lease.live(now)]
    if not live:
        return None
    return AccountLimits(
        count=min(lease.count for lease in live),
        period=max(lease.period for lease in live),
        margin=max(lease.margin for lease in live),
        concurrency=min(lease.concurrency for lease in live),
    )


def slots_held(state: AccountState, now: float) -> int:
    """Slots held on the account: every live run's, and a gone run's until its predictions have surely finished."""
    return sum(lease.held for lease in state.leases.values() if lease.holds(now))


def _record(state: AccountState, t: float) -> None:
    state.times.add(t)


def expire(state: AccountState, now: float) -> None:
    """Bring the state up to ``now``: gone runs' grants answered at their deadlines, gone runs dropped once their
    slots no longer count, lapsed places in line dropped, times from the future pulled back to now, old times trimmed.
    Run first in every transaction; idempotent. Costs O(log n) in the grants kept, plus what it changes."""
    if len(state.times) and state.times.nth(-1) > now:
        state.times.clamp(now)
    if state.latest > now:  # a grant is never sent after the latest: only then can one be from the future
        state.pending.clamp(now)
        state.latest = now
    for lease in state.leases.values():
        lease.beat = min(lease.beat, now)
    live = {lease_id for lease_id, lease in state.leases.items() if lease.live(now)}
    for grant_id, grant in state.pending.due(now, live):  # a live run's grants are its own to answer
        state.pending.take(grant_id)
        _record(state, grant.deadline)
    for lease_id, lease in list(state.leases.items()):
        if not lease.live(now) and not lease.holds(now) and not state.pending.of(lease_id):
            del state.leases[lease_id]
    if any(w.until < now or not _is_live(state, w.lease, now) for w in state.line):
        state.line = [w for w in state.line if w.until >= now and _is_live(state, w.lease, now)]
    if any(w.until < now or not _is_live(state, w.lease, now) for w in state.slot_line):
        state.slot_line = [w for w in state.slot_line if w.until >= now and _is_live(state, w.lease, now)]
    state.times.trim(now - state.horizon, state.keep)


def _is_live(state: AccountState, lease_id: str, now: float) -> bool:
    lease = state.leases.get(lease_id)
    return lease is not None and lease.live(now)


def plan_grants(
    nth: Callable[[int], float], n: int, latest: float, pending: int, now: float, k: int, limits: AccountLimits
) -> list[float]:
    """``grant_times`` over ``n`` recorded times read one at a time (``nth(i)``, the ``i``-th oldest): only the few
    that decide the next ``k`` grants are read, so a plan costs O(k) reads whatever the window holds."""
    out: list[float] = []
    planned: list[float] = []  # grants planned here: later than every recorded one (each at ``now`` or after)
    room = limits.count - pending
    t = now
    for _ in range(k):
        if room <= 0:
            when = math.inf
        else:
            index = n + len(planned) - room
            if index < 0:
                when = latest
            else:
                oldest = nth(index) if index < n else planned[index - n]
                when = max(oldest + limits.window, latest)
        t = max(t, when)
        out.append(t)
        if math.isinf(t):
            continue
        planned.append(t)
        latest = t
    return out


def grant_times(
    times: list[float], latest: float, pending: int, now: float, k: int, limits: AccountLimits
) -> list[float]:
    """The earliest times at which the next ``k`` grants could be taken, each as soon as allowed, given the recorded
    ``times`` (sorted), the ``latest`` grant taken and the ``pending`` ones, which stay on the wire (inf for a grant
    only an answer could allow). Pure: plans on a copy."""
    plan = list(times)
    out: list[float] = []
    t = now
    for _ in range(k):
        t = max(t, earliest_grant(plan, pending, latest, limits.count, limits.window))
        out.append(t)
        if math.isinf(t):
            continue
        insort(plan, t)
        latest = t
    return out


def _place(line: list[Waiter], lease_id: str) -> int:
    """The index of ``lease_id`` in ``line``, or the line's length when it has no place (it would join last)."""
    for index, waiter in enumerate(line):
        if waiter.lease == lease_id:
            return index
    return len(line)


def decide(state: AccountState, now: float, lease_id: str, *, grant: bool, slot: bool) -> Decision:
    """Whether ``lease_id`` may take a grant (and/or a slot) at ``now``, or how long it should wait. Pure.

    A run may take when there is room for it and for every run ahead of it in line: at its place, the window's
    next free times (``grant_times``) must have come; for slots, one must be free for each run ahead and for it.
    """
    limits = account_limits(state, now)
    if limits is None:  # only a live run asks; a transaction beats its lease first
        raise ValueError(f"lease {lease_id!r} is not live")
    if slot:
        ahead = _place(state.slot_line, lease_id)
        if slots_held(state, now) + ahead >= limits.concurrency:
            return Decision(False, SLOT_RETRY, "slots")
    if grant:
        ahead = _place(state.line, lease_id)
        times = state.times
        when = plan_grants(times.nth, len(times), state.latest, len(state.pending), now, ahead + 1, limits)[-1]
        if when > now:
            wait = FULL_RETRY if math.isinf(when) else when - now
            return Decision(False, wait, "window" if ahead == 0 else "turn")
    return Decision(True)


def _queue(line: list[Waiter], lease_id: str, until: float) -> None:
    for waiter in line:
        if waiter.lease == lease_id:
            waiter.until = max(waiter.until, until)
            return
    line.append(Waiter(lease_id, until))


def _unqueue(line: list[Waiter], lease_id: str) -> None:
    line[:] = [w for w in line if w.lease != lease_id]


def request(state: AccountState, now: float, lease_id: str, *, grant: bool, slot: bool, extra: int = 0) -> Decision:
    """``decide``, then carry it out: take the grant (pending) and/or the slot, or keep the run's place in line.

    With ``extra``, a granted run also takes up to that many more of the same (grants and/or slots) ahead, as its
    stock for the next requests, so that at large limits a transaction serves many requests: only while no run waits
    in the line concerned, only what is free now, and at most ``1/STOCK_SHARE`` of it per live run. A stock grant is
    pending like any (its deadline ``STOCK_TTL`` later: the run sends on it by then or gives it back), a stock slot
    held like any."""
    decision = decide(state, now, lease_id, grant=grant, slot=slot)
    lease = state.leases[lease_id]
    if not decision.granted:
        if decision.why == "slots":
            _queue(state.slot_line, lease_id, now + SLOT_GRACE)
        else:
            _queue(state.line, lease_id, now + decision.wait + TURN_GRACE)
            if slot:
                _queue(state.slot_line, lease_id, now + decision.wait + SLOT_GRACE)
        return decision
    grant_id: str | None = None
    if grant:
        _unqueue(state.line, lease_id)
        state.seq += 1
        grant_id = f"{lease_id}.{state.seq}"
        state.pending.add(grant_id, Pending(lease_id, now, now + lease.timeout))
        state.latest = max(state.latest, now)
    if slot:
        _unqueue(state.slot_line, lease_id)
        lease.held += 1
    n = _stock_room(state, now, grant=grant, slot=slot, extra=extra)
    more: list[str] = []
    for _ in range(n if grant else 0):
        state.seq += 1
        more.append(f"{lease_id}.{state.seq}")
        state.pending.add(more[-1], Pending(lease_id, now, now + STOCK_TTL + lease.timeout))
    if slot:
        lease.held += n
    return Decision(True, grant_id=grant_id, more=tuple(more), more_slots=n if slot else 0)


def _stock_room(state: AccountState, now: float, *, grant: bool, slot: bool, extra: int) -> int:
    """How many more grants (and/or slots) a run granted now may take ahead: see ``request``."""
    if extra <= 0 or (grant and state.line) or (slot and state.slot_line):
        return 0
    limits = account_limits(state, now)
    if limits is None:
        return 0
    share = STOCK_SHARE * sum(1 for lease in state.leases.values() if lease.live(now))
    room = extra
    if slot:
        room = min(room, (limits.concurrency - slots_held(state, now)) // share)
    if grant and room > 0:
        # Free now: COUNT less the pending grants and the recorded ones still inside the window (one index count).
        times = state.times
        in_window = len(times) - times.count_le(now - limits.window) if len(times) else 0
        room = min(room, (limits.count - len(state.pending) - in_window) // share)
    return max(0, room)


def settle_grant(state: AccountState, now: float, grant_id: str) -> None:
    """Record a pending grant at ``now``, its answer (idempotent: an unknown grant changes nothing)."""
    grant = state.pending.take(grant_id)
    if grant is not None:
        _record(state, max(now, grant.sent))


def record_history(state: AccountState, now: float, times: list[float]) -> None:
    """Record answers the store never saw (a killed run's request log), none later than ``now``."""
    for t in times:
        if math.isfinite(t):
            _record(state, min(t, now))


def cancel_grant(state: AccountState, grant_id: str) -> None:
    """Forget a grant whose request was never sent (a run that changed its mind): it counts nowhere."""
    state.pending.take(grant_id)


def release(state: AccountState, lease_id: str, slots: int = 1) -> None:
    """Give back slots: predictions seen finished, or creates that surely made nothing."""
    lease = state.leases.get(lease_id)
    if lease is not None:
        lease.held = max(0, lease.held - slots)


def adopt(state: AccountState, now: float, lease_id: str, slots: int) -> None:
    """Hold ``slots`` more for predictions the run takes over (resumed from its output folder's ledger).

    A gone run of the same folder held the same predictions: its slots pass to this run, so they are not counted
    twice; what it held beyond them (lost answers the ledger does not show) stays held as before.
    """
    lease = state.leases[lease_id]
    lease.held += slots
    left = slots
    for other in sorted(state.leases.values(), key=lambda o: o.beat, reverse=True):
        if left <= 0:
            break
        if other.id == lease_id or other.label != lease.label or other.live(now) or not other.holds(now):
            continue
        taken = min(left, other.held)
        other.held -= taken
        left -= taken


def join(state: AccountState, now: float, lease: Lease) -> None:
    """Enter a run on the account. A lease of the same output folder still thought live is gone for sure (the
    folder's lock is this run's): it is marked gone now, its slots held as any gone run's."""
    expire(state, now)
    for other in state.leases.values():
        if other.id != lease.id and other.label == lease.label and other.live(now):
            other.left = True
    lease.beat = now
    state.leases[lease.id] = lease
    state.horizon = max(state.horizon, lease.period + lease.margin)
    state.keep = max(state.keep, lease.count)


def beat(state: AccountState, now: float, lease: Lease, *, hold: float | None = None) -> Lease:
    """A transaction of the run: its lease is live to ``now``. ``lease`` is the run's own copy: if the store dropped
    the lease (gone for longer than its hold: a machine asleep, a frozen process), it enters again as it is."""
    mine = state.leases.get(lease.id)
    if mine is None:
        mine = dataclasses.replace(lease)
        state.leases[lease.id] = mine
        state.horizon = max(state.horizon, lease.period + lease.margin)
        state.keep = max(state.keep, lease.count)
    mine.beat = now
    mine.left = False
    if hold is not None:
        mine.hold = hold
    return mine


def mark_gone(state: AccountState, lease_ids: set[str]) -> None:
    """Runs seen dead (their process is not running on this machine): gone from their last beat on."""
    for lease_id in lease_ids:
        lease = state.leases.get(lease_id)
        if lease is not None:
            lease.left = True


def leave(state: AccountState, now: float, lease_id: str) -> None:
    """A run ends: its place in line and its requests end with it; slots it still holds (predictions it leaves
    running on the server, for the next run) stay held for its hold."""
    lease = state.leases.get(lease_id)
    if lease is None:
        return
    for grant_id, grant in state.pending.of(lease_id):
        state.pending.take(grant_id)
        _record(state, max(now, grant.sent))
    _unqueue(state.line, lease_id)
    _unqueue(state.slot_line, lease_id)
    lease.beat, lease.left = now, True
    if lease.held == 0:
        del state.leases[lease_id]


def view(state: AccountState, now: float, lease_id: str | None) -> View:
    """What ``lease_id`` sees of the account (or anyone, for ``None``); limits default to nothing while no run is
    live."""
    limits = account_limits(state, now) or AccountLimits(1, 1.0, 0.0, 1)
    lease = state.leases.get(lease_id) if lease_id is not None else None
    times = state.times
    recorded = len(times)
    pending = len(state.pending)
    first = max(0, recorded - limits.count + pending)
    return View(
        now=now,
        limits=limits,
        times=tuple(times.run(first, VIEW_TIMES)) if first < recorded else (),
        first=first,
        recorded=recorded,
        in_window=recorded - times.count_le(now - limits.window) if recorded else 0,
        latest=state.latest,
        pending=pending,
        held=slots_held(state, now),
        own_held=lease.held if lease is not None else 0,
        slots_ahead=_place(state.slot_line, lease_id) if lease_id is not None else 0,
        runs=sum(1 for lease in state.leases.values() if lease.live(now)),
        slot_line=len(state.slot_line),
    )
