"""Tests of batchrunner.manifest.parse: expansion, fingerprints, derived ids, local images, ways to be wrong."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from batchrunner.errors import InputImageError, ManifestError, UsageError
from batchrunner.manifest import (
    ASPECT_RATIOS,
    DEFAULT_MAX_JOBS,
    DEFAULT_MODEL,
    DEFAULT_VERSION,
    Job,
    Manifest,
    load_manifest,
    parse_manifest,
    sha256_file,
)

ISSUE_EXAMPLE = """\
model: flux-kontext-max
version: "0.0.1"
price: 0.08
defaults:
  aspect_ratio: match_input_image
  safety_tolerance: 2
matrix:
  input_image: [images/street.jpg, https://example.com/harbour.png]
  prompt: ["Turn the scene into a snowy winter evening", "Render it as a 1920s noir photograph"]
  seed: [1, 2, 3]
jobs:
  - id: hero-night
    input_image: images/street.jpg
    prompt: "Night with stars over the rooftops"
    seed: 42
    aspect_ratio: "16:9"
"""

DERIVED_ID = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")


def write_image(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A real 4x4 JPEG or PNG (by suffix); returns its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path)
    return path.read_bytes()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A manifest folder holding images/street.jpg, as the issue's example expects."""
    write_image(tmp_path / "images" / "street.jpg")
    return tmp_path


def parse(text: str, folder: Path, **kwargs: Any) -> Manifest:
    return parse_manifest(text, path=folder / "batch.yaml", **kwargs)


def reference_fingerprint(model: str, version: str, job: Job) -> str:
    """The fingerprint as the contract defines it, computed the slow, obvious way."""
    sent = dict(job.input)
    if job.image_path is not None:
        sent["input_image"] = f"sha256:{job.image_sha256}"
    canonical = json.dumps(
        {"model": model, "version": version, "input": sent},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------------
# Expansion


def test_issue_example_expands_matrix_then_explicit_jobs(folder: Path) -> None:
    manifest = parse(ISSUE_EXAMPLE, folder)

    assert (manifest.model, manifest.version, manifest.price) == (DEFAULT_MODEL, "0.0.1", 0.08)
    assert len(manifest.jobs) == 2 * 2 * 3 + 1
    assert manifest.duplicates == 0
    assert [job.line for job in manifest.jobs] == [7] * 12 + [12]
    hero = manifest.jobs[-1]
    assert hero.id == "hero-night"
    assert dict(hero.input) == {
        "aspect_ratio": "16:9",
        "safety_tolerance": 2,
        "input_image": "images/street.jpg",
        "prompt": "Night with stars over the rooftops",
        "seed": 42,
    }


def test_matrix_follows_product_order_of_keys_as_written(folder: Path) -> None:
    manifest = parse("matrix:\n  seed: [1, 2]\n  prompt: [a, b, c]\n", folder)

    got = [(job.input["seed"], job.input["prompt"]) for job in manifest.jobs]
    assert got == [(1, "a"), (1, "b"), (1, "c"), (2, "a"), (2, "b"), (2, "c")]


def test_defaults_apply_to_every_job_and_matrix_and_job_fields_override_them(folder: Path) -> None:
    text = """\
defaults: {prompt: base, seed: 7, safety_tolerance: 2}
matrix:
  seed: [1, 2]
jobs:
  - {safety_tolerance: 5}
"""
    manifest = parse(text, folder)

    assert [dict(job.input) for job in manifest.jobs] == [
        {"prompt": "base", "seed": 1, "safety_tolerance": 2},
        {"prompt": "base", "seed": 2, "safety_tolerance": 2},
        {"prompt": "base", "seed": 7, "safety_tolerance": 5},
    ]


def test_explicit_jobs_are_not_crossed_with_the_matrix(folder: Path) -> None:
    text = "matrix:\n  prompt: [a, b]\n  seed: [1, 2, 3]\njobs:\n  - {prompt: c}\n  - {prompt: d, seed: 9}\n"
    manifest = parse(text, folder)

    assert len(manifest.jobs) == 6 + 2
    assert dict(manifest.jobs[6].input) == {"prompt": "c"}
    assert dict(manifest.jobs[7].input) == {"prompt": "d", "seed": 9}


def test_yaml_merge_keys_and_aliases_work_in_jobs(folder: Path) -> None:
    text = """\
jobs:
  - &base {id: first, prompt: shared text, seed: 1}
  - <<: *base
    id: second
    seed: 2
"""
    manifest = parse(text, folder)

    assert [(job.id, dict(job.input)) for job in manifest.jobs] == [
        ("first", {"prompt": "shared text", "seed": 1}),
        ("second", {"prompt": "shared text", "seed": 2}),
    ]


@pytest.mark.parametrize(
    "text",
    ["matrix: {}\n", "jobs: []\n", "model: flux-kontext-max\n", "price: 0.05\n", "matrix: {}\njobs: []\n"],
)
def test_a_manifest_without_jobs_is_an_empty_batch(folder: Path, text: str) -> None:
    manifest = parse(text, folder)

    assert manifest.jobs == ()
    assert manifest.duplicates == 0


def test_jobs_with_the_same_fingerprint_collapse_into_the_first(folder: Path) -> None:
    text = """\
matrix:
  prompt: [a, b, a]
  seed: [1, 1]
jobs:
  - {prompt: b, seed: 1}
  - {id: named, prompt: c}
  - {id: named, prompt: c}
"""
    manifest = parse(text, folder)

    assert [(job.input["prompt"], job.input.get("seed")) for job in manifest.jobs] == [
        ("a", 1),
        ("b", 1),
        ("c", None),
    ]
    assert manifest.duplicates == (6 - 2) + 1 + 1
    assert len({job.fingerprint for job in manifest.jobs}) == len(manifest.jobs)


def test_unquoted_aspect_ratio_is_taken_as_written_not_as_a_base_60_number(folder: Path) -> None:
    manifest = parse("jobs:\n  - {prompt: x, aspect_ratio: 16:9}\n  - {prompt: y, aspect_ratio: 1:1}\n", folder)

    assert [job.input["aspect_ratio"] for job in manifest.jobs] == ["16:9", "1:1"]


@pytest.mark.parametrize("ratio", ASPECT_RATIOS)
def test_every_documented_aspect_ratio_is_accepted(folder: Path, ratio: str) -> None:
    manifest = parse(f'jobs: [{{prompt: x, aspect_ratio: "{ratio}"}}]\n', folder)

    assert manifest.jobs[0].input["aspect_ratio"] == ratio


def test_other_models_pass_fields_through_without_flux_rules(folder: Path) -> None:
    text = """\
model: some-upscaler
version: "2"
jobs:
  - scale: 4
    faces: {enhance: true, strength: 0.5}
    tags: [a, b]
    input_image: images/street.jpg
"""
    manifest = parse(text, folder)

    job = manifest.jobs[0]
    assert dict(job.input) == {
        "scale": 4,
        "faces": {"enhance": True, "strength": 0.5},
        "tags": ["a", "b"],
        "input_image": "images/street.jpg",
    }
    assert job.image_path == (folder / "images" / "street.jpg").resolve()
    assert job.fingerprint == reference_fingerprint("some-upscaler", "2", job)


def test_job_records_are_frozen(folder: Path) -> None:
    job = parse("jobs: [{prompt: x}]\n", folder).jobs[0]

    with pytest.raises(dataclasses.FrozenInstanceError):
        job.id = "other"  # type: ignore[misc]
    assert hash(job) == hash(dataclasses.replace(job))  # hashable although input is a dict


# --------------------------------------------------------------------------------------------------
# Fingerprints


def test_fingerprint_is_sha256_of_canonical_json_with_local_image_as_content_hash(folder: Path) -> None:
    manifest = parse(ISSUE_EXAMPLE, folder)

    for job in manifest.jobs:
        assert job.fingerprint == reference_fingerprint(manifest.model, manifest.version, job)
    local = [job for job in manifest.jobs if job.image_path is not None]
    assert local
    assert {job.image_sha256 for job in local} == {sha256_file(folder / "images" / "street.jpg")}


def test_reordering_jobs_and_matrix_values_keeps_every_fingerprint(folder: Path) -> None:
    reordered = """\
jobs:
  - seed: 42
    aspect_ratio: "16:9"
    prompt: "Night with stars over the rooftops"
    input_image: images/street.jpg
    id: hero-night
matrix:
  seed: [3, 1, 2]
  prompt: ["Render it as a 1920s noir photograph", "Turn the scene into a snowy winter evening"]
  input_image: [https://example.com/harbour.png, images/street.jpg]
defaults:
  safety_tolerance: 2
  aspect_ratio: match_input_image
price: 0.08
"""
    original = {job.id: job.fingerprint for job in parse(ISSUE_EXAMPLE, folder).jobs}
    shuffled = {job.id: job.fingerprint for job in parse(reordered, folder).jobs}

    assert shuffled == original


def test_editing_a_prompt_changes_that_jobs_fingerprint_only(folder: Path) -> None:
    before = parse("jobs:\n  - {id: a, prompt: one}\n  - {id: b, prompt: two}\n", folder).jobs
    after = parse("jobs:\n  - {id: a, prompt: one}\n  - {id: b, prompt: two!}\n", folder).jobs

    assert before[0].fingerprint == after[0].fingerprint
    assert before[1].fingerprint != after[1].fingerprint


@pytest.mark.parametrize(
    ("header", "changes"),
    [
        ("", False),
        ("model: flux-kontext-max\n", False),
        ('version: "0.0.2"\n', True),
        ("model: other\n", True),
    ],
)
def test_model_and_version_are_part_of_the_fingerprint(folder: Path, header: str, changes: bool) -> None:
    base = parse("jobs: [{prompt: x}]\n", folder).jobs[0].fingerprint
    other = parse(header + "jobs: [{prompt: x}]\n", folder).jobs[0].fingerprint

    assert (other != base) is changes


def test_changing_image_bytes_changes_the_fingerprint(folder: Path) -> None:
    text = "jobs: [{id: a, prompt: x, input_image: images/street.jpg}]\n"
    before = parse(text, folder).jobs[0]
    write_image(folder / "images" / "street.jpg", color=(0, 0, 255))
    after = parse(text, folder).jobs[0]

    assert before.image_sha256 != after.image_sha256
    assert before.fingerprint != after.fingerprint


def test_moving_an_image_keeps_the_fingerprint_and_identical_bytes_share_one(folder: Path) -> None:
    data = (folder / "images" / "street.jpg").read_bytes()
    (folder / "elsewhere").mkdir()
    (folder / "elsewhere" / "renamed.jpg").write_bytes(data)

    first = parse("jobs: [{id: a, prompt: x, input_image: images/street.jpg}]\n", folder).jobs[0]
    moved = parse("jobs: [{id: a, prompt: x, input_image: elsewhere/renamed.jpg}]\n", folder).jobs[0]
    both = parse("matrix:\n  prompt: [x]\n  input_image: [images/street.jpg, elsewhere/renamed.jpg]\n", folder)

    assert moved.fingerprint == first.fingerprint
    assert moved.image_path == (folder / "elsewhere" / "renamed.jpg").resolve()
    assert len(both.jobs) == 1
    assert both.duplicates == 1


# --------------------------------------------------------------------------------------------------
# Ids


@pytest.mark.parametrize(
    ("fields", "prefix"),
    [
        (
            {
                "input_image": "https://example.com/photos/Harbour%20View.PNG?x=1",
                "prompt": "Turn it",
                "seed": 3,
            },
            "harbour-view-turn-it-s3-",
        ),
        ({"prompt": "Turn the scene into a snowy winter evening"}, "turn-the-scene-into-a-snowy-"),
        ({"prompt": "Café au lait, s'il vous plaît!", "seed": 0}, "cafe-au-lait-s-il-vous-plait-s0-"),
        ({"prompt": "x" * 50}, "x" * 32 + "-"),
        ({"prompt": "雪の夜"}, ""),
        ({"prompt": "p", "input_image": "images/street.jpg"}, "street-p-"),
        (
            {"prompt": "p", "input_image": "https://h.example/a-very-long-file-name-indeed-yes.jpg"},
            "a-very-long-file-name-in-p-",
        ),
        ({"prompt": "p", "input_image": "data:image/png;base64,AAAA"}, "p-"),
    ],
)
def test_derived_ids_are_readable_slugs_ending_in_the_fingerprint(
    folder: Path, fields: dict[str, Any], prefix: str
) -> None:
    text = "jobs:\n  - " + json.dumps(fields, ensure_ascii=False) + "\n"
    job = parse(text, folder).jobs[0]

    assert job.id == prefix + job.fingerprint[:8]
    assert DERIVED_ID.fullmatch(job.id)


def test_derived_ids_are_stable_across_parses(folder: Path) -> None:
    first = [job.id for job in parse(ISSUE_EXAMPLE, folder).jobs]
    second = [job.id for job in parse(ISSUE_EXAMPLE, folder).jobs]

    assert first == second
    assert first[0].startswith("street-turn-the-scene-into-a-snowy-s1-")
    assert len(set(first)) == len(first)


def test_numeric_id_keeps_the_text_as_written(folder: Path) -> None:
    job = parse("jobs: [{id: 007, prompt: x}]\n", folder).jobs[0]

    assert job.id == "007"


def test_hand_written_id_equal_to_a_derived_id_pushes_the_derived_one_longer(folder: Path) -> None:
    derived = parse("jobs: [{prompt: alpha}]\n", folder).jobs[0]
    text = f"jobs:\n  - {{prompt: alpha}}\n  - {{id: {derived.id}, prompt: beta}}\n"
    jobs = parse(text, folder).jobs

    assert jobs[0].id == "alpha-" + derived.fingerprint[:16]
    assert jobs[1].id == derived.id


# --------------------------------------------------------------------------------------------------
# Local images


def test_local_image_resolves_against_the_manifest_folder_not_the_working_directory(
    folder: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    job = parse("jobs: [{prompt: x, input_image: images/street.jpg}]\n", folder).jobs[0]

    assert job.input["input_image"] == "images/street.jpg"
    assert job.image_path == (folder / "images" / "street.jpg").resolve()
    assert job.image_path.is_absolute()
    assert job.image_sha256 == hashlib.sha256((folder / "images" / "street.jpg").read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "image", ["https://example.com/a.png", "http://example.com/a.png", "data:image/png;base64,iVBORw0KGgo="]
)
def test_urls_and_data_uris_are_not_local_files(folder: Path, image: str) -> None:
    job = parse(f'jobs: [{{prompt: x, input_image: "{image}"}}]\n', folder).jobs[0]

    assert job.input["input_image"] == image
    assert (job.image_path, job.image_sha256) == (None, None)


def test_each_local_image_is_hashed_once(folder: Path) -> None:
    calls: list[Path] = []

    def counting(path: Path) -> str:
        calls.append(path)
        return sha256_file(path)

    text = "defaults: {input_image: images/street.jpg}\nmatrix:\n  prompt: [a, b, c]\n  seed: [1, 2]\n"
    text += "jobs:\n  - {prompt: d}\n  - {prompt: e, input_image: ./images/../images/street.jpg}\n"
    manifest = parse(text, folder, hash_file=counting)

    assert len(manifest.jobs) == 8
    assert calls == [(folder / "images" / "street.jpg").resolve()]


def test_missing_local_image_names_the_file_and_the_jobs_using_it(folder: Path) -> None:
    text = """\
matrix:
  prompt: [a]
  input_image: [images/gone.png]
jobs:
  - {prompt: b, input_image: images/gone.png}
  - {id: named, prompt: c, input_image: images/gone.png}
"""
    with pytest.raises(InputImageError) as caught:
        parse(text, folder)

    assert caught.value.file == "images/gone.png"
    assert caught.value.jobs == ("matrix", "jobs[0]", "named")
    assert str(folder / "images" / "gone.png") in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("make", "problem"), [("dir", "is a directory, not an image file"), ("empty", "is empty")])
def test_local_image_must_be_a_non_empty_regular_file(folder: Path, make: str, problem: str) -> None:
    target = folder / "images" / "odd.png"
    if make == "dir":
        target.mkdir()
    else:
        target.write_bytes(b"")

    with pytest.raises(InputImageError, match=problem):
        parse("jobs: [{prompt: x, input_image: images/odd.png}]\n", folder)


def test_unreadable_image_becomes_input_image_error(folder: Path) -> None:
    def failing(path: Path) -> str:
        raise PermissionError(13, "Permission denied")

    with pytest.raises(InputImageError, match="Permission denied"):
        parse("jobs: [{prompt: x, input_image: images/street.jpg}]\n", folder, hash_file=failing)


# --------------------------------------------------------------------------------------------------
# Size limits


def test_batch_over_max_jobs_needs_allow_large(folder: Path) -> None:
    text = "matrix:\n  prompt: [a, b, c]\n  seed: [1, 2, 3]\n"
    with pytest.raises(ManifestError, match="expands to 9 jobs, more than 8; pass --allow-large"):
        parse(text, folder, max_jobs=8)

    assert len(parse(text, folder, max_jobs=8, allow_large=True).jobs) == 9
    assert len(parse(text, folder, max_jobs=9).jobs) == 9


def test_alias_inflated_matrix_is_refused_from_list_lengths_alone(folder: Path) -> None:
    text = "matrix:\n  seed: &s [" + ", ".join(str(i) for i in range(100)) + "]\n"
    text += "  safety_tolerance: [0, 1, 2, 3, 4, 5, 6]\n  prompt: *s\n  output_format: [png, jpg]\n"
    with pytest.raises(ManifestError, match="expands to 140,000 jobs"):
        parse(text, folder)


def test_billion_laughs_in_a_pass_through_field_fails_fast(folder: Path) -> None:
    lines = ["model: other", "defaults:", "  a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"  {name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]")
    with pytest.raises(ManifestError, match="too large") as caught:
        parse("\n".join(lines) + "\n", folder)

    assert caught.value.field in {"f", "g"}


def test_large_matrix_expands_to_unique_ids_and_fingerprints(folder: Path) -> None:
    images = [f"https://cdn.example.com/photos/image-{i}.jpg" for i in range(100)]
    prompts = [f"Turn scene {i} into a snowy winter evening" for i in range(100)]
    text = (
        "defaults: {aspect_ratio: match_input_image, safety_tolerance: 2}\nmatrix:\n"
        f"  input_image: {json.dumps(images)}\n  prompt: {json.dumps(prompts)}\n  seed: {list(range(10))}\n"
    )
    manifest = parse(text, folder, allow_large=True)

    assert len(manifest.jobs) == 100_000
    assert len({job.id for job in manifest.jobs}) == 100_000
    assert len({job.fingerprint for job in manifest.jobs}) == 100_000
    assert manifest.jobs[-1].fingerprint == reference_fingerprint(DEFAULT_MODEL, DEFAULT_VERSION, manifest.jobs[-1])


def test_default_max_jobs_is_ten_thousand() -> None:
    assert DEFAULT_MAX_JOBS == 10_000


@pytest.mark.parametrize("enabled", [True, False])
def test_parsing_leaves_the_garbage_collector_as_it_found_it(folder: Path, enabled: bool) -> None:
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        parse("jobs: [{prompt: x}]\n", folder)
        with pytest.raises(ManifestError):
            parse("jobs: [{seed: x}]\n", folder)
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


# --------------------------------------------------------------------------------------------------
# Broken manifests: each one ends in a ManifestError whose str() is one line naming file, job, field, line.

_LONG_PROMPT = "w" * 20_000
_HUGE_MATRIX = (
    "matrix:\n  seed: ["
    + ", ".join(map(str, range(200)))
    + "]\n  prompt: ["
    + ", ".join(f"p{i}" for i in range(60))
    + "]\n"
)

BROKEN: list[tuple[str, str, tuple[str, ...], int | None, str | None, str | None]] = [
    # (case, text, substrings of str(exc), line, job, field)
    ("bad yaml", "jobs: [{prompt: x}\n", ("invalid YAML",), 2, None, None),
    ("bad yaml indentation", "jobs:\n  - prompt: x\n   seed: 1\n", ("invalid YAML",), 3, None, None),
    ("tab indentation", "jobs:\n\t- prompt: x\n", ("tab", "spaces"), 2, None, None),
    (
        "two documents",
        "jobs: []\n---\njobs: []\n",
        ("invalid YAML: expected a single document in the stream, but found another",),
        2,
        None,
        None,
    ),
    ("control character", "jobs: [{prompt: \x07}]\n", ("invalid YAML", "#x0007"), 1, None, None),
    (
        "python tag",
        "jobs: [{prompt: !!python/object:os.system x}]\n",
        ("cannot read the value",),
        1,
        "jobs[0]",
        "prompt",
    ),
    ("empty file", "", ("empty",), None, None, None),
    ("only comments", "# nothing here\n\n", ("empty",), None, None, None),
    ("top-level list", "- prompt: x\n", ("must be a mapping", "got a list"), 1, None, None),
    ("top-level scalar", "just words\n", ("must be a mapping", "'just words'"), 1, None, None),
    (
        "unknown top key",
        "price: 1\njob:\n  - {prompt: x}\n",
        ("unknown key 'job'", "did you mean 'jobs'?"),
        2,
        None,
        None,
    ),
    ("unknown top key far", "zzz: 1\n", ("unknown key 'zzz'", "expected one of model"), 1, None, None),
    ("unknown field", "jobs:\n  - promt: x\n", ("did you mean 'prompt'?",), 2, "jobs[0]", "promt"),
    ("unknown field in defaults", "defaults:\n  seeed: 1\n", ("did you mean 'seed'?",), 2, None, "seeed"),
    (
        "unknown field in matrix",
        "matrix:\n  aspect: [1:1]\n",
        ("did you mean 'aspect_ratio'?",),
        2,
        "matrix",
        "aspect",
    ),
    (
        "seed string",
        "jobs:\n  - id: hero\n    prompt: x\n    seed: abc\n",
        ("must be an integer, got 'abc'",),
        4,
        "hero",
        "seed",
    ),
    (
        "seed bool",
        "jobs: [{prompt: x, seed: yes}]\n",
        ("must be an integer", "boolean"),
        1,
        "jobs[0]",
        "seed",
    ),
    (
        "seed float",
        "jobs: [{prompt: x, seed: 1.5}]\n",
        ("must be an integer, got 1.5",),
        1,
        "jobs[0]",
        "seed",
    ),
    (
        "seed negative",
        "jobs: [{prompt: x, seed: -1}]\n",
        ("between 0 and 9007199254740992",),
        1,
        "jobs[0]",
        "seed",
    ),
    (
        "seed too big",
        "jobs: [{prompt: x, seed: 9007199254740993}]\n",
        ("between 0 and",),
        1,
        "jobs[0]",
        "seed",
    ),
    (
        "seed in matrix",
        "matrix:\n  prompt: [x]\n  seed: [1,\n    two]\n",
        ("must be an integer",),
        4,
        "matrix",
        "seed",
    ),
    (
        "tolerance 7",
        "jobs: [{prompt: x, safety_tolerance: 7}]\n",
        ("from 0 to 6, got 7",),
        1,
        "jobs[0]",
        "safety_tolerance",
    ),
    (
        "tolerance text",
        "defaults: {safety_tolerance: '2'}\n",
        ("must be an integer",),
        1,
        None,
        "safety_tolerance",
    ),
    (
        "bad aspect ratio",
        "jobs: [{prompt: x, aspect_ratio: 7:5}]\n",
        ("must be one of", "got '7:5'"),
        1,
        "jobs[0]",
        "aspect_ratio",
    ),
    (
        "aspect ratio typo",
        "jobs: [{prompt: x, aspect_ratio: 16x9}]\n",
        ("did you mean '16:9'?",),
        1,
        "jobs[0]",
        "aspect_ratio",
    ),
    (
        "output format",
        "jobs: [{prompt: x, output_format: jpeg}]\n",
        ("did you mean 'jpg'?",),
        1,
        "jobs[0]",
        "output_format",
    ),
    ("empty prompt", "jobs:\n  - prompt: '   '\n", ("must not be empty",), 2, "jobs[0]", "prompt"),
    ("null prompt", "jobs:\n  - prompt:\n", ("must be a string, got null",), 2, "jobs[0]", "prompt"),
    ("prompt list", "jobs:\n  - prompt: [a, b]\n", ("must be a string, got a list",), 2, "jobs[0]", "prompt"),
    ("prompt number", "jobs: [{prompt: 42}]\n", ("must be a string, got 42",), 1, "jobs[0]", "prompt"),
    (
        "20k prompt",
        f"jobs:\n  - prompt: {_LONG_PROMPT}\n",
        ("20,000 characters", "10,000"),
        2,
        "jobs[0]",
        "prompt",
    ),
    ("missing prompt", "jobs:\n  - id: lonely\n    seed: 1\n", ("is required",), 2, "lonely", "prompt"),
    ("missing prompt in matrix", "\nmatrix:\n  seed: [1]\n", ("is required",), 2, "matrix", "prompt"),
    (
        "image empty",
        "jobs: [{prompt: x, input_image: ''}]\n",
        ("must not be empty",),
        1,
        "jobs[0]",
        "input_image",
    ),
    (
        "image ftp",
        "jobs: [{prompt: x, input_image: 'ftp://h/a.png'}]\n",
        ("scheme 'ftp'",),
        1,
        "jobs[0]",
        "input_image",
    ),
    (
        "image url no host",
        "jobs: [{prompt: x, input_image: 'https:///a.png'}]\n",
        ("no host",),
        1,
        "jobs[0]",
        "input_image",
    ),
    (
        "image number",
        "jobs: [{prompt: x, input_image: 3}]\n",
        ("must be a URL or a path",),
        1,
        "jobs[0]",
        "input_image",
    ),
    (
        "image too long",
        f"jobs: [{{prompt: x, input_image: 'https://h/{'a' * 10_000}'}}]\n",
        ("more than 10,000",),
        1,
        "jobs[0]",
        "input_image",
    ),
    ("matrix scalar", "matrix:\n  prompt: [x]\n  seed: 1\n", ("must be a list",), 3, "matrix", "seed"),
    (
        "matrix empty list",
        "matrix:\n  prompt: [x]\n  seed: []\n",
        ("must not be an empty list",),
        3,
        "matrix",
        "seed",
    ),
    ("matrix not mapping", "matrix: [1, 2]\n", ("must be a mapping",), 1, None, "matrix"),
    ("matrix null", "matrix:\n", ("must be a mapping", "null"), 1, None, "matrix"),
    ("defaults not mapping", "defaults: [a]\n", ("must be a mapping",), 1, None, "defaults"),
    ("jobs not a list", "jobs:\n  prompt: x\n", ("must be a list of jobs", "got a mapping"), 2, None, "jobs"),
    (
        "job not a mapping",
        "jobs:\n  - {prompt: x}\n  - just a string\n",
        ("must be a mapping",),
        3,
        "jobs[1]",
        None,
    ),
    (
        "duplicate key",
        "jobs:\n  - prompt: x\n    prompt: y\n",
        ("written twice", "line 2"),
        3,
        "jobs[0]",
        "prompt",
    ),
    ("non-string key", "jobs:\n  - {prompt: x, 1: y}\n", ("keys must be strings",), 2, "jobs[0]", None),
    (
        "duplicate ids",
        "jobs:\n  - {id: hero, prompt: a}\n  - {id: hero, prompt: b}\n",
        ("duplicate id", "line 2"),
        3,
        "hero",
        "id",
    ),
    (
        "ids differ in case",
        "jobs:\n  - {id: Hero, prompt: a}\n  - {id: hero, prompt: b}\n",
        ("letter case", "line 2"),
        3,
        "hero",
        "id",
    ),
    (
        "id dot dot slash",
        "jobs:\n  - {id: ../x, prompt: a}\n",
        ("must be 1-100 characters",),
        2,
        "jobs[0]",
        "id",
    ),
    ("id absolute", "jobs:\n  - {id: /abs, prompt: a}\n", ("must be 1-100 characters",), 2, "jobs[0]", "id"),
    (
        "id nul byte",
        'jobs:\n  - {id: "a\\0b", prompt: a}\n',
        ("must be 1-100 characters", "\\x00"),
        2,
        "jobs[0]",
        "id",
    ),
    ("id dots inside", "jobs:\n  - {id: a..b, prompt: a}\n", ("'..'",), 2, "jobs[0]", "id"),
    ("id trailing dot", "jobs:\n  - {id: a., prompt: a}\n", ("end with '.'",), 2, "jobs[0]", "id"),
    ("id CON", "jobs:\n  - {id: CON, prompt: a}\n", ("reserved",), 2, "jobs[0]", "id"),
    ("id nul.txt", "jobs:\n  - {id: nul.txt, prompt: a}\n", ("reserved",), 2, "jobs[0]", "id"),
    ("id com1", "jobs:\n  - {id: com1.tar.gz, prompt: a}\n", ("reserved",), 2, "jobs[0]", "id"),
    (
        "id too long",
        f"jobs:\n  - {{id: {'a' * 101}, prompt: a}}\n",
        ("1-100 characters",),
        2,
        "jobs[0]",
        "id",
    ),
    ("id empty", "jobs:\n  - {id: '', prompt: a}\n", ("1-100 characters",), 2, "jobs[0]", "id"),
    ("id list", "jobs:\n  - {id: [a], prompt: a}\n", ("must be a string",), 2, "jobs[0]", "id"),
    (
        "id in matrix",
        "matrix:\n  prompt: [x]\n  id: [a]\n",
        ("only be set on an explicit job",),
        3,
        "matrix",
        "id",
    ),
    (
        "huge matrix",
        _HUGE_MATRIX,
        ("expands to 12,000 jobs, more than 10,000", "--allow-large"),
        None,
        None,
        None,
    ),
    ("price negative", "price: -0.5\n", ("non-negative",), 1, None, "price"),
    ("price text", "price: cheap\n", ("must be a number", "'cheap'"), 1, None, "price"),
    ("price bool", "price: true\n", ("must be a number",), 1, None, "price"),
    ("price infinite", "price: .inf\n", ("non-negative",), 1, None, "price"),
    ("model empty", "model: ''\n", ("must not be empty",), 1, None, "model"),
    ("model number", "model: 5\n", ("must be a string",), 1, None, "model"),
    ("version float", "version: 1.0\n", ("must be a string", 'quote it: version: "1.0"'), 1, None, "version"),
    (
        "other model date",
        "model: other\ndefaults:\n  when: 2024-01-01\n",
        ("a date", "quote it"),
        3,
        None,
        "when",
    ),
    ("other model nan", "model: other\njobs: [{x: .nan}]\n", ("finite",), 2, "jobs[0]", "x"),
    (
        "other model set",
        "model: other\njobs: [{x: !!set {a, b}}]\n",
        ("no JSON equivalent",),
        2,
        "jobs[0]",
        "x",
    ),
    (
        "other model recursion",
        "model: other\ndefaults:\n  x: &a [1, *a]\n",
        ("refers to itself",),
        3,
        None,
        "x",
    ),
    (
        "other model long string",
        f"model: other\njobs: [{{x: {'y' * 10_001}}}]\n",
        ("10,001",),
        2,
        "jobs[0]",
        "x",
    ),
]


@pytest.mark.parametrize(
    ("text", "expected", "line", "job", "field"),
    [pytest.param(*case[1:], id=case[0]) for case in BROKEN],
)
def test_broken_manifest_ends_in_one_located_line(
    folder: Path,
    text: str,
    expected: tuple[str, ...],
    line: int | None,
    job: str | None,
    field: str | None,
) -> None:
    with pytest.raises(ManifestError) as caught:
        parse(text, folder)

    exc = caught.value
    message = str(exc)
    assert isinstance(exc, UsageError)
    assert exc.exit_code == 2
    assert "\n" not in message
    assert message.startswith(str(folder / "batch.yaml"))
    for part in expected:
        assert part in message
    assert (exc.line, exc.job, exc.field) == (line, job, field)
    if line is not None:
        assert f"batch.yaml:{line}:" in message
    if job is not None:
        assert f"job {job!r}" in message
    if field is not None:
        assert f"field {field!r}" in message


def test_broken_table_is_large_and_distinct() -> None:
    assert len(BROKEN) >= 25
    assert len({case[1] for case in BROKEN}) == len(BROKEN)


# --------------------------------------------------------------------------------------------------
# Reading files


def test_load_manifest_reads_the_file_and_resolves_images_next_to_it(folder: Path) -> None:
    path = folder / "batch.yaml"
    path.write_text(ISSUE_EXAMPLE, encoding="utf-8")

    manifest = load_manifest(path)

    assert manifest.path == path
    assert len(manifest.jobs) == 13
    assert manifest.jobs[0].image_path == (folder / "images" / "street.jpg").resolve()


WriteFile = Callable[[Path], None]


def _missing(path: Path) -> None:
    pass


def _directory(path: Path) -> None:
    path.mkdir()


def _latin1(path: Path) -> None:
    path.write_bytes(b"jobs:\n  - prompt: caf\xe9\n")


def _huge(path: Path) -> None:
    with path.open("wb") as fh:
        fh.truncate(10 * 1024 * 1024 + 1)


@pytest.mark.parametrize(
    ("make", "expected", "line"),
    [
        (_missing, "no such file", None),
        (_directory, "is a directory", None),
        (_latin1, "not UTF-8", 2),
        (_huge, "larger than 10 MB", None),
    ],
)
def test_unreadable_manifest_file_is_a_manifest_error(
    tmp_path: Path, make: WriteFile, expected: str, line: int | None
) -> None:
    path = tmp_path / "batch.yaml"
    make(path)

    with pytest.raises(ManifestError) as caught:
        load_manifest(path)

    assert expected in str(caught.value)
    assert str(path) in str(caught.value)
    assert caught.value.line == line
    assert "\n" not in str(caught.value)


def test_sha256_file_streams_the_whole_file(tmp_path: Path) -> None:
    data = bytes(range(256)) * 20_000  # several chunks
    path = tmp_path / "blob.bin"
    path.write_bytes(data)

    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
