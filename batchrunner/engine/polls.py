"""Which prediction in flight to poll next: the plan's next poll due, or a spare poll of the one worth most.

Owned by the watching (``watching.py``), which asks it when no listing page is due. The choice costs O(log n) a turn,
not a scan of every flight (``dues.py``). The flights the listing watches and the others each have a heap of next
polls (the listing's are polled only while it fails): the soonest by (time, arrival) is the scan's ``min`` with its
first of equals. For the spare poll (a request no create can use), a heap of the time each flight becomes worth it
(likely done and past the minimum interval: the very time ``spare_poll`` sets its timer for); past it a flight joins
the likely done. Being likely done only ever starts as time passes (the chance of being done grows with the age), so
the likely done are the flights the scan would have looked at; among them the best is found by a bound
(``Polls._spare_poll``), so the choice is ``spare_poll``'s over all. The times are worked out again from scratch when
the plan's prediction times change (``Run.learn``: rarely, once it has data).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from batchrunner.engine.context import Run
from batchrunner.engine.dues import DueHeap, Entry, Flights
from batchrunner.engine.policy import MIN_SAMPLES, done_probability, likely_done_age, poll_value
from batchrunner.engine.runstate import Flight

# An early poll, beyond the plan, is spent only on a prediction at least this likely to be done.
OPPORTUNISTIC_MIN_PROBABILITY = 0.1
# How far ahead the likely done are ranked by what their poll will be worth (a bound on its worth until then): longer
# is fewer re-rankings, shorter a tighter bound (fewer looked at each turn).
SPARE_HORIZON = 0.05
# Flights join the likely done this early: a float's rounding never hides one from ``spare_poll``, which decides.
_EARLY = 1e-6


def spare_poll(
    idle: Iterable[Flight], now: float, durations: list[float], min_interval: float, soonest: Callable[[float], None]
) -> Flight | None:
    """The flight a spare request (one no create can use) is best spent on, else tells ``soonest`` when there is one.

    Among the predictions likely done (the tolerance matches likely_done_age's rounding, so a timer set by it always
    finds its flight due), the one whose poll is worth most: see policy.poll_value. ``durations`` sorted.
    """
    idle = list(idle)
    best, best_value = None, -1.0
    for flight in idle:
        value = spare_value(flight, now, durations, min_interval)
        if value is not None and value > best_value:
            best, best_value = flight, value
    if best is not None:
        return best
    # None is likely done yet: wake when the first one will be (one timer, not a look every few ticks).
    for flight in idle:
        checked = flight.last_running_age if flight.last_running_age is not None else 0.0
        age = likely_done_age(durations, checked, OPPORTUNISTIC_MIN_PROBABILITY)
        soonest(flight.created_at + max(age, checked + min_interval))
    return None


def spare_value(flight: Flight, now: float, durations: list[float], min_interval: float) -> float | None:
    """What a spare poll of the flight is worth now (policy.poll_value), or None while it is not likely done."""
    checked = flight.last_running_age if flight.last_running_age is not None else 0.0
    age = now - flight.created_at
    if age - checked < min_interval:
        return None
    if done_probability(durations, age, checked) < OPPORTUNISTIC_MIN_PROBABILITY - 1e-9:
        return None
    return poll_value(durations, age, checked)


def _checked(flight: Flight) -> float:
    """The age at which the flight was last seen running (0: never), as spare_poll reads it."""
    return flight.last_running_age if flight.last_running_age is not None else 0.0


def _due_valid(group: bool) -> Callable[[Flight, Entry], bool]:
    """Whether a next-poll entry is the flight's now: idle, in the group, polled next at the entry's time."""
    return lambda f, entry: not f.busy and f.listed == group and f.next_poll_at == entry[0]


def _spare_valid(group: bool) -> Callable[[Flight, Entry], bool]:
    """Whether a spare-time entry is the flight's now: idle, in the group, last checked at the entry's age."""
    return lambda f, entry: not f.busy and f.listed == group and _checked(f) == entry[3]


_DUE_VALID = {g: _due_valid(g) for g in (False, True)}
_SPARE_VALID = {g: _spare_valid(g) for g in (False, True)}


class Polls:
    """The next polls and spare-poll times of the flights in flight, in heaps by group (listed or not)."""

    def __init__(self, run: Run, flights: Flights) -> None:
        self.run = run
        self.flights = flights
        # By group: the next polls, when each becomes worth a spare poll, and those that are (by a bound on worth).
        self._due = {g: DueHeap(flights) for g in (False, True)}
        self._spare = {g: DueHeap(flights) for g in (False, True)}
        self._likely = {g: DueHeap(flights) for g in (False, True)}
        self._basis: list[float] | None = None  # the sorted prediction times the spare times came from
        self._horizon = -math.inf  # the likely done are ranked by their poll's worth at this time (_spare_poll)
        flights.listen(self._touch)

    def next(self, now: float, soonest: Callable[[float], None], *, listed_too: bool, spare: bool) -> Flight | None:
        """The flight to poll now: a spare poll (``spare``: no create can use the request), else the plan's next due;
        else tells ``soonest`` when. The flights the listing watches count only with ``listed_too``."""
        groups = (False, True) if listed_too else (False,)
        due: Flight | None = None
        best: tuple[float, int] = (math.inf, 0)
        for group in groups:
            top = self._due[group].peek(_DUE_VALID[group])
            if top is not None and top[0][:2] < best:
                (due_at, order, _, _), due = top
                best = (due_at, order)
        if due is None:
            return None
        # When no create can use a request, it goes to the prediction most likely done, planned or not.
        # A full window is no reason to fall back on the plan: the dispatcher waits for the window and asks again
        # (a create, if one became possible meanwhile, still goes first). Falling back let the last prediction of a
        # batch wait for its next planned poll, seconds away, while the window freed within a tenth of a second.
        durations = self.run.sorted_durations
        if spare and len(durations) >= MIN_SAMPLES:
            early = self._spare_poll(now, durations, groups, soonest)
            if early is not None:
                return early
        if due.next_poll_at <= now:
            return due
        soonest(due.next_poll_at)
        return None

    def _touch(self, flight: Flight) -> None:
        """A flight changed: its next poll and spare time go in its group's heaps (a busy one waits to be freed)."""
        if flight.busy:
            return
        group = flight.listed
        due = self._due[group]
        due.push(flight.next_poll_at, flight)
        if due.crowded():
            self._rebuild_due(group)
        basis = self._basis
        if basis is not None and basis is self.run.sorted_durations:
            spare = self._spare[group]
            checked = _checked(flight)
            spare.push(self._spare_at(flight, checked, basis), flight, checked)
            if spare.crowded():
                self._rebuild_spare(group, basis)

    def _rebuild_due(self, group: bool) -> None:
        order = self.flights.order
        self._due[group].rebuild(
            (f.next_poll_at, order[f.prediction_id], f.prediction_id, 0.0) for f in self._idle(group)
        )

    def _rebuild_spare(self, group: bool, basis: list[float]) -> None:
        order = self.flights.order
        self._likely[group].rebuild(())
        entries = []
        for f in self._idle(group):
            checked = _checked(f)
            entries.append((self._spare_at(f, checked, basis), order[f.prediction_id], f.prediction_id, checked))
        self._spare[group].rebuild(entries)

    def _idle(self, group: bool) -> list[Flight]:
        return [f for f in self.flights.values() if not f.busy and f.listed == group]

    def _spare_at(self, flight: Flight, checked: float, durations: list[float]) -> float:
        """When a spare poll of the flight becomes worth it: spare_poll's own timer for it."""
        age = likely_done_age(durations, checked, OPPORTUNISTIC_MIN_PROBABILITY)
        return flight.created_at + max(age, checked + self.run.config.poll_min_interval)

    def _spare_poll(
        self, now: float, durations: list[float], groups: tuple[bool, ...], soonest: Callable[[float], None]
    ) -> Flight | None:
        """spare_poll's choice, from the flights past their spare time only; else tells ``soonest`` the next such time.

        The likely done are ranked by what their poll will be worth at a horizon a little ahead (``_horizon``): a poll's
        worth only grows with time (the chance of being done and the time unseen both do), so that is a bound on its
        worth now. They are looked at highest bound first, and the look stops at a bound below the best worth found:
        none further on can beat it. Ties go to the first arrival, as the scan's ``>`` over the dict did. The bounds
        are worked out again once the horizon has passed.
        """
        if durations is not self._basis:
            self._basis = durations
            for group in (False, True):
                self._rebuild_spare(group, durations)
        if now > self._horizon:
            self._new_horizon(now, durations)
        min_interval = self.run.config.poll_min_interval
        for group in groups:
            likely = self._likely[group]
            for entry, flight in self._spare[group].pop_due(now + _EARLY, _SPARE_VALID[group]):
                likely.push(-self._bound(flight, entry[3], durations), flight, entry[3])
        best: Flight | None = None
        best_value, best_order = -1.0, 0
        looked: list[tuple[DueHeap, Entry, Flight]] = []
        while (top := self._highest_bound(groups)) is not None:
            heap, entry, flight = top
            if best is not None and -entry[0] < best_value:
                break
            looked.append((heap, heap.pop(), flight))
            value = spare_value(flight, now, durations, min_interval)
            if value is not None and (value > best_value or (value == best_value and entry[1] < best_order)):
                best, best_value, best_order = flight, value, entry[1]
        for heap, entry, _ in looked:
            heap.restore(entry)
        if best is None:
            # None is likely done yet: wake when the first one will be (one timer, not a look every few ticks).
            for _, entry, flight in looked:
                soonest(self._spare_at(flight, entry[3], durations))
            for group in groups:
                if (spare := self._spare[group].peek(_SPARE_VALID[group])) is not None:
                    soonest(spare[0][0])
        return best

    def _bound(self, flight: Flight, checked: float, durations: list[float]) -> float:
        """What a poll of the flight will be worth at the horizon: at least what it is worth until then."""
        return poll_value(durations, self._horizon - flight.created_at, checked)

    def _new_horizon(self, now: float, durations: list[float]) -> None:
        self._horizon = now + SPARE_HORIZON
        for group in (False, True):
            likely, valid = self._likely[group], _SPARE_VALID[group]
            kept = []
            for entry in likely.entries():
                flight = self.flights.get(entry[2])
                if flight is not None and valid(flight, entry):
                    kept.append((-self._bound(flight, entry[3], durations), entry[1], entry[2], entry[3]))
            likely.rebuild(kept)

    def _highest_bound(self, groups: tuple[bool, ...]) -> tuple[DueHeap, Entry, Flight] | None:
        """The likely done flight (of either group looked at) whose poll may be worth most."""
        found: tuple[DueHeap, Entry, Flight] | None = None
        for group in groups:
            heap = self._likely[group]
            top = heap.peek(_SPARE_VALID[group])
            if top is not None and (found is None or top[0] < found[1]):
                found = (heap, top[0], top[1])
        return found
