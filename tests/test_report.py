"""The HTML contact sheet: built from a tiny batch made on disk (no network), then opened in a real browser."""

from __future__ import annotations

import base64
import copy
import errno
import io
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from batchrunner.errors import OutputError
from batchrunner.ledger import JobState, JobStatus, Ledger, LedgerState, read_ledger
from batchrunner.manifest import Job, Manifest, load_manifest
from batchrunner.output import OutputDir
from batchrunner.report import REPORT_NAME, build_report, job_card, thumbnail_data_uri, write_report

SCRIPT_PROMPT = "Make it <script>alert('x')</script> & \"shiny\""
URL_INPUT = "https://example.com/harbour.png?size=large&v=2"
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z

MANIFEST = f"""\
model: flux-kontext-max
price: 0.08
defaults: {{aspect_ratio: match_input_image}}
jobs:
  - {{id: done, input_image: images/street.png, prompt: "Snowy winter evening", seed: 1}}
  - {{id: broken, input_image: images/cat.png, prompt: "Noir photograph", seed: 2, aspect_ratio: "16:9"}}
  - {{id: flying, input_image: "{URL_INPUT}", prompt: "Night with stars", seed: 3}}
  - id: waiting
    input_image: images/street.png
    prompt: {json.dumps(SCRIPT_PROMPT)}
    seed: 4
"""


@dataclass
class Batch:
    manifest: Manifest
    state: LedgerState
    out: OutputDir
    street: Path  # a large input image, used by two jobs


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> Batch:
    """Four jobs, one per status: succeeded (with its file), failed for good, in flight, pending."""
    root = tmp_path_factory.mktemp("batch")
    (root / "images").mkdir()
    # Noise does not compress: embedding this file whole would show at once in the page's size.
    street = root / "images" / "street.png"
    Image.merge("RGB", [Image.effect_noise((1200, 900), 60)] * 3).save(street)
    Image.new("RGBA", (300, 500), (200, 120, 40, 128)).save(root / "images" / "cat.png")
    (root / "batch.yaml").write_text(MANIFEST, encoding="utf-8")
    manifest = load_manifest(root / "batch.yaml")
    out = OutputDir(root / "out")
    out.prepare()
    Image.new("RGB", (1024, 768), (30, 60, 200)).save(out.path / "done.png")

    now = [T0]
    ids = {job.id: job.fingerprint for job in manifest.jobs}
    with Ledger(out.ledger, clock=lambda: now[0], fsync=False) as ledger:

        def event(name: str, job: str, at: float, **fields: Any) -> None:
            now[0] = T0 + at
            ledger.append(name, job=job, fingerprint=ids[job], **fields)

        event("submitting", "done", 0.0, attempt=1)
        event("submitted", "done", 0.5, prediction_id="p-done")
        event("succeeded", "done", 13.0, file="done.png", prediction_id="p-done", cost=0.08)
        event("submitting", "broken", 1.0, attempt=1)
        event("submitted", "broken", 1.5, prediction_id="p-broken")
        event(
            "failed",
            "broken",
            4.0,
            error="input image could not be downloaded",
            error_code="INPUT_DOWNLOAD_ERROR",
            retryable=False,
            cost=0.0,
        )
        event("submitting", "flying", 2.0, attempt=1)
        event("submitted", "flying", 2.5, prediction_id="p-flying")
    return Batch(manifest, read_ledger(out.ledger), out, street)


@dataclass
class Card:
    job: str
    status: str
    hidden: bool
    prompt: str = ""
    text: str = ""
    facts: dict[str, str] = field(default_factory=dict)
    imgs: list[dict[str, str | None]] = field(default_factory=list)
    links: list[str] = field(default_factory=list)


class Page(HTMLParser):
    """The parts of a report the tests look at: cards, status counts, the body's data attributes."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.cards: list[Card] = []
        self.counts: dict[str, int] = {}
        self.body: dict[str, str | None] = {}
        self.scripts = 0
        self._card: Card | None = None
        self._into: str | None = None
        self._fact = ""
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "body":
            self.body = a
        elif tag == "script":
            self.scripts += 1
        elif tag == "article":
            self._card = Card(str(a["data-job"]), str(a["data-status"]), "hidden" in a)
        elif tag == "b" and a.get("class") == "count":
            self._into = f"count:{a['data-status']}"
        elif self._card is not None and tag == "img":
            self._card.imgs.append(a)
        elif self._card is not None and tag == "a":
            self._card.links.append(str(a["href"]))
        elif self._card is not None and a.get("class") == "prompt":
            self._into = "prompt"
        elif self._card is not None and tag in ("dt", "dd"):
            self._into = tag

    def handle_endtag(self, tag: str) -> None:
        if tag == "article" and self._card is not None:
            self.cards.append(self._card)
            self._card = None
        self._into = None

    def handle_data(self, data: str) -> None:
        if self._into is not None and self._into.startswith("count:"):
            self.counts[self._into[6:]] = int(data)
        if self._card is not None:
            self._card.text += data
            if self._into == "prompt":
                self._card.prompt += data
            elif self._into == "dt":
                self._fact = data
            elif self._into == "dd":
                self._card.facts[self._fact] = data

    def card(self, job: str) -> Card:
        return next(card for card in self.cards if card.job == job)


def decode(uri: str | None) -> Image.Image:
    assert uri is not None and uri.startswith("data:image/jpeg;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1], validate=True)))
    img.load()
    return img


@pytest.fixture(scope="module")
def page(batch: Batch) -> Page:
    return Page(build_report(batch.manifest, batch.state, batch.out, now=T0 + 60))


# --------------------------------------------------------------------------------------------------
# The page


@pytest.mark.parametrize(
    ("job", "status", "facts", "error"),
    [
        ("done", "succeeded", "1 match_input_image 1 12.5 s", None),
        ("broken", "failed", "2 16:9 1 2.5 s", "input image could not be downloaded"),
        ("flying", "in-flight", "3 match_input_image 1", None),  # no time: the prediction runs
        ("waiting", "pending", "4 match_input_image 0", None),
    ],
)
def test_each_job_has_a_card_with_its_status_and_facts(
    page: Page, job: str, status: str, facts: str, error: str | None
) -> None:
    card = page.card(job)
    assert card.status == status
    names = ["seed", "aspect", "attempts", "time"]
    assert card.facts == dict(zip(names, facts.split(" ", 3), strict=False))
    assert ("error:" in card.text) == (error is not None)
    if error is not None:
        assert card.text.endswith(f"error: INPUT_DOWNLOAD_ERROR {error}")


def test_cards_follow_manifest_order_one_per_job(page: Page, batch: Batch) -> None:
    assert [card.job for card in page.cards] == [job.id for job in batch.manifest.jobs]
    assert not any(card.hidden for card in page.cards)


def test_header_counts_each_status_and_shows_spend_and_time(page: Page, batch: Batch) -> None:
    assert page.counts == {"succeeded": 1, "in-flight": 1, "pending": 1, "failed": 1}
    text = build_report(batch.manifest, batch.state, batch.out, now=T0 + 60)
    assert '<b class="spend">$0.08</b>' in text
    assert "2026-01-01 00:01:00 UTC" in text
    assert "<h1>batch</h1>" in text


@pytest.mark.parametrize("thumb_px", [48, 192])
def test_every_picture_is_an_embedded_jpeg_thumbnail_no_larger_than_thumb_px(batch: Batch, thumb_px: int) -> None:
    page = Page(build_report(batch.manifest, batch.state, batch.out, thumb_px=thumb_px))
    srcs = [img.get("src") for card in page.cards for img in card.imgs if "data-same" not in img]
    assert len(srcs) == 3  # street.png, cat.png and the output done.png
    for src in srcs:
        img = decode(src)
        assert img.format == "JPEG" and img.mode == "RGB"
        assert max(img.size) == thumb_px  # every source here is larger than the thumbnail


def _rotated(path: Path) -> None:
    img = Image.new("RGB", (800, 400), (10, 200, 30))
    exif = img.getexif()
    exif[0x0112] = 6  # the camera was held upright: viewers turn the picture a quarter
    img.save(path, exif=exif)


@pytest.mark.parametrize(
    ("name", "make", "size", "corner"),
    [
        ("wide.png", lambda p: Image.new("RGB", (1000, 500), (0, 0, 255)).save(p), (192, 96), (0, 0, 255)),
        ("small.gif", lambda p: Image.new("RGB", (50, 40), (0, 255, 0)).save(p), (50, 40), (0, 255, 0)),  # no upscale
        ("rotated.jpg", _rotated, (96, 192), None),
        ("clear.png", lambda p: Image.new("RGBA", (400, 400), (0, 0, 0, 0)).save(p), (192, 192), (255, 255, 255)),
        ("clear.gif", lambda p: Image.new("P", (400, 400), 0).save(p, transparency=0), (192, 192), (255, 255, 255)),
        ("garbled.png", lambda p: p.write_bytes(b"\x89PNG not really"), None, None),
        ("missing.png", lambda p: None, None, None),
    ],
)
def test_thumbnail_is_a_small_upright_rgb_jpeg_or_none(
    tmp_path: Path, name: str, make: Any, size: tuple[int, int] | None, corner: tuple[int, int, int] | None
) -> None:
    path = tmp_path / name
    make(path)
    uri = thumbnail_data_uri(path, 192)
    if size is None:
        assert uri is None
        return
    img = decode(uri)
    assert (img.format, img.mode, img.size) == ("JPEG", "RGB", size)
    if corner is not None:  # transparency turns white, not black; JPEG shifts colours a little
        pixel = img.getpixel((0, 0))
        assert isinstance(pixel, tuple)
        assert all(abs(got - want) <= 8 for got, want in zip(pixel, corner, strict=True))


def test_a_large_input_is_never_embedded_whole(batch: Batch) -> None:
    text = build_report(batch.manifest, batch.state, batch.out)
    assert len(text) < batch.street.stat().st_size / 20
    assert base64.b64encode(batch.street.read_bytes()[:3000]).decode() not in text


def test_an_input_used_by_two_jobs_is_embedded_once(page: Page) -> None:
    first, again = page.card("done").imgs[0], page.card("waiting").imgs[0]
    assert first["src"] is not None and first["id"] is not None
    assert again.get("src") is None and again["data-same"] == first["id"]


def test_output_thumbnail_links_to_the_full_file_beside_the_report(page: Page, batch: Batch) -> None:
    card = page.card("done")
    assert card.links == ["done.png"]
    assert (batch.out.path / card.links[0]).is_file()
    assert decode(card.imgs[1]["src"]).size == (192, 144)
    assert all(not c.links for c in page.cards if c.job != "done")


def test_prompt_markup_renders_as_text(page: Page, batch: Batch) -> None:
    text = build_report(batch.manifest, batch.state, batch.out)
    assert "<script>alert" not in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;shiny&quot;" in text
    assert page.card("waiting").prompt == SCRIPT_PROMPT
    assert page.scripts == 1  # only the page's own


def test_url_input_is_shown_as_text_and_not_fetched(page: Page) -> None:
    card = page.card("flying")
    assert URL_INPUT in card.text
    assert not card.imgs  # no <img src="https://...">: the page makes no request


@pytest.mark.parametrize(
    ("file", "content", "status", "links", "preview"),
    [
        ("done.png", None, "succeeded", ["done.png"], True),
        ("gone.png", None, "pending", [], False),  # deleted by the user: the next run makes it again
        ("garbled.png", b"not an image", "succeeded", ["garbled.png"], False),
    ],
)
def test_output_file_on_disk_decides_card(
    batch: Batch, tmp_path: Path, file: str, content: bytes | None, status: str, links: list[str], preview: bool
) -> None:
    out = OutputDir(tmp_path)
    shutil.copy(batch.out.path / "done.png", tmp_path / "done.png")
    if content is not None:
        (tmp_path / file).write_bytes(content)
    state = copy.deepcopy(batch.state)
    state.jobs[batch.manifest.jobs[0].fingerprint].file = file
    card = Page(build_report(batch.manifest, state, out)).card("done")
    assert (card.status, card.links) == (status, links)
    assert (len(card.imgs) == 2) == preview


# --------------------------------------------------------------------------------------------------
# job_card, by table

JOB = Job(id="j", fingerprint="f", input={"prompt": "p"}, image_path=None, image_sha256=None, line=1)


def _state(status: JobStatus, **fields: Any) -> JobState:
    return JobState("f", "j", status=status, **fields)


@pytest.mark.parametrize(
    ("state", "present", "expected"),
    [
        (None, False, ("pending", 0, None, None)),
        (
            _state(JobStatus.SUCCEEDED, file="j.png", submitted_at=10.0, finished_at=17.0),
            True,
            ("succeeded", 1, 7.0, None),
        ),
        (
            _state(JobStatus.SUCCEEDED, file="j.png", submitted_at=10.0, finished_at=17.0),
            False,
            ("pending", 0, 7.0, None),
        ),
        (
            _state(JobStatus.IN_FLIGHT, submitted_at=20.0, finished_at=17.0, attempts=1),
            False,
            ("in flight", 2, None, "e"),
        ),
        (
            _state(JobStatus.FAILED, attempts=1, retryable=True, submitted_at=1.0, finished_at=3.0),
            False,
            ("pending", 1, 2.0, "e"),
        ),
        (_state(JobStatus.FAILED, attempts=3, retryable=True), False, ("failed", 3, None, "e")),
        (_state(JobStatus.FAILED, attempts=1, retryable=False, submitted_at=5.0), False, ("failed", 1, None, "e")),
        (_state(JobStatus.IN_DOUBT), False, ("pending", 0, None, "e")),
    ],
)
def test_job_card_status_attempts_time_and_error(
    state: JobState | None, present: bool, expected: tuple[str, int, float | None, str | None]
) -> None:
    if state is not None and state.status is not JobStatus.SUCCEEDED:
        state.error = "e"  # a success clears the error
    card = job_card(JOB, state, file_present=present, max_attempts=3)
    assert (card.status, card.attempts, card.seconds, card.error) == expected


def test_job_card_shortens_a_data_uri_input() -> None:
    job = Job(
        id="j",
        fingerprint="f",
        input={"input_image": "data:image/png;base64," + "A" * 5000},
        image_path=None,
        image_sha256=None,
        line=1,
    )
    card = job_card(job, None, file_present=False, max_attempts=3)
    assert card.input_text == "inline data URI (5,022 characters)"


# --------------------------------------------------------------------------------------------------
# write_report


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_write_report_replaces_the_report_whole(batch: Batch, tmp_path: Path) -> None:
    out = OutputDir(tmp_path / "out")
    shutil.copytree(batch.out.path, out.path)
    (out.path / REPORT_NAME).write_text("old", encoding="utf-8")
    path = write_report(batch.manifest, batch.state, out)
    assert path == out.path / REPORT_NAME
    assert len(Page(path.read_text(encoding="utf-8")).cards) == 4
    assert _leftovers(out.path) == []


def test_write_report_that_fails_keeps_the_old_report(
    batch: Batch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / REPORT_NAME).write_text("old", encoding="utf-8")

    def full(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OutputError, match="no space left on device") as caught:
        write_report(batch.manifest, batch.state, OutputDir(tmp_path))
    assert "\n" not in str(caught.value)
    assert (tmp_path / REPORT_NAME).read_text(encoding="utf-8") == "old"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("how", ["folder is a file", "read-only folder"])
def test_write_report_to_an_unwritable_folder_is_one_output_error(batch: Batch, tmp_path: Path, how: str) -> None:
    if how == "folder is a file":
        folder = tmp_path / "out"
        folder.write_text("", encoding="utf-8")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        folder = tmp_path
        folder.chmod(0o555)
    try:
        with pytest.raises(OutputError, match=r"^cannot write .*report\.html: ") as caught:
            write_report(batch.manifest, batch.state, OutputDir(folder))
    finally:
        tmp_path.chmod(0o755)
    assert "\n" not in str(caught.value)


# --------------------------------------------------------------------------------------------------
# In a real browser


def _dump_dom(url: str, profile: Path) -> str:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium not installed (apt-get install chromium); the report test needs a real browser")
    args = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        url,
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=True)
    return done.stdout


@pytest.mark.parametrize(
    ("fragment", "visible"),
    [
        ("", ["done", "broken", "flying", "waiting"]),
        ("#status=failed", ["broken"]),
        ("#q=NIGHT%20with", ["flying"]),  # case-insensitive substring of the prompt
        ("#status=succeeded&q=noir", []),
    ],
)
def test_report_in_a_real_browser_shows_every_picture_and_filters(
    batch: Batch, tmp_path: Path, fragment: str, visible: list[str]
) -> None:
    report = write_report(batch.manifest, batch.state, batch.out)
    dom = _dump_dom(report.as_uri() + fragment, tmp_path / "profile")
    page = Page(dom)
    total = int(str(page.body["data-images-total"]))
    assert total == 4  # street and cat embedded, street again by copy, the output
    assert page.body["data-images-loaded"] == str(total)
    assert [card.job for card in page.cards if not card.hidden] == visible
    assert re.search(r'<span id="shown">(\d+)</span>', dom)[1] == str(len(visible))  # type: ignore[index]
