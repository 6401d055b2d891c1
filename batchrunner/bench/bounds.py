"""The bound a batch cannot beat (pure): the window's, the slots', and efficiency against them."""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence


def request_bound(n_jobs: int, count: int, period: float, *, per_job: int = 2) -> float:
    """``period * (ceil(per_job * n_jobs / count) - 1)``, never below 0: the window's floor on the makespan."""
    if n_jobs <= 0:
        return 0.0
    return max(0.0, period * (math.ceil(per_job * n_jobs / count) - 1))


def slot_bound(durations: Sequence[float], concurrency: int) -> float:
    """Makespan of ``durations`` packed greedily in list order into ``concurrency`` slots, all free at 0."""
    slots = [0.0] * max(1, concurrency)
    finish = 0.0
    for d in durations:
        end = heapq.heappop(slots) + d
        finish = max(finish, end)
        heapq.heappush(slots, end)
    return finish


def bound(durations: Sequence[float], count: int, period: float, concurrency: int, *, per_job: int = 2) -> float:
    """The larger of :func:`request_bound` (one job per duration) and :func:`slot_bound`."""
    return max(request_bound(len(durations), count, period, per_job=per_job), slot_bound(durations, concurrency))


def efficiency(bound_s: float, makespan: float) -> float:
    """``bound / makespan``; 1.0 for an empty batch, 0.0 for a makespan of zero against a positive bound."""
    if makespan <= 0:
        return 1.0 if bound_s <= 0 else 0.0
    return bound_s / makespan


def max_in_window(times: Sequence[float], period: float) -> int:
    """The most ``times`` inside any half-open window ``(t - period, t]``."""
    ordered = sorted(times)
    best = start = 0
    for end, t in enumerate(ordered):
        while ordered[start] <= t - period:
            start += 1
        best = max(best, end - start + 1)
    return best
