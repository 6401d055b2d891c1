"""The dispatcher's choices from heaps of due times are the choices the scans of every flight made.

The scans the heaps replaced are kept here, as they were, as the reference: on random states of flights, and on random
sequences of what happens to them (polled, seen running, failed, finished, cancelled, listed or not, new prediction
times learnt, the listing failing and coming back), each turn's choice and wake time are the scan's.
"""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from batchrunner.api.answers import Phase, Prediction
from batchrunner.api.client import Client
from batchrunner.engine.cancels import seen_running_at
from batchrunner.engine.dues import DueHeap, Flights
from batchrunner.engine.policy import MIN_SAMPLES, done_probability, likely_done_age, poll_value
from batchrunner.engine.polls import OPPORTUNISTIC_MIN_PROBABILITY
from batchrunner.engine.runstate import Flight, RunConfig
from batchrunner.engine.scheduler import Scheduler
from batchrunner.engine.watching import Watching
from batchrunner.manifest import load_manifest
from batchrunner.store.ledger import Ledger, read_ledger
from batchrunner.store.output import OutputDir
from tests.conftest import write_manifest

# --- the scans, as they were (the reference) ----------------------------------------------------------------------


def scan_overdue(
    idle: Iterable[Flight], now: float, *, timeout: float, hold: Callable[[], float]
) -> tuple[tuple[str, Flight] | None, float]:
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
                if seen_running_at(flight) >= expires:  # given up only once a look since the hold saw it running
                    return ("abandon", flight), math.inf
                continue
        if expires < earliest:
            earliest = expires
    return None, earliest


def scan_spare_poll(
    idle: Iterable[Flight], now: float, durations: list[float], min_interval: float, soonest: Callable[[float], None]
) -> Flight | None:
    idle = list(idle)
    best, best_value = None, -1.0
    for flight in idle:
        checked = flight.last_running_age if flight.last_running_age is not None else 0.0
        age = now - flight.created_at
        if age - checked < min_interval:
            continue
        if done_probability(durations, age, checked) < OPPORTUNISTIC_MIN_PROBABILITY - 1e-9:
            continue
        value = poll_value(durations, age, checked)
        if value > best_value:
            best, best_value = flight, value
    if best is not None:
        return best
    for flight in idle:
        checked = flight.last_running_age if flight.last_running_age is not None else 0.0
        age = likely_done_age(durations, checked, OPPORTUNISTIC_MIN_PROBABILITY)
        soonest(flight.created_at + max(age, checked + min_interval))
    return None


def scan_watching(w: Watching, now: float, soonest: Callable[[float], None]) -> tuple[str, Any] | None:
    """Watching.next as it was: the listing's page, else the idle flights scanned for the spare and the due poll."""
    watch = w.watch
    if watch.mode != "poll" and w.flights:
        current = watch.round
        if current is not None:
            offset = current.next_page()
            return None if offset is None else ("watch", offset)
        if not (not any(f.listed for f in w.flights.values()) and watch.working):
            if not watch.due(now):
                soonest(watch.next_at)
            else:
                return ("watch", 0)
    idle = [f for f in w.flights.values() if not f.busy]
    if watch.active:
        idle = [f for f in idle if not f.listed]
    due = min(idle, key=lambda f: f.next_poll_at, default=None)
    if due is None:
        return None
    durations = w.run.sorted_durations
    if not w._creatable() and len(durations) >= MIN_SAMPLES:
        early = scan_spare_poll(idle, now, durations, w.run.config.poll_min_interval, soonest)
        if early is not None:
            return ("poll", early)
    if due.next_poll_at <= now:
        return ("poll", due)
    soonest(due.next_poll_at)
    return None


# --- a scheduler on a fake clock ----------------------------------------------------------------------------------


class Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def made(tmp_path: Path) -> AsyncIterator[Callable[[str, float], tuple[Scheduler, Clock]]]:
    """Makes schedulers (watch mode, minimum poll interval) for a 1-job manifest; no request is ever sent."""
    manifest = load_manifest(write_manifest(tmp_path, 1, image=False))
    ledgers: list[Ledger] = []
    async with aiohttp.ClientSession() as session:
        client = Client(session, base_url="http://127.0.0.1:9", api_key="unused")

        def make(mode: str, min_interval: float) -> tuple[Scheduler, Clock]:
            out = OutputDir(tmp_path / f"out-{len(ledgers)}")
            out.create()
            out.prepare()
            state = read_ledger(out.ledger)
            config = RunConfig(job_timeout=4.0, poll_initial=0.3, watch=mode, poll_min_interval=min_interval)
            ledger = Ledger(out.ledger)
            ledger.__enter__()
            ledgers.append(ledger)
            clock = Clock()
            return Scheduler(manifest, client, ledger, out, state, config, clock=clock), clock

        yield make
    for ledger in ledgers:
        ledger.__exit__(None, None, None)


def running(prediction_id: str) -> Prediction:
    return Prediction(prediction_id, "processing", Phase.RUNNING, (), None, None, False, None, None)


def new_flight(sched: Scheduler, rng: random.Random, now: float, n: int) -> Flight:
    job = sched.manifest.jobs[0]
    created = now - rng.uniform(0.0, 5.0)
    age = now - created
    flight = Flight(
        job.id,
        job.fingerprint,
        f"p-{n}",
        created_at=created,
        job=None,
        last_running_age=rng.choice([None, round(rng.uniform(0.0, age), rng.choice([1, 6]))]),
        # Ties are common in a run (a resumed run polls all it took over at once): make some.
        next_poll_at=rng.choice([now, round(now + rng.uniform(-1.0, 3.0), 1)]),
        listed=rng.random() < 0.5,
        cancelled_at=None if rng.random() < 0.85 else created + rng.uniform(4.0, 6.0),
    )
    sched.watching.add(flight)
    sched.ctx.gate.in_flight += 1
    return flight


def step(sched: Scheduler, rng: random.Random, now: float, counter: list[int]) -> None:
    """One random thing happening to the run, through the collaborators' own paths."""
    w, flights = sched.watching, sched.watching.flights
    pick = rng.choice(list(flights.values())) if flights else None
    roll = rng.random()
    if pick is None or roll < 0.12:
        counter[0] += 1
        new_flight(sched, rng, now, counter[0])
    elif roll < 0.3:
        pick.busy = True  # a poll sent: its answer comes below, or in a later step
    elif roll < 0.5:
        pick.busy = True
        w.observe(pick, running(pick.prediction_id))
    elif roll < 0.58:
        pick.busy = True
        w._poll_later(pick, rng.randint(1, 3), None)
    elif roll < 0.66:
        w.finish(pick)
    elif roll < 0.72:
        # cancels.cancel's end: the cancel answered, the flight watched on
        pick.cancelled_at, pick.busy, pick.next_poll_at = now, False, now + sched.config.poll_initial
        flights.touch(pick)
    elif roll < 0.8:
        pick.listed = not pick.listed  # a listing round saw it, or did not
        flights.touch(pick)
    elif roll < 0.86:
        sched.ctx.learn(rng.uniform(0.5, 6.0))
    elif roll < 0.9:
        w.watch.working = not w.watch.working  # the listing failed, or answers again
    elif roll < 0.94:
        sched.cancels.abandon(pick) if pick.cancelled_at is not None else w.finish(pick)


def act(sched: Scheduler, action: tuple[str, Any] | None, rng: random.Random, now: float) -> None:
    """What the dispatcher does with the choice: a cancel answered, a flight given up, a poll sent (and answered)."""
    if action is None:
        return
    kind, target = action
    if kind == "cancel":
        target.cancelled_at, target.busy, target.next_poll_at = now, False, now + sched.config.poll_initial
        sched.flights.touch(target)
    elif kind == "abandon":
        sched.cancels.abandon(target)
    elif kind == "poll":
        target.busy = True
        if rng.random() < 0.7:
            sched.watching.observe(target, running(target.prediction_id))


def both(sched: Scheduler, now: float) -> tuple[tuple[Any, float | None], tuple[Any, float | None]]:
    """(the collaborators' choice and wake time, the scans' choice and wake time) for one turn."""
    found: list[tuple[Any, float | None]] = []
    for way in ("heaps", "scans"):
        times: list[float] = []
        if way == "heaps":
            action = sched.cancels.next(now, times.append) or sched.watching.next(now, times.append)
        else:
            idle = (f for f in sched.flights.values() if not f.busy)
            action, earliest = scan_overdue(idle, now, timeout=sched.config.job_timeout, hold=sched.cancels.hold)
            if earliest < math.inf:
                times.append(earliest)
            action = action or scan_watching(sched.watching, now, times.append)
        found.append((action, None if action is not None or not times else min(times)))
    return found[0], found[1]


@pytest.mark.parametrize("seed", range(24))
async def test_the_heaps_choose_as_the_scans_of_every_flight_did_turn_after_turn(
    made: Callable[[str, float], tuple[Scheduler, Clock]], seed: int
) -> None:
    rng = random.Random(seed)
    sched, clock = made(rng.choice(["auto", "poll", "list"]), rng.choice([0.0, 0.0, 0.2]))
    for _ in range(rng.choice([0, 3, 8])):
        sched.ctx.learn(rng.uniform(0.5, 6.0))
    creatable = rng.random() < 0.2
    sched.watching._creatable = lambda: creatable
    sched.watching.watch.next_at = math.inf if rng.random() < 0.7 else 0.0
    counter = [0]
    for _ in range(rng.randint(0, 40)):
        counter[0] += 1
        new_flight(sched, rng, clock.t, counter[0])
    for _ in range(250):
        clock.t += rng.choice([0.0, 0.001, 0.01, 0.05, 0.3])
        heaps, scans = both(sched, clock.t)
        assert heaps == scans
        if rng.random() < 0.8:
            act(sched, heaps[0], rng, clock.t)
        step(sched, rng, clock.t, counter)


async def test_a_thousand_flights_still_likely_done_get_the_scans_spare_poll(
    made: Callable[[str, float], tuple[Scheduler, Clock]],
) -> None:
    # The hard case for the bound: every flight likely done, none finishing, each poll answered "still running".
    rng = random.Random(5)
    sched, clock = made("poll", 0.0)
    for _ in range(200):
        sched.ctx.learn(rng.uniform(1.0, 6.0))
    for n in range(1000):
        new_flight(sched, rng, clock.t, n).listed = False
    for f in sched.flights.values():
        f.cancelled_at = None
        sched.flights.touch(f)
    for _ in range(300):
        clock.t += 0.003
        heaps, scans = both(sched, clock.t)
        assert heaps == scans
        assert heaps[0] is not None
        act(sched, heaps[0], rng, clock.t)


# --- the heap itself ----------------------------------------------------------------------------------------------


def _flights(*names: str) -> tuple[Flights, list[Flight]]:
    flights = Flights()
    made = [Flight(n, n, n, created_at=0.0, job=None) for n in names]
    for f in made:
        flights[f.prediction_id] = f
    return flights, made


def test_a_stale_entry_is_skipped_and_ties_go_to_the_first_arrival() -> None:
    flights, (a, b, c) = _flights("a", "b", "c")
    heap = DueHeap(flights)
    for f, due in ((c, 1.0), (b, 1.0), (a, 2.0)):
        f.next_poll_at = due
        heap.push(due, f)
    b.next_poll_at = 5.0  # moved: its entry at 1.0 is stale
    heap.push(5.0, b)

    def valid(f: Flight, entry: tuple[float, int, str, float]) -> bool:
        return f.next_poll_at == entry[0]

    assert [f.prediction_id for _, f in heap.pop_due(10.0, valid)] == ["c", "a", "b"]
    c2 = flights.discard("c")
    assert c2 is c and "c" not in flights


def test_a_heap_of_mostly_stale_entries_asks_to_be_rebuilt() -> None:
    flights, (a,) = _flights("a")
    heap = DueHeap(flights)
    for k in range(70):
        heap.push(float(k), a)
    assert heap.crowded()


def test_flights_know_which_the_listing_watches_and_forget_the_finished() -> None:
    flights, (a, b) = _flights("a", "b")
    assert not flights.listed
    a.listed = True
    flights.touch(a)
    assert flights.listed == {"a"}
    flights.discard("a")
    assert not flights.listed
    seen: list[str] = []
    flights.listen(lambda f: seen.append(f.prediction_id))
    flights.touch(a)  # finished: nobody is told
    flights.touch(b)
    assert seen == ["b"]
