"""`check` with the unit's YAML file, discovery's guesses, and the every-service no-op path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import NOBODY

BINDGUARD = [sys.executable, "-m", "bindguard"]
HEAVY = ("yaml", "psutil", "pystemd")


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_noop_path_imports_nothing_heavy(tmp_path):
    code = (
        "import sys\nfrom bindguard.cli import main\n"
        "rc = main(['check', '--unit', 'cron.service'])\n"
        f"print(rc, sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))\n"
    )
    env = {**os.environ, "BINDGUARD_CONFIG_PATH": str(tmp_path)}
    env.pop("INVOCATION_ID", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.stdout.strip() == "0 []", proc.stderr
    assert proc.stderr == ""


def test_broken_config_is_exit_78_with_position(tmp_path):
    write(tmp_path / "web.service.yaml", "listen: [8080\n")
    env = {**os.environ, "BINDGUARD_CONFIG_PATH": str(tmp_path)}
    proc = subprocess.run([*BINDGUARD, "check", "--unit", "web.service"], capture_output=True, text=True, env=env)
    assert proc.returncode == 78
    assert f"{tmp_path}/web.service.yaml:" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.integration
def test_unit_config_supplies_listen_options_and_policy(netns, tmp_path):
    write(tmp_path / "web.service.yaml", """\
        listen:
          - 127.0.0.1:8080
          - udp:127.0.0.1:8080
        options:
          reuseaddr: false
        policy:
          time-wait: refuse
        """)
    netns.hold({"proto": "tcp", "host": "127.0.0.1", "port": 8080, "reuseaddr": True, "mode": "timewait-server"})
    env = {**os.environ, "BINDGUARD_CONFIG_PATH": str(tmp_path)}
    proc = netns.run([*BINDGUARD, "check", "--json", "--unit", "web.service", "--no-systemd"], env=env)
    report = json.loads(proc.stdout)
    assert [a["address"] for a in report["addresses"]] == ["127.0.0.1:8080", "udp:127.0.0.1:8080"]
    assert report["addresses"][0]["reuseaddr"] is False
    # the TIME_WAIT blocks a daemon without SO_REUSEADDR, and the policy refuses rather than waits
    assert proc.returncode == 75 and report["waited_s"] < 1, proc.stderr
    # the command line wins over the file
    proc = netns.run([*BINDGUARD, "check", "--json", "--unit", "web.service", "--no-systemd", "--reuseaddr"], env=env)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.integration
def test_fail_closed_from_the_file(netns, tmp_path):
    write(tmp_path / "web.service.yaml", "listen: [8080]\nfail: closed\n")
    shim = write(tmp_path / "shim" / "sitecustomize.py",
                 "import bindguard.evidence.probe as p\ndef broken(*a, **k):\n    raise RuntimeError('simulated')\np.probe = broken\n")
    env = {**os.environ, "BINDGUARD_CONFIG_PATH": str(tmp_path),
           "PYTHONPATH": f"{shim.parent}:{os.environ.get('PYTHONPATH', '')}"}
    proc = netns.run([*BINDGUARD, "check", "--unit", "web.service", "--no-systemd"], env=env)
    assert proc.returncode == 70 and "failing closed" in proc.stderr


@pytest.mark.integration
def test_explicit_config_file(netns, tmp_path):
    config = write(tmp_path / "any.yaml", "listen: ['0.0.0.0:8080']\n")
    netns.hold({"proto": "tcp", "host": "0.0.0.0", "port": 8080, "reuseaddr": True})
    proc = netns.run([*BINDGUARD, "check", "--config", str(config), "--wait", "0", "--no-systemd"])
    assert proc.returncode == 98 and "0.0.0.0:8080: listener" in proc.stderr


@pytest.mark.integration
def test_optional_addresses_only_warn(netns, tmp_path):
    """Redis's Debian default `bind 127.0.0.1 -::1` starts without IPv6 on lo; the guard refused it (99)."""
    netns.sysctl("net.ipv6.conf.lo.disable_ipv6", "1")
    required = [*BINDGUARD, "check", "--no-systemd", "--wait", "0", "127.0.0.1:6379"]
    proc = netns.run([*required, "[::1]:6379"])
    assert proc.returncode == 99, proc.stderr
    for flag in ("--optional", "--if-available"):
        proc = netns.run([*required, flag, "[::1]:6379"])
        assert proc.returncode == 0, proc.stderr
        assert "[::1]:6379" in proc.stderr and "the daemon starts without this socket: a warning only" in proc.stderr
    write(tmp_path / "redis-server.service.yaml", """\
        listen:
          - 127.0.0.1:6379
          - {address: "[::1]:6379", optional: if-available}
        """)
    env = {**os.environ, "BINDGUARD_CONFIG_PATH": str(tmp_path)}
    proc = netns.run([*BINDGUARD, "check", "--unit", "redis-server", "--no-systemd", "--wait", "0"], env=env)
    assert proc.returncode == 0 and "a warning only" in proc.stderr, proc.stderr
    # and the real daemon does start there, as the guard said
    redis = subprocess.Popen(netns.argv(["redis-server", "--port", "6379", "--bind", "127.0.0.1 -::1", "--save", "",
                                         "--appendonly", "no", "--dir", str(tmp_path)]),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in redis.stdout:
            if "Ready to accept connections" in line:
                break
        assert redis.poll() is None
    finally:
        redis.terminate()
        redis.wait(timeout=10)
    # a conflict on a required address still refuses; one on an optional address warns
    netns.hold({"proto": "tcp", "host": "127.0.0.1", "port": 6380, "reuseaddr": True})
    proc = netns.run([*BINDGUARD, "check", "--no-systemd", "--wait", "0", "127.0.0.1:6379", "--optional",
                      "127.0.0.1:6380"])
    assert proc.returncode == 0 and "127.0.0.1:6380" in proc.stderr, proc.stderr
    proc = netns.run([*BINDGUARD, "check", "--no-systemd", "--wait", "0", "127.0.0.1:6380", "--optional",
                      "127.0.0.1:6379"])
    assert proc.returncode == 98, proc.stderr
    # Redis's `-` skips an address no interface has, not one another process holds
    proc = netns.run([*BINDGUARD, "check", "--no-systemd", "--wait", "0", "127.0.0.1:6379", "--if-available",
                      "127.0.0.1:6380"])
    assert proc.returncode == 98, proc.stderr
    proc = netns.run([*BINDGUARD, "check", "--no-systemd", "127.0.0.1:6379", "--optional", "127.0.0.1:6379"])
    assert proc.returncode == 64 and "127.0.0.1:6379 is given twice" in proc.stderr


@pytest.mark.integration
def test_a_search_path_in_the_environment_is_used_only_where_root_owns_it(netns, tmp_path):
    """Under ExecStartPre=+ the environment is the unit's, which its user may write (an
    EnvironmentFile=): a directory that user owns must not become where the root guard reads
    a unit's configuration (or unit files), while a root-owned one still is."""
    netns.hold({"proto": "tcp", "host": "127.0.0.1", "port": 8080, "reuseaddr": True})
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    for directory in (theirs, ours):
        write(directory / "web.service.yaml", "listen: [127.0.0.1:8080]\n")
    os.chown(theirs, NOBODY, NOBODY)
    os.chown(theirs / "web.service.yaml", NOBODY, NOBODY)
    ran = {}
    for name, directory in (("theirs", theirs), ("ours", ours)):
        env = {**os.environ, "BINDGUARD_CONFIG_PATH": str(directory), "SYSTEMD_UNIT_PATH": str(directory)}
        ran[name] = netns.run([*BINDGUARD, "check", "--wait", "0", "--unit", "web.service", "--no-systemd"], env=env)
    assert ran["theirs"].returncode == 0, ran["theirs"].stderr  # not read: nothing to guard
    assert ran["ours"].returncode == 98, ran["ours"].stderr
