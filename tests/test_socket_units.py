"""Issue 14.1: the guard in a .socket unit's ExecStartPre=, which runs before the manager binds
the unit's sockets, under a real systemd user manager (tests/rig.py).

`check --unit %n` with no address reads the socket unit's own ListenStream=/ListenDatagram=
entries and options; its own, not yet bound, sockets are no conflict, and its service is not
its own instance.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import user_units
from rig import TREE_PROGRAM

pytestmark = pytest.mark.integration

PORT = 18090
ADDRESS = f"127.0.0.1:{PORT}"
SPEC = {"host": "127.0.0.1", "port": PORT}
# A user manager sets no $MANAGERPID for a socket unit's commands (systemd 252): --user says which manager.
GUARD = f"{sys.executable} -m bindguard check --user --unit %n"


def guarded_socket(rig, name: str = "web.socket", listen: str = f"ListenStream={ADDRESS}", extra: str = "") -> Path:
    """A socket unit guarded by `check --unit %n` (no address), and its service; returns the guard's log."""
    log = rig.log(f"{name}.log")
    service = name.removesuffix(".socket") + ".service"
    rig.write_unit(service, "[Service]\nExecStart=/bin/sleep infinity\n", reload=False)
    rig.write_unit(name, f"""\
[Socket]
{listen}
ExecStartPre=+{GUARD}
StandardError=append:{log}
{extra}
""")
    return log


def text(log: Path) -> str:
    return log.read_text() if log.exists() else ""


def listening(rig) -> str:
    return rig.run(["ss", "-Hltnp", f"sport = :{PORT}"]).stdout


def test_socket_unit_refused_while_a_service_holds_its_port_then_starts_when_free(systemd_rig):
    rig = systemd_rig
    rig.write_unit("other.service", f"[Service]\nType=notify\nExecStart={rig.serve(SPEC)}\n", reload=False)
    log = guarded_socket(rig, extra="[Install]\nWantedBy=sockets.target\n")
    # enabled: its own file lists the port, which must not count as a socket unit that will claim it
    assert rig.systemctl("enable", "web.socket").returncode == 0
    assert rig.start("other.service").ok
    holder = rig.main_pid("other.service")
    run = rig.start("web.socket")
    assert not run.ok and run.pre_status == [98], (run.output, text(log))
    out = text(log)
    assert f"refusing to start: {ADDRESS} in use (exit 98)" in out
    assert f"PID {holder}" in out and "unit other.service" in out
    assert "systemctl stop other.service" in out

    assert rig.stop("other.service").ok
    log.unlink()
    run = rig.start("web.socket")
    assert run.ok and run.pre_status == [0], (run.output, text(log))
    assert f"clear: {ADDRESS} can be bound" in text(log)
    assert "latent-socket-unit" not in text(log) and "own-instance" not in text(log)
    assert "systemd" in listening(rig)  # the manager bound it after the guard


def test_socket_unit_refused_while_another_socket_unit_holds_its_port_then_starts_when_free(systemd_rig):
    rig = systemd_rig
    rig.write_unit("other.service", "[Service]\nExecStart=/bin/sleep infinity\n", reload=False)
    rig.write_unit("other.socket", f"[Socket]\nListenStream=0.0.0.0:{PORT}\n", reload=False)
    log = guarded_socket(rig)
    assert rig.start("other.socket").ok
    run = rig.start("web.socket")
    assert not run.ok and run.pre_status == [98], (run.output, text(log))
    out = text(log)
    assert "socket-unit" in out and "socket unit other.socket" in out
    assert f"PID {rig.manager_pid}" in out and "systemctl stop other.socket" in out
    assert rig.prop("other.socket", "ActiveState") == "active"

    assert rig.stop("other.socket").ok
    log.unlink()
    run = rig.start("web.socket")
    assert run.ok and run.pre_status == [0], (run.output, text(log))
    assert f"clear: {ADDRESS} can be bound" in text(log)


def test_socket_unit_refused_while_a_stray_process_holds_its_port(systemd_rig):
    rig = systemd_rig
    stray = rig.hold({"proto": "udp", "host": "::1", "port": PORT})
    log = guarded_socket(rig, listen=f"ListenDatagram=[::1]:{PORT}\nListenStream=/run/unused-{PORT}.sock")
    run = rig.start("web.socket")
    assert not run.ok and run.pre_status == [98], (run.output, text(log))
    out = text(log)
    assert f"udp:[::1]:{PORT} in use" in out and f"PID {stray.pid}" in out
    rig.release(stray)
    log.unlink()
    run = rig.start("web.socket")
    assert run.ok and run.pre_status == [0], (run.output, text(log))


def test_socket_units_options_are_the_tried_ones(systemd_rig):
    """BindIPv6Only=ipv6-only beside an IPv4 listener on the same port binds (a dual-stack trial
    would be refused); the report shows the options tried."""
    rig = systemd_rig
    rig.hold({"proto": "tcp", "host": "0.0.0.0", "port": PORT, "reuseaddr": True})
    guarded_socket(rig, listen=f"ListenStream=[::]:{PORT}", extra="BindIPv6Only=ipv6-only\nFreeBind=yes\n")
    done = rig.bindguard("check", "--user", "--unit", "web.socket", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [(a["address"], a["v6only"], a["freebind"], a["reuseaddr"]) for a in report["addresses"]] == \
        [(f"[::]:{PORT}", True, True, True)]
    run = rig.start("web.socket")
    assert run.ok and run.pre_status == [0], run.output


def test_install_guards_a_socket_unit_and_uninstall_removes_it(systemd_rig):
    rig = systemd_rig
    rig.write_unit("web.service", "[Service]\nExecStart=/bin/sleep infinity\n", reload=False)
    rig.write_unit("web.socket", f"[Socket]\nListenStream={ADDRESS}\nListenStream=/run/unused.sock\n")
    done = rig.bindguard("install", "--user", "--program", TREE_PROGRAM, "web.socket")
    assert done.returncode == 0, done.stderr
    assert f"at each start the guard checks {ADDRESS} from web.socket's ListenStream={ADDRESS}" in done.stderr
    dropin = rig.unit_dir / "web.socket.d" / "bindguard.conf"
    assert "\n[Socket]\nExecStartPre=+" in dropin.read_text()
    assert "check --unit web.socket --user" in rig.prop("web.socket", "ExecStartPre")
    stray = rig.hold(SPEC)
    run = rig.start("web.socket")
    assert not run.ok and run.pre_status == [98], run.output
    rig.release(stray)
    assert rig.start("web.socket").ok and rig.stop("web.socket").ok
    assert rig.bindguard("uninstall", "--user", "web.socket").returncode == 0 and not dropin.exists()

    rig.write_unit("local.socket", "[Socket]\nListenStream=/run/local.sock\n")
    done = rig.bindguard("install", "--user", "local.socket")
    assert done.returncode == 64 and "no address to guard for local.socket" in done.stderr, done.stderr


def test_one_dropin_for_every_socket_unit(systemd_rig):
    """systemd/socket.d/bindguard.conf as a top-level socket.d/ drop-in (with --user, as a user
    manager needs): a socket unit whose port is held is refused, one on a free port and one on a
    file system path start."""
    rig = systemd_rig
    shipped = (Path(__file__).resolve().parent.parent / "systemd" / "socket.d" / "bindguard.conf").read_text()
    assert "\n[Socket]\nExecStartPre=+/usr/bin/bindguard check --unit %n\n" in shipped
    src = Path(__file__).resolve().parent.parent / "src"
    dropin = shipped.replace("/usr/bin/bindguard check",
                             f"/usr/bin/env PYTHONPATH={src} {sys.executable} -m bindguard check --user")
    for name, listen in (("web", ADDRESS), ("free", f"127.0.0.1:{PORT + 1}"), ("local", "/run/local.sock")):
        rig.write_unit(f"{name}.service", "[Service]\nExecStart=/bin/sleep infinity\n", reload=False)
        rig.write_unit(f"{name}.socket", f"[Socket]\nListenStream={listen}\n", reload=False)
    rig.write_dropin("socket", "bindguard.conf", dropin)
    stray = rig.hold(SPEC)
    run = rig.start("web.socket")
    assert not run.ok and run.pre_status == [98], run.output
    assert rig.start("free.socket").ok and rig.start("local.socket").ok
    rig.release(stray)
    assert rig.start("web.socket").ok


def test_scan_without_a_bus_reads_enabled_socket_units_from_their_files(netns, tmp_path):
    """scan --no-systemd (or with no bus) covers enabled socket units as the guard's look-ahead
    does: their IP Listen entries from their unit files, beside the units with a bindguard file."""
    config = tmp_path / "bindguard"
    units, env = user_units(tmp_path, config)
    (units / "web.socket").write_text(f"[Socket]\nListenStream={ADDRESS}\nListenStream=/run/web.sock\n"
                                      "[Install]\nWantedBy=sockets.target\n")
    (units / "idle.socket").write_text(f"[Socket]\nListenStream=127.0.0.1:{PORT + 1}\n")  # not enabled
    (units / "sockets.target.wants" / "web.socket").symlink_to(units / "web.socket")
    config.mkdir()
    (config / "api.service.yaml").write_text(f'listen: ["0.0.0.0:{PORT}"]\n')
    done = netns.run([sys.executable, "-m", "bindguard", "scan", "--user", "--no-systemd", "--json"], env=env)
    report = json.loads(done.stdout)
    claims = {(c["unit"], c["address"], c["source"]) for c in report["claims"]}
    assert claims == {("web.socket", ADDRESS, "socket-unit"), ("api.service", f"0.0.0.0:{PORT}", "config")}
    (finding,) = report["findings"]
    assert finding["kind"] == "socket-unit-collision" and finding["units"] == ["api.service", "web.socket"]
    assert done.returncode == 1, done.stderr


def test_bind_to_device_is_tried_as_the_manager_binds_it(netns, tmp_path):
    """BindToDevice= changes the kernel's answer: a socket bound to another device does not block a
    device-bound one, and does block an unbound one. The trial socket gets SO_BINDTODEVICE."""
    netns.ip("link", "add", "d0", "type", "veth", "peer", "name", "d1")
    netns.ip("link", "set", "d0", "up")
    netns.hold({"host": "0.0.0.0", "port": PORT, "reuseaddr": True, "device": "d0"})
    units, env = user_units(tmp_path)
    (units / "onlo.socket").write_text(f"[Socket]\nListenStream={ADDRESS}\nBindToDevice=lo\n")
    (units / "any.socket").write_text(f"[Socket]\nListenStream={ADDRESS}\n")
    onlo = netns.run([sys.executable, "-m", "bindguard", "check", "--user", "--no-systemd", "--json",
                      "--unit", "onlo.socket"], env=env)
    assert onlo.returncode == 0, onlo.stderr
    assert [a["device"] for a in json.loads(onlo.stdout)["addresses"]] == ["lo"]
    unbound = netns.run([sys.executable, "-m", "bindguard", "check", "--user", "--no-systemd",
                         "--unit", "any.socket"], env=env)
    assert unbound.returncode == 98, unbound.stderr


READ_BOTH_WAYS = """
import json, sys
from bindguard.systemd.bus import USER, Systemd
from bindguard.systemd.unitfacts import socket_unit_from_files
with Systemd(USER) as sd:
    over_bus = sd.socket_unit_settings(sys.argv[1])
from_files = socket_unit_from_files(sys.argv[1], True)
print(json.dumps([[sorted(s.listens), s.reuse_port, s.bind_ipv6_only, s.free_bind, s.transparent,
                   s.bind_to_device, s.protocol] for s in (over_bus, from_files)]))
"""


def test_the_manager_and_the_unit_files_say_the_same_about_a_socket_unit(systemd_rig):
    """A socket unit with no file on disk is read over D-Bus (bus.socket_unit_settings): both ways
    give the same entries and options for the same unit."""
    rig = systemd_rig
    rig.write_unit("web.service", "[Service]\nExecStart=/bin/sleep infinity\n", reload=False)
    rig.write_unit("web.socket", f"[Socket]\nListenStream={ADDRESS}\nListenDatagram=[::1]:{PORT}\n"
                                 "ListenStream=/run/web.sock\nReusePort=yes\nBindIPv6Only=ipv6-only\nFreeBind=yes\n"
                                 "Transparent=yes\nBindToDevice=lo\nSocketProtocol=sctp\n")
    done = rig.run([sys.executable, "-c", READ_BOTH_WAYS, "web.socket"])
    assert done.returncode == 0, done.stderr
    over_bus, from_files = json.loads(done.stdout)
    assert over_bus == from_files
    assert from_files == [[["Datagram", f"[::1]:{PORT}"], ["Stream", "/run/web.sock"], ["Stream", ADDRESS]],
                          True, "ipv6-only", True, True, "lo", "sctp"]


def test_what_the_trial_cannot_try_is_named_and_never_refused(netns, tmp_path):
    """SCTP (SocketProtocol=sctp, an IP ListenSequentialPacket=) is not a TCP trial: a TCP listener on
    the same port says nothing about it, so it is a warning, and the start goes on."""
    netns.hold({"host": "127.0.0.1", "port": PORT, "reuseaddr": True})
    units, env = user_units(tmp_path)
    (units / "sctp.socket").write_text(f"[Socket]\nListenStream={ADDRESS}\nSocketProtocol=sctp\n")
    (units / "seq.socket").write_text(f"[Socket]\nListenSequentialPacket={ADDRESS}\n")
    for unit in ("sctp.socket", "seq.socket"):
        done = netns.run([sys.executable, "-m", "bindguard", "check", "--user", "--no-systemd", "--unit", unit],
                         env=env)
        assert done.returncode == 0, done.stderr
        assert f"{unit}'s Listen" in done.stderr and "is an SCTP socket, which the trial bind does not try" \
            in done.stderr
