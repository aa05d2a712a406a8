"""A privileged port the daemon's user may not bind (issue 10, item 5), under a real systemd
user manager: the rig's network namespace has the default net.ipv4.ip_unprivileged_port_start
(1024), so port 80 needs CAP_NET_BIND_SERVICE.

The guard says `permission-denied` (exit 13) only where it proves that the daemon's process
lacks the capability: it ran with the daemon's own credentials (ExecStartPre= without "+") and
the kernel denied it, or the unit's settings say so (User= not root, no AmbientCapabilities=, or
a CapabilityBoundingSet= without it) and the daemon's program cannot gain it when it runs.
Each refusal is checked against the daemon itself: without the guard it fails the same way.
"""

from __future__ import annotations

import sys

import pytest

pytestmark = pytest.mark.integration

SPEC = {"host": "127.0.0.1", "port": 80}
GUARD = f"{sys.executable} -m bindguard check --unit %n --wait 0 127.0.0.1:80"
# A compiled daemon: a script, or a program given to an interpreter (the rig's Python holder), may
# run anything (authbind's helper, sudo), so nothing about its privileges is proven.
SOCAT = "/usr/bin/socat TCP-LISTEN:80,bind=127.0.0.1,reuseaddr /dev/null"


def web(rig, settings: str, pre_prefix: str, exec_start: str | None = None) -> str:
    # A guard running as the unit's User= reads the unit's files, and the daemon tells the
    # manager it is ready through $NOTIFY_SOCKET, as on a host (/etc/systemd is world-readable,
    # the system manager's notify socket world-writable); a user manager's are private to it.
    rig.root.chmod(0o755)
    rig.runtime_dir.chmod(0o755)
    (rig.runtime_dir / "systemd" / "notify").chmod(0o777)
    log = rig.log("web.service.log")
    if log.exists():
        log.unlink()
    rig.write_unit("web.service", f"""\
[Service]
Type=notify
{settings}
ExecStartPre={pre_prefix}{GUARD}
ExecStart={exec_start or rig.serve(SPEC)}
StandardError=append:{log}
""")
    return str(log)


def daemon_alone(rig) -> bool:
    """Whether the daemon starts with the guard taken out (a drop-in resetting ExecStartPre=)."""
    rig.write_dropin("web.service", "unguarded.conf", "[Service]\nExecStartPre=\n")
    try:
        run = rig.start("web.service")
        rig.stop("web.service")
        return run.ok
    finally:
        (rig.unit_dir / "web.service.d" / "unguarded.conf").unlink()
        rig.daemon_reload()


def read(log: str) -> str:
    try:
        with open(log) as f:
            return f.read()
    except FileNotFoundError:
        return ""


@pytest.mark.parametrize("pre_prefix", ["", "+"], ids=["guard as the daemon's user", "guard as root"])
def test_a_user_without_the_capability_is_refused(systemd_rig, pre_prefix):
    rig = systemd_rig
    log = web(rig, "User=nobody", pre_prefix, exec_start=SOCAT)
    run = rig.start("web.service")
    out = read(log)
    assert not run.ok and run.pre_status == [13], (run.output, out)
    assert "127.0.0.1:80: " + ("prediction: " if pre_prefix else "") + "permission-denied" in out, out
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in out and "at or above 1024" in out, out
    assert "denied to the daemon (exit 13)" in out
    assert not daemon_alone(rig)  # the kernel agrees: the daemon alone is refused EACCES


def test_a_bounding_set_without_the_capability_is_refused_even_for_root(systemd_rig):
    rig = systemd_rig
    log = web(rig, "CapabilityBoundingSet=~CAP_NET_BIND_SERVICE", "")
    run = rig.start("web.service")
    out = read(log)
    assert not run.ok and run.pre_status == [13], (run.output, out)
    assert "CapabilityBoundingSet=" in out and "permission-denied" in out, out
    assert not daemon_alone(rig)


@pytest.mark.parametrize("settings, pre_prefix, exec_prefix", [
    ("", "+", ""),  # a root daemon binds first (and may drop privileges after)
    ("User=nobody\nAmbientCapabilities=CAP_NET_BIND_SERVICE", "+", ""),
    ("User=nobody\nAmbientCapabilities=CAP_NET_BIND_SERVICE", "", ""),
    ("User=nobody", "+", "!"),  # the daemon changes its credentials itself, after binding
], ids=["root daemon", "ambient capability, guard as root", "ambient capability, guard as the user",
        "ExecStart=! with User="])
def test_a_daemon_that_may_bind_is_not_refused(systemd_rig, settings, pre_prefix, exec_prefix):
    rig = systemd_rig
    log = web(rig, settings, pre_prefix, exec_start=exec_prefix + rig.serve(SPEC))
    run = rig.start("web.service")
    out = read(log)
    assert run.ok and run.pre_status == [0], (run.output, out)
    assert "permission-denied" not in out and "clear: 127.0.0.1:80 can be bound" in out, out


def test_what_the_daemon_runs_is_unknown_so_the_kernel_verdict_stands(systemd_rig):
    # Through a shell the daemon may run anything (authbind, a setuid helper): nothing is
    # claimed, the sockets on the port are judged as before, and a note says why.
    rig = systemd_rig
    log = web(rig, "User=nobody", "", exec_start=f"/bin/sh -c \"exec {rig.serve(SPEC)}\"")
    rig.start("web.service")
    out = read(log)
    assert rig.show("web.service", "ExecStartPre")["ExecStartPre"] and "permission-denied" not in out, out
    assert "runs sh" in out and "prediction from the sockets on the port" in out, out
