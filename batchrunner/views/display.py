"""What a run says while it runs and when it ends, as pure functions of snapshots and results.

The terminal bar, the cron progress lines, the start line, the summary and the next step are all built here from
``Snapshot``/``RunResult`` values, with the vocabulary of ``words.py``; ``progress.py`` puts them on the screen or in
the log, on a timer. Nothing here reads a clock, a terminal or a file, so every line is tested by table.
"""

from __future__ import annotations

import math
from typing import Any

from batchrunner.engine.runstate import RunConfig, RunResult, Snapshot, StopReason
from batchrunner.views.words import Tally, duration, money, plural, tally_text

__all__ = [
    "SEP",
    "bar_texts",
    "eta",
    "fit",
    "next_steps",
    "progress_fields",
    "progress_line",
    "start_line",
    "status_text",
    "summary_fields",
    "summary_line",
    "tally",
    "wait_text",
    "waiting_for",
]

SEP = " · "


def tally(snap: Snapshot) -> Tally:
    return Tally(snap.total, snap.done, snap.failed, snap.in_flight, snap.in_doubt, snap.pending)


def eta(snap: Snapshot, finished_at_start: int) -> float | None:
    """Seconds left at this run's pace (jobs finished since it began over its elapsed time); None until one has."""
    finished = snap.done + snap.failed
    left = snap.total - finished
    if left <= 0:
        return 0.0
    made = finished - finished_at_start
    if made <= 0 or snap.elapsed <= 0:
        return None
    return left * snap.elapsed / made


def waiting_for(snap: Snapshot) -> str | None:
    """What the run is waiting for when it sends nothing, in words; None when it is simply busy."""
    if snap.stopping is not None:
        what = plural(snap.in_flight + snap.in_doubt, "job")
        return f"stopping ({_stop_words(snap.stopping)}): finishing {what} in flight, no new creates"
    if snap.creates_paused > 0.5:
        return f"the API asked to slow down: creates resume in {duration(snap.creates_paused)}"
    work = snap.pending + snap.in_flight + snap.in_doubt
    if work and snap.window_wait > 0.5:
        if math.isinf(snap.window_wait):
            return f"waiting for answers: all {snap.window_limit} requests of the rate window are on the wire"
        return f"waiting for the rate window: next request in {duration(snap.window_wait)}"
    if snap.pending and snap.slots and snap.slots_used >= snap.slots:
        return f"{snap.slots_used}/{snap.slots} in flight: the next create waits for a slot"
    if snap.in_doubt:
        return f"looking for {plural(snap.in_doubt, 'create')} in doubt in the account's executions"
    return None


def _stop_words(reason: str) -> str:
    return {
        "interrupted": "Ctrl-C",
        "terminated": "SIGTERM",
        "deadline": "--max-runtime",
        "max_jobs": "--max-jobs",
        "budget": "--budget",
        "payment_required": "out of credit",
        "api_unavailable": "the API keeps failing",
    }.get(reason, reason)


def fit(parts: list[str], width: int, *, sep: str = SEP) -> str:
    """Join ``parts`` (most important first) with ``sep``, dropping from the end what does not fit in ``width``;
    the first part is cut with an ellipsis when even it alone is too long."""
    shown = list(parts)
    while len(shown) > 1 and len(sep.join(shown)) > width:
        shown.pop()
    text = sep.join(shown)
    if len(text) > width:
        text = text[: max(0, width - 1)] + "…"
    return text


def bar_texts(snap: Snapshot, width: int, finished_at_start: int) -> tuple[str, str]:
    """The bar line's text left and right of the bar, leaving it at least a fifth of ``width``."""
    finished = snap.done + snap.failed
    left = f"{finished}/{snap.total} "
    pct = 100.0 * finished / snap.total if snap.total else 100.0
    left_s = eta(snap, finished_at_start)
    if left_s == 0.0:
        return left, fit([f" {pct:3.0f}% in {duration(snap.elapsed)}"], max(0, width - len(left) - 10))
    rights = [
        f" {pct:3.0f}% {duration(snap.elapsed)}, about {duration(left_s)} left",
        f" {pct:3.0f}% {duration(snap.elapsed)}<{duration(left_s)}",
        f" {pct:3.0f}%",
        "",
    ]
    room = width - max(10, width // 5) - len(left)
    right = next((r for r in rights if len(r) <= room), "")
    return left, right


def status_text(snap: Snapshot, width: int) -> str:
    """The line under the bar: counts that add up (zeros left out, but for in flight and pending), this run's
    spend, the requests in the rate window."""
    counts = [f"{snap.done} done"] if snap.done else []
    counts += [f"{snap.failed} failed"] if snap.failed else []
    counts += [f"{snap.in_flight} in flight", *([f"{snap.in_doubt} in doubt"] if snap.in_doubt else [])]
    counts += [f"{snap.pending} pending"]
    parts = [", ".join(counts)]
    if snap.spend:
        parts.append(f"{money(snap.spend - snap.spend_before)} this run")
    if snap.window_limit:
        parts.append(f"window {snap.window_used} of {snap.window_limit} used")
    return fit(parts, width)


def wait_text(snap: Snapshot, width: int) -> str:
    """The third line: what the run waits for, or that it is sending."""
    return fit([waiting_for(snap) or f"sending: {plural(snap.requests, 'request')} so far"], width)


def progress_line(snap: Snapshot, finished_at_start: int) -> str:
    """The cron line: ``progress: 92/200 done, 3 failed, 10 in flight, 95 pending; 131 requests; $3.20 this run
    ($7.36 in all); 2m 03s in, about 4m 10s left`` and what it waits for, if anything."""
    parts = [
        f"progress: {tally_text(tally(snap))}",
        f"{snap.requests} requests",
        f"{money(snap.spend - snap.spend_before)} this run ({money(snap.spend)} in all)",
        f"{duration(snap.elapsed)} in, about {duration(eta(snap, finished_at_start))} left",
    ]
    waiting = waiting_for(snap)
    if waiting:
        parts.append(waiting)
    return "; ".join(parts)


def progress_fields(snap: Snapshot, finished_at_start: int, event: str = "progress") -> dict[str, Any]:
    """The fields of a progress record for ``--log-format json``."""
    left = eta(snap, finished_at_start)
    return {
        "event": event,
        "total": snap.total,
        "done": snap.done,
        "failed": snap.failed,
        "in_flight": snap.in_flight,
        "in_doubt": snap.in_doubt,
        "pending": snap.pending,
        "requests": snap.requests,
        "spend": round(snap.spend, 6),
        "run_spend": round(snap.spend - snap.spend_before, 6),
        "elapsed": round(snap.elapsed, 3),
        "eta": None if left is None else round(left, 1),
        "waiting_for": waiting_for(snap),
    }


def start_line(snap: Snapshot) -> str:
    """``resuming: 92 done, 108 to go, 10 in flight from the last run`` or ``starting: 200 jobs``."""
    to_go = snap.total - snap.done - snap.failed
    carried = snap.in_flight + snap.in_doubt
    if not (snap.done or snap.failed or carried):
        return f"starting: {plural(snap.total, 'job')}"
    parts = [f"{snap.done} done"]
    if snap.failed:
        parts.append(f"{snap.failed} failed for good")
    parts.append(f"{to_go} to go")
    if snap.in_flight:
        parts.append(f"{snap.in_flight} in flight from the last run")
    if snap.in_doubt:
        parts.append(f"{snap.in_doubt} in doubt from the last run (looked for in the executions listing first)")
    return "resuming: " + ", ".join(parts)


# --------------------------------------------------------------------------------------------------- the end
def summary_line(result: RunResult, *, report: str | None = None) -> str:
    """One line for the log: the batch's counts, then what this run did, then where the report is."""
    t = Tally(
        result.total,
        result.succeeded + result.skipped,
        result.failed,
        result.in_flight,
        result.in_doubt,
        result.pending,
    )
    run = [
        f"{result.succeeded} made",
        plural(result.requests, "request"),
        duration(result.elapsed),
        f"{money(result.spend - result.spend_before)} spent ({money(result.spend)} in all)",
    ]
    parts = [f"summary: {tally_text(t)}", "this run: " + ", ".join(run)]
    extra = []
    if result.recovered:
        extra.append(f"{result.recovered} recovered from the executions listing (not paid twice)")
    if result.lost_answers:
        extra.append(
            f"{result.lost_answers} possibly duplicated (created again while an earlier prediction may have run)"
        )
    if result.rate_limited:
        extra.append(f"{result.rate_limited} refused with 429 (something else spends the key)")
    if extra:
        parts.append(", ".join(extra))
    if report:
        parts.append(f"report {report}")
    return "; ".join(parts)


def summary_fields(result: RunResult) -> dict[str, Any]:
    """The fields of the summary record for ``--log-format json``."""
    return {
        "event": "summary",
        "total": result.total,
        "done": result.succeeded + result.skipped,
        "made": result.succeeded,
        "failed": result.failed,
        "in_flight": result.in_flight,
        "in_doubt": result.in_doubt,
        "pending": result.pending,
        "requests": result.requests,
        "spend": round(result.spend, 6),
        "run_spend": round(result.spend - result.spend_before, 6),
        "elapsed": round(result.elapsed, 3),
        "recovered": result.recovered,
        "possibly_duplicated": result.lost_answers,
        "rate_limited": result.rate_limited,
        "stop_reason": result.stop_reason.value if result.stop_reason else None,
    }


def next_steps(result: RunResult, config: RunConfig, *, command: str) -> list[str]:
    """What to do next after a run, if anything. ``command`` is the manifest and output as the user wrote them
    (``jobs/x.yaml`` or ``jobs/x.yaml --output o``), for commands to copy."""
    steps: list[str] = []
    stop = result.stop_reason
    rerun = f"rerun to continue: batchrunner run {command}"
    if stop is StopReason.BUDGET and config.budget is not None:
        steps.append(
            f"stopped by --budget {money(config.budget)} ({money(result.spend)} spent in all): raise it to continue"
        )
    elif stop is StopReason.DEADLINE:
        steps.append(f"stopped by --max-runtime: {rerun}")
    elif stop is StopReason.MAX_JOBS and config.max_jobs is not None:
        steps.append(f"stopped by --max-jobs {config.max_jobs}: {rerun}")
    elif stop is StopReason.PAYMENT:
        steps.append(f"stopped: the account is out of credit (HTTP 402); add credit, then {rerun}")
    elif stop is StopReason.API_DOWN:
        steps.append(f"stopped: the API kept failing; {rerun} later")
    elif stop is StopReason.LIMITS_STORE:
        steps.append(f"stopped: the store of the key's limits was lost (what was in flight was finished); {rerun}")
    elif stop is StopReason.INTERRUPTED:
        steps.append(f"stopped by Ctrl-C: {rerun}")
    elif stop is StopReason.TERMINATED:
        steps.append(f"stopped by SIGTERM: {rerun}")
    elif not result.complete:
        steps.append(rerun)
    if result.in_doubt:
        steps.append(
            f"{plural(result.in_doubt, 'create')} in doubt: the next run looks for them in the account's executions"
        )
    if result.failed:
        steps.append(f"{result.failed} failed for good: batchrunner retry {command}, then run again")
    return steps
