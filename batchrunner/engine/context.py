"""What every collaborator of one run shares: its inputs, its clocks, its stop, the API's health and what it learns.

The dispatcher (``scheduler.py``) and each collaborator (``creates``, ``watching``, ``doubts``, ``cancels``,
``grants``) read and change this one record, and no job state of one another's: the run's stop (why, until when the
drain lasts, the deadline, a fatal error), whether the API is answering (``ok``/``failed``: twelve failures in a row
stop submitting), the prediction times learnt (``learn``: the poll plan is redone from them now and then) and the
in-flight slots held for predictions that may be running unseen (``hold_slot``).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Coroutine
from typing import Any

from batchrunner.api.client import Client
from batchrunner.engine.policy import PollPlan, doubt_hold, plan_polls
from batchrunner.engine.runstate import Counters, RunConfig, StopReason
from batchrunner.errors import ApiError, AuthError, BatchrunnerError, CreatePathRefused
from batchrunner.limits.limiter import AccountLimiter, GateLike, LocalLimits
from batchrunner.manifest import Manifest
from batchrunner.store.ledger import Ledger, LedgerState
from batchrunner.store.output import OutputDir

log = logging.getLogger("batchrunner")

# After this many API failures in a row with no success in between, the API is taken to be down: stop submitting.
MAX_CONSECUTIVE_FAILURES = 12
# Prediction times kept to plan from (the newest).
KEPT_DURATIONS = 500


class Run:
    """One run's shared record; the dispatcher makes it and hands it to each collaborator."""

    def __init__(
        self,
        manifest: Manifest,
        client: Client,
        ledger: Ledger,
        out: OutputDir,
        state: LedgerState,
        config: RunConfig,
        *,
        clock: Callable[[], float] | None,
        wall: Callable[[], float],
        rng: random.Random,
        limits: AccountLimiter | LocalLimits,
    ) -> None:
        self.manifest = manifest
        self.client = client
        self.ledger = ledger
        self.out = out
        self.state = state
        self.config = config
        self._clock = clock
        self.wall = wall
        self.rng = rng
        self.limits = limits
        self.gate: GateLike = limits.gate
        self.counters = Counters()
        self.wake = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self.progress: Callable[[], None] = lambda: None
        # The stop: why, until when what is in flight is finished, the --max-runtime deadline, an error ending it now.
        self.stop_reason: StopReason | None = None
        self.stopping_at: float | None = None
        self.deadline: float | None = None
        self.started = 0.0
        self.fatal: BatchrunnerError | None = None
        # Until the API has answered once, one request at a time: a wrong key then costs one request, not ten.
        self.key_checked = False
        self.consecutive_failures = 0
        # A ledger's durations past the job timeout (or below zero) are corrupt or from another configuration; kept, one
        # of 1e300 s would hold a lost create's slot and push every deadline out of reach.
        self.durations: list[float] = [d for d in state.durations if 0.0 <= d <= config.job_timeout][-KEPT_DURATIONS:]
        self.sorted_durations: list[float] = sorted(self.durations)
        self.plan: PollPlan = self._new_plan()
        self.learned = 0  # prediction times learnt this run (the plan is redone now and then, not after each)
        # Slots held for creates whose answer was lost: the prediction may be running on the server, so it keeps its
        # slot until it would surely have finished (loop times at which to release them).
        self.phantoms: list[float] = []

    def now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    # ----------------------------------------------------------------------------------------------- the stop
    def request_stop(self, reason: StopReason, *, drain: float | None = None) -> None:
        """Stop submitting; finish what is in flight for ``drain`` seconds (default: the configured drain timeout)."""
        if self.stop_reason is None:
            self.stop_reason = reason
        grace = self.config.drain_timeout if drain is None else drain
        until = self.now() + grace
        if self.deadline is not None:
            until = min(until, max(self.now(), self.deadline))  # a drain after Ctrl-C still ends by the deadline
        self.stopping_at = until if self.stopping_at is None else min(self.stopping_at, until)
        self.wake.set()

    def until_deadline(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - self.now())

    # ----------------------------------------------------------------------------------------------- the API's health
    def ok(self) -> None:
        self.key_checked = True
        self.consecutive_failures = 0

    def failed(self, exc: ApiError) -> None:
        if isinstance(exc, AuthError):
            self.fatal = exc
            return
        if exc.status is not None:
            self.key_checked = True  # the API answered and did not refuse the key
        if exc.status == 429 or isinstance(exc, CreatePathRefused):
            return  # busy, or a create sent to the form of its path this server does not take: not down
        self.consecutive_failures += 1
        if self.consecutive_failures >= MAX_CONSECUTIVE_FAILURES and self.stop_reason is None:
            log.error("the API failed %d times in a row (last: %s); stopping", self.consecutive_failures, exc)
            self.request_stop(StopReason.API_DOWN)

    # ----------------------------------------------------------------------------------------------- learning
    def _new_plan(self) -> PollPlan:
        rate = self.config.rate_count / self.config.rate_period if self.config.rate_scope == "all" else 1e9
        return plan_polls(
            self.durations,
            rate=rate,
            concurrency=self.config.concurrency,
            prior_initial=self.config.poll_initial,
            min_interval=self.config.poll_min_interval,
        )

    def learn(self, duration: float) -> None:
        self.durations.append(duration)
        if len(self.durations) > KEPT_DURATIONS:
            del self.durations[:-KEPT_DURATIONS]
        self.learned += 1
        # Re-plan on the first few samples, then every tenth, then every hundredth: the plan changes slowly once it has
        # data, and redoing it costs ~10 ms at 500 samples. (Counted by the samples learnt, not those kept: once 500
        # are kept their number stays put, and the plan was redone after every finish.)
        n = self.learned
        if n <= 20 or (n <= 200 and n % 10 == 0) or n % 100 == 0:
            self.plan = self._new_plan()
            self.sorted_durations = sorted(self.durations)

    def doubt_hold(self) -> float:
        """How long a slot is held for a prediction that may run unseen."""
        return doubt_hold(self.durations, self.config.poll_initial)

    # ----------------------------------------------------------------------------------------------- slots held
    def hold_slot(self, until: float) -> None:
        """Hold an in-flight slot (already taken) until ``until``: a prediction may be running that we cannot see."""
        self.phantoms.append(until)

    def release_holds(self, now: float, soonest: Callable[[float], None]) -> None:
        if not self.phantoms:
            return
        expired = [t for t in self.phantoms if t <= now]
        for _ in expired:
            self.gate.release()
        self.phantoms = [t for t in self.phantoms if t > now]
        soonest(min(self.phantoms, default=now))

    # ----------------------------------------------------------------------------------------------- tasks
    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            if isinstance(exc, BatchrunnerError):
                self.fatal = self.fatal or exc
            else:
                self.fatal = self.fatal or BatchrunnerError(f"internal error: {type(exc).__name__}: {exc}")
                log.error("internal error", exc_info=exc)
        self.progress()
        self.wake.set()

    async def cancel_tasks(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
