"""The fleet examples, run for real: examples/ansible's role (through bindguard-fleet.yml) with
ansible-playbook against hosts that are network namespaces on this machine, and examples/prometheus
checked by promtool.

Each inventory host uses the local connection with an ansible_python_interpreter that is a small
wrapper, `nsenter --net=/proc/ANCHOR/ns/net -- /usr/bin/python3 "$@"`: every module Ansible runs on
that host, and every command those modules start (`bindguard install --print`, `bindguard scan`),
runs inside the host's own network namespace and sees only its listeners and its sysctls, as on a
separate machine. One host is the systemd rig (tests/rig.py: its mount and network namespaces), so
the role's daemon-reload handler reaches a real user manager. Hosts share the file system, so each
gets its own bindguard files and drop-in directory.

The role installs bindguard's Debian package with apt, and the package on this machine is the one
`./setup.sh --test` built from this tree, which every other test runs too: replacing it here would
change it under them. So the role is handed a .deb that carries the installed package's name and
version (and nothing else), which apt leaves alone exactly as it leaves a host alone that already
runs the version it is given; the test checks that the package step reports no change.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REQUIRE, NetNS, need_root

REPO = Path(__file__).resolve().parent.parent
PLAYBOOK = REPO / "examples" / "ansible" / "bindguard-fleet.yml"
RULES = REPO / "examples" / "prometheus" / "bindguard-rules.yml"
RULE_TESTS = REPO / "examples" / "prometheus" / "bindguard-rules.test.yml"
SYSTEM_PYTHON = "/usr/bin/python3"
PROGRAM = "/usr/bin/bindguard"
RECAP = re.compile(r"^(\S+)\s*:\s*ok=\d+\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.MULTILINE)


def _need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        reason = f"{tool} is missing: ./setup.sh --test installs Debian's {package}"
        if REQUIRE:
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="module")
def installed_version_deb(tmp_path_factory) -> Path:
    """A .deb with the name, version and architecture of the installed bindguard package and no files."""
    fields = subprocess.run(["dpkg-query", "--show", "--showformat=${Version} ${Architecture} ${Status}", "bindguard"],
                            capture_output=True, text=True)
    if fields.returncode != 0 or not fields.stdout.endswith("installed"):
        pytest.fail("the bindguard package is not installed: ./setup.sh --test builds it from this tree and installs it")
    version, architecture = fields.stdout.split()[:2]
    root = tmp_path_factory.mktemp("deb")
    (root / "pkg" / "DEBIAN").mkdir(parents=True)
    (root / "pkg" / "DEBIAN" / "control").write_text(
        f"Package: bindguard\nVersion: {version}\nArchitecture: {architecture}\n"
        "Maintainer: The bindguard developers <bindguard@example.org>\n"
        "Description: the installed bindguard's name and version, for tests/test_fleet.py\n")
    deb = root / f"bindguard_{version}_{architecture}.deb"
    built = subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root / "pkg"), str(deb)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    return deb


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


def _inventory(tmp_path: Path, hosts: dict) -> Path:
    entries = {}
    for name, host in hosts.items():
        home = tmp_path / name
        (home / "bindguard").mkdir(parents=True)
        python = home / "python3"
        enter = f"--target={host.manager.pid} --mount --net" if name == "host2" else f"--net={host.path}"
        python.write_text(f'#!/bin/sh\nexec nsenter {enter} -- {SYSTEM_PYTHON} "$@"\n')
        python.chmod(0o755)
        entries[name] = {
            "ansible_python_interpreter": str(python),
            "bindguard_deb_dir": str(home / "deb"),
            "bindguard_environment": {"BINDGUARD_CONFIG_PATH": str(home / "bindguard")},
        }
    # host2 guards a unit of its user manager: the drop-in goes to the rig's XDG_CONFIG_HOME, and the
    # handler's daemon-reload reaches the rig's manager
    rig = hosts["host2"]
    entries["host2"]["bindguard_guards"] = [{"unit": "web.service", "listen": ["127.0.0.1:80"], "user": True,
                                             "check_args": "--wait 10"}]
    entries["host2"]["bindguard_environment"] |= {key: rig.env[key] for key in (
        "HOME", "XDG_CONFIG_HOME", "XDG_RUNTIME_DIR", "DBUS_SESSION_BUS_ADDRESS")}
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(json.dumps({"bindguard": {"hosts": entries, "vars": {
        "ansible_connection": "local", "bindguard_scan_args": ["--no-systemd"]}}}))
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
        hosts, tmp_path, installed_version_deb):
    host1, rig, host3 = hosts.values()
    inventory = _inventory(tmp_path, hosts)
    config1, config2, config3 = (tmp_path / name / "bindguard" for name in hosts)
    (config1 / "a.service.yaml").write_text('listen: ["0.0.0.0:8080"]\n')
    (config1 / "b.service.yaml").write_text('listen: ["[::]:8080"]\noptions: {v6only: false}\n')
    host1.hold({"host": "0.0.0.0", "port": 8080})
    (config2 / "web.service.yaml").write_text('listen: ["127.0.0.1:80"]\n')
    rig.write_unit("web.service", "[Service]\nExecStart=/bin/sleep infinity\n")
    rig.hold({"host": "127.0.0.1", "port": 9100})
    (config3 / "cache.service.yaml").write_text('listen: ["127.0.0.1:45000"]\n')
    host3.hold({"proto": "udp", "host": "::1", "port": 5353})
    report_path = tmp_path / "fleet.json"
    dropin = Path(rig.env["XDG_CONFIG_HOME"]) / "systemd" / "user" / "web.service.d" / "bindguard.conf"

    # --check on the hosts without a conflict: the play passes, writes nothing, and says what it would
    dry = _playbook(tmp_path, inventory, installed_version_deb, report_path, "--check", "--diff", "--limit", "host2,host3")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert not dropin.exists() and not report_path.exists()
    assert re.search(r"changed: \[host2\] => \(item=\S+/web.service.d\)", dry.stdout), dry.stdout

    run = _playbook(tmp_path, inventory, installed_version_deb, report_path)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "1 conflict(s): host1: a.service and b.service will collide on port 8080/tcp" in run.stdout
    report = json.loads(report_path.read_text())
    assert set(report["hosts"]) == {"host1", "host2", "host3"}
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

    again = _playbook(tmp_path, inventory, installed_version_deb, report_path)
    assert again.returncode == 2, again.stdout + again.stderr
    assert _recap(again) == {"host1": (0, 0, 1), "host2": (0, 0, 0), "host3": (0, 0, 0)}, again.stdout
    assert "RUNNING HANDLER" not in again.stdout
    # the package step was "ok", never "changed", on every run: the installed version is the .deb's
    for output in (run.stdout, again.stdout):
        step = output.split("TASK [bindguard : bindguard's Debian package]")[1].split("TASK [")[0]
        assert "changed:" not in step and step.count("ok: [") == 3, step


def test_prometheus_alert_rules_pass_promtool():
    promtool = _need("promtool", "prometheus")
    checked = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 4 rules found" in checked.stdout
    tested = subprocess.run([promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                            cwd=RULE_TESTS.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
