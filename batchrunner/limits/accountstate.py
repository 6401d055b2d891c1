"""The account's state as the stores keep it: the records (leases, grants on the wire, places in line), the collections
behind them (``Times``, ``Pendings``: in memory here, in tables or sorted sets in a store), the JSON form of the first
version of the stores, what a decision answers (``Decision``, ``View``), the ``Store`` interface and its errors.

The decisions on this state are ``account.py``'s; see its docstring for the rules.
"""

from __future__ import annotations

import dataclasses
import math
from bisect import bisect_right, insort
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from batchrunner.errors import BatchrunnerError, OutputError, UsageError

T = TypeVar("T")
STATE_VERSION = 1


class StoreUnavailable(UsageError):
    """The account's limits store cannot be reached at the start of a run (exit 2: nothing was submitted)."""


class StoreBroken(OutputError):
    """The local limits store (SQLite) is corrupt or cannot be written (exit 74)."""


class StoreLost(BatchrunnerError):
    """The limits store failed in the middle of a run: the run stops submitting and finishes what is in flight."""


# --------------------------------------------------------------------------------------------------- records
@dataclass(slots=True)
class Lease:
    """One run on the key: who it is, its limits, the slots it holds, and when it last beat."""

    id: str
    label: str  # the run's output folder, for `batchrunner account`
    pid: int
    host: str  # the machine (boot and pid namespace) the run is on, "" when unknown: same-host runs check pids
    pid_start: str  # the process's start time, so a reused pid is not taken for the run
    started: float
    beat: float
    ttl: float
    hold: float
    timeout: float
    count: int
    period: float
    margin: float
    concurrency: int
    held: int = 0
    left: bool = False
    rate_limited: int = 0  # 429s the run was sent (for `batchrunner account`)

    def live(self, now: float) -> bool:
        return not self.left and now < self.beat + self.ttl

    def holds(self, now: float) -> bool:
        """Whether its slots count: while it is live, then for ``hold`` after its last beat."""
        return self.held > 0 and (self.live(now) or now < self.beat + self.hold)


@dataclass(slots=True)
class Pending:
    """A grant on the wire: taken at ``sent`` by ``lease``; surely answered (or given up) by ``deadline``."""

    lease: str
    sent: float
    deadline: float


@dataclass(slots=True)
class Waiter:
    """A place in a line: the run, and the time by which it must come back to keep it."""

    lease: str
    until: float


class Times(Protocol):
    """The answer times of recorded grants, as a sorted multiset. ``TimeList`` keeps them in memory; a store keeps
    them in a table or a sorted set, where each operation costs O(log n) (plus what it removes)."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[float]: ...

    def __getitem__(self, index: int) -> float: ...

    def add(self, t: float) -> None: ...

    def nth(self, index: int) -> float:
        """The ``index``-th oldest (negative: from the latest)."""
        ...

    def count_le(self, t: float) -> int:
        """How many are at or before ``t``."""
        ...

    def run(self, start: int, k: int) -> list[float]:
        """Up to ``k`` of them from the ``start``-th oldest on."""
        ...

    def clamp(self, now: float) -> None:
        """Pull times later than ``now`` back to ``now``."""
        ...

    def trim(self, cut: float, keep: int) -> None:
        """Drop those at or before ``cut``, and all but the latest ``keep``."""
        ...


class TimeList(list[float]):
    """``Times`` in memory: a sorted list (the tests' state, and the JSON format's)."""

    def add(self, t: float) -> None:
        if not self or t >= self[-1]:
            self.append(t)
        else:
            insort(self, t)

    def nth(self, index: int) -> float:
        return self[index]

    def count_le(self, t: float) -> int:
        return bisect_right(self, t)

    def run(self, start: int, k: int) -> list[float]:
        return list(self[max(0, start) : max(0, start) + k])

    def clamp(self, now: float) -> None:
        if self and self[-1] > now:
            self[:] = sorted(min(t, now) for t in self)

    def trim(self, cut: float, keep: int) -> None:
        drop = max(bisect_right(self, cut), len(self) - keep)
        if drop > 0:
            del self[:drop]


class Pendings(Protocol):
    """Grants on the wire by id. ``PendingMap`` keeps them in memory; a store in a table indexed by deadline and
    by run."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[str]: ...

    def add(self, grant_id: str, grant: Pending) -> None: ...

    def take(self, grant_id: str) -> Pending | None:
        """Remove and return the grant (None when unknown)."""
        ...

    def due(self, now: float, live: set[str] | None = None) -> list[tuple[str, Pending]]:
        """The grants whose deadline has come (of runs not in ``live``, when given)."""
        ...

    def of(self, lease_id: str) -> list[tuple[str, Pending]]:
        """One run's grants."""
        ...

    def clamp(self, now: float) -> None:
        """Grants sent later than ``now`` (a clock stepped back) count as sent at ``now``."""
        ...

    def items(self) -> Iterable[tuple[str, Pending]]:
        """Every grant (O(n): for the JSON format and reports, never for a decision)."""
        ...


class PendingMap(dict[str, "Pending"]):
    """``Pendings`` in memory."""

    def add(self, grant_id: str, grant: Pending) -> None:
        self[grant_id] = grant

    def take(self, grant_id: str) -> Pending | None:
        return self.pop(grant_id, None)

    def due(self, now: float, live: set[str] | None = None) -> list[tuple[str, Pending]]:
        return [(k, g) for k, g in self.items() if g.deadline <= now and (live is None or g.lease not in live)]

    def of(self, lease_id: str) -> list[tuple[str, Pending]]:
        return [(k, g) for k, g in self.items() if g.lease == lease_id]

    def clamp(self, now: float) -> None:
        for grant in self.values():
            if grant.sent > now:
                grant.deadline -= grant.sent - now
                grant.sent = now


@dataclass(slots=True)
class AccountState:
    """Everything the account's store keeps. In memory (``TimeList``, ``PendingMap``) it reads and writes the JSON
    document the first version of the stores kept whole; a store backs ``times`` and ``pending`` with its own
    indexed collections and keeps the rest (a few leases and lines) as rows."""

    times: Times = field(default_factory=TimeList)  # answer times of recorded grants, sorted
    latest: float = -math.inf  # the latest grant taken: grants go in time order
    pending: Pendings = field(default_factory=PendingMap)
    leases: dict[str, Lease] = field(default_factory=dict)
    line: list[Waiter] = field(default_factory=list)  # runs waiting for a grant, in the order they asked
    slot_line: list[Waiter] = field(default_factory=list)  # runs waiting for a slot, in the order they asked
    seq: int = 0
    horizon: float = 0.0  # the longest window any run has used: recorded times older than this are dropped
    keep: int = 1  # the largest COUNT any run has used: at most this many recorded times can matter

    def to_json(self) -> dict[str, Any]:
        return {
            "v": STATE_VERSION,
            "times": list(self.times),
            "latest": None if math.isinf(self.latest) else self.latest,
            "pending": {k: [p.lease, p.sent, p.deadline] for k, p in self.pending.items()},
            "leases": {k: lease_to_json(lease) for k, lease in self.leases.items()},
            "line": [[w.lease, w.until] for w in self.line],
            "slot_line": [[w.lease, w.until] for w in self.slot_line],
            "seq": self.seq,
            "horizon": self.horizon,
            "keep": self.keep,
        }

    @classmethod
    def from_json(cls, data: Any) -> AccountState:
        """Read what ``to_json`` wrote; raises ValueError (or KeyError, TypeError) for anything else."""
        if not isinstance(data, dict) or data.get("v") != STATE_VERSION:
            raise ValueError("not an account state of this version")
        times = TimeList(sorted(_finite(t) for t in data["times"]))
        latest = -math.inf if data["latest"] is None else _finite(data["latest"])
        pending = PendingMap(
            {str(k): Pending(str(v[0]), _finite(v[1]), _finite(v[2])) for k, v in data["pending"].items()}
        )
        leases = {str(k): lease_from_json(v) for k, v in data["leases"].items()}
        line = [Waiter(str(w[0]), _finite(w[1])) for w in data["line"]]
        slot_line = [Waiter(str(w[0]), _finite(w[1])) for w in data["slot_line"]]
        return cls(
            times=times,
            latest=latest,
            pending=pending,
            leases=leases,
            line=line,
            slot_line=slot_line,
            seq=int(data["seq"]),
            horizon=_finite(data["horizon"]),
            keep=int(data["keep"]),
        )


_LEASE_FIELDS = [field.name for field in dataclasses.fields(Lease)]


def lease_to_json(lease: Lease) -> dict[str, Any]:
    return {name: getattr(lease, name) for name in _LEASE_FIELDS}


def lease_from_json(data: Any) -> Lease:
    if not isinstance(data, dict):
        raise ValueError("a lease is not an object")
    lease = Lease(
        id=str(data["id"]),
        label=str(data["label"]),
        pid=int(data["pid"]),
        host=str(data["host"]),
        pid_start=str(data["pid_start"]),
        started=_finite(data["started"]),
        beat=_finite(data["beat"]),
        ttl=_finite(data["ttl"]),
        hold=_finite(data["hold"]),
        timeout=_finite(data["timeout"]),
        count=int(data["count"]),
        period=_finite(data["period"]),
        margin=_finite(data["margin"]),
        concurrency=int(data["concurrency"]),
        held=max(0, int(data["held"])),
        left=bool(data["left"]),
        rate_limited=int(data.get("rate_limited", 0)),
    )
    if lease.count < 1 or lease.period <= 0 or lease.concurrency < 1:
        raise ValueError("a lease has limits that are not limits")
    return lease


def _finite(value: Any) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError("a time that is not a finite number")
    return number


@dataclass(frozen=True, slots=True)
class AccountLimits:
    """The account's limits now: the strictest of each part among the live runs."""

    count: int
    period: float
    margin: float
    concurrency: int

    @property
    def window(self) -> float:
        return self.period + self.margin


@dataclass(frozen=True, slots=True)
class Decision:
    """What a request for a grant and/or a slot gets: taken, or how long to wait and why."""

    granted: bool
    wait: float = 0.0
    why: str = "granted"  # "granted", "window" (full), "turn" (runs ahead of it), "slots"
    grant_id: str | None = None
    more: tuple[str, ...] = ()  # grants taken ahead with it (the run's stock), when ``extra`` asked for them
    more_slots: int = 0  # slots taken ahead with it


@dataclass(frozen=True, slots=True)
class View:
    """What one run sees of the account at ``now``: enough for its planning between transactions.

    Of the recorded grants it carries only the few that decide the next grants (``times``, the ``first``-th oldest
    on) and how many there are, so a view costs the same whatever the window holds."""

    now: float
    limits: AccountLimits
    times: tuple[float, ...]  # recorded grants from the ``first``-th oldest on: those the next grants wait for
    first: int
    recorded: int  # recorded grants kept (the ``times`` above are among them)
    in_window: int  # recorded grants inside the window at ``now``
    latest: float
    pending: int  # grants on the wire, every run's
    held: int  # slots held on the account, every run's (gone runs' included while they count)
    own_held: int
    slots_ahead: int  # runs ahead of this one in the slot line
    runs: int  # live runs
    slot_line: int = 0  # runs in the slot line, this one included

    def used(self) -> int:
        """Grants inside the window at ``now``, pending ones included (at most COUNT)."""
        return min(self.limits.count, self.in_window + self.pending)

    def free(self) -> int:
        """Slots this run may take now: free ones, less one for each run waiting ahead of it."""
        return max(0, self.limits.concurrency - self.held - self.slots_ahead)

    def share(self) -> int:
        """A run's share of the slots: the concurrency over the live runs (what a run keeps of the slots it frees, and
        below which it watches for slots the others free)."""
        return self.limits.concurrency // max(1, self.runs)

    def nth(self, index: int) -> float:
        """The ``index``-th oldest recorded grant as far as the view knows: one it does not carry is at most ``now``
        (so a plan on the view is never early)."""
        offset = index - self.first
        if 0 <= offset < len(self.times):
            return self.times[offset]
        return self.now


class Store(Protocol):
    """Where the account's state lives. ``transact`` runs ``fn(state, now)`` atomically and saves what it changed;
    ``now`` is the store's clock. Raises StoreLost when the store fails (StoreBroken for a local file)."""

    description: str

    async def transact(self, fn: Callable[[AccountState, float], T]) -> T: ...

    async def close(self) -> None: ...
