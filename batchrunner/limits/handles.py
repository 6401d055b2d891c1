"""The handles a run's scheduler holds on its limits: ``WindowLike`` and ``GateLike``, a run's own (``LocalLimits``,
over ``window.py``), and the account's window and gate as one run sees them (``AccountWindow``, ``AccountGate``, over
``limiter.AccountLimiter``'s last view of the store and its stock). ``RunLimits`` is what a run asks of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from batchrunner.limits.account import plan_grants
from batchrunner.limits.window import InFlightGate, SlidingWindow, answer_margin

if TYPE_CHECKING:
    from batchrunner.limits.limiter import AccountLimiter

__all__ = ["AccountGate", "AccountWindow", "GateLike", "LocalLimits", "RunLimits", "WindowLike"]


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


class AccountWindow:
    """The account's window as the scheduler sees it (loop times), over ``AccountLimiter``'s view and stock."""

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


class AccountGate:
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
        if o.keep_slot():
            return  # the run's next create takes it, with no transaction
        o.lease.held -= 1
        o.released_since_view += 1
        o.queue_op("release", 1)
        if o.fallback is not None:
            o.fallback[1].release()
