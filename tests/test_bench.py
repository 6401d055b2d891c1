"""The benchmark's bound arithmetic by table, and one tiny run of its machinery against the simulator."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

import pytest

from batchrunner.bench import (
    REGIMES,
    TIME_SCALE,
    Measurement,
    Regime,
    bound,
    efficiency,
    format_row,
    main,
    max_in_window,
    measure,
    output_check_ms,
    plan_vs_run,
    request_bound,
    request_cpu_ms,
    scaled_defaults,
    slot_bound,
)
from batchrunner.bench.cli import _bench
from batchrunner.bench.shared import measure_shared, shared_line, split_seeds
from batchrunner.engine.runstate import RunConfig


@pytest.mark.parametrize(
    ("n_jobs", "count", "period", "per_job", "expected"),
    [
        (0, 60, 6.0, 2, 0.0),
        (1, 60, 6.0, 2, 0.0),  # 2 requests fit in the first window
        (30, 60, 6.0, 2, 0.0),  # exactly 60 requests: still one window
        (31, 60, 6.0, 2, 6.0),  # the 61st request waits a full period
        (100, 60, 6.0, 2, 18.0),  # 200 requests: ceil(200/60) - 1 = 3 periods
        (100, 60, 6.0, 1, 6.0),  # creates only: 100 requests, 2 windows
        (90, 60, 60.0, 2, 120.0),
        (5, 1, 1.0, 2, 9.0),  # one request per second: request k at k-1 s
    ],
)
def test_request_bound_counts_periods_between_full_windows(
    n_jobs: int, count: int, period: float, per_job: int, expected: float
) -> None:
    assert request_bound(n_jobs, count, period, per_job=per_job) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("durations", "concurrency", "expected"),
    [
        ([], 10, 0.0),
        ([3.0], 10, 3.0),
        ([1.0, 2.0, 3.0], 3, 3.0),  # one per slot
        ([1.0, 1.0, 1.0, 1.0], 2, 2.0),
        ([5.0, 1.0, 1.0, 1.0], 2, 5.0),  # the short ones queue behind each other in the free slot
        ([1.0, 1.0, 5.0], 2, 6.0),  # list order, not sorted: the long job starts late
        ([2.0, 2.0, 2.0], 1, 6.0),
        ([0.5] * 100, 10, 5.0),
    ],
)
def test_slot_bound_packs_greedily_in_list_order(durations: Sequence[float], concurrency: int, expected: float) -> None:
    assert slot_bound(durations, concurrency) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("durations", "count", "period", "concurrency", "per_job", "expected"),
    [
        ([0.5] * 100, 60, 6.0, 10, 2, 18.0),  # request-bound
        ([5.0] * 100, 60, 6.0, 10, 2, 50.0),  # slot-bound
        ([5.0] * 100, 60, 6.0, 10, 1, 50.0),
        ([0.1] * 100, 60, 6.0, 10, 1, 6.0),
    ],
)
def test_bound_is_the_larger_of_requests_and_slots(
    durations: Sequence[float], count: int, period: float, concurrency: int, per_job: int, expected: float
) -> None:
    assert bound(durations, count, period, concurrency, per_job=per_job) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("bound_s", "makespan", "expected"),
    [(18.0, 20.0, 0.9), (10.0, 10.0, 1.0), (0.0, 0.0, 1.0), (5.0, 0.0, 0.0), (0.0, 3.0, 0.0)],
)
def test_efficiency_is_bound_over_makespan(bound_s: float, makespan: float, expected: float) -> None:
    assert efficiency(bound_s, makespan) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("times", "period", "expected"),
    [
        ([], 1.0, 0),
        ([0.0, 0.5, 0.99], 1.0, 3),
        ([0.0, 1.0, 2.0], 1.0, 1),  # half-open: a request exactly one period later is in a new window
        ([2.0, 0.0, 0.1, 1.05], 1.0, 2),  # unsorted input
    ],
)
def test_max_in_window_counts_the_busiest_half_open_window(
    times: Sequence[float], period: float, expected: int
) -> None:
    assert max_in_window(times, period) == expected


TINY = Regime("tiny", 40, 0.4, 4, 0.01, 0.05, baseline_poll=0.1)


@pytest.mark.parametrize("who", ["runner", "runner-poll", "baseline"])
async def test_tiny_run_measures_every_job_against_the_simulator(who: str, tmp_path: Path) -> None:
    m = await measure(TINY, who, 8, 3, tmp_path)
    assert isinstance(m, Measurement)
    assert (m.client, m.jobs, m.succeeded, m.creates) == (who, 8, 8, 8)
    assert m.makespan > 0 and m.slot_bound > 0 and m.bound >= m.slot_bound
    assert m.efficiency > 0  # above 1.0 when the listing beats the per-prediction bound
    assert m.requests > 8 and m.requests_per_job == m.requests / 8
    assert m.max_in_flight <= 4
    assert m.detect >= 0 and m.tail >= 0 and m.cpu > 0
    assert format_row(m).split()[1] == who
    line = plan_vs_run(TINY, m)
    assert (line is None) == (who == "baseline")
    assert line is None or f"{m.requests} made" in line


def measured(client: str, requests: int, makespan: float) -> Measurement:
    return Measurement(
        regime="b request-bound",
        client=client,
        jobs=100,
        succeeded=100,
        makespan=makespan,
        request_bound=18.0,
        slot_bound=7.0,
        requests=requests,
        creates=100,
        rejected=0,
        max_window=60,
        max_in_flight=10,
        cpu=1.0,
        startup=0.0,
        detect=0.3,
        refill=0.1,
        tail=0.1,
    )


@pytest.mark.parametrize(("client", "requests", "makespan"), [("runner", 115, 11.0), ("runner-poll", 212, 19.6)])
def test_plan_vs_run_puts_the_plans_figures_beside_the_measured_ones(
    client: str, requests: int, makespan: float
) -> None:
    # The figures of (b) in the README's table: the plan lands within a tenth of each, either watch mode.
    line = plan_vs_run(REGIMES["b"], measured(client, requests, makespan))
    assert line is not None
    found = re.match(r".*: (\d+) requests planned, (\d+) made \((\S+)\);", line)
    assert found is not None
    planned, made, ratio = found.groups()
    assert int(made) == requests and float(ratio) == pytest.approx(int(planned) / requests, abs=0.01)
    assert 0.9 <= float(ratio) <= 1.1
    span = re.search(r"s taken \((\S+)\)", line)
    assert span is not None and 0.9 <= float(span.group(1)) <= 1.1


def test_output_check_cost_is_measured_by_decoding_a_real_png() -> None:
    small, large = output_check_ms(16, repeat=2), output_check_ms(512, repeat=2)
    assert 0 <= small < large  # a decode, not a constant: it grows with the image


def test_the_runner_is_benchmarked_with_its_defaults_scaled_with_the_regime() -> None:
    config = scaled_defaults(REGIMES["b"])
    defaults = RunConfig()
    assert config.poll_initial == pytest.approx(defaults.poll_initial * TIME_SCALE)
    assert config.job_timeout == pytest.approx(defaults.job_timeout * TIME_SCALE)
    assert config.reconcile_wait == pytest.approx(defaults.reconcile_wait * TIME_SCALE)
    assert (config.rate_count, config.rate_period, config.concurrency) == (60, 6.0, 10)
    # The same defaults for every regime: nothing picked to suit one.
    assert scaled_defaults(REGIMES["a"]).poll_initial == config.poll_initial
    assert scaled_defaults(REGIMES["c"]).poll_min_interval == pytest.approx(1.0 * TIME_SCALE)


def test_clients_option_refuses_an_unknown_client() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--clients", "runner,nope"])
    assert exc.value.code == 2


def test_request_cpu_floor_is_measured_against_an_external_simulator() -> None:
    (tight,) = request_cpu_ms((0.0,), count=3)
    assert tight > 0


@pytest.mark.parametrize(("jobs", "runs"), [(10, 3), (9, 3), (2, 3), (5, 1)])
def test_shared_runs_split_the_jobs_with_none_in_two_runs_and_sizes_within_one(jobs: int, runs: int) -> None:
    parts = split_seeds(jobs, runs)
    assert len(parts) == runs
    assert sorted(s for part in parts for s in part) == list(range(jobs))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


SHARED = Regime("shared", 60, 0.6, 6, 0.02, 0.06, jobs=24, external=True, store="sqlite")


def _layout(folder: Path) -> tuple[list[str], int]:
    """The shared runs' folders, and how many account databases their state folder holds."""
    stores = list((folder / "state" / "batchrunner").glob("account-*.sqlite3"))
    return sorted(p.name for p in folder.iterdir()), len(stores)


async def test_three_runs_in_their_own_processes_share_one_store_and_keep_the_account_limits(tmp_path: Path) -> None:
    m = await measure_shared(SHARED, 3, 5, tmp_path)
    # Every job once, by one of three runs, against one simulator that saw the account's limits kept between them.
    assert (m.client, m.jobs, m.succeeded, m.creates) == ("3 runs", 24, 24, 24)
    assert m.rejected == 0 and m.max_in_flight <= 6 and m.max_window <= 60
    assert _layout(tmp_path) == (["run0", "run1", "run2", "state"], 1)  # one store for all three
    alone = dataclasses.replace(m, client="runner", makespan=m.makespan / 1.5)
    assert "1.50x" in shared_line(m, alone) and shared_line(m, alone).endswith("FAIL (within 1.15x, no 429)")
    assert shared_line(m, m).split("->")[1].startswith(" PASS")


@pytest.mark.parametrize("runs", ["1", "-2"])
def test_shared_asks_for_two_runs_or_more_in_one_line(runs: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--regimes", "d", "--shared", runs])
    assert info.value.code == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .endswith(f"--shared {runs}: expected 2 or more runs (or 0, the default: none)")
    )


async def test_each_measurements_outputs_stay_until_the_benchmark_ends(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Removed as soon as its measurement ended, a run's outputs were freed just before the next run created its own:
    # on ext4 without a journal every inode then allocated passes over those freed in the last 30 s, and the kernel's
    # time was charged to the next run's CPU.
    rows = await _bench([TINY], 4, 1, 1, ("runner", "baseline"), root=tmp_path)
    assert [m.succeeded for m in rows] == [4, 4]
    assert pngs_per_folder(tmp_path) == [4, 4]
    assert "tiny" in capsys.readouterr().out


def pngs_per_folder(root: Path) -> list[int]:
    return [len(list(folder.rglob("*.png"))) for folder in sorted(root.iterdir())]
