"""Expansion: validated fields -> distinct jobs, the matrix's image x prompt x seed product, then explicit jobs.

Pure functions over :class:`~batchrunner.manifest.jobs.Field` values. Matrix jobs come first in product order
(axes in the order written), then explicit jobs with the defaults beneath their own fields; a job whose
fingerprint equals an earlier one's is dropped and counted. A 100,000-job matrix is expanded with one dict,
one %-format and one sha256 per job: everything else is precomputed once.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import replace
from pathlib import Path

from batchrunner.errors import ManifestError
from batchrunner.manifest.jobs import ID_FIELDS, Explicit, Field, Job, dumps, finish

_MAX_BATCH_CHARS = 256 * 1024 * 1024


class Batch:
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


def expand_matrix(
    defaults: dict[str, Field], axes: dict[str, list[Field]], line: int | None, tail: str, batch: Batch
) -> None:
    """Matrix jobs in product order. Per job: one dict, one %-format, one sha256; the rest is precomputed."""
    if not axes:
        return
    names = list(axes)
    template, order = _input_template(defaults, names, tail)
    base = {name: f.value for name, f in defaults.items()}
    id_template, id_order = _id_template(defaults, names)
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


def _input_template(defaults: dict[str, Field], names: list[str], tail: str) -> tuple[str, list[int]]:
    """The canonical JSON of a matrix job as a %-template, and the axis filling each placeholder in turn.

    The canonical JSON differs between jobs only in the axes' fragments, so it is built from a template whose
    placeholders sit where the sorted keys put each axis.
    """
    pieces: list[str] = []
    order: list[int] = []
    for name in sorted(set(defaults) | set(names)):
        if name in names:
            pieces.append("%s")
            order.append(names.index(name))
        else:
            pieces.append(defaults[name].frag.replace("%", "%%"))
    return '{"input":{' + ",".join(pieces) + "}" + tail.replace("%", "%%"), order


def _id_template(defaults: dict[str, Field], names: list[str]) -> tuple[str, list[int]]:
    """The derived id's prefix (image stem, prompt words, seed), templated the same way."""
    pieces: list[str] = []
    order: list[int] = []
    for name in ID_FIELDS:
        if name in names:
            pieces.append("%s")
            order.append(names.index(name))
        else:
            pieces.append(defaults[name].id_dash if name in defaults else "")
    return "".join(pieces), order


def expand_explicit(defaults: dict[str, Field], explicit: list[Explicit], tail: str, batch: Batch) -> None:
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
            job_id = "".join(merged[name].id_dash for name in ID_FIELDS if name in merged) + fingerprint[:8]
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


def build_jobs(
    defaults: dict[str, Field],
    axes: dict[str, list[Field]],
    explicit: list[Explicit],
    matrix_line: int | None,
    *,
    model: str,
    version: str,
    path: Path,
) -> Batch:
    """Every distinct job of a manifest, ids settled: the fields' fragments filled in, matrix jobs, explicit jobs."""
    for f in itertools.chain(defaults.values(), *axes.values(), *(j.fields.values() for j in explicit)):
        finish(f)
    tail = f',"model":{dumps(model)},"version":{dumps(version)}}}'
    batch = Batch(path)
    expand_matrix(defaults, axes, matrix_line, tail, batch)
    expand_explicit(defaults, explicit, tail, batch)
    batch.settle_ids()
    return batch
