"""The account's limits store across machines: one Redis server (``--limits-store redis://HOST:PORT/DB``).

The account's state is one JSON value under ``batchrunner:account:<hash>`` (the hash of the API URL and key, as for
SQLite), with a version counter beside it. Two Lua scripts make a transaction atomic: ``READ`` returns the state, its
version and the server's ``TIME``; ``WRITE`` stores a new state only if the version is still the one read, and
otherwise answers like ``READ``, so a run that lost the race decides again on what won, with no extra round trip.
The decisions themselves are ``account.py``'s, the same functions the SQLite store runs: the two stores cannot
drift apart. Every time is the Redis server's clock, so machines whose clocks disagree still share one window.

A decision made at the read's time is still right at the write's: time only empties windows and frees nothing
(``account.decide`` is monotone in ``now`` for a fixed state), and the version check rules out another change.

Errors of the ``redis`` package are translated here: ``StoreUnavailable`` (exit 2) when the server cannot be reached at
the start, ``StoreLost`` after.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from batchrunner.limits.account import AccountState, StoreLost, StoreUnavailable

__all__ = ["RedisStore"]

T = TypeVar("T")
# A state no run has touched for this long is dropped by Redis (every run's lease is long gone by then).
KEY_TTL = 7 * 86400
# Lost races in a row before a transaction gives up (each loss means another run's write went through).
MAX_RACES = 200
CONNECT_TIMEOUT = 3.0
OP_TIMEOUT = 5.0

_READ = """
local state = redis.call('GET', KEYS[1])
local version = redis.call('GET', KEYS[2]) or '0'
local t = redis.call('TIME')
return {0, state or '', version, t[1], t[2]}
"""

_WRITE = """
local version = redis.call('GET', KEYS[2]) or '0'
local t = redis.call('TIME')
if version ~= ARGV[1] then
  local state = redis.call('GET', KEYS[1])
  return {0, state or '', version, t[1], t[2]}
end
local next = tostring(tonumber(version) + 1)
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
redis.call('SET', KEYS[2], next, 'EX', ARGV[3])
return {1, '', next, t[1], t[2]}
"""


def _redact_url(url: str) -> str:
    """The URL without a password (``redis://:secret@host`` must not reach a log line)."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return f"{scheme}{sep}{rest}"


class RedisStore:
    """The account's state on a Redis server; open with ``await RedisStore.open(url, account)``."""

    def __init__(self, client: aioredis.Redis, url: str, account: str) -> None:
        self._client = client
        self.url = _redact_url(url)
        self.description = f"Redis {self.url}"
        self._keys = [f"batchrunner:account:{account}", f"batchrunner:account:{account}:version"]
        self._read = client.register_script(_READ)
        self._write = client.register_script(_WRITE)

    @classmethod
    async def open(cls, url: str, account: str) -> RedisStore:
        """Connect and check the server answers; StoreUnavailable (one line) when it does not."""
        try:
            client = aioredis.Redis.from_url(
                url, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=OP_TIMEOUT, decode_responses=False
            )
        except (ValueError, RedisError) as exc:
            raise StoreUnavailable(f"--limits-store {_redact_url(url)}: {exc}") from None
        store = cls(client, url, account)
        try:
            await client.ping()
            await store.transact(lambda state, now: None)
        except (RedisError, OSError, StoreLost) as exc:
            await store.close()
            raise StoreUnavailable(f"cannot reach the limits store {store.url}: {_reason(exc)}") from None
        return store

    async def _call(self, script: Any, args: list[Any]) -> tuple[bool, AccountState, str, float]:
        try:
            reply = await script(keys=self._keys, args=args)
        except (RedisError, OSError) as exc:
            raise StoreLost(f"the limits store {self.url} failed: {_reason(exc)}") from None
        written, raw, version, sec, usec = reply
        now = int(sec) + int(usec) / 1e6
        state = AccountState()
        if raw:
            try:
                state = AccountState.from_json(json.loads(raw))
            except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
                raise StoreLost(f"the limits store {self.url} holds an unreadable state ({exc})") from None
        text = version.decode() if isinstance(version, bytes) else str(version)
        return bool(int(written)), state, text, now

    async def transact(self, fn: Callable[[AccountState, float], T]) -> T:
        _, state, version, now = await self._call(self._read, [])
        for _ in range(MAX_RACES):
            result = fn(state, now)
            text = json.dumps(state.to_json(), separators=(",", ":"))
            written, state, version, now = await self._call(self._write, [version, text, KEY_TTL])
            if written:
                return result
        raise StoreLost(f"the limits store {self.url}: {MAX_RACES} writes in a row lost to other runs")

    async def close(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
