"""The simulated Eachlabs API, driven over loopback with a fake clock so nothing waits for predictions."""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import json
import math
import random
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy
from PIL import Image

from batchrunner.sim.listing import TOTAL_COUNT_CAP, ListingQuery, format_time, list_executions, parse_rfc3339
from batchrunner.sim.server import Faults, SimConfig, Simulator, input_key, serve_forever
from batchrunner.sim.state import Outcome, Prediction

KEY = "test-key"
MODEL = "flux-kontext-max"


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


MakeSim = Callable[..., Awaitable[Simulator]]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def make_sim(clock: FakeClock) -> AsyncIterator[MakeSim]:
    started: list[Simulator] = []

    async def make(**overrides: Any) -> Simulator:
        # Every prediction takes exactly one second of fake time unless a test says otherwise.
        settings: dict[str, Any] = {"min_seconds": 1.0, "max_seconds": 1.0, **overrides}
        sim = Simulator(SimConfig(**settings), clock=clock)
        await sim.start()
        started.append(sim)
        return sim

    yield make
    for sim in started:
        await sim.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers={"X-API-Key": KEY}, timeout=aiohttp.ClientTimeout(total=3)) as session:
        yield session


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    data: bytes | None = None,
) -> Reply:
    async with http.request(method, url, json=body, data=data, headers=headers) as response:
        return Reply(response.status, response.headers, await response.read())


def job(prompt: str = "make the sky purple", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "version": "0.0.1", "input": {"prompt": prompt, **extra}}


async def create(http: aiohttp.ClientSession, sim: Simulator, body: dict[str, Any] | None = None) -> Reply:
    return await call(http, "POST", f"{sim.base_url}/v1/prediction/", body or job())


async def create_id(http: aiohttp.ClientSession, sim: Simulator, body: dict[str, Any] | None = None) -> str:
    reply = await create(http, sim, body)
    assert reply.status == 200, reply.body
    prediction_id: str = reply.json()["predictionID"]
    return prediction_id


async def poll(http: aiohttp.ClientSession, sim: Simulator, prediction_id: str) -> dict[str, Any]:
    reply = await call(http, "GET", f"{sim.base_url}/v1/prediction/{prediction_id}")
    assert reply.status == 200, reply.body
    view: dict[str, Any] = reply.json()
    return view


def output_url(output: Any) -> str:
    if isinstance(output, list):
        output = output[0]
    if isinstance(output, dict):
        output = output["image"]
    assert isinstance(output, str)
    return output


async def finished_output(http: aiohttp.ClientSession, sim: Simulator, clock: FakeClock, body: Any) -> Image.Image:
    prediction_id = await create_id(http, sim, body)
    clock.advance(1.5)
    view = await poll(http, sim, prediction_id)
    assert view["status"] == "success"
    reply = await call(http, "GET", output_url(view["output"]))
    assert reply.status == 200
    return Image.open(io.BytesIO(reply.body))


def png_data_uri(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "expected_type"), [("string", str), ("list", list), ("object", dict)])
async def test_round_trip_reports_progress_then_output_in_configured_shape(
    make_sim: MakeSim, http: aiohttp.ClientSession, clock: FakeClock, shape: str, expected_type: type
) -> None:
    sim = await make_sim(output_shape=shape)
    reply = await create(http, sim)
    assert reply.status == 200
    assert reply.json()["status"] == "success"
    assert reply.json()["message"] == "Prediction created successfully"
    prediction_id = reply.json()["predictionID"]

    early = await poll(http, sim, prediction_id)
    assert early["status"] in ("created", "starting")
    assert early["output"] == ""
    assert early["metrics"] == {"predict_time": 0, "cost": 0}
    clock.advance(0.5)
    running = await poll(http, sim, prediction_id)
    assert running["status"] == "processing"
    assert running["output"] is None
    assert running["metrics"] == {"predict_time": 0, "cost": 0}
    clock.advance(0.5)
    done = await poll(http, sim, prediction_id)

    assert done["status"] == "success"
    assert isinstance(done["output"], expected_type)
    assert output_url(done["output"]) == f"{sim.base_url}/outputs/{prediction_id}.png"
    assert done["metrics"] == {"predict_time": 1.0, "cost": 0.08}
    assert done["input"] == job()["input"]
    assert done["urls"]["get"] == f"{sim.base_url}/v1/prediction/{prediction_id}"
    assert done["urls"]["cancel"].endswith(f"/v1/prediction/{prediction_id}/cancel")
    download = await call(http, "GET", output_url(done["output"]))
    assert download.status == 200
    assert download.headers["Content-Type"] == "image/png"
    assert int(download.headers["Content-Length"]) == len(download.body)
    assert sim.stats.downloads == 1


async def test_mixed_output_shape_rotates_string_list_object(
    make_sim: MakeSim, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    sim = await make_sim(output_shape="mixed")
    ids = [await create_id(http, sim, job(f"prompt {i}")) for i in range(3)]
    clock.advance(2)
    outputs = [(await poll(http, sim, pid))["output"] for pid in ids]
    assert [type(o) for o in outputs] == [str, list, dict]


@pytest.mark.parametrize("create_status", [200, 201])
async def test_create_answers_the_configured_status_and_ignores_version(
    make_sim: MakeSim, http: aiohttp.ClientSession, create_status: int
) -> None:
    sim = await make_sim(create_status=create_status)
    reply = await create(http, sim, {**job(), "version": "9.9.9-no-such-version"})
    assert reply.status == create_status
    assert reply.json() == {
        "status": "success",
        "message": "Prediction created successfully",
        "predictionID": sim.prediction_times()[0][0],
    }


@pytest.mark.parametrize(
    "settings",
    [{"create_status": 302}, {"auth_headers": "cookie"}, {"create_path": "either"}, {"wrong_path_status": 303}],
)
def test_config_refuses_values_the_server_cannot_honour(settings: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SimConfig(**settings)


async def test_create_without_trailing_slash_is_accepted(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim()
    reply = await call(http, "POST", f"{sim.base_url}/v1/prediction", job())
    assert reply.status == 200
    assert sim.stats.creates == 1


@pytest.mark.parametrize(
    "body",
    [
        {"input": {"prompt": "x"}},
        {"model": MODEL},
        {"model": MODEL, "input": "make it blue"},
        {"model": MODEL, "input": {"seed": 1}},
        {"model": MODEL, "input": {"prompt": "x", "aspect_ratio": "7:5"}},
        {"model": MODEL, "input": {"prompt": "x", "safety_tolerance": 9}},
        [],
    ],
    ids=[
        "no-model",
        "no-input",
        "input-not-object",
        "no-prompt",
        "bad-aspect",
        "bad-tolerance",
        "not-object",
    ],
)
async def test_invalid_create_is_400_and_creates_nothing(
    make_sim: MakeSim, http: aiohttp.ClientSession, body: Any
) -> None:
    sim = await make_sim()
    reply = await call(http, "POST", f"{sim.base_url}/v1/prediction/", body)
    assert reply.status == 400
    assert isinstance(reply.json()["error"], str)
    assert sim.stats.creates == 0


async def test_unknown_prediction_is_404(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim()
    reply = await call(http, "GET", f"{sim.base_url}/v1/prediction/nope")
    assert reply.status == 404
    assert reply.json() == {"error": "Prediction not found"}


# -- limits ----------------------------------------------------------------------------------------


async def test_window_rejects_request_past_rate_count_with_retry_after(
    make_sim: MakeSim, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    sim = await make_sim(rate_count=3, rate_period=10.0)
    model_url = f"{sim.base_url}/v1/model?slug={MODEL}"
    assert [(await call(http, "GET", model_url)).status for _ in range(3)] == [200, 200, 200]

    rejected = await call(http, "GET", model_url)
    assert rejected.status == 429
    assert rejected.json() == {"error": "Too many requests"}
    assert rejected.headers["Retry-After"] == "10"
    clock.advance(4.5)
    assert (await call(http, "GET", model_url)).headers["Retry-After"] == "6"  # ceil(5.5)
    # Downloads, uploads and the stats endpoint are not API-host requests: the full window does not stop them.
    assert (await call(http, "GET", f"{sim.base_url}/_sim/stats")).status == 200
    assert (await call(http, "GET", f"{sim.base_url}/outputs/none.png")).status == 404
    clock.advance(5.5)
    assert (await call(http, "GET", model_url)).status == 200

    assert sim.stats.rate_limited == 2
    assert sim.stats.faults_injected == {}
    assert sim.stats.max_window == 5  # the busiest window saw 3 admitted + 2 rejected arrivals


@pytest.mark.parametrize(
    ("arrivals", "expected"),
    [
        ([0.0, 0.0, 5.0, 9.9, 10.0, 15.0], 4),  # (-0.1, 9.9] holds 0, 0, 5, 9.9; at 10 the zeros have left
        ([0.0, 10.0, 20.0, 30.0], 1),  # exactly one period apart: never together
        ([0.0, 1.0, 2.0, 3.0, 30.0, 31.0], 4),
        ([0.0, 9.0, 12.0, 18.0, 19.5], 3),  # (8, 18] holds 9, 12, 18; (9.5, 19.5] holds 12, 18, 19.5
    ],
)
async def test_max_window_is_the_busiest_sliding_window(
    make_sim: MakeSim, http: aiohttp.ClientSession, clock: FakeClock, arrivals: list[float], expected: int
) -> None:
    sim = await make_sim(rate_count=100, rate_period=10.0)
    start = clock.now
    for at in arrivals:
        clock.now = start + at
        assert (await call(http, "GET", f"{sim.base_url}/v1/model?slug={MODEL}")).status == 200
    exact = max(sum(1 for a in arrivals if t - 10.0 < a <= t) for t in arrivals)
    assert sim.stats.max_window == exact == expected


async def test_concurrency_cap_rejects_create_and_creates_nothing(
    make_sim: MakeSim, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    sim = await make_sim(concurrency=2)
    await create_id(http, sim, job("one"))
    await create_id(http, sim, job("two"))
    rejected = await create(http, sim, job("three"))
    assert rejected.status == 429
    assert rejected.json() == {"error": "Concurrency limit reached"}
    assert sim.stats.creates == 2
    assert sim.stats.concurrency_rejected == 1
    assert input_key(MODEL, job("three")["input"]) not in sim.stats.creates_by_input
    clock.advance(1.0)  # both finish: slots free by the server's clock, without any poll
    await create_id(http, sim, job("three"))
    assert sim.stats.max_in_flight == 2


async def test_max_in_flight_is_the_most_running_at_once(
    make_sim: MakeSim, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    sim = await make_sim(concurrency=10)
    for i in range(3):
        await create_id(http, sim, job(f"a{i}"))
    clock.advance(0.5)
    for i in range(2):
        await create_id(http, sim, job(f"b{i}"))
    assert sim.in_flight() == 5
    clock.advance(0.6)  # the first three are done
    await create_id(http, sim, job("c"))
    assert sim.in_flight() == 3
    assert sim.stats.max_in_flight == 5


async def cancel(http: aiohttp.ClientSession, sim: Simulator, prediction_id: str) -> Reply:
    return await call(http, "POST", f"{sim.base_url}/v1/prediction/{prediction_id}/cancel")


async def test_cancel_that_stops_ends_prediction_unbilled_and_frees_its_slot(
    make_sim: MakeSim, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    sim = await make_sim(concurrency=1, faults=Faults(cancel_stops=1.0))
    prediction_id = await create_id(http, sim)
    reply = await cancel(http, sim, prediction_id)
    assert reply.status == 200
    # "success": the cancel is accepted (as documented); that it took shows in the prediction's status.
    assert reply.json() == {
        "status": "success",
        "message": "Prediction canceled successfully",
        "predictionID": prediction_id,
    }
    clock.advance(5)
    view = await poll(http, sim, prediction_id)
    assert (view["status"], view["metrics"]["cost"]) == ("cancelled", 0.0)
    assert (await call(http, "GET", f"{sim.base_url}/outputs/{prediction_id}.png")).status == 404
    await create_id(http, sim, job("next"))
    assert sim.stats.cancels == 1


async def test_cancel_is_only_recorded_by_default_and_the_prediction_runs_to_success_billed(
    make_sim: MakeSim, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    sim = await make_sim(concurrency=1)
    prediction_id = await create_id(http, sim)
    clock.advance(0.5)
    reply = await cancel(http, sim, prediction_id)
    assert reply.json() == {
        "status": "success",
        "message": "Prediction canceled successfully",
        "predictionID": prediction_id,
    }
    assert (await poll(http, sim, prediction_id))["status"] == "processing"
    # It still runs, so it still holds its slot.
    assert (await create(http, sim, job("next"))).status == 429
    clock.advance(0.5)
    view = await poll(http, sim, prediction_id)
    assert view["status"] == "success"
    assert view["metrics"] == {"predict_time": 1.0, "cost": 0.08}
    assert (await call(http, "GET", output_url(view["output"]))).status == 200
    # Cancelling what has finished answers success.
    assert (await cancel(http, sim, prediction_id)).json()["status"] == "success"
    assert sim.stats.faults_injected == {}


async def test_record_only_cancel_of_a_failing_prediction_shows_its_failure(
    make_sim: MakeSim, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    sim = await make_sim(faults=Faults(input_error=1.0))
    prediction_id = await create_id(http, sim)
    assert (await cancel(http, sim, prediction_id)).json()["status"] == "success"
    clock.advance(1)
    view = await poll(http, sim, prediction_id)
    assert view["status"] == "error"
    assert view["output"]["error_code"] == "INPUT_DOWNLOAD_ERROR"


async def test_cancel_of_unknown_prediction_is_500_not_404(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim()
    reply = await cancel(http, sim, "nope")
    assert reply.status == 500
    assert reply.json() == {"error": "Internal Server Error"}


# -- auth ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("api_key", "headers", "status", "error"),
    [
        ("secret", {"X-API-Key": "wrong"}, 401, "Invalid API key"),
        ("secret", {"X-API-Key": "", "Authorization": "Bearer wrong"}, 401, "Invalid API key"),
        ("secret", {"X-API-Key": "secret"}, 200, None),
        ("secret", {"X-API-Key": "", "Authorization": "Bearer secret"}, 200, None),
        (None, {"X-API-Key": "anything"}, 200, None),
        (None, {"X-API-Key": ""}, 401, "Missing API key"),
    ],
)
async def test_api_key_is_checked_on_api_requests(
    make_sim: MakeSim,
    http: aiohttp.ClientSession,
    api_key: str | None,
    headers: dict[str, str],
    status: int,
    error: str | None,
) -> None:
    sim = await make_sim(api_key=api_key)
    reply = await call(http, "POST", f"{sim.base_url}/v1/prediction/", job(), headers=headers)
    assert reply.status == status
    if error is not None:
        assert reply.json() == {"error": error}
        assert sim.stats.creates == 0


@pytest.mark.parametrize(
    ("accepted", "headers", "status"),
    [
        ("bearer", {"X-API-Key": "", "Authorization": "Bearer secret"}, 200),
        ("bearer", {"X-API-Key": "secret"}, 401),
        ("x-api-key", {"X-API-Key": "secret"}, 200),
        ("x-api-key", {"X-API-Key": "", "Authorization": "Bearer secret"}, 401),
        ("both", {"X-API-Key": "secret", "Authorization": "Bearer secret"}, 200),
        ("both", {"X-API-Key": "", "Authorization": "bearer secret"}, 200),
    ],
)
async def test_server_can_accept_only_one_key_header(
    make_sim: MakeSim, http: aiohttp.ClientSession, accepted: str, headers: dict[str, str], status: int
) -> None:
    sim = await make_sim(api_key="secret", auth_headers=accepted)
    reply = await call(http, "POST", f"{sim.base_url}/v1/prediction/", job(), headers=headers)
    assert reply.status == status
    if status == 401:
        assert reply.json() == {"error": "Missing API key"}


async def test_model_catalog_needs_no_key(make_sim: MakeSim) -> None:
    sim = await make_sim(api_key="secret")
    async with aiohttp.ClientSession() as anonymous:
        reply = await call(anonymous, "GET", f"{sim.base_url}/v1/model?slug={MODEL}")
        assert reply.status == 200
        assert set(reply.json()) == {"title", "slug", "version", "output_type", "request_schema"}
        assert (await call(anonymous, "GET", f"{sim.base_url}/v1/executions")).status == 401


@pytest.mark.parametrize("method", ["model", "create", "unknown-prediction", "window-429", "download-404", "route"])
async def test_response_echoes_the_clients_request_id(
    make_sim: MakeSim, http: aiohttp.ClientSession, method: str
) -> None:
    sim = await make_sim(rate_count=1)
    mine = {"X-Request-Id": "client-7f3a.0001"}
    if method == "window-429":
        await call(http, "GET", f"{sim.base_url}/v1/model?slug={MODEL}")
    urls = {
        "model": ("GET", f"/v1/model?slug={MODEL}"),
        "create": ("POST", "/v1/prediction/"),
        "unknown-prediction": ("GET", "/v1/prediction/nope"),
        "window-429": ("GET", f"/v1/model?slug={MODEL}"),
        "download-404": ("GET", "/outputs/x.png"),
        "route": ("GET", "/nowhere"),
    }
    verb, path = urls[method]
    reply = await call(http, verb, f"{sim.base_url}{path}", job() if verb == "POST" else None, headers=mine)
    assert reply.headers["X-Request-Id"] == "client-7f3a.0001"


# -- model, uploads, images ------------------------------------------------------------------------


async def test_model_answers_flux_kontext_schema_and_404_for_unknown_slug(
    make_sim: MakeSim, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim()
    reply = await call(http, "GET", f"{sim.base_url}/v1/model?slug={MODEL}")
    schema = reply.json()["request_schema"]
    assert reply.json()["slug"] == MODEL
    assert reply.json()["title"] == "FLUX.1 Kontext [max]"
    assert reply.json()["output_type"] == "image"
    assert schema["required"] == ["prompt"]
    props = schema["properties"]
    assert props["prompt"]["type"] == "string"
    assert props["input_image"]["type"] == "string"
    assert "match_input_image" in props["aspect_ratio"]["enum"]
    assert props["seed"]["type"] == "integer"
    assert (props["safety_tolerance"]["minimum"], props["safety_tolerance"]["maximum"]) == (0, 6)
    assert props["output_format"]["enum"] == ["png", "jpg"]
    assert (await call(http, "GET", f"{sim.base_url}/v1/model?slug=nope")).status == 404


async def test_presigned_upload_is_served_and_feeds_the_output(
    make_sim: MakeSim, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    sim = await make_sim()
    presign = await call(http, "POST", f"{sim.base_url}/v1/upload/presign", {"content_type": "image/png"})
    ticket = presign.json()
    assert ticket["required_headers"] == {"x-amz-meta-file-id": ticket["id"]}
    assert ticket["presigned_url"] == f"{sim.base_url}/_upload/{ticket['id']}"
    assert (await call(http, "GET", ticket["public_url"])).status == 404

    buffer = io.BytesIO()
    Image.new("RGB", (400, 200), (0, 0, 255)).save(buffer, "PNG")
    headers = {"Content-Type": "image/png", **ticket["required_headers"]}
    put = await call(http, "PUT", ticket["presigned_url"], data=buffer.getvalue(), headers=headers)
    assert put.status == 200
    served = await call(http, "GET", ticket["public_url"])
    assert served.body == buffer.getvalue()
    assert served.headers["Content-Type"] == "image/png"

    body = job(input_image=ticket["public_url"], aspect_ratio="match_input_image")
    image = await finished_output(http, sim, clock, body)
    assert image.size == (256, 128)
    red, green, blue = image.convert("RGB").getpixel((200, 100))  # type: ignore[misc]
    assert blue > red and blue > green  # the blue upload shows through the tint
    assert (sim.stats.presigns, sim.stats.uploads) == (1, 1)


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 0, 255)).save(buffer, "PNG")
    return buffer.getvalue()


async def presign(http: aiohttp.ClientSession, sim: Simulator, **body: Any) -> dict[str, Any]:
    reply = await call(http, "POST", f"{sim.base_url}/v1/upload/presign", {"content_type": "image/png", **body})
    assert reply.status == 200, reply.body
    ticket: dict[str, Any] = reply.json()
    return ticket


@pytest.mark.parametrize(
    ("headers", "accepted"),
    [
        ({"Content-Type": "image/png", "x-amz-meta-file-id": "{id}"}, True),
        ({"Content-Type": "image/png", "X-Amz-Meta-File-Id": "{id}"}, True),  # header names are case-blind
        ({"Content-Type": "image/png"}, False),  # required_headers left out
        ({"x-amz-meta-file-id": "{id}"}, False),  # Content-Type left out: required_headers do not carry it
        ({"Content-Type": "image/jpeg", "x-amz-meta-file-id": "{id}"}, False),
        ({"Content-Type": "image/png", "x-amz-meta-file-id": "{id}-other"}, False),
    ],
)
async def test_upload_put_needs_presign_content_type_and_every_required_header(
    make_sim: MakeSim, http: aiohttp.ClientSession, headers: dict[str, str], accepted: bool
) -> None:
    sim = await make_sim()
    ticket = await presign(http, sim)
    sent = {name: value.format(id=ticket["id"]) for name, value in headers.items()}
    if "Content-Type" not in sent:
        sent["Content-Type"] = ""  # aiohttp would add application/octet-stream
    reply = await call(http, "PUT", ticket["presigned_url"], data=png_bytes(), headers=sent)
    if accepted:
        assert reply.status == 200
        assert sim.stats.uploads == 1
    else:
        assert reply.status == 403
        assert reply.headers["Content-Type"].startswith("application/xml")
        assert b"<Error><Code>SignatureDoesNotMatch</Code>" in reply.body
        assert (await call(http, "GET", ticket["public_url"])).status == 404


async def test_presign_can_answer_empty_required_headers_and_then_content_type_is_enough(
    make_sim: MakeSim, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim(faults=Faults(presign_empty_headers=1.0))
    ticket = await presign(http, sim)
    assert ticket["required_headers"] == {}
    wrong = await call(http, "PUT", ticket["presigned_url"], data=png_bytes(), headers={"Content-Type": "x/y"})
    assert wrong.status == 403
    put = await call(http, "PUT", ticket["presigned_url"], data=png_bytes(), headers={"Content-Type": "image/png"})
    assert put.status == 200


@pytest.mark.parametrize(
    ("asked", "retention"),
    [
        ({}, 180 * 86400),
        ({"expires_in_seconds": 3600}, 3600),
        ({"expires_in_seconds": 10}, 60),
        ({"expires_in_seconds": 10**9}, 365 * 86400),
        ({"expires_in_seconds": 90.7, "file_type": "image"}, 90),
    ],
)
async def test_presign_expiry_is_the_files_retention_clamped_not_refused(
    make_sim: MakeSim, http: aiohttp.ClientSession, clock: FakeClock, asked: dict[str, Any], retention: int
) -> None:
    sim = await make_sim()
    ticket = await presign(http, sim, **asked)
    assert set(ticket) == {"id", "presigned_url", "public_url", "expires_at", "required_headers"}
    assert ticket["expires_at"] == format_time(sim.wall_time(clock.now + retention))
    assert ticket["expires_at"].endswith("Z")


@pytest.mark.parametrize("body", [{"expires_in_seconds": "soon"}, {"expires_in_seconds": True}, {"file_type": 3}])
async def test_presign_refuses_values_that_are_not_numbers_or_strings(
    make_sim: MakeSim, http: aiohttp.ClientSession, body: dict[str, Any]
) -> None:
    sim = await make_sim()
    reply = await call(http, "POST", f"{sim.base_url}/v1/upload/presign", {"content_type": "image/png", **body})
    assert reply.status == 400
    assert isinstance(reply.json()["error"], str)


async def test_upload_url_lasts_fifteen_minutes_whatever_the_retention(
    make_sim: MakeSim, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    sim = await make_sim()
    tickets = [await presign(http, sim, expires_in_seconds=86400) for _ in range(2)]
    headers = [{"Content-Type": "image/png", **t["required_headers"]} for t in tickets]
    clock.advance(15 * 60)
    assert (await call(http, "PUT", tickets[0]["presigned_url"], data=png_bytes(), headers=headers[0])).status == 200
    clock.advance(1)
    late = await call(http, "PUT", tickets[1]["presigned_url"], data=png_bytes(), headers=headers[1])
    assert late.status == 403
    assert b"<Code>AccessDenied</Code>" in late.body


async def test_stored_file_is_gone_after_its_retention(
    make_sim: MakeSim, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    sim = await make_sim()
    ticket = await presign(http, sim, expires_in_seconds=60)
    headers = {"Content-Type": "image/png", **ticket["required_headers"]}
    assert (await call(http, "PUT", ticket["presigned_url"], data=png_bytes(), headers=headers)).status == 200
    clock.advance(60)
    assert (await call(http, "GET", ticket["public_url"])).status == 200
    clock.advance(1)
    assert (await call(http, "GET", ticket["public_url"])).status == 404
    prediction_id = await create_id(http, sim, job(input_image=ticket["public_url"]))
    clock.advance(1)
    assert (await poll(http, sim, prediction_id))["output"]["error_code"] == "INPUT_DOWNLOAD_ERROR"


async def test_input_naming_an_upload_never_completed_fails_with_input_download_error(
    make_sim: MakeSim, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    sim = await make_sim()
    ticket = (await call(http, "POST", f"{sim.base_url}/v1/upload/presign", {"content_type": "image/png"})).json()
    prediction_id = await create_id(http, sim, job(input_image=ticket["public_url"]))
    clock.advance(2)
    view = await poll(http, sim, prediction_id)
    assert view["status"] == "error"
    assert view["output"]["error_code"] == "INPUT_DOWNLOAD_ERROR"


@pytest.mark.parametrize(
    ("aspect", "size"),
    [
        ("1:1", (256, 256)),
        ("16:9", (256, 144)),
        ("9:16", (144, 256)),
        ("4:3", (256, 192)),
        ("21:9", (256, 110)),
    ],
)
async def test_output_image_has_requested_aspect_ratio(
    make_sim: MakeSim, http: aiohttp.ClientSession, clock: FakeClock, aspect: str, size: tuple[int, int]
) -> None:
    sim = await make_sim()
    body = job(input_image="https://example.com/cat.jpg", aspect_ratio=aspect, seed=7)
    image = await finished_output(http, sim, clock, body)
    assert image.format == "PNG"
    assert image.size == size


async def test_match_input_image_keeps_the_data_uri_input_ratio(
    make_sim: MakeSim, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    sim = await make_sim(image_size=300)
    image = await finished_output(http, sim, clock, job(input_image=png_data_uri(90, 270)))
    assert image.size == (100, 300)


async def test_same_job_renders_same_bytes_and_different_prompts_differ(
    make_sim: MakeSim, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    sim = await make_sim()
    bodies = [job("red car", seed=1), job("red car", seed=1), job("blue boat", seed=1)]
    ids = [await create_id(http, sim, body) for body in bodies]
    clock.advance(2)
    images = [(await call(http, "GET", f"{sim.base_url}/outputs/{pid}.png")).body for pid in ids]
    assert images[0] == images[1] != images[2]


# -- faults ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("faults", "status", "content_type", "retry_after"),
    [
        (Faults(rate_limit=1.0), 429, "application/json", "1"),
        (Faults(rate_limit_no_retry_after=1.0), 429, "application/json", None),
        (Faults(server_error_html=1.0), 502, "text/html", None),
    ],
)
async def test_spurious_error_answers_instead_and_creates_nothing(
    make_sim: MakeSim,
    http: aiohttp.ClientSession,
    faults: Faults,
    status: int,
    content_type: str,
    retry_after: str | None,
) -> None:
    sim = await make_sim(faults=faults)
    reply = await create(http, sim)
    assert reply.status == status
    assert reply.headers["Content-Type"].startswith(content_type)
    assert reply.headers.get("Retry-After") == retry_after
    assert sim.stats.creates == 0
    assert sim.stats.rate_limited == 0  # spurious 429s are faults, not the window
    assert sum(sim.stats.faults_injected.values()) == 1


async def test_empty_server_errors_alternate_500_and_503(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(faults=Faults(server_error_empty=1.0))
    replies = [await create(http, sim) for _ in range(2)]
    assert sorted(r.status for r in replies) == [500, 503]
    assert all(r.body == b"" for r in replies)


async def test_malformed_json_answer_is_not_json_and_its_create_is_a_lost_answer(
    make_sim: MakeSim, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim(faults=Faults(malformed_json=1.0))
    for _ in range(2):  # alternates truncated JSON and plain text
        reply = await create(http, sim)
        assert reply.status == 200
        with pytest.raises(ValueError):
            reply.json()
    assert sim.stats.creates == sim.stats.lost_answers == 2


@pytest.mark.parametrize(
    ("faults", "creates", "lost"),
    [(Faults(reset_before=1.0), 0, 0), (Faults(reset_before_create=1.0), 0, 0), (Faults(reset_after=1.0), 1, 1)],
)
async def test_connection_reset_is_a_disconnect_and_counts_what_was_created(
    make_sim: MakeSim, http: aiohttp.ClientSession, faults: Faults, creates: int, lost: int
) -> None:
    sim = await make_sim(faults=faults)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await create(http, sim)
    assert (sim.stats.creates, sim.stats.lost_answers) == (creates, lost)


async def test_reset_before_create_spares_every_other_request(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(faults=Faults(reset_before_create=1.0))
    reply = await call(http, "GET", f"{sim.base_url}/v1/executions")
    assert reply.status == 200
    assert sim.stats.faults_injected == {}


async def test_slow_create_past_client_timeout_is_a_lost_answer(make_sim: MakeSim) -> None:
    sim = await make_sim(faults=Faults(slow=1.0, slow_seconds=0.15))
    async with aiohttp.ClientSession(
        headers={"X-API-Key": KEY}, timeout=aiohttp.ClientTimeout(total=0.05)
    ) as impatient:
        with pytest.raises(asyncio.TimeoutError):
            await create(impatient, sim)
    assert sim.stats.creates == 1
    await asyncio.sleep(0.2)  # the server finds the client gone when its slow answer is due
    assert sim.stats.lost_answers == 1


async def test_truncated_download_sends_fewer_bytes_than_content_length(
    make_sim: MakeSim, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    sim = await make_sim(faults=Faults(truncated_download=1.0))
    prediction_id = await create_id(http, sim)
    clock.advance(2)
    with pytest.raises(aiohttp.ClientPayloadError):
        await call(http, "GET", f"{sim.base_url}/outputs/{prediction_id}.png")
    assert sim.stats.faults_injected["truncated_download"] == 1


async def test_download_is_404_until_delay_after_finish_then_200(
    make_sim: MakeSim, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    sim = await make_sim(faults=Faults(download_404_seconds=5.0))
    prediction_id = await create_id(http, sim)
    url = f"{sim.base_url}/outputs/{prediction_id}.png"
    clock.advance(1.0)
    assert (await poll(http, sim, prediction_id))["status"] == "success"
    assert (await call(http, "GET", url)).status == 404
    clock.advance(4.9)
    assert (await call(http, "GET", url)).status == 404
    clock.advance(0.1)
    assert (await call(http, "GET", url)).status == 200


def without_message(output: dict[str, Any]) -> dict[str, Any]:
    assert isinstance(output.pop("error_message"), str) and output  # every envelope says why
    return output


@pytest.mark.parametrize("failed_status", ["error", "failed"])
@pytest.mark.parametrize(
    ("faults", "codes"),
    [
        (Faults(provider_rate_limit=1.0), [("PROVIDER_RATE_LIMIT", True, "RATE_LIMIT")] * 2),
        (Faults(input_error=1.0), [("INPUT_DOWNLOAD_ERROR", False, "INPUT")] * 2),
        # Codes a client might file as permanent, marked retryable: a client must branch on ``retryable``.
        (
            Faults(retryable_failure=1.0),
            [("PROVIDER_SERVER_ERROR", True, "PROVIDER"), ("NETWORK_ERROR", True, "NETWORK")],
        ),
    ],
)
async def test_failed_prediction_carries_the_documented_envelope_in_output(
    make_sim: MakeSim,
    http: aiohttp.ClientSession,
    clock: FakeClock,
    failed_status: str,
    faults: Faults,
    codes: list[tuple[str, bool, str]],
) -> None:
    sim = await make_sim(faults=faults, failed_status=failed_status)
    ids = [await create_id(http, sim, job(f"p{i}")) for i in range(2)]
    clock.advance(1)
    for prediction_id, (code, retryable, category) in zip(ids, codes, strict=True):
        view = await poll(http, sim, prediction_id)
        assert view["status"] == failed_status
        assert without_message(view["output"]) == {
            "error": "Execution failed",
            "error_code": code,
            "retryable": retryable,
            "classification": {"category": category},
            "status": "ERROR",
            "success": False,
        }
        assert view["metrics"] == {"predict_time": 1.0, "cost": 0.0}
        assert (await call(http, "GET", f"{sim.base_url}/outputs/{prediction_id}.png")).status == 404


async def test_generic_failures_rotate_envelope_dispatch_error_and_logs_only(
    make_sim: MakeSim, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    sim = await make_sim(failure_rate=1.0)
    ids = [await create_id(http, sim, job(f"p{i}")) for i in range(3)]
    clock.advance(1)
    views = [await poll(http, sim, pid) for pid in ids]
    assert [v["status"] for v in views] == ["error"] * 3
    assert all(v["metrics"]["cost"] == 0.0 for v in views)
    enveloped, dispatch, logs_only = views
    assert without_message(enveloped["output"])["error_code"] == "PROVIDER_FAILED"
    assert enveloped["output"]["retryable"] is False
    assert list(dispatch["output"]) == ["error"] and dispatch["output"]["error"]
    assert logs_only["output"] is None and "Error" in logs_only["logs"]


async def test_never_finish_stays_processing_until_a_cancel_stops_it(
    make_sim: MakeSim, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    sim = await make_sim(faults=Faults(never_finish=1.0, cancel_stops=1.0))
    prediction_id = await create_id(http, sim)
    clock.advance(10_000)
    assert (await poll(http, sim, prediction_id))["status"] == "processing"
    assert sim.in_flight() == 1
    await cancel(http, sim, prediction_id)
    assert (await poll(http, sim, prediction_id))["status"] == "cancelled"
    assert sim.in_flight() == 0


@pytest.mark.parametrize(
    ("settings", "target"),
    [
        ({}, "invalid-create"),
        ({"api_key": "secret"}, "bad-key"),
        ({}, "bad-listing"),
    ],
)
async def test_empty_error_bodies_empty_400_and_401_answers(
    make_sim: MakeSim, http: aiohttp.ClientSession, settings: dict[str, Any], target: str
) -> None:
    sim = await make_sim(faults=Faults(empty_error_bodies=1.0), **settings)
    if target == "bad-listing":
        reply = await call(http, "GET", f"{sim.base_url}/v1/executions?limit=0")
    else:
        reply = await call(http, "POST", f"{sim.base_url}/v1/prediction/", {"model": MODEL, "input": {}})
    assert reply.status in (400, 401)
    assert reply.json() == {}
    # Other errors keep their body.
    good_key = {"X-API-Key": settings.get("api_key", KEY)}
    unknown = await call(http, "GET", f"{sim.base_url}/v1/prediction/nope", headers=good_key)
    assert unknown.json() == {"error": "Prediction not found"}


async def test_gateway_timeout_after_create_answers_html_504_and_the_prediction_exists(
    make_sim: MakeSim, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    sim = await make_sim(faults=Faults(gateway_timeout_after_create=1.0))
    reply = await create(http, sim)
    assert reply.status == 504
    assert reply.headers["Content-Type"].startswith("text/html")
    assert b"504 Gateway Time-out" in reply.body
    assert (sim.stats.creates, sim.stats.lost_answers) == (1, 1)
    [(prediction_id, *_)] = sim.prediction_times()
    clock.advance(1)
    assert (await poll(http, sim, prediction_id))["status"] == "success"
    # Only creates are answered so: a poll is not.
    assert sim.stats.faults_injected == {"gateway_timeout_after_create": 1}


async def test_fresh_prediction_is_404_until_the_replica_has_seen_it(
    make_sim: MakeSim, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    sim = await make_sim(faults=Faults(fresh_404_seconds=0.5))
    prediction_id = await create_id(http, sim)
    url = f"{sim.base_url}/v1/prediction/{prediction_id}"
    assert (await call(http, "GET", url)).json() == {"error": "Prediction not found"}
    clock.advance(0.49)
    assert (await call(http, "GET", url)).status == 404
    clock.advance(0.01)
    assert (await call(http, "GET", url)).status == 200
    assert sim.stats.polls == 3


async def test_success_without_output_shows_an_empty_output_once_then_the_url(
    make_sim: MakeSim, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    sim = await make_sim(faults=Faults(success_without_output=1.0))
    prediction_id = await create_id(http, sim)
    clock.advance(0.5)
    assert (await poll(http, sim, prediction_id))["output"] is None  # still running: nothing withheld yet
    clock.advance(0.5)
    first = await poll(http, sim, prediction_id)
    assert (first["status"], first["output"]) == ("success", "")
    second = await poll(http, sim, prediction_id)
    assert second["output"] == f"{sim.base_url}/outputs/{prediction_id}.png"


async def test_payment_required_after_n_creates(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(faults=Faults(payment_required_after=2))
    statuses = [(await create(http, sim, job(f"p{i}"))).status for i in range(4)]
    assert statuses == [200, 200, 402, 402]
    assert sim.stats.creates == 2


# -- long poll, stats, ids, serve_forever ----------------------------------------------------------


async def test_long_poll_answers_when_prediction_finishes(
    make_sim: MakeSim, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    sim = await make_sim(long_poll=2.0)
    prediction_id = await create_id(http, sim)
    waiting = asyncio.create_task(call(http, "GET", f"{sim.base_url}/v1/prediction/{prediction_id}?wait=1"))
    await asyncio.sleep(0.02)
    assert not waiting.done()
    clock.advance(1)
    reply = await asyncio.wait_for(waiting, 1)
    assert reply.json()["status"] == "success"


async def test_sim_stats_endpoint_needs_no_key_and_shows_duplicates(
    make_sim: MakeSim, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim()
    await create_id(http, sim)
    await create_id(http, sim)
    async with aiohttp.ClientSession() as anonymous, anonymous.get(f"{sim.base_url}/_sim/stats") as response:
        stats = await response.json()
    assert stats["creates"] == 2
    assert stats["creates_by_input"] == {input_key(MODEL, job()["input"]): 2}
    assert stats["duplicates"] == 1
    assert stats["in_flight"] == 2
    assert stats == {**sim.stats.to_json(), "in_flight": 2}
    assert stats["requests"] == 2  # the stats call itself is not counted


@pytest.mark.parametrize(
    ("faults", "settings", "cancelled", "during", "after"),
    [
        (Faults(), {}, 0, 2, 2),  # three of the same request, all billed
        (Faults(), {}, 1, 2, 2),  # a cancel only recorded: it runs on and is billed
        (Faults(cancel_stops=1.0), {}, 1, 1, 1),  # a cancel that stops it: not a payment
        (Faults(), {"failure_rate": 1.0}, 0, 2, 0),  # running ones may be billed; failed ones are not
    ],
)
async def test_paid_twice_counts_predictions_beyond_the_first_that_did_not_fail(
    make_sim: MakeSim,
    http: aiohttp.ClientSession,
    clock: FakeClock,
    faults: Faults,
    settings: dict[str, Any],
    cancelled: int,
    during: int,
    after: int,
) -> None:
    sim = await make_sim(faults=faults, **settings)
    ids = [await create_id(http, sim) for _ in range(3)]
    await create_id(http, sim, job("another request"))
    for prediction_id in ids[:cancelled]:
        await cancel(http, sim, prediction_id)
    assert sim.stats.paid_twice == during
    clock.advance(2)
    assert sim.stats.paid_twice == after
    assert sim.stats.to_json()["paid_twice"] == after
    assert sim.stats.to_json()["duplicates"] == 2  # creates beyond the first, whatever became of them
    async with aiohttp.ClientSession() as anonymous, anonymous.get(f"{sim.base_url}/_sim/stats") as response:
        assert (await response.json())["paid_twice"] == after


async def test_every_response_carries_a_request_id(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(rate_count=1)
    replies = [
        await create(http, sim),
        await create(http, sim),  # 429 from the window
        await call(http, "GET", f"{sim.base_url}/nowhere"),
        await call(http, "GET", f"{sim.base_url}/outputs/x.png"),
    ]
    ids = [r.headers.get("X-Request-Id") for r in replies]
    assert all(ids) and len(set(ids)) == 4
    assert replies[2].json() == {"error": "Not Found"}


async def test_same_seed_gives_same_ids(clock: FakeClock, http: aiohttp.ClientSession) -> None:
    ids: list[str] = []
    for seed in (1, 1, 2):
        async with Simulator(SimConfig(seed=seed), clock=clock) as sim:
            ids.append(await create_id(http, sim))
    assert ids[0] == ids[1] != ids[2]


async def test_serve_forever_reports_its_url_and_serves_until_cancelled(http: aiohttp.ClientSession) -> None:
    ready: asyncio.Queue[str] = asyncio.Queue()
    server = asyncio.create_task(serve_forever(SimConfig(), ready=ready.put_nowait))
    base_url = await asyncio.wait_for(ready.get(), 2)
    assert (await call(http, "GET", f"{base_url}/_sim/stats")).status == 200
    server.cancel()
    with pytest.raises(asyncio.CancelledError):
        await server
    with pytest.raises(aiohttp.ClientConnectionError):
        await call(http, "GET", f"{base_url}/_sim/stats")


async def test_hundred_job_batch_is_served_quickly(
    make_sim: MakeSim, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    sim = await make_sim(concurrency=100, rate_count=1000)
    started = time.process_time()
    ids = await asyncio.gather(*(create_id(http, sim, job(f"job {i}", seed=i)) for i in range(100)))
    clock.advance(2)
    views = await asyncio.gather(*(poll(http, sim, pid) for pid in ids))
    downloads = await asyncio.gather(*(call(http, "GET", output_url(v["output"])) for v in views))
    assert all(d.status == 200 for d in downloads)
    # Client and server share this process: the whole round trip stays far below a second of CPU.
    assert time.process_time() - started < 2.0


async def test_sim_reset_forgets_predictions_and_counters(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim()
    prediction_id = await create_id(http, sim)
    assert (await call(http, "POST", f"{sim.base_url}/_sim/reset")).status == 200
    assert sim.stats.creates == 0
    assert sim.in_flight() == 0
    assert (await call(http, "GET", f"{sim.base_url}/v1/prediction/{prediction_id}")).status == 404


# -- executions listing ----------------------------------------------------------------------------


async def listing(
    http: aiohttp.ClientSession, sim: Simulator, query: dict[str, str] | None = None, **kwargs: Any
) -> Reply:
    suffix = f"?{urllib.parse.urlencode(query)}" if query else ""
    return await call(http, "GET", f"{sim.base_url}/v1/executions{suffix}", **kwargs)


async def listed(http: aiohttp.ClientSession, sim: Simulator, query: dict[str, str] | None = None) -> dict[str, Any]:
    reply = await listing(http, sim, query)
    assert reply.status == 200, reply.body
    page: dict[str, Any] = reply.json()
    return page


async def test_executions_list_every_prediction_newest_first_with_a_url_or_null_as_output(
    make_sim: MakeSim, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    sim = await make_sim()
    start = clock.now
    succeeded = await create_id(http, sim)
    clock.advance(0.3)
    never_uploaded = (await presign(http, sim))["public_url"]
    failed = await create_id(http, sim, job("fails", input_image=never_uploaded))
    clock.advance(0.3)
    # Another key of the same organisation: the listing holds every key's predictions.
    other = await call(http, "POST", f"{sim.base_url}/v1/prediction/", job("other"), headers={"X-API-Key": "k2"})
    running = other.json()["predictionID"]
    await cancel(http, sim, running)  # only recorded: the listing shows it running on
    clock.advance(0.8)

    page = await listed(http, sim)
    rows = page["executions"]
    assert page["total_count"] == 3
    assert [r["id"] for r in rows] == [running, failed, succeeded]
    for row in rows:
        assert set(row) == {
            *("id", "model", "requested_model", "status", "execution_cost", "run_time"),
            *("created_at", "started_at", "completed_at", "output"),
        }
        assert (row["model"], row["requested_model"]) == (MODEL, MODEL)
    wall = sim.wall_time
    assert rows[0] | {"output": None} == {
        "id": running,
        "model": MODEL,
        "requested_model": MODEL,
        "status": "processing",
        "execution_cost": 0,
        "run_time": 0,
        "created_at": format_time(wall(start + 0.6)),
        "started_at": format_time(wall(start + 0.6 + 0.25)),
        "completed_at": None,
        "output": None,
    }
    # No failure envelope in a row (ExecutionSummary.output is a string or null): a GET of it shows the envelope.
    assert (rows[1]["status"], rows[1]["execution_cost"], rows[1]["output"]) == ("error", 0.0, None)
    assert (await poll(http, sim, failed))["output"]["error_code"] == "INPUT_DOWNLOAD_ERROR"
    assert (rows[2]["status"], rows[2]["execution_cost"], rows[2]["run_time"]) == ("success", 0.08, 1.0)
    assert rows[2]["output"] == f"{sim.base_url}/outputs/{succeeded}.png"
    assert rows[2]["created_at"] == format_time(wall(start))
    assert rows[2]["completed_at"] == format_time(wall(start + 1.0))
    assert rows[2]["created_at"].endswith("Z")
    assert sim.stats.listings == 1


def test_wall_time_is_the_injected_clock_plus_a_fixed_epoch(clock: FakeClock) -> None:
    sim = Simulator(SimConfig(), clock=clock, wall_epoch=1_800_000_000.0 - clock.now)
    assert format_time(sim.wall_time(clock.now)) == "2027-01-15T08:00:00.000000Z"
    assert format_time(sim.wall_time(clock.now + 1.25)) == "2027-01-15T08:00:01.250000Z"


async def test_executions_page_by_limit_and_offset_with_fifty_by_default(
    make_sim: MakeSim, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    sim = await make_sim(concurrency=100, rate_count=1000)
    ids = []
    for i in range(55):
        ids.append(await create_id(http, sim, job(f"job {i}")))
        clock.advance(0.001)
    newest_first = ids[::-1]
    default = await listed(http, sim)
    assert [r["id"] for r in default["executions"]] == newest_first[:50]
    assert default["total_count"] == 55
    pages = [await listed(http, sim, {"limit": "20", "offset": str(o)}) for o in (0, 20, 40)]
    assert [len(p["executions"]) for p in pages] == [20, 20, 15]
    assert [r["id"] for p in pages for r in p["executions"]] == newest_first
    assert (await listed(http, sim, {"limit": "100", "offset": "55"}))["executions"] == []


def test_executions_total_count_is_capped_but_paging_goes_on_past_it() -> None:
    predictions = [
        Prediction(
            id=f"p{i}",
            model=MODEL,
            input={},
            key="k",
            seq=i,
            created_at=float(i),
            duration=1.0,
            finish_at=i + 1.0,
            outcome=Outcome.SUCCESS,
            early_status="created",
            shape="string",
            failed_word="error",
        )
        for i in range(TOTAL_COUNT_CAP + 5)
    ]
    wall = functools.partial(datetime.fromtimestamp, tz=UTC)
    last = list_executions(predictions, ListingQuery(limit=100, offset=1000), now=5000.0, base_url="", wall=wall)
    assert last["total_count"] == TOTAL_COUNT_CAP == 1000
    assert [r["id"] for r in last["executions"]] == ["p4", "p3", "p2", "p1", "p0"]


def _reference_listing(predictions: list[Prediction], query: ListingQuery, now: float, lag: float) -> list[str]:
    """Every prediction filtered one by one, then sorted: what the listing must show, however it is read."""
    wall = functools.partial(datetime.fromtimestamp, tz=UTC)
    rows = [
        p
        for p in predictions
        if now >= p.created_at + lag
        and (query.models is None or p.model in query.models)
        and (query.statuses is None or p.status(now) in query.statuses)
        and (query.since is None or wall(p.created_at) >= query.since)
        and (query.until is None or wall(p.created_at) <= query.until)
    ]
    rows.sort(key=lambda p: (p.created_at, p.seq), reverse=True)
    return [p.id for p in rows]


def test_executions_read_newest_first_match_filtering_everything() -> None:
    # Many predictions, some created within one microsecond, bounds taken from the timestamps rows show: the
    # listing stops reading once it knows its page and count, and still lists exactly what a full scan would.
    rng = random.Random(7)
    t = 1_700_000_000.0
    predictions = []
    for i in range(3000):
        t += rng.choice((0.0, 1e-7, 4e-7, 1e-6, 0.013, 0.5))
        predictions.append(
            Prediction(
                id=f"p{i}",
                model=rng.choice((MODEL, "flux-kontext-pro")),
                input={},
                key="k",
                seq=i,
                created_at=t,
                duration=rng.uniform(0.1, 40.0),
                finish_at=math.inf,
                outcome=Outcome.SUCCESS,
                early_status="created",
                shape="string",
                failed_word="error",
            )
        )
    wall = functools.partial(datetime.fromtimestamp, tz=UTC)
    now = t + 1.0
    for _ in range(300):
        a, b = sorted(rng.sample(predictions, 2), key=lambda p: p.seq)
        since = parse_rfc3339(format_time(wall(a.created_at))) if rng.random() < 0.8 else None
        until = parse_rfc3339(format_time(wall(b.created_at))) if rng.random() < 0.5 else None
        query = ListingQuery(
            limit=rng.choice((1, 20, 100)),
            offset=rng.choice((0, 0, 7, 100, 950, 1200)),
            models=rng.choice((None, frozenset({MODEL}))),
            statuses=rng.choice((None, frozenset({"success"}), frozenset({"processing", "starting"}))),
            since=since,
            until=until,
        )
        lag = rng.choice((0.0, 0.0, 2.0))
        expected = _reference_listing(predictions, query, now, lag)
        page = list_executions(predictions, query, now=now, base_url="", wall=wall, lag=lag)
        assert [r["id"] for r in page["executions"]] == expected[query.offset : query.offset + query.limit]
        assert page["total_count"] == min(len(expected), TOTAL_COUNT_CAP)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({}, ["running", "failed", "pro", "max"]),
        ({"model": "flux-kontext-pro"}, ["pro"]),
        ({"status": "success"}, ["pro", "max"]),
        ({"status": "error,processing"}, ["running", "failed"]),
        ({"status": "created,starting"}, []),
        ({"error_classification": "INPUT"}, ["failed"]),
        ({"error_classification": "RATE_LIMIT"}, []),
        ({"from": "@0.5"}, ["running", "failed", "pro"]),  # bounds are inclusive
        ({"to": "@1.0+00:00"}, ["failed", "pro", "max"]),
        ({"from": "@0.25ms", "to": "@1.0"}, ["failed", "pro"]),
        ({"from": "@1.0+02:00"}, ["running", "failed"]),
        ({"from": "@0.5", "status": "success", "model": "flux-kontext-max,flux-kontext-pro"}, ["pro"]),
    ],
)
async def test_executions_filter_by_model_status_time_and_classification(
    make_sim: MakeSim, http: aiohttp.ClientSession, clock: FakeClock, query: dict[str, str], expected: list[str]
) -> None:
    sim = await make_sim()
    start = clock.now
    never_uploaded = (await presign(http, sim))["public_url"]
    ids = {"max": await create_id(http, sim)}
    clock.advance(0.5)
    ids["pro"] = await create_id(http, sim, {"model": "flux-kontext-pro", "input": {"prompt": "a pro job"}})
    clock.advance(0.5)
    ids["failed"] = await create_id(http, sim, job("fails", input_image=never_uploaded))
    clock.advance(1.5)
    ids["running"] = await create_id(http, sim, job("still running"))
    clock.advance(0.5)

    def moment(text: str) -> str:
        # "@S" is the wall time S seconds after the start, as Z; "@S+02:00" and "@Sms" are other spellings of it.
        seconds, _, form = text[1:].partition("+")
        if seconds.endswith("ms"):
            return format_time(sim.wall_time(start + float(seconds[:-2])))[:-4] + "Z"  # milliseconds only
        at = sim.wall_time(start + float(seconds))
        if form == "00:00":
            return at.isoformat()
        if form == "02:00":
            return at.astimezone(timezone(timedelta(hours=2))).isoformat()
        return format_time(at)

    sent = {name: moment(value) if value.startswith("@") else value for name, value in query.items()}
    page = await listed(http, sim, sent)
    names = {prediction_id: name for name, prediction_id in ids.items()}
    assert [names[r["id"]] for r in page["executions"]] == expected
    assert page["total_count"] == len(expected)


@pytest.mark.parametrize(
    "query",
    [
        {"limit": "0"},
        {"limit": "101"},
        {"limit": "ten"},
        {"offset": "-1"},
        {"status": "success,done"},
        {"from": "yesterday"},
        {"from": "2026-01-31"},
        {"to": "2026-01-31T12:00:00"},  # no offset: not RFC 3339
        {"to": "2026-13-01T00:00:00Z"},
    ],
)
async def test_executions_refuse_bad_query_values_with_400(
    make_sim: MakeSim, http: aiohttp.ClientSession, query: dict[str, str]
) -> None:
    sim = await make_sim()
    reply = await listing(http, sim, query)
    assert reply.status == 400
    assert isinstance(reply.json()["error"], str)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-01-31T12:00:00Z", datetime(2026, 1, 31, 12, tzinfo=UTC)),
        ("2026-01-31t12:00:00z", datetime(2026, 1, 31, 12, tzinfo=UTC)),
        ("2026-01-31T12:00:00+00:00", datetime(2026, 1, 31, 12, tzinfo=UTC)),
        ("2026-01-31T12:00:00.5Z", datetime(2026, 1, 31, 12, 0, 0, 500000, tzinfo=UTC)),
        ("2026-01-31T12:00:00.123456789Z", datetime(2026, 1, 31, 12, 0, 0, 123456, tzinfo=UTC)),
        ("2026-01-31T14:30:00+02:30", datetime(2026, 1, 31, 12, tzinfo=UTC)),
        ("2026-01-31T10:00:00-02:00", datetime(2026, 1, 31, 12, tzinfo=UTC)),
        ("2026-01-31T12:00:00", None),
        ("2026-01-31", None),
        ("2026-02-30T12:00:00Z", None),
        ("2026-01-31T12:00:00+24:00", None),
        ("1769860800", None),
    ],
)
def test_rfc3339_timestamps_parse_with_any_offset_and_fraction(text: str, expected: datetime | None) -> None:
    assert parse_rfc3339(text) == expected


async def test_executions_count_in_the_request_window_and_need_a_key(
    make_sim: MakeSim, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim(rate_count=2, rate_period=10.0, api_key=KEY)
    assert [(await listing(http, sim)).status for _ in range(3)] == [200, 200, 429]
    assert sim.stats.rate_limited == 1
    assert (await listing(http, sim, headers={"X-API-Key": "wrong"})).status == 401


async def test_listing_error_answers_500(make_sim: MakeSim, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(faults=Faults(listing_error=1.0))
    await create_id(http, sim)
    reply = await listing(http, sim)
    assert reply.status == 500
    assert reply.json() == {"error": "Internal Server Error"}


async def test_listing_lag_hides_a_prediction_until_it_is_old_enough(
    make_sim: MakeSim, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    sim = await make_sim(faults=Faults(listing_lag=5.0))
    prediction_id = await create_id(http, sim)
    clock.advance(4.9)
    assert await listed(http, sim) == {"executions": [], "total_count": 0}
    assert (await poll(http, sim, prediction_id))["status"] == "success"  # a GET sees it all along
    clock.advance(0.1)
    assert [r["id"] for r in (await listed(http, sim))["executions"]] == [prediction_id]
