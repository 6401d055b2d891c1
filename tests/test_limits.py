"""Tests of the request-window limiter, the in-flight gate and the limit/duration parsers.

Every time-dependent test drives the limiter with a fake clock: nothing here waits in real time.
"""

from __future__ import annotations

import asyncio
import math
from bisect import bisect_left
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchrunner.errors import UsageError
from batchrunner.limits.window import (
    InFlightGate,
    SlidingWindow,
    answer_margin,
    default_margin,
    parse_duration,
    parse_rate,
)


@dataclass(slots=True)
class FakeClock:
    """A clock whose sleep advances time instantly and records each interval asked for."""

    t: float = 0.0
    sleeps: list[float] = field(default_factory=list)
    early: list[float] = field(default_factory=list)  # per sleep: wake this much before the deadline

    def time(self) -> float:
        return self.t

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        # An event loop may wake a timer up to its clock resolution early; model that on demand.
        self.t += max(0.0, delay - (self.early.pop(0) if self.early else 0.0))
        await asyncio.sleep(0)  # let other tasks run, as a real sleep would


# --- default_margin ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("period", "margin"),
    [(0.1, 0.021), (1.0, 0.03), (60.0, 0.62), (98.0, 1.0), (3600.0, 1.0)],
)
def test_default_margin_grows_with_period_and_is_capped_at_one_second(period: float, margin: float) -> None:
    assert default_margin(period) == pytest.approx(margin)


def test_window_uses_default_margin_when_none_given() -> None:
    limiter = SlidingWindow(60, 60.0)
    assert limiter.margin == pytest.approx(0.62)
    assert limiter.window == pytest.approx(60.62)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"count": 0, "period": 1.0},
        {"count": -1, "period": 1.0},
        {"count": True, "period": 1.0},
        {"count": 1, "period": 0.0},
        {"count": 1, "period": -1.0},
        {"count": 1, "period": math.inf},
        {"count": 1, "period": math.nan},
        {"count": 1, "period": 1.0, "margin": -0.1},
        {"count": 1, "period": 1.0, "margin": math.nan},
        {"count": 1, "period": 1.0, "history": [0.0, math.nan]},
        {"count": 1, "period": 1.0, "history": [math.inf]},
    ],
)
def test_window_rejects_nonsense_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SlidingWindow(**kwargs)  # type: ignore[arg-type]


# --- delay / take / used / remaining by table --------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "period", "margin", "history", "takes", "now", "delay", "used"),
    [
        pytest.param(3, 10.0, 0.5, [], [], 0.0, 0.0, 0, id="empty"),
        pytest.param(3, 10.0, 0.5, [], [0.0, 1.0], 2.0, 0.0, 2, id="partially-full"),
        pytest.param(3, 10.0, 0.5, [], [0.0, 1.0, 2.0], 2.0, 8.5, 3, id="exactly-full-waits-for-oldest"),
        pytest.param(3, 10.0, 0.5, [], [0.0, 1.0, 2.0], 10.0, 0.5, 3, id="full-at-period-still-counts"),
        pytest.param(3, 10.0, 0.5, [], [0.0, 1.0, 2.0], 10.5, 0.0, 2, id="oldest-leaves-at-period+margin"),
        pytest.param(3, 10.0, 0.0, [], [0.0, 1.0, 2.0], 10.0, 0.0, 2, id="no-margin-half-open"),
        pytest.param(3, 10.0, 0.5, [], [0.0, 0.0, 0.0], 5.0, 5.5, 3, id="burst-at-one-instant"),
        pytest.param(3, 10.0, 0.5, [], [0.0, 1.0, 2.0], 30.0, 0.0, 0, id="all-expired"),
        pytest.param(2, 10.0, 0.5, [-3.0, -1.0], [], 0.0, 7.5, 2, id="history-from-killed-run-counts"),
        pytest.param(2, 10.0, 0.5, [-1.0, -3.0], [], 0.0, 7.5, 2, id="history-unsorted"),
        pytest.param(3, 10.0, 0.5, [-1.0], [0.0], 0.0, 0.0, 2, id="history-and-takes-mix"),
        pytest.param(3, 10.0, 0.5, [-1.0], [0.0, 1.0], 1.0, 8.5, 3, id="history-fills-the-window"),
        pytest.param(2, 10.0, 0.5, [-50.0, -40.0, -30.0], [], 0.0, 0.0, 0, id="history-older-than-window"),
        pytest.param(2, 10.0, 0.5, [-50.0, -40.0, -5.0], [], 0.0, 0.0, 1, id="history-partly-in-window"),
        pytest.param(2, 10.0, 0.5, [-10.5, -5.0], [], 0.0, 0.0, 1, id="history-at-window-edge-is-out"),
        pytest.param(1, 60.0, 0.62, [], [100.0], 130.0, 30.62, 1, id="count-one"),
    ],
)
def test_delay_used_remaining_table(
    count: int,
    period: float,
    margin: float,
    history: list[float],
    takes: list[float],
    now: float,
    delay: float,
    used: int,
) -> None:
    limiter = SlidingWindow(count, period, margin=margin, history=history)
    for t in takes:
        limiter.take(t)
    assert limiter.delay(now) == pytest.approx(delay)
    assert limiter.used(now) == used
    assert limiter.remaining(now) == count - used
    assert (limiter.delay(now) == 0) == (limiter.used(now) < count)


def test_delay_is_pure() -> None:
    limiter = SlidingWindow(2, 10.0, margin=0.0, history=[0.0, 1.0])
    assert [limiter.delay(5.0) for _ in range(3)] == [5.0, 5.0, 5.0]
    assert limiter.used(5.0) == 2


@pytest.mark.parametrize("early", [1e-9, 0.1, 8.0])
def test_take_when_window_full_raises_and_records_nothing(early: float) -> None:
    limiter = SlidingWindow(2, 10.0, margin=0.5)
    limiter.take(0.0)
    limiter.take(1.0)
    with pytest.raises(RuntimeError, match="rate window full"):
        limiter.take(10.5 - early)
    assert limiter.used(10.0) == 2
    limiter.take(10.5)
    assert limiter.used(10.5) == 2


def test_take_earlier_than_last_grant_raises() -> None:
    """A clock going backwards must not slip a grant in out of order."""
    limiter = SlidingWindow(5, 10.0, margin=0.0)
    limiter.take(3.0)
    assert limiter.delay(2.0) == pytest.approx(1.0)
    with pytest.raises(RuntimeError):
        limiter.take(2.0)


@pytest.mark.parametrize(
    ("count", "history", "now", "delay"),
    [
        pytest.param(5, [4.0], 1.0, 3.0, id="window-not-full"),
        pytest.param(2, [0.0, 5.0], 3.0, 2.0, id="window-full-but-oldest-long-gone"),
    ],
)
def test_history_in_the_future_delays_until_after_it(
    count: int, history: list[float], now: float, delay: float
) -> None:
    """Grants stay in time order even if a request log's times run ahead of the clock."""
    limiter = SlidingWindow(count, 1.0, margin=0.0, history=history)
    assert limiter.delay(now) == pytest.approx(delay)
    with pytest.raises(RuntimeError):
        limiter.take(now)
    limiter.take(now + limiter.delay(now))


def test_history_keeps_only_the_latest_count_grants() -> None:
    limiter = SlidingWindow(3, 10.0, margin=0.0, history=[float(-i) for i in range(1000)])
    assert limiter.used(0.0) == 3
    assert limiter.delay(0.0) == pytest.approx(8.0)  # the third latest, at -2, leaves at 8


def test_sleeping_exactly_delay_always_allows_the_take_despite_rounding() -> None:
    # 0.1 + 0.7 == 0.7999999999999999, and 0.2 + (that - 0.2) == 0.7999999999999998: one ulp short.
    limiter = SlidingWindow(1, 0.7, margin=0.0, history=[0.1])
    now = 0.2
    wait = limiter.delay(now)
    assert now + wait >= 0.1 + 0.7
    assert limiter.delay(now + wait) == 0.0
    limiter.take(now + wait)


# --- not a token bucket ------------------------------------------------------------------------------


@pytest.mark.parametrize(("count", "period", "margin"), [(60, 60.0, 0.62), (10, 1.0, 0.03), (5, 60.0, 0.0)])
def test_window_is_not_a_bucket(count: int, period: float, margin: float) -> None:
    limiter = SlidingWindow(count, period, margin=margin)
    for _ in range(count):
        limiter.take(0.0)
    assert limiter.delay(0.0) > 0
    assert limiter.delay(period - 1e-6) > 0
    assert limiter.delay(period) == pytest.approx(margin)
    limiter.take(period + margin)
    assert limiter.used(period + margin) == 1  # the burst at 0 has left the window; only the new grant counts


@pytest.mark.parametrize(("count", "period"), [(60, 60.0), (3, 1.0)])
def test_greedy_caller_never_gets_two_windows_worth_in_the_first_period(count: int, period: float) -> None:
    limiter = SlidingWindow(count, period)
    grants: list[float] = []
    now = 0.0
    while now <= 2 * period:
        now += limiter.delay(now)
        limiter.take(now)
        grants.append(now)
        now += period / 1000  # ask again almost at once
    assert sum(1 for g in grants if g <= period) == count
    assert sum(1 for g in grants if g < period + limiter.margin) == count


# --- counting requests at their answers (take(pending=True) + settle) -------------------------------------
def test_a_pending_grant_fills_every_window_until_its_answer() -> None:
    limiter = SlidingWindow(2, 10.0, margin=0.0)
    first = limiter.take(0.0, pending=True)
    limiter.take(1.0, pending=True)
    assert limiter.pending == 2
    assert limiter.delay(1000.0) == math.inf  # no time opens it: only an answer can
    assert limiter.used(1000.0) == 2
    limiter.settle(first, 4.0)  # answered at 4 s: counts from 4 s, not from its send at 0 s
    assert limiter.pending == 1
    assert limiter.delay(5.0) == pytest.approx(9.0)  # 4 + 10
    assert limiter.used(14.0) == 1  # the settled one has left; the pending one still counts
    assert limiter.delay(14.0) == 0.0


def test_settle_is_idempotent_and_never_counts_before_the_send() -> None:
    limiter = SlidingWindow(1, 10.0, margin=0.0)
    ticket = limiter.take(5.0, pending=True)
    limiter.settle(ticket, 3.0)  # a clock read before the send: counts as the send
    limiter.settle(ticket, 50.0)  # already settled: nothing moves
    limiter.settle(12345, 1.0)  # unknown ticket: ignored
    assert limiter.delay(5.0) == pytest.approx(10.0)
    assert limiter.pending == 0


def test_next_free_times_waits_forever_for_what_only_answers_can_free() -> None:
    limiter = SlidingWindow(2, 10.0, margin=0.0)
    limiter.take(0.0, pending=True)
    limiter.take(0.0)
    assert limiter.next_free_times(1.0, 2) == [10.0, 20.0]  # the pending one holds one place throughout
    limiter.take(10.0, pending=True)
    assert limiter.next_free_times(11.0, 2) == [math.inf, math.inf]
    assert limiter.pending == 2  # planning recorded nothing


def test_answer_margin_is_a_tenth_of_the_send_margin_for_a_minute() -> None:
    assert answer_margin(60.0) == pytest.approx(0.065)
    assert answer_margin(6.0) == pytest.approx(0.011)
    assert answer_margin(86400.0) == 1.0
    assert answer_margin(60.0) < default_margin(60.0) / 9


_steps = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.floats(0.0, 3.0)),  # wait this long (at least), then send when allowed
        st.tuples(st.just("answer"), st.integers(0, 30)),  # the answer to the i-th oldest open request arrives
    ),
    min_size=1,
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(count=st.integers(1, 8), period=st.floats(0.5, 20.0), steps=_steps)
def test_counting_at_answers_is_exact_whenever_the_server_stamps_each_request(
    count: int, period: float, steps: list[tuple[str, float]]
) -> None:
    """Whatever the latencies, the server stamps request i somewhere in [send_i, answer_i]; the adversary picks
    the stamps. No choice may put more than ``count`` stamps in a window of ``period``: for every t, at most
    ``count`` requests have send < t + period and answer >= t (it suffices to check t at each answer)."""
    limiter = SlidingWindow(count, period, margin=0.0)
    clock = 0.0
    open_: list[tuple[int, float]] = []  # (ticket, send)
    done: list[tuple[float, float]] = []  # (send, answer)
    for kind, value in steps:
        if kind == "send":
            clock += value
            wait = limiter.delay(clock)
            if math.isinf(wait):
                assert len(open_) == count  # only a full set of unanswered requests waits forever
                continue
            clock += wait
            open_.append((limiter.take(clock, pending=True), clock))
        elif open_:
            ticket, sent = open_.pop(int(value) % len(open_))
            clock += 0.01
            limiter.settle(ticket, clock)
            done.append((sent, clock))
    spans = done + [(sent, math.inf) for _, sent in open_]
    for _, t in done:
        assert sum(1 for s, a in spans if s < t + period and a >= t) <= count


# --- next_free_times ---------------------------------------------------------------------------------


def test_next_free_times_shows_the_plan_without_recording_it() -> None:
    limiter = SlidingWindow(3, 10.0, margin=0.5, history=[0.0, 1.0])
    plan = limiter.next_free_times(2.0, 5)
    assert plan == pytest.approx([2.0, 10.5, 11.5, 12.5, 21.0])
    assert limiter.used(2.0) == 2
    for t in plan:
        limiter.take(t)


@pytest.mark.parametrize(("k", "expected"), [(0, []), (1, [7.0]), (3, [7.0, 7.0, 7.0])])
def test_next_free_times_on_an_empty_window(k: int, expected: list[float]) -> None:
    assert SlidingWindow(3, 10.0).next_free_times(7.0, k) == expected


def test_next_free_times_rejects_negative_k() -> None:
    with pytest.raises(ValueError):
        SlidingWindow(3, 10.0).next_free_times(0.0, -1)


# --- the property: never count + 1 in any window, and never slower than needed -------------------------


def _window_counts_ok(grants: list[tuple[float, bool]], length: float, count: int) -> bool:
    """No half-open window [s, s + length) starting at a grant holds more than count grants, among the
    windows that hold a grant the limiter made (history alone may break the rule: it is not ours)."""
    times = [t for t, _ in grants]
    for s in times:
        start = bisect_left(times, s)
        end = bisect_left(times, s + length)  # the first grant outside [s, s + length)
        if end - start > count and any(new for _, new in grants[start:end]):
            return False
    return True


_delays = st.one_of(st.just(0.0), st.floats(0.0, 5.0), st.floats(0.0, 200.0))


@settings(max_examples=300, deadline=None)
@given(
    count=st.integers(1, 20),
    period=st.floats(0.1, 100.0),
    margin=st.one_of(st.none(), st.just(0.0), st.floats(0.0, 5.0)),
    history_ages=st.lists(st.floats(0.0, 250.0), max_size=40),
    start=st.floats(-1000.0, 1000.0),
    gaps=st.lists(_delays, min_size=1, max_size=80),
)
def test_no_window_ever_holds_more_than_count_and_grants_come_as_early_as_allowed(
    count: int,
    period: float,
    margin: float | None,
    history_ages: list[float],
    start: float,
    gaps: list[float],
) -> None:
    history = [start - age for age in history_ages]  # unsorted, some far older than the window
    limiter = SlidingWindow(count, period, margin=margin, history=history)
    window = limiter.window
    made: list[float] = []
    clock = start
    requested = start
    for gap in gaps:
        requested += gap
        clock = max(clock, requested)
        wait = limiter.delay(clock)
        assert wait >= 0
        # The limiter waits exactly when the window is full, and only as long as needed (work-conserving).
        assert (wait == 0) == (limiter.used(clock) < count)
        recent = sorted(history + made)
        earliest = clock if len(recent) < count else max(clock, recent[-count] + window)
        assert clock + wait >= earliest
        assert clock + wait == pytest.approx(earliest, rel=1e-12, abs=1e-9)
        clock += wait
        assert limiter.delay(clock) == 0
        limiter.take(clock)
        made.append(clock)

    grants = sorted([(t, False) for t in history] + [(t, True) for t in made])
    assert _window_counts_ok(grants, window, count)
    assert _window_counts_ok(grants, period, count)


@settings(max_examples=150, deadline=None)
@given(
    count=st.integers(1, 20),
    period=st.floats(0.1, 100.0),
    history_ages=st.lists(st.floats(0.0, 250.0), max_size=40),
    k=st.integers(0, 50),
)
def test_next_free_times_is_what_a_greedy_caller_gets(
    count: int, period: float, history_ages: list[float], k: int
) -> None:
    history = [-age for age in history_ages]
    plan = SlidingWindow(count, period, history=history).next_free_times(0.0, k)
    limiter = SlidingWindow(count, period, history=history)
    clock = 0.0
    for planned in plan:
        clock += limiter.delay(clock)
        limiter.take(clock)
        assert planned == clock
    assert len(plan) == k


# --- acquire with an injected clock and sleep --------------------------------------------------------


async def test_acquire_grants_sixty_at_once_then_waits_out_the_window() -> None:
    clock = FakeClock()
    limiter = SlidingWindow(60, 60.0)  # default margin 0.62 s
    grants = [await limiter.acquire(clock.time, clock.sleep) for _ in range(121)]
    assert grants[:60] == [0.0] * 60
    assert grants[60:120] == pytest.approx([60.62] * 60)
    assert grants[120] == pytest.approx(121.24)
    assert clock.sleeps == pytest.approx([60.62, 60.62])


async def test_acquire_sleeps_again_when_woken_early() -> None:
    clock = FakeClock(early=[0.001])
    limiter = SlidingWindow(1, 10.0, margin=0.0)
    assert await limiter.acquire(clock.time, clock.sleep) == 0.0
    granted = await limiter.acquire(clock.time, clock.sleep)
    assert granted >= 10.0
    assert len(clock.sleeps) == 2
    assert clock.sleeps[1] == pytest.approx(0.001)


async def test_concurrent_acquirers_never_share_a_slot() -> None:
    clock = FakeClock()
    limiter = SlidingWindow(2, 1.0, margin=0.1)
    grants = await asyncio.gather(*(limiter.acquire(clock.time, clock.sleep) for _ in range(7)))
    ordered = sorted(grants)
    assert all(b - a >= 1.1 - 1e-9 for a, b in zip(ordered, ordered[2:], strict=False))


async def test_acquire_defaults_to_the_running_loop_clock() -> None:
    limiter = SlidingWindow(5, 60.0)
    before = asyncio.get_running_loop().time()
    granted = await limiter.acquire()
    assert before <= granted <= asyncio.get_running_loop().time()
    assert limiter.used(granted) == 1


# --- InFlightGate ------------------------------------------------------------------------------------


def test_gate_never_exceeds_limit() -> None:
    gate = InFlightGate(3)
    assert [gate.try_acquire() for _ in range(5)] == [True, True, True, False, False]
    assert (gate.in_flight, gate.free(), gate.max_seen) == (3, 0, 3)
    gate.release()
    assert gate.free() == 1
    assert gate.try_acquire()
    assert not gate.try_acquire()
    assert gate.max_seen == 3


def test_gate_left_over_above_limit_blocks_until_enough_finish() -> None:
    gate = InFlightGate(2, initial=4)
    assert (gate.in_flight, gate.free(), gate.max_seen) == (4, 0, 4)
    assert not gate.try_acquire()
    gate.release()
    gate.release()
    assert not gate.try_acquire()  # back at the limit: still no room
    gate.release()
    assert gate.try_acquire()
    assert gate.in_flight == 2
    assert gate.max_seen == 4


def test_gate_release_below_zero_raises() -> None:
    gate = InFlightGate(2)
    assert gate.try_acquire()
    gate.release()
    with pytest.raises(RuntimeError):
        gate.release()
    assert gate.in_flight == 0


@pytest.mark.parametrize(("limit", "initial"), [(0, 0), (-1, 0), (2, -1), (True, 0)])
def test_gate_rejects_nonsense_arguments(limit: int, initial: int) -> None:
    with pytest.raises(ValueError):
        InFlightGate(limit, initial)


@settings(max_examples=200, deadline=None)
@given(limit=st.integers(1, 12), initial=st.integers(0, 20), ops=st.lists(st.booleans(), max_size=100))
def test_gate_matches_a_model_and_never_grows_past_limit(limit: int, initial: int, ops: list[bool]) -> None:
    gate = InFlightGate(limit, initial)
    model = initial
    peak = initial
    for acquire in ops:
        if acquire:
            assert gate.try_acquire() == (model < limit)
            model += model < limit
        elif model > 0:
            gate.release()
            model -= 1
        else:
            with pytest.raises(RuntimeError):
                gate.release()
        peak = max(peak, model)
        assert gate.in_flight == model
        assert gate.free() == max(0, limit - model)
        assert gate.in_flight <= max(limit, initial)
    assert gate.max_seen == peak


# --- parse_rate / parse_duration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("60/60", (60, 60.0)),
        ("60/6", (60, 6.0)),
        ("100/1.5", (100, 1.5)),
        ("60/1m", (60, 60.0)),
        ("600/1h", (600, 3600.0)),
        ("10/90s", (10, 90.0)),
        ("1/0.5s", (1, 0.5)),
        (" 60 / 60 ", (60, 60.0)),
        ("100/1h30m", (100, 5400.0)),
    ],
)
def test_parse_rate_accepts(text: str, expected: tuple[int, float]) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "60",
        "60/",
        "/60",
        "0/60",
        "-1/60",
        "1.5/60",
        "60/0",
        "60/0s",
        "60/-1",
        "60/abc",
        "abc/60",
        "60/60/60",
        "60 per minute",
        "2000000/1",
        "60/1x",
        "60/6\n0",
    ],
)
def test_parse_rate_rejects_with_one_line_naming_the_text(text: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_rate(text)
    message = str(caught.value)
    assert repr(text) in message
    assert "\n" not in message
    assert caught.value.exit_code == 2


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90.0),
        ("14m", 840.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1h30m15s", 5415.0),
        ("2m30s", 150.0),
        ("45", 45.0),
        ("0.5s", 0.5),
        ("0.5", 0.5),
        (".5s", 0.5),
        ("1.5h", 5400.0),
        ("0", 0.0),
        ("0s", 0.0),
        (" 90S ", 90.0),
        ("1h 30m", 5400.0),
    ],
)
def test_parse_duration_accepts(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "-5",
        "-5s",
        "abc",
        "5x",
        "1d",
        "30m1h",
        "1h1h",
        "s",
        "h",
        "1..5s",
        "1e3",
        "nan",
        "inf",
        "9" * 400,
    ],
)
def test_parse_duration_rejects_with_one_line_naming_the_text(text: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_duration(text)
    message = str(caught.value)
    assert repr(text) in message
    assert "\n" not in message
