"""The contact sheet: one self-contained HTML page showing each job's input and output side by side.

``batchrunner report MANIFEST`` writes ``<output>/report.html``. The page needs no network and no other file to
display: CSS and JS are inline and every picture is a small JPEG thumbnail embedded as a data URI, so a 1000-job
report stays within some tens of MB. Clicking an output opens the full file through a relative link, which works
from file:// because the file sits beside the report.

Everything shown comes from the manifest and the ledger (no request is made); every string of theirs is escaped,
since prompts are user text. Buttons filter the cards by status and a box searches the prompts; a link such as
``report.html#status=failed&q=snow`` opens the page filtered.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import io
import os
import secrets
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from PIL import Image, ImageOps

from batchrunner.errors import OutputError
from batchrunner.ledger import JobState, LedgerState
from batchrunner.manifest import Job, Manifest
from batchrunner.output import OutputDir, describe_os_error
from batchrunner.runstate import classify

__all__ = ["REPORT_NAME", "STATUS_LABELS", "Card", "build_report", "job_card", "thumbnail_data_uri", "write_report"]

REPORT_NAME = "report.html"
# classify()'s verdicts as a person reading the report calls them, in the order the header lists them.
STATUS_LABELS = {"done": "succeeded", "poll": "in flight", "submit": "pending", "failed": "failed"}
_JPEG_QUALITY = 80


@dataclass(frozen=True, slots=True)
class Card:
    """What one job's card shows, derived from the manifest and the ledger alone."""

    job: str
    status: str  # a value of STATUS_LABELS
    prompt: str
    seed: str
    aspect_ratio: str
    input_text: str  # the input_image as written (a data URI shortened to its length)
    input_path: Path | None
    input_sha256: str | None
    output_file: str | None  # name of the output file beside the report, when it is on disk
    attempts: int
    seconds: float | None  # prediction time of the latest finished attempt
    error: str | None
    error_code: str | None


def job_card(job: Job, state: JobState | None, *, file_present: bool, max_attempts: int) -> Card:
    """The card of one job. Pure: ``file_present`` tells whether the ledger's output file is on disk."""
    verdict = classify(state, file_present=file_present, max_attempts=max_attempts)
    written = str(job.input.get("input_image", ""))
    if written[:5].lower() == "data:":
        written = f"inline data URI ({len(written):,} characters)"
    attempts, seconds, error, code = 0, None, None, None
    if state is not None:
        # The ledger counts failed predictions; a person counts tries, including the one that succeeded or runs.
        attempts = state.attempts + (1 if verdict in ("done", "poll") else 0)
        start, end = state.submitted_at, state.finished_at
        # A resubmitted job keeps the end of its previous try: a time before the start is no duration.
        if verdict != "poll" and start is not None and end is not None and end >= start:
            seconds = end - start
        if verdict != "done":
            error, code = state.error, state.error_code
    return Card(
        job=job.id,
        status=STATUS_LABELS[verdict],
        prompt=str(job.input.get("prompt", "")),
        seed=_text(job.input.get("seed")),
        aspect_ratio=_text(job.input.get("aspect_ratio")),
        input_text=written,
        input_path=job.image_path,
        input_sha256=job.image_sha256,
        output_file=state.file if state is not None and file_present else None,
        attempts=attempts,
        seconds=seconds,
        error=error,
        error_code=code,
    )


def _text(value: object) -> str:
    return "" if value is None else str(value)


def thumbnail_data_uri(path: Path, px: int) -> str | None:
    """A JPEG thumbnail (longest side at most ``px``) of the image at ``path``, as a data URI; None if unreadable."""
    try:
        with Image.open(path) as img:
            # thumbnail() decodes a JPEG at a reduced scale, so a large photo never sits in memory at full size.
            img.thumbnail((px, px))
            small = ImageOps.exif_transpose(img)
            if small.mode in ("RGBA", "LA", "PA") or "transparency" in small.info:
                rgba = small.convert("RGBA")
                small = Image.new("RGB", rgba.size, (255, 255, 255))
                small.paste(rgba, mask=rgba.getchannel("A"))  # transparency shows as white, not black
            buf = io.BytesIO()
            small.convert("RGB").save(buf, "JPEG", quality=_JPEG_QUALITY, optimize=True)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class _Pictures:
    """Thumbnails made once each. An input used by many jobs is embedded once; its other <img>s copy it in JS."""

    def __init__(self, px: int) -> None:
        self.px = px
        self.inputs: dict[str, str | None] = {}  # by sha256 -> data URI

    def input(self, card: Card) -> str:
        if card.input_path is None:
            return f'<div class="none url" title="not fetched">{html.escape(card.input_text)}</div>'
        key = card.input_sha256 or hashlib.sha256(str(card.input_path).encode()).hexdigest()
        anchor = f"in-{key[:24]}"
        alt = html.escape(f"input {card.input_text}")
        if key in self.inputs:
            if self.inputs[key] is None:
                return '<div class="none">no preview</div>'
            return f'<img alt="{alt}" data-same="{anchor}">'
        uri = self.inputs[key] = thumbnail_data_uri(card.input_path, self.px)
        if uri is None:
            return '<div class="none">no preview</div>'
        return f'<img id="{anchor}" alt="{alt}" src="{uri}">'

    def output(self, card: Card, folder: Path) -> str:
        if card.output_file is None:
            return f'<div class="none">{"not made yet" if card.status == "pending" else card.status}</div>'
        uri = thumbnail_data_uri(folder / card.output_file, self.px)
        inner = "<span>no preview</span>" if uri is None else f'<img alt="output" src="{uri}">'
        href = html.escape(quote(card.output_file))
        return f'<a href="{href}" target="_blank" title="open the full image">{inner}</a>'


def build_report(
    manifest: Manifest,
    state: LedgerState,
    out: OutputDir,
    *,
    max_attempts: int = 3,
    thumb_px: int = 192,
    now: float | None = None,
) -> str:
    """The report page as HTML text: a header with counts and spend, then one card per job in manifest order.

    Pure apart from reading the input and output images to make thumbnails.
    """
    cards = []
    for job in manifest.jobs:
        st = state.jobs.get(job.fingerprint)
        present = st is not None and out.has_file(st.file)
        cards.append(job_card(job, st, file_present=present, max_attempts=max_attempts))
    counts = Counter(card.status for card in cards)
    pictures = _Pictures(thumb_px)
    generated = datetime.fromtimestamp(time.time() if now is None else now, tz=UTC)
    name = html.escape(manifest.path.stem)
    buttons = [f'<button type="button" data-filter="" aria-pressed="true">all <b>{len(cards)}</b></button>']
    buttons += [
        f'<button type="button" data-filter="{_slug(label)}" aria-pressed="false">'
        f'{label} <b class="count" data-status="{_slug(label)}">{counts[label]}</b></button>'
        for label in STATUS_LABELS.values()
    ]
    body = "\n".join(_card_html(card, pictures, out.path) for card in cards)
    return _PAGE.format(
        title=name,
        css=_CSS,
        js=_JS,
        name=name,
        model=html.escape(f"{manifest.model} {manifest.version}"),
        total=len(cards),
        spend=f"${state.spend:,.2f}",
        generated=generated.strftime("%Y-%m-%d %H:%M:%S UTC"),
        buttons="".join(buttons),
        cards=body,
    )


def _slug(label: str) -> str:
    return label.replace(" ", "-")


def _card_html(card: Card, pictures: _Pictures, folder: Path) -> str:
    e = html.escape
    facts = [("seed", card.seed), ("aspect", card.aspect_ratio), ("attempts", str(card.attempts))]
    if card.seconds is not None:
        facts.append(("time", f"{card.seconds:.1f} s"))
    dl = "".join(f"<dt>{k}</dt><dd>{e(v) or '&ndash;'}</dd>" for k, v in facts)
    problem = ""
    if card.error or card.error_code:
        label = "error" if card.status == "failed" else "last error"
        code = f"<code>{e(card.error_code)}</code> " if card.error_code else ""
        problem = f'<p class="error"><b>{label}:</b> {code}{e(card.error or "")}</p>'
    caption = "input" if card.input_path is None else f"input &middot; {e(card.input_path.name)}"
    return (
        f'<article class="card" data-status="{_slug(card.status)}" data-job="{e(card.job)}">'
        f'<div class="pics"><figure>{pictures.input(card)}<figcaption>{caption}</figcaption></figure>'
        f"<figure>{pictures.output(card, folder)}<figcaption>output</figcaption></figure></div>"
        f'<header><span class="job" title="{e(card.job)}">{e(card.job)}</span>'
        f'<span class="status {_slug(card.status)}">{card.status}</span></header>'
        f'<p class="prompt">{e(card.prompt)}</p><dl>{dl}</dl>{problem}</article>'
    )


def write_report(manifest: Manifest, state: LedgerState, out: OutputDir, *, max_attempts: int = 3) -> Path:
    """Write ``<out.path>/report.html`` atomically (a temporary file renamed over it) and return its path.

    A folder that cannot be written raises OutputError with one line; an earlier report is then left whole.
    """
    text = build_report(manifest, state, out, max_attempts=max_attempts)
    target = out.path / REPORT_NAME
    tmp = out.path / f".{REPORT_NAME}.{secrets.token_hex(4)}.tmp"
    try:
        out.path.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {target}: {describe_os_error(exc)}") from None
    return target


_CSS = """
*{box-sizing:border-box}figure{margin:0}.card[hidden]{display:none}
body{margin:0;font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2330;background:#eef0f4}
.top{position:sticky;top:0;z-index:1;background:#fff;border-bottom:1px solid #d8dce4;padding:14px 24px}
h1{margin:0 0 2px;font-size:20px}.meta{color:#5b6475;margin-bottom:10px}.meta b{color:#1d2330}.shown{color:#5b6475}
.controls{display:flex;flex-wrap:wrap;gap:6px;align-items:center}
button{font:inherit;border:1px solid #c9ceda;background:#f6f7fa;border-radius:16px;padding:3px 12px;cursor:pointer}
button[aria-pressed=true]{background:#1d2330;color:#fff;border-color:#1d2330}
input{font:inherit;margin-left:auto;padding:4px 10px;border:1px solid #c9ceda;border-radius:6px;width:260px}
main{display:grid;grid-template-columns:repeat(auto-fill,minmax(270px,1fr));gap:14px;padding:18px 24px}
.card{display:flex;flex-direction:column;gap:6px;background:#fff;border:1px solid #d8dce4;border-radius:10px;
  padding:10px}
.pics{display:grid;grid-template-columns:1fr 1fr;gap:8px}figure img{max-width:100%;max-height:100%;object-fit:contain}
figure>*:first-child{display:flex;align-items:center;justify-content:center;width:100%;aspect-ratio:1;
  background:#f1f3f6;border-radius:6px;overflow:hidden}
figcaption{font-size:11px;color:#7a8294;text-align:center;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.none{color:#7a8294;font-size:12px;padding:8px;text-align:center}
.url{word-break:break-all;font-family:ui-monospace,monospace;font-size:11px}
header{display:flex;justify-content:space-between;align-items:center;gap:8px}
.job{font:600 12px ui-monospace,monospace;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.status{font-size:12px;border-radius:10px;padding:1px 9px;white-space:nowrap}
.succeeded{background:#dcf3e3;color:#16663a}.failed{background:#fbe0e0;color:#9c1f1f}
.in-flight{background:#dde9fb;color:#1d4f9c}.pending{background:#eceef2;color:#4b5263}
.prompt{margin:0;white-space:pre-wrap;overflow-wrap:anywhere}
dl{margin:0;display:flex;flex-wrap:wrap;gap:2px 12px;color:#5b6475;font-size:12px}
dt{display:inline}dd{display:inline;margin:0 0 0 4px;color:#1d2330}
.error{margin:0;background:#fdf0f0;color:#7d1a1a;border-radius:6px;padding:6px 8px;font-size:12px;
  overflow-wrap:anywhere}
.error code{background:#f6d3d3;border-radius:4px;padding:0 4px}
"""

_JS = """
for (const img of document.querySelectorAll('img[data-same]')) {
  img.src = document.getElementById(img.dataset.same).src;
}
const cards = [...document.querySelectorAll('.card')];
const search = document.getElementById('search');
let wanted = '';
function apply() {
  const text = search.value.trim().toLowerCase();
  let shown = 0;
  for (const card of cards) {
    const ok = (!wanted || card.dataset.status === wanted) &&
      (!text || card.querySelector('.prompt').textContent.toLowerCase().includes(text));
    card.hidden = !ok;
    shown += ok;
  }
  document.getElementById('shown').textContent = shown;
}
const buttons = [...document.querySelectorAll('[data-filter]')];
for (const button of buttons) {
  button.addEventListener('click', () => {
    wanted = button.dataset.filter;
    for (const other of buttons) other.setAttribute('aria-pressed', other === button);
    apply();
  });
}
search.addEventListener('input', apply);
const start = new URLSearchParams(location.hash.slice(1));
search.value = start.get('q') || '';
(buttons.find((b) => b.dataset.filter === start.get('status')) || buttons[0]).click();
window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.body.dataset.imagesTotal = imgs.length;
  document.body.dataset.imagesLoaded = imgs.filter((i) => i.complete && i.naturalWidth > 0).length;
});
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>{title} &middot; batchrunner report</title>
<style>{css}</style></head>
<body>
<div class="top">
<h1>{name}</h1>
<div class="meta">{total} jobs &middot; model <b>{model}</b> &middot; spend <b class="spend">{spend}</b>
 &middot; generated <time>{generated}</time></div>
<div class="controls">{buttons}
<input type="search" id="search" placeholder="Search prompts" aria-label="Search prompts">
<span class="shown"><span id="shown">{total}</span> shown</span></div>
</div>
<main>
{cards}
</main>
<script>{js}</script>
</body></html>
"""
