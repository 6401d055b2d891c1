"""What happens on the wire, mapped to the error tree: the one place where aiohttp's exceptions are translated
(``mapped`` / ``transport_error``) and the one place where HTTP statuses are judged (``status_error``); bounded reads of
an answer; Retry-After.

Every message built here is redacted (redact.py): a server that echoes the key, or part of it, does not leak it.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC
from enum import Enum
from typing import Any

import aiohttp

from batchrunner.api.answers import text
from batchrunner.api.redact import SNIPPET_CHARS, redact, snippet
from batchrunner.errors import (
    ApiError,
    ApiTimeout,
    AuthError,
    DownloadIncomplete,
    DownloadRejected,
    Forbidden,
    NetworkError,
    NotFound,
    PaymentRequired,
    RateLimited,
    RequestRejected,
    ServerError,
)

__all__ = [
    "CHUNK_BYTES",
    "MAX_API_BODY_BYTES",
    "Progress",
    "Target",
    "api_message",
    "content_length",
    "json_object",
    "mapped",
    "parse_retry_after",
    "read_bounded",
    "status_error",
    "transport_error",
]

# An API answer is a few kB (a listing page of 100 rows some tens of kB): anything far larger is refused unread.
MAX_API_BODY_BYTES = 8 * 1024 * 1024

# Retry-After beyond an hour is more likely a bug than a plan; the scheduler still gets a bounded wait.
_MAX_RETRY_AFTER = 3600.0
CHUNK_BYTES = 64 * 1024


_DELTA_SECONDS = re.compile(r"\d+(\.\d+)?")


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta seconds or an HTTP date), clamped to [0, 3600].

    ``now`` is the current Unix time (injected so the HTTP-date form is testable); None when absent or
    unreadable.
    """
    if value is None:
        return None
    text = value.strip()
    if _DELTA_SECONDS.fullmatch(text):
        seconds = float(text)
    else:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - now
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER)


class Target(Enum):
    """Who answered: the API itself, the upload host of a presigned URL, or the output CDN."""

    API = "API"
    UPLOAD = "upload host"
    DOWNLOAD = "download host"


@dataclass(slots=True)
class Progress:
    """Bytes of a download so far, so a cut-off stream can say how far it got."""

    got: int = 0
    expected: int | None = None


def transport_error(exc: Exception, target: Target, progress: Progress | None, secret: str) -> ApiError:
    """Translate an aiohttp/timeout exception into the error tree: the one place where that happens."""
    where = target.value
    detail = snippet(str(exc), secret) or type(exc).__name__
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        # Raised only while connecting, before a byte of the request was written: safe to resend.
        return NetworkError(f"could not connect to the {where} in time: {detail}", sent=False)
    if isinstance(exc, aiohttp.ServerTimeoutError | TimeoutError):
        return ApiTimeout(f"no answer from the {where} in time")
    if isinstance(exc, aiohttp.ClientConnectorError):
        # Connection refused, DNS, TLS handshake: the request surely never left.
        return NetworkError(f"cannot connect to the {where}: {detail}", sent=False)
    if isinstance(exc, aiohttp.ClientPayloadError):
        if target is Target.DOWNLOAD and progress is not None:
            expected = "?" if progress.expected is None else str(progress.expected)
            return DownloadIncomplete(f"cut short: got {progress.got} of {expected} bytes")
        return ServerError(f"the {where} answer was cut short: {detail}")
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        if target is Target.DOWNLOAD:
            return DownloadRejected(f"unusable output URL: {detail}")
        return RequestRejected(f"unusable {where} URL: {detail}")
    if isinstance(exc, aiohttp.ClientResponseError):
        # aiohttp could not parse the answer (bad headers, redirect loop): the server misbehaved.
        return ServerError(f"malformed answer from the {where}: {detail}")
    # Disconnect, reset, anything else after connecting: the request may have been received and acted on.
    return NetworkError(f"connection to the {where} failed: {detail}", sent=True)


@contextlib.contextmanager
def mapped(target: Target, secret: str, progress: Progress | None = None) -> Iterator[None]:
    """Translate the transport exceptions raised inside into the error tree (see ``transport_error``)."""
    # Only transport exceptions are translated: ApiErrors raised inside pass through, and an OSError from
    # a download sink is a disk problem for the caller, not a network one.
    try:
        yield
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise transport_error(exc, target, progress, secret) from exc


def api_message(body: bytes) -> str | None:
    """The API's own words from an error body: ``error`` (plus ``details``), else ``message``."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    error = data.get("error")
    if isinstance(error, Mapping):
        error = error.get("message")
    message = text(error) or text(data.get("message"))
    raw_details = data.get("details")
    details = text(raw_details)
    if details is None and isinstance(raw_details, Mapping | list) and raw_details:
        # A 429's details say which cap was hit ("backoff alone does not clear" it): shown whatever their shape.
        details = text(raw_details.get("message")) if isinstance(raw_details, Mapping) else None
        details = details or json.dumps(raw_details, ensure_ascii=False, separators=(",", ":"))[:SNIPPET_CHARS]
    if message and details:
        return f"{message}: {details}"
    return message or details


def status_error(
    status: int,
    reason: str | None,
    body: bytes,
    headers: Mapping[str, str],
    *,
    target: Target,
    secret: str,
    now: float,
) -> ApiError | None:
    """The error for an HTTP status (None for 2xx): the one place where statuses are judged."""
    if 200 <= status < 300:
        return None
    request_id = headers.get("X-Request-Id")
    extra: dict[str, Any] = {"status": status, "request_id": request_id}
    reason = redact(reason or "error", secret)
    if target is Target.DOWNLOAD:
        if status in (404, 409, 425):
            return DownloadIncomplete("output not available yet", **extra)
        if status in (408, 429) or status >= 500:
            retry_after = parse_retry_after(headers.get("Retry-After"), now=now)
            return DownloadIncomplete(f"{target.value} is busy", retry_after=retry_after, **extra)
        return DownloadRejected(f"{target.value} refused the output: {reason}", **extra)

    said = api_message(body)
    if said is None:
        said = reason
        if body.strip():
            said = f"{said}: {snippet(body, secret)}"
    message = redact(said, secret)
    if status == 429:
        retry_after = parse_retry_after(headers.get("Retry-After"), now=now)
        return RateLimited(message, retry_after=retry_after, **extra)
    if status >= 500 or status == 408:
        return ServerError(message, **extra)
    if target is Target.UPLOAD:
        # A 403 from the storage host means an expired or mismatched signature, not a bad API key.
        return RequestRejected(f"upload refused: {message}", **extra)
    if status == 401:
        return AuthError(f"API key rejected: {message}", **extra)
    if status == 403:
        # Documented as "operation not allowed" (a locked resource, say): the key was accepted, this call was not.
        return Forbidden(f"operation not allowed: {message}", **extra)
    if status == 402:
        return PaymentRequired(message, **extra)
    if status == 404:
        return NotFound(message, **extra)
    # 3xx (redirects are not followed, so the key never travels) and every other 4xx: repeating will not help.
    return RequestRejected(message, **extra)


def json_object(body: bytes, headers: Mapping[str, str], secret: str, status: int | None = None) -> dict[str, Any]:
    """The JSON object of a 2xx answer; anything else (empty, HTML, not JSON, not an object) fails.

    The error carries the 2xx ``status``: the server said yes to something we could not read, so a create answered so
    may well exist (the scheduler counts it as a lost answer).
    """
    request_id = headers.get("X-Request-Id")
    if not body.strip():
        raise ServerError("empty answer from the API", status=status, request_id=request_id)
    try:
        data = json.loads(body)
    except ValueError:
        kind = "HTML" if body.lstrip()[:1] == b"<" else "not JSON"
        raise ServerError(
            f"API answer is {kind}: {snippet(body, secret)}", status=status, request_id=request_id
        ) from None
    if not isinstance(data, dict):
        raise ServerError(
            f"API answer is not a JSON object: {snippet(body, secret)}", status=status, request_id=request_id
        )
    return data


def content_length(response: aiohttp.ClientResponse) -> int | None:
    """Content-Length as the bytes we will receive; None when unknown or when a content coding changes it."""
    if response.headers.get("Content-Encoding", "identity").strip().lower() != "identity":
        return None
    value = response.headers.get("Content-Length", "").strip()
    return int(value) if value.isdigit() else None


async def read_bounded(response: aiohttp.ClientResponse) -> bytes:
    """The whole answer body, refused (unread beyond the limit) when it passes ``MAX_API_BODY_BYTES``."""
    request_id = response.headers.get("X-Request-Id")
    declared = content_length(response)
    too_large = f"API answer is over {MAX_API_BODY_BYTES} bytes: not an answer of the API"
    if declared is not None and declared > MAX_API_BODY_BYTES:
        raise ServerError(too_large, status=response.status, request_id=request_id)
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(CHUNK_BYTES):
        size += len(chunk)
        if size > MAX_API_BODY_BYTES:
            raise ServerError(too_large, status=response.status, request_id=request_id)
        chunks.append(chunk)
    return b"".join(chunks)
