"""The predictions in flight: watched by rounds of the account's listing, else each polled, until each is done.

Every prediction in flight is watched by one listing request (``watch.Watch``, the pure core of the rounds), else
polled on its plan (``policy.plan_polls``); when no create can use a request, a spare poll goes to the prediction most
likely done (``policy.poll_value``). What a GET or a listing row says is acted on in ``observe``: wait on, download
the output (``results.py``), or record the failure.

Which flight to poll next is the poll choice's (``polls.Polls``, over heaps of due times: O(log n) a turn).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from batchrunner.api.client import Phase, Prediction, classify_status
from batchrunner.engine.context import Run
from batchrunner.engine.dues import Flights
from batchrunner.engine.grants import Grants
from batchrunner.engine.policy import learnt_duration, retry_delay
from batchrunner.engine.polls import OPPORTUNISTIC_MIN_PROBABILITY, Polls, spare_poll
from batchrunner.engine.reconcile import PAGE_SIZE
from batchrunner.engine.results import Results
from batchrunner.engine.runstate import Flight
from batchrunner.engine.uploads import Uploads
from batchrunner.engine.watch import Watch, listing_interval, needs_get
from batchrunner.errors import ApiError, AuthError, NotFound, RateLimited
from batchrunner.manifest import Job
from batchrunner.store.ledger import JobState

# What callers import from here: spare_poll and its threshold now live with the poll choice (polls.py).
__all__ = ["NOT_FOUND_LOOKS", "OPPORTUNISTIC_MIN_PROBABILITY", "RESUMED_LISTED_AGE", "Watching", "spare_poll"]

log = logging.getLogger("batchrunner")

# A prediction a resumed run takes over is watched by the listing when younger than this, else polled.
RESUMED_LISTED_AGE = 600.0
# 404s in a row before a prediction is taken to be unknown: a fresh one may not be readable yet.
NOT_FOUND_LOOKS = 3


class Watching:
    """The flights of one run, the listing rounds that watch them and the polls of the others."""

    def __init__(
        self,
        run: Run,
        grants: Grants,
        results: Results,
        uploads: Uploads,
        *,
        to_create: Callable[[], int],
        creatable: Callable[[], bool],
    ) -> None:
        self.run = run
        self.grants = grants
        self.results = results
        self.uploads = uploads
        self._to_create = to_create  # jobs left to create, for the pause between rounds
        self._creatable = creatable  # whether a create could use a request now
        self.flights = Flights()
        self.polls = Polls(run, self.flights)
        # Flights whose job the manifest no longer has: counted apart, so a snapshot costs the same at any size.
        self.orphans: set[str] = set()
        self.watch = Watch(run.config.watch, probe_every=run.config.listing_probe)

    def take_over(self, left: Iterable[JobState], jobs: dict[str, Job], now: float, wall_now: float) -> None:
        """Every prediction an earlier run left in flight is polled first and holds a slot, whether or not the manifest
        still has its job: it runs (and is billed) on the server all the same."""
        gate = self.run.gate
        for st in left:
            if st.prediction_id is None:
                continue
            age = max(0.0, wall_now - st.submitted_at) if st.submitted_at is not None else 0.0
            flight = Flight(
                job_id=st.job,
                fingerprint=st.fingerprint,
                prediction_id=st.prediction_id,
                created_at=now - age,
                job=jobs.get(st.fingerprint),
                next_poll_at=now,
                resumed=True,
                # A recent prediction is found by the listing; an old one would make every round page through all
                # the predictions made since: it is polled.
                listed=self.watch.mode != "poll" and age < RESUMED_LISTED_AGE,
            )
            self.add(flight)
            gate.in_flight += 1
            gate.max_seen = max(gate.max_seen, gate.in_flight)

    def add(self, flight: Flight) -> None:
        self.flights[flight.prediction_id] = flight
        if flight.job is None:
            self.orphans.add(flight.prediction_id)

    def adopt(self, flight: Flight, seen: Prediction | None) -> None:
        """A prediction a create in doubt made: watched like any other; ``seen``, what its GET said, acted on now."""
        self.add(flight)
        if seen is not None:
            flight.busy = False
            self.observe(flight, seen)

    def finish(self, flight: Flight) -> None:
        self.orphans.discard(flight.prediction_id)
        if self.flights.discard(flight.prediction_id) is not None:
            self.run.gate.release()

    # ----------------------------------------------------------------------------------------------- decisions
    def next(self, now: float, soonest: Callable[[float], None]) -> tuple[str, Any] | None:
        """A listing page if one is due, else a poll: a spare one when no create can use it, else the plan's next."""
        watching = self._watch_action(now, soonest)
        if watching is not None:
            return watching
        flight = self.polls.next(now, soonest, listed_too=not self.watch.active, spare=not self._creatable())
        return None if flight is None else ("poll", flight)

    def _watch_action(self, now: float, soonest: Callable[[float], None]) -> tuple[str, Any] | None:
        """The next page of the listing that watches the predictions in flight, when one is due."""
        watch = self.watch
        if watch.mode == "poll" or not self.flights:
            return None
        current = watch.round
        if current is not None:
            offset = current.next_page()
            return None if offset is None else ("watch", offset)
        if watch.working and not self.flights.listed:
            return None
        if not watch.due(now):
            soonest(watch.next_at)
            return None
        return ("watch", 0)

    def _listing_pause(self) -> float:
        """The pause until the next listing round (watch.listing_interval, from the run's limits and what is left)."""
        run, cfg = self.run, self.run.config
        # Runs sharing the key's limits (accountlimits.py) each plan on their share of the window and the slots.
        runs = run.limits.sharing()
        rate = cfg.rate_count / cfg.rate_period / runs if cfg.rate_scope == "all" else 1e9
        mean = sum(run.durations) / len(run.durations) if run.durations else cfg.poll_initial
        return listing_interval(
            to_create=self._to_create(),
            in_flight=len(self.flights),
            mean_duration=mean,
            concurrency=max(1, cfg.concurrency // runs),
            rate=rate,
            shortest=max(cfg.poll_min_interval, 1.0 / rate, 0.01),
            longest=max(4 * mean, 1.0),
        )

    # ----------------------------------------------------------------------------------------------- requests
    def start(self, kind: str, target: Any, now: float, ticket: int | None) -> None:
        if kind == "poll":
            flight: Flight = target
            flight.busy = True
            self.grants.start(lambda: self._poll(flight), ticket)
            return
        watch, config = self.watch, self.run.config
        if watch.round is None:
            wall_now = self.run.wall()
            wanted = [f for f in self.flights.values() if f.listed or not watch.working]
            oldest = min((f.created_at for f in wanted), default=now)
            start = wall_now - (now - oldest) - config.clock_skew
            watch.begin(start, wall_now + config.clock_skew, (f.prediction_id for f in wanted))
        current = watch.round
        assert current is not None
        current.sent()
        self.grants.start(lambda: self._watch_page(current.number, target), ticket)

    async def _watch_page(self, number: int, offset: int) -> None:
        """One page of a listing round: every prediction of ours it shows is seen as a poll would see it."""
        run, watch = self.run, self.watch
        current = watch.round
        if current is None or current.number != number:
            return
        try:
            page = await self.grants.call(
                "watch",
                run.client.executions(
                    model=run.manifest.model,
                    start=current.start,
                    end=current.end,
                    limit=PAGE_SIZE,
                    offset=offset,
                    kind="watch",
                ),
            )
        except ApiError as exc:
            self._watch_failed(number, exc)
            return
        run.ok()
        if not watch.active and watch.mode == "auto":
            log.info("the executions listing answers again: watching the predictions in flight through it")
        ours, done = watch.on_page(number, page)
        for row in ours:
            flight = self.flights.get(row.id)
            if flight is None or flight.busy:
                continue
            if classify_status(row.status) is Phase.RUNNING:
                flight.listed = True
                self._running(flight)  # most rows of a round: nothing more of the row to read
                continue
            prediction = row.prediction
            if prediction is None:
                continue
            if needs_get(prediction):
                # The row says the prediction failed but carries no envelope: one GET of it decides, as for a poll.
                flight.listed = False
                flight.next_poll_at = run.now()
                self.flights.touch(flight)
                continue
            flight.listed = True
            self.observe(flight, prediction)
        if not done:
            return
        now = run.now()
        missing = watch.finish(now, self._listing_pause())
        # Not in a listing that went far enough back (listing lag, a busy account): polled one by one from now on.
        grace = 2 * run.config.reconcile_wait
        for prediction_id in missing:
            flight = self.flights.get(prediction_id)
            if flight is not None and now - flight.created_at > grace:
                flight.listed = False
                self.flights.touch(flight)

    def _watch_failed(self, number: int, exc: ApiError) -> None:
        run, watch = self.run, self.watch
        if isinstance(exc, AuthError):
            run.fatal = exc
            return
        if watch.round is None or watch.round.number != number:
            return  # the round already failed or was replaced
        config = run.config
        backoff = retry_delay(
            watch.failures + 1, exc.retry_after, base=config.retry_base, cap=config.retry_cap, rng=run.rng
        )
        if isinstance(exc, RateLimited):
            # Busy, not broken: the round is tried again after the pause, and nothing falls back on polls.
            watch.retry_later(run.now(), backoff)
            return
        if watch.active and watch.mode == "auto":
            log.warning("the executions listing failed (%s): polling each prediction until it answers again", exc)
        watch.on_failure(run.now(), backoff)

    async def _poll(self, flight: Flight) -> None:
        run = self.run
        run.counters.polls += 1
        request_id = f"br-{flight.fingerprint[:12]}-a{flight.attempt}-p{flight.polls + 1}"
        try:
            prediction = await self.grants.call("poll", run.client.get(flight.prediction_id, request_id=request_id))
        except NotFound as exc:
            run.ok()
            flight.not_found += 1
            if flight.not_found < NOT_FOUND_LOOKS:
                # A fresh prediction may not be readable yet: look again before anything is paid again.
                self._poll_later(flight, flight.not_found, None)
                return
            self.finish(flight)
            self.results.fail(
                flight.job_id,
                flight.fingerprint,
                flight.job,
                f"prediction {flight.prediction_id} unknown to the API: {exc.message}",
                retryable=True,
                error_code=None,
                prediction_id=flight.prediction_id,
            )
            return
        except ApiError as exc:
            run.failed(exc)
            flight.poll_failures += 1
            self._poll_later(flight, flight.poll_failures, exc.retry_after)
            return
        run.ok()
        self.observe(flight, prediction)

    def _poll_later(self, flight: Flight, tries: int, retry_after: float | None) -> None:
        flight.busy = False
        config = self.run.config
        wait = retry_delay(tries, retry_after, base=config.retry_base, cap=config.retry_cap, rng=self.run.rng)
        flight.next_poll_at = self.run.now() + wait
        self.flights.touch(flight)

    # ----------------------------------------------------------------------------------------------- what it said
    def observe(self, flight: Flight, prediction: Prediction) -> None:
        """Act on what a GET of a watched prediction said: wait on, download its output, or record its failure."""
        if prediction.phase is Phase.RUNNING:
            self._running(flight)
            return
        run = self.run
        flight.poll_failures = flight.not_found = 0
        flight.polls += 1
        age = run.now() - flight.created_at
        if prediction.phase is Phase.SUCCEEDED and not prediction.urls and flight.empty_success == 0:
            # A success without an output URL may be a read of a record still being written: one more look, a GET.
            flight.empty_success += 1
            flight.listed = False
            self._poll_later(flight, 1, None)
            return
        self.finish(flight)
        duration: float | None = None
        if not flight.resumed:
            run.learn(learnt_duration(age, flight.last_running_age, prediction.predict_time))
            duration = round(age, 3)
        if prediction.phase is Phase.SUCCEEDED and prediction.urls:
            run.spawn(self.results.download(flight, prediction, duration, client=run.client, out=run.out))
            return
        self._failed(flight, prediction, duration)

    def _running(self, flight: Flight) -> None:
        """A look at the prediction saw it still running: the next look is due by the plan."""
        run = self.run
        flight.poll_failures = flight.not_found = 0
        flight.polls += 1
        age = run.now() - flight.created_at
        flight.last_running_age = age
        flight.next_poll_at = flight.created_at + run.plan.next_poll_age(flight.polls, age)
        flight.busy = False
        self.flights.touch(flight)

    def _failed(self, flight: Flight, prediction: Prediction, duration: float | None) -> None:
        error = prediction.error or ("finished without an output" if prediction.phase is Phase.SUCCEEDED else "failed")
        error_code = prediction.error_code
        retryable = prediction.retryable or prediction.phase is Phase.SUCCEEDED
        if flight.cancelled_at is not None and prediction.status.lower() in ("cancelled", "canceled"):
            error, error_code = f"no result after {self.run.config.job_timeout:g}s; cancelled", "TIMEOUT"
        job = flight.job
        if prediction.error_code == "INPUT_DOWNLOAD_ERROR" and job is not None:
            sent = prediction.input.get("input_image") if prediction.input is not None else None
            if self.uploads.forget_stale(job, sent if isinstance(sent, str) else None):
                # The API could not fetch an image an earlier run uploaded (expired or lost): it is uploaded again and
                # the job tried again.
                retryable = True
        self.results.fail(
            flight.job_id,
            flight.fingerprint,
            flight.job,
            error,
            retryable=retryable,
            error_code=error_code,
            prediction_id=flight.prediction_id,
            cost=prediction.cost,
            duration=duration,
            error_message=prediction.error_message,
            category=prediction.error_category,
        )
