"""The collector's pace while a run dispatches, and the process's own pace back after it."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from batchrunner.bench import Regime, measure
from batchrunner.engine.collector import MIDDLE, OLD, YOUNG, run_pace
from batchrunner.engine.scheduler import Scheduler


def test_a_run_collects_every_young_allocations_with_what_it_loaded_frozen_and_puts_both_back() -> None:
    before = gc.get_threshold()
    assert before != (YOUNG, MIDDLE, OLD) and gc.get_freeze_count() == 0
    loaded = [[i] for i in range(1000)]
    with run_pace():
        assert gc.get_threshold() == (YOUNG, MIDDLE, OLD)
        assert gc.get_freeze_count() >= len(loaded)
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_runs_that_overlap_put_the_pace_back_only_when_the_last_of_them_ends() -> None:
    before = gc.get_threshold()
    first, second = run_pace(), run_pace()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # the first to start ends first: the other still runs at the run's pace
    assert gc.get_threshold() == (YOUNG, MIDDLE, OLD)
    second.__exit__(None, None, None)
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


async def test_a_run_dispatches_at_the_runs_pace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, int, int]] = []
    dispatch = Scheduler._dispatch

    async def recorded(self: Scheduler) -> None:
        seen.append(gc.get_threshold())
        await dispatch(self)

    monkeypatch.setattr(Scheduler, "_dispatch", recorded)
    before = gc.get_threshold()
    m = await measure(Regime("tiny", 40, 0.4, 4, 0.01, 0.05), "runner", 2, 1, tmp_path)
    assert m.succeeded == 2
    assert seen == [(YOUNG, MIDDLE, OLD)] and gc.get_threshold() == before


def test_a_process_that_froze_its_own_objects_keeps_its_frozen_set_as_it_was() -> None:
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        loaded_since = [[i] for i in range(1000)]  # the process's, not frozen by it: a run must not freeze them
        with run_pace():
            pass
        assert gc.get_freeze_count() <= frozen  # some frozen objects may have been freed meanwhile, none added
        assert len(loaded_since) == 1000
    finally:
        gc.unfreeze()
