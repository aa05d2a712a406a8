"""--reap-stale: end a process proven to be a stale instance of the guarded unit, and nothing else.

Proven means: it sits in the guarded unit's own cgroup (a run left behind by KillMode=process
or none), or it is an orphan (re-parented to the manager, in no running unit) running the
very executable of the unit's ExecStart=. Never the manager, never PID 1, never the guard
or its parent. The process is addressed through a pidfd, so a PID reused in the meantime
cannot be hit; SIGTERM first, SIGKILL only after the grace period; every step is logged.
"""

from __future__ import annotations

import os
import signal
import time

from bindguard import output
from bindguard.verdict import ORPHAN, OWN_INSTANCE, Conflict

GRACE_SECONDS = 5.0


def why_reapable(conflict: Conflict, unit_executables: set[str], manager_pid: int) -> str | None:
    """The proof that this holder is a stale instance of the guarded unit, or None."""
    p = conflict.process
    if p is None or p.pid in (1, manager_pid, os.getpid(), os.getppid()):
        return None
    if conflict.kind == OWN_INSTANCE:
        return f"it is in the guarded unit's own cgroup {p.cgroup}"
    if conflict.kind == ORPHAN and p.exe and p.exe in unit_executables:
        return f"it is an orphan running the unit's own executable {p.exe}"
    return None


def _alive(pidfd: int) -> bool:
    import select

    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return not poller.poll(0)  # a pidfd turns readable when its process exits


def terminate(conflict: Conflict, reason: str, grace: float = GRACE_SECONDS) -> str:
    """SIGTERM, then SIGKILL after `grace` seconds; returns what happened, for the report."""
    p = conflict.process
    label = f"PID {p.pid} ({' '.join(p.cmdline) or p.name})"
    try:
        pidfd = os.pidfd_open(p.pid)
    except ProcessLookupError:
        return f"{label} had already exited"
    try:
        # The PID may have been reused since it was observed: check it is still the same process.
        import psutil

        try:
            if abs(psutil.Process(p.pid).create_time() - p.started) > 0.01:
                return f"{label} is no longer the process that was observed; left alone"
        except psutil.NoSuchProcess:
            return f"{label} had already exited"
        output.emit(output.WARNING, f"bindguard: reaping stale {label} holding {conflict.bind}: {reason}; SIGTERM")
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _alive(pidfd):
            time.sleep(0.05)
        if not _alive(pidfd):
            output.emit(output.NOTICE, f"bindguard: {label} exited after SIGTERM")
            return f"{label} ended with SIGTERM ({reason})"
        output.emit(output.WARNING, f"bindguard: {label} ignored SIGTERM for {grace:g} s; SIGKILL")
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return f"{label} ended with SIGKILL after ignoring SIGTERM for {grace:g} s ({reason})"
    except ProcessLookupError:
        return f"{label} exited"
    finally:
        os.close(pidfd)
