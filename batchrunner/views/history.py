"""What the ledger says beyond its replay, for people: how the last run ended, and each job's model time.

The replay (``ledger.replay``) folds events into what the next run must do and ignores ``run_started`` and
``run_finished``; ``status`` and the report want them too, and the prediction time the API itself reported
(``model_time`` on ``succeeded``). One pass over the raw lines picks only the lines that carry them, so a
300,000-line ledger costs a fraction of its replay. Read-only; a torn or foreign line is skipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchrunner.store.ledger import parse_ts

__all__ = ["History", "RunRecord", "read_history", "scan_history"]

_MARKS = (b'"run_started"', b'"run_finished"', b'"model_time"')


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One run as the ledger has it: its start, and its end when it wrote one (a killed run writes none)."""

    started_at: float | None
    pid: int | None
    finished_at: float | None = None
    finished: dict[str, Any] | None = None  # the run_finished fields

    @property
    def unfinished(self) -> bool:
        """It ended without its ``run_finished``: killed, or the machine went down."""
        return self.finished is None

    @property
    def incomplete(self) -> bool:
        """It wrote its end, with work left (a limit, a stop, the API)."""
        f = self.finished or {}
        return any(isinstance(f.get(k), int) and f[k] > 0 for k in ("pending", "in_flight", "in_doubt"))


@dataclass(slots=True)
class History:
    last_run: RunRecord | None = None
    runs: int = 0
    model_times: dict[str, float] = field(default_factory=dict)  # by fingerprint, of the latest success


def scan_history(lines: Iterable[bytes]) -> History:
    """Fold raw ledger lines into a History. Pure."""
    history = History()
    started: RunRecord | None = None
    for line in lines:
        if not any(mark in line for mark in _MARKS):
            continue
        try:
            event = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if not isinstance(event, dict):
            continue
        kind = event.get("event")
        at = _time(event.get("ts"))
        if kind == "run_started":
            pid = event.get("pid")
            started = RunRecord(at, pid if isinstance(pid, int) and not isinstance(pid, bool) else None)
            history.last_run = started
            history.runs += 1
        elif kind == "run_finished":
            fields = {k: v for k, v in event.items() if k not in ("ts", "event")}
            base = started or RunRecord(None, None)
            history.last_run = RunRecord(base.started_at, base.pid, at, fields)
            started = None
        elif kind == "succeeded":
            fp, value = event.get("fingerprint"), event.get("model_time")
            if isinstance(fp, str) and isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
                history.model_times[fp] = float(value)
    return history


def _time(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return parse_ts(value)
    except ValueError:
        return None


def read_history(path: Path) -> History:
    """The History of the ledger at ``path`` (empty when there is none or it cannot be read)."""
    try:
        with path.open("rb") as fh:
            return scan_history(fh)
    except OSError:
        return History()
