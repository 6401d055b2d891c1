"""``batchrunner export``: one row per job, as CSV or JSON lines, for spreadsheets and scripts.

Each row has the job's id, its output file, its status (in the words of ``words.py``), every input field
(``prompt``, ``input_image``, ``seed``, ``aspect_ratio`` first, then the others the manifest uses, by name), the
attempts, the prediction id, the cost, the model's own time and the last error: a spreadsheet user finds the
prompt of any output file by its name. From the manifest and the ledger alone: no request is made.

CSV is for spreadsheets, so a text cell that a spreadsheet would run as a formula (``=``, ``+``, ``-``, ``@``, tab,
carriage return first: a prompt or an API error text can be anything) is written with a leading ``'``; JSON lines are
for programs and keep every value as it is.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

from batchrunner.engine.runstate import classify
from batchrunner.errors import OutputError
from batchrunner.manifest import Job, Manifest
from batchrunner.store.ledger import JobState, LedgerState
from batchrunner.store.output import OutputDir, describe_os_error
from batchrunner.views.history import History
from batchrunner.views.words import STATUS_WORDS

__all__ = ["FIRST_INPUTS", "columns", "job_row", "neutralise", "rows", "write_export"]

FIRST_INPUTS = ("prompt", "input_image", "seed", "aspect_ratio")
_HEAD = ("id", "file", "status")
_TAIL = ("attempts", "prediction_id", "cost", "model_time", "error_code", "error")


def columns(manifest: Manifest) -> list[str]:
    """The header: id, file, status, the input fields (the four usual ones first), then the run's facts."""
    others = sorted({name for job in manifest.jobs for name in job.input} - set(FIRST_INPUTS))
    return [*_HEAD, *FIRST_INPUTS, *others, *_TAIL]


def job_row(
    job: Job, state: JobState | None, *, file_present: bool, max_attempts: int, model_time: float | None
) -> dict[str, Any]:
    """One job's row. Pure: ``file_present`` tells whether its output file is on disk."""
    verdict = classify(state, file_present=file_present, max_attempts=max_attempts)
    row: dict[str, Any] = {"id": job.id, "file": None, "status": STATUS_WORDS[verdict]}
    for name in FIRST_INPUTS:
        row[name] = None
    row.update(job.input)
    row.update(dict.fromkeys(_TAIL))
    row["attempts"] = 0
    if state is not None:
        # The ledger counts failed predictions; a person counts tries, the one that succeeded or runs included.
        row["attempts"] = state.attempts + (1 if verdict in ("done", "poll") else 0)
        row["prediction_id"] = state.prediction_id
        row["cost"] = state.cost
        if verdict == "done":
            row["file"] = state.file
            row["model_time"] = model_time
        else:
            row["error_code"], row["error"] = state.error_code, state.error
    return row


def rows(
    manifest: Manifest, state: LedgerState, out: OutputDir, history: History, *, max_attempts: int
) -> Iterator[dict[str, Any]]:
    """Every job's row, in manifest order."""
    for job in manifest.jobs:
        st = state.jobs.get(job.fingerprint)
        present = st is not None and out.has_file(st.file)
        yield job_row(
            job,
            st,
            file_present=present,
            max_attempts=max_attempts,
            model_time=history.model_times.get(job.fingerprint),
        )


# OWASP's CSV-injection rule: a spreadsheet reads a cell starting with one of these as a formula (a tab or a carriage
# return before one is skipped), so such a text cell gets a leading ' and is shown as the text it is.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def neutralise(text: str) -> str:
    """``text`` as a spreadsheet shows it and never evaluates: prefixed with ``'`` when it could start a formula."""
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)  # a finite number (the manifest allows no other) is a number, never a formula: -2 stays -2
    if isinstance(value, str):
        return neutralise(value)
    return json.dumps(value, ensure_ascii=False, sort_keys=True)  # another model's list or object: starts [ or {


def write_rows(fmt: str, header: list[str], records: Iterator[Mapping[str, Any]], sink: TextIO) -> int:
    """Write ``records`` to ``sink`` as ``csv`` or ``jsonl``; return how many."""
    count = 0
    if fmt == "csv":
        writer = csv.writer(sink, lineterminator="\r\n")  # RFC 4180, what spreadsheets expect
        writer.writerow([neutralise(name) for name in header])
        for record in records:
            writer.writerow([_cell(record.get(name)) for name in header])
            count += 1
    else:
        for record in records:
            sink.write(json.dumps({name: record.get(name) for name in header}, ensure_ascii=False) + "\n")
            count += 1
    return count


def write_export(
    manifest: Manifest,
    state: LedgerState,
    out: OutputDir,
    history: History,
    *,
    fmt: str,
    to: Path | None,
    stdout: TextIO,
    max_attempts: int = 3,
) -> int:
    """Export to ``stdout``, or to the file ``to`` (written whole, then renamed into place); return the row count."""
    header = columns(manifest)
    records = rows(manifest, state, out, history, max_attempts=max_attempts)
    if to is None:
        return write_rows(fmt, header, records, stdout)
    tmp = to.with_name(f".{to.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            count = write_rows(fmt, header, records, fh)
        os.replace(tmp, to)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {to}: {describe_os_error(exc)}") from None
    return count
