"""The table the benchmark prints, and the plan beside each run."""

from __future__ import annotations

from batchrunner.bench.regimes import TIME_SCALE, Measurement, Regime, scaled_defaults
from batchrunner.engine.estimate import PAGE_SECONDS, estimate_run, spread_times

HEADER = (
    f"{'regime':<16} {'client':<8} {'jobs':>4} {'makespan s':>10} {'bound s':>8} {'effic.':>6} "
    f"{'req/job':>7} {'429s':>5} {'maxwin':>6} {'startup':>7} {'detect':>6} {'refill':>6} {'tail':>5} "
    f"{'cpu ms/job*':>11}"
)


LEGEND = """\
  bound s: r = request bound binds, s = slot bound; 429s: window + concurrency rejections the server sent;
  maxwin: busiest window of counted requests at the server (creates only in c), rejected ones included;
  startup: start -> first create; detect: mean finish -> first poll that saw it; refill: mean slot seen free ->
  next create; tail: last server finish -> last success; * CPU of the whole process, simulator included."""


def format_row(m: Measurement) -> str:
    """One table line; ``bound s`` marks which bound binds (r: requests, s: slots)."""
    which = "r" if m.request_bound >= m.slot_bound else "s"
    jobs = f"{m.succeeded}" if m.succeeded == m.jobs else f"{m.succeeded}/{m.jobs}"
    return (
        f"{m.regime:<16} {m.client:<8} {jobs:>4} {m.makespan:>10.2f} {m.bound:>7.2f}{which} {m.efficiency:>6.3f} "
        f"{m.requests_per_job:>7.2f} {m.rejected:>5} {m.max_window:>6} {m.startup:>7.2f} {m.detect:>6.2f} "
        f"{m.refill:>6.2f} {m.tail:>5.2f} {m.cpu / max(1, m.jobs) * 1000:>11.2f}"
    )


def plan_vs_run(regime: Regime, m: Measurement) -> str | None:
    """The plan's requests and seconds for this regime (``estimate.estimate_run`` at the runner's scaled defaults,
    prediction times the simulator's range) beside what the run measured, with the ratio; None for the baseline."""
    watch = {"runner": "auto", "runner-poll": "poll"}.get(m.client)
    if watch is None:
        return None
    config = scaled_defaults(regime, watch)
    e = estimate_run(
        jobs=m.jobs,
        concurrency=regime.concurrency,
        rate_count=regime.rate_count,
        rate_period=regime.rate_period,
        times=spread_times(regime.min_seconds, regime.max_seconds),
        scope=regime.scope,
        watch=watch,
        poll_initial=config.poll_initial,
        poll_min_interval=config.poll_min_interval,
        page_seconds=PAGE_SECONDS * TIME_SCALE,
    )
    req, span = e.requests / max(1, m.requests), e.seconds / max(1e-9, m.makespan)
    return (
        f"  plan vs run: {e.requests} requests planned, {m.requests} made ({req:.2f}); "
        f"{e.seconds:.1f} s planned, {m.makespan:.1f} s taken ({span:.2f})"
    )
