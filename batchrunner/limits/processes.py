"""Which runs on the account are this machine's and whether their processes still run (``/proc``): a lease of a
run seen dead here is gone at once, not only when its ttl ends.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from batchrunner.limits.accountstate import AccountState, Lease

__all__ = ["gone_here", "host_id", "process_gone", "process_start"]


def host_id() -> str:
    """This machine's boot and pid namespace, so that runs on it can tell each other's pids; "" without /proc."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""
    return hashlib.sha256(f"{boot}:{namespace}".encode()).hexdigest()[:16]


def process_start(pid: int) -> str:
    """The start time of process ``pid`` (clock ticks since boot), "" when unknown; None-like "" also for zombies."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return ""
    fields = text.rpartition(")")[2].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return ""
    return fields[19]


def process_gone(pid: int, start: str) -> bool:
    """Whether the process that took a lease is surely not running (a pid reused by another process counts)."""
    if not start:
        return False  # no /proc: leave it to the lease's ttl
    return process_start(pid) != start


def gone_here(state: AccountState, mine: Lease) -> set[str]:
    """Leases of runs on this machine whose process is not running any more."""
    if not mine.host:
        return set()
    return {
        lease.id
        for lease in state.leases.values()
        if lease.host == mine.host
        and lease.id != mine.id
        and not lease.left
        and process_gone(lease.pid, lease.pid_start)
    }
