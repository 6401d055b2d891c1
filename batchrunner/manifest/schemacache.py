"""The model's schema cached per run folder: ``<out>/.schema-<safe slug>.json``, written whole or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from batchrunner.errors import OutputError

__all__ = ["cached_schema_path", "load_cached_schema", "save_cached_schema"]

_MAX_CACHE_BYTES = 10 * 1024 * 1024
_SAFE_SLUG = re.compile(r"[A-Za-z0-9._-]{1,100}")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


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
