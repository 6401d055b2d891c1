"""The batch manifest: YAML text in, validated frozen :class:`Job` records (or one ManifestError) out.

A manifest names a model, optional ``defaults`` applied to every job, an optional ``matrix`` (the cartesian
product of field values) and optional explicit ``jobs``::

    model: flux-kontext-max
    price: 0.08
    defaults: {aspect_ratio: match_input_image, safety_tolerance: 2}
    matrix:
      input_image: [images/street.jpg, https://example.com/harbour.png]
      prompt: ["Turn the scene into a snowy winter evening"]
      seed: [1, 2, 3]
    jobs:
      - {id: hero-night, input_image: images/street.jpg, prompt: "Night with stars", seed: 42}

This module reads the top level and each job, and gathers problems when asked to; the package's other modules
own the rest: ``nodes`` (YAML text -> nodes -> values, PyYAML's errors translated), ``values`` (the field checks
of flux-kontext-max), ``jobs`` (the records, their fingerprints and derived ids) and ``matrix`` (the expansion
into distinct jobs).

The parse is pure apart from reading local image files to hash them (``hash_file`` is injectable), and every
problem a user can cause ends as one line naming file, job, field, line.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from batchrunner.errors import ManifestError, Problems, UsageError
from batchrunner.manifest.imagerefs import ImageRefs
from batchrunner.manifest.jobs import DEFAULT_MODEL, DEFAULT_VERSION, Explicit, Field, Job, Manifest
from batchrunner.manifest.localpaths import (
    sha256_local,
)
from batchrunner.manifest.matrix import build_jobs
from batchrunner.manifest.nodes import MAX_MANIFEST_BYTES, TAG_MAP, TAG_SEQ, Nodes, line_of
from batchrunner.manifest.values import (
    ASPECT_RATIOS,
    FLUX_CHECKS,
    FLUX_EXPECTED,
    FLUX_FIELDS,
    Invalid,
    check_id,
    misread,
    suggest,
)

__all__ = [
    "ASPECT_RATIOS",
    "DEFAULT_MAX_JOBS",
    "DEFAULT_MODEL",
    "DEFAULT_VERSION",
    "Job",
    "Manifest",
    "load_manifest",
    "parse_manifest",
    "sha256_file",
]

DEFAULT_MAX_JOBS = 10_000
# Even --allow-large has a ceiling: a slip such as `seed: *thousand_values` on three axes must end in an
# error, not in an hour of expansion and gigabytes of memory.
HARD_MAX_JOBS = 1_000_000
_TOP_KEYS = ("model", "version", "price", "defaults", "matrix", "jobs")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a local input file's bytes, in chunks, never past the upload limit (see ``localpaths``)."""
    return sha256_local(path)


def load_manifest(
    path: Path, *, allow_large: bool = False, max_jobs: int = DEFAULT_MAX_JOBS, collect: int = 0
) -> Manifest:
    """Read and validate the manifest at ``path`` (see :func:`parse_manifest`); unreadable: ManifestError."""
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise ManifestError("no such file", file=path) from None
    except IsADirectoryError:
        raise ManifestError("is a directory, not a manifest file", file=path) from None
    except OSError as exc:
        raise ManifestError(f"cannot be read: {exc.strerror or exc}", file=path) from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"is larger than {MAX_MANIFEST_BYTES // (1024 * 1024)} MB", file=path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ManifestError(
            f"is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})", file=path, line=line
        ) from None
    return parse_manifest(text, path=path, allow_large=allow_large, max_jobs=max_jobs, collect=collect)


def parse_manifest(
    text: str,
    *,
    path: Path,
    allow_large: bool = False,
    max_jobs: int = DEFAULT_MAX_JOBS,
    hash_file: Callable[[Path], str] = sha256_file,
    collect: int = 0,
) -> Manifest:
    """Validate manifest ``text`` (read from ``path``) and expand it into distinct jobs.

    With ``collect`` > 0, problems in fields, jobs and images are gathered, up to that many, and raised together
    as ``Problems`` (``validate`` names them all at once); a problem in the file's structure still ends the parse.

    Matrix jobs come first in product order (axes in the order written), then explicit jobs; a job whose
    fingerprint equals an earlier one's is dropped and counted in ``duplicates``. Local input images are
    resolved against the manifest's folder, judged by ``localpaths`` and hashed once each with ``hash_file``.
    Raises ManifestError (InputImageError, located like one, for a local image that is missing, unreadable, too
    large or not a regular file); a batch of more than ``max_jobs`` needs ``allow_large``.
    """
    with _gc_paused():
        parser = _Parser(text, path, allow_large=allow_large, max_jobs=max_jobs, hash_file=hash_file)
        if collect <= 0:
            return parser.parse()
        parser.problems, parser.max_problems = [], collect
        try:
            manifest = parser.parse()
        except _TooMany:
            raise Problems(parser.problems, more=True) from None
        except UsageError as exc:
            parser.problems.append(exc)
        if parser.problems:
            raise Problems(parser.problems)
        return manifest


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector, restoring its state after.

    A parse allocates one Python object per YAML node and a dict and a Job per job, and frees nothing until
    the end, so the collector keeps re-scanning a growing graph for cycles it cannot find: a 100,000-job file
    took 6 s to compose with it running and under 1 s without. Reference counting still frees as usual.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# --------------------------------------------------------------------------------------------------
# Gathering problems


_T = TypeVar("_T")


def _raise(problem: UsageError) -> NoReturn:
    raise problem


class _Skip(Exception):
    """Collecting problems, a job whose problems are noted is left out of the batch."""


class _TooMany(Exception):
    """Collecting problems, the parser has as many as it was asked for."""


# --------------------------------------------------------------------------------------------------
# The parser


class _Parser:
    """One parse: the file name for errors, the model's rules, the local images resolved so far."""

    def __init__(
        self,
        text: str,
        path: Path,
        *,
        allow_large: bool,
        max_jobs: int,
        hash_file: Callable[[Path], str],
    ) -> None:
        self.nodes = Nodes(text, path)
        self.path = path
        self.allow_large = allow_large
        self.max_jobs = max_jobs
        self.images = ImageRefs(path, hash_file)
        self.model = DEFAULT_MODEL
        self.problems: list[UsageError] | None = None  # collecting (validate): problems so far
        self.max_problems = 0

    # -- errors ----------------------------------------------------------------------------------------------

    def fail(
        self, message: str, *, job: str | None = None, field: str | None = None, node: Node | None = None
    ) -> NoReturn:
        raise ManifestError(message, file=self.path, job=job, field=field, line=line_of(node))

    def attempt(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T | None:
        """``fn(...)``; when collecting problems, one it raises is noted and None returned, so the parse goes on."""
        if self.problems is None:
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except UsageError as exc:
            self.problems.append(exc)
            if len(self.problems) >= self.max_problems:
                raise _TooMany from None
            return None
        except _Skip:
            return None

    def note(self, problem: UsageError) -> None:
        if self.problems is None:
            raise problem
        self.attempt(_raise, problem)

    # -- top level -------------------------------------------------------------------------------------------

    def parse(self) -> Manifest:
        root = self.nodes.compose()
        top = self.nodes.pairs(root, job=None)
        for key, (key_node, _) in top.items():
            if key not in _TOP_KEYS:
                self.attempt(self.fail, f"unknown key {key!r}{suggest(key, _TOP_KEYS)}", node=key_node)

        self.model = self.name_value(top, "model", DEFAULT_MODEL)
        version = self.name_value(top, "version", DEFAULT_VERSION)
        price = self.price(top)

        defaults_pairs = self.section_mapping(top, "defaults")
        axes_nodes = self.axes_nodes(self.section_mapping(top, "matrix"))
        job_nodes = self.jobs_nodes(top)
        self.check_count(axes_nodes, job_nodes)

        defaults = self.defaults(defaults_pairs)
        axes = self.axes(axes_nodes)
        found = [self.attempt(self.explicit_job, index, node) for index, node in enumerate(job_nodes)]
        explicit = [job for job in found if job is not None]
        matrix_node = top["matrix"][0] if "matrix" in top else None
        if self.model == DEFAULT_MODEL:
            self.check_prompts(defaults, axes, explicit, matrix_node)

        self.images.hash_all(defaults, axes, explicit, self.attempt)
        batch = build_jobs(
            defaults, axes, explicit, line_of(matrix_node), model=self.model, version=version, path=self.path
        )
        return Manifest(
            path=self.path,
            model=self.model,
            version=version,
            price=price,
            jobs=tuple(batch.jobs),
            duplicates=batch.duplicates,
            version_given="version" in top,
        )

    def axes_nodes(self, matrix_pairs: dict[str, tuple[Node, Node]]) -> dict[str, tuple[Node, list[Node]]]:
        """The matrix's axes as lists of nodes, each checked to be a list that is not empty."""
        axes_nodes: dict[str, tuple[Node, list[Node]]] = {}
        for name, (key_node, value_node) in matrix_pairs.items():
            if not (isinstance(value_node, SequenceNode) and value_node.tag == TAG_SEQ):
                self.fail(
                    f"must be a list of values, got {self.nodes.kind(value_node)}",
                    job="matrix",
                    field=name,
                    node=value_node,
                )
            if not value_node.value:
                self.fail("must not be an empty list", job="matrix", field=name, node=value_node)
            axes_nodes[name] = (key_node, list(value_node.value))
        return axes_nodes

    def check_count(self, axes_nodes: dict[str, tuple[Node, list[Node]]], job_nodes: list[Node]) -> None:
        """Count from list lengths before building anything, so a huge (or alias-inflated) matrix fails fast."""
        product = math.prod(len(values) for _, values in axes_nodes.values()) if axes_nodes else 0
        total = product + len(job_nodes)
        if total > self.max_jobs and not self.allow_large:
            self.fail(
                f"the manifest expands to {total:,} jobs, more than {self.max_jobs:,}; "
                "pass --allow-large to run it anyway"
            )
        if total > HARD_MAX_JOBS:
            self.fail(f"the manifest expands to {total:,} jobs, more than the limit of {HARD_MAX_JOBS:,}; split it")

    def defaults(self, pairs: dict[str, tuple[Node, Node]]) -> dict[str, Field]:
        defaults: dict[str, Field] = {}
        for name, (key_node, value_node) in pairs.items():
            value = self.attempt(self.field_value, name, value_node, job=None, key_node=key_node, where="defaults")
            if value is not None:
                defaults[name] = value
        return defaults

    def axes(self, axes_nodes: dict[str, tuple[Node, list[Node]]]) -> dict[str, list[Field]]:
        axes: dict[str, list[Field]] = {}
        for name, (key_node, nodes) in axes_nodes.items():
            values = [
                self.attempt(self.field_value, name, node, job="matrix", key_node=key_node, where="matrix")
                for node in nodes
            ]
            kept = [v for v in values if v is not None]
            if kept:
                axes[name] = kept
        return axes

    def check_prompts(
        self,
        defaults: dict[str, Field],
        axes: dict[str, list[Field]],
        explicit: list[Explicit],
        matrix_node: Node | None,
    ) -> None:
        """flux-kontext-max needs a prompt in every job: from the matrix, the defaults or the job itself."""
        if axes and "prompt" not in axes and "prompt" not in defaults:
            self.fail(
                "is required: give it in the matrix or in defaults", job="matrix", field="prompt", node=matrix_node
            )
        for job in explicit:
            if "prompt" not in job.fields and "prompt" not in defaults:
                self.note(ManifestError("is required", file=self.path, job=job.label, field="prompt", line=job.line))

    def name_value(self, top: dict[str, tuple[Node, Node]], key: str, default: str) -> str:
        if key not in top:
            return default
        node = top[key][1]
        value = self.nodes.scalar(node, job=None, field=key) if isinstance(node, ScalarNode) else None
        if not isinstance(value, str):
            hint = f' (quote it: {key}: "{node.value}")' if isinstance(node, ScalarNode) and node.value else ""
            self.fail(f"must be a string, got {self.nodes.kind(node)}{hint}", field=key, node=node)
        if not value.strip():
            self.fail("must not be empty", field=key, node=node)
        if len(value) > 200:
            self.fail(f"is {len(value):,} characters long, more than 200", field=key, node=node)
        return value

    def price(self, top: dict[str, tuple[Node, Node]]) -> float | None:
        if "price" not in top:
            return None
        node = top["price"][1]
        value = self.nodes.scalar(node, job=None, field="price") if isinstance(node, ScalarNode) else None
        why = misread(node, value) if isinstance(node, ScalarNode) else None
        if why is not None:
            self.fail(why, field="price", node=node)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(f"must be a number (USD per prediction), got {self.nodes.kind(node)}", field="price", node=node)
        if not math.isfinite(value) or value < 0:
            self.fail(f"must be a non-negative number, got {value!r}", field="price", node=node)
        return float(value)

    def section_mapping(self, top: dict[str, tuple[Node, Node]], key: str) -> dict[str, tuple[Node, Node]]:
        if key not in top:
            return {}
        node = top[key][1]
        if not (isinstance(node, MappingNode) and node.tag == TAG_MAP):
            what = "input fields and their values" if key == "defaults" else "fields to lists of values"
            self.fail(f"must be a mapping of {what}, got {self.nodes.kind(node)}", job=None, field=key, node=node)
        return self.nodes.pairs(node, job=key if key == "matrix" else None)

    def jobs_nodes(self, top: dict[str, tuple[Node, Node]]) -> list[Node]:
        if "jobs" not in top:
            return []
        node = top["jobs"][1]
        if not (isinstance(node, SequenceNode) and node.tag == TAG_SEQ):
            self.fail(f"must be a list of jobs, got {self.nodes.kind(node)}", field="jobs", node=node)
        return list(node.value)

    # -- jobs and fields -------------------------------------------------------------------------------------

    def explicit_job(self, index: int, node: Node) -> Explicit:
        label = f"jobs[{index}]"
        if not (isinstance(node, MappingNode) and node.tag == TAG_MAP):
            self.fail(f"must be a mapping of fields, got {self.nodes.kind(node)}", job=label, node=node)
        pairs = self.nodes.pairs(node, job=label)
        explicit_id: str | None = None
        id_line: int | None = None
        if "id" in pairs:
            id_node = pairs["id"][1]
            explicit_id = self.job_id(id_node, label)
            label, id_line = explicit_id, line_of(id_node)
        fields: dict[str, Field] = {}
        failed = False
        for name, (key_node, value_node) in pairs.items():
            if name == "id":
                continue
            value = self.attempt(self.field_value, name, value_node, job=label, key_node=key_node, where="job")
            if value is None:
                failed = True
            else:
                fields[name] = value
        if failed:
            raise _Skip  # its problems are noted; a job with a field missing must not be expanded
        return Explicit(label=label, explicit_id=explicit_id, line=line_of(node), id_line=id_line, fields=fields)

    def job_id(self, node: Node, label: str) -> str:
        value = self.nodes.scalar(node, job=label, field="id") if isinstance(node, ScalarNode) else None
        if isinstance(value, int) and not isinstance(value, bool) and isinstance(node, ScalarNode):
            value = node.value  # `id: 007` means the text 007, not the number 7
        if not isinstance(value, str):
            self.fail(f"must be a string, got {self.nodes.kind(node)}", job=label, field="id", node=node)
        try:
            return check_id(value)
        except Invalid as exc:
            self.fail(str(exc), job=label, field="id", node=node)

    def field_value(self, name: str, node: Node, *, job: str | None, key_node: Node, where: str) -> Field:
        if name == "id":
            self.fail(
                "can only be set on an explicit job (matrix jobs and defaults get derived ids)",
                job=job,
                field=name,
                node=key_node,
            )
        flux = self.model == DEFAULT_MODEL
        if flux and name not in FLUX_FIELDS:
            choices = (*FLUX_FIELDS, "id") if where == "job" else FLUX_FIELDS
            self.fail(
                f"unknown field for model {DEFAULT_MODEL}{suggest(name, choices)}",
                job=job,
                field=name,
                node=key_node,
            )
        try:
            if flux:
                if not isinstance(node, ScalarNode):
                    raise Invalid(f"must be {FLUX_EXPECTED[name]}, got {self.nodes.kind(node)}")
                value = FLUX_CHECKS[name](self.nodes.scalar(node, job=job, field=name), node)
            else:
                value, _ = self.nodes.json_value(node, job=job, field=name, depth=0)
            local = self.images.resolve(value) if name == "input_image" and isinstance(value, str) else None
        except Invalid as exc:
            self.fail(str(exc), job=job, field=name, node=node)
        return Field(name=name, value=value, line=line_of(node), local=local)
