"""Watching every prediction in flight with one request: the executions listing as a batch poll.

A client that polls predictions one at a time spends at least two requests a job (a create and a poll), so the window
bounds its batch at ``W * (ceil(2N/R) - 1)``. ``GET /v1/executions`` returns up to 100 of the account's predictions,
with status and output, in one request: one listing sees every prediction of a run in flight at once.

``listing_interval`` chooses the pause between listings from a fluid model of the rest of the batch: a shorter pause
finds finished predictions sooner (slots refill sooner) but spends requests that creates need. ``Watch`` holds the
state of the listing rounds (a round pages until every prediction it looks for has been seen, or the rows are older than
the oldest of them) and of a listing that fails: in ``auto`` mode the run falls back on polling each prediction and
probes the listing again now and then. A row carries no failure envelope (its ``output`` is a URL or null), so a row
that says a prediction failed decides nothing: ``needs_get`` sends it to one GET of the prediction, whose envelope
decides as for a poll. Nothing here makes a request or reads a clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from batchrunner.api.client import Execution, ExecutionsPage, Phase, Prediction

__all__ = [
    "MAX_PARALLEL_PAGES",
    "MAX_ROUND_PAGES",
    "MODES",
    "PAGE",
    "Round",
    "Watch",
    "listing_interval",
    "needs_get",
    "round_pages",
    "round_parallel",
]

MODES = ("auto", "list", "poll")
# Pages one round may read; past that the predictions not yet seen are polled one by one.
MAX_ROUND_PAGES = 20
# Rows a page asks for (the API's maximum), and pages of one round on the wire at once.
PAGE = 100
MAX_PARALLEL_PAGES = 8  # a round over 1000 in flight: 0.46 s mean detection with 4, 0.23-0.30 s with 8
# Candidate pauses between listings, as multiples of the shortest allowed.
_GRID = tuple(1.25**k for k in range(40))
# A pause that finishes the batch within this share of the best is as good, and fewer listings are better.
_TOLERANCE = 0.02


def listing_interval(
    *,
    to_create: int,
    in_flight: int,
    mean_duration: float,
    concurrency: int,
    rate: float,
    shortest: float,
    longest: float,
) -> float:
    """The pause between listings that finishes the rest of the batch soonest (the longest within 2 % of that).

    Fluid model: each job holds a slot for its duration and, on average, half a pause unseen, so the slots need
    ``jobs * (mean + pause / 2) / concurrency``; the window must carry the creates and one listing per pause, so at
    ``rate`` requests a second the rest takes at least ``to_create / (rate - 1 / pause)``. The batch takes the larger.
    """
    shortest = max(shortest, 1e-3)
    longest = max(longest, shortest)
    jobs = to_create + in_flight
    best: list[tuple[float, float]] = []
    for k in _GRID:
        pause = shortest * k
        if pause > longest:
            break
        unseen = mean_duration + pause / 2
        slots = max(unseen, jobs * unseen / max(1, concurrency))
        spare = rate - 1.0 / pause
        requests = 0.0 if to_create == 0 else (to_create / spare if spare > 0 else math.inf)
        best.append((max(slots, requests), pause))
    if not best:
        return shortest
    fastest = min(t for t, _ in best)
    return max(p for t, p in best if t <= fastest * (1 + _TOLERANCE))


def round_parallel(in_flight: int) -> int:
    """Pages of a round on the wire at once: one per ``PAGE`` predictions looked for, ``MAX_PARALLEL_PAGES`` at most."""
    return max(1, min(MAX_PARALLEL_PAGES, math.ceil(in_flight / PAGE)))


def round_pages(rows: int, in_flight: int) -> int:
    """Pages a round reads to see ``in_flight`` predictions when ``rows`` were made since the oldest of them.

    Newest rows come first, so the round reads up to the page of the oldest, and the pages already on the wire when
    that one comes back are read too (``round_parallel - 1``); never more than ``MAX_ROUND_PAGES``.
    """
    needed = max(1, math.ceil(max(rows, in_flight) / PAGE))
    return min(MAX_ROUND_PAGES, needed + round_parallel(in_flight) - 1)


# Row statuses of a failure: the row cannot say whether it is worth another attempt, nor why it failed.
_FAILURE_WORDS = frozenset({"error", "failed"})


def needs_get(row: Prediction) -> bool:
    """Whether a listing row must be confirmed by a GET of its prediction before anything is decided.

    A row has no error envelope (``retryable``, ``error_code``: ``ExecutionSummary.output`` is a string or null), so an
    ``error`` or ``failed`` row, read as it stands, would end a job that deserves another attempt, and never trigger
    the new upload an ``INPUT_DOWNLOAD_ERROR`` calls for. A ``cancelled`` row needs nothing more (a cancel carries no
    envelope), nor does a success (its URL is in the row) or a prediction still running.
    """
    return row.phase is Phase.FAILED and row.status.strip().lower() in _FAILURE_WORDS


@dataclass(slots=True)
class Round:
    """One listing round: the creation times it covers (epoch seconds) and what it has seen so far.

    Its pages go out up to ``parallel`` at a time (offsets are known in advance: a page is ``PAGE`` rows), so a round
    over a thousand predictions in flight takes a few round trips, not ten.
    """

    number: int
    start: float
    end: float
    wanted: frozenset[str]
    parallel: int = 1
    next_offset: int = 0
    issued: int = 0
    outstanding: int = 0
    ended: bool = False  # a page said there is nothing further back
    seen: set[str] = field(default_factory=set)

    def next_page(self) -> int | None:
        """The offset of the next page to send now, or None (the round has all it needs, or enough on the wire)."""
        if self.ended or self.issued >= MAX_ROUND_PAGES or self.outstanding >= self.parallel:
            return None
        if self.wanted <= self.seen:
            return None
        return self.next_offset

    def sent(self) -> None:
        self.next_offset += PAGE
        self.issued += 1
        self.outstanding += 1

    @property
    def done(self) -> bool:
        finished = self.ended or self.wanted <= self.seen or self.issued >= MAX_ROUND_PAGES
        return finished and self.outstanding == 0


@dataclass(slots=True)
class Watch:
    """The listing watcher's state: whether to list, when next, the round in progress, failures.

    ``mode``: ``auto`` lists and falls back on per-prediction polls while the listing fails; ``list`` only lists
    (polling only what the listing does not show); ``poll`` never lists.
    """

    mode: str = "auto"
    probe_every: float = 30.0
    working: bool = True
    next_at: float = 0.0  # loop time of the next round
    round: Round | None = None
    failures: int = 0
    rounds: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"watch mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        self.working = self.mode != "poll"

    @property
    def active(self) -> bool:
        """Whether the listing watches the predictions now (else each is polled)."""
        return self.mode != "poll" and self.working

    def due(self, now: float) -> bool:
        """Whether a new round should start now (a failed listing in ``auto`` mode is probed at ``next_at``)."""
        return self.mode != "poll" and self.round is None and now >= self.next_at

    def begin(self, start: float, end: float, wanted: Iterable[str]) -> Round:
        """Start a round over creation times ``[start, end]``, looking for the ids ``wanted``."""
        ids = frozenset(wanted)
        self.rounds += 1
        self.round = Round(self.rounds, start, end, ids, parallel=round_parallel(len(ids)))
        return self.round

    def on_page(self, number: int, page: ExecutionsPage) -> tuple[list[Execution], bool]:
        """A page of round ``number`` arrived: the rows of predictions it looks for, and whether the round is done.

        A round ends when every wanted id has been seen, at a page that is not full, at rows older than its start
        (newest come first), or after ``MAX_ROUND_PAGES``. A page of an earlier round is ignored.
        """
        current = self.round
        if current is None or current.number != number:
            return [], False
        current.outstanding -= 1
        ours = [row for row in page.rows if row.id in current.wanted and row.id not in current.seen]
        current.seen.update(row.id for row in ours)
        times = [row.created_at for row in page.rows if row.created_at is not None]
        if not page.full or (times and max(times) < current.start):
            current.ended = True
        self.failures = 0
        self.working = self.mode != "poll"
        return ours, current.done

    def finish(self, now: float, pause: float) -> frozenset[str]:
        """End the round; the next is due ``pause`` later. Returns the wanted ids the round did not see."""
        current, self.round = self.round, None
        self.next_at = now + pause
        return frozenset() if current is None else current.wanted - current.seen

    def retry_later(self, now: float, pause: float) -> None:
        """The listing was refused for now (429): the round starts again after ``pause``, the watch stays as it was."""
        self.round = None
        self.next_at = now + pause

    def on_failure(self, now: float, backoff: float) -> None:
        """The listing failed: ``auto`` falls back on polls and probes it again after ``probe_every``; ``list`` tries
        again after ``backoff``."""
        self.round = None
        self.failures += 1
        if self.mode == "auto":
            self.working = False
            self.next_at = now + self.probe_every
        else:
            self.next_at = now + backoff
