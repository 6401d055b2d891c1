"""The listing watcher: its pure policy and state by table, and end to end against the simulator."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from batchrunner.api.client import Execution, ExecutionsPage, Phase
from batchrunner.cli.main import main
from batchrunner.engine.policy import learnt_duration
from batchrunner.engine.results import Results
from batchrunner.engine.runstate import MAX_DOWNLOADS, Counters, RunConfig
from batchrunner.engine.watch import MAX_PARALLEL_PAGES, MAX_ROUND_PAGES, PAGE, Watch, listing_interval
from batchrunner.sim.server import Faults
from tests.conftest import ThreadedSimulator, fast_sim, images_in, run_args, write_manifest

SimFactory = Callable[..., ThreadedSimulator]


# --- the pause between listings ------------------------------------------------------------------------------


def pause(**overrides: float) -> float:
    args: dict[str, float] = {
        "to_create": 100,
        "in_flight": 10,
        "mean_duration": 3.5,
        "concurrency": 10,
        "rate": 10.0,
        "shortest": 0.1,
        "longest": 14.0,
    }
    args.update(overrides)
    return listing_interval(
        to_create=int(args["to_create"]),
        in_flight=int(args["in_flight"]),
        mean_duration=args["mean_duration"],
        concurrency=int(args["concurrency"]),
        rate=args["rate"],
        shortest=args["shortest"],
        longest=args["longest"],
    )


@pytest.mark.parametrize(
    ("overrides", "low", "high"),
    [
        # Slots bind (predictions of seconds): list often, a few tenths of a second apart, at under 3 requests a job.
        ({}, 0.15, 0.4),
        # Requests bind (predictions under a second): list about once a second, each listing freeing many slots.
        ({"mean_duration": 0.6}, 0.6, 1.6),
        # Nothing left to create: only detection matters.
        ({"to_create": 0}, 0.1, 0.3),
        # Requests free: as short as makes a difference (within 2 % of the shortest's makespan).
        ({"rate": 1e9, "shortest": 0.05}, 0.05, 0.25),
        # Always within the bounds given.
        ({"shortest": 2.0, "longest": 3.0}, 2.0, 3.0),
        ({"shortest": 0.5, "longest": 0.1}, 0.5, 0.5),
    ],
)
def test_listing_interval_spends_the_window_where_it_buys_the_most(
    overrides: dict[str, float], low: float, high: float
) -> None:
    assert low <= pause(**overrides) <= high


def test_a_scarcer_window_lists_less_often() -> None:
    assert pause(rate=5.0, mean_duration=0.6) > pause(rate=20.0, mean_duration=0.6)


def test_requests_per_job_stay_under_three_in_the_realistic_regime() -> None:
    tau = pause()
    makespan = 100 * (3.5 + tau / 2) / 10
    assert 1 + makespan / tau / 100 <= 3.0


# --- a round's pages -----------------------------------------------------------------------------------------


def row(id: str, at: float, status: str = "success") -> Execution:
    output = "https://cdn/x.png" if status == "success" else None
    raw = {"id": id, "status": status, "output": output, "execution_cost": 0.08, "run_time": 1.0}
    return Execution(id=id, model="m", status=status, created_at=at, raw=raw)


def test_a_row_reads_as_a_poll_would() -> None:
    prediction = row("p", 1.0).prediction
    assert prediction is not None
    assert (prediction.phase, prediction.urls, prediction.cost, prediction.predict_time) == (
        Phase.SUCCEEDED,
        ("https://cdn/x.png",),
        0.08,
        1.0,
    )
    running = row("q", 1.0, status="processing").prediction
    assert running is not None and running.phase is Phase.RUNNING
    assert Execution(id="r", model=None, status="", created_at=None).prediction is None


def test_a_round_pages_until_every_wanted_prediction_is_seen() -> None:
    watch = Watch()
    current = watch.begin(100.0, 200.0, {"a", "b"})
    assert current.next_page() == 0
    current.sent()
    assert current.next_page() is None  # two wanted: one page at a time
    ours, done = watch.on_page(current.number, ExecutionsPage((row("x", 190.0), row("a", 180.0)), full=True))
    assert [r.id for r in ours] == ["a"] and not done
    assert current.next_page() == PAGE
    current.sent()
    ours, done = watch.on_page(current.number, ExecutionsPage((row("b", 150.0), row("y", 140.0)), full=True))
    assert [r.id for r in ours] == ["b"] and done  # all seen: no further page although this one was full
    assert watch.finish(10.0, 0.5) == frozenset()
    assert watch.next_at == 10.5 and watch.round is None


def test_a_round_over_many_predictions_sends_its_pages_in_parallel() -> None:
    watch = Watch()
    current = watch.begin(100.0, 200.0, {f"p{i}" for i in range(1000)})
    offsets = []
    while (offset := current.next_page()) is not None:
        offsets.append(offset)
        current.sent()
    assert offsets == [k * PAGE for k in range(MAX_PARALLEL_PAGES)]
    watch.on_page(current.number, ExecutionsPage((row("p1", 150.0),), full=True))
    assert current.next_page() == MAX_PARALLEL_PAGES * PAGE  # one answered: the next goes out


def test_a_page_of_an_earlier_round_is_ignored() -> None:
    watch = Watch()
    old = watch.begin(100.0, 200.0, {"a"})
    old.sent()
    watch.finish(0.0, 0.0)
    new = watch.begin(100.0, 200.0, {"a"})
    new.sent()
    assert watch.on_page(old.number, ExecutionsPage((row("a", 150.0),), full=False)) == ([], False)
    assert new.seen == set()


@pytest.mark.parametrize(
    ("page", "done"),
    [
        (ExecutionsPage((row("x", 150.0),), full=False), True),  # a short page: the end of the listing
        (ExecutionsPage((row("x", 90.0),), full=True), True),  # older than the round's start: nothing further back
        (ExecutionsPage((row("x", 150.0),), full=True), False),
    ],
)
def test_a_round_ends_at_a_short_page_or_past_its_start(page: ExecutionsPage, done: bool) -> None:
    watch = Watch()
    current = watch.begin(100.0, 200.0, {"a"})
    current.sent()
    assert watch.on_page(current.number, page)[1] is done
    if done:
        assert watch.finish(0.0, 1.0) == {"a"}  # not seen: the scheduler polls it


def test_a_round_stops_after_its_page_limit() -> None:
    watch = Watch()
    current = watch.begin(100.0, 200.0, {"a"})
    done = False
    for _ in range(MAX_ROUND_PAGES):
        assert not done and current.next_page() is not None
        current.sent()
        _, done = watch.on_page(current.number, ExecutionsPage((row("x", 150.0),), full=True))
    assert done and current.next_page() is None


def test_a_failed_listing_falls_back_on_polls_and_is_probed_again_in_auto_mode() -> None:
    watch = Watch("auto", probe_every=30.0)
    assert watch.active
    watch.begin(0.0, 1.0, {"a"})
    watch.on_failure(5.0, backoff=0.5)
    assert not watch.active and watch.round is None
    assert not watch.due(34.0) and watch.due(35.0)  # probed, never more than once per probe_every
    probe = watch.begin(0.0, 1.0, {"a"})
    probe.sent()
    watch.on_page(probe.number, ExecutionsPage((), full=False))
    assert watch.active  # it answers again


def test_a_refused_listing_is_tried_again_without_falling_back() -> None:
    watch = Watch("auto")
    watch.begin(0.0, 1.0, {"a"})
    watch.retry_later(5.0, 1.0)
    assert watch.active and watch.round is None and watch.next_at == 6.0


def test_list_mode_keeps_listing_after_a_failure_and_poll_mode_never_lists() -> None:
    watch = Watch("list")
    watch.on_failure(5.0, backoff=0.5)
    assert watch.active and watch.next_at == 5.5
    never = Watch("poll")
    assert not never.active and not never.due(1e9)
    with pytest.raises(ValueError):
        Watch("sometimes")


# --- what a finished prediction teaches -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("age", "last_running", "predict_time", "learnt"),
    [
        (3.0, None, 0.4, 0.4),  # the first poll came late: the server's time, not the poll's age
        (3.0, 1.0, 0.4, 1.0),  # still running at 1.0 s: at least that (queueing before predict_time started)
        (3.0, 1.0, 2.5, 2.5),
        (3.0, None, None, 3.0),  # no server time: what the polls know, the age it was seen done...
        (3.0, 2.0, None, 2.5),  # ...or the middle between the last poll that saw it running and that one
        (3.0, None, 0.0, 3.0),  # a 0 (running predictions read 0) is no measurement
        (3.0, None, 9.0, 3.0),  # longer than the age: not a time of this prediction's
    ],
)
def test_prediction_times_are_learnt_from_the_server_where_it_says(
    age: float, last_running: float | None, predict_time: float | None, learnt: float
) -> None:
    assert learnt_duration(age, last_running, predict_time) == pytest.approx(learnt)


@pytest.mark.parametrize(("concurrency", "downloads"), [(1, 4), (10, 10), (100, 100), (1000, MAX_DOWNLOADS)])
def test_downloads_scale_with_the_slots(concurrency: int, downloads: int) -> None:
    results = Results(None, None, Counters(), RunConfig(concurrency=concurrency), rng=None, retry=None)  # type: ignore[arg-type]
    assert results.downloads._value == downloads


# --- end to end ----------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("api_key")
def test_the_listing_watches_every_prediction_and_outputs_come_straight_from_its_rows(
    tmp_path: Path, threaded_sim: SimFactory
) -> None:
    sim = threaded_sim(fast_sim(min_seconds=0.05, max_seconds=0.1, rate_count=60, rate_period=1.0, concurrency=5))
    manifest = write_manifest(tmp_path, 20, image=False)
    out = tmp_path / "out"
    assert main(run_args(manifest, sim.url, out, "--rate-limit", "60/1", "--concurrency", "5")) == 0
    assert len(images_in(out)) == 20
    stats = sim.stats()
    assert stats["polls"] == 0  # no prediction polled on its own
    assert 0 < stats["listings"] < 20
    assert stats["rate_limited"] == 0 and stats["concurrency_rejected"] == 0
    finished = json.loads((out / "ledger.jsonl").read_text().splitlines()[-1])
    assert finished["requests_by_kind"]["watch"] == stats["listings"]


@pytest.mark.usefixtures("api_key")
def test_with_the_listing_down_each_prediction_is_polled_and_the_listing_probed_again(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = threaded_sim(fast_sim(min_seconds=0.05, max_seconds=0.1, faults=Faults(listing_error=1.0)))
    manifest = write_manifest(tmp_path, 12, image=False)
    out = tmp_path / "out"
    stop = threading.Event()

    def heal() -> None:  # the listing comes back after a while
        if not stop.wait(0.3):
            sim.call(lambda: setattr(sim.sim, "config", replace(sim.sim.config, faults=Faults())))

    healer = threading.Thread(target=heal)
    healer.start()
    try:
        code = main(run_args(manifest, sim.url, out, "--concurrency", "2"))
    finally:
        stop.set()
        healer.join()
    err = capsys.readouterr().err
    assert code == 0, err
    assert len(images_in(out)) == 12
    stats = sim.stats()
    assert stats["polls"] > 0
    assert "polling each prediction" in err


@pytest.mark.usefixtures("api_key")
def test_a_listing_that_never_answers_costs_one_probe_per_probe_interval(
    tmp_path: Path, threaded_sim: SimFactory
) -> None:
    sim = threaded_sim(fast_sim(min_seconds=0.05, max_seconds=0.1, faults=Faults(listing_error=1.0)))
    manifest = write_manifest(tmp_path, 10, image=False)
    started = time.monotonic()
    assert main(run_args(manifest, sim.url, tmp_path / "out", "--concurrency", "2")) == 0
    elapsed = time.monotonic() - started
    stats = sim.stats()
    assert stats["polls"] >= 10
    assert stats["listings"] <= 1 + elapsed / 30  # the first try, then one probe per 30 s


@pytest.mark.parametrize(("mode", "lists", "polls"), [("poll", False, True), ("list", True, False)])
@pytest.mark.usefixtures("api_key")
def test_watch_modes(mode: str, lists: bool, polls: bool, tmp_path: Path, threaded_sim: SimFactory) -> None:
    sim = threaded_sim(fast_sim(min_seconds=0.02, max_seconds=0.05))
    manifest = write_manifest(tmp_path, 6, image=False)
    assert main(run_args(manifest, sim.url, tmp_path / "out", "--watch", mode)) == 0
    stats = sim.stats()
    assert (stats["listings"] > 0, stats["polls"] > 0) == (lists, polls)


@pytest.mark.usefixtures("api_key")
def test_a_prediction_the_listing_does_not_show_is_polled(tmp_path: Path, threaded_sim: SimFactory) -> None:
    # The listing shows a prediction only 5 s after its creation: each is polled once past the grace.
    sim = threaded_sim(fast_sim(min_seconds=0.02, max_seconds=0.05, faults=Faults(listing_lag=5.0)))
    manifest = write_manifest(tmp_path, 4, image=False)
    assert main(run_args(manifest, sim.url, tmp_path / "out")) == 0
    assert len(images_in(tmp_path / "out")) == 4
    assert sim.stats()["polls"] >= 4


@pytest.mark.usefixtures("api_key")
def test_a_listing_refused_with_429_is_tried_again_not_given_up(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = threaded_sim(fast_sim(min_seconds=0.02, max_seconds=0.05, faults=Faults(rate_limit=0.3), seed=2))
    manifest = write_manifest(tmp_path, 8, image=False)
    assert main(run_args(manifest, sim.url, tmp_path / "out")) == 0
    stats = sim.stats()
    assert stats["faults_injected"].get("rate_limit", 0) > 0
    assert stats["polls"] == 0  # a 429 is the API busy, not the listing broken
    assert "polling each prediction" not in capsys.readouterr().err
