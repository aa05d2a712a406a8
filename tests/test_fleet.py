"""The fleet examples, run for real: examples/ansible/bindguard-fleet.yml with ansible-playbook against
hosts that are network namespaces on this machine, and examples/prometheus checked by promtool.

Each inventory host uses the local connection with an ansible_python_interpreter that is a small
wrapper, `nsenter --net=/proc/ANCHOR/ns/net -- /usr/bin/python3 "$@"`: every module Ansible runs on
that host, and every command those modules start (the pip install, `bindguard scan`), runs inside
the host's own network namespace and sees only its listeners and its sysctls, as on a separate
machine. Hosts share the file system, so each gets its own install prefix and bindguard files.
"""

from __future__ import annotations

import json
import os
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


def _need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        reason = f"{tool} is missing: ./setup.sh --test installs Debian's {package}"
        if REQUIRE:
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """bindguard's wheel, built offline by setuptools' PEP 517 backend from a copy of the source."""
    build = tmp_path_factory.mktemp("build")
    for directory in ("src", "bin"):
        shutil.copytree(REPO / directory, build / directory, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, build / name)
    done = subprocess.run([SYSTEM_PYTHON, "-c", "from setuptools import build_meta; print(build_meta.build_wheel('dist'))"],
                          cwd=build, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return build / "dist" / done.stdout.strip().splitlines()[-1]


@pytest.fixture
def hosts(tmp_path):
    need_root("hosts as network namespaces")
    made: dict[str, NetNS] = {}
    try:
        for name in ("host1", "host2", "host3"):
            made[name] = NetNS()
        yield made
    finally:
        for ns in made.values():
            ns.close()


def _inventory(tmp_path: Path, hosts: dict[str, NetNS]) -> Path:
    entries = {}
    for name, ns in hosts.items():
        home = tmp_path / name
        (home / "bindguard").mkdir(parents=True)
        python = home / "python3"
        python.write_text(f'#!/bin/sh\nexec nsenter --net={ns.path} -- {SYSTEM_PYTHON} "$@"\n')
        python.chmod(0o755)
        entries[name] = {
            "ansible_python_interpreter": str(python),
            "bindguard_prefix": str(home / "venv"),
            "bindguard_environment": {"BINDGUARD_CONFIG_PATH": str(home / "bindguard")},
        }
    # host2 guards a user unit: the drop-in goes to its own XDG_CONFIG_HOME; no manager answers the reload
    entries["host2"]["bindguard_guards"] = [{"unit": "web.service", "listen": ["127.0.0.1:80"], "user": True,
                                             "check_args": "--wait 10"}]
    entries["host2"]["bindguard_environment"] |= {
        "XDG_CONFIG_HOME": str(tmp_path / "host2" / "config"), "XDG_RUNTIME_DIR": str(tmp_path / "host2"),
        "DBUS_SESSION_BUS_ADDRESS": f"unix:path={tmp_path}/host2/no-bus"}
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(json.dumps({"bindguard": {"hosts": entries, "vars": {
        "ansible_connection": "local", "bindguard_link": "", "bindguard_scan_args": "--no-systemd"}}}))
    return inventory


def _playbook(tmp_path: Path, inventory: Path, wheel: Path, report: Path, *args: str) -> subprocess.CompletedProcess:
    config = tmp_path / "ansible.cfg"  # none of the machine's or the user's settings
    config.write_text("[defaults]\n")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "ANSIBLE_", "VIRTUAL_ENV"))}
    env.update(ANSIBLE_HOME=str(tmp_path / "ansible"), ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible" / "local"),
               ANSIBLE_REMOTE_TMP=str(tmp_path / "ansible" / "remote"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_RETRY_FILES_ENABLED="0", ANSIBLE_CONFIG=str(config), ANSIBLE_FORKS="3")
    return subprocess.run(
        [_need("ansible-playbook", "ansible-core"), "-i", str(inventory), str(PLAYBOOK),
         "-e", f"bindguard_wheel={wheel}", "-e", f"bindguard_report={report}", *args],
        env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.integration
def test_playbook_installs_scans_gathers_and_fails_on_a_conflict(hosts, tmp_path, wheel):
    host1, host2, host3 = hosts.values()
    inventory = _inventory(tmp_path, hosts)
    config1, config2, config3 = (tmp_path / name / "bindguard" for name in hosts)
    (config1 / "a.service.yaml").write_text('listen: ["0.0.0.0:8080"]\n')
    (config1 / "b.service.yaml").write_text('listen: ["[::]:8080"]\noptions: {v6only: false}\n')
    host1.hold({"host": "0.0.0.0", "port": 8080})
    (config2 / "web.service.yaml").write_text('listen: ["127.0.0.1:80"]\n')
    host2.hold({"host": "127.0.0.1", "port": 9100})
    (config3 / "cache.service.yaml").write_text('listen: ["127.0.0.1:45000"]\n')
    host3.hold({"proto": "udp", "host": "::1", "port": 5353})
    report_path = tmp_path / "fleet.json"

    run = _playbook(tmp_path, inventory, wheel, report_path)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "No conflict anywhere" in run.stdout, run.stdout
    assert "1 conflict(s): host1: a.service and b.service will collide on port 8080/tcp" in run.stdout
    report = json.loads(report_path.read_text())
    assert set(report["hosts"]) == {"host1", "host2", "host3"}
    assert report["conflicts"] == ["host1: a.service and b.service will collide on port 8080/tcp"]
    ports = {name: sorted(entry["port"] for entry in scan["listeners"]) for name, scan in report["hosts"].items()}
    assert ports == {"host1": [8080], "host2": [9100], "host3": [5353]}  # each scan ran in its own namespace
    assert report["counts"]["host3"]["ephemeral-port"] == 1
    assert report["counts"]["host2"]["conflicts"] == 0
    for name in hosts:
        assert (tmp_path / name / "venv" / "bin" / "bindguard").exists()
    dropin = (tmp_path / "host2" / "config" / "systemd" / "user" / "web.service.d" / "bindguard.conf").read_text()
    assert f"ExecStartPre=+{tmp_path}/host2/venv/bin/bindguard check --unit %n --user --wait 10 127.0.0.1:80" in dropin

    clean = _playbook(tmp_path, inventory, wheel, report_path, "--limit", "host2,host3")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "changed=0" in clean.stdout  # installed already: nothing to do
    report = json.loads(report_path.read_text())
    assert set(report["hosts"]) == {"host2", "host3"} and report["conflicts"] == []


def test_prometheus_alert_rules_pass_promtool():
    promtool = _need("promtool", "prometheus")
    checked = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 4 rules found" in checked.stdout
    tested = subprocess.run([promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                            cwd=RULE_TESTS.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
