"""What the dispatcher picks for the next request slot, from a scheduler on a fake clock (no request is sent)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from batchrunner.api.client import Client
from batchrunner.engine.runstate import Flight, RunConfig
from batchrunner.engine.scheduler import Scheduler
from batchrunner.engine.watching import spare_poll
from batchrunner.manifest import load_manifest
from batchrunner.store.ledger import Ledger, Upload, read_ledger
from batchrunner.store.output import OutputDir
from tests.conftest import write_manifest


class Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def scheduler(tmp_path: Path) -> AsyncIterator[tuple[Scheduler, Clock]]:
    """A scheduler for a 1-job batch with 2 slots and a 2-per-10 s window, that knows six prediction times (1-1.5 s)
    and has every job already created (nothing left to create: the end of a batch)."""
    manifest = load_manifest(write_manifest(tmp_path, 1, image=False))
    out = OutputDir(tmp_path / "out")
    out.create()
    out.prepare()
    state = read_ledger(out.ledger)
    state.durations.extend([1.0, 1.1, 1.2, 1.3, 1.4, 1.5])
    clock = Clock()
    config = RunConfig(concurrency=2, rate_count=2, rate_period=10.0, poll_initial=1.0)
    with Ledger(out.ledger) as ledger:
        async with aiohttp.ClientSession() as session:
            client = Client(session, base_url="http://127.0.0.1:9", api_key="unused")
            yield Scheduler(manifest, client, ledger, out, state, config, clock=clock), clock


def watch(sched: Scheduler, prediction_id: str, *, created_at: float, checked: float | None = None) -> Flight:
    """Put a prediction in flight, last seen running at age ``checked``; its plan would poll it next at 100 s."""
    job = sched.manifest.jobs[0]
    flight = Flight(
        job.id,
        job.fingerprint,
        prediction_id,
        created_at=created_at,
        job=job,
        last_running_age=checked,
        next_poll_at=100.0,
    )
    sched.flights[prediction_id] = flight
    return flight


async def test_a_full_window_keeps_the_likely_done_prediction_next_not_its_far_planned_poll(
    scheduler: tuple[Scheduler, Clock],
) -> None:
    sched, clock = scheduler
    # Still running when last polled at 1.45 s; its plan would not poll it again until 100 s.
    flight = watch(sched, "p-1", created_at=0.0, checked=1.45)
    clock.t = 1.0
    sched.window.take(clock.t)
    sched.window.take(clock.t)  # the window is full until 11 s
    clock.t = 1.6  # every known prediction time has passed: it is surely done
    action, _ = sched._choose(clock.t)
    # The poll is chosen now and the dispatcher waits for the window (11 s), not for the plan (100 s).
    assert action == ("poll", flight)
    assert sched.window.delay(clock.t) == pytest.approx(11.0 - 1.6 + sched.window.margin)


async def test_a_prediction_not_yet_likely_done_sets_one_timer_for_when_it_will_be(
    scheduler: tuple[Scheduler, Clock],
) -> None:
    sched, clock = scheduler
    watch(sched, "p-1", created_at=0.0, checked=0.5)
    clock.t = 0.6
    action, wake_at = sched._choose(clock.t)
    assert action is None
    assert wake_at == pytest.approx(1.0)  # the shortest known prediction time: a 1-in-6 chance, above 0.1


async def test_the_spare_request_goes_to_the_poll_worth_most_not_to_the_likeliest(
    scheduler: tuple[Scheduler, Clock],
) -> None:
    sched, clock = scheduler
    # Known times 1.0-1.5 s. At 1.5 s the old one (created at 0, still running at 1.3 s) is surely done, the young one
    # (created at 0.3 s, never checked) only even odds; but the young one may have sat finished for up to 1.2 s, the
    # old one for 0.2 s: the poll of the young one is worth more (0.5 x 1.2 against 1 x 0.2).
    watch(sched, "old", created_at=0.0, checked=1.3)
    young = watch(sched, "young", created_at=0.3)
    clock.t = 1.5
    action, _ = sched._choose(clock.t)
    assert action == ("poll", young)


async def test_a_resumed_doubt_is_matched_with_the_upload_the_ledger_recorded_however_old(tmp_path: Path) -> None:
    # Two jobs that differ only by their image: left out of the comparison, either could adopt the other's prediction.
    manifest = load_manifest(write_manifest(tmp_path, 1))
    job = manifest.jobs[0]
    assert job.image_sha256 is not None
    out = OutputDir(tmp_path / "out")
    out.create()
    out.prepare()
    state = read_ledger(out.ledger)
    state.uploads[job.image_sha256] = Upload(job.image_sha256, "https://cdn.example/old-upload.png", uploaded_at=0.0)
    with Ledger(out.ledger) as ledger:
        async with aiohttp.ClientSession() as session:
            client = Client(session, base_url="http://127.0.0.1:9", api_key="unused")
            sched = Scheduler(manifest, client, ledger, out, state, RunConfig())
            assert not sched.uploads.ready_for(job)  # past the reuse period (uploaded at epoch 0): not reused
            assert sched.doubts.match_request(job)["input_image"] == "https://cdn.example/old-upload.png"


# --- the spare poll, by table -------------------------------------------------------------------------------------

KNOWN = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5]


def _seen(name: str, created_at: float, checked: float | None = None) -> Flight:
    return Flight(name, name, name, created_at=created_at, job=None, last_running_age=checked)


@pytest.mark.parametrize(
    ("flights", "now", "min_interval", "chosen", "wake"),
    [
        ([], 1.0, 0.0, None, None),
        ([_seen("a", 0.0, 0.5)], 0.6, 0.0, None, 1.0),  # not likely done: one timer for when it will be
        ([_seen("a", 0.0, 1.45)], 1.6, 0.0, "a", None),  # past every known time: surely done
        ([_seen("old", 0.0, 1.3), _seen("young", 0.3)], 1.5, 0.0, "young", None),  # worth most, not likeliest
        ([_seen("a", 0.0, 1.45)], 1.6, 0.5, None, 1.95),  # seen running too lately: the minimum interval first
    ],
)
def test_a_spare_request_goes_to_the_poll_worth_most_or_sets_one_timer(
    flights: list[Flight], now: float, min_interval: float, chosen: str | None, wake: float | None
) -> None:
    times: list[float] = []
    best = spare_poll(flights, now, KNOWN, min_interval, times.append)
    assert (None if best is None else best.prediction_id) == chosen
    assert (min(times) if times else None) == (None if wake is None else pytest.approx(wake))
