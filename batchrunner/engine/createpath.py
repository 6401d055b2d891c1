"""Which form of the create path an API URL takes, remembered in the output folder for later runs.

The client starts on the documented ``/v1/prediction`` and switches to ``/v1/prediction/`` when a server refuses the
first (see ``client.create_path_refused``); that costs one refused request per run. A run remembers the form its
server took in ``<output>/.create-path.json``, with the API URL it belongs to, so the next run (a cron tick) on the
same folder and URL starts on the right form. The output folder, not the state folder: it is written under the
folder's lock (two runs never race on it), a run can already write there (or it stops with exit 74), and a
throwaway URL (the simulator's random port) leaves nothing behind outside the folder. A folder of a new batch learns
again, at the price of one refused request.

Only a hint: a file that is missing, unreadable, corrupt or of another URL is no hint, and one that cannot be
written costs a warning, never the run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path

from batchrunner.api.client import CREATE_PATHS
from batchrunner.errors import OutputError
from batchrunner.store.files import open_own, read_small

__all__ = ["create_path_file", "load_create_path", "save_create_path"]

log = logging.getLogger("batchrunner")
_MAX_BYTES = 64 * 1024


def create_path_file(out_dir: Path) -> Path:
    return out_dir / ".create-path.json"


def load_create_path(out_dir: Path, api_url: str) -> str | None:
    """The form of the create path a run on ``out_dir`` learnt for ``api_url``, or None."""
    try:
        fd = open_own(create_path_file(out_dir), os.O_RDONLY)
    except (OSError, OutputError):
        return None
    try:
        data = read_small(fd, _MAX_BYTES)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        document = json.loads(data) if data is not None else None
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict) or document.get("api_url") != api_url.rstrip("/"):
        return None
    path = document.get("path")
    return path if path in CREATE_PATHS else None


def save_create_path(out_dir: Path, api_url: str, path: str) -> None:
    """Remember that ``api_url`` takes the create path ``path``; a failure to write is a warning."""
    target = create_path_file(out_dir)
    text = json.dumps({"api_url": api_url.rstrip("/"), "path": path})
    try:
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f"{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(tmp, target)  # replaces a link planted in its place, never writes through it
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        log.warning("%s: cannot remember the create path: %s", target, exc.strerror or exc)
