"""Deadlines of the predictions in flight: the cancel after ``--job-timeout``, and giving up after the cancel's hold.

Cancels are best effort and often only recorded: a cancelled prediction is watched on, and nothing is created again
for its job until it is terminal (a success is saved and is the job's result; ``cancelled`` or a failure is a failed
attempt) or until a hold long enough that the account no longer runs it (``policy.cancel_hold``); a job created again
after that hold counts as possibly paid twice (``count_rerun``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

from batchrunner.engine.context import Run
from batchrunner.engine.grants import Grants
from batchrunner.engine.policy import cancel_hold
from batchrunner.engine.results import Results
from batchrunner.engine.runstate import Flight
from batchrunner.errors import ApiError
from batchrunner.manifest import Job

log = logging.getLogger("batchrunner")


def overdue(
    idle: Iterable[Flight], now: float, *, timeout: float, hold: Callable[[], float]
) -> tuple[tuple[str, Flight] | None, float]:
    """The first idle flight past its deadline (``cancel`` it; ``abandon`` it after a cancel), else the next deadline.

    ``hold`` is asked once, and only when a flight was cancelled.
    """
    earliest = math.inf
    held: float | None = None
    for flight in idle:
        if flight.cancelled_at is None:
            expires = flight.created_at + timeout
            if now >= expires:
                return ("cancel", flight), math.inf
        else:
            held = hold() if held is None else held
            expires = flight.cancelled_at + held
            if now >= expires:
                return ("abandon", flight), math.inf
        if expires < earliest:
            earliest = expires
    return None, earliest


class Cancels:
    """Cancels overdue predictions, and gives up on those a cancel did not end."""

    def __init__(
        self, run: Run, grants: Grants, results: Results, flights: dict[str, Flight], orphans: set[str]
    ) -> None:
        self.run = run
        self.grants = grants
        self.results = results
        self.flights = flights
        self.orphans = orphans

    def hold(self) -> float:
        config = self.run.config
        return cancel_hold(self.run.durations, job_timeout=config.job_timeout, poll_initial=config.poll_initial)

    def next(self, now: float, soonest: Callable[[float], None]) -> tuple[str, Any] | None:
        idle = (f for f in self.flights.values() if not f.busy)
        action, earliest = overdue(idle, now, timeout=self.run.config.job_timeout, hold=self.hold)
        if earliest < math.inf:
            soonest(earliest)
        return action

    def start(self, kind: str, flight: Flight, ticket: int | None) -> None:
        flight.busy = True
        self.grants.start(lambda: self.cancel(flight), ticket)

    async def cancel(self, flight: Flight) -> None:
        """Ask the API to cancel an overdue prediction; it is watched on, since the cancel may only be recorded.

        Nothing is created again for the job until the prediction is terminal (a success is saved and is the job's
        result; ``cancelled`` or a failure frees the job) or until ``hold`` has passed (``abandon``).
        """
        run = self.run
        run.counters.cancels += 1
        try:
            # The answer's "success" means accepted, not finished: it tells nothing of the prediction's state.
            await self.grants.call("cancel", run.client.cancel(flight.prediction_id))
        except ApiError as exc:
            log.warning("job %s: cancel of %s failed: %s", flight.job_id, flight.prediction_id, exc)
        now = run.now()
        flight.cancelled_at = now
        flight.busy = False
        log.warning(
            "job %s: no result after %gs; cancel requested (it may only be recorded): still watching %s",
            flight.job_id,
            run.config.job_timeout,
            flight.prediction_id,
        )
        # A cancel that takes shows as ``cancelled`` soon; one only recorded, when the prediction ends on its own.
        flight.next_poll_at = now + run.config.poll_initial

    def abandon(self, flight: Flight) -> None:
        """A cancelled prediction still running ``hold`` later: a failed attempt, marked as possibly running.

        It may run on (and hold the account's slot) all the same, so its slot is held as long as a lost answer's; a
        new create for the job counts as possibly paid twice (``count_rerun``).
        """
        run = self.run
        self.flights.pop(flight.prediction_id, None)
        self.orphans.discard(flight.prediction_id)
        run.hold_slot(run.now() + run.doubt_hold())
        self.results.fail(
            flight.job_id,
            flight.fingerprint,
            flight.job,
            f"no result {run.config.job_timeout + self.hold():g}s after its create, and still running after a cancel",
            retryable=True,
            error_code="TIMEOUT",
            prediction_id=flight.prediction_id,
            still_running=True,
        )

    def count_rerun(self, job: Job) -> None:
        """A create for a job whose cancelled prediction was given up while still running: possibly paid twice."""
        st = self.run.state.jobs.get(job.fingerprint)
        if st is None or not st.still_running:
            return
        st.still_running = False
        self.run.counters.lost_answers += 1
        log.warning("job %s: created again while its cancelled prediction may still run: possibly paid twice", job.id)
