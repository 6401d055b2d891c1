"""The simulator's settings and counters: which faults to inject, how the API behaves, and what it saw.

Every fault is a number (a probability, a count or seconds), so the command line's generic
``--sim-fault NAME=VALUE`` reaches each one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final

__all__ = ["AUTH_HEADERS", "CREATE_PATH_FORMS", "WRONG_PATH_STATUSES", "Faults", "SimConfig", "SimStats", "input_key"]

# Which key headers a server accepts: both (the API today), or only one of them.
AUTH_HEADERS: Final = ("both", "bearer", "x-api-key")
# Which forms of the create path a server takes: both, only ``/v1/prediction`` (documented) or only the slash form.
CREATE_PATH_FORMS: Final = ("both", "plain", "slash")
# What a server answers a create sent to the form it does not take: not found, method not allowed, or a redirect
# to the form it takes (whose Location a client must not follow blindly with a POST).
WRONG_PATH_STATUSES: Final = (404, 405, 301, 302, 307, 308)


@dataclass(frozen=True, slots=True)
class Faults:
    """Failure injection: each a probability 0..1 per eligible request or prediction unless stated."""

    rate_limit: float = 0.0
    rate_limit_no_retry_after: float = 0.0
    server_error_html: float = 0.0
    server_error_empty: float = 0.0
    malformed_json: float = 0.0
    malformed_create: float = 0.0  # only a create's 200 answer is garbled (the prediction is made)
    reset_before: float = 0.0
    reset_before_create: float = 0.0  # a create's connection drops before it is acted on: nothing is made
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
    # A presign answers ``required_headers: {}`` (documented as possible): the PUT then needs only Content-Type.
    presign_empty_headers: float = 0.0
    # A ``GET /v1/executions`` answers 500 (1.0: broken, as it has been in production).
    listing_error: float = 0.0
    listing_lag: float = 0.0  # seconds after its creation before a prediction shows up in listings
    # A cancel really stops the prediction (status cancelled, cost 0, slot freed); otherwise it is only recorded.
    cancel_stops: float = 0.0
    # A prediction fails with a code not thought transient (PROVIDER_SERVER_ERROR, NETWORK_ERROR) but retryable.
    retryable_failure: float = 0.0
    # A prediction fails with an envelope without ``retryable`` whose code is a transient one (EXECUTION_TIMEOUT).
    unmarked_transient_failure: float = 0.0
    dispatch_failure: float = 0.0  # a prediction fails without running: ``output`` is a lone ``{"error": ...}``
    empty_error_bodies: float = 0.0  # a 400, 401 or 422 answer carries ``{}`` instead of ``{"error": ...}``
    # A create is acted on, then answered by the gateway with a 504 HTML page: the client cannot know its id.
    gateway_timeout_after_create: float = 0.0
    fresh_404_seconds: float = 0.0  # a GET of a prediction younger than this answers 404 (replica lag)
    # Per prediction: the first GET that sees its success shows ``output: ""``; later GETs show the URL.
    success_without_output: float = 0.0


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
    auth_headers: str = "both"  # one of AUTH_HEADERS: which key headers are accepted
    create_status: int = 200  # the HTTP status of an accepted create (one docs page says 201)
    create_path: str = "both"  # one of CREATE_PATH_FORMS: the forms of the create path taken
    wrong_path_status: int = 404  # one of WRONG_PATH_STATUSES: the answer to a create on the other form
    # Listing rows show ``output`` as a GET does, failure envelope included (not documented: rows carry a URL or null).
    listing_envelopes: bool = False

    def __post_init__(self) -> None:
        if self.auth_headers not in AUTH_HEADERS:
            raise ValueError(f"auth_headers must be one of {', '.join(AUTH_HEADERS)}, not {self.auth_headers!r}")
        if not 200 <= self.create_status < 300:
            raise ValueError(f"create_status must be a 2xx status, not {self.create_status}")
        if self.create_path not in CREATE_PATH_FORMS:
            raise ValueError(f"create_path must be one of {', '.join(CREATE_PATH_FORMS)}, not {self.create_path!r}")
        if self.wrong_path_status not in WRONG_PATH_STATUSES:
            raise ValueError(f"wrong_path_status must be one of {WRONG_PATH_STATUSES}, not {self.wrong_path_status}")


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
    listings: int = 0
    deletes: int = 0  # DELETE /v1/files/{id} that reached the action (404s included)
    wrong_path_creates: int = 0  # creates sent to the form of the path the server does not take
    presign_bodies: list[dict[str, Any]] = field(default_factory=list)  # every presign request's JSON body, in order
    creates_by_input: dict[str, int] = field(default_factory=dict)
    faults_injected: dict[str, int] = field(default_factory=dict)
    # Counts ``paid_twice`` when read: the simulator sets it, since the count needs its predictions and clock.
    paid_twice_counter: Callable[[], int] = field(default=lambda: 0, repr=False, compare=False)

    @property
    def paid_twice(self) -> int:
        """Predictions beyond the first per (model, input) among those that did not fail, as of now."""
        return self.paid_twice_counter()

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready copy, plus ``duplicates`` (creates beyond the first for the same (model, input))
        and ``paid_twice``."""
        data: dict[str, Any] = {}
        for item in fields(self):
            if item.name == "paid_twice_counter":
                continue
            value = getattr(self, item.name)
            data[item.name] = (
                dict(value) if isinstance(value, dict) else list(value) if isinstance(value, list) else value
            )
        data["duplicates"] = sum(n - 1 for n in self.creates_by_input.values() if n > 1)
        data["paid_twice"] = self.paid_twice
        return data


def input_key(model: str, inputs: Mapping[str, Any]) -> str:
    """The key of ``SimStats.creates_by_input``: sha256 of the canonical JSON of ``[model, input]``."""
    text = json.dumps([model, inputs], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()
