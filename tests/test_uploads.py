"""Local input images go through the API's presigned upload, once per distinct content."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from batchrunner.cli.main import main
from batchrunner.sim.server import Faults
from batchrunner.store.ledger import read_ledger
from tests.conftest import ThreadedSimulator, fast_sim, make_image, run_args

SimFactory = Callable[..., ThreadedSimulator]
pytestmark = pytest.mark.usefixtures("api_key")


def four_images_manifest(folder: Path, prompts: list[str]) -> Path:
    make_image(folder / "a.png", (255, 0, 0))
    make_image(folder / "b.png", (0, 255, 0))
    make_image(folder / "c.png", (0, 0, 255))
    (folder / "copy-of-a.png").write_bytes((folder / "a.png").read_bytes())  # same bytes, another path
    quoted = ", ".join(f'"{p}"' for p in prompts)
    text = f"matrix:\n  input_image: [a.png, b.png, c.png, copy-of-a.png]\n  prompt: [{quoted}]\n"
    path = folder / "uploads.yaml"
    path.write_text(text, encoding="utf-8")
    return path


PROMPTS = ["Make it a snowy winter evening scene", "Render it as an old noir photograph"]


def test_each_distinct_image_is_uploaded_once_and_every_job_succeeds(tmp_path: Path, threaded_sim: SimFactory) -> None:
    sim = threaded_sim(fast_sim())
    manifest = four_images_manifest(tmp_path, PROMPTS)
    out = tmp_path / "out"
    assert main(run_args(manifest, sim.url, out)) == 0
    stats = sim.stats()
    # 4 paths, 3 distinct contents: a.png and copy-of-a.png are one job each prompt (same request), so 3 x 2 jobs.
    assert stats["presigns"] == 3 and stats["uploads"] == 3
    assert stats["creates"] == 6
    state = read_ledger(out / "ledger.jsonl")
    assert len(state.uploads) == 3
    assert all(st.file for st in state.jobs.values())


def test_adding_a_prompt_and_rerunning_uploads_nothing_new(tmp_path: Path, threaded_sim: SimFactory) -> None:
    sim = threaded_sim(fast_sim())
    out = tmp_path / "out"
    assert main(run_args(four_images_manifest(tmp_path, PROMPTS), sim.url, out)) == 0
    more = [*PROMPTS, "Turn it into a watercolour painting please"]
    assert main(run_args(four_images_manifest(tmp_path, more), sim.url, out)) == 0
    stats = sim.stats()
    assert stats["presigns"] == 3 and stats["uploads"] == 3
    assert stats["creates"] == 9


def test_inline_images_uploads_nothing(tmp_path: Path, threaded_sim: SimFactory) -> None:
    sim = threaded_sim(fast_sim())
    manifest = four_images_manifest(tmp_path, PROMPTS)
    assert main(run_args(manifest, sim.url, tmp_path / "out", "--inline-images")) == 0
    stats = sim.stats()
    assert stats["presigns"] == 0 and stats["uploads"] == 0
    assert stats["creates"] == 6


def test_upload_cut_halfway_is_retried_and_no_job_is_sent_before_it_completes(
    tmp_path: Path, threaded_sim: SimFactory
) -> None:
    sim = threaded_sim(fast_sim(faults=Faults(upload_reset=0.5), seed=2))
    manifest = four_images_manifest(tmp_path, PROMPTS)
    out = tmp_path / "out"
    assert main(run_args(manifest, sim.url, out)) == 0
    stats = sim.stats()
    assert stats["faults_injected"].get("upload_reset", 0) >= 1
    assert stats["uploads"] == 3
    # The simulator fails a prediction whose image upload never completed: none did.
    state = read_ledger(out / "ledger.jsonl")
    assert all(st.attempts == 0 and st.file for st in state.jobs.values())
