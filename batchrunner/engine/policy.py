"""Pure policies: when to retry, and when to poll a prediction.

Each policy takes values and returns values; the scheduler's loops sleep and do I/O around them. Nothing here reads a
clock or a file, so every rule is tested by table.

Polling is where the request budget goes. A prediction needs one create and at least one poll that sees it finished;
every poll before that one is a request not spent on a create. The poll plan therefore places polls at quantiles of the
prediction times seen so far, and chooses how many polls a job gets from the limits: few when requests are what binds
(each wasted poll costs a create), more when in-flight slots bind (each moment a finished prediction waits unseen keeps
a slot idle).
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

# Below this many observed prediction times the plan falls back to a geometric schedule from the prior.
MIN_SAMPLES = 5
# The most polls one job is planned to get; beyond the plan's last age polls continue at the tail interval.
MAX_PLANNED_POLLS = 16


def backoff(attempt: int, *, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``attempt`` (1-based): exponential with full jitter.

    Full jitter (a uniform draw below the exponential ceiling) spreads the retries of many jobs that failed together,
    so they do not come back as one burst.
    """
    ceiling = min(cap, base * 2.0 ** max(0, attempt - 1))
    draw = (rng or random).random()
    return ceiling * (0.5 + 0.5 * draw)


def retry_delay(
    attempt: int,
    retry_after: float | None,
    *,
    base: float = 0.5,
    cap: float = 30.0,
    rng: random.Random | None = None,
) -> float:
    """The wait before a retry: the server's ``Retry-After`` when it gave one, never less than our own backoff."""
    own = backoff(attempt, base=base, cap=cap, rng=rng)
    if retry_after is None:
        return own
    return max(retry_after, own)


@dataclass(frozen=True, slots=True)
class PollPlan:
    """Ages (seconds since the create was answered) at which to poll, then a steady interval after the last one."""

    ages: tuple[float, ...]
    tail_interval: float
    expected_polls: float | None = None  # per job, from the samples; None for the prior's plan
    expected_delay: float | None = None  # seconds a finished prediction waits to be seen, from the samples

    def next_poll_age(self, polls_done: int, age_now: float) -> float:
        """The age of the next poll after ``polls_done`` polls, never earlier than ``age_now``."""
        if polls_done < len(self.ages):
            return max(self.ages[polls_done], age_now)
        last = self.ages[-1] if self.ages else 0.0
        extra = polls_done - len(self.ages) + 1
        return max(last + extra * self.tail_interval, age_now)


def prior_plan(initial: float, *, growth: float = 1.5, count: int = 12) -> PollPlan:
    """A geometric schedule for when nothing is known yet: ``initial``, then each gap ``growth`` times the last."""
    ages = tuple(initial * growth**k for k in range(count))
    return PollPlan(ages=ages, tail_interval=ages[-1] * (growth - 1))


def _evaluate(
    samples: Sequence[float], ages: Sequence[float], sums: Sequence[float] | None = None
) -> tuple[float, float]:
    """Mean polls per job and mean detection delay if polls happen at ``ages`` (both sorted).

    A sample is seen by the first poll at or after it (the last poll when it outlasts them all, with no delay).
    ``sums`` (``prefix_sums(samples)``) makes it a few bisections per age instead of a walk over every sample.
    """
    n = len(samples)
    if sums is None:
        sums = prefix_sums(samples)
    polls = 0
    delay = 0.0
    lo = 0
    for k, age in enumerate(ages):
        hi = bisect_right(samples, age, lo)
        count = hi - lo
        polls += count * (k + 1)
        delay += count * age - (sums[hi] - sums[lo])
        lo = hi
    polls += (n - lo) * len(ages)
    return polls / n, delay / n


def prefix_sums(samples: Sequence[float]) -> list[float]:
    """``out[i]`` = the sum of the first ``i`` samples."""
    out = [0.0]
    for d in samples:
        out.append(out[-1] + d)
    return out


def _quantile_ages(samples: Sequence[float], n: int) -> tuple[float, ...]:
    """``n`` ages at equal probability steps of the empirical distribution; the last is the largest sample."""
    m = len(samples)
    ages = []
    for k in range(1, n + 1):
        idx = min(m - 1, max(0, math.ceil(k * m / n) - 1))
        ages.append(samples[idx])
    return tuple(sorted(set(ages)))


def plan_polls(
    durations: Sequence[float],
    *,
    rate: float,
    concurrency: int,
    prior_initial: float,
    min_interval: float = 0.0,
) -> PollPlan:
    """Choose the poll ages that let the batch finish soonest under both limits.

    ``durations`` are observed prediction times (seconds); ``rate`` is the request budget in requests per second.
    For each candidate count n of polls per job the plan is the n-quantile ages of the samples; its throughput is the
    smaller of what the slots allow, ``concurrency / (mean duration + mean detection delay)``, and what the requests
    allow, ``rate / (1 + mean polls per job)``. The n with the highest throughput wins (ties: fewer polls).
    """
    if len(durations) < MIN_SAMPLES:
        return prior_plan(max(prior_initial, min_interval))
    samples = sorted(durations)
    sums = prefix_sums(samples)
    mean_d = sums[-1] / len(samples)
    best: tuple[float, float, PollPlan] | None = None
    for n in range(1, MAX_PLANNED_POLLS + 1):
        ages = _quantile_ages(samples, n)
        if min_interval > 0:
            ages = _spread(ages, min_interval)
        polls, delay = _evaluate(samples, ages, sums)
        throughput = min(concurrency / max(mean_d + delay, 1e-9), rate / (1.0 + polls))
        spread = samples[-1] - samples[0]
        tail = max(min_interval, spread / n if spread > 0 else samples[-1] * 0.25, 1e-3)
        plan = PollPlan(ages=ages, tail_interval=tail, expected_polls=polls, expected_delay=delay)
        # Prefer a plan only when it is clearly better: fewer polls are kinder to the API at equal speed.
        if best is None or throughput > best[0] * 1.005:
            best = (throughput, polls, plan)
    assert best is not None
    return best[2]


def _spread(ages: Sequence[float], min_interval: float) -> tuple[float, ...]:
    """Drop ages closer than ``min_interval`` to the previous one kept (keeps the last age)."""
    kept: list[float] = []
    for a in ages:
        if not kept or a - kept[-1] >= min_interval:
            kept.append(a)
        else:
            kept[-1] = a
    return tuple(kept)


def learnt_duration(age_done: float, age_last_running: float | None, predict_time: float | None) -> float:
    """What a finished prediction teaches about prediction times: from create to finish, as closely as known.

    It finished after its last poll that saw it running and before the one that saw it done; the server's own
    ``predict_time`` (or a listing's ``run_time``) is a lower bound from the other side, since the create came first.
    Without it only the polls speak (``observed_duration``): a first poll later than every prediction would teach
    that predictions take as long as the first poll, and the plan would never poll earlier.
    """
    if predict_time is None or not 0 < predict_time <= age_done:
        return observed_duration(age_done, age_last_running)
    return max(predict_time, age_last_running or 0.0)


def observed_duration(age_done: float, age_last_running: float | None) -> float:
    """A prediction time estimated from the poll that saw it done and the last poll that saw it running.

    The truth lies between the two; the midpoint is unbiased when polls are dense, and when they are sparse it errs
    early, which makes the next plan poll earlier and so tightens the interval: the estimate corrects itself.
    """
    if age_last_running is None or age_last_running >= age_done:
        return age_done
    return (age_done + age_last_running) / 2


class PollPacer:
    """Spreads polls at the sustainable request rate, so polls never drain the window's burst.

    The sliding window lets COUNT requests through at once. Spending them all on early polls leaves nothing for the
    rest of the window: a batch then stalls until it frees. Creates may use the burst (each fills an idle slot); polls
    draw from this token bucket, refilled at COUNT/SECONDS with a small burst, and still take a window grant as well.
    Time is passed in, never read.
    """

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float = 2.0) -> None:
        self.rate = rate
        self.burst = max(1.0, burst)
        self._tokens = self.burst
        self._last: float | None = None

    def _refill(self, now: float) -> None:
        if self._last is not None and now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now if self._last is None else max(self._last, now)

    def delay(self, now: float) -> float:
        """Seconds until a poll may be sent (0.0 when now)."""
        self._refill(now)
        if self._tokens >= 1.0 or self.rate <= 0:
            return 0.0 if self._tokens >= 1.0 else math.inf
        return (1.0 - self._tokens) / self.rate

    def take(self, now: float) -> None:
        """Spend one token for a poll sent at ``now``."""
        self._refill(now)
        self._tokens -= 1.0


def expected_duration(durations: Sequence[float], poll_initial: float) -> float:
    """A pessimistic time for one prediction (for deadlines): the 90th percentile seen and a fifth again, else three
    first-poll intervals."""
    if len(durations) >= 3:
        ordered = sorted(durations)
        return ordered[int(0.9 * (len(ordered) - 1))] * 1.2
    return poll_initial * 3


def doubt_hold(durations: Sequence[float], poll_initial: float) -> float:
    """How long a create whose answer was lost keeps its slot: as long as its prediction may run.

    With prediction times known, the longest seen and half again; before that, ten first-poll intervals (30 s by
    default), since a slot freed too early lets the runner push the account past its cap.
    """
    if len(durations) >= 3:
        return max(durations) * 1.5
    return max(1.0, poll_initial * 10)


def cancel_hold(durations: Sequence[float], *, job_timeout: float, poll_initial: float) -> float:
    """How long after a cancel its prediction is still watched before its job may be created again.

    An accepted cancel is often only recorded: the prediction runs on, and its success is billed. Creating the job
    again while it may run pays twice, and holding on costs only a slot, so the job waits until the prediction is
    terminal, or until the account surely no longer runs it: the longest prediction seen and half again
    (:func:`doubt_hold`), never less than another ``job_timeout``, and never less than ten first-poll intervals (a
    second at least). That floor holds with samples too: the times seen are cut short by the timeout (a prediction
    that overran it is dropped from a resumed run's samples), and the runner needs time to see it end: with 1.5 x
    the longest seen alone, ``python tests/torture.py --kills 30 --jobs 120 --faults --seed 17
    --min-seconds-per-run 1 --max-seconds-per-run 3`` (predictions up to 0.15 s, a 0.1 s timeout: holds of about
    0.15 s) gave 2 of 65 cancelled predictions up while they ran, both paid twice; with the floor, none.
    """
    return max(job_timeout, doubt_hold(durations, poll_initial), poll_initial * 10, 1.0)


def poll_reserve(*, creates_waiting: bool, slots_free: int) -> int:
    """Places in the request window a poll must leave free: one while every slot is busy and jobs wait.

    Then the next request that matters is the create that refills the slot a poll is about to find free; if
    polls took the window's last place, that create would wait for the window (on average half a request
    interval, at 60/6 about 50 ms per job, 1-2 % of the makespan in the slot-bound regime). Holding one place
    costs one request per window only while it is held. With a slot free a create goes first anyway; with no
    job waiting nothing needs the place.
    """
    return 1 if creates_waiting and slots_free == 0 else 0


def done_probability(samples: Sequence[float], age: float, checked_age: float) -> float:
    """The chance a prediction is done now, at ``age``, given it was still running at ``checked_age``.

    ``samples`` are observed prediction times, sorted. With F the empirical distribution,
    P(done by age | not done by checked_age) = (F(age) - F(checked_age)) / (1 - F(checked_age)). Past the longest
    sample the distribution says nothing (the samples are censored: the slow ones are still running), so the chance
    grows with the time since the last check, reaching 1 after a fifth of the longest sample.
    """
    n = len(samples)
    if n == 0:
        return 0.0
    f_now = bisect_right(samples, age) / n
    f_then = bisect_right(samples, checked_age) / n
    if f_then >= 1.0:
        return min(1.0, (age - checked_age) / max(samples[-1] * 0.2, 1e-3))
    return max(0.0, (f_now - f_then) / (1.0 - f_then))


def poll_value(samples: Sequence[float], age: float, checked_age: float) -> float:
    """What a poll of a running prediction is worth now: its chance of being done since its last check, times the
    time since that check (seconds).

    Roughly the unseen time a poll recovers: a prediction that finished since its last check has been waiting for
    up to that long. Ranking by the chance alone starves young predictions: an old one near the longest time seen
    always has the higher chance, so a short prediction could sit finished for seconds (regime (a) of the
    benchmark: predictions of 1-2 s waited 0.85 s on average to be seen, those of 5-6 s 0.22 s). Ranking by this
    value spreads the polls: efficiency 0.869 -> 0.876 over 12 seeds, 11 of them better or equal.
    """
    return done_probability(samples, age, checked_age) * max(0.0, age - checked_age)


def likely_done_age(samples: Sequence[float], checked_age: float, threshold: float) -> float:
    """The youngest age at which ``done_probability(samples, age, checked_age) >= threshold`` (0 < threshold <= 1).

    So a caller waiting for a prediction to become likely done can set one timer for it instead of looking again
    and again. Inverse of :func:`done_probability`: within the samples, the first sample age at which the empirical
    distribution has risen by ``threshold`` of what was left at ``checked_age``; past the longest sample, the linear
    growth of the censored case. ``samples`` sorted and non-empty.
    """
    n = len(samples)
    f_then = bisect_right(samples, checked_age) / n
    if f_then >= 1.0:
        return checked_age + threshold * max(samples[-1] * 0.2, 1e-3)
    target = f_then + threshold * (1.0 - f_then)
    k = min(n, max(1, math.ceil(target * n - 1e-9)))
    return max(checked_age, samples[k - 1])
