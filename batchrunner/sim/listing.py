"""``GET /v1/executions``: the organisation's predictions, filtered, newest first, a page at a time.

Pure: the query is parsed into a :class:`ListingQuery` (or the reason it is refused), and a page is a function
of the predictions, the clock reading and the clock-to-wall-time mapping passed in.

Query: ``limit`` (1..100, default 50), ``offset`` (>= 0, default 0), ``model`` and ``status`` and
``error_classification`` (each a comma-separated list; a row matches any of the values), ``from`` and ``to``
(RFC 3339 with ``Z`` or a numeric offset, fractional seconds allowed; both bounds inclusive, on ``created_at``).
Answer: ``{"executions": [row, ...], "total_count": N}``, rows newest first by ``created_at``, ``total_count``
the number of matching rows capped at :data:`TOTAL_COUNT_CAP` (a client pages until a short page). A row's
``output`` is the primary output URL of a success, else null: no failure envelope, as documented.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Reversible
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Final

from batchrunner.sim.state import Prediction

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "STATUS_WORDS",
    "TOTAL_COUNT_CAP",
    "ListingQuery",
    "execution_row",
    "format_time",
    "list_executions",
    "parse_query",
    "parse_rfc3339",
]

DEFAULT_LIMIT: Final = 50
MAX_LIMIT: Final = 100
TOTAL_COUNT_CAP: Final = 1000
STATUS_WORDS: Final = frozenset({"created", "starting", "processing", "success", "error", "failed", "cancelled"})
_RFC3339: Final = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(?:([Zz])|([+-])(\d{2}):(\d{2}))"
)

WallClock = Callable[[float], datetime]


@dataclass(frozen=True, slots=True)
class ListingQuery:
    """A parsed listing query; None for a filter means no filter."""

    limit: int = DEFAULT_LIMIT
    offset: int = 0
    models: frozenset[str] | None = None
    statuses: frozenset[str] | None = None
    since: datetime | None = None
    until: datetime | None = None
    classifications: frozenset[str] | None = None


def parse_rfc3339(text: str) -> datetime | None:
    """An aware datetime from an RFC 3339 timestamp (``Z`` or ``+hh:mm``, any fraction digits), or None."""
    match = _RFC3339.fullmatch(text.strip())
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
    offset = timedelta(0)
    if not zulu:
        offset = timedelta(hours=int(off_h), minutes=int(off_m)) * (-1 if sign == "-" else 1)
        if abs(offset) >= timedelta(hours=24):
            return None
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    try:
        return datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), micro, timezone(offset))
    except ValueError:  # 2026-02-30, 25:00, a leap second
        return None


def format_time(moment: datetime) -> str:
    """RFC 3339 in UTC with microseconds and ``Z``: the form every simulator timestamp takes."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _count(query: Mapping[str, str], name: str, default: int, low: int, high: int | None) -> int | str:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        value = low - 1
    if value < low or (high is not None and value > high):
        span = f"from {low} to {high}" if high is not None else f"of at least {low}"
        return f"{name} must be an integer {span}"
    return value


def _words(query: Mapping[str, str], name: str) -> frozenset[str] | None:
    raw = query.get(name)
    if raw is None:
        return None
    words = frozenset(w.strip() for w in raw.split(",") if w.strip())
    return words or None


def parse_query(query: Mapping[str, str]) -> ListingQuery | str:
    """The listing query, or why it is refused (the 400's ``error``)."""
    limit = _count(query, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    if isinstance(limit, str):
        return limit
    offset = _count(query, "offset", 0, 0, None)
    if isinstance(offset, str):
        return offset
    statuses = _words(query, "status")
    if statuses is not None and not statuses <= STATUS_WORDS:
        unknown = ", ".join(sorted(statuses - STATUS_WORDS))
        return f"status {unknown!r} is not one of {', '.join(sorted(STATUS_WORDS))}"
    bounds: dict[str, datetime | None] = {}
    for name in ("from", "to"):
        raw = query.get(name)
        bounds[name] = None if raw is None else parse_rfc3339(raw)
        if raw is not None and bounds[name] is None:
            return f"{name} must be an RFC 3339 timestamp such as 2026-01-31T12:00:00Z"
    classifications = _words(query, "error_classification")
    return ListingQuery(
        limit=limit,
        offset=offset,
        models=_words(query, "model"),
        statuses=statuses,
        since=bounds["from"],
        until=bounds["to"],
        classifications=frozenset(c.upper() for c in classifications) if classifications else None,
    )


def _matches(prediction: Prediction, query: ListingQuery, now: float, wall: WallClock, *, exact: bool) -> bool:
    """Whether the row is listed; ``exact``: its time is near a bound, and its shown timestamp decides."""
    if query.models is not None and prediction.model not in query.models:
        return False
    if query.statuses is not None and prediction.status(now) not in query.statuses:
        return False
    if exact:
        created = wall(prediction.created_at)
        if (query.since is not None and created < query.since) or (query.until is not None and created > query.until):
            return False
    if query.classifications is not None:
        category = prediction.category(now)
        return category is not None and category.upper() in query.classifications
    return True


# Bounds are compared as clock readings first; within this of a bound the row's own timestamp (microseconds, as
# shown) decides, so a client that sends back a ``created_at`` it read finds that row inside its range.
_NEAR: Final = 5e-6


def _bound(moment: datetime | None, epoch: float, default: float) -> float:
    return default if moment is None else moment.timestamp() - epoch


def _stamp(moment: float | None, wall: WallClock) -> str | None:
    return None if moment is None else format_time(wall(moment))


def execution_row(
    prediction: Prediction, now: float, base_url: str, wall: WallClock, *, envelopes: bool = False
) -> dict[str, Any]:
    """One row of the listing: no ``input``; ``output`` the primary output URL of a success, else null.

    As documented, a row carries no failure envelope (no ``retryable``, no ``error_code``): a client must GET the
    prediction to decide on a failure. ``envelopes`` shows ``output`` as a GET does (an undocumented variant).
    """
    run_time, cost = prediction.metrics(now)
    started = prediction.started_at
    stopped = prediction.stopped_at
    began = None if now < started or (stopped is not None and stopped < started) else started
    return {
        "id": prediction.id,
        "model": prediction.model,
        "requested_model": prediction.model,
        "status": prediction.status(now),
        "execution_cost": cost,
        "run_time": run_time,
        "created_at": format_time(wall(prediction.created_at)),
        "started_at": _stamp(began, wall),
        "completed_at": _stamp(prediction.completed_at(now), wall),
        "output": prediction.output(now, base_url) if envelopes else prediction.primary_output(now, base_url),
    }


def list_executions(
    predictions: Reversible[Prediction],
    query: ListingQuery,
    *,
    now: float,
    base_url: str,
    wall: WallClock,
    lag: float = 0.0,
    cap: int = TOTAL_COUNT_CAP,
    envelopes: bool = False,
) -> dict[str, Any]:
    """The listing's answer: the page of matching rows, newest first, and the capped count of all matches.

    ``predictions`` come in creation order (``created_at`` never decreasing, ties in ``seq`` order), as the
    simulator makes them, so the newest are read first and reading stops once the page and the capped count are
    known, or the rows are older than ``from``: a page costs what it shows, not what the account ever made. ``wall``
    maps a clock reading to its moment as ``epoch + t``. A prediction shows up only ``lag`` seconds after its creation
    (the listing reads a lagging index); ``envelopes`` as for :func:`execution_row`.
    """
    epoch = wall(0.0).timestamp()
    since = _bound(query.since, epoch, -math.inf)
    until = _bound(query.until, epoch, math.inf)
    wanted = max(cap, query.offset + query.limit)
    visible = now - lag
    page: list[Prediction] = []
    count = 0
    for p in reversed(predictions):
        created = p.created_at
        if created > visible or created > until + _NEAR:
            continue
        if created < since - _NEAR:
            break  # every older one is before ``from`` too
        exact = abs(created - since) <= _NEAR or abs(created - until) <= _NEAR
        if not _matches(p, query, now, wall, exact=exact):
            continue
        if query.offset <= count < query.offset + query.limit:
            page.append(p)
        count += 1
        if count >= wanted:
            break
    return {
        "executions": [execution_row(p, now, base_url, wall, envelopes=envelopes) for p in page],
        "total_count": min(count, cap),
    }
