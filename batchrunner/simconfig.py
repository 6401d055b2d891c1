"""The simulator's settings and counters: which faults to inject, how the API behaves, and what it saw.

Every fault is a number (a probability, a count or seconds), so the command line's generic
``--sim-fault NAME=VALUE`` reaches each one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Faults", "SimConfig", "SimStats", "input_key"]


@dataclass(frozen=True, slots=True)
class Faults:
    """Failure injection: each a probability 0..1 per eligible request or prediction unless stated."""

    rate_limit: float = 0.0
    rate_limit_no_retry_after: float = 0.0
    server_error_html: float = 0.0
    server_error_empty: float = 0.0
    malformed_json: float = 0.0
    reset_before: float = 0.0
    reset_after: float = 0.0
    slow: float = 0.0
    slow_seconds: float = 2.0
    truncated_download: float = 0.0
    download_404_seconds: float = 0.0
    provider_rate_limit: float = 0.0
    input_error: float = 0.0
    never_finish: float = 0.0
    payment_required_after: int | None = None
    upload_reset: float = 0.0  # an upload PUT's connection drops halfway: nothing is stored
    late_arrival: float = 0.0  # a request is slow on its way in: stamped (and counted) this late
    late_arrival_seconds: float = 0.05


@dataclass(frozen=True, slots=True)
class SimConfig:
    """How the simulated API behaves: limits, prediction durations and shapes, auth, faults."""

    rate_count: int = 60
    rate_period: float = 60.0
    concurrency: int = 10
    min_seconds: float = 0.05
    max_seconds: float = 0.2
    failure_rate: float = 0.0
    failed_status: str = "error"
    output_shape: str = "string"
    api_key: str | None = None
    seed: int = 0
    faults: Faults = Faults()
    long_poll: float = 0.0  # when > 0, a GET of a running prediction blocks up to this long until it ends
    image_size: int = 256


@dataclass(slots=True)
class SimStats:
    """Live counters of what the server saw and did (see the module docstring for what each counts)."""

    requests: int = 0
    creates: int = 0
    polls: int = 0
    cancels: int = 0
    presigns: int = 0
    uploads: int = 0
    downloads: int = 0
    rate_limited: int = 0
    concurrency_rejected: int = 0
    max_in_flight: int = 0
    max_window: int = 0
    lost_answers: int = 0
    creates_by_input: dict[str, int] = field(default_factory=dict)
    faults_injected: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready copy, plus ``duplicates``: creates beyond the first for the same (model, input)."""
        data = asdict(self)
        data["duplicates"] = sum(n - 1 for n in self.creates_by_input.values() if n > 1)
        return data


def input_key(model: str, inputs: Mapping[str, Any]) -> str:
    """The key of ``SimStats.creates_by_input``: sha256 of the canonical JSON of ``[model, input]``."""
    text = json.dumps([model, inputs], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()
