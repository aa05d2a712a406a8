"""The fleet examples, run for real: examples/ansible's role (through bindguard-fleet.yml) with
ansible-playbook against hosts that are network namespaces on this machine, and examples/prometheus
checked by promtool.

Each inventory host uses the local connection with an ansible_python_interpreter that is a small
wrapper, `nsenter --net=/proc/ANCHOR/ns/net -- /usr/bin/python3 "$@"`: every module Ansible runs on
that host, and every command those modules start (`bindguard install`, `bindguard scan`),
runs inside the host's own network namespace and sees only its listeners and its sysctls, as on a
separate machine. One host is the systemd rig (tests/rig.py: its mount and network namespaces), so
the role's daemon-reload handler reaches a real user manager. Hosts share the file system, so each
gets its own bindguard files and drop-in directory.

The role installs bindguard's Debian package with apt from the .deb `./setup.sh --test` built from
this tree (tools/build-deb leaves it in the tree's top directory) and installed, which every other
test runs too. The hosts share one dpkg database: apt leaves the package alone on all three, as on
hosts that run the .deb's version, and one test removes the package first so that the role really
installs it (on one host; the package step is throttled to one host at a time, for one dpkg lock),
putting it back with apt should the role not have.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import NetNS, need, need_root
from test_package import REINSTALL, installed  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
PLAYBOOK = REPO / "examples" / "ansible" / "bindguard-fleet.yml"
RULES = REPO / "examples" / "prometheus" / "bindguard-rules.yml"
RULE_TESTS = REPO / "examples" / "prometheus" / "bindguard-rules.test.yml"
SYSTEM_PYTHON = "/usr/bin/python3"
SYSTEM = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}
PROGRAM = "/usr/bin/bindguard"
SYSTEM_UNITS = Path("/etc/systemd/system")
RECAP = re.compile(r"^(\S+)\s*:\s*ok=\d+\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.MULTILINE)


def _need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        reason = f"{tool} is missing: ./setup.sh --test installs Debian's {package}"
        need(reason)
    return path


@pytest.fixture(scope="module")
def package_deb(installed) -> Path:
    """The .deb tools/build-deb built from this tree, which is the installed package: removing the
    package and installing this .deb leaves the machine as it was."""
    debs = sorted(REPO.glob("bindguard_*_all.deb"))
    assert len(debs) == 1, f"expected the one package tools/build-deb built in {REPO}, found {debs}: {REINSTALL}"
    shipped = subprocess.run(["dpkg-deb", "--info", str(debs[0]), "md5sums"], capture_output=True, text=True, env=SYSTEM)
    assert shipped.returncode == 0, shipped.stderr
    assert shipped.stdout == Path("/var/lib/dpkg/info/bindguard.md5sums").read_text(), \
        f"{debs[0].name} is not the installed package: {REINSTALL}"
    return debs[0]


def _package() -> str | None:
    """The installed bindguard's version, or None."""
    shown = subprocess.run(["dpkg-query", "--show", "--showformat=${Version} ${db:Status-Status}", "bindguard"],
                           capture_output=True, text=True, env=SYSTEM)
    version, _, status = shown.stdout.partition(" ")
    return version if shown.returncode == 0 and status == "installed" else None


@pytest.fixture
def hosts(tmp_path, systemd_rig):
    """host1 and host3: bare network namespaces; host2: the rig, a host with a (user) manager."""
    need_root("hosts as network namespaces")
    made: dict[str, NetNS] = {}
    try:
        for name in ("host1", "host3"):
            made[name] = NetNS()
        yield {"host1": made["host1"], "host2": systemd_rig, "host3": made["host3"]}
    finally:
        for ns in made.values():
            ns.close()


def _inventory(tmp_path: Path, hosts: dict, host_vars: dict[str, dict] | None = None) -> Path:
    """hosts: name -> a NetNS, or for host2 the rig; host_vars: name -> more of the host's variables."""
    entries = {}
    for name, host in hosts.items():
        home = tmp_path / name
        (home / "bindguard").mkdir(parents=True)
        python = home / "python3"
        enter = f"--net={host.path}" if isinstance(host, NetNS) else f"--target={host.manager.pid} --mount --net"
        python.write_text(f'#!/bin/sh\nexec nsenter {enter} -- {SYSTEM_PYTHON} "$@"\n')
        python.chmod(0o755)
        entries[name] = {
            "ansible_python_interpreter": str(python),
            "bindguard_deb_dir": str(home / "deb"),
            "bindguard_environment": {"BINDGUARD_CONFIG_PATH": str(home / "bindguard")},
        } | (host_vars or {}).get(name, {})
    # host2 guards units of its user manager, a service and a socket unit: the drop-ins go to the rig's
    # XDG_CONFIG_HOME, and the handler's daemon-reload reaches the rig's manager
    if "host2" in hosts:
        rig = hosts["host2"]
        entries["host2"]["bindguard_guards"] = [
            {"unit": "web.service", "listen": ["127.0.0.1:80"], "user": True, "check_args": "--wait 10"},
            {"unit": "api.socket", "user": True}]
        entries["host2"]["bindguard_environment"] |= {key: rig.env[key] for key in (
            "HOME", "XDG_CONFIG_HOME", "XDG_RUNTIME_DIR", "DBUS_SESSION_BUS_ADDRESS")}
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(json.dumps({"bindguard": {"hosts": entries, "vars": {
        "ansible_connection": "local", "bindguard_scan_args": ["--no-systemd"],
        "bindguard_package_throttle": 1}}}))  # one dpkg database for all
    return inventory


def _playbook(tmp_path: Path, inventory: Path, deb: Path, report: Path, *args: str) -> subprocess.CompletedProcess:
    config = tmp_path / "ansible.cfg"  # none of the machine's or the user's settings
    config.write_text("[defaults]\n")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "ANSIBLE_", "VIRTUAL_ENV"))}
    env.update(ANSIBLE_HOME=str(tmp_path / "ansible"), ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible" / "local"),
               ANSIBLE_REMOTE_TMP=str(tmp_path / "ansible" / "remote"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_RETRY_FILES_ENABLED="0", ANSIBLE_CONFIG=str(config), ANSIBLE_FORKS="3")
    return subprocess.run(
        [_need("ansible-playbook", "ansible-core"), "-i", str(inventory), str(PLAYBOOK),
         "-e", f"bindguard_deb={deb}", "-e", f"bindguard_report={report}", *args],
        env=env, capture_output=True, text=True, timeout=600)


def _recap(run: subprocess.CompletedProcess) -> dict[str, tuple[int, int, int]]:
    """PLAY RECAP: host -> (changed, unreachable, failed)."""
    return {host: tuple(map(int, counts)) for host, *counts in RECAP.findall(run.stdout)}


@pytest.mark.integration
def test_role_installs_guards_scans_gathers_fails_on_a_conflict_and_changes_nothing_twice(
        hosts, tmp_path, package_deb):
    host1, rig, host3 = hosts.values()
    inventory = _inventory(tmp_path, hosts)
    config1, config2, config3 = (tmp_path / name / "bindguard" for name in hosts)
    (config1 / "a.service.yaml").write_text('listen: ["0.0.0.0:8080"]\n')
    (config1 / "b.service.yaml").write_text('listen: ["[::]:8080"]\noptions: {v6only: false}\n')
    host1.hold({"host": "0.0.0.0", "port": 8080})
    (config2 / "web.service.yaml").write_text('listen: ["127.0.0.1:80"]\n')
    rig.write_unit("web.service", "[Service]\nExecStart=/bin/sleep infinity\n")
    rig.write_unit("api.socket", "[Socket]\nListenStream=127.0.0.1:8081\n")
    rig.hold({"host": "127.0.0.1", "port": 9100})
    (config3 / "cache.service.yaml").write_text('listen: ["127.0.0.1:45000"]\n')
    host3.hold({"proto": "udp", "host": "::1", "port": 5353})
    report_path = tmp_path / "fleet.json"
    dropin, socket_dropin = (Path(rig.env["XDG_CONFIG_HOME"]) / "systemd" / "user" / f"{unit}.d" / "bindguard.conf"
                             for unit in ("web.service", "api.socket"))

    # --check on the hosts without a conflict: the play passes, writes nothing, and says what it would
    dry = _playbook(tmp_path, inventory, package_deb, report_path, "--check", "--diff", "--limit", "host2,host3")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert not dropin.parent.exists() and not socket_dropin.parent.exists() and not report_path.exists()
    assert "changed: [host2] => (item=web.service)" in dry.stdout and "changed: [host2] => (item=api.socket)" \
        in dry.stdout, dry.stdout

    run = _playbook(tmp_path, inventory, package_deb, report_path)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "1 conflict(s): host1: a.service and b.service will collide on port 8080/tcp" in run.stdout
    report = json.loads(report_path.read_text())
    assert set(report["hosts"]) == {"host1", "host2", "host3"}, run.stdout
    assert report["conflicts"] == ["host1: a.service and b.service will collide on port 8080/tcp"]
    ports = {name: sorted(entry["port"] for entry in scan["listeners"]) for name, scan in report["hosts"].items()}
    assert ports == {"host1": [8080], "host2": [9100], "host3": [5353]}  # each scan ran in its own namespace
    assert report["counts"]["host3"]["ephemeral-port"] == 1
    assert report["counts"]["host2"]["conflicts"] == 0
    assert f"ExecStartPre=+{PROGRAM} check --unit %n --user --wait 10 127.0.0.1:80" in dropin.read_text()
    # the handler's daemon-reload made the manager read the drop-in (ansible-core 2.14 prints a handler
    # flushed while hosts took different paths under the next task's header, so ask the manager)
    assert str(dropin) in rig.prop("web.service", "DropInPaths").split()
    assert rig.prop("web.service", "NeedDaemonReload") == "no"
    assert f"[Socket]\nExecStartPre=+{PROGRAM} check --unit %n --user\n" in socket_dropin.read_text()
    assert str(socket_dropin) in rig.prop("api.socket", "DropInPaths").split()

    again = _playbook(tmp_path, inventory, package_deb, report_path)
    assert again.returncode == 2, again.stdout + again.stderr
    assert _recap(again) == {"host1": (0, 0, 1), "host2": (0, 0, 0), "host3": (0, 0, 0)}, again.stdout
    assert "RUNNING HANDLER" not in again.stdout
    # the package step was "ok", never "changed", on every run: the installed version is the .deb's
    for output in (run.stdout, again.stdout):
        step = output.split("TASK [bindguard : bindguard's Debian package]")[1].split("TASK [")[0]
        assert "changed:" not in step and step.count("ok: [") == 3, step


def _restore(deb: Path, version: str | None) -> None:
    """Put the package back as setup.sh installs it, whatever the test left, and fail when the machine
    is not left with the version it had."""
    restored = None
    if _package() is None:
        restored = subprocess.run(["apt-get", "install", "-y", "-qq", f"./{deb.name}"], cwd=deb.parent,
                                  capture_output=True, text=True, env=SYSTEM, timeout=300)
    shown = subprocess.run(["dpkg-query", "-W", "--showformat=${Version}", "bindguard"],
                           capture_output=True, text=True, env=SYSTEM)
    assert shown.returncode == 0 and shown.stdout == version, \
        f"bindguard {version} is not installed again ({shown.stdout or shown.stderr.strip()}): " + (
            restored.stdout + restored.stderr if restored is not None else "apt-get did not run") + f"; {REINSTALL}"


@pytest.mark.integration
def test_role_installs_the_package_with_apt(tmp_path, package_deb):
    need_root("a host as a network namespace, and dpkg")
    version = _package()
    host = NetNS()
    try:
        inventory = _inventory(tmp_path, {"host1": host})
        try:
            # dpkg refuses to remove a package another installed package depends on
            removed = subprocess.run(["dpkg", "--remove", "bindguard"], capture_output=True, text=True, env=SYSTEM)
            assert removed.returncode == 0, removed.stdout + removed.stderr
            assert _package() is None and not Path(PROGRAM).exists()
            run = _playbook(tmp_path, inventory, package_deb, tmp_path / "fleet.json")
            assert run.returncode == 0, run.stdout + run.stderr
            step = run.stdout.split("TASK [bindguard : bindguard's Debian package]")[1].split("TASK [")[0]
            assert "changed: [host1]" in step, step
            assert _package() == version and os.access(PROGRAM, os.X_OK)
            assert "ok: [host1]" in run.stdout.split("TASK [bindguard : Scan the host]")[1].split("TASK [")[0]
        finally:
            _restore(package_deb, version)
    finally:
        host.close()


@pytest.mark.integration
def test_role_reloads_the_system_manager_for_a_guard_without_user_and_names_its_program(tmp_path, package_deb):
    """A guard without `user:` (a system unit, as inventory.example.yml's) notifies the handler, which
    picks the system manager. In --check, which writes no drop-in into this machine's
    /etc/systemd/system and reloads no manager: the handler's loop is templated all the same, and the
    module it runs only says what it would do. The drop-in names bindguard_program, here a copy of
    the package's program."""
    need_root("a host as a network namespace")
    host = NetNS()
    unit = "bindguard-fleet-test.service"
    program = tmp_path / "bin" / "bindguard"
    program.parent.mkdir()
    shutil.copy2(PROGRAM, program)
    try:
        inventory = _inventory(tmp_path, {"host1": host}, {"host1": {
            "bindguard_guards": [{"unit": unit, "listen": ["127.0.0.1:8080"]}], "bindguard_program": str(program)}})
        run = _playbook(tmp_path, inventory, package_deb, tmp_path / "fleet.json", "--check", "-v")
        assert run.returncode == 0, run.stdout + run.stderr
        assert f"changed: [host1] => (item={unit})" in run.stdout, run.stdout
        assert f"ExecStartPre=+{program} check --unit %n 127.0.0.1:8080" in run.stdout, run.stdout
        handler = run.stdout.split("RUNNING HANDLER [bindguard : bindguard daemon-reload]")[1].split("TASK [")[0]
        assert "ok: [host1] => (item=system)" in handler and "item=user" not in handler, handler
        assert not (SYSTEM_UNITS / f"{unit}.d").exists()
    finally:
        host.close()


def test_prometheus_alert_rules_pass_promtool():
    promtool = _need("promtool", "prometheus")
    checked = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 4 rules found" in checked.stdout
    tested = subprocess.run([promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                            cwd=RULE_TESTS.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
