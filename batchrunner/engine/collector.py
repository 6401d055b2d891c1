"""The cyclic garbage collector's pace while a run dispatches.

Python's default thresholds (700 allocations, then every 10th and every 100th collection a deeper one) suit a
program that allocates little. A run at a large account's limits allocates for every request, row and event: at 1000
in flight it collected 1,650 times in a 40-second run, and the 14 full collections each walked everything the run
had loaded (the manifest, the ledger's index, every job's state). That was about 0.13 ms of CPU a job, of the 2 a run
may spend (regime (d) measured as the benchmark measures it, ``batchrunner.bench.measure``, twice each way,
alternated: 1.95-2.01 ms a job at the default pace, 1.83-1.85 at this one).

While a run dispatches, what its checks loaded is frozen (``gc.freeze``: never traversed again, never collected: it
lives until the run ends anyway), and collections come every ``YOUNG`` allocations. Cycles are still collected, just
in larger batches; the thresholds and the frozen objects are put back when the run ends, so a process that runs
several batches (the tests, the benchmark) ends each as it began.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

# Allocations (less deallocations) of tracked objects between two collections of the youngest generation, then how
# many of those before one of the middle generation, and of those before a full one.
YOUNG = 10_000
MIDDLE = 10
OLD = 10


class _Pace:
    """How many runs of the process are dispatching, and what the collector was before the first of them."""

    runs = 0
    before: tuple[int, int, int] = (0, 0, 0)
    froze = False


@contextlib.contextmanager
def run_pace() -> Iterator[None]:
    """Collect at the run's pace inside the block; the process's own thresholds and frozen set once the last run of
    the process (runs may overlap, as in the tests) leaves it."""
    if _Pace.runs == 0:
        _Pace.before = gc.get_threshold()
        # Frozen by the process already (its own choice): leave its frozen set as it is, and add nothing to it that
        # would never be unfrozen.
        _Pace.froze = gc.get_freeze_count() == 0
        if _Pace.froze:
            gc.freeze()
        gc.set_threshold(YOUNG, MIDDLE, OLD)
    _Pace.runs += 1
    try:
        yield
    finally:
        _Pace.runs -= 1
        if _Pace.runs == 0:
            gc.set_threshold(*_Pace.before)
            if _Pace.froze:
                gc.unfreeze()  # back to the oldest generation, collected as before


__all__ = ["MIDDLE", "OLD", "YOUNG", "run_pace"]
