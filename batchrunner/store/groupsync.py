"""One fsync for many callers: a sync started after a caller's write serves that caller.

Downloads finish a few hundred a second at a large account's limits, each renamed into the output folder and then made
durable by a sync of the folder. A sync makes durable every rename done before it starts, so callers that arrive
while one runs wait for the next, and that one serves them all: tens of renames cost one sync, not one each, and no
caller returns before a sync that started after its own rename has ended. Blocking: for worker threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["GroupSync"]


class GroupSync:
    """Calls ``sync`` on behalf of every thread that asks: see the module's docstring."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self._sync = sync
        self._cond = threading.Condition()
        self._asked = 0  # tickets handed out, one per call
        self._done = 0  # every ticket up to this one is served by a sync that ended well
        self._running = False

    def sync(self) -> None:
        """Return once a sync that started after this call did ends; its error is raised to the caller that ran it,
        and each caller waiting on it then runs its own."""
        with self._cond:
            self._asked += 1
            ticket = self._asked
            while self._running:
                self._cond.wait()
            if self._done >= ticket:
                return
            self._running = True
            upto = self._asked  # everyone who asked so far wrote before this sync starts
        ok = False
        try:
            self._sync()
            ok = True
        finally:
            with self._cond:
                self._running = False
                if ok:
                    self._done = max(self._done, upto)
                self._cond.notify_all()
