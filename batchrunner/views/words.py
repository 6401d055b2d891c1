"""The words people read: one vocabulary for the state of a batch, durations and money, shared by the progress
display, the summary, ``status``, ``plan`` and the report. Pure functions; nothing here reads a clock or a file.

A job is, at any moment, exactly one of:

    done         its image is on disk (made this run, or by an earlier one)
    failed       failed for good: out of attempts, or a failure the API says is not worth another
    in flight    a create on the wire, a prediction running, or its output downloading
    in doubt     a create that got no clear answer, being looked for in the account's executions
    pending      waiting for a create (never sent, a retryable failure, a create that surely made nothing)

so that done + failed + in flight + in doubt + pending = total on every line that counts them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["STATUS_WORDS", "Tally", "duration", "money", "plural", "tally_text"]

# runstate.classify()'s verdicts as the words above, in the order they are listed to people.
STATUS_WORDS = {"done": "done", "failed": "failed", "poll": "in flight", "reconcile": "in doubt", "submit": "pending"}


@dataclass(frozen=True, slots=True)
class Tally:
    """A batch's jobs by state (see the module docstring); ``pending`` is whatever the others leave."""

    total: int
    done: int
    failed: int
    in_flight: int
    in_doubt: int
    pending: int

    @property
    def adds_up(self) -> bool:
        return self.done + self.failed + self.in_flight + self.in_doubt + self.pending == self.total


def tally_text(t: Tally, *, short: bool = False) -> str:
    """``92/200 done, 3 failed, 10 in flight, 95 pending`` (in doubt only when there are any; ``short`` drops
    the zero counts other than done and pending)."""
    parts = [f"{t.done}/{t.total} done"]
    for count, word in ((t.failed, "failed"), (t.in_flight, "in flight"), (t.in_doubt, "in doubt")):
        if count or (not short and word != "in doubt"):
            parts.append(f"{count} {word}")
    parts.append(f"{t.pending} pending")
    return ", ".join(parts)


def duration(seconds: float | None) -> str:
    """A duration for people: ``45s``, ``6m 26s``, ``2h 05m``, ``3d 4h``; ``?`` when unknown or endless."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    if 0 < seconds < 1:
        return f"{seconds:.1f}s"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m {s:02d}s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h}h {m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d {h}h"


def money(usd: float) -> str:
    """``$3.20``; amounts below a cent keep their digits (``$0.004``) so that a cheap run does not read $0.00."""
    if 0 < abs(usd) < 0.01:
        return f"${usd:.3f}".rstrip("0")
    return f"${usd:,.2f}"


def plural(count: int, word: str, many: str | None = None) -> str:
    """``1 job``, ``3 jobs``."""
    return f"{count} {word if count == 1 else (many or word + 's')}"
