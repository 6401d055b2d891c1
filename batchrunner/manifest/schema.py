"""Check a job's input against a model's JSON Schema before it is sent, and cache that schema per run folder.

For models other than flux-kontext-max (whose fields ``manifest.py`` checks itself), the API describes the
``input`` it takes in ``request_schema`` of ``GET /v1/model?slug=NAME``. :func:`validate_input` finds every problem
in one input and says each in one line (``field 'seed': must be an integer, got '7'``), so a whole batch fails
before the first prediction is paid for.

The judge is the ``jsonschema`` package; this module is the adapter around it. Decisions:

- **The draft comes from ``$schema``** (draft 3, 4, 6, 7, 2019-09, 2020-12). Without one, **Draft 2020-12**, with
  the three OpenAPI 3.0 spellings such schemas are usually written in read as they mean: ``nullable: true``
  (null allowed), boolean ``exclusiveMinimum``/``exclusiveMaximum`` beside ``minimum``/``maximum``, and ``items``
  given as a list (``prefixItems``).
- **A malformed keyword is dropped, not obeyed and not fatal.** The schema is data from the network: it is
  checked against its draft's metaschema first, and every keyword the metaschema refuses (``minimum: "0"``,
  ``type: "uuid"``) is removed before validating. A false alarm would block a batch the API would have run.
- **``$ref`` is followed within the schema only.** The registry has no retrieval: a remote ``$ref`` is never
  fetched, and like a ``$ref`` to nothing or a ``$ref`` loop it makes the schema unusable: one warning, inputs
  go unchecked (the API stays the final judge).
- **Patterns are matched by ``regex``, not ``re``**, with a timeout of :data:`PATTERN_TIMEOUT` seconds per match
  and the GIL released. Python's ``re`` backtracks exponentially on patterns like ``^(a+)+$`` and holds the GIL
  while it does, so no thread, timer or signal handler could stop it; ``regex`` matches most such patterns in
  linear time and gives up on the rest. A pattern that times out, or that ``regex`` cannot read, is not checked
  (one warning). ``unevaluatedProperties`` is dropped from a schema with ``patternProperties``, since jsonschema
  matches those with ``re`` inside it.
- **Formats checked:** ``uri`` (an http(s) URL with a host, or a ``data:`` URI: the only things the API can
  fetch), ``date``, ``email``, ``ipv4``, ``ipv6``, ``uuid``. Others need optional packages and are not checked.
- **Numbers are finite.** ``NaN`` and infinity are neither ``number`` nor ``integer`` (JSON cannot carry them).

Validation happens on the value the API will receive. A local file for an image field is uploaded and sent as
a URL, so the caller puts a placeholder URL (such as ``https://upload.invalid/image.png``) in its place before
calling :func:`validate_input`; a relative path there would fail ``format: uri``.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import referencing
import regex
from jsonschema.exceptions import ValidationError
from jsonschema.protocols import Validator

from batchrunner.errors import OutputError

__all__ = [
    "PATTERN_TIMEOUT",
    "cached_schema_path",
    "load_cached_schema",
    "save_cached_schema",
    "validate_input",
]

log = logging.getLogger("batchrunner")

# Seconds one pattern may take to match one string. Real patterns take microseconds.
PATTERN_TIMEOUT = 1.0

_MAX_ENUM_SHOWN = 20
_MAX_CACHE_BYTES = 10 * 1024 * 1024
_MAX_MESSAGE_CHARS = 200
_MAX_SANITIZE_ROUNDS = 50
_PREPARED_KEPT = 8
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
    "any": "anything",
}
_DRAFTS: tuple[type[Validator], ...] = (
    jsonschema.Draft202012Validator,
    jsonschema.Draft201909Validator,
    jsonschema.Draft7Validator,
    jsonschema.Draft6Validator,
    jsonschema.Draft4Validator,
    jsonschema.Draft3Validator,
)
_BY_URI = {str(cls.META_SCHEMA.get("$schema", cls.META_SCHEMA.get("$id", ""))).rstrip("#"): cls for cls in _DRAFTS}


def validate_input(input: Mapping[str, Any], schema: Mapping[str, Any]) -> list[str]:
    """Every problem of ``input`` against ``schema``, one line each (``field 'x': must be ...``); [] if valid.

    Never raises, whatever the schema holds. A schema that cannot be used at all (a ``$ref`` that resolves to
    nothing, a loop, nesting beyond Python's recursion limit) logs one warning and checks nothing.
    """
    prepared = _prepare(schema)
    if prepared.validator is None:
        return []
    try:
        errors = list(prepared.validator.iter_errors(input))
    except Exception as exc:
        prepared.unusable(_reason(exc))
        return []
    return [problem.line() for problem in _problems(errors)]


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
# Preparing a schema: its draft, OpenAPI spellings, malformed keywords dropped, our pattern keywords


class _Prepared:
    """One schema made ready: the validator (None when the schema checks nothing) and its warnings, said once."""

    def __init__(self, source: Any, validator: Validator | None) -> None:
        self.source = source  # held so that id(source) stays this schema's while it is cached
        self.validator = validator
        self.said: set[str] = set()
        self.lock = threading.Lock()

    def unusable(self, reason: str) -> None:
        self.warn(f"the model's schema cannot be used ({reason}); inputs go unchecked")
        self.validator = None

    def warn(self, message: str) -> None:
        with self.lock:
            if message in self.said:
                return
            self.said.add(message)
        log.warning("%s", message)


_prepared: OrderedDict[int, _Prepared] = OrderedDict()
_prepared_lock = threading.Lock()
# The _Prepared whose validator is running on this thread: the pattern keywords report their warnings to it.
_current = threading.local()


def _prepare(schema: Any) -> _Prepared:
    """The prepared form of ``schema``, made once per schema object (a batch checks every job against one)."""
    with _prepared_lock:
        hit = _prepared.get(id(schema))
        if hit is not None and hit.source is schema:
            _prepared.move_to_end(id(schema))
            _current.prepared = hit
            return hit
    prepared = _Prepared(schema, None)
    _current.prepared = prepared
    try:
        prepared.validator = _build(schema, prepared)
    except Exception as exc:
        prepared.unusable(_reason(exc))
    with _prepared_lock:
        _prepared[id(schema)] = prepared
        while len(_prepared) > _PREPARED_KEPT:
            _prepared.popitem(last=False)
    return prepared


def _build(schema: Any, prepared: _Prepared) -> Validator | None:
    if isinstance(schema, bool):
        return _validator_class(jsonschema.Draft202012Validator)(schema, registry=referencing.Registry())
    if not isinstance(schema, Mapping):
        return None  # not a schema: nothing to check
    declared = schema.get("$schema")
    cls = _BY_URI.get(declared.rstrip("#"), jsonschema.Draft202012Validator) if isinstance(declared, str) else None
    # A JSON round trip copies the schema (we edit the copy) and makes sure it is plain JSON.
    document = json.loads(json.dumps(schema))
    if cls is None:
        cls = jsonschema.Draft202012Validator
        _openapi(document)
    _sanitize(document, cls, prepared)
    _spell_out_false(document)
    if _has_key(document, "patternProperties"):
        _drop_key(document, "unevaluatedProperties")
    return _validator_class(cls)(document, registry=referencing.Registry(), format_checker=_FORMATS)


def _openapi(node: Any) -> None:
    """Read OpenAPI 3.0's spellings (nullable, boolean exclusive bounds, tuple items) as Draft 2020-12 says them."""
    for sub in _subschemas(node):
        if sub.get("nullable") is True and isinstance(sub.get("type"), str):
            sub["type"] = [sub["type"], "null"]
        elif sub.get("nullable") is True and "enum" in sub and isinstance(sub["enum"], list):
            sub["enum"] = [*sub["enum"], None]
        for exclusive, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            if sub.get(exclusive) is True and bound in sub:
                sub[exclusive] = sub.pop(bound)
            elif isinstance(sub.get(exclusive), bool):
                del sub[exclusive]
        if isinstance(sub.get("items"), list) and "prefixItems" not in sub:
            sub["prefixItems"] = sub.pop("items")


_MAPS_OF_SCHEMAS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_OR_LIST = (
    *("items", "prefixItems", "additionalItems", "allOf", "anyOf", "oneOf"),
    *("contains", "not", "if", "then", "else", "propertyNames"),
)
_NOTHING: dict[str, Any] = {"not": {}}


def _spell_out_false(document: Any) -> None:
    """Write the ``false`` schema as ``{"not": {}}``: jsonschema loses the path of a ``false`` it descends into."""
    for sub in list(_subschemas(document)):
        for key in _MAPS_OF_SCHEMAS:
            group = sub.get(key)
            if isinstance(group, dict):
                for name, value in group.items():
                    if value is False:
                        group[name] = dict(_NOTHING)
        for key in _SCHEMA_OR_LIST:
            value = sub.get(key)
            if value is False:
                sub[key] = dict(_NOTHING)
            elif isinstance(value, list):
                sub[key] = [dict(_NOTHING) if item is False else item for item in value]


def _subschemas(node: Any) -> Iterator[dict[str, Any]]:
    """Every mapping in a JSON document, depth first (a superset of its subschemas; harmless for the edits)."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _has_key(node: Any, key: str) -> bool:
    return any(key in sub for sub in _subschemas(node))


def _drop_key(node: Any, key: str) -> None:
    for sub in _subschemas(node):
        sub.pop(key, None)


def _sanitize(document: dict[str, Any], cls: type[Validator], prepared: _Prepared) -> None:
    """Remove every keyword the draft's metaschema refuses, round after round until none is left."""
    meta = cls(cls.META_SCHEMA)
    for _ in range(_MAX_SANITIZE_ROUNDS):
        errors = list(meta.iter_errors(document))
        if not errors:
            return
        for error in errors:
            if not _remove(document, list(error.absolute_path)):
                raise ValueError("its top level is not a schema")
    raise ValueError("too many malformed keywords")


def _remove(document: dict[str, Any], path: list[str | int]) -> bool:
    """Delete the innermost mapping entry on ``path`` (the malformed keyword, or the property it sits in)."""
    containers: list[tuple[Any, str | int]] = []
    node: Any = document
    for step in path:
        try:
            containers.append((node, step))
            node = node[step]
        except (KeyError, IndexError, TypeError):
            return True  # already removed with an outer keyword this round
    for container, step in reversed(containers):
        if isinstance(container, dict):
            container.pop(step, None)
            return True
    return False


def _finite_number(checker: Any, instance: Any) -> bool:
    if isinstance(instance, bool):
        return False
    return isinstance(instance, int) or (isinstance(instance, float) and math.isfinite(instance))


def _finite_integer(checker: Any, instance: Any) -> bool:
    if isinstance(instance, bool):
        return False
    return isinstance(instance, int) or (
        isinstance(instance, float) and math.isfinite(instance) and instance.is_integer()
    )


_classes: dict[type[Validator], type[Validator]] = {}


def _validator_class(cls: type[Validator]) -> type[Validator]:
    """The draft's validator with our pattern keywords and finite numbers."""
    made = _classes.get(cls)
    if made is None:
        types = cls.TYPE_CHECKER.redefine_many({"number": _finite_number, "integer": _finite_integer})
        made = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
            cls,
            validators={
                "pattern": _pattern,
                "patternProperties": _pattern_properties,
                "additionalProperties": _additional_properties,
            },
            type_checker=types,
        )
        _classes[cls] = made
    return made


# --------------------------------------------------------------------------------------------------
# Pattern keywords, bounded


@dataclass(frozen=True, slots=True)
class _Unreadable:
    """A pattern regex cannot compile, or that once took too long: not checked again."""

    why: str


_compiled: dict[str, regex.Pattern[str] | _Unreadable] = {}


def _search(pattern: str, text: str) -> bool | None:
    """Whether ``pattern`` is found in ``text``; None for a pattern that cannot be judged (the caller takes the
    side that reports nothing: a value passes, a field name is neither matched by it nor unknown)."""
    compiled = _compiled.get(pattern)
    if compiled is None:
        try:
            compiled = regex.compile(pattern)
        except (regex.error, RecursionError, OverflowError, ValueError) as exc:
            compiled = _Unreadable(f"cannot be read ({' '.join(str(exc).split())[:80]})")
        if len(_compiled) < 1024:
            _compiled[pattern] = compiled
    if isinstance(compiled, _Unreadable):
        _warn_pattern(pattern, compiled.why)
        return None
    try:
        return compiled.search(text, timeout=PATTERN_TIMEOUT, concurrent=True) is not None
    except TimeoutError:
        slow = _Unreadable(f"took more than {PATTERN_TIMEOUT:g} s to match")
        _compiled[pattern] = slow
        _warn_pattern(pattern, slow.why)
        return None


def _warn_pattern(pattern: str, why: str) -> None:
    prepared = getattr(_current, "prepared", None)
    message = f"the model's schema pattern {_describe(pattern)} {why}; it is not checked"
    if isinstance(prepared, _Prepared):
        prepared.warn(message)
    else:
        log.warning("%s", message)


def _pattern(validator: Any, pattern: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if isinstance(pattern, str) and validator.is_type(instance, "string") and _search(pattern, instance) is False:
        yield ValidationError(f"does not match {pattern!r}")


def _pattern_properties(validator: Any, patterns: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object") or not isinstance(patterns, Mapping):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if _search(pattern, key):  # None (cannot judge): the subschema is not applied
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(validator: Any, extra: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    properties = schema.get("properties", {})
    patterns = schema.get("patternProperties", {})
    extras = [
        key for key in instance if key not in properties and all(_search(pattern, key) is False for pattern in patterns)
    ]
    if validator.is_type(extra, "object"):
        for key in extras:
            yield from validator.descend(instance[key], extra, path=key)
    elif extra is False:
        for key in extras:
            yield ValidationError(f"unknown field {key!r}", path=(key,))


def _is_fetchable_uri(value: object) -> bool:
    if not isinstance(value, str):
        return True  # formats apply to strings only
    if value[:5].lower() == "data:":
        return "," in value
    try:
        parts = urlsplit(value)
        host = parts.hostname
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(host) and not any(c.isspace() for c in value)


_FORMATS = jsonschema.FormatChecker(formats=("date", "email", "ipv4", "ipv6", "uuid"))
_FORMATS.checks("uri")(_is_fetchable_uri)


# --------------------------------------------------------------------------------------------------
# jsonschema's errors in our words


@dataclass(frozen=True, slots=True)
class _Problem:
    """One problem at one place. ``expected`` is set for a type mismatch, so ``anyOf`` can merge them."""

    path: _Where
    message: str
    expected: tuple[str, ...] = ()
    got: str = ""
    rank: int = 1  # required fields first, unknown fields last

    def line(self) -> str:
        if self.rank == 2:
            return self.message
        return f"{_where(self.path)}: {self.message}"


def _problems(errors: list[ValidationError]) -> list[_Problem]:
    """Our problems for jsonschema's errors, in a stable order: a wrong type hides the other complaints there."""
    typed = {tuple(e.absolute_path) for e in errors if e.validator == "type"}
    out: list[_Problem] = []
    seen: set[tuple[_Where, str]] = set()
    for error in errors:
        path: _Where = tuple(error.absolute_path)
        if error.validator != "type" and path in typed:
            continue
        for problem in _translate(error, path):
            key = (problem.path, problem.message)
            if key not in seen:
                seen.add(key)
                out.append(problem)
    return sorted(out, key=lambda p: p.rank)


def _translate(error: ValidationError, path: _Where) -> list[_Problem]:
    keyword: Any = error.validator
    wanted: Any = error.validator_value
    value: Any = error.instance
    schema: Mapping[str, Any] = error.schema if isinstance(error.schema, Mapping) else {}
    if keyword is None:
        return [_Problem(path, "is not allowed here")]
    if keyword == "type":
        names = [wanted] if isinstance(wanted, str) else [n for n in wanted if isinstance(n, str)]
        words = tuple(_TYPE_WORDS.get(name, name) for name in names)
        choices = schema.get("enum")
        hint = _enum_hint(value, choices) if isinstance(choices, list) and not isinstance(value, str) else ""
        return [_Problem(path, f"must be {_or(words)}, got {_describe(value)}{hint}", words, _describe(value))]
    if keyword == "required":
        if not isinstance(value, Mapping):
            return []
        missing = [name for name in wanted if isinstance(name, str) and name not in value]
        return [_Problem((*path, name), "is required", rank=0) for name in missing]
    if keyword == "additionalProperties":
        known = [name for name in schema.get("properties", {}) if isinstance(name, str)]
        close = difflib.get_close_matches(str(path[-1]), known, n=1, cutoff=0.6) if path else []
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return [_Problem(path, f"unknown field {_dotted(path)!r}{hint}", rank=2)]
    if keyword in ("anyOf", "oneOf"):
        return _best_branch(error, path)
    message = _message(keyword, wanted, value, schema)
    return [_Problem(path, message or _one_line(error.message))]


def _message(keyword: str, wanted: Any, value: Any, schema: Mapping[str, Any]) -> str | None:
    """Our wording of one failed keyword, or None for jsonschema's own."""
    shown = _describe(value)
    if keyword == "enum" and isinstance(wanted, list):
        listed = ", ".join(_describe(c) for c in wanted[:_MAX_ENUM_SHOWN])
        if len(wanted) > _MAX_ENUM_SHOWN:
            listed += f", ... ({len(wanted)} in all)"
        return f"must be one of {listed}; got {shown}{_enum_hint(value, wanted)}"
    if keyword == "const":
        return f"must be {_describe(wanted)}, got {shown}"
    if keyword == "minimum" and isinstance(wanted, int | float):
        # Draft 4 spelled an exclusive bound as a boolean beside minimum/maximum.
        verb = "more than" if schema.get("exclusiveMinimum") is True else "at least"
        return f"must be {verb} {_number(wanted)}, got {shown}"
    if keyword == "maximum" and isinstance(wanted, int | float):
        verb = "less than" if schema.get("exclusiveMaximum") is True else "at most"
        return f"must be {verb} {_number(wanted)}, got {shown}"
    if keyword == "exclusiveMinimum" and isinstance(wanted, int | float):
        return f"must be more than {_number(wanted)}, got {shown}"
    if keyword == "exclusiveMaximum" and isinstance(wanted, int | float):
        return f"must be less than {_number(wanted)}, got {shown}"
    if keyword == "minLength" and isinstance(value, str):
        if not value:
            return "must not be empty"
        return f"must be at least {_plural(wanted, 'character')} long, got {len(value)}"
    if keyword == "maxLength" and isinstance(value, str):
        return f"must be at most {_plural(wanted, 'character')} long, got {len(value):,}"
    if keyword == "pattern":
        return f"must match the pattern {_describe(wanted, 80)}, got {shown}"
    if keyword == "format":
        if wanted == "uri":
            return f"must be an http(s) URL or a data: URI, got {shown}"
        return f"must be a valid {wanted}, got {shown}"
    if keyword == "minItems" and isinstance(value, list):
        return f"must have at least {_plural(wanted, 'item')}, got {len(value)}"
    if keyword == "maxItems" and isinstance(value, list):
        return f"must have at most {_plural(wanted, 'item')}, got {len(value)}"
    if keyword == "multipleOf":
        return f"must be a multiple of {_describe(wanted)}, got {shown}"
    if keyword == "not" and wanted == {}:
        return "is not allowed here"
    if keyword == "not":
        return f"must not be {shown} (the schema excludes it)"
    return None


def _best_branch(error: ValidationError, path: _Where) -> list[_Problem]:
    """What to say when no branch of anyOf/oneOf fits: merged types when every branch wanted another type, else
    the problems of the first branch whose type fitted (the one the user most likely meant)."""
    by_branch: dict[int, list[ValidationError]] = {}
    for sub in error.context or ():
        index = sub.relative_schema_path[0] if sub.relative_schema_path else 0
        by_branch.setdefault(index if isinstance(index, int) else 0, []).append(sub)
    if not by_branch:
        return [_Problem(path, "matches more than one of the choices its schema allows only one of (oneOf)")]
    results = [_problems(found) for _, found in sorted(by_branch.items())]
    results = [found for found in results if found]
    if not results:
        return [_Problem(path, _one_line(error.message))]
    type_only = [r[0] for r in results if len(r) == 1 and r[0].expected and r[0].path == path]
    if len(type_only) == len(results):
        words = tuple(dict.fromkeys(word for problem in type_only for word in problem.expected))
        got = type_only[0].got
        return [_Problem(path, f"must be {_or(words)}, got {got}", words, got)]
    for found in results:
        if not (found[0].expected and found[0].path == path):
            return found
    return results[0]


def _enum_hint(value: Any, choices: list[Any]) -> str:
    words = [c for c in choices if isinstance(c, str)]
    if isinstance(value, str):
        folded = [word for word in words if word.casefold() == value.casefold()]
        # Spelling is what difflib judges; between digit strings such as 7:5 and 4:5 it finds noise.
        close = folded
        if not close and any(c.isalpha() for c in value):
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


# --------------------------------------------------------------------------------------------------
# Small helpers


def _reason(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "it nests or refers to itself too deeply"
    if isinstance(exc, referencing.exceptions.Unresolvable):
        ref = getattr(exc, "ref", "")
        return f"$ref {_describe(str(ref), 80)} is not in the schema, and remote references are not fetched"
    return _one_line(str(exc))[:_MAX_MESSAGE_CHARS] or type(exc).__name__


def _where(path: _Where) -> str:
    return f"field {_dotted(path)!r}" if path else "input"


def _dotted(path: _Where) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _or(words: tuple[str, ...]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _plural(n: Any, word: str) -> str:
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def _number(value: float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _MAX_MESSAGE_CHARS else line[: _MAX_MESSAGE_CHARS - 3] + "..."


def _describe(value: Any, limit: int = 40) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and abs(value) >= 10**30:
        return "a very large number"  # str() of a huge int is slow, and refused beyond 4300 digits
    if isinstance(value, int | float):
        return _number(value)
    if isinstance(value, str):
        return repr(value if len(value) <= limit else value[: limit - 3] + "...")
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return f"a {type(value).__name__}"
