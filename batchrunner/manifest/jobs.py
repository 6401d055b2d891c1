"""The records a manifest becomes: :class:`Job` and :class:`Manifest`, each job's fingerprint and derived id.

Each job carries a *fingerprint*: the sha256 of the canonical JSON of ``{"model", "version", "input"}`` in
which a local ``input_image`` stands as the hash of its bytes. The fingerprint is what resume and dedupe key
on, so it must not change when jobs are reordered or an image file is renamed, and must change when anything
sent changes. A job with no ``id`` of its own gets one derived from its image's stem, its prompt's first words,
its seed and 8 hex digits of its fingerprint.

:class:`Field` is one validated input value with its share of both: the parser makes them, :func:`finish`
fills in their fragments, and the expansion (``matrix.py``) joins the fragments into jobs.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from batchrunner.manifest.values import URL_SCHEME_RE

__all__ = ["DEFAULT_MODEL", "DEFAULT_VERSION", "Job", "Manifest"]

DEFAULT_MODEL = "flux-kontext-max"
DEFAULT_VERSION = "0.0.1"

ID_FIELDS = ("input_image", "prompt", "seed")  # the fields a derived id is made of, in order
_NOT_SLUG_RE = re.compile(r"[^a-z0-9]+")
_PROMPT_SLUG_CHARS = 32
_STEM_SLUG_CHARS = 24


@dataclass(frozen=True, slots=True)
class Job:
    """One prediction to run, as the manifest defines it.

    ``input`` is the API ``input`` exactly as written after merging defaults (``input_image`` stays the URL or
    the relative path as written); treat it as read-only. ``fingerprint`` identifies what is sent: the sha256
    of the canonical JSON of model, version and input, a local image standing as ``"sha256:<hex>"`` of its
    bytes. ``line`` is where the job is written (for a matrix job, the line of ``matrix:``).
    """

    id: str
    fingerprint: str
    input: Mapping[str, Any] = field(hash=False)
    image_path: Path | None
    image_sha256: str | None
    line: int | None


@dataclass(frozen=True, slots=True)
class Manifest:
    """A validated batch: model, version, optional price per prediction, and the distinct jobs in order.

    ``duplicates`` counts the jobs that collapsed into an earlier job with the same fingerprint.
    """

    path: Path
    model: str
    version: str
    price: float | None
    jobs: tuple[Job, ...]
    duplicates: int
    # Whether ``version`` is written in the manifest: the API documents the field as deprecated and ignored, so it is
    # sent only then (``version`` keeps its default for the fingerprint, so old ledgers still match).
    version_given: bool = False

    @property
    def sent_version(self) -> str | None:
        """The ``version`` a create carries: the manifest's own, or None (not sent) when it names none."""
        return self.version if self.version_given else None


@dataclass(slots=True)
class Field:
    """One validated input value at one place in the manifest, with its share of fingerprint and id."""

    name: str
    value: Any
    line: int | None
    local: Path | None = None  # resolved path when this is a local input_image
    sha256: str | None = None
    frag: str = ""  # '"name":<canonical JSON>' as it enters the fingerprint
    id_dash: str = ""  # what this value contributes to a derived id, with its trailing dash


@dataclass(slots=True)
class Explicit:
    """An explicit job before merging: where it sits, its label in errors, its own fields."""

    label: str
    explicit_id: str | None
    line: int | None
    id_line: int | None
    fields: dict[str, Field]


def finish(f: Field) -> None:
    """Fill in a field's fingerprint fragment and its share of a derived id."""
    if f.local is not None:
        f.frag = f"{dumps(f.name)}:{dumps('sha256:' + (f.sha256 or ''))}"
    else:
        f.frag = f"{dumps(f.name)}:{dumps(f.value)}"
    v = f.value
    part = ""
    if f.name == "prompt" and isinstance(v, str):
        part = _prompt_slug(v)
    elif f.name == "input_image" and isinstance(v, str):
        part = _image_stem(v)
    elif f.name == "seed" and isinstance(v, int) and not isinstance(v, bool) and len(str(v)) <= 20:
        part = f"s{v}"
    f.id_dash = f"{part}-" if part else ""


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _slug(text: str) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return _NOT_SLUG_RE.sub("-", ascii_text.lower()).strip("-")


def _prompt_slug(prompt: str) -> str:
    """The first words of a prompt, slugged, cut at a word boundary to at most 32 characters."""
    slug = _slug(prompt)
    if len(slug) <= _PROMPT_SLUG_CHARS:
        return slug
    head, dash, _ = slug[: _PROMPT_SLUG_CHARS + 1].rpartition("-")
    return (head if dash and head else slug[:_PROMPT_SLUG_CHARS]).rstrip("-")


def _image_stem(written: str) -> str:
    """The slugged stem of an image's file name, from a URL's path or a local path; nothing for a data URI."""
    if written[:5].lower() == "data:":
        return ""
    if URL_SCHEME_RE.match(written):
        name = unquote(urlsplit(written).path).rsplit("/", 1)[-1]
    else:
        name = re.split(r"[\\/]", written)[-1]
    stem = name.rsplit(".", 1)[0] if "." in name[1:] else name
    return _slug(stem)[:_STEM_SLUG_CHARS].rstrip("-")
