"""Who may ask the simulated API, and how often: the key check and the sliding request window."""

from __future__ import annotations

import hmac
import math
from collections import deque
from collections.abc import Mapping

__all__ = ["SlidingWindow", "auth_problem"]


def _bearer(headers: Mapping[str, str]) -> str:
    scheme, _, value = headers.get("Authorization", "").strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def auth_problem(headers: Mapping[str, str], expected: str | None, accepted: str = "both") -> str | None:
    """Why a request's key is refused, or None when it passes (any non-empty key passes when none is set).

    ``accepted`` is ``both`` (``Authorization: Bearer`` first, else ``X-API-Key``), ``bearer`` or ``x-api-key``:
    a key in a header the server does not accept is as good as none.
    """
    key = ""
    if accepted in ("both", "bearer"):
        key = _bearer(headers)
    if not key and accepted in ("both", "x-api-key"):
        key = headers.get("X-API-Key", "").strip()
    if not key:
        return "Missing API key"
    if expected is not None and not hmac.compare_digest(key.encode(), expected.encode()):
        return "Invalid API key"
    return None


class SlidingWindow:
    """Arrival times inside ``(now - period, now]``; admits at most ``count`` of them."""

    __slots__ = ("_times", "count", "period")

    def __init__(self, count: int, period: float) -> None:
        self.count = count
        self.period = period
        self._times: deque[float] = deque()

    def _expire(self, now: float) -> None:
        while self._times and self._times[0] <= now - self.period:
            self._times.popleft()

    def record(self, now: float) -> int:
        """Record an arrival unconditionally; returns how many arrivals the window now holds."""
        self._expire(now)
        self._times.append(now)
        return len(self._times)

    def admit(self, now: float) -> int | None:
        """Record and admit an arrival, or return Retry-After seconds (at least 1) without recording it."""
        self._expire(now)
        if len(self._times) >= self.count:
            return max(1, math.ceil(self._times[0] + self.period - now))
        self._times.append(now)
        return None
