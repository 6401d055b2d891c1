"""Input images checked before anything is paid for: local files decoded, input URLs probed.

Local images (:func:`inspect_image`, :func:`local_images`) are opened with Pillow and fully decoded, so a
file that is missing, unreadable, empty, too large, cut short or of a format the API does not take fails the
run before the first prediction is created, with one line naming the file and the jobs that use it. Each
distinct content is inspected once however many jobs share it. The format is read from the bytes, never from
the file name: a JPEG named ``.png`` is uploaded as ``image/jpeg``.

Decisions:

- **No conversion.** A BMP, TIFF, HEIC (or any other format Pillow reads but the API does not take) is
  rejected, not converted to PNG. A silent conversion changes what the user sends and what they pay for (a
  re-encoded JPEG loses quality, a PNG of a photo is several times larger); they can convert deliberately
  with the tool of their choice.
- **The first frame is decoded.** ``img.load()`` decodes the first frame of an animated GIF or WebP; the
  image models read a still image, so later frames are not worth the CPU.
- **Pillow's decompression-bomb limit stays at its default** (about 179 million pixels): an image beyond it
  fails with a message saying so, rather than the run raising the limit for everyone. Between half that and the
  limit Pillow only warns (``DecompressionBombWarning``): a 100-megapixel photo is real, so it is decoded, and the
  warning, like every warning Pillow gives while reading an image, goes to our log as one line naming the file
  instead of to stderr as a Python warning.
- **Sync on purpose.** Decoding a large image is CPU-bound, so these functions are plain functions; the
  caller runs them before the event loop starts.
- A JPEG that Pillow reads as MPO (a camera's JPEG with a second picture appended) is a JPEG to the API.

Input URLs are checked before anything is paid (:func:`unfetchable_host`, :func:`check_url_hosts`): the API's
servers fetch ``input_image`` from the internet, so a URL naming ``localhost``, a name that only a local network
resolves (``.local``, ``.internal``, ``.home.arpa``) or never resolves (``.invalid``, ``.test``, ``.example``), or a
loopback, private, link-local or otherwise non-public IP address (written in any form the URL parsers of
browsers and curl read, such as ``127.1`` or ``2130706433``) is refused, naming the job and line. The check is
skipped when the API itself is at such an address (the simulator, a server of your own): that server can fetch
what its network reaches. Names that resolve to private addresses are not looked up: no DNS query is made.

Input URLs (:func:`url_inputs`, :func:`check_urls`) are probed with a HEAD request, falling back to a ranged
GET of one byte for servers that refuse HEAD (405/501) or sign their URLs for GET only (403, as S3 does).
No API key is ever sent: the probes go to third-party hosts.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import ipaddress
import logging
import os
import socket
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from PIL import Image, UnidentifiedImageError

from batchrunner.errors import InputImageError, ManifestError
from batchrunner.manifest.jobs import Manifest
from batchrunner.manifest.localpaths import (
    MAX_UPLOAD_BYTES,
    NO_SUCH_FILE,
    LocalFileRefused,
    local_file_problem,
    open_local,
)

log = logging.getLogger("batchrunner")

__all__ = [
    "MAX_UPLOAD_BYTES",
    "SUPPORTED_FORMATS",
    "LocalImage",
    "check_url_hosts",
    "check_urls",
    "inspect_image",
    "local_images",
    "unfetchable_host",
    "url_inputs",
]

SUPPORTED_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp"}

# Pillow names a JPEG carrying an MP extension (phones and stereo cameras write them) "MPO"; its first picture
# is an ordinary baseline JPEG that every JPEG decoder reads.
_FORMAT_ALIASES = {"MPO": "JPEG"}
_REASON_CHARS = 160
# HEAD answers that say "not like this" rather than "not there": try a one-byte GET instead.
_HEAD_REFUSED = frozenset({403, 405, 501})
# Headers that would carry credentials: a session holding them by default must not probe third-party hosts.
_CREDENTIAL_HEADERS = ("X-API-Key", "Authorization")


@dataclass(frozen=True, slots=True)
class LocalImage:
    """One distinct local input image: where it is, what it is, and the ids of the jobs that send it."""

    path: Path
    sha256: str
    size: int
    content_type: str
    width: int
    height: int
    jobs: tuple[str, ...]


def inspect_image(path: Path, *, jobs: tuple[str, ...] = (), max_bytes: int = MAX_UPLOAD_BYTES) -> tuple[str, int, int]:
    """Check that ``path`` is a JPEG, PNG, GIF or WebP image the API will take; return (content type, w, h).

    The size is checked before decoding, the format before decoding (so no decoder of a format we would
    reject ever runs), then the image is fully decoded. Any problem raises InputImageError naming the file
    and ``jobs``.
    """
    content_type, width, height, _ = _inspect(path, jobs, max_bytes)
    return content_type, width, height


def local_images(manifest: Manifest) -> dict[str, LocalImage]:
    """The manifest's local images by sha256, each inspected once, in order of first use.

    Byte-identical files at different paths are one image (the first path is kept); ``jobs`` lists every job
    that uses it, in manifest order. Raises InputImageError for the first image that fails.
    """
    paths: dict[str, Path] = {}
    users: dict[str, list[str]] = {}
    for job in manifest.jobs:
        if job.image_path is None or job.image_sha256 is None:
            continue
        paths.setdefault(job.image_sha256, job.image_path)
        users.setdefault(job.image_sha256, []).append(job.id)
    images: dict[str, LocalImage] = {}
    for sha256, path in paths.items():
        jobs = tuple(users[sha256])
        content_type, width, height, size = _inspect(path, jobs, MAX_UPLOAD_BYTES)
        images[sha256] = LocalImage(path, sha256, size, content_type, width, height, jobs)
    return images


def url_inputs(manifest: Manifest) -> dict[str, tuple[str, ...]]:
    """The distinct http(s) ``input_image`` URLs of the manifest, each with the ids of the jobs using it."""
    users: dict[str, list[str]] = {}
    for job in manifest.jobs:
        value = job.input.get("input_image")
        if job.image_path is None and isinstance(value, str) and _is_http_url(value):
            users.setdefault(value, []).append(job.id)
    return {url: tuple(ids) for url, ids in users.items()}


async def check_urls(
    session: aiohttp.ClientSession,
    urls: Iterable[str],
    *,
    timeout: float = 10.0,  # noqa: ASYNC109 - per probe: one slow host must not fail the rest
    concurrency: int = 8,
) -> dict[str, str | None]:
    """Probe each distinct URL once: None when it answers 2xx with something other than a web page, else a
    one-line reason.

    HEAD first; when HEAD is refused (403, 405, 501) or fails after connecting, a GET of ``Range: bytes=0-0``
    (whose body is never read). Redirects are followed. An answer of ``text/html`` counts as a failure: a
    web page where an image should be is the usual slip (a share link instead of the file link), and the
    model cannot use it. At most ``concurrency`` URLs are probed at once, each request bounded by ``timeout``
    seconds.

    ``session`` must carry no credentials in its default headers (ValueError otherwise): the probes go to
    third-party hosts and never send the API key.
    """
    for name in _CREDENTIAL_HEADERS:
        if name in session.headers:
            raise ValueError(f"check_urls needs a session without a default {name} header")
    if session.auth is not None:
        raise ValueError("check_urls needs a session without default credentials (auth)")
    if concurrency < 1 or timeout <= 0:
        raise ValueError("concurrency and timeout must be positive")
    distinct = list(dict.fromkeys(urls))
    gate = asyncio.Semaphore(concurrency)
    limit = aiohttp.ClientTimeout(total=timeout)

    async def probe(url: str) -> str | None:
        async with gate:
            return await _probe(session, url, limit)

    reasons = await asyncio.gather(*(probe(url) for url in distinct))
    return dict(zip(distinct, reasons, strict=True))


# --------------------------------------------------------------------------------------------------
# Local files


def _inspect(path: Path, jobs: tuple[str, ...], max_bytes: int) -> tuple[str, int, int, int]:
    """(content type, width, height, size in bytes) of a supported image, or InputImageError."""

    def fail(message: str) -> InputImageError:
        return InputImageError(message, file=path, jobs=jobs)

    # Kind and size from lstat/stat before anything opens the file (a FIFO, a device or 20 GB of sparse zeros
    # would hang or stall the decoder); then it is opened without blocking and its open self checked again.
    problem = local_file_problem(path, max_bytes=max_bytes)
    if problem is not None:
        raise fail(problem)
    try:
        with warnings.catch_warnings(record=True) as said:
            # Pillow warns (DecompressionBombWarning, corrupt EXIF, ...) while opening and decoding: record it all.
            warnings.simplefilter("always")
            with open_local(path, max_bytes=max_bytes) as fh, Image.open(fh) as img:
                size = os.fstat(fh.fileno()).st_size
                fmt = img.format or "unknown"
                fmt = _FORMAT_ALIASES.get(fmt, fmt)
                content_type = SUPPORTED_FORMATS.get(fmt)
                if content_type is None:
                    # Before load(): some plugins hand decoding to other programs (EPS runs Ghostscript).
                    article = "an" if fmt[:1] in "AEIOU" else "a"
                    raise fail(f"is {article} {fmt} image; the API takes JPEG, PNG, GIF or WebP")
                img.load()
                width, height = img.size
        _log_warnings(path, said)
    except InputImageError:
        raise
    except LocalFileRefused as exc:
        raise fail(exc.reason) from None  # changed between the check and the open
    except Image.DecompressionBombError:
        # Pillow refuses beyond twice MAX_IMAGE_PIXELS (and only warns between one and two times).
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise fail(
            f"is too large to decode safely: more than {limit:,} pixels (Pillow's decompression-bomb limit); "
            "scale it down first"
        ) from None
    except UnidentifiedImageError:
        raise fail("is not an image Pillow can read") from None
    except PermissionError:
        raise fail("cannot read: permission denied") from None
    except (FileNotFoundError, NotADirectoryError):
        raise fail(NO_SUCH_FILE) from None  # removed between the check and the open
    except (OSError, SyntaxError, ValueError) as exc:
        # Pillow reports damage as OSError ("image file is truncated"), SyntaxError ("broken PNG file") or
        # ValueError, depending on the plugin.
        detail = " ".join(str(exc).split())[:_REASON_CHARS] or type(exc).__name__
        raise fail(f"cannot be decoded, the file is damaged or cut short ({detail})") from None
    return content_type, width, height, size


def _log_warnings(path: Path, said: list[warnings.WarningMessage]) -> None:
    """Pillow's warnings about an image we accept, as log lines naming the file (never raw on stderr)."""
    lines = {" ".join(str(w.message).split())[:_REASON_CHARS]: w.category for w in said}
    for message, category in lines.items():
        if issubclass(category, Image.DecompressionBombWarning):
            log.warning("%s: a very large image (%s); decoded anyway, as it is within Pillow's limit", path, message)
        else:
            log.warning("%s: Pillow: %s", path, message)


# --------------------------------------------------------------------------------------------------
# URLs


# Special-use names (RFC 6761, 6762, 8375; ICANN's .internal) that no server on the internet resolves to this network.
_LOCAL_SUFFIXES = (".localhost", ".local", ".internal", ".home.arpa", ".invalid", ".test", ".example")


def unfetchable_host(url: str) -> str | None:
    """Why the API's servers could not fetch ``url``: its host is this machine or a local network; else None."""
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return None  # the manifest refuses a URL that cannot be read
    if not host:
        return None
    name = host.rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return "localhost is the machine itself"
    suffix = next((s for s in _LOCAL_SUFFIXES if name.endswith(s)), None)
    if suffix is not None:
        return f"names under {suffix!r} are not resolved on the internet"
    address = _ip_address(name)
    if address is None:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    kind = next(
        (
            word
            for word, test in (
                ("a loopback", address.is_loopback),
                ("an unspecified", address.is_unspecified),
                ("a link-local", address.is_link_local),
                ("a private", address.is_private),
                ("a multicast", address.is_multicast),
            )
            if test
        ),
        None if address.is_global else "a non-public",
    )
    return None if kind is None else f"{address} is {kind} address"


def _ip_address(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        pass
    # Browsers, curl and most HTTP stacks also read 127.1, 0x7f.0.0.1 and 2130706433 as IPv4 addresses.
    if name and all(c in "0123456789abcdefx." for c in name) and name[0].isdigit():
        try:
            return ipaddress.IPv4Address(socket.inet_aton(name))
        except OSError:
            return None
    return None


def check_url_hosts(manifest: Manifest, api_url: str) -> None:
    """Refuse (ManifestError, naming job and line) an http(s) ``input_image`` the API cannot fetch.

    Skipped when ``api_url`` is itself local (see :func:`unfetchable_host`): a local server fetches local URLs.
    """
    if unfetchable_host(api_url) is not None:
        return
    judged: dict[str, str | None] = {}
    for job in manifest.jobs:
        value = job.input.get("input_image")
        if job.image_path is not None or not isinstance(value, str) or not _is_http_url(value):
            continue
        if value not in judged:
            judged[value] = unfetchable_host(value)
        why = judged[value]
        if why is not None:
            shown = value if len(value) <= 80 else value[:77] + "..."
            raise ManifestError(
                f"the API cannot fetch {shown!r}: {why}; use a public URL, or a local file (it is uploaded)",
                file=manifest.path,
                job=job.id,
                field="input_image",
                line=job.line,
            )


def _is_http_url(value: str) -> bool:
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.netloc)


def _user_agent() -> str:
    try:
        version = importlib.metadata.version("batchrunner")
    except importlib.metadata.PackageNotFoundError:
        version = "0"
    return f"batchrunner/{version}"


_HEADERS = {"User-Agent": _user_agent(), "Accept-Encoding": "identity"}
_RANGE_HEADERS = {**_HEADERS, "Range": "bytes=0-0"}


class _Failed(Exception):
    """A probe that got no HTTP answer; ``decisive`` when another request to the host would fail alike."""

    def __init__(self, reason: str, *, decisive: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.decisive = decisive


async def _probe(session: aiohttp.ClientSession, url: str, limit: aiohttp.ClientTimeout) -> str | None:
    """None when ``url`` answers with something other than a web page, else why not."""
    if not _is_http_url(url):
        return "not an http(s) URL"
    try:
        status, reason, content_type = await _request(session, "HEAD", url, limit)
    except _Failed as exc:
        if exc.decisive:
            return exc.reason
    else:
        if status not in _HEAD_REFUSED:
            return _judge(status, reason, content_type)
    try:
        status, reason, content_type = await _request(session, "GET", url, limit)
    except _Failed as exc:
        return exc.reason
    return _judge(status, reason, content_type)


async def _request(
    session: aiohttp.ClientSession, method: str, url: str, limit: aiohttp.ClientTimeout
) -> tuple[int, str, str]:
    """(status, reason, content type) of one request; the body is never read. Transport errors -> _Failed."""
    headers = _RANGE_HEADERS if method == "GET" else _HEADERS
    try:
        async with session.request(method, url, headers=headers, timeout=limit, allow_redirects=True) as response:
            answer = (response.status, response.reason or "", response.headers.get("Content-Type", ""))
            # A server that ignores Range would stream the whole file: drop the connection instead of reading.
            response.close()
            return answer
    except aiohttp.ConnectionTimeoutError:
        raise _Failed("could not connect in time", decisive=True) from None
    except TimeoutError:
        raise _Failed(f"no answer within {limit.total:g} s", decisive=False) from None
    except aiohttp.ClientConnectorError as exc:
        # Refused, DNS, TLS: the host cannot be reached, a GET would fare no better.
        raise _Failed(f"cannot connect: {_connect_reason(exc)}", decisive=True) from None
    except aiohttp.TooManyRedirects:
        raise _Failed("too many redirects", decisive=True) from None
    except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError):
        raise _Failed("not a valid http(s) URL", decisive=True) from None
    except aiohttp.ClientError as exc:
        detail = " ".join(str(exc).split())[:_REASON_CHARS] or type(exc).__name__
        raise _Failed(f"request failed: {detail}", decisive=False) from None


def _connect_reason(exc: aiohttp.ClientConnectorError) -> str:
    error = exc.os_error
    what = (error.strerror or str(error)) if error is not None else str(exc)
    return f"{exc.host}:{exc.port}: {' '.join(what.split())[:_REASON_CHARS]}"


def _judge(status: int, reason: str, content_type: str) -> str | None:
    """The verdict on an HTTP answer: 2xx that is not an HTML page is fine."""
    if not 200 <= status < 300:
        return " ".join(f"HTTP {status} {reason}".split())
    if content_type.split(";", 1)[0].strip().lower() == "text/html":
        return "answers with a web page (text/html), not an image"
    return None
