"""The simulator's storage host: presigned uploads, what their PUT must carry, and how long files are kept.

Pure: an :class:`Upload` records what its presign promised; :func:`upload_refusal` and :func:`missing_file`
decide from it and a clock reading. ``expires_in_seconds`` of a presign is the stored file's retention (default
180 days, clamped to 60 s - 365 days, not refused); the presigned PUT URL itself lasts 15 minutes.
"""

from __future__ import annotations

import math
import urllib.parse
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final
from xml.sax.saxutils import escape

__all__ = [
    "DEFAULT_RETENTION",
    "MAX_RETENTION",
    "MIN_RETENTION",
    "UPLOAD_URL_LIFETIME",
    "Upload",
    "file_id",
    "missing_file",
    "retention_seconds",
    "s3_error",
    "upload_refusal",
]

DAY: Final = 86400
DEFAULT_RETENTION: Final = 180 * DAY
MIN_RETENTION: Final = 60
MAX_RETENTION: Final = 365 * DAY
UPLOAD_URL_LIFETIME: Final = 15 * 60  # the presigned PUT URL itself; not returned by presign


@dataclass(slots=True)
class Upload:
    """One presigned upload: what its PUT must carry, until when, and (once PUT) its bytes."""

    content_type: str
    required_headers: dict[str, str]
    url_expires_at: float  # the presigned PUT URL's end
    retained_until: float  # the stored file's end (``expires_at`` of the presign)
    data: bytes | None = None


def retention_seconds(value: Any) -> int | None:
    """A presign's ``expires_in_seconds`` (absent: the default) clamped to the documented range; None if not a
    number. The docs clamp rather than refuse, so 10 becomes 60 and ten years become 365 days."""
    if value is None:
        return DEFAULT_RETENTION
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return int(min(MAX_RETENTION, max(MIN_RETENTION, value)))


def upload_refusal(headers: Mapping[str, str], upload: Upload, now: float) -> tuple[str, str] | None:
    """Why a presigned PUT is refused, as an S3 (code, message), or None when it is accepted.

    The signature covers the Content-Type sent to presign and every header of ``required_headers`` (values
    exact; ``headers`` should be case-insensitive, as aiohttp's are); an upload URL past its lifetime is
    refused as S3 refuses it.
    """
    if now > upload.url_expires_at:
        return "AccessDenied", "Request has expired"
    if headers.get("Content-Type") != upload.content_type:
        return "SignatureDoesNotMatch", "The request signature we calculated does not match the signature you provided."
    for name, value in upload.required_headers.items():
        if headers.get(name) != value:
            return (
                "SignatureDoesNotMatch",
                f"The request signature we calculated does not match the signature you provided ({name}).",
            )
    return None


def s3_error(code: str, message: str, resource: str = "") -> str:
    """An S3-like XML error body."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
        f"<Resource>{escape(resource)}</Resource></Error>"
    )


def file_id(ref: Any, hosts: Collection[str], port: int) -> str | None:
    """The upload id when ``ref`` is a ``/files/{id}`` URL on one of ``hosts`` at ``port``, else None."""
    if not isinstance(ref, str) or not ref.startswith(("http://", "https://")):
        return None
    try:
        parts = urllib.parse.urlsplit(ref)
        ref_port = parts.port
    except ValueError:
        return None
    if ref_port != port or parts.hostname not in hosts or not parts.path.startswith("/files/"):
        return None
    return parts.path.removeprefix("/files/")


def missing_file(upload: Upload | None, ref: str, now: float) -> str | None:
    """Why fetching the file ``ref`` (of ``upload``) fails now, as a downloader would report it, or None."""
    if upload is None:
        return f"HTTP 404 from {ref}: no such file"
    if upload.data is None:
        return f"HTTP 404 from {ref}: the upload was never completed"
    if now > upload.retained_until:
        return f"HTTP 404 from {ref}: the file has expired"
    return None
