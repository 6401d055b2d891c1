"""Tests of batchrunner.manifest.schema: validation by table on the flux-kontext schema shape, and the schema cache."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchrunner.errors import OutputError
from batchrunner.manifest.schema import cached_schema_path, load_cached_schema, save_cached_schema, validate_input
from batchrunner.sim.model import REQUEST_SCHEMA

# The simulator's flux-kontext schema, closed to unknown fields as a strict model's schema would be.
FLUX: dict[str, Any] = {**REQUEST_SCHEMA, "additionalProperties": False}
OK: dict[str, Any] = {"prompt": "Turn the scene into a snowy winter evening"}
URL = "https://upload.invalid/image.png"  # the placeholder the caller puts where a local image will go
RATIOS = (
    "'match_input_image', '1:1', '16:9', '9:16', '4:3', '3:4', '3:2', '2:3', '4:5', '5:4', '21:9', '9:21', '2:1', '1:2'"
)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        # valid inputs
        ({}, []),
        ({"input_image": URL}, []),
        ({"input_image": "http://example.com/a.jpg"}, []),
        ({"input_image": "data:image/png;base64,iVBORw0KGgo="}, []),
        ({"aspect_ratio": "16:9"}, []),
        ({"seed": 0}, []),
        ({"seed": 2**40}, []),
        ({"seed": 7.0}, []),  # JSON Schema: an integral float is an integer
        ({"safety_tolerance": 0}, []),
        ({"safety_tolerance": 6}, []),
        ({"output_format": "jpg"}, []),
        # required and lengths
        ({"prompt": ""}, ["field 'prompt': must not be empty"]),
        ({"prompt": None}, ["field 'prompt': must be a string, got null"]),
        ({"prompt": 42}, ["field 'prompt': must be a string, got 42"]),
        ({"prompt": ["a"]}, ["field 'prompt': must be a string, got a list"]),
        # integers
        ({"seed": True}, ["field 'seed': must be an integer, got true"]),
        ({"seed": 1.5}, ["field 'seed': must be an integer, got 1.5"]),
        ({"seed": "7"}, ["field 'seed': must be an integer, got '7'"]),
        ({"seed": float("nan")}, ["field 'seed': must be an integer, got nan"]),
        ({"seed": 10**40}, []),
        ({"safety_tolerance": -1}, ["field 'safety_tolerance': must be at least 0, got -1"]),
        ({"safety_tolerance": 7}, ["field 'safety_tolerance': must be at most 6, got 7"]),
        ({"safety_tolerance": 2.5}, ["field 'safety_tolerance': must be an integer, got 2.5"]),
        ({"safety_tolerance": False}, ["field 'safety_tolerance': must be an integer, got false"]),
        # enums
        (
            {"output_format": "jpeg"},
            ["field 'output_format': must be one of 'png', 'jpg'; got 'jpeg'; did you mean 'jpg'?"],
        ),
        ({"output_format": "tiff"}, ["field 'output_format': must be one of 'png', 'jpg'; got 'tiff'"]),
        (
            {"output_format": "PNG"},
            ["field 'output_format': must be one of 'png', 'jpg'; got 'PNG'; did you mean 'png'?"],
        ),
        ({"aspect_ratio": "7:5"}, [f"field 'aspect_ratio': must be one of {RATIOS}; got '7:5'"]),
        (
            {"aspect_ratio": 969},
            [
                "field 'aspect_ratio': must be a string, got 969; "
                "YAML reads an unquoted 16:9 as the number 969: write '16:9' in quotes"
            ],
        ),
        # format uri
        (
            {"input_image": "images/street.jpg"},
            ["field 'input_image': must be an http(s) URL or a data: URI, got 'images/street.jpg'"],
        ),
        (
            {"input_image": "ftp://example.com/a.png"},
            ["field 'input_image': must be an http(s) URL or a data: URI, got 'ftp://example.com/a.png'"],
        ),
        ({"input_image": "https://"}, ["field 'input_image': must be an http(s) URL or a data: URI, got 'https://'"]),
        (
            {"input_image": "https://exa mple.com/a.png"},
            ["field 'input_image': must be an http(s) URL or a data: URI, got 'https://exa mple.com/a.png'"],
        ),
        (
            {"input_image": "http://[::1/a.png"},
            ["field 'input_image': must be an http(s) URL or a data: URI, got 'http://[::1/a.png'"],
        ),
        # unknown fields
        ({"sed": 3}, ["unknown field 'sed'; did you mean 'seed'?"]),
        ({"negative_prompt": "x"}, ["unknown field 'negative_prompt'"]),
        ({"aspect_ration": "1:1"}, ["unknown field 'aspect_ration'; did you mean 'aspect_ratio'?"]),
        # several problems at once, each reported
        (
            {"seed": "x", "safety_tolerance": 9, "colour": "red"},
            [
                "field 'seed': must be an integer, got 'x'",
                "field 'safety_tolerance': must be at most 6, got 9",
                "unknown field 'colour'",
            ],
        ),
    ],
)
def test_flux_input_is_validated(extra: dict[str, Any], expected: list[str]) -> None:
    assert validate_input({**OK, **extra}, FLUX) == expected


def test_missing_required_field_is_reported_first() -> None:
    assert validate_input({"seed": "x"}, FLUX) == [
        "field 'prompt': is required",
        "field 'seed': must be an integer, got 'x'",
    ]


def test_unknown_fields_pass_when_the_schema_does_not_close_the_object() -> None:
    assert validate_input({**OK, "negative_prompt": "blur"}, REQUEST_SCHEMA) == []


def test_input_that_is_not_a_mapping_is_one_problem() -> None:
    assert validate_input([], FLUX) == ["input: must be a mapping, got a list"]  # type: ignore[arg-type]


OBJ = "object"


@pytest.mark.parametrize(
    ("schema", "value", "expected"),
    [
        ({"type": ["string", "null"]}, None, []),
        ({"type": ["string", "null"]}, 3, ["field 'x': must be a string or null, got 3"]),
        ({"type": "number"}, True, ["field 'x': must be a number, got true"]),
        ({"type": "number"}, float("inf"), ["field 'x': must be a number, got inf"]),
        ({"type": "number", "exclusiveMinimum": 0}, 0, ["field 'x': must be more than 0, got 0"]),
        ({"type": "number", "exclusiveMaximum": 1}, 1.0, ["field 'x': must be less than 1, got 1"]),
        ({"type": "number", "minimum": 0, "exclusiveMinimum": True}, 0, ["field 'x': must be more than 0, got 0"]),
        ({"type": "number", "maximum": 0.5}, 0.75, ["field 'x': must be at most 0.5, got 0.75"]),
        ({"type": "boolean"}, 1, ["field 'x': must be a boolean (true or false), got 1"]),
        ({"enum": [1, 2]}, True, ["field 'x': must be one of 1, 2; got true"]),
        ({"enum": [1, 2]}, 1.0, []),
        ({"const": "v1"}, "v2", ["field 'x': must be 'v1', got 'v2'"]),
        ({"type": "string", "maxLength": 3}, "abcd", ["field 'x': must be at most 3 characters long, got 4"]),
        ({"type": "string", "minLength": 3}, "ab", ["field 'x': must be at least 3 characters long, got 2"]),
        ({"type": "string", "maxLength": 1}, "é", []),  # characters, not bytes
        ({"pattern": "^[a-z]+$"}, "abc", []),
        ({"pattern": "^[a-z]+$"}, "ab1", ["field 'x': must match the pattern '^[a-z]+$', got 'ab1'"]),
        ({"pattern": "b"}, "abc", []),  # unanchored, as JSON Schema says
        ({"pattern": "("}, "abc", []),  # a pattern Python cannot read is ignored
        ({"type": "array", "minItems": 1}, [], ["field 'x': must have at least 1 item, got 0"]),
        ({"type": "array", "maxItems": 2}, [1, 2, 3], ["field 'x': must have at most 2 items, got 3"]),
        (
            {"type": "array", "items": {"type": "string", "format": "uri"}},
            [URL, "a.png"],
            ["field 'x[1]': must be an http(s) URL or a data: URI, got 'a.png'"],
        ),
        (
            {"type": "array", "items": [{"type": "string"}, {"type": "integer"}]},
            ["a", "b"],
            ["field 'x[1]': must be an integer, got 'b'"],
        ),
        (
            {"type": OBJ, "properties": {"scale": {"type": "number"}}, "required": ["path"]},
            {"scale": "big"},
            ["field 'x.path': is required", "field 'x.scale': must be a number, got 'big'"],
        ),
        ({"type": OBJ, "properties": {"a": {}}, "additionalProperties": False}, {"b": 1}, ["unknown field 'x.b'"]),
        (
            {"type": OBJ, "additionalProperties": {"type": "integer"}},
            {"b": "1"},
            ["field 'x.b': must be an integer, got '1'"],
        ),
        (
            {"type": OBJ, "patternProperties": {"^w_": {"type": "number"}}, "additionalProperties": False},
            {"w_a": 1},
            [],
        ),
        ({"anyOf": [{"type": "integer"}, {"type": "null"}]}, "7", ["field 'x': must be an integer or null, got '7'"]),
        ({"anyOf": [{"type": "integer"}, {"type": "null"}]}, None, []),
        (
            {"oneOf": [{"type": "string", "enum": ["low", "high"]}, {"type": "integer", "minimum": 1}]},
            "mid",
            ["field 'x': must be one of 'low', 'high'; got 'mid'"],
        ),
        ({"allOf": [{"minimum": 1}, {"maximum": 3}]}, 5, ["field 'x': must be at most 3, got 5"]),
        ({"allOf": [{"$ref": "#/definitions/Size"}]}, "anything", []),  # $ref is not followed: no false alarm
        ({"type": "string", "nullable": True}, None, []),
        ({"type": "integer", "minimum": "0"}, -5, []),  # a malformed keyword is ignored
        ({"type": "uuid"}, 5, []),  # an unknown type is not checked
        # jsonschema checks the formats it can without optional packages: an address without "@" is no email.
        ({"format": "email"}, "not-an-email", ["field 'x': must be a valid email, got 'not-an-email'"]),
        (False, 1, ["field 'x': is not allowed here"]),
        (True, 1, []),
    ],
)
def test_schema_keyword_is_checked(schema: Any, value: Any, expected: list[str]) -> None:
    assert validate_input({"x": value}, {"type": "object", "properties": {"x": schema}}) == expected


def test_long_enum_is_shown_shortened() -> None:
    schema = {"properties": {"x": {"enum": [f"v{i}" for i in range(30)]}}}
    (problem,) = validate_input({"x": "nope"}, schema)
    assert "'v19', ... (30 in all); got 'nope'" in problem


def test_absurdly_deep_schema_is_checked_to_a_depth_and_never_crashes() -> None:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(5000):
        schema = {"allOf": [schema]}
    assert validate_input({"x": "text"}, {"properties": {"x": schema}}) == []


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=12,
)
KEYWORDS = st.sampled_from(
    [
        "type",
        "enum",
        "const",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "minLength",
        "maxLength",
        "pattern",
        "format",
        "required",
        "properties",
        "patternProperties",
        "additionalProperties",
        "items",
        "minItems",
        "maxItems",
        "anyOf",
        "oneOf",
        "allOf",
        "nullable",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(KEYWORDS, JSON, max_size=6), st.dictionaries(st.text(max_size=5), JSON, max_size=4))
def test_validation_never_raises_whatever_the_schema_holds(schema: dict[str, Any], value: dict[str, Any]) -> None:
    problems = validate_input(value, schema)
    assert all(isinstance(p, str) and "\n" not in p for p in problems)


# --- the cache ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("slug", "name"),
    [
        ("flux-kontext-max", ".schema-flux-kontext-max.json"),
        ("nano-banana-pro_edit.v2", ".schema-nano-banana-pro_edit.v2.json"),
    ],
)
def test_cache_path_keeps_a_safe_slug(tmp_path: Path, slug: str, name: str) -> None:
    assert cached_schema_path(tmp_path, slug) == tmp_path / name


@pytest.mark.parametrize("slug", ["../../etc/passwd", "a/b", "a b", "", "ünïcode", "x" * 300])
def test_cache_path_of_an_odd_slug_stays_in_the_folder_and_is_its_own(tmp_path: Path, slug: str) -> None:
    path = cached_schema_path(tmp_path, slug)
    assert path.parent == tmp_path
    assert path.name.startswith(".schema-")
    assert path.name.endswith(".json")
    assert len(path.name) < 120
    assert path != cached_schema_path(tmp_path, slug + "_")


def test_saved_schema_loads_back(tmp_path: Path) -> None:
    save_cached_schema(tmp_path, "flux-kontext-max", REQUEST_SCHEMA)
    assert load_cached_schema(tmp_path, "flux-kontext-max") == REQUEST_SCHEMA
    assert [p.name for p in tmp_path.iterdir()] == [".schema-flux-kontext-max.json"]  # no temporary file left


def test_saving_again_replaces_the_schema(tmp_path: Path) -> None:
    save_cached_schema(tmp_path, "m", {"type": "object"})
    save_cached_schema(tmp_path, "m", REQUEST_SCHEMA)
    assert load_cached_schema(tmp_path, "m") == REQUEST_SCHEMA


def test_nothing_cached_loads_as_none(tmp_path: Path) -> None:
    assert load_cached_schema(tmp_path, "flux-kontext-max") is None
    assert load_cached_schema(tmp_path / "missing", "flux-kontext-max") is None


@pytest.mark.parametrize(
    ("age", "fresh"),
    [(0.0, True), (7 * 86400 - 1, True), (7 * 86400 + 1, False), (-60.0, True), (-8 * 86400, False)],
    ids=["new", "just-fresh", "expired", "clock-behind", "far-future"],
)
def test_cache_expires_after_max_age(tmp_path: Path, age: float, fresh: bool) -> None:
    save_cached_schema(tmp_path, "m", REQUEST_SCHEMA)
    written = cached_schema_path(tmp_path, "m").stat().st_mtime
    loaded = load_cached_schema(tmp_path, "m", now=written + age)
    assert (loaded == REQUEST_SCHEMA) if fresh else (loaded is None)


def test_max_age_is_settable(tmp_path: Path) -> None:
    save_cached_schema(tmp_path, "m", REQUEST_SCHEMA)
    written = cached_schema_path(tmp_path, "m").stat().st_mtime
    assert load_cached_schema(tmp_path, "m", max_age=10, now=written + 11) is None
    assert load_cached_schema(tmp_path, "m", max_age=10, now=written + 9) == REQUEST_SCHEMA


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b"\xff\xfe\x00garbage",
        b"[1, 2]",
        b'{"slug": "m"}',
        b'{"slug": "m", "schema": "text"}',
        b'{"slug": "other", "schema": {"type": "object"}}',
        b"[" * 100_000,
    ],
    ids=["empty", "torn", "binary", "list", "no-schema", "schema-not-object", "other-slug", "deep"],
)
def test_corrupt_cache_loads_as_none(tmp_path: Path, content: bytes) -> None:
    cached_schema_path(tmp_path, "m").write_bytes(content)
    assert load_cached_schema(tmp_path, "m") is None


def test_cache_folder_that_is_missing_is_an_output_error(tmp_path: Path) -> None:
    with pytest.raises(OutputError) as caught:
        save_cached_schema(tmp_path / "missing", "m", REQUEST_SCHEMA)
    assert str(caught.value).startswith(f"{tmp_path / 'missing' / '.schema-m.json'}: cannot write")
    assert caught.value.exit_code == 74


def test_cache_folder_that_is_a_file_is_an_output_error(tmp_path: Path) -> None:
    blocker = tmp_path / "out"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match="cannot write the model's schema cache"):
        save_cached_schema(blocker, "m", REQUEST_SCHEMA)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_read_only_cache_folder_is_an_output_error(tmp_path: Path) -> None:
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(OutputError):
            save_cached_schema(tmp_path, "m", REQUEST_SCHEMA)
    finally:
        tmp_path.chmod(0o755)


def test_failed_replace_leaves_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OutputError, match="No space left on device"):
        save_cached_schema(tmp_path, "m", REQUEST_SCHEMA)
    assert list(tmp_path.iterdir()) == []


def test_cache_file_is_json_naming_its_slug(tmp_path: Path) -> None:
    save_cached_schema(tmp_path, "m", {"type": "object"})
    document = json.loads(cached_schema_path(tmp_path, "m").read_text(encoding="utf-8"))
    assert document == {"slug": "m", "schema": {"type": "object"}}


# --- jsonschema: drafts, $ref, formats, hostile schemas -------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "value", "expected"),
    [
        # $ref is followed within the schema (it used to be ignored)
        (
            {"$defs": {"Size": {"enum": ["s", "m"]}}, "properties": {"x": {"$ref": "#/$defs/Size"}}},
            "l",
            ["field 'x': must be one of 's', 'm'; got 'l'"],
        ),
        (
            {"definitions": {"N": {"type": "integer"}}, "properties": {"x": {"$ref": "#/definitions/N"}}},
            "1",
            ["field 'x': must be an integer, got '1'"],
        ),
        ({"$defs": {"N": {"type": "integer"}}, "properties": {"x": {"$ref": "#/$defs/N"}}}, 3, []),
        # the draft comes from $schema
        (
            {
                "$schema": "http://json-schema.org/draft-04/schema#",
                "properties": {"x": {"minimum": 0, "exclusiveMinimum": True}},
            },
            0,
            ["field 'x': must be more than 0, got 0"],
        ),
        (
            {
                "$schema": "http://json-schema.org/draft-07/schema#",
                "properties": {"x": {"items": [{"type": "string"}]}},
            },
            [1],
            ["field 'x[0]': must be a string, got 1"],
        ),
        (
            {"properties": {"x": {"prefixItems": [{"type": "string"}, {"type": "integer"}]}}},
            ["a", "b"],
            ["field 'x[1]': must be an integer, got 'b'"],
        ),
        # keywords the subset never knew
        (
            {"properties": {"x": {"oneOf": [{"type": "integer"}, {"minimum": 0}]}}},
            5,
            ["field 'x': matches more than one of the choices its schema allows only one of (oneOf)"],
        ),
        (
            {"properties": {"x": {"not": {"const": "auto"}}}},
            "auto",
            ["field 'x': must not be 'auto' (the schema excludes it)"],
        ),
        ({"properties": {"x": {"multipleOf": 8}}}, 12, ["field 'x': must be a multiple of 8, got 12"]),
        ({"properties": {"x": {"uniqueItems": True}}}, [1, 1], ["field 'x': [1, 1] has non-unique elements"]),
        ({"if": {"required": ["mask"]}, "then": {"required": ["image"]}}, None, ["field 'image': is required"]),
        ({"dependentRequired": {"mask": ["image"]}}, "m", ["input: 'image' is a dependency of 'mask'"]),
        # formats that matter
        (
            {"properties": {"x": {"format": "uuid"}}},
            "not-a-uuid",
            ["field 'x': must be a valid uuid, got 'not-a-uuid'"],
        ),
        (
            {"properties": {"x": {"format": "date"}}},
            "2026-13-40",
            ["field 'x': must be a valid date, got '2026-13-40'"],
        ),
        ({"properties": {"x": {"format": "date"}}}, "2026-02-03", []),
        ({"properties": {"x": {"format": "hostname"}}}, "not a host", []),  # needs an optional package: unchecked
        # numbers JSON cannot carry are not numbers
        ({"properties": {"x": {"type": "integer"}}}, float("inf"), ["field 'x': must be an integer, got inf"]),
        ({"properties": {"x": {"type": "number"}}}, float("nan"), ["field 'x': must be a number, got nan"]),
        # OpenAPI 3.0 spellings, without $schema
        ({"properties": {"x": {"enum": ["a"], "nullable": True}}}, None, []),
        (
            {"properties": {"x": {"type": "integer", "maximum": 6, "exclusiveMaximum": True}}},
            6,
            ["field 'x': must be less than 6, got 6"],
        ),
        ({"properties": {"x": {"type": "integer", "maximum": 6, "exclusiveMaximum": False}}}, 6, []),
    ],
)
def test_jsonschema_judges(schema: dict[str, Any], value: Any, expected: list[str]) -> None:
    instance = {"x": value} if value is not None or "properties" in schema else {"mask": "m"}
    if "dependentRequired" in schema:
        instance = {"mask": "m"}
    assert validate_input(instance, schema) == expected


@pytest.mark.parametrize(
    ("schema", "warning"),
    [
        ({"properties": {"x": {"$ref": "https://schemas.example.com/size.json"}}}, "remote references are not fetched"),
        ({"properties": {"x": {"$ref": "size.json#/Size"}}}, "remote references are not fetched"),
        ({"properties": {"x": {"$ref": "#/$defs/missing"}}}, "is not in the schema"),
        (
            {
                "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}},
                "properties": {"x": {"$ref": "#/$defs/a"}},
            },
            "refers to itself",
        ),
        ({"properties": {"x": {"$ref": "#"}}, "$ref": "#"}, "refers to itself"),
        ([1, 2], None),  # not a schema at all: nothing to check, nothing to say
    ],
    ids=["remote-absolute", "remote-relative", "dangling", "loop", "self-loop", "not-a-schema"],
)
def test_schema_that_cannot_be_used_warns_once_and_checks_nothing(
    schema: Any, warning: str | None, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket
    import urllib.request

    def no_network(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the schema check touched the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert validate_input({"x": "l"}, schema) == []
    assert validate_input({"x": "m"}, schema) == []
    said = [r.getMessage() for r in caplog.records]
    if warning is None:
        assert said == []
    else:
        assert len(said) == 1 and warning in said[0] and "inputs go unchecked" in said[0]


@pytest.mark.parametrize(
    ("pattern", "text"),
    [
        ("^(a+)+$", "a" * 40 + "b"),  # exponential in re; regex matches it in linear time
        ("^(\\w+\\s?)*$", "a" * 40 + "!"),
        ("(x+x+)+y", "x" * 40),
        ("^((a+)+)+$", "a" * 40 + "b"),
    ],
)
def test_backtracking_pattern_is_judged_at_once(pattern: str, text: str) -> None:
    import time

    schema = {"properties": {"x": {"pattern": pattern}}}
    started = time.monotonic()
    (problem,) = validate_input({"x": text}, schema)
    assert time.monotonic() - started < 0.5
    assert problem.startswith("field 'x': must match the pattern")


@pytest.mark.parametrize(
    "schema",
    [
        {"properties": {"x": {"pattern": "^(a|aa)+$"}}},
        {"patternProperties": {"^(a|aa)+$": {"type": "integer"}}},
        {"properties": {}, "patternProperties": {"^(a|aa)+$": {}}, "additionalProperties": False},
        {"propertyNames": {"pattern": "^(a|aa)+$"}},
        {"patternProperties": {"^(a|aa)+$": {}}, "unevaluatedProperties": False},
    ],
    ids=["pattern", "patternProperties", "additionalProperties", "propertyNames", "unevaluatedProperties"],
)
def test_pattern_that_never_ends_is_cut_short_with_one_warning(
    schema: dict[str, Any], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    import batchrunner.manifest.patterns as module

    monkeypatch.setattr(module, "PATTERN_TIMEOUT", 0.05)
    monkeypatch.setattr(module, "_compiled", {})
    hostile = "a" * 60 + "b"
    # The hostile text where each keyword matches it: a value for pattern, a field name for the others.
    instance = {"x": hostile} if "properties" in schema and "x" in schema["properties"] else {hostile: "v"}
    started = time.monotonic()
    for _ in range(3):
        assert validate_input(instance, dict(schema)) == []
    assert time.monotonic() - started < 2
    said = {r.getMessage() for r in caplog.records}
    assert len(said) == 1 and "took more than 0.05 s to match; it is not checked" in said.pop()


@pytest.mark.parametrize("pattern", ["(", "[a-", "(?P<x>a)(?P<x>b)", "a{2,1}"])
def test_unreadable_pattern_is_not_checked(pattern: str) -> None:
    assert validate_input({"x": "abc"}, {"properties": {"x": {"pattern": pattern}}}) == []


def test_pattern_only_regex_reads_is_checked() -> None:
    schema = {"properties": {"x": {"pattern": "^\\p{L}+$"}}}  # Unicode classes: ECMA 262 has them, re does not
    assert validate_input({"x": "Café"}, schema) == []
    assert validate_input({"x": "C4fé"}, schema) == ["field 'x': must match the pattern '^\\\\p{L}+$', got 'C4fé'"]


def test_huge_schema_is_checked_in_reasonable_time() -> None:
    import time

    # A guard against blow-ups (quadratic or worse), not a speed target: CPU time, not wall time, so that a loaded
    # machine does not fail it; 5,000 properties take well under a second of CPU.
    schema = {"type": "object", "properties": {f"f{i}": {"type": "integer"} for i in range(5_000)}}
    started = time.process_time()
    assert validate_input({"f7": "x"}, schema) == ["field 'f7': must be an integer, got 'x'"]
    assert time.process_time() - started < 10
