"""The poll model's own arithmetic (tests/poll_model.py backs a claim in the README; it must compute what it says)."""

from __future__ import annotations

import itertools

import pytest

from tests.poll_model import JOBS, SLOTS, greedy, optimal_schedule, request_bound, simulate, slot_bound


def test_a_higher_price_per_poll_buys_fewer_polls_and_a_longer_wait() -> None:
    frontier = [optimal_schedule(price)[1:] for price in (0.1, 0.2, 0.4)]
    polls = [p for p, _ in frontier]
    delays = [d for _, d in frontier]
    assert polls == sorted(polls, reverse=True) and delays == sorted(delays)
    ages, _, _ = optimal_schedule(0.2)
    assert ages[0] > 1.0 and ages[-1] == pytest.approx(6.0)  # nothing ends before 1 s; everything by 6 s
    gaps = [b - a for a, b in itertools.pairwise(ages)]
    assert gaps == sorted(gaps, reverse=True)  # checks crowd towards the end, where the chance of done rises


def test_jobs_that_all_take_the_shortest_time_are_seen_at_the_first_poll_after_it() -> None:
    durations = [1.0] * JOBS
    makespan, polls_per_job, delay = simulate(durations, greedy(0.05))
    assert polls_per_job == pytest.approx(1.0)  # chance of done is 0 before 1 s, 1 after: one poll each
    # Ten predictions end together; paced at one poll per 0.1 s, the last of each ten is seen ~0.9 s later.
    assert 0.3 < delay <= SLOTS * 0.1 + 0.05
    assert makespan >= max(slot_bound(durations), request_bound())
