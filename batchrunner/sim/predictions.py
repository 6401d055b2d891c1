"""The simulator's prediction calls: create (at either form of its path), get (long polls too), cancel, the
executions listing and the model catalogue. The pure parts are ``state.py`` (a prediction, its view), ``listing.py`` and
``model.py``.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from typing import Any, Final

from aiohttp import web

from batchrunner.sim.config import input_key
from batchrunner.sim.filehosts import FileHosts
from batchrunner.sim.gateway import Answer, Handler, json_answer
from batchrunner.sim.listing import list_executions, parse_query
from batchrunner.sim.model import MODEL_TITLES, REQUEST_SCHEMA, create_problem
from batchrunner.sim.state import Outcome, Prediction

__all__ = ["PredictionRoutes"]

# Long polls re-read the injected clock this often: a test's clock does not move with real time.
_LONG_POLL_STEP: Final = 0.05


class PredictionRoutes(FileHosts):
    """Routes of predictions: create, get, cancel, the listing, the model; a create may name a stored file."""

    def _create_route(self, form: str) -> Handler:
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
                return json_answer({"error": "Not Found"}, 404)
            if status == 405:
                return json_answer({"error": "Method Not Allowed"}, 405, {"Allow": "GET, HEAD"})
            return json_answer({"error": "Moved"}, status, {"Location": other})

        return handler

    async def _create(self, request: web.Request) -> Answer:
        try:
            body = await request.json()
        except ValueError:
            return Answer(400, {"error": "Request body is not valid JSON"})
        problem = create_problem(body)
        if problem is not None:
            return Answer(400, {"error": problem})
        limit = self.config.faults.payment_required_after
        if limit is not None and self.stats.creates >= limit:
            self.stats.faults_injected["payment_required"] = self.stats.faults_injected.get("payment_required", 0) + 1
            return Answer(402, {"error": "Insufficient balance: payment required", "status": 402})
        now = self._clock()
        if self._running_count(now) >= self.config.concurrency:
            self.stats.concurrency_rejected += 1
            return Answer(429, {"error": "Concurrency limit reached"})
        # ``version`` is deprecated and ignored, as documented.
        prediction = self._new_prediction(body["model"], body["input"], now)
        return Answer(
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

    async def _get(self, request: web.Request) -> Answer:
        self.stats.polls += 1
        prediction = self._predictions.get(request.match_info["id"])
        if prediction is None:
            return Answer(404, {"error": "Prediction not found"})
        if self._clock() - prediction.created_at < self.config.faults.fresh_404_seconds:
            # The read replica has not seen the new prediction yet.
            self._count_fault("fresh_404")
            return Answer(404, {"error": "Prediction not found"})
        # A long-polling server holds every GET until the prediction ends (or long_poll passes): clients need not ask.
        if self.config.long_poll > 0:
            await self._await_terminal(prediction)
        now = self._clock()
        succeeded = prediction.status(now) == "success"
        withhold = succeeded and prediction.withhold_output
        if succeeded:
            prediction.withhold_output = False
        return Answer(200, prediction.view(now, self.base_url, withhold_output=withhold))

    async def _await_terminal(self, prediction: Prediction) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.long_poll
        while not prediction.is_terminal(self._clock()) and not self._closing.is_set():
            left = deadline - loop.time()
            if left <= 0:
                return
            until_done = prediction.finish_at - self._clock()
            await asyncio.sleep(max(0.001, min(left, _LONG_POLL_STEP, until_done)))

    async def _cancel(self, request: web.Request) -> Answer:
        self.stats.cancels += 1
        prediction = self._predictions.get(request.match_info["id"])
        if prediction is None:
            # The API answers an unknown id with a 500, not a 404.
            return Answer(500, {"error": "Internal Server Error"})
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
        return Answer(200, {"status": "success", "message": message, "predictionID": prediction.id})

    async def _model(self, request: web.Request) -> Answer:
        slug = request.query.get("slug", "")
        title = MODEL_TITLES.get(slug)
        if title is None:
            return Answer(404, {"error": "Model not found"})
        return Answer(
            200,
            {
                "title": title,
                "slug": slug,
                "version": "0.0.1",
                "output_type": "image",
                "request_schema": REQUEST_SCHEMA,
            },
        )

    async def _executions(self, request: web.Request) -> Answer:
        self.stats.listings += 1
        faults = self.config.faults
        if self._inject("listing_error", faults.listing_error):
            return Answer(500, {"error": "Internal Server Error"})
        query = parse_query(request.query)
        if isinstance(query, str):
            return Answer(400, {"error": query})
        page = list_executions(
            self._predictions.values(),
            query,
            now=self._clock(),
            base_url=self.base_url,
            wall=self.wall_time,
            lag=faults.listing_lag,
            envelopes=self.config.listing_envelopes,
        )
        return Answer(200, page)
