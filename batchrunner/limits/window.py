"""The request-window limiter and the in-flight gate, plus parsing of the limit and duration arguments.

Both limiters are plain state machines: they never read a clock or sleep on their own. The scheduler
(one asyncio coroutine) passes ``now`` from ``loop.time()`` and does the sleeping itself, so tests drive
them with a fake clock and never wait in real time (the aiolimiter idea, without the bucket).

``SlidingWindow`` is exact by construction: with grants g0 <= g1 <= ... it keeps
g[i + count] >= g[i] + window, so no half-open interval of length ``window = period + margin`` (hence none
of length ``period``) ever holds more than ``count`` grants. A token bucket of the same nominal rate would
let 2 * count through around its first refill. Requests may also be counted at their answers rather
than at their sends (``take(pending=True)`` then ``settle``): a request on the wire fills a place in every
window until it is answered, and then counts at its answer, an upper bound on when the server stamped it.
That keeps the server's count exact under any network jitter with a margin of milliseconds.
"""

from __future__ import annotations

import asyncio
import math
import re
from bisect import bisect_right, insort
from collections.abc import Awaitable, Callable, Iterable

from batchrunner.errors import UsageError

__all__ = [
    "InFlightGate",
    "SlidingWindow",
    "answer_margin",
    "default_margin",
    "earliest_grant",
    "parse_duration",
    "parse_rate",
    "seed_history",
]


def default_margin(period: float) -> float:
    """Seconds added to the rate window so the server never counts one request too many.

    The server counts requests by when they *arrive*; we can only count when we *send*. If the request
    that opens a window is slow on the wire and the one that would close it is fast, the server sees the
    two closer together than we did, by the difference in latency. The margin must cover that difference
    (and any coarseness of the server's clock): 20 ms covers jitter on a quiet link, 1 % of the period
    covers servers that keep time coarsely over long windows, and the cap of 1 s keeps long windows from
    losing throughput for nothing. For the default 60/60 it is 0.62 s, about 1 % of the throughput.
    """
    return min(0.01 * period + 0.02, 1.0)


def answer_margin(period: float) -> float:
    """The margin when grants are counted at their answers (``SlidingWindow.settle``): clock drift only.

    The answer comes back after the server stamped the request, so latency and its jitter need no margin.
    What is left is the two clocks running at slightly different rates: 0.1 % of the period covers a drift
    of 1,000 ppm (ten times what NTP allows), and 5 ms the event loop's timer resolution. For 60/60 it is
    65 ms, a tenth of ``default_margin``.
    """
    return min(0.001 * period + 0.005, 1.0)


def seed_history(stamps: Iterable[float], *, now: float, wall_now: float, late: float) -> list[float]:
    """A request log's send times (wall clock) as grant times on the loop clock, for ``SlidingWindow(history=...)``.

    Each send counts as answered ``late`` seconds after it (the log has no answer times), but never later than
    ``now``: a time ahead of the clock (a clock stepped back, a corrupt file) then counts as a request made just
    now, so a limiter seeded with these never waits longer than one window, whatever the file holds. A request a
    killed run sent before this run started was stamped by the server before now, so ``now`` still bounds it.
    Times that are not finite numbers are left out.
    """
    offset = now - wall_now + late
    return [min(now, stamp + offset) for stamp in stamps if math.isfinite(stamp)]


def _wait_until(now: float, target: float) -> float:
    """The delay d >= 0 with ``now + d >= target`` in floating point: sleeping d, then taking, is allowed.

    ``target - now`` alone can round so that ``now + (target - now) < target`` by one ulp, which would
    make a scheduler that sleeps exactly ``delay(now)`` on a fake clock trip over ``take``.
    """
    if target <= now:
        return 0.0
    d = target - now
    while now + d < target:
        d = math.nextafter(d, math.inf)
    return d


def earliest_grant(times: list[float], pending: int, latest: float, count: int, window: float) -> float:
    """The earliest time the next grant may happen, whatever ``now`` is: -inf when nothing limits it, +inf while
    ``pending`` grants (on the wire, inside every window) leave no room, so that only an answer can open it.

    ``times`` are the recorded grants, sorted; ``latest`` the latest grant taken (grants go in time order). The
    ``room``-th latest recorded grant must leave the window first: then at most ``room - 1`` recorded grants and
    every pending one are inside it. Shared by ``SlidingWindow`` and the account-wide limiter (``account.py``).
    """
    room = count - pending
    if room <= 0:
        return math.inf
    if len(times) < room:
        return latest
    return max(times[-room] + window, latest)


class SlidingWindow:
    """At most ``count`` grants in any half-open interval of length ``period`` + ``margin``.

    ``history`` holds earlier grant times on the same clock as ``now`` (for example from a killed run's
    request log, through ``seed_history``); they count like grants taken here. Only the latest ``count``
    recorded times are kept: an older one can never decide a delay. Grants are taken in time order, so a
    grant is never allowed before the latest one taken. While no grant is recorded later than ``now``,
    ``delay(now)`` is at most one ``window`` (or inf while only answers can make room).

    A grant taken with ``pending=True`` is a request on the wire: it counts as inside every window until
    ``settle(ticket, at)`` records it at ``at``, the time its answer came back. The server stamped the
    request somewhere between our send and its answer, so counting it at the answer is never early,
    whatever the latency and its jitter; the margin then only has to cover the two clocks' drift, not
    the network (see ``answer_margin``).

    Memory is O(count); ``delay`` is O(1), ``take``, ``settle``, ``used`` and ``remaining`` O(log count)
    (plus an occasional trim).
    """

    def __init__(
        self,
        count: int,
        period: float,
        *,
        margin: float | None = None,
        history: Iterable[float] = (),
    ) -> None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be a positive integer, not {count!r}")
        if not (math.isfinite(period) and period > 0):
            raise ValueError(f"period must be a positive number of seconds, not {period!r}")
        if margin is None:
            margin = default_margin(period)
        if not (math.isfinite(margin) and margin >= 0):
            raise ValueError(f"margin must be a non-negative number of seconds, not {margin!r}")
        self.count = count
        self.period = float(period)
        self.margin = float(margin)
        past = [float(t) for t in history]
        if not all(math.isfinite(t) for t in past):
            raise ValueError("history holds a time that is not a finite number")
        past.sort()
        # Recorded times, sorted, oldest first; answers arrive out of order, so they are inserted in place.
        self._times: list[float] = past[-count:]
        self._latest = past[-1] if past else -math.inf  # the latest grant taken (or recorded)
        self._pending: dict[int, float] = {}  # ticket -> send time, for requests not answered yet
        self._tickets = 0

    @property
    def window(self) -> float:
        """The length of the window we enforce: ``period + margin``."""
        return self.period + self.margin

    @property
    def pending(self) -> int:
        """Grants taken with ``pending=True`` and not settled yet."""
        return len(self._pending)

    def _earliest(self) -> float:
        """The earliest time the next grant may happen, whatever ``now`` is (see ``earliest_grant``)."""
        return earliest_grant(self._times, len(self._pending), self._latest, self.count, self.window)

    def delay(self, now: float) -> float:
        """Seconds until a grant is allowed (0.0 when allowed at ``now``; inf while only answers to pending
        grants can make room). Pure: calling it changes nothing.

        ``take(now + delay(now))`` is always allowed. A real sleep may end a little early (the event loop
        wakes timers up to its clock resolution ahead), so ask again after sleeping rather than assume.
        """
        return _wait_until(now, self._earliest())

    def take(self, now: float, *, pending: bool = False) -> int:
        """Record a grant at ``now``; return its ticket (for ``settle`` when ``pending``).

        Raises RuntimeError when ``delay(now) > 0``: a scheduler bug must fail loudly here, not become a 429.
        """
        wait = self.delay(now)
        if wait > 0:
            raise RuntimeError(
                f"rate window full: grant at {now!r} is {wait:.6f}s early "
                f"({self.count} per {self.period:g}s + {self.margin:g}s margin, {len(self._pending)} unanswered)"
            )
        self._latest = max(self._latest, now)
        ticket = self._tickets
        self._tickets += 1
        if pending:
            self._pending[ticket] = now
        else:
            self._record(now)
        return ticket

    def settle(self, ticket: int, at: float) -> None:
        """Count pending grant ``ticket`` at ``at``, when its answer came (or the request was given up).

        Idempotent: an unknown or already settled ticket changes nothing, so callers may settle in every
        path that ends a request. A time before the send counts as the send.
        """
        sent = self._pending.pop(ticket, None)
        if sent is not None:
            self._record(max(at, sent))

    def _record(self, t: float) -> None:
        times = self._times
        if not times or t >= times[-1]:
            times.append(t)
        else:
            insort(times, t)
        if len(times) > 2 * self.count:
            del times[: len(times) - self.count]

    def used(self, now: float) -> int:
        """Pending grants plus recorded ones in ``(now - period - margin, now]``.

        A grant g is in the window while ``g + window > now``, computed exactly as ``delay`` does, so that
        ``used(now) < count`` holds exactly when ``delay(now) == 0`` (``now - window`` may round otherwise).
        """
        window = self.window
        times = self._times
        start = bisect_right(times, now, key=lambda g: g + window)
        end = bisect_right(times, now)
        return min(self.count, max(0, end - start) + len(self._pending))

    def remaining(self, now: float) -> int:
        """``count - used(now)``: grants the window still has room for at ``now``."""
        return self.count - self.used(now)

    def next_free_times(self, now: float, k: int) -> list[float]:
        """The earliest times at which the next ``k`` grants could happen if each is taken as soon as allowed
        (pending grants stay unanswered; inf for grants only an answer could allow).

        For planning: the scheduler sees how scarce requests are (e.g. whether a poll now would delay the
        next create). Nothing is recorded. Each finite time t has ``delay(t) == 0`` once the ones before are
        taken.
        """
        if k < 0:
            raise ValueError(f"k must not be negative, not {k!r}")
        plan = SlidingWindow(self.count, self.period, margin=self.margin)
        plan._times = list(self._times)
        plan._latest = self._latest
        plan._pending = dict(self._pending)
        out: list[float] = []
        t = now
        for _ in range(k):
            t = max(t, plan._earliest())
            if math.isinf(t):
                out.append(t)
                continue
            plan._record(t)
            plan._latest = t
            out.append(t)
        return out

    async def acquire(
        self,
        loop_time: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> float:
        """Wait (with ``sleep``) until a grant is allowed, take it and return its time.

        A convenience for simple callers; the clock defaults to the running loop's ``time()``. The check
        and the take happen with no await between them, so concurrent callers cannot both take the last
        slot.
        """
        clock = loop_time if loop_time is not None else asyncio.get_running_loop().time
        now = clock()
        while (wait := self.delay(now)) > 0:
            await sleep(wait)
            now = clock()
        self.take(now)
        return now

    def __repr__(self) -> str:
        return (
            f"SlidingWindow(count={self.count}, period={self.period:g}, margin={self.margin:g}, "
            f"recorded={len(self._times)}, pending={len(self._pending)})"
        )


class InFlightGate:
    """Counts predictions created and not yet seen finished; never more than ``limit`` (including those
    a killed run left).

    ``initial`` may exceed ``limit`` (a previous run with a higher limit, or a lowered limit): then no new
    slot opens until enough of them finish. ``max_seen`` is the highest ``in_flight`` ever held, for
    reports and tests.
    """

    def __init__(self, limit: int, initial: int = 0) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive integer, not {limit!r}")
        if isinstance(initial, bool) or not isinstance(initial, int) or initial < 0:
            raise ValueError(f"initial must be a non-negative integer, not {initial!r}")
        self.limit = limit
        self.in_flight = initial
        self.max_seen = initial

    def free(self) -> int:
        """Slots open now: ``max(0, limit - in_flight)``."""
        return max(0, self.limit - self.in_flight)

    def try_acquire(self) -> bool:
        """Take one slot if one is free; return whether it did."""
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        self.max_seen = max(self.max_seen, self.in_flight)
        return True

    def release(self) -> None:
        """Give a slot back when a prediction is seen finished (or its create surely created nothing).

        Raises RuntimeError below zero: releasing twice would let one too many in later.
        """
        if self.in_flight <= 0:
            raise RuntimeError("InFlightGate.release() without a matching acquire")
        self.in_flight -= 1

    def __repr__(self) -> str:
        return f"InFlightGate(limit={self.limit}, in_flight={self.in_flight}, max_seen={self.max_seen})"


# ASCII digits only: Python's \d also takes digits of other scripts, which float() reads.
_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
# Units in falling order, each at most once: "1h30m" and "90s" read one way only; "30m1h" is refused.
_DURATION = re.compile(
    rf"(?:(?P<h>{_NUMBER})\s*h)?\s*(?:(?P<m>{_NUMBER})\s*m)?\s*(?:(?P<s>{_NUMBER})\s*s)?",
    re.IGNORECASE,
)
_BARE_SECONDS = re.compile(_NUMBER)
_RATE = re.compile(r"(?P<count>[^/]*)/(?P<period>.*)")
_MAX_COUNT = 1_000_000
_MAX_SECONDS = 366 * 86400
_DURATION_HINT = "expected e.g. 90s, 14m, 1h30m, 0.5s or a number of seconds"
_RATE_HINT = "expected COUNT/PERIOD such as 60/60, 100/1.5, 60/1m or 600/1h"


def parse_duration(text: str, *, positive: bool = False) -> float:
    """Seconds from ``"90s"``, ``"14m"``, ``"1h"``, ``"1h30m"``, ``"0.5s"`` or ``"45"`` (bare = seconds).

    Raises UsageError, one line naming the text, when it is malformed, negative, not finite, longer than a year
    (no wait of the runner's is, and a typo of a few digits must not become a wait of centuries), or zero when
    ``positive`` asks for a duration above zero.
    """
    s = text.strip()
    if s.startswith("-"):
        raise UsageError(f"invalid duration {text!r}: must not be negative")
    seconds: float
    if _BARE_SECONDS.fullmatch(s):
        seconds = float(s)
    else:
        match = _DURATION.fullmatch(s)
        if not s or match is None or not any(match.group(u) for u in "hms"):
            raise UsageError(f"invalid duration {text!r}: {_DURATION_HINT}")
        h, m, sec = (float(match.group(u) or 0) for u in "hms")
        seconds = h * 3600 + m * 60 + sec
    if not math.isfinite(seconds) or seconds > _MAX_SECONDS:
        raise UsageError(f"invalid duration {text!r}: too large (at most {_MAX_SECONDS // 86400} days)")
    if positive and seconds <= 0:
        raise UsageError(f"invalid duration {text!r}: must be above zero")
    return seconds


def parse_rate(text: str) -> tuple[int, float]:
    """``(count, seconds)`` from ``"60/60"``, ``"100/1.5"``, ``"60/1m"`` or ``"600/1h"``: COUNT per PERIOD.

    The period takes anything ``parse_duration`` does. Raises UsageError, one line naming the text, when it is
    malformed, the count is not a whole number >= 1, or the period is not above zero.
    """
    match = _RATE.fullmatch(text.strip())
    if match is None:
        raise UsageError(f"invalid rate {text!r}: {_RATE_HINT}")
    count_text = match.group("count").strip()
    if not count_text.isascii() or not count_text.isdigit():
        raise UsageError(f"invalid rate {text!r}: count must be a whole number; {_RATE_HINT}")
    count = int(count_text)
    if count < 1:
        raise UsageError(f"invalid rate {text!r}: count must be at least 1")
    if count > _MAX_COUNT:
        # The limiter remembers up to `count` grant times; a bound keeps a typo from costing gigabytes.
        raise UsageError(f"invalid rate {text!r}: count must be at most {_MAX_COUNT}")
    try:
        period = parse_duration(match.group("period"))
    except UsageError:
        raise UsageError(f"invalid rate {text!r}: bad period; {_RATE_HINT}") from None
    if period <= 0:
        raise UsageError(f"invalid rate {text!r}: period must be above zero")
    return count, period
