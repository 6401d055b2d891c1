"""The state of one simulated prediction on the injected clock, and what a GET of it shows.

Pure: a prediction is a record of what was decided at its creation (duration, outcome, shape) plus what was
done to it since (a cancel); its status, output and metrics are functions of the clock reading passed in.

A failed prediction's ``output`` takes one of the shapes the API has used: the documented envelope
(``{"error": "Execution failed", "error_code", "error_message", "retryable", "classification": {"category"},
"status": "ERROR", "success": false}``), a dispatch failure's bare ``{"error": ...}``, or nothing at all with
the reason only in ``logs`` (older predictions).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

__all__ = [
    "COST_PER_IMAGE",
    "Outcome",
    "Prediction",
    "failure_envelope",
    "failure_output",
    "paid_twice",
    "shaped_output",
]

COST_PER_IMAGE: Final = 0.08
_TRACEBACK: Final = "Traceback (most recent call last):\n  ...\nRuntimeError: CUDA out of memory"


class Outcome(StrEnum):
    """How a prediction ends when nothing stops it."""

    SUCCESS = "success"
    FAILURE = "failure"  # generic: rotates envelope / dispatch-only / logs-only
    PROVIDER_RATE_LIMIT = "provider_rate_limit"
    INPUT_ERROR = "input_error"
    RETRYABLE_FAILURE = "retryable_failure"  # a code not thought transient, marked retryable
    UNMARKED_TRANSIENT = "unmarked_transient"  # an envelope without ``retryable``, its code a transient one
    DISPATCH_FAILURE = "dispatch_failure"  # never ran: ``output`` is a lone ``{"error": ...}``


def failure_envelope(code: str, message: str, *, retryable: bool, category: str) -> dict[str, Any]:
    """The documented ``output`` of a failed prediction."""
    return {
        "error": "Execution failed",
        "error_code": code,
        "error_message": message,
        "retryable": retryable,
        "classification": {"category": category},
        "status": "ERROR",
        "success": False,
    }


def failure_output(outcome: Outcome, seq: int, reason: str = "") -> tuple[Any, str | None]:
    """The (``output``, ``logs``) of a prediction that failed with ``outcome``; ``seq`` rotates the shapes."""
    if outcome is Outcome.PROVIDER_RATE_LIMIT:
        message = "The model provider is rate limiting requests, please try again later"
        envelope = failure_envelope("PROVIDER_RATE_LIMIT", message, retryable=True, category="RATE_LIMIT")
        return envelope, f"Error: {message}"
    if outcome is Outcome.INPUT_ERROR:
        message = f"Could not download input_image: {reason}"
        return failure_envelope("INPUT_DOWNLOAD_ERROR", message, retryable=False, category="INPUT"), f"Error: {message}"
    if outcome is Outcome.RETRYABLE_FAILURE:
        # Codes a client might keep a list of as permanent: only ``retryable`` says to try again.
        if seq % 2 == 0:
            message = "The model provider answered 500 Internal Server Error"
            envelope = failure_envelope("PROVIDER_SERVER_ERROR", message, retryable=True, category="PROVIDER")
        else:
            message = "Connection to the model provider was reset"
            envelope = failure_envelope("NETWORK_ERROR", message, retryable=True, category="NETWORK")
        return envelope, f"Error: {message}"
    if outcome is Outcome.UNMARKED_TRANSIENT:
        # An envelope that predates ``retryable`` (or leaves it out): only its code says to try again.
        message = "The model provider did not answer in time"
        envelope = failure_envelope("EXECUTION_TIMEOUT", message, retryable=False, category="PROVIDER")
        del envelope["retryable"]
        return envelope, f"Error: {message}"
    if outcome is Outcome.DISPATCH_FAILURE:
        return {"error": "Failed to dispatch prediction to the model provider"}, None
    if outcome is Outcome.FAILURE:
        shape = seq % 3
        if shape == 0:
            message = "The model provider returned an error"
            return failure_envelope("PROVIDER_FAILED", message, retryable=False, category="PROVIDER"), _TRACEBACK
        if shape == 1:
            # A dispatch failure never ran: it writes only the error, and no logs.
            return {"error": "Failed to dispatch prediction to the model provider"}, None
        return None, _TRACEBACK
    raise ValueError(f"{outcome} is not a failure")


def shaped_output(url: str, shape: str) -> Any:
    """The ``output`` of a successful prediction carrying ``url`` as a string, a list or an object."""
    if shape == "list":
        return [url]
    if shape == "object":
        return {"image": url}
    return url


@dataclass(slots=True)
class Prediction:
    """One prediction: what was decided when it was created, and whether a cancel stopped it."""

    id: str
    model: str
    input: dict[str, Any]
    key: str  # input_key(model, input): predictions of the same request share it
    seq: int  # creation order; also rotates the shape of generic failures
    created_at: float
    duration: float
    finish_at: float  # math.inf for never_finish
    outcome: Outcome
    early_status: str  # "created" or "starting", shown for the first quarter of the duration
    shape: str
    failed_word: str
    reason: str = ""
    cancel_requested_at: float | None = None  # a cancel arrived (it may have been record-only)
    stopped_at: float | None = None  # the cancel really stopped it
    withhold_output: bool = False  # the next GET that sees its success shows ``output: ""``

    @property
    def started_at(self) -> float:
        """When it leaves ``created``/``starting`` for ``processing`` (if nothing stops it first)."""
        return self.created_at + self.duration / 4

    def status(self, now: float) -> str:
        if self.stopped_at is not None:
            return "cancelled"
        if now >= self.finish_at:
            return "success" if self.outcome is Outcome.SUCCESS else self.failed_word
        if now < self.started_at:
            return self.early_status
        return "processing"

    def is_terminal(self, now: float) -> bool:
        return self.stopped_at is not None or now >= self.finish_at

    def completed_at(self, now: float) -> float | None:
        """When it ended (finished or was stopped), or None while it runs."""
        if self.stopped_at is not None:
            return self.stopped_at
        return self.finish_at if now >= self.finish_at else None

    def is_payment(self, now: float) -> bool:
        """Whether it is (or may still become) a billed result: neither failed nor stopped by a cancel."""
        return self.stopped_at is None and not (now >= self.finish_at and self.outcome is not Outcome.SUCCESS)

    def output(self, now: float, base_url: str) -> Any:
        """The ``output`` a GET shows now (before any withholding of a first success)."""
        if self.stopped_at is None and now >= self.finish_at:
            if self.outcome is Outcome.SUCCESS:
                return shaped_output(f"{base_url}/outputs/{self.id}.png", self.shape)
            return failure_output(self.outcome, self.seq, self.reason)[0]
        if self.status(now) in ("created", "starting"):
            return ""
        return None

    def primary_output(self, now: float, base_url: str) -> str | None:
        """A listing row's ``output``: the primary output URL of a success, else null (a row carries no failure
        envelope; ``ExecutionSummary.output`` is a string or null)."""
        if self.stopped_at is None and now >= self.finish_at and self.outcome is Outcome.SUCCESS:
            return f"{base_url}/outputs/{self.id}.png"
        return None

    def metrics(self, now: float) -> tuple[float, float]:
        """(``predict_time``, ``cost``): 0 and 0 while it runs, not null."""
        status = self.status(now)
        if status == "success":
            return round(self.duration, 3), COST_PER_IMAGE
        if status == "cancelled":
            assert self.stopped_at is not None
            return round(self.stopped_at - self.created_at, 3), 0.0
        if self.is_terminal(now):
            return round(self.duration, 3), 0.0
        return 0, 0

    def logs(self, now: float) -> str | None:
        status = self.status(now)
        if status == "success":
            return f"Generated 1 image in {self.duration:.2f}s"
        if status == "cancelled":
            return "Prediction cancelled"
        if self.is_terminal(now):
            return failure_output(self.outcome, self.seq, self.reason)[1]
        if status == "processing":
            return "Processing..."
        return None

    def category(self, now: float) -> str | None:
        """The failure envelope's ``classification.category``, when it failed with one."""
        output = self.output(now, "") if self.is_terminal(now) else None
        if isinstance(output, dict) and isinstance(output.get("classification"), dict):
            category = output["classification"].get("category")
            return category if isinstance(category, str) else None
        return None

    def view(self, now: float, base_url: str, *, withhold_output: bool = False) -> dict[str, Any]:
        """The body of ``GET /v1/prediction/{id}``; ``withhold_output`` shows a success with ``output: ""``."""
        predict_time, cost = self.metrics(now)
        url = f"{base_url}/v1/prediction/{self.id}"
        return {
            "id": self.id,
            "input": self.input,
            "status": self.status(now),
            "output": "" if withhold_output else self.output(now, base_url),
            "logs": self.logs(now),
            "metrics": {"predict_time": predict_time, "cost": cost},
            "urls": {"cancel": f"{url}/cancel", "get": url},
        }


def paid_twice(predictions: Iterable[Prediction], now: float) -> int:
    """Over every (model, input) key, the predictions beyond the first among those that did not fail.

    A prediction still running counts (it may yet be billed), and so does one whose cancel was only recorded;
    one that failed, or that a cancel really stopped, is not a payment.
    """
    counts = Counter(p.key for p in predictions if p.is_payment(now))
    return sum(n - 1 for n in counts.values() if n > 1)
