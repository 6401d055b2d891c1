"""The pure policies, by table: retry delays, poll plans, the poll pacer, and what a run does with each job."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchrunner.engine.policy import (
    MIN_SAMPLES,
    PollPacer,
    PollPlan,
    backoff,
    done_probability,
    doubt_hold,
    expected_duration,
    likely_done_age,
    observed_duration,
    plan_polls,
    poll_reserve,
    poll_value,
    prior_plan,
    retry_delay,
)
from batchrunner.engine.runstate import classify
from batchrunner.store.ledger import JobState, JobStatus


@pytest.mark.parametrize(
    ("attempt", "low", "high"),
    [(1, 0.25, 0.5), (2, 0.5, 1.0), (3, 1.0, 2.0), (6, 8.0, 16.0), (7, 15.0, 30.0), (50, 15.0, 30.0)],
)
def test_backoff_is_exponential_with_jitter_and_capped(attempt: int, low: float, high: float) -> None:
    rng = random.Random(1)
    draws = [backoff(attempt, base=0.5, cap=30.0, rng=rng) for _ in range(200)]
    assert all(low <= d <= high for d in draws)
    assert max(draws) - min(draws) > (high - low) / 2  # jittered, not fixed


@pytest.mark.parametrize(
    ("retry_after", "expected_at_least"),
    [(None, 0.25), (0.0, 0.25), (5.0, 5.0), (120.0, 120.0)],
)
def test_retry_delay_honours_retry_after_and_never_undercuts_backoff(
    retry_after: float | None, expected_at_least: float
) -> None:
    delay = retry_delay(1, retry_after, rng=random.Random(0))
    assert delay >= expected_at_least
    if retry_after is not None and retry_after > 1:
        assert delay == retry_after


def test_prior_plan_is_geometric_from_the_first_poll() -> None:
    plan = prior_plan(2.0, growth=1.5, count=4)
    assert plan.ages == pytest.approx((2.0, 3.0, 4.5, 6.75))
    assert plan.next_poll_age(0, 0.0) == 2.0
    assert plan.next_poll_age(4, 7.0) == pytest.approx(6.75 + plan.tail_interval)


@pytest.mark.parametrize(
    ("polls_done", "age_now", "expected"),
    [(0, 0.0, 1.0), (1, 0.0, 2.0), (1, 2.5, 2.5), (3, 0.0, 3.5), (4, 0.0, 4.0), (5, 9.0, 9.0)],
)
def test_next_poll_age_follows_the_plan_then_the_tail_and_is_never_in_the_past(
    polls_done: int, age_now: float, expected: float
) -> None:
    plan = PollPlan(ages=(1.0, 2.0, 3.0), tail_interval=0.5)
    assert plan.next_poll_age(polls_done, age_now) == pytest.approx(expected)


def test_too_few_samples_fall_back_to_the_prior() -> None:
    plan = plan_polls([1.0] * (MIN_SAMPLES - 1), rate=1.0, concurrency=10, prior_initial=3.0)
    assert plan.ages[0] == 3.0 and plan.expected_polls is None


def uniform(low: float, high: float, n: int = 200) -> list[float]:
    return [low + (high - low) * i / (n - 1) for i in range(n)]


def test_request_bound_regime_plans_about_one_poll_per_job_at_the_slowest_time() -> None:
    # 60 requests per 6 s, 10 slots, predictions 0.2-1 s: slots are plentiful, requests are not.
    plan = plan_polls(uniform(0.2, 1.0), rate=10.0, concurrency=10, prior_initial=0.5)
    assert plan.expected_polls is not None and plan.expected_polls <= 1.5
    assert plan.ages[-1] == pytest.approx(1.0)


def test_slot_bound_regime_plans_more_polls_to_catch_results_sooner() -> None:
    # Same limits, predictions 1-6 s: slots bind, spare requests go to polls that shorten the wait.
    plan = plan_polls(uniform(1.0, 6.0), rate=10.0, concurrency=10, prior_initial=0.5)
    assert plan.expected_polls is not None and plan.expected_polls >= 2
    assert plan.expected_delay is not None and plan.expected_delay < 1.0


def test_more_requests_never_mean_fewer_polls() -> None:
    samples = uniform(1.0, 6.0)
    polls = [plan_polls(samples, rate=r, concurrency=10, prior_initial=1).expected_polls for r in (2, 5, 10, 50)]
    assert polls == sorted(polls)  # type: ignore[type-var]


def test_min_interval_spreads_planned_polls() -> None:
    plan = plan_polls(uniform(1.0, 6.0), rate=1e9, concurrency=10, prior_initial=1, min_interval=1.0)
    gaps = [b - a for a, b in zip(plan.ages, plan.ages[1:], strict=False)]
    assert all(g >= 1.0 - 1e-9 for g in gaps)


@pytest.mark.parametrize(
    ("done", "last_running", "expected"),
    [(4.0, None, 4.0), (4.0, 3.0, 3.5), (4.0, 4.0, 4.0), (4.0, 5.0, 4.0)],
)
def test_observed_duration_is_the_midpoint_of_the_last_two_polls(
    done: float, last_running: float | None, expected: float
) -> None:
    assert observed_duration(done, last_running) == expected


def test_pacer_allows_a_small_burst_then_the_sustainable_rate() -> None:
    pacer = PollPacer(rate=2.0, burst=2.0)
    assert pacer.delay(0.0) == 0.0
    pacer.take(0.0)
    pacer.take(0.0)
    assert pacer.delay(0.0) == pytest.approx(0.5)
    assert pacer.delay(0.5) == 0.0
    pacer.take(0.5)
    assert pacer.delay(0.5) == pytest.approx(0.5)


def test_pacer_never_lets_more_than_rate_times_time_plus_burst() -> None:
    pacer = PollPacer(rate=5.0, burst=2.0)
    now, taken = 0.0, 0
    while now < 10.0:
        if pacer.delay(now) == 0.0:
            pacer.take(now)
            taken += 1
        now += 0.01
    assert taken <= 5.0 * 10.0 + 2


def state(status: JobStatus, *, attempts: int = 0, retryable: bool = True) -> JobState:
    return JobState(fingerprint="f", job="j", status=status, attempts=attempts, retryable=retryable)


@pytest.mark.parametrize(
    ("st", "file_present", "expected"),
    [
        (None, False, "submit"),
        (state(JobStatus.PENDING), False, "submit"),
        (state(JobStatus.IN_DOUBT), False, "submit"),
        (state(JobStatus.IN_FLIGHT), False, "poll"),
        (state(JobStatus.SUCCEEDED), True, "done"),
        (state(JobStatus.SUCCEEDED), False, "submit"),
        (state(JobStatus.FAILED, attempts=1), False, "submit"),
        (state(JobStatus.FAILED, attempts=3), False, "failed"),
        (state(JobStatus.FAILED, attempts=1, retryable=False), False, "failed"),
    ],
)
def test_classify_decides_what_a_run_does_with_a_job(st: JobState | None, file_present: bool, expected: str) -> None:
    assert classify(st, file_present=file_present, max_attempts=3) == expected


SAMPLES = [1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize(
    ("age", "checked", "expected"),
    [
        (0.5, 0.0, 0.0),  # younger than every prediction seen
        (2.0, 0.0, 0.5),  # half the samples are done by 2 s
        (4.0, 0.0, 1.0),
        (3.0, 2.0, 0.5),  # of the two left running at 2 s, one is done by 3 s
        (2.5, 2.0, 0.0),
        (4.4, 4.0, 0.5),  # past every sample: grows with time since the check, 1 after a fifth of 4 s
        (5.0, 4.0, 1.0),
    ],
)
def test_done_probability_is_conditional_on_the_last_check(age: float, checked: float, expected: float) -> None:
    assert done_probability(SAMPLES, age, checked) == pytest.approx(expected)


def test_done_probability_without_samples_is_zero() -> None:
    assert done_probability([], 10.0, 0.0) == 0.0


@pytest.mark.parametrize(
    ("creates_waiting", "slots_free", "reserve"),
    [
        (True, 0, 1),  # every slot busy, jobs waiting: the next finish needs a create at once
        (True, 3, 0),  # a slot is free: the create goes before any poll anyway
        (False, 0, 0),  # nothing left to create: polls may use the whole window
        (False, 5, 0),
    ],
)
def test_poll_reserve_keeps_a_place_for_the_create_only_while_one_is_coming(
    creates_waiting: bool, slots_free: int, reserve: int
) -> None:
    assert poll_reserve(creates_waiting=creates_waiting, slots_free=slots_free) == reserve


@settings(max_examples=300, deadline=None)
@given(
    samples=st.lists(st.floats(0.01, 100.0), min_size=1, max_size=60).map(sorted),
    checked=st.floats(0.0, 120.0),
    threshold=st.floats(0.01, 1.0),
)
def test_likely_done_age_is_the_first_age_at_which_the_chance_reaches_the_threshold(
    samples: list[float], checked: float, threshold: float
) -> None:
    age = likely_done_age(samples, checked, threshold)
    assert age >= checked
    assert done_probability(samples, age, checked) >= threshold - 1e-9
    # Any younger age falls short: a timer set for ``age`` is not late.
    younger = max(checked, math.nextafter(age, 0.0))
    if younger < age:
        assert done_probability(samples, younger, checked) < threshold + 1e-9


@pytest.mark.parametrize(
    ("samples", "checked", "threshold", "age"),
    [
        ([1.0, 2.0, 3.0, 4.0], 0.0, 0.25, 1.0),  # a quarter of the samples by 1 s
        ([1.0, 2.0, 3.0, 4.0], 0.0, 0.3, 2.0),  # the next step up
        ([1.0, 2.0, 3.0, 4.0], 2.0, 0.5, 3.0),  # given still running at 2 s: half of what is left
        ([1.0, 2.0, 3.0, 4.0], 5.0, 0.1, 5.08),  # past every sample: 0.1 of a fifth of the longest
    ],
)
def test_likely_done_age_table(samples: list[float], checked: float, threshold: float, age: float) -> None:
    assert likely_done_age(samples, checked, threshold) == pytest.approx(age)


SAMPLES_1_TO_6 = [1.0 + 0.5 * k for k in range(11)]  # 1.0, 1.5, ..., 6.0


@pytest.mark.parametrize(
    ("age", "checked", "value"),
    [
        (2.0, 0.0, 3 / 11 * 2.0),  # never checked: P(done by 2 s) = 3/11, unseen for up to 2 s
        (6.0, 5.5, 1.0 * 0.5),  # old and just checked: surely done, little time recovered
        (3.0, 3.0, 0.0),  # checked this instant: nothing to gain
        (0.5, 0.0, 0.0),  # younger than any prediction seen
    ],
)
def test_poll_value_is_the_chance_done_since_the_check_times_the_time_since(
    age: float, checked: float, value: float
) -> None:
    assert poll_value(SAMPLES_1_TO_6, age, checked) == pytest.approx(value)


def test_poll_value_prefers_a_young_prediction_left_unchecked_to_an_old_one_just_checked() -> None:
    young, old = (2.5, 0.0), (6.0, 5.5)
    assert done_probability(SAMPLES_1_TO_6, *young) < done_probability(SAMPLES_1_TO_6, *old)
    assert poll_value(SAMPLES_1_TO_6, *young) > poll_value(SAMPLES_1_TO_6, *old)


@pytest.mark.parametrize(
    ("durations", "poll_initial", "expected", "hold"),
    [
        ([], 3.0, 9.0, 30.0),  # nothing known: three first polls to finish, ten to hold a doubtful slot
        ([2.0, 4.0], 0.05, 0.15, 1.0),  # too few samples; the hold is at least a second
        ([1.0, 2.0, 3.0, 4.0, 10.0], 3.0, 4.0 * 1.2, 15.0),  # 90th percentile (index 3) x 1.2; longest x 1.5
    ],
)
def test_expected_duration_and_doubt_hold_by_table(
    durations: list[float], poll_initial: float, expected: float, hold: float
) -> None:
    assert expected_duration(durations, poll_initial) == pytest.approx(expected)
    assert doubt_hold(durations, poll_initial) == pytest.approx(hold)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.floats(0.01, 50.0), min_size=1, max_size=60),
    st.lists(st.floats(0.01, 60.0), min_size=1, max_size=12),
)
def test_a_plan_is_scored_as_one_poll_at_a_time_would_score_it(samples: list[float], ages: list[float]) -> None:
    # Scored from prefix sums (a few bisections per age, so re-planning at 500 samples stays cheap), a plan's polls
    # and delay are what following each sample poll by poll gives: the first poll at or after it sees it.
    from batchrunner.engine.policy import _evaluate

    samples, ages = sorted(samples), sorted(set(ages))
    polls = delay = 0.0
    for d in samples:
        k = next((i for i, a in enumerate(ages) if a >= d), len(ages) - 1)
        polls += k + 1
        delay += max(0.0, ages[k] - d)
    got_polls, got_delay = _evaluate(samples, ages)
    assert got_polls == pytest.approx(polls / len(samples))
    assert got_delay == pytest.approx(delay / len(samples), abs=1e-9)
