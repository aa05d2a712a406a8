"""Discovery on the configuration files Debian's packages install, and on edited copies of them.

The packages (nginx, apache2, haproxy, openssh-server, redis-server, postgresql, mariadb-server)
are installed by ./setup.sh --test and never started: only their files are read (and their own
dumps run: `nginx -T`, `sshd -T`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bindguard.request.discover import discover, discover_daemon
from bindguard.request.discover.common import hosts_file_addresses
from bindguard.model.endpoints import parse_listen
from conftest import need, need_root


def need_package(package: str, path: str) -> None:
    if not os.path.exists(path):
        reason = f"{path} is missing: install Debian's {package} (./setup.sh --test)"
        need(reason)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def line_of(path: str, pattern: str) -> int:
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if re.search(pattern, line):
            return number
    raise AssertionError(f"{pattern!r} not in {path}")


def summary(result) -> list[tuple[str, str, str]]:
    """(address, source, confidence) of each finding, plus v6only for IPv6 ones as '+v6only'."""
    out = []
    for f in result.findings:
        address = str(f.bind.endpoint)
        if f.bind.endpoint.host.version == 6 and f.bind.v6only:
            address += " v6only"
        if f.bind.options.reuseport:
            address += " reuseport"
        out.append((address, f.source, f.confidence))
    return out


def dual(port: int) -> str:
    """How a dual-stack all-addresses socket is written on this host."""
    return str(parse_listen(str(port)))


# --- nginx --------------------------------------------------------------------------------------

def test_nginx_debian_default():
    need_package("nginx", "/usr/sbin/nginx")
    site = "/etc/nginx/sites-enabled/default"
    v4, v6 = line_of(site, r"^\s*listen 80 default_server;"), line_of(site, r"^\s*listen \[::\]:80 default_server;")
    result = discover([["/usr/sbin/nginx", "-g", "daemon on; master_process on;"]], [], [], [], "nginx.service")
    assert result.daemons == ["nginx"] and result.warnings == []
    assert summary(result) == [
        ("0.0.0.0:80", f"{site}:{v4} (nginx -T)", "confident"),
        ("[::]:80 v6only", f"{site}:{v6} (nginx -T)", "confident"),
    ]
    assert all(f.bind.options.reuseaddr for f in result.findings)


NGINX_CONF = """
    include /etc/nginx/modules-enabled/*.conf;
    events {}
    http {
        include sites/*.conf;
        server { listen 127.0.0.1:8081; }
    }
    stream {
        server { listen 5353 udp reuseport; return ok; }
        server { listen [::1]:6000; return ok; }
    }
    """


def nginx_tree(tmp_path: Path) -> Path:
    conf = write(tmp_path / "nginx.conf", NGINX_CONF)
    write(tmp_path / "sites" / "a.conf", """
        server {
            listen 80;
            listen [::]:8080 ipv6only=off;
            listen 127.0.0.1:80;
            listen 127.0.0.2:80 bind;
            listen unix:/run/x.sock;
            listen 8443 http2 reuseport;
        }
        """)
    write(tmp_path / "sites" / "b.conf", """
        server {
            listen *:80 default_server;
            listen localhost:9090;
            listen [::1];
        }
        server { server_name nolisten; }
        """)
    write(tmp_path / "sites" / "ignored.txt", "server { listen 1; }\n")
    return conf


@pytest.mark.parametrize("use_dump", [True, False])
def test_nginx_edited_copy(tmp_path, use_dump, monkeypatch):
    need_package("nginx", "/usr/sbin/nginx")
    conf = nginx_tree(tmp_path)
    argv = ["/usr/sbin/nginx" if use_dump else "/nonexistent/nginx", "-c", str(conf)]  # no nginx: files read
    result = discover([argv], [], [], [], "web.service")
    assert result.warnings == []
    suffix = " (nginx -T)" if use_dump else ""
    a, b = tmp_path / "sites" / "a.conf", tmp_path / "sites" / "b.conf"
    localhost = [f"[{h}]:9090" if ":" in h else f"{h}:9090" for h in hosts_file_addresses("localhost")]
    assert summary(result) == [
        ("0.0.0.0:80", f"{a}:2{suffix}", "confident"),
        ("[::]:8080", f"{a}:3{suffix}", "confident"),  # ipv6only=off: dual-stack
        # 127.0.0.1:80 is served by the 0.0.0.0:80 socket: nginx opens no socket for it
        ("127.0.0.2:80", f"{a}:5{suffix}", "confident"),
        ("0.0.0.0:8443 reuseport", f"{a}:7{suffix}", "confident"),
        *[(addr, f"{b}:3{suffix}", "confident") for addr in localhost],
        ("[::1]:80 v6only", f"{b}:4{suffix}", "confident"),
        # the server without listen is *:80, already open
        ("127.0.0.1:8081", f"{conf}:5{suffix}", "confident"),
        ("udp:0.0.0.0:5353 reuseport", f"{conf}:8{suffix}", "confident"),
        ("[::1]:6000 v6only", f"{conf}:9{suffix}", "confident"),
    ]


def test_nginx_server_without_listen_is_port_80(tmp_path, monkeypatch):
    conf = write(tmp_path / "nginx.conf", "events {}\nhttp {\n  server {\n    server_name x;\n  }\n}\n")
    result = discover([["/nonexistent/nginx", "-c", str(conf)]], [], [], [], "web.service")
    assert summary(result) == [("0.0.0.0:80", f"{conf}:3", "confident")]


@pytest.mark.parametrize("use_dump", [True, False])
def test_nginx_broken_file_warns_and_finds_nothing(tmp_path, use_dump, monkeypatch):
    need_package("nginx", "/usr/sbin/nginx")
    conf = nginx_tree(tmp_path)
    write(tmp_path / "sites" / "a.conf", "server {\n    listen 80;\n")  # unclosed block
    argv = ["/usr/sbin/nginx" if use_dump else "/nonexistent/nginx", "-c", str(conf)]
    result = discover([argv], [], [], [], "web.service")
    assert result.findings == []
    assert any(f"{tmp_path / 'sites' / 'a.conf'}" in w and "its listen addresses are not known" in w
               for w in result.warnings), result.warnings
    if use_dump:  # as root, a configuration that cannot be read through first is not dumped
        assert not any("nginx -T" in w for w in result.warnings), result.warnings


def test_nginx_dump_failure_is_a_warning(tmp_path):
    need_package("nginx", "/usr/sbin/nginx")
    conf = nginx_tree(tmp_path)
    write(tmp_path / "sites" / "a.conf", "server {\n    listen 80;\n    no_such_directive on;\n}\n")
    result = discover([["/usr/sbin/nginx", "-c", str(conf)]], [], [], [], "web.service")
    assert "nginx -T" in result.warnings[0] and "[emerg]" in result.warnings[0], result.warnings
    assert f"reading {conf} directly" in result.warnings[0]
    assert ("0.0.0.0:80", f"{tmp_path / 'sites' / 'a.conf'}:2", "confident") in summary(result)


# --- Apache -------------------------------------------------------------------------------------

def test_apache_debian_default():
    need_package("apache2", "/usr/sbin/apache2")
    result = discover([["/usr/sbin/apachectl", "start"]], ["APACHE_STARTED_BY_SYSTEMD=true"], [], [],
                      "apache2.service")
    ports = "/etc/apache2/ports.conf"
    # Listen 443 is inside <IfModule ssl_module>, and Debian does not enable mod_ssl by default.
    assert summary(result) == [(dual(80), f"{ports}:{line_of(ports, r'^Listen 80')}", "confident")]
    assert result.findings[0].bind.options.reuseaddr and not result.findings[0].bind.v6only


def test_apache_edited_copy(tmp_path):
    need_package("apache2", "/usr/sbin/apache2")
    confdir = tmp_path / "apache2"
    shutil.copytree("/etc/apache2", confdir, symlinks=True)
    (confdir / "mods-enabled" / "ssl.load").symlink_to("/etc/apache2/mods-available/ssl.load")
    write(confdir / "conf-enabled" / "more.conf", """
        Listen 127.0.0.1:8080
        Listen [::1]:8081 http
        Listen 0.0.0.0:80
        <IfDefine EXTRA>
            Listen 9999
        </IfDefine>
        <IfVersion >= 2.4>
            Listen 8443 https
        </IfVersion>
        <IfModule !mod_nothere.c>
            Listen 127.0.0.1:8082
        </IfModule>
        """)
    result = discover([["/usr/sbin/apachectl", "start"]], [f"APACHE_CONFDIR={confdir}"], [], [], "apache2.service")
    ports, more = confdir / "ports.conf", confdir / "conf-enabled" / "more.conf"
    assert result.warnings == []
    assert summary(result) == [
        (dual(80), f"{ports}:{line_of(ports, r'^Listen 80')}", "confident"),
        (dual(443), f"{ports}:{line_of(ports, r'^.Listen 443')}", "confident"),  # mod_ssl now enabled
        ("127.0.0.1:8080", f"{more}:1", "confident"),
        ("[::1]:8081", f"{more}:2", "confident"),
        # 0.0.0.0:80 is folded into the dual-stack [::]:80 socket, as Apache does
        (dual(8443), f"{more}:8", "guess"),
        ("127.0.0.1:8082", f"{more}:11", "confident"),
    ]
    with_define = discover([["/usr/sbin/apache2", "-D", "EXTRA"]], [f"APACHE_CONFDIR={confdir}"], [], [], "a.service")
    assert (dual(9999), f"{more}:5", "confident") in summary(with_define)


def test_apache_broken_file(tmp_path):
    need_package("apache2", "/usr/sbin/apache2")
    confdir = tmp_path / "apache2"
    shutil.copytree("/etc/apache2", confdir, symlinks=True)
    write(confdir / "ports.conf", "Listen 80\n<IfModule ssl_module>\n  Listen 443\n")
    result = discover([["/usr/sbin/apachectl", "start"]], [f"APACHE_CONFDIR={confdir}"], [], [], "apache2.service")
    assert result.findings == []
    assert result.warnings == [f"apache configuration: {confdir}/ports.conf:2: <ifmodule> is not closed; "
                               "its listen addresses are not known"]


# --- HAProxy ------------------------------------------------------------------------------------

HAPROXY_UNIT_ENV = ["CONFIG=/etc/haproxy/haproxy.cfg", "PIDFILE=/run/haproxy.pid",
                    "EXTRAOPTS=-S /run/haproxy-master.sock"]
HAPROXY_EXEC = [["/usr/sbin/haproxy", "-Ws", "-f", "$CONFIG", "-p", "$PIDFILE", "$EXTRAOPTS"]]


def test_haproxy_debian_default_binds_nothing():
    need_package("haproxy", "/usr/sbin/haproxy")
    result = discover(HAPROXY_EXEC, HAPROXY_UNIT_ENV, ["-/etc/default/haproxy", "-/etc/sysconfig/haproxy"], [],
                      "haproxy.service")
    assert result.daemons == ["haproxy"] and result.findings == [] and result.warnings == []


def test_haproxy_edited_copy(tmp_path):
    need_package("haproxy", "/usr/sbin/haproxy")
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(Path("/etc/haproxy/haproxy.cfg").read_text() + textwrap.dedent("""
        frontend web
            bind :80,:443 ssl crt /etc/ssl/x.pem
            bind :::8080 v4v6
            bind ipv6@:8443 v6only
            bind 127.0.0.1:9000-9001
            bind unix@/run/haproxy-web.sock
            bind quic4@:443
        backend app
            server s1 127.0.0.1:8000
        listen stats
            bind "${STATS_ADDR}:8404"
        """))
    base = len(Path("/etc/haproxy/haproxy.cfg").read_text().splitlines()) + 1
    env = [f"CONFIG={cfg}", "PIDFILE=/run/haproxy.pid", "STATS_ADDR=127.0.0.9"]
    result = discover(HAPROXY_EXEC, env, [], [], "haproxy.service")
    at = lambda n: f"{cfg}:{base + n}"  # noqa: E731
    assert result.warnings == []
    assert summary(result) == [
        ("0.0.0.0:80 reuseport", at(2), "confident"),
        ("0.0.0.0:443 reuseport", at(2), "confident"),
        ("[::]:8080 reuseport", at(3), "confident"),
        ("[::]:8443 v6only reuseport", at(4), "confident"),
        ("127.0.0.1:9000 reuseport", at(5), "confident"),
        ("127.0.0.1:9001 reuseport", at(5), "confident"),
        ("udp:0.0.0.0:443 reuseport", at(7), "confident"),
        ("127.0.0.9:8404 reuseport", at(11), "confident"),
    ]
    cfg.write_text(cfg.read_text().replace("global\n", "global\n\tnoreuseport\n", 1))
    assert not any(f.bind.options.reuseport for f in discover(HAPROXY_EXEC, env, [], [], "h.service").findings)


# --- OpenSSH ------------------------------------------------------------------------------------

def test_sshd_debian_default_from_files(monkeypatch):
    need_package("openssh-server", "/usr/sbin/sshd")
    result = discover([["/nonexistent/sshd", "-D", "$SSHD_OPTS"]], [], ["-/etc/default/ssh"], [], "ssh.service")
    where = "/etc/ssh/sshd_config (default Port 22)"
    assert summary(result) == [("0.0.0.0:22", where, "confident"), ("[::]:22 v6only", where, "confident")]


def run_in_private_run(code: str) -> subprocess.CompletedProcess:
    """Run Python with an empty private /run holding /run/sshd, as the unit's RuntimeDirectory= makes it."""
    script = f"mount -t tmpfs tmpfs /run && mkdir /run/sshd && exec {sys.executable} -c \"$0\""
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, code],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ))


def test_sshd_dump_of_debian_default():
    need_package("openssh-server", "/usr/sbin/sshd")
    need_root("a private /run for sshd -T")
    code = ("from bindguard.request.discover import discover\n"
            "r = discover([['/usr/sbin/sshd', '-D']], [], ['-/etc/default/ssh'], [], 'ssh.service')\n"
            "print(r.warnings); [print(f.bind.endpoint, f.bind.v6only, f.source) for f in r.findings]")
    proc = run_in_private_run(code)
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.splitlines()) == sorted(["[]", "0.0.0.0:22 False sshd -T", "[::]:22 True sshd -T"])


def test_sshd_edited_copy(tmp_path, monkeypatch):
    need_package("openssh-server", "/usr/sbin/sshd")
    conf = tmp_path / "sshd_config"
    conf.write_text(Path("/etc/ssh/sshd_config").read_text().replace(
        "Include /etc/ssh/sshd_config.d/*.conf", f"Include {tmp_path}/d/*.conf"))
    write(tmp_path / "d" / "10-ports.conf", "Port 2222\nPort 2223\nListenAddress 127.0.0.1\nListenAddress [::1]:2200\n")
    write(tmp_path / "d" / "20-match.conf", "Match User bob\n    Port 1\n")
    result = discover([["/nonexistent/sshd", "-D", "-f", str(conf)]], [], [], [], "ssh.service")
    ports = tmp_path / "d" / "10-ports.conf"
    assert summary(result) == [
        ("127.0.0.1:2222", f"{ports}:3", "confident"),
        ("127.0.0.1:2223", f"{ports}:3", "confident"),
        ("[::1]:2200 v6only", f"{ports}:4", "confident"),
    ]
    family = discover([["/nonexistent/sshd", "-f", str(conf), "-o", "AddressFamily=inet"]], [], [], [], "ssh.service")
    assert [s[0] for s in summary(family)] == ["127.0.0.1:2222", "127.0.0.1:2223"]
    write(tmp_path / "d" / "10-ports.conf", "Port twenty-two\n")
    broken = discover([["/nonexistent/sshd", "-f", str(conf)]], [], [], [], "ssh.service")
    assert broken.findings == [] and broken.warnings == [
        f"sshd configuration: {ports}:1: 'twenty-two' is not a port number; its listen addresses are not known"]


def test_sshd_dump_of_edited_copy(tmp_path):
    need_package("openssh-server", "/usr/sbin/sshd")
    need_root("a private /run for sshd -T")
    conf = write(tmp_path / "sshd_config", "Port 2022\nListenAddress 127.0.0.1\nListenAddress [::1]:2200\n")
    code = ("from bindguard.request.discover import discover\n"
            f"r = discover([['/usr/sbin/sshd', '-D', '-f', '{conf}']], [], [], [], 'ssh.service')\n"
            "print(r.warnings); [print(f.bind.endpoint, f.source) for f in r.findings]")
    proc = run_in_private_run(code)
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.splitlines()) == sorted(["[]", "127.0.0.1:2022 sshd -T", "[::1]:2200 sshd -T"])


# --- Redis --------------------------------------------------------------------------------------

REDIS_EXEC = [["/usr/bin/redis-server", "/etc/redis/redis.conf", "--supervised", "systemd", "--daemonize", "no"]]


def test_redis_debian_default():
    need_package("redis-server", "/etc/redis/redis.conf")
    result = discover(REDIS_EXEC, [], [], [], "redis-server.service")
    where = f"/etc/redis/redis.conf:{line_of('/etc/redis/redis.conf', r'^bind ')}"
    assert summary(result) == [("127.0.0.1:6379", where, "confident"), ("[::1]:6379 v6only", where, "confident")]
    assert "optional" in result.findings[1].note


def test_redis_edited_copy(tmp_path):
    need_package("redis-server", "/etc/redis/redis.conf")
    conf = tmp_path / "redis.conf"
    extra = write(tmp_path / "extra.conf", "port 7000\ntls-port 7001\n")
    conf.write_text(Path("/etc/redis/redis.conf").read_text() + f"bind * -::*\ninclude {extra}\n")
    bind_line = len(conf.read_text().splitlines()) - 1
    result = discover([["redis-server", str(conf)]], [], [], [], "redis.service")
    assert summary(result) == [
        ("0.0.0.0:7000", f"{conf}:{bind_line}", "confident"), ("0.0.0.0:7001", f"{conf}:{bind_line}", "confident"),
        ("[::]:7000 v6only", f"{conf}:{bind_line}", "confident"),
        ("[::]:7001 v6only", f"{conf}:{bind_line}", "confident"),
    ]
    overridden = discover([["redis-server", str(conf), "--port", "7100", "--tls-port", "0", "--bind", "127.0.0.1"]],
                          [], [], [], "redis.service")
    assert summary(overridden) == [("127.0.0.1:7100", "redis-server --bind", "confident")]
    no_tcp = discover([["redis-server", str(conf), "--port", "0", "--tls-port", "0"]], [], [], [], "redis.service")
    assert no_tcp.findings == [] and no_tcp.warnings == []


# --- PostgreSQL ---------------------------------------------------------------------------------

def localhost_at(port: int) -> list[str]:
    return [f"[{h}]:{port} v6only" if ":" in h else f"{h}:{port}" for h in hosts_file_addresses("localhost")]


def test_postgres_debian_default():
    conf = "/etc/postgresql/15/main/postgresql.conf"
    need_package("postgresql", conf)
    result = discover([["/usr/bin/pg_ctlcluster", "--skip-systemctl-redirect", "15-main", "start"]], [], [], [],
                      "postgresql@15-main.service")
    assert result.warnings == []
    assert [(a, s) for a, s, _ in summary(result)] == [(a, f"{conf} (default listen_addresses)")
                                                       for a in localhost_at(5432)]


def test_postgres_edited_copy(tmp_path):
    need_package("postgresql", "/etc/postgresql/15/main/postgresql.conf")
    main = tmp_path / "15" / "main"
    shutil.copytree("/etc/postgresql/15/main", main)
    conf = main / "postgresql.conf"
    conf.write_text(conf.read_text().replace("data_directory = '/var/lib/postgresql/15/main'",
                                             f"data_directory = '{tmp_path}/data'"))
    write(main / "conf.d" / "listen.conf", "listen_addresses = '*'\nport 5433 # a comment\n")
    write(tmp_path / "data" / "postgresql.auto.conf", "# Do not edit this file manually!\nport = '5434'\n")
    env = dict(os.environ)  # pg_ctlcluster reads PG_CLUSTER_CONF_ROOT from its environment: the unit's
    code = ("from bindguard.request.discover import discover\n"
            f"r = discover([['pg_ctlcluster', '15', 'main', 'start']], ['PG_CLUSTER_CONF_ROOT={tmp_path}'], [], [], "
            "'postgresql@15-main.service')\n"
            "print(r.warnings); [print(f.bind.endpoint, f.bind.v6only, f.source) for f in r.findings]")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    listen = main / "conf.d" / "listen.conf"
    assert proc.stdout.splitlines() == ["[]", f"0.0.0.0:5434 False {listen}:1", f"[::]:5434 True {listen}:1"]
    write(main / "conf.d" / "listen.conf", "listen_addresses = ''\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.stdout.splitlines() == ["[]"]
    write(main / "conf.d" / "listen.conf", "listen_addresses = 'localhost\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.stdout.splitlines() == [
        f"['postgres configuration: {listen}:1: syntax error; its listen addresses are not known']"]


def test_postgres_command_line():
    need_package("postgresql", "/etc/postgresql/15/main/postgresql.conf")
    argv = ["/usr/lib/postgresql/15/bin/postgres", "-D", "/var/lib/postgresql/15/main", "-c",
            "config_file=/etc/postgresql/15/main/postgresql.conf", "-p", "6543", "-h", "127.0.0.1,::1"]
    result = discover([argv], [], [], [], "pg.service")
    assert [s[0] for s in summary(result)] == ["127.0.0.1:6543", "[::1]:6543 v6only"]


# --- MariaDB ------------------------------------------------------------------------------------

MARIADB_EXEC = [["/bin/sh", "-c", "set -f; [ ! -e /usr/bin/galera_recovery ] && VAR= || VAR=`/usr/bin/galera_recovery`;"
                 " [ $? -eq 0 ] || exit 1; exec /usr/sbin/mariadbd $MYSQLD_OPTS $_WSREP_NEW_CLUSTER $VAR"]]


def test_mariadb_debian_default():
    server = "/etc/mysql/mariadb.conf.d/50-server.cnf"
    need_package("mariadb-server", server)
    result = discover(MARIADB_EXEC, [], ["-/run/mariadb-wsrep-new-cluster"], [], "mariadb.service")
    assert result.daemons == ["mariadb"]
    assert summary(result) == [("127.0.0.1:3306", f"{server}:{line_of(server, r'^bind-address')}", "confident")]


def test_mariadb_warns_once_for_a_file_whose_bang_lines_it_skips(tmp_path):
    """In a file included as deep as the server reads, the server skips each `!` line and reads the
    rest: the finder too, with one warning for the file (its first skipped line, and how many), not one
    a line; a 1 MiB file of them would otherwise make some 350,000."""
    from bindguard.request.discover.common import DAEMON_INCLUDE_DEPTH, MAX_FILE_BYTES

    limit = DAEMON_INCLUDE_DEPTH["mysql"]
    files = [tmp_path / f"d{depth}.cnf" for depth in range(limit + 1)]
    for depth, path in enumerate(files[:-1]):
        write(path, f"!include {files[depth + 1]}\n")
    head, tail = "[mysqld]\n", "port = 3310\n"
    bangs = (MAX_FILE_BYTES - len(head) - len(tail)) // len("!x\n")
    write(files[-1], head + "!x\n" * bangs + tail)
    assert files[-1].stat().st_size <= MAX_FILE_BYTES
    result = discover([["mariadbd", f"--defaults-file={files[0]}"]], [], [], [], "mariadb.service")
    assert [s[0] for s in summary(result)] == ["0.0.0.0:3310", "[::]:3310 v6only"]
    skipped = [w for w in result.warnings if "skips a `!` directive" in w]
    assert len(skipped) == 1 and skipped[0].startswith(f"{files[-1]}:2: '!x' not read, nor the {bangs - 1} "
                                                       "`!` lines after it:"), skipped


def test_mariadb_edited_copy(tmp_path):
    need_package("mariadb-server", "/etc/mysql/my.cnf")
    write(tmp_path / "my.cnf", f"[client]\nport = 1\n!includedir {tmp_path}/conf.d/\n")
    write(tmp_path / "conf.d" / "50-server.cnf", "[mysqld]\nbind-address = ::\nport=3307\n")
    write(tmp_path / "conf.d" / "60-extra.cnf", "[mariadbd]\nloose_extra_port = 3308\n[mysqldump]\nport=9\n")
    argv = ["mariadbd", f"--defaults-file={tmp_path}/my.cnf"]
    server = tmp_path / "conf.d" / "50-server.cnf"
    result = discover([argv], [], [], [], "mariadb.service")
    assert summary(result) == [("[::]:3307 v6only", f"{server}:2", "confident"),
                               ("[::]:3308 v6only", f"{server}:2", "confident")]
    everywhere = discover([argv + ["--bind-address=*"]], [], [], [], "mariadb.service")
    assert [s[0] for s in summary(everywhere)] == ["0.0.0.0:3307", "[::]:3307 v6only", "0.0.0.0:3308",
                                                   "[::]:3308 v6only"]
    off = discover([argv + ["--skip-networking"]], [], [], [], "mariadb.service")
    assert off.findings == []
    cli = discover([argv + ["--bind-address=127.0.0.1", "--port=3400"]], [], [], [], "mariadb.service")
    assert [s[0] for s in summary(cli)] == ["127.0.0.1:3400", "127.0.0.1:3308"]
    write(tmp_path / "conf.d" / "70-broken.cnf", "[mysqld\nport=1\n")
    broken = discover([argv], [], [], [], "mariadb.service")
    assert broken.findings == [] and broken.warnings == [
        f"mariadb configuration: {tmp_path}/conf.d/70-broken.cnf:1: wrong group definition '[mysqld'; "
        "its listen addresses are not known"]


# --- unit facts: guesses, environment, socket units -----------------------------------------------

def test_guesses_from_command_line_and_environment(tmp_path):
    envfile = write(tmp_path / "env", "# comment\nexport LISTEN_ADDRESS='127.0.0.1:9100'\nAPP_PORT=\"5000\"\n")
    result = discover(
        [["/usr/bin/gunicorn", "--bind", "0.0.0.0:8000", "--pid", "/run/x.pid"],
         ["/usr/bin/app", "--host", "127.0.0.1", "--port", "9000", "--report", "7", "--web.listen-address=:9200"]],
        ["PORT=8080", "OTHER=1"], [str(envfile), "-/nonexistent"], [], "app.service")
    assert result.warnings == []
    assert summary(result) == [
        ("0.0.0.0:8000", "ExecStart=", "guess"),
        ("127.0.0.1:9000", "ExecStart=", "guess"),
        (dual(9200), "ExecStart=", "guess"),
        (dual(5000), "Environment APP_PORT=", "guess"),
        ("127.0.0.1:9100", "Environment LISTEN_ADDRESS=", "guess"),
        (dual(8080), "Environment PORT=", "guess"),
    ]
    missing = discover([["/usr/bin/app"]], [], ["/nonexistent/env"], [], "app.service")
    assert missing.warnings == ["EnvironmentFile=/nonexistent/env: cannot read: No such file or directory"]


def test_known_daemon_suppresses_guesses_and_sources_filter():
    need_package("redis-server", "/etc/redis/redis.conf")
    result = discover(REDIS_EXEC, ["PORT=1234"], [], [], "redis-server.service")
    assert all(f.confident for f in result.findings)
    only_guesses = discover(REDIS_EXEC, ["PORT=1234"], [], [], "redis-server.service", sources=["exec-start"])
    assert summary(only_guesses) == [(dual(1234), "Environment PORT=", "guess")]


def test_socket_units():
    result = discover([["/usr/bin/app"]], [], [], [("Stream", "[::]:8080", "app.socket"), ("Datagram", "0.0.0.0:53"),
                                                    ("Stream", "/run/app.sock")], "app.service")
    assert [(str(f.bind.endpoint), f.source, f.socket_unit) for f in result.findings] == [
        ("[::]:8080", "app.socket", "app.socket"), ("udp:0.0.0.0:53", "app.socket", "app.socket")]
    assert result.daemon_binds() == []


def test_discover_daemon_with_explicit_file(tmp_path):
    conf = write(tmp_path / "r.conf", "port 7777\nbind 127.0.0.1\n")
    result = discover_daemon("redis-server", config=str(conf))
    assert summary(result) == [("127.0.0.1:7777", f"{conf}:2", "confident")]


# --- the CLI ------------------------------------------------------------------------------------

def bindguard(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bindguard", *args], capture_output=True, text=True, timeout=60)


def test_cli_exec_start_and_daemon(tmp_path):
    need_package("redis-server", "/etc/redis/redis.conf")
    # an ExecStart= value as a unit file has it: prefixes, and with @ a second word that only names argv[0]
    proc = bindguard("discover", "--no-legend", "--exec-start",
                     "-@/usr/bin/redis-server redis-custom /etc/redis/redis.conf --daemonize no")
    assert proc.returncode == 0 and proc.stderr == ""
    line = line_of("/etc/redis/redis.conf", r"^bind ")
    assert proc.stdout.splitlines()[0].split() == ["127.0.0.1:6379", "confident", f"/etc/redis/redis.conf:{line}",
                                                   "reuseaddr"]
    conf = write(tmp_path / "nginx.conf", "events {}\nhttp { server { listen 8080 reuseport; } }\n")
    proc = bindguard("discover", "--daemon", "nginx", "--config", str(conf), "--json")
    assert proc.returncode == 0, proc.stderr
    import json

    findings = json.loads(proc.stdout)["findings"]
    assert [(f["address"], f["reuseport"], f["confidence"]) for f in findings] == [("0.0.0.0:8080", True, "confident")]


def test_cli_bad_input_is_one_message():
    for args, fragment in [
        (["discover"], "name a unit, or give --exec-start CMDLINE or --daemon NAME"),
        (["discover", "--daemon", "foo"], "--daemon foo: not a daemon bindguard knows"),
        (["discover", "--config", "/x"], "--config needs --daemon"),
        (["discover", "--exec-start", "'unclosed"], "No closing quotation"),
    ]:
        proc = bindguard(*args)
        assert proc.returncode == 64, (args, proc.stderr)
        assert fragment in proc.stderr and "Traceback" not in proc.stderr


def test_cli_broken_daemon_file_is_a_warning(tmp_path):
    conf = write(tmp_path / "nginx.conf", "http { server { listen 80 }\n")
    proc = bindguard("discover", "--daemon", "nginx", "--config", str(conf))
    assert proc.returncode == 0
    assert proc.stdout == "nothing found (nginx: no listen address)\n"
    assert str(conf) in proc.stderr and "Traceback" not in proc.stderr


def test_cli_unit_from_unit_files_without_a_bus(tmp_path):
    need_package("redis-server", "/etc/redis/redis.conf")
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=f"unix:path={tmp_path}/no-bus")
    env.pop("MANAGERPID", None)
    proc = subprocess.run([sys.executable, "-m", "bindguard", "discover", "--system", "--no-legend", "redis-server"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "reading redis-server.service's unit files instead" in proc.stderr
    assert [line.split()[0] for line in proc.stdout.splitlines()] == ["127.0.0.1:6379", "[::1]:6379"]
    missing = subprocess.run([sys.executable, "-m", "bindguard", "discover", "--system", "nothere"],
                             capture_output=True, text=True, timeout=60, env=env)
    assert missing.returncode == 70 and "no unit file of that name" in missing.stderr


def test_env_wrapper_and_shell_are_seen_through(tmp_path):
    conf = write(tmp_path / "r.conf", "port 7778\nbind 127.0.0.1\n")
    for argv in (["/usr/bin/env", "-i", "LANG=C", "redis-server", str(conf)],
                 ["/bin/sh", "-c", f"ulimit -n 4096 && exec env A=1 /usr/bin/redis-server {conf}"],
                 ["/bin/sh", "-e", "-c", f"exec /usr/bin/redis-server {conf}"]):
        result = discover([argv], [], [], [], "cache.service")
        assert summary(result) == [("127.0.0.1:7778", f"{conf}:2", "confident")], argv


def test_redis_optional_ipv6_on_a_host_without_ipv6(tmp_path, monkeypatch):
    """Debian's `bind 127.0.0.1 -::1` where IPv6 is off: Redis skips ::1, so discovery must too."""
    from bindguard.request.discover import redis

    conf = write(tmp_path / "r.conf", "bind 127.0.0.1 -::1 ::2\nport 7001\n")
    monkeypatch.setattr(redis, "ipv6_supported", lambda: False)
    result = discover([["redis-server", str(conf)]], [], [], [], "redis.service")
    assert [s[0] for s in summary(result)] == ["127.0.0.1:7001", "[::2]:7001 v6only"]  # ::2 has no '-'


def test_finders_read_the_unit_s_environment_not_the_guard_s(monkeypatch):
    # The guard's own environment (a shell's, or the manager's) is not the daemon's, and is not part
    # of what a remembered discovery is keyed on: only the unit's Environment=/EnvironmentFile= count.
    from bindguard.request.discover import apache, haproxy

    monkeypatch.setenv("BINDGUARD_TEST_PORT", "9999")
    assert haproxy._expand("bind :${BINDGUARD_TEST_PORT}", {}) == "bind :"
    assert haproxy._expand("bind :${BINDGUARD_TEST_PORT}", {"BINDGUARD_TEST_PORT": "80"}) == "bind :80"
    config = apache._Config("/etc/apache2", {}, None, {"BINDGUARD_TEST_PORT": "80"})
    assert config.expand("Listen ${BINDGUARD_TEST_PORT}") == "Listen 80"
    assert apache._Config("/etc/apache2", {}, None, {}).expand("Listen ${BINDGUARD_TEST_PORT}") \
        == "Listen ${BINDGUARD_TEST_PORT}"


def test_a_command_line_host_no_socket_can_bind_is_no_finding():
    # is_ip() takes fe80::1, but without a zone no socket binds it: no guess, and no crash of the
    # discovery (which took the guard down to fail-open, and the whole scan with it)
    result = discover([["/usr/bin/app", "--host", "fe80::1", "--port", "8080"]], [], [], [], "app.service")
    assert [s[0] for s in summary(result)] == []


def test_thousands_of_addresses_are_each_found_once():
    from bindguard.request.discover.common import Findings, endpoint

    findings = Findings("test")
    for _ in range(2):
        for port in range(1, 5001):
            findings.add(endpoint("127.0.0.1", port), "test")
    assert len(findings.findings) == 5000
