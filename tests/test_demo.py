"""The README's demo command: ``batchrunner run jobs/demo.yaml --simulate``, with the simulator made fast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from batchrunner.cli.main import main
from batchrunner.store.ledger import SUBMITTING
from batchrunner.store.output import LEDGER_NAME
from tests.conftest import images_in

DEMO = Path(__file__).resolve().parent.parent / "jobs" / "demo.yaml"
FAST = [
    "--progress",
    "none",
    "--rate-limit",
    "1000/1",
    "--sim-rate-limit",
    "1000/1",
    "--sim-min-seconds",
    "0.005",
    "--sim-max-seconds",
    "0.02",
]


def test_demo_manifest_runs_on_the_built_in_simulator_with_no_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("EACHLABS_API_KEY", raising=False)
    monkeypatch.delenv("EACHLABS_API_URL", raising=False)
    out = tmp_path / "demo"
    code = main(["run", str(DEMO), "--simulate", "--output", str(out), *FAST, "--sim-image-size", "40"])
    err = capsys.readouterr().err
    assert code == 0, err
    files = images_in(out)
    assert len(files) == 13
    for path in files:
        with Image.open(path) as img:
            assert max(img.size) == 40  # --sim-image-size reached the simulator
    # A second run finds everything done and submits nothing.
    submits = _submits(out)
    assert submits == 13
    assert main(["run", str(DEMO), "--simulate", "--output", str(out), *FAST]) == 0
    assert len(images_in(out)) == 13
    assert _submits(out) == submits


def _submits(out: Path) -> int:
    return sum(1 for line in (out / LEDGER_NAME).read_text().splitlines() if json.loads(line)["event"] == SUBMITTING)
