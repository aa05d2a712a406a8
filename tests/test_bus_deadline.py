"""A bus that accepts connections and never answers (at boot dbus.socket listens before
dbus-daemon runs; a wedged dbus-daemon) costs the guard its D-Bus budget at most, never the
unit's start timeout; and a clear start does not touch the bus at all (issue 9.13).

The silent bus is a real AF_UNIX socket that listens and never answers, where the bus would be:
sd-bus waits 90 s for an answer to its authentication, whatever SYSTEMD_BUS_TIMEOUT says."""

from __future__ import annotations

import os
import select
import signal
import socket
import sys
import time

import pytest

from bindguard.systemd.bus import BUS_BUDGET
from test_discover import need_package

pytestmark = pytest.mark.integration

ADDRESS = "127.0.0.1:18080"
SPEC = {"host": "127.0.0.1", "port": 18080}
MARGIN = 5.0  # the interpreter's start and the rest of the guard's work, on a loaded CI machine
GUARD = f"{sys.executable} -m bindguard check --unit %n"


class SilentBus:
    """A listening unix socket that never accepts, reads or answers; connections queue in the kernel."""

    def __init__(self, path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(64)

    def connected(self) -> bool:
        """Whether anything has connected (a connection waits in the accept queue)."""
        return bool(select.select([self.sock], [], [], 0)[0])

    def close(self) -> None:
        self.sock.close()
        os.unlink(self.path)


@pytest.fixture
def silent_bus(tmp_path):
    bus = SilentBus(tmp_path / "bus")
    yield bus
    bus.close()


def guard_env(tmp_path, bus: SilentBus) -> dict[str, str]:
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=f"unix:path={bus.path}", BINDGUARD_CONFIG_PATH=str(tmp_path / "none"),
               PYTHONPATH=os.pathsep.join(sys.path))
    for name in ("INVOCATION_ID", "MANAGERPID", "SYSTEMD_BUS_TIMEOUT"):
        env.pop(name, None)
    return env


def test_a_held_address_is_refused_within_the_budget(netns, tmp_path, silent_bus):
    holder = netns.hold({**SPEC, "proto": "tcp", "reuseaddr": True})
    started = time.monotonic()
    done = netns.run([sys.executable, "-m", "bindguard", "check", "--unit", "web.service", ADDRESS],
                     env=guard_env(tmp_path, silent_bus), timeout=BUS_BUDGET + 30)
    took = time.monotonic() - started
    assert done.returncode == 98, done.stderr
    assert f"PID {holder.pid}" in done.stderr or "holder.py" in done.stderr
    assert f"the system bus at {silent_bus.path} did not answer" in done.stderr  # the note says why units are unnamed
    assert took < BUS_BUDGET + MARGIN, (took, done.stderr)


def test_a_clear_start_never_opens_the_bus(netns, tmp_path, silent_bus):
    """nginx.service goes to the full command (discovery reads Debian's nginx configuration:
    port 80, free in this namespace); the clear verdict needs nothing from systemd."""
    need_package("nginx", "/usr/sbin/nginx")
    done = netns.run([sys.executable, "-m", "bindguard", "check", "--unit", "nginx.service"],
                     env=guard_env(tmp_path, silent_bus), timeout=BUS_BUDGET + 30)
    assert done.returncode == 0, done.stderr
    assert "0.0.0.0:80" in done.stderr and "can be bound" in done.stderr
    assert not silent_bus.connected(), done.stderr


def test_a_unit_under_a_silent_bus_starts_or_is_refused_in_time(systemd_rig):
    """The guard in a real unit's ExecStartPre=, the rig's session bus replaced by a silent socket.
    TimeoutStartSec= is far above the budget: a guard that waits on the bus fails the start by timeout."""
    rig = systemd_rig
    rig.write_unit("other.service", f"[Service]\nType=notify\nExecStart={rig.serve(SPEC)}\n")
    log = rig.log("web.log")
    rig.write_unit("web.service", f"""\
[Service]
Type=notify
ExecStartPre=+{GUARD} {ADDRESS}
ExecStart={rig.serve(SPEC)}
TimeoutStartSec={BUS_BUDGET + 25:g}
StandardError=append:{log}
""")
    rig.stop_bus()
    (rig.runtime_dir / "bus").unlink(missing_ok=True)  # dbus.socket leaves its socket file behind
    bus = SilentBus(rig.runtime_dir / "bus")
    try:
        assert rig.start("other.service").ok
        started = time.monotonic()
        refused = rig.start("web.service", timeout=BUS_BUDGET + 60)
        took = time.monotonic() - started
        assert refused.pre_status == [98] and refused.result == "exit-code", (refused, log.read_text())
        assert "did not answer" in log.read_text()
        assert took < BUS_BUDGET + MARGIN, (took, log.read_text())

        assert rig.stop("other.service").ok
        started = time.monotonic()
        run = rig.start("web.service", timeout=BUS_BUDGET + 60)
        assert run.ok and run.pre_status == [0], (run, log.read_text())
        assert time.monotonic() - started < MARGIN
    finally:
        bus.close()


def test_a_wedged_manager_costs_the_budget_at_most(systemd_rig):
    """The bus answers, the manager does not (stopped with SIGSTOP): every question times out, and
    the guard stops asking once one has."""
    rig = systemd_rig
    rig.write_unit("other.service", f"[Service]\nType=notify\nExecStart={rig.serve(SPEC)}\n")
    assert rig.start("other.service").ok
    pid = rig.main_pid("other.service")
    os.kill(rig.manager_pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        done = rig.bindguard("check", "--user", "--unit", "web.service", ADDRESS, timeout=BUS_BUDGET + 60)
        took = time.monotonic() - started
    finally:
        os.kill(rig.manager_pid, signal.SIGCONT)
    assert done.returncode == 98, done.stderr
    assert f"PID {pid}" in done.stderr and "other.service" in done.stderr  # named from its cgroup
    assert "the user manager did not answer" in done.stderr
    assert took < BUS_BUDGET + MARGIN, (took, done.stderr)


def test_reuseport_takes_the_units_user_from_its_files(netns, tmp_path, silent_bus):
    """SO_REUSEPORT shares a port within one uid, so the trial socket is made as the unit's User=:
    read from its unit files, not asked of a bus that does not answer."""
    units = tmp_path / "units"
    units.mkdir()
    (units / "asroot.service").write_text("[Service]\nExecStart=/bin/true\n")
    (units / "asnobody.service").write_text("[Service]\nExecStart=/bin/true\nUser=nobody\n")
    env = dict(guard_env(tmp_path, silent_bus), SYSTEMD_UNIT_PATH=str(units))
    netns.hold({**SPEC, "proto": "tcp", "reuseaddr": True, "reuseport": True})  # root's SO_REUSEPORT group
    shared = netns.run([sys.executable, "-m", "bindguard", "check", "--reuseport", "--unit", "asroot", ADDRESS],
                       env=env, timeout=BUS_BUDGET + 30)
    assert shared.returncode == 0, shared.stderr
    assert not silent_bus.connected(), shared.stderr
    refused = netns.run([sys.executable, "-m", "bindguard", "check", "--reuseport", "--unit", "asnobody", ADDRESS],
                        env=env, timeout=BUS_BUDGET + 30)
    assert refused.returncode == 98, refused.stderr


def test_reuseport_with_a_user_the_system_does_not_know_is_no_usage_error(netns, tmp_path, silent_bus):
    """The unit's User= is not the command line's: an unknown one (DynamicUser= without
    libnss-systemd) must not fail the start with a usage error; the trial is the guard's own."""
    units = tmp_path / "units"
    units.mkdir()
    (units / "dynamic.service").write_text("[Service]\nExecStart=/bin/true\nUser=bindguard-no-such-user\n")
    env = dict(guard_env(tmp_path, silent_bus), SYSTEMD_UNIT_PATH=str(units))
    done = netns.run([sys.executable, "-m", "bindguard", "check", "--reuseport", "--unit", "dynamic", ADDRESS],
                     env=env, timeout=BUS_BUDGET + 30)
    assert done.returncode == 0, done.stderr
    assert "User=bindguard-no-such-user is no user this system knows" in done.stderr, done.stderr
