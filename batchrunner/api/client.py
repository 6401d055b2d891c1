"""The client of the Eachlabs API: one method per call, over a caller-owned ``aiohttp.ClientSession``.

Every failure of the transport (aiohttp, timeouts) is translated into the error tree of ``errors.py`` in one
place, ``transport.transport_error``; every unwanted HTTP status in another, ``transport.status_error``. Answers
are read into records by ``answers.py``; the create path's two forms are ``paths.py``. The client neither
rate-limits nor retries: the scheduler decides what a request slot is worth and when to try again. It calls
``on_request(kind)`` right before every request to the API host so the scheduler can count and log them;
downloads of outputs and the PUT of an upload go to other hosts and are not counted.

The API key travels only in the headers of API-host requests, never to a CDN or an upload host: as
``Authorization: Bearer KEY`` (the documented header) and as ``X-API-Key`` beside it (what the model page and the
official clients send). It, and every piece of it that could identify it, is masked in every message built here.
"""

from __future__ import annotations

import importlib.metadata
import math
import time
import urllib.parse
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import aiohttp

from batchrunner.api.answers import (
    Execution,
    ExecutionsPage,
    Phase,
    Prediction,
    Presigned,
    classify_status,
    created_id,
    http_url,
    parse_execution,
    parse_executions_page,
    parse_prediction,
    parse_presign,
    request_schema,
)
from batchrunner.api.paths import (
    CREATE_PATH,
    CREATE_PATHS,
    CreatePaths,
    create_path_refused,
    other_create_path,
    route_exists,
)
from batchrunner.api.redact import redact
from batchrunner.api.transport import (
    CHUNK_BYTES,
    MAX_API_BODY_BYTES,
    Progress,
    Target,
    content_length,
    json_object,
    mapped,
    read_bounded,
    status_error,
)
from batchrunner.errors import ApiError, DownloadIncomplete, DownloadRejected, NotFound, RequestRejected, UsageError

# The client's own names, and the records its calls return (exported here too: callers read them with the client).
__all__ = [
    "CREATE_PATH",
    "CREATE_PATHS",
    "DEFAULT_API_URL",
    "MAX_API_BODY_BYTES",
    "MAX_DOWNLOAD_BYTES",
    "PRESIGN_MAX_SECONDS",
    "PRESIGN_MIN_SECONDS",
    "Client",
    "Execution",
    "ExecutionsPage",
    "Phase",
    "Prediction",
    "Presigned",
    "Sink",
    "classify_status",
    "parse_execution",
]

DEFAULT_API_URL = "https://api.eachlabs.ai"
# A presign's ``expires_in_seconds`` (the stored file's retention) is clamped by the API to this range.
PRESIGN_MIN_SECONDS = 60
PRESIGN_MAX_SECONDS = 365 * 86400
MAX_DOWNLOAD_BYTES = 100 * 1024 * 1024


class Sink(Protocol):
    """Where a download's bytes go, chunk by chunk (a binary file will do)."""

    def write(self, chunk: bytes, /) -> int: ...


def _user_agent() -> str:
    try:
        version = importlib.metadata.version("batchrunner")
    except importlib.metadata.PackageNotFoundError:
        version = "0"
    return f"batchrunner/{version}"


_USER_AGENT = _user_agent()


def _rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


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
        if not http_url(base_url):
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
        self._paths = CreatePaths(create_path, on_create_path)

    @property
    def create_path(self) -> str:
        """The form of the create path the next create is sent to."""
        return self._paths.current

    def __repr__(self) -> str:
        return f"Client(base_url={self._base!r})"

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
        with mapped(Target.API, self._key):
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
                body = await read_bounded(response)
        return response.status, response.reason, body, response.headers

    def _judge(self, status: int, reason: str | None, body: bytes, headers: Mapping[str, str]) -> ApiError | None:
        return status_error(status, reason, body, headers, target=Target.API, secret=self._key, now=time.time())

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
        return json_object(body, headers, self._key, status) if want_body else {}

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
        sent = self._paths.current
        status, reason, raw, headers = await self._exchange(
            "create", "POST", sent, payload=payload, request_id=request_id
        )
        other = other_create_path(sent)
        if create_path_refused(status, headers.get("Location"), self._base + sent, self._base + other):
            raise self._paths.refused(sent, status, reason, raw, headers, self._key)
        if route_exists(status):
            self._paths.works(sent)
        error = self._judge(status, reason, raw, headers)
        if error is not None:
            raise error
        return created_id(json_object(raw, headers, self._key, status), self._key)

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
        return parse_executions_page(body, limit, self._key)

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
        return parse_presign(body, content_type, self._key)

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
        if not http_url(presigned.presigned_url):
            raise RequestRejected("presigned upload URL is not http(s)")
        headers = {"User-Agent": _USER_AGENT, "Content-Type": presigned.content_type}
        for name, value in presigned.required_headers.items():
            for existing in [k for k in headers if k.lower() == name.lower()]:
                del headers[existing]
            headers[name] = value
        with mapped(Target.UPLOAD, self._key):
            async with self._session.put(
                presigned.presigned_url,
                data=data,
                headers=headers,
                timeout=self._download_timeout,
                allow_redirects=False,
                raise_for_status=False,
            ) as response:
                body = await response.read()
        error = status_error(
            response.status,
            response.reason,
            body,
            response.headers,
            target=Target.UPLOAD,
            secret=self._key,
            now=time.time(),
        )
        if error is not None:
            raise error

    async def model_schema(self, slug: str) -> Mapping[str, Any] | None:
        """The JSON Schema of a model's ``input``, or None when the API gives none. Counts as ``schema``."""
        body = await self._call("schema", "GET", "/v1/model", params={"slug": slug})
        return request_schema(body)

    async def download(self, url: str, sink: Sink) -> int:
        """Stream an output file into ``sink``; returns the bytes written. Not an API request: no key or hook.

        Raises DownloadRejected for a non-http(s) URL, a refusal or an oversize file, and DownloadIncomplete
        when the file is not there yet or arrives cut short. Errors of ``sink.write`` propagate unchanged.
        """
        if not http_url(url):
            scheme = urllib.parse.urlsplit(url).scheme or "no scheme"
            raise DownloadRejected(redact(f"output URL must be http(s), not {scheme[:20]}", self._key))
        progress = Progress()
        with mapped(Target.DOWNLOAD, self._key, progress):
            async with self._session.get(
                url,
                headers=self._plain_headers,
                timeout=self._download_timeout,
                raise_for_status=False,
            ) as response:
                error = status_error(
                    response.status,
                    response.reason,
                    b"",
                    response.headers,
                    target=Target.DOWNLOAD,
                    secret=self._key,
                    now=time.time(),
                )
                if error is not None:
                    raise error
                progress.expected = content_length(response)
                if progress.expected is not None and progress.expected > self._max_download:
                    raise DownloadRejected(
                        f"output is {progress.expected} bytes, over the limit of {self._max_download}"
                    )
                async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                    if progress.got + len(chunk) > self._max_download:
                        raise DownloadRejected(f"output is over the limit of {self._max_download} bytes")
                    sink.write(chunk)
                    progress.got += len(chunk)
        if progress.expected is not None and progress.got < progress.expected:
            raise DownloadIncomplete(f"cut short: got {progress.got} of {progress.expected} bytes")
        return progress.got
