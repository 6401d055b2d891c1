"""The file names a run will write in its output folder, and the check that none lands on a paid image or an input.

A job's image is saved as ``<id>.<ext>``, and the extension is known only once the image is downloaded (png, jpg,
webp or gif), so a job claims its id with every extension. Names compare ignoring letter case, as ids do: a
case-insensitive file system folds ``Hero.png`` and ``hero.png`` into one file.

Who writes in a run: every job of the manifest that is not done (no recorded output, or its file is gone), under
its id; and every prediction the ledger has in flight, under the id the ledger gives it, since a resumed run
downloads it whether or not the manifest still has its job.

What must not be written over:

- **a paid output**: a name the ledger records as the output of a job with another fingerprint (another input).
  This holds whether or not the file is still there, since the ledger goes on saying the name is that job's
  result (``status`` and ``report`` would show the new image as the old job's). Two manifests giving one id to
  different jobs in one folder, and an ``id:`` job whose prompt was edited, both end here.
- **another flight**: two writers of different fingerprints under one id, such as an edited job while the
  prediction of its earlier version is still in flight.
- **an input image**: an output folder that holds the manifest's input images. Overwritten, an input would also
  change its hash, so the next run would take its jobs for new ones and pay for them again.
- an input image inside the folder's ``.partial/``, which every run empties at its start.

Decision: **refuse, exit 2, naming both sides** rather than give the new job another name. A new name would be
chosen behind the user's back and would differ from the id they wrote (and from what ``status`` shows); the
refusal costs one edit (another id, or another ``--output``) and nothing is paid or touched before it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from batchrunner.errors import ManifestError
from batchrunner.manifest import Job, Manifest
from batchrunner.store.ledger import JobState, JobStatus, LedgerState
from batchrunner.store.output import IMAGE_EXTENSIONS, PARTIAL_DIR, OutputDir

__all__ = ["Conflict", "check_output_names", "output_conflicts"]

_EXTENSIONS = tuple(dict.fromkeys(IMAGE_EXTENSIONS.values()))
_ADVICE = "give this job another id, or use another --output"


@dataclass(frozen=True, slots=True)
class Conflict:
    """One output name that a run would write over something it must keep: who writes, where, and why not."""

    job: str
    line: int | None
    message: str


@dataclass(frozen=True, slots=True)
class _Writer:
    fingerprint: str
    job_id: str
    line: int | None
    flight: bool  # a prediction already in flight, saved under the ledger's id when it finishes


def output_conflicts(
    jobs: Sequence[Job], state: LedgerState, out_dir: Path, *, has_file: Callable[[str], bool]
) -> list[Conflict]:
    """Every name the next run of ``jobs`` into ``out_dir`` would write over a paid output, another flight's name or
    an input image (see the module docstring); [] when there is none. ``has_file(name)`` tells whether a file of
    the folder is there. Pure apart from that: input paths come resolved in the jobs."""
    owners: dict[str, JobState] = {}
    for st in state.jobs.values():
        if st.file:
            owners.setdefault(st.file.casefold(), st)
    folder = out_dir.resolve()
    inputs: dict[str, Path] = {}
    conflicts: list[Conflict] = []
    for job in jobs:
        if job.image_path is None:
            continue
        if job.image_path.parent == folder:
            inputs.setdefault(job.image_path.name.casefold(), job.image_path)
        elif job.image_path.parent == folder / PARTIAL_DIR:
            conflicts.append(
                Conflict(
                    job.id,
                    job.line,
                    f"its input image {job.image_path} is in {PARTIAL_DIR}/ of the output folder, which every run "
                    "empties; move it out",
                )
            )

    claimed: dict[str, _Writer] = {}
    for writer in _writers(jobs, state, has_file):
        for ext in _EXTENSIONS:
            name = f"{writer.job_id}.{ext}".casefold()
            conflict = _judge(writer, owners.get(name), claimed.get(name), inputs.get(name), has_file)
            if conflict is not None:
                conflicts.append(conflict)
                break
            claimed.setdefault(name, writer)
    return conflicts


def check_output_names(manifest: Manifest, state: LedgerState, out: OutputDir) -> None:
    """Raise ManifestError (exit 2) for the first output name conflict of the manifest's next run into ``out``."""
    conflicts = output_conflicts(manifest.jobs, state, out.path, has_file=out.has_file)
    if conflicts:
        first = conflicts[0]
        more = f" ({len(conflicts) - 1} more jobs like it)" if len(conflicts) > 1 else ""
        raise ManifestError(first.message + more, file=manifest.path, job=first.job, field="id", line=first.line)


def _writers(jobs: Sequence[Job], state: LedgerState, has_file: Callable[[str], bool]) -> list[_Writer]:
    """The manifest's jobs that are not done, under their ids; then every prediction in flight, under the ledger's
    id for it (which differs from the manifest's when the id was edited since)."""
    writers: list[_Writer] = []
    in_manifest: dict[str, Job] = {}
    for job in jobs:
        in_manifest[job.fingerprint] = job
        st = state.jobs.get(job.fingerprint)
        if st is not None and st.status is JobStatus.SUCCEEDED and st.file and has_file(st.file):
            continue  # done: the run skips it
        writers.append(_Writer(job.fingerprint, job.id, job.line, flight=False))
    for st in state.in_flight():
        if st.prediction_id is not None:
            known = in_manifest.get(st.fingerprint)
            writers.append(_Writer(st.fingerprint, st.job, known.line if known else None, flight=True))
    return writers


def _judge(
    writer: _Writer, owner: JobState | None, other: _Writer | None, image: Path | None, has_file: Callable[[str], bool]
) -> Conflict | None:
    if writer.flight:
        saved_as = (
            f"the prediction in flight for the ledger's job {writer.job_id!r} would be saved as {writer.job_id}.<ext>"
        )
    else:
        saved_as = f"its image would be saved as {writer.job_id}.<ext>"
    # A prediction in flight cannot be given another name: only a file still there stops it (moved aside, it is
    # kept). A job of the manifest can, so the name stays the old job's even once its file is gone.
    taken = owner is not None and owner.file and owner.fingerprint != writer.fingerprint
    if owner is not None and owner.file and taken and (not writer.flight or has_file(owner.file)):
        advice = f"move {owner.file} aside to keep it" if writer.flight else _ADVICE
        return Conflict(
            writer.job_id,
            writer.line,
            f"{saved_as}, over {owner.file}, the paid output of the ledger's job {owner.job!r} "
            f"(another input: fingerprint {owner.fingerprint[:12]}); {advice}",
        )
    if other is not None and not other.flight and writer.flight and other.fingerprint != writer.fingerprint:
        # Two flights under one id cannot come from runs this check let through, and neither can be renamed.
        return Conflict(
            other.job_id,
            other.line,
            f"its image would be saved as {other.job_id}.<ext>, the name the prediction still in flight for the "
            f"ledger's job {writer.job_id!r} (another input: fingerprint {writer.fingerprint[:12]}) is saved under; "
            + _ADVICE,
        )
    if image is not None:
        return Conflict(
            writer.job_id,
            writer.line,
            f"{saved_as}, over the input image {image}; keep the input images out of the output folder",
        )
    return None
