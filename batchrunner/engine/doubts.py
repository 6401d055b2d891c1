"""Creates in doubt: settled from the account's listing before anything is paid again.

A create that may have made a prediction without saying so (a 5xx, a timeout, a reset after sending: see
``reconcile.create_in_doubt``) keeps its in-flight slot while the listing is searched for it (``reconcile.Reconciler``,
the pure core); a match is adopted (``recovered``) and handed to the watching, no match after a few looks means nothing
was made (``not_created``) and the job is created again. Only when the listing fails is a job created again in doubt,
and counted as possibly paid twice. A resumed run settles the doubts a killed run left the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from batchrunner.api.client import Prediction
from batchrunner.engine.context import Run
from batchrunner.engine.grants import Grants
from batchrunner.engine.policy import retry_delay
from batchrunner.engine.reconcile import PAGE_SIZE, TRIES, Doubt, Outcome, Reconciler
from batchrunner.engine.runstate import Flight, job_state
from batchrunner.engine.uploads import Uploads
from batchrunner.errors import ApiError, AuthError, NotFound, RateLimited
from batchrunner.manifest import Job
from batchrunner.store.ledger import NOT_CREATED, RECOVERED, JobStatus

log = logging.getLogger("batchrunner")


class Doubts:
    """The creates in doubt of one run, and the listing pages and GETs that settle them."""

    def __init__(
        self,
        run: Run,
        grants: Grants,
        uploads: Uploads,
        *,
        adopt: Callable[[Flight, Prediction | None], None],
        create_again: Callable[[Job], None],
    ) -> None:
        self.run = run
        self.grants = grants
        self.uploads = uploads
        self._adopt = adopt  # watch a prediction a doubt made (and act on what its GET said, if one did)
        self._create_again = create_again
        config = run.config
        self.recon = Reconciler(
            model=run.manifest.model, known=run.state.predictions, wait=config.reconcile_wait, skew=config.clock_skew
        )
        self.jobs: dict[str, Job] = {}
        self.paused_until = 0.0
        self.failures = 0  # failed sweep requests in a row, for the backoff between sweeps

    def __len__(self) -> int:
        return len(self.recon)

    def match_request(self, job: Job) -> Mapping[str, Any]:
        """The job's create request as it was sent, to compare listed predictions with.

        A local image went as the URL of its upload: the one this run would use, else the one the ledger recorded,
        however old (an upload past its reuse period is not reused, but a create in doubt may well have sent it).
        Only without either is the image left out of the comparison.
        """
        if self.uploads.ready_for(job):
            try:
                return self.uploads.api_input(job)
            except OSError:
                pass
        recorded = self.run.state.uploads.get(job.image_sha256) if job.image_sha256 is not None else None
        if recorded is not None and not self.run.config.inline_images:
            return {**job.input, "input_image": recorded.public_url}
        return {k: v for k, v in job.input.items() if k != "input_image"}

    def add(self, job: Job, request: Mapping[str, Any], sent_at: float, answered_at: float, base: float) -> None:
        self.jobs[job.fingerprint] = job
        self.recon.add(Doubt(job.fingerprint, job.id, request, sent_at, answered_at, base))
        self.run.wake.set()

    def take_over(self, doubting: list[Job], jobs: dict[str, Job], now: float, wall_now: float) -> None:
        """Settle the creates a killed run sent without hearing back, before any job is created again.

        Meanwhile each holds a slot, since its prediction may be running; a doubt whose job the manifest no longer has
        cannot be matched: its slot is held for as long as a prediction would take, so the server is not pushed past
        its cap.
        """
        run = self.run
        for job in doubting:
            st = run.state.jobs[job.fingerprint]
            sent = st.intent_at if st.intent_at is not None else st.doubt_at
            answered = st.doubt_at if st.doubt_at is not None else sent
            sent = wall_now if sent is None else min(sent, wall_now)
            answered = sent if answered is None else min(max(answered, sent), wall_now)
            self.add(job, self.match_request(job), sent, answered, now - (wall_now - answered))
            run.gate.in_flight += 1
        hold = run.doubt_hold()
        for st in run.state.jobs.values():
            if st.doubt_open and st.doubt_at is not None and st.fingerprint not in jobs:
                # An intent stamped in the future (a clock stepped back, an edited ledger) counts as made now: its
                # slot is held for one hold at most, not until that future comes.
                release_at = now - max(0.0, wall_now - st.doubt_at) + hold
                if release_at > now:
                    run.hold_slot(release_at)
                    run.gate.in_flight += 1
        run.gate.max_seen = max(run.gate.max_seen, run.gate.in_flight)

    def next(self, now: float, soonest: Callable[[float], None]) -> tuple[str, Any] | None:
        """The next request that settles creates in doubt (a listing page, or a candidate's GET), if one is due.

        These go before creates: a create waits on nothing else, but a doubt left unsettled may be paid twice.
        """
        if not len(self.recon):
            return None
        if self.recon.sweep is None:
            due = self.recon.next_due()
            if due is None:
                return None
            if due > now:
                soonest(due)
                return None
            self.recon.start(now)
        request = self.recon.next_request()
        if request is not None and request[0] == "list" and self.paused_until > now:
            soonest(self.paused_until)
            return None
        return request

    def start(self, kind: str, target: Any, ticket: int | None) -> None:
        self.recon.begin((kind, target))
        if kind == "list":
            self.grants.start(lambda: self._list(target), ticket)
        else:
            self.grants.start(lambda: self._inspect(target), ticket)

    async def _list(self, offset: int) -> None:
        sweep = self.recon.sweep
        if sweep is None:  # settled meanwhile (a stop): nothing to look for
            return
        run = self.run
        try:
            page = await self.grants.call(
                "list",
                run.client.executions(
                    model=run.manifest.model, start=sweep.start, end=sweep.end, limit=PAGE_SIZE, offset=offset
                ),
            )
        except ApiError as exc:
            if isinstance(exc, AuthError):
                run.fatal = exc
                return
            if isinstance(exc, RateLimited):
                self.recon.retry_listing()
                self.paused_until = run.now() + retry_delay(
                    1, exc.retry_after, base=run.config.retry_base, cap=run.config.retry_cap, rng=run.rng
                )
                return
            # Not counted toward "the API is down": the listing has failed in production while the rest worked.
            self._listing_failed(exc, self.recon.on_failure())
            return
        run.ok()
        self.failures = 0
        self.recon.tries = TRIES
        self.settle(self.recon.on_page(page))

    async def _inspect(self, prediction_id: str) -> None:
        run = self.run
        try:
            prediction = await self.grants.call("reconcile", run.client.get(prediction_id, kind="reconcile"))
        except NotFound:
            run.ok()
            self.settle(self.recon.on_prediction(prediction_id, None))
            return
        except ApiError as exc:
            if isinstance(exc, AuthError):
                run.fatal = exc
                return
            run.failed(exc)
            self._listing_failed(exc, self.recon.on_inspect_failed(prediction_id))
            return
        run.ok()
        self.settle(self.recon.on_prediction(prediction_id, prediction.input), prediction)

    def _listing_failed(self, exc: ApiError, outcome: Outcome | None) -> None:
        """A request of a sweep failed: back off before the doubts' next try; say so of doubts given up."""
        if outcome is not None and outcome.unresolved:
            # The listing is down: until it answers again, one failed try settles a doubt (one request, no wait).
            self.recon.tries = 1
            self.failures = 0
            log.warning(
                "the executions listing failed (%s): %d create(s) in doubt will be made again, possibly paid twice",
                exc,
                len(outcome.unresolved),
            )
        else:
            self.failures += 1
            # Timed like the looks (--reconcile-wait / 4: 0.5, 1, 2, 4, 8 s by default), not like other retries.
            config = self.run.config
            self.paused_until = self.run.now() + retry_delay(
                self.failures, exc.retry_after, base=config.reconcile_wait / 4, cap=config.retry_cap, rng=self.run.rng
            )
        self.settle(outcome)

    def settle(self, outcome: Outcome | None, seen: Prediction | None = None) -> None:
        """Carry out what the listing decided for creates in doubt."""
        if outcome is None:
            return
        run = self.run
        now, wall_now = run.now(), run.wall()
        for doubt, prediction_id in outcome.adopted:
            self._adopted(doubt, prediction_id, now, now - (wall_now - doubt.sent_at), seen)
        for doubt in outcome.not_created:
            job = self.jobs.pop(doubt.fingerprint, None)
            run.ledger.append(NOT_CREATED, job=doubt.job_id, fingerprint=doubt.fingerprint)
            st = job_state(run.state, doubt.job_id, doubt.fingerprint)
            st.doubt_open = False
            if st.status is JobStatus.IN_DOUBT:
                st.status = JobStatus.PENDING
            run.counters.not_created += 1
            run.gate.release()
            if job is not None:
                self._create_again(job)
        for doubt in outcome.unresolved:
            job = self.jobs.pop(doubt.fingerprint, None)
            # Today's policy: created again, and counted; its slot is held as long as its prediction would take.
            run.counters.lost_answers += 1
            run.hold_slot(now + run.doubt_hold())
            if job is not None:
                self._create_again(job)
        run.wake.set()

    def _adopted(
        self, doubt: Doubt, prediction_id: str, now: float, created_at: float, seen: Prediction | None
    ) -> None:
        run = self.run
        job = self.jobs.pop(doubt.fingerprint, None)
        run.ledger.append(RECOVERED, job=doubt.job_id, fingerprint=doubt.fingerprint, prediction_id=prediction_id)
        st = job_state(run.state, doubt.job_id, doubt.fingerprint)
        st.status, st.prediction_id, st.doubt_open = JobStatus.IN_FLIGHT, prediction_id, False
        st.recovered += 1
        run.counters.recovered += 1
        log.info(
            "job %s: the create in doubt made prediction %s: watching it, nothing paid again",
            doubt.job_id,
            prediction_id,
        )
        flight = Flight(
            job_id=doubt.job_id,
            fingerprint=doubt.fingerprint,
            prediction_id=prediction_id,
            created_at=created_at,
            job=job,
            next_poll_at=now,
            resumed=True,
            attempt=(st.attempts or 0) + 1,
        )
        # The doubt's slot passes to the prediction.
        self._adopt(flight, seen if seen is not None and seen.id == prediction_id else None)
