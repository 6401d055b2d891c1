"""``clean-uploads``: delete a batch's uploaded input images from the API's storage once no job needs them.

A presigned upload's ``public_url`` "is readable by anyone who has the link" for as long as the API keeps the file.
Once every job of the manifest that uses an image is done (its image on disk) or failed for good, the file serves
nothing: ``DELETE /v1/files/{id}`` removes it, and an ``upload_deleted`` event in the ledger makes a later run (a
``retry``, say) upload the image again instead of sending a URL that now answers 404.

The decision is pure (:func:`plan_cleanup`, from the manifest and the replayed ledger); :func:`clean_uploads` is the
thin loop that sends the deletes, one at a time and within the rate limit, under the output folder's lock.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from batchrunner.api.client import Client
from batchrunner.api.redact import Redactor
from batchrunner.engine.runstate import classify
from batchrunner.errors import ApiError, AuthError, TransientError
from batchrunner.manifest import Manifest
from batchrunner.store.ledger import UPLOAD_DELETED, Ledger, LedgerState, read_ledger
from batchrunner.store.output import OutputDir, RunLock

__all__ = ["Cleanup", "CleanupResult", "Verdict", "clean_uploads", "plan_cleanup"]

_FINISHED = frozenset({"done", "failed"})


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with one recorded upload: ``delete``, ``keep`` (jobs still need it) or ``unknown`` (no file id)."""

    sha256: str
    action: str
    file_id: str | None
    name: str  # the local file's name (or the start of its sha256), for people
    waiting: tuple[str, ...] = ()  # ids of the jobs that still need it


@dataclass(frozen=True, slots=True)
class Cleanup:
    verdicts: tuple[Verdict, ...]

    def of(self, action: str) -> list[Verdict]:
        return [v for v in self.verdicts if v.action == action]


def plan_cleanup(manifest: Manifest, state: LedgerState, out: OutputDir, *, max_attempts: int) -> Cleanup:
    """Each upload the ledger holds, judged by the jobs of the manifest that use its image.

    An upload is deleted only when every such job is done (its image on disk) or failed for good; a job pending, in
    flight or in doubt still needs it (a create in doubt is matched by its input URL). An upload no job of the
    manifest uses any more is the batch's leftover: deleted too.
    """
    waiting: dict[str, list[str]] = {}
    for job in manifest.jobs:
        if job.image_sha256 is None or job.image_path is None:
            continue
        st = state.jobs.get(job.fingerprint)
        present = st is not None and out.has_file(st.file)
        if classify(st, file_present=present, max_attempts=max_attempts) not in _FINISHED:
            waiting.setdefault(job.image_sha256, []).append(job.id)
    verdicts = []
    for sha, upload in state.uploads.items():
        name = upload.file or sha[:12]
        if upload.id is None:
            verdicts.append(Verdict(sha, "unknown", None, name))
        elif sha in waiting:
            verdicts.append(Verdict(sha, "keep", upload.id, name, tuple(waiting[sha])))
        else:
            verdicts.append(Verdict(sha, "delete", upload.id, name))
    return Cleanup(tuple(verdicts))


@dataclass(slots=True)
class CleanupResult:
    deleted: list[Verdict] = field(default_factory=list)
    gone: list[Verdict] = field(default_factory=list)  # the API no longer had it (404): recorded as deleted too
    failed: list[tuple[Verdict, ApiError]] = field(default_factory=list)
    stopped: ApiError | None = None  # a bad key or a busy API ended the deletes early


class _Pace:
    """At most ``count`` requests in any ``period`` seconds: the wait before the next one (sent in turn)."""

    def __init__(self, count: int, period: float, clock: Callable[[], float]) -> None:
        self.count, self.period, self.clock = count, period, clock
        self.sent: deque[float] = deque()

    def delay(self) -> float:
        now = self.clock()
        while self.sent and self.sent[0] <= now - self.period:
            self.sent.popleft()
        return 0.0 if len(self.sent) < self.count else self.sent[0] + self.period - now

    def record(self) -> None:
        self.sent.append(self.clock())


async def clean_uploads(
    manifest: Manifest,
    out: OutputDir,
    *,
    max_attempts: int,
    base_url: str,
    api_key: str,
    request_timeout: float,
    rate: tuple[int, float],
    clock: Callable[[], float] = time.monotonic,
) -> tuple[Cleanup, CleanupResult]:
    """Delete the uploads no job needs any more, each recorded in the ledger as it is done.

    Under the output folder's lock (a run holding it ends this with LockHeld), and judged from the ledger read under
    it, so no run can start using an upload while it is deleted.
    """
    result = CleanupResult()
    pace = _Pace(*rate, clock)
    with RunLock(out.lock), Ledger(out.ledger, redact=Redactor(api_key)) as ledger:
        cleanup = plan_cleanup(manifest, read_ledger(out.ledger), out, max_attempts=max_attempts)
        todo = cleanup.of("delete")
        async with aiohttp.ClientSession() as session:
            client = Client(session, base_url=base_url, api_key=api_key, timeout=request_timeout)
            for verdict in todo:
                wait = pace.delay()
                if wait > 0:
                    await asyncio.sleep(wait)
                pace.record()
                try:
                    existed = await client.delete_file(verdict.file_id or "")
                except (AuthError, TransientError) as exc:
                    result.stopped = exc
                    break
                except ApiError as exc:
                    result.failed.append((verdict, exc))
                    continue
                ledger.append(UPLOAD_DELETED, sha256=verdict.sha256, id=verdict.file_id, file=verdict.name)
                (result.deleted if existed else result.gone).append(verdict)
    return cleanup, result
