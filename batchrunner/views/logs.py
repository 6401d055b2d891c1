"""Logging for the command line: where records go, how they read, and the mask over the API key.

Three formats: on a terminal a short one (``12:03:04 warning: job x failed: ...``), elsewhere timestamped plain
lines for cron (``2026-01-01T12:03:04+0000 WARNING job x failed: ...``), and ``--log-format json``: one object per
line with ``ts``, ``level``, ``message`` and ``event``, plus the record's fields (counts on progress and summary
records; ``job``, ``error_code``, ``error`` on failures). A record carries its fields as ``extra={"fields": {...}}``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import TextIO

from batchrunner.api.redact import Redactor
from batchrunner.errors import UsageError
from batchrunner.store.output import describe_os_error

__all__ = ["NOTICE", "JsonFormatter", "LogFile", "RedactingFilter", "TerminalFormatter", "setup_logging"]

log = logging.getLogger("batchrunner")
# Between INFO and WARNING: the summary of a clean run, which --quiet still shows.
NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")


class JsonFormatter(logging.Formatter):
    """One JSON object per record; ``event`` is ``log`` for a record that names none."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": "log",
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_text:
            entry["traceback"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False)


class TerminalFormatter(logging.Formatter):
    """Short lines for a person at a terminal: the time of day, the level only when it is not plain information."""

    def format(self, record: logging.LogRecord) -> str:
        clock = time.strftime("%H:%M:%S", time.localtime(record.created))
        level = "" if record.levelno <= NOTICE else f"{record.levelname.lower()}: "
        text = f"{clock} {level}{record.getMessage()}"
        if record.exc_text:
            text += "\n" + record.exc_text
        return text


class RedactingFilter(logging.Filter):
    """Masks the API key, and every piece of it, in each record a handler writes: the last line of defence."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self._redact = redact
        self._formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        redact = self._redact
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed call: logging reports it; mask what it would print
            message = str(record.msg)
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            record.fields = {k: redact(v) if isinstance(v, str) else v for k, v in fields.items()}
        return True


class LogFile(logging.FileHandler):
    """The ``--log-file``. When it cannot be written mid-run (a full disk, a vanished mount) that is said once, on the
    other handlers, and the file gets no more lines: a run does not give up paid work because its log broke."""

    broken = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.broken:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        if self.broken:
            return
        self.broken = True
        exc = sys.exc_info()[1]
        reason = describe_os_error(exc) if isinstance(exc, OSError) else type(exc).__name__
        with contextlib.suppress(Exception):
            self.close()  # flushing again may fail the same way
        log.error("cannot write log file %s: %s; logging on to stderr only, the run goes on", self.baseFilename, reason)


def setup_logging(
    stream: TextIO,
    *,
    fmt: str = "text",
    file: Path | None = None,
    quiet: bool = False,
    redact: Redactor | None = None,
    terminal: bool = False,
) -> None:
    """Send the ``batchrunner`` logger's records to ``stream`` (and ``file``): JSON, short lines when ``terminal``,
    else timestamped lines. ``--quiet`` keeps warnings, errors and the summary (NOTICE)."""
    root = logging.getLogger("batchrunner")
    root.handlers.clear()
    root.propagate = False
    root.setLevel(NOTICE if quiet else logging.INFO)
    plain = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S%z")
    console: logging.Formatter = JsonFormatter() if fmt == "json" else TerminalFormatter() if terminal else plain
    handlers: list[tuple[logging.Handler, logging.Formatter]] = [(logging.StreamHandler(stream), console)]
    if file is not None:
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            # A log file is read later and elsewhere: full timestamps, whatever the terminal shows.
            handlers.append((LogFile(file, encoding="utf-8"), JsonFormatter() if fmt == "json" else plain))
        except OSError as exc:
            raise UsageError(f"cannot open log file {file}: {describe_os_error(exc)}") from exc
    for handler, formatter in handlers:
        handler.setFormatter(formatter)
        if redact:
            handler.addFilter(RedactingFilter(redact))
        root.addHandler(handler)
