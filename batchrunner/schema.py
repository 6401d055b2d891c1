"""Check a job's input against a model's JSON Schema before it is sent, and cache that schema per run folder.

For models other than flux-kontext-max (whose fields ``manifest.py`` checks itself), the API describes the
``input`` it takes in ``request_schema`` of ``GET /v1/model?slug=NAME``: a flat JSON Schema of an object
whose properties carry a type and a few constraints. :func:`validate_input` finds every problem in one input
and says each in one line, so a whole batch fails before the first prediction is paid for.

Decision: **a subset of our own, not the ``jsonschema`` package.** The Eachlabs schemas use a small, flat part
of JSON Schema (type, enum, bounds, lengths, required). ``jsonschema`` would bring four packages (one of
them a compiled Rust extension) for features these schemas do not use, and its messages ("'jpeg' is not one of
['png', 'jpg']") would still need rewriting into ours with a did-you-mean. Code of ours here is about 250
lines, tested by table.

Keywords checked:

- ``type``: string, integer, number, boolean, array, object, null, or a list of these. An integer is an int
  or an integral float, never a boolean; a number is never a boolean, NaN or infinity.
- ``enum``, ``const``: compared as JSON compares (``true`` is not ``1``; ``1`` equals ``1.0``).
- ``minimum``, ``maximum``, ``exclusiveMinimum``, ``exclusiveMaximum`` (numbers, or draft-4 booleans).
- ``minLength``, ``maxLength`` (in characters), ``pattern`` (searched, unanchored, as JSON Schema says).
- ``format: uri``: an http(s) URL with a host, or a ``data:`` URI, the only things the API can fetch.
- ``required``, ``properties``, ``patternProperties``, ``additionalProperties`` (``false``: an unknown field
  is reported with a did-you-mean; a schema: extra fields are checked against it).
- ``items`` (one schema for all items, or a list for positions), ``minItems``, ``maxItems``.
- ``anyOf``, ``oneOf`` (as "some branch matches": with ``$ref`` ignored, branches can look alike, so
  "exactly one" cannot be judged), ``allOf``; OpenAPI's ``nullable: true``.

Everything else is ignored, including ``$ref``, other formats, ``not``, ``if``/``then`` and keywords whose
value is of the wrong kind (a schema is data from the network: a malformed keyword must not stop a run).
Ignoring errs on the side of letting an input through: the API remains the final judge, and a false alarm
would block a batch the API would have run.

Validation happens on the value the API will receive. A local file for an image field is uploaded and sent as
a URL, so the caller puts a placeholder URL (such as ``https://upload.invalid/image.png``) in its place before
calling :func:`validate_input`; a relative path there would fail ``format: uri``.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from batchrunner.errors import OutputError

__all__ = ["cached_schema_path", "load_cached_schema", "save_cached_schema", "validate_input"]

_MAX_ENUM_SHOWN = 20
_MAX_DEPTH = 100
_MAX_CACHE_BYTES = 10 * 1024 * 1024
_SAFE_SLUG = re.compile(r"[A-Za-z0-9._-]{1,100}")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
# Where a value sits in the input: field names and list positions.
_Where = tuple[str | int, ...]
_TYPE_WORDS = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean (true or false)",
    "array": "a list",
    "object": "a mapping",
    "null": "null",
}


def validate_input(input: Mapping[str, Any], schema: Mapping[str, Any]) -> list[str]:
    """Every problem of ``input`` against ``schema``, one line each (``field 'x': must be ...``); [] if valid.

    Never raises, whatever the schema holds: keywords outside the subset in the module docstring, or of the
    wrong shape, are ignored.
    """
    problems: list[_Problem] = []
    _check(input, schema, (), problems)
    return [problem.line() for problem in problems]


def cached_schema_path(out_dir: Path, slug: str) -> Path:
    """Where a model's schema is cached in the output folder: ``<out>/.schema-<safe slug>.json``.

    A slug of letters, digits, ``.``, ``_`` and ``-`` is used as written; any other slug is cleaned and given
    a hash of itself, so two slugs never share a file and no slug can name a path outside ``out_dir``.
    """
    if _SAFE_SLUG.fullmatch(slug):
        name = slug
    else:
        cleaned = _UNSAFE_CHARS.sub("_", slug)[:64]
        name = f"{cleaned}-{hashlib.sha256(slug.encode('utf-8', 'surrogatepass')).hexdigest()[:12]}"
    return out_dir / f".schema-{name}.json"


def load_cached_schema(
    out_dir: Path, slug: str, *, max_age: float = 7 * 86400, now: float | None = None
) -> Mapping[str, Any] | None:
    """The cached schema of ``slug``, or None when there is none, it is older than ``max_age`` seconds, or the
    file is unreadable, corrupt or belongs to another slug (a case-insensitive file system can fold two slugs
    into one name). Age is the file's modification time against ``now`` (default: the current Unix time); a
    file dated more than ``max_age`` in the future (a clock that jumped) is stale too.
    """
    path = cached_schema_path(out_dir, slug)
    try:
        with path.open("rb") as fh:
            modified = os.fstat(fh.fileno()).st_mtime
            data = fh.read(_MAX_CACHE_BYTES + 1)
    except OSError:
        return None
    current = time.time() if now is None else now
    if len(data) > _MAX_CACHE_BYTES or abs(current - modified) > max_age:
        return None
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict) or document.get("slug") != slug:
        return None
    schema = document.get("schema")
    return schema if isinstance(schema, dict) else None


def save_cached_schema(out_dir: Path, slug: str, schema: Mapping[str, Any]) -> None:
    """Cache ``schema`` for ``slug`` in ``out_dir`` (which must exist); OSError becomes OutputError.

    Written to a temporary file and renamed over the old one, so a reader sees the old file or the new one,
    never half of one. Not fsynced: a file a crash leaves empty or torn reads as corrupt, i.e. not cached.
    """
    path = cached_schema_path(out_dir, slug)
    text = json.dumps({"slug": slug, "schema": schema}, ensure_ascii=False)
    try:
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f"{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise OutputError(f"{path}: cannot write the model's schema cache: {reason}") from None


# --------------------------------------------------------------------------------------------------
# The checks


@dataclass(frozen=True, slots=True)
class _Problem:
    """One problem at one place. ``expected`` is set for a type mismatch, so ``anyOf`` can merge them."""

    path: _Where
    message: str
    expected: tuple[str, ...] = ()
    got: str = ""
    unknown: bool = False

    def line(self) -> str:
        if self.unknown:
            return self.message
        return f"{_where(self.path)}: {self.message}"


def _check(value: Any, schema: Any, path: _Where, out: list[_Problem], depth: int = 0) -> None:
    """Append the problems of ``value`` against ``schema`` to ``out``."""
    if depth > _MAX_DEPTH:
        return  # no model publishes a schema this deep (allOf in allOf ...): stop rather than crash
    if schema is False:
        out.append(_Problem(path, "is not allowed here"))
        return
    if not isinstance(schema, Mapping):
        return  # True, or something that is not a schema: nothing to check
    if value is None and schema.get("nullable") is True:
        return

    types = _types(schema.get("type"))
    if types and not any(_is_type(value, name) for name in types):
        words = tuple(_TYPE_WORDS[name] for name in types)
        choices = schema.get("enum")
        hint = _enum_hint(value, choices) if isinstance(choices, list) and not isinstance(value, str) else ""
        message = f"must be {_or(words)}, got {_describe(value)}{hint}"
        out.append(_Problem(path, message, expected=words, got=_describe(value)))
        return

    before = len(out)
    _check_enum_const(value, schema, path, out)
    if _is_number(value):
        _check_number(value, schema, path, out)
    elif isinstance(value, str):
        _check_string(value, schema, path, out)
    elif isinstance(value, list | tuple):
        _check_array(value, schema, path, out, depth)
    elif isinstance(value, Mapping):
        _check_object(value, schema, path, out, depth)
    if len(out) == before:
        _check_combinators(value, schema, path, out, depth)


def _check_enum_const(value: Any, schema: Mapping[str, Any], path: _Where, out: list[_Problem]) -> None:
    if "const" in schema and not _json_equal(value, schema["const"]):
        out.append(_Problem(path, f"must be {_describe(schema['const'])}, got {_describe(value)}"))
    choices = schema.get("enum")
    if isinstance(choices, list) and choices and not any(_json_equal(value, c) for c in choices):
        shown = ", ".join(_describe(c) for c in choices[:_MAX_ENUM_SHOWN])
        if len(choices) > _MAX_ENUM_SHOWN:
            shown += f", ... ({len(choices)} in all)"
        hint = _enum_hint(value, choices)
        out.append(_Problem(path, f"must be one of {shown}; got {_describe(value)}{hint}"))


def _enum_hint(value: Any, choices: list[Any]) -> str:
    words = [c for c in choices if isinstance(c, str)]
    if isinstance(value, str):
        folded = [word for word in words if word.casefold() == value.casefold()]
        # Spelling is what difflib judges; between digit strings such as 7:5 and 4:5 it finds noise.
        close = folded
        if not close and _has_letters(value):
            close = difflib.get_close_matches(value, words, n=1, cutoff=0.6)
        return f"; did you mean {close[0]!r}?" if close else ""
    if isinstance(value, int) and not isinstance(value, bool):
        # YAML 1.1 reads an unquoted 16:9 as the base-60 number 969.
        for word in words:
            parts = word.split(":")
            sexagesimal = len(parts) == 2 and len(word) <= 12 and all(p.isascii() and p.isdigit() for p in parts)
            if sexagesimal and int(parts[0]) * 60 + int(parts[1]) == value:
                return f"; YAML reads an unquoted {word} as the number {value}: write '{word}' in quotes"
    return ""


def _has_letters(text: str) -> bool:
    return any(c.isalpha() for c in text)


def _check_number(value: float, schema: Mapping[str, Any], path: _Where, out: list[_Problem]) -> None:
    low, high = _bound(schema, "minimum"), _bound(schema, "maximum")
    low_ex, high_ex = _bound(schema, "exclusiveMinimum"), _bound(schema, "exclusiveMaximum")
    # Draft 4 spelled exclusive bounds as booleans beside minimum/maximum.
    if schema.get("exclusiveMinimum") is True and low is not None:
        low, low_ex = None, low
    if schema.get("exclusiveMaximum") is True and high is not None:
        high, high_ex = None, high
    shown = _number(value)
    if low is not None and value < low:
        out.append(_Problem(path, f"must be at least {_number(low)}, got {shown}"))
    if low_ex is not None and value <= low_ex:
        out.append(_Problem(path, f"must be more than {_number(low_ex)}, got {shown}"))
    if high is not None and value > high:
        out.append(_Problem(path, f"must be at most {_number(high)}, got {shown}"))
    if high_ex is not None and value >= high_ex:
        out.append(_Problem(path, f"must be less than {_number(high_ex)}, got {shown}"))


def _check_string(value: str, schema: Mapping[str, Any], path: _Where, out: list[_Problem]) -> None:
    low, high = _count(schema, "minLength"), _count(schema, "maxLength")
    if low is not None and len(value) < low:
        if not value:
            out.append(_Problem(path, "must not be empty"))
        else:
            out.append(_Problem(path, f"must be at least {_plural(low, 'character')} long, got {len(value)}"))
    if high is not None and len(value) > high:
        out.append(_Problem(path, f"must be at most {_plural(high, 'character')} long, got {len(value):,}"))
    pattern = schema.get("pattern")
    if isinstance(pattern, str):
        compiled = _compile(pattern)
        if compiled is not None and compiled.search(value) is None:
            out.append(_Problem(path, f"must match the pattern {pattern!r}, got {_describe(value)}"))
    if schema.get("format") == "uri" and not _is_fetchable_uri(value):
        out.append(_Problem(path, f"must be an http(s) URL or a data: URI, got {_describe(value)}"))


def _check_array(
    value: Sequence[Any], schema: Mapping[str, Any], path: _Where, out: list[_Problem], depth: int
) -> None:
    low, high = _count(schema, "minItems"), _count(schema, "maxItems")
    if low is not None and len(value) < low:
        out.append(_Problem(path, f"must have at least {_plural(low, 'item')}, got {len(value)}"))
    if high is not None and len(value) > high:
        out.append(_Problem(path, f"must have at most {_plural(high, 'item')}, got {len(value)}"))
    items = schema.get("items")
    if isinstance(items, Mapping | bool):
        for index, item in enumerate(value):
            _check(item, items, (*path, index), out, depth + 1)
    elif isinstance(items, list):
        for index, (item, item_schema) in enumerate(zip(value, items, strict=False)):
            _check(item, item_schema, (*path, index), out, depth + 1)


def _check_object(
    value: Mapping[str, Any], schema: Mapping[str, Any], path: _Where, out: list[_Problem], depth: int
) -> None:
    raw_properties = schema.get("properties")
    properties: Mapping[str, Any] = raw_properties if isinstance(raw_properties, Mapping) else {}
    required = schema.get("required")
    if isinstance(required, list):
        for name in dict.fromkeys(n for n in required if isinstance(n, str)):
            if name not in value:
                out.append(_Problem((*path, name), "is required"))

    raw_patterns = schema.get("patternProperties")
    patterns = raw_patterns if isinstance(raw_patterns, Mapping) else {}
    extra = schema.get("additionalProperties")
    known = [name for name in properties if isinstance(name, str)]
    for name, item in value.items():
        where = (*path, name)
        matched = False
        if name in properties:
            matched = True
            _check(item, properties[name], where, out, depth + 1)
        for pattern, pattern_schema in patterns.items():
            compiled = _compile(pattern) if isinstance(pattern, str) else None
            if compiled is not None and compiled.search(str(name)):
                matched = True
                _check(item, pattern_schema, where, out, depth + 1)
        if matched:
            continue
        if extra is False:
            close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            out.append(_Problem(where, f"unknown field {_dotted(where)!r}{hint}", unknown=True))
        elif isinstance(extra, Mapping):
            _check(item, extra, where, out, depth + 1)


def _check_combinators(value: Any, schema: Mapping[str, Any], path: _Where, out: list[_Problem], depth: int) -> None:
    every = schema.get("allOf")
    if isinstance(every, list):
        for branch in every:
            _check(value, branch, path, out, depth + 1)
    for keyword in ("anyOf", "oneOf"):
        branches = schema.get(keyword)
        if not isinstance(branches, list) or not branches:
            continue
        results: list[list[_Problem]] = []
        for branch in branches:
            found: list[_Problem] = []
            _check(value, branch, path, found, depth + 1)
            if not found:
                break
            results.append(found)
        else:
            out.extend(_best_failure(results, path))


def _best_failure(results: list[list[_Problem]], path: _Where) -> list[_Problem]:
    """What to say when no branch matches: merged types when every branch wanted another type, else the
    problems of the first branch whose type fitted (the one the user most likely meant)."""
    type_only = [r[0] for r in results if len(r) == 1 and r[0].expected and r[0].path == path]
    if len(type_only) == len(results):
        words = tuple(dict.fromkeys(word for problem in type_only for word in problem.expected))
        got = type_only[0].got
        return [_Problem(path, f"must be {_or(words)}, got {got}", expected=words, got=got)]
    for found in results:
        if not (found[0].expected and found[0].path == path):
            return found
    return results[0]


# --------------------------------------------------------------------------------------------------
# Small helpers


def _types(declared: Any) -> tuple[str, ...]:
    """The known type names declared; empty (no check) when any is unknown or the keyword is malformed."""
    names = [declared] if isinstance(declared, str) else declared if isinstance(declared, list) else []
    if not names or not all(isinstance(name, str) and name in _TYPE_WORDS for name in names):
        return ()
    return tuple(dict.fromkeys(names))


def _is_type(value: Any, name: str) -> bool:
    if name == "string":
        return isinstance(value, str)
    if name == "integer":
        return _is_number(value) and (isinstance(value, int) or float(value).is_integer())
    if name == "number":
        return _is_number(value)
    if name == "boolean":
        return isinstance(value, bool)
    if name == "array":
        return isinstance(value, list | tuple)
    if name == "object":
        return isinstance(value, Mapping)
    return value is None  # "null"


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, float) and math.isfinite(value)


def _json_equal(a: Any, b: Any) -> bool:
    """Equality as JSON sees it: booleans are not numbers, 1 equals 1.0, lists and objects compare deeply."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if _is_number(a) and _is_number(b):
        return bool(a == b)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if type(a) is not type(b) and not (isinstance(a, str) and isinstance(b, str)):
        return False
    return bool(a == b)


def _bound(schema: Mapping[str, Any], keyword: str) -> float | None:
    value = schema.get(keyword)
    return value if _is_number(value) else None


def _count(schema: Mapping[str, Any], keyword: str) -> int | None:
    value = schema.get(keyword)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


@functools.lru_cache(maxsize=256)
def _compile(pattern: str) -> re.Pattern[str] | None:
    """The pattern compiled, or None when Python's re cannot read it (JSON Schema patterns are ECMA 262)."""
    try:
        return re.compile(pattern)
    except (re.error, RecursionError, OverflowError):
        return None


def _is_fetchable_uri(value: str) -> bool:
    if value[:5].lower() == "data:":
        return "," in value
    try:
        parts = urlsplit(value)
        host = parts.hostname
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(host) and not any(c.isspace() for c in value)


def _where(path: _Where) -> str:
    return f"field {_dotted(path)!r}" if path else "input"


def _dotted(path: _Where) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _or(words: tuple[str, ...]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def _number(value: float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and abs(value) >= 10**30:
        return "a very large number"  # str() of a huge int is slow, and refused beyond 4300 digits
    if isinstance(value, int | float):
        return _number(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return f"a {type(value).__name__}"
