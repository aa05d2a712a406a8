"""Issue 14.4: a holder that is already leaving, under a real systemd user manager (tests/rig.py).

During a restart or handover the holder's unit is deactivating: its ExecStop= runs while its main
process still holds the address. The guard waits for it, as for a TIME_WAIT, within the guarded
unit's start budget, and refuses naming it if it has not left by then.
"""

from __future__ import annotations

import time

import pytest

from conftest import guarded

pytestmark = pytest.mark.integration

PORT = 18095
ADDRESS = f"127.0.0.1:{PORT}"
SPEC = {"host": "127.0.0.1", "port": PORT}


def stopping_holder(rig, stop_seconds: int) -> int:
    """other.service holding ADDRESS, told to stop: its ExecStop= sleeps while its main process
    keeps the socket. Returns the main PID once the manager says the unit is deactivating."""
    rig.write_unit("other.service", f"[Service]\nType=notify\nExecStart={rig.serve(SPEC)}\n"
                                    f"ExecStop=/bin/sleep {stop_seconds}\n")
    assert rig.start("other.service").ok
    pid = rig.main_pid("other.service")
    assert rig.systemctl("stop", "--no-block", "other.service").returncode == 0
    deadline = time.monotonic() + 5
    while rig.prop("other.service", "ActiveState") != "deactivating":
        assert time.monotonic() < deadline, rig.prop("other.service", "ActiveState")
        time.sleep(0.05)
    return pid


def test_a_holder_whose_unit_is_stopping_is_waited_for(systemd_rig):
    rig = systemd_rig
    stopping_holder(rig, 3)
    log = guarded(rig, ADDRESS, SPEC)
    run = rig.start("web.service")
    out = log.read_text()
    assert run.ok and run.pre_status == [0], (run.output, out)
    assert f"clear: {ADDRESS} can be bound after waiting" in out and f"listener on {ADDRESS}" in out
    assert rig.prop("other.service", "ActiveState") == "inactive"


def test_a_holder_still_stopping_when_the_start_budget_ends_is_named(systemd_rig):
    rig = systemd_rig
    pid = stopping_holder(rig, 8)
    log = guarded(rig, ADDRESS, SPEC, extra="TimeoutStartSec=4")  # a wait of 2 s: TimeoutStartSec= less its margin
    started = time.monotonic()
    run = rig.start("web.service")
    out = log.read_text()
    assert not run.ok and run.pre_status == [98], (run.output, out)
    assert time.monotonic() - started < 4
    assert f"refusing to start: {ADDRESS} in use after waiting" in out
    assert f"PID {pid}" in out and "unit other.service" in out
    assert "other.service is deactivating" in out and "other.service is stopping" in out
    assert rig.prop("other.service", "ActiveState") == "deactivating"


def test_an_exiting_process_is_told_from_a_live_one():
    """/proc/PID/stat as the guard reads it: a zombie (the kernel has ended it, its parent has not
    reaped it) is exiting; a running process is not."""
    import os

    from bindguard.evidence.owners import _exiting

    child = os.fork()
    if child == 0:
        os._exit(0)
    try:
        deadline = time.monotonic() + 5
        while not _exiting(child):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not _exiting(os.getpid())
    finally:
        os.waitpid(child, 0)


def test_a_zombie_leader_with_live_threads_is_not_exiting():
    """A leader that called pthread_exit() is a zombie in /proc/PID/stat while its other threads
    go on (and keep its sockets): the process is not leaving, and is not waited for as if it were."""
    import subprocess
    import sys

    from bindguard.evidence.owners import _exiting, process_facts

    proc = subprocess.Popen([sys.executable, "-c", (
        "import ctypes, sys, threading, time\n"
        "threading.Thread(target=time.sleep, args=(30,)).start()\n"
        "print('up', flush=True)\n"
        "ctypes.CDLL(None).pthread_exit(None)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        deadline = time.monotonic() + 5
        while open(f"/proc/{proc.pid}/stat", "rb").read().rsplit(b")", 1)[1].split()[0] != b"Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not _exiting(proc.pid)
        facts = process_facts(proc.pid)
        assert facts is not None and not facts.exiting
    finally:
        proc.kill()
        proc.wait()


def test_an_exit_begun_between_the_stat_and_the_command_line_is_seen(monkeypatch):
    """process_facts reads /proc/PID/stat, then the command line. A process whose exit begins in
    between has no command line left (the exit took the memory it lives in), and must be seen
    exiting: a guard seen so, with no command line to tell it is one, was refused as a listener
    (one run of test_guards_together in CI). Here the stat is the one read before a real child
    exited (as it was, running), and the rest the child's own, a zombie."""
    import subprocess
    import sys

    from bindguard.evidence import owners

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 5
        while (zombie := owners.read_stat(proc.pid)) is None or zombie.state != b"Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        running = owners.ProcStat(zombie.name, b"S", zombie.ppid, zombie.flags & ~owners.PF_EXITING,
                                  zombie.start_ticks)
        reads = []
        real = owners.read_stat

        def read_stat(pid):
            reads.append(pid)
            return running if len(reads) == 1 else real(pid)

        monkeypatch.setattr(owners, "read_stat", read_stat)
        facts = owners.process_facts(proc.pid)
        assert facts is not None and facts.cmdline == () and facts.exiting
    finally:
        proc.wait()


def test_a_socket_unit_that_is_stopping_is_waited_for(systemd_rig):
    """A socket unit keeps its sockets open while its ExecStopPre= runs (deactivating): its
    address is freed when that ends."""
    rig = systemd_rig
    rig.write_unit("other.service", "[Service]\nExecStart=/bin/sleep infinity\n", reload=False)
    rig.write_unit("other.socket", f"[Socket]\nListenStream={ADDRESS}\nExecStopPre=/bin/sleep 3\n")
    assert rig.start("other.socket").ok
    assert rig.systemctl("stop", "--no-block", "other.socket").returncode == 0
    deadline = time.monotonic() + 5
    while rig.prop("other.socket", "ActiveState") != "deactivating":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    log = guarded(rig, ADDRESS, SPEC)
    run = rig.start("web.service")
    out = log.read_text()
    assert run.ok and run.pre_status == [0], (run.output, out)
    assert f"clear: {ADDRESS} can be bound after waiting" in out and f"socket-unit on {ADDRESS}" in out
