"""The account's limits store across machines: one Redis server (``--limits-store redis://HOST:PORT/DB``).

The state is kept as the moving-window pattern of the ``limits`` library has it, under ``batchrunner:account:<hash>``
(the hash of the API URL and key, as for SQLite):

- ``…:times``, a sorted set: the answer times of recorded grants (score the time, member unique). The trim of what
  left every window (``ZREMRANGEBYSCORE``, then ``ZREMRANGEBYRANK`` down to the largest COUNT), the count of those
  inside the window (``ZCOUNT``) and the few that decide the next grants (``ZRANGE`` by rank) are one Lua script;
  an answer is one ``ZADD``. Each costs O(log n) whatever the window holds.
- ``…:pending``, a hash of the grants on the wire, and ``…:deadlines``, a sorted set of them by deadline: only those
  past their deadline are read (a gone run's are answered then).
- ``…:meta``: the small rest as JSON (the runs' leases, with the slots each holds and when it last beat, so a slot
  held by a run whose lease lapsed expires with it; the two lines; the counters), and ``…:version``.

A transaction is two scripts, run with the blocking client in a thread of the store's own, one transaction at a time:
the event loop only waits for it. ``READ`` trims, reads what a decision needs and the server's ``TIME``; the decision is
``account.py``'s, on a state whose collections answer from what was read (and ask for a wider read, rarely: limits
changed since the run last looked); ``WRITE`` applies what the decision changed, only if the version is still the one
read, and otherwise the run decides again. The decisions are the same functions the SQLite store runs, so the two stores
cannot drift apart, and every time is the Redis server's clock, so machines whose clocks disagree still share one
window. A decision made at the read's time is still right at the write's: time only empties windows and frees nothing,
and the version check rules out another change. The trim in ``READ`` drops only times no decision can need.

A key written by the first version of this store (the whole state as one JSON value, ``…`` itself) is carried over
to this layout, with one log line; one that does not parse is replaced, with one log line.

Errors of the ``redis`` package are translated here: ``StoreUnavailable`` (exit 2) when the server cannot be reached at
the start, ``StoreLost`` after.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import math
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import redis
from redis.exceptions import RedisError

from batchrunner.limits.account import (
    VIEW_TIMES,
    AccountState,
    Pending,
    StoreLost,
    StoreUnavailable,
    Waiter,
    account_limits,
    lease_from_json,
    lease_to_json,
)

__all__ = ["RedisStore"]

log = logging.getLogger("batchrunner")

T = TypeVar("T")
# A state no run has touched for this long is dropped by Redis (every run's lease is long gone by then).
KEY_TTL = 7 * 86400
# Lost races in a row before a transaction gives up (each loss means another run's write went through).
MAX_RACES = 200
CONNECT_TIMEOUT = 3.0
OP_TIMEOUT = 5.0
FORMAT = 2
# Times read beyond those the view carries: the runs ahead in line (each reads one more).
SLACK = 16

# KEYS: old, meta, version, times, pending, deadlines, trim (the horizon and keep).
# ARGV: count, window, first_extra, lo, hi, all_pending, now ('': the server's TIME).
# Trims and clamps (by the stored horizon and keep), then returns what a decision reads.
_READ = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if ARGV[7] ~= '' then now = tonumber(ARGV[7]) end
local old = redis.call('GET', KEYS[1]) or ''
local meta = redis.call('GET', KEYS[2]) or ''
local version = redis.call('GET', KEYS[3]) or '0'
local horizon = tonumber(redis.call('HGET', KEYS[7], 'horizon') or '-1')
local keep = tonumber(redis.call('HGET', KEYS[7], 'keep') or '-1')
local late = redis.call('ZRANGEBYSCORE', KEYS[4], '(' .. now, '+inf')
for i, m in ipairs(late) do
  redis.call('ZADD', KEYS[4], now, m)
end
if horizon >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - horizon)
end
local n = redis.call('ZCARD', KEYS[4])
if keep >= 0 and n > keep then
  redis.call('ZREMRANGEBYRANK', KEYS[4], 0, n - keep - 1)
  n = keep
end
local np = redis.call('HLEN', KEYS[5])
local lo, hi
if ARGV[4] ~= '' then
  lo, hi = tonumber(ARGV[4]), tonumber(ARGV[5])
else
  lo = math.max(0, n - tonumber(ARGV[1]) + np)
  hi = lo + tonumber(ARGV[3])
end
local slice = {}
if lo < n then slice = redis.call('ZRANGE', KEYS[4], lo, hi - 1, 'WITHSCORES') end
local last = redis.call('ZRANGE', KEYS[4], -1, -1, 'WITHSCORES')
local cut = now - tonumber(ARGV[2])
local below = redis.call('ZCOUNT', KEYS[4], '-inf', cut)
local pend = {}
if ARGV[6] == '1' then
  pend = redis.call('HGETALL', KEYS[5])
else
  local due = redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', now)
  for i, id in ipairs(due) do
    pend[#pend + 1] = id
    pend[#pend + 1] = redis.call('HGET', KEYS[5], id) or ''
  end
end
return {t[1], t[2], old, meta, version, n, np, lo, slice, last, tostring(cut), below, pend}
"""

# KEYS: as READ. ARGV: version, meta, ttl, horizon, keep, then ops: 'a' t m | 'p' id value deadline | 'd' id | 'c' now.
_WRITE = """
local version = redis.call('GET', KEYS[3]) or '0'
if version ~= ARGV[1] then return 0 end
local i = 6
while i <= #ARGV do
  local op = ARGV[i]
  if op == 'a' then
    redis.call('ZADD', KEYS[4], ARGV[i + 1], ARGV[i + 2]); i = i + 3
  elseif op == 'p' then
    redis.call('HSET', KEYS[5], ARGV[i + 1], ARGV[i + 2])
    redis.call('ZADD', KEYS[6], ARGV[i + 3], ARGV[i + 1]); i = i + 4
  elseif op == 'd' then
    redis.call('HDEL', KEYS[5], ARGV[i + 1]); redis.call('ZREM', KEYS[6], ARGV[i + 1]); i = i + 2
  elseif op == 'x' then
    redis.call('DEL', KEYS[1], KEYS[4], KEYS[5], KEYS[6], KEYS[7]); i = i + 1
  else
    return redis.error_reply('unknown op ' .. op)
  end
end
local ttl = ARGV[3]
redis.call('SET', KEYS[2], ARGV[2], 'EX', ttl)
redis.call('SET', KEYS[3], tostring(tonumber(version) + 1), 'EX', ttl)
redis.call('HSET', KEYS[7], 'horizon', ARGV[4], 'keep', ARGV[5])
for k = 4, 7 do redis.call('EXPIRE', KEYS[k], ttl) end
return 1
"""


def _redact_url(url: str) -> str:
    """The URL without a password (``redis://:secret@host`` must not reach a log line)."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return f"{scheme}{sep}{rest}"


class _Wider(Exception):
    """A decision read past what was read: read again, wider (``lo``/``hi`` of the times, every pending grant)."""

    def __init__(self, lo: int | None = None, hi: int | None = None, *, pending: bool = False) -> None:
        super().__init__()
        self.lo, self.hi, self.pending = lo, hi, pending

    def union(self, other: _Wider) -> _Wider:
        """What both reads would have read: a wider read never undoes an earlier one."""
        los = [x for x in (self.lo, other.lo) if x is not None]
        his = [x for x in (self.hi, other.hi) if x is not None]
        return _Wider(min(los, default=None), max(his, default=None), pending=self.pending or other.pending)


def _f(raw: Any) -> float:
    return float(raw.decode() if isinstance(raw, bytes) else raw)


def _s(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class _Times:
    """``account.Times`` over the sorted set: ``n`` of them, ranks ``lo``.. read; adds logged for the write."""

    def __init__(self, n: int, lo: int, slice_: list[float], last: float | None, cut: float, below: int) -> None:
        self.n, self.lo, self.part = n, lo, slice_
        self.last, self.cut, self.below = last, cut, below
        self.whole = lo == 0 and len(slice_) == n  # the read holds every one
        self.ops: list[float] = []

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[float]:
        if not self.whole:
            raise _Wider(0, self.n)
        return iter(list(self.part))

    def __getitem__(self, index: int) -> float:
        return self.nth(index)

    def add(self, t: float) -> None:
        self.ops.append(t)
        part = self.part
        reaches_end = self.lo + len(part) >= self.n
        if self.whole or (part and part[0] <= t and (t <= part[-1] or reaches_end)) or (not part and reaches_end):
            bisect.insort(part, t)  # inside the ranks read (or just past the last, when they reach the end)
        elif part and t < part[0]:
            self.lo += 1  # before them: they move one rank up
        self.n += 1
        self.last = t if self.last is None else max(self.last, t)
        if t <= self.cut:
            self.below += 1

    def nth(self, index: int) -> float:
        if index < 0:
            index += self.n
        if not 0 <= index < self.n:
            raise IndexError(index)
        if index == self.n - 1 and self.last is not None:
            return self.last
        offset = index - self.lo
        if 0 <= offset < len(self.part):
            return self.part[offset]
        raise _Wider(max(0, index - 4), index + SLACK)

    def count_le(self, t: float) -> int:
        if abs(t - self.cut) < 1e-9:
            return self.below
        if self.whole:
            return bisect.bisect_right(self.part, t)
        raise _Wider(0, self.n)

    def run(self, start: int, k: int) -> list[float]:
        start = max(0, start)
        end = min(self.n, start + k)
        if start >= end:
            return []
        if self.lo <= start and end <= self.lo + len(self.part):
            return self.part[start - self.lo : end - self.lo]
        raise _Wider(start, start + k)

    def clamp(self, now: float) -> None:
        """Done by ``READ`` at the server's now."""

    def trim(self, cut: float, keep: int) -> None:
        """Done by ``READ`` with the stored horizon and keep (which only grow); ``WRITE`` stores the new ones."""


class _Pending:
    """``account.Pendings`` over the hash: those past their deadline were read (or all); changes logged."""

    def __init__(self, n: int, read: dict[str, Pending], whole: bool, known: dict[str, Pending] | None = None) -> None:
        self.n, self.read, self.whole = n, read, whole
        self.known = dict(known or {})  # the run's own grants, as it put them on the wire
        self.ops: list[tuple[str, str, Pending | None]] = []

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[str]:
        if not self.whole:
            raise _Wider(pending=True)
        return iter(list(self.read))

    def add(self, grant_id: str, grant: Pending) -> None:
        self.read[grant_id] = grant
        self.ops.append(("p", grant_id, grant))
        self.n += 1

    def take(self, grant_id: str) -> Pending | None:
        grant = self.read.pop(grant_id, None)
        known = self.known.pop(grant_id, None)
        grant = grant or known
        if grant is None and not self.whole:
            raise _Wider(pending=True)  # not the run's own, nor read: read them all (a rare path)
        if grant is not None:
            self.ops.append(("d", grant_id, None))
            self.n -= 1
        return grant

    def due(self, now: float, live: set[str] | None = None) -> list[tuple[str, Pending]]:
        return [(k, g) for k, g in self.read.items() if g.deadline <= now and (live is None or g.lease not in live)]

    def of(self, lease_id: str) -> list[tuple[str, Pending]]:
        if not self.whole:
            raise _Wider(pending=True)
        return [(k, g) for k, g in self.read.items() if g.lease == lease_id]

    def clamp(self, now: float) -> None:
        for grant_id, grant in list(self.read.items()):
            if grant.sent > now:
                self.take(grant_id)
                self.add(grant_id, Pending(grant.lease, now, grant.deadline - (grant.sent - now)))

    def items(self) -> list[tuple[str, Pending]]:
        if not self.whole:
            raise _Wider(pending=True)
        return list(self.read.items())


class RedisStore:
    """The account's state on a Redis server; open with ``await RedisStore.open(url, account)``."""

    def __init__(
        self, client: redis.Redis, url: str, account: str, *, clock: Callable[[], float] | None = None
    ) -> None:
        self._client = client
        self._clock = clock  # the server's TIME unless given (tests)
        self.url = _redact_url(url)
        self.description = f"Redis {self.url}"
        base = f"batchrunner:account:{account}"
        names = ("meta", "version", "times", "pending", "deadlines", "trim")
        self._keys = [base, *(f"{base}:{name}" for name in names)]
        self._read = client.register_script(_READ)
        self._write = client.register_script(_WRITE)
        self._count, self._window = 1, 0.0  # the account's limits as last seen: what a read fetches around
        self._seq = 0  # members of the times set: this store's token and a count, unique whatever the time
        self._token = uuid.uuid4().hex[:12]
        # The grants this store put on the wire and has not seen taken: a settle needs no read of the others.
        self._mine: dict[str, Pending] = {}
        # Every transaction of the run, whole (read, decision, write), in this one thread: a busy event loop does not
        # stretch the time between the read and the write (another run's write in between makes the write lose and
        # the decision start again), and the run's own transactions never race each other.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="redis-store")
        self._closed = False

    @classmethod
    async def open(cls, url: str, account: str, *, clock: Callable[[], float] | None = None) -> RedisStore:
        """Connect and check the server answers; StoreUnavailable (one line) when it does not."""
        try:
            client = redis.Redis.from_url(
                url, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=OP_TIMEOUT, decode_responses=False
            )
        except (ValueError, RedisError) as exc:
            raise StoreUnavailable(f"--limits-store {_redact_url(url)}: {exc}") from None
        store = cls(client, url, account, clock=clock)
        try:
            await store._in_thread(client.ping)
            await store.transact(lambda state, now: None)
        except (RedisError, OSError, StoreLost) as exc:
            await store.close()
            raise StoreUnavailable(f"cannot reach the limits store {store.url}: {_reason(exc)}") from None
        return store

    async def _in_thread(self, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, call)

    def _script(self, script: Any, args: list[Any]) -> Any:
        try:
            return script(keys=self._keys, args=args)
        except (RedisError, OSError) as exc:
            raise StoreLost(f"the limits store {self.url} failed: {_reason(exc)}") from None

    def _load(self, wider: _Wider | None) -> tuple[AccountState, str, float, bool]:
        """One ``READ``: the state a decision runs on, the version, the server's now, and whether the key is of the
        first version (to be carried over by the write)."""
        lo = "" if wider is None or wider.lo is None else str(wider.lo)
        hi = "" if wider is None or wider.hi is None else str(wider.hi)
        whole_pending = wider is not None and wider.pending
        given = self._clock() if self._clock is not None else None
        window = self._window
        args = [self._count, repr(window), VIEW_TIMES + SLACK, lo, hi, "1" if whole_pending else "0"]
        reply = self._script(self._read, [*args, "" if given is None else repr(given)])
        sec, usec, old, meta, version, n, np_, first, part, last, _, below, pend = reply
        # The script's own now and cut, to the bit: the same double operations on the same numbers.
        now = int(sec) + int(usec) / 1e6 if given is None else given
        try:
            if old:
                return self._carried_over(_s(old)), _s(version), now, True
            times = _Times(
                int(n),
                int(first),
                [_f(v) for v in part[1::2]],
                _f(last[1]) if last else None,
                now - window,
                int(below),
            )
            read: dict[str, Pending] = {}
            for grant_id, value in zip(pend[0::2], pend[1::2], strict=True):
                if value:
                    lease, sent, deadline = _s(value).split(",")
                    read[_s(grant_id)] = Pending(lease, _finite(sent), _finite(deadline))
            state = _from_meta(_s(meta)) if meta else AccountState()
            state.times = times
            state.pending = _Pending(int(np_), read, whole_pending or int(np_) == len(read), self._mine)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise StoreLost(f"the limits store {self.url} holds an unreadable state ({exc})") from None
        return state, _s(version), now, False

    def _carried_over(self, raw: str) -> AccountState:
        """The first version's whole-state value: read into memory (written to this layout by the write that
        follows), or, when it does not parse, nothing."""
        try:
            old = AccountState.from_json(json.loads(raw))
            log.warning(
                "the limits store %s holds a state written by an earlier version of batchrunner: it is carried over "
                "to this version's layout",
                self.url,
            )
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            log.warning(
                "the limits store %s holds an unreadable state of an earlier version (%s): replaced", self.url, exc
            )
            old = AccountState()
        times = _Times(0, 0, [], None, math.inf, 0)
        times.whole = True
        pending = _Pending(0, {}, True)
        for t in old.times:
            times.add(t)
        for grant_id, grant in old.pending.items():
            pending.add(grant_id, grant)
        old.times, old.pending = times, pending
        return old

    def _ops(self, state: AccountState, carry: bool) -> list[Any]:
        assert isinstance(state.times, _Times) and isinstance(state.pending, _Pending)
        args: list[Any] = ["x"] if carry else []
        for t in state.times.ops:
            self._seq += 1
            args += ["a", repr(t), f"{self._token}:{self._seq}"]
        for kind, grant_id, grant in state.pending.ops:
            if kind == "p" and grant is not None:
                args += ["p", grant_id, f"{grant.lease},{grant.sent!r},{grant.deadline!r}", repr(grant.deadline)]
            else:
                args += ["d", grant_id]
        return args

    async def transact(self, fn: Callable[[AccountState, float], T]) -> T:
        return await self._in_thread(lambda: self._transact(fn))

    def _transact(self, fn: Callable[[AccountState, float], T]) -> T:
        wider: _Wider | None = None
        for _ in range(MAX_RACES):
            state, version, now, carry = self._load(wider)
            try:
                result = fn(state, now)
            except _Wider as exc:
                wider = exc if wider is None else wider.union(exc)
                continue
            limits = account_limits(state, now)
            if limits is not None:
                self._count, self._window = limits.count, limits.window
            meta = json.dumps(_to_meta(state), separators=(",", ":"))
            args = [version, meta, KEY_TTL, repr(state.horizon), state.keep, *self._ops(state, carry)]
            if int(self._script(self._write, args)):
                for kind, grant_id, grant in state.pending.ops:  # type: ignore[attr-defined]
                    if kind == "p" and grant is not None:
                        self._mine[grant_id] = grant
                    else:
                        self._mine.pop(grant_id, None)
                return result
            wider = None
        raise StoreLost(f"the limits store {self.url}: {MAX_RACES} writes in a row lost to other runs")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(RedisError, OSError):
            await self._in_thread(self._client.close)
        self._thread.shutdown(wait=False)


def _finite(value: Any) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError("a time that is not a finite number")
    return number


def _to_meta(state: AccountState) -> dict[str, Any]:
    return {
        "v": FORMAT,
        "latest": None if math.isinf(state.latest) else state.latest,
        "leases": {k: lease_to_json(lease) for k, lease in state.leases.items()},
        "line": [[w.lease, w.until] for w in state.line],
        "slot_line": [[w.lease, w.until] for w in state.slot_line],
        "seq": state.seq,
        "horizon": state.horizon,
        "keep": state.keep,
    }


def _from_meta(raw: str) -> AccountState:
    data = json.loads(raw)
    if not isinstance(data, dict) or data.get("v") != FORMAT:
        raise ValueError("not an account state of this version")
    return AccountState(
        latest=-math.inf if data["latest"] is None else _finite(data["latest"]),
        leases={str(k): lease_from_json(v) for k, v in data["leases"].items()},
        line=[Waiter(str(w[0]), _finite(w[1])) for w in data["line"]],
        slot_line=[Waiter(str(w[0]), _finite(w[1])) for w in data["slot_line"]],
        seq=int(data["seq"]),
        horizon=_finite(data["horizon"]),
        keep=int(data["keep"]),
    )


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
