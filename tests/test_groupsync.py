"""The group sync of the output folder: callers that arrive while a sync runs share the next one, and none returns
before a sync that started after it asked."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from batchrunner.store import output
from batchrunner.store.groupsync import GroupSync


class _Gated:
    """A sync that blocks until let go, counting its calls and when each started."""

    def __init__(self) -> None:
        self.calls = 0
        self.gate = threading.Event()
        self.started = threading.Event()
        self.events: list[str] = []
        self.lock = threading.Lock()
        self.fail_next = False

    def __call__(self) -> None:
        with self.lock:
            self.calls += 1
            self.events.append(f"sync{self.calls}")
            fail, self.fail_next = self.fail_next, False
        self.started.set()
        self.gate.wait(5)
        if fail:
            raise OSError("disk gone")


def _waiting(group: GroupSync, n: int) -> bool:
    with group._cond:
        return group._asked >= n


def _until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_callers_during_a_sync_share_the_next_one() -> None:
    sync = _Gated()
    group = GroupSync(sync)
    first = threading.Thread(target=group.sync)
    first.start()
    assert sync.started.wait(5)
    done: list[int] = []

    def call(i: int) -> None:
        group.sync()
        done.append(i)

    others = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in others:
        t.start()
    _until(lambda: _waiting(group, 9))
    assert done == []  # the running sync started before they asked: it serves none of them
    sync.gate.set()
    first.join(5)
    for t in others:
        t.join(5)
    assert sorted(done) == list(range(8))
    assert sync.calls == 2  # nine callers, two syncs


def test_a_caller_alone_runs_its_own_sync() -> None:
    sync = _Gated()
    sync.gate.set()
    group = GroupSync(sync)
    for _ in range(3):
        group.sync()
    assert sync.calls == 3  # each asked after the last sync ended: each needs one of its own


def test_a_failed_sync_raises_to_its_caller_and_the_waiters_run_their_own() -> None:
    sync = _Gated()
    sync.fail_next = True
    group = GroupSync(sync)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            group.sync()
        except OSError as exc:
            errors.append(exc)

    first = threading.Thread(target=call)
    first.start()
    assert sync.started.wait(5)
    second = threading.Thread(target=call)
    second.start()
    _until(lambda: _waiting(group, 2))
    sync.gate.set()
    first.join(5)
    second.join(5)
    assert [str(e) for e in errors] == ["disk gone"]  # the first caller's; the second synced again, and it held
    assert sync.calls == 2


def test_downloads_into_one_folder_share_its_syncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[Path] = []
    monkeypatch.setattr(output, "_fsync_dir", lambda path: synced.append(path))
    monkeypatch.setattr(output, "_DIR_SYNCS", {})
    a, b = output._dir_sync(tmp_path / "a"), output._dir_sync(tmp_path / "b")
    assert a is output._dir_sync(tmp_path / "a") and a is not b
    a.sync()
    b.sync()
    assert synced == [tmp_path / "a", tmp_path / "b"]
