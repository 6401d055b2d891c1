"""An aiohttp.web server that behaves like the Eachlabs prediction API, for the demo, tests and benchmark.

It serves the calls of ``eachlabs-api.md`` (create, get, executions, cancel, presign, model) plus the hosts the
API hands out (presigned upload, public files, output images), all on one loopback port, and injects the
failures a client meets. It follows the API's documents, not what a client expects: every documented variant a
client must survive is a switch (a ``Faults`` number or a ``SimConfig`` field). The pure parts live beside it:
``simconfig`` (settings, counters), ``simaccess`` (key, window), ``simfiles`` (uploads, their signature and
retention), ``simstate`` (a prediction, its view, failure envelopes), ``simlisting`` (the executions listing),
``simmodel`` (the model and create checks) and ``simimages`` (output pictures).

Decisions the API leaves open, made here once:

- The request window counts every API-host request that passes the key check (create, poll, list, cancel,
  presign, model) at its arrival, fault-injected ones included. A request the window itself rejects does NOT
  count against the window (the simple model), but it does count in ``SimStats.max_window``: that statistic is
  the busiest window of everything a client sent, so a client that honours the limit shows
  ``max_window <= rate_count``. Requests answered 401 count nowhere (a window belongs to a key). The model
  catalog needs no key and is never answered 401, but counts in the window all the same (the simulator serves
  one organisation). Windows are half-open: ``(t - period, t]``.
- Keys: ``Authorization: Bearer KEY`` and ``X-API-Key: KEY`` are both accepted (Bearer is read first) unless
  ``SimConfig.auth_headers`` names only one; a key in a header not accepted is as good as none.
- ``X-Request-Id`` on every response echoes the client's own when it is a plain token, else is fresh (drawn
  from its own random stream, so echoing does not move prediction ids).
- In flight means created, not stopped by a cancel, and not yet at its finish time on the injected clock.
- A cancel is best effort: by default it is only recorded and the prediction runs to its natural end (output,
  cost and all), holding its slot; ``cancel_stops`` is the chance that a cancel really stops it (status
  ``cancelled``, cost 0, slot freed; a GET and the listing show it so, and it is not paid). A cancel answers
  ``{"status": "success", ...}`` whenever it is accepted (running, stopped or finished: "success" means accepted,
  not finished); an unknown id answers 500.
- Check order for an API request: auth, late_arrival (the request is stamped late, as if slow on the wire),
  window, spurious faults (reset_before, 429s, 5xx), then the action (for creates: 400 validation, 402,
  concurrency 429; for GETs: 404, fresh_404; for listings: listing_error, 400), then slow / malformed_json /
  reset_after / gateway_timeout_after_create on the answer, then empty_error_bodies on a 400/401/422.
- A create whose answer never reaches the client in a readable form (reset_after, malformed_json, slow past the
  client's timeout, or the gateway's 504) was still acted on and counts in ``lost_answers``.
- Views: while running, ``metrics`` read 0 and 0 (not null); ``output`` is ``""`` while ``created``/``starting``
  and null while ``processing``. Failed predictions cost 0. Generic failures (``failure_rate``) rotate the
  envelope (PROVIDER_FAILED, not retryable), the dispatch-only ``{"error"}`` and the logs-only shapes.
- Listings (``GET /v1/executions``, see ``simlisting``) show every prediction on the server; a row's ``output`` is the
  primary output URL of a success, else null, never a failure envelope (``SimConfig.listing_envelopes`` shows the
  output a GET shows instead, an undocumented variant), and never withheld by ``success_without_output``, which
  models the GET path; a ``fresh_404`` GET does not hide a prediction from listings (``listing_lag`` does).
  Timestamps are wall time: the injected clock plus an offset fixed at construction (``Simulator.wall_time``),
  RFC 3339 in UTC with microseconds and ``Z``.
- Presign: ``expires_in_seconds`` is the stored file's retention (default 180 days, clamped to 60 s - 365 days);
  the PUT URL lasts 15 minutes. A PUT must carry the presign's Content-Type and every ``required_headers`` value
  exactly; a refused, expired or unknown upload URL answers 403 with an S3 XML error. A stored file past its
  retention is gone: its public URL answers 404 and a create naming it fails with INPUT_DOWNLOAD_ERROR.
- The create path: ``/v1/prediction`` (documented) and ``/v1/prediction/`` are both taken unless
  ``SimConfig.create_path`` names one; the other form is answered as a missing route (no key check, outside the
  window, counted in ``wrong_path_creates``) with ``wrong_path_status``: 404, 405, or a redirect whose
  ``Location`` is the form taken. ``version`` is ignored.
- ``DELETE /v1/files/{id}`` (windowed like every API call) removes a stored file: its public URL then answers 404
  and a create naming it fails with INPUT_DOWNLOAD_ERROR; an unknown id answers 404. Every presign's JSON body is
  kept in ``SimStats.presign_bodies``, so tests can read its ``file_type`` and ``expires_in_seconds``.
- An ``input_image`` naming ``/files/{id}`` on this server is checked at create time; input images that
  cannot be decoded fall back to a synthetic gradient rather than failing. ``webhook_url`` is never called.
- Counters ``polls``, ``cancels``, ``listings`` count requests that reached the action (404s, 500s and refused
  queries included), ``presigns`` presigns granted; ``creates`` counts predictions created; ``uploads``
  completed PUTs; ``downloads`` output images served (truncated ones included).
  ``paid_twice`` is computed when read: per (model, input), the predictions beyond the first that have not failed
  and were not stopped by a cancel (running ones count: they may yet be billed).

Prediction progress, windows and expiry read the injected clock; only ``slow``, ``late_arrival`` and long polls
wait in real time. All randomness comes from ``random.Random`` streams seeded by ``SimConfig.seed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import json
import math
import random
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from aiohttp import web
from PIL import Image

from batchrunner.sim.access import SlidingWindow, auth_problem
from batchrunner.sim.config import Faults, SimConfig, SimStats, input_key
from batchrunner.sim.files import (
    UPLOAD_URL_LIFETIME,
    Upload,
    file_id,
    missing_file,
    retention_seconds,
    s3_error,
    upload_refusal,
)
from batchrunner.sim.images import decode_data_uri, decode_image, render_output, synthetic_image
from batchrunner.sim.listing import format_time, list_executions, parse_query
from batchrunner.sim.model import MODEL_TITLES, REQUEST_SCHEMA, create_problem
from batchrunner.sim.state import Outcome, Prediction, paid_twice

__all__ = ["Faults", "SimConfig", "SimStats", "Simulator", "input_key", "serve_forever"]

MAX_UPLOAD_BYTES: Final = 100 * 1024 * 1024
_HTML_502: Final = (
    "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center>"
    "<hr><center>nginx</center></body></html>"
)
_HTML_504: Final = (
    "<html><head><title>504 Gateway Time-out</title></head><body><center><h1>504 Gateway Time-out</h1></center>"
    "<hr><center>nginx</center></body></html>"
)
# Statuses whose JSON error body the empty_error_bodies fault empties to ``{}``, as documented.
_EMPTYABLE: Final = frozenset({400, 401, 422})
# A client's own X-Request-Id is echoed when it is a plain token (visible ASCII, bounded length).
_REQUEST_ID: Final = re.compile(r"[!-~]{1,200}")
# Long polls re-read the injected clock this often: a test's clock does not move with real time.
_LONG_POLL_STEP: Final = 0.05
_INPUT_CACHE_SIZE: Final = 64


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: dict[str, Any]
    headers: tuple[tuple[str, str], ...] = ()
    created: bool = False  # a prediction was created: losing this answer loses its id


_Act = Callable[[web.Request], Awaitable[_Answer]]
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers)


def _xml_error(status: int, code: str, message: str, resource: str = "") -> web.Response:
    return web.Response(status=status, text=s3_error(code, message, resource), content_type="application/xml")


def _too_large(resource: str) -> web.Response:
    return _xml_error(413, "EntityTooLarge", "Your proposed upload exceeds the maximum allowed size", resource)


def _drop(request: web.Request) -> web.Response:
    """Close the connection without an answer; the returned response is never written."""
    transport = request.transport
    if transport is not None:
        transport.close()
    return web.Response(status=500)


class Simulator:
    """The simulated API. ``async with Simulator(config) as sim:`` serves on a free loopback port."""

    def __init__(
        self,
        config: SimConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_epoch: float | None = None,
    ) -> None:
        self.config = config if config is not None else SimConfig()
        self._clock = clock
        # Wall time is epoch + clock(), the offset fixed here: timestamps and from/to filters follow the injected clock.
        self._wall_epoch = time.time() - clock() if wall_epoch is None else wall_epoch
        self._runner: web.AppRunner | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._base_url: str | None = None
        self._host = ""
        self._port = 0
        self._closing = asyncio.Event()
        self._reset_state()
        self.app = web.Application(client_max_size=MAX_UPLOAD_BYTES, middlewares=[self._middleware])
        self.app.on_response_prepare.append(self._stamp)
        router = self.app.router
        router.add_post("/v1/prediction", self._create_route("plain"))
        router.add_post("/v1/prediction/", self._create_route("slash"))
        router.add_get("/v1/prediction/{id}", self._api(self._get))
        router.add_post("/v1/prediction/{id}/cancel", self._api(self._cancel))
        router.add_post("/v1/upload/presign", self._api(self._presign))
        router.add_delete("/v1/files/{id}", self._api(self._delete_file))
        router.add_get("/v1/model", self._api(self._model, keyless=True))
        router.add_get("/v1/executions", self._api(self._executions))
        router.add_put("/_upload/{id}", self._upload)
        router.add_get("/files/{id}", self._file)
        router.add_get("/outputs/{name}", self._output)
        router.add_get("/_sim/stats", self._stats)
        router.add_get("/_sim/predictions", self._prediction_times)
        router.add_post("/_sim/reset", self._reset)

    def _reset_state(self) -> None:
        seed = self.config.seed
        # One stream per purpose, so switching a fault on does not reshuffle durations or ids.
        self._id_rng = random.Random(f"{seed}:ids")
        self._request_id_rng = random.Random(f"{seed}:request-ids")
        self._prediction_rng = random.Random(f"{seed}:predictions")
        self._fault_rng = random.Random(f"{seed}:faults")
        self.stats = SimStats(paid_twice_counter=lambda: paid_twice(self._predictions.values(), self._clock()))
        self._window = SlidingWindow(self.config.rate_count, self.config.rate_period)
        self._seen = SlidingWindow(self.config.rate_count, self.config.rate_period)
        self._predictions: dict[str, Prediction] = {}
        self._running: set[str] = set()
        self._finishing: list[tuple[float, str]] = []
        self._uploads: dict[str, Upload] = {}
        self._outputs: dict[str, bytes] = {}
        self._rendering: dict[str, asyncio.Future[bytes]] = {}
        self._inputs: OrderedDict[str, tuple[Image.Image, float]] = OrderedDict()
        self._counter = 0

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` of the running server."""
        if self._base_url is None:
            raise RuntimeError("the simulator is not started")
        return self._base_url

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on ``host:port`` (a free port when 0); returns the base URL."""
        if self._runner is not None:
            raise RuntimeError("the simulator is already started")
        self._closing.clear()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="simulator-render")
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        self._runner = runner
        self._host, self._port = host, int(runner.addresses[0][1])
        shown = f"[{host}]" if ":" in host else host
        self._base_url = f"http://{shown}:{self._port}"
        return self._base_url

    async def stop(self) -> None:
        """Stop serving; slow answers and long polls still pending end at once."""
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def __aenter__(self) -> Simulator:
        if self._runner is None:
            await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def wall_time(self, t: float) -> datetime:
        """The wall-clock (UTC) moment of reading ``t`` of the injected clock, as the API's timestamps show it."""
        return datetime.fromtimestamp(self._wall_epoch + t, UTC)

    def prediction_times(self) -> list[tuple[str, float, float, float]]:
        """(id, created_at, duration, finish_at) of every prediction, in creation order, on the simulator's clock."""
        return [(p.id, p.created_at, p.duration, p.finish_at) for p in self._predictions.values()]

    def in_flight(self) -> int:
        """Predictions running now by the server's clock."""
        return self._running_count(self._clock())

    # -- plumbing ----------------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        if not request.path.startswith("/_sim/"):
            self.stats.requests += 1
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            # Unknown routes and methods answer in the API's JSON error shape too.
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return _json({"error": exc.reason}, exc.status, headers)

    async def _stamp(self, request: web.Request, response: web.StreamResponse) -> None:
        # Every response, errors and downloads included, is stamped as it is prepared, echoing the client's id.
        own = request.headers.get("X-Request-Id", "")
        if _REQUEST_ID.fullmatch(own):
            response.headers["X-Request-Id"] = own
        else:
            response.headers["X-Request-Id"] = str(uuid.UUID(int=self._request_id_rng.getrandbits(128), version=4))

    def _new_id(self) -> str:
        return str(uuid.UUID(int=self._id_rng.getrandbits(128), version=4))

    def _count_fault(self, name: str) -> None:
        self.stats.faults_injected[name] = self.stats.faults_injected.get(name, 0) + 1

    def _inject(self, name: str, probability: float) -> bool:
        if probability <= 0.0 or self._fault_rng.random() >= probability:
            return False
        self._count_fault(name)
        return True

    def _api(self, act: _Act, *, keyless: bool = False) -> _Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await self._serve_api(request, act, keyless=keyless)

        return handler

    def _create_route(self, form: str) -> _Handler:
        """The create at one form of its path: served when the server takes that form, else refused as a server
        without such a route refuses it (before any key check or window: the route does not exist)."""
        create = self._api(self._create)
        paths = {"plain": "/v1/prediction", "slash": "/v1/prediction/"}
        other = paths["slash" if form == "plain" else "plain"]

        async def handler(request: web.Request) -> web.StreamResponse:
            if self.config.create_path in ("both", form):
                return await create(request)
            self.stats.wrong_path_creates += 1
            status = self.config.wrong_path_status
            if status == 404:
                return _json({"error": "Not Found"}, 404)
            if status == 405:
                return _json({"error": "Method Not Allowed"}, 405, {"Allow": "GET, HEAD"})
            return _json({"error": "Moved"}, status, {"Location": other})

        return handler

    async def _serve_api(self, request: web.Request, act: _Act, *, keyless: bool) -> web.StreamResponse:
        if not keyless:
            problem = auth_problem(request.headers, self.config.api_key, self.config.auth_headers)
            if problem is not None:
                return self._respond(_Answer(401, {"error": problem}))
        if self._inject("late_arrival", self.config.faults.late_arrival):
            await self._pause(self.config.faults.late_arrival_seconds)
        now = self._clock()
        self.stats.max_window = max(self.stats.max_window, self._seen.record(now))
        retry_after = self._window.admit(now)
        if retry_after is not None:
            self.stats.rate_limited += 1
            return _json({"error": "Too many requests"}, 429, {"Retry-After": str(retry_after)})
        early = self._spurious(request)
        if early is not None:
            return early
        answer = await act(request)
        return await self._deliver(request, answer)

    def _spurious(self, request: web.Request) -> web.StreamResponse | None:
        """A fault that answers instead of the request, before anything is acted on."""
        faults = self.config.faults
        if self._inject("reset_before", faults.reset_before):
            return _drop(request)
        is_create = request.method == "POST" and request.path.rstrip("/") == "/v1/prediction"
        if is_create and self._inject("reset_before_create", faults.reset_before_create):
            return _drop(request)
        if self._inject("rate_limit", faults.rate_limit):
            return _json({"error": "Too many requests"}, 429, {"Retry-After": "1"})
        if self._inject("rate_limit_no_retry_after", faults.rate_limit_no_retry_after):
            return _json({"error": "Too many requests"}, 429)
        if self._inject("server_error_html", faults.server_error_html):
            return web.Response(status=502, text=_HTML_502, content_type="text/html")
        if self._inject("server_error_empty", faults.server_error_empty):
            odd = self.stats.faults_injected["server_error_empty"] % 2
            return web.Response(status=500 if odd else 503)
        return None

    async def _deliver(self, request: web.Request, answer: _Answer) -> web.StreamResponse:
        """Send the answer, or lose or garble it as the faults say."""
        faults = self.config.faults
        if self._inject("slow", faults.slow):
            await self._pause(faults.slow_seconds)
            transport = request.transport
            if transport is None or transport.is_closing():
                # The client gave up waiting: whatever was acted on stays done, its answer is lost.
                self.stats.lost_answers += answer.created
                return _drop(request)
        garble = 200 <= answer.status < 300 and self._inject("malformed_json", faults.malformed_json)
        if not garble and answer.created:
            garble = self._inject("malformed_create", faults.malformed_create)
        if garble:
            self.stats.lost_answers += answer.created
            text = json.dumps(answer.body)
            cut = sum(self.stats.faults_injected.get(k, 0) for k in ("malformed_json", "malformed_create")) % 2
            garbled = text[: len(text) // 2] if cut else "OK"
            return web.Response(status=200, text=garbled, content_type="application/json")
        if answer.created and self._inject("reset_after", faults.reset_after):
            self.stats.lost_answers += 1
            return _drop(request)
        if answer.created and self._inject("gateway_timeout_after_create", faults.gateway_timeout_after_create):
            # The gateway gave up on the upstream, which created the prediction all the same.
            self.stats.lost_answers += 1
            return web.Response(status=504, text=_HTML_504, content_type="text/html")
        return self._respond(answer)

    def _respond(self, answer: _Answer) -> web.Response:
        body = answer.body
        if answer.status in _EMPTYABLE and self._inject("empty_error_bodies", self.config.faults.empty_error_bodies):
            body = {}
        return _json(body, answer.status, dict(answer.headers))

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    def _running_count(self, now: float) -> int:
        while self._finishing and self._finishing[0][0] <= now:
            self._running.discard(heapq.heappop(self._finishing)[1])
        return len(self._running)

    # -- API actions -------------------------------------------------------------------------------

    async def _create(self, request: web.Request) -> _Answer:
        try:
            body = await request.json()
        except ValueError:
            return _Answer(400, {"error": "Request body is not valid JSON"})
        problem = create_problem(body)
        if problem is not None:
            return _Answer(400, {"error": problem})
        limit = self.config.faults.payment_required_after
        if limit is not None and self.stats.creates >= limit:
            self.stats.faults_injected["payment_required"] = self.stats.faults_injected.get("payment_required", 0) + 1
            return _Answer(402, {"error": "Insufficient balance: payment required", "status": 402})
        now = self._clock()
        if self._running_count(now) >= self.config.concurrency:
            self.stats.concurrency_rejected += 1
            return _Answer(429, {"error": "Concurrency limit reached"})
        # ``version`` is deprecated and ignored, as documented.
        prediction = self._new_prediction(body["model"], body["input"], now)
        return _Answer(
            self.config.create_status,
            {
                "status": "success",
                "message": "Prediction created successfully",
                "predictionID": prediction.id,
            },
            created=True,
        )

    def _new_prediction(self, model: str, inputs: dict[str, Any], now: float) -> Prediction:
        config, faults, rng = self.config, self.config.faults, self._prediction_rng
        duration = rng.uniform(config.min_seconds, config.max_seconds)
        early = rng.choice(("created", "starting"))
        finish_at = now + duration
        outcome, reason = Outcome.SUCCESS, ""
        missing = self._missing_upload(inputs.get("input_image"), now)
        if missing is not None:
            outcome, reason = Outcome.INPUT_ERROR, missing
        elif self._inject("never_finish", faults.never_finish):
            finish_at = math.inf
        elif self._inject("provider_rate_limit", faults.provider_rate_limit):
            outcome = Outcome.PROVIDER_RATE_LIMIT
        elif self._inject("input_error", faults.input_error):
            outcome, reason = Outcome.INPUT_ERROR, "HTTP 403 Forbidden"
        elif self._inject("retryable_failure", faults.retryable_failure):
            outcome = Outcome.RETRYABLE_FAILURE
        elif self._inject("unmarked_transient_failure", faults.unmarked_transient_failure):
            outcome = Outcome.UNMARKED_TRANSIENT
        elif self._inject("dispatch_failure", faults.dispatch_failure):
            outcome = Outcome.DISPATCH_FAILURE
        elif self._inject("failure_rate", config.failure_rate):
            outcome = Outcome.FAILURE
        withhold = (
            outcome is Outcome.SUCCESS
            and finish_at != math.inf
            and self._inject("success_without_output", faults.success_without_output)
        )
        shapes = ("string", "list", "object")
        shape = shapes[self.stats.creates % 3] if config.output_shape == "mixed" else config.output_shape
        key = input_key(model, inputs)
        prediction = Prediction(
            id=self._new_id(),
            model=model,
            input=inputs,
            key=key,
            seq=self._counter,
            created_at=now,
            duration=duration,
            finish_at=finish_at,
            outcome=outcome,
            early_status=early,
            shape=shape,
            failed_word=config.failed_status,
            reason=reason,
            withhold_output=withhold,
        )
        self._counter += 1
        self._predictions[prediction.id] = prediction
        self._running.add(prediction.id)
        if finish_at != math.inf:
            heapq.heappush(self._finishing, (finish_at, prediction.id))
        self.stats.creates += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, len(self._running))
        self.stats.creates_by_input[key] = self.stats.creates_by_input.get(key, 0) + 1
        return prediction

    def _own_file_id(self, ref: Any) -> str | None:
        """The upload id when ``ref`` is a ``/files/{id}`` URL of this server."""
        return file_id(ref, {self._host, "127.0.0.1", "localhost", "::1"}, self._port)

    def _missing_upload(self, ref: Any, now: float) -> str | None:
        upload_id = self._own_file_id(ref)
        if upload_id is None:
            return None
        return missing_file(self._uploads.get(upload_id), ref, now)

    async def _get(self, request: web.Request) -> _Answer:
        self.stats.polls += 1
        prediction = self._predictions.get(request.match_info["id"])
        if prediction is None:
            return _Answer(404, {"error": "Prediction not found"})
        if self._clock() - prediction.created_at < self.config.faults.fresh_404_seconds:
            # The read replica has not seen the new prediction yet.
            self._count_fault("fresh_404")
            return _Answer(404, {"error": "Prediction not found"})
        # A long-polling server holds every GET until the prediction ends (or long_poll passes): clients need not ask.
        if self.config.long_poll > 0:
            await self._await_terminal(prediction)
        now = self._clock()
        succeeded = prediction.status(now) == "success"
        withhold = succeeded and prediction.withhold_output
        if succeeded:
            prediction.withhold_output = False
        return _Answer(200, prediction.view(now, self.base_url, withhold_output=withhold))

    async def _await_terminal(self, prediction: Prediction) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.long_poll
        while not prediction.is_terminal(self._clock()) and not self._closing.is_set():
            left = deadline - loop.time()
            if left <= 0:
                return
            until_done = prediction.finish_at - self._clock()
            await asyncio.sleep(max(0.001, min(left, _LONG_POLL_STEP, until_done)))

    async def _cancel(self, request: web.Request) -> _Answer:
        self.stats.cancels += 1
        prediction = self._predictions.get(request.match_info["id"])
        if prediction is None:
            # The API answers an unknown id with a 500, not a 404.
            return _Answer(500, {"error": "Internal Server Error"})
        now = self._clock()
        if not prediction.is_terminal(now):
            if prediction.cancel_requested_at is None:
                prediction.cancel_requested_at = now
            # Best effort: by default the cancel is only recorded and the prediction runs to its natural end.
            if self._inject("cancel_stops", self.config.faults.cancel_stops):
                prediction.stopped_at = now
                self._running.discard(prediction.id)
        # "success" means accepted, not finished: whether it took shows only in the prediction's later status.
        message = "Prediction canceled successfully"
        return _Answer(200, {"status": "success", "message": message, "predictionID": prediction.id})

    async def _presign(self, request: web.Request) -> _Answer:
        try:
            body = await request.json()
        except ValueError:
            return _Answer(400, {"error": "Request body is not valid JSON"})
        if not isinstance(body, dict):
            return _Answer(400, {"error": "Request body must be a JSON object"})
        content_type = body.get("content_type")
        if not isinstance(content_type, str) or not content_type.strip():
            return _Answer(400, {"error": "content_type is required"})
        if body.get("file_type") is not None and not isinstance(body["file_type"], str):
            return _Answer(400, {"error": "file_type must be a string"})
        self.stats.presign_bodies.append(dict(body))
        retention = retention_seconds(body.get("expires_in_seconds"))
        if retention is None:
            return _Answer(400, {"error": "expires_in_seconds must be a number of seconds"})
        self.stats.presigns += 1
        upload_id = self._new_id()
        now = self._clock()
        empty = self._inject("presign_empty_headers", self.config.faults.presign_empty_headers)
        required = {} if empty else {"x-amz-meta-file-id": upload_id}
        self._uploads[upload_id] = Upload(content_type, required, now + UPLOAD_URL_LIFETIME, now + retention)
        return _Answer(
            200,
            {
                "id": upload_id,
                "presigned_url": f"{self.base_url}/_upload/{upload_id}",
                "public_url": f"{self.base_url}/files/{upload_id}",
                "expires_at": format_time(self.wall_time(now + retention)),
                "required_headers": dict(required),
            },
        )

    async def _delete_file(self, request: web.Request) -> _Answer:
        self.stats.deletes += 1
        upload_id = request.match_info["id"]
        if self._uploads.pop(upload_id, None) is None:
            return _Answer(404, {"error": "File not found"})
        return _Answer(200, {"status": "success", "message": "File deleted", "id": upload_id})

    async def _model(self, request: web.Request) -> _Answer:
        slug = request.query.get("slug", "")
        title = MODEL_TITLES.get(slug)
        if title is None:
            return _Answer(404, {"error": "Model not found"})
        return _Answer(
            200,
            {
                "title": title,
                "slug": slug,
                "version": "0.0.1",
                "output_type": "image",
                "request_schema": REQUEST_SCHEMA,
            },
        )

    async def _executions(self, request: web.Request) -> _Answer:
        self.stats.listings += 1
        faults = self.config.faults
        if self._inject("listing_error", faults.listing_error):
            return _Answer(500, {"error": "Internal Server Error"})
        query = parse_query(request.query)
        if isinstance(query, str):
            return _Answer(400, {"error": query})
        page = list_executions(
            self._predictions.values(),
            query,
            now=self._clock(),
            base_url=self.base_url,
            wall=self.wall_time,
            lag=faults.listing_lag,
            envelopes=self.config.listing_envelopes,
        )
        return _Answer(200, page)

    # -- other hosts: upload, files, outputs (no auth, outside the window) -------------------------

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        resource = request.path
        upload = self._uploads.get(request.match_info["id"])
        if upload is None:
            # A URL this server never signed: S3 refuses it rather than saying it does not exist.
            return _xml_error(403, "AccessDenied", "Access Denied", resource)
        refusal = upload_refusal(request.headers, upload, self._clock())
        if refusal is not None:
            return _xml_error(403, *refusal, resource)
        if (request.content_length or 0) > MAX_UPLOAD_BYTES:
            return _too_large(resource)
        if self._inject("upload_reset", self.config.faults.upload_reset):
            # Read part of the body, then drop the connection: the upload never completes.
            await request.content.read(16)
            return _drop(request)
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > MAX_UPLOAD_BYTES:
                return _xml_error(
                    413, "EntityTooLarge", "Your proposed upload exceeds the maximum allowed size", resource
                )
            chunks.append(chunk)
        upload.data = b"".join(chunks)
        self.stats.uploads += 1
        etag = hashlib.md5(upload.data, usedforsecurity=False).hexdigest()
        # S3 answers a PUT with an empty 200 and an ETag.
        return web.Response(status=200, headers={"ETag": f'"{etag}"'})

    async def _file(self, request: web.Request) -> web.StreamResponse:
        upload = self._uploads.get(request.match_info["id"])
        if upload is None or upload.data is None or self._clock() > upload.retained_until:
            return _json({"error": "File not found"}, 404)
        return web.Response(body=upload.data, headers={"Content-Type": upload.content_type})

    async def _output(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        prediction = self._predictions.get(name.removesuffix(".png")) if name.endswith(".png") else None
        now = self._clock()
        if prediction is None or prediction.status(now) != "success":
            return _json({"error": "Not found"}, 404)
        if now < prediction.finish_at + self.config.faults.download_404_seconds:
            self.stats.faults_injected["download_404"] = self.stats.faults_injected.get("download_404", 0) + 1
            return _json({"error": "Not found"}, 404)
        data = await self._output_bytes(prediction)
        self.stats.downloads += 1
        if self._inject("truncated_download", self.config.faults.truncated_download):
            response = web.StreamResponse(status=200, headers={"Content-Type": "image/png"})
            response.content_length = len(data)
            await response.prepare(request)
            await response.write(data[: len(data) // 2])
            _drop(request)
            return response
        return web.Response(body=data, content_type="image/png")

    async def _output_bytes(self, prediction: Prediction) -> bytes:
        cached = self._outputs.get(prediction.id)
        if cached is not None:
            return cached
        pending = self._rendering.get(prediction.id)
        if pending is None:
            loop = asyncio.get_running_loop()
            # Rendering takes ms: one worker thread keeps it off the loop and serialises PIL's font use.
            pending = loop.run_in_executor(self._executor, self._render, prediction.input)
            self._rendering[prediction.id] = pending
        try:
            data = await asyncio.shield(pending)
        finally:
            self._rendering.pop(prediction.id, None)
        self._outputs[prediction.id] = data
        return data

    def _render(self, inputs: Mapping[str, Any]) -> bytes:
        source, ratio = self._source(inputs)
        return render_output(source, ratio, inputs, self.config.image_size)

    def _source(self, inputs: Mapping[str, Any]) -> tuple[Image.Image, float]:
        """The decoded input image (cached by content), or a synthetic one seeded by what names it."""
        longest = self.config.image_size
        ref = inputs.get("input_image")
        if not isinstance(ref, str) or not ref:
            return synthetic_image(f"prompt:{inputs.get('prompt', '')}", longest)
        data: bytes | None = None
        upload_id = self._own_file_id(ref)
        if upload_id is not None and upload_id in self._uploads:
            data = self._uploads[upload_id].data
        elif ref.startswith("data:"):
            try:
                data = decode_data_uri(ref)
            except ValueError:
                data = None
        if data is None:
            # No network: an external URL becomes a picture seeded by the URL.
            return synthetic_image(ref, longest)
        key = hashlib.sha256(data).hexdigest()
        found = self._inputs.get(key)
        if found is None:
            try:
                found = decode_image(data, longest)
            except Exception:  # any undecodable input still yields a picture, as documented above
                found = synthetic_image(key, longest)
            self._inputs[key] = found
            if len(self._inputs) > _INPUT_CACHE_SIZE:
                self._inputs.popitem(last=False)
        return found

    # -- test hooks --------------------------------------------------------------------------------

    async def _prediction_times(self, request: web.Request) -> web.StreamResponse:
        """``prediction_times()`` as JSON (a finish that never comes is null), for a benchmark in another process."""
        rows = [
            [pid, created, duration, None if math.isinf(finish) else finish]
            for pid, created, duration, finish in self.prediction_times()
        ]
        return _json({"predictions": rows})

    async def _stats(self, request: web.Request) -> web.StreamResponse:
        return _json({**self.stats.to_json(), "in_flight": self.in_flight()})

    async def _reset(self, request: web.Request) -> web.StreamResponse:
        self._reset_state()
        return _json({"status": "reset"})


async def serve_forever(
    config: SimConfig,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve until cancelled; ``ready`` receives the base URL once the port is open."""
    simulator = Simulator(config)
    base_url = await simulator.start(host, port)
    try:
        if ready is not None:
            ready(base_url)
        await asyncio.Event().wait()
    finally:
        await simulator.stop()
