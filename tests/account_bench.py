"""Measure the account-wide limiter: three runs on one key against one run of the union, and the cost per grant.

    .venv/bin/python -m tests.account_bench [--jobs 16] [--trials 3] [--grants 2000] [--stores sqlite,redis]
    .venv/bin/python -m tests.account_bench --trials 0   # only the cost per grant, at 60/60 and at 6000/6

For each store (``local``: every run its own limits, as before; ``sqlite``; ``redis``, a redis-server started on a free
loopback port), three ``batchrunner run`` processes of ``--jobs`` jobs each go at once against one simulator that
enforces 60 requests per second and 4 in flight, the runs asking for the same; then one run of the union (3 x jobs)
against a fresh simulator. Wall time is the batch's (first ``run_started`` to last ``run_finished`` in the ledgers);
429s are the simulator's refusals (window and concurrency). Then the cost of one grant (its take and its answer: two
transactions) in one process, on each shared store. Prints one line per measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from batchrunner.limits.account import AccountState, Lease, Store, expire, join, record_history, request, settle_grant
from batchrunner.limits.limiter import open_store
from tests.conftest import serve_in_thread
from tests.test_account_e2e import batch_seconds, redis_server, sim_config, start_run


@contextlib.contextmanager
def store_url(kind: str, folder: Path) -> Iterator[str | None]:
    if kind == "redis":
        with redis_server(folder / "redis") as url:
            yield url
    else:
        yield "local" if kind == "local" else None


def state(kind: str, folder: Path, run: int) -> Path:
    return folder / (f"state-{run}" if kind == "redis" else "state")


def batches(kind: str, jobs: int, folder: Path) -> tuple[float, float, int, int]:
    """(three runs' seconds, union's seconds, 429s of the three, 429s of the union)."""
    with store_url(kind, folder) as store:
        with serve_in_thread(sim_config()) as sim:
            # With SQLite the runs share the state folder (the database is the store); with Redis each has its own,
            # so that only Redis coordinates them.
            runs = [
                start_run(folder / f"run{i}", sim.url, jobs, store=store, state=state(kind, folder, i))
                for i in range(3)
            ]
            codes = [run.wait(timeout=300) for run in runs]
            stats = sim.stats()
        if kind != "local" and any(codes):
            raise RuntimeError(f"a run failed: {runs[codes.index(next(c for c in codes if c))].log()[-2000:]}")
        with serve_in_thread(sim_config()) as sim:
            union = start_run(folder / "union", sim.url, 3 * jobs, store=store, state=state(kind, folder, 9))
            union.wait(timeout=300)
            union_stats = sim.stats()
    refused = stats["rate_limited"] + stats["concurrency_rejected"]
    union_refused = union_stats["rate_limited"] + union_stats["concurrency_rejected"]
    return batch_seconds([r.out for r in runs]), batch_seconds([union.out]), refused, union_refused


def _settle(grant_id: str, state: AccountState, now: float) -> None:
    settle_grant(state, now, grant_id)


async def grant_cost(store: Store, grants: int, *, count: int = 60, period: float = 60.0) -> float:
    """Microseconds per grant: the transaction that takes it and the one that records its answer, in a window that
    holds about ``count`` grants of an account at ``count``/``period`` (half of them answered before the timing
    starts, so that none of the ``grants`` timed, at most ``count // 2``, waits)."""
    lease = Lease(
        id="bench",
        label="bench",
        pid=0,
        host="",
        pid_start="",
        started=0.0,
        beat=0.0,
        ttl=3600.0,
        hold=1.0,
        timeout=30.0,
        count=count,
        period=period,
        margin=0.0,
        concurrency=10,
    )
    grants = min(grants, count // 2)
    await store.transact(lambda state, now: join(state, now, lease))

    def fill(state: AccountState, now: float) -> None:
        record_history(state, now, [now - period / 2 + i * period / count for i in range(count - grants - 1)])

    await store.transact(fill)

    def take(state: AccountState, now: float) -> str | None:
        expire(state, now)
        state.leases["bench"].beat = now
        return request(state, now, "bench", grant=True, slot=False).grant_id

    started = time.perf_counter()
    for _ in range(grants):
        grant_id = await store.transact(take)
        if grant_id is None:
            raise RuntimeError("the bench's window was full: it measures grants that do not wait")
        await store.transact(functools.partial(_settle, grant_id))
    return (time.perf_counter() - started) / grants * 1e6


async def costs(kind: str, grants: int, folder: Path, *, count: int = 60, period: float = 60.0) -> float:
    """The mean cost per grant over ``grants``, in rounds of at most ``count // 2`` on a fresh account each."""
    spent, done, round_ = 0.0, 0, 0
    with store_url(kind, folder) as url:
        os.environ["XDG_STATE_HOME"] = str(folder / "state")
        while done < grants:
            round_ += 1
            store = await open_store(url, api_url="http://bench.invalid", api_key=f"bench-key-{round_}")
            try:
                n = min(grants - done, count // 2)
                spent += await grant_cost(store, n, count=count, period=period) * n
                done += n
            finally:
                await store.close()
    return spent / done


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=16, help="jobs per run (the union has three times as many)")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--grants", type=int, default=2000)
    parser.add_argument("--stores", default="local,sqlite,redis")
    args = parser.parse_args(argv)
    kinds = args.stores.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for kind in kinds if args.trials > 0 else []:
            three, one, refused, union_refused = [], [], [], []
            for trial in range(args.trials):
                t3, t1, r3, r1 = batches(kind, args.jobs, root / f"{kind}-{trial}")
                three.append(t3)
                one.append(t1)
                refused.append(r3)
                union_refused.append(r1)
            print(
                f"{kind:>6}: three runs x {args.jobs} jobs {statistics.median(three):.2f}s "
                f"(trials {', '.join(f'{t:.2f}' for t in three)}), one run of {3 * args.jobs} jobs "
                f"{statistics.median(one):.2f}s: {statistics.median(three) / statistics.median(one) - 1:+.1%}; "
                f"429s {refused} (union {union_refused})",
                flush=True,
            )
        for kind in kinds:
            if kind == "local":
                continue
            for count, period in ((60, 60.0), (6000, 6.0)):
                cost = asyncio.run(costs(kind, args.grants, root / f"cost-{kind}-{count}", count=count, period=period))
                print(
                    f"{kind:>6}: {cost:.0f} us per grant at {count}/{period:g} "
                    "(take + answer, two transactions, one process, the window full to about its count)",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
