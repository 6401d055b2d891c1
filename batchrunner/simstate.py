"""The state of one simulated prediction on the injected clock, and what a GET of it shows.

Pure: a prediction is a record of what was decided at its creation (duration, outcome, shape); its status and
view are functions of the clock reading passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

__all__ = ["COST_PER_IMAGE", "Outcome", "Prediction", "shaped_output"]

COST_PER_IMAGE: Final = 0.08


class Outcome(StrEnum):
    """How a prediction ends when nothing cancels it."""

    SUCCESS = "success"
    FAILURE = "failure"
    PROVIDER_RATE_LIMIT = "provider_rate_limit"
    INPUT_ERROR = "input_error"


@dataclass(slots=True)
class Prediction:
    id: str
    model: str
    input: dict[str, Any]
    created_at: float
    duration: float
    finish_at: float  # math.inf for never_finish
    outcome: Outcome
    early_status: str  # "created" or "starting", shown for the first quarter of the duration
    shape: str
    failed_word: str
    variant: int  # rotates the shape of generic failures
    reason: str = ""
    cancelled_at: float | None = None

    def status(self, now: float) -> str:
        if self.cancelled_at is not None:
            return "cancelled"
        if now >= self.finish_at:
            return "success" if self.outcome is Outcome.SUCCESS else self.failed_word
        if now - self.created_at < self.duration / 4:
            return self.early_status
        return "processing"

    def is_terminal(self, now: float) -> bool:
        return self.cancelled_at is not None or now >= self.finish_at

    def view(self, now: float, base_url: str) -> dict[str, Any]:
        status = self.status(now)
        output: Any = None
        logs: str | None = None
        predict_time: float | None = None
        cost: float | None = None
        if status == "success":
            output = shaped_output(f"{base_url}/outputs/{self.id}.png", self.shape)
            logs = f"Generated 1 image in {self.duration:.2f}s"
            predict_time, cost = round(self.duration, 3), COST_PER_IMAGE
        elif status == "cancelled":
            assert self.cancelled_at is not None
            logs = "Prediction cancelled"
            predict_time, cost = round(self.cancelled_at - self.created_at, 3), 0.0
        elif status == self.failed_word:
            output, logs = self._failure()
            predict_time, cost = round(self.duration, 3), 0.0
        elif status == "processing":
            logs = "Processing..."
        url = f"{base_url}/v1/prediction/{self.id}"
        return {
            "id": self.id,
            "input": self.input,
            "status": status,
            "output": output,
            "logs": logs,
            "metrics": {"predict_time": predict_time, "cost": cost},
            "urls": {"cancel": f"{url}/cancel", "get": url},
        }

    def _failure(self) -> tuple[Any, str]:
        if self.outcome is Outcome.PROVIDER_RATE_LIMIT:
            message = "The model provider is rate limiting requests, please try again later"
            return {"error_code": "PROVIDER_RATE_LIMIT", "error_message": message}, f"Error: {message}"
        if self.outcome is Outcome.INPUT_ERROR:
            message = f"Could not download input_image: {self.reason}"
            return {"error_code": "INPUT_DOWNLOAD_ERROR", "error_message": message}, f"Error: {message}"
        # Generic failures come in both shapes the API has used: the reason only in logs, or also in output.
        logs = "Traceback (most recent call last):\n  ...\nRuntimeError: CUDA out of memory"
        if self.variant % 2 == 0:
            return None, logs
        return {"error_code": "PROVIDER_ERROR", "error_message": "The model provider returned an error"}, logs


def shaped_output(url: str, shape: str) -> Any:
    """The ``output`` of a successful prediction carrying ``url`` as a string, a list or an object."""
    if shape == "list":
        return [url]
    if shape == "object":
        return {"image": url}
    return url
