"""The create path: the documented ``/v1/prediction`` first, the other form once on a 404/405 or a redirect to it,
remembered for the run and in the output folder; ``version`` only when the manifest writes it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from batchrunner.api.client import Client
from batchrunner.api.paths import CREATE_PATH, CREATE_PATHS, create_path_refused, other_create_path
from batchrunner.cli.main import main
from batchrunner.engine.createpath import create_path_file, load_create_path, save_create_path
from batchrunner.engine.reconcile import create_in_doubt
from batchrunner.errors import CreatePathRefused, CreatePathUnusable, NotFound, RequestRejected
from batchrunner.manifest import parse_manifest
from batchrunner.sim.server import SimConfig, Simulator
from tests.conftest import ThreadedSimulator, fast_sim, run_args, write_manifest

KEY = "test-key"
BASE = "http://127.0.0.1:8000"
JOB = {"prompt": "Turn the scene into a snowy winter evening"}


@pytest.mark.parametrize(
    ("status", "location", "sent", "refused"),
    [
        (404, None, "/v1/prediction", True),
        (405, None, "/v1/prediction/", True),
        (308, "/v1/prediction", "/v1/prediction/", True),
        (301, f"{BASE}/v1/prediction", "/v1/prediction/", True),
        (307, "/v1/prediction/?x=1", "/v1/prediction", True),
        (302, "prediction", "/v1/prediction/", False),  # relative: /v1/prediction/prediction
        (303, "/v1/prediction/abc", "/v1/prediction", False),  # post-redirect-get: it may have created one
        (308, "https://elsewhere.example/v1/prediction", "/v1/prediction/", False),
        (301, None, "/v1/prediction/", False),
        (400, None, "/v1/prediction", False),
        (500, None, "/v1/prediction", False),
        (200, None, "/v1/prediction", False),
    ],
)
def test_create_path_refused_by_table(status: int, location: str | None, sent: str, refused: bool) -> None:
    assert create_path_refused(status, location, BASE + sent, BASE + other_create_path(sent)) is refused


def test_the_documented_form_comes_first_and_the_forms_pair_up() -> None:
    assert CREATE_PATH == "/v1/prediction"
    assert other_create_path(CREATE_PATHS[0]) == CREATE_PATHS[1]
    assert other_create_path(CREATE_PATHS[1]) == CREATE_PATHS[0]


def test_a_refused_form_is_never_a_create_in_doubt() -> None:
    assert not create_in_doubt(CreatePathRefused("x", status=308))
    assert not create_in_doubt(CreatePathUnusable("x", status=301))


# --- the client against the simulator's switches ------------------------------------------------------------


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


async def _sim(**settings: Any) -> Simulator:
    sim = Simulator(fast_sim(api_key=KEY, **settings))
    await sim.start()
    return sim


@pytest.mark.parametrize("form", ["both", "plain"])
async def test_a_server_taking_the_documented_form_sees_only_it(session: aiohttp.ClientSession, form: str) -> None:
    sim = await _sim(create_path=form)
    try:
        learnt: list[str] = []
        client = Client(session, base_url=sim.base_url, api_key=KEY, on_create_path=learnt.append)
        assert await client.create("flux-kontext-max", None, JOB)
        assert await client.create("flux-kontext-max", None, JOB)
        assert sim.stats.creates == 2
        assert sim.stats.wrong_path_creates == 0
        assert learnt == ["/v1/prediction"]  # heard once, when the server showed the route
    finally:
        await sim.stop()


@pytest.mark.parametrize("wrong", [404, 405])
async def test_a_slash_only_server_is_found_after_one_refused_create(
    session: aiohttp.ClientSession, wrong: int
) -> None:
    sim = await _sim(create_path="slash", wrong_path_status=wrong)
    try:
        learnt: list[str] = []
        kinds: list[str] = []
        client = Client(
            session, base_url=sim.base_url, api_key=KEY, on_request=kinds.append, on_create_path=learnt.append
        )
        with pytest.raises(CreatePathRefused) as caught:
            await client.create("flux-kontext-max", None, JOB)
        assert caught.value.status == wrong
        assert sim.stats.creates == 0  # the refusal made nothing
        assert client.create_path == "/v1/prediction/"
        for _ in range(3):
            assert await client.create("flux-kontext-max", None, JOB)
        assert sim.stats.creates == 3
        assert sim.stats.wrong_path_creates == 1
        assert learnt == ["/v1/prediction/"]
        assert kinds == ["create"] * 4  # each try is one counted request: the caller windows each
    finally:
        await sim.stop()


@pytest.mark.parametrize("redirect", [301, 302, 307, 308])
async def test_a_redirect_to_the_other_form_is_not_followed_but_switches(
    session: aiohttp.ClientSession, redirect: int
) -> None:
    sim = await _sim(create_path="plain", wrong_path_status=redirect)
    try:
        # An earlier run remembered the slash form, and the server now redirects it to the documented one.
        client = Client(session, base_url=sim.base_url, api_key=KEY, create_path="/v1/prediction/")
        with pytest.raises(CreatePathRefused):
            await client.create("flux-kontext-max", None, JOB)
        assert client.create_path == "/v1/prediction"
        assert await client.create("flux-kontext-max", None, JOB)
        assert sim.stats.wrong_path_creates == 1
        assert sim.stats.creates == 1
        assert sim.stats.polls == 0  # nothing followed the redirect as a GET
    finally:
        await sim.stop()


async def test_both_forms_refused_fail_the_create_without_a_loop(session: aiohttp.ClientSession) -> None:
    seen: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(request.path)
        return web.json_response({"error": "Model not found"}, status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        client = Client(session, base_url=str(server.make_url("/")), api_key=KEY)
        with pytest.raises(CreatePathRefused):
            await client.create("m", None, {})
        with pytest.raises(CreatePathUnusable) as caught:
            await client.create("m", None, {})
        assert isinstance(caught.value, RequestRejected) and not isinstance(caught.value, NotFound)
        assert "Model not found" in str(caught.value)
        assert not create_in_doubt(caught.value)
        assert seen == ["/v1/prediction", "/v1/prediction/"]
    finally:
        await server.close()


@pytest.mark.parametrize(("version", "sent"), [(None, None), ("0.0.1", "0.0.1")])
async def test_version_is_sent_only_when_given(
    session: aiohttp.ClientSession, version: str | None, sent: str | None
) -> None:
    bodies: list[dict[str, Any]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        bodies.append(await request.json())
        return web.json_response({"status": "success", "predictionID": "p1"})

    app = web.Application()
    app.router.add_post("/v1/prediction", handler)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        client = Client(session, base_url=str(server.make_url("/")), api_key=KEY)
        assert await client.create("flux-kontext-max", version, JOB) == "p1"
    finally:
        await server.close()
    assert bodies[0].get("version") == sent
    assert ("version" in bodies[0]) is (sent is not None)


@pytest.mark.parametrize(("text", "sent"), [("", None), ('version: "0.0.1"\n', "0.0.1"), ("version: v2\n", "v2")])
def test_the_manifest_sends_version_only_when_it_writes_one(tmp_path: Path, text: str, sent: str | None) -> None:
    source = f'model: flux-kontext-max\n{text}jobs:\n  - prompt: "{JOB["prompt"]}"\n'
    manifest = parse_manifest(source, path=tmp_path / "m.yaml")
    assert manifest.sent_version == sent


def test_an_unwritten_version_keeps_the_fingerprint(tmp_path: Path) -> None:
    # Old ledgers fingerprinted with the default version: dropping it from the request must not make new jobs.
    body = f'jobs:\n  - prompt: "{JOB["prompt"]}"\n'
    plain = parse_manifest("model: flux-kontext-max\n" + body, path=tmp_path / "m.yaml")
    written = parse_manifest('model: flux-kontext-max\nversion: "0.0.1"\n' + body, path=tmp_path / "m.yaml")
    assert plain.jobs[0].fingerprint == written.jobs[0].fingerprint


# --- remembered in the output folder ------------------------------------------------------------------------


def test_the_learnt_form_is_remembered_per_api_url(tmp_path: Path) -> None:
    assert load_create_path(tmp_path, BASE) is None
    save_create_path(tmp_path, BASE + "/", "/v1/prediction/")
    assert load_create_path(tmp_path, BASE) == "/v1/prediction/"
    assert load_create_path(tmp_path, "http://127.0.0.1:9000") is None
    create_path_file(tmp_path).write_text("{not json", encoding="utf-8")
    assert load_create_path(tmp_path, BASE) is None
    create_path_file(tmp_path).write_text(json.dumps({"api_url": BASE, "path": "/v2/x"}), encoding="utf-8")
    assert load_create_path(tmp_path, BASE) is None


def test_a_run_on_a_slash_only_server_finishes_and_the_next_starts_on_the_slash_form(
    tmp_path: Path, api_key: str, threaded_sim: Callable[[SimConfig], ThreadedSimulator]
) -> None:
    served = threaded_sim(fast_sim(api_key=api_key, create_path="slash", wrong_path_status=405))
    out = tmp_path / "out"
    first = write_manifest(tmp_path, 4, image=False)
    assert main(run_args(first, served.url, out)) == 0
    stats = served.stats()
    assert stats["creates"] == 4
    assert stats["wrong_path_creates"] >= 1  # creates sent at once before the first refusal came back may also miss
    assert load_create_path(out, served.url) == "/v1/prediction/"
    ledger = (out / "ledger.jsonl").read_text(encoding="utf-8")
    assert '"version"' not in json.dumps([json.loads(line) for line in ledger.splitlines()])

    more = write_manifest(tmp_path, 8, image=False)  # 4 new seeds in the same folder
    assert main(run_args(more, served.url, out)) == 0
    after = served.stats()
    assert after["creates"] == 8
    assert after["wrong_path_creates"] == stats["wrong_path_creates"]  # the second run started on the right form


def test_a_run_on_a_redirecting_server_never_turns_a_create_into_a_get(
    tmp_path: Path, api_key: str, threaded_sim: Callable[[SimConfig], ThreadedSimulator]
) -> None:
    served = threaded_sim(fast_sim(api_key=api_key, create_path="plain", wrong_path_status=301))
    out = tmp_path / "out"
    out.mkdir()
    save_create_path(out, served.url, "/v1/prediction/")  # a stale memory: the server moved to the documented form
    manifest = write_manifest(tmp_path, 3, image=False)
    assert main(run_args(manifest, served.url, out)) == 0
    stats = served.stats()
    assert stats["creates"] == 3
    assert stats["wrong_path_creates"] >= 1
    assert load_create_path(out, served.url) == "/v1/prediction"
