"""jsonschema's errors in our words: one line per problem, at the field it is about (``field 'seed': must be ...``).

A wrong type hides the other complaints at the same place; required fields come first and unknown fields last;
when no branch of ``anyOf``/``oneOf`` fits, the branch the user most likely meant speaks (or the types merge).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jsonschema.exceptions import ValidationError

__all__ = ["describe", "one_line", "problems"]

MAX_MESSAGE_CHARS = 200
_MAX_ENUM_SHOWN = 20
# Where a value sits in the input: field names and list positions.
Where = tuple[str | int, ...]
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


@dataclass(frozen=True, slots=True)
class _Problem:
    """One problem at one place. ``expected`` is set for a type mismatch, so ``anyOf`` can merge them."""

    path: Where
    message: str
    expected: tuple[str, ...] = ()
    got: str = ""
    rank: int = 1  # required fields first, unknown fields last

    def line(self) -> str:
        if self.rank == 2:
            return self.message
        return f"{_where(self.path)}: {self.message}"


def problems(errors: list[ValidationError]) -> list[_Problem]:
    """Our problems for jsonschema's errors, in a stable order: a wrong type hides the other complaints there."""
    typed = {tuple(e.absolute_path) for e in errors if e.validator == "type"}
    out: list[_Problem] = []
    seen: set[tuple[Where, str]] = set()
    for error in errors:
        path: Where = tuple(error.absolute_path)
        if error.validator != "type" and path in typed:
            continue
        for problem in _translate(error, path):
            key = (problem.path, problem.message)
            if key not in seen:
                seen.add(key)
                out.append(problem)
    return sorted(out, key=lambda p: p.rank)


def _translate(error: ValidationError, path: Where) -> list[_Problem]:
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
        return [_Problem(path, f"must be {_or(words)}, got {describe(value)}{hint}", words, describe(value))]
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
    return [_Problem(path, message or one_line(error.message))]


def _message(keyword: str, wanted: Any, value: Any, schema: Mapping[str, Any]) -> str | None:
    """Our wording of one failed keyword, or None for jsonschema's own."""
    shown = describe(value)
    if keyword == "enum" and isinstance(wanted, list):
        listed = ", ".join(describe(c) for c in wanted[:_MAX_ENUM_SHOWN])
        if len(wanted) > _MAX_ENUM_SHOWN:
            listed += f", ... ({len(wanted)} in all)"
        return f"must be one of {listed}; got {shown}{_enum_hint(value, wanted)}"
    if keyword == "const":
        return f"must be {describe(wanted)}, got {shown}"
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
        return f"must match the pattern {describe(wanted, 80)}, got {shown}"
    if keyword == "format":
        if wanted == "uri":
            return f"must be an http(s) URL or a data: URI, got {shown}"
        return f"must be a valid {wanted}, got {shown}"
    if keyword == "minItems" and isinstance(value, list):
        return f"must have at least {_plural(wanted, 'item')}, got {len(value)}"
    if keyword == "maxItems" and isinstance(value, list):
        return f"must have at most {_plural(wanted, 'item')}, got {len(value)}"
    if keyword == "multipleOf":
        return f"must be a multiple of {describe(wanted)}, got {shown}"
    if keyword == "not" and wanted == {}:
        return "is not allowed here"
    if keyword == "not":
        return f"must not be {shown} (the schema excludes it)"
    return None


def _best_branch(error: ValidationError, path: Where) -> list[_Problem]:
    """What to say when no branch of anyOf/oneOf fits: merged types when every branch wanted another type, else
    the problems of the first branch whose type fitted (the one the user most likely meant)."""
    by_branch: dict[int, list[ValidationError]] = {}
    for sub in error.context or ():
        index = sub.relative_schema_path[0] if sub.relative_schema_path else 0
        by_branch.setdefault(index if isinstance(index, int) else 0, []).append(sub)
    if not by_branch:
        return [_Problem(path, "matches more than one of the choices its schema allows only one of (oneOf)")]
    results = [problems(found) for _, found in sorted(by_branch.items())]
    results = [found for found in results if found]
    if not results:
        return [_Problem(path, one_line(error.message))]
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


def _where(path: Where) -> str:
    return f"field {_dotted(path)!r}" if path else "input"


def _dotted(path: Where) -> str:
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


def one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= MAX_MESSAGE_CHARS else line[: MAX_MESSAGE_CHARS - 3] + "..."


def describe(value: Any, limit: int = 40) -> str:
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
