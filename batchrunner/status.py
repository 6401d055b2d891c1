"""Where a batch stands, from the manifest and the ledger alone: no request is made."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from batchrunner.ledger import JobStatus, LedgerState
from batchrunner.manifest import Manifest
from batchrunner.output import OutputDir
from batchrunner.runstate import classify


@dataclass(frozen=True, slots=True)
class Failure:
    job: str
    error: str
    error_code: str | None
    retryable: bool
    attempts: int


@dataclass(frozen=True, slots=True)
class StatusCounts:
    """Counts of a manifest's jobs by what the next run would do with them."""

    total: int
    succeeded: int
    failed: int  # for good: not retryable, or out of attempts
    pending: int  # never submitted, retryable failures, or a create that surely made nothing
    in_flight: int
    lost_answers: int  # creates sent again while an earlier one was in doubt: possibly paid twice
    orphans: int  # jobs in the ledger that the manifest no longer has
    spend: float
    failures: tuple[Failure, ...] = field(default=())
    in_doubt: int = 0  # a create that may have made a prediction: the next run settles it from the listing
    recovered: int = 0  # in-doubt creates whose prediction the listing found: nothing paid twice

    def to_json(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "pending": self.pending,
            "in_flight": self.in_flight,
            "in_doubt": self.in_doubt,
            "recovered": self.recovered,
            "possibly_duplicated": self.lost_answers,
            "orphans": self.orphans,
            "spend": round(self.spend, 6),
            "recent_failures": [
                {
                    "job": f.job,
                    "error": f.error,
                    "error_code": f.error_code,
                    "retryable": f.retryable,
                    "attempts": f.attempts,
                }
                for f in self.failures
            ],
        }

    def describe(self, where: str) -> str:
        lines = [
            f"{where}: {self.total} jobs: {self.succeeded} succeeded, {self.failed} failed, "
            f"{self.pending} pending, {self.in_flight} in flight"
            + (f", {self.in_doubt} in doubt" if self.in_doubt else ""),
        ]
        if self.in_doubt:
            lines.append(
                f"{self.in_doubt} creates got no clear answer: the next run looks for them in the account's executions"
            )
        if self.recovered:
            lines.append(f"{self.recovered} creates in doubt were found in the listing and kept (not paid twice)")
        if self.lost_answers:
            lines.append(f"{self.lost_answers} creates were sent again while in doubt (possibly paid twice)")
        if self.orphans:
            lines.append(f"{self.orphans} jobs in the ledger are no longer in the manifest")
        if self.spend:
            lines.append(f"spend so far: ${self.spend:.2f}")
        for f in self.failures:
            code = f" [{f.error_code}]" if f.error_code else ""
            lines.append(f"  failed {f.job} (attempt {f.attempts}): {f.error}{code}")
        return "\n".join(lines)


def count_status(
    manifest: Manifest, state: LedgerState, out: OutputDir, *, max_attempts: int, recent: int = 5
) -> StatusCounts:
    """Count the manifest's jobs by state; list the most recent failures with their messages."""
    succeeded = failed = pending = in_flight = in_doubt = 0
    failures: list[tuple[float, Failure]] = []
    fingerprints = set()
    for job in manifest.jobs:
        fingerprints.add(job.fingerprint)
        st = state.jobs.get(job.fingerprint)
        present = st is not None and out.has_file(st.file)
        verdict = classify(st, file_present=present, max_attempts=max_attempts)
        if verdict == "done":
            succeeded += 1
        elif verdict == "poll":
            in_flight += 1
        elif verdict == "failed":
            failed += 1
        elif verdict == "reconcile":
            in_doubt += 1
        else:
            pending += 1
        if st is not None and st.status is JobStatus.FAILED and st.error:
            failure = Failure(st.job, st.error, st.error_code, st.retryable, st.attempts)
            failures.append((st.finished_at or 0.0, failure))
    orphans = sum(1 for fp in state.jobs if fp not in fingerprints)
    failures.sort(key=lambda item: item[0], reverse=True)
    return StatusCounts(
        total=len(manifest.jobs),
        succeeded=succeeded,
        failed=failed,
        pending=pending,
        in_flight=in_flight,
        lost_answers=state.lost_answers,
        orphans=orphans,
        spend=state.spend,
        failures=tuple(f for _, f in failures[:recent]),
        in_doubt=in_doubt,
        recovered=state.recovered,
    )


# With no prediction times in the ledger yet, plans assume the documented typical latency (8-15 s per image).
TYPICAL_PREDICTION_SECONDS = 12.0


@dataclass(frozen=True, slots=True)
class Plan:
    """What a run would do, computed without a single request."""

    counts: StatusCounts
    retryable_failed: int  # failed jobs a run would try again (counted in pending)
    to_submit: int
    uploads: int  # distinct local images not yet uploaded
    requests: int  # expected requests to the API host
    seconds: float  # expected duration at the configured limits
    cost: float | None  # expected cost at the price, when there is one
    mean_prediction: float  # seconds, from the ledger or the typical figure

    def to_json(self) -> dict[str, Any]:
        return {
            **self.counts.to_json(),
            "new": self.to_submit - self.retryable_failed,
            "retry": self.retryable_failed,
            "uploads": self.uploads,
            "expected_requests": self.requests,
            "expected_seconds": round(self.seconds, 1),
            "expected_cost": None if self.cost is None else round(self.cost, 4),
            "mean_prediction_seconds": round(self.mean_prediction, 2),
        }

    def describe(self, where: str) -> str:
        c = self.counts
        cost = "unknown (no price: pass --price or set `price:`)" if self.cost is None else f"${self.cost:.2f}"
        lines = [
            f"{where}: {c.total} jobs: {c.succeeded} done, {self.to_submit - self.retryable_failed} new, "
            f"{self.retryable_failed} to retry, {c.failed} failed for good, {c.in_flight} in flight"
            + (f", {c.orphans} in the ledger but no longer in the manifest" if c.orphans else ""),
            f"a run would make about {self.requests} requests ({self.to_submit} creates, {self.uploads} uploads) "
            f"and take about {_human(self.seconds)} at the configured limits; cost {cost}",
        ]
        return "\n".join(lines)


def _human(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def make_plan(
    manifest: Manifest,
    state: LedgerState,
    out: OutputDir,
    *,
    max_attempts: int,
    concurrency: int,
    rate_count: int,
    rate_period: float,
    price: float | None,
    inline_images: bool = False,
    polls_per_job: float | None = None,
) -> Plan:
    """Estimate a run: requests from one create and the expected polls per job, time from the tighter limit."""
    counts = count_status(manifest, state, out, max_attempts=max_attempts)
    retryable_failed = 0
    images: set[str] = set()
    to_submit = 0
    for job in manifest.jobs:
        st = state.jobs.get(job.fingerprint)
        present = st is not None and out.has_file(st.file)
        if classify(st, file_present=present, max_attempts=max_attempts) != "submit":
            continue
        to_submit += 1
        if st is not None and st.status is JobStatus.FAILED:
            retryable_failed += 1
        if job.image_sha256 is not None and job.image_sha256 not in state.uploads and not inline_images:
            images.add(job.image_sha256)
    durations = state.durations[-500:]
    mean = sum(durations) / len(durations) if durations else TYPICAL_PREDICTION_SECONDS
    polls = polls_per_job if polls_per_job is not None else 2.0
    requests = round(to_submit * (1 + polls) + counts.in_flight * polls + len(images))
    by_requests = rate_period * max(0, -(-requests // rate_count) - 1) if requests else 0.0
    # Slots run in rounds of `concurrency` predictions; even one job takes one prediction time.
    by_slots = -(-(to_submit + counts.in_flight) // concurrency) * mean
    return Plan(
        counts=counts,
        retryable_failed=retryable_failed,
        to_submit=to_submit,
        uploads=len(images),
        requests=requests,
        seconds=max(by_requests, by_slots),
        cost=None if price is None else to_submit * price,
        mean_prediction=mean,
    )
