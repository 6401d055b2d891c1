"""The simulator's API host, in front of every call: key check, request window, the faults injected before a call
is acted on and on its answer, and the request id stamped on every response (see ``server.py`` for the decisions).

``Gateway`` also holds the state every route reads (declared here, set by ``Simulator``), and the small helpers they
share: ids, fault draws, the count of predictions in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import random
import re
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
from batchrunner.sim.config import SimConfig, SimStats
from batchrunner.sim.files import Upload
from batchrunner.sim.state import Prediction

__all__ = ["Act", "Answer", "Gateway", "Handler", "drop", "json_answer"]

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


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: dict[str, Any]
    headers: tuple[tuple[str, str], ...] = ()
    created: bool = False  # a prediction was created: losing this answer loses its id


Act = Callable[[web.Request], Awaitable[Answer]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_answer(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers)


def drop(request: web.Request) -> web.Response:
    """Close the connection without an answer; the returned response is never written."""
    transport = request.transport
    if transport is not None:
        transport.close()
    return web.Response(status=500)


class Gateway:
    """The API host's front, and the state the routes share."""

    config: SimConfig
    stats: SimStats
    _clock: Callable[[], float]
    _wall_epoch: float
    _base_url: str | None
    _host: str
    _port: int
    _closing: asyncio.Event
    _executor: ThreadPoolExecutor | None
    _id_rng: random.Random
    _request_id_rng: random.Random
    _prediction_rng: random.Random
    _fault_rng: random.Random
    _window: SlidingWindow
    _seen: SlidingWindow
    _predictions: dict[str, Prediction]
    _running: set[str]
    _finishing: list[tuple[float, str]]
    _uploads: dict[str, Upload]
    _outputs: dict[str, bytes]
    _rendering: dict[str, asyncio.Future[bytes]]
    _inputs: OrderedDict[str, tuple[Image.Image, float]]
    _counter: int

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` of the running server."""
        if self._base_url is None:
            raise RuntimeError("the simulator is not started")
        return self._base_url

    def wall_time(self, t: float) -> datetime:
        """The wall-clock (UTC) moment of reading ``t`` of the injected clock, as the API's timestamps show it."""
        return datetime.fromtimestamp(self._wall_epoch + t, UTC)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/_sim/"):
            self.stats.requests += 1
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            # Unknown routes and methods answer in the API's JSON error shape too.
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return json_answer({"error": exc.reason}, exc.status, headers)

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

    def _api(self, act: Act, *, keyless: bool = False) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await self._serve_api(request, act, keyless=keyless)

        return handler

    async def _serve_api(self, request: web.Request, act: Act, *, keyless: bool) -> web.StreamResponse:
        if not keyless:
            problem = auth_problem(request.headers, self.config.api_key, self.config.auth_headers)
            if problem is not None:
                return self._respond(Answer(401, {"error": problem}))
        if self._inject("late_arrival", self.config.faults.late_arrival):
            await self._pause(self.config.faults.late_arrival_seconds)
        now = self._clock()
        self.stats.max_window = max(self.stats.max_window, self._seen.record(now))
        retry_after = self._window.admit(now)
        if retry_after is not None:
            self.stats.rate_limited += 1
            return json_answer({"error": "Too many requests"}, 429, {"Retry-After": str(retry_after)})
        early = self._spurious(request)
        if early is not None:
            return early
        answer = await act(request)
        return await self._deliver(request, answer)

    def _spurious(self, request: web.Request) -> web.StreamResponse | None:
        """A fault that answers instead of the request, before anything is acted on."""
        faults = self.config.faults
        if self._inject("reset_before", faults.reset_before):
            return drop(request)
        is_create = request.method == "POST" and request.path.rstrip("/") == "/v1/prediction"
        if is_create and self._inject("reset_before_create", faults.reset_before_create):
            return drop(request)
        if self._inject("rate_limit", faults.rate_limit):
            return json_answer({"error": "Too many requests"}, 429, {"Retry-After": "1"})
        if self._inject("rate_limit_no_retry_after", faults.rate_limit_no_retry_after):
            return json_answer({"error": "Too many requests"}, 429)
        if self._inject("server_error_html", faults.server_error_html):
            return web.Response(status=502, text=_HTML_502, content_type="text/html")
        if self._inject("server_error_empty", faults.server_error_empty):
            odd = self.stats.faults_injected["server_error_empty"] % 2
            return web.Response(status=500 if odd else 503)
        return None

    async def _deliver(self, request: web.Request, answer: Answer) -> web.StreamResponse:
        """Send the answer, or lose or garble it as the faults say."""
        faults = self.config.faults
        if self._inject("slow", faults.slow):
            await self._pause(faults.slow_seconds)
            transport = request.transport
            if transport is None or transport.is_closing():
                # The client gave up waiting: whatever was acted on stays done, its answer is lost.
                self.stats.lost_answers += answer.created
                return drop(request)
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
            return drop(request)
        if answer.created and self._inject("gateway_timeout_after_create", faults.gateway_timeout_after_create):
            # The gateway gave up on the upstream, which created the prediction all the same.
            self.stats.lost_answers += 1
            return web.Response(status=504, text=_HTML_504, content_type="text/html")
        return self._respond(answer)

    def _respond(self, answer: Answer) -> web.Response:
        body = answer.body
        if answer.status in _EMPTYABLE and self._inject("empty_error_bodies", self.config.faults.empty_error_bodies):
            body = {}
        return json_answer(body, answer.status, dict(answer.headers))

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    def _running_count(self, now: float) -> int:
        while self._finishing and self._finishing[0][0] <= now:
            self._running.discard(heapq.heappop(self._finishing)[1])
        return len(self._running)
