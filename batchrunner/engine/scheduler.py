"""The dispatcher of one run: asks each collaborator for its next request and when it is due, and hands it the answer.

One coroutine owns every decision. Each turn it asks, in this order: is a prediction past its deadline (``cancels``)?
is a create in doubt to be looked for (``doubts``)? may a job be created, or an image uploaded (``creates``)? is a
listing round or a poll due (``watching``)? If the chosen action is a request to the API host it takes a grant first
(``grants``: the window, the poll pacer, the account's store) — the dispatcher is the only taker, so the window is exact
by construction — and the collaborator runs the request as a task, so a slow answer never blocks other decisions.
Tasks report back by changing their collaborator's state and setting the run's ``wake`` event. The dispatcher holds no
job state of its own: what the collaborators share (the stop, the API's health, what is learnt) is ``context.Run``.

Write-ahead order, so that a kill at any instant replays to a state the next run completes:
``submitting`` (intent) -> create -> ``submitted`` (prediction id) -> poll ... -> download, fsync, rename ->
``succeeded`` (``creates.py``, ``watching.py``, ``results.py``); a create in doubt is settled from the account's
listing before anything is paid again (``doubts.py``); an overdue prediction is cancelled and watched on
(``cancels.py``). ``Uploads`` and ``Results`` hold their own state; they never take a window place themselves.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from batchrunner.api.client import Client
from batchrunner.engine import summary
from batchrunner.engine.cancels import Cancels
from batchrunner.engine.collector import run_pace
from batchrunner.engine.context import Run
from batchrunner.engine.creates import Creates
from batchrunner.engine.doubts import Doubts
from batchrunner.engine.dues import Flights
from batchrunner.engine.grants import Grants
from batchrunner.engine.results import Results
from batchrunner.engine.runstate import RunConfig, RunResult, Snapshot, StopReason, classify
from batchrunner.engine.uploads import Uploads, data_uri
from batchrunner.engine.watching import Watching
from batchrunner.errors import ApiTimeout
from batchrunner.limits.limiter import AccountLimiter, LocalLimits, RunLimits, WindowLike
from batchrunner.manifest import Job, Manifest
from batchrunner.store.ledger import Ledger, LedgerState, RequestLog
from batchrunner.store.output import OutputDir

# What callers import from here, including the run's records (runstate.py) and data_uri (uploads.py) re-exported.
__all__ = ["RunConfig", "RunResult", "Scheduler", "Snapshot", "StopReason", "classify", "data_uri"]

Action = tuple[str, Any]


class Scheduler:
    """Runs one manifest's batch to completion or to a stop, within both limits."""

    def __init__(
        self,
        manifest: Manifest,
        client: Client,
        ledger: Ledger,
        out: OutputDir,
        state: LedgerState,
        config: RunConfig,
        *,
        request_log: RequestLog | None = None,
        clock: Callable[[], float] | None = None,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        on_progress: Callable[[Snapshot], None] | None = None,
        content_types: Mapping[str, str] | None = None,
        limits: AccountLimiter | LocalLimits | None = None,
    ) -> None:
        rng = rng or random.Random()
        # The run's own window and gate, or the account's through its store (accountlimits.py).
        limits = (
            limits
            if limits is not None
            else LocalLimits(RunLimits(config.rate_count, config.rate_period, config.concurrency))
        )
        self.ctx = run = Run(
            manifest, client, ledger, out, state, config, clock=clock, wall=wall, rng=rng, limits=limits
        )
        self.manifest, self.client, self.state, self.config = manifest, client, state, config
        self.counters = run.counters
        self._on_progress, self._last_progress, self._begun = on_progress, -1.0, False
        run.progress = self._progress
        self.grants = grants = Grants(run, request_log)
        self.uploads = Uploads(config, ledger, content_types, rng=rng, clock=run.now)
        self.results = Results(ledger, state, run.counters, config, rng=rng, retry=self._retry_later)
        self.watching = Watching(
            run,
            grants,
            self.results,
            self.uploads,
            to_create=lambda: len(self.creates.ready) + len(self.creates.delayed),
            creatable=lambda: self.creates.creatable(),
        )
        self.cancels = Cancels(run, grants, self.results, self.watching.flights, self.watching.orphans)
        self.doubts = Doubts(
            run,
            grants,
            self.uploads,
            adopt=self.watching.adopt,
            create_again=lambda job: self.creates.create_again(job),
        )
        self.creates = Creates(
            run,
            grants,
            self.uploads,
            self.results,
            created=self.watching.add,
            in_doubt=self.doubts.add,
            rerun=self.cancels.count_rerun,
            in_flight=lambda: len(self.watching.flights),
        )
        limits.bind(
            wake=run.wake.set, on_lost=grants.limits_lost, hold=run.doubt_hold, wants_slot=self.creates.wants_slot
        )

    # What callers and tests read of the run.
    @property
    def fatal(self) -> Any:
        return self.ctx.fatal

    @property
    def window(self) -> WindowLike:
        return self.grants.window

    @property
    def flights(self) -> Flights:
        return self.watching.flights

    @property
    def durations(self) -> list[float]:
        return self.ctx.durations

    def now(self) -> float:
        return self.ctx.now()

    def snapshot(self) -> Snapshot:
        return summary.snapshot(self.ctx, self.grants, self.creates, self.watching, self.doubts, self.results)

    def _progress(self) -> None:
        if self._on_progress is not None:
            self._on_progress(self.snapshot())

    def _result(self) -> RunResult:
        return summary.result(self.ctx, self.creates, self.watching, self.doubts, self.results, self.uploads)

    def _retry_later(self, job: Job, delay: float) -> None:
        self.creates.retry_later(job, delay)

    def _seed_window(self) -> None:
        self.grants.seed_window()

    # ----------------------------------------------------------------------------------------------- set-up
    def _load(self) -> None:
        """Sort the manifest's jobs by what the ledger says, and take over the predictions left in flight."""
        run, c = self.ctx, self.ctx.counters
        state, now, wall_now = run.state, run.now(), run.wall()
        jobs_by_fp = {job.fingerprint: job for job in self.manifest.jobs}
        doubting: list[Job] = []
        c.total, c.lost_answers, c.recovered, c.spend = (
            len(jobs_by_fp),
            state.lost_answers,
            state.recovered,
            state.spend,
        )
        for job in self.manifest.jobs:
            st = state.jobs.get(job.fingerprint)
            present = st is not None and run.out.has_file(st.file)
            verdict = classify(st, file_present=present, max_attempts=self.config.max_attempts)
            if verdict == "done":
                c.skipped += 1
            elif verdict == "failed":
                c.failed += 1
            elif verdict == "submit":
                self.creates.ready.append(job)
            elif verdict == "reconcile":
                doubting.append(job)
        self.uploads.plan(state.uploads, [*self.creates.ready, *doubting], wall_now)
        self.watching.take_over(state.in_flight(), jobs_by_fp, now, wall_now)
        self.doubts.take_over(doubting, jobs_by_fp, now, wall_now)
        self.grants.seed_window()

    def _begin(self) -> None:
        """Start the run's clock, once: ``--max-runtime`` counts from the first wait or request, the schema's too."""
        if self._begun:
            return
        self._begun = True
        self.ctx.started = self.ctx.now()
        if self.config.max_runtime is not None:
            self.ctx.deadline = self.ctx.started + self.config.max_runtime

    # ----------------------------------------------------------------------------------------------- the run
    async def run(self) -> RunResult:
        """Run until every job is done or failed, or a stop condition ends the run; returns the account."""
        self._begin()
        self._load()
        self._progress()
        with run_pace():
            try:
                await self._dispatch()
            finally:
                await self.ctx.cancel_tasks()
        return self._result()

    async def fetch_schema(self, slug: str) -> Mapping[str, Any] | None:
        """Fetch a model's input schema before the run, within the same request window and the run's deadline.

        Raises ApiTimeout when the deadline comes first; the run that follows then stops at once.
        """
        self._begin()
        self.grants.seed_window()
        await self.grants.wait_before_run()
        ticket = self.grants.take(self.ctx.now())
        try:
            async with asyncio.timeout(self.ctx.until_deadline()):
                return await self.grants.call_with(ticket, "schema", self.client.model_schema(slug))
        except TimeoutError:
            raise ApiTimeout("the run's deadline came before the model's schema") from None

    def request_stop(self, reason: StopReason, *, drain: float | None = None) -> None:
        """Stop submitting; finish what is in flight for ``drain`` seconds (default: the configured drain timeout)."""
        self.ctx.request_stop(reason, drain=drain)

    def abort(self) -> None:
        """Stop at once (a second Ctrl-C): the ledger is consistent after every line, so nothing more is needed."""
        self.ctx.request_stop(self.ctx.stop_reason or StopReason.INTERRUPTED, drain=0.0)

    async def _dispatch(self) -> None:
        run, grants = self.ctx, self.grants
        while True:
            run.wake.clear()
            now = run.now()
            if now - self._last_progress >= 0.1:
                self._last_progress = now
                self._progress()
            if run.fatal is not None:
                return
            if run.deadline is not None and now >= run.deadline and run.stopping_at is None:
                run.request_stop(StopReason.DEADLINE, drain=0.0)
            if run.stopping_at is not None and now >= run.stopping_at:
                return
            action, wake_at = self._choose(now)
            if action is None:
                if not self.watching.flights and not run.tasks and not self._has_work():
                    return
                await self._sleep(wake_at, now)
                continue
            kind, target = action
            if kind == "abandon":  # no request: a cancelled prediction that overstayed a second timeout
                self.cancels.abandon(target)
                continue
            if not run.key_checked and grants.calls_in_progress > 0:
                await self._sleep(None, now)
                continue
            to_create = bool(self.creates.ready or self.creates.delayed or self.uploads.queue)
            delay, paced = grants.delay(kind, now, to_create=to_create, creates_waiting=bool(self.creates.ready))
            if delay > 0:
                # inf: every place in the window is held by a request on the wire; its answer wakes us.
                await self._sleep(None if math.isinf(delay) else now + delay, now)
                continue
            if run.limits.shared and not await grants.account_grant(kind, partial(self._still_chosen, kind, target)):
                continue
            if paced:
                grants.pacer.take(now)
            ticket = grants.take(now) if grants.counts(kind) else None
            self._start(kind, target, now, ticket)

    def _start(self, kind: str, target: Any, now: float, ticket: int | None) -> None:
        """Hand the chosen request back to the collaborator that asked for it."""
        if kind in ("poll", "watch"):
            self.watching.start(kind, target, now, ticket)
        elif kind in ("create", "presign"):
            self.creates.start(kind, target, ticket)
        elif kind in ("list", "inspect"):
            self.doubts.start(kind, target, ticket)
        else:
            self.cancels.start(kind, target, ticket)

    def _still_chosen(self, kind: str, target: Any) -> bool:
        again, _ = self._choose(self.ctx.now())
        return again is not None and again[0] == kind and again[1] is target

    def _has_work(self) -> bool:
        if len(self.doubts):
            return True  # doubts are settled even while stopping: it costs a listing, and may save a payment
        if self.ctx.stop_reason is not None:
            return False
        return self.creates.to_create()

    async def _sleep(self, wake_at: float | None, now: float) -> None:
        run = self.ctx
        timeout = None if wake_at is None else max(0.0, wake_at - now)
        # Whatever the wait is for (the window, a poll, an answer), it ends by the stop or the deadline.
        for limit in (run.stopping_at, run.deadline):
            if limit is not None:
                until = max(0.0, limit - now)
                timeout = until if timeout is None else min(timeout, until)
        if timeout is not None and timeout <= 0:
            await asyncio.sleep(0)
            return
        # A timer that sets the wake event is far cheaper than wait_for (no task, no cancellation per turn).
        timer = None if timeout is None else asyncio.get_running_loop().call_later(timeout, run.wake.set)
        try:
            await run.wake.wait()
        finally:
            if timer is not None:
                timer.cancel()

    def _choose(self, now: float) -> tuple[Action | None, float | None]:
        """The next action and, when there is none, when to look again: each collaborator asked in turn."""
        wake_at: float | None = None

        def soonest(t: float) -> None:
            nonlocal wake_at
            wake_at = t if wake_at is None else min(wake_at, t)

        for collaborator in (self.cancels, self.doubts, self.creates, self.watching):
            action = collaborator.next(now, soonest)
            if action is not None:
                return action, None
        if self.ctx.deadline is not None:
            soonest(self.ctx.deadline)
        return None, wake_at
