"""The asyncio orchestration: submit, poll, download, retry, stop.

One dispatcher coroutine owns every decision. Each turn it asks, in this order: is a prediction past its timeout (cancel
it)? may a job be created (a free in-flight slot, submitting allowed, budget left)? is a poll due? If the chosen action
is a request to the API host it takes a grant from the sliding window first — the dispatcher is the only caller, so the
window is exact by construction — and runs the request as a task, so a slow answer never blocks other decisions.
Tasks report back by mutating the scheduler's state and setting the ``wake`` event.

Write-ahead order, so that a kill at any instant replays to a state the next run completes:
``submitting`` (intent) -> create -> ``submitted`` (prediction id) -> poll ... -> download, fsync, rename ->
``succeeded``. A create that may have made a prediction without saying so (a 5xx, a timeout, a reset after sending: see
``reconcile.create_in_doubt``) is *in doubt*: it keeps its slot while the account's listing is searched for it
(``Reconciler``); a match is adopted (``recovered``) and watched like any other prediction, no match after a few looks
means nothing was made (``not_created``) and the job is created again. Only when the listing fails is a job created
again in doubt, and counted as possibly paid twice. A resumed run settles the doubts a killed run left the same way.

After ``--job-timeout`` a prediction is cancelled, but cancels are best effort and often only recorded: it is watched
on, and nothing is created again for its job until it is terminal (a success is saved and is the job's result;
``cancelled`` or a failure is a failed attempt) or until a hold long enough that the account no longer runs it
(``policy.cancel_hold``); a job created again after that hold counts as possibly paid twice.

Two collaborators, owned by the scheduler, hold their own state: ``Uploads`` (which input images to upload, their
uploads, the request bodies) and ``Results`` (downloading a finished prediction's output, and the success or failure
bookkeeping that follows). The dispatcher decides when their requests run; they never take a window place themselves.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from contextvars import ContextVar
from typing import Any, TypeVar

from batchrunner.api.client import Client, Phase, Prediction
from batchrunner.engine.policy import (
    MIN_SAMPLES,
    PollPacer,
    PollPlan,
    cancel_hold,
    done_probability,
    doubt_hold,
    expected_duration,
    learnt_duration,
    likely_done_age,
    plan_polls,
    poll_reserve,
    poll_value,
    retry_delay,
)
from batchrunner.engine.reconcile import PAGE_SIZE, TRIES, Doubt, Outcome, Reconciler, create_in_doubt
from batchrunner.engine.results import Results
from batchrunner.engine.runstate import (
    Counters,
    Flight,
    RunConfig,
    RunResult,
    Snapshot,
    StopReason,
    classify,
    job_state,
)
from batchrunner.engine.uploads import Uploads, data_uri
from batchrunner.engine.watch import Watch, listing_interval, needs_get
from batchrunner.errors import (
    ApiError,
    ApiTimeout,
    AuthError,
    BatchrunnerError,
    CreatePathRefused,
    InputImageError,
    NotFound,
    PaymentRequired,
    RateLimited,
    TransientError,
)
from batchrunner.limits.account import StoreLost
from batchrunner.limits.limiter import AccountLimiter, GateLike, LocalLimits, RunLimits, WindowLike
from batchrunner.limits.window import SlidingWindow, default_margin, seed_history
from batchrunner.manifest.parse import Job, Manifest
from batchrunner.store.ledger import (
    CREATE_FAILED,
    NOT_CREATED,
    RECOVERED,
    SUBMITTED,
    SUBMITTING,
    JobStatus,
    Ledger,
    LedgerState,
    RequestLog,
)
from batchrunner.store.output import OutputDir, describe_os_error

# What callers import from here, including the run's records (runstate.py) and data_uri (uploads.py) re-exported.
__all__ = ["RunConfig", "RunResult", "Scheduler", "Snapshot", "StopReason", "classify", "data_uri"]

log = logging.getLogger("batchrunner")
T = TypeVar("T")

# After this many API failures in a row with no success in between, the API is taken to be down: stop submitting.
MAX_CONSECUTIVE_FAILURES = 12
# Transient failures of one create within one run before the job is left for a later run.
MAX_CREATE_RETRIES = 8
# A prediction a resumed run takes over is watched by the listing when younger than this, else polled.
RESUMED_LISTED_AGE = 600.0
# 404s in a row before a prediction is taken to be unknown: a fresh one may not be readable yet.
NOT_FOUND_LOOKS = 3
# An early poll, beyond the plan, is spent only on a prediction at least this likely to be done.
OPPORTUNISTIC_MIN_PROBABILITY = 0.1
# The window ticket of the request a task is making (each task makes one counted request), read by _call.
_TICKET: ContextVar[int | None] = ContextVar("batchrunner_request_ticket", default=None)


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
        self.manifest = manifest
        self.client = client
        self.ledger = ledger
        self.out = out
        self.state = state
        self.config = config
        self.request_log = request_log
        self._clock = clock
        self._wall = wall
        self._rng = rng or random.Random()
        self._on_progress = on_progress
        self.counters = Counters()
        # The run's own window and gate, or the account's through its store (accountlimits.py).
        self.limits = limits or LocalLimits(RunLimits(config.rate_count, config.rate_period, config.concurrency))
        self.window: WindowLike = self.limits.window
        self.gate: GateLike = self.limits.gate
        # Polls are paced at the window's sustainable rate; when only creates count, at what the per-prediction minimum
        # interval allows for a full set of slots.
        pace = config.rate_count / config.rate_period
        if config.rate_scope != "all":
            pace = config.concurrency / max(config.poll_min_interval, 0.05)
        self.pacer = PollPacer(pace)
        self.flights: dict[str, Flight] = {}
        # Flights whose job the manifest no longer has: counted apart, so a snapshot costs the same at any size.
        self.orphans: set[str] = set()
        self.ready: deque[Job] = deque()
        self.delayed: list[tuple[float, Job]] = []
        self.creates_this_run = 0
        self.create_retries: dict[str, int] = {}
        # A ledger's durations past the job timeout (or below zero) are corrupt or from another configuration; kept, one
        # of 1e300 s would hold a lost create's slot and push every deadline out of reach.
        self.durations: list[float] = [d for d in state.durations if 0.0 <= d <= config.job_timeout][-500:]
        self.plan: PollPlan = self._new_plan()
        self.sorted_durations: list[float] = sorted(self.durations)
        self.stop_reason: StopReason | None = None
        self.stopping_at: float | None = None
        self.fatal: BatchrunnerError | None = None
        self.consecutive_failures = 0
        self.wake = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self.started = 0.0
        self._begun = False
        self.deadline: float | None = None
        self.uploads = Uploads(config, ledger, content_types, rng=self._rng, clock=self.now)
        self.results = Results(ledger, state, self.counters, config, rng=self._rng, retry=self._retry_later)
        self.pending_reserved = 0  # creates in progress (they hold a gate slot and a budget reservation)
        # Slots held for creates whose answer was lost: the prediction may be running on the server, so it keeps its
        # slot until it would surely have finished (loop times at which to release them).
        self.phantoms: list[float] = []
        self._window_seeded = False
        self.creates_paused_until = 0.0
        self._last_progress = -1.0
        # Until the API has answered once, one request at a time: a wrong key then costs one request, not ten.
        self.key_checked = False
        self.calls_in_progress = 0
        # Creates in doubt, settled from the account's listing before anything is paid again (reconcile.py). Each holds
        # an in-flight slot until settled: its prediction may be running.
        self.recon = Reconciler(
            model=manifest.model, known=state.predictions, wait=config.reconcile_wait, skew=config.clock_skew
        )
        self.doubt_jobs: dict[str, Job] = {}
        self.recon_paused_until = 0.0
        self.recon_failures = 0  # failed sweep requests in a row, for the backoff between sweeps
        # Every prediction in flight watched by one listing request (watch.py), else each polled.
        self.watch = Watch(config.watch, probe_every=config.listing_probe)
        self.learned = 0  # prediction times learnt this run (the plan is redone now and then, not after each)
        self.limits.bind(
            wake=self.wake.set,
            on_lost=self._limits_lost,
            hold=lambda: doubt_hold(self.durations, self.config.poll_initial),
            wants_slot=lambda: self.stop_reason is None and bool(self.ready),
        )

    # ----------------------------------------------------------------------------------------------- set-up
    def now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    def _new_plan(self) -> PollPlan:
        rate = self.config.rate_count / self.config.rate_period if self.config.rate_scope == "all" else 1e9
        return plan_polls(
            self.durations,
            rate=rate,
            concurrency=self.config.concurrency,
            prior_initial=self.config.poll_initial,
            min_interval=self.config.poll_min_interval,
        )

    def _load(self) -> None:
        """Sort the manifest's jobs by what the ledger says, and take over the predictions left in flight."""
        now = self.now()
        wall_now = self._wall()
        jobs_by_fp = {job.fingerprint: job for job in self.manifest.jobs}
        doubting: list[Job] = []
        self.counters.total = len(self.manifest.jobs)
        self.counters.lost_answers = self.state.lost_answers
        self.counters.recovered = self.state.recovered
        self.counters.spend = self.state.spend
        for job in self.manifest.jobs:
            st = self.state.jobs.get(job.fingerprint)
            verdict = classify(
                st,
                file_present=st is not None and self.out.has_file(st.file),
                max_attempts=self.config.max_attempts,
            )
            if verdict == "done":
                self.counters.skipped += 1
            elif verdict == "failed":
                self.counters.failed += 1
            elif verdict == "submit":
                self.ready.append(job)
            elif verdict == "reconcile":
                doubting.append(job)
        self.uploads.plan(self.state.uploads, [*self.ready, *doubting], wall_now)
        # Every prediction an earlier run left in flight is polled first and holds a slot, whether or not the manifest
        # still has its job: it runs (and is billed) on the server all the same.
        for st in self.state.in_flight():
            if st.prediction_id is None:
                continue
            age = max(0.0, wall_now - st.submitted_at) if st.submitted_at is not None else 0.0
            flight = Flight(
                job_id=st.job,
                fingerprint=st.fingerprint,
                prediction_id=st.prediction_id,
                created_at=now - age,
                job=jobs_by_fp.get(st.fingerprint),
                next_poll_at=now,
                resumed=True,
                # A recent prediction is found by the listing; an old one would make every round page through all
                # the predictions made since: it is polled.
                listed=self.watch.mode != "poll" and age < RESUMED_LISTED_AGE,
            )
            self.flights[flight.prediction_id] = flight
            if flight.job is None:
                self.orphans.add(flight.prediction_id)
            self.gate.in_flight += 1
            self.gate.max_seen = max(self.gate.max_seen, self.gate.in_flight)
        # A create a killed run sent without hearing back may have made a prediction: the listing settles it before the
        # job is created again, and meanwhile it holds a slot, since the prediction may be running.
        for job in doubting:
            st = self.state.jobs[job.fingerprint]
            sent = st.intent_at if st.intent_at is not None else st.doubt_at
            answered = st.doubt_at if st.doubt_at is not None else sent
            sent = wall_now if sent is None else min(sent, wall_now)
            answered = sent if answered is None else min(max(answered, sent), wall_now)
            self._add_doubt(job, self._match_request(job), sent, answered, now - (wall_now - answered))
            self.gate.in_flight += 1
        # A doubt whose job the manifest no longer has cannot be matched: hold its slot for as long as a prediction
        # would take, so that the server is not pushed past its cap.
        hold = doubt_hold(self.durations, self.config.poll_initial)
        for st in self.state.jobs.values():
            if st.doubt_open and st.doubt_at is not None and st.fingerprint not in jobs_by_fp:
                # An intent stamped in the future (a clock stepped back, an edited ledger) counts as made now: its
                # slot is held for one hold at most, not until that future comes.
                release_at = now - max(0.0, wall_now - st.doubt_at) + hold
                if release_at > now:
                    self.phantoms.append(release_at)
                    self.gate.in_flight += 1
        self.gate.max_seen = max(self.gate.max_seen, self.gate.in_flight)
        self._seed_window()

    def _seed_window(self) -> None:
        """Count the requests a killed run made in the current window (once, before the first request)."""
        if self._window_seeded:
            return
        self._window_seeded = True
        now, wall_now = self.now(), self._wall()
        if self.request_log is not None:
            # Requests a killed run made in the current window still count: do not burst past them.
            # The log has send times only: count each as answered within the network margin of its send.
            late = default_margin(self.config.rate_period)
            recent = self.request_log.recent(self.config.rate_period + self.window.margin + late)
            if recent:
                history = seed_history(recent, now=now, wall_now=wall_now, late=late)
                if self.limits.shared:  # into the account's window (a run of an older version, or another store)
                    self.limits.seed(history)
                    return
                self.window = SlidingWindow(
                    self.config.rate_count, self.config.rate_period, margin=self.window.margin, history=history
                )

    def _next_creatable(self) -> Job | None:
        """The first ready job whose input image is uploaded (jobs behind a slow upload do not hold others back)."""
        for i, job in enumerate(self.ready):
            if self.uploads.ready_for(job):
                return job
            if i >= 256:  # uploads run in job order, so a creatable job is never far back
                break
        return None

    # ----------------------------------------------------------------------------------------------- the run
    def _begin(self) -> None:
        """Start the run's clock, once: ``--max-runtime`` counts from the first wait or request, the schema's too."""
        if self._begun:
            return
        self._begun = True
        self.started = self.now()
        if self.config.max_runtime is not None:
            self.deadline = self.started + self.config.max_runtime

    async def run(self) -> RunResult:
        """Run until every job is done or failed, or a stop condition ends the run; returns the account."""
        self._begin()
        self._load()
        self._progress()
        try:
            await self._dispatch()
        finally:
            await self._cancel_tasks()
        return self._result()

    async def fetch_schema(self, slug: str) -> Mapping[str, Any] | None:
        """Fetch a model's input schema before the run, within the same request window and the run's deadline.

        Raises ApiTimeout when the deadline comes first; the run that follows then stops at once.
        """
        self._begin()
        self._seed_window()
        # Before the run nothing is on the wire, so the delay is finite; a timer may fire a little early: ask again.
        # With the account's limits, the store says whether the grant is this run's (else the delay is its wait).
        while (delay := self.window.delay(self.now())) > 0 or not await self.limits.acquire(grant=True, slot=False):
            delay = self.window.delay(self.now())
            left = self._until_deadline()
            if left is not None and left <= delay:
                await asyncio.sleep(left)
                raise ApiTimeout("the run's deadline came before the request window had room")
            await asyncio.sleep(delay)
        ticket = self._take_grant(self.now())
        token = _TICKET.set(ticket)
        try:
            async with asyncio.timeout(self._until_deadline()):
                return await self._call("schema", self.client.model_schema(slug))
        except TimeoutError:
            raise ApiTimeout("the run's deadline came before the model's schema") from None
        finally:
            _TICKET.reset(token)

    def _until_deadline(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - self.now())

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

    def abort(self) -> None:
        """Stop at once (a second Ctrl-C): the ledger is consistent after every line, so nothing more is needed."""
        self.request_stop(self.stop_reason or StopReason.INTERRUPTED, drain=0.0)

    async def _dispatch(self) -> None:
        while True:
            self.wake.clear()
            now = self.now()
            if now - self._last_progress >= 0.1:
                self._last_progress = now
                self._progress()
            if self.fatal is not None:
                return
            self._check_deadline(now)
            if self.stopping_at is not None and now >= self.stopping_at:
                return
            action, wake_at = self._choose(now)
            if action is None:
                if not self.flights and not self.tasks and not self._has_work():
                    return
                await self._sleep(wake_at, now)
                continue
            kind, target = action
            if kind == "abandon":  # no request: a cancelled prediction that overstayed a second timeout
                self._abandon(target)
                continue
            if not self.key_checked and self.calls_in_progress > 0:
                await self._sleep(None, now)
                continue
            counts = kind == "create" or self.config.rate_scope == "all"
            delay = self.window.delay(now) if counts else 0.0
            # While jobs remain to be created, polls are paced so they cannot drain the window a create needs; after
            # that the window alone limits them.
            paced = kind == "poll" and bool(self.ready or self.delayed or self.uploads.queue)
            if paced:
                delay = max(delay, self.pacer.delay(now))
            if kind == "poll" and counts:
                reserve = poll_reserve(creates_waiting=bool(self.ready), slots_free=self.gate.free())
                if reserve and self.window.remaining(now) <= reserve:
                    delay = max(delay, self.window.next_free_times(now, reserve + 1)[-1] - now)
            if delay > 0:
                # inf: every place in the window is held by a request on the wire; its answer wakes us.
                await self._sleep(None if math.isinf(delay) else now + delay, now)
                continue
            if self.limits.shared and not await self._account_grant(kind, target, counts):
                continue
            if paced:
                self.pacer.take(now)
            ticket = self._take_grant(now) if counts else None
            self._start(kind, target, now, ticket)

    async def _account_grant(self, kind: str, target: Any, counts: bool) -> bool:
        """Take the chosen request's grant (and a create's slot) from the account's store; False when it must wait.

        The store's answer is awaited, so the run's state may have moved meanwhile: if the dispatcher would now
        choose otherwise, what was taken goes back unused (no request was sent, so it counts nowhere).
        """
        if not counts and kind != "create":
            return True  # a request the window does not count (--rate-limit-scope creates)
        if not await self.limits.acquire(grant=counts, slot=kind == "create"):
            return False
        again, _ = self._choose(self.now())
        if again is None or again[0] != kind or again[1] is not target:
            self.limits.give_back()
            return False
        return True

    def _limits_lost(self, exc: StoreLost) -> None:
        log.error("%s; no new submissions: finishing what is in flight within the last limits known", exc)
        self.request_stop(StopReason.LIMITS_STORE)

    def _take_grant(self, now: float) -> int:
        """Take a window place for a request sent now; it counts from its answer on (``_settle``)."""
        ticket = self.window.take(now, pending=True)
        if self.request_log is not None:
            self.request_log.record(self._wall())
        return ticket

    def _settle(self, ticket: int) -> None:
        self.window.settle(ticket, self.now())
        self.wake.set()  # the window's next opening moved from "after an answer" to a time

    def _has_work(self) -> bool:
        if len(self.recon):
            return True  # doubts are settled even while stopping: it costs a listing, and may save a payment
        if self.stop_reason is not None:
            return False
        return bool(self.ready or self.delayed)

    async def _sleep(self, wake_at: float | None, now: float) -> None:
        timeout = None if wake_at is None else max(0.0, wake_at - now)
        # Whatever the wait is for (the window, a poll, an answer), it ends by the stop or the deadline.
        for limit in (self.stopping_at, self.deadline):
            if limit is not None:
                until = max(0.0, limit - now)
                timeout = until if timeout is None else min(timeout, until)
        if timeout is not None and timeout <= 0:
            await asyncio.sleep(0)
            return
        # A timer that sets the wake event is far cheaper than wait_for (no task, no cancellation per turn).
        timer = None if timeout is None else asyncio.get_running_loop().call_later(timeout, self.wake.set)
        try:
            await self.wake.wait()
        finally:
            if timer is not None:
                timer.cancel()

    def _choose(self, now: float) -> tuple[tuple[str, Any] | None, float | None]:
        """The next action and, when there is none, when to look again. Pure apart from reading state."""
        wake_at: float | None = None

        def soonest(t: float) -> None:
            nonlocal wake_at
            wake_at = t if wake_at is None else min(wake_at, t)

        idle = [f for f in self.flights.values() if not f.busy]
        timeout, earliest = self.config.job_timeout, math.inf
        hold: float | None = None  # computed once, and only when a flight was cancelled
        for flight in idle:
            if flight.cancelled_at is None:
                expires = flight.created_at + timeout
                if now >= expires:
                    return ("cancel", flight), None
            else:
                hold = self._cancel_hold() if hold is None else hold
                expires = flight.cancelled_at + hold
                if now >= expires:
                    return ("abandon", flight), None
            if expires < earliest:
                earliest = expires
        if earliest < math.inf:
            soonest(earliest)
        recon = self._reconcile_action(now, soonest)
        if recon is not None:
            return recon, None
        self._promote_delayed(now)
        if self.phantoms:
            self._release_phantoms(now)
            soonest(min(self.phantoms, default=now))
        if self.ready and self._may_submit(now):
            job = self._next_creatable()
            if job is not None:
                return ("create", job), None
        if self.uploads.queue and self.stop_reason is None:
            sha = self.uploads.next_due(now, soonest)
            if sha is not None:
                return ("presign", sha), None
        if self.delayed and self.stop_reason is None:
            soonest(min(t for t, _ in self.delayed))
        if self.ready and self.creates_paused_until > now and self.stop_reason is None:
            soonest(self.creates_paused_until)
        watching = self._watch_action(now, soonest)
        if watching is not None:
            return watching, None
        if self.watch.active:
            idle = [f for f in idle if not f.listed]  # the others are seen by the listing
        due = min(idle, key=lambda f: f.next_poll_at, default=None)
        if due is not None:
            # When no create can use a request, it goes to the prediction most likely done, planned or not.
            early = self._opportunistic_poll(now, idle, soonest)
            if early is not None:
                return ("poll", early), None
            if due.next_poll_at <= now:
                return ("poll", due), None
            soonest(due.next_poll_at)
        if self.deadline is not None:
            soonest(self.deadline)
        return None, wake_at

    def _watch_action(self, now: float, soonest: Callable[[float], None]) -> tuple[str, Any] | None:
        """The next page of the listing that watches the predictions in flight, when one is due."""
        watch = self.watch
        if watch.mode == "poll" or not self.flights:
            return None
        current = watch.round
        if current is not None:
            offset = current.next_page()
            return None if offset is None else ("watch", offset)
        if not any(f.listed for f in self.flights.values()) and watch.working:
            return None
        if not watch.due(now):
            soonest(watch.next_at)
            return None
        return ("watch", 0)

    def _listing_pause(self) -> float:
        """The pause until the next listing round (watch.listing_interval, from the run's limits and what is left)."""
        cfg = self.config
        # Runs sharing the key's limits (accountlimits.py) each plan on their share of the window and the slots.
        runs = self.limits.sharing()
        rate = cfg.rate_count / cfg.rate_period / runs if cfg.rate_scope == "all" else 1e9
        mean = sum(self.durations) / len(self.durations) if self.durations else cfg.poll_initial
        return listing_interval(
            to_create=len(self.ready) + len(self.delayed),
            in_flight=len(self.flights),
            mean_duration=mean,
            concurrency=max(1, cfg.concurrency // runs),
            rate=rate,
            shortest=max(cfg.poll_min_interval, 1.0 / rate, 0.01),
            longest=max(4 * mean, 1.0),
        )

    def _reconcile_action(self, now: float, soonest: Callable[[float], None]) -> tuple[str, Any] | None:
        """The next request that settles creates in doubt (a listing page, or a candidate's GET), if one is due.

        These go before creates: a create waits on nothing else, but a doubt left unsettled may be paid twice.
        """
        if not len(self.recon):
            return None
        if self.recon.sweep is None:
            due = self.recon.next_due()
            if due is None:
                return None
            if due > now:
                soonest(due)
                return None
            self.recon.start(now)
        request = self.recon.next_request()
        if request is not None and request[0] == "list" and self.recon_paused_until > now:
            soonest(self.recon_paused_until)
            return None
        return request

    def _creates_possible(self) -> bool:
        return self.stop_reason is None and self.gate.free() > 0 and bool(self.ready or self.delayed)

    def _opportunistic_poll(self, now: float, idle: list[Flight], soonest: Callable[[float], None]) -> Flight | None:
        """A poll ahead of the plan, when a request spent now costs no create.

        That is when no create can use it (every slot is taken, or nothing is left to create).
        The plan alone rations polls for the request-bound case; when slots bind, spare requests go to a prediction
        likely done, the one whose poll is worth most, which shortens the time a finished prediction holds its slot
        unseen.
        """
        if self._creates_possible() or len(self.sorted_durations) < MIN_SAMPLES:
            return None
        # A full window is no reason to fall back on the plan: the dispatcher waits for the window and asks again
        # (a create, if one became possible meanwhile, still goes first). Falling back let the last prediction of a
        # batch wait for its next planned poll, seconds away, while the window freed within a tenth of a second.
        # Among the predictions likely done (the tolerance matches likely_done_age's rounding, so a timer set by it
        # always finds its flight due), the one whose poll is worth most: see policy.poll_value.
        best, best_value = None, -1.0
        for flight in idle:
            checked = flight.last_running_age if flight.last_running_age is not None else 0.0
            age = now - flight.created_at
            if age - checked < self.config.poll_min_interval:
                continue
            if done_probability(self.sorted_durations, age, checked) < OPPORTUNISTIC_MIN_PROBABILITY - 1e-9:
                continue
            value = poll_value(self.sorted_durations, age, checked)
            if value > best_value:
                best, best_value = flight, value
        if best is not None:
            return best
        # None is likely done yet: wake when the first one will be (one timer, not a look every few ticks).
        for flight in idle:
            checked = flight.last_running_age if flight.last_running_age is not None else 0.0
            age = likely_done_age(self.sorted_durations, checked, OPPORTUNISTIC_MIN_PROBABILITY)
            soonest(flight.created_at + max(age, checked + self.config.poll_min_interval))
        return None

    def _release_phantoms(self, now: float) -> None:
        expired = [t for t in self.phantoms if t <= now]
        for _ in expired:
            self.gate.release()
        self.phantoms = [t for t in self.phantoms if t > now]

    def _promote_delayed(self, now: float) -> None:
        if not self.delayed:
            return
        keep = []
        for t, job in self.delayed:
            if t <= now:
                self.ready.append(job)
            else:
                keep.append((t, job))
        self.delayed = keep

    def _may_submit(self, now: float) -> bool:
        if self.stop_reason is not None or self.gate.free() <= 0 or now < self.creates_paused_until:
            return False
        cfg = self.config
        if cfg.max_jobs is not None and self.creates_this_run + self.pending_reserved >= cfg.max_jobs:
            self.request_stop(StopReason.MAX_JOBS)
            return False
        if cfg.budget is not None:
            price = cfg.price or 0.0
            reserved = (len(self.flights) + self.pending_reserved + 1) * price
            if self.counters.spend + reserved > cfg.budget + 1e-9:
                self.request_stop(StopReason.BUDGET)
                return False
        if self.deadline is not None:
            expected = expected_duration(self.durations, self.config.poll_initial)
            if now + expected >= self.deadline:
                self.request_stop(StopReason.DEADLINE, drain=max(0.0, self.deadline - now))
                return False
        return True

    def _check_deadline(self, now: float) -> None:
        if self.deadline is not None and now >= self.deadline and self.stopping_at is None:
            self.request_stop(StopReason.DEADLINE, drain=0.0)

    def _start(self, kind: str, target: Any, now: float, ticket: int | None) -> None:
        self.calls_in_progress += 1
        if kind == "create":
            job: Job = target
            if self.ready[0] is job:
                self.ready.popleft()
            else:
                self.ready.remove(job)
            if not self.gate.try_acquire():  # _may_submit checked it; a failure here is a bug, not a 429
                raise RuntimeError("in-flight gate refused a create that the dispatcher allowed")
            self.pending_reserved += 1
            self._spawn(self._api_task(lambda: self._create(job), ticket))
        elif kind == "presign":
            sha: str = target
            self.uploads.start(sha)
            self._spawn(self._api_task(lambda: self._upload(sha), ticket))
        elif kind == "poll":
            flight: Flight = target
            flight.busy = True
            self._spawn(self._api_task(lambda: self._poll(flight), ticket))
        elif kind == "watch":
            if self.watch.round is None:
                wall_now = self._wall()
                wanted = [f for f in self.flights.values() if f.listed or not self.watch.working]
                oldest = min((f.created_at for f in wanted), default=now)
                start = wall_now - (now - oldest) - self.config.clock_skew
                self.watch.begin(start, wall_now + self.config.clock_skew, (f.prediction_id for f in wanted))
            current = self.watch.round
            assert current is not None
            current.sent()
            self._spawn(self._api_task(lambda: self._watch_page(current.number, target), ticket))
        elif kind == "list":
            self.recon.begin(("list", target))
            self._spawn(self._api_task(lambda: self._list(target), ticket))
        elif kind == "inspect":
            self.recon.begin(("inspect", target))
            self._spawn(self._api_task(lambda: self._inspect(target), ticket))
        else:
            flight = target
            flight.busy = True
            self._spawn(self._api_task(lambda: self._cancel(flight), ticket))

    def _spawn(self, coro: Any) -> None:
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
        self._progress()
        self.wake.set()

    async def _cancel_tasks(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)

    # ----------------------------------------------------------------------------------------------- requests
    async def _call(self, kind: str, request: Awaitable[T]) -> T:
        """Count one API request and await it; its window place is settled the moment it ends, however."""
        self.counters.requests += 1
        self.counters.by_kind[kind] = self.counters.by_kind.get(kind, 0) + 1
        try:
            return await request
        except ApiError as exc:
            if exc.status == 429 or isinstance(exc, RateLimited):
                # Every 429 is counted here, whatever the request: it means something else is spending the key.
                self.counters.rate_limited += 1
                self.limits.count_rate_limited()
                if self.counters.rate_limited == 1:
                    log.warning(
                        "the API refused a request with 429 (%s: %s): something else is spending this key", kind, exc
                    )
            raise
        finally:
            ticket = _TICKET.get()
            if ticket is not None:
                self._settle(ticket)

    async def _api_task(self, work: Callable[[], Coroutine[Any, Any, None]], ticket: int | None) -> None:
        """Run one request's task; ``calls_in_progress`` (raised when it was started) drops however it ends.

        ``ticket`` is the request's window place: ``_call`` settles it at the answer (the task's context carries
        it there); if the task ends without reaching ``_call`` (cancelled first), it is settled here. ``work`` makes
        the coroutine here, in the task: one made beforehand and never run (the run stopped first) warns at exit.
        """
        _TICKET.set(ticket)
        try:
            await work()
        finally:
            self.calls_in_progress -= 1
            if ticket is not None:
                self._settle(ticket)

    def _api_ok(self) -> None:
        self.key_checked = True
        self.consecutive_failures = 0

    def _api_failed(self, exc: ApiError) -> None:
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

    async def _create(self, job: Job) -> None:
        st = self.state.jobs.get(job.fingerprint)
        attempt = (st.attempts if st is not None else 0) + 1
        try:
            body = self.uploads.api_input(job)
        except OSError as exc:
            self.pending_reserved -= 1
            self.gate.release()
            raise InputImageError(
                f"cannot read: {describe_os_error(exc)}", file=str(job.image_path), jobs=(job.id,)
            ) from exc
        self.counters.creates += 1
        self._count_rerun_after_cancel(job)
        tries = self.create_retries.get(job.fingerprint, 0)
        request_id = f"br-{job.fingerprint[:12]}-a{attempt}-t{tries + 1}"
        sent_at = self._wall()
        # The intent is on disk before the create is sent (write-ahead); one fsync serves every intent written by then.
        self.ledger.append(
            SUBMITTING, durable=False, job=job.id, fingerprint=job.fingerprint, attempt=attempt, request_id=request_id
        )
        try:
            await self.ledger.commit()
        except BaseException:
            self.pending_reserved -= 1
            self.gate.release()
            raise
        try:
            prediction_id = await self._call(
                "create",
                self.client.create(self.manifest.model, self.manifest.sent_version, body, request_id=request_id),
            )
        except ApiError as exc:
            self.pending_reserved -= 1
            if create_in_doubt(exc):
                self._create_in_doubt(job, body, exc, sent_at)
            else:
                self._create_failed(job, exc)
            return
        self.pending_reserved -= 1
        self._api_ok()
        self.creates_this_run += 1
        # Not fsynced on its own (the next intent's fsync covers it): lost to a power cut, the intent stays open and the
        # next run finds the prediction in the listing.
        self.ledger.append(
            SUBMITTED, durable=False, job=job.id, fingerprint=job.fingerprint, prediction_id=prediction_id
        )
        self.recon.known.add(prediction_id)
        st = job_state(self.state, job.id, job.fingerprint)
        st.status, st.doubt_open = JobStatus.IN_FLIGHT, False
        now = self.now()
        flight = Flight(
            job_id=job.id,
            fingerprint=job.fingerprint,
            prediction_id=prediction_id,
            created_at=now,
            job=job,
            next_poll_at=now + self.plan.next_poll_age(0, 0.0),
            attempt=attempt,
            listed=self.watch.mode != "poll",
        )
        self.flights[prediction_id] = flight

    def _create_in_doubt(self, job: Job, body: Mapping[str, Any], exc: ApiError, sent_at: float) -> None:
        """A create that may have made a prediction: keep its slot and settle it from the listing first."""
        self.ledger.append(CREATE_FAILED, job=job.id, fingerprint=job.fingerprint, error=str(exc), in_doubt=True)
        job_state(self.state, job.id, job.fingerprint).doubt_open = True
        self._api_failed(exc)
        log.warning(
            "job %s: create in doubt (%s); looking for it in the account's executions before paying again", job.id, exc
        )
        self._add_doubt(job, body, sent_at, self._wall(), self.now())

    def _create_failed(self, job: Job, exc: ApiError) -> None:
        """A create that surely made nothing: a 4xx answer, or a connection that never carried it."""
        if isinstance(exc, TransientError | PaymentRequired):
            self.ledger.append(CREATE_FAILED, job=job.id, fingerprint=job.fingerprint, error=str(exc), in_doubt=False)
            self.gate.release()
            if isinstance(exc, PaymentRequired):
                log.error("out of credit (HTTP 402): stopping submissions; %s", exc)
                self.ready.appendleft(job)
                self.request_stop(StopReason.PAYMENT)
                return
            tries = self.create_retries.get(job.fingerprint, 0) + 1
            self._api_failed(exc)
            if exc.status == 429:
                # The API is up and busy (its window, or more predictions running on the account than we know of):
                # no outage, but no create for anyone until it has had its pause.
                pause = retry_delay(
                    tries, exc.retry_after, base=self.config.retry_base, cap=self.config.retry_cap, rng=self._rng
                )
                self.creates_paused_until = max(self.creates_paused_until, self.now() + pause)
            self.create_retries[job.fingerprint] = tries
            if tries > MAX_CREATE_RETRIES:
                log.warning("job %s: create failed %d times (%s); left for the next run", job.id, tries, exc)
                return
            delay = retry_delay(
                tries, exc.retry_after, base=self.config.retry_base, cap=self.config.retry_cap, rng=self._rng
            )
            self._retry_later(job, delay)
            return
        self.gate.release()
        if isinstance(exc, AuthError):
            self.ledger.append(CREATE_FAILED, job=job.id, fingerprint=job.fingerprint, error=str(exc), in_doubt=False)
            self.ready.appendleft(job)
            self.fatal = exc
            return
        self.results.fail(job.id, job.fingerprint, job, str(exc), retryable=False, error_code=None, prediction_id=None)

    async def _upload(self, sha: str) -> None:
        """Presign (an API request), PUT the bytes (another host), record the upload; only then may jobs use it."""
        try:
            presigned = await self.uploads.send(sha, self.client, self._call)
        except ApiError as exc:
            self._api_failed(exc)
            if not self.uploads.retry_later(sha, exc):
                self.ready = self.uploads.block(sha, self.ready)
            return
        self._api_ok()
        self.uploads.record(sha, presigned)
        self.counters.uploads += 1

    async def _watch_page(self, number: int, offset: int) -> None:
        """One page of a listing round: every prediction of ours it shows is seen as a poll would see it."""
        watch = self.watch
        current = watch.round
        if current is None or current.number != number:
            return
        try:
            page = await self._call(
                "watch",
                self.client.executions(
                    model=self.manifest.model,
                    start=current.start,
                    end=current.end,
                    limit=PAGE_SIZE,
                    offset=offset,
                    kind="watch",
                ),
            )
        except ApiError as exc:
            if isinstance(exc, AuthError):
                self.fatal = exc
                return
            if watch.round is None or watch.round.number != number:
                return  # the round already failed or was replaced
            backoff = retry_delay(
                watch.failures + 1,
                exc.retry_after,
                base=self.config.retry_base,
                cap=self.config.retry_cap,
                rng=self._rng,
            )
            if isinstance(exc, RateLimited):
                # Busy, not broken: the round is tried again after the pause, and nothing falls back on polls.
                watch.retry_later(self.now(), backoff)
                return
            if watch.active and watch.mode == "auto":
                log.warning("the executions listing failed (%s): polling each prediction until it answers again", exc)
            watch.on_failure(self.now(), backoff)
            return
        self._api_ok()
        if not watch.active and watch.mode == "auto":
            log.info("the executions listing answers again: watching the predictions in flight through it")
        ours, done = watch.on_page(number, page)
        for row in ours:
            flight = self.flights.get(row.id)
            prediction = row.prediction if flight is not None and not flight.busy else None
            if flight is None or prediction is None:
                continue
            if needs_get(prediction):
                self._get_now(flight)
                continue
            flight.listed = True
            self._observe(flight, prediction)
        if not done:
            return
        now = self.now()
        missing = watch.finish(now, self._listing_pause())
        # Not in a listing that went far enough back (listing lag, a busy account): polled one by one from now on.
        grace = 2 * self.config.reconcile_wait
        for prediction_id in missing:
            flight = self.flights.get(prediction_id)
            if flight is not None and now - flight.created_at > grace:
                flight.listed = False

    async def _poll(self, flight: Flight) -> None:
        self.counters.polls += 1
        request_id = f"br-{flight.fingerprint[:12]}-a{flight.attempt}-p{flight.polls + 1}"
        try:
            prediction = await self._call("poll", self.client.get(flight.prediction_id, request_id=request_id))
        except NotFound as exc:
            self._api_ok()
            flight.not_found += 1
            if flight.not_found < NOT_FOUND_LOOKS:
                # A fresh prediction may not be readable yet: look again before anything is paid again.
                self._poll_later(flight, flight.not_found, None)
                return
            self._finish_flight(flight)
            self.results.fail(
                flight.job_id,
                flight.fingerprint,
                flight.job,
                f"prediction {flight.prediction_id} unknown to the API: {exc.message}",
                retryable=True,
                error_code=None,
                prediction_id=flight.prediction_id,
            )
            return
        except ApiError as exc:
            self._api_failed(exc)
            flight.poll_failures += 1
            self._poll_later(flight, flight.poll_failures, exc.retry_after)
            return
        self._api_ok()
        self._observe(flight, prediction)

    def _upload_was_stale(self, job: Job, prediction: Prediction) -> bool:
        """Whether the image a prediction could not fetch was a stale upload (queued again: the job may retry)."""
        sent = prediction.input.get("input_image") if prediction.input is not None else None
        return self.uploads.forget_stale(job, sent if isinstance(sent, str) else None)

    def _get_now(self, flight: Flight) -> None:
        """A listing row says the prediction failed but carries no envelope: one GET of it decides, as for a poll."""
        flight.listed = False
        flight.next_poll_at = self.now()

    def _poll_later(self, flight: Flight, tries: int, retry_after: float | None) -> None:
        flight.busy = False
        wait = retry_delay(tries, retry_after, base=self.config.retry_base, cap=self.config.retry_cap, rng=self._rng)
        flight.next_poll_at = self.now() + wait

    def _observe(self, flight: Flight, prediction: Prediction) -> None:
        """Act on what a GET of a watched prediction said: wait on, download its output, or record its failure."""
        flight.poll_failures = flight.not_found = 0
        flight.polls += 1
        age = self.now() - flight.created_at
        if prediction.phase is Phase.RUNNING:
            flight.last_running_age = age
            flight.next_poll_at = flight.created_at + self.plan.next_poll_age(flight.polls, age)
            flight.busy = False
            return
        if prediction.phase is Phase.SUCCEEDED and not prediction.urls and flight.empty_success == 0:
            # A success without an output URL may be a read of a record still being written: one more look, a GET.
            flight.empty_success += 1
            flight.listed = False
            self._poll_later(flight, 1, None)
            return
        self._finish_flight(flight)
        duration: float | None = None
        if not flight.resumed:
            self._learn(learnt_duration(age, flight.last_running_age, prediction.predict_time))
            duration = round(age, 3)
        if prediction.phase is Phase.SUCCEEDED and prediction.urls:
            self._spawn(self.results.download(flight, prediction, duration, client=self.client, out=self.out))
            return
        error = prediction.error or ("finished without an output" if prediction.phase is Phase.SUCCEEDED else "failed")
        error_code = prediction.error_code
        retryable = prediction.retryable or prediction.phase is Phase.SUCCEEDED
        if flight.cancelled_at is not None and prediction.status.lower() in ("cancelled", "canceled"):
            error, error_code = f"no result after {self.config.job_timeout:g}s; cancelled", "TIMEOUT"
        job = flight.job
        if (
            prediction.error_code == "INPUT_DOWNLOAD_ERROR"
            and job is not None
            and self._upload_was_stale(job, prediction)
        ):
            # The API could not fetch an image an earlier run uploaded (expired or lost): it is uploaded again and the
            # job tried again.
            retryable = True
        self.results.fail(
            flight.job_id,
            flight.fingerprint,
            flight.job,
            error,
            retryable=retryable,
            error_code=error_code,
            prediction_id=flight.prediction_id,
            cost=prediction.cost,
            duration=duration,
            error_message=prediction.error_message,
            category=prediction.error_category,
        )

    async def _cancel(self, flight: Flight) -> None:
        """Ask the API to cancel an overdue prediction; it is watched on, since the cancel may only be recorded.

        Nothing is created again for the job until the prediction is terminal (a success is saved and is the job's
        result; ``cancelled`` or a failure frees the job) or until ``_cancel_hold`` has passed (``_abandon``).
        """
        self.counters.cancels += 1
        try:
            # The answer's "success" means accepted, not finished: it tells nothing of the prediction's state.
            await self._call("cancel", self.client.cancel(flight.prediction_id))
        except ApiError as exc:
            log.warning("job %s: cancel of %s failed: %s", flight.job_id, flight.prediction_id, exc)
        now = self.now()
        flight.cancelled_at = now
        flight.busy = False
        log.warning(
            "job %s: no result after %gs; cancel requested (it may only be recorded): still watching %s",
            flight.job_id,
            self.config.job_timeout,
            flight.prediction_id,
        )
        # A cancel that takes shows as ``cancelled`` soon; one only recorded, when the prediction ends on its own.
        flight.next_poll_at = now + self.config.poll_initial

    def _cancel_hold(self) -> float:
        return cancel_hold(self.durations, job_timeout=self.config.job_timeout, poll_initial=self.config.poll_initial)

    def _abandon(self, flight: Flight) -> None:
        """A cancelled prediction still running ``_cancel_hold`` later: a failed attempt, marked as possibly running.

        It may run on (and hold the account's slot) all the same, so its slot is held as long as a lost answer's; a
        new create for the job counts as possibly paid twice (``_count_rerun_after_cancel``).
        """
        self.flights.pop(flight.prediction_id, None)
        self.orphans.discard(flight.prediction_id)
        self.phantoms.append(self.now() + doubt_hold(self.durations, self.config.poll_initial))
        self.results.fail(
            flight.job_id,
            flight.fingerprint,
            flight.job,
            f"no result {self.config.job_timeout + self._cancel_hold():g}s after its create, "
            "and still running after a cancel",
            retryable=True,
            error_code="TIMEOUT",
            prediction_id=flight.prediction_id,
            still_running=True,
        )

    def _count_rerun_after_cancel(self, job: Job) -> None:
        """A create for a job whose cancelled prediction was given up while still running: possibly paid twice."""
        st = self.state.jobs.get(job.fingerprint)
        if st is None or not st.still_running:
            return
        st.still_running = False
        self.counters.lost_answers += 1
        log.warning("job %s: created again while its cancelled prediction may still run: possibly paid twice", job.id)

    # ----------------------------------------------------------------------------------------------- reconciliation
    def _match_request(self, job: Job) -> Mapping[str, Any]:
        """The job's create request as it was sent, to compare listed predictions with.

        A local image went as the URL of its upload: the one this run would use, else the one the ledger recorded,
        however old (an upload past its reuse period is not reused, but a create in doubt may well have sent it).
        Only without either is the image left out of the comparison.
        """
        if self.uploads.ready_for(job):
            try:
                return self.uploads.api_input(job)
            except OSError:
                pass
        recorded = self.state.uploads.get(job.image_sha256) if job.image_sha256 is not None else None
        if recorded is not None and not self.config.inline_images:
            return {**job.input, "input_image": recorded.public_url}
        return {k: v for k, v in job.input.items() if k != "input_image"}

    def _add_doubt(self, job: Job, request: Mapping[str, Any], sent_at: float, answered_at: float, base: float) -> None:
        self.doubt_jobs[job.fingerprint] = job
        self.recon.add(Doubt(job.fingerprint, job.id, request, sent_at, answered_at, base))
        self.wake.set()

    async def _list(self, offset: int) -> None:
        sweep = self.recon.sweep
        if sweep is None:  # settled meanwhile (a stop): nothing to look for
            return
        try:
            page = await self._call(
                "list",
                self.client.executions(
                    model=self.manifest.model, start=sweep.start, end=sweep.end, limit=PAGE_SIZE, offset=offset
                ),
            )
        except ApiError as exc:
            if isinstance(exc, AuthError):
                self.fatal = exc
                return
            if isinstance(exc, RateLimited):
                self.recon.retry_listing()
                self.recon_paused_until = self.now() + retry_delay(
                    1, exc.retry_after, base=self.config.retry_base, cap=self.config.retry_cap, rng=self._rng
                )
                return
            # Not counted toward "the API is down": the listing has failed in production while the rest worked.
            self._listing_failed(exc, self.recon.on_failure())
            return
        self._api_ok()
        self.recon_failures = 0
        self.recon.tries = TRIES
        self._settle_doubts(self.recon.on_page(page))

    async def _inspect(self, prediction_id: str) -> None:
        try:
            prediction = await self._call("reconcile", self.client.get(prediction_id, kind="reconcile"))
        except NotFound:
            self._api_ok()
            self._settle_doubts(self.recon.on_prediction(prediction_id, None))
            return
        except ApiError as exc:
            if isinstance(exc, AuthError):
                self.fatal = exc
                return
            self._api_failed(exc)
            self._listing_failed(exc, self.recon.on_inspect_failed(prediction_id))
            return
        self._api_ok()
        self._settle_doubts(self.recon.on_prediction(prediction_id, prediction.input), prediction)

    def _listing_failed(self, exc: ApiError, outcome: Outcome | None) -> None:
        """A request of a sweep failed: back off before the doubts' next try; say so of doubts given up."""
        if outcome is not None and outcome.unresolved:
            # The listing is down: until it answers again, one failed try settles a doubt (one request, no wait).
            self.recon.tries = 1
            self.recon_failures = 0
            log.warning(
                "the executions listing failed (%s): %d create(s) in doubt will be made again, possibly paid twice",
                exc,
                len(outcome.unresolved),
            )
        else:
            self.recon_failures += 1
            # Timed like the looks (--reconcile-wait / 4: 0.5, 1, 2, 4, 8 s by default), not like other retries.
            self.recon_paused_until = self.now() + retry_delay(
                self.recon_failures,
                exc.retry_after,
                base=self.config.reconcile_wait / 4,
                cap=self.config.retry_cap,
                rng=self._rng,
            )
        self._settle_doubts(outcome)

    def _settle_doubts(self, outcome: Outcome | None, seen: Prediction | None = None) -> None:
        """Carry out what the listing decided for creates in doubt."""
        if outcome is None:
            return
        now, wall_now = self.now(), self._wall()
        for doubt, prediction_id in outcome.adopted:
            job = self.doubt_jobs.pop(doubt.fingerprint, None)
            self.ledger.append(RECOVERED, job=doubt.job_id, fingerprint=doubt.fingerprint, prediction_id=prediction_id)
            st = job_state(self.state, doubt.job_id, doubt.fingerprint)
            st.status, st.prediction_id, st.doubt_open = JobStatus.IN_FLIGHT, prediction_id, False
            st.recovered += 1
            self.counters.recovered += 1
            log.info(
                "job %s: the create in doubt made prediction %s: watching it, nothing paid again",
                doubt.job_id,
                prediction_id,
            )
            attempt = (st.attempts or 0) + 1
            flight = Flight(
                job_id=doubt.job_id,
                fingerprint=doubt.fingerprint,
                prediction_id=prediction_id,
                created_at=now - (wall_now - doubt.sent_at),
                job=job,
                next_poll_at=now,
                resumed=True,
                attempt=attempt,
            )
            self.flights[prediction_id] = flight  # the doubt's slot passes to the prediction
            if job is None:
                self.orphans.add(prediction_id)
            if seen is not None and seen.id == prediction_id:
                flight.busy = False
                self._observe(flight, seen)
        for doubt in outcome.not_created:
            job = self.doubt_jobs.pop(doubt.fingerprint, None)
            self.ledger.append(NOT_CREATED, job=doubt.job_id, fingerprint=doubt.fingerprint)
            st = job_state(self.state, doubt.job_id, doubt.fingerprint)
            st.doubt_open = False
            if st.status is JobStatus.IN_DOUBT:
                st.status = JobStatus.PENDING
            self.counters.not_created += 1
            self.gate.release()
            if job is not None:
                self._create_again(job)
        for doubt in outcome.unresolved:
            job = self.doubt_jobs.pop(doubt.fingerprint, None)
            # Today's policy: created again, and counted; its slot is held as long as its prediction would take.
            self.counters.lost_answers += 1
            self.phantoms.append(now + doubt_hold(self.durations, self.config.poll_initial))
            if job is not None:
                self._create_again(job)
        self.wake.set()

    def _create_again(self, job: Job) -> None:
        tries = self.create_retries.get(job.fingerprint, 0) + 1
        self.create_retries[job.fingerprint] = tries
        if tries > MAX_CREATE_RETRIES:
            log.warning("job %s: create failed %d times; left for the next run", job.id, tries)
            return
        if self.stop_reason is None:
            delay = retry_delay(tries, None, base=self.config.retry_base, cap=self.config.retry_cap, rng=self._rng)
            self._retry_later(job, delay)
        else:
            self.ready.append(job)  # pending for the next run

    # ----------------------------------------------------------------------------------------------- state changes
    def _finish_flight(self, flight: Flight) -> None:
        self.orphans.discard(flight.prediction_id)
        if self.flights.pop(flight.prediction_id, None) is not None:
            self.gate.release()

    def _learn(self, duration: float) -> None:
        self.durations.append(duration)
        if len(self.durations) > 500:
            del self.durations[:-500]
        self.learned += 1
        # Re-plan on the first few samples, then every tenth, then every hundredth: the plan changes slowly once it has
        # data, and redoing it costs ~10 ms at 500 samples. (Counted by the samples learnt, not those kept: once 500
        # are kept their number stays put, and the plan was redone after every finish.)
        n = self.learned
        if n <= 20 or (n <= 200 and n % 10 == 0) or n % 100 == 0:
            self.plan = self._new_plan()
            self.sorted_durations = sorted(self.durations)

    def _retry_later(self, job: Job, delay: float) -> None:
        self.delayed.append((self.now() + delay, job))

    # ----------------------------------------------------------------------------------------------- reporting
    def snapshot(self) -> Snapshot:
        c, now = self.counters, self.now()
        done = c.skipped + c.succeeded
        in_flight = len(self.flights) - len(self.orphans) + self.pending_reserved
        downloading = len(self.results.downloading) + len(self.results.undownloaded)
        in_doubt = len(self.recon)
        return Snapshot(
            total=c.total,
            done=done,
            failed=c.failed,
            in_flight=in_flight + downloading,
            # What is neither done, failed, in flight nor in doubt waits: ready, delayed, or behind an upload.
            pending=max(0, c.total - done - c.failed - in_flight - downloading - in_doubt),
            requests=c.requests,
            elapsed=(now - self.started) if self.started else 0.0,
            window_used=self.window.used(now),
            in_doubt=in_doubt,
            skipped=c.skipped,
            downloading=downloading,
            spend=c.spend,
            spend_before=self.state.spend,
            slots_used=self.gate.in_flight,
            slots=self.config.concurrency,
            window_limit=self.config.rate_count,
            window_period=self.config.rate_period,
            window_wait=self.window.delay(now),
            creates_paused=max(0.0, self.creates_paused_until - now),
            stopping=self.stop_reason.value if self.stop_reason is not None else None,
            rate_limited=c.rate_limited,
        )

    def _progress(self) -> None:
        if self._on_progress is not None:
            self._on_progress(self.snapshot())

    def _result(self) -> RunResult:
        c = self.counters
        # Paid predictions whose output is not saved yet are in flight, whether a download gave up or was cut off by the
        # stop: the ledger has them as in flight, and the next run fetches them.
        in_flight = len(self.flights) + len(self.results.undownloaded) + len(self.results.downloading)
        pending = len(self.ready) + len(self.delayed) + self.pending_reserved + len(self.uploads.blocked)
        stop = self.stop_reason
        if stop is None and (pending or in_flight) and self.fatal is None:
            stop = StopReason.API_DOWN if self.consecutive_failures else None
        return RunResult(
            total=c.total,
            skipped=c.skipped,
            succeeded=c.succeeded,
            failed=c.failed,
            pending=pending,
            in_flight=in_flight,
            requests=c.requests,
            creates=c.creates,
            polls=c.polls,
            lost_answers=c.lost_answers,
            rate_limited=c.rate_limited,
            spend=round(c.spend, 6),
            elapsed=self.now() - self.started,
            stop_reason=stop,
            max_in_flight=self.gate.max_seen,
            by_kind=dict(c.by_kind),
            recovered=c.recovered,
            in_doubt=len(self.recon),
            spend_before=round(self.state.spend, 6),
        )
