"""The records of one run: its configuration, the predictions it watches, its counters and its account.

Plain data and one pure decision (``classify``), shared by the scheduler and its collaborators (``uploads.py``,
``results.py``) and read by the reports; nothing here does I/O or reads a clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from batchrunner.manifest import Job
from batchrunner.store.ledger import JobState, JobStatus, LedgerState


class StopReason(StrEnum):
    """Why a run stopped before the batch was done."""

    INTERRUPTED = "interrupted"
    TERMINATED = "terminated"
    DEADLINE = "deadline"
    MAX_JOBS = "max_jobs"
    BUDGET = "budget"
    PAYMENT = "payment_required"
    API_DOWN = "api_unavailable"
    LIMITS_STORE = "limits_store_lost"  # the account's limits store failed mid-run: in flight finished, resumable


# Downloads at once at most, whatever the slots. At 1000 slots a cap of 64 left images unsaved 30 s after their
# predictions finished (10,000 jobs at 6000/6: a backlog of downloads, not of requests); 256 keeps up.
MAX_DOWNLOADS = 256
# The run's connection pool: every download at once, and as many again as aiohttp's default pool (100) for the API's
# requests, so that downloads never take the connections a create or a listing page needs.
CONNECTIONS = MAX_DOWNLOADS + 100


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
    download_concurrency: int = 0  # downloads at once; 0: as many as slots, between 4 and MAX_DOWNLOADS
    retry_base: float = 0.5
    retry_cap: float = 30.0
    # In-doubt creates: the listing is looked at reconcile_wait x 0.5, 1.5 and 3.5 s after the answer, over the
    # creation times from the send to the answer widened by clock_skew either side (our clock against the API's).
    reconcile_wait: float = 2.0
    clock_skew: float = 10.0
    watch: str = "auto"  # how predictions in flight are watched: auto | list | poll (watch.py)
    listing_probe: float = 30.0  # while the listing fails, it is tried again this often (auto)
    # Where the account's limits are shared with the key's other runs: None or "sqlite" (the state folder's database),
    # "redis://HOST:PORT/DB", or "local" (this run's own limits only); see accountlimits.py.
    limits_store: str | None = None


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
    # Taken over from an earlier run (or recovered from the listing): its age includes time no run was watching, so it
    # teaches no duration.
    resumed: bool = False
    attempt: int = 1
    cancelled_at: float | None = None  # loop time of our cancel after --job-timeout; the prediction may run on
    not_found: int = 0  # 404s in a row: a fresh prediction may not be readable yet
    empty_success: int = 0  # successes seen without an output URL
    listed: bool = False  # watched by the executions listing (not polled on its own)


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
    lost_answers: int = 0  # creates sent again while in doubt: possibly paid twice (this run and the ledger's)
    recovered: int = 0  # in-doubt creates found in the listing and adopted (this run and the ledger's)
    not_created: int = 0  # in-doubt creates the listing showed made nothing (this run)
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
    # Of the jobs: done = skipped + succeeded this run; in_flight counts creates on the wire, predictions running and
    # outputs downloading; in_doubt the creates being looked for in the listing. done + failed + in_flight + in_doubt
    # + pending = total.
    in_doubt: int = 0
    skipped: int = 0  # done before this run
    downloading: int = 0  # of in_flight: outputs being fetched
    spend: float = 0.0  # in all, the ledger's included
    spend_before: float = 0.0  # what the ledger had spent when the run began
    slots_used: int = 0  # in-flight slots held (predictions of jobs no longer in the manifest too)
    slots: int = 0  # --concurrency
    window_limit: int = 0  # --rate-limit COUNT
    window_period: float = 0.0  # --rate-limit SECONDS
    window_wait: float = 0.0  # seconds until the window lets the next request go (inf: until an answer comes)
    creates_paused: float = 0.0  # seconds until creates resume after the API asked us to slow down
    stopping: str | None = None  # the stop reason's value once the run no longer submits
    rate_limited: int = 0  # 429s the API sent this run: something else is spending the key


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
    recovered: int = 0
    in_doubt: int = 0  # creates still in doubt at the end: the next run settles them from the listing
    spend_before: float = 0.0  # what the ledger had spent when the run began: this run spent spend - spend_before

    @property
    def complete(self) -> bool:
        return self.pending == 0 and self.in_flight == 0 and self.in_doubt == 0


def classify(state: JobState | None, *, file_present: bool, max_attempts: int) -> str:
    """What a run does with a job, given what the ledger says: ``done``, ``poll``, ``reconcile``, ``submit`` or
    ``failed``. ``reconcile``: its last create may have made a prediction; the listing settles that before any create.
    """
    if state is None:
        return "submit"
    if state.status is JobStatus.SUCCEEDED:
        return "done" if file_present else "submit"
    if state.status is JobStatus.IN_FLIGHT:
        return "poll"
    if state.status is JobStatus.FAILED:
        return "submit" if state.retryable and state.attempts < max_attempts else "failed"
    if state.doubt_open:
        return "reconcile"
    return "submit"


def job_state(state: LedgerState, job_id: str, fingerprint: str) -> JobState:
    """The replayed state of a job, created (as pending) the first time the run changes it."""
    st = state.jobs.get(fingerprint)
    if st is None:
        st = JobState(fingerprint=fingerprint, job=job_id)
        state.jobs[fingerprint] = st
    return st
