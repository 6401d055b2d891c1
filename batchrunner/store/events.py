"""The words of the ledger: the events its lines name, and what each carries.

Jobs are keyed by their fingerprint (sha256 of the full request), never by their position in the manifest, so
editing the manifest between runs neither loses nor confuses finished work.

Job events (each also carries ``ts``, ``event``, ``job`` and ``fingerprint``) and the state they lead to::

    submitting     {attempt, request_id}              -> IN_DOUBT   intent, written before the create is sent
    submitted      {prediction_id}                    -> IN_FLIGHT  the create's answer
    create_failed  {error, in_doubt}                  -> PENDING    a create that did not answer with an id
    recovered      {prediction_id}                    -> IN_FLIGHT  an in-doubt create did make this prediction
    not_created    {}                                 -> PENDING    an in-doubt create made nothing (listing searched)
    succeeded      {file, prediction_id?, cost?, duration?}   -> SUCCEEDED
    failed         {error, retryable, error_code?, prediction_id?, cost?, duration?, still_running?}
                                                      -> FAILED, attempts + 1
    reset          {}                                 attempts = 0; FAILED -> PENDING

``uploaded {sha256, public_url, file, id}`` records an uploaded input image (``id``: the API's file id, for a later
``DELETE /v1/files/{id}``); ``upload_deleted {sha256, id}`` records that ``clean-uploads`` deleted it, so a later run
uploads the image again instead of reusing a URL that now answers 404. ``run_started``, ``run_finished`` and any
event this version does not know are ignored, so an older runner can resume a newer runner's ledger.

``ledger.py`` writes them; ``replay.py`` folds them into that state.
"""

from __future__ import annotations

__all__ = [
    "CREATE_FAILED",
    "FAILED",
    "JOB_EVENTS",
    "NOT_CREATED",
    "RECOVERED",
    "RESET",
    "RUN_FINISHED",
    "RUN_STARTED",
    "SUBMITTED",
    "SUBMITTING",
    "SUCCEEDED",
    "UPLOADED",
    "UPLOAD_DELETED",
]

SUBMITTING = "submitting"
SUBMITTED = "submitted"
CREATE_FAILED = "create_failed"
RECOVERED = "recovered"
NOT_CREATED = "not_created"
SUCCEEDED = "succeeded"
FAILED = "failed"
RESET = "reset"
UPLOADED = "uploaded"
UPLOAD_DELETED = "upload_deleted"
RUN_STARTED = "run_started"
RUN_FINISHED = "run_finished"

# The events that move one job (the others record uploads or mark runs).
JOB_EVENTS = frozenset({SUBMITTING, SUBMITTED, CREATE_FAILED, SUCCEEDED, FAILED, RESET, RECOVERED, NOT_CREATED})
