"""A paid image is never overwritten: the output names a run would write, checked against the ledger and the inputs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from batchrunner.cli.main import main
from batchrunner.manifest import Job
from batchrunner.store.filenames import output_conflicts
from batchrunner.store.ledger import JobState, JobStatus, LedgerState
from tests.conftest import ThreadedSimulator, fast_sim, images_in, make_image, run_args

SimFactory = Callable[..., ThreadedSimulator]
OUT = Path("/srv/out")


def job(job_id: str, fingerprint: str, image: Path | None = None, line: int = 3) -> Job:
    return Job(job_id, fingerprint, {"prompt": "p"}, image, "f" * 64 if image else None, line)


def done(job_id: str, fingerprint: str, file: str) -> JobState:
    return JobState(fingerprint, job_id, status=JobStatus.SUCCEEDED, file=file)


def flying(job_id: str, fingerprint: str) -> JobState:
    return JobState(fingerprint, job_id, status=JobStatus.IN_FLIGHT, prediction_id=f"p-{fingerprint}")


def ledger(*states: JobState) -> LedgerState:
    return LedgerState(jobs={st.fingerprint: st for st in states})


@pytest.mark.parametrize(
    ("jobs", "states", "files", "expected"),
    [
        # nothing in the way
        ([job("hero", "a1")], [], set(), []),
        ([job("hero", "a1")], [done("hero", "a1", "hero.png")], {"hero.png"}, []),  # done: not written again
        ([job("hero", "a1")], [done("hero", "a1", "hero.png")], set(), []),  # its own file, made again
        ([job("hero2", "a1")], [done("hero", "a1", "hero.png")], set(), []),  # renamed id, same input
        ([job("hero", "a1")], [done("other", "b2", "other.png")], {"other.png"}, []),
        ([job("hero", "a1")], [flying("hero", "a1")], set(), []),  # its own prediction in flight
        ([job("hero.v2", "a1")], [done("hero", "b2", "hero.png")], {"hero.png"}, []),  # hero.v2.png
        # an id: job whose prompt was edited, or a second manifest in the same folder: the paid file stays
        ([job("hero", "a1")], [done("hero", "b2", "hero.png")], {"hero.png"}, ["hero:over hero.png, the paid output"]),
        ([job("hero", "a1")], [done("hero", "b2", "hero.jpg")], {"hero.jpg"}, ["hero:over hero.jpg"]),
        ([job("hero", "a1")], [done("hero", "b2", "hero.webp")], set(), ["hero:over hero.webp"]),  # even if gone
        ([job("Hero", "a1")], [done("hero", "b2", "hero.png")], {"hero.png"}, ["Hero:over hero.png"]),  # case
        ([job("hero", "a1")], [done("HERO", "b2", "HERO.GIF")], {"HERO.GIF"}, ["hero:over HERO.GIF"]),
        (
            [job("x", "a1"), job("hero", "a2")],
            [done("hero", "b2", "hero.png"), done("x", "b3", "x.png")],
            {"hero.png", "x.png"},
            ["x:over x.png", "hero:over hero.png"],
        ),
        # the earlier version's prediction is still in flight, under the same id
        ([job("hero", "a1")], [flying("hero", "b2")], set(), ["hero:the prediction still in flight"]),
        # a prediction in flight would land on another job's paid file (a ledger from before this check)
        ([], [flying("hero", "b2"), done("hero", "c3", "hero.png")], {"hero.png"}, ["hero:move hero.png aside"]),
        ([], [flying("hero", "b2"), done("hero", "c3", "hero.png")], set(), []),  # moved aside: nothing to lose
        # an output folder that holds the input images
        ([job("street", "a1", OUT / "street.png")], [], set(), ["street:over the input image /srv/out/street.png"]),
        ([job("street", "a1", OUT / "Street.JPG")], [], set(), ["street:over the input image"]),
        ([job("a", "a1", OUT / "b.png"), job("b", "a2")], [], set(), ["b:over the input image /srv/out/b.png"]),
        ([job("a", "a1", OUT / "photo.png")], [], set(), []),  # in the folder, but no job writes photo.*
        ([job("a", "a1", OUT / "sub" / "a.png")], [], set(), []),  # a subfolder is not written to
        ([job("a", "a1", OUT / ".partial" / "in.png")], [], set(), ["a:is in .partial/ of the output folder"]),
        # a finished job whose output is an input of another (chaining manifests) is fine
        ([job("b", "a2", OUT / "a.png")], [done("a", "a1", "a.png")], {"a.png"}, []),
    ],
    ids=lambda value: None,
)
def test_output_conflicts(jobs: list[Job], states: list[JobState], files: set[str], expected: list[str]) -> None:
    conflicts = output_conflicts(jobs, ledger(*states), OUT, has_file=files.__contains__)
    assert len(conflicts) == len(expected), [c.message for c in conflicts]
    for conflict, want in zip(conflicts, expected, strict=True):
        who, _, what = want.partition(":")
        assert conflict.job == who
        assert what in conflict.message
        assert "\n" not in conflict.message


def test_conflict_names_both_sides() -> None:
    (conflict,) = output_conflicts([job("hero", "a1")], ledger(done("hero", "b2" * 32, "hero.png")), OUT, has_file=bool)
    assert conflict.message == (
        "its image would be saved as hero.<ext>, over hero.png, the paid output of the ledger's job 'hero' "
        "(another input: fingerprint b2b2b2b2b2b2); give this job another id, or use another --output"
    )
    assert conflict.line == 3


# --- end to end through the command line ---------------------------------------------------------------------


@pytest.mark.usefixtures("api_key")
def test_edited_prompt_under_the_same_id_is_refused_and_the_paid_image_stays(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = threaded_sim(fast_sim())
    manifest = tmp_path / "m.yaml"
    out = tmp_path / "out"
    manifest.write_text("jobs:\n  - {id: hero, prompt: Night with stars}\n", encoding="utf-8")
    assert main(run_args(manifest, sim.url, out)) == 0
    (paid,) = images_in(out)
    before = paid.read_bytes()
    creates = sim.stats()["creates"]
    capsys.readouterr()

    manifest.write_text("jobs:\n  - {id: hero, prompt: Night with a full moon}\n", encoding="utf-8")
    assert main(run_args(manifest, sim.url, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert f"{manifest}:2: job 'hero': field 'id': its image would be saved as hero.<ext>, over {paid.name}" in err[0]
    assert sim.stats()["creates"] == creates  # nothing paid
    assert paid.read_bytes() == before
    assert main(["validate", str(manifest), "--output", str(out)]) == 2  # validate says so too

    manifest.write_text("jobs:\n  - {id: hero-moon, prompt: Night with a full moon}\n", encoding="utf-8")
    assert main(run_args(manifest, sim.url, out)) == 0
    assert paid.read_bytes() == before and len(images_in(out)) == 2


@pytest.mark.usefixtures("api_key")
def test_output_folder_holding_the_inputs_is_refused_before_any_request(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = threaded_sim(fast_sim())
    image = make_image(tmp_path / "images" / "hero.png")
    before = image.read_bytes()
    manifest = tmp_path / "m.yaml"
    manifest.write_text("jobs:\n  - {id: hero, prompt: x, input_image: images/hero.png}\n", encoding="utf-8")
    assert main(run_args(manifest, sim.url, tmp_path / "images")) == 2
    assert "over the input image" in capsys.readouterr().err
    assert sim.stats()["requests"] == 0
    assert image.read_bytes() == before
