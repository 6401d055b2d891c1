"""The asyncio orchestration: submit, poll, download, retry, stop.

One dispatcher coroutine owns every decision. Each turn it asks, in this order: is a prediction past its timeout (cancel
it)? may a job be created (a free in-flight slot, submitting allowed, budget left)? is a poll due? If the chosen action
is a request to the API host it takes a grant from the sliding window first — the dispatcher is the only caller, so the
window is exact by construction — and runs the request as a task, so a slow answer never blocks other decisions.
Tasks report back by mutating the scheduler's state and setting the ``wake`` event.

Write-ahead order, so that a kill at any instant replays to a state the next run completes:
``submitting`` (intent) -> create -> ``submitted`` (prediction id) -> poll ... -> download, fsync, rename ->
``succeeded``. A create whose answer never came back is recorded as a lost answer: the job is submitted again, and the
summary counts it as possibly paid twice.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import mimetypes
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from batchrunner.client import Client, Phase, Prediction
from batchrunner.errors import (
    ApiError,
    AuthError,
    BatchrunnerError,
    DownloadRejected,
    InputImageError,
    NetworkError,
    NotFound,
    PaymentRequired,
    TransientError,
)
from batchrunner.ledger import (
    CREATE_FAILED,
    FAILED,
    SUBMITTED,
    SUBMITTING,
    SUCCEEDED,
    UPLOADED,
    JobState,
    JobStatus,
    Ledger,
    LedgerState,
    RequestLog,
)
from batchrunner.limits import InFlightGate, SlidingWindow, answer_margin, default_margin
from batchrunner.manifest import Job, Manifest
from batchrunner.output import OutputDir, describe_os_error, read_bytes, save_download
from batchrunner.policy import (
    MIN_SAMPLES,
    PollPacer,
    PollPlan,
    backoff,
    done_probability,
    observed_duration,
    plan_polls,
    poll_reserve,
    retry_delay,
)

log = logging.getLogger("batchrunner")
T = TypeVar("T")

# After this many API failures in a row with no success in between, the API is taken to be down: stop submitting.
MAX_CONSECUTIVE_FAILURES = 12
# Transient failures of one create within one run before the job is left for a later run.
MAX_CREATE_RETRIES = 8
# Attempts at downloading one output within one run; after that the prediction stays in the ledger to fetch next run.
MAX_DOWNLOAD_TRIES = 6
# An early poll, beyond the plan, is spent only on a prediction at least this likely to be done.
OPPORTUNISTIC_MIN_PROBABILITY = 0.1
# The window ticket of the request a task is making (each task makes one counted request), read by _call.
_TICKET: ContextVar[int | None] = ContextVar("batchrunner_request_ticket", default=None)
# Attempts at uploading one input image within one run; after that its jobs wait for the next run.
MAX_UPLOAD_TRIES = 5
# Uploads in progress at once (each is a presign request to the API, then a PUT to the storage host).
MAX_PARALLEL_UPLOADS = 4
# How long an upload recorded in the ledger is trusted. The API keeps files 180 days by default; a month stays well
# inside that, and a file the API lost anyway fails its job with INPUT_DOWNLOAD_ERROR, which makes us upload again.
UPLOAD_TTL = 30 * 86400.0


class StopReason(StrEnum):
    """Why a run stopped before the batch was done."""

    INTERRUPTED = "interrupted"
    TERMINATED = "terminated"
    DEADLINE = "deadline"
    MAX_JOBS = "max_jobs"
    BUDGET = "budget"
    PAYMENT = "payment_required"
    API_DOWN = "api_unavailable"


@dataclass(frozen=True, slots=True)
class RunConfig:
    """Everything the scheduler needs to know about limits and policies."""

    concurrency: int = 10
    rate_count: int = 60
    rate_period: float = 60.0
    rate_scope: str = "all"  # "all": every API-host request counts; "creates": only creates do
    max_attempts: int = 3
    job_timeout: float = 600.0
    drain_timeout: float = 60.0
    max_runtime: float | None = None
    max_jobs: int | None = None
    budget: float | None = None
    price: float | None = None
    poll_initial: float = 3.0
    poll_min_interval: float = 0.0
    inline_images: bool = False  # send local images as data URIs instead of uploading them
    download_concurrency: int = 4
    retry_base: float = 0.5
    retry_cap: float = 30.0


@dataclass(slots=True)
class Flight:
    """A prediction created and not yet seen finished."""

    job_id: str
    fingerprint: str
    prediction_id: str
    created_at: float  # loop time
    job: Job | None  # None for a prediction an earlier run left whose job the manifest no longer has
    polls: int = 0
    last_running_age: float | None = None
    next_poll_at: float = 0.0
    busy: bool = False
    poll_failures: int = 0
    # Taken over from an earlier run: its age includes the time no run was watching, so it teaches no duration.
    resumed: bool = False


@dataclass(slots=True)
class Counters:
    """What this run did, for progress lines and the summary."""

    total: int = 0
    skipped: int = 0
    succeeded: int = 0
    failed: int = 0  # failed for good (no attempts left or not retryable)
    retried: int = 0
    requests: int = 0
    creates: int = 0
    polls: int = 0
    cancels: int = 0
    uploads: int = 0
    lost_answers: int = 0  # creates whose answer never came (this run and the ledger's earlier ones)
    rate_limited: int = 0
    spend: float = 0.0
    by_kind: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The state of a run at one moment, for the progress bar and log lines."""

    total: int
    done: int
    failed: int
    in_flight: int
    pending: int
    requests: int
    elapsed: float
    window_used: int = 0  # requests in the current rate window (at most the limit's COUNT)


@dataclass(frozen=True, slots=True)
class RunResult:
    """How a run ended."""

    total: int
    skipped: int
    succeeded: int
    failed: int
    pending: int
    in_flight: int
    requests: int
    creates: int
    polls: int
    lost_answers: int
    rate_limited: int
    spend: float
    elapsed: float
    stop_reason: StopReason | None
    max_in_flight: int
    by_kind: Mapping[str, int]

    @property
    def complete(self) -> bool:
        return self.pending == 0 and self.in_flight == 0


def classify(state: JobState | None, *, file_present: bool, max_attempts: int) -> str:
    """What a run does with a job, given what the ledger says: ``done``, ``poll``, ``submit`` or ``failed``."""
    if state is None:
        return "submit"
    if state.status is JobStatus.SUCCEEDED:
        return "done" if file_present else "submit"
    if state.status is JobStatus.IN_FLIGHT:
        return "poll"
    if state.status is JobStatus.FAILED:
        return "submit" if state.retryable and state.attempts < max_attempts else "failed"
    return "submit"  # pending, or in doubt (a lost answer: submitted again, counted as possibly paid twice)


def data_uri(data: bytes, path_name: str) -> str:
    """A base64 data URI for a local image (the inline path, until uploads replace it)."""
    mime = mimetypes.guess_type(path_name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


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
        # Requests count at their answers (see SlidingWindow.settle), so the margin covers clock drift only.
        self.window = SlidingWindow(config.rate_count, config.rate_period, margin=answer_margin(config.rate_period))
        self.gate = InFlightGate(config.concurrency)
        # Polls are paced at the window's sustainable rate; when only creates count, at what the per-prediction minimum
        # interval allows for a full set of slots.
        pace = config.rate_count / config.rate_period
        if config.rate_scope != "all":
            pace = config.concurrency / max(config.poll_min_interval, 0.05)
        self.pacer = PollPacer(pace)
        self.flights: dict[str, Flight] = {}
        self.ready: deque[Job] = deque()
        self.delayed: list[tuple[float, Job]] = []
        self.creates_this_run = 0
        self.create_retries: dict[str, int] = {}
        self.durations: list[float] = list(state.durations[-500:])
        self.plan: PollPlan = self._new_plan()
        self.sorted_durations: list[float] = sorted(self.durations)
        self.stop_reason: StopReason | None = None
        self.stopping_at: float | None = None
        self.fatal: BatchrunnerError | None = None
        self.consecutive_failures = 0
        self.wake = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self.downloads = asyncio.Semaphore(config.download_concurrency)
        self.started = 0.0
        self.deadline: float | None = None
        self._images: dict[str, str] = {}
        # Uploads: by sha256 of the file's content, so each distinct image is uploaded once, whatever its paths.
        self.content_types: Mapping[str, str] = content_types or {}
        self.uploaded: dict[str, str] = {}  # sha256 -> public_url
        self.fresh_uploads: set[str] = set()  # uploaded by this run
        self.upload_queue: deque[str] = deque()
        self.uploading: set[str] = set()
        self.upload_tries: dict[str, int] = {}
        self.upload_retry_at: dict[str, float] = {}
        self.image_paths: dict[str, Path] = {}
        self.blocked: list[Job] = []  # jobs whose image could not be uploaded this run
        self.pending_reserved = 0  # creates in progress (they hold a gate slot and a budget reservation)
        # Slots held for creates whose answer was lost: the prediction may be running on the server, so it keeps its
        # slot until it would surely have finished (loop times at which to release them).
        self.phantoms: list[float] = []
        self.undownloaded: list[str] = []
        self._window_seeded = False
        self.creates_paused_until = 0.0
        self._last_progress = -1.0
        # Until the API has answered once, one request at a time: a wrong key then costs one request, not ten.
        self.key_checked = False
        self.calls_in_progress = 0

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
        self.counters.total = len(self.manifest.jobs)
        self.counters.lost_answers = self.state.lost_answers
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
        self._plan_uploads(wall_now)
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
            )
            self.flights[flight.prediction_id] = flight
            self.gate.in_flight += 1
            self.gate.max_seen = max(self.gate.max_seen, self.gate.in_flight)
        # A create a killed run sent without hearing back may be running on the server: hold its slot for as long as a
        # prediction would take, so that creating it again cannot push the server past the cap.
        hold = self._doubt_hold()
        for st in self.state.jobs.values():
            if st.doubt_at is not None and st.status is not JobStatus.IN_FLIGHT:
                release_at = now - (wall_now - st.doubt_at) + hold
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
                history = [now - (wall_now - w) + late for w in recent]
                self.window = SlidingWindow(
                    self.config.rate_count, self.config.rate_period, margin=self.window.margin, history=history
                )

    def _plan_uploads(self, wall_now: float) -> None:
        """Queue each distinct local image pending jobs need, in the order of its first job; reuse fresh uploads."""
        for digest, upload in self.state.uploads.items():
            if wall_now - upload.uploaded_at < UPLOAD_TTL:
                self.uploaded[digest] = upload.public_url
        if self.config.inline_images:
            return
        queued: set[str] = set()
        for job in self.ready:
            sha = job.image_sha256
            if job.image_path is None or sha is None or sha in self.uploaded or sha in queued:
                continue
            queued.add(sha)
            self.image_paths[sha] = job.image_path
            self.upload_queue.append(sha)

    def _image_ready(self, job: Job) -> bool:
        return (
            self.config.inline_images
            or job.image_path is None
            or job.image_sha256 is None
            or job.image_sha256 in self.uploaded
        )

    def _next_creatable(self) -> Job | None:
        """The first ready job whose input image is uploaded (jobs behind a slow upload do not hold others back)."""
        for i, job in enumerate(self.ready):
            if self._image_ready(job):
                return job
            if i >= 256:  # uploads run in job order, so a creatable job is never far back
                break
        return None

    def _next_upload(self, now: float, soonest: Callable[[float], None]) -> str | None:
        if self.stop_reason is not None or len(self.uploading) >= MAX_PARALLEL_UPLOADS:
            return None
        for sha in self.upload_queue:
            at = self.upload_retry_at.get(sha, 0.0)
            if at <= now:
                return sha
            soonest(at)
        return None

    # ----------------------------------------------------------------------------------------------- the run
    async def run(self) -> RunResult:
        """Run until every job is done or failed, or a stop condition ends the run; returns the account."""
        self.started = self.now()
        if self.config.max_runtime is not None:
            self.deadline = self.started + self.config.max_runtime
        self._load()
        self._progress()
        try:
            await self._dispatch()
        finally:
            await self._cancel_tasks()
        return self._result()

    async def fetch_schema(self, slug: str) -> Mapping[str, Any] | None:
        """Fetch a model's input schema before the run, within the same request window."""
        self._seed_window()
        # Before the run nothing is on the wire, so the delay is finite; a timer may fire a little early: ask again.
        while (delay := self.window.delay(self.now())) > 0:  # noqa: ASYNC110 - no event to wait for here
            await asyncio.sleep(delay)
        ticket = self._take_grant(self.now())
        token = _TICKET.set(ticket)
        try:
            return await self._call("schema", self.client.model_schema(slug))
        finally:
            _TICKET.reset(token)

    def request_stop(self, reason: StopReason, *, drain: float | None = None) -> None:
        """Stop submitting; finish what is in flight for ``drain`` seconds (default: the configured drain timeout)."""
        if self.stop_reason is None:
            self.stop_reason = reason
        grace = self.config.drain_timeout if drain is None else drain
        until = self.now() + grace
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
            if not self.key_checked and self.calls_in_progress > 0:
                await self._sleep(None, now)
                continue
            counts = kind == "create" or self.config.rate_scope == "all"
            delay = self.window.delay(now) if counts else 0.0
            # While jobs remain to be created, polls are paced so they cannot drain the window a create needs; after
            # that the window alone limits them.
            paced = kind == "poll" and bool(self.ready or self.delayed or self.upload_queue)
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
            if paced:
                self.pacer.take(now)
            ticket = self._take_grant(now) if counts else None
            self._start(kind, target, now, ticket)

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
        if self.stop_reason is not None:
            return False
        return bool(self.ready or self.delayed)

    async def _sleep(self, wake_at: float | None, now: float) -> None:
        timeout = None if wake_at is None else max(0.0, wake_at - now)
        if self.stopping_at is not None:
            until_stop = max(0.0, self.stopping_at - now)
            timeout = until_stop if timeout is None else min(timeout, until_stop)
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
        for flight in idle:
            expires = flight.created_at + self.config.job_timeout
            if now >= expires:
                return ("cancel", flight), None
            soonest(expires)
        self._promote_delayed(now)
        if self.phantoms:
            self._release_phantoms(now)
            soonest(min(self.phantoms, default=now))
        if self.ready and self._may_submit(now):
            job = self._next_creatable()
            if job is not None:
                return ("create", job), None
        if self.upload_queue:
            sha = self._next_upload(now, soonest)
            if sha is not None:
                return ("presign", sha), None
        if self.delayed and self.stop_reason is None:
            soonest(min(t for t, _ in self.delayed))
        if self.ready and self.creates_paused_until > now and self.stop_reason is None:
            soonest(self.creates_paused_until)
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

    def _creates_possible(self) -> bool:
        return self.stop_reason is None and self.gate.free() > 0 and bool(self.ready or self.delayed)

    def _opportunistic_poll(self, now: float, idle: list[Flight], soonest: Callable[[float], None]) -> Flight | None:
        """A poll ahead of the plan, when a request spent now costs no create.

        That is when no create can use it (every slot is taken, or nothing is left to create) and the window has room.
        The plan alone rations polls for the request-bound case; when slots bind, spare requests go to the prediction
        most likely done, which shortens the time a finished prediction holds its slot unseen.
        """
        if self._creates_possible() or len(self.sorted_durations) < MIN_SAMPLES:
            return None
        if self.config.rate_scope == "all" and self.window.remaining(now) <= 0:
            return None
        best, best_p = None, 0.0
        for flight in idle:
            checked = flight.last_running_age if flight.last_running_age is not None else 0.0
            if now - flight.created_at - checked < self.config.poll_min_interval:
                continue
            p = done_probability(self.sorted_durations, now - flight.created_at, checked)
            if p > best_p:
                best, best_p = flight, p
        if best is not None and best_p >= OPPORTUNISTIC_MIN_PROBABILITY:
            return best
        if idle:
            # Probabilities grow with age: look again a little later.
            soonest(now + max(0.01, self.sorted_durations[len(self.sorted_durations) // 2] / 20))
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
            expected = self._expected_duration()
            if now + expected >= self.deadline:
                self.request_stop(StopReason.DEADLINE, drain=max(0.0, self.deadline - now))
                return False
        return True

    def _expected_duration(self) -> float:
        """A pessimistic time for one prediction: the 90th percentile seen, else a multiple of the first poll."""
        if len(self.durations) >= 3:
            ordered = sorted(self.durations)
            return ordered[int(0.9 * (len(ordered) - 1))] * 1.2
        return self.config.poll_initial * 3

    def _doubt_hold(self) -> float:
        """How long a create whose answer was lost keeps its slot: as long as its prediction may run.

        With prediction times known, the longest seen and half again; before that, ten first-poll intervals (30 s by
        default), since a slot freed too early lets the runner push the account past its cap.
        """
        if len(self.durations) >= 3:
            return max(self.durations) * 1.5
        return max(1.0, self.config.poll_initial * 10)

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
            self._spawn(self._api_task(self._create(job), ticket))
        elif kind == "presign":
            sha: str = target
            self.upload_queue.remove(sha)
            self.uploading.add(sha)
            self._spawn(self._api_task(self._upload(sha), ticket))
        elif kind == "poll":
            flight: Flight = target
            flight.busy = True
            self._spawn(self._api_task(self._poll(flight), ticket))
        else:
            flight = target
            flight.busy = True
            self._spawn(self._api_task(self._cancel(flight), ticket))

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
        finally:
            ticket = _TICKET.get()
            if ticket is not None:
                self._settle(ticket)

    async def _api_task(self, work: Coroutine[Any, Any, None], ticket: int | None) -> None:
        """Run one request's task; ``calls_in_progress`` (raised when it was started) drops however it ends.

        ``ticket`` is the request's window place: ``_call`` settles it at the answer (the task's context carries
        it there); if the task ends without reaching ``_call`` (cancelled first), it is settled here.
        """
        _TICKET.set(ticket)
        try:
            await work
        finally:
            self.calls_in_progress -= 1
            if ticket is not None:
                self._settle(ticket)

    def _api_input(self, job: Job) -> dict[str, Any]:
        body = dict(job.input)
        if job.image_path is not None and job.image_sha256 is not None and not self.config.inline_images:
            body["input_image"] = self.uploaded[job.image_sha256]
        elif job.image_path is not None and job.image_sha256 is not None:
            uri = self._images.get(job.image_sha256)
            if uri is None:
                uri = data_uri(read_bytes(job.image_path), job.image_path.name)
                if len(self._images) >= 8:  # a few recent images: a matrix usually repeats one image many times
                    self._images.pop(next(iter(self._images)))
                self._images[job.image_sha256] = uri
            body["input_image"] = uri
        return body

    def _api_ok(self) -> None:
        self.key_checked = True
        self.consecutive_failures = 0

    def _api_failed(self, exc: ApiError) -> None:
        if isinstance(exc, AuthError):
            self.fatal = exc
            return
        if exc.status is not None:
            self.key_checked = True  # the API answered and did not refuse the key
        if exc.status == 429:
            return  # busy, not down
        self.consecutive_failures += 1
        if self.consecutive_failures >= MAX_CONSECUTIVE_FAILURES and self.stop_reason is None:
            log.error("the API failed %d times in a row (last: %s); stopping", self.consecutive_failures, exc)
            self.request_stop(StopReason.API_DOWN)

    async def _create(self, job: Job) -> None:
        st = self.state.jobs.get(job.fingerprint)
        attempt = (st.attempts if st is not None else 0) + 1
        try:
            body = self._api_input(job)
        except OSError as exc:
            self.pending_reserved -= 1
            self.gate.release()
            raise InputImageError(
                f"cannot read: {describe_os_error(exc)}", file=str(job.image_path), jobs=(job.id,)
            ) from exc
        self.counters.creates += 1
        self.ledger.append(SUBMITTING, job=job.id, fingerprint=job.fingerprint, attempt=attempt)
        try:
            prediction_id = await self._call(
                "create", self.client.create(self.manifest.model, self.manifest.version, body)
            )
        except ApiError as exc:
            self.pending_reserved -= 1
            self._create_failed(job, exc)
            return
        self.pending_reserved -= 1
        self._api_ok()
        self.creates_this_run += 1
        self.ledger.append(SUBMITTED, job=job.id, fingerprint=job.fingerprint, prediction_id=prediction_id)
        self._state_of(job.id, job.fingerprint).status = JobStatus.IN_FLIGHT
        now = self.now()
        flight = Flight(
            job_id=job.id,
            fingerprint=job.fingerprint,
            prediction_id=prediction_id,
            created_at=now,
            job=job,
            next_poll_at=now + self.plan.next_poll_age(0, 0.0),
        )
        self.flights[prediction_id] = flight

    def _create_failed(self, job: Job, exc: ApiError) -> None:
        # In doubt: the request may have been acted on and no usable answer came back — the connection dropped after
        # sending, or the server said 2xx with a body we could not read.
        in_doubt = (isinstance(exc, NetworkError) and exc.sent) or (exc.status is not None and 200 <= exc.status < 300)
        if isinstance(exc, TransientError | PaymentRequired):
            self.ledger.append(
                CREATE_FAILED, job=job.id, fingerprint=job.fingerprint, error=str(exc), in_doubt=in_doubt
            )
            if in_doubt:
                self.counters.lost_answers += 1
                self.phantoms.append(self.now() + self._doubt_hold())
            else:
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
                self.counters.rate_limited += 1
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
            self.delayed.append((self.now() + delay, job))
            return
        self.gate.release()
        if isinstance(exc, AuthError):
            self.ledger.append(CREATE_FAILED, job=job.id, fingerprint=job.fingerprint, error=str(exc), in_doubt=False)
            self.ready.appendleft(job)
            self.fatal = exc
            return
        self._fail(job.id, job.fingerprint, job, str(exc), retryable=False, error_code=None, prediction_id=None)

    async def _upload(self, sha: str) -> None:
        """Presign (an API request), PUT the bytes (another host), record the upload; only then may jobs use it."""
        path = self.image_paths[sha]
        content_type = self.content_types.get(sha) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        try:
            presigned = await self._call("presign", self.client.presign(content_type))
            try:
                data = await asyncio.to_thread(read_bytes, path)
            except OSError as exc:
                raise InputImageError(f"cannot read: {describe_os_error(exc)}", file=str(path)) from exc
            await self.client.put_upload(presigned, data)
        except ApiError as exc:
            self.uploading.discard(sha)
            self._api_failed(exc)
            tries = self.upload_tries.get(sha, 0) + 1
            self.upload_tries[sha] = tries
            if tries >= MAX_UPLOAD_TRIES:
                log.error("upload of %s failed %d times (%s); its jobs wait for the next run", path, tries, exc)
                self._block_image(sha)
                return
            log.warning("upload of %s failed (%s); trying again", path, exc)
            wait = retry_delay(
                tries, exc.retry_after, base=self.config.retry_base, cap=self.config.retry_cap, rng=self._rng
            )
            self.upload_retry_at[sha] = self.now() + wait
            self.upload_queue.append(sha)
            return
        self._api_ok()
        self.uploading.discard(sha)
        self.ledger.append(UPLOADED, sha256=sha, public_url=presigned.public_url, file=path.name)
        self.uploaded[sha] = presigned.public_url
        self.fresh_uploads.add(sha)
        self.counters.uploads += 1

    def _block_image(self, sha: str) -> None:
        keep: deque[Job] = deque()
        for job in self.ready:
            (self.blocked if job.image_sha256 == sha else keep).append(job)
        self.ready = keep

    async def _poll(self, flight: Flight) -> None:
        self.counters.polls += 1
        try:
            prediction = await self._call("poll", self.client.get(flight.prediction_id))
        except NotFound as exc:
            self._api_ok()
            self._finish_flight(flight)
            self._fail(
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
            flight.busy = False
            self._api_failed(exc)
            self.counters.rate_limited += int(exc.status == 429)
            flight.poll_failures += 1
            wait = retry_delay(
                flight.poll_failures,
                exc.retry_after,
                base=self.config.retry_base,
                cap=self.config.retry_cap,
                rng=self._rng,
            )
            flight.next_poll_at = self.now() + wait
            return
        self._api_ok()
        flight.poll_failures = 0
        flight.polls += 1
        age = self.now() - flight.created_at
        if prediction.phase is Phase.RUNNING:
            flight.last_running_age = age
            flight.next_poll_at = flight.created_at + self.plan.next_poll_age(flight.polls, age)
            flight.busy = False
            return
        self._finish_flight(flight)
        duration: float | None = None
        if not flight.resumed:
            self._learn(observed_duration(age, flight.last_running_age))
            duration = round(age, 3)
        if prediction.phase is Phase.SUCCEEDED and prediction.urls:
            self._spawn(self._download(flight, prediction, duration))
            return
        error = prediction.error or ("finished without an output" if prediction.phase is Phase.SUCCEEDED else "failed")
        retryable = prediction.retryable or prediction.phase is Phase.SUCCEEDED
        sha = flight.job.image_sha256 if flight.job is not None else None
        stale = sha is not None and sha in self.uploaded and sha not in self.fresh_uploads
        if prediction.error_code == "INPUT_DOWNLOAD_ERROR" and sha is not None and stale:
            # The API could not fetch an image an earlier run uploaded (expired or lost): upload it again and try the
            # job again. An upload made by this run that fails so is a real input problem: no second try.
            del self.uploaded[sha]
            if sha not in self.upload_queue and sha not in self.uploading and flight.job is not None:
                self.image_paths[sha] = flight.job.image_path or self.image_paths[sha]
                self.upload_queue.append(sha)
            retryable = True
        self._fail(
            flight.job_id,
            flight.fingerprint,
            flight.job,
            error,
            retryable=retryable,
            error_code=prediction.error_code,
            prediction_id=flight.prediction_id,
            cost=prediction.cost,
            duration=duration,
        )

    async def _cancel(self, flight: Flight) -> None:
        self.counters.cancels += 1
        try:
            await self._call("cancel", self.client.cancel(flight.prediction_id))
        except ApiError as exc:
            # Best effort: the API may already have finished it; we stop waiting either way.
            log.warning("job %s: cancel of %s failed: %s", flight.job_id, flight.prediction_id, exc)
        self._finish_flight(flight)
        self._fail(
            flight.job_id,
            flight.fingerprint,
            flight.job,
            f"no result after {self.config.job_timeout:g}s; cancelled",
            retryable=True,
            error_code="TIMEOUT",
            prediction_id=flight.prediction_id,
        )

    async def _download(self, flight: Flight, prediction: Prediction, duration: float | None) -> None:
        url = prediction.urls[0]
        last: ApiError | None = None
        for attempt in range(1, MAX_DOWNLOAD_TRIES + 1):
            try:
                async with self.downloads:
                    name = await save_download(self.out, flight.job_id, lambda sink: self.client.download(url, sink))
            except DownloadRejected as exc:
                self._fail(
                    flight.job_id,
                    flight.fingerprint,
                    flight.job,
                    f"unusable output: {exc}",
                    retryable=True,
                    error_code=None,
                    prediction_id=flight.prediction_id,
                    cost=prediction.cost,
                    duration=duration,
                )
                return
            except TransientError as exc:
                last = exc
                await asyncio.sleep(backoff(attempt, base=0.2, cap=5.0, rng=self._rng))
                continue
            cost = prediction.cost if prediction.cost is not None else self.config.price
            self.ledger.append(
                SUCCEEDED,
                job=flight.job_id,
                fingerprint=flight.fingerprint,
                prediction_id=flight.prediction_id,
                file=name,
                cost=cost,
                duration=duration,
            )
            st = self._state_of(flight.job_id, flight.fingerprint)
            st.status, st.file = JobStatus.SUCCEEDED, name
            self.counters.succeeded += 1
            self.counters.spend += cost or 0.0
            return
        # The prediction is paid and its output may still be there: leave it in flight in the ledger, so the next run
        # polls it again and downloads it, instead of paying for a new one.
        log.warning(
            "job %s: download failed %d times (%s); the next run fetches it",
            flight.job_id,
            MAX_DOWNLOAD_TRIES,
            last,
        )
        self.undownloaded.append(flight.job_id)

    # ----------------------------------------------------------------------------------------------- state changes
    def _finish_flight(self, flight: Flight) -> None:
        if self.flights.pop(flight.prediction_id, None) is not None:
            self.gate.release()

    def _learn(self, duration: float) -> None:
        self.durations.append(duration)
        if len(self.durations) > 500:
            del self.durations[:-500]
        n = len(self.durations)
        # Re-plan on the first few samples, then now and again: the plan changes slowly once it has data.
        if n <= 20 or n % 10 == 0:
            self.plan = self._new_plan()
            self.sorted_durations = sorted(self.durations)

    def _state_of(self, job_id: str, fingerprint: str) -> JobState:
        st = self.state.jobs.get(fingerprint)
        if st is None:
            st = JobState(fingerprint=fingerprint, job=job_id)
            self.state.jobs[fingerprint] = st
        return st

    def _fail(
        self,
        job_id: str,
        fingerprint: str,
        job: Job | None,
        error: str,
        *,
        retryable: bool,
        error_code: str | None,
        prediction_id: str | None,
        cost: float | None = None,
        duration: float | None = None,
    ) -> None:
        fields: dict[str, Any] = {"error": error, "retryable": retryable}
        if error_code is not None:
            fields["error_code"] = error_code
        if prediction_id is not None:
            fields["prediction_id"] = prediction_id
        if cost is not None:
            fields["cost"] = cost
            self.counters.spend += cost
        if duration is not None:
            fields["duration"] = duration
        self.ledger.append(FAILED, job=job_id, fingerprint=fingerprint, **fields)
        st = self._state_of(job_id, fingerprint)
        st.status = JobStatus.FAILED
        st.attempts += 1
        st.retryable = retryable
        st.error = error
        st.error_code = error_code
        if retryable and st.attempts < self.config.max_attempts and job is not None:
            self.counters.retried += 1
            log.warning("job %s: attempt %d failed: %s; trying again", job_id, st.attempts, error)
            self.delayed.append((self.now() + backoff(st.attempts, rng=self._rng), job))
        else:
            self.counters.failed += 1
            log.error("job %s failed: %s%s", job_id, error, f" [{error_code}]" if error_code else "")

    # ----------------------------------------------------------------------------------------------- reporting
    def snapshot(self) -> Snapshot:
        c = self.counters
        return Snapshot(
            total=c.total,
            done=c.skipped + c.succeeded,
            failed=c.failed,
            in_flight=len(self.flights) + self.pending_reserved,
            pending=len(self.ready) + len(self.delayed),
            requests=c.requests,
            elapsed=(self.now() - self.started) if self.started else 0.0,
            window_used=self.window.used(self.now()),
        )

    def _progress(self) -> None:
        if self._on_progress is not None:
            self._on_progress(self.snapshot())

    def _result(self) -> RunResult:
        c = self.counters
        in_flight = len(self.flights) + len(self.undownloaded)
        pending = len(self.ready) + len(self.delayed) + self.pending_reserved + len(self.blocked)
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
        )
