"""The API's answers read into records: a prediction's status, outputs and failure envelope, the executions listing,
a presign, a created prediction's id, a model's input schema.

Pure: a JSON object in, a frozen record out (or ServerError when an answer lacks what makes it one). Sources disagree
on status words and field names, so every documented variant is read; oddly typed or missing fields are tolerated
where a safe reading exists. Messages quote answers only through ``snippet`` (redact.py), so the key never shows.
"""

from __future__ import annotations

import json
import math
import types
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from batchrunner.api.redact import snippet
from batchrunner.errors import ServerError

__all__ = [
    "TRANSIENT_ERROR_CODES",
    "Execution",
    "ExecutionsPage",
    "Phase",
    "Prediction",
    "Presigned",
    "classify_status",
    "created_id",
    "http_url",
    "output_urls",
    "parse_execution",
    "parse_executions_page",
    "parse_prediction",
    "parse_presign",
    "request_schema",
    "text",
]

# Failure codes that say nothing about the job itself: the provider or the API was busy or slow, so the same
# input is worth a new prediction after a backoff. They decide only when a failure envelope has no ``retryable``
# ("branch on retryable, never on a set of codes you maintain"). Anything else (INPUT_DOWNLOAD_ERROR, content
# policy, bad input) would fail again the same way and must not burn credit on repeats.
TRANSIENT_ERROR_CODES: frozenset[str] = frozenset(
    {
        "PROVIDER_RATE_LIMIT",
        "PROVIDER_SERVER_ERROR",
        "NETWORK_ERROR",
        "EXECUTION_TIMEOUT",
        "PROVIDER_TIMEOUT",
        "PROVIDER_UNAVAILABLE",
        "RATE_LIMIT",
        "TIMEOUT",
        "INTERNAL_ERROR",
    }
)


class Phase(StrEnum):
    """Where a prediction stands, folded from the API's (inconsistently documented) status words."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


_SUCCEEDED_WORDS = frozenset({"success", "succeeded"})
_CANCELLED_WORDS = frozenset({"cancelled", "canceled"})
_FAILED_WORDS = frozenset({"error", "failed"}) | _CANCELLED_WORDS


def classify_status(status: object) -> Phase:
    """Fold a status word into a Phase. Unknown words and non-strings count as still running.

    Sources disagree on the words (``error`` vs ``failed``, ``succeeded`` in webhooks), so every documented
    variant is accepted; an unknown word must not end a paid prediction early, the poll deadline does that.
    """
    if not isinstance(status, str):
        return Phase.RUNNING
    word = status.strip().lower()
    if word in _SUCCEEDED_WORDS:
        return Phase.SUCCEEDED
    if word in _FAILED_WORDS:
        return Phase.FAILED
    return Phase.RUNNING


_URL_KEYS = ("url", "image", "images", "output", "uri", "file")
# Top container plus nested ones, e.g. {"images": [{"url": ...}]}; deeper ones are not outputs we know of.
_MAX_URL_DEPTH = 3


def _as_url(value: str) -> str | None:
    text = value.strip()
    if not text.lower().startswith(("http://", "https://")) or any(c.isspace() for c in text):
        return None
    return text if urllib.parse.urlsplit(text).netloc else None


def _collect_urls(value: object, depth: int, found: list[str]) -> None:
    if isinstance(value, str):
        url = _as_url(value)
        if url is not None:
            found.append(url)
        return
    if depth >= _MAX_URL_DEPTH:
        return
    if isinstance(value, list | tuple):
        for item in value:
            _collect_urls(item, depth + 1, found)
    elif isinstance(value, Mapping):
        for key in _URL_KEYS:
            if key in value:
                _collect_urls(value[key], depth + 1, found)
        for key, item in value.items():
            if key not in _URL_KEYS:
                _collect_urls(item, depth + 1, found)


def output_urls(output: object) -> tuple[str, ...]:
    """The http(s) URLs in a prediction's output, in order, without duplicates.

    The output may be one URL string, a list of strings or objects, or an object; in objects the usual keys
    (url, image, images, output, uri, file) come first, then any other URL-valued fields.
    """
    found: list[str] = []
    _collect_urls(output, 0, found)
    return tuple(dict.fromkeys(found))


@dataclass(frozen=True, slots=True)
class Prediction:
    """One answer of ``GET /v1/prediction/{id}``, reduced to what the scheduler decides on."""

    id: str
    status: str
    phase: Phase
    urls: tuple[str, ...]
    error: str | None
    error_code: str | None
    retryable: bool
    cost: float | None
    predict_time: float | None
    error_message: str | None = None  # the envelope's own ``error_message``, kept in the ledger as written
    error_category: str | None = None  # the envelope's ``classification.category``
    input: Mapping[str, Any] | None = None  # the prediction's input as the API holds it (for reconciliation)


def text(value: object) -> str | None:
    """``value`` stripped when it is a non-empty string, else None."""
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _last_log_line(logs: object) -> str | None:
    if isinstance(logs, list):
        logs = "\n".join(item for item in logs if isinstance(item, str))
    if not isinstance(logs, str):
        return None
    lines = [line.strip() for line in logs.splitlines() if line.strip()]
    return lines[-1] if lines else None


def parse_prediction(prediction_id: str, body: Mapping[str, Any]) -> Prediction:
    """Read a prediction answer, tolerating missing or oddly typed fields.

    ``urls`` are filled only for a success. For failures ``error`` is the envelope's ``error_message``, else
    its ``error`` (a dispatch failure writes only that), else the body's ``error``, else the last non-empty
    log line. ``retryable`` is the envelope's own ``retryable`` when it is a boolean; without one, True for a
    transient ``error_code``. A cancelled prediction is retryable (the runner cancels a prediction that
    overstays its deadline, so the cancel says nothing about the job).
    """
    raw_status = body.get("status")
    status = raw_status.strip() if isinstance(raw_status, str) else ""
    phase = classify_status(status)
    output = body.get("output")
    out_fields: Mapping[str, Any] = output if isinstance(output, Mapping) else {}
    metrics = body.get("metrics")
    metric_fields: Mapping[str, Any] = metrics if isinstance(metrics, Mapping) else {}

    error: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    category: str | None = None
    retryable = False
    if phase is Phase.FAILED:
        error_code = text(out_fields.get("error_code")) or text(body.get("error_code"))
        error_message = text(out_fields.get("error_message"))
        classification = out_fields.get("classification")
        if isinstance(classification, Mapping):
            category = text(classification.get("category"))
        error = (
            error_message
            or text(out_fields.get("error"))
            or text(body.get("error"))
            or _last_log_line(body.get("logs"))
            or f"prediction ended with status {status!r}"
        )
        said = out_fields.get("retryable")
        if status.lower() in _CANCELLED_WORDS:
            retryable = True
        elif isinstance(said, bool):
            retryable = said
        else:
            retryable = error_code in TRANSIENT_ERROR_CODES
    raw_input = body.get("input")

    return Prediction(
        id=text(body.get("id")) or prediction_id,
        status=status,
        phase=phase,
        urls=output_urls(output) if phase is Phase.SUCCEEDED else (),
        error=error,
        error_code=error_code,
        retryable=retryable,
        cost=_number(metric_fields.get("cost")),
        predict_time=_number(metric_fields.get("predict_time")),
        error_message=error_message,
        error_category=category,
        input=types.MappingProxyType(dict(raw_input)) if isinstance(raw_input, Mapping) else None,
    )


# Not frozen: a frozen dataclass's __init__ costs twice as much, and a page's rows are made by the hundred per round.
@dataclass(slots=True)
class Execution:
    """One row of ``GET /v1/executions``: a prediction of the account's, without its input.

    ``prediction`` reads the row as a GET of the prediction would be read: its status, its output URLs on success, its
    failure envelope, and the server's ``execution_cost`` and ``run_time`` as cost and predict time.
    """

    id: str
    model: str | None
    status: str
    created_at: float | None  # epoch seconds; None when the row's time is missing or unreadable
    raw: Mapping[str, Any] | None = None

    @property
    def prediction(self) -> Prediction | None:
        """The row read as a GET of the prediction (read on demand: most rows of a page are not ours)."""
        row = self.raw
        if row is None:
            return None
        as_prediction = {
            "id": self.id,
            "status": row.get("status"),
            "output": row.get("output"),
            "metrics": {"cost": row.get("execution_cost"), "predict_time": row.get("run_time")},
        }
        return parse_prediction(self.id, as_prediction)


@dataclass(frozen=True, slots=True)
class ExecutionsPage:
    """One page of the executions listing; ``full`` when it holds ``limit`` rows (there may be more)."""

    rows: tuple[Execution, ...]
    full: bool


def _parse_epoch(value: str) -> float | None:
    text = value.strip()
    if not text:
        return None
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


# A prediction's ``created_at`` comes back in every listing round while it runs (twenty rounds and more at a large
# account's limits): each text is read once, then looked up. Cleared whole when full, so it stays bounded.
_EPOCHS: dict[str, float | None] = {}
_EPOCHS_MAX = 1 << 16


def _epoch(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return _EPOCHS[value]
    except KeyError:
        pass
    if len(_EPOCHS) >= _EPOCHS_MAX:
        _EPOCHS.clear()
    moment = _EPOCHS[value] = _parse_epoch(value)
    return moment


def parse_execution(row: Mapping[str, Any]) -> Execution | None:
    """Read a listing row; None when it has no usable id (a row we cannot act on)."""
    raw_id = row.get("id")
    if type(raw_id) is str:  # the common case first: a row per prediction per round, the most read answer there is
        row_id = raw_id.strip()
    elif isinstance(raw_id, int) and not isinstance(raw_id, bool):
        row_id = str(raw_id)
    else:
        return None
    if not row_id:
        return None
    raw_status = row.get("status")
    return Execution(
        id=row_id,
        model=text(row.get("model")) or text(row.get("requested_model")),
        status=raw_status.strip() if isinstance(raw_status, str) else "",
        created_at=_epoch(row.get("created_at")),
        raw=row,
    )


@dataclass(frozen=True, slots=True)
class Presigned:
    """Where to PUT a local file, and the URL the model will read it from afterwards."""

    id: str
    presigned_url: str
    public_url: str
    expires_at: str | None
    required_headers: Mapping[str, str]
    # The content type sent to presign: the storage host checks the PUT's Content-Type against it, and the documented
    # ``required_headers`` (which may be empty) do not carry it.
    content_type: str = "application/octet-stream"


def http_url(url: str) -> bool:
    """Whether ``url`` is http(s) with a host."""
    parts = urllib.parse.urlsplit(url)
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)


def parse_executions_page(body: Mapping[str, Any], limit: int, secret: str) -> ExecutionsPage:
    """Read a page of ``GET /v1/executions`` asked for ``limit`` rows; ServerError when it has no list of rows."""
    raw = body.get("executions")
    if raw is None:
        raw = body.get("data", body.get("items"))
    if not isinstance(raw, list):
        fields = snippet(", ".join(sorted(body)), secret) or "none"
        raise ServerError(f"executions answer has no list of rows (fields: {fields})")
    rows = tuple(row for item in raw if isinstance(item, Mapping) and (row := parse_execution(item)) is not None)
    return ExecutionsPage(rows=rows, full=len(raw) >= limit)


def parse_presign(body: Mapping[str, Any], content_type: str, secret: str) -> Presigned:
    """Read a presign answer for a file of ``content_type``; ServerError when it lacks what an upload needs."""
    upload_id = text(body.get("id"))
    presigned_url = text(body.get("presigned_url"))
    public_url = text(body.get("public_url"))
    raw_headers = body.get("required_headers")
    if raw_headers is None:
        raw_headers = {}
    if (
        upload_id is None
        or presigned_url is None
        or public_url is None
        or not http_url(presigned_url)
        or not http_url(public_url)
        or not isinstance(raw_headers, Mapping)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw_headers.items())
    ):
        fields = snippet(", ".join(sorted(body)), secret) or "none"
        raise ServerError(f"presign answer lacks id, presigned_url, public_url or headers (fields: {fields})")
    expires_at = body.get("expires_at")
    return Presigned(
        id=upload_id,
        presigned_url=presigned_url,
        public_url=public_url,
        expires_at=str(expires_at) if expires_at is not None else None,
        required_headers=types.MappingProxyType(dict(raw_headers)),
        content_type=content_type,
    )


def created_id(body: Mapping[str, Any], secret: str) -> str:
    """The prediction id of a create's 2xx answer; ServerError (status 200) when it names none."""
    for key in ("predictionID", "prediction_id", "id"):
        value = body.get(key)
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value).strip():
            return str(value).strip()
    said = text(body.get("message")) or json.dumps(body)
    # A 2xx without an id: the prediction may exist all the same (the scheduler counts a lost answer).
    raise ServerError(f"create answer has no prediction id: {snippet(said, secret)}", status=200)


def request_schema(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The JSON Schema of a model's ``input`` in a ``GET /v1/model`` answer, or None when it gives none."""
    for holder in (body, body.get("model"), body.get("data")):
        if not isinstance(holder, Mapping):
            continue
        schema = holder.get("request_schema")
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError:
                schema = None
        if isinstance(schema, Mapping):
            return schema
    return None
