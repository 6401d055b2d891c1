"""The window's places and the account's grants, and the task each request runs in.

The dispatcher is the only taker of window places, so the window is exact by construction: it asks ``delay`` how long
the chosen request must wait (the window; the poll pacer while jobs remain to be created; the places kept for creates),
takes the account's grant when the limits are shared (``account_grant``), then a place (``take``), and runs the request
as a task (``task``) that settles its place the moment the answer comes (``call``, which also counts every request and
every 429).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from contextvars import ContextVar
from typing import Any, TypeVar

from batchrunner.engine.context import Run
from batchrunner.engine.policy import PollPacer, poll_reserve
from batchrunner.engine.runstate import StopReason
from batchrunner.errors import ApiError, ApiTimeout, RateLimited
from batchrunner.limits.account import StoreLost
from batchrunner.limits.limiter import WindowLike
from batchrunner.limits.window import SlidingWindow, default_margin, seed_history
from batchrunner.store.ledger import RequestLog

log = logging.getLogger("batchrunner")
T = TypeVar("T")

# The window ticket of the request a task is making (each task makes one counted request), read by Grants.call.
_TICKET: ContextVar[int | None] = ContextVar("batchrunner_request_ticket", default=None)


class Grants:
    """The run's window (its own, or the account's through its store) and the requests on the wire."""

    def __init__(self, run: Run, request_log: RequestLog | None) -> None:
        self.run = run
        self.request_log = request_log
        self.limits = run.limits
        self.window: WindowLike = run.limits.window
        config = run.config
        # Polls are paced at the window's sustainable rate; when only creates count, at what the per-prediction minimum
        # interval allows for a full set of slots.
        pace = config.rate_count / config.rate_period
        if config.rate_scope != "all":
            pace = config.concurrency / max(config.poll_min_interval, 0.05)
        self.pacer = PollPacer(pace)
        self._seeded = False
        self.calls_in_progress = 0

    def seed_window(self) -> None:
        """Count the requests a killed run made in the current window (once, before the first request)."""
        if self._seeded:
            return
        self._seeded = True
        run, config = self.run, self.run.config
        now, wall_now = run.now(), run.wall()
        if self.request_log is not None:
            # Requests a killed run made in the current window still count: do not burst past them.
            # The log has send times only: count each as answered within the network margin of its send.
            late = default_margin(config.rate_period)
            recent = self.request_log.recent(config.rate_period + self.window.margin + late)
            if recent:
                history = seed_history(recent, now=now, wall_now=wall_now, late=late)
                if self.limits.shared:  # into the account's window (a run of an older version, or another store)
                    self.limits.seed(history)
                    return
                self.window = SlidingWindow(
                    config.rate_count, config.rate_period, margin=self.window.margin, history=history
                )

    def counts(self, kind: str) -> bool:
        """Whether a request of this kind takes a window place."""
        return kind == "create" or self.run.config.rate_scope == "all"

    def delay(self, kind: str, now: float, *, to_create: bool, creates_waiting: bool) -> tuple[float, bool]:
        """How long the chosen request waits (inf: until an answer), and whether it is a paced poll."""
        counts = self.counts(kind)
        delay = self.window.delay(now) if counts else 0.0
        # While jobs remain to be created, polls are paced so they cannot drain the window a create needs; after
        # that the window alone limits them.
        paced = kind == "poll" and to_create
        if paced:
            delay = max(delay, self.pacer.delay(now))
        if kind == "poll" and counts:
            reserve = poll_reserve(creates_waiting=creates_waiting, slots_free=self.run.gate.free())
            if reserve and self.window.remaining(now) <= reserve:
                delay = max(delay, self.window.next_free_times(now, reserve + 1)[-1] - now)
        return delay, paced

    async def account_grant(self, kind: str, still_chosen: Callable[[], bool]) -> bool:
        """Take the chosen request's grant (and a create's slot) from the account's store; False when it must wait.

        The store's answer is awaited, so the run's state may have moved meanwhile: if the dispatcher would now
        choose otherwise (``still_chosen``), what was taken goes back unused (no request was sent: it counts nowhere).
        """
        counts = self.counts(kind)
        if not counts and kind != "create":
            return True  # a request the window does not count (--rate-limit-scope creates)
        if not await self.limits.acquire(grant=counts, slot=kind == "create"):
            return False
        if not still_chosen():
            self.limits.give_back()
            return False
        return True

    async def wait_before_run(self) -> None:
        """Wait for a grant before the run (the schema's request); raises ApiTimeout when the deadline comes first."""
        # Before the run nothing is on the wire, so the delay is finite; a timer may fire a little early: ask again.
        # With the account's limits, the store says whether the grant is this run's (else the delay is its wait).
        run = self.run
        while (delay := self.window.delay(run.now())) > 0 or not await self.limits.acquire(grant=True, slot=False):
            delay = self.window.delay(run.now())
            left = run.until_deadline()
            if left is not None and left <= delay:
                await asyncio.sleep(left)
                raise ApiTimeout("the run's deadline came before the request window had room")
            await asyncio.sleep(delay)

    def limits_lost(self, exc: StoreLost) -> None:
        log.error("%s; no new submissions: finishing what is in flight within the last limits known", exc)
        self.run.request_stop(StopReason.LIMITS_STORE)

    def take(self, now: float) -> int:
        """Take a window place for a request sent now; it counts from its answer on (``settle``)."""
        ticket = self.window.take(now, pending=True)
        if self.request_log is not None:
            self.request_log.record(self.run.wall())
        return ticket

    def settle(self, ticket: int) -> None:
        self.window.settle(ticket, self.run.now())
        self.run.wake.set()  # the window's next opening moved from "after an answer" to a time

    def start(self, work: Callable[[], Coroutine[Any, Any, None]], ticket: int | None) -> None:
        """Run one request as a task; ``work`` makes its coroutine inside the task."""
        self.calls_in_progress += 1
        self.run.spawn(self._task(work, ticket))

    async def call(self, kind: str, request: Awaitable[T]) -> T:
        """Count one API request and await it; its window place is settled the moment it ends, however."""
        counters = self.run.counters
        counters.requests += 1
        counters.by_kind[kind] = counters.by_kind.get(kind, 0) + 1
        try:
            return await request
        except ApiError as exc:
            if exc.status == 429 or isinstance(exc, RateLimited):
                # Every 429 is counted here, whatever the request: it means something else is spending the key.
                counters.rate_limited += 1
                self.limits.count_rate_limited()
                if counters.rate_limited == 1:
                    log.warning(
                        "the API refused a request with 429 (%s: %s): something else is spending this key", kind, exc
                    )
            raise
        finally:
            ticket = _TICKET.get()
            if ticket is not None:
                self.settle(ticket)

    async def _task(self, work: Callable[[], Coroutine[Any, Any, None]], ticket: int | None) -> None:
        """Run one request's task; ``calls_in_progress`` (raised when it was started) drops however it ends.

        ``ticket`` is the request's window place: ``call`` settles it at the answer (the task's context carries
        it there); if the task ends without reaching ``call`` (cancelled first), it is settled here. ``work`` makes
        the coroutine here, in the task: one made beforehand and never run (the run stopped first) warns at exit.
        """
        _TICKET.set(ticket)
        try:
            await work()
        finally:
            self.calls_in_progress -= 1
            if ticket is not None:
                self.settle(ticket)

    async def call_with(self, ticket: int, kind: str, request: Awaitable[T]) -> T:
        """Make one request outside a task (the schema's before the run), settling ``ticket`` at its answer."""
        token = _TICKET.set(ticket)
        try:
            return await self.call(kind, request)
        finally:
            _TICKET.reset(token)
