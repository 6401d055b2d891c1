"""What follows a finished prediction: its output downloaded and saved, or its failure recorded.

Both end in the ledger (``succeeded`` once the file is fsynced and renamed into place, or ``failed``), in the replayed
job state and in the run's counters. A failed attempt that deserves another is handed back to the scheduler through
its ``retry`` callback, with the backoff to wait; the scheduler decides when it is created again.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

from batchrunner.api.client import Client, Prediction
from batchrunner.engine.policy import backoff
from batchrunner.engine.runstate import MAX_DOWNLOADS, Counters, Flight, RunConfig, job_state
from batchrunner.errors import ApiError, DownloadRejected, TransientError
from batchrunner.manifest import Job
from batchrunner.store.ledger import FAILED, SUCCEEDED, JobStatus, Ledger, LedgerState
from batchrunner.store.output import OutputDir, save_download

log = logging.getLogger("batchrunner")

# Attempts at downloading one output within one run; after that the prediction stays in the ledger to fetch next run.
MAX_DOWNLOAD_TRIES = 6


class Results:
    """Records how each attempt at a job ended; owned by the scheduler, one per run."""

    def __init__(
        self,
        ledger: Ledger,
        state: LedgerState,
        counters: Counters,
        config: RunConfig,
        *,
        rng: random.Random,
        retry: Callable[[Job, float], None],
    ) -> None:
        self.ledger = ledger
        self.state = state
        self.counters = counters
        self.config = config
        self._rng = rng
        self._retry = retry  # try the job again after this many seconds
        # Downloads scale with the slots: with 1000 in flight, four at a time left images unsaved 15-45 s after their
        # predictions finished.
        self.downloads = asyncio.Semaphore(
            config.download_concurrency or min(MAX_DOWNLOADS, max(4, config.concurrency))
        )
        self.undownloaded: list[str] = []  # jobs whose prediction succeeded but whose output could not be fetched
        self.downloading: set[str] = set()  # predictions whose output is being fetched (or was, when the run stopped)

    async def download(
        self, flight: Flight, prediction: Prediction, duration: float | None, *, client: Client, out: OutputDir
    ) -> None:
        """Fetch a succeeded prediction's output into ``out`` and record it; a paid output is never given up as lost.

        While it runs the prediction is in ``downloading``; a download cut off by the run's stop stays there, so the
        run's account counts it in flight, as the ledger does.
        """
        self.downloading.add(flight.prediction_id)
        await self._download(flight, prediction, duration, client=client, out=out)
        self.downloading.discard(flight.prediction_id)

    async def _download(
        self, flight: Flight, prediction: Prediction, duration: float | None, *, client: Client, out: OutputDir
    ) -> None:
        url = prediction.urls[0]
        last: ApiError | None = None
        for attempt in range(1, MAX_DOWNLOAD_TRIES + 1):
            try:
                async with self.downloads:
                    name = await save_download(out, flight.job_id, lambda sink: client.download(url, sink))
            except DownloadRejected as exc:
                self.fail(
                    flight.job_id,
                    flight.fingerprint,
                    flight.job,
                    f"unusable output: {exc}",
                    retryable=True,
                    error_code=None,
                    prediction_id=flight.prediction_id,
                    cost=prediction.cost,
                    duration=duration,
                )
                return
            except TransientError as exc:
                last = exc
                await asyncio.sleep(backoff(attempt, base=0.2, cap=5.0, rng=self._rng))
                continue
            cost = prediction.cost if prediction.cost is not None else self.config.price
            # Not fsynced on its own: lost to a power cut, the prediction is polled and its output fetched again, free.
            self.ledger.append(
                SUCCEEDED,
                durable=False,
                job=flight.job_id,
                fingerprint=flight.fingerprint,
                prediction_id=flight.prediction_id,
                file=name,
                cost=cost,
                duration=duration,
                model_time=prediction.predict_time,  # the API's own prediction time, for the report
            )
            st = job_state(self.state, flight.job_id, flight.fingerprint)
            st.status, st.file = JobStatus.SUCCEEDED, name
            self.counters.succeeded += 1
            self.counters.spend += cost or 0.0
            return
        # The prediction is paid and its output may still be there: leave it in flight in the ledger, so the next run
        # polls it again and downloads it, instead of paying for a new one.
        log.warning(
            "job %s: download failed %d times (%s); the next run fetches it",
            flight.job_id,
            MAX_DOWNLOAD_TRIES,
            last,
        )
        self.undownloaded.append(flight.job_id)

    def fail(
        self,
        job_id: str,
        fingerprint: str,
        job: Job | None,
        error: str,
        *,
        retryable: bool,
        error_code: str | None,
        prediction_id: str | None,
        cost: float | None = None,
        duration: float | None = None,
        error_message: str | None = None,
        category: str | None = None,
        still_running: bool = False,
    ) -> None:
        """Record a failed attempt; the job is tried again (after a backoff) while it is retryable and has attempts.

        ``error`` is the text shown; ``error_code``, ``error_message`` and ``category`` are the API's failure envelope
        as written (``error_code``, ``error_message``, ``classification.category``), kept in the ledger.
        ``still_running``: the prediction was given up after a cancel while it may still run (and be billed), so a
        new create for the job is possibly paid twice; recorded in the ledger as ``still_running: true``.
        """
        fields: dict[str, Any] = {"error": error, "retryable": retryable}
        optional = {
            "error_code": error_code,
            "error_message": error_message,
            "error_category": category,
            "prediction_id": prediction_id,
            "cost": cost,
            "duration": duration,
            "still_running": True if still_running else None,
        }
        fields.update((k, v) for k, v in optional.items() if v is not None)
        if cost is not None:
            self.counters.spend += cost
        self.ledger.append(FAILED, job=job_id, fingerprint=fingerprint, **fields)
        st = job_state(self.state, job_id, fingerprint)
        st.status = JobStatus.FAILED
        st.still_running = still_running
        st.attempts += 1
        st.retryable = retryable
        st.error = error
        st.error_code = error_code
        self._retry_or_give_up(job_id, job, error, error_code, st.attempts, retryable=retryable)

    def _retry_or_give_up(
        self, job_id: str, job: Job | None, error: str, error_code: str | None, attempts: int, *, retryable: bool
    ) -> None:
        if retryable and attempts < self.config.max_attempts and job is not None:
            self.counters.retried += 1
            log.warning(
                "job %s: attempt %d failed: %s; trying again",
                job_id,
                attempts,
                error,
                extra={"fields": _failure_fields("attempt_failed", job_id, error, error_code, attempts)},
            )
            self._retry(job, backoff(attempts, rng=self._rng))
        else:
            self.counters.failed += 1
            log.error(
                "job %s failed: %s%s",
                job_id,
                error,
                f" [{error_code}]" if error_code else "",
                extra={"fields": _failure_fields("job_failed", job_id, error, error_code, attempts)},
            )


def _failure_fields(event: str, job: str, error: str, error_code: str | None, attempts: int) -> dict[str, Any]:
    """The fields of a failure's log record (``--log-format json``)."""
    return {"event": event, "job": job, "error_code": error_code, "error": error, "attempts": attempts}
