"""Check a job's input against a model's JSON Schema before it is sent, and cache that schema per run folder.

For models other than flux-kontext-max (whose fields ``values.py`` checks itself), the API describes the
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

This module is the adapter (the draft, the sanitising, the validator class); ``patterns`` owns the bounded pattern
keywords, ``schemawords`` the wording of jsonschema's errors, ``schemacache`` the cached schema on disk.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import referencing
from jsonschema.protocols import Validator

from batchrunner.manifest import patterns
from batchrunner.manifest.patterns import (
    PATTERN_TIMEOUT,
    additional_properties_keyword,
    pattern_keyword,
    pattern_properties_keyword,
)
from batchrunner.manifest.schemacache import cached_schema_path, load_cached_schema, save_cached_schema
from batchrunner.manifest.schemawords import MAX_MESSAGE_CHARS, describe, one_line, problems

__all__ = [
    "PATTERN_TIMEOUT",
    "cached_schema_path",
    "load_cached_schema",
    "save_cached_schema",
    "validate_input",
]

log = logging.getLogger("batchrunner")

_MAX_SANITIZE_ROUNDS = 50
_PREPARED_KEPT = 8

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
    return [problem.line() for problem in problems(errors)]


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


def _prepare(schema: Any) -> _Prepared:
    """The prepared form of ``schema``, made once per schema object (a batch checks every job against one)."""
    with _prepared_lock:
        hit = _prepared.get(id(schema))
        if hit is not None and hit.source is schema:
            _prepared.move_to_end(id(schema))
            patterns.current.warn = hit.warn
            return hit
    prepared = _Prepared(schema, None)
    patterns.current.warn = prepared.warn
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
                "pattern": pattern_keyword,
                "patternProperties": pattern_properties_keyword,
                "additionalProperties": additional_properties_keyword,
            },
            type_checker=types,
        )
        _classes[cls] = made
    return made


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
# Small helpers


def _reason(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "it nests or refers to itself too deeply"
    if isinstance(exc, referencing.exceptions.Unresolvable):
        ref = getattr(exc, "ref", "")
        return f"$ref {describe(str(ref), 80)} is not in the schema, and remote references are not fetched"
    return one_line(str(exc))[:MAX_MESSAGE_CHARS] or type(exc).__name__
