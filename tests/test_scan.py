"""bindguard scan: port ranges and metrics on plain data; the scan itself in real network namespaces
(hosts with real listeners and bindguard files) and under a real systemd user manager (the rig)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from bindguard.evidence import owners
from bindguard.action import scan
from bindguard.report import scan as render
from bindguard.model.hostmap import UnitState
from bindguard.verdict import scan as verdict
from bindguard.verdict.scan import merge_ranges, parse_port_ranges, reserved_with
from bindguard.model.kinds import FindingKind

BINDGUARD = [sys.executable, "-m", "bindguard"]


# --- plain data ----------------------------------------------------------------------------


def test_reserved_ports_are_merged_with_what_is_reserved():
    assert parse_port_ranges("") == []
    assert parse_port_ranges("8080, 9000-9010,9011,1000") == [(1000, 1000), (8080, 8080), (9000, 9011)]
    assert merge_ranges([(5, 9), (1, 3), (4, 4)]) == [(1, 9)]
    assert reserved_with("", [8081, 8080]) == "8080-8081"
    assert reserved_with("1000,40005", [40004]) == "1000,40004-40005"
    assert reserved_with("40000-40010", [40003]) == "40000-40010"
    assert reserved_with("22,80", [443]) == "22,80,443"


def _sample_scan() -> scan.Scan:
    result = scan.Scan(scanned_at=1795486567.125)
    result.findings = [
        verdict.Finding(FindingKind.UNIT_COLLISION, "a and b", (), "fix", "tcp", 80, ("a.service", "b.service")),
        verdict.Finding(FindingKind.EPHEMERAL_PORT, "port", (), "fix", "tcp", 40000, ("c.service",)),
        verdict.Finding(FindingKind.RESTART_LOOP, "loop", (), "fix", None, None, ('we"ird.service',)),
    ]
    result.units = [UnitState('we"ird.service', n_restarts=7)]
    return result


def test_prometheus_text_has_help_type_and_every_kind():
    text = render.prometheus_text(_sample_scan())
    assert 'bindguard_conflicts{kind="unit-collision"} 1' in text
    assert 'bindguard_conflicts{kind="socket-unit-collision"} 0' in text
    assert "bindguard_listeners_without_unit 0" in text
    assert "bindguard_ports_in_ephemeral_range 1" in text
    assert "bindguard_restart_loops 1" in text
    assert 'bindguard_restart_loop_restarts{unit="we\\"ird.service"} 7' in text
    assert 'bindguard_ephemeral_port{port="40000",unit="c.service"} 1' in text
    assert "bindguard_last_scan_timestamp_seconds 1795486567.125" in text
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    assert names == {line.split()[2] for line in text.splitlines() if line.startswith("# HELP")}
    for name in names:
        assert f"# TYPE {name} gauge" in text


def test_prometheus_text_passes_promtool(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: ./setup.sh --test installs Debian's prometheus package")
    done = subprocess.run([promtool, "check", "metrics"], input=render.prometheus_text(_sample_scan()),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_write_prometheus_replaces_the_file_atomically(tmp_path, monkeypatch):
    target = tmp_path / "bindguard.prom"
    target.write_text("old\n")
    renames = []
    real_replace = os.replace

    def spy(source, destination, *, src_dir_fd, dst_dir_fd):  # names within one directory descriptor
        directory = os.readlink(f"/proc/self/fd/{src_dir_fd}")
        renames.append((directory, source, os.path.join(os.readlink(f"/proc/self/fd/{dst_dir_fd}"), destination)))
        assert target.read_text() == "old\n"  # the reader sees the old file until the rename
        real_replace(source, destination, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

    monkeypatch.setattr(os, "replace", spy)
    render.write_prometheus(_sample_scan(), str(target))
    assert renames == [(str(tmp_path), renames[0][1], str(target))]
    assert renames[0][1].startswith(".bindguard.prom.") and renames[0][1].endswith(".tmp")
    assert target.read_text().startswith("# HELP bindguard_conflicts")
    assert oct(target.stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bindguard.prom"]


# --- a host: a network namespace with real listeners and bindguard files --------------------


def _write(directory, name: str, text: str) -> None:
    (directory / name).write_text(text)


def _scan(ns, config_dir, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, BINDGUARD_CONFIG_PATH=str(config_dir))
    env.pop("SYSTEMD_LOG_LEVEL", None)
    return ns.run([*BINDGUARD, "scan", "--no-systemd", *args], env=env)


def _own_service() -> str | None:
    """The service this test process runs in, if any (then its children are in it too)."""
    unit = owners.unit_from_cgroup(owners.process_cgroup(os.getpid()) or "")
    return unit if unit and unit.endswith(".service") else None


@pytest.mark.integration
def test_scan_finds_collisions_unclaimed_listeners_and_ephemeral_ports(netns, tmp_path):
    config = tmp_path / "bindguard"
    config.mkdir()
    _write(config, "a.service.yaml", 'listen: ["0.0.0.0:8080"]\n')
    _write(config, "b.service.yaml", 'listen: ["[::]:8080"]\noptions: {v6only: false}\n')  # dual-stack
    _write(config, "c.service.yaml", 'listen: ["0.0.0.0:9090"]\n')
    _write(config, "d.service.yaml", 'listen: ["127.0.0.1:9090"]\n')  # wildcard vs specific
    _write(config, "e.service.yaml", 'listen: ["[::]:7070"]\noptions: {v6only: true}\n')
    _write(config, "f.service.yaml", 'listen: ["0.0.0.0:7070"]\n')  # v6only: no overlap
    _write(config, "g.service.yaml", 'listen: ["127.0.0.1:6060"]\n')
    _write(config, "h.service.yaml", 'listen: ["[::1]:6060"]\n')  # different families: no overlap
    _write(config, "eph.service.yaml", 'listen: ["udp:127.0.0.1:40004"]\n')
    netns.sysctl("net.ipv4.ip_local_port_range", "40000 50000")
    netns.sysctl("net.ipv4.ip_local_reserved_ports", "1000,40005")
    netns.hold({"host": "0.0.0.0", "port": 5555}, {"proto": "udp", "host": "::1", "port": 5353})

    done = _scan(netns, config, "--json")
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["needs_attention"] is True and report["exit_code"] == 1
    collisions = [(f["port"], f["units"]) for f in report["findings"] if f["kind"] == "unit-collision"]
    assert collisions == [(8080, ["a.service", "b.service"]), (9090, ["c.service", "d.service"])]
    collision = next(f for f in report["findings"] if f["kind"] == "unit-collision")
    assert any("dual-stack" in e and "b.service.yaml:1:10" in e for e in collision["evidence"])

    ephemeral = [f for f in report["findings"] if f["kind"] == "ephemeral-port"]
    assert [(f["port"], f["units"]) for f in ephemeral] == [(40004, ["eph.service"])]
    assert "`sysctl -w net.ipv4.ip_local_reserved_ports=1000,40004-40005`" in ephemeral[0]["fix"]
    assert "net.ipv4.ip_local_reserved_ports = 1000,40004-40005` in /etc/sysctl.d/" in ephemeral[0]["fix"]
    assert report["ephemeral_port_range"] == [40000, 50000] and report["reserved_ports"] == "1000,40005"

    listeners = {(entry["proto"], entry["address"]): entry for entry in report["listeners"]}
    assert set(listeners) == {("tcp", "0.0.0.0:5555"), ("udp", "[::1]:5353")}
    holder = listeners[("tcp", "0.0.0.0:5555")]
    assert holder["pid"] == netns.processes[-1].pid and "holder.py" in holder["command"]
    unclaimed = sorted(f["addresses"][0] for f in report["findings"] if f["kind"] == "unclaimed-listener")
    if _own_service() is None:
        assert unclaimed == ["0.0.0.0:5555", "udp:[::1]:5353"]
        assert report["counts"]["unclaimed-listener"] == 2
    else:
        assert unclaimed == [] and holder["unit"] == _own_service()
    assert report["counts"]["conflicts"] == 2


@pytest.mark.integration
def test_scan_table_is_sorted_by_port_and_the_prometheus_file_is_written(netns, tmp_path):
    config = tmp_path / "bindguard"
    config.mkdir()
    _write(config, "web.service.yaml", 'listen: ["0.0.0.0:8443", "127.0.0.1:80"]\n')
    netns.hold({"host": "127.0.0.1", "port": 9000}, {"host": "::", "port": 22, "v6only": True})
    prom = tmp_path / "textfile" / "bindguard.prom"
    prom.parent.mkdir()
    done = _scan(netns, config, "--prometheus", str(prom))
    lines = done.stdout.splitlines()
    assert lines[0].split()[:4] == ["PORT", "ADDRESS", "STATE", "PID"]
    assert [line.split()[0] for line in lines[1:]] == ["22/tcp", "80/tcp", "8443/tcp", "9000/tcp"]
    assert "not listening" in lines[2] and "web.service" in lines[2]
    text = prom.read_text()
    assert "bindguard_conflicts{kind=\"unit-collision\"} 0" in text
    assert "bindguard_listeners 2" in text
    assert float(text.split("\nbindguard_last_scan_timestamp_seconds ")[1]) == pytest.approx(time.time(), abs=60)
    assert sorted(p.name for p in prom.parent.iterdir()) == ["bindguard.prom"]

    missing = _scan(netns, config, "--prometheus", str(tmp_path / "nope" / "x.prom"))
    assert missing.returncode == 64 and "directory" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.integration
def test_scan_of_a_quiet_host_needs_no_attention(netns, tmp_path):
    done = _scan(netns, tmp_path, "--quiet")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert "nothing needs attention (0 listeners, 0 declared addresses)" in done.stderr
    no_bus = netns.run([*BINDGUARD, "scan", "--system", "--quiet"], env=dict(
        os.environ, BINDGUARD_CONFIG_PATH=str(tmp_path), DBUS_SYSTEM_BUS_ADDRESS=f"unix:path={tmp_path}/no-bus"))
    assert no_bus.returncode == 0, no_bus.stderr
    assert "  note: cannot connect to the system bus" in no_bus.stderr
    assert "only units with a bindguard file and enabled socket units" in no_bus.stderr


@pytest.mark.integration
def test_a_broken_bindguard_file_is_a_finding_not_a_crash(netns, tmp_path):
    _write(tmp_path, "bad.service.yaml", "lisen: [80]\n")
    done = _scan(netns, tmp_path, "--json")
    assert done.returncode == 1
    finding = json.loads(done.stdout)["findings"][0]
    assert finding["kind"] == "config-error" and "did you mean 'listen'" in finding["evidence"][0]


# --- under a real systemd user manager ------------------------------------------------------


@pytest.mark.integration
def test_scan_under_systemd_units_socket_units_and_restart_loops(systemd_rig, tmp_path):
    rig = systemd_rig
    config = rig.root / "bindguard"
    config.mkdir()
    wanted = "[Install]\nWantedBy=default.target\n"
    # web listens now (nothing declares it); other is enabled and declares a dual-stack [::]:18080.
    rig.write_unit("web.service", f"[Service]\nType=notify\nExecStart={rig.serve({'host': '127.0.0.1', 'port': 18080})}\n",
                   reload=False)
    rig.write_unit("other.service", "[Service]\nExecStart=/bin/sleep infinity\n" + wanted, reload=False)
    (config / "other.service.yaml").write_text('listen: ["[::]:18080"]\noptions: {v6only: false}\n')
    # demo.socket listens for demo.service; rogue.service (enabled) declares the same port.
    rig.write_unit("demo.socket", "[Socket]\nListenStream=127.0.0.1:18090\n", reload=False)
    rig.write_unit("demo.service", "[Service]\nExecStart=/bin/sleep infinity\n", reload=False)
    rig.write_unit("rogue.service", "[Service]\nExecStart=/bin/sleep infinity\n" + wanted, reload=False)
    (config / "rogue.service.yaml").write_text('listen: ["0.0.0.0:18090"]\n')
    # act.socket passes its socket to act.service, which declares it: fine. The port is ephemeral.
    rig.write_unit("act.socket", "[Socket]\nListenStream=127.0.0.1:40100\n", reload=False)
    rig.write_unit("act.service", "[Service]\nExecStart=/bin/sleep infinity\n", reload=False)
    (config / "act.service.yaml").write_text('listen: ["127.0.0.1:40100"]\n')
    # loop.service is refused by its ExecStartPre= (exit 98) and restarts until the start limit
    # stops it, so that the scan does not race a restart in progress.
    rig.write_unit("loop.service", "[Unit]\nStartLimitIntervalSec=60\nStartLimitBurst=3\n[Service]\n"
                   "ExecStartPre=/bin/sh -c 'exit 98'\nExecStart=/bin/sleep infinity\nRestart=on-failure\n"
                   "RestartSec=200ms\n")
    rig.run(["sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 50000"], check=True)
    assert rig.start("web.service").ok and rig.start("demo.socket").ok and rig.start("act.socket").ok
    assert rig.systemctl("enable", "other.service", "rogue.service").returncode == 0
    assert rig.systemctl("start", "--no-block", "loop.service").returncode == 0
    deadline = time.monotonic() + 20
    while rig.prop("loop.service", "ActiveState") != "failed" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert int(rig.prop("loop.service", "NRestarts")) >= 2
    stray = rig.hold({"host": "127.0.0.1", "port": 18070})

    done = rig.run(["env", f"BINDGUARD_CONFIG_PATH={config}", *BINDGUARD, "scan", "--user", "--json",
                    "--prometheus", str(rig.root / "bindguard.prom")])
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["systemd_bus"] == "user" and report["notes"] == []
    findings = {(f["kind"], f["port"]): f for f in report["findings"]}

    collision = findings[("unit-collision", 18080)]
    assert collision["units"] == ["other.service", "web.service"]
    assert any(e.startswith("web.service listens on 127.0.0.1:18080 (PID") for e in collision["evidence"])

    socket_collision = findings[("socket-unit-collision", 18090)]
    assert socket_collision["units"] == ["demo.socket", "rogue.service"]
    assert "never both" in socket_collision["fix"] and "systemctl disable --now demo.socket" in socket_collision["fix"]
    assert ("socket-unit-collision", 40100) not in findings and ("unit-collision", 40100) not in findings

    ephemeral = findings[("ephemeral-port", 40100)]
    assert ephemeral["units"] == ["act.socket", "act.service"]
    assert "net.ipv4.ip_local_reserved_ports=40100`" in ephemeral["fix"]

    loop = next(f for f in report["findings"] if f["kind"] == "restart-loop")
    assert loop["units"] == ["loop.service"]
    assert any("ExecStartPre=/bin/sh -c exit 98 exited 98" in e for e in loop["evidence"])
    assert "RestartPreventExitStatus= does not see ExecStartPre= exit codes" in loop["fix"]
    assert "StartLimitBurst=" in loop["fix"]

    listeners = {entry["address"]: entry for entry in report["listeners"]}
    assert listeners["127.0.0.1:18090"]["held_by_manager"] is True
    assert listeners["127.0.0.1:18090"]["socket_unit"] == "demo.socket"
    assert listeners["127.0.0.1:18080"]["unit"] == "web.service"
    assert listeners["127.0.0.1:18080"]["pid"] == rig.main_pid("web.service")
    unclaimed = [f for f in report["findings"] if f["kind"] == "unclaimed-listener"]
    assert [f["addresses"] for f in unclaimed] == ([["127.0.0.1:18070"]] if _own_service() is None else [])
    assert stray.poll() is None  # scan changes nothing

    text = (rig.root / "bindguard.prom").read_text()
    assert 'bindguard_conflicts{kind="unit-collision"} 1' in text
    assert 'bindguard_conflicts{kind="socket-unit-collision"} 1' in text
    assert "bindguard_restart_loops 1" in text
    assert 'bindguard_restart_loop_restarts{unit="loop.service"}' in text

    table = rig.run(["env", f"BINDGUARD_CONFIG_PATH={config}", *BINDGUARD, "scan", "--user"])
    assert "demo.socket (systemd)" in table.stdout
    assert "bindguard: scan: socket-unit-collision on 18090/tcp" in table.stderr


@pytest.mark.integration
def test_unit_facts_adapter_reads_what_discovery_needs(systemd_rig, monkeypatch):
    from bindguard.systemd.bus import USER, Systemd

    rig = systemd_rig
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", rig.bus_address)
    monkeypatch.setenv("SYSTEMD_BUS_TIMEOUT", "10s")
    rig.write_unit("api.socket", "[Socket]\nListenStream=127.0.0.1:18111\nListenDatagram=[::1]:18112\n"
                   "ListenStream=%t/api.sock\n", reload=False)
    rig.write_unit("api.service", f"""\
[Service]
Type=oneshot
ExecStart=/usr/bin/env api --port 18110
ExecStart=@/usr/sbin/nginx nginx-worker -g daemon off;
Environment=A=1
EnvironmentFile=-{rig.root}/api.env
User=nobody
Group=nogroup
""")
    assert rig.start("api.socket").ok  # loaded units: the running socket unit references its service
    with Systemd(USER) as sd:
        calls = []
        ask = sd._call
        monkeypatch.setattr(sd, "_call", lambda path, iface, method, *a, **k: (calls.append(method),
                                                                               ask(path, iface, method, *a, **k))[1])
        facts = sd.unit_facts("api.service")
        assert calls.count(b"LoadUnit") == 2, calls  # the service's, and its socket unit's
        assert [u for u, load, active in sd.list_units("api.*")] == ["api.service", "api.socket"]
    assert facts.exec_start == [["/usr/bin/env", "api", "--port", "18110"],
                                ["/usr/sbin/nginx", "-g", "daemon", "off;"]]  # @: argv[0] only names it
    assert facts.environment == ["A=1"] and facts.environment_files == [f"-{rig.root}/api.env"]
    assert (facts.user, facts.group) == ("nobody", "nogroup")
    assert facts.socket_listens == [("Stream", "127.0.0.1:18111", "api.socket", "default", False),
                                    ("Datagram", "[::1]:18112", "api.socket", "default", False)]
