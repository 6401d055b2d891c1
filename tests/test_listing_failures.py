"""A failure seen in the executions listing is confirmed by a GET: a row carries no error envelope.

The documented ``ExecutionSummary`` has ``output`` as a URL string or null, no ``retryable`` and no ``error_code``: a
runner that read an ``error`` row as final would end jobs that deserve another attempt, and never upload again an
image the API lost. Here: the pure decision by table, the simulator's rows, and each envelope kind end to end in
every watch mode, with the same outcome as polling.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from batchrunner.api.answers import parse_execution
from batchrunner.cli.main import main
from batchrunner.engine.watch import needs_get
from batchrunner.sim.listing import execution_row
from batchrunner.sim.server import Faults
from batchrunner.sim.state import Outcome, Prediction
from tests.conftest import ThreadedSimulator, fast_sim, images_in, run_args, write_manifest

SimFactory = Callable[..., ThreadedSimulator]
MODES = ("auto", "list", "poll")


# --- the decision, by table ------------------------------------------------------------------------------------


def row(status: str, output: Any = None) -> dict[str, Any]:
    return {
        "id": "p-1",
        "model": "flux-kontext-max",
        "status": status,
        "execution_cost": 0,
        "run_time": 1.2,
        "created_at": "2026-12-01T10:00:00Z",
        "output": output,
    }


@pytest.mark.parametrize(
    ("status", "output", "confirm"),
    [
        ("error", None, True),
        ("failed", None, True),  # the OpenAPI enum's older word
        ("ERROR", None, True),
        # Even a row that shows an envelope (not documented) is confirmed: the GET is the record that decides.
        ("error", {"error": "Execution failed", "error_code": "PROVIDER_FAILED", "retryable": False}, True),
        ("cancelled", None, False),  # a cancel has no envelope to read: the row says all there is
        ("canceled", None, False),
        ("success", "https://cdn.example/out.png", False),
        ("processing", None, False),
        ("created", None, False),
        ("queued-somewhere", None, False),  # an unknown word is still running
    ],
)
def test_only_a_failure_row_needs_a_get(status: str, output: Any, confirm: bool) -> None:
    execution = parse_execution(row(status, output))
    assert execution is not None and execution.prediction is not None
    assert needs_get(execution.prediction) is confirm


def test_a_failure_row_read_alone_would_be_final() -> None:
    # What the runner would have decided from the row itself: not retryable, no code. Hence the GET.
    execution = parse_execution(row("error"))
    assert execution is not None and execution.prediction is not None
    prediction = execution.prediction
    assert (prediction.retryable, prediction.error_code) == (False, None)


# --- the simulator's rows ----------------------------------------------------------------------------------------


def prediction(outcome: Outcome) -> Prediction:
    return Prediction(
        id="p-1",
        model="flux-kontext-max",
        input={"prompt": "x"},
        key="k",
        seq=0,
        created_at=0.0,
        duration=1.0,
        finish_at=1.0,
        outcome=outcome,
        early_status="starting",
        shape="object",
        failed_word="error",
    )


def wall(t: float) -> datetime:
    return datetime.fromtimestamp(1_800_000_000 + t, UTC)


@pytest.mark.parametrize("outcome", [Outcome.RETRYABLE_FAILURE, Outcome.INPUT_ERROR, Outcome.DISPATCH_FAILURE])
def test_a_simulated_failure_row_has_no_envelope_unless_switched_to_show_one(outcome: Outcome) -> None:
    failed = prediction(outcome)
    assert execution_row(failed, 2.0, "http://sim", wall)["output"] is None
    assert failed.view(2.0, "http://sim")["output"]["error"]  # the GET has it
    shown = execution_row(failed, 2.0, "http://sim", wall, envelopes=True)["output"]
    assert shown == failed.view(2.0, "http://sim")["output"]


def test_a_simulated_success_row_carries_its_primary_url_as_a_string() -> None:
    done = prediction(Outcome.SUCCESS)  # a GET shows {"image": url}: the row shows the URL itself
    assert execution_row(done, 2.0, "http://sim", wall)["output"] == "http://sim/outputs/p-1.png"
    assert execution_row(done, 0.5, "http://sim", wall)["output"] is None  # running


# --- end to end: each envelope kind in every watch mode -----------------------------------------------------------


def ledger_events(out: Path, name: str) -> list[dict[str, Any]]:
    found = []
    for line in (out / "ledger.jsonl").read_text(encoding="utf-8").splitlines():
        event = json.loads(line)
        if event.get("event") == name:
            found.append(event)
    return found


def run(
    sim: ThreadedSimulator, folder: Path, jobs: int, mode: str, *extra: str, image: bool = False
) -> tuple[int, Path]:
    manifest = write_manifest(folder, jobs, image=image)
    out = folder / "out"
    return main(run_args(manifest, sim.url, out, "--watch", mode, *extra)), out


@pytest.mark.usefixtures("api_key")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("faults", "codes"),
    [
        # retryable: true on codes a client might think permanent
        (Faults(retryable_failure=0.3), {"PROVIDER_SERVER_ERROR", "NETWORK_ERROR"}),
        # no retryable in the envelope: its transient code decides
        (Faults(unmarked_transient_failure=0.3), {"EXECUTION_TIMEOUT"}),
    ],
    ids=["retryable-true", "no-retryable-transient-code"],
)
def test_a_retryable_failure_seen_in_the_listing_gets_its_new_attempt(
    mode: str, faults: Faults, codes: set[str], tmp_path: Path, threaded_sim: SimFactory
) -> None:
    sim = threaded_sim(fast_sim(faults=faults, seed=3))
    code, out = run(sim, tmp_path, 20, mode, "--max-attempts", "8")
    assert code == 0
    assert len(images_in(out)) == 20
    failed = ledger_events(out, "failed")
    assert failed, "some first attempts should have failed"
    # The code and the verdict come from the prediction's envelope, which only a GET shows.
    assert all(e["retryable"] is True and e["error_code"] in codes for e in failed)
    stats = sim.stats()
    assert stats["creates"] == 20 + len(failed)
    assert stats["paid_twice"] == 0


@pytest.mark.usefixtures("api_key")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("faults", "fault", "expect"),
    [
        # retryable: false (the rotation of generic failures: an envelope, a lone error, logs only)
        (Faults(), "failure_rate", {"PROVIDER_FAILED", None}),
        # a dispatch failure: only {"error": ...}, no code, no retryable
        (Faults(dispatch_failure=0.3), "dispatch_failure", {None}),
    ],
    ids=["retryable-false", "dispatch-lone-error"],
)
def test_a_final_failure_seen_in_the_listing_is_final_with_its_reason(
    mode: str, faults: Faults, fault: str, expect: set[str | None], tmp_path: Path, threaded_sim: SimFactory
) -> None:
    failure_rate = 0.3 if fault == "failure_rate" else 0.0
    sim = threaded_sim(fast_sim(faults=faults, failure_rate=failure_rate, seed=3))
    code, out = run(sim, tmp_path, 20, mode, "--max-attempts", "3")
    stats = sim.stats()
    injected = stats["faults_injected"][fault]
    assert code == 1
    assert len(images_in(out)) == 20 - injected
    failed = ledger_events(out, "failed")
    assert len(failed) == injected
    assert all(e["retryable"] is False for e in failed)
    assert {e.get("error_code") for e in failed} <= expect
    # Every reason is the prediction's own (read by a GET), not "prediction ended with status 'error'".
    assert all("ended with status" not in e["error"] for e in failed)
    if fault == "dispatch_failure":
        assert {e["error"] for e in failed} == {"Failed to dispatch prediction to the model provider"}
    assert stats["creates"] == 20  # nothing tried again


@pytest.mark.usefixtures("api_key")
@pytest.mark.parametrize("mode", MODES)
def test_an_upload_the_api_lost_is_uploaded_again_when_the_listing_shows_the_failure(
    mode: str, tmp_path: Path, threaded_sim: SimFactory
) -> None:
    # A first run uploads the image; then the server loses every stored file (a reset), so each create of the second
    # run naming it fails with INPUT_DOWNLOAD_ERROR: the image is uploaded again and the jobs tried again.
    sim = threaded_sim(fast_sim(seed=3))
    code, out = run(sim, tmp_path, 1, mode, image=True)
    assert code == 0
    urllib.request.urlopen(urllib.request.Request(f"{sim.url}/_sim/reset", method="POST"), timeout=5).close()
    code, out = run(sim, tmp_path, 6, mode, image=True)
    assert code == 0
    assert len(images_in(out)) == 6
    failed = ledger_events(out, "failed")
    assert failed and all(e["error_code"] == "INPUT_DOWNLOAD_ERROR" and e["retryable"] for e in failed)
    assert sim.stats()["presigns"] == 1
    assert len(ledger_events(out, "uploaded")) == 2
