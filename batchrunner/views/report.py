"""The contact sheet: ``<output>/report.html``, each job's input beside its output, searchable and filterable.

The page holds the jobs as data (one compact JSON block: prompts and inputs once each, a short row per job) and
draws the cards with a little script, a page of them at a time as the reader scrolls; the pictures are small JPEG
files in ``<output>/thumbs/`` (``thumbs.py``), loaded lazily. A 10,000-job report is then a few MB that a browser
opens in about a second, where embedded thumbnails made 52 MB and ten seconds. It works from the file system and
makes no request beyond its own folder: clicking an output opens the full file beside the report.

Everything shown comes from the manifest and the ledger (no API request). Strings of theirs reach the page only as
JSON inside a ``<script type="application/json">`` with ``<``, ``>`` and ``&`` escaped, and the script writes them
with ``textContent``: a prompt cannot become markup. The search box matches id, image name, seed and prompt; the
status buttons filter; both live in the address (``report.html#status=failed&q=snow``), so a link opens the page
as it was seen, and the back button leaves it.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import secrets
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from batchrunner.engine.runstate import classify
from batchrunner.errors import OutputError
from batchrunner.manifest import Job, Manifest
from batchrunner.store.ledger import JobState, LedgerState
from batchrunner.store.output import OutputDir, describe_os_error
from batchrunner.views.history import History, read_history
from batchrunner.views.thumbs import Thumbnails
from batchrunner.views.words import STATUS_WORDS, money

__all__ = ["REPORT_NAME", "STATUSES", "Card", "build_report", "job_card", "report_data", "write_report"]

REPORT_NAME = "report.html"
STATUSES = tuple(STATUS_WORDS.values())  # done, failed, in flight, in doubt, pending
THUMB_PX = 192


@dataclass(frozen=True, slots=True)
class Card:
    """What one job's card shows, derived from the manifest and the ledger alone."""

    job: str
    status: str  # a value of STATUS_WORDS
    prompt: str
    seed: str
    aspect_ratio: str
    input_text: str  # the input_image as written (a data URI shortened to its length)
    input_path: Path | None
    input_sha256: str | None
    output_file: str | None  # name of the output file beside the report, when it is on disk
    attempts: int
    seconds: float | None  # submit to save, of the latest finished attempt
    model_seconds: float | None  # the model's own time for the output shown, as the API reported it
    error: str | None
    error_code: str | None
    prediction_id: str | None = None


def job_card(
    job: Job, state: JobState | None, *, file_present: bool, max_attempts: int, model_seconds: float | None = None
) -> Card:
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
        status=STATUS_WORDS[verdict],
        prompt=str(job.input.get("prompt", "")),
        seed=_text(job.input.get("seed")),
        aspect_ratio=_text(job.input.get("aspect_ratio")),
        input_text=written,
        input_path=job.image_path,
        input_sha256=job.image_sha256,
        output_file=state.file if state is not None and file_present else None,
        attempts=attempts,
        seconds=seconds,
        model_seconds=model_seconds if verdict == "done" else None,
        error=error,
        error_code=code,
        prediction_id=state.prediction_id if state is not None else None,
    )


def _text(value: object) -> str:
    return "" if value is None else str(value)


def report_data(cards: list[Card], thumbs: Thumbnails, folder: Path) -> dict[str, Any]:
    """The page's data: prompts and inputs once each, then one short row per job (see ``_JS`` for its reading).

    Row: [id, status index, prompt index, seed, aspect ratio, input index, output file, output thumbnail,
    attempts, model seconds, submit-to-save seconds, error code, error, prediction id]."""
    prompts: dict[str, int] = {}
    inputs: dict[tuple[str, str | None], int] = {}
    input_rows: list[list[Any]] = []
    rows: list[list[Any]] = []
    status_index = {word: i for i, word in enumerate(STATUSES)}
    for card in cards:
        p = prompts.setdefault(card.prompt, len(prompts))
        thumb = None if card.input_path is None else thumbs.input(card.input_path, card.input_sha256)
        key = (card.input_text, thumb)
        if key not in inputs:
            inputs[key] = len(input_rows)
            name = card.input_path.name if card.input_path is not None else card.input_text
            input_rows.append([name, thumb])
        out_thumb = None if card.output_file is None else thumbs.output(folder / card.output_file)
        rows.append(
            [
                card.job,
                status_index[card.status],
                p,
                card.seed,
                card.aspect_ratio,
                inputs[key],
                card.output_file,
                out_thumb,
                card.attempts,
                None if card.model_seconds is None else round(card.model_seconds, 2),
                None if card.seconds is None else round(card.seconds, 1),
                card.error_code,
                card.error,
                card.prediction_id,
            ]
        )
    return {"statuses": list(STATUSES), "prompts": list(prompts), "inputs": input_rows, "jobs": rows}


def _drop_failed(data: dict[str, Any], failed: set[str]) -> None:
    """Pictures that could not be made show as 'no preview' instead of a broken image."""
    if not failed:
        return
    for row in data["inputs"]:
        if row[1] is not None and row[1].rsplit("/", 1)[-1] in failed:
            row[1] = None
    for row in data["jobs"]:
        if row[7] is not None and row[7].rsplit("/", 1)[-1] in failed:
            row[7] = None


def _script_json(value: Any) -> str:
    # Inside <script>, "</script>" or "<!--" in a prompt would end or confuse the block: no <, > or & appears raw.
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def build_report(
    manifest: Manifest,
    state: LedgerState,
    out: OutputDir,
    *,
    max_attempts: int = 3,
    thumb_px: int = THUMB_PX,
    now: float | None = None,
    history: History | None = None,
) -> str:
    """The report page as HTML text, with its thumbnails made (or kept) in ``<output>/thumbs/``."""
    history = history if history is not None else read_history(out.ledger)
    cards = []
    for job in manifest.jobs:
        st = state.jobs.get(job.fingerprint)
        present = st is not None and out.has_file(st.file)
        model = history.model_times.get(job.fingerprint)
        cards.append(job_card(job, st, file_present=present, max_attempts=max_attempts, model_seconds=model))
    thumbs = Thumbnails(out.path, thumb_px)
    data = report_data(cards, thumbs, out.path)
    _drop_failed(data, thumbs.make())
    counts = Counter(card.status for card in cards)
    generated = datetime.fromtimestamp(time.time() if now is None else now, tz=UTC)
    name = html.escape(manifest.path.stem)
    buttons = [f'<button type="button" data-filter="" aria-pressed="true">all <b>{len(cards)}</b></button>']
    buttons += [
        f'<button type="button" data-filter="{_slug(word)}" aria-pressed="false"{"" if counts[word] else " hidden"}>'
        f'{word} <b class="count" data-status="{_slug(word)}">{counts[word]}</b></button>'
        for word in STATUSES
    ]
    return _PAGE.format(
        title=name,
        css=_CSS,
        js=_JS,
        name=name,
        model=html.escape(f"{manifest.model} {manifest.version}"),
        total=len(cards),
        spend=money(state.spend),
        generated=generated.strftime("%Y-%m-%d %H:%M UTC"),
        buttons="".join(buttons),
        data=_script_json(data),
    )


def _slug(label: str) -> str:
    return label.replace(" ", "-")


def write_report(manifest: Manifest, state: LedgerState, out: OutputDir, *, max_attempts: int = 3) -> Path:
    """Write ``<out.path>/report.html`` atomically (a temporary file renamed over it) and return its path.

    A folder that cannot be written raises OutputError with one line; an earlier report is then left whole.
    """
    target = out.path / REPORT_NAME
    tmp = out.path / f".{REPORT_NAME}.{secrets.token_hex(4)}.tmp"
    try:
        out.path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {describe_os_error(exc)}") from None
    try:
        text = build_report(manifest, state, out, max_attempts=max_attempts)
    except OutputError as exc:
        raise OutputError(f"cannot write {target}: {exc}") from None
    try:
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
*{box-sizing:border-box}figure{margin:0}[hidden]{display:none!important}
body{margin:0;font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2330;background:#eef0f4}
.top{position:sticky;top:0;z-index:1;background:#fff;border-bottom:1px solid #d8dce4;padding:10px 20px}
.head{display:flex;flex-wrap:wrap;align-items:baseline;gap:4px 12px;margin-bottom:8px}
h1{margin:0;font-size:18px}.meta{color:#5b6475;font-size:13px}.meta b{color:#1d2330}
.controls{display:flex;flex-wrap:wrap;gap:6px;align-items:center}
.filters{display:flex;gap:6px;overflow-x:auto;scrollbar-width:none}
button{font:inherit;font-size:13px;border:1px solid #c9ceda;background:#f6f7fa;border-radius:16px;padding:3px 11px;
  cursor:pointer;white-space:nowrap}
button[aria-pressed=true]{background:#1d2330;color:#fff;border-color:#1d2330}
input{font:inherit;margin-left:auto;padding:5px 10px;border:1px solid #c9ceda;border-radius:6px;width:300px}
.shown{color:#5b6475;font-size:13px;white-space:nowrap}
main{display:grid;grid-template-columns:repeat(auto-fill,minmax(270px,1fr));gap:14px;padding:16px 20px}
.card{display:flex;flex-direction:column;gap:6px;background:#fff;border:1px solid #d8dce4;border-radius:10px;
  padding:10px}
.pics{display:grid;grid-template-columns:1fr 1fr;gap:8px}
.pic{display:flex;align-items:center;justify-content:center;width:100%;aspect-ratio:1;background:#f1f3f6;
  border-radius:6px;overflow:hidden}
.pic img{max-width:100%;max-height:100%;object-fit:contain}
figcaption{font-size:11px;color:#7a8294;text-align:center;overflow-wrap:anywhere}
.none{color:#7a8294;font-size:12px;padding:8px;text-align:center;overflow-wrap:anywhere}
.url{font-family:ui-monospace,monospace;font-size:11px}
.card header{display:flex;justify-content:space-between;align-items:flex-start;gap:8px}
.job{font:600 12px ui-monospace,monospace;overflow-wrap:anywhere;user-select:all}
.status{font-size:12px;border-radius:10px;padding:1px 9px;white-space:nowrap}
.done{background:#dcf3e3;color:#16663a}.failed{background:#fbe0e0;color:#9c1f1f}
.in-flight{background:#dde9fb;color:#1d4f9c}.in-doubt{background:#fff1cc;color:#7a5200}
.pending{background:#eceef2;color:#4b5263}
.prompt{margin:0;white-space:pre-wrap;overflow-wrap:anywhere}
dl{margin:0;display:flex;flex-wrap:wrap;gap:2px 12px;color:#5b6475;font-size:12px}
dl div{display:flex;gap:4px}dt{margin:0}dd{margin:0;color:#1d2330}
.error{margin:0;background:#fdf0f0;color:#7d1a1a;border-radius:6px;padding:6px 8px;font-size:12px;
  overflow-wrap:anywhere}
.error code{background:#f6d3d3;border-radius:4px;padding:0 4px}
#more{height:1px}
@media (max-width:600px){
  .top{padding:8px 10px;position:static}.head{margin-bottom:6px}h1{font-size:16px}.meta{font-size:12px}
  .meta time,.meta .dot{display:none}
  .controls{flex-wrap:nowrap;flex-direction:column;align-items:stretch;gap:6px}
  input{width:100%;margin:0}.shown{display:none}
  main{grid-template-columns:1fr;padding:10px;gap:10px}
}
"""

_JS = """
const D = JSON.parse(document.getElementById('data').textContent);
const PAGE = 60;
const main = document.querySelector('main');
const more = document.getElementById('more');
const search = document.getElementById('search');
const buttons = [...document.querySelectorAll('[data-filter]')];
let wanted = '', matches = [], drawn = 0, hay = null;
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = text;
  return e;
}
function slug(s) { return s.replace(/ /g, '-'); }
function secs(s) { return s === null ? null : (s < 10 ? s.toFixed(1) : Math.round(s)) + ' s'; }
function picture(src, alt, href, none) {
  const box = el(href ? 'a' : 'div', 'pic');
  if (href) { box.href = encodeURI(href); box.target = '_blank'; box.title = 'open the full image'; }
  if (src) {
    const img = el('img'); img.loading = 'lazy'; img.decoding = 'async'; img.alt = alt; img.src = src;
    box.append(img);
  } else box.append(el('span', 'none', none));
  return box;
}
function card(j) {
  const [id, st, p, seed, aspect, inp, file, thumb, attempts, model, wall, code, error, pred] = D.jobs[j];
  const status = D.statuses[st], input = D.inputs[inp];
  const c = el('article', 'card');
  c.dataset.job = id; c.dataset.status = slug(status);
  const pics = el('div', 'pics');
  const fin = el('figure');
  fin.append(input[1] ? picture(input[1], 'input ' + input[0]) : el('div', 'pic none url', input[0]));
  fin.append(el('figcaption', '', 'input · ' + input[0]));
  const fout = el('figure');
  fout.append(file ? picture(thumb, 'output ' + file, file, 'no preview')
                   : el('div', 'pic none', status === 'pending' ? 'not made yet' : status));
  fout.append(el('figcaption', '', 'output'));
  pics.append(fin, fout);
  const head = el('header');
  head.append(el('span', 'job', id), el('span', 'status ' + slug(status), status));
  const dl = el('dl');
  const facts = [['seed', seed], ['aspect', aspect], ['attempts', String(attempts)],
                 ['model time', secs(model)], ['submit to save', secs(wall)]];
  for (const [k, v] of facts) {
    if (v === null || v === '') continue;
    const d = el('div'); d.append(el('dt', '', k), el('dd', '', v)); dl.append(d);
    if (k === 'model time') d.title = "the model's own prediction time, as the API reported it";
    if (k === 'submit to save') d.title = 'from the create to the image saved, polls and download included';
  }
  c.append(pics, head, el('p', 'prompt', D.prompts[p]), dl);
  if (pred) c.title = 'prediction ' + pred;
  if (error || code) {
    const e = el('p', 'error');
    e.append(el('b', '', (status === 'failed' ? 'error' : 'last error') + ': '));
    if (code) e.append(el('code', '', code), ' ');
    e.append(error || '');
    c.append(e);
  }
  return c;
}
function haystack(j) {
  const r = D.jobs[j];
  return [r[0], D.inputs[r[5]][0], r[6] || '', 'seed ' + r[3], r[3], D.prompts[r[2]]].join('\\n').toLowerCase();
}
function draw(n) {
  const frag = document.createDocumentFragment();
  const end = Math.min(matches.length, drawn + n);
  for (; drawn < end; drawn++) frag.append(card(matches[drawn]));
  main.append(frag);
  document.body.dataset.rendered = drawn;
}
function apply(push) {
  const text = search.value.trim().toLowerCase().replace(/\\s+/g, ' ');
  if (text && !hay) hay = D.jobs.map((_, j) => haystack(j));
  const want = wanted === '' ? -1 : D.statuses.findIndex((s) => slug(s) === wanted);
  matches = [];
  for (let j = 0; j < D.jobs.length; j++) {
    if (want >= 0 && D.jobs[j][1] !== want) continue;
    if (text && !hay[j].includes(text)) continue;
    matches.push(j);
  }
  main.replaceChildren(); drawn = 0; draw(PAGE);
  document.getElementById('shown').textContent = matches.length;
  document.body.dataset.shown = matches.length;
  if (push) {
    const q = new URLSearchParams();
    if (wanted) q.set('status', wanted);
    if (text) q.set('q', search.value.trim());
    const hash = q.toString();
    history.replaceState(null, '', hash ? '#' + hash : location.pathname + location.search);
  }
}
function press(filter) {
  wanted = filter;
  for (const b of buttons) b.setAttribute('aria-pressed', b.dataset.filter === filter);
}
for (const b of buttons) b.addEventListener('click', () => { press(b.dataset.filter); apply(true); });
let typing = 0;
search.addEventListener('input', () => { clearTimeout(typing); typing = setTimeout(() => apply(true), 120); });
function fromAddress() {
  const start = new URLSearchParams(location.hash.slice(1));
  search.value = start.get('q') || '';
  const s = start.get('status') || '';
  press(buttons.some((b) => b.dataset.filter === s) ? s : '');
  apply(false);
}
window.addEventListener('hashchange', fromAddress);
new IntersectionObserver((seen) => {
  if (seen.some((e) => e.isIntersecting) && drawn < matches.length) draw(PAGE);
}, {rootMargin: '1200px'}).observe(more);
fromAddress();
document.body.dataset.readyMs = Math.round(performance.now());
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>{title} &middot; batchrunner report</title>
<style>{css}</style></head>
<body>
<div class="top">
<div class="head"><h1>{name}</h1>
<span class="meta">{total} jobs &middot; <b>{model}</b> &middot; spent <b class="spend">{spend}</b>
 <span class="dot">&middot;</span> <time>{generated}</time></span></div>
<div class="controls"><div class="filters">{buttons}</div>
<input type="search" id="search" placeholder="Search id, image, seed, prompt"
 aria-label="Search by id, image name, seed or prompt">
<span class="shown"><span id="shown">{total}</span> shown</span></div>
</div>
<main></main>
<div id="more"></div>
<noscript><p>The report draws its cards with JavaScript; the images are in this folder.</p></noscript>
<script type="application/json" id="data">{data}</script>
<script>{js}</script>
</body></html>
"""
