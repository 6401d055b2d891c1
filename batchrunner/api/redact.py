"""The API key: the check it must pass before a run, and its removal from every text the runner writes.

The client redacts the key from its own messages; ``Redactor`` is the last line of defence behind it, applied to
every log record, to the free-text fields of the ledger and to the final error line. A server that echoes a header
cut short, or a message that quotes part of it, must not leak it either, so not only the whole key is removed: any
piece of at least ``MIN_INNER`` characters, and a prefix or suffix of at least ``MIN_EDGE`` (what a truncated echo
leaves). Matching ignores ASCII case, since a server may fold it. A short piece of text that happens to match a piece
of the key is masked too: a word lost from a log line is cheap, a key in a log file is not.
"""

from __future__ import annotations

import functools
import string

from batchrunner.errors import UsageError

__all__ = [
    "MASK",
    "MAX_KEY_LENGTH",
    "MIN_EDGE",
    "MIN_INNER",
    "SNIPPET_CHARS",
    "Redactor",
    "check_api_key",
    "redact",
    "snippet",
]

# Real API keys are tens of characters; one of thousands is a file pasted into the variable, or an attack.
MAX_KEY_LENGTH = 512
MIN_INNER = 8
MIN_EDGE = 6
MASK = "[redacted]"
# The longest excerpt of an answer that goes into a message.
SNIPPET_CHARS = 100
_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)  # keeps every index in place, unlike lower()


def check_api_key(key: str, *, source: str = "EACHLABS_API_KEY") -> str:
    """The key without surrounding whitespace; UsageError, one line that never quotes it, when it cannot be a key.

    A key is one word of visible ASCII characters, at most ``MAX_KEY_LENGTH`` long: anything else (a space, a newline
    or a control character inside, a character an HTTP header cannot carry) is refused before the first request.
    """
    key = key.strip()
    if not key:
        raise UsageError(f"{source} is empty")
    if len(key) > MAX_KEY_LENGTH:
        raise UsageError(
            f"{source} is {len(key):,} characters long, far more than any API key (at most {MAX_KEY_LENGTH}): "
            "is the right value in it?"
        )
    for position, char in enumerate(key, start=1):
        if not "!" <= char <= "~":
            what = "a space" if char == " " else f"the character U+{ord(char):04X}"
            raise UsageError(
                f"{source} holds {what} at position {position}: an API key is one word of visible ASCII characters"
            )
    return key


class Redactor:
    """``redactor(text)`` is ``text`` with the secret, and every piece of it that could identify it, masked."""

    def __init__(self, secret: str) -> None:
        self.secret = secret.translate(_LOWER)
        s = self.secret
        self._grams = frozenset(s[i : i + MIN_INNER] for i in range(len(s) - MIN_INNER + 1))
        self._head = s[:MIN_EDGE] if len(s) >= MIN_EDGE else ""
        self._tail = s[-MIN_EDGE:] if len(s) >= MIN_EDGE else ""

    def __bool__(self) -> bool:
        return bool(self.secret)

    def spans(self, text: str) -> list[tuple[int, int]]:
        """The merged ``(start, end)`` ranges of ``text`` that are pieces of the secret."""
        s = self.secret
        if not s or not text:
            return []
        folded = text.translate(_LOWER)
        found: list[tuple[int, int]] = []
        if len(s) < MIN_EDGE:
            start = folded.find(s)
            while start >= 0:
                found.append((start, start + len(s)))
                start = folded.find(s, start + 1)
        grams, n = self._grams, MIN_INNER
        if grams:
            found.extend((i, i + n) for i in range(len(folded) - n + 1) if folded[i : i + n] in grams)
        if self._head:
            start = folded.find(self._head)
            while start >= 0:
                # A cut-off copy of the key's start: as far as the text goes on being the key.
                end, k = start + MIN_EDGE, MIN_EDGE
                while end < len(folded) and k < len(s) and folded[end] == s[k]:
                    end, k = end + 1, k + 1
                found.append((start, end))
                start = folded.find(self._head, start + 1)
        if self._tail:
            end = folded.find(self._tail)
            while end >= 0:
                # A copy of the key's end: as far back as the text is the key.
                start, k = end, len(s) - MIN_EDGE
                while start > 0 and k > 0 and folded[start - 1] == s[k - 1]:
                    start, k = start - 1, k - 1
                found.append((start, end + MIN_EDGE))
                end = folded.find(self._tail, end + 1)
        found.sort()
        merged: list[tuple[int, int]] = []
        for start, end in found:
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        return merged

    def __call__(self, text: str) -> str:
        spans = self.spans(text)
        if not spans:
            return text
        parts: list[str] = []
        last = 0
        for start, end in spans:
            parts.append(text[last:start])
            parts.append(MASK)
            last = end
        parts.append(text[last:])
        return "".join(parts)


@functools.lru_cache(maxsize=4)
def _redactor(secret: str) -> Redactor:
    return Redactor(secret)


def redact(text: str, secret: str) -> str:
    """``text`` with the key and every piece of it that could identify it masked (see redact.py)."""
    return _redactor(secret)(text) if secret else text


def snippet(body: bytes | str, secret: str) -> str:
    """A short one-line excerpt; redacted before it is cut, so no prefix of the key survives the cut."""
    # Only the head of a large body can reach the excerpt: cut generously first (the key may straddle the cut).
    head = body[: 4 * SNIPPET_CHARS + 4 * len(secret)]
    text = head.decode("utf-8", "replace") if isinstance(head, bytes) else head
    return " ".join(redact(text, secret).split())[:SNIPPET_CHARS]
