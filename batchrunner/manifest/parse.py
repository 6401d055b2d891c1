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

Each job carries a *fingerprint*: the sha256 of the canonical JSON of ``{"model", "version", "input"}`` in
which a local ``input_image`` stands as the hash of its bytes. The fingerprint is what resume and dedupe key
on, so it must not change when jobs are reordered or an image file is renamed, and must change when anything
sent changes.

The module is pure apart from reading local image files to hash them (``hash_file`` is injectable). Errors
from PyYAML are translated here, and every problem a user can cause ends as one line naming file, job, field,
line.
"""

from __future__ import annotations

import difflib
import gc
import hashlib
import itertools
import json
import math
import os
import re
import unicodedata
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import unquote, urlsplit

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from batchrunner.errors import ManifestError, Problems, UsageError
from batchrunner.manifest.localpaths import (
    NO_SUCH_FILE,
    LocalFileRefused,
    LocalPathError,
    local_file_problem,
    sha256_local,
    shown_name,
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

DEFAULT_MODEL = "flux-kontext-max"
DEFAULT_VERSION = "0.0.1"
DEFAULT_MAX_JOBS = 10_000

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

MAX_MANIFEST_BYTES = 10 * 1024 * 1024
MAX_STRING_CHARS = 10_000
# Even --allow-large has a ceiling: a slip such as `seed: *thousand_values` on three axes must end in an
# error, not in an hour of expansion and gigabytes of memory.
HARD_MAX_JOBS = 1_000_000
# Aliases let a few lines stand for a huge value (billion laughs). Sizes are measured on the node graph with
# a memo, so measuring is linear in the file; these bounds keep the JSON we then build and hash finite.
_MAX_VALUE_CHARS = 1_000_000
_MAX_BATCH_CHARS = 256 * 1024 * 1024
_MAX_DEPTH = 50
_MAX_SEED = 2**53

_TOP_KEYS = ("model", "version", "price", "defaults", "matrix", "jobs")
_FLUX_FIELDS = ("prompt", "input_image", "aspect_ratio", "seed", "safety_tolerance", "output_format")
_OUTPUT_FORMATS = ("png", "jpg")
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_WINDOWS_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL"} | {f"COM{i}" for i in range(10)} | {f"LPT{i}" for i in range(10)}
)
_URL_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_NOT_SLUG_RE = re.compile(r"[^a-z0-9]+")
_ID_FIELDS = ("input_image", "prompt", "seed")  # the fields a derived id is made of, in order
_PROMPT_SLUG_CHARS = 32
_STEM_SLUG_CHARS = 24

_TAG_STR = "tag:yaml.org,2002:str"
_TAG_SEQ = "tag:yaml.org,2002:seq"
_TAG_MAP = "tag:yaml.org,2002:map"
_TAG_MERGE = "tag:yaml.org,2002:merge"
_TAG_INT = "tag:yaml.org,2002:int"
_TAG_FLOAT = "tag:yaml.org,2002:float"
_TAG_BOOL = "tag:yaml.org,2002:bool"
# How JSON (and YAML 1.2) write an integer. YAML 1.1, which PyYAML speaks, also reads 010 as octal 8, 1:30 as
# base-60 90, 0x10, 0b11, 1_000 and +5: every other spelling is refused rather than silently read another way.
_PLAIN_INT = re.compile(r"-?(?:0|[1-9][0-9]*)")
_NUMBER_LIKE = re.compile(r"[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?")
_MAX_URL_CHARS = 2048

# libyaml is some 10x faster on big generated manifests; both produce the same nodes and marks.
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


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
# Internal records


_T = TypeVar("_T")


def _raise(problem: UsageError) -> NoReturn:
    raise problem


class _Skip(Exception):
    """Collecting problems, a job whose problems are noted is left out of the batch."""


class _TooMany(Exception):
    """Collecting problems, the parser has as many as it was asked for."""


class _Invalid(Exception):
    """A value check failed; the caller knows where the value sits and turns this into a ManifestError."""


@dataclass(slots=True)
class _Field:
    """One validated input value at one place in the manifest, with its share of fingerprint and id."""

    name: str
    value: Any
    line: int | None
    local: Path | None = None  # resolved path when this is a local input_image
    sha256: str | None = None
    frag: str = ""  # '"name":<canonical JSON>' as it enters the fingerprint
    id_dash: str = ""  # what this value contributes to a derived id, with its trailing dash


@dataclass(slots=True)
class _Explicit:
    """An explicit job before merging: where it sits, its label in errors, its own fields."""

    label: str
    explicit_id: str | None
    line: int | None
    id_line: int | None
    fields: dict[str, _Field]


class _Batch:
    """The jobs collected so far, in order: the first job of each fingerprint is kept, later ones counted.

    A 100,000-job matrix adds its jobs in a tight loop, so that loop reaches into these attributes directly.
    """

    __slots__ = ("chars", "duplicates", "id_lines", "jobs", "path", "seen")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.jobs: list[Job] = []
        self.id_lines: list[int | None] = []  # line of each job's explicit id; None for a derived id
        self.seen: set[str] = set()
        self.duplicates = 0
        self.chars = 0

    def spend(self, chars: int, line: int | None) -> None:
        """Count canonical JSON about to be built; aliases must not make it grow without bound."""
        self.chars += chars
        if self.chars > _MAX_BATCH_CHARS:
            raise ManifestError(
                f"the jobs' inputs add up to more than {_MAX_BATCH_CHARS // (1024 * 1024)} MB of JSON; split the batch",
                file=self.path,
                line=line,
            )

    def settle_ids(self) -> None:
        """Make ids unique, ignoring letter case, since they name output files.

        Two explicit ids that clash are an error. A derived id that clashes (8 hex digits alike, or a
        hand-written id that looks derived) takes 16 digits of its fingerprint instead: just as stable.
        """
        jobs, id_lines = self.jobs, self.id_lines
        taken: dict[str, int] = {}
        for i, job in enumerate(jobs):
            key = job.id.lower()
            j = taken.get(key)
            if j is None:
                taken[key] = i
                continue
            if id_lines[i] is not None and id_lines[j] is not None:
                if jobs[j].id == job.id:
                    message = f"duplicate id: line {id_lines[j]} gives it to a different job"
                else:
                    message = (
                        f"differs only in letter case from the id {jobs[j].id!r} on line {id_lines[j]}; "
                        "ids name output files"
                    )
                raise ManifestError(message, file=self.path, job=job.id, field="id", line=id_lines[i])
            k = i if id_lines[i] is None else j
            longer = jobs[k].id[:-8] + jobs[k].fingerprint[:16]
            jobs[k] = replace(jobs[k], id=longer)
            taken[key] = i + j - k
            if longer in taken:
                other = jobs[taken[longer]]
                raise ManifestError(
                    f"is also the derived id of the job on line {jobs[k].line}; choose another",
                    file=self.path,
                    job=other.id,
                    field="id",
                    line=id_lines[taken[longer]],
                )
            taken[longer] = k


# --------------------------------------------------------------------------------------------------
# The parser


class _Parser:
    """One parse: the file name for errors, the model's rules, the memo that keeps alias handling linear."""

    def __init__(
        self,
        text: str,
        path: Path,
        *,
        allow_large: bool,
        max_jobs: int,
        hash_file: Callable[[Path], str],
    ) -> None:
        self.text = text
        self.path = path
        self.base = path.parent
        self.allow_large = allow_large
        self.max_jobs = max_jobs
        self.hash_file = hash_file
        self.constructor = SafeConstructor()
        self.model = DEFAULT_MODEL
        self.memo: dict[int, tuple[Any, int]] = {}
        self.active: set[int] = set()
        self.local_cache: dict[str, Path] = {}
        self.problems: list[UsageError] | None = None  # collecting (validate): problems so far
        self.max_problems = 0

    # -- errors ----------------------------------------------------------------------------------------------

    def fail(
        self, message: str, *, job: str | None = None, field: str | None = None, node: Node | None = None
    ) -> NoReturn:
        raise ManifestError(message, file=self.path, job=job, field=field, line=_line(node))

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
        root = self.compose()
        top = self.pairs(root, job=None)
        for key, (key_node, _) in top.items():
            if key not in _TOP_KEYS:
                self.attempt(self.fail, f"unknown key {key!r}{_suggest(key, _TOP_KEYS)}", node=key_node)

        self.model = self.name_value(top, "model", DEFAULT_MODEL)
        version = self.name_value(top, "version", DEFAULT_VERSION)
        price = self.price(top)

        defaults_pairs = self.section_mapping(top, "defaults")
        matrix_pairs = self.section_mapping(top, "matrix")
        axes_nodes: dict[str, tuple[Node, list[Node]]] = {}
        for name, (key_node, value_node) in matrix_pairs.items():
            if not (isinstance(value_node, SequenceNode) and value_node.tag == _TAG_SEQ):
                self.fail(
                    f"must be a list of values, got {self.kind(value_node)}",
                    job="matrix",
                    field=name,
                    node=value_node,
                )
            if not value_node.value:
                self.fail("must not be an empty list", job="matrix", field=name, node=value_node)
            axes_nodes[name] = (key_node, list(value_node.value))
        job_nodes = self.jobs_nodes(top)

        # Count from list lengths before building anything, so a huge (or alias-inflated) matrix fails fast.
        product = math.prod(len(values) for _, values in axes_nodes.values()) if axes_nodes else 0
        total = product + len(job_nodes)
        if total > self.max_jobs and not self.allow_large:
            self.fail(
                f"the manifest expands to {total:,} jobs, more than {self.max_jobs:,}; "
                "pass --allow-large to run it anyway"
            )
        if total > HARD_MAX_JOBS:
            self.fail(f"the manifest expands to {total:,} jobs, more than the limit of {HARD_MAX_JOBS:,}; split it")

        defaults: dict[str, _Field] = {}
        for name, (key_node, value_node) in defaults_pairs.items():
            value = self.attempt(self.field_value, name, value_node, job=None, key_node=key_node, where="defaults")
            if value is not None:
                defaults[name] = value
        axes: dict[str, list[_Field]] = {}
        for name, (key_node, nodes) in axes_nodes.items():
            values = [
                self.attempt(self.field_value, name, node, job="matrix", key_node=key_node, where="matrix")
                for node in nodes
            ]
            kept = [v for v in values if v is not None]
            if kept:
                axes[name] = kept
        found = [self.attempt(self.explicit_job, index, node) for index, node in enumerate(job_nodes)]
        explicit = [job for job in found if job is not None]
        matrix_line = _line(top["matrix"][0]) if "matrix" in top else None

        if self.model == DEFAULT_MODEL:
            if axes and "prompt" not in axes and "prompt" not in defaults:
                self.fail(
                    "is required: give it in the matrix or in defaults",
                    job="matrix",
                    field="prompt",
                    node=top["matrix"][0],
                )
            for job in explicit:
                if "prompt" not in job.fields and "prompt" not in defaults:
                    self.note(
                        ManifestError("is required", file=self.path, job=job.label, field="prompt", line=job.line)
                    )

        self.hash_images(defaults, axes, explicit)
        for f in itertools.chain(defaults.values(), *axes.values(), *(j.fields.values() for j in explicit)):
            _finish(f)

        tail = f',"model":{_dumps(self.model)},"version":{_dumps(version)}}}'
        batch = _Batch(self.path)
        _expand_matrix(defaults, axes, matrix_line, tail, batch)
        _expand_explicit(defaults, explicit, tail, batch)
        batch.settle_ids()
        return Manifest(
            path=self.path,
            model=self.model,
            version=version,
            price=price,
            jobs=tuple(batch.jobs),
            duplicates=batch.duplicates,
            version_given="version" in top,
        )

    def compose(self) -> MappingNode:
        if len(self.text) > MAX_MANIFEST_BYTES:
            self.fail(f"is larger than {MAX_MANIFEST_BYTES // (1024 * 1024)} MB")
        loader = None
        try:
            loader = _Loader(self.text)
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            self.fail_yaml(exc)
        except yaml.reader.ReaderError as exc:
            char = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
            line = self.text.count("\n", 0, exc.position) + 1 if isinstance(exc.position, int) else None
            raise ManifestError(
                f"invalid YAML: unacceptable character {char}: {exc.reason}", file=self.path, line=line
            ) from None
        except UnicodeError:
            self.fail("the text contains a character that is not valid Unicode (a lone surrogate)")
        except yaml.YAMLError as exc:
            self.fail(f"invalid YAML: {_one_line(str(exc))}")
        finally:
            if loader is not None:
                loader.dispose()
        if root is None:
            self.fail("the manifest is empty")
        if not (isinstance(root, MappingNode) and root.tag == _TAG_MAP):
            self.fail(
                f"the manifest must be a mapping with keys such as model, defaults, matrix, jobs; "
                f"got {self.kind(root)}",
                node=root,
            )
        return root

    def fail_yaml(self, exc: yaml.MarkedYAMLError) -> NoReturn:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = _one_line(exc.problem or "") or _one_line(exc.context or "") or "cannot be parsed"
        if mark is not None and self.tab_at(mark.line, mark.column):
            problem = "a tab character is used for indentation; YAML needs spaces"
        elif exc.context and exc.problem:
            context = _one_line(exc.context)
            # libyaml splits some messages as "expected X" / "but found Y": they read as one sentence.
            problem = f"{context}, {problem}" if problem.startswith("but ") else f"{problem} ({context})"
        raise ManifestError(f"invalid YAML: {problem}", file=self.path, line=line) from None

    def tab_at(self, line: int, column: int) -> bool:
        lines = self.text.splitlines()
        if not 0 <= line < len(lines):
            return False
        text = lines[line]
        indent = text[: len(text) - len(text.lstrip(" \t"))]
        return "\t" in indent or text[column : column + 1] == "\t"

    def name_value(self, top: dict[str, tuple[Node, Node]], key: str, default: str) -> str:
        if key not in top:
            return default
        node = top[key][1]
        value = self.scalar(node, job=None, field=key) if isinstance(node, ScalarNode) else None
        if not isinstance(value, str):
            hint = f' (quote it: {key}: "{node.value}")' if isinstance(node, ScalarNode) and node.value else ""
            self.fail(f"must be a string, got {self.kind(node)}{hint}", field=key, node=node)
        if not value.strip():
            self.fail("must not be empty", field=key, node=node)
        if len(value) > 200:
            self.fail(f"is {len(value):,} characters long, more than 200", field=key, node=node)
        return value

    def price(self, top: dict[str, tuple[Node, Node]]) -> float | None:
        if "price" not in top:
            return None
        node = top["price"][1]
        value = self.scalar(node, job=None, field="price") if isinstance(node, ScalarNode) else None
        misread = _misread(node, value) if isinstance(node, ScalarNode) else None
        if misread is not None:
            self.fail(misread, field="price", node=node)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(f"must be a number (USD per prediction), got {self.kind(node)}", field="price", node=node)
        if not math.isfinite(value) or value < 0:
            self.fail(f"must be a non-negative number, got {value!r}", field="price", node=node)
        return float(value)

    def section_mapping(self, top: dict[str, tuple[Node, Node]], key: str) -> dict[str, tuple[Node, Node]]:
        if key not in top:
            return {}
        node = top[key][1]
        if not (isinstance(node, MappingNode) and node.tag == _TAG_MAP):
            what = "input fields and their values" if key == "defaults" else "fields to lists of values"
            self.fail(f"must be a mapping of {what}, got {self.kind(node)}", job=None, field=key, node=node)
        return self.pairs(node, job=key if key == "matrix" else None)

    def jobs_nodes(self, top: dict[str, tuple[Node, Node]]) -> list[Node]:
        if "jobs" not in top:
            return []
        node = top["jobs"][1]
        if not (isinstance(node, SequenceNode) and node.tag == _TAG_SEQ):
            self.fail(f"must be a list of jobs, got {self.kind(node)}", field="jobs", node=node)
        return list(node.value)

    # -- jobs and fields -------------------------------------------------------------------------------------

    def explicit_job(self, index: int, node: Node) -> _Explicit:
        label = f"jobs[{index}]"
        if not (isinstance(node, MappingNode) and node.tag == _TAG_MAP):
            self.fail(f"must be a mapping of fields, got {self.kind(node)}", job=label, node=node)
        pairs = self.pairs(node, job=label)
        explicit_id: str | None = None
        id_line: int | None = None
        if "id" in pairs:
            id_node = pairs["id"][1]
            explicit_id = self.job_id(id_node, label)
            label, id_line = explicit_id, _line(id_node)
        fields: dict[str, _Field] = {}
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
        return _Explicit(label=label, explicit_id=explicit_id, line=_line(node), id_line=id_line, fields=fields)

    def job_id(self, node: Node, label: str) -> str:
        value = self.scalar(node, job=label, field="id") if isinstance(node, ScalarNode) else None
        if isinstance(value, int) and not isinstance(value, bool) and isinstance(node, ScalarNode):
            value = node.value  # `id: 007` means the text 007, not the number 7
        if not isinstance(value, str):
            self.fail(f"must be a string, got {self.kind(node)}", job=label, field="id", node=node)
        try:
            return _check_id(value)
        except _Invalid as exc:
            self.fail(str(exc), job=label, field="id", node=node)

    def field_value(self, name: str, node: Node, *, job: str | None, key_node: Node, where: str) -> _Field:
        if name == "id":
            self.fail(
                "can only be set on an explicit job (matrix jobs and defaults get derived ids)",
                job=job,
                field=name,
                node=key_node,
            )
        flux = self.model == DEFAULT_MODEL
        if flux and name not in _FLUX_FIELDS:
            choices = (*_FLUX_FIELDS, "id") if where == "job" else _FLUX_FIELDS
            self.fail(
                f"unknown field for model {DEFAULT_MODEL}{_suggest(name, choices)}",
                job=job,
                field=name,
                node=key_node,
            )
        try:
            if flux:
                if not isinstance(node, ScalarNode):
                    raise _Invalid(f"must be {_FLUX_EXPECTED[name]}, got {self.kind(node)}")
                value = _FLUX_CHECKS[name](self.scalar(node, job=job, field=name), node)
            else:
                value, _ = self.json_value(node, job=job, field=name, depth=0)
            local = self.image_path(value) if name == "input_image" and isinstance(value, str) else None
        except _Invalid as exc:
            self.fail(str(exc), job=job, field=name, node=node)
        return _Field(name=name, value=value, line=_line(node), local=local)

    def image_path(self, value: str) -> Path | None:
        """Classify an input_image string; return the resolved path when it names a local file."""
        if not value.strip():
            raise _Invalid("must not be empty")
        if len(value) > MAX_STRING_CHARS:
            raise _Invalid(f"is {len(value):,} characters long, more than {MAX_STRING_CHARS:,}")
        if value[:5].lower() == "data:":
            return None  # passed through untouched: the API may accept it, and it names no file of ours
        scheme = _URL_SCHEME_RE.match(value)
        if scheme:
            if scheme.group(1).lower() not in ("http", "https"):
                raise _Invalid(f"URL scheme {scheme.group(1)!r} is not supported; use http(s) or a local path")
            problem = _url_problem(value)
            if problem is not None:
                raise _Invalid(problem)
            return None
        if "\x00" in value:
            raise _Invalid("contains a NUL character, which no file name can hold")
        cached = self.local_cache.get(value)
        if cached is None:
            # realpath, not Path.resolve(): it raises RuntimeError on a link loop, which the check names instead.
            cached = Path(os.path.realpath(self.base / value))
            self.local_cache[value] = cached
        return cached

    # -- YAML nodes ------------------------------------------------------------------------------------------

    def pairs(self, node: MappingNode, *, job: str | None) -> dict[str, tuple[Node, Node]]:
        """The mapping's entries by key, merge keys (``<<``) applied; a key written twice is an error."""
        seen: dict[Any, int | None] = {}
        for key_node, _ in node.value:
            if key_node.tag == _TAG_MERGE:
                continue
            key = self.key(key_node, job)
            if key in seen:
                first = seen[key]
                self.fail(
                    f"is written twice in the same mapping (first on line {first})",
                    job=job,
                    field=key,
                    node=key_node,
                )
            seen[key] = _line(key_node)
        try:
            self.constructor.flatten_mapping(node)
        except yaml.MarkedYAMLError as exc:
            self.fail_yaml(exc)
        out: dict[str, tuple[Node, Node]] = {}
        for key_node, value_node in node.value:
            out[self.key(key_node, job)] = (key_node, value_node)
        return out

    def key(self, node: Node, job: str | None) -> str:
        if isinstance(node, ScalarNode) and node.tag == _TAG_STR:
            return str(node.value)
        shown = f"{node.value!r}" if isinstance(node, ScalarNode) else self.kind(node)
        self.fail(f"keys must be strings, got {shown}; quote it", job=job, node=node)

    def scalar(self, node: ScalarNode, *, job: str | None, field: str | None) -> Any:
        if node.tag == _TAG_STR:
            return node.value  # the common case, without the constructor's bookkeeping
        try:
            return self.constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, OverflowError) as exc:
            self.fail(
                f"cannot read the value: {_one_line(str(exc).split(chr(10))[0])}",
                job=job,
                field=field,
                node=node,
            )

    def json_value(self, node: Node, *, job: str | None, field: str, depth: int) -> tuple[Any, int]:
        """A JSON value from a node, with its expanded size in JSON characters; linear even with aliases."""
        key = id(node)
        hit = self.memo.get(key)
        if hit is not None:
            return hit
        if key in self.active:
            raise _Invalid("refers to itself through a YAML alias")
        if depth > _MAX_DEPTH:
            raise _Invalid(f"is nested more than {_MAX_DEPTH} levels deep")
        value: Any
        if isinstance(node, ScalarNode):
            value = self.scalar(node, job=job, field=field)
            misread = _misread(node, value)
            if misread is not None:
                raise _Invalid(f"{misread}; quote it to send it as text")
            size = _scalar_size(value)
        elif isinstance(node, SequenceNode) and node.tag == _TAG_SEQ:
            self.active.add(key)
            items = [self.json_value(child, job=job, field=field, depth=depth + 1) for child in node.value]
            self.active.discard(key)
            value = [item for item, _ in items]
            size = 2 + len(items) + sum(s for _, s in items)
        elif isinstance(node, MappingNode) and node.tag == _TAG_MAP:
            self.active.add(key)
            entries = {
                name: self.json_value(child, job=job, field=field, depth=depth + 1)
                for name, (_, child) in self.pairs(node, job=job).items()
            }
            self.active.discard(key)
            value = {name: item for name, (item, _) in entries.items()}
            size = 2 + sum(len(name) + 4 + s for name, (_, s) in entries.items())
        else:
            raise _Invalid(f"uses the YAML tag {node.tag!r}, which has no JSON equivalent")
        if size > _MAX_VALUE_CHARS:
            raise _Invalid(f"is too large: about {size:,} characters of JSON, more than {_MAX_VALUE_CHARS:,}")
        self.memo[key] = (value, size)
        return value, size

    def kind(self, node: Node) -> str:
        if isinstance(node, MappingNode):
            return "a mapping"
        if isinstance(node, SequenceNode):
            return "a list"
        try:
            value = self.constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, OverflowError):
            return _show(str(node.value))
        return _describe(value)

    # -- images ----------------------------------------------------------------------------------------------

    def hash_images(
        self, defaults: dict[str, _Field], axes: dict[str, list[_Field]], explicit: list[_Explicit]
    ) -> None:
        """Check that each local image used by some job is a regular file, then hash each one once."""
        users: dict[Path, list[str]] = {}
        written: dict[Path, str] = {}
        lines: dict[Path, int | None] = {}

        def use(f: _Field | None, label: str) -> None:
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
            digest = self.attempt(self.hash_image, resolved, written[resolved], tuple(labels), lines[resolved])
            if digest is not None:
                hashes[resolved] = digest
        for f in itertools.chain(defaults.values(), *axes.values(), *(j.fields.values() for j in explicit)):
            if f.local is not None:
                f.sha256 = hashes.get(f.local)

    def hash_image(self, resolved: Path, written: str, jobs: tuple[str, ...], line: int | None) -> str:
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


# --------------------------------------------------------------------------------------------------
# Expansion: pure functions over validated fields


def _expand_matrix(
    defaults: dict[str, _Field], axes: dict[str, list[_Field]], line: int | None, tail: str, batch: _Batch
) -> None:
    """Matrix jobs in product order. Per job: one dict, one %-format, one sha256; the rest is precomputed."""
    if not axes:
        return
    names = list(axes)
    merged_names = sorted(set(defaults) | set(names))
    # The canonical JSON differs between jobs only in the axes' fragments, so build it from a template whose
    # placeholders sit where the sorted keys put each axis.
    pieces: list[str] = []
    order: list[int] = []
    for name in merged_names:
        if name in axes:
            pieces.append("%s")
            order.append(names.index(name))
        else:
            pieces.append(defaults[name].frag.replace("%", "%%"))
    template = '{"input":{' + ",".join(pieces) + "}" + tail.replace("%", "%%")
    base = {name: f.value for name, f in defaults.items()}

    # The derived id's prefix (image stem, prompt words, seed) is templated the same way.
    id_pieces: list[str] = []
    id_order: list[int] = []
    for name in _ID_FIELDS:
        if name in axes:
            id_pieces.append("%s")
            id_order.append(names.index(name))
        else:
            id_pieces.append(defaults[name].id_dash if name in defaults else "")
    id_template = "".join(id_pieces)
    image_axis = names.index("input_image") if "input_image" in axes else None
    image_const = defaults.get("input_image")

    # Every job's canonical JSON has the same length apart from the axes' fragments: check the total up front.
    count = math.prod(len(axis) for axis in axes.values())
    chars = count * (len(template) - 2 * len(order))
    chars += sum(count // len(axis) * sum(len(f.frag) for f in axis) for axis in axes.values())
    batch.spend(chars, line)

    sha256 = hashlib.sha256
    seen, jobs, id_lines = batch.seen, batch.jobs, batch.id_lines
    before = len(jobs)
    for combo in itertools.product(*axes.values()):
        fingerprint = sha256((template % tuple([combo[i].frag for i in order])).encode()).hexdigest()
        if fingerprint in seen:
            continue
        seen.add(fingerprint)
        job_input = base.copy()
        for name, f in zip(names, combo, strict=True):
            job_input[name] = f.value
        image = combo[image_axis] if image_axis is not None else image_const
        jobs.append(
            Job(
                id=id_template % tuple([combo[i].id_dash for i in id_order]) + fingerprint[:8],
                fingerprint=fingerprint,
                input=job_input,
                image_path=image.local if image is not None else None,
                image_sha256=image.sha256 if image is not None else None,
                line=line,
            )
        )
    id_lines.extend([None] * (len(jobs) - before))
    batch.duplicates += count - (len(jobs) - before)


def _expand_explicit(defaults: dict[str, _Field], explicit: list[_Explicit], tail: str, batch: _Batch) -> None:
    """Explicit jobs: defaults overridden by the job's own fields."""
    for job in explicit:
        merged = {**defaults, **job.fields}
        canonical = '{"input":{' + ",".join(merged[name].frag for name in sorted(merged)) + "}" + tail
        batch.spend(len(canonical), job.line)
        fingerprint = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        if fingerprint in batch.seen:
            batch.duplicates += 1
            continue
        batch.seen.add(fingerprint)
        job_id = job.explicit_id
        if job_id is None:
            job_id = "".join(merged[name].id_dash for name in _ID_FIELDS if name in merged) + fingerprint[:8]
        image = merged.get("input_image")
        batch.jobs.append(
            Job(
                id=job_id,
                fingerprint=fingerprint,
                input={name: f.value for name, f in merged.items()},
                image_path=image.local if image is not None else None,
                image_sha256=image.sha256 if image is not None else None,
                line=job.line,
            )
        )
        batch.id_lines.append(job.id_line)


def _finish(f: _Field) -> None:
    """Fill in a field's fingerprint fragment and its share of a derived id."""
    if f.local is not None:
        f.frag = f"{_dumps(f.name)}:{_dumps('sha256:' + (f.sha256 or ''))}"
    else:
        f.frag = f"{_dumps(f.name)}:{_dumps(f.value)}"
    v = f.value
    part = ""
    if f.name == "prompt" and isinstance(v, str):
        part = _prompt_slug(v)
    elif f.name == "input_image" and isinstance(v, str):
        part = _image_stem(v)
    elif f.name == "seed" and isinstance(v, int) and not isinstance(v, bool) and len(str(v)) <= 20:
        part = f"s{v}"
    f.id_dash = f"{part}-" if part else ""


# --------------------------------------------------------------------------------------------------
# Value checks for flux-kontext-max


def _check_prompt(value: Any, node: ScalarNode) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, got {_describe(value)}")
    if not value.strip():
        raise _Invalid("must not be empty")
    return _check_text(value)


def _check_image(value: Any, node: ScalarNode) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"must be a URL or a path to a local file, got {_describe(value)}")
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
    shown = _show(node.value) if isinstance(value, int) and not isinstance(value, bool) else _describe(value)
    near = _suggest(value, ASPECT_RATIOS, listing=False) if isinstance(value, str) else ""
    raise _Invalid(f"must be one of {', '.join(ASPECT_RATIOS)}; got {shown}{near}")


def _check_seed(value: Any, node: ScalarNode) -> int:
    number = _integer(value, node, "must be an integer")
    if not 0 <= number <= _MAX_SEED:
        raise _Invalid(f"must be between 0 and {_MAX_SEED}, got {number}")
    return number


def _check_tolerance(value: Any, node: ScalarNode) -> int:
    number = _integer(value, node, "must be an integer from 0 to 6")
    if not 0 <= number <= 6:
        raise _Invalid(f"must be from 0 to 6, got {number}")
    return number


def _check_output_format(value: Any, node: ScalarNode) -> str:
    if value not in _OUTPUT_FORMATS or not isinstance(value, str):
        near = _suggest(value, _OUTPUT_FORMATS, listing=False) if isinstance(value, str) else ""
        raise _Invalid(f"must be 'png' or 'jpg', got {_describe(value)}{near}")
    return value


def _integer(value: Any, node: ScalarNode, must: str) -> int:
    """An integer field's value, written as a plain decimal; else _Invalid with what the text probably meant."""
    if isinstance(value, int) and not isinstance(value, bool):
        misread = _misread(node, value)
        if misread is not None:
            raise _Invalid(misread)
        return int(value)
    hint = _decimal_hint(str(node.value)) if isinstance(value, str | float) else ""
    raise _Invalid(f"{must}, got {_describe(value)}{hint}")


def _misread(node: ScalarNode, value: Any) -> str | None:
    """Why a number or boolean is refused when YAML 1.1 may read its text other than the writer meant; else None.

    Only the raw text of the node tells: once constructed, ``010`` is just 8.
    """
    text = str(node.value)
    if node.tag == _TAG_INT and not _PLAIN_INT.fullmatch(text):
        return f"write integers as plain decimals: {_show(text)}{_decimal_hint(text, value)}"
    if node.tag == _TAG_FLOAT and ("_" in text or ":" in text):
        shown = repr(value) if isinstance(value, float) else "another number"
        return f"write numbers as plain decimals: {_show(text)} (YAML 1.1 reads it as {shown})"
    if node.tag == _TAG_BOOL and text.lower() not in ("true", "false"):
        return f"YAML 1.1 reads {_show(text)} as {str(value).lower()}: write true or false"
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
        return f"URL cannot be read ({exc}): {_show(url)}"
    if "@" in parts.netloc:
        # The URL is not shown: it holds a password.
        return "URL carries a user name or password (user:pass@host); take them out, the API cannot use them"
    if not host:
        return f"URL has no host: {_show(url)}"
    if not _is_host(host):
        return f"URL host {_show(host)} is not a valid host name"
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


_FLUX_CHECKS: dict[str, Callable[[Any, ScalarNode], Any]] = {
    "prompt": _check_prompt,
    "input_image": _check_image,
    "aspect_ratio": _check_aspect_ratio,
    "seed": _check_seed,
    "safety_tolerance": _check_tolerance,
    "output_format": _check_output_format,
}
_FLUX_EXPECTED = {
    "prompt": "a string",
    "input_image": "a URL or a path to a local file",
    "aspect_ratio": "one of " + ", ".join(ASPECT_RATIOS),
    "seed": "an integer",
    "safety_tolerance": "an integer from 0 to 6",
    "output_format": "'png' or 'jpg'",
}


def _check_text(value: str) -> str:
    if len(value) > MAX_STRING_CHARS:
        raise _Invalid(f"is {len(value):,} characters long, more than {MAX_STRING_CHARS:,}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _Invalid("contains a character that is not valid Unicode text") from None
    return value


def _check_id(value: str) -> str:
    if not _ID_RE.fullmatch(value):
        raise _Invalid(
            f"must be 1-100 characters of letters, digits, '.', '_' or '-', starting with a letter or digit; "
            f"got {_show(value)}"
        )
    if ".." in value:
        raise _Invalid(f"must not contain '..', got {_show(value)}")
    if value.endswith("."):
        raise _Invalid(f"must not end with '.' (Windows drops it), got {_show(value)}")
    if value.split(".", 1)[0].upper() in _WINDOWS_RESERVED:
        raise _Invalid(f"{_show(value)} is a reserved file name on Windows")
    return value


def _scalar_size(value: Any) -> int:
    """Approximate JSON length of a scalar; rejects what JSON cannot carry."""
    if value is None or isinstance(value, bool):
        return 5
    if isinstance(value, int):
        return len(str(value)) if abs(value) < 10**100 else 101
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _Invalid(f"must be a finite number, got {value!r}")
        return len(repr(value))
    if isinstance(value, str):
        return len(_check_text(value)) + 2
    raise _Invalid(f"is not a JSON value: YAML read it as {_describe(value)}; quote it to send it as text")


# --------------------------------------------------------------------------------------------------
# Small helpers


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _line(node: Node | None) -> int | None:
    if node is None or node.start_mark is None:
        return None
    return int(node.start_mark.line) + 1


def _suggest(word: str, choices: tuple[str, ...], *, listing: bool = True) -> str:
    """``; did you mean 'x'?`` when a choice is close; else the choices (when ``listing``) or nothing."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; expected one of {', '.join(choices)}" if listing else ""


def _show(text: str, limit: int = 40) -> str:
    """A value quoted for a one-line message: repr escapes newlines and control characters."""
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _describe(value: Any) -> str:
    if value is None:
        return "null (nothing)"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _show(value)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, bytes):
        return "binary data"
    return f"a {type(value).__name__}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


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
    if _URL_SCHEME_RE.match(written):
        name = unquote(urlsplit(written).path).rsplit("/", 1)[-1]
    else:
        name = re.split(r"[\\/]", written)[-1]
    stem = name.rsplit(".", 1)[0] if "." in name[1:] else name
    return _slug(stem)[:_STEM_SLUG_CHARS].rstrip("-")
