"""The simulated Eachlabs API, driven over loopback with a fake clock so nothing waits for predictions."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy
from PIL import Image

from batchrunner.simulator import Faults, SimConfig, Simulator, input_key, serve_forever

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

    assert (await poll(http, sim, prediction_id))["status"] in ("created", "starting")
    clock.advance(0.5)
    running = await poll(http, sim, prediction_id)
    assert running["status"] == "processing"
    assert running["output"] is None
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


async def test_cancel_ends_prediction_and_frees_its_slot(
    make_sim: MakeSim, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    sim = await make_sim(concurrency=1)
    prediction_id = await create_id(http, sim)
    reply = await call(http, "POST", f"{sim.base_url}/v1/prediction/{prediction_id}/cancel")
    assert reply.status == 200
    assert reply.json() == {
        "status": "cancelled",
        "message": "Prediction cancelled",
        "predictionID": prediction_id,
    }
    clock.advance(5)
    assert (await poll(http, sim, prediction_id))["status"] == "cancelled"
    await create_id(http, sim, job("next"))
    assert sim.stats.cancels == 1


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


# -- model, uploads, images ------------------------------------------------------------------------


async def test_model_answers_flux_kontext_schema_and_404_for_unknown_slug(
    make_sim: MakeSim, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim()
    reply = await call(http, "GET", f"{sim.base_url}/v1/model?slug={MODEL}")
    schema = reply.json()["request_schema"]
    assert reply.json()["slug"] == MODEL
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
    assert ticket["required_headers"] == {"Content-Type": "image/png"}
    assert ticket["presigned_url"] == f"{sim.base_url}/_upload/{ticket['id']}"
    assert (await call(http, "GET", ticket["public_url"])).status == 404

    buffer = io.BytesIO()
    Image.new("RGB", (400, 200), (0, 0, 255)).save(buffer, "PNG")
    wrong = await call(http, "PUT", ticket["presigned_url"], data=buffer.getvalue(), headers={"Content-Type": "x/y"})
    assert wrong.status == 403
    put = await call(http, "PUT", ticket["presigned_url"], data=buffer.getvalue(), headers=ticket["required_headers"])
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
    ("faults", "creates", "lost"), [(Faults(reset_before=1.0), 0, 0), (Faults(reset_after=1.0), 1, 1)]
)
async def test_connection_reset_is_a_disconnect_and_counts_what_was_created(
    make_sim: MakeSim, http: aiohttp.ClientSession, faults: Faults, creates: int, lost: int
) -> None:
    sim = await make_sim(faults=faults)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await create(http, sim)
    assert (sim.stats.creates, sim.stats.lost_answers) == (creates, lost)


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


@pytest.mark.parametrize("failed_status", ["error", "failed"])
@pytest.mark.parametrize(
    ("faults", "error_code"),
    [
        (Faults(provider_rate_limit=1.0), "PROVIDER_RATE_LIMIT"),
        (Faults(input_error=1.0), "INPUT_DOWNLOAD_ERROR"),
    ],
)
async def test_failed_prediction_carries_error_code_in_output(
    make_sim: MakeSim,
    http: aiohttp.ClientSession,
    clock: FakeClock,
    failed_status: str,
    faults: Faults,
    error_code: str,
) -> None:
    sim = await make_sim(faults=faults, failed_status=failed_status)
    prediction_id = await create_id(http, sim)
    clock.advance(1)
    view = await poll(http, sim, prediction_id)
    assert view["status"] == failed_status
    assert view["output"]["error_code"] == error_code
    assert view["output"]["error_message"]
    assert (await call(http, "GET", f"{sim.base_url}/outputs/{prediction_id}.png")).status == 404


async def test_generic_failures_put_reason_in_logs_with_and_without_output(
    make_sim: MakeSim, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    sim = await make_sim(failure_rate=1.0)
    ids = [await create_id(http, sim, job(f"p{i}")) for i in range(2)]
    clock.advance(1)
    views = [await poll(http, sim, pid) for pid in ids]
    assert [v["status"] for v in views] == ["error", "error"]
    assert all(v["logs"] for v in views)
    assert [v["output"] is None for v in views] == [True, False]


async def test_never_finish_stays_processing_until_cancelled(
    make_sim: MakeSim, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    sim = await make_sim(faults=Faults(never_finish=1.0))
    prediction_id = await create_id(http, sim)
    clock.advance(10_000)
    assert (await poll(http, sim, prediction_id))["status"] == "processing"
    assert sim.in_flight() == 1
    await call(http, "POST", f"{sim.base_url}/v1/prediction/{prediction_id}/cancel")
    assert (await poll(http, sim, prediction_id))["status"] == "cancelled"
    assert sim.in_flight() == 0


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
