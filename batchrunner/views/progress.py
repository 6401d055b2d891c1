"""The run's display while it runs: a three-line bar on a terminal, or a progress line in the log on a fixed timer.

Both are driven by a timer of their own (``Progress.timer``), not only by the scheduler's decisions: when the run
waits 25 s for the rate window the bar's clock still moves and says what it waits for, and cron lines come every
10 s, neither late nor twice. The words come from ``display.py``; time comes from an injected clock, so the tests
step it instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from batchrunner.engine.runstate import Snapshot
from batchrunner.views.display import bar_texts, progress_fields, progress_line, start_line, status_text, wait_text

__all__ = ["BAR_INTERVAL", "LINE_INTERVAL", "Progress", "terminal_width"]

log = logging.getLogger("batchrunner")

BAR_INTERVAL = 1.0  # seconds between redraws of the bar when nothing else redraws it
LINE_INTERVAL = 10.0  # seconds between progress lines in the log
_MIN_REDRAW = 0.1  # the scheduler reports on every decision: the bar is redrawn at most ten times a second


def terminal_width(stream: TextIO, default: int = 80) -> int:
    """The width of the terminal ``stream`` writes to (``default`` when it is none)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns or default
    except (OSError, ValueError, AttributeError):
        return default


def _bar_class() -> Any:
    from tqdm import tqdm

    class Bar(tqdm):  # type: ignore[misc]
        """tqdm with a text of ours right of the bar (``{right}`` in ``bar_format``)."""

        right = ""

        @property
        def format_dict(self) -> dict[str, Any]:
            d: dict[str, Any] = super().format_dict
            d["right"] = self.right
            return d

    return Bar


class Progress:
    """``mode`` ``bar``: three lines on ``stream`` (a terminal); ``lines``: ``progress:`` log lines; ``none``: only
    the start line; ``off``: nothing (a run with nothing to do).

    The scheduler calls the object with each snapshot it makes; ``attach`` gives it the scheduler's ``snapshot`` so
    that the timer can ask for a fresh one while the scheduler sleeps.
    """

    def __init__(
        self,
        mode: str,
        *,
        stream: TextIO,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        width: Callable[[], int] | None = None,
    ) -> None:
        self.mode = mode
        self.stream = stream
        self.interval = interval if interval is not None else (BAR_INTERVAL if mode == "bar" else LINE_INTERVAL)
        self._clock = clock
        self._width = width or (lambda: terminal_width(stream))
        self._source: Callable[[], Snapshot] | None = None
        self.latest: Snapshot | None = None
        self._started: float | None = None
        self._ticks = 0
        self.finished_at_start = 0
        self._last_draw = -math.inf
        self._bar: Any = None
        self._status: Any = None
        self._wait: Any = None

    def attach(self, source: Callable[[], Snapshot]) -> None:
        self._source = source

    def __call__(self, snap: Snapshot) -> None:
        if self.latest is None:
            self._begin(snap)
        self.latest = snap
        if self._bar is not None and self._clock() - self._last_draw >= _MIN_REDRAW:
            self._draw(snap)

    def _begin(self, snap: Snapshot) -> None:
        self._started = self._clock()
        self.finished_at_start = snap.done + snap.failed
        if self.mode == "off":
            return
        resumed = snap.done or snap.failed or snap.in_flight or snap.in_doubt
        fields = progress_fields(snap, self.finished_at_start, "resume" if resumed else "start")
        log.info(start_line(snap), extra={"fields": fields})
        if self.mode == "bar":
            bar = _bar_class()
            # The bar starts at what earlier runs finished: its rate and ETA are this run's, not 7617 img/s.
            self._bar = bar(
                total=snap.total,
                initial=self.finished_at_start,
                file=self.stream,
                bar_format="{desc}{bar}{right}",
                dynamic_ncols=True,
                position=0,
                leave=True,
                ascii=False,
            )
            self._status = bar(total=1, file=self.stream, bar_format="{desc}", position=1, leave=False)
            self._wait = bar(total=1, file=self.stream, bar_format="{desc}", position=2, leave=False)

    def due(self) -> float:
        """Seconds until the next tick: on a fixed grid from the first snapshot, so lines neither drift nor repeat."""
        if self._started is None:
            return self.interval
        next_at = self._started + (self._ticks + 1) * self.interval
        return max(0.0, next_at - self._clock())

    def tick(self) -> None:
        """What the timer does: redraw the bar, or write a progress line when one is due."""
        if self.latest is None or self._started is None:
            return
        snap = self._source() if self._source is not None else self.latest
        self.latest = snap
        now = self._clock()
        k = int((now - self._started) // self.interval)
        if k <= self._ticks:
            if self.mode == "bar":
                self._draw(snap)
            return
        self._ticks = k  # ticks missed while the loop was blocked are skipped, not written in a burst
        if self.mode == "bar":
            self._draw(snap)
        elif self.mode == "lines":
            log.info(
                progress_line(snap, self.finished_at_start),
                extra={"fields": progress_fields(snap, self.finished_at_start)},
            )

    async def timer(self) -> None:
        """Tick for ever (until cancelled)."""
        while True:
            await asyncio.sleep(self.due() if self._started is not None else min(self.interval, 0.1))
            self.tick()

    def _draw(self, snap: Snapshot) -> None:
        self._last_draw = self._clock()
        width = max(20, self._width() - 1)  # the last column would wrap on some terminals
        left, right = bar_texts(snap, width, self.finished_at_start)
        bar = self._bar
        bar.desc, bar.right = left, right
        bar.n = snap.done + snap.failed
        bar.refresh()
        self._status.set_description_str(status_text(snap, width), refresh=True)
        self._wait.set_description_str(wait_text(snap, width), refresh=True)

    @contextlib.contextmanager
    def shown(self) -> Iterator[Progress]:
        """While in the block, log records go through the bar (``logging_redirect_tqdm``), above it, never over it."""
        if self.mode != "bar":
            yield self
            return
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm(loggers=[log]):
            try:
                yield self
            finally:
                self.close()

    def close(self) -> None:
        if self._bar is not None:
            if self._source is not None:
                with contextlib.suppress(Exception):  # a scheduler that never ran has no snapshot to give
                    self.latest = self._source()
            if self.latest is not None:
                self._draw(self.latest)
            self._wait.close()
            self._status.close()
            self._bar.close()
            self._bar = self._status = self._wait = None
