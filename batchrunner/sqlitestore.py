"""The account's limits store on one machine: a SQLite database (WAL mode) under the user's state folder.

One database per account, named by a hash of the API URL and the key (never the key itself):
``$XDG_STATE_HOME/batchrunner/account-<hash>.sqlite3``, else ``~/.local/state/batchrunner/``. It holds one row, the
account's state as JSON; a transaction is ``BEGIN IMMEDIATE``, read, decide (``account.py``), write, commit, so runs on
the machine take turns in the order SQLite gives them the write lock. Nothing to start, nothing to clean up: a killed
run's state expires by the rules of ``account.py``.

Errors of ``sqlite3`` are translated here: at open, a file that is corrupt or cannot be written is ``StoreBroken``
(exit 74); in the middle of a run any failure is ``StoreLost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from batchrunner.account import AccountState, StoreBroken, StoreLost

__all__ = ["SqliteStore", "account_id", "state_dir"]

T = TypeVar("T")
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


def _parse(text: object, path: Path) -> AccountState:
    try:
        return AccountState.from_json(json.loads(str(text)))
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise StoreLost(f"the limits store {path} holds an unreadable state ({exc})") from None


class SqliteStore:
    """The account's state in one SQLite row. Open with ``SqliteStore.open``; every failure is one line."""

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
            conn.execute(
                "CREATE TABLE IF NOT EXISTS account "
                "(id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER, state TEXT)"
            )
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
                row = conn.execute("SELECT version, state FROM account WHERE id = 1").fetchone()
                state = AccountState() if row is None else _parse(row[1], self.path)
                version = 0 if row is None else int(row[0])
                result = fn(state, self._clock())
                text = json.dumps(state.to_json(), separators=(",", ":"))
                conn.execute(
                    "INSERT INTO account (id, version, state) VALUES (1, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET version = excluded.version, state = excluded.state",
                    (version + 1, text),
                )
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
