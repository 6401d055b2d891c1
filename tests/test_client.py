"""Tests of batchrunner.api.client: pure parsing by table, HTTP against tiny aiohttp apps on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import io
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from batchrunner.api.answers import (
    TRANSIENT_ERROR_CODES,
    Phase,
    Prediction,
    Presigned,
    classify_status,
    output_urls,
    parse_execution,
    parse_prediction,
)
from batchrunner.api.client import Client
from batchrunner.api.redact import MASK, Redactor
from batchrunner.api.transport import MAX_API_BODY_BYTES, parse_retry_after
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

KEY = "sk-live-TOPSECRET-0123456789"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 800  # ~200 KB: several read chunks

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Seen:
    """One request as the test server received it."""

    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    body: bytes


@dataclass(slots=True)
class Served:
    """A running test server: its base URL and the requests it has seen."""

    url: str
    seen: list[Seen] = field(default_factory=list)


# --- fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[Served]]]:
    """Start an aiohttp app whose every route goes to one handler; records what it receives."""
    servers: list[TestServer] = []

    async def start(handler: Handler) -> Served:
        served = Served(url="")

        async def recording(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            served.seen.append(Seen(request.method, request.path, dict(request.query), request.headers.copy(), body))
            return await handler(request)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", recording)
        server = TestServer(app, host="127.0.0.1", port=0)
        await server.start_server()
        servers.append(server)
        served.url = str(server.make_url("/")).rstrip("/")
        return served

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def raw_serve() -> AsyncIterator[Callable[[RawHandler], Awaitable[str]]]:
    """Start a bare TCP server, for answers no well-behaved HTTP framework would write."""
    servers: list[asyncio.Server] = []

    async def start(handler: RawHandler) -> str:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def make_client(session: aiohttp.ClientSession, url: str, kinds: list[str] | None = None, **options: Any) -> Client:
    return Client(
        session,
        base_url=url,
        api_key=KEY,
        on_request=None if kinds is None else kinds.append,
        **options,
    )


def answer(status: int = 200, body: object = None, *, text: str | None = None, **headers: str) -> Handler:
    """A handler that always gives the same answer, with an X-Request-Id."""

    async def handler(request: web.Request) -> web.StreamResponse:
        all_headers = {"X-Request-Id": "req-42", **{k.replace("_", "-"): v for k, v in headers.items()}}
        if text is not None:
            return web.Response(status=status, text=text, headers=all_headers, content_type="text/html")
        if body is None:
            return web.Response(status=status, headers=all_headers)
        return web.json_response(body, status=status, headers=all_headers)

    return handler


async def fake_api(request: web.Request) -> web.StreamResponse:
    """Answers every call the client makes, the way the API and its CDN/storage hosts do."""
    origin = str(request.url.origin())
    method, path = request.method, request.path
    if (method, path) == ("POST", "/v1/prediction"):
        return web.json_response({"status": "success", "predictionID": "p1"})
    if (method, path) == ("GET", "/v1/prediction/p1"):
        return web.json_response(
            {"id": "p1", "status": "success", "output": f"{origin}/cdn/out.png", "metrics": {"cost": 0.08}}
        )
    if (method, path) == ("POST", "/v1/prediction/p1/cancel"):
        return web.json_response({"status": "cancelled", "predictionID": "p1"})
    if (method, path) == ("POST", "/v1/upload/presign"):
        return web.json_response(
            {
                "id": "u1",
                "presigned_url": f"{origin}/storage/u1?sig=abc",
                "public_url": f"{origin}/cdn/u1.png",
                "expires_at": "2030-01-01T00:00:00Z",
                "required_headers": {"Content-Type": "image/png", "x-amz-acl": "private"},
            }
        )
    if (method, path) == ("PUT", "/storage/u1"):
        return web.Response(status=200)
    if (method, path) == ("GET", "/v1/model"):
        return web.json_response({"slug": request.query["slug"], "request_schema": {"type": "object"}})
    if (method, path) == ("GET", "/cdn/out.png"):
        return web.Response(body=PNG, content_type="image/png")
    return web.json_response({"error": "no such route"}, status=404)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def read_request_head(reader: asyncio.StreamReader) -> None:
    await reader.readuntil(b"\r\n\r\n")


# --- pure functions -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "phase"),
    [
        ("success", Phase.SUCCEEDED),
        ("succeeded", Phase.SUCCEEDED),
        ("error", Phase.FAILED),
        ("failed", Phase.FAILED),
        ("cancelled", Phase.FAILED),
        ("canceled", Phase.FAILED),
        ("created", Phase.RUNNING),
        ("starting", Phase.RUNNING),
        ("processing", Phase.RUNNING),
        ("queued-somewhere-new", Phase.RUNNING),
        ("", Phase.RUNNING),
        (None, Phase.RUNNING),
        (3, Phase.RUNNING),
        ("SUCCESS", Phase.SUCCEEDED),
        (" Error ", Phase.FAILED),
        ("Cancelled", Phase.FAILED),
    ],
)
def test_classify_status_folds_every_documented_word(status: object, phase: Phase) -> None:
    assert classify_status(status) is phase


A, B, C = "https://cdn.example/a.png", "https://cdn.example/b.png", "http://cdn.example/c.jpg"


@pytest.mark.parametrize(
    ("output", "urls"),
    [
        (A, (A,)),
        (f"  {A}\n", (A,)),
        ([A, B], (A, B)),
        ([A, A, B], (A, B)),
        ([{"url": A}, {"image": B}], (A, B)),
        ({"images": [A, B]}, (A, B)),
        ({"images": [{"url": A}, {"uri": B}]}, (A, B)),
        ({"meta": C, "url": A}, (A, C)),
        ({"file": B, "image": A, "output": C}, (A, C, B)),
        ({"result": {"url": A}}, (A,)),
        ({"url": A, "thumb": A}, (A,)),
        ("", ()),
        (None, ()),
        ([], ()),
        ({}, ()),
        ("not a url", ()),
        ("ftp://cdn.example/a.png", ()),
        ("file:///etc/passwd", ()),
        ("https://", ()),
        ({"caption": "see https://cdn.example/a.png for more"}, ()),
        ([1, None, True, A], (A,)),
        ("HTTPS://CDN.example/A.PNG", ("HTTPS://CDN.example/A.PNG",)),
    ],
)
def test_output_urls_collects_http_urls_in_order_without_duplicates(output: object, urls: tuple[str, ...]) -> None:
    assert output_urls(output) == urls


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            {"id": "p1", "status": "success", "output": A, "metrics": {"predict_time": 9.5, "cost": 0.08}},
            Prediction("p1", "success", Phase.SUCCEEDED, (A,), None, None, False, 0.08, 9.5),
            id="success",
        ),
        pytest.param(
            {
                "status": "error",
                "output": {"error_code": "PROVIDER_RATE_LIMIT", "error_message": "provider busy"},
                "logs": "starting\nfailed\n",
            },
            Prediction(
                "p1",
                "error",
                Phase.FAILED,
                (),
                "provider busy",
                "PROVIDER_RATE_LIMIT",
                True,
                None,
                None,
                error_message="provider busy",
            ),
            id="error-with-transient-code",
        ),
        pytest.param(
            {
                "status": "error",
                "output": {"error_code": "INPUT_DOWNLOAD_ERROR", "error_message": "cannot fetch input_image"},
            },
            Prediction(
                "p1",
                "error",
                Phase.FAILED,
                (),
                "cannot fetch input_image",
                "INPUT_DOWNLOAD_ERROR",
                False,
                None,
                None,
                error_message="cannot fetch input_image",
            ),
            id="error-with-permanent-code",
        ),
        pytest.param(
            {"status": "failed", "output": None, "logs": "loading model\nNSFW content detected\n\n  "},
            Prediction("p1", "failed", Phase.FAILED, (), "NSFW content detected", None, False, None, None),
            id="failed-with-logs-only",
        ),
        pytest.param(
            {"status": "failed", "error": "out of memory", "logs": "a\nb"},
            Prediction("p1", "failed", Phase.FAILED, (), "out of memory", None, False, None, None),
            id="failed-with-error-field",
        ),
        pytest.param(
            {"status": "cancelled"},
            Prediction(
                "p1",
                "cancelled",
                Phase.FAILED,
                (),
                "prediction ended with status 'cancelled'",
                None,
                True,
                None,
                None,
            ),
            id="cancelled-is-retryable",
        ),
        pytest.param(
            {"status": "processing", "output": A, "metrics": "n/a"},
            Prediction("p1", "processing", Phase.RUNNING, (), None, None, False, None, None),
            id="running-has-no-urls-yet",
        ),
        pytest.param(
            {"status": "success", "output": [A, B], "metrics": {"cost": "0.5", "predict_time": True}},
            Prediction("p1", "success", Phase.SUCCEEDED, (A, B), None, None, False, 0.5, None),
            id="odd-metrics",
        ),
        pytest.param(
            {},
            Prediction("p1", "", Phase.RUNNING, (), None, None, False, None, None),
            id="empty-body",
        ),
        pytest.param(
            {"id": 17, "status": None, "output": 5, "logs": 3},
            Prediction("p1", "", Phase.RUNNING, (), None, None, False, None, None),
            id="wrong-types",
        ),
    ],
)
def test_parse_prediction_reads_state_and_failure_reason(body: dict[str, Any], expected: Prediction) -> None:
    assert parse_prediction("p1", body) == expected


def envelope(**fields: Any) -> dict[str, Any]:
    """A failed prediction's answer with the documented failure envelope in ``output``."""
    output = {"error": "Execution failed", "status": "ERROR", "success": False, **fields}
    return {"status": "error", "output": output, "metrics": {"predict_time": 3.43, "cost": 0}}


@pytest.mark.parametrize(
    ("body", "error", "code", "retryable", "category"),
    [
        # The envelope's retryable decides, whatever the code says.
        (envelope(error_code="PROVIDER_FAILED", error_message="m", retryable=True), "m", "PROVIDER_FAILED", True, None),
        (
            envelope(error_code="PROVIDER_RATE_LIMIT", error_message="m", retryable=False),
            "m",
            "PROVIDER_RATE_LIMIT",
            False,
            None,
        ),
        (
            envelope(error_code="NETWORK_ERROR", error_message="m", retryable=True, classification={"category": "NET"}),
            "m",
            "NETWORK_ERROR",
            True,
            "NET",
        ),
        # The captured example: a validation failure, final.
        (
            envelope(
                classification={"category": "VALIDATION"},
                error_code="INPUT_VALIDATION_ERROR",
                error_message="prompt too long",
                retryable=False,
            ),
            "prompt too long",
            "INPUT_VALIDATION_ERROR",
            False,
            "VALIDATION",
        ),
        # Without a boolean retryable, the list of codes decides.
        (envelope(error_code="PROVIDER_SERVER_ERROR", error_message="m"), "m", "PROVIDER_SERVER_ERROR", True, None),
        (envelope(error_code="EXECUTION_TIMEOUT", error_message="m"), "m", "EXECUTION_TIMEOUT", True, None),
        (
            envelope(error_code="INPUT_DOWNLOAD_ERROR", error_message="m", retryable="yes"),
            "m",
            "INPUT_DOWNLOAD_ERROR",
            False,
            None,
        ),
        (
            envelope(error_code="PROVIDER_REJECTED", error_message="m", retryable=None),
            "m",
            "PROVIDER_REJECTED",
            False,
            None,
        ),
        # A dispatch failure writes only {"error": ...}: that text is shown.
        (
            {"status": "error", "output": {"error": "No worker could take the job"}},
            "No worker could take the job",
            None,
            False,
            None,
        ),
        # The envelope without error_message shows its error.
        (envelope(error_code="PROVIDER_FAILED"), "Execution failed", "PROVIDER_FAILED", False, None),
        (envelope(classification="odd", error_code="X", error_message="m"), "m", "X", False, None),
    ],
)
def test_failure_envelope_branches_on_retryable_and_keeps_its_fields(
    body: dict[str, Any], error: str, code: str | None, retryable: bool, category: str | None
) -> None:
    prediction = parse_prediction("p1", body)
    assert prediction.phase is Phase.FAILED
    assert (prediction.error, prediction.error_code, prediction.retryable, prediction.error_category) == (
        error,
        code,
        retryable,
        category,
    )


def test_parse_prediction_keeps_the_input_the_api_holds() -> None:
    prediction = parse_prediction("p1", {"status": "processing", "input": {"prompt": "x", "seed": 3}})
    assert dict(prediction.input or {}) == {"prompt": "x", "seed": 3}
    assert parse_prediction("p1", {"status": "processing", "input": "x"}).input is None


def test_transient_error_codes_include_provider_rate_limit_but_not_input_errors() -> None:
    assert "PROVIDER_RATE_LIMIT" in TRANSIENT_ERROR_CODES
    assert "INPUT_DOWNLOAD_ERROR" not in TRANSIENT_ERROR_CODES


NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        ("7", 7.0),
        (" 0 ", 0.0),
        ("1.5", 1.5),
        ("86400", 3600.0),
        ("-5", None),
        ("soon", None),
        ("", None),
        ("nan", None),
        (email.utils.formatdate(NOW + 120, usegmt=True), 120.0),
        (email.utils.formatdate(NOW - 120, usegmt=True), 0.0),
        (email.utils.formatdate(NOW + 90_000, usegmt=True), 3600.0),
    ],
)
def test_parse_retry_after_reads_seconds_or_http_date_and_clamps(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == seconds


# --- HTTP status mapping ------------------------------------------------------------------------------------

HTML_502 = "<html>\n<head><title>502 Bad Gateway</title></head>\n<body>" + "x" * 300 + "</body></html>"


@pytest.mark.parametrize(
    ("handler", "error_type", "status", "message"),
    [
        (answer(401, {"error": "Invalid API key"}), AuthError, 401, "API key rejected: Invalid API key"),
        (answer(403, {"error": "forbidden"}), Forbidden, 403, "operation not allowed: forbidden"),
        (answer(402, {"error": "Insufficient balance"}), PaymentRequired, 402, "Insufficient balance"),
        (answer(404, {"error": "Prediction not found"}), NotFound, 404, "Prediction not found"),
        (
            answer(400, {"error": "bad input", "details": "prompt missing"}),
            RequestRejected,
            400,
            "bad input: prompt missing",
        ),
        (
            answer(400, {"error": "bad input", "details": {"field": "prompt"}}),
            RequestRejected,
            400,
            "bad input",
        ),
        (answer(422), RequestRejected, 422, "Unprocessable Entity"),
        (answer(302, Location="https://elsewhere.example/"), RequestRejected, 302, "Found"),
        (answer(429, {"error": "Too many requests"}), RateLimited, 429, "Too many requests"),
        (
            answer(429, {"error": "Too many requests", "details": "organisation cap of 10 in-flight predictions"}),
            RateLimited,
            429,
            "Too many requests: organisation cap of 10 in-flight predictions",
        ),
        (
            answer(429, {"error": "Too many requests", "details": {"message": "balance under $10: cap 2"}}),
            RateLimited,
            429,
            "Too many requests: balance under $10: cap 2",
        ),
        (answer(500, {"error": "boom"}), ServerError, 500, "boom"),
        (answer(502, text=HTML_502), ServerError, 502, "Bad Gateway: <html> <head><title>502 Bad Gateway"),
        (answer(503), ServerError, 503, "Service Unavailable"),
    ],
)
async def test_http_status_maps_to_error_with_status_and_request_id(
    session: aiohttp.ClientSession,
    serve: Callable[[Handler], Awaitable[Served]],
    handler: Handler,
    error_type: type[ApiError],
    status: int,
    message: str,
) -> None:
    served = await serve(handler)
    with pytest.raises(error_type) as caught:
        await make_client(session, served.url).get("p1")
    assert type(caught.value) is error_type
    assert caught.value.status == status
    assert caught.value.request_id == "req-42"
    assert caught.value.message.startswith(message)
    assert len(caught.value.message) < 140


@pytest.mark.parametrize(
    ("headers", "retry_after"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"Retry-After": "120000"}, 3600.0),
        ({}, None),
        ({"Retry-After": "whenever"}, None),
    ],
)
async def test_rate_limited_carries_retry_after_seconds(
    session: aiohttp.ClientSession,
    serve: Callable[[Handler], Awaitable[Served]],
    headers: dict[str, str],
    retry_after: float | None,
) -> None:
    served = await serve(answer(429, {"error": "slow down"}, **headers))
    with pytest.raises(RateLimited) as caught:
        await make_client(session, served.url).create("flux-kontext-max", "0.0.1", {"prompt": "x"})
    assert caught.value.retry_after == retry_after
    assert caught.value.retryable


async def test_rate_limited_reads_retry_after_http_date_as_seconds_from_now(
    session: aiohttp.ClientSession, serve: Callable[[Handler], Awaitable[Served]]
) -> None:
    when = email.utils.formatdate(time.time() + 120, usegmt=True)
    served = await serve(answer(429, {"error": "slow down"}, Retry_After=when))
    with pytest.raises(RateLimited) as caught:
        await make_client(session, served.url).get("p1")
    assert caught.value.retry_after is not None
    assert 100 <= caught.value.retry_after <= 121


@pytest.mark.parametrize(
    ("handler", "fragment"),
    [
        (answer(200, text="{not json"), "not JSON: {not json"),
        (answer(200, text="<html><body>maintenance</body></html>"), "HTML: <html><body>maintenance"),
        (answer(200, ["p1"]), 'not a JSON object: ["p1"]'),
        (answer(200, "p1"), "not a JSON object"),
        (answer(200), "empty answer"),
    ],
)
async def test_unreadable_success_body_is_a_transient_server_error(
    session: aiohttp.ClientSession,
    serve: Callable[[Handler], Awaitable[Served]],
    handler: Handler,
    fragment: str,
) -> None:
    served = await serve(handler)
    with pytest.raises(ServerError) as caught:
        await make_client(session, served.url).get("p1")
    assert fragment in caught.value.message
    assert caught.value.retryable
    assert caught.value.request_id == "req-42"


# --- transport failures -------------------------------------------------------------------------------------


async def test_connection_refused_is_network_error_not_sent(session: aiohttp.ClientSession) -> None:
    client = make_client(session, f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(NetworkError) as caught:
        await client.create("flux-kontext-max", "0.0.1", {"prompt": "x"})
    assert type(caught.value) is NetworkError
    assert caught.value.sent is False
    assert isinstance(caught.value.__cause__, aiohttp.ClientConnectorError)
    assert KEY not in str(caught.value)


async def test_server_closing_after_reading_request_is_network_error_maybe_sent(
    session: aiohttp.ClientSession, raw_serve: Callable[[RawHandler], Awaitable[str]]
) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.close()

    url = await raw_serve(hang_up)
    with pytest.raises(NetworkError) as caught:
        await make_client(session, url).create("flux-kontext-max", "0.0.1", {"prompt": "x"})
    assert type(caught.value) is NetworkError
    assert caught.value.sent is True
    assert KEY not in str(caught.value)


async def test_slow_answer_past_timeout_is_api_timeout(
    session: aiohttp.ClientSession, serve: Callable[[Handler], Awaitable[Served]]
) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.json_response({"status": "success"})

    served = await serve(slow)
    started = time.monotonic()
    try:
        with pytest.raises(ApiTimeout) as caught:
            await make_client(session, served.url, timeout=0.05).get("p1")
    finally:
        release.set()
    assert time.monotonic() - started < 1.0
    assert caught.value.sent is True
    assert caught.value.retryable


# --- the API key --------------------------------------------------------------------------------------------


async def test_api_key_goes_to_api_host_but_never_to_download_or_upload(
    session: aiohttp.ClientSession, serve: Callable[[Handler], Awaitable[Served]]
) -> None:
    served = await serve(fake_api)
    client = make_client(session, served.url)
    prediction = await client.get("p1")
    await client.download(prediction.urls[0], io.BytesIO())
    await client.put_upload(await client.presign("image/png"), b"bytes")

    by_path = {seen.path: seen for seen in served.seen}
    for path in ("/v1/prediction/p1", "/v1/upload/presign"):
        assert by_path[path].headers["Authorization"] == f"Bearer {KEY}"
        assert by_path[path].headers["X-API-Key"] == KEY
        assert by_path[path].headers["User-Agent"].startswith("batchrunner/")
    for path in ("/cdn/out.png", "/storage/u1"):
        assert "X-API-Key" not in by_path[path].headers
        assert "Authorization" not in by_path[path].headers
        assert KEY.encode() not in by_path[path].body


def echo_key(status: int, make_body: Callable[[str], object], *, reason: str | None = None) -> Handler:
    """A server that repeats the caller's key in its answer, the worst case for a leak."""

    async def handler(request: web.Request) -> web.StreamResponse:
        key = request.headers.get("X-API-Key", "")
        body = make_body(key)
        shown_reason = None if reason is None else reason.format(key=key)
        if isinstance(body, str):
            return web.Response(status=status, text=body, reason=shown_reason)
        return web.json_response(body, status=status, reason=shown_reason)

    return handler


@pytest.mark.parametrize(
    ("call", "handler"),
    [
        pytest.param("get", echo_key(401, lambda key: {"error": f"key {key} is not valid"}), id="401-error"),
        pytest.param(
            "get",
            echo_key(400, lambda key: {"error": "bad", "details": f"header X-API-Key={key}"}),
            id="400-details",
        ),
        pytest.param("get", echo_key(402, lambda key: {"error": f"{key} has no credit"}), id="402-error"),
        pytest.param("get", echo_key(404, lambda key: {}, reason="no prediction for {key}"), id="404-reason"),
        pytest.param("get", echo_key(429, lambda key: {"message": f"slow down {key}"}), id="429-message"),
        pytest.param("get", echo_key(500, lambda key: f"<html>{key}</html>"), id="500-html"),
        pytest.param(
            "get", echo_key(502, lambda key: "<p>" + "x" * 85 + key), id="502-html-cut"
        ),  # the 100-char excerpt would cut the key
        pytest.param("get", echo_key(200, lambda key: f"oops {key}"), id="200-not-json"),
        pytest.param("get", echo_key(200, lambda key: [key]), id="200-list"),
        pytest.param("create", echo_key(200, lambda key: {"message": f"accepted for {key}"}), id="create-no-id"),
        pytest.param("presign", echo_key(200, lambda key: {key: "x"}), id="presign-fields"),
    ],
)
async def test_api_key_never_appears_in_error_text(
    session: aiohttp.ClientSession, serve: Callable[[Handler], Awaitable[Served]], call: str, handler: Handler
) -> None:
    served = await serve(handler)
    client = make_client(session, served.url)
    with pytest.raises(ApiError) as caught:
        if call == "get":
            await client.get("p1")
        elif call == "create":
            await client.create("m", "0.0.1", {})
        else:
            await client.presign("image/png")
    assert KEY not in str(caught.value)
    assert KEY not in repr(caught.value)
    assert KEY not in caught.value.message
    assert "TOPS" not in str(caught.value)
    assert MASK in str(caught.value)


def _pieces(text: str, secret: str, longest: int = 7) -> list[str]:
    """The runs of more than ``longest`` of the secret's characters that appear in ``text``."""
    return [secret[i : i + longest + 1] for i in range(len(secret) - longest) if secret[i : i + longest + 1] in text]


@pytest.mark.parametrize(
    "text",
    [
        KEY,
        f"header X-API-Key={KEY[:12]}",  # a cut-off copy: the prefix
        f"...{KEY[-9:]} rejected",  # the tail
        f"key {KEY[4:15]} unknown",  # a middle piece
        f"{KEY[:10]}\n{KEY[10:]}",  # split across lines
        f"first {KEY} and again {KEY[:20]}",
        f"Bearer {KEY.upper()[:3]}{KEY[3:]}",
        KEY[:7],
    ],
)
def test_no_piece_of_the_key_of_eight_characters_survives_redaction(text: str) -> None:
    shown = Redactor(KEY)(text)
    assert _pieces(shown, KEY) == []
    assert MASK in shown


@pytest.mark.parametrize(
    ("text", "secret"),
    [("nothing to hide here", KEY), ("the sk- prefix people know", KEY), ("short key ab", "ab"), ("x", "")],
)
def test_redaction_leaves_text_without_the_key_alone(text: str, secret: str) -> None:
    expected = text.replace(secret, MASK) if secret else text
    assert Redactor(secret)(text) == expected


@pytest.mark.parametrize(
    "make_body",
    [
        lambda key: {"error": f"key {key[:12]} is not valid"},
        lambda key: {"error": "bad", "details": f"X-API-Key: {key[3:-3]}"},
        lambda key: f"<html>Authorization: Bearer {key[:-1]}</html>",
    ],
)
async def test_a_server_echoing_a_cut_off_key_leaks_no_piece_of_it(
    session: aiohttp.ClientSession, serve: Callable[[Handler], Awaitable[Served]], make_body: Callable[[str], object]
) -> None:
    served = await serve(echo_key(400, make_body))
    with pytest.raises(ApiError) as caught:
        await make_client(session, served.url).get("p1")
    assert _pieces(str(caught.value), KEY) == []


@pytest.mark.parametrize("chunked", [False, True])
async def test_an_answer_larger_than_any_api_answer_is_refused_unread(
    session: aiohttp.ClientSession, serve: Callable[[Handler], Awaitable[Served]], chunked: bool
) -> None:
    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        if chunked:
            response.enable_chunked_encoding()
        else:
            response.content_length = 2 * MAX_API_BODY_BYTES
        await response.prepare(request)
        chunk = b" " * (1 << 20)
        with contextlib.suppress(ConnectionError):
            for _ in range(2 * MAX_API_BODY_BYTES // len(chunk)):
                await response.write(chunk)
        return response

    served = await serve(huge)
    with pytest.raises(ServerError, match="over"):
        await make_client(session, served.url).get("p1")


def test_parse_execution_reads_rows_and_skips_rows_without_an_id() -> None:
    row = parse_execution(
        {"id": "e1", "model": "flux-kontext-max", "status": "success", "created_at": "2026-11-30T10:00:00.250Z"}
    )
    assert row is not None
    assert (row.id, row.model, row.status) == ("e1", "flux-kontext-max", "success")
    assert row.created_at == pytest.approx(1796032800.25)
    fallback = parse_execution({"id": 7, "requested_model": "m", "created_at": "2026-11-30T11:00:00+01:00"})
    assert fallback is not None and fallback.model == "m" and fallback.created_at == pytest.approx(1796032800.0)
    odd = parse_execution({"id": "e2", "created_at": "yesterday", "status": 3})
    assert odd is not None and odd.created_at is None and odd.status == ""
    assert parse_execution({"id": ""}) is None
    assert parse_execution({"id": True}) is None
    assert parse_execution({}) is None


async def test_executions_pages_by_model_and_time_span(
    session: aiohttp.ClientSession, serve: Callable[[Handler], Awaitable[Served]]
) -> None:
    rows = [{"id": f"e{i}", "model": "m", "status": "success", "created_at": "2026-11-30T10:00:00Z"} for i in range(3)]
    served = await serve(answer(200, {"executions": rows, "total_count": 1000}))
    client = make_client(session, served.url)
    page = await client.executions(model="m", start=1796032800.0, end=1796032860.5, limit=3, offset=6)
    assert [r.id for r in page.rows] == ["e0", "e1", "e2"]
    assert page.full
    seen = served.seen[0]
    assert (seen.method, seen.path) == ("GET", "/v1/executions")
    assert seen.query == {
        "model": "m",
        "from": "2026-11-30T10:00:00Z",
        "to": "2026-11-30T10:01:01Z",
        "limit": "3",
        "offset": "6",
    }
    short = await client.executions(model="m", start=0.0, end=1.0, limit=100)
    assert not short.full


@pytest.mark.parametrize("body", [{"total_count": 3}, {"executions": "none"}, {"executions": None}])
async def test_executions_answer_without_rows_is_a_server_error(
    session: aiohttp.ClientSession, serve: Callable[[Handler], Awaitable[Served]], body: dict[str, Any]
) -> None:
    served = await serve(answer(200, body))
    with pytest.raises(ServerError, match="executions"):
        await make_client(session, served.url).executions(model="m", start=0.0, end=1.0)


@pytest.mark.parametrize(("answer_status", "expected"), [("cancelled", "cancelled"), ("success", "success")])
async def test_cancel_returns_the_status_it_was_answered(
    session: aiohttp.ClientSession,
    serve: Callable[[Handler], Awaitable[Served]],
    answer_status: str,
    expected: str,
) -> None:
    body = {"status": answer_status, "message": "Prediction canceled successfully", "predictionID": "p1"}
    served = await serve(answer(200, body))
    assert await make_client(session, served.url).cancel("p1") == expected
    assert served.seen[0].path == "/v1/prediction/p1/cancel"


async def test_every_api_request_carries_a_request_id_of_ours(
    session: aiohttp.ClientSession, serve: Callable[[Handler], Awaitable[Served]]
) -> None:
    served = await serve(fake_api)
    client = make_client(session, served.url)
    await client.get("p1", request_id="br-job-a1-p1")
    await client.presign("image/png")
    assert served.seen[0].headers["X-Request-Id"] == "br-job-a1-p1"
    assert served.seen[1].headers["X-Request-Id"].startswith("br-")
    assert served.seen[1].headers["X-Request-Id"] != served.seen[0].headers["X-Request-Id"]


def test_client_repr_hides_the_key(session: aiohttp.ClientSession) -> None:
    assert KEY not in repr(make_client(session, "http://127.0.0.1:1"))


# --- calls and the request hook -----------------------------------------------------------------------------


async def test_on_request_counts_api_calls_by_kind_but_not_downloads_or_uploads(
    session: aiohttp.ClientSession, serve: Callable[[Handler], Awaitable[Served]]
) -> None:
    served = await serve(fake_api)
    kinds: list[str] = []
    client = make_client(session, served.url, kinds)

    assert await client.create("flux-kontext-max", "0.0.1", {"prompt": "make it blue"}) == "p1"
    prediction = await client.get("p1")
    await client.cancel("p1")
    presigned = await client.presign("image/png")
    await client.put_upload(presigned, b"png bytes")
    assert await client.model_schema("flux-kontext-max") == {"type": "object"}
    assert await client.download(prediction.urls[0], io.BytesIO()) == len(PNG)

    assert kinds == ["create", "poll", "cancel", "presign", "schema"]
    assert [(seen.method, seen.path) for seen in served.seen] == [
        ("POST", "/v1/prediction"),
        ("GET", "/v1/prediction/p1"),
        ("POST", "/v1/prediction/p1/cancel"),
        ("POST", "/v1/upload/presign"),
        ("PUT", "/storage/u1"),
        ("GET", "/v1/model"),
        ("GET", "/cdn/out.png"),
    ]
    assert json.loads(served.seen[0].body) == {
        "model": "flux-kontext-max",
        "version": "0.0.1",
        "input": {"prompt": "make it blue"},
    }
    assert served.seen[5].query == {"slug": "flux-kontext-max"}


async def test_on_request_is_called_even_when_the_request_fails(session: aiohttp.ClientSession) -> None:
    kinds: list[str] = []
    with pytest.raises(NetworkError):
        await make_client(session, f"http://127.0.0.1:{closed_port()}", kinds).get("p1")
    assert kinds == ["poll"]


@pytest.mark.parametrize(
    ("body", "prediction_id"),
    [
        ({"status": "success", "message": "Prediction created successfully", "predictionID": "abc"}, "abc"),
        ({"id": "def"}, "def"),
        ({"prediction_id": "ghi"}, "ghi"),
        ({"predictionID": 12}, "12"),
    ],
)
async def test_create_accepts_every_id_field(
    session: aiohttp.ClientSession,
    serve: Callable[[Handler], Awaitable[Served]],
    body: dict[str, Any],
    prediction_id: str,
) -> None:
    served = await serve(answer(200, body))
    assert await make_client(session, served.url).create("m", "0.0.1", {}) == prediction_id


async def test_create_without_an_id_is_a_server_error(
    session: aiohttp.ClientSession, serve: Callable[[Handler], Awaitable[Served]]
) -> None:
    served = await serve(answer(200, {"status": "success", "predictionID": ""}))
    with pytest.raises(ServerError, match="no prediction id"):
        await make_client(session, served.url).create("m", "0.0.1", {})


async def test_get_escapes_the_prediction_id_in_the_path(
    session: aiohttp.ClientSession, serve: Callable[[Handler], Awaitable[Served]]
) -> None:
    served = await serve(answer(200, {"status": "processing"}))
    prediction = await make_client(session, served.url).get("../upload/presign")
    assert prediction.phase is Phase.RUNNING
    assert prediction.id == "../upload/presign"
    assert served.seen[0].path == "/v1/prediction/../upload/presign"  # decoded by the server, one path segment


@pytest.mark.parametrize(
    ("body", "schema"),
    [
        ({"request_schema": {"type": "object"}}, {"type": "object"}),
        ({"request_schema": '{"type": "object"}'}, {"type": "object"}),
        ({"data": {"request_schema": {"required": ["prompt"]}}}, {"required": ["prompt"]}),
        ({"slug": "m"}, None),
        ({"request_schema": "not json"}, None),
    ],
)
async def test_model_schema_returns_request_schema_or_none(
    session: aiohttp.ClientSession,
    serve: Callable[[Handler], Awaitable[Served]],
    body: dict[str, Any],
    schema: dict[str, Any] | None,
) -> None:
    served = await serve(answer(200, body))
    assert await make_client(session, served.url).model_schema("m") == schema


# --- presign and upload -------------------------------------------------------------------------------------


async def test_presign_then_put_upload_sends_required_headers_and_bytes(
    session: aiohttp.ClientSession, serve: Callable[[Handler], Awaitable[Served]]
) -> None:
    served = await serve(fake_api)
    client = make_client(session, served.url)
    presigned = await client.presign("image/png")
    await client.put_upload(presigned, b"\x89PNG data")

    assert presigned.id == "u1"
    assert presigned.public_url == f"{served.url}/cdn/u1.png"
    assert presigned.expires_at == "2030-01-01T00:00:00Z"
    assert json.loads(served.seen[0].body) == {"content_type": "image/png", "file_type": "image"}
    put = served.seen[1]
    assert (put.method, put.path, put.query) == ("PUT", "/storage/u1", {"sig": "abc"})
    assert put.headers["Content-Type"] == "image/png"
    assert put.headers["x-amz-acl"] == "private"
    assert put.body == b"\x89PNG data"


@pytest.mark.parametrize(
    "body",
    [
        {"presigned_url": "https://s.example/u", "public_url": "https://c.example/u"},
        {"id": "u1", "public_url": "https://c.example/u"},
        {"id": "u1", "presigned_url": "https://s.example/u"},
        {"id": "u1", "presigned_url": "ftp://s.example/u", "public_url": "https://c.example/u"},
        {
            "id": "u1",
            "presigned_url": "https://s.example/u",
            "public_url": "https://c.example/u",
            "required_headers": ["Content-Type"],
        },
        {},
    ],
)
async def test_presign_answer_missing_fields_is_a_server_error(
    session: aiohttp.ClientSession, serve: Callable[[Handler], Awaitable[Served]], body: dict[str, Any]
) -> None:
    served = await serve(answer(200, body))
    with pytest.raises(ServerError, match="presign answer"):
        await make_client(session, served.url).presign("image/png")


async def test_presign_without_required_headers_keeps_the_content_type_for_the_put(
    session: aiohttp.ClientSession, serve: Callable[[Handler], Awaitable[Served]]
) -> None:
    served = await serve(
        answer(200, {"id": "u", "presigned_url": "https://s.example/u", "public_url": "https://c.example/u"})
    )
    presigned = await make_client(session, served.url).presign("image/jpeg")
    assert dict(presigned.required_headers) == {}
    assert presigned.content_type == "image/jpeg"
    assert presigned.expires_at is None


@pytest.mark.parametrize(
    "required",
    [{}, {"x-amz-meta-file-id": "f-1"}, {"x-amz-meta-file-id": "f-1", "content-type": "image/png"}],
)
async def test_put_carries_the_presign_content_type_and_every_required_header(
    session: aiohttp.ClientSession, serve: Callable[[Handler], Awaitable[Served]], required: dict[str, str]
) -> None:
    # The documented answer's required_headers carry no Content-Type (storage/upload-file.mdx): the PUT must send the
    # one given to presign, or storage answers 403 SignatureDoesNotMatch.
    served = await serve(answer(200, text=""))
    presigned = Presigned("u", f"{served.url}/storage/u", f"{served.url}/cdn/u", None, required, "image/png")
    await make_client(session, "http://127.0.0.1:1").put_upload(presigned, b"x")
    put = served.seen[0]
    assert put.headers["Content-Type"] == "image/png"
    assert len([k for k in put.headers if k.lower() == "content-type"]) == 1
    for name, value in required.items():
        assert put.headers[name] == value


@pytest.mark.parametrize(
    ("status", "error_type"),
    [(403, RequestRejected), (400, RequestRejected), (429, RateLimited), (503, ServerError)],
)
async def test_upload_refusal_is_not_mistaken_for_a_bad_api_key(
    session: aiohttp.ClientSession,
    serve: Callable[[Handler], Awaitable[Served]],
    status: int,
    error_type: type[ApiError],
) -> None:
    served = await serve(answer(status, text="<Error><Code>SignatureDoesNotMatch</Code></Error>"))
    client = make_client(session, "http://127.0.0.1:1")
    presigned = Presigned("u", f"{served.url}/storage/u", f"{served.url}/cdn/u", None, {"Content-Type": "image/png"})
    with pytest.raises(error_type) as caught:
        await client.put_upload(presigned, b"x")
    assert type(caught.value) is error_type
    assert caught.value.status == status


# --- downloads ----------------------------------------------------------------------------------------------


async def test_download_streams_the_body_into_the_sink(
    session: aiohttp.ClientSession, serve: Callable[[Handler], Awaitable[Served]]
) -> None:
    served = await serve(fake_api)
    sink = io.BytesIO()
    written = await make_client(session, served.url).download(f"{served.url}/cdn/out.png", sink)
    assert written == len(PNG)
    assert sink.getvalue() == PNG


async def test_download_cut_short_of_content_length_is_incomplete(
    session: aiohttp.ClientSession, raw_serve: Callable[[RawHandler], Awaitable[str]]
) -> None:
    async def truncated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 100\r\n\r\n" + b"x" * 40)
        await writer.drain()
        writer.close()

    url = await raw_serve(truncated)
    with pytest.raises(DownloadIncomplete, match="cut short: got 40 of 100 bytes") as caught:
        await make_client(session, url).download(f"{url}/out.png", io.BytesIO())
    assert caught.value.retryable


@pytest.mark.parametrize("chunked", [False, True], ids=["by-content-length", "while-streaming"])
async def test_download_over_the_size_limit_is_rejected(
    session: aiohttp.ClientSession, serve: Callable[[Handler], Awaitable[Served]], chunked: bool
) -> None:
    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        if chunked:
            response.enable_chunked_encoding()
        else:
            response.content_length = 5000
        await response.prepare(request)
        for _ in range(5):
            await response.write(b"y" * 1000)
        await response.write_eof()
        return response

    served = await serve(big)
    sink = io.BytesIO()
    with pytest.raises(DownloadRejected, match="limit"):
        await make_client(session, served.url, max_download_bytes=2500).download(f"{served.url}/big", sink)
    assert len(sink.getvalue()) <= 2500


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://cdn.example/out.png", "out.png", "https:///nohost"])
async def test_download_of_a_non_http_url_is_rejected(session: aiohttp.ClientSession, url: str) -> None:
    with pytest.raises(DownloadRejected):
        await make_client(session, "http://127.0.0.1:1").download(url, io.BytesIO())


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (404, DownloadIncomplete),
        (409, DownloadIncomplete),
        (425, DownloadIncomplete),
        (429, DownloadIncomplete),
        (500, DownloadIncomplete),
        (503, DownloadIncomplete),
        (403, DownloadRejected),
        (410, DownloadRejected),
    ],
)
async def test_download_status_maps_to_incomplete_or_rejected(
    session: aiohttp.ClientSession,
    serve: Callable[[Handler], Awaitable[Served]],
    status: int,
    error_type: type[ApiError],
) -> None:
    served = await serve(answer(status, {"error": "nope"}))
    sink = io.BytesIO()
    with pytest.raises(error_type) as caught:
        await make_client(session, served.url).download(f"{served.url}/cdn/out.png", sink)
    assert caught.value.status == status
    assert sink.getvalue() == b""


async def test_download_from_a_dead_host_is_network_error_not_sent(session: aiohttp.ClientSession) -> None:
    url = f"http://127.0.0.1:{closed_port()}/out.png"
    with pytest.raises(NetworkError) as caught:
        await make_client(session, "http://127.0.0.1:1").download(url, io.BytesIO())
    assert caught.value.sent is False


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.datetimes(timezones=st.sampled_from([UTC, None])).map(lambda d: d.isoformat()),
        st.datetimes().map(lambda d: d.isoformat() + "Z"),
        st.text(max_size=30),
    )
)
def test_a_listing_time_read_again_reads_as_the_first_time(text: str) -> None:
    # The listing shows a running prediction's created_at every round: read once, then looked up.
    from batchrunner.api import answers

    first = answers._epoch(text)
    assert first == answers._parse_epoch(text)
    assert answers._epoch(text) == first
    assert answers._epoch(f" {text} ") == first  # stripped, as before


def test_the_listing_times_kept_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from batchrunner.api import answers

    monkeypatch.setattr(answers, "_EPOCHS", {})
    monkeypatch.setattr(answers, "_EPOCHS_MAX", 10)
    for i in range(25):
        assert answers._epoch(f"2026-12-03T14:00:{i:02d}Z") == datetime(2026, 12, 3, 14, 0, i, tzinfo=UTC).timestamp()
        assert len(answers._EPOCHS) <= 10
