"""How close can any poll policy get to the bound in benchmark regime (a)? A model, no network, no runner.

    python tests/poll_model.py [--seeds 12]

Regime (a): 60 requests per 6 s (an exact sliding window), 10 in flight, 100 jobs with prediction times uniform on
1-6 s. The model is kinder than reality: it knows the true distribution, requests take no time (3 ms from create to
start), and time advances in 10 ms steps. Each step it sends creates while a slot and the window allow, then polls
as the policy says. Printed: efficiency (bound / makespan, the benchmark's definition), polls per job and the mean
time a finished prediction waits to be seen.

Every policy's polls are paced at the window's rate and leave one window place for the next create, as the runner's.
Policies:
- ``greedy``: poll the flight most likely done since its last check, if that chance is at least a threshold;
- ``value``: among the flights at least a threshold likely done, the one with the highest chance x time since its
  last check (what the runner does since ``policy.poll_value``);
- ``dp``: poll each flight at the ages of the single-flight optimal schedule (dynamic programming over check times
  for a price per poll), the most overdue first.

The single-flight frontier (polls per job -> least mean delay) is printed too: what one flight with the whole budget
to itself could reach. Ten flights sharing one window cannot all be polled at their ideal ages.
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
from collections import deque
from collections.abc import Callable, Sequence

LO, HI = 1.0, 6.0  # prediction times, uniform
COUNT, PERIOD, SLOTS, JOBS = 60, 6.0, 10, 100
STEP, RTT = 0.01, 0.003


def cdf(age: float) -> float:
    return min(1.0, max(0.0, (age - LO) / (HI - LO)))


def slot_bound(durations: Sequence[float]) -> float:
    slots = [0.0] * SLOTS
    for d in durations:
        heapq.heappush(slots, heapq.heappop(slots) + d)
    return max(slots)


def request_bound() -> float:
    return PERIOD * (math.ceil(2 * JOBS / COUNT) - 1)


# A policy: given (now, flights as {job: (created_at, polls_done, last_checked_age)}) -> the job to poll, or None.
Flights = dict[int, tuple[float, int, float]]
Policy = Callable[[float, Flights], int | None]


def greedy(threshold: float) -> Policy:
    def choose(now: float, flights: Flights) -> int | None:
        best, best_p = None, threshold
        for job, (created, _, checked) in flights.items():
            p = (cdf(now - created) - cdf(checked)) / max(1e-12, 1.0 - cdf(checked))
            if p >= best_p:
                best, best_p = job, p
        return best

    return choose


def valued(threshold: float) -> Policy:
    """Among flights at least ``threshold`` likely done, the one with the highest chance x time since its check."""

    def choose(now: float, flights: Flights) -> int | None:
        best, best_value = None, -1.0
        for job, (created, _, checked) in flights.items():
            p = (cdf(now - created) - cdf(checked)) / max(1e-12, 1.0 - cdf(checked))
            value = p * (now - created - checked)
            if p >= threshold and value > best_value:
                best, best_value = job, value
        return best

    return choose


def by_schedule(ages: Sequence[float]) -> Policy:
    def choose(now: float, flights: Flights) -> int | None:
        best, best_due = None, now
        for job, (created, polls, _) in flights.items():
            due = created + (ages[polls] if polls < len(ages) else ages[-1] + 0.1 * (polls - len(ages) + 1))
            if due <= best_due:
                best, best_due = job, due
        return best

    return choose


def simulate(durations: Sequence[float], policy: Policy, *, pace: float = 0.1, reserve: int = 1) -> tuple[float, ...]:
    """(makespan, polls per job, mean detection delay) of one batch."""
    window: deque[float] = deque()
    flights: Flights = {}
    t, nxt, polls, last_poll = 0.0, 0, 0, -math.inf
    finished: list[float] = []
    delays: list[float] = []
    while nxt < len(durations) or flights:
        while window and window[0] + PERIOD <= t:
            window.popleft()
        while nxt < len(durations) and len(flights) < SLOTS and len(window) < COUNT:
            flights[nxt] = (t + RTT, 0, 0.0)
            window.append(t)
            nxt += 1
        keep = reserve if nxt < len(durations) and len(flights) == SLOTS else 0
        while COUNT - len(window) > keep and t - last_poll >= pace - 1e-9:
            job = policy(t, flights)
            if job is None:
                break
            created, done, _ = flights[job]
            window.append(t)
            polls += 1
            last_poll = t
            if durations[job] <= t - created:
                finished.append(t)
                delays.append(t - created - durations[job])
                del flights[job]
            else:
                flights[job] = (created, done + 1, t - created)
        t += STEP
    return max(finished), polls / len(durations), sum(delays) / len(delays)


def optimal_schedule(price: float, step: float = 0.02) -> tuple[list[float], float, float]:
    """Check ages minimising E[delay] + price * E[polls] for one flight; returns (ages, E[polls], E[delay])."""
    grid = [i * step for i in range(round(HI / step) + 1)]
    n = len(grid)
    surv = [1.0 - cdf(a) for a in grid]
    # E[(s - X) 1{a < X <= s}] for uniform X: integral of (s - x) f(x) over the part of (a, s] inside (LO, HI].
    dens = 1.0 / (HI - LO)

    def wait(a: float, s: float) -> float:
        lo, hi = max(a, LO), min(s, HI)
        return 0.0 if hi <= lo else dens * ((s - lo) ** 2 - (s - hi) ** 2) / 2

    value, polls, delay, nxt = [0.0] * n, [0.0] * n, [0.0] * n, [n - 1] * n
    for i in range(n - 2, -1, -1):
        if surv[i] <= 1e-12:
            continue
        best = math.inf
        for j in range(i + 1, n):
            go_on = surv[j] / surv[i]
            cost = price + wait(grid[i], grid[j]) / surv[i] + go_on * value[j]
            if cost < best:
                best, nxt[i] = cost, j
        j = nxt[i]
        go_on = surv[j] / surv[i]
        value[i] = best
        polls[i] = 1 + go_on * polls[j]
        delay[i] = wait(grid[i], grid[j]) / surv[i] + go_on * delay[j]
    ages, i = [], 0
    while surv[i] > 1e-12 and i < n - 1:
        i = nxt[i]
        ages.append(grid[i])
    return ages, polls[0], delay[0]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--seeds", type=int, default=12)
    args = p.parse_args(argv)
    rngs = [random.Random(seed) for seed in range(args.seeds)]
    batches = [[rng.uniform(LO, HI) for _ in range(JOBS)] for rng in rngs]
    policies: dict[str, Policy] = {f"greedy p>={t}": greedy(t) for t in (0.05, 0.1, 0.2, 0.3)}
    policies.update({f"value, p>={t}": valued(t) for t in (0.05, 0.1, 0.2)})
    for price in (0.15, 0.2, 0.25):
        policies[f"dp schedule, price {price}"] = by_schedule(optimal_schedule(price)[0])
    print(f"{'policy':<24} {'efficiency':>10} {'min':>6} {'polls/job':>9} {'delay s':>8}")
    for name, policy in policies.items():
        runs = [(max(slot_bound(b), request_bound()), simulate(b, policy)) for b in batches]
        effs = [bound / r[0] for bound, r in runs]
        print(
            f"{name:<24} {sum(effs) / len(effs):>10.3f} {min(effs):>6.3f} "
            f"{sum(r[1] for _, r in runs) / len(runs):>9.2f} {sum(r[2] for _, r in runs) / len(runs):>8.3f}"
        )
    print("single flight, the whole budget to itself (dynamic programming):")
    for price in (0.1, 0.15, 0.2, 0.3):
        _, polls, delay = optimal_schedule(price)
        print(f"  price {price}: {polls:.2f} polls per job -> mean delay {delay:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
