"""The account's limits store on one machine: a SQLite database (WAL mode) under the user's state folder.

One database per account, named by a hash of the API URL and the key (never the key itself):
``$XDG_STATE_HOME/batchrunner/account-<hash>.sqlite3``, else ``~/.local/state/batchrunner/``. A transaction is
``BEGIN IMMEDIATE``, decide (``account.py``), commit, so runs on the machine take turns in the order SQLite gives them
the write lock. Nothing to start, nothing to clean up: a killed run's state expires by the rules of ``account.py``.

The state is in tables, and a transaction reads and writes only the rows its decision needs, so a grant costs
O(log n) whatever the window holds:

- ``grants (t)``, indexed by time: the answer times of recorded grants. A decision reads the one or two that decide
  the next grant (an index seek), an answer inserts one, the trim deletes those that left every window.
- ``pending (id, lease, sent, deadline)``, indexed by deadline and by run: grants on the wire.
- ``leases (id, data)``: one row per run (a few); only a lease that changed is written.
- ``turns (line, pos, lease, until)``: the two lines (grants, slots), rewritten only when they change.
- ``account`` (one row): the small counters (latest grant, sequence, horizon, how many grants and pending ones).

A database written by the first version of the store (the whole state as one JSON document in ``account``) is read
once and carried over to the tables, with one log line; one that does not parse is ``StoreBroken``.

Errors of ``sqlite3`` are translated here: at open, a file that is corrupt or cannot be written is ``StoreBroken``
(exit 74); in the middle of a run any failure is ``StoreLost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from batchrunner.limits.account import (
    AccountState,
    Pending,
    StoreBroken,
    StoreLost,
    Waiter,
    lease_from_json,
    lease_to_json,
)

__all__ = ["SqliteStore", "account_id", "state_dir"]

log = logging.getLogger("batchrunner")

T = TypeVar("T")
# The ``account`` row's format: 1 was the whole state as JSON; 2 the counters beside the tables.
FORMAT = 2
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS account (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER, state TEXT)",
    "CREATE TABLE IF NOT EXISTS grants (t REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS grants_t ON grants (t)",
    "CREATE TABLE IF NOT EXISTS pending (id TEXT PRIMARY KEY, lease TEXT NOT NULL, sent REAL NOT NULL, "
    "deadline REAL NOT NULL) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS pending_deadline ON pending (deadline)",
    "CREATE INDEX IF NOT EXISTS pending_lease ON pending (lease)",
    "CREATE TABLE IF NOT EXISTS leases (id TEXT PRIMARY KEY, data TEXT NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS turns (line INTEGER, pos INTEGER, lease TEXT NOT NULL, until REAL NOT NULL, "
    "PRIMARY KEY (line, pos)) WITHOUT ROWID",
)
# Seconds a transaction waits for another run's write lock before the store counts as failed.
BUSY_TIMEOUT = 5.0


def account_id(api_url: str, api_key: str) -> str:
    """A name for the account: the key at its API, hashed; the key cannot be read back from it."""
    digest = hashlib.sha256(f"batchrunner-account\0{api_url.rstrip('/')}\0{api_key}".encode()).hexdigest()
    return digest[:32]


def state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_STATE_HOME/batchrunner``, else ``~/.local/state/batchrunner`` (a relative XDG path is ignored, as the
    specification says)."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_STATE_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".local" / "state"
    return root / "batchrunner"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


class _Busy(Exception):
    """Another run holds the database's write lock."""


def _locked(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


class _Times:
    """``account.Times`` over the ``grants`` table, inside one transaction; ``n`` is kept in the counters."""

    def __init__(self, conn: sqlite3.Connection, n: int) -> None:
        self._c = conn
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[float]:
        return iter([row[0] for row in self._c.execute("SELECT t FROM grants ORDER BY t")])

    def __getitem__(self, index: int) -> float:
        return self.nth(index)

    def add(self, t: float) -> None:
        self._c.execute("INSERT INTO grants (t) VALUES (?)", (t,))
        self.n += 1

    def nth(self, index: int) -> float:
        if index < 0:
            index += self.n
        if not 0 <= index < self.n:
            raise IndexError(index)
        # An index walk of at most half the table; the decisions ask for those near an end (the latest, or the one
        # COUNT - pending from the latest, which is near the oldest once trimmed to the window).
        if index <= self.n // 2:
            row = self._c.execute("SELECT t FROM grants ORDER BY t LIMIT 1 OFFSET ?", (index,)).fetchone()
        else:
            back = self.n - 1 - index
            row = self._c.execute("SELECT t FROM grants ORDER BY t DESC LIMIT 1 OFFSET ?", (back,)).fetchone()
        if row is None:
            raise StoreLost("the limits store's count of grants disagrees with its table")
        return float(row[0])

    def count_le(self, t: float) -> int:
        return int(self._c.execute("SELECT count(*) FROM grants WHERE t <= ?", (t,)).fetchone()[0])

    def run(self, start: int, k: int) -> list[float]:
        rows = self._c.execute("SELECT t FROM grants ORDER BY t LIMIT ? OFFSET ?", (k, max(0, start)))
        return [float(row[0]) for row in rows]

    def clamp(self, now: float) -> None:
        self._c.execute("UPDATE grants SET t = ? WHERE t > ?", (now, now))

    def trim(self, cut: float, keep: int) -> None:
        if self.n == 0:
            return
        self.n -= self._c.execute("DELETE FROM grants WHERE t <= ?", (cut,)).rowcount
        if self.n > keep:
            self._c.execute(
                "DELETE FROM grants WHERE rowid IN (SELECT rowid FROM grants ORDER BY t LIMIT ?)", (self.n - keep,)
            )
            self.n = keep


class _Pending:
    """``account.Pendings`` over the ``pending`` table, inside one transaction."""

    def __init__(self, conn: sqlite3.Connection, n: int) -> None:
        self._c = conn
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[str]:
        return iter([str(row[0]) for row in self._c.execute("SELECT id FROM pending ORDER BY id")])

    def add(self, grant_id: str, grant: Pending) -> None:
        self._c.execute(
            "INSERT INTO pending (id, lease, sent, deadline) VALUES (?, ?, ?, ?)",
            (grant_id, grant.lease, grant.sent, grant.deadline),
        )
        self.n += 1

    def take(self, grant_id: str) -> Pending | None:
        row = self._c.execute(
            "DELETE FROM pending WHERE id = ? RETURNING lease, sent, deadline", (grant_id,)
        ).fetchone()
        if row is None:
            return None
        self.n -= 1
        return Pending(str(row[0]), float(row[1]), float(row[2]))

    def _select(self, where: str, args: tuple[Any, ...]) -> list[tuple[str, Pending]]:
        rows = self._c.execute(f"SELECT id, lease, sent, deadline FROM pending WHERE {where}", args).fetchall()
        return [(str(r[0]), Pending(str(r[1]), float(r[2]), float(r[3]))) for r in rows]

    def due(self, now: float, live: set[str] | None = None) -> list[tuple[str, Pending]]:
        if not live:
            return self._select("deadline <= ?", (now,))
        marks = ",".join("?" * len(live))
        return self._select(f"deadline <= ? AND lease NOT IN ({marks})", (now, *sorted(live)))

    def of(self, lease_id: str) -> list[tuple[str, Pending]]:
        return self._select("lease = ?", (lease_id,))

    def clamp(self, now: float) -> None:
        self._c.execute("UPDATE pending SET deadline = deadline - (sent - ?), sent = ? WHERE sent > ?", (now, now, now))

    def items(self) -> list[tuple[str, Pending]]:
        return self._select("1", ())


def _finite(value: Any) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError("a counter that is not a finite number")
    return number


class _Loaded:
    """One transaction's state: the tables behind ``times`` and ``pending``, the few leases and waiters read whole,
    and what they were, so that only what changed is written back."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.conn = conn
        row = conn.execute("SELECT state FROM account WHERE id = 1").fetchone()
        meta: dict[str, Any] = {}
        self.fresh = row is None
        self.migrated: AccountState | None = None
        if row is not None:
            try:
                data = json.loads(str(row[0]))
                if isinstance(data, dict) and data.get("v") == 1:
                    self.migrated = AccountState.from_json(data)
                elif not isinstance(data, dict) or data.get("v") != FORMAT:
                    raise ValueError("not an account state of a known version")
                else:
                    meta = data
                leases = {
                    str(r[0]): lease_from_json(json.loads(str(r[1])))
                    for r in conn.execute("SELECT id, data FROM leases")
                }
                lines: list[list[Waiter]] = [[], []]
                for r in conn.execute("SELECT line, lease, until FROM turns ORDER BY line, pos"):
                    lines[int(r[0]) % 2].append(Waiter(str(r[1]), _finite(r[2])))
                state = AccountState(
                    times=_Times(conn, int(meta.get("n", 0))),
                    latest=-math.inf if meta.get("latest") is None else _finite(meta["latest"]),
                    pending=_Pending(conn, int(meta.get("np", 0))),
                    leases=leases,
                    line=lines[0],
                    slot_line=lines[1],
                    seq=int(meta.get("seq", 0)),
                    horizon=_finite(meta.get("horizon", 0.0)),
                    keep=int(meta.get("keep", 1)),
                )
            except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
                raise StoreLost(f"the limits store {path} holds an unreadable state ({exc})") from None
        else:
            state = AccountState(times=_Times(conn, 0), pending=_Pending(conn, 0))
        if self.migrated is not None:
            state = self._carry_over(self.migrated)
        self.state = state
        # What the tables hold: after a carry-over, nothing yet.
        self.leases_were = {} if self.migrated else {k: lease_to_json(v) for k, v in state.leases.items()}
        self.lines_were = [] if self.migrated else self._lines()
        self.meta_were = self._meta()

    def _carry_over(self, old: AccountState) -> AccountState:
        """The first version's whole-state document, into the tables (which it never had)."""
        conn = self.conn
        for table in ("grants", "pending", "leases", "turns"):
            conn.execute(f"DELETE FROM {table}")
        times, pending = _Times(conn, 0), _Pending(conn, 0)
        conn.executemany("INSERT INTO grants (t) VALUES (?)", [(t,) for t in old.times])
        times.n = len(old.times)
        for grant_id, grant in old.pending.items():
            pending.add(grant_id, grant)
        return AccountState(
            times=times,
            latest=old.latest,
            pending=pending,
            leases=old.leases,
            line=old.line,
            slot_line=old.slot_line,
            seq=old.seq,
            horizon=old.horizon,
            keep=old.keep,
        )

    def _lines(self) -> list[tuple[int, str, float]]:
        s = self.state
        return [(0, w.lease, w.until) for w in s.line] + [(1, w.lease, w.until) for w in s.slot_line]

    def _meta(self) -> dict[str, Any]:
        s = self.state
        return {
            "v": FORMAT,
            "latest": None if math.isinf(s.latest) else s.latest,
            "seq": s.seq,
            "horizon": s.horizon,
            "keep": s.keep,
            "n": len(s.times),
            "np": len(s.pending),
        }

    def save(self) -> None:
        conn, state = self.conn, self.state
        if not isinstance(state.times, _Times) or not isinstance(state.pending, _Pending):
            raise TypeError("a transaction replaced the store's collections")
        meta = self._meta()
        if meta != self.meta_were or self.migrated is not None or self.fresh:
            conn.execute(
                "INSERT INTO account (id, version, state) VALUES (1, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET version = excluded.version, state = excluded.state",
                (FORMAT, json.dumps(meta, separators=(",", ":"))),
            )
        for lease_id in self.leases_were.keys() - state.leases.keys():
            conn.execute("DELETE FROM leases WHERE id = ?", (lease_id,))
        for lease_id, lease in state.leases.items():
            data = lease_to_json(lease)
            if self.leases_were.get(lease_id) != data:
                conn.execute(
                    "INSERT OR REPLACE INTO leases (id, data) VALUES (?, ?)",
                    (lease_id, json.dumps(data, separators=(",", ":"))),
                )
        lines = self._lines()
        if lines != self.lines_were:
            conn.execute("DELETE FROM turns")
            conn.executemany(
                "INSERT INTO turns (line, pos, lease, until) VALUES (?, ?, ?, ?)",
                [(line, pos, lease, until) for pos, (line, lease, until) in enumerate(lines)],
            )


class SqliteStore:
    """The account's state in SQLite tables. Open with ``SqliteStore.open``; every failure is one line."""

    def __init__(self, path: Path, conn: sqlite3.Connection, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.description = f"SQLite {path}"
        self._conn = conn
        self._clock = clock

    @classmethod
    def open(cls, path: Path, *, clock: Callable[[], float] = time.time) -> SqliteStore:
        """Open (creating it, and its folder, private to the user) and check the database; StoreBroken if it cannot
        be used."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            os.close(fd)
            # No busy timeout of SQLite's own: its handler sleeps 1, 2, 5, 10 ... 100 ms between tries, far longer
            # than the sub-millisecond transactions it waits for; ``transact`` retries on the event loop instead.
            conn = sqlite3.connect(path, timeout=0.0, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise StoreBroken(f"cannot open the limits store {path}: {_describe(exc)}") from None
        store = cls(path, conn, clock=clock)
        try:
            # Runs starting together meet here: the set-up waits on SQLite's own busy handler (it is done once).
            conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()
            if mode is None or str(mode[0]).lower() != "wal":
                raise sqlite3.OperationalError("cannot switch to WAL mode")
            conn.execute("PRAGMA synchronous=NORMAL")
            for statement in _SCHEMA:
                conn.execute(statement)
            store._blocking(lambda state, now: None)  # a write: an unwritable or corrupt file fails here
            conn.execute("PRAGMA busy_timeout=0")
        except (sqlite3.Error, StoreLost) as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
            reason = str(exc) if isinstance(exc, StoreLost) else _describe(exc)
            raise StoreBroken(f"the limits store {path} is unusable: {reason}") from None
        return store

    def _blocking(self, fn: Callable[[AccountState, float], T]) -> T:
        """``_run`` until it gets the write lock, sleeping between tries (for the open, before any loop runs)."""
        deadline = time.monotonic() + BUSY_TIMEOUT
        pause = 0.0002
        while True:
            try:
                return self._run(fn)
            except _Busy:
                if time.monotonic() > deadline:
                    raise StoreLost(f"the limits store {self.path} stayed locked for {BUSY_TIMEOUT:g}s") from None
                time.sleep(pause)
                pause = min(pause * 2, 0.005)

    def _run(self, fn: Callable[[AccountState, float], T]) -> T:
        conn = self._conn
        try:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if _locked(exc):
                    raise _Busy from None
                raise
            try:
                loaded = _Loaded(conn, self.path)
                if loaded.migrated is not None:
                    log.warning(
                        "the limits store %s was written by an earlier version of batchrunner: its state is carried "
                        "over to this version's tables",
                        self.path,
                    )
                result = fn(loaded.state, self._clock())
                loaded.save()
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreLost(f"the limits store {self.path} failed: {_describe(exc)}") from None
        return result

    async def transact(self, fn: Callable[[AccountState, float], T]) -> T:
        # A transaction takes well under a millisecond; run on the loop, it needs no thread hop and keeps order. While
        # another run holds the write lock, wait on the loop a fraction of a millisecond, then a few, and try again.
        deadline = time.monotonic() + BUSY_TIMEOUT
        pause = 0.0002
        while True:
            try:
                return self._run(fn)
            except _Busy:
                if time.monotonic() > deadline:
                    raise StoreLost(f"the limits store {self.path} stayed locked for {BUSY_TIMEOUT:g}s") from None
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.005)

    async def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._conn.close()
