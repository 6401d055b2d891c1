"""The local input images of a run: which to upload, their uploads, and how a job's request carries its image.

Each distinct image is uploaded once, by the sha256 of its content, whatever its paths; an upload a ledger recorded is
reused while it is fresh (``UPLOAD_TTL``). An upload is a presign (an API request, counted and windowed like any
other: the scheduler's dispatcher starts it and passes its counting ``call``) and then a PUT to the storage host. It is
recorded in the ledger before any job may use it. A job whose image cannot be uploaded within ``MAX_UPLOAD_TRIES``
waits for the next run. With ``inline_images`` nothing is uploaded: each request carries its image as a data URI.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import mimetypes
import random
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

from batchrunner.api.client import Client, Presigned
from batchrunner.engine.policy import retry_delay
from batchrunner.engine.runstate import RunConfig
from batchrunner.errors import ApiError, InputImageError
from batchrunner.manifest import Job
from batchrunner.store.ledger import UPLOADED, Ledger, Upload
from batchrunner.store.output import describe_os_error, read_bytes

log = logging.getLogger("batchrunner")
T = TypeVar("T")

# Attempts at uploading one input image within one run; after that its jobs wait for the next run.
MAX_UPLOAD_TRIES = 5
# Uploads in progress at once (each is a presign request to the API, then a PUT to the storage host).
MAX_PARALLEL_UPLOADS = 4
# How long an upload recorded in the ledger is trusted, and how long the API is asked to keep it (a presign's
# ``expires_in_seconds``, instead of the 180-day default). A file the API lost anyway (or one reused near the end of
# its month) fails its job with INPUT_DOWNLOAD_ERROR, which makes us upload again.
UPLOAD_TTL = 30 * 86400.0


class Call(Protocol):
    """Counts one API request of ``kind`` and awaits it (the scheduler's ``_call``)."""

    def __call__(self, kind: str, request: Awaitable[T], /) -> Awaitable[T]: ...


def data_uri(data: bytes, path_name: str) -> str:
    """A base64 data URI for a local image (the inline path, until uploads replace it)."""
    mime = mimetypes.guess_type(path_name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


class Uploads:
    """The upload queue and what is uploaded, by sha256 of the content; owned by the scheduler, one per run."""

    def __init__(
        self,
        config: RunConfig,
        ledger: Ledger,
        content_types: Mapping[str, str] | None,
        *,
        rng: random.Random,
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.content_types: Mapping[str, str] = content_types or {}
        self._rng = rng
        self._clock = clock
        self.uploaded: dict[str, str] = {}  # sha256 -> public_url
        self.fresh: set[str] = set()  # uploaded by this run
        self.stale_urls: set[str] = set()  # uploads the API could not fetch this run, forgotten (renewed since)
        self.queue: deque[str] = deque()
        self.uploading: set[str] = set()
        self.tries: dict[str, int] = {}
        self.retry_at: dict[str, float] = {}
        self.paths: dict[str, Path] = {}
        self.blocked: list[Job] = []  # jobs whose image could not be uploaded this run
        self._data_uris: dict[str, str] = {}

    # ----------------------------------------------------------------------------------------------- decisions
    def plan(self, recorded: Mapping[str, Upload], ready: Iterable[Job], wall_now: float) -> None:
        """Queue each distinct local image pending jobs need, in the order of its first job; reuse fresh uploads."""
        for digest, upload in recorded.items():
            if wall_now - upload.uploaded_at < UPLOAD_TTL:
                self.uploaded[digest] = upload.public_url
        if self.config.inline_images:
            return
        queued: set[str] = set()
        for job in ready:
            sha = job.image_sha256
            if job.image_path is None or sha is None or sha in self.uploaded or sha in queued:
                continue
            queued.add(sha)
            self.paths[sha] = job.image_path
            self.queue.append(sha)

    def ready_for(self, job: Job) -> bool:
        """Whether the job's input image is usable in a create (uploaded, inline, or none)."""
        return (
            self.config.inline_images
            or job.image_path is None
            or job.image_sha256 is None
            or job.image_sha256 in self.uploaded
        )

    def next_due(self, now: float, soonest: Callable[[float], None]) -> str | None:
        """The first queued image whose retry time has come, if an upload may start; else tells ``soonest`` when."""
        if len(self.uploading) >= MAX_PARALLEL_UPLOADS:
            return None
        for sha in self.queue:
            at = self.retry_at.get(sha, 0.0)
            if at <= now:
                return sha
            soonest(at)
        return None

    def start(self, sha: str) -> None:
        self.queue.remove(sha)
        self.uploading.add(sha)

    def retry_later(self, sha: str, exc: ApiError) -> bool:
        """Count a failed upload and queue it again after a wait; False when it has had its tries."""
        path = self.paths[sha]
        tries = self.tries.get(sha, 0) + 1
        self.tries[sha] = tries
        if tries >= MAX_UPLOAD_TRIES:
            log.error("upload of %s failed %d times (%s); its jobs wait for the next run", path, tries, exc)
            return False
        log.warning("upload of %s failed (%s); trying again", path, exc)
        wait = retry_delay(
            tries, exc.retry_after, base=self.config.retry_base, cap=self.config.retry_cap, rng=self._rng
        )
        self.retry_at[sha] = self._clock() + wait
        self.queue.append(sha)
        return True

    def block(self, sha: str, ready: Iterable[Job]) -> deque[Job]:
        """Set aside the ready jobs that need image ``sha`` (for this run); returns the jobs left ready."""
        keep: deque[Job] = deque()
        for job in ready:
            (self.blocked if job.image_sha256 == sha else keep).append(job)
        return keep

    def forget_stale(self, job: Job, sent: str | None = None) -> bool:
        """The API could not fetch the job's image: if an earlier run uploaded it, queue it again and say so.

        That upload expired or was lost, so the job deserves another try. An upload made by this run that fails so is
        a real input problem: False, no second try. ``sent`` is the ``input_image`` the failed prediction was given,
        when known: one already found stale (by another job's failure; the jobs of one image fail together) also
        deserves another try, with the upload that replaces it.
        """
        sha = job.image_sha256
        if sha is None:
            return False
        if sent is not None and sent in self.stale_urls:
            return True
        if sha not in self.uploaded or sha in self.fresh:
            return False
        self.stale_urls.add(self.uploaded.pop(sha))
        if sha not in self.queue and sha not in self.uploading:
            self.paths[sha] = job.image_path or self.paths[sha]
            self.queue.append(sha)
        return True

    def api_input(self, job: Job) -> dict[str, Any]:
        """The create request's input: the job's, with its image as the uploaded URL or a data URI (reads the file)."""
        body = dict(job.input)
        if job.image_path is not None and job.image_sha256 is not None and not self.config.inline_images:
            body["input_image"] = self.uploaded[job.image_sha256]
        elif job.image_path is not None and job.image_sha256 is not None:
            uri = self._data_uris.get(job.image_sha256)
            if uri is None:
                uri = data_uri(read_bytes(job.image_path), job.image_path.name)
                if len(self._data_uris) >= 8:  # a few recent images: a matrix usually repeats one image many times
                    self._data_uris.pop(next(iter(self._data_uris)))
                self._data_uris[job.image_sha256] = uri
            body["input_image"] = uri
        return body

    # ----------------------------------------------------------------------------------------------- I/O
    async def send(self, sha: str, client: Client, call: Call) -> Presigned:
        """Presign (an API request, made through ``call``), then PUT the bytes to the storage host.

        An ApiError ends the upload (it is no longer in progress) and is raised for the scheduler to account for.
        """
        path = self.paths[sha]
        content_type = self.content_types.get(sha) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        try:
            # The stored file is kept as long as the runner reuses it, not the API's 180-day default: the public URL is
            # "readable by anyone who has the link".
            presigned = await call("presign", client.presign(content_type, file_type="image", expires_in=UPLOAD_TTL))
            try:
                data = await asyncio.to_thread(read_bytes, path)
            except OSError as exc:
                raise InputImageError(f"cannot read: {describe_os_error(exc)}", file=str(path)) from exc
            await client.put_upload(presigned, data)
        except ApiError:
            self.uploading.discard(sha)
            raise
        return presigned

    def record(self, sha: str, presigned: Presigned) -> None:
        """Write the upload to the ledger; only then may jobs use it."""
        self.uploading.discard(sha)
        self.ledger.append(
            UPLOADED, sha256=sha, public_url=presigned.public_url, file=self.paths[sha].name, id=presigned.id
        )
        self.uploaded[sha] = presigned.public_url
        self.fresh.add(sha)
