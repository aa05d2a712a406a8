"""`check --unit UNIT` with no LISTEN: the unit's YAML listen list, else what discovery finds with
confidence in the daemon's files (the unit's command line read from its unit files); nothing to
guard means exit 0 at once. Real sockets in a network namespace."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import user_units
from test_discover import need_package

pytestmark = pytest.mark.integration


@pytest.fixture
def paths(tmp_path):
    """A private bindguard config dir and systemd unit dir, and the environment naming them."""
    config_dir, unit_dir = tmp_path / "bindguard", tmp_path / "units"
    config_dir.mkdir()
    unit_dir.mkdir()
    env = dict(os.environ, BINDGUARD_CONFIG_PATH=str(config_dir), SYSTEMD_UNIT_PATH=str(unit_dir))
    env.pop("INVOCATION_ID", None)
    return config_dir, unit_dir, env


def check(netns, env, *args):
    return netns.run([sys.executable, "-m", "bindguard", "check", "--no-systemd", *args], env=env)


def nginx_unit(unit_dir: Path, tmp_path: Path, listen: str) -> None:
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"events {{}}\nhttp {{\n  server {{ listen {listen}; }}\n}}\n")
    (unit_dir / "web.service").write_text(f"[Service]\nExecStart=/usr/sbin/nginx -c {conf} -g 'daemon off;'\n")


def test_yaml_listen_list(netns, paths):
    config_dir, _, env = paths
    (config_dir / "web.service.yaml").write_text("listen: ['127.0.0.1:8080']\n")
    assert check(netns, env, "--unit", "web.service").returncode == 0
    netns.hold({"proto": "tcp", "host": "127.0.0.1", "port": 8080, "reuseaddr": True})
    refused = check(netns, env, "--unit", "web.service")
    assert refused.returncode == 98, refused.stderr
    (config_dir / "web.service.yaml.d").mkdir()
    (config_dir / "web.service.yaml.d" / "policy.yaml").write_text("policy: {listener: warn}\n")
    warned = check(netns, env, "--unit", "web.service")
    assert warned.returncode == 0, warned.stderr
    assert "127.0.0.1:8080" in warned.stderr


def test_discovered_from_the_daemons_files(netns, paths, tmp_path):
    _, unit_dir, env = paths
    need_package("nginx", "/usr/sbin/nginx")
    nginx_unit(unit_dir, tmp_path, "127.0.0.1:8088")
    assert check(netns, env, "--unit", "web.service").returncode == 0
    netns.hold({"proto": "tcp", "host": "127.0.0.1", "port": 8088, "reuseaddr": True})
    refused = check(netns, env, "--unit", "web.service")
    assert refused.returncode == 98 and "127.0.0.1:8088" in refused.stderr


def test_guesses_alone_never_refuse(netns, paths):
    config_dir, unit_dir, env = paths
    (unit_dir / "app.service").write_text("[Service]\nExecStart=/opt/app --listen 127.0.0.1:8090\n")
    netns.hold({"proto": "tcp", "host": "127.0.0.1", "port": 8090, "reuseaddr": True})
    assert check(netns, env, "--unit", "app.service").returncode == 0
    (config_dir / "app.service.yaml").write_text("trust_guesses: true\n")
    assert check(netns, env, "--unit", "app.service").returncode == 98


def test_nothing_to_guard_is_cheap(netns, paths):
    _, unit_dir, env = paths
    (unit_dir / "quiet.service").write_text("[Service]\nExecStart=/bin/sleep infinity\n")
    code = textwrap.dedent("""
        import sys
        from bindguard.cli import main
        rc = main(["check", "--unit", "quiet.service"])
        print(rc, sorted(m for m in sys.modules if m.split(".")[0] in ("yaml", "psutil", "pystemd")))
        """)
    proc = netns.run([sys.executable, "-c", code], env=env)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "0 []\n", "")


def test_broken_yaml_is_exit_78(netns, paths):
    config_dir, _, env = paths
    (config_dir / "web.service.yaml").write_text("listen: [8080\n")
    proc = check(netns, env, "--unit", "web.service")
    assert proc.returncode == 78 and "web.service.yaml:2:1: YAML syntax error" in proc.stderr


def test_what_the_daemon_survives_only_warns(netns, paths, tmp_path):
    """sshd starts when one of its addresses binds; Redis without a `-` address on no interface."""
    need_package("openssh-server", "/usr/sbin/sshd")
    _, unit_dir, env = paths
    sshd_config = tmp_path / "sshd_config"
    sshd_config.write_text("Port 2222\nListenAddress 127.0.0.1\nListenAddress 127.0.0.2\n")
    (unit_dir / "ssh.service").write_text(f"[Service]\nExecStart=/usr/sbin/sshd -D -f {sshd_config}\n")
    redis_conf = tmp_path / "redis.conf"
    redis_conf.write_text("bind 127.0.0.1 -10.9.9.9\nport 6390\n")
    (unit_dir / "redis.service").write_text(f"[Service]\nExecStart=/usr/bin/redis-server {redis_conf}\n")
    env = dict(env, PATH="/usr/bin:/bin")  # no sshd -T: /run/sshd is not there outside the unit

    netns.hold({"proto": "tcp", "host": "127.0.0.2", "port": 2222, "reuseaddr": True})
    one_held = check(netns, env, "--unit", "ssh.service")
    assert one_held.returncode == 0 and "127.0.0.2:2222" in one_held.stderr, one_held.stderr
    unavailable = check(netns, env, "--unit", "redis.service")
    assert unavailable.returncode == 0 and "10.9.9.9:6390" in unavailable.stderr, unavailable.stderr
    netns.hold({"proto": "tcp", "host": "127.0.0.1", "port": 6390, "reuseaddr": True})
    assert check(netns, env, "--unit", "redis.service").returncode == 98


def test_with_no_systemd_user_names_the_user_managers_unit_files_for_discovery(netns, tmp_path):
    """--user --no-systemd: discovery reads the unit from the user manager's unit files, as the fast
    path and a socket unit's plan do, not from the system's (which hold no unit of that name)."""
    need_package("redis-server", "/usr/bin/redis-server")
    units, env = user_units(tmp_path)
    redis_conf = tmp_path / "redis.conf"
    redis_conf.write_text("bind 127.0.0.1\nport 6391\n")
    (units / "cache.service").write_text(f"[Service]\nExecStart=/usr/bin/redis-server {redis_conf}\n")
    netns.hold({"proto": "tcp", "host": "127.0.0.1", "port": 6391, "reuseaddr": True})
    refused = check(netns, env, "--user", "--unit", "cache.service")
    assert refused.returncode == 98 and "127.0.0.1:6391" in refused.stderr, refused.stderr


def test_nginx_config_linux_refuses_is_a_self_conflict(netns, paths, tmp_path):
    """`listen 80` with `listen 127.0.0.2:80 bind`: nginx opens both, and Linux refuses the pair."""
    need_package("nginx", "/usr/sbin/nginx")
    _, unit_dir, env = paths
    nginx_unit(unit_dir, tmp_path, "80; listen 127.0.0.2:80 bind")
    proc = check(netns, env, "--unit", "web.service")
    assert proc.returncode == 98 and "self-conflict" in proc.stderr, proc.stderr
