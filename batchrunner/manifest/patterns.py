"""The schema's pattern keywords, matched by ``regex`` with a timeout, never by ``re`` (see ``schema``).

``pattern``, ``patternProperties`` and ``additionalProperties`` (which consults the patterns) replace jsonschema's
own. A pattern that ``regex`` cannot read, or that takes more than :data:`PATTERN_TIMEOUT` seconds to match once,
is not checked again, and says so once through the warner of the schema being checked on this thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import regex
from jsonschema.exceptions import ValidationError

from batchrunner.manifest.schemawords import describe

__all__ = ["PATTERN_TIMEOUT"]

log = logging.getLogger("batchrunner")

# Seconds one pattern may take to match one string. Real patterns take microseconds.
PATTERN_TIMEOUT = 1.0

# ``warn`` of the schema whose validator is running on this thread: the pattern keywords report to it.
current = threading.local()


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
    warn = getattr(current, "warn", None)
    message = f"the model's schema pattern {describe(pattern)} {why}; it is not checked"
    if warn is not None:
        warn(message)
    else:
        log.warning("%s", message)


def pattern_keyword(validator: Any, pattern: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if isinstance(pattern, str) and validator.is_type(instance, "string") and _search(pattern, instance) is False:
        yield ValidationError(f"does not match {pattern!r}")


def pattern_properties_keyword(validator: Any, patterns: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object") or not isinstance(patterns, Mapping):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if _search(pattern, key):  # None (cannot judge): the subschema is not applied
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def additional_properties_keyword(validator: Any, extra: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
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
