"""The key, on the command line's side: refused at start when it cannot be a key, and no piece of it ever written."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from batchrunner.api.redact import MASK, MAX_KEY_LENGTH, Redactor, check_api_key
from batchrunner.cli.main import build_parser, main
from batchrunner.errors import UsageError
from batchrunner.store.ledger import FAILED, Ledger
from batchrunner.views.logs import setup_logging
from tests.conftest import SECRET_KEY, ThreadedSimulator, fast_sim, run_args, write_manifest

SimFactory = Callable[..., ThreadedSimulator]
KEY = "sk-live-9QxT4mZr7LpA2vKc8WnB"


def pieces(key: str, n: int = 6) -> list[str]:
    """Every piece of ``key`` of ``n`` characters: none may appear in anything written."""
    return [key[i : i + n] for i in range(len(key) - n + 1)]


def assert_no_piece(text: str, key: str) -> None:
    for piece in pieces(key):
        assert piece not in text, piece


# --- refused at start ------------------------------------------------------------------------------------------

BAD_KEYS = [
    pytest.param("k" * (MAX_KEY_LENGTH + 1), "characters long", id="one-over-the-limit"),
    pytest.param("sk-" + "a1B2c3D4" * 2000, "characters long", id="a-file-pasted-in"),
    pytest.param("sk-live abc123def456", "a space at position 8", id="inner-space"),
    pytest.param("sk-live\tabc123def456", "U+0009", id="inner-tab"),
    pytest.param("sk-live\nabc123def456", "U+000A", id="inner-newline"),
    pytest.param("sk-live\rabc123def456", "U+000D", id="inner-carriage-return"),
    pytest.param("sk-live\x00abc123def456", "U+0000", id="inner-nul"),
    pytest.param("sk-live\x7fabc123def456", "U+007F", id="inner-delete"),
    pytest.param("sk-live\u200babc123def456", "U+200B", id="zero-width-space"),
    pytest.param("sk-live\xa0abc123def456", "U+00A0", id="no-break-space"),
    pytest.param("sk-livé-abc123def456", "U+00E9", id="not-ascii"),
    pytest.param("\u2028sk-liveabc123def456\u2028x", "U+2028", id="line-separator-inside"),
]


@pytest.mark.parametrize(("key", "reason"), BAD_KEYS)
def test_check_api_key_refuses_what_cannot_be_a_key_without_quoting_it(key: str, reason: str) -> None:
    with pytest.raises(UsageError) as caught:
        check_api_key(key)
    message = str(caught.value)
    assert reason in message and "\n" not in message
    assert_no_piece(message, key.strip())


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (KEY, KEY),
        (f"  {KEY}\n", KEY),  # a newline from `$(cat keyfile)` or an env file: not part of the key
        ("k" * MAX_KEY_LENGTH, "k" * MAX_KEY_LENGTH),
        ("a-b_c.d~e!f", "a-b_c.d~e!f"),
    ],
)
def test_check_api_key_accepts_keys_and_strips_what_surrounds_them(key: str, expected: str) -> None:
    assert check_api_key(key) == expected


@pytest.mark.parametrize(("key", "reason"), BAD_KEYS)
def test_a_run_with_a_bad_key_exits_2_in_one_line_before_any_request(
    tmp_path: Path,
    threaded_sim: SimFactory,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    key: str,
    reason: str,
) -> None:
    if "\x00" in key:
        pytest.skip("an environment variable cannot hold a NUL")
    sim = threaded_sim(fast_sim())
    monkeypatch.setenv("EACHLABS_API_KEY", key)
    manifest = write_manifest(tmp_path, 1, image=False)
    out = tmp_path / "out"
    assert main(run_args(manifest, sim.url, out)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert reason in err
    assert_no_piece(err, key.strip())
    assert sim.stats()["requests"] == 0
    assert not (out / "ledger.jsonl").exists()


# --- redaction -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(f"key {KEY} refused", f"key {MASK} refused", id="the-whole-key"),
        pytest.param(f"X-API-Key: {KEY[:6]}", f"X-API-Key: {MASK}", id="a-6-character-prefix"),
        pytest.param(f"X-API-Key: {KEY[:7]}...", f"X-API-Key: {MASK}...", id="a-7-character-prefix"),
        pytest.param(f"Bearer {KEY[:15]}", f"Bearer {MASK}", id="a-header-echo-cut-short"),
        pytest.param(f"...{KEY[-6:]} was refused", f"...{MASK} was refused", id="a-6-character-suffix"),
        pytest.param(f"...{KEY[-11:]}", f"...{MASK}", id="a-longer-suffix"),
        pytest.param(f"<{KEY[5:13]}>", f"<{MASK}>", id="8-characters-from-inside"),
        pytest.param(f"<{KEY[4:20]}>", f"<{MASK}>", id="16-characters-from-inside"),
        pytest.param(f"{KEY.upper()}", MASK, id="case-folded-by-the-server"),
        pytest.param(f"a {KEY[:9]} b {KEY[-9:]} c", f"a {MASK} b {MASK} c", id="two-pieces"),
        pytest.param(f"{KEY}{KEY}", MASK, id="twice-in-a-row"),
        pytest.param(f"{KEY[:10]}{KEY[12:]}", MASK, id="with-two-characters-cut-out"),
        pytest.param(f"k={KEY[3:8]} n=1", f"k={KEY[3:8]} n=1", id="5-from-inside-is-not-a-piece"),
        pytest.param(f"k={KEY[3:10]}!", f"k={KEY[3:10]}!", id="7-from-inside-is-not-a-piece"),
        pytest.param(f"{KEY[:5]}", f"{KEY[:5]}", id="a-5-character-prefix-is-not-a-piece"),
        pytest.param("nothing to see", "nothing to see", id="nothing"),
        pytest.param("", "", id="empty"),
    ],
)
def test_redactor_masks_the_key_and_every_piece_that_could_identify_it(text: str, expected: str) -> None:
    assert Redactor(KEY)(text) == expected


def test_an_empty_secret_redacts_nothing() -> None:
    assert Redactor("")("anything at all") == "anything at all"
    assert not Redactor("")


def test_a_short_secret_is_still_masked_whole() -> None:
    assert Redactor("abcd")("x abcd y ABCD") == f"x {MASK} y {MASK}"


@pytest.fixture
def logged(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], str]]:
    """Set up the CLI's logging with the key in the environment; return a reader of what was written."""
    monkeypatch.setenv("EACHLABS_API_KEY", KEY)
    stream = io.StringIO()
    yield lambda fmt: _setup(fmt, stream)
    logging.getLogger("batchrunner").handlers.clear()


def _setup(fmt: str, stream: io.StringIO) -> str:
    args = build_parser().parse_args(["run", "m.yaml", "--log-format", fmt])
    setup_logging(stream, fmt=args.log_format, redact=Redactor(KEY))
    log = logging.getLogger("batchrunner.api.client")
    log.warning("the server said: %s", f"invalid key {KEY[:12]}")
    log.error("job %s failed: %s", "j1", f"token ...{KEY[-8:]}", extra={"fields": {"detail": KEY[2:14]}})
    try:
        raise RuntimeError(f"header {KEY[:20]}")
    except RuntimeError:
        log.exception("boom")
    return stream.getvalue()


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_every_log_record_is_redacted_message_fields_and_traceback(logged: Callable[[str], str], fmt: str) -> None:
    written = logged(fmt)
    assert MASK in written and "the server said" in written
    assert_no_piece(written, KEY)
    if fmt == "json":
        lines = [json.loads(line) for line in written.splitlines() if line.startswith("{")]
        assert lines[1]["detail"] == MASK


def test_the_ledger_masks_pieces_of_the_key_in_error_texts_only(tmp_path: Path) -> None:
    fingerprint = "0" * 40 + KEY.encode().hex()[:24]
    with Ledger(tmp_path / "ledger.jsonl", fsync=False, redact=Redactor(KEY)) as ledger:
        record = ledger.append(FAILED, job=KEY[:8], fingerprint=fingerprint, error=f"refused {KEY[:10]}")
    written = (tmp_path / "ledger.jsonl").read_text()
    assert record["error"] == f"refused {MASK}" and f"refused {MASK}" in written
    # Ids are the replay's keys: written as given, whatever they happen to contain.
    assert record["job"] == KEY[:8] and record["fingerprint"] == fingerprint


def test_the_final_error_line_is_redacted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EACHLABS_API_KEY", SECRET_KEY)
    manifest = write_manifest(tmp_path, 1, image=False)
    # A URL the client refuses, quoting it: with a piece of the key pasted in by mistake.
    bad_url = f"ftp://{SECRET_KEY[:12]}@example.com"
    code = main(["run", str(manifest), "--output", str(tmp_path / "o"), "--api-url", bad_url, "--progress", "none"])
    assert code == 2
    err = capsys.readouterr().err
    assert "API URL must be http(s)" in err and MASK in err
    assert_no_piece(err, SECRET_KEY)
