"""Exit codes that tell the truth: a run stopped while paid outputs are still downloading has them in flight."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from batchrunner.cli.main import main
from batchrunner.sim.server import Faults
from tests.conftest import SECRET_KEY, ThreadedSimulator, fast_sim, images_in, run_args, write_manifest

SimFactory = Callable[..., ThreadedSimulator]
pytestmark = pytest.mark.usefixtures("api_key")


def _summary_in_flight(err: str) -> int:
    match = re.search(r"summary: .*?(\d+) in flight", err)
    assert match, err
    return int(match.group(1))


@pytest.mark.parametrize(
    "faults",
    [
        pytest.param(Faults(download_404_seconds=30.0), id="output-not-there-yet"),
        pytest.param(Faults(truncated_download=1.0), id="output-cut-short-every-time"),
    ],
)
def test_a_deadline_during_downloads_exits_75_with_them_in_flight(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str], faults: Faults
) -> None:
    sim = threaded_sim(fast_sim(faults=faults))
    manifest = write_manifest(tmp_path, 3, image=False)
    out = tmp_path / "out"
    assert main(run_args(manifest, sim.url, out, "--max-runtime", "1s")) == 75
    err = capsys.readouterr().err
    assert _summary_in_flight(err) == 3 and "stopped by --max-runtime" in err
    assert images_in(out) == []
    # status, from the ledger alone, says the same.
    assert main(["status", str(manifest), "--output", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["in_flight"] == 3


def test_the_next_run_downloads_what_the_deadline_cut_off_without_paying_again(
    tmp_path: Path, threaded_sim: SimFactory
) -> None:
    sim = threaded_sim(fast_sim(faults=Faults(download_404_seconds=0.5)))
    manifest = write_manifest(tmp_path, 2, image=False)
    out = tmp_path / "out"
    assert main(run_args(manifest, sim.url, out, "--max-runtime", "0.2s")) == 75
    time.sleep(0.4)  # the outputs become available
    assert main(run_args(manifest, sim.url, out)) == 0
    assert len(images_in(out)) == 2
    assert sim.stats()["creates"] == 2


def test_sigterm_during_downloads_exits_143_with_them_in_flight(tmp_path: Path, threaded_sim: SimFactory) -> None:
    sim = threaded_sim(fast_sim(faults=Faults(download_404_seconds=30.0)))
    manifest = write_manifest(tmp_path, 2, image=False)
    out = tmp_path / "out"
    env = {**os.environ, "EACHLABS_API_KEY": SECRET_KEY}
    args = [sys.executable, "-m", "batchrunner", *run_args(manifest, sim.url, out, "--drain-timeout", "0.3s")]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and sim.stats()["faults_injected"].get("download_404", 0) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 143, err.decode()
    assert _summary_in_flight(err.decode()) == 2
