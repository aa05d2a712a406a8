"""--reap-stale: end a process proven to be a stale instance of the guarded unit, and nothing else.

Proven means all of: the conflict is own-instance (the guarded unit runs no instance now: it is
stopped, or its start is still in ExecStartPre=); the manager itself, asked over a working bus
(GetUnitByPID), places the process in the guarded unit; and the process's full cgroup path is
the unit's ControlGroup (or below it). A cgroup path that merely ends in the unit's name proves
nothing (another user's manager may run a unit of that name), nor does the executable (python3,
java run everything). Never the manager, never PID 1, never the guard or its parent. The process
is addressed through a pidfd opened before anything is checked; its start time and cgroup are
read again through it, so a PID reused in the meantime cannot be hit. SIGTERM first, SIGKILL only
after the grace period; every step is logged, through the console the caller passes (the action
stage writes nothing itself: bindguard.report is above it).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from syslog import LOG_NOTICE, LOG_WARNING

from bindguard import stop_if_asked
from bindguard.evidence.owners import unit_from_cgroup
from bindguard.model.facts import SystemdFacts, cgroup_within
from bindguard.model.kinds import ConflictKind
from bindguard.verdict.conflicts import Conflict

GRACE_SECONDS = 5.0


def why_reapable(conflict: Conflict, facts: SystemdFacts | None, control_group: str) -> str | None:
    """The proof that this holder is a stale instance of the guarded unit, or None.

    control_group: the guarded unit's ControlGroup as the manager reported it ("" if unknown).
    """
    p = conflict.process
    if p is None or facts is None or conflict.kind != ConflictKind.OWN_INSTANCE:
        return None
    if p.pid in (1, facts.manager_pid, os.getpid(), os.getppid()):
        return None
    unit = facts.guarded_unit
    if unit is None or facts.unit_of_pid.get(p.pid) != unit or not cgroup_within(p.cgroup, control_group):
        return None
    if unit_from_cgroup(control_group) != unit:  # the kernel's path and the manager's word must agree
        return None
    return (f"the manager places it in {unit}, its cgroup {p.cgroup} is the unit's own ({control_group}), and "
            f"{unit} is {facts.guarded_state}")


def _alive(pidfd: int) -> bool:
    import select

    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return not poller.poll(0)  # a pidfd turns readable when its process exits


def _same_process(pidfd: int, pid: int, started: float, cgroup: str) -> bool:
    """Whether the process behind pidfd is the one observed: same start time, same cgroup. /proc/PID
    is read after the pidfd was opened and checked alive after: then it was the pidfd's process."""
    from bindguard.evidence.owners import process_cgroup, process_started

    now_started = process_started(pid)
    if now_started is None or abs(now_started - started) > 0.01:
        return False
    return process_cgroup(pid) == cgroup and _alive(pidfd)


def terminate(conflict: Conflict, reason: str, log: Callable[[int, str], None], grace: float = GRACE_SECONDS) -> str:
    """SIGTERM, then SIGKILL after `grace` seconds; returns what happened, for the report. Each step
    is written as it happens with log(syslog priority, line): the journal sees the SIGTERM before
    the grace period."""
    p = conflict.process
    if p is None:
        return "no process to end"
    label = f"PID {p.pid} ({p.command})"
    try:
        pidfd = os.pidfd_open(p.pid)
    except ProcessLookupError:
        return f"{label} had already exited"
    try:
        if not _same_process(pidfd, p.pid, p.started, p.cgroup):
            return f"{label} is no longer the process that was observed (exited, or moved); left alone"
        log(LOG_WARNING, f"bindguard: reaping stale {label} holding {conflict.bind}: {reason}; SIGTERM")
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _alive(pidfd):
            stop_if_asked()
            time.sleep(0.05)
        if not _alive(pidfd):
            log(LOG_NOTICE, f"bindguard: {label} exited after SIGTERM")
            return f"{label} ended with SIGTERM ({reason})"
        log(LOG_WARNING, f"bindguard: {label} ignored SIGTERM for {grace:g} s; SIGKILL")
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return f"{label} ended with SIGKILL after ignoring SIGTERM for {grace:g} s ({reason})"
    except ProcessLookupError:
        return f"{label} exited"
    finally:
        os.close(pidfd)
