"""A cancel after --job-timeout is best effort: nothing is created again for the job while its prediction may run.

The documents: an accepted cancel answers ``{"status": "success", ...}`` ("accepted", not "finished"); when it takes,
the prediction then polls as ``cancelled`` with ``metrics.cost: 0``; otherwise it "may still complete or fail", billed.
So after a cancel the job waits for the prediction to be terminal (a success is its result; ``cancelled`` or a failure
frees it for its next attempt), or for a hold long enough that the account no longer runs it, after which a new
create counts as possibly paid twice. Here: the hold by table, the ledger's count, the dispatcher's choices on a fake
clock, and each server behaviour end to end in every watch mode.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from batchrunner.api.client import Client, Phase, Prediction
from batchrunner.cli.main import main
from batchrunner.engine.cancels import overdue
from batchrunner.engine.policy import cancel_hold
from batchrunner.engine.runstate import Flight, RunConfig
from batchrunner.engine.scheduler import Scheduler
from batchrunner.errors import ApiError, RateLimited
from batchrunner.manifest import load_manifest
from batchrunner.sim.server import Faults
from batchrunner.store.ledger import FAILED, SUBMITTED, SUBMITTING, SUCCEEDED, Ledger, read_ledger, replay
from batchrunner.store.output import OutputDir
from tests.conftest import ThreadedSimulator, fast_sim, images_in, run_args, write_manifest

SimFactory = Callable[..., ThreadedSimulator]
MODES = ("auto", "list", "poll")


# --- the hold, by table ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("durations", "job_timeout", "poll_initial", "hold"),
    [
        ([], 600.0, 3.0, 600.0),  # the defaults: another --job-timeout, as before
        ([], 1.0, 3.0, 30.0),  # nothing known yet: ten first-poll intervals, far past a 1 s timeout
        ([20.0, 30.0, 25.0], 1.0, 3.0, 45.0),  # the longest prediction seen, and half again
        ([0.01, 0.02, 0.03], 5.0, 0.01, 5.0),  # never less than another timeout
        # Never less than a second, whatever the samples say (they are cut short by the timeout).
        ([0.01, 0.02, 0.03], 0.05, 0.01, 1.0),
        ([0.01, 0.02, 0.03], 0.05, 0.2, 2.0),  # nor than ten first-poll intervals
    ],
)
def test_a_cancelled_prediction_is_held_as_long_as_it_may_run(
    durations: list[float], job_timeout: float, poll_initial: float, hold: float
) -> None:
    assert cancel_hold(durations, job_timeout=job_timeout, poll_initial=poll_initial) == pytest.approx(hold)


# --- the ledger: a create after a prediction given up while running is possibly paid twice ------------------------


def line(event: str, **fields: Any) -> str:
    return json.dumps({"ts": "2026-12-01T10:00:00Z", "event": event, "job": "j", "fingerprint": "f", **fields})


@pytest.mark.parametrize(
    ("events", "duplicated"),
    [
        ([line(FAILED, error="t", retryable=True, still_running=True), line(SUBMITTING, attempt=2)], 1),
        ([line(FAILED, error="t", retryable=True), line(SUBMITTING, attempt=2)], 0),  # it had ended: no duplicate
        ([line(FAILED, error="t", retryable=True, still_running=True)], 0),  # not created again (yet)
        (
            [
                line(FAILED, error="t", retryable=True, still_running=True),
                line(SUBMITTING, attempt=2),
                line(SUBMITTED, prediction_id="p2"),
                line(SUBMITTING, attempt=2),  # the same attempt's create sent again: counted once
            ],
            1,
        ),
        (
            [
                line(FAILED, error="t", retryable=True, still_running=True),
                line(SUCCEEDED, file="j.png"),
                line(SUBMITTING, attempt=1),  # its image was deleted: a new create, nothing of the old one running
            ],
            0,
        ),
    ],
)
def test_the_ledger_counts_a_create_after_a_cancelled_prediction_given_up_while_running(
    events: list[str], duplicated: int
) -> None:
    assert replay(events).lost_answers == duplicated


# --- the dispatcher, on a fake clock ------------------------------------------------------------------------------


class Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def scheduler(tmp_path: Path) -> AsyncIterator[tuple[Scheduler, Clock]]:
    """A 1-job batch, job timeout 1 s, first poll at 0.5 s, prediction times 4-6 s known: a hold of 9 s."""
    manifest = load_manifest(write_manifest(tmp_path, 1, image=False))
    out = OutputDir(tmp_path / "out")
    out.create()
    out.prepare()
    state = read_ledger(out.ledger)
    clock = Clock()
    config = RunConfig(job_timeout=1.0, poll_initial=0.5, watch="poll")
    with Ledger(out.ledger) as ledger:
        async with aiohttp.ClientSession() as session:
            client = Client(session, base_url="http://127.0.0.1:9", api_key="unused")
            sched = Scheduler(manifest, client, ledger, out, state, config, clock=clock)
            sched.durations.extend([4.0, 6.0, 5.0])
            yield sched, clock


async def test_an_accepted_cancel_is_not_read_as_finished_and_the_job_waits_out_the_hold(
    scheduler: tuple[Scheduler, Clock], monkeypatch: pytest.MonkeyPatch
) -> None:
    sched, clock = scheduler
    job = sched.manifest.jobs[0]
    flight = Flight(job.id, job.fingerprint, "p-1", created_at=0.0, job=job, next_poll_at=100.0)
    sched.flights["p-1"] = flight
    clock.t = 1.0
    assert sched._choose(clock.t)[0] == ("cancel", flight)

    async def accepted(prediction_id: str, *, request_id: str | None = None) -> str:
        return "success"  # the documented answer of an accepted cancel

    monkeypatch.setattr(sched.client, "cancel", accepted)
    await sched.cancels.cancel(flight)
    # "success" is accepted, not finished: the next look is a first-poll interval away, not at once.
    assert flight.next_poll_at == pytest.approx(1.5)
    assert sched._choose(1.0)[0] is None
    # Held the longest prediction seen and half again (9 s) after the cancel, not one more --job-timeout.
    assert sched._choose(2.1)[0] == ("poll", flight)
    assert sched._choose(9.9)[0] != ("abandon", flight)
    # No look since the cancel: at the hold's end the next look decides, and one that sees it running gives it up.
    assert sched._choose(10.0)[0] == ("poll", flight)
    flight.last_running_age = 10.0
    sched.flights.touch(flight)
    assert sched._choose(10.0)[0] == ("abandon", flight)


def running(prediction_id: str) -> Prediction:
    return Prediction(prediction_id, "processing", Phase.RUNNING, (), None, None, False, None, None)


async def test_a_hold_that_runs_out_while_a_poll_is_put_off_gives_nothing_up_until_a_look_sees_it_running(
    scheduler: tuple[Scheduler, Clock], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The torture's case: the poll after the cancel met a 429 whose wait ran past the hold. Giving the prediction up
    # at the hold's end, unseen, created the job again while the prediction (long done, billed) had succeeded.
    sched, clock = scheduler
    job = sched.manifest.jobs[0]
    flight = Flight(job.id, job.fingerprint, "p-1", created_at=0.0, job=job, next_poll_at=100.0)
    sched.flights["p-1"] = flight
    clock.t = 1.0

    async def accepted(prediction_id: str, *, request_id: str | None = None) -> str:
        return "success"

    answers: list[Prediction | ApiError] = [RateLimited("Too many requests", status=429, retry_after=9.5)]

    async def get(prediction_id: str, *, request_id: str | None = None) -> Prediction:
        answer = answers.pop(0)
        if isinstance(answer, ApiError):
            raise answer
        return answer

    monkeypatch.setattr(sched.client, "cancel", accepted)
    monkeypatch.setattr(sched.client, "get", get)
    await sched.cancels.cancel(flight)
    clock.t = 1.5
    assert sched._choose(clock.t)[0] == ("poll", flight)
    flight.busy = True
    await sched.watching._poll(flight)
    assert flight.next_poll_at >= 11.0  # put off past the hold's end (10 s)
    for t in (10.0, 10.5, 10.99):
        action, wake_at = sched._choose(t)
        assert action is None, t  # not given up unseen, and no wake-up in the past
        assert wake_at is not None and wake_at > t
    clock.t = flight.next_poll_at
    assert sched._choose(clock.t)[0] == ("poll", flight)
    answers.append(running("p-1"))
    flight.busy = True
    await sched.watching._poll(flight)
    # Seen still running past the hold: now it is given up (and its job's next create counts as possibly paid twice).
    assert sched._choose(clock.t)[0] == ("abandon", flight)


# --- end to end ---------------------------------------------------------------------------------------------------


def ledger_events(out: Path, name: str) -> list[dict[str, Any]]:
    found = []
    for text in (out / "ledger.jsonl").read_text(encoding="utf-8").splitlines():
        event = json.loads(text)
        if event.get("event") == name:
            found.append(event)
    return found


def run(sim: ThreadedSimulator, folder: Path, jobs: int, mode: str, *extra: str) -> tuple[int, Path]:
    manifest = write_manifest(folder, jobs, image=False)
    out = folder / "out"
    return main(run_args(manifest, sim.url, out, "--watch", mode, *extra)), out


@pytest.mark.usefixtures("api_key")
@pytest.mark.parametrize("mode", MODES)
def test_a_record_only_cancel_of_a_prediction_twice_the_timeout_keeps_its_image_and_pays_once(
    mode: str, tmp_path: Path, threaded_sim: SimFactory
) -> None:
    # Predictions of 2-3 timeouts on a server whose cancel is only recorded (they complete and are billed).
    sim = threaded_sim(fast_sim(min_seconds=0.2, max_seconds=0.3, seed=1))
    code, out = run(sim, tmp_path, 3, mode, "--job-timeout", "0.1s")
    assert code == 0
    assert len(images_in(out)) == 3
    stats = sim.stats()
    assert stats["cancels"] == 3
    assert stats["creates"] == 3  # every first prediction's image kept
    assert stats["paid_twice"] == 0
    assert not ledger_events(out, FAILED)
    assert ledger_events(out, "run_finished")[-1]["possibly_duplicated"] == 0


@pytest.mark.usefixtures("api_key")
@pytest.mark.parametrize("mode", MODES)
def test_a_cancel_that_takes_frees_the_job_unbilled_for_its_next_attempt(
    mode: str, tmp_path: Path, threaded_sim: SimFactory
) -> None:
    sim = threaded_sim(fast_sim(min_seconds=0.5, max_seconds=0.6, faults=Faults(cancel_stops=1.0), seed=1))
    code, out = run(sim, tmp_path, 2, mode, "--job-timeout", "0.05s", "--max-attempts", "2")
    assert code == 1
    failed = ledger_events(out, FAILED)
    assert len(failed) == 4
    assert {e["error_code"] for e in failed} == {"TIMEOUT"}
    assert all(e.get("cost", 0) == 0 and "still_running" not in e for e in failed)
    stats = sim.stats()
    assert stats["creates"] == 4
    assert stats["paid_twice"] == 0  # cancelled predictions are not paid


@pytest.mark.usefixtures("api_key")
def test_a_cancelled_prediction_still_running_after_the_hold_counts_as_possibly_paid_twice_everywhere(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    # Seed 2: the first prediction never finishes (the cancel is only recorded), the second does.
    sim = threaded_sim(fast_sim(faults=Faults(never_finish=0.5), seed=2))
    code, out = run(sim, tmp_path, 1, "auto", "--job-timeout", "0.05s", "--max-attempts", "2")
    err = capsys.readouterr().err
    assert code == 0, err
    assert len(images_in(out)) == 1
    failed = ledger_events(out, FAILED)
    assert len(failed) == 1 and failed[0]["still_running"] is True
    assert "still running after a cancel" in failed[0]["error"]
    # The simulator counts the one left running as a payment: the runner's count agrees, in each place it shows.
    assert sim.stats()["paid_twice"] == 1
    assert "1 possibly duplicated" in err
    assert ledger_events(out, "run_finished")[-1]["possibly_duplicated"] == 1
    manifest = tmp_path / "batch.yaml"
    assert main(["status", str(manifest), "--output", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["possibly_duplicated"] == 1


# --- the deadline scan, by table ----------------------------------------------------------------------------------


def _flight(name: str, created_at: float, cancelled_at: float | None = None, seen_at: float | None = None) -> Flight:
    """A flight; ``seen_at``: when a look last saw it running."""
    seen = None if seen_at is None else seen_at - created_at
    return Flight(name, name, name, created_at=created_at, job=None, cancelled_at=cancelled_at, last_running_age=seen)


@pytest.mark.parametrize(
    ("flights", "now", "action", "earliest"),
    [
        ([], 5.0, None, math.inf),
        ([_flight("a", 0.0)], 0.5, None, 1.0),  # not yet overdue: its deadline is the next look
        ([_flight("a", 0.0)], 1.0, ("cancel", "a"), math.inf),  # at its --job-timeout: cancelled
        ([_flight("a", 0.0, cancelled_at=1.0)], 5.0, None, 10.0),  # cancelled: held 9 s after the cancel
        ([_flight("a", 0.0, cancelled_at=1.0, seen_at=10.0)], 10.0, ("abandon", "a"), math.inf),
        # Past its hold but not seen since (a look put off past it): no give-up, no deadline, the next look decides.
        ([_flight("a", 0.0, cancelled_at=1.0, seen_at=9.9)], 10.5, None, math.inf),
        ([_flight("a", 0.0, cancelled_at=1.0), _flight("b", 0.5)], 10.5, ("cancel", "b"), math.inf),
        ([_flight("a", 0.5), _flight("b", 0.0, cancelled_at=0.2)], 0.8, None, 1.5),  # the soonest of both
        ([_flight("a", 0.5), _flight("b", 0.0)], 1.2, ("cancel", "b"), math.inf),  # the first overdue in order
    ],
)
def test_the_deadline_scan_cancels_then_abandons_and_tells_the_next_deadline(
    flights: list[Flight], now: float, action: tuple[str, str] | None, earliest: float
) -> None:
    asked: list[int] = []

    def hold() -> float:
        asked.append(1)
        return 9.0

    chosen, soonest = overdue(flights, now, timeout=1.0, hold=hold)
    assert (None if chosen is None else (chosen[0], chosen[1].prediction_id)) == action
    assert soonest == earliest
    assert len(asked) <= 1  # the hold is worked out once, and only for a cancelled flight
    if not any(f.cancelled_at is not None for f in flights):
        assert not asked
