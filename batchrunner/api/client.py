"""The only module that speaks HTTP to the Eachlabs API.

Every failure of the transport (aiohttp, timeouts) is translated into the error tree of ``errors.py`` in one
place, ``_transport_error``; every unwanted HTTP status in another, ``_status_error``. The client neither
rate-limits nor retries: the scheduler decides what a request slot is worth and when to try again. It calls
``on_request(kind)`` right before every request to the API host so the scheduler can count and log them;
downloads of outputs and the PUT of an upload go to other hosts and are not counted.

The API key travels only in the headers of API-host requests, never to a CDN or an upload host: as
``Authorization: Bearer KEY`` (the documented header) and as ``X-API-Key`` beside it (what the model page and the
official clients send). It, and every piece of it that could identify it, is masked in every message this module builds.
"""

from __future__ import annotations

import contextlib
import email.utils
import functools
import importlib.metadata
import json
import math
import re
import time
import types
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum, StrEnum
from typing import Any, BinaryIO

import aiohttp

from batchrunner.api.redact import Redactor
from batchrunner.errors import (
    ApiError,
    ApiTimeout,
    AuthError,
    CreatePathRefused,
    CreatePathUnusable,
    DownloadIncomplete,
    DownloadRejected,
    Forbidden,
    NetworkError,
    NotFound,
    PaymentRequired,
    RateLimited,
    RequestRejected,
    ServerError,
    UsageError,
)

__all__ = [
    "CREATE_PATH",
    "CREATE_PATHS",
    "DEFAULT_API_URL",
    "MAX_API_BODY_BYTES",
    "MAX_DOWNLOAD_BYTES",
    "PRESIGN_MAX_SECONDS",
    "PRESIGN_MIN_SECONDS",
    "TRANSIENT_ERROR_CODES",
    "Client",
    "Execution",
    "ExecutionsPage",
    "Phase",
    "Prediction",
    "Presigned",
    "classify_status",
    "create_path_refused",
    "other_create_path",
    "output_urls",
    "parse_execution",
    "parse_prediction",
    "parse_retry_after",
]

DEFAULT_API_URL = "https://api.eachlabs.ai"
# The create path as every official source writes it; eachjs and one third-party client add a trailing slash, and a
# server may take only one of the two. The documented form goes first.
CREATE_PATH = "/v1/prediction"
CREATE_PATHS = (CREATE_PATH, CREATE_PATH + "/")
# A presign's ``expires_in_seconds`` (the stored file's retention) is clamped by the API to this range.
PRESIGN_MIN_SECONDS = 60
PRESIGN_MAX_SECONDS = 365 * 86400
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_DOWNLOAD_BYTES = 100 * 1024 * 1024
# An API answer is a few kB (a listing page of 100 rows some tens of kB): anything far larger is refused unread.
MAX_API_BODY_BYTES = 8 * 1024 * 1024

# Failure codes that say nothing about the job itself: the provider or the API was busy or slow, so the same
# input is worth a new prediction after a backoff. They decide only when a failure envelope has no ``retryable``
# ("branch on retryable, never on a set of codes you maintain"). Anything else (INPUT_DOWNLOAD_ERROR, content
# policy, bad input) would fail again the same way and must not burn credit on repeats.
TRANSIENT_ERROR_CODES: frozenset[str] = frozenset(
    {
        "PROVIDER_RATE_LIMIT",
        "PROVIDER_SERVER_ERROR",
        "NETWORK_ERROR",
        "EXECUTION_TIMEOUT",
        "PROVIDER_TIMEOUT",
        "PROVIDER_UNAVAILABLE",
        "RATE_LIMIT",
        "TIMEOUT",
        "INTERNAL_ERROR",
    }
)

# Retry-After beyond an hour is more likely a bug than a plan; the scheduler still gets a bounded wait.
_MAX_RETRY_AFTER = 3600.0
_SNIPPET_CHARS = 100
_CHUNK_BYTES = 64 * 1024


class Phase(StrEnum):
    """Where a prediction stands, folded from the API's (inconsistently documented) status words."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


_SUCCEEDED_WORDS = frozenset({"success", "succeeded"})
_CANCELLED_WORDS = frozenset({"cancelled", "canceled"})
_FAILED_WORDS = frozenset({"error", "failed"}) | _CANCELLED_WORDS


def classify_status(status: object) -> Phase:
    """Fold a status word into a Phase. Unknown words and non-strings count as still running.

    Sources disagree on the words (``error`` vs ``failed``, ``succeeded`` in webhooks), so every documented
    variant is accepted; an unknown word must not end a paid prediction early, the poll deadline does that.
    """
    if not isinstance(status, str):
        return Phase.RUNNING
    word = status.strip().lower()
    if word in _SUCCEEDED_WORDS:
        return Phase.SUCCEEDED
    if word in _FAILED_WORDS:
        return Phase.FAILED
    return Phase.RUNNING


_URL_KEYS = ("url", "image", "images", "output", "uri", "file")
# Top container plus nested ones, e.g. {"images": [{"url": ...}]}; deeper ones are not outputs we know of.
_MAX_URL_DEPTH = 3


def _as_url(value: str) -> str | None:
    text = value.strip()
    if not text.lower().startswith(("http://", "https://")) or any(c.isspace() for c in text):
        return None
    return text if urllib.parse.urlsplit(text).netloc else None


def _collect_urls(value: object, depth: int, found: list[str]) -> None:
    if isinstance(value, str):
        url = _as_url(value)
        if url is not None:
            found.append(url)
        return
    if depth >= _MAX_URL_DEPTH:
        return
    if isinstance(value, list | tuple):
        for item in value:
            _collect_urls(item, depth + 1, found)
    elif isinstance(value, Mapping):
        for key in _URL_KEYS:
            if key in value:
                _collect_urls(value[key], depth + 1, found)
        for key, item in value.items():
            if key not in _URL_KEYS:
                _collect_urls(item, depth + 1, found)


def output_urls(output: object) -> tuple[str, ...]:
    """The http(s) URLs in a prediction's output, in order, without duplicates.

    The output may be one URL string, a list of strings or objects, or an object; in objects the usual keys
    (url, image, images, output, uri, file) come first, then any other URL-valued fields.
    """
    found: list[str] = []
    _collect_urls(output, 0, found)
    return tuple(dict.fromkeys(found))


@dataclass(frozen=True, slots=True)
class Prediction:
    """One answer of ``GET /v1/prediction/{id}``, reduced to what the scheduler decides on."""

    id: str
    status: str
    phase: Phase
    urls: tuple[str, ...]
    error: str | None
    error_code: str | None
    retryable: bool
    cost: float | None
    predict_time: float | None
    error_message: str | None = None  # the envelope's own ``error_message``, kept in the ledger as written
    error_category: str | None = None  # the envelope's ``classification.category``
    input: Mapping[str, Any] | None = None  # the prediction's input as the API holds it (for reconciliation)


def _text(value: object) -> str | None:
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _last_log_line(logs: object) -> str | None:
    if isinstance(logs, list):
        logs = "\n".join(item for item in logs if isinstance(item, str))
    if not isinstance(logs, str):
        return None
    lines = [line.strip() for line in logs.splitlines() if line.strip()]
    return lines[-1] if lines else None


def parse_prediction(prediction_id: str, body: Mapping[str, Any]) -> Prediction:
    """Read a prediction answer, tolerating missing or oddly typed fields.

    ``urls`` are filled only for a success. For failures ``error`` is the envelope's ``error_message``, else
    its ``error`` (a dispatch failure writes only that), else the body's ``error``, else the last non-empty
    log line. ``retryable`` is the envelope's own ``retryable`` when it is a boolean; without one, True for a
    transient ``error_code``. A cancelled prediction is retryable (the runner cancels a prediction that
    overstays its deadline, so the cancel says nothing about the job).
    """
    raw_status = body.get("status")
    status = raw_status.strip() if isinstance(raw_status, str) else ""
    phase = classify_status(status)
    output = body.get("output")
    out_fields: Mapping[str, Any] = output if isinstance(output, Mapping) else {}
    metrics = body.get("metrics")
    metric_fields: Mapping[str, Any] = metrics if isinstance(metrics, Mapping) else {}

    error: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    category: str | None = None
    retryable = False
    if phase is Phase.FAILED:
        error_code = _text(out_fields.get("error_code")) or _text(body.get("error_code"))
        error_message = _text(out_fields.get("error_message"))
        classification = out_fields.get("classification")
        if isinstance(classification, Mapping):
            category = _text(classification.get("category"))
        error = (
            error_message
            or _text(out_fields.get("error"))
            or _text(body.get("error"))
            or _last_log_line(body.get("logs"))
            or f"prediction ended with status {status!r}"
        )
        said = out_fields.get("retryable")
        if status.lower() in _CANCELLED_WORDS:
            retryable = True
        elif isinstance(said, bool):
            retryable = said
        else:
            retryable = error_code in TRANSIENT_ERROR_CODES
    raw_input = body.get("input")

    return Prediction(
        id=_text(body.get("id")) or prediction_id,
        status=status,
        phase=phase,
        urls=output_urls(output) if phase is Phase.SUCCEEDED else (),
        error=error,
        error_code=error_code,
        retryable=retryable,
        cost=_number(metric_fields.get("cost")),
        predict_time=_number(metric_fields.get("predict_time")),
        error_message=error_message,
        error_category=category,
        input=types.MappingProxyType(dict(raw_input)) if isinstance(raw_input, Mapping) else None,
    )


@dataclass(frozen=True, slots=True)
class Execution:
    """One row of ``GET /v1/executions``: a prediction of the account's, without its input.

    ``prediction`` reads the row as a GET of the prediction would be read: its status, its output URLs on success, its
    failure envelope, and the server's ``execution_cost`` and ``run_time`` as cost and predict time.
    """

    id: str
    model: str | None
    status: str
    created_at: float | None  # epoch seconds; None when the row's time is missing or unreadable
    raw: Mapping[str, Any] | None = None

    @property
    def prediction(self) -> Prediction | None:
        """The row read as a GET of the prediction (read on demand: most rows of a page are not ours)."""
        row = self.raw
        if row is None:
            return None
        as_prediction = {
            "id": self.id,
            "status": row.get("status"),
            "output": row.get("output"),
            "metrics": {"cost": row.get("execution_cost"), "predict_time": row.get("run_time")},
        }
        return parse_prediction(self.id, as_prediction)


@dataclass(frozen=True, slots=True)
class ExecutionsPage:
    """One page of the executions listing; ``full`` when it holds ``limit`` rows (there may be more)."""

    rows: tuple[Execution, ...]
    full: bool


def _epoch(value: object) -> float | None:
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_execution(row: Mapping[str, Any]) -> Execution | None:
    """Read a listing row; None when it has no usable id (a row we cannot act on)."""
    raw_id = row.get("id")
    if isinstance(raw_id, bool) or not isinstance(raw_id, str | int) or not str(raw_id).strip():
        return None
    raw_status = row.get("status")
    return Execution(
        id=str(raw_id).strip(),
        model=_text(row.get("model")) or _text(row.get("requested_model")),
        status=raw_status.strip() if isinstance(raw_status, str) else "",
        created_at=_epoch(row.get("created_at")),
        raw=row,
    )


@dataclass(frozen=True, slots=True)
class Presigned:
    """Where to PUT a local file, and the URL the model will read it from afterwards."""

    id: str
    presigned_url: str
    public_url: str
    expires_at: str | None
    required_headers: Mapping[str, str]
    # The content type sent to presign: the storage host checks the PUT's Content-Type against it, and the documented
    # ``required_headers`` (which may be empty) do not carry it.
    content_type: str = "application/octet-stream"


def other_create_path(path: str) -> str:
    """The other form of the create path: with the trailing slash if ``path`` has none, and the reverse."""
    return CREATE_PATHS[1] if path == CREATE_PATHS[0] else CREATE_PATHS[0]


def _same_resource(a: str, b: str) -> bool:
    pa, pb = urllib.parse.urlsplit(a), urllib.parse.urlsplit(b)
    try:
        ports = (pa.port, pb.port)
    except ValueError:
        return False
    return (pa.scheme.lower(), (pa.hostname or "").lower(), ports[0], pa.path) == (
        pb.scheme.lower(),
        (pb.hostname or "").lower(),
        ports[1],
        pb.path,
    )


def create_path_refused(status: int, location: str | None, sent_url: str, other_url: str) -> bool:
    """Whether a create's answer refuses the form of the path it was sent to, so the other form is worth one try.

    A 404 or 405 creates nothing (a 4xx), and is what a server that knows only the other form answers. A redirect is
    never followed for a POST (a followed 301/302 turns into a GET, and the key would travel along): one whose
    ``Location`` is the other form on the same host says "use the other form", the server having acted on nothing.
    Any other redirect is left to the caller as an answer it cannot read (a create in doubt).
    """
    if status in (404, 405):
        return True
    if status in _REDIRECTS and location:
        return _same_resource(urllib.parse.urljoin(sent_url, location.strip()), other_url)
    return False


def _route_exists(status: int) -> bool:
    """An answer that shows the create path it was sent to is a route of the server (its form is the right one)."""
    return 200 <= status < 300 or (400 <= status < 500 and status not in (401, 403, 404, 405))


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


def _user_agent() -> str:
    try:
        version = importlib.metadata.version("batchrunner")
    except importlib.metadata.PackageNotFoundError:
        version = "0"
    return f"batchrunner/{version}"


_USER_AGENT = _user_agent()


class _Target(Enum):
    """Who answered: the API itself, the upload host of a presigned URL, or the output CDN."""

    API = "API"
    UPLOAD = "upload host"
    DOWNLOAD = "download host"


@dataclass(slots=True)
class _Progress:
    """Bytes of a download so far, so a cut-off stream can say how far it got."""

    got: int = 0
    expected: int | None = None


@functools.lru_cache(maxsize=4)
def _redactor(secret: str) -> Redactor:
    return Redactor(secret)


def _redact(text: str, secret: str) -> str:
    """``text`` with the key and every piece of it that could identify it masked (see redact.py)."""
    return _redactor(secret)(text) if secret else text


def _snippet(body: bytes | str, secret: str) -> str:
    """A short one-line excerpt; redacted before it is cut, so no prefix of the key survives the cut."""
    # Only the head of a large body can reach the excerpt: cut generously first (the key may straddle the cut).
    head = body[: 4 * _SNIPPET_CHARS + 4 * len(secret)]
    text = head.decode("utf-8", "replace") if isinstance(head, bytes) else head
    return " ".join(_redact(text, secret).split())[:_SNIPPET_CHARS]


def _transport_error(exc: Exception, target: _Target, progress: _Progress | None, secret: str) -> ApiError:
    """Translate an aiohttp/timeout exception into the error tree: the one place where that happens."""
    where = target.value
    detail = _snippet(str(exc), secret) or type(exc).__name__
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        # Raised only while connecting, before a byte of the request was written: safe to resend.
        return NetworkError(f"could not connect to the {where} in time: {detail}", sent=False)
    if isinstance(exc, aiohttp.ServerTimeoutError | TimeoutError):
        return ApiTimeout(f"no answer from the {where} in time")
    if isinstance(exc, aiohttp.ClientConnectorError):
        # Connection refused, DNS, TLS handshake: the request surely never left.
        return NetworkError(f"cannot connect to the {where}: {detail}", sent=False)
    if isinstance(exc, aiohttp.ClientPayloadError):
        if target is _Target.DOWNLOAD and progress is not None:
            expected = "?" if progress.expected is None else str(progress.expected)
            return DownloadIncomplete(f"cut short: got {progress.got} of {expected} bytes")
        return ServerError(f"the {where} answer was cut short: {detail}")
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        if target is _Target.DOWNLOAD:
            return DownloadRejected(f"unusable output URL: {detail}")
        return RequestRejected(f"unusable {where} URL: {detail}")
    if isinstance(exc, aiohttp.ClientResponseError):
        # aiohttp could not parse the answer (bad headers, redirect loop): the server misbehaved.
        return ServerError(f"malformed answer from the {where}: {detail}")
    # Disconnect, reset, anything else after connecting: the request may have been received and acted on.
    return NetworkError(f"connection to the {where} failed: {detail}", sent=True)


def _api_message(body: bytes) -> str | None:
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
    message = _text(error) or _text(data.get("message"))
    raw_details = data.get("details")
    details = _text(raw_details)
    if details is None and isinstance(raw_details, Mapping | list) and raw_details:
        # A 429's details say which cap was hit ("backoff alone does not clear" it): shown whatever their shape.
        details = _text(raw_details.get("message")) if isinstance(raw_details, Mapping) else None
        details = details or json.dumps(raw_details, ensure_ascii=False, separators=(",", ":"))[:_SNIPPET_CHARS]
    if message and details:
        return f"{message}: {details}"
    return message or details


def _status_error(
    status: int,
    reason: str | None,
    body: bytes,
    headers: Mapping[str, str],
    *,
    target: _Target,
    secret: str,
    now: float,
) -> ApiError | None:
    """The error for an HTTP status (None for 2xx): the one place where statuses are judged."""
    if 200 <= status < 300:
        return None
    request_id = headers.get("X-Request-Id")
    extra: dict[str, Any] = {"status": status, "request_id": request_id}
    reason = _redact(reason or "error", secret)
    if target is _Target.DOWNLOAD:
        if status in (404, 409, 425):
            return DownloadIncomplete("output not available yet", **extra)
        if status in (408, 429) or status >= 500:
            retry_after = parse_retry_after(headers.get("Retry-After"), now=now)
            return DownloadIncomplete(f"{target.value} is busy", retry_after=retry_after, **extra)
        return DownloadRejected(f"{target.value} refused the output: {reason}", **extra)

    said = _api_message(body)
    if said is None:
        said = reason
        if body.strip():
            said = f"{said}: {_snippet(body, secret)}"
    message = _redact(said, secret)
    if status == 429:
        retry_after = parse_retry_after(headers.get("Retry-After"), now=now)
        return RateLimited(message, retry_after=retry_after, **extra)
    if status >= 500 or status == 408:
        return ServerError(message, **extra)
    if target is _Target.UPLOAD:
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


def _json_object(body: bytes, headers: Mapping[str, str], secret: str, status: int | None = None) -> dict[str, Any]:
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
            f"API answer is {kind}: {_snippet(body, secret)}", status=status, request_id=request_id
        ) from None
    if not isinstance(data, dict):
        raise ServerError(
            f"API answer is not a JSON object: {_snippet(body, secret)}", status=status, request_id=request_id
        )
    return data


def _http_url(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)


def _content_length(response: aiohttp.ClientResponse) -> int | None:
    """Content-Length as the bytes we will receive; None when unknown or when a content coding changes it."""
    if response.headers.get("Content-Encoding", "identity").strip().lower() != "identity":
        return None
    value = response.headers.get("Content-Length", "").strip()
    return int(value) if value.isdigit() else None


class Client:
    """Thin async client of the Eachlabs API over a caller-owned ``aiohttp.ClientSession``."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        api_key: str,
        timeout: float = 30.0,
        on_request: Callable[[str], None] | None = None,
        max_download_bytes: int = MAX_DOWNLOAD_BYTES,
        create_path: str | None = None,
        on_create_path: Callable[[str], None] | None = None,
    ) -> None:
        if not _http_url(base_url):
            raise UsageError(f"API URL must be http(s)://host, not {base_url!r}")
        if any(ord(c) < 32 or ord(c) == 127 for c in api_key):
            # aiohttp would refuse the header with a message of its own; say it without echoing the key.
            raise UsageError("the API key contains control characters (a stray newline?)")
        if timeout <= 0 or max_download_bytes <= 0:
            raise UsageError("timeout and max_download_bytes must be positive")
        self._session = session
        self._base = base_url.rstrip("/")
        self._key = api_key
        self._on_request = on_request
        self._max_download = max_download_bytes
        self._timeout = timeout
        self._api_timeout = aiohttp.ClientTimeout(total=timeout)
        # Downloads may be large: bound each stall rather than the whole transfer.
        self._download_timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
        self._api_headers = {
            "Authorization": f"Bearer {api_key}",
            "X-API-Key": api_key,
            "User-Agent": _USER_AGENT,
            "Accept": "application/json",
        }
        # No key here: these requests go to CDNs and storage hosts. Identity coding keeps Content-Length
        # comparable with the bytes received.
        self._plain_headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
        # The form of the create path this server takes: the documented one until a 404/405 (or a redirect to the
        # other form) says otherwise, or the form an earlier run learnt (``create_path``). ``on_create_path`` hears
        # of a form once the server has shown it is a route, so the caller may remember it for later runs.
        self._create_path = create_path if create_path in CREATE_PATHS else CREATE_PATH
        self._confirmed_path = self._create_path if create_path in CREATE_PATHS else None
        self._refused_paths: set[str] = set()
        self._on_create_path = on_create_path

    @property
    def create_path(self) -> str:
        """The form of the create path the next create is sent to."""
        return self._create_path

    def __repr__(self) -> str:
        return f"Client(base_url={self._base!r})"

    @contextlib.contextmanager
    def _mapped(self, target: _Target, progress: _Progress | None = None) -> Iterator[None]:
        # Only transport exceptions are translated: ApiErrors raised inside pass through, and an OSError from
        # a download sink is a disk problem for the caller, not a network one.
        try:
            yield
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _transport_error(exc, target, progress, self._key) from exc

    async def _exchange(
        self,
        kind: str,
        method: str,
        path: str,
        *,
        payload: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> tuple[int, str | None, bytes, Mapping[str, str]]:
        """Send one API request; its status, reason, body and headers, whatever the status."""
        if self._on_request is not None:
            self._on_request(kind)
        # Our own X-Request-Id on every request: the server echoes it, and its logs can then be searched for it.
        headers = {**self._api_headers, "X-Request-Id": request_id or f"br-{uuid.uuid4().hex[:20]}"}
        with self._mapped(_Target.API):
            async with self._session.request(
                method,
                self._base + path,
                json=payload,
                params=params,
                headers=headers,
                timeout=self._api_timeout,
                allow_redirects=False,  # a redirect to another host would carry the key along
                raise_for_status=False,
            ) as response:
                body = await self._read_bounded(response)
        return response.status, response.reason, body, response.headers

    def _judge(self, status: int, reason: str | None, body: bytes, headers: Mapping[str, str]) -> ApiError | None:
        return _status_error(status, reason, body, headers, target=_Target.API, secret=self._key, now=time.time())

    async def _call(
        self,
        kind: str,
        method: str,
        path: str,
        *,
        payload: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
        want_body: bool = True,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        status, reason, body, headers = await self._exchange(
            kind, method, path, payload=payload, params=params, request_id=request_id
        )
        error = self._judge(status, reason, body, headers)
        if error is not None:
            raise error
        return _json_object(body, headers, self._key, status) if want_body else {}

    async def _read_bounded(self, response: aiohttp.ClientResponse) -> bytes:
        """The whole answer body, refused (unread beyond the limit) when it passes ``MAX_API_BODY_BYTES``."""
        request_id = response.headers.get("X-Request-Id")
        declared = _content_length(response)
        too_large = f"API answer is over {MAX_API_BODY_BYTES} bytes: not an answer of the API"
        if declared is not None and declared > MAX_API_BODY_BYTES:
            raise ServerError(too_large, status=response.status, request_id=request_id)
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(_CHUNK_BYTES):
            size += len(chunk)
            if size > MAX_API_BODY_BYTES:
                raise ServerError(too_large, status=response.status, request_id=request_id)
            chunks.append(chunk)
        return b"".join(chunks)

    async def create(
        self, model: str, version: str | None, input: Mapping[str, Any], *, request_id: str | None = None
    ) -> str:
        """Submit a prediction; returns its id. Counts as one ``create`` request.

        ``version`` is sent only when given (the API documents it as deprecated and ignored). The request goes to the
        form of the create path this server takes (``create_path``); a 404 or 405 there, or a redirect to the other
        form, raises CreatePathRefused once the client has switched to the other form (nothing was created: send
        again), or CreatePathUnusable when the other form was refused too.

        Not idempotent: an answer that is not a readable 2xx may still have created a prediction (see reconcile.py).
        """
        payload: dict[str, Any] = {"model": model, "input": input}
        if version is not None:
            payload["version"] = version
        sent = self._create_path
        status, reason, raw, headers = await self._exchange(
            "create", "POST", sent, payload=payload, request_id=request_id
        )
        other = other_create_path(sent)
        if create_path_refused(status, headers.get("Location"), self._base + sent, self._base + other):
            raise self._path_refused(sent, status, reason, raw, headers)
        if _route_exists(status):
            self._path_works(sent)
        error = self._judge(status, reason, raw, headers)
        if error is not None:
            raise error
        body = _json_object(raw, headers, self._key, status)
        for key in ("predictionID", "prediction_id", "id"):
            value = body.get(key)
            if isinstance(value, str | int) and not isinstance(value, bool) and str(value).strip():
                return str(value).strip()
        said = _text(body.get("message")) or json.dumps(body)
        # A 2xx without an id: the prediction may exist all the same (the scheduler counts a lost answer).
        raise ServerError(f"create answer has no prediction id: {_snippet(said, self._key)}", status=200)

    def _path_refused(
        self, sent: str, status: int, reason: str | None, body: bytes, headers: Mapping[str, str]
    ) -> ApiError:
        """The error for a create whose path form was refused; switches to the other form while it is untried."""
        request_id = headers.get("X-Request-Id")
        other = other_create_path(sent)
        self._refused_paths.add(sent)
        said = _api_message(body) or _redact(reason or "error", self._key)
        if status in _REDIRECTS:
            said = f"redirected to {other} (not followed)"
        if other in self._refused_paths:
            return CreatePathUnusable(
                f"the API refuses both {CREATE_PATHS[0]} and {CREATE_PATHS[1]} for a create ({said})",
                status=status,
                request_id=request_id,
            )
        self._create_path = other
        return CreatePathRefused(
            f"create path {sent} refused ({said}): sending to {other} instead",
            status=status,
            request_id=request_id,
            retry_after=0.0,
        )

    def _path_works(self, sent: str) -> None:
        """The server answered ``sent`` as a route of its own: keep it, and let the caller remember it."""
        self._refused_paths.clear()
        self._create_path = sent
        if sent != self._confirmed_path:
            self._confirmed_path = sent
            if self._on_create_path is not None:
                self._on_create_path(sent)

    async def get(self, prediction_id: str, *, kind: str = "poll", request_id: str | None = None) -> Prediction:
        """The current state of a prediction. Counts as one ``kind`` request (``poll`` by default)."""
        path = f"/v1/prediction/{urllib.parse.quote(prediction_id, safe='')}"
        body = await self._call(kind, "GET", path, request_id=request_id)
        return parse_prediction(prediction_id, body)

    async def cancel(self, prediction_id: str, *, request_id: str | None = None) -> str | None:
        """Ask the API to cancel a prediction. Counts as one ``cancel`` request.

        Best effort, often only recorded: the prediction may run on and succeed. Returns the answer's ``status``
        (``cancelled``, or ``success`` when it had already finished), None when the answer has none.
        """
        path = f"/v1/prediction/{urllib.parse.quote(prediction_id, safe='')}/cancel"
        body = await self._call("cancel", "POST", path, request_id=request_id)
        status = body.get("status")
        return status.strip().lower() if isinstance(status, str) and status.strip() else None

    async def executions(
        self, *, model: str, start: float, end: float, limit: int = 100, offset: int = 0, kind: str = "list"
    ) -> ExecutionsPage:
        """One page of the account's predictions of ``model`` created in [start, end] (epoch seconds), newest first.

        Counts as one ``kind`` request (``list`` by default). Rows carry no input: get a prediction for that.
        ``total_count`` is capped by the API, so callers page until a page that is not ``full``.
        """
        params = {
            "model": model,
            "from": _rfc3339(math.floor(start)),
            "to": _rfc3339(math.ceil(end)),
            "limit": str(limit),
            "offset": str(offset),
        }
        body = await self._call(kind, "GET", "/v1/executions", params=params)
        raw = body.get("executions")
        if raw is None:
            raw = body.get("data", body.get("items"))
        if not isinstance(raw, list):
            fields = _snippet(", ".join(sorted(body)), self._key) or "none"
            raise ServerError(f"executions answer has no list of rows (fields: {fields})")
        rows = tuple(row for item in raw if isinstance(item, Mapping) and (row := parse_execution(item)) is not None)
        return ExecutionsPage(rows=rows, full=len(raw) >= limit)

    async def presign(
        self, content_type: str, *, file_type: str | None = "image", expires_in: float | None = None
    ) -> Presigned:
        """Reserve an upload slot for a file of ``content_type``. Counts as one ``presign`` request.

        ``file_type`` goes as the documented hint; ``expires_in`` (seconds the stored file is kept) is sent as
        ``expires_in_seconds``, clamped to the documented 60 s - 365 days; None leaves the API's default (180 days).
        """
        payload: dict[str, Any] = {"content_type": content_type}
        if file_type is not None:
            payload["file_type"] = file_type
        if expires_in is not None:
            payload["expires_in_seconds"] = int(min(PRESIGN_MAX_SECONDS, max(PRESIGN_MIN_SECONDS, expires_in)))
        body = await self._call("presign", "POST", "/v1/upload/presign", payload=payload)
        upload_id = _text(body.get("id"))
        presigned_url = _text(body.get("presigned_url"))
        public_url = _text(body.get("public_url"))
        raw_headers = body.get("required_headers")
        if raw_headers is None:
            raw_headers = {}
        if (
            upload_id is None
            or presigned_url is None
            or public_url is None
            or not _http_url(presigned_url)
            or not _http_url(public_url)
            or not isinstance(raw_headers, Mapping)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw_headers.items())
        ):
            fields = _snippet(", ".join(sorted(body)), self._key) or "none"
            raise ServerError(f"presign answer lacks id, presigned_url, public_url or headers (fields: {fields})")
        expires_at = body.get("expires_at")
        return Presigned(
            id=upload_id,
            presigned_url=presigned_url,
            public_url=public_url,
            expires_at=str(expires_at) if expires_at is not None else None,
            required_headers=types.MappingProxyType(dict(raw_headers)),
            content_type=content_type,
        )

    async def delete_file(self, file_id: str, *, request_id: str | None = None) -> bool:
        """Delete a stored file (``DELETE /v1/files/{id}``). Counts as one ``delete`` request.

        True when deleted, False when the API no longer knows the file (404: already deleted or expired), which is
        the same end; any other refusal raises.
        """
        path = f"/v1/files/{urllib.parse.quote(file_id, safe='')}"
        try:
            await self._call("delete", "DELETE", path, want_body=False, request_id=request_id)
        except NotFound:
            return False
        return True

    async def put_upload(self, presigned: Presigned, data: bytes) -> None:
        """PUT the raw bytes to the presigned URL; not an API request, no key.

        The headers are a ``Content-Type`` equal to the one sent to presign, plus every one of ``required_headers``
        exactly as returned (storage/upload-file.mdx); a required header of the same name wins.
        """
        if not _http_url(presigned.presigned_url):
            raise RequestRejected("presigned upload URL is not http(s)")
        headers = {"User-Agent": _USER_AGENT, "Content-Type": presigned.content_type}
        for name, value in presigned.required_headers.items():
            for existing in [k for k in headers if k.lower() == name.lower()]:
                del headers[existing]
            headers[name] = value
        with self._mapped(_Target.UPLOAD):
            async with self._session.put(
                presigned.presigned_url,
                data=data,
                headers=headers,
                timeout=self._download_timeout,
                allow_redirects=False,
                raise_for_status=False,
            ) as response:
                body = await response.read()
        error = _status_error(
            response.status,
            response.reason,
            body,
            response.headers,
            target=_Target.UPLOAD,
            secret=self._key,
            now=time.time(),
        )
        if error is not None:
            raise error

    async def model_schema(self, slug: str) -> Mapping[str, Any] | None:
        """The JSON Schema of a model's ``input``, or None when the API gives none. Counts as ``schema``."""
        body = await self._call("schema", "GET", "/v1/model", params={"slug": slug})
        for holder in (body, body.get("model"), body.get("data")):
            if not isinstance(holder, Mapping):
                continue
            schema = holder.get("request_schema")
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError:
                    schema = None
            if isinstance(schema, Mapping):
                return schema
        return None

    async def download(self, url: str, sink: BinaryIO) -> int:
        """Stream an output file into ``sink``; returns the bytes written. Not an API request: no key or hook.

        Raises DownloadRejected for a non-http(s) URL, a refusal or an oversize file, and DownloadIncomplete
        when the file is not there yet or arrives cut short. Errors of ``sink.write`` propagate unchanged.
        """
        if not _http_url(url):
            scheme = urllib.parse.urlsplit(url).scheme or "no scheme"
            raise DownloadRejected(_redact(f"output URL must be http(s), not {scheme[:20]}", self._key))
        progress = _Progress()
        with self._mapped(_Target.DOWNLOAD, progress):
            async with self._session.get(
                url,
                headers=self._plain_headers,
                timeout=self._download_timeout,
                raise_for_status=False,
            ) as response:
                error = _status_error(
                    response.status,
                    response.reason,
                    b"",
                    response.headers,
                    target=_Target.DOWNLOAD,
                    secret=self._key,
                    now=time.time(),
                )
                if error is not None:
                    raise error
                progress.expected = _content_length(response)
                if progress.expected is not None and progress.expected > self._max_download:
                    raise DownloadRejected(
                        f"output is {progress.expected} bytes, over the limit of {self._max_download}"
                    )
                async for chunk in response.content.iter_chunked(_CHUNK_BYTES):
                    if progress.got + len(chunk) > self._max_download:
                        raise DownloadRejected(f"output is over the limit of {self._max_download} bytes")
                    sink.write(chunk)
                    progress.got += len(chunk)
        if progress.expected is not None and progress.got < progress.expected:
            raise DownloadIncomplete(f"cut short: got {progress.got} of {progress.expected} bytes")
        return progress.got
