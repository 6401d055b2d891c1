"""Deadlines of the predictions in flight: the cancel after ``--job-timeout``, and giving up after the cancel's hold.

Cancels are best effort and often only recorded: a cancelled prediction is watched on, and nothing is created again
for its job until it is terminal (a success is saved and is the job's result; ``cancelled`` or a failure is a failed
attempt) or until a hold long enough that the account no longer runs it (``policy.cancel_hold``) has passed and a look
since its end still saw it running; a job created again after that counts as possibly paid twice (``count_rerun``).

The deadlines are kept in heaps (``dues.py``), so a turn costs O(log n) with a thousand predictions in flight: the
timeouts by ``created_at + --job-timeout``, the holds by the time of the cancel (the hold itself moves with the
prediction times learnt, so it is added when asked, and the order by cancel time is the order by deadline). A flight
past either deadline moves to the overdue ones, and ``overdue`` (the scan it replaces, now over those few) picks the
first of them in arrival order, as the scan over every flight did.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

from batchrunner.engine.context import Run
from batchrunner.engine.dues import DueHeap, Entry, Flights
from batchrunner.engine.grants import Grants
from batchrunner.engine.policy import cancel_hold
from batchrunner.engine.results import Results
from batchrunner.engine.runstate import Flight
from batchrunner.errors import ApiError
from batchrunner.manifest import Job

log = logging.getLogger("batchrunner")

# Overdue flights are taken out of the heaps this early: a float's rounding never hides one from ``overdue``.
_EARLY = 1e-9


def overdue(
    idle: Iterable[Flight], now: float, *, timeout: float, hold: Callable[[], float]
) -> tuple[tuple[str, Flight] | None, float]:
    """The first idle flight past its deadline (``cancel`` it; ``abandon`` it after a cancel), else the next deadline.

    A cancelled flight is abandoned only once a look at the end of its hold or later saw it still running: a hold
    that ran out while no look could be made (a poll refused with 429 and put off past the hold, a listing that
    failed) tells nothing of the prediction, which most likely finished meanwhile, and a new create would pay twice.
    Until that look (its next poll, or the listing's next round) it waits, with no deadline of its own.
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
                if seen_running_at(flight) >= expires:
                    return ("abandon", flight), math.inf
                continue  # past its hold, not seen since: the next look decides
        if expires < earliest:
            earliest = expires
    return None, earliest


def seen_running_at(flight: Flight) -> float:
    """The loop time of the last look that saw the flight's prediction running (-inf: none did)."""
    age = flight.last_running_age
    return -math.inf if age is None else flight.created_at + age


def _constant(value: float) -> Callable[[], float]:
    return lambda: value


class Cancels:
    """Cancels overdue predictions, and gives up on those a cancel did not end."""

    def __init__(self, run: Run, grants: Grants, results: Results, flights: Flights, orphans: set[str]) -> None:
        self.run = run
        self.grants = grants
        self.results = results
        self.flights = flights
        self.orphans = orphans
        self._timeouts = DueHeap(flights)  # idle flights not cancelled, by created_at + job timeout
        self._holds = DueHeap(flights)  # idle cancelled flights, by the time of the cancel
        self._overdue: dict[str, int] = {}  # flights taken out of the heaps past a deadline: id -> arrival
        flights.listen(self._touch)

    def hold(self) -> float:
        config = self.run.config
        return cancel_hold(self.run.durations, job_timeout=config.job_timeout, poll_initial=config.poll_initial)

    # ----------------------------------------------------------------------------------------------- due times
    def _touch(self, flight: Flight) -> None:
        """A flight changed: its deadline goes in the heap it belongs to (a busy one is pushed when it is freed)."""
        if flight.busy:
            return
        if flight.cancelled_at is None:
            self._timeouts.push(flight.created_at + self.run.config.job_timeout, flight)
        else:
            self._holds.push(flight.cancelled_at, flight, flight.cancelled_at)
        for heap in (self._timeouts, self._holds):
            if heap.crowded():
                self._rebuild()

    def _rebuild(self) -> None:
        timeout, order = self.run.config.job_timeout, self.flights.order
        idle = [f for f in self.flights.values() if not f.busy]
        self._timeouts.rebuild(
            (f.created_at + timeout, order[f.prediction_id], f.prediction_id, 0.0)
            for f in idle
            if f.cancelled_at is None
        )
        self._holds.rebuild(
            (f.cancelled_at, order[f.prediction_id], f.prediction_id, f.cancelled_at)
            for f in idle
            if f.cancelled_at is not None
        )

    @staticmethod
    def _waiting(flight: Flight, entry: Entry) -> bool:
        return not flight.busy and flight.cancelled_at is None

    @staticmethod
    def _held(flight: Flight, entry: Entry) -> bool:
        return not flight.busy and flight.cancelled_at == entry[3]

    def next(self, now: float, soonest: Callable[[float], None]) -> tuple[str, Any] | None:
        """The first idle flight past a deadline (in arrival order), else tells ``soonest`` the next deadline."""
        overdue_ids = self._overdue
        for entry, flight in self._timeouts.pop_due(now + _EARLY, self._waiting):
            overdue_ids[flight.prediction_id] = entry[1]
        held: float | None = None
        if self._holds.peek(self._held) is not None:
            held = self.hold()
            for entry, flight in self._holds.pop_due(now - held + _EARLY, self._held):
                overdue_ids[flight.prediction_id] = entry[1]
        earliest = math.inf
        if overdue_ids:
            candidates = []
            for prediction_id, _ in sorted(overdue_ids.items(), key=lambda item: item[1]):
                found = self.flights.get(prediction_id)
                if found is None or found.busy:
                    del overdue_ids[prediction_id]  # finished, or busy: pushed again when freed
                    continue
                candidates.append(found)
            hold = self.hold if held is None else _constant(held)
            action, earliest = overdue(candidates, now, timeout=self.run.config.job_timeout, hold=hold)
            if action is not None:
                return action
        if (top := self._timeouts.peek(self._waiting)) is not None:
            earliest = min(earliest, top[0][0])
        if held is not None and (top := self._holds.peek(self._held)) is not None:
            earliest = min(earliest, top[0][0] + held)
        if earliest < math.inf:
            soonest(earliest)
        return None

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
        self.flights.touch(flight)

    def abandon(self, flight: Flight) -> None:
        """A cancelled prediction still running ``hold`` later: a failed attempt, marked as possibly running.

        It may run on (and hold the account's slot) all the same, so its slot is held as long as a lost answer's; a
        new create for the job counts as possibly paid twice (``count_rerun``).
        """
        run = self.run
        self.flights.discard(flight.prediction_id)
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
