"""What ``batchrunner account`` shows: the runs now on a key, the slots they hold and the window's use.

One transaction of the account's store (it also expires what is due, as every transaction does); the rest is a pure
rendering of its state, as a dict for ``--json`` and as lines for people.
"""

from __future__ import annotations

from typing import Any

from batchrunner.limits.account import AccountState, account_limits, expire, slots_held
from batchrunner.limits.limiter import host_id, open_store

__all__ = ["account_report", "describe_account", "report_of"]


def report_of(state: AccountState, now: float, *, store: str, here: str) -> dict[str, Any]:
    """The account's state at ``now`` as plain data (``here``: this machine's host id, to say which runs are on it)."""
    limits = account_limits(state, now)
    on_the_wire: dict[str, int] = {}
    for lease_id in state.leases:
        on_the_wire[lease_id] = len(state.pending.of(lease_id))
    runs = []
    for lease in sorted(state.leases.values(), key=lambda lease: lease.started):
        live = lease.live(now)
        runs.append(
            {
                "pid": lease.pid,
                "folder": lease.label,
                "this_machine": bool(here) and lease.host == here,
                "live": live,
                "in_flight": lease.held,
                "slots_held_for": None if live else round(max(0.0, lease.beat + lease.hold - now), 3),
                "rate_limit": f"{lease.count}/{lease.period:g}",
                "concurrency": lease.concurrency,
                "last_beat_ago": round(now - lease.beat, 3),
                "rate_limited": lease.rate_limited,
                "pending": on_the_wire[lease.id],
            }
        )
    window_used = None
    if limits is not None:
        start = now - limits.window
        window_used = len(state.times) - state.times.count_le(start) + len(state.pending)
    return {
        "store": store,
        "runs": runs,
        "live_runs": sum(1 for run in runs if run["live"]),
        "in_flight": slots_held(state, now),
        "concurrency": limits.concurrency if limits is not None else None,
        "rate_limit": f"{limits.count}/{limits.period:g}" if limits is not None else None,
        "window_used": window_used,
        "on_the_wire": len(state.pending),
        "waiting_for_grants": len(state.line),
        "waiting_for_slots": len(state.slot_line),
    }


def describe_account(report: dict[str, Any]) -> str:
    """``report_of``'s data as lines for people."""
    lines = [f"limits store: {report['store']}"]
    if report["rate_limit"] is None:
        lines.append("no run is on this key now")
    else:
        lines.append(
            f"window: {report['window_used']}/{report['rate_limit'].split('/')[0]} requests in the last "
            f"{report['rate_limit'].split('/')[1]}s ({report['on_the_wire']} on the wire); "
            f"in flight: {report['in_flight']}/{report['concurrency']}; "
            f"waiting: {report['waiting_for_grants']} for a request, {report['waiting_for_slots']} for a slot"
        )
    if report["in_flight"] and report["rate_limit"] is None:
        lines.append(f"slots still held for gone runs' predictions: {report['in_flight']}")
    for run in report["runs"]:
        where = "this machine" if run["this_machine"] else "another machine"
        if run["live"]:
            state = f"running, {run['in_flight']} in flight, {run['pending']} requests on the wire"
        else:
            state = f"gone; its {run['in_flight']} slots held {run['slots_held_for']:g}s more"
        lines.append(
            f"  pid {run['pid']} on {where}, {run['folder']}: {state}; --rate-limit {run['rate_limit']} "
            f"--concurrency {run['concurrency']}; {run['rate_limited']} refused with 429"
        )
    return "\n".join(lines)


async def account_report(spec: str | None, *, api_url: str, api_key: str) -> dict[str, Any]:
    """Open the key's store, read it once, close it (StoreUnavailable / StoreBroken as for a run)."""
    store = await open_store(spec, api_url=api_url, api_key=api_key)
    here = host_id()
    try:

        def read(state: AccountState, now: float) -> dict[str, Any]:
            expire(state, now)
            return report_of(state, now, store=store.description, here=here)

        return await store.transact(read)
    finally:
        await store.close()
