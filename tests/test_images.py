"""Tests of batchrunner.manifest.images: local files made with Pillow in tmp_path, URL probes against 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import os
import random
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from PIL import Image

from batchrunner.errors import InputImageError
from batchrunner.manifest import Manifest, parse_manifest
from batchrunner.manifest.images import (
    MAX_UPLOAD_BYTES,
    SUPPORTED_FORMATS,
    LocalImage,
    check_urls,
    inspect_image,
    local_images,
    url_inputs,
)

SIZE = (64, 48)


def save(path: Path, fmt: str, *, size: tuple[int, int] = SIZE, colour: tuple[int, int, int] = (200, 80, 40)) -> Path:
    """A small real image in ``fmt`` at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, fmt)
    return path


def noisy_png(path: Path) -> Path:
    """A PNG whose pixel data does not compress away, so cutting the file cuts the pixels."""
    rng = random.Random(7)
    Image.frombytes("RGB", (128, 128), rng.randbytes(128 * 128 * 3)).save(path, "PNG")
    return path


def manifest(folder: Path, body: str) -> Manifest:
    return parse_manifest("model: flux-kontext-max\n" + body, path=folder / "m.yaml")


def rejection(path: Path, *, max_bytes: int = MAX_UPLOAD_BYTES) -> str:
    with pytest.raises(InputImageError) as caught:
        inspect_image(path, max_bytes=max_bytes)
    return str(caught.value)


# --- inspect_image: what passes ---------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "ext"), [("JPEG", "jpg"), ("PNG", "png"), ("GIF", "gif"), ("WEBP", "webp")])
def test_supported_format_passes_with_its_content_type_and_size(tmp_path: Path, fmt: str, ext: str) -> None:
    path = save(tmp_path / f"in.{ext}", fmt)
    assert inspect_image(path) == (SUPPORTED_FORMATS[fmt], *SIZE)


def test_content_type_comes_from_the_bytes_not_the_file_name(tmp_path: Path) -> None:
    path = save(tmp_path / "actually-a-jpeg.png", "JPEG")
    assert inspect_image(path)[0] == "image/jpeg"


def test_camera_jpeg_with_a_second_picture_counts_as_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "stereo.jpg"
    Image.new("RGB", SIZE).save(path, "MPO", save_all=True, append_images=[Image.new("RGB", SIZE)])
    with Image.open(path) as opened:
        assert opened.format == "MPO"
    assert inspect_image(path) == ("image/jpeg", *SIZE)


def test_file_of_exactly_the_limit_passes(tmp_path: Path) -> None:
    path = save(tmp_path / "in.png", "PNG")
    assert inspect_image(path, max_bytes=path.stat().st_size)[0] == "image/png"


# --- inspect_image: what fails -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "ext", "named"), [("BMP", "bmp", "a BMP"), ("TIFF", "tif", "a TIFF"), ("ICO", "ico", "an ICO")]
)
def test_other_format_is_rejected_naming_it(tmp_path: Path, fmt: str, ext: str, named: str) -> None:
    path = save(tmp_path / f"in.{ext}", fmt)
    assert rejection(path) == f"{path}: is {named} image; the API takes JPEG, PNG, GIF or WebP"


def test_truncated_png_is_rejected(tmp_path: Path) -> None:
    path = noisy_png(tmp_path / "cut.png")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "damaged or cut short" in rejection(path)


def test_random_bytes_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "noise.png"
    path.write_bytes(random.Random(1).randbytes(4096))
    assert rejection(path) == f"{path}: is not an image Pillow can read"


def test_png_signature_with_garbage_after_it_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "fake.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    assert rejection(path) == f"{path}: is not an image Pillow can read"


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: p.write_bytes(b""), "is empty"),
        (lambda p: None, "no such file"),
        (lambda p: p.mkdir(), "is a directory, not an image file"),
    ],
    ids=["empty", "missing", "directory"],
)
def test_unusable_path_is_rejected(tmp_path: Path, make: Callable[[Path], object], expected: str) -> None:
    path = tmp_path / "in.png"
    make(path)
    assert rejection(path) == f"{path}: {expected}"


def test_path_through_a_file_does_not_exist(tmp_path: Path) -> None:
    parent = save(tmp_path / "in.png", "PNG")
    assert rejection(parent / "child.png").endswith(": no such file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file anyway, so there is nothing to refuse")
def test_unreadable_file_is_rejected(tmp_path: Path) -> None:
    path = save(tmp_path / "in.png", "PNG")
    path.chmod(0)
    try:
        assert rejection(path) == f"{path}: cannot read: permission denied"
    finally:
        path.chmod(0o644)


def test_permission_denied_on_open_is_said_plainly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The chmod test above cannot run as root; this one stands in for it wherever the tests run.
    path = save(tmp_path / "in.png", "PNG")

    def refuse(*args: object, **kwargs: object) -> Image.Image:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Image, "open", refuse)
    assert rejection(path) == f"{path}: cannot read: permission denied"


def test_oversize_file_is_rejected_before_decoding(tmp_path: Path) -> None:
    path = save(tmp_path / "in.png", "PNG")
    size = path.stat().st_size
    message = rejection(path, max_bytes=size - 1)
    assert message == f"{path}: is {size} bytes; the API takes at most {size - 1} bytes"


def test_oversize_is_said_in_megabytes_and_judged_without_reading(tmp_path: Path) -> None:
    path = tmp_path / "huge.png"
    with path.open("wb") as fh:
        fh.truncate(120 * 1024 * 1024)  # sparse: 120 MB of zeros that are never written nor read
    assert rejection(path) == f"{path}: is 120 MB; the API takes at most 100 MB"
    assert MAX_UPLOAD_BYTES == 100 * 1024 * 1024


def test_decompression_bomb_keeps_pillows_limit_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save(tmp_path / "in.png", "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 48 = 3072 pixels, over twice the limit
    message = rejection(path)
    assert "more than 2,000 pixels" in message
    assert "decompression-bomb" in message


@pytest.mark.parametrize(
    ("limit", "size", "kind"),
    [
        (2000, (64, 48), "a very large image"),  # 3072 pixels: over the limit, under twice it: Pillow warns
        (3072, (64, 48), None),  # exactly at the limit: no warning
        (1600, (64, 48), "a very large image"),  # 3072 < 2 x 1600
    ],
)
def test_decompression_bomb_warning_goes_to_our_log_not_to_stderr(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    limit: int,
    size: tuple[int, int],
    kind: str | None,
) -> None:
    path = save(tmp_path / "big.png", "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning that escaped would fail the test
        assert inspect_image(path)[1:] == size
    said = [r.getMessage() for r in caplog.records]
    if kind is None:
        assert said == []
    else:
        assert len(said) == 1 and str(path) in said[0] and kind in said[0] and "\n" not in said[0]
    assert "Warning" not in capfd.readouterr().err


def test_other_pillow_warnings_are_logged_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import warnings

    from PIL import ImageFile

    path = save(tmp_path / "a.png", "PNG")
    real_load = ImageFile.ImageFile.load

    def load_and_warn(self: ImageFile.ImageFile) -> object:
        warnings.warn("Corrupt EXIF data.  Expecting to read 12 bytes but only got 6.", UserWarning, stacklevel=1)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load_and_warn)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inspect_image(path)
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: Pillow: Corrupt EXIF data. Expecting to read 12 bytes but only got 6."
    ]


def test_rejection_names_the_jobs_using_the_file(tmp_path: Path) -> None:
    path = save(tmp_path / "in.bmp", "BMP")
    with pytest.raises(InputImageError) as caught:
        inspect_image(path, jobs=("a", "b", "c", "d"))
    assert caught.value.jobs == ("a", "b", "c", "d")
    assert caught.value.exit_code == 2
    assert str(caught.value).endswith("(used by a, b, c and 1 more)")


# --- local_images and url_inputs ---------------------------------------------------------------------------


def test_local_images_inspects_each_distinct_content_once(tmp_path: Path) -> None:
    one = save(tmp_path / "one.png", "PNG")
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "one.png").write_bytes(one.read_bytes())
    save(tmp_path / "two.jpg", "JPEG", size=(30, 20))
    loaded = manifest(
        tmp_path,
        "jobs:\n"
        "  - {id: a, input_image: one.png, prompt: first}\n"
        "  - {id: b, input_image: copy/one.png, prompt: second}\n"
        "  - {id: c, input_image: two.jpg, prompt: third}\n"
        "  - {id: d, input_image: 'https://example.com/x.png', prompt: fourth}\n"
        "  - {id: e, prompt: fifth}\n",
    )
    images = local_images(loaded)
    by_jobs = {image.jobs: image for image in images.values()}
    assert set(by_jobs) == {("a", "b"), ("c",)}
    first = by_jobs[("a", "b")]
    assert first == LocalImage(
        path=one.resolve(),
        sha256=first.sha256,
        size=one.stat().st_size,
        content_type="image/png",
        width=64,
        height=48,
        jobs=("a", "b"),
    )
    assert images[first.sha256] is first
    assert (by_jobs[("c",)].content_type, by_jobs[("c",)].width, by_jobs[("c",)].height) == ("image/jpeg", 30, 20)


def test_local_images_lists_every_matrix_job_using_an_image(tmp_path: Path) -> None:
    save(tmp_path / "in.webp", "WEBP")
    loaded = manifest(tmp_path, "matrix:\n  input_image: [in.webp]\n  prompt: [p]\n  seed: [1, 2, 3]\n")
    (image,) = local_images(loaded).values()
    assert image.jobs == tuple(job.id for job in loaded.jobs)
    assert len(image.jobs) == 3


def test_local_images_fails_naming_the_jobs_of_a_bad_file(tmp_path: Path) -> None:
    save(tmp_path / "in.bmp", "BMP")
    loaded = manifest(
        tmp_path, "jobs:\n  - {id: a, input_image: in.bmp, prompt: p}\n  - {id: b, input_image: in.bmp, prompt: q}\n"
    )
    with pytest.raises(InputImageError) as caught:
        local_images(loaded)
    assert caught.value.jobs == ("a", "b")
    assert "is a BMP image" in str(caught.value)


def test_local_images_of_a_manifest_without_files_is_empty(tmp_path: Path) -> None:
    assert (
        local_images(manifest(tmp_path, "jobs:\n  - {id: a, input_image: 'https://example.com/x.png', prompt: p}\n"))
        == {}
    )


def test_url_inputs_maps_each_distinct_url_to_its_jobs(tmp_path: Path) -> None:
    save(tmp_path / "in.png", "PNG")
    loaded = manifest(
        tmp_path,
        "jobs:\n"
        "  - {id: a, input_image: 'https://example.com/x.png', prompt: p}\n"
        "  - {id: b, input_image: 'https://example.com/x.png', prompt: q}\n"
        "  - {id: c, input_image: 'HTTP://example.com/y.png', prompt: p}\n"
        "  - {id: d, input_image: 'data:image/png;base64,AAAA', prompt: p}\n"
        "  - {id: e, input_image: in.png, prompt: p}\n"
        "  - {id: f, prompt: p}\n",
    )
    assert url_inputs(loaded) == {"https://example.com/x.png": ("a", "b"), "HTTP://example.com/y.png": ("c",)}


# --- check_urls against 127.0.0.1 ---------------------------------------------------------------------------


@dataclass(slots=True)
class Host:
    """A test server on 127.0.0.1: its base URL and the requests it has seen, as (method, path, headers)."""

    url: str
    seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0

    def requests(self, path: str) -> list[str]:
        return [method for method, seen_path, _ in self.seen if seen_path == path]


def image_answer(request: web.Request) -> web.Response:
    if request.method == "GET" and request.headers.get("Range") == "bytes=0-0":
        return web.Response(
            status=206, body=b"\x89", content_type="image/png", headers={"Content-Range": "bytes 0-0/9"}
        )
    return web.Response(body=b"\x89PNG\r\n\x1a\n\x00", content_type="image/png")


async def route(request: web.Request) -> web.StreamResponse:
    """Every behaviour the probes meet, by path."""
    head = request.method == "HEAD"
    path = request.path
    if path in ("/ok.png", "/a.png", "/b.png", "/c.png", "/d.png"):
        await asyncio.sleep(0.01)
        return image_answer(request)
    if path == "/no-head.png":  # servers that do not implement HEAD
        return web.Response(status=405) if head else image_answer(request)
    if path == "/signed.png":  # storage URLs signed for GET only, as S3 answers HEAD with them
        return web.Response(status=403) if head else image_answer(request)
    if path == "/not-implemented.png":
        return web.Response(status=501) if head else image_answer(request)
    if path == "/ignores-range.png":
        return web.Response(status=405) if head else web.Response(body=b"\x00" * 1_000_000, content_type="image/png")
    if path == "/head-only.png":
        return web.Response(status=405) if head else web.Response(status=404)
    if path == "/moved.png":
        raise web.HTTPFound("/ok.png")
    if path == "/share-page":
        return web.Response(text="<html>a photo</html>", content_type="text/html")
    if path == "/slow.png":
        await asyncio.sleep(0.3)
        return image_answer(request)
    if path == "/broken.png":
        return web.Response(status=500, reason="Internal Server Error")
    return web.Response(status=404, reason="Not Found")


@pytest.fixture
async def host() -> AsyncIterator[Host]:
    served = Host(url="")

    async def recording(request: web.Request) -> web.StreamResponse:
        served.seen.append((request.method, request.path, dict(request.headers)))
        served.in_flight += 1
        served.most_in_flight = max(served.most_in_flight, served.in_flight)
        try:
            return await route(request)
        finally:
            served.in_flight -= 1

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recording)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    served.url = str(server.make_url("/")).rstrip("/")
    yield served
    await server.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize(
    ("path", "expected", "methods"),
    [
        ("/ok.png", None, ["HEAD"]),
        ("/no-head.png", None, ["HEAD", "GET"]),
        ("/signed.png", None, ["HEAD", "GET"]),
        ("/not-implemented.png", None, ["HEAD", "GET"]),
        ("/ignores-range.png", None, ["HEAD", "GET"]),
        ("/moved.png", None, ["HEAD"]),
        ("/missing.png", "HTTP 404 Not Found", ["HEAD"]),
        ("/broken.png", "HTTP 500 Internal Server Error", ["HEAD"]),
        ("/head-only.png", "HTTP 404 Not Found", ["HEAD", "GET"]),
        ("/share-page", "answers with a web page (text/html), not an image", ["HEAD"]),
    ],
)
async def test_url_is_judged_by_head_then_a_ranged_get(
    host: Host, session: aiohttp.ClientSession, path: str, expected: str | None, methods: list[str]
) -> None:
    url = host.url + path
    assert await check_urls(session, [url]) == {url: expected}
    assert host.requests(path) == methods


async def test_fallback_get_asks_for_one_byte_and_no_request_carries_a_key(
    host: Host, session: aiohttp.ClientSession
) -> None:
    await check_urls(session, [host.url + "/no-head.png", host.url + "/ok.png"])
    gets = [headers for method, _, headers in host.seen if method == "GET"]
    assert [headers.get("Range") for headers in gets] == ["bytes=0-0"]
    for _, _, headers in host.seen:
        assert "X-API-Key" not in headers
        assert "Authorization" not in headers
        assert headers["User-Agent"].startswith("batchrunner/")


async def test_each_url_is_probed_once_however_often_it_is_given(host: Host, session: aiohttp.ClientSession) -> None:
    ok, missing = host.url + "/ok.png", host.url + "/missing.png"
    result = await check_urls(session, [ok, missing, ok, ok, missing])
    assert result == {ok: None, missing: "HTTP 404 Not Found"}
    assert list(result) == [ok, missing]
    assert host.requests("/ok.png") == ["HEAD"]
    assert host.requests("/missing.png") == ["HEAD"]


async def test_connection_refused_is_a_reason_without_a_second_try(session: aiohttp.ClientSession) -> None:
    url = f"http://127.0.0.1:{closed_port()}/x.png"
    reason = (await check_urls(session, [url]))[url]
    assert reason is not None
    assert reason.startswith("cannot connect: 127.0.0.1:")
    assert "\n" not in reason


async def test_head_dropped_after_connecting_falls_back_to_get(session: aiohttp.ClientSession) -> None:
    methods: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_line = await reader.readline()
        methods.append(request_line.split(b" ", 1)[0].decode())
        while (await reader.readline()).strip():
            pass
        if methods[-1] == "GET":
            writer.write(b"HTTP/1.1 206 Partial Content\r\nContent-Type: image/png\r\nContent-Length: 1\r\n\r\nx")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/x.png"
        assert await check_urls(session, [url]) == {url: None}
        # aiohttp itself resends an idempotent request once when the server drops it before answering.
        assert methods[-1] == "GET"
        assert set(methods[:-1]) == {"HEAD"}
    finally:
        server.close()
        await server.wait_closed()


async def test_slow_host_times_out_within_the_timeout(host: Host, session: aiohttp.ClientSession) -> None:
    url = host.url + "/slow.png"
    assert await check_urls(session, [url], timeout=0.05) == {url: "no answer within 0.05 s"}


@pytest.mark.parametrize("url", ["ftp://example.com/x.png", "images/x.png", "https:///no-host.png"])
async def test_non_http_url_is_a_reason_without_a_request(session: aiohttp.ClientSession, url: str) -> None:
    assert await check_urls(session, [url]) == {url: "not an http(s) URL"}


async def test_probes_run_at_most_concurrency_at_once(host: Host, session: aiohttp.ClientSession) -> None:
    urls = [f"{host.url}/{name}.png" for name in "abcd"] + [f"{host.url}/ok.png"]
    assert set((await check_urls(session, urls, concurrency=2)).values()) == {None}
    assert host.most_in_flight <= 2


@pytest.mark.parametrize("header", ["X-API-Key", "Authorization"])
async def test_session_with_default_credentials_is_refused(header: str) -> None:
    async with aiohttp.ClientSession(headers={header: "secret"}) as keyed:
        with pytest.raises(ValueError, match=header):
            await check_urls(keyed, ["http://127.0.0.1:1/x.png"])


async def test_no_urls_gives_an_empty_answer(session: aiohttp.ClientSession) -> None:
    assert await check_urls(session, []) == {}
