"""Creates: the jobs waiting to be created, their uploads' requests, the create itself and what its answer means.

Write-ahead order, so that a kill at any instant replays to a state the next run completes: ``submitting`` (intent)
-> create -> ``submitted`` (prediction id), then the prediction is handed to the watching. A create that may have made
a prediction without saying so goes to the doubts (``doubts.py``) with its slot; one that surely made nothing is tried
again after a backoff, up to ``MAX_CREATE_RETRIES`` in a run. Whether a create may go at all (a free slot, no pause
after a 429, ``--max-jobs``, the budget, the deadline) is decided here; the upload queue itself is ``uploads.py``'s.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from batchrunner.engine.context import Run
from batchrunner.engine.grants import Grants
from batchrunner.engine.policy import expected_duration, retry_delay
from batchrunner.engine.reconcile import create_in_doubt
from batchrunner.engine.results import Results
from batchrunner.engine.runstate import Flight, StopReason, job_state
from batchrunner.engine.uploads import Uploads
from batchrunner.errors import ApiError, AuthError, InputImageError, PaymentRequired, TransientError
from batchrunner.manifest import Job
from batchrunner.store.ledger import CREATE_FAILED, SUBMITTED, SUBMITTING, JobStatus
from batchrunner.store.output import describe_os_error

log = logging.getLogger("batchrunner")

# Transient failures of one create within one run before the job is left for a later run.
MAX_CREATE_RETRIES = 8


class Creates:
    """The jobs this run has yet to create, and the creates on the wire."""

    def __init__(
        self,
        run: Run,
        grants: Grants,
        uploads: Uploads,
        results: Results,
        *,
        created: Callable[[Flight], None],
        in_doubt: Callable[[Job, Mapping[str, Any], float, float, float], None],
        rerun: Callable[[Job], None],
        in_flight: Callable[[], int],
    ) -> None:
        self.run = run
        self.grants = grants
        self.uploads = uploads
        self.results = results
        self._created = created  # watch the prediction a create made
        self._in_doubt = in_doubt  # settle a create that may have made one
        self._rerun = rerun  # count a create for a job whose cancelled prediction may still run
        self._in_flight = in_flight  # predictions in flight, for the budget
        self.ready: deque[Job] = deque()
        self.delayed: list[tuple[float, Job]] = []
        self.retries: dict[str, int] = {}
        self.this_run = 0
        self.pending = 0  # creates in progress (they hold a gate slot and a budget reservation)
        self.paused_until = 0.0
        self.listed = run.config.watch != "poll"  # a new prediction is watched by the listing

    def to_create(self) -> bool:
        return bool(self.ready or self.delayed)

    def wants_slot(self) -> bool:
        return self.run.stop_reason is None and bool(self.ready)

    # ----------------------------------------------------------------------------------------------- decisions
    def next(self, now: float, soonest: Callable[[float], None]) -> tuple[str, Any] | None:
        """A create if one may go, else an upload's presign that is due; else tells ``soonest`` when to look again."""
        run = self.run
        self._promote_delayed(now)
        run.release_holds(now, soonest)
        if self.ready and self._may_submit(now):
            job = self._next_creatable()
            if job is not None:
                return ("create", job)
        if self.uploads.queue and run.stop_reason is None:
            sha = self.uploads.next_due(now, soonest)
            if sha is not None:
                return ("presign", sha)
        if self.delayed and run.stop_reason is None:
            soonest(min(t for t, _ in self.delayed))
        if self.ready and self.paused_until > now and run.stop_reason is None:
            soonest(self.paused_until)
        return None

    def _next_creatable(self) -> Job | None:
        """The first ready job whose input image is uploaded (jobs behind a slow upload do not hold others back)."""
        for i, job in enumerate(self.ready):
            if self.uploads.ready_for(job):
                return job
            if i >= 256:  # uploads run in job order, so a creatable job is never far back
                break
        return None

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
        run, cfg = self.run, self.run.config
        if run.stop_reason is not None or run.gate.free() <= 0 or now < self.paused_until:
            return False
        if cfg.max_jobs is not None and self.this_run + self.pending >= cfg.max_jobs:
            run.request_stop(StopReason.MAX_JOBS)
            return False
        if cfg.budget is not None:
            reserved = (self._in_flight() + self.pending + 1) * (cfg.price or 0.0)
            if run.counters.spend + reserved > cfg.budget + 1e-9:
                run.request_stop(StopReason.BUDGET)
                return False
        if run.deadline is not None:
            expected = expected_duration(run.durations, cfg.poll_initial)
            if now + expected >= run.deadline:
                run.request_stop(StopReason.DEADLINE, drain=max(0.0, run.deadline - now))
                return False
        return True

    def creatable(self) -> bool:
        """Whether a create could use a request now (a free slot and a job left), for the spare polls."""
        return self.run.stop_reason is None and self.run.gate.free() > 0 and self.to_create()

    # ----------------------------------------------------------------------------------------------- requests
    def start(self, kind: str, target: Any, ticket: int | None) -> None:
        if kind == "presign":
            sha: str = target
            self.uploads.start(sha)
            self.grants.start(lambda: self._upload(sha), ticket)
            return
        job: Job = target
        if self.ready[0] is job:
            self.ready.popleft()
        else:
            self.ready.remove(job)
        if not self.run.gate.try_acquire():  # _may_submit checked it; a failure here is a bug, not a 429
            raise RuntimeError("in-flight gate refused a create that the dispatcher allowed")
        self.pending += 1
        self.grants.start(lambda: self._create(job), ticket)

    async def _create(self, job: Job) -> None:
        run = self.run
        st = run.state.jobs.get(job.fingerprint)
        attempt = (st.attempts if st is not None else 0) + 1
        try:
            body = self.uploads.api_input(job)
        except OSError as exc:
            self._unreserve()
            raise InputImageError(
                f"cannot read: {describe_os_error(exc)}", file=str(job.image_path), jobs=(job.id,)
            ) from exc
        run.counters.creates += 1
        self._rerun(job)
        request_id = f"br-{job.fingerprint[:12]}-a{attempt}-t{self.retries.get(job.fingerprint, 0) + 1}"
        sent_at = run.wall()
        # The intent is on disk before the create is sent (write-ahead); one fsync serves every intent written by then.
        run.ledger.append(
            SUBMITTING, durable=False, job=job.id, fingerprint=job.fingerprint, attempt=attempt, request_id=request_id
        )
        try:
            await run.ledger.commit()
        except BaseException:
            self._unreserve()
            raise
        try:
            prediction_id = await self.grants.call(
                "create", run.client.create(run.manifest.model, run.manifest.sent_version, body, request_id=request_id)
            )
        except ApiError as exc:
            self.pending -= 1
            if create_in_doubt(exc):
                self._create_in_doubt(job, body, exc, sent_at)
            else:
                self._create_failed(job, exc)
            return
        self.pending -= 1
        run.ok()
        self.this_run += 1
        # Not fsynced on its own (the next intent's fsync covers it): lost to a power cut, the intent stays open and the
        # next run finds the prediction in the listing.
        run.ledger.append(
            SUBMITTED, durable=False, job=job.id, fingerprint=job.fingerprint, prediction_id=prediction_id
        )
        run.state.predictions.add(prediction_id)  # known: never adopted by a doubt
        st = job_state(run.state, job.id, job.fingerprint)
        st.status, st.doubt_open = JobStatus.IN_FLIGHT, False
        now = run.now()
        self._created(
            Flight(
                job_id=job.id,
                fingerprint=job.fingerprint,
                prediction_id=prediction_id,
                created_at=now,
                job=job,
                next_poll_at=now + run.plan.next_poll_age(0, 0.0),
                attempt=attempt,
                listed=self.listed,
            )
        )

    def _unreserve(self) -> None:
        self.pending -= 1
        self.run.gate.release()

    def _create_in_doubt(self, job: Job, body: Mapping[str, Any], exc: ApiError, sent_at: float) -> None:
        """A create that may have made a prediction: keep its slot and settle it from the listing first."""
        run = self.run
        run.ledger.append(CREATE_FAILED, job=job.id, fingerprint=job.fingerprint, error=str(exc), in_doubt=True)
        job_state(run.state, job.id, job.fingerprint).doubt_open = True
        run.failed(exc)
        log.warning(
            "job %s: create in doubt (%s); looking for it in the account's executions before paying again", job.id, exc
        )
        self._in_doubt(job, body, sent_at, run.wall(), run.now())

    def _create_failed(self, job: Job, exc: ApiError) -> None:
        """A create that surely made nothing: a 4xx answer, or a connection that never carried it."""
        run = self.run
        run.gate.release()
        if isinstance(exc, TransientError | PaymentRequired | AuthError):
            run.ledger.append(CREATE_FAILED, job=job.id, fingerprint=job.fingerprint, error=str(exc), in_doubt=False)
        if isinstance(exc, AuthError | PaymentRequired):
            self.ready.appendleft(job)
            if isinstance(exc, AuthError):
                run.fatal = exc
            else:
                log.error("out of credit (HTTP 402): stopping submissions; %s", exc)
                run.request_stop(StopReason.PAYMENT)
            return
        if not isinstance(exc, TransientError):
            self.results.fail(
                job.id, job.fingerprint, job, str(exc), retryable=False, error_code=None, prediction_id=None
            )
            return
        tries = self.retries.get(job.fingerprint, 0) + 1
        run.failed(exc)
        config = run.config
        if exc.status == 429:
            # The API is up and busy (its window, or more predictions running on the account than we know of):
            # no outage, but no create for anyone until it has had its pause.
            pause = retry_delay(tries, exc.retry_after, base=config.retry_base, cap=config.retry_cap, rng=run.rng)
            self.paused_until = max(self.paused_until, run.now() + pause)
        self.retries[job.fingerprint] = tries
        if tries > MAX_CREATE_RETRIES:
            log.warning("job %s: create failed %d times (%s); left for the next run", job.id, tries, exc)
            return
        delay = retry_delay(tries, exc.retry_after, base=config.retry_base, cap=config.retry_cap, rng=run.rng)
        self.retry_later(job, delay)

    async def _upload(self, sha: str) -> None:
        """Presign (an API request), PUT the bytes (another host), record the upload; only then may jobs use it."""
        try:
            presigned = await self.uploads.send(sha, self.run.client, self.grants.call)
        except ApiError as exc:
            self.run.failed(exc)
            if not self.uploads.retry_later(sha, exc):
                self.ready = self.uploads.block(sha, self.ready)
            return
        self.run.ok()
        self.uploads.record(sha, presigned)
        self.run.counters.uploads += 1

    # ----------------------------------------------------------------------------------------------- again
    def create_again(self, job: Job) -> None:
        """A job whose create made nothing (a doubt settled): created again after a backoff, or left for a later run."""
        tries = self.retries.get(job.fingerprint, 0) + 1
        self.retries[job.fingerprint] = tries
        if tries > MAX_CREATE_RETRIES:
            log.warning("job %s: create failed %d times; left for the next run", job.id, tries)
            return
        if self.run.stop_reason is None:
            config = self.run.config
            self.retry_later(
                job, retry_delay(tries, None, base=config.retry_base, cap=config.retry_cap, rng=self.run.rng)
            )
        else:
            self.ready.append(job)  # pending for the next run

    def retry_later(self, job: Job, delay: float) -> None:
        self.delayed.append((self.run.now() + delay, job))
