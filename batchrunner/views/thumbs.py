"""The report's thumbnails: small JPEG files in ``<output>/thumbs/``, made once each and kept between reports.

A thumbnail's name is a hash of what it shows (an input's sha256; an output's name, size and modification time)
and of its size in pixels, so a report written at the end of every run makes thumbnails only for the images that
are new since the last one, and a name never shows a stale picture. Thumbnails no report refers to any more are
removed. Files are written whole and renamed into place, never through a link; a ``thumbs`` that is not a plain
folder is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import secrets
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, ImageOps

from batchrunner.errors import OutputError
from batchrunner.store.output import describe_os_error

__all__ = ["THUMBS_DIR", "Thumbnails", "thumbnail_jpeg"]

THUMBS_DIR = "thumbs"
_JPEG_QUALITY = 78
_WORKERS = 4  # Pillow decodes and encodes without the GIL: a few threads use the cores


def thumbnail_jpeg(path: Path, px: int) -> bytes | None:
    """A JPEG thumbnail (longest side at most ``px``, upright, transparency on white) of the image at ``path``;
    None when it cannot be read as an image."""
    try:
        with Image.open(path) as img:
            # thumbnail() decodes a JPEG at a reduced scale, so a large photo never sits in memory at full size.
            img.thumbnail((px, px))
            small = ImageOps.exif_transpose(img)
            if small.mode in ("RGBA", "LA", "PA") or "transparency" in small.info:
                rgba = small.convert("RGBA")
                small = Image.new("RGB", rgba.size, (255, 255, 255))
                small.paste(rgba, mask=rgba.getchannel("A"))
            buf = io.BytesIO()
            small.convert("RGB").save(buf, "JPEG", quality=_JPEG_QUALITY, optimize=True)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return None
    return buf.getvalue()


class Thumbnails:
    """The thumbnails one report needs. ``input``/``output`` name them (a path relative to the report); ``make``
    writes the missing ones and removes the unused."""

    def __init__(self, folder: Path, px: int) -> None:
        self.folder = folder
        self.dir = folder / THUMBS_DIR
        self.px = px
        self._wanted: dict[str, Path] = {}  # file name -> source image

    def _name(self, key: str) -> str:
        return hashlib.sha256(f"{key}\0{self.px}".encode()).hexdigest()[:20] + ".jpg"

    def input(self, path: Path, sha256: str | None) -> str:
        key = f"in:{sha256}" if sha256 else f"in-path:{path}"
        return self._want(key, path)

    def output(self, path: Path) -> str | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return self._want(f"out:{path.name}:{st.st_size}:{st.st_mtime_ns}", path)

    def _want(self, key: str, source: Path) -> str:
        name = self._name(key)
        self._wanted.setdefault(name, source)
        return f"{THUMBS_DIR}/{name}"

    def make(self) -> set[str]:
        """Write the thumbnails not on disk yet, remove those not wanted; return the names that could not be made
        (unreadable images), whose pictures the report shows as 'no preview'."""
        self._check_dir()
        try:
            present = {entry.name for entry in os.scandir(self.dir)}
        except OSError as exc:
            raise OutputError(f"cannot read {self.dir}: {describe_os_error(exc)}") from None
        missing = [(name, src) for name, src in self._wanted.items() if name not in present]
        failed: set[str] = set()
        with ThreadPoolExecutor(_WORKERS) as pool:
            for name, data in zip(
                (n for n, _ in missing), pool.map(lambda item: thumbnail_jpeg(item[1], self.px), missing), strict=True
            ):
                if data is None:
                    failed.add(name)
                else:
                    self._write(name, data)
        for name in present - set(self._wanted):
            if name.endswith(".jpg"):
                with contextlib.suppress(OSError):
                    (self.dir / name).unlink()
        return failed

    def _check_dir(self) -> None:
        try:
            st = os.lstat(self.dir)
        except FileNotFoundError:
            try:
                self.dir.mkdir(parents=True)
            except OSError as exc:
                raise OutputError(f"cannot make {self.dir}: {describe_os_error(exc)}") from None
            return
        except OSError as exc:
            raise OutputError(f"cannot read {self.dir}: {describe_os_error(exc)}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{self.dir} is not a folder (a link or a file is in its place); remove it")

    def _write(self, name: str, data: bytes) -> None:
        tmp = self.dir / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            with open(tmp, "xb") as fh:
                fh.write(data)
            os.replace(tmp, self.dir / name)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise OutputError(f"cannot write {self.dir / name}: {describe_os_error(exc)}") from None
