"""Who may ask the simulated API, and how often: the key check, the sliding request window, and the check
of a presigned upload's PUT against what its presign promised.
"""

from __future__ import annotations

import hmac
import math
from collections import deque
from collections.abc import Mapping
from typing import Any, Final
from xml.sax.saxutils import escape

__all__ = [
    "DEFAULT_RETENTION",
    "MAX_RETENTION",
    "MIN_RETENTION",
    "UPLOAD_URL_LIFETIME",
    "SlidingWindow",
    "auth_problem",
    "retention_seconds",
    "s3_error",
    "upload_refusal",
]

DAY: Final = 86400
DEFAULT_RETENTION: Final = 180 * DAY
MIN_RETENTION: Final = 60
MAX_RETENTION: Final = 365 * DAY
UPLOAD_URL_LIFETIME: Final = 15 * 60  # the presigned PUT URL itself; not returned by presign


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


def retention_seconds(value: Any) -> int | None:
    """A presign's ``expires_in_seconds`` (absent: the default) clamped to the documented range; None if not a
    number. The docs clamp rather than refuse, so 10 becomes 60 and ten years become 365 days."""
    if value is None:
        return DEFAULT_RETENTION
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return int(min(MAX_RETENTION, max(MIN_RETENTION, value)))


def upload_refusal(
    headers: Mapping[str, str],
    content_type: str,
    required_headers: Mapping[str, str],
    url_expires_at: float,
    now: float,
) -> tuple[str, str] | None:
    """Why a presigned PUT is refused, as an S3 (code, message), or None when it is accepted.

    The signature covers the Content-Type sent to presign and every header of ``required_headers`` (names
    case-insensitive, values exact); an upload URL past its lifetime is refused as S3 refuses it.
    """
    if now > url_expires_at:
        return "AccessDenied", "Request has expired"
    if headers.get("Content-Type") != content_type:
        return "SignatureDoesNotMatch", "The request signature we calculated does not match the signature you provided."
    for name, value in required_headers.items():
        if headers.get(name) != value:
            return (
                "SignatureDoesNotMatch",
                f"The request signature we calculated does not match the signature you provided ({name}).",
            )
    return None


def s3_error(code: str, message: str, resource: str = "") -> str:
    """An S3-like XML error body."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
        f"<Resource>{escape(resource)}</Resource></Error>"
    )
