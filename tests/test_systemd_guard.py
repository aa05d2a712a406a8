"""Issue 3's scenarios: the guard in a real unit's ExecStartPre=, under a real systemd user manager.

Each test writes units into the rig (tests/rig.py), starts them with systemctl, and reads what
the manager recorded (the ExecStartPre= exit status, Result=) and what the guard printed (the
unit's stderr goes to a file: the rig has no journal).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from conftest import GUARD, guarded
from rig import TREE_PROGRAM

pytestmark = pytest.mark.integration

PORT = 18080
ADDRESS = f"127.0.0.1:{PORT}"
SPEC = {"host": "127.0.0.1", "port": PORT}


def holder_unit(rig, name: str = "other.service", extra: str = "", fork: bool = False) -> int:
    """Another service holding ADDRESS; returns its main PID."""
    rig.write_unit(name, f"[Service]\nType=notify\nExecStart={rig.serve(SPEC, fork=fork)}\n{extra}\n")
    run = rig.start(name)
    assert run.ok, run.output
    return rig.main_pid(name)


def text(log: Path) -> str:
    return log.read_text() if log.exists() else ""


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def cgroup_pids(rig, unit: str) -> set[int]:
    """The processes in a unit's cgroup, from the cgroup filesystem (hybrid: name=systemd)."""
    group = rig.prop(unit, "ControlGroup")
    for hierarchy in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup")):
        procs = hierarchy / group.lstrip("/") / "cgroup.procs"
        if group and procs.exists():
            return {int(p) for p in procs.read_text().split()}
    return set()


def test_1_starts_when_the_address_is_free(systemd_rig):
    rig = systemd_rig
    log = guarded(rig, ADDRESS, SPEC)
    run = rig.start("web.service")
    assert run.ok, (run.output, text(log))
    assert run.pre_status == [0] and run.active_state == "active"
    assert f"clear: {ADDRESS} can be bound" in text(log)


def test_2_refuses_when_another_units_process_holds_it(systemd_rig):
    rig = systemd_rig
    other_pid = holder_unit(rig)
    log = guarded(rig, ADDRESS, SPEC)
    run = rig.start("web.service")
    assert not run.ok
    assert run.pre_status == [98] and run.result == "exit-code"
    out = text(log)
    assert f"refusing to start: {ADDRESS} in use (exit 98)" in out
    assert "listener" in out and f"PID {other_pid}" in out and "serve.py" in out
    assert "unit other.service" in out and "systemctl stop other.service" in out
    assert alive(other_pid)


def test_3_socket_unit_holds_it_own_and_foreign(systemd_rig):
    rig = systemd_rig
    rig.write_unit("web.socket", f"[Socket]\nListenStream={ADDRESS}\n", reload=False)
    log = guarded(rig, ADDRESS, SPEC)
    assert rig.start("web.socket").ok
    run = rig.start("web.service")
    assert not run.ok and run.pre_status == [98]
    out = text(log)
    assert "socket-unit" in out and "socket unit web.socket" in out
    assert f"PID {rig.manager_pid}" in out
    assert "this service's own socket unit" in out and "never both" in out
    assert rig.prop("web.socket", "ActiveState") == "active"  # the guard touched nothing

    assert rig.stop("web.socket").ok
    rig.write_unit("other.socket", f"[Socket]\nListenStream={ADDRESS}\nService=other.service\n", reload=False)
    rig.write_unit("other.service", "[Service]\nExecStart=/bin/sleep infinity\n")
    assert rig.start("other.socket").ok
    log.unlink()
    run = rig.start("web.service")
    assert not run.ok and run.pre_status == [98]
    out = text(log)
    assert "socket unit other.socket" in out and "never both" not in out
    assert "systemctl stop other.socket" in out


def test_4_latent_socket_unit_warns_without_blocking(systemd_rig):
    rig = systemd_rig
    rig.write_unit("later.socket", f"[Socket]\nListenStream={ADDRESS}\nService=other.service\n"
                   "[Install]\nWantedBy=sockets.target\n", reload=False)
    rig.write_unit("other.service", "[Service]\nExecStart=/bin/sleep infinity\n", reload=False)
    log = guarded(rig, ADDRESS, SPEC)
    assert rig.systemctl("enable", "later.socket").returncode == 0
    run = rig.start("web.service")
    assert run.ok and run.pre_status == [0], text(log)
    out = text(log)
    assert "latent-socket-unit" in out and "later.socket" in out
    assert "bindguard: clear: " in out  # a warning, not a refusal (its priority: test_console.py)


def test_4b_latent_socket_unit_refuses_when_configured(systemd_rig):
    rig = systemd_rig
    config = rig.root / "bindguard.yaml"
    config.write_text("policy:\n  latent-socket-unit: refuse\n")
    rig.write_unit("later.socket", f"[Socket]\nListenStream={ADDRESS}\nService=other.service\n"
                   "[Install]\nWantedBy=sockets.target\n", reload=False)
    rig.write_unit("other.service", "[Service]\nExecStart=/bin/sleep infinity\n", reload=False)
    log = guarded(rig, ADDRESS, SPEC, check_args=f"--config {config}")
    assert rig.systemctl("enable", "later.socket").returncode == 0
    run = rig.start("web.service")
    assert not run.ok and run.pre_status == [98], text(log)
    assert "latent-socket-unit" in text(log)


def test_5_stale_own_instance_is_reported_then_reaped_when_asked(systemd_rig):
    rig = systemd_rig
    log = guarded(rig, ADDRESS, SPEC, extra="KillMode=process", fork=True)
    assert rig.start("web.service").ok
    first = rig.main_pid("web.service")
    assert rig.stop("web.service").ok  # KillMode=process: the forked child stays, holding the port
    stale = cgroup_pids(rig, "web.service")
    assert len(stale) == 1 and first not in stale
    (child,) = stale

    run = rig.start("web.service")
    assert not run.ok and run.pre_status == [98]
    out = text(log)
    assert "own-instance" in out and f"PID {child}" in out and "--reap-stale" in out
    assert "KillMode=process" in out, "how the unit's own process came to hold the port is said"
    assert "control-group" not in out and "KillMode=mixed" not in out, "the unit's KillMode= is never advised against"
    assert alive(child), "without --reap-stale nothing is killed"

    log.unlink()
    guarded(rig, ADDRESS, SPEC, check_args="--reap-stale", extra="KillMode=process", fork=True)
    run = rig.start("web.service")
    assert run.ok and run.pre_status == [0], (run.output, text(log))
    assert not alive(child)
    out = text(log)
    assert f"reaping stale PID {child}" in out and "SIGTERM" in out


def test_6_orphan_whose_unit_has_stopped(systemd_rig):
    rig = systemd_rig
    holder_unit(rig, extra="KillMode=process", fork=True)
    assert rig.stop("other.service").ok
    (orphan,) = cgroup_pids(rig, "other.service")
    assert int(Path(f"/proc/{orphan}/stat").read_text().split(")")[1].split()[1]) == rig.manager_pid
    log = guarded(rig, ADDRESS, SPEC)
    run = rig.start("web.service")
    assert not run.ok and run.pre_status == [98]
    out = text(log)
    assert "orphan" in out and f"PID {orphan}" in out
    assert "other.service is inactive" in out and f"PPID {rig.manager_pid}" in out
    assert alive(orphan)


def test_7_time_wait_wait_is_capped_by_the_start_timeout(systemd_rig):
    rig = systemd_rig
    rig.hold({**SPEC, "mode": "timewait-server"})
    assert "TIME-WAIT" in rig.run(["ss", "-Htan", f"sport = :{PORT}"]).stdout
    log = guarded(rig, ADDRESS, SPEC, check_args="--no-reuseaddr", extra="TimeoutStartSec=6")
    began = time.monotonic()
    run = rig.start("web.service")
    took = time.monotonic() - began
    assert not run.ok
    assert run.pre_status == [75] and run.result == "exit-code", (run, text(log))  # not "timeout"
    assert took < 6
    out = text(log)
    assert "TIME_WAIT" in out and "capped" in out


def test_8_no_bus_keeps_the_kernel_verdict(systemd_rig):
    rig = systemd_rig
    other_pid = holder_unit(rig)
    log = guarded(rig, ADDRESS, SPEC)
    rig.stop_bus()
    run = rig.start("web.service")
    assert not run.ok and run.pre_status == [98]
    out = text(log)
    assert "cannot connect to the user bus" in out
    assert f"PID {other_pid}" in out and "unit other.service" in out  # named from its cgroup

    assert rig.stop("other.service").ok
    log.unlink()
    run = rig.start("web.service")
    assert run.ok and run.pre_status == [0], text(log)


def test_9_installed_dropin_guards_the_unit_and_uninstall_removes_it(systemd_rig):
    rig = systemd_rig
    log = rig.log("web.log")
    rig.write_unit("web.service", f"[Service]\nType=notify\nExecStart={rig.serve(SPEC)}\nStandardError=append:{log}\n")
    other_pid = holder_unit(rig)

    done = rig.bindguard("install", "--user", "--program", TREE_PROGRAM, "web.service", ADDRESS)
    assert done.returncode == 0, done.stderr
    run = rig.start("web.service")
    assert not run.ok and run.pre_status == [98]
    assert f"PID {other_pid}" in text(log)

    assert rig.stop("other.service").ok
    run = rig.start("web.service")
    assert run.ok and run.pre_status == [0]
    assert rig.stop("web.service").ok

    done = rig.bindguard("uninstall", "--user", "web.service")
    assert done.returncode == 0, done.stderr
    assert rig.prop("web.service", "ExecStartPre") == ""
    assert not os.path.exists(rig.unit_dir / "web.service.d")


def test_restart_prevent_exit_status_does_not_see_the_guard_but_start_limits_do(systemd_rig):
    """A fact of systemd (252) the advice depends on: RestartPreventExitStatus= applies to the main
    process only, so a start refused in ExecStartPre= (98) is restarted like any failure; the start
    rate limit (StartLimitBurst=/StartLimitIntervalSec=) is what ends the loop."""
    rig = systemd_rig
    holder_unit(rig)
    for name, unit_section in (("loop.service", "StartLimitIntervalSec=0"),
                               ("bounded.service", "StartLimitIntervalSec=60\nStartLimitBurst=2")):
        rig.write_unit(name, f"""\
[Unit]
{unit_section}
[Service]
ExecStartPre=+{GUARD} {ADDRESS}
ExecStart={rig.serve(SPEC)}
Restart=on-failure
RestartSec=100ms
RestartPreventExitStatus=98 99
StandardError=null
""")
        assert not rig.start(name).ok
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and int(rig.prop("loop.service", "NRestarts") or 0) < 3:
        time.sleep(0.2)
    assert int(rig.prop("loop.service", "NRestarts")) >= 3, "RestartPreventExitStatus=98 stopped the loop"
    assert rig.systemctl("stop", "loop.service").returncode == 0
    while time.monotonic() < deadline and rig.prop("bounded.service", "ActiveState") != "failed":
        time.sleep(0.2)
    bounded = rig.show("bounded.service", "ActiveState", "NRestarts")
    assert bounded["ActiveState"] == "failed" and int(bounded["NRestarts"]) <= 3, bounded


def test_killmode_process_is_nobody_s_business_on_a_clear_start(systemd_rig):
    """Debian's ssh.service sets KillMode=process on purpose (a restart keeps open sessions):
    a clear start says nothing about it, and no path of the guard advises changing it."""
    rig = systemd_rig
    log = guarded(rig, ADDRESS, SPEC, extra="KillMode=process")
    run = rig.start("web.service")
    assert run.ok
    assert "KillMode" not in text(log), text(log)


def test_restart_loop_on_a_conflict_gets_advice_that_works(systemd_rig):
    rig = systemd_rig
    holder_unit(rig)
    log = guarded(rig, ADDRESS, SPEC, extra="Restart=on-failure\nRestartSec=100ms")
    rig.write_dropin("web.service", "limit.conf", "[Unit]\nStartLimitIntervalSec=0\n")
    assert not rig.start("web.service").ok
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and int(rig.prop("web.service", "NRestarts") or 0) < 2:
        time.sleep(0.2)
    assert rig.systemctl("stop", "web.service").returncode == 0
    last = text(log).rsplit("refusing to start", 1)[-1]
    assert "StartLimitBurst" in last and "RestartPreventExitStatus" not in last
