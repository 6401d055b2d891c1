"""The benchmark's settings: regimes, the runner's scaled defaults, the record of one measured run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from batchrunner.bench.bounds import efficiency
from batchrunner.engine.scheduler import RunConfig
from batchrunner.sim.server import Faults, SimConfig

KEY = "bench-key"
# runner-poll: the runner with --watch poll (each prediction polled, as before the listing watcher).
CLIENTS = ("runner", "runner-poll", "baseline")
# A window no client reaches: the simulator counts every request, so "polls free" is modelled by a loose server
# window plus a check, from the server's own create times, that creates stayed within R per W.
UNLIMITED = 1_000_000


@dataclass(frozen=True, slots=True)
class Regime:
    """One benchmark setting: limits, prediction times, the runner's priors, the baseline's poll interval."""

    name: str
    rate_count: int
    rate_period: float
    concurrency: int
    min_seconds: float
    max_seconds: float
    scope: str = "all"
    baseline_poll: float = 0.1
    jobs: int | None = None  # the regime's own batch size, when --jobs does not apply
    external: bool = False  # the simulator in its own process (the CPU column is then the client's alone)
    faults: Faults = field(default_factory=Faults)
    # The runner's limits store: ``local`` (a run's own limits, as ``--simulate`` keeps them), ``sqlite`` (the default
    # every user gets: the state folder's database, here a temporary one), ``redis`` (a redis-server the bench starts).
    store: str = "local"
    variants: tuple[str, ...] = ()  # other stores the regime is also measured with

    @property
    def per_job(self) -> int:
        return 2 if self.scope == "all" else 1


REGIMES: dict[str, Regime] = {
    "a": Regime("a realistic", 60, 6.0, 10, 1.0, 6.0),
    "b": Regime("b request-bound", 60, 6.0, 10, 0.2, 1.0),
    "c": Regime("c polls free", 60, 6.0, 10, 1.0, 6.0, scope="creates"),
    "d": Regime(
        "d 100x sqlite", 6000, 6.0, 1000, 1.0, 6.0, jobs=10_000, external=True, store="sqlite", variants=("redis",)
    ),
    "e": Regime("e listing down", 60, 6.0, 10, 0.2, 1.0, faults=Faults(listing_error=1.0)),
}
# Regimes run at a tenth of real time, and so do the runner's time-like defaults: the runner is benchmarked with its
# defaults, never with settings picked for a regime.
TIME_SCALE = 0.1


def scaled_defaults(regime: Regime, watch: str = "auto") -> RunConfig:
    """The runner's defaults (``RunConfig()``, as the CLI fills them), times x ``TIME_SCALE``, the regime's limits."""
    d = RunConfig()
    min_interval = 1.0 if regime.scope == "creates" else 0.0  # the CLI's default for --rate-limit-scope creates
    return RunConfig(
        concurrency=regime.concurrency,
        rate_count=regime.rate_count,
        rate_period=regime.rate_period,
        rate_scope=regime.scope,
        job_timeout=d.job_timeout * TIME_SCALE,
        drain_timeout=d.drain_timeout * TIME_SCALE,
        poll_initial=d.poll_initial * TIME_SCALE,
        poll_min_interval=min_interval * TIME_SCALE,
        retry_base=d.retry_base * TIME_SCALE,
        retry_cap=d.retry_cap * TIME_SCALE,
        reconcile_wait=d.reconcile_wait * TIME_SCALE,
        clock_skew=d.clock_skew * TIME_SCALE,
        listing_probe=d.listing_probe * TIME_SCALE,
        watch=watch,
    )


@dataclass(frozen=True, slots=True)
class Measurement:
    """One client's run of one regime, with the bound from the durations the simulator actually drew."""

    regime: str
    client: str
    jobs: int
    succeeded: int
    makespan: float
    request_bound: float
    slot_bound: float
    requests: int
    creates: int
    rejected: int  # 429s the server sent (window + concurrency)
    max_window: int  # busiest window of the counted requests (creates only when polls are free)
    max_in_flight: int
    cpu: float  # process CPU seconds over the run (simulator included when it is in-process)
    startup: float  # run start -> first create at the server
    detect: float  # mean seconds from a prediction's finish to the poll that saw it
    refill: float  # mean seconds from a slot seen free to the next create
    tail: float  # last finish at the server -> last success (detection + download of the last job)

    @property
    def bound(self) -> float:
        return max(self.request_bound, self.slot_bound)

    @property
    def efficiency(self) -> float:
        return efficiency(self.bound, self.makespan)

    @property
    def requests_per_job(self) -> float:
        return self.requests / max(1, self.jobs)


def write_manifest(folder: Path, jobs: int, seeds: Sequence[int] | None = None) -> Path:
    """A prompt-only matrix of ``jobs`` seeds (0, 1, ... or ``seeds``): no image I/O in the measurement."""
    listed = ", ".join(str(i) for i in (range(jobs) if seeds is None else seeds))
    path = folder / "bench.yaml"
    path.write_text(
        f'model: flux-kontext-max\nmatrix:\n  prompt: ["Turn the scene into a snowy winter evening"]\n'
        f"  seed: [{listed}]\n",
        encoding="utf-8",
    )
    return path


def sim_config(regime: Regime, seed: int) -> SimConfig:
    """The simulator for ``regime``; when polls are free its window is loose (see ``UNLIMITED``)."""
    count = regime.rate_count if regime.scope == "all" else UNLIMITED
    return SimConfig(
        rate_count=count,
        rate_period=regime.rate_period,
        concurrency=regime.concurrency,
        min_seconds=regime.min_seconds,
        max_seconds=regime.max_seconds,
        seed=seed,
        image_size=32,
        faults=regime.faults,
    )
