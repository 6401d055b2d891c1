"""The plan's estimator by table (requests and seconds from the runner's own models), and one plan against its run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchrunner.cli.main import main
from batchrunner.engine.estimate import Estimate, estimate_run, expected_longest, spread_times
from batchrunner.engine.watch import MAX_ROUND_PAGES, round_pages, round_parallel

DEMO = Path(__file__).resolve().parent.parent / "jobs" / "demo.yaml"


def bench_like(jobs: int, count: int, period: float, slots: int, lo: float, hi: float, watch: str = "auto") -> Estimate:
    """The estimate for a benchmark regime at the runner's defaults scaled x0.1 (first poll 0.3 s, pages 50 ms)."""
    return estimate_run(
        jobs=jobs,
        concurrency=slots,
        rate_count=count,
        rate_period=period,
        times=spread_times(lo, hi),
        watch=watch,
        poll_initial=0.3,
        page_seconds=0.05,
    )


@pytest.mark.parametrize(
    ("regime", "args", "per_job", "seconds"),
    [
        # (a) slots bind: 100 jobs x 3.5 s over 10 slots is 35 s, plus the slowest of the last ten, plus being seen;
        # the listing is one page a round, a round every 0.2-0.3 s.
        ("a", (100, 60, 6.0, 10, 1.0, 6.0), (2.0, 3.0), (36.0, 42.0)),
        # (b) the window binds: 100 creates and a round a second at 10 requests a second.
        ("b", (100, 60, 6.0, 10, 0.2, 1.0), (1.05, 1.3), (10.0, 12.5)),
        # (d) 100x: 10,000 creates and rounds of ~20 pages; the old model said 3 requests a job.
        ("d", (10_000, 6000, 6.0, 1000, 1.0, 6.0), (1.05, 1.3), (36.0, 44.0)),
    ],
)
def test_the_listing_model_lands_where_the_benchmark_regimes_run(
    regime: str,
    args: tuple[int, int, float, int, float, float],
    per_job: tuple[float, float],
    seconds: tuple[float, float],
) -> None:
    e = bench_like(*args)
    assert per_job[0] <= e.requests / args[0] <= per_job[1], (regime, e)
    assert seconds[0] <= e.seconds <= seconds[1], (regime, e)


def test_polling_each_prediction_costs_the_poll_plans_requests() -> None:
    # (b) polled: a create and about one poll a job, so the window's 200 requests take ~18 s (the listing: ~11 s).
    polled, listed = bench_like(100, 60, 6.0, 10, 0.2, 1.0, "poll"), bench_like(100, 60, 6.0, 10, 0.2, 1.0)
    assert 1.9 <= polled.requests / 100 <= 2.4 and 17.0 <= polled.seconds <= 22.0
    assert listed.seconds < polled.seconds and polled.polls_per_job >= 1.0 and listed.polls_per_job == 0.0
    # (a) polled: slots bind, so the requests creates leave go to early polls: the window is used in full.
    a = bench_like(100, 60, 6.0, 10, 1.0, 6.0, "poll")
    assert 0.9 <= a.requests / (10 * a.seconds) <= 1.1 and 40.0 <= a.seconds <= 48.0


def test_a_batch_that_fits_one_window_waits_for_its_slowest_prediction_not_the_rate() -> None:
    # 13 jobs and 3 presigns at 60/60: every request fits the first window; 10 slots, predictions 0.3-1.5 s.
    e = estimate_run(jobs=13, uploads=3, concurrency=10, rate_count=60, rate_period=60.0, times=spread_times(0.3, 1.5))
    assert 1.5 <= e.seconds <= 4.0  # the old plan: two rounds of 12 s
    assert 17 <= e.requests <= 22  # 16 creates and presigns, a few rounds (the old plan: 42)


def test_prediction_times_from_the_ledger_change_the_estimate() -> None:
    def at(times: list[float]) -> Estimate:  # slots bind
        return estimate_run(jobs=200, concurrency=10, rate_count=600, rate_period=60.0, times=times)

    quick, slow = at([2.0] * 20), at([20.0] * 20)
    assert 6 * quick.seconds < slow.seconds < 10 * quick.seconds  # ten times the work, the same half-second pages
    assert at([]).seconds == at(list(spread_times(8, 15))).seconds  # nothing known: the model's typical 8-15 s


def test_only_creates_counting_leaves_the_listing_off_the_window() -> None:
    # The window binds (100 slots, predictions under a second): listings that count take places creates need.
    times = spread_times(0.2, 1.0)

    def at(scope: str) -> Estimate:
        return estimate_run(
            jobs=300, concurrency=100, rate_count=60, rate_period=6.0, times=times, scope=scope, page_seconds=0.05
        )

    creates, everything = at("creates"), at("all")
    assert creates.seconds < everything.seconds
    # Then only the window's arithmetic: create 300 goes out 6 x (ceil(300 / 60) - 1) s in, then the slowest ends.
    longest = expected_longest(times, 100)
    assert creates.seconds == pytest.approx(24.0 + longest, abs=0.5)


def test_nothing_to_do_costs_only_the_uploads() -> None:
    e = estimate_run(jobs=0, uploads=2, concurrency=10, rate_count=60, rate_period=60.0, times=[1.0] * 5)
    assert e == Estimate(requests=2, seconds=0.0)


def test_predictions_left_in_flight_are_watched_though_nothing_is_created() -> None:
    e = estimate_run(jobs=0, in_flight=5, concurrency=10, rate_count=60, rate_period=60.0, times=[1.0] * 5)
    assert e.seconds >= 1.0 and e.requests >= 1


@pytest.mark.parametrize(
    ("samples", "k", "expected"),
    [
        ([1.0, 2.0, 3.0], 1, 2.0),  # one draw: the mean
        ([1.0, 2.0, 3.0], 2, (1 * 1 + 2 * 3 + 3 * 5) / 9),  # P(max = x_i) = (i/n)^2 - ((i-1)/n)^2
        ([1.0, 2.0, 3.0], 200, 3.0),
        ([4.0], 7, 4.0),
        ([], 3, 0.0),
    ],
)
def test_expected_longest_of_k_draws(samples: list[float], k: int, expected: float) -> None:
    assert expected_longest(samples, k) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("rows", "in_flight", "parallel", "pages"),
    [
        (5, 5, 1, 1),
        (150, 10, 1, 2),  # 150 rows since the oldest: two pages, one at a time
        (1000, 1000, 8, 17),  # ten pages to the oldest, seven more already on the wire when it comes back
        (1500, 1000, 8, MAX_ROUND_PAGES),  # 15 + 7 = 22, past the cap
        (0, 250, 3, 5),  # at least the predictions looked for: three pages, two more on the wire
    ],
)
def test_round_pages(rows: int, in_flight: int, parallel: int, pages: int) -> None:
    assert round_parallel(in_flight) == parallel
    assert round_pages(rows, in_flight) == pages


def test_spread_times_is_an_even_range() -> None:
    assert spread_times(1.0, 3.0, 5) == (1.0, 1.5, 2.0, 2.5, 3.0)
    assert spread_times(2.0, 2.0) == (2.0,) * 21


def test_the_demo_plan_predicts_its_simulated_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The plan with --simulate, then the run it describes: requests and time within 25 % (the old plan: 42
    requests and 3 s for a run of ~19 requests in a second)."""
    monkeypatch.delenv("EACHLABS_API_KEY", raising=False)
    out = tmp_path / "demo"
    fast = ["--simulate", "--output", str(out), "--rate-limit", "600/6", "--sim-rate-limit", "1000/1"]
    fast += ["--sim-min-seconds", "0.1", "--sim-max-seconds", "0.5", "--sim-image-size", "32"]
    assert main(["plan", str(DEMO), *fast, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert main(["run", str(DEMO), *fast, "--progress", "none", "--log-format", "json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    summary = next(e for e in events if e.get("event") == "summary")
    made = summary["requests"]
    assert abs(plan["expected_requests"] - made) <= 0.25 * made, (plan, made)
    seconds = summary["elapsed"]
    assert abs(plan["expected_seconds"] - seconds) <= max(0.25 * seconds, 0.1), (plan, seconds)
