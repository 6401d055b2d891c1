"""What a run will cost in requests and take in time, before it starts: the runner's own models, run forward.

``plan`` and the run's first line ask :func:`estimate_run`. It uses the models the runner itself decides with, so the
plan says what the run will do: with the listing watcher (``--watch auto`` and ``list``) the pause between rounds is
``watch.listing_interval``'s and a round reads ``watch.round_pages`` pages of 100 rows; with ``--watch poll`` the polls
per job and the wait to be seen are ``policy.plan_polls``'s, and spare requests go to early polls while every slot is
busy, as the pacer lets them.

The run is drawn in two phases. Until the last create, slots turn over at ``concurrency / (mean + unseen)`` jobs a
second, or the window carries ``rate - listings a second`` creates a second after the burst the slots can use at the
start, whichever is slower. After it, the batch waits for the slowest of the predictions still running: the expected
longest of ``min(jobs, concurrency)`` prediction times, plus the wait to be seen. Nothing here reads a clock or a file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from batchrunner.engine.policy import MIN_SAMPLES, plan_polls
from batchrunner.engine.watch import listing_interval, round_pages, round_parallel

__all__ = ["PAGE_SECONDS", "TYPICAL_SECONDS", "Estimate", "estimate_run", "expected_longest", "spread_times"]

# The documented typical latency of flux-kontext-max: 8-15 s an image. Used until the ledger knows better.
TYPICAL_SECONDS = (8.0, 15.0)
# One listing page's round trip, assumed (a page is 100 rows with their outputs); pages of a round go 8 at a time.
PAGE_SECONDS = 0.5


@dataclass(frozen=True, slots=True)
class Estimate:
    """Requests to the API host and seconds, for one run; how it watches, for the curious."""

    requests: int
    seconds: float
    pause: float = 0.0  # seconds between listing rounds while jobs remain (0 with --watch poll)
    pages: int = 0  # pages a listing round reads while jobs remain
    polls_per_job: float = 0.0  # per-prediction polls a job gets (0 while the listing watches)


def spread_times(lo: float, hi: float, n: int = 21) -> tuple[float, ...]:
    """``n`` prediction times evenly from ``lo`` to ``hi``: a model's typical range, as samples."""
    lo, hi = max(0.0, min(lo, hi)), max(0.0, lo, hi)
    if n <= 1 or hi == lo:
        return (hi,) * max(1, n)
    return tuple(lo + (hi - lo) * k / (n - 1) for k in range(n))


def expected_longest(samples: Sequence[float], k: int) -> float:
    """The expected longest of ``k`` prediction times drawn from ``samples`` (sorted): what a batch's end waits for."""
    n = len(samples)
    if n == 0 or k <= 0:
        return 0.0
    return sum(x * (((i + 1) / n) ** k - (i / n) ** k) for i, x in enumerate(samples))


def estimate_run(
    *,
    jobs: int,
    concurrency: int,
    rate_count: int,
    rate_period: float,
    times: Sequence[float],
    in_flight: int = 0,
    uploads: int = 0,
    scope: str = "all",
    watch: str = "auto",
    poll_initial: float = 3.0,
    poll_min_interval: float = 0.0,
    page_seconds: float = PAGE_SECONDS,
) -> Estimate:
    """Requests and seconds for a run that creates ``jobs`` predictions (after ``uploads`` presigns) and watches
    ``in_flight`` more an earlier run left, at the limits given, with prediction times like ``times`` (seconds:
    the ledger's, else :func:`spread_times` of the model's typical range). Every job is assumed to succeed."""
    samples = sorted(t for t in times if t >= 0 and math.isfinite(t)) or list(spread_times(*TYPICAL_SECONDS))
    if len(samples) < MIN_SAMPLES:
        samples = sorted(samples * MIN_SAMPLES)
    jobs, in_flight, uploads = max(0, jobs), max(0, in_flight), max(0, uploads)
    if jobs + in_flight == 0:
        return Estimate(requests=uploads, seconds=0.0)
    model = _Model(
        jobs=jobs,
        in_flight=in_flight,
        uploads=uploads,
        slots=max(1, concurrency),
        count=max(1, rate_count),
        period=max(rate_period, 1e-9),
        counted=scope == "all",
        samples=samples,
        page_seconds=max(0.0, page_seconds),
    )
    if watch == "poll":
        return model.polled(poll_initial, poll_min_interval)
    return model.listed(poll_min_interval)


@dataclass(frozen=True, slots=True)
class _Model:
    jobs: int
    in_flight: int
    uploads: int
    slots: int
    count: int
    period: float
    counted: bool  # whether polls and listings count in the window (--rate-limit-scope all)
    samples: list[float]
    page_seconds: float

    @property
    def rate(self) -> float:
        return self.count / self.period

    @property
    def mean(self) -> float:
        return sum(self.samples) / len(self.samples)

    @property
    def late(self) -> float:
        """The age of the oldest prediction in flight, about: a high quantile of the times."""
        return self.samples[min(len(self.samples) - 1, int(0.95 * len(self.samples)))]

    @property
    def first(self) -> int:
        """Predictions running at once at the start (and still running at the last create)."""
        return min(self.jobs + self.in_flight, self.slots)

    def _until_last_create(self, unseen: float, other_rate: float, per_create: float = 1.0) -> float:
        """Seconds from the start to the last create: the slots' turnover or the window's, whichever is slower.

        ``unseen``: seconds a finished prediction holds its slot before it is seen; ``other_rate``: requests a second
        that are not creates (listings); ``per_create``: requests each create brings (itself and its polls)."""
        waiting = max(0, self.jobs + self.in_flight - self.slots)
        by_slots = waiting * (self.mean + unseen) / self.slots
        if not self.counted:
            spare, other_rate = self.rate, 0.0  # only creates (and presigns) count
        else:
            spare = self.rate - other_rate
        creates = self.jobs * (per_create if self.counted else 1.0) + self.uploads
        # The window's burst: the first creates go at once, as many as there are slots (and presigns) for.
        burst = min(self.count, self.slots + self.uploads)
        if creates + other_rate * by_slots <= self.count:
            by_rate = 0.0  # the whole phase fits in one window: the rate never binds
        elif spare <= 0:
            by_rate = math.inf
        else:
            by_rate = max(0.0, creates - burst) / spare
        longest = max(by_slots, by_rate)
        # However they spread, the window admits request k + R no sooner than W after request k.
        counted = creates + other_rate * longest
        by_window = self.period * max(0, math.ceil(counted / self.count) - 1)
        return max(longest, by_window)

    def listed(self, min_interval: float) -> Estimate:
        """The listing watcher: rounds every ``listing_interval`` seconds, each of ``round_pages`` pages."""
        rate = self.rate if self.counted else 1e9
        shortest = max(min_interval, 1.0 / rate, 0.01)
        longest = max(4 * self.mean, 1.0)
        pause = listing_interval(
            to_create=self.jobs,
            in_flight=self.first,
            mean_duration=self.mean,
            concurrency=self.slots,
            rate=rate,
            shortest=shortest,
            longest=longest,
        )
        drain_pause = listing_interval(
            to_create=0,
            in_flight=self.first,
            mean_duration=self.mean,
            concurrency=self.slots,
            rate=rate,
            shortest=shortest,
            longest=longest,
        )
        # Rows a round pages through: every prediction made since the oldest one in flight. Two passes: the rows
        # depend on the throughput, which depends on how long rounds take.
        throughput = self.slots / (self.mean + pause / 2)
        for _ in range(2):
            rows = round(throughput * (self.late + pause))
            pages = round_pages(max(rows, self.first), self.first)
            spell = self._round_seconds(pages, self.first)
            main = self._until_last_create(pause / 2 + spell, pages / (pause + spell))
            throughput = self.jobs / main if main > 0 else throughput
        drain_pages = round_pages(max(self.first // 2, rows // 2), max(1, self.first // 2))
        drain_spell = self._round_seconds(drain_pages, max(1, self.first // 2))
        drain = expected_longest(self.samples, self.first) + drain_pause / 2 + drain_spell
        listings = main / (pause + spell) * pages + (drain / (drain_pause + drain_spell) + 1) * drain_pages
        return Estimate(
            requests=round(self.jobs + self.uploads + listings),
            seconds=main + drain,
            pause=pause,
            pages=pages,
        )

    def _round_seconds(self, pages: int, in_flight: int) -> float:
        parallel = round_parallel(in_flight)
        return math.ceil(pages / parallel) * self.page_seconds

    def polled(self, poll_initial: float, min_interval: float) -> Estimate:
        """Each prediction polled: the poll plan's polls and wait, and early polls with the requests creates leave."""
        rate = self.rate if self.counted else 1e9
        plan = plan_polls(
            self.samples, rate=rate, concurrency=self.slots, prior_initial=poll_initial, min_interval=min_interval
        )
        polls = plan.expected_polls if plan.expected_polls is not None else 2.0
        unseen = plan.expected_delay if plan.expected_delay is not None else poll_initial / 2
        # The pacer's rate: the window's, or (only creates counting) what the least interval allows for every slot.
        pace = self.rate if self.counted else self.slots / max(min_interval, 0.05)
        planned = self.jobs * (1 + polls) + self.in_flight * polls + self.uploads
        main = self._until_last_create(unseen, 0.0, 1 + polls)
        spare = pace - planned / main if main > 0 else 0.0
        extra = 0.0
        if spare > 0 and main > 0:
            # Every slot busy and requests to spare: they go to the predictions likely done, so a finished one
            # waits about half the time the spare polls take to go round the slots.
            unseen = min(unseen, self.slots / (2 * spare))
            main = self._until_last_create(unseen, 0.0, 1 + polls)
            extra = max(0.0, pace * main - planned)
        drain_unseen = min(unseen, self.first / (2 * (self.rate if self.counted else pace)))
        drain = expected_longest(self.samples, self.first) + drain_unseen
        # After the last create nothing needs the window: the predictions likely done are polled as it allows.
        extra += pace * drain
        return Estimate(
            requests=round(planned + extra),
            seconds=main + drain,
            polls_per_job=(planned + extra - self.jobs - self.uploads) / max(1, self.jobs + self.in_flight),
        )
