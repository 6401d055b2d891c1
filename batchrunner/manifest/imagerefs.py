"""The local images one manifest names: each ``input_image`` path resolved once, each file judged and hashed once.

A 100,000-job matrix over a dozen images must not resolve, ``stat`` or hash an image 100,000 times: paths are
resolved against the manifest's folder and cached by the text written, and each resolved file is judged by
``localpaths`` (nothing but a readable regular file within the upload limit is opened) and hashed with the
injectable ``hash_file``, its problem naming every job that uses it.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from pathlib import Path

from batchrunner.manifest.jobs import Explicit, Field
from batchrunner.manifest.localpaths import (
    NO_SUCH_FILE,
    LocalFileRefused,
    LocalPathError,
    local_file_problem,
    shown_name,
)
from batchrunner.manifest.values import is_local_image


class ImageRefs:
    """The manifest's folder, the paths resolved so far, and how a file is hashed."""

    def __init__(self, path: Path, hash_file: Callable[[Path], str]) -> None:
        self.path = path
        self.base = path.parent
        self.hash_file = hash_file
        self.cache: dict[str, Path] = {}

    def resolve(self, value: str) -> Path | None:
        """Classify an input_image string; return the resolved path when it names a local file."""
        if not is_local_image(value):
            return None
        cached = self.cache.get(value)
        if cached is None:
            # realpath, not Path.resolve(): it raises RuntimeError on a link loop, which the check names instead.
            cached = Path(os.path.realpath(self.base / value))
            self.cache[value] = cached
        return cached

    def hash_all(
        self,
        defaults: dict[str, Field],
        axes: dict[str, list[Field]],
        explicit: list[Explicit],
        attempt: Callable[..., str | None],
    ) -> None:
        """Check that each local image used by some job is a regular file, then hash each one once.

        Each image is judged and hashed through ``attempt`` (the parser's), so that when problems are gathered one
        image that fails does not hide the others."""
        users: dict[Path, list[str]] = {}
        written: dict[Path, str] = {}
        lines: dict[Path, int | None] = {}

        def use(f: Field | None, label: str) -> None:
            if f is not None and f.local is not None:
                written.setdefault(f.local, str(f.value))
                lines.setdefault(f.local, f.line)
                labels = users.setdefault(f.local, [])
                if label not in labels:
                    labels.append(label)

        if axes:
            for f in axes.get("input_image", [defaults.get("input_image")]):
                use(f, "matrix")
        for job in explicit:
            use(job.fields.get("input_image", defaults.get("input_image")), job.label)

        hashes: dict[Path, str] = {}
        for resolved, labels in users.items():
            digest = attempt(self.hash_one, resolved, written[resolved], tuple(labels), lines[resolved])
            if digest is not None:
                hashes[resolved] = digest
        for f in itertools.chain(defaults.values(), *axes.values(), *(j.fields.values() for j in explicit)):
            if f.local is not None:
                f.sha256 = hashes.get(f.local)

    def hash_one(self, resolved: Path, written: str, jobs: tuple[str, ...], line: int | None) -> str:
        """The image's sha256, once ``lstat``/``stat`` have judged what is at its path (``localpaths``): nothing that
        is not a readable regular file within the upload limit is ever opened for reading."""

        def refuse(reason: str) -> LocalPathError:
            return LocalPathError(reason, written=written, jobs=jobs, manifest=self.path, line=line)

        problem = local_file_problem(self.base / written)
        if problem is not None:
            raise refuse(f"{problem} (looked for {shown_name(resolved)})" if problem == NO_SUCH_FILE else problem)
        try:
            return self.hash_file(resolved)
        except LocalFileRefused as exc:
            raise refuse(exc.reason) from None
        except OSError as exc:
            raise refuse(f"cannot read: {exc.strerror or exc}") from None
