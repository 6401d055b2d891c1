"""Creates in doubt, and how the account's executions listing tells whether they made a prediction.

The create call is not idempotent and has no idempotency key: a create that ended in a 5xx, a gateway page, a timeout,
a reset after sending or a 2xx without a readable id may have made a billed prediction. Creating it again would pay
twice. So such a create is *in doubt* (``create_in_doubt``), and before anything is paid again the runner lists the
account's executions of the model around the send (``listing_span``), gets each prediction of that span the ledger does
not already know (``candidates``; the rows carry no input), and compares its input with the request it sent
(``inputs_match``). A match is adopted; no match after ``LOOKS`` looks over some seconds (``look_at``; a new
prediction can take a moment to appear) means nothing was created, and the job is submitted again with no duplicate.

``Reconciler`` holds the doubts of a run and the sweep in progress; it makes no request and reads no clock. The
scheduler asks it what to request next (a page of the listing, or a candidate's GET), when, and hands back what the API
answered. One sweep serves every doubt of its time span.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from batchrunner.api.client import Execution, ExecutionsPage
from batchrunner.errors import ApiError, CreatePathRefused, CreatePathUnusable, NetworkError

__all__ = [
    "LOOKS",
    "MAX_PAGES",
    "PAGE_SIZE",
    "TRIES",
    "Doubt",
    "Reconciler",
    "Sweep",
    "candidates",
    "create_in_doubt",
    "inputs_match",
    "listing_span",
    "look_at",
]

# Looks at the listing before a doubt is taken to have created nothing.
LOOKS = 3
# Sweeps that fail (the listing, or a candidate's GET) before a doubt is given up as unsettled, with a backoff between
# them (0.5, 1, 2, 4, 8 s): a flaky listing (one answer in eight lost) then gives a doubt up once in a few hundred
# thousand, not once in five hundred. Only the first doubt after the listing breaks for good pays the whole series: the
# scheduler then gives the next ones one try each until the listing answers again.
TRIES = 6
# Rows a listing page asks for (the API's maximum).
PAGE_SIZE = 100
# Pages one sweep may read; a span holding more than this many of the account's predictions is too busy to search,
# and the doubts fall back to being counted as possibly duplicated.
MAX_PAGES = 20


def create_in_doubt(exc: ApiError) -> bool:
    """Whether a failed create may all the same have made a prediction.

    Not created: a 4xx answer (429 included: a refused create creates nothing and is never billed), or a connection
    that surely never carried the request (refused, name not resolved, connect timeout). Everything else is in doubt:
    a 5xx, an HTML gateway page, a timeout, a reset after sending, a 2xx (or 3xx) without a readable id. A redirect
    from one form of the create path to the other is a refusal too (the client judged it: CreatePathRefused).
    """
    if isinstance(exc, CreatePathRefused | CreatePathUnusable):
        return False
    if isinstance(exc, NetworkError) and not exc.sent:
        return False
    return not (exc.status is not None and 400 <= exc.status < 500)


def look_at(answered_at: float, looks: int, wait: float) -> float:
    """When look number ``looks`` (0-based) at the listing is due: ``wait`` x 0.5, 1.5, 3.5 ... after the answer."""
    return answered_at + wait * (2.0**looks - 0.5)


def listing_span(doubts: Iterable[Doubt], skew: float) -> tuple[float, float]:
    """The creation times (epoch seconds) to list: from the earliest send to the latest answer, ``skew`` either side."""
    spans = [(d.sent_at, d.answered_at) for d in doubts]
    if not spans:
        raise ValueError("no doubts to span")
    return min(s for s, _ in spans) - skew, max(a for _, a in spans) + skew


def candidates(
    rows: Iterable[Execution],
    *,
    model: str,
    start: float,
    end: float,
    known: Iterable[str] | set[str] | frozenset[str],
) -> list[str]:
    """The ids of listed predictions that may be a doubt's: of ``model``, created in the span, not known already.

    A row whose time cannot be read is kept (a GET settles it); a row of another model is not.
    """
    known_ids = known if isinstance(known, set | frozenset) else set(known)
    found: list[str] = []
    for row in rows:
        if row.id in known_ids or (row.model is not None and row.model != model):
            continue
        if row.created_at is not None and not start <= row.created_at <= end:
            continue
        found.append(row.id)
    return list(dict.fromkeys(found))


def _same(sent: Any, held: Any) -> bool:
    if sent == held and type(sent) is type(held):
        return True
    if isinstance(sent, bool) or isinstance(held, bool):
        return sent is held
    if isinstance(sent, int | float) and isinstance(held, int | float):
        return math.isclose(float(sent), float(held), rel_tol=0.0, abs_tol=1e-9)
    if isinstance(sent, int | float | str) and isinstance(held, int | float | str):
        # The API may hold a number as text ("6") or the reverse: the same value either way.
        return str(sent).strip() == str(held).strip()
    if isinstance(sent, Mapping) and isinstance(held, Mapping):
        return inputs_match(sent, held)
    if isinstance(sent, list | tuple) and isinstance(held, list | tuple):
        return len(sent) == len(held) and all(_same(a, b) for a, b in zip(sent, held, strict=True))
    return False


def inputs_match(sent: Mapping[str, Any], held: Mapping[str, Any] | None) -> bool:
    """Whether a prediction's input (``held``, as the API returns it) is the request ``sent``.

    Every field sent must be there with the same value (numbers and their text alike); fields the API added of its
    own (defaults) do not matter.
    """
    if held is None:
        return False
    return all(key in held and _same(value, held[key]) for key, value in sent.items())


@dataclass(slots=True)
class Doubt:
    """A create that may have made a prediction. Times: ``sent_at``/``answered_at`` epoch, ``due`` loop time."""

    fingerprint: str
    job_id: str
    request: Mapping[str, Any]  # the input sent (or what of it is known: see Scheduler)
    sent_at: float
    answered_at: float
    base: float  # loop time of the answer, from which the looks are timed
    looks: int = 0
    failures: int = 0  # sweeps for it that could not be completed

    def due(self, wait: float) -> float:
        """Loop time of this doubt's next look at the listing."""
        return look_at(self.base, self.looks, wait)


@dataclass(slots=True)
class Sweep:
    """One pass over the listing for a set of doubts: the pages to read, then the candidates to get."""

    doubts: list[str]  # fingerprints
    start: float
    end: float
    offset: int = 0
    pages: int = 0
    listing_done: bool = False
    queue: deque[str] = field(default_factory=deque)
    busy: int = 0  # requests of this sweep on the wire
    uncertain: bool = False  # a candidate's GET failed: this look cannot say "nothing was made"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a finished sweep (or a candidate's GET) decided."""

    adopted: tuple[tuple[Doubt, str], ...] = ()  # (doubt, prediction id)
    not_created: tuple[Doubt, ...] = ()
    unresolved: tuple[Doubt, ...] = ()  # the listing failed: fall back (possibly duplicated)


class Reconciler:
    """The doubts of one run and the sweep that settles them; pure state, no I/O, no clock of its own."""

    def __init__(
        self, *, model: str, known: set[str], wait: float, skew: float, looks: int = LOOKS, tries: int = TRIES
    ) -> None:
        self.model = model
        self.known = known  # every prediction id the ledger (and this run) knows: never adopted twice
        self.wait = wait
        self.skew = skew
        self.looks = looks
        self.tries = tries
        self.doubts: dict[str, Doubt] = {}
        self.sweep: Sweep | None = None
        # Candidates already got this run, with the input they hold (None: unknown to the API), matching nothing then.
        # A doubt that arises later (its create answered after the prediction was listed) is matched against these
        # without a new request: skipping them would leave that doubt's prediction unseen, and paid again.
        self.inspected: dict[str, Mapping[str, Any] | None] = {}

    def __len__(self) -> int:
        return len(self.doubts)

    def add(self, doubt: Doubt) -> None:
        self.doubts[doubt.fingerprint] = doubt

    def next_due(self) -> float | None:
        """When a sweep is next needed (loop time); None while one runs or there is nothing in doubt."""
        if self.sweep is not None or not self.doubts:
            return None
        return min(d.due(self.wait) for d in self.doubts.values())

    def start(self, now: float) -> Sweep:
        """Begin a sweep for every doubt due by ``now`` (loop time); a prediction it finds may settle any doubt."""
        if self.sweep is not None:
            raise RuntimeError("a sweep is already running")
        doubts = [d for d in self.doubts.values() if d.due(self.wait) <= now]
        if not doubts:
            raise RuntimeError("no doubt is due")
        start, end = listing_span(doubts, self.skew)
        self.sweep = Sweep([d.fingerprint for d in doubts], start, end)
        return self.sweep

    def next_request(self) -> tuple[str, Any] | None:
        """``("list", offset)`` or ``("inspect", prediction_id)`` for the sweep, or None (nothing to send now).

        Only a look: ``begin`` says the request goes out.
        """
        sweep = self.sweep
        if sweep is None:
            return None
        if sweep.queue:
            return ("inspect", sweep.queue[0])
        if not sweep.listing_done and sweep.busy == 0:
            return ("list", sweep.offset)
        return None

    def begin(self, request: tuple[str, Any]) -> None:
        """The request ``next_request`` gave is on its way."""
        sweep = self.sweep
        if sweep is None:
            raise RuntimeError("no sweep is running")
        if request[0] == "inspect" and sweep.queue and sweep.queue[0] == request[1]:
            sweep.queue.popleft()
        sweep.busy += 1

    def retry_listing(self) -> None:
        """The listing page was refused for now (429): the same page is asked for again later."""
        self._answered()

    def on_page(self, page: ExecutionsPage) -> Outcome | None:
        """A page of the listing arrived: queue its new candidates (those got before are matched again here), and the
        next page when there may be one."""
        sweep = self._answered()
        sweep.pages += 1
        adopted: list[tuple[Doubt, str]] = []
        for found in candidates(page.rows, model=self.model, start=sweep.start, end=sweep.end, known=self.known):
            if found in self.inspected:
                adopted.extend(self._match(sweep, found, self.inspected[found]))
            elif found not in sweep.queue:
                sweep.queue.append(found)
        older = [r.created_at for r in page.rows if r.created_at is not None]
        past_span = bool(older) and max(older) < sweep.start  # newest first: the rest is older still
        if not page.full or past_span:
            sweep.listing_done = True
        elif sweep.pages >= MAX_PAGES:
            # Too busy a span to search: no later look would do better.
            self.sweep = None
            gone = tuple(self.doubts.pop(fp) for fp in sweep.doubts if fp in self.doubts)
            return Outcome(adopted=tuple(adopted), unresolved=gone)
        else:
            sweep.offset += len(page.rows)
        return self._with(tuple(adopted), self._maybe_finish())

    def on_prediction(self, prediction_id: str, input: Mapping[str, Any] | None) -> Outcome | None:
        """A candidate's GET arrived: adopt it for the doubt whose request it is, if any."""
        sweep = self._answered()
        adopted = self._match(sweep, prediction_id, input)
        if not adopted:
            self.inspected[prediction_id] = input
        return self._with(adopted, self._maybe_finish())

    def _match(
        self, sweep: Sweep, prediction_id: str, input: Mapping[str, Any] | None
    ) -> tuple[tuple[Doubt, str], ...]:
        if prediction_id in self.known:
            return ()
        # The sweep's own doubts first (oldest first), then any other doubt the prediction may belong to.
        order = [*sweep.doubts, *(fp for fp in self.doubts if fp not in sweep.doubts)]
        for fp in order:
            doubt = self.doubts.get(fp)
            if doubt is not None and inputs_match(doubt.request, input):
                del self.doubts[fp]
                self.known.add(prediction_id)
                self.inspected.pop(prediction_id, None)
                return ((doubt, prediction_id),)
        return ()

    @staticmethod
    def _with(adopted: tuple[tuple[Doubt, str], ...], finished: Outcome | None) -> Outcome | None:
        if finished is None:
            return Outcome(adopted=adopted) if adopted else None
        return Outcome(
            adopted=adopted + finished.adopted, not_created=finished.not_created, unresolved=finished.unresolved
        )

    def on_inspect_failed(self, prediction_id: str) -> Outcome | None:
        """A candidate's GET failed: it is looked at again on the next look (not marked inspected), and this look
        cannot count as one that found nothing."""
        sweep = self._answered()
        sweep.uncertain = True
        return self._maybe_finish()

    def on_failure(self) -> Outcome:
        """The listing failed: the sweep ends; its doubts are tried again, and after ``tries`` failed sweeps handed
        back unsettled (to be counted as possibly paid twice). The caller waits a backoff before the next sweep."""
        sweep = self.sweep
        self.sweep = None
        if sweep is None:
            return Outcome()
        return Outcome(unresolved=self._failed(sweep))

    def _failed(self, sweep: Sweep) -> tuple[Doubt, ...]:
        gone: list[Doubt] = []
        for fp in sweep.doubts:
            doubt = self.doubts.get(fp)
            if doubt is None:
                continue
            doubt.failures += 1
            if doubt.failures >= self.tries:
                gone.append(self.doubts.pop(fp))
        return tuple(gone)

    def drop(self, fingerprint: str) -> Doubt | None:
        return self.doubts.pop(fingerprint, None)

    def _answered(self) -> Sweep:
        if self.sweep is None:
            raise RuntimeError("no sweep is running")
        self.sweep.busy = max(0, self.sweep.busy - 1)
        return self.sweep

    def _maybe_finish(self) -> Outcome | None:
        sweep = self.sweep
        if sweep is None or not sweep.listing_done or sweep.queue or sweep.busy:
            return None
        self.sweep = None
        if sweep.uncertain:
            return Outcome(unresolved=self._failed(sweep))
        gone: list[Doubt] = []
        for fp in sweep.doubts:
            doubt = self.doubts.get(fp)
            if doubt is None:
                continue
            doubt.looks += 1
            if doubt.looks >= self.looks:
                gone.append(self.doubts.pop(fp))
        return Outcome(not_created=tuple(gone))
