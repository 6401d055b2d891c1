"""Every check that can fail fails before the first paid request."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from batchrunner.cli.main import main
from tests.conftest import ThreadedSimulator, fast_sim, make_image, run_args

SimFactory = Callable[..., ThreadedSimulator]
pytestmark = pytest.mark.usefixtures("api_key")


def manifest_with(folder: Path, images: list[str], *, model: str = "flux-kontext-max", extra: str = "") -> Path:
    quoted = ", ".join(images)
    path = folder / "m.yaml"
    path.write_text(
        f'model: {model}\n{extra}matrix:\n  input_image: [{quoted}]\n  prompt: ["Make it a snowy evening scene"]\n',
        encoding="utf-8",
    )
    return path


@pytest.mark.parametrize(
    ("name", "write", "expected"),
    [
        ("corrupt.png", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20), "corrupt.png"),
        ("photo.bmp", lambda p: make_image(p.with_suffix(".bmp")) and p.with_suffix(".bmp").rename(p), "BMP"),
        ("empty.jpg", lambda p: p.write_bytes(b""), "empty.jpg"),
    ],
)
def test_bad_local_image_exits_2_before_any_request_naming_the_file(
    name: str,
    write: Callable[[Path], object],
    expected: str,
    tmp_path: Path,
    threaded_sim: SimFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sim = threaded_sim(fast_sim())
    make_image(tmp_path / "good.png")
    write(tmp_path / name)
    manifest = manifest_with(tmp_path, ["good.png", name])
    assert main(run_args(manifest, sim.url, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and "Traceback" not in err[0]
    assert sim.stats()["requests"] == 0


def test_missing_image_exits_2_naming_the_file_and_its_jobs(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = threaded_sim(fast_sim())
    manifest = manifest_with(tmp_path, ["nowhere.png"])
    assert main(run_args(manifest, sim.url, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert "nowhere.png: no such file" in err and "job 'matrix'" in err and "m.yaml:3:" in err
    assert sim.stats()["requests"] == 0


def test_validate_runs_the_checks_and_prints_the_plan_without_requests(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    make_image(tmp_path / "a.png")
    manifest = manifest_with(tmp_path, ["a.png"])
    assert main(["validate", str(manifest), "--output", str(tmp_path / "out"), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["new"] == 1 and plan["uploads"] == 1
    (tmp_path / "a.png").write_bytes(b"not an image at all")
    assert main(["validate", str(manifest), "--output", str(tmp_path / "out")]) == 2


def test_check_urls_stops_an_unreachable_input_before_submitting(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = threaded_sim(fast_sim())
    missing = f"{sim.url}/files/never-uploaded"
    manifest = manifest_with(tmp_path, [missing])
    assert main(run_args(manifest, sim.url, tmp_path / "out", "--check-urls")) == 2
    err = capsys.readouterr().err
    assert "unreachable" in err and missing in err
    assert sim.stats()["creates"] == 0


def test_other_models_are_checked_against_their_published_schema_once(
    tmp_path: Path, threaded_sim: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = threaded_sim(fast_sim())
    make_image(tmp_path / "a.png")
    bad = manifest_with(tmp_path, ["a.png"], model="flux-kontext-pro", extra='defaults:\n  aspect_ratio: "7:5"\n')
    out = tmp_path / "out"
    assert main(run_args(bad, sim.url, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "aspect_ratio" in err[0] and "schema" in err[0]
    assert sim.stats()["creates"] == 0
    good = manifest_with(tmp_path, ["a.png"], model="flux-kontext-pro")
    assert main(run_args(good, sim.url, out)) == 0
    requests = sim.stats()["requests"]
    assert main(run_args(good, sim.url, out)) == 0
    assert sim.stats()["requests"] == requests  # done, and the cached schema needs no request
    assert any(p.name.startswith(".schema-") for p in out.iterdir())


@pytest.mark.parametrize(
    ("schema", "said"),
    [
        ({"properties": {"prompt": {"pattern": "^(a|aa)+$"}}}, "took more than 0.05 s to match"),
        ({"properties": {"prompt": {"$ref": "https://schemas.example.com/prompt.json"}}}, "remote references"),
        ({"$defs": {"p": {"$ref": "#/$defs/p"}}, "properties": {"prompt": {"$ref": "#/$defs/p"}}}, "refers to itself"),
    ],
    ids=["backtracking-pattern", "remote-ref", "ref-loop"],
)
def test_hostile_model_schema_ends_in_one_warning_and_the_run_goes_on(
    schema: dict[str, object],
    said: str,
    tmp_path: Path,
    threaded_sim: SimFactory,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import batchrunner.manifest.patterns as schema_module
    from batchrunner.manifest.schema import save_cached_schema

    monkeypatch.setattr(schema_module, "PATTERN_TIMEOUT", 0.05)
    monkeypatch.setattr(schema_module, "_compiled", {})
    sim = threaded_sim(fast_sim())
    path = tmp_path / "m.yaml"
    path.write_text(f"model: flux-kontext-pro\njobs:\n  - {{id: a, prompt: {'a' * 60}b}}\n", encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    save_cached_schema(out, "flux-kontext-pro", schema)  # as if the API had published it
    assert main(run_args(path, sim.url, out, "--quiet")) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert sum(said in line for line in err.splitlines()) == 1
