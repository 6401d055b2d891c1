"""Where a batch stands and what a run would do, from the manifest and the ledger alone: no request is made.

The words are ``words.py``'s (done, failed, in flight, in doubt, pending), the same as the progress display's and
the summary's.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from batchrunner.engine.estimate import PAGE_SECONDS, TYPICAL_SECONDS, Estimate, estimate_run, spread_times
from batchrunner.engine.policy import MIN_SAMPLES
from batchrunner.engine.runstate import classify
from batchrunner.manifest import Manifest, sha256_file
from batchrunner.store.ledger import JobStatus, LedgerState
from batchrunner.store.output import OutputDir
from batchrunner.views.history import RunRecord
from batchrunner.views.words import Tally, duration, money, plural, tally_text


@dataclass(frozen=True, slots=True)
class Failure:
    job: str
    error: str
    error_code: str | None
    retryable: bool
    attempts: int
    final: bool = True  # failed for good; False: a failed attempt, the job will be tried again


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
            "done": self.succeeded,
            "succeeded": self.succeeded,  # the name before 0.2
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
                    "final": f.final,
                }
                for f in self.failures
            ],
        }

    @property
    def tally(self) -> Tally:
        return Tally(self.total, self.succeeded, self.failed, self.in_flight, self.in_doubt, self.pending)

    def describe(self, where: str) -> str:
        lines = [f"{where}: {tally_text(self.tally)}"]
        if self.spend:
            lines.append(f"spent {money(self.spend)} in all")
        lines += self.notes()
        if self.failures:
            lines.append("recent failed attempts:")
        for f in self.failures:
            code = f" [{f.error_code}]" if f.error_code else ""
            label = "failed for good" if f.final else "will be tried again"
            lines.append(f"  {f.job}: attempt {f.attempts} failed ({label}): {f.error}{code}")
        return "\n".join(lines)

    def notes(self) -> list[str]:
        """The lines about creates in doubt, recovered or possibly duplicated, and jobs the manifest dropped."""
        lines = []
        if self.in_doubt:
            lines.append(
                f"{plural(self.in_doubt, 'create')} in doubt (no clear answer): "
                "the next run looks for them in the account's executions first"
            )
        if self.recovered:
            lines.append(
                f"{self.recovered} recovered: creates in doubt found in the executions listing, not paid twice"
            )
        if self.lost_answers:
            lines.append(
                f"{self.lost_answers} possibly duplicated: created again while an earlier prediction may have run "
                "(a create in doubt while the listing failed, or a cancel that did not take)"
            )
        if self.orphans:
            lines.append(f"{plural(self.orphans, 'job')} in the ledger no longer in the manifest")
        return lines


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
            failure = Failure(st.job, st.error, st.error_code, st.retryable, st.attempts, final=verdict == "failed")
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


@dataclass(frozen=True, slots=True)
class Plan:
    """What a run would do, computed without a single request."""

    counts: StatusCounts
    retryable_failed: int  # failed jobs a run would try again (counted in pending)
    to_submit: int  # every job a run would create
    uploads: int  # distinct local images not yet uploaded
    requests: int  # expected requests to the API host
    seconds: float  # expected duration at the configured limits
    cost: float | None  # expected cost at the price, when there is one
    mean_prediction: float  # seconds, from the ledger or the model's typical range
    this_run: int = -1  # creates this run, after --max-jobs and --budget (-1: all of to_submit)
    limited_by: str | None = None  # the option that stops a run before to_submit: "--max-jobs 5", "--budget $5.00"
    concurrency: int = 10
    rate: str = "60 per 60s"
    duplicates: int = 0  # combinations that collapsed into another's request
    collapse: str | None = None  # why, when it can be told: "img/b.jpg has the same bytes as img/a.jpg"
    watch: str = "auto"
    estimate: Estimate | None = None  # the model's figures behind requests and seconds

    @property
    def creates(self) -> int:
        return self.to_submit if self.this_run < 0 else self.this_run

    def to_json(self) -> dict[str, Any]:
        return {
            **self.counts.to_json(),
            "new": self.to_submit - self.retryable_failed,
            "retry": self.retryable_failed,
            "to_go": self.counts.total - self.counts.succeeded - self.counts.failed,
            "this_run": self.creates,
            "limited_by": self.limited_by,
            "uploads": self.uploads,
            "expected_requests": self.requests,
            "expected_seconds": round(self.seconds, 1),
            "expected_cost": None if self.cost is None else round(self.cost, 4),
            "mean_prediction_seconds": round(self.mean_prediction, 2),
            "watch": self.watch,
            "expected_listing_pause_seconds": None if self.estimate is None else round(self.estimate.pause, 3),
            "expected_polls_per_job": None if self.estimate is None else round(self.estimate.polls_per_job, 2),
            "combinations": self.counts.total + self.duplicates,
            "collapsed": self.duplicates,
            "collapse": self.collapse,
        }

    def describe(self, where: str) -> str:
        c = self.counts
        head = f"{where}: {tally_text(c.tally)}"
        if self.retryable_failed:
            head += f" ({self.retryable_failed} of them failed before and are tried again)"
        lines = [head]
        if self.duplicates:
            combos = c.total + self.duplicates
            why = f": {self.collapse}" if self.collapse else " (some combinations send the same request)"
            lines.append(f"{combos} combinations, {c.total} distinct requests{why}")
        lines += c.notes()
        if not self.creates and not c.in_flight and not c.in_doubt:
            lines.append("a run would have nothing to do" + (f" ({self.limited_by})" if self.limited_by else ""))
            return "\n".join(lines)
        cost = (
            "cost unknown (no price: pass --price or set `price:`)"
            if self.cost is None
            else f"about {money(self.cost)}"
        )
        stop = f", then stop ({self.limited_by})" if self.limited_by else ""
        lines.append(
            f"a run would create {self.creates}{stop}: about {self.requests} requests "
            f"({plural(self.uploads, 'upload')}), about {duration(max(1.0, self.seconds))} at {self.rate} and "
            f"{self.concurrency} in flight; {cost}" + (f"; spent {money(c.spend)} so far" if c.spend else "")
        )
        return "\n".join(lines)

    def line(self, where: str) -> str:
        """The one line a run writes before spending: jobs, done, to go, how long and how much, where it writes."""
        c = self.counts
        to_go = c.total - c.succeeded - c.failed
        cost = "" if self.cost is None else f" and {money(self.cost)}"
        stop = f" ({self.creates} this run: {self.limited_by})" if self.limited_by else ""
        return (
            f"plan: {plural(c.total, 'job')}, {c.succeeded} done, {to_go} to go{stop}: "
            f"about {duration(max(1.0, self.seconds))}{cost}; images go to {where}"
        )


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
    max_jobs: int | None = None,
    budget: float | None = None,
    scope: str = "all",
    watch: str = "auto",
    poll_initial: float = 3.0,
    poll_min_interval: float = 0.0,
    typical: tuple[float, float] = TYPICAL_SECONDS,
    page_seconds: float = PAGE_SECONDS,
) -> Plan:
    """What a run would do, and its requests and time by the runner's own models (``estimate.estimate_run``).

    Prediction times are the ledger's when it knows enough of them, else ``typical`` (the model's documented range;
    the simulator's with ``--simulate``); ``page_seconds`` is a listing page's round trip."""
    counts = count_status(manifest, state, out, max_attempts=max_attempts)
    to_submit, retryable_failed, submit_images = _to_submit(manifest, state, out, max_attempts)
    this_run, limited_by, uploads = _this_run(submit_images, state, max_jobs, budget, price, inline_images)
    times = _prediction_times(state.durations, typical)
    estimate = estimate_run(
        jobs=this_run,
        in_flight=counts.in_flight + counts.in_doubt,
        uploads=uploads,
        concurrency=concurrency,
        rate_count=rate_count,
        rate_period=rate_period,
        times=times,
        scope=scope,
        watch=watch,
        poll_initial=poll_initial,
        poll_min_interval=poll_min_interval,
        page_seconds=page_seconds,
    )
    return Plan(
        counts=counts,
        retryable_failed=retryable_failed,
        to_submit=to_submit,
        uploads=uploads,
        requests=estimate.requests,
        seconds=estimate.seconds,
        cost=None if price is None else this_run * price,
        mean_prediction=sum(times) / len(times),
        this_run=this_run,
        limited_by=limited_by,
        concurrency=concurrency,
        rate=f"{rate_count} requests per {rate_period:g}s",
        duplicates=manifest.duplicates,
        collapse=explain_collapse(manifest) if manifest.duplicates else None,
        watch=watch,
        estimate=estimate,
    )


def _to_submit(
    manifest: Manifest, state: LedgerState, out: OutputDir, max_attempts: int
) -> tuple[int, int, list[str | None]]:
    """The jobs a run would submit: how many, how many of them failed before, and each one's image (in order)."""
    retryable_failed = 0
    to_submit = 0
    submit_images: list[str | None] = []
    for job in manifest.jobs:
        st = state.jobs.get(job.fingerprint)
        present = st is not None and out.has_file(st.file)
        if classify(st, file_present=present, max_attempts=max_attempts) != "submit":
            continue
        to_submit += 1
        if st is not None and st.status is JobStatus.FAILED:
            retryable_failed += 1
        submit_images.append(job.image_sha256)
    return to_submit, retryable_failed, submit_images


def _this_run(
    submit_images: list[str | None],
    state: LedgerState,
    max_jobs: int | None,
    budget: float | None,
    price: float | None,
    inline_images: bool,
) -> tuple[int, str | None, int]:
    """How many of the jobs to submit this run would submit, the option that holds it back (None: nothing does),
    and how many distinct local images it would upload (none, with --inline-images)."""
    this_run, limited_by = len(submit_images), None
    if max_jobs is not None and max_jobs < this_run:
        this_run, limited_by = max_jobs, f"--max-jobs {max_jobs}"
    if budget is not None and price is not None and price > 0:
        affordable = max(0, math.floor((budget - state.spend) / price + 1e-9))
        if affordable < this_run:
            this_run, limited_by = affordable, f"--budget {money(budget)}"
    images = {
        sha for sha in submit_images[:this_run] if sha is not None and sha not in state.uploads and not inline_images
    }
    return this_run, limited_by, len(images)


def _prediction_times(durations: Sequence[float], typical: tuple[float, float]) -> Sequence[float]:
    """The ledger's latest 500 prediction times when it knows enough of them, else ``typical`` spread out."""
    known = durations[-500:]
    return known if len(known) >= MIN_SAMPLES else spread_times(*typical)


# --------------------------------------------------------------------------------------------------- collapses
def explain_collapse(manifest: Manifest) -> str | None:
    """Why combinations collapsed, when local images with the same bytes explain it (``img/red-copy.jpg has the
    same bytes as img/red.jpg``). Reads the manifest's YAML again for the names as written, and hashes them."""
    try:
        data = yaml.safe_load(manifest.path.read_text(encoding="utf-8"))
    except (OSError, UnicodeError, yaml.YAMLError):
        return None
    names = _written_images(data)
    base = manifest.path.parent
    by_hash: dict[str, list[str]] = defaultdict(list)
    for name in names:
        if "://" in name or name[:5].lower() == "data:":
            continue
        path = base / name
        try:
            if not path.is_file():
                continue
            digest = sha256_file(path)
        except OSError:
            continue
        if name not in by_hash[digest]:
            by_hash[digest].append(name)
    same = [group for group in by_hash.values() if len(group) > 1]
    return same_bytes_text(same)


def same_bytes_text(groups: list[list[str]]) -> str | None:
    """``b has the same bytes as a``; ``b and c have the same bytes as a``; several groups joined by ``; ``."""
    texts = []
    for first, *others in groups:
        verb = "has" if len(others) == 1 else "have"
        texts.append(f"{' and '.join(others)} {verb} the same bytes as {first}")
    return "; ".join(texts) or None


def _written_images(data: object) -> list[str]:
    names: list[str] = []
    if not isinstance(data, dict):
        return names

    def add(value: object) -> None:
        if isinstance(value, str):
            names.append(value)

    defaults, matrix, jobs = data.get("defaults"), data.get("matrix"), data.get("jobs")
    if isinstance(defaults, dict):
        add(defaults.get("input_image"))
    if isinstance(matrix, dict) and isinstance(matrix.get("input_image"), list):
        for value in matrix["input_image"]:
            add(value)
    if isinstance(jobs, list):
        for job in jobs:
            if isinstance(job, dict):
                add(job.get("input_image"))
    return names


# --------------------------------------------------------------------------------------------------- runs
def run_activity(holder: str | None, last: RunRecord | None, *, now: float) -> str | None:
    """Whether a run is active, or how the last one ended, in a line; None when no run is on record."""
    if holder is not None:
        return f"a run is active ({holder})"
    if last is None:
        return None
    when = "" if last.started_at is None else f", started {duration(now - last.started_at)} ago"
    if last.unfinished:
        pid = "" if last.pid is None else f" (pid {last.pid}{when})"
        return f"the last run ended unfinished{pid or when}: it never wrote its end (killed?); rerun to continue"
    f = last.finished or {}
    ended = "" if last.finished_at is None else f" {duration(now - last.finished_at)} ago"
    reason = f.get("stop_reason")
    if last.incomplete or reason:
        why = f" (stopped: {_REASONS.get(str(reason), str(reason))})" if reason else ""
        return f"the last run ended{ended} with work left{why}"
    return f"the last run finished{ended}"


_REASONS = {
    "interrupted": "Ctrl-C",
    "terminated": "SIGTERM",
    "deadline": "--max-runtime reached",
    "max_jobs": "--max-jobs reached",
    "budget": "--budget reached",
    "payment_required": "out of credit",
    "api_unavailable": "the API kept failing",
}
