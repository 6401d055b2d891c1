"""The benchmark: the runner and a naive baseline against the simulator, each measured against the theoretical bound.

With R requests per W seconds, C in flight and prediction times d_i, a batch of N jobs needs at least one create and
one poll per job, and a sliding window admits request k+R no sooner than W after request k: the makespan is at least
``W * (ceil(2N/R) - 1)`` (``N`` in place of ``2N`` when only creates count). It is also at least the makespan of the
d_i packed greedily, in creation order, into C slots by a client that saw every completion the instant it happened.
The larger of the two is the bound; efficiency is ``bound / makespan``.

Regimes are the real limits scaled x10 in time (60/60 -> 60/6, predictions 10-60 s -> 1-6 s), so each run takes
seconds. ``--scale`` adds the scale checks (a 100,000-job manifest against a 300,000-line ledger, in a subprocess so
its peak memory is its own) and the runner's CPU per job with the simulator in another process.

    python -m batchrunner.bench [--jobs 100] [--regimes a,b,c,d,e] [--clients runner,runner-poll,baseline]
                                [--seed N] [--repeat K] [--scale]

(d) is 100x the limits (6000/6, 1000 in flight, 10,000 jobs) with the simulator in its own process, measured with the
default store (SQLite in the state folder) and with Redis; ``--shared 3`` also runs (d)'s jobs as three runs sharing one
store (``shared``). (e) is (b) with the executions listing answering 500. The runner runs with its defaults, time-like
ones x0.1 (``scaled_defaults``).

The package: ``bounds`` (the arithmetic, pure), ``regimes`` (settings and records), ``clients`` (the runner and the
baseline), ``measure`` (one client against a fresh simulator), ``shared`` (runs sharing one account), ``scale`` (the
scale checks), ``report`` (the table), ``cli`` (the command).
"""

from __future__ import annotations

from batchrunner.bench.bounds import bound, efficiency, max_in_window, request_bound, slot_bound
from batchrunner.bench.cli import main
from batchrunner.bench.measure import measure
from batchrunner.bench.regimes import REGIMES, TIME_SCALE, Measurement, Regime, scaled_defaults
from batchrunner.bench.report import format_row, plan_vs_run
from batchrunner.bench.scale import output_check_ms, request_cpu_ms

__all__ = [
    "REGIMES",
    "TIME_SCALE",
    "Measurement",
    "Regime",
    "bound",
    "efficiency",
    "format_row",
    "main",
    "max_in_window",
    "measure",
    "output_check_ms",
    "plan_vs_run",
    "request_bound",
    "request_cpu_ms",
    "scaled_defaults",
    "slot_bound",
]
