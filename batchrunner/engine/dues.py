"""Due times of the predictions in flight, in heaps: a decision costs O(log n) however many are in flight.

``Flights`` is the run's record of the predictions in flight (a dict by prediction id, in the order they came), and
tells the collaborators that keep due times (``watching``: the next poll, the spare poll; ``cancels``: the next
deadline) of each flight whose times may have moved: one ``touch`` after every change of a flight's schedule (its next
poll, its last check, its cancel, a listing that took it or let it go, an answer that freed it). ``DueHeap`` is
``heapq`` with lazy deletion: a change pushes a new entry and leaves the old one, which the owner's ``valid`` skips
when it comes to the top; the heap is rebuilt when stale entries outnumber live ones, so it stays O(n).

Entries are ``(due, order, prediction id, key)``: ``order`` (the flight's arrival) breaks ties as the dict's order did
when the choices were scans (``min`` over the flights, the first of equals), ``key`` is what the entry was computed
from, for ``valid`` to compare with the flight's state now.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator

from batchrunner.engine.runstate import Flight

Entry = tuple[float, int, str, float]
Valid = Callable[[Flight, Entry], bool]


class Flights(dict[str, Flight]):
    """The predictions in flight by id, in arrival order, with which of them the listing watches."""

    def __init__(self) -> None:
        super().__init__()
        self.order: dict[str, int] = {}  # prediction id -> arrival, for ties
        self.listed: set[str] = set()  # ids of the flights the listing watches (busy or not)
        self._arrivals = 0
        self._listeners: list[Callable[[Flight], None]] = []

    def listen(self, listener: Callable[[Flight], None]) -> None:
        """Call ``listener`` with each flight added or touched."""
        self._listeners.append(listener)

    def __setitem__(self, prediction_id: str, flight: Flight) -> None:
        if prediction_id not in self.order:
            self.order[prediction_id] = self._arrivals
            self._arrivals += 1
        super().__setitem__(prediction_id, flight)
        self.touch(flight)

    def __delitem__(self, prediction_id: str) -> None:
        self.discard(prediction_id)

    def discard(self, prediction_id: str) -> Flight | None:
        """Take a flight out (finished, given up); its heap entries die lazily."""
        self.order.pop(prediction_id, None)
        self.listed.discard(prediction_id)
        return super().pop(prediction_id, None)

    def touch(self, flight: Flight) -> None:
        """The flight's schedule may have changed: every keeper of due times pushes its new entries."""
        if flight.prediction_id not in self.order:
            return  # finished meanwhile
        if flight.listed:
            self.listed.add(flight.prediction_id)
        else:
            self.listed.discard(flight.prediction_id)
        for listener in self._listeners:
            listener(flight)

    def arrival(self, prediction_id: str) -> int:
        return self.order[prediction_id]


class DueHeap:
    """Due times of flights, soonest first, with lazy deletion (see the module's docstring)."""

    __slots__ = ("_entries", "flights")

    def __init__(self, flights: Flights) -> None:
        self.flights = flights
        self._entries: list[Entry] = []

    def __len__(self) -> int:
        return len(self._entries)

    def push(self, due: float, flight: Flight, key: float = 0.0) -> None:
        entries, pid = self._entries, flight.prediction_id
        heapq.heappush(entries, (due, self.flights.arrival(pid), pid, key))

    def crowded(self) -> bool:
        """Whether stale entries outnumber live ones enough that the owner should rebuild the heap."""
        return len(self._entries) > 2 * len(self.flights) + 64

    def rebuild(self, entries: Iterable[Entry]) -> None:
        self._entries = list(entries)
        heapq.heapify(self._entries)

    def peek(self, valid: Valid) -> tuple[Entry, Flight] | None:
        """The soonest live entry and its flight; stale entries on the way are dropped."""
        entries, flights = self._entries, self.flights
        while entries:
            entry = entries[0]
            flight = flights.get(entry[2])
            if flight is not None and valid(flight, entry):
                return entry, flight
            heapq.heappop(entries)
        return None

    def entries(self) -> list[Entry]:
        """Every entry, live or stale, in no order."""
        return self._entries

    def pop(self) -> Entry:
        """Take out the top entry (the one ``peek`` just returned)."""
        return heapq.heappop(self._entries)

    def restore(self, entry: Entry) -> None:
        """Put back an entry taken out with ``pop``."""
        heapq.heappush(self._entries, entry)

    def pop_due(self, now: float, valid: Valid) -> Iterator[tuple[Entry, Flight]]:
        """Take out every live entry due by ``now``, soonest first."""
        while (top := self.peek(valid)) is not None and top[0][0] <= now:
            heapq.heappop(self._entries)
            yield top
