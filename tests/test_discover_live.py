"""Discovery checked against the daemons themselves: each runs briefly inside a private network
namespace (and a private /run), and the sockets it really opens, with their IPV6_V6ONLY flag as
`ss -e` reports it, must be exactly the confident findings.

The packaged services stay stopped: these are throwaway processes of the installed binaries,
started and killed by the test, with no effect outside their namespaces.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from bindguard.request.discover import discover
from test_discover import HAPROXY_EXEC, need_package, nginx_tree

pytestmark = pytest.mark.integration

PRIVATE_RUN = ("mount -t tmpfs tmpfs /run && mkdir -p /run/sshd /run/lock /run/redis && "
               "mkdir -p /var/run/apache2 && exec \"$@\"")


def expected(result) -> set[str]:
    out = set()
    for f in result.findings:
        assert f.confident, f
        address = str(f.bind.endpoint)
        if f.bind.endpoint.host.version == 6:
            address += " v6only" if f.bind.v6only else " dual"
        out.add(address)
    return out


def live_sockets(netns) -> set[str]:
    """Listening TCP and bound UDP sockets in the namespace, as `ss -e` shows them."""
    out = set()
    for line in netns.run(["ss", "-Htulne"]).stdout.splitlines():
        fields = line.split()
        netid, local = fields[0], fields[4]
        v6only = "v6only:1" in line
        if local.startswith("*:"):
            address = f"[::]:{local[2:]} dual"
        elif local.startswith("["):
            address = local.replace("%lo", "") + (" v6only" if v6only else " dual")
        else:
            address = local
        out.add(("udp:" if netid == "udp" else "") + address)
    return out


def run_daemon(netns, argv: list[str], want: set[str], env: dict[str, str] | None = None) -> set[str]:
    """Start argv in the namespace with a private /run; return its sockets once they are all there."""
    proc = subprocess.Popen(netns.argv(["unshare", "--mount", "--propagation", "private", "sh", "-c", PRIVATE_RUN,
                                        "sh", *argv]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env or dict(os.environ), start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        seen: set[str] = set()
        while time.monotonic() < deadline:
            seen = live_sockets(netns)
            if seen >= want or proc.poll() is not None:
                break
            time.sleep(0.1)
        time.sleep(0.3)  # anything it opens late would show now
        seen = live_sockets(netns)
        if proc.poll() is not None and not seen >= want:
            pytest.fail(f"{argv[0]} exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
        return seen
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of this process group is left
        except ProcessLookupError:
            pass
        proc.wait()


def test_nginx_edited_copy_live(netns, tmp_path):
    need_package("nginx", "/usr/sbin/nginx")
    conf = nginx_tree(tmp_path)
    # `listen 127.0.0.2:80 bind` next to `listen 80` is found right, but Linux refuses the pair
    # (a wildcard bind() conflicts with a listening specific address even with SO_REUSEADDR).
    site = tmp_path / "sites" / "a.conf"
    site.write_text(site.read_text().replace("listen 127.0.0.2:80 bind;", "listen 127.0.0.2:81 bind;"))
    argv = ["/usr/sbin/nginx", "-c", str(conf), "-g", f"daemon off; pid {tmp_path}/nginx.pid;"]
    result = discover([argv], [], [], [], "web.service")
    want = expected(result)
    assert run_daemon(netns, argv, want) == want


def test_nginx_debian_default_live(netns):
    need_package("nginx", "/usr/sbin/nginx")
    argv = ["/usr/sbin/nginx", "-g", "daemon off; master_process on;"]
    want = expected(discover([argv], [], [], [], "nginx.service"))
    assert want == {"0.0.0.0:80", "[::]:80 v6only"}
    assert run_daemon(netns, argv, want) == want


def test_apache_debian_default_live(netns):
    need_package("apache2", "/usr/sbin/apache2")
    want = expected(discover([["/usr/sbin/apachectl", "start"]], [], [], [], "apache2.service"))
    assert want == {"[::]:80 dual"}
    argv = ["sh", "-c", ". /etc/apache2/envvars && mkdir -p \"$APACHE_RUN_DIR\" \"$APACHE_LOCK_DIR\" && "
                        "exec /usr/sbin/apache2 -DFOREGROUND"]
    assert run_daemon(netns, argv, want) == want


def test_haproxy_edited_copy_live(netns, tmp_path):
    need_package("haproxy", "/usr/sbin/haproxy")
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(textwrap.dedent("""
        global
            log stdout format raw local0
        defaults
            mode tcp
            timeout connect 1s
            timeout client 1s
            timeout server 1s
        frontend web
            bind :80,:8443
            bind :::8080 v4v6
            bind ipv6@:8444 v6only
            bind 127.0.0.1:9000-9001
            default_backend app
        backend app
            server s1 127.0.0.1:1
        """))
    env = [f"CONFIG={cfg}", f"PIDFILE={tmp_path}/haproxy.pid"]
    want = expected(discover(HAPROXY_EXEC, env, [], [], "haproxy.service"))
    assert want == {"0.0.0.0:80", "0.0.0.0:8443", "[::]:8080 dual", "[::]:8444 v6only", "127.0.0.1:9000",
                    "127.0.0.1:9001"}
    assert run_daemon(netns, ["/usr/sbin/haproxy", "-db", "-f", str(cfg)], want) == want


def test_sshd_debian_default_live(netns):
    need_package("openssh-server", "/usr/sbin/sshd")
    code = ("from bindguard.request.discover import discover\n"
            "r = discover([['/usr/sbin/sshd', '-D']], [], ['-/etc/default/ssh'], [], 'ssh.service')\n"
            "print(r.warnings)\n"
            "for f in r.findings: print(str(f.bind.endpoint) + ('' if f.bind.endpoint.host.version == 4 else "
            "' v6only' if f.bind.v6only else ' dual'))")
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", PRIVATE_RUN, "sh",
                           sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "[]"  # sshd -T ran
    want = set(lines[1:])
    assert want == {"0.0.0.0:22", "[::]:22 v6only"}
    assert run_daemon(netns, ["/usr/sbin/sshd", "-D", "-e"], want) == want


def test_redis_debian_default_live(netns, tmp_path):
    need_package("redis-server", "/etc/redis/redis.conf")
    argv = ["/usr/bin/redis-server", "/etc/redis/redis.conf", "--supervised", "no", "--daemonize", "no",
            "--dir", str(tmp_path), "--save", "", "--logfile", "", "--pidfile", str(tmp_path / "redis.pid")]
    want = expected(discover([argv], [], [], [], "redis-server.service"))
    assert want == {"127.0.0.1:6379", "[::1]:6379 v6only"}
    assert run_daemon(netns, argv, want) == want


def owned_tmpdir(user: str):
    """A directory `user` owns (pytest's tmp_path is private to root), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=f"bindguard-{user}-"))
    shutil.chown(path, user)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture
def postgres_dir():
    yield from owned_tmpdir("postgres")


def test_postgres_live(netns, postgres_dir):
    """A fresh cluster (not Debian's) with listen_addresses='*' and a port from an include_dir file."""
    need_package("postgresql", "/usr/lib/postgresql/15/bin/initdb")
    data = postgres_dir / "data"
    subprocess.run(["runuser", "-u", "postgres", "--", "/usr/lib/postgresql/15/bin/initdb", "-D", str(data),
                    "--no-sync", "-A", "trust"], check=True, capture_output=True, timeout=120)
    with open(data / "postgresql.conf", "a") as f:
        f.write("listen_addresses = '*'\ninclude_dir = 'conf.d'\nunix_socket_directories = ''\n")
    (data / "conf.d").mkdir()
    (data / "conf.d" / "port.conf").write_text("port = 5499\n")
    shutil.chown(data / "conf.d", "postgres")
    argv = ["/usr/lib/postgresql/15/bin/postgres", "-D", str(data)]
    want = expected(discover([argv], [], [], [], "pg.service"))
    assert want == {"0.0.0.0:5499", "[::]:5499 v6only"}
    assert run_daemon(netns, ["runuser", "-u", "postgres", "--", *argv], want) == want

    # It starts when one of its addresses binds: what Finding.survives says.
    (data / "conf.d" / "listen.conf").write_text("listen_addresses = '127.0.0.1,127.0.0.2'\n")
    result = discover([argv], [], [], [], "pg.service")
    assert [(str(f.bind.endpoint), f.survives) for f in result.findings] == [
        ("127.0.0.1:5499", ("*",)), ("127.0.0.2:5499", ("*",))]
    netns.hold({"proto": "tcp", "host": "127.0.0.2", "port": 5499, "reuseaddr": True})
    assert run_daemon(netns, ["runuser", "-u", "postgres", "--", *argv], {"127.0.0.1:5499", "127.0.0.2:5499"}) == {
        "127.0.0.1:5499", "127.0.0.2:5499"}


@pytest.fixture
def mysql_dir():
    yield from owned_tmpdir("mysql")


def test_mariadb_live(netns, mysql_dir):
    """A fresh data directory; the options from a defaults file with `bind-address = ::` and a port."""
    need_package("mariadb-server", "/usr/sbin/mariadbd")
    data = mysql_dir / "data"
    subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=mysql", "--skip-test-db",
                    "--auth-root-authentication-method=normal"], check=True, capture_output=True, timeout=120)
    cnf = mysql_dir / "my.cnf"
    cnf.write_text(f"[client]\nport = 1\n[mysqld]\ndatadir = {data}\nsocket = {mysql_dir}/sock\n"
                   f"pid-file = {mysql_dir}/pid\nuser = mysql\nbind-address = ::\nport = 3399\n"
                   "[mariadbd]\nextra-port = 3398\n")
    argv = ["/usr/sbin/mariadbd", f"--defaults-file={cnf}"]
    want = expected(discover([argv], [], [], [], "mariadb.service"))
    assert want == {"[::]:3399 v6only", "[::]:3398 v6only"}
    assert run_daemon(netns, argv, want) == want
    cnf.write_text(cnf.read_text().replace("bind-address = ::\n", ""))  # the default: every address
    want = expected(discover([argv], [], [], [], "mariadb.service"))
    assert want == {"0.0.0.0:3399", "[::]:3399 v6only", "0.0.0.0:3398", "[::]:3398 v6only"}
    assert run_daemon(netns, argv, want) == want


def test_what_the_daemons_survive_live(netns, tmp_path):
    """The claims behind the per-bind policy: sshd starts when one of two addresses is held, and
    Redis starts when a `-` address is on no interface."""
    need_package("openssh-server", "/usr/sbin/sshd")
    need_package("redis-server", "/usr/bin/redis-server")
    netns.hold({"proto": "tcp", "host": "127.0.0.2", "port": 2222, "reuseaddr": True})
    sshd_config = tmp_path / "sshd_config"
    sshd_config.write_text("Port 2222\nListenAddress 127.0.0.1\nListenAddress 127.0.0.2\n")
    sshd = discover([["/usr/sbin/sshd", "-D", "-f", str(sshd_config)]], [], [], [], "ssh.service")
    assert all(f.survives == ("*",) for f in sshd.findings) and len(sshd.findings) == 2
    seen = run_daemon(netns, ["/usr/sbin/sshd", "-D", "-e", "-f", str(sshd_config), "-o",
                              f"PidFile={tmp_path}/sshd.pid"], {"127.0.0.1:2222", "127.0.0.2:2222"})
    assert seen == {"127.0.0.1:2222", "127.0.0.2:2222"}  # its own 127.0.0.1, the holder's 127.0.0.2

    redis_conf = tmp_path / "redis.conf"
    redis_conf.write_text(f"bind 127.0.0.1 -10.9.9.9\nport 6390\ndir {tmp_path}\nsave \"\"\n")
    redis = discover([["/usr/bin/redis-server", str(redis_conf)]], [], [], [], "redis.service")
    assert [(str(f.bind.endpoint), f.survives) for f in redis.findings] == [
        ("127.0.0.1:6390", ()), ("10.9.9.9:6390", ("address-unavailable",))]
    assert run_daemon(netns, ["/usr/bin/redis-server", str(redis_conf)], {"127.0.0.1:6390"}) >= {"127.0.0.1:6390"}
