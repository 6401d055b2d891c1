"""What a run reports of itself: the snapshot behind the progress line, and its account at the end.

Read from the collaborators' state and never changing it, so views (``views/``) see records, not engine internals.
"""

from __future__ import annotations

from batchrunner.engine.context import Run
from batchrunner.engine.creates import Creates
from batchrunner.engine.doubts import Doubts
from batchrunner.engine.grants import Grants
from batchrunner.engine.results import Results
from batchrunner.engine.runstate import RunResult, Snapshot, StopReason
from batchrunner.engine.uploads import Uploads
from batchrunner.engine.watching import Watching


def snapshot(
    run: Run, grants: Grants, creates: Creates, watching: Watching, doubts: Doubts, results: Results
) -> Snapshot:
    """The run at this moment: done + failed + in flight + in doubt + pending = total."""
    c, now, config = run.counters, run.now(), run.config
    done = c.skipped + c.succeeded
    in_flight = len(watching.flights) - len(watching.orphans) + creates.pending
    downloading = len(results.downloading) + len(results.undownloaded)
    in_doubt = len(doubts)
    return Snapshot(
        total=c.total,
        done=done,
        failed=c.failed,
        in_flight=in_flight + downloading,
        # What is neither done, failed, in flight nor in doubt waits: ready, delayed, or behind an upload.
        pending=max(0, c.total - done - c.failed - in_flight - downloading - in_doubt),
        requests=c.requests,
        elapsed=(now - run.started) if run.started else 0.0,
        window_used=grants.window.used(now),
        in_doubt=in_doubt,
        skipped=c.skipped,
        downloading=downloading,
        spend=c.spend,
        spend_before=run.state.spend,
        slots_used=run.gate.in_flight,
        slots=config.concurrency,
        window_limit=config.rate_count,
        window_period=config.rate_period,
        window_wait=grants.window.delay(now),
        creates_paused=max(0.0, creates.paused_until - now),
        stopping=run.stop_reason.value if run.stop_reason is not None else None,
        rate_limited=c.rate_limited,
    )


def result(
    run: Run, creates: Creates, watching: Watching, doubts: Doubts, results: Results, uploads: Uploads
) -> RunResult:
    """How the run ended."""
    c = run.counters
    # Paid predictions whose output is not saved yet are in flight, whether a download gave up or was cut off by the
    # stop: the ledger has them as in flight, and the next run fetches them.
    in_flight = len(watching.flights) + len(results.undownloaded) + len(results.downloading)
    pending = len(creates.ready) + len(creates.delayed) + creates.pending + len(uploads.blocked)
    stop = run.stop_reason
    if stop is None and (pending or in_flight) and run.fatal is None:
        stop = StopReason.API_DOWN if run.consecutive_failures else None
    return RunResult(
        total=c.total,
        skipped=c.skipped,
        succeeded=c.succeeded,
        failed=c.failed,
        pending=pending,
        in_flight=in_flight,
        requests=c.requests,
        creates=c.creates,
        polls=c.polls,
        lost_answers=c.lost_answers,
        rate_limited=c.rate_limited,
        spend=round(c.spend, 6),
        elapsed=run.now() - run.started,
        stop_reason=stop,
        max_in_flight=run.gate.max_seen,
        by_kind=dict(c.by_kind),
        recovered=c.recovered,
        in_doubt=len(doubts),
        spend_before=round(run.state.spend, 6),
    )
