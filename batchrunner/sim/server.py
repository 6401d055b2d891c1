"""An aiohttp.web server that behaves like the Eachlabs prediction API, for the demo, tests and benchmark.

It serves the calls of ``eachlabs-api.md`` (create, get, executions, cancel, presign, model) plus the hosts the
API hands out (presigned upload, public files, output images), all on one loopback port, and injects the
failures a client meets. It follows the API's documents, not what a client expects: every documented variant a
client must survive is a switch (a ``Faults`` number or a ``SimConfig`` field). ``Simulator`` (here) owns the
state, the routes and the server's lifecycle; the route groups are ``gateway`` (the API host's front: key, window,
faults on the wire, request ids), ``predictions`` (create, get, cancel, listing, model) and ``filehosts`` (presign,
delete, uploads, public files, outputs). The pure parts live beside them: ``config`` (settings, counters), ``access``
(key, window), ``files`` (uploads, their signature and retention), ``state`` (a prediction, its view, failure
envelopes), ``listing`` (the executions listing), ``model`` (the model and create checks) and ``images`` (output
pictures).

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
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web
from PIL import Image

from batchrunner.sim.access import SlidingWindow
from batchrunner.sim.config import Faults, SimConfig, SimStats, input_key
from batchrunner.sim.filehosts import MAX_UPLOAD_BYTES
from batchrunner.sim.files import Upload
from batchrunner.sim.gateway import json_answer
from batchrunner.sim.predictions import PredictionRoutes
from batchrunner.sim.state import Prediction, paid_twice

__all__ = ["Faults", "SimConfig", "SimStats", "Simulator", "input_key", "serve_forever"]


class Simulator(PredictionRoutes):
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

    def prediction_times(self) -> list[tuple[str, float, float, float]]:
        """(id, created_at, duration, finish_at) of every prediction, in creation order, on the simulator's clock."""
        return [(p.id, p.created_at, p.duration, p.finish_at) for p in self._predictions.values()]

    def in_flight(self) -> int:
        """Predictions running now by the server's clock."""
        return self._running_count(self._clock())

    # -- test hooks --------------------------------------------------------------------------------

    async def _prediction_times(self, request: web.Request) -> web.StreamResponse:
        """``prediction_times()`` as JSON (a finish that never comes is null), for a benchmark in another process."""
        rows = [
            [pid, created, duration, None if math.isinf(finish) else finish]
            for pid, created, duration, finish in self.prediction_times()
        ]
        return json_answer({"predictions": rows})

    async def _stats(self, request: web.Request) -> web.StreamResponse:
        return json_answer({**self.stats.to_json(), "in_flight": self.in_flight()})

    async def _reset(self, request: web.Request) -> web.StreamResponse:
        self._reset_state()
        return json_answer({"status": "reset"})


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
