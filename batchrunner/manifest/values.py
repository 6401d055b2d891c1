"""Field value checks for flux-kontext-max: prompts, images, aspect ratios, integers, URLs, ids; pure.

Each check takes the constructed value and its YAML node (only the raw text of the node tells how a number
was written: once constructed, ``010`` is just 8) and returns the value to send, or raises :class:`Invalid`
with the reason; the parser, which knows where the value sits, turns that into a located ManifestError.
The helpers that quote a value in a message (:func:`show`, :func:`describe`, :func:`suggest`) live here too.
"""

from __future__ import annotations

import difflib
import math
import re
import unicodedata
from collections.abc import Callable
from contextlib import suppress
from typing import Any
from urllib.parse import urlsplit

from yaml.nodes import ScalarNode

__all__ = ["ASPECT_RATIOS", "MAX_STRING_CHARS"]

ASPECT_RATIOS: tuple[str, ...] = (
    "match_input_image",
    "1:1",
    "16:9",
    "9:16",
    "4:3",
    "3:4",
    "3:2",
    "2:3",
    "4:5",
    "5:4",
    "21:9",
    "9:21",
    "2:1",
    "1:2",
)


MAX_STRING_CHARS = 10_000
_MAX_SEED = 2**53
FLUX_FIELDS = ("prompt", "input_image", "aspect_ratio", "seed", "safety_tolerance", "output_format")
_OUTPUT_FORMATS = ("png", "jpg")
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_WINDOWS_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL"} | {f"COM{i}" for i in range(10)} | {f"LPT{i}" for i in range(10)}
)
URL_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")

_TAG_INT = "tag:yaml.org,2002:int"
_TAG_FLOAT = "tag:yaml.org,2002:float"
_TAG_BOOL = "tag:yaml.org,2002:bool"
# How JSON (and YAML 1.2) write an integer. YAML 1.1, which PyYAML speaks, also reads 010 as octal 8, 1:30 as
# base-60 90, 0x10, 0b11, 1_000 and +5: every other spelling is refused rather than silently read another way.
_PLAIN_INT = re.compile(r"-?(?:0|[1-9][0-9]*)")
_NUMBER_LIKE = re.compile(r"[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?")
_MAX_URL_CHARS = 2048


class Invalid(Exception):
    """A value check failed; the caller knows where the value sits and turns this into a ManifestError."""


def _check_prompt(value: Any, node: ScalarNode) -> str:
    if not isinstance(value, str):
        raise Invalid(f"must be a string, got {describe(value)}")
    if not value.strip():
        raise Invalid("must not be empty")
    return _check_text(value)


def _check_image(value: Any, node: ScalarNode) -> str:
    if not isinstance(value, str):
        raise Invalid(f"must be a URL or a path to a local file, got {describe(value)}")
    return value  # the parser classifies it (URL, data URI, local path)


def _check_aspect_ratio(value: Any, node: ScalarNode) -> str:
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and node.style in (None, "")
        and node.value in ASPECT_RATIOS
    ):
        return str(node.value)  # YAML 1.1 reads an unquoted 16:9 as the base-60 number 969
    if isinstance(value, str) and value in ASPECT_RATIOS:
        return value
    shown = show(node.value) if isinstance(value, int) and not isinstance(value, bool) else describe(value)
    near = suggest(value, ASPECT_RATIOS, listing=False) if isinstance(value, str) else ""
    raise Invalid(f"must be one of {', '.join(ASPECT_RATIOS)}; got {shown}{near}")


def _check_seed(value: Any, node: ScalarNode) -> int:
    number = _integer(value, node, "must be an integer")
    if not 0 <= number <= _MAX_SEED:
        raise Invalid(f"must be between 0 and {_MAX_SEED}, got {number}")
    return number


def _check_tolerance(value: Any, node: ScalarNode) -> int:
    number = _integer(value, node, "must be an integer from 0 to 6")
    if not 0 <= number <= 6:
        raise Invalid(f"must be from 0 to 6, got {number}")
    return number


def _check_output_format(value: Any, node: ScalarNode) -> str:
    if value not in _OUTPUT_FORMATS or not isinstance(value, str):
        near = suggest(value, _OUTPUT_FORMATS, listing=False) if isinstance(value, str) else ""
        raise Invalid(f"must be 'png' or 'jpg', got {describe(value)}{near}")
    return value


def _integer(value: Any, node: ScalarNode, must: str) -> int:
    """An integer field's value, written as a plain decimal; else Invalid with what the text probably meant."""
    if isinstance(value, int) and not isinstance(value, bool):
        why = misread(node, value)
        if why is not None:
            raise Invalid(why)
        return int(value)
    hint = _decimal_hint(str(node.value)) if isinstance(value, str | float) else ""
    raise Invalid(f"{must}, got {describe(value)}{hint}")


def misread(node: ScalarNode, value: Any) -> str | None:
    """Why a number or boolean is refused when YAML 1.1 may read its text other than the writer meant; else None.

    Only the raw text of the node tells: once constructed, ``010`` is just 8.
    """
    text = str(node.value)
    if node.tag == _TAG_INT and not _PLAIN_INT.fullmatch(text):
        return f"write integers as plain decimals: {show(text)}{_decimal_hint(text, value)}"
    if node.tag == _TAG_FLOAT and ("_" in text or ":" in text):
        shown = repr(value) if isinstance(value, float) else "another number"
        return f"write numbers as plain decimals: {show(text)} (YAML 1.1 reads it as {shown})"
    if node.tag == _TAG_BOOL and text.lower() not in ("true", "false"):
        return f"YAML 1.1 reads {show(text)} as {str(value).lower()}: write true or false"
    return None


def _decimal_hint(text: str, value: Any = None) -> str:
    """`` (did you mean 10?)`` for a number written another way, or what YAML 1.1 made of base-60 text."""
    compact = text.strip().replace("_", "")
    sign = "-" if compact.startswith("-") else ""
    body = compact.lstrip("+-")
    meant: int | None = None
    if ":" in body:
        return f" (YAML 1.1 reads it as the base-60 number {value})" if isinstance(value, int) else ""
    if body[:2].lower() in ("0x", "0o", "0b"):
        with suppress(ValueError):
            meant = int(body, 0)
    elif body.isascii() and body.isdigit() and len(body) <= 30:
        meant = int(body)
    elif _NUMBER_LIKE.fullmatch(compact) and len(compact) <= 30:
        number = float(compact)
        if math.isfinite(number) and number.is_integer() and abs(number) < 2**63:
            meant = abs(int(number))
    if meant is None:
        return ""
    return f" (did you mean {sign}{meant}?)"


def is_local_image(value: str) -> bool:
    """Classify an input_image string: True when it names a local file, False for an http(s) URL or a data: URI
    (passed through untouched: the API may accept it, and it names no file of ours); Invalid when it is neither."""
    if not value.strip():
        raise Invalid("must not be empty")
    if len(value) > MAX_STRING_CHARS:
        raise Invalid(f"is {len(value):,} characters long, more than {MAX_STRING_CHARS:,}")
    if value[:5].lower() == "data:":
        return False
    scheme = URL_SCHEME_RE.match(value)
    if scheme:
        if scheme.group(1).lower() not in ("http", "https"):
            raise Invalid(f"URL scheme {scheme.group(1)!r} is not supported; use http(s) or a local path")
        problem = _url_problem(value)
        if problem is not None:
            raise Invalid(problem)
        return False
    if "\x00" in value:
        raise Invalid("contains a NUL character, which no file name can hold")
    return True


def _url_problem(url: str) -> str | None:
    """Why the API could not fetch this http(s) URL as written, or None. Addresses are judged later, by images.py."""
    if len(url) > _MAX_URL_CHARS:
        return f"URL is {len(url):,} characters long, more than {_MAX_URL_CHARS:,}"
    for char in url:
        if char.isspace() or unicodedata.category(char)[0] in "CZ":
            return f"URL contains {_char_name(char)}; percent-encode it (a space is %20)"
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - reading it is the check: a port out of range raises
    except ValueError as exc:
        return f"URL cannot be read ({exc}): {show(url)}"
    if "@" in parts.netloc:
        # The URL is not shown: it holds a password.
        return "URL carries a user name or password (user:pass@host); take them out, the API cannot use them"
    if not host:
        return f"URL has no host: {show(url)}"
    if not _is_host(host):
        return f"URL host {show(host)} is not a valid host name"
    return None


def _is_host(host: str) -> bool:
    if ":" in host:  # an IPv6 literal; urlsplit has already refused one it cannot read
        return True
    if not all(c.isalnum() or c in "-._" for c in host):
        return False
    try:
        host.encode("idna")
    except UnicodeError:
        return False  # an empty label (a..b) or one longer than 63 characters
    return True


def _char_name(char: str) -> str:
    name = unicodedata.name(char, "")
    return f"U+{ord(char):04X}" + (f" ({name.lower()})" if name else "")


FLUX_CHECKS: dict[str, Callable[[Any, ScalarNode], Any]] = {
    "prompt": _check_prompt,
    "input_image": _check_image,
    "aspect_ratio": _check_aspect_ratio,
    "seed": _check_seed,
    "safety_tolerance": _check_tolerance,
    "output_format": _check_output_format,
}
FLUX_EXPECTED = {
    "prompt": "a string",
    "input_image": "a URL or a path to a local file",
    "aspect_ratio": "one of " + ", ".join(ASPECT_RATIOS),
    "seed": "an integer",
    "safety_tolerance": "an integer from 0 to 6",
    "output_format": "'png' or 'jpg'",
}


def _check_text(value: str) -> str:
    if len(value) > MAX_STRING_CHARS:
        raise Invalid(f"is {len(value):,} characters long, more than {MAX_STRING_CHARS:,}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Invalid("contains a character that is not valid Unicode text") from None
    return value


def check_id(value: str) -> str:
    if not _ID_RE.fullmatch(value):
        raise Invalid(
            f"must be 1-100 characters of letters, digits, '.', '_' or '-', starting with a letter or digit; "
            f"got {show(value)}"
        )
    if ".." in value:
        raise Invalid(f"must not contain '..', got {show(value)}")
    if value.endswith("."):
        raise Invalid(f"must not end with '.' (Windows drops it), got {show(value)}")
    if value.split(".", 1)[0].upper() in _WINDOWS_RESERVED:
        raise Invalid(f"{show(value)} is a reserved file name on Windows")
    return value


def scalar_size(value: Any) -> int:
    """Approximate JSON length of a scalar; rejects what JSON cannot carry."""
    if value is None or isinstance(value, bool):
        return 5
    if isinstance(value, int):
        return len(str(value)) if abs(value) < 10**100 else 101
    if isinstance(value, float):
        if not math.isfinite(value):
            raise Invalid(f"must be a finite number, got {value!r}")
        return len(repr(value))
    if isinstance(value, str):
        return len(_check_text(value)) + 2
    raise Invalid(f"is not a JSON value: YAML read it as {describe(value)}; quote it to send it as text")


def suggest(word: str, choices: tuple[str, ...], *, listing: bool = True) -> str:
    """``; did you mean 'x'?`` when a choice is close; else the choices (when ``listing``) or nothing."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; expected one of {', '.join(choices)}" if listing else ""


def show(text: str, limit: int = 40) -> str:
    """A value quoted for a one-line message: repr escapes newlines and control characters."""
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def describe(value: Any) -> str:
    if value is None:
        return "null (nothing)"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return show(value)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, bytes):
        return "binary data"
    return f"a {type(value).__name__}"
