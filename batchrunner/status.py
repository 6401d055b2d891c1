"""Where a batch stands, from the manifest and the ledger alone: no request is made."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from batchrunner.ledger import JobStatus, LedgerState
from batchrunner.manifest import Manifest
from batchrunner.output import OutputDir
from batchrunner.scheduler import classify


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
    pending: int  # never submitted, retryable failures, or a create whose answer was lost
    in_flight: int
    lost_answers: int  # creates whose answer never came: possibly paid twice
    orphans: int  # jobs in the ledger that the manifest no longer has
    spend: float
    failures: tuple[Failure, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "pending": self.pending,
            "in_flight": self.in_flight,
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
            f"{self.pending} pending, {self.in_flight} in flight",
        ]
        if self.lost_answers:
            lines.append(f"{self.lost_answers} creates lost their answer (possibly paid twice)")
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
    succeeded = failed = pending = in_flight = 0
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
    )
