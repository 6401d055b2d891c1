"""Who may ask the simulated API, and how often: the key check and the sliding request window."""

from __future__ import annotations

import hmac
import math
from collections import deque
from collections.abc import Mapping

__all__ = ["SlidingWindow", "auth_problem"]


def auth_problem(headers: Mapping[str, str], expected: str | None) -> str | None:
    """Why a request's key is refused, or None when it passes (any non-empty key passes when none is set)."""
    key = headers.get("X-API-Key", "").strip()
    if not key:
        scheme, _, value = headers.get("Authorization", "").partition(" ")
        key = value.strip() if scheme.lower() == "bearer" else ""
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
