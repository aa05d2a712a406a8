"""Discovery's work is bounded, whatever a daemon's configuration holds (issue 9, item 6).

A configuration can belong to the service's user (Debian's /etc/redis/redis.conf belongs to
redis): a FIFO must not hang the guard, /dev/zero or a huge sparse file must not eat memory,
includes that multiply must not run on for minutes. Each case runs `bindguard discover` in a
child with a 1 GiB address-space limit and a timeout, so the guard before the fix fails the test
instead of hanging it or the machine; each must answer with a warning, exit 0 (fail open), and
stay small.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from conftest import need_root
from test_discover import need_package

SRC = Path(__file__).resolve().parent.parent / "src"
MEMORY_LIMIT = 1 << 30
SMALL_KIB = 200_000  # a discovery's peak RSS: ~30 MB here; reading /dev/zero took 2.9 GB
CHILD = textwrap.dedent(f"""
    import resource, runpy, sys
    resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_LIMIT}, {MEMORY_LIMIT}))
    sys.argv = ["bindguard", *sys.argv[1:]]
    try:
        runpy.run_module("bindguard", run_name="__main__")
    finally:
        print("maxrss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
""")


def bounded_discover(*args: str) -> tuple[int, dict, int]:
    """(exit code, the JSON printed, peak RSS in KiB) of `bindguard discover ARGS --json`."""
    env = dict(os.environ, PYTHONPATH=str(SRC))
    proc = subprocess.run([sys.executable, "-c", CHILD, "discover", *args, "--json"], capture_output=True,
                          text=True, timeout=30, env=env)
    rss = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("maxrss ")]
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout or "{}"), rss[0] if rss else 0


@pytest.fixture
def hostile(tmp_path):
    """A FIFO, a symlink to /dev/zero and a 1 GiB sparse file."""
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "zero").symlink_to("/dev/zero")
    with open(tmp_path / "sparse", "wb") as f:
        f.truncate(1 << 30)
    return tmp_path


WHY = {"fifo": "a FIFO, not a regular file", "zero": "a character device, not a regular file",
       "/dev/zero": "a character device, not a regular file", "sparse": "more than the 1 MiB"}

# daemon -> (its binary, its configuration naming BAD as an include, argv naming CONF)
INCLUDES = {
    "nginx": ("/usr/sbin/nginx", "events {}\ninclude BAD;\nhttp { server { listen 127.0.0.1:8080; } }\n",
              "/usr/sbin/nginx -c CONF"),
    "redis": ("/usr/bin/redis-server", "port 7000\ninclude BAD\n", "/usr/bin/redis-server CONF"),
    "sshd": ("/usr/sbin/sshd", "Port 2222\nInclude BAD\n", "/usr/sbin/sshd -D -f CONF"),
    "postgres": ("/usr/lib/postgresql", "port = 5433\ninclude 'BAD'\n", "/usr/lib/postgresql/15/bin/postgres "
                                                                         "-c config_file=CONF"),
    "mariadb": ("/usr/sbin/mariadbd", "[mysqld]\nport = 3307\n!include BAD\n", "/usr/sbin/mariadbd "
                                                                               "--defaults-file=CONF"),
}
# daemon -> argv naming BAD as its main configuration file
MAIN_FILES = {
    "nginx": "/usr/sbin/nginx -c BAD",
    "apache": "/usr/sbin/apache2 -f BAD",
    "haproxy": "/usr/sbin/haproxy -f BAD",
    "sshd": "/usr/sbin/sshd -f BAD",
    "redis": "/usr/bin/redis-server BAD",
    "postgres": "/usr/lib/postgresql/15/bin/postgres -c config_file=BAD",
    "mariadb": "/usr/sbin/mariadbd --defaults-file=BAD",
}


def check_refused(hostile: Path, bad: str, exec_start: str) -> None:
    path = bad if bad.startswith("/") else str(hostile / bad)
    code, found, rss = bounded_discover("--exec-start", exec_start)
    assert code == 0, found
    assert found["findings"] == [], found
    assert any(path in w and WHY[bad] in w for w in found["warnings"]), found["warnings"]
    assert rss < SMALL_KIB, rss


@pytest.mark.parametrize("bad", ["fifo", "zero", "/dev/zero", "sparse"])
@pytest.mark.parametrize("daemon", sorted(INCLUDES))
def test_an_include_that_is_not_a_small_regular_file(hostile, daemon, bad):
    binary, text, argv = INCLUDES[daemon]
    need_package(daemon, binary)
    path = bad if bad.startswith("/") else str(hostile / bad)
    conf = hostile / "daemon.conf"
    conf.write_text(text.replace("BAD", path))
    check_refused(hostile, bad, argv.replace("CONF", str(conf)))


@pytest.mark.parametrize("bad", ["fifo", "zero"])
@pytest.mark.parametrize("daemon", sorted(MAIN_FILES))
def test_a_main_file_that_is_not_a_regular_file(hostile, daemon, bad):
    argv = MAIN_FILES[daemon]
    need_package(daemon, argv.split()[0])
    check_refused(hostile, bad, argv.replace("BAD", str(hostile / bad)))


READER = textwrap.dedent(f"""
    import json, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_LIMIT}, {MEMORY_LIMIT}))
    from bindguard.request.discover import common
    outcomes = {{}}
    for path in sys.argv[1:]:
        try:
            outcomes[path] = "read " + repr(common.read_text(path))
        except common.DaemonConfigError as exc:
            outcomes[path] = str(exc)
    print(json.dumps(outcomes))
""")


def test_the_shared_reader(hostile):
    from bindguard.request.discover import common

    (hostile / "ok.conf").write_text("fine\n")
    (hostile / "link.conf").symlink_to(hostile / "ok.conf")  # Debian's sites-enabled/ are symlinks
    paths = {"fifo": "a FIFO", "zero": "a character device", "sparse": "more than the 1 MiB", ".": "a directory",
             "link.conf": "read 'fine\\n'"}
    proc = subprocess.run([sys.executable, "-c", READER, *(str(hostile / p) for p in paths)], capture_output=True,
                          text=True, timeout=30, env=dict(os.environ, PYTHONPATH=str(SRC)))
    outcomes = json.loads(proc.stdout)
    for name, why in paths.items():
        assert why in outcomes[str(hostile / name)], outcomes
    with common.discovery_scope():
        budget = common.current_budget()
        budget.files_left = 2
        common.read_text(str(hostile / "ok.conf"))
        common.read_text(str(hostile / "ok.conf"))
        with pytest.raises(common.BudgetExceeded, match="after 1000 files"):
            common.read_text(str(hostile / "ok.conf"))
    with common.discovery_scope():
        common.current_budget().bytes_left = 3
        with pytest.raises(common.BudgetExceeded, match="MiB read"):
            common.read_text(str(hostile / "ok.conf"))
    with common.discovery_scope():
        common.current_budget().deadline = 0
        with pytest.raises(common.BudgetExceeded, match="stopped after 10 s"):
            common.read_text(str(hostile / "ok.conf"))


def multiplying(directory: Path, line: str, levels: int = 8, fanout: int = 10) -> Path:
    """level0 includes level1 `fanout` times, ..., within every parser's own depth limit."""
    for level in range(levels):
        (directory / f"level{level}.conf").write_text(line.format(directory / f"level{level + 1}.conf") * fanout)
    (directory / f"level{levels}.conf").write_text("")
    return directory / "level0.conf"


@pytest.mark.parametrize("daemon, line, argv", [
    ("nginx", "include {};\n", "/usr/sbin/nginx -c CONF"),
    ("redis", "include {}\n", "/usr/bin/redis-server CONF"),
    ("sshd", "Include {}\n", "/usr/sbin/sshd -f CONF"),
])
def test_includes_that_multiply_stop_at_the_budget(tmp_path, daemon, line, argv):
    need_package(daemon, argv.split()[0])
    conf = multiplying(tmp_path, line)
    code, found, rss = bounded_discover("--exec-start", argv.replace("CONF", str(conf)))
    assert code == 0 and found["findings"] == [], found
    assert any("discovery stopped after 1000 files" in w for w in found["warnings"]), found["warnings"]
    assert rss < SMALL_KIB, rss


def test_an_include_glob_of_too_many_files(tmp_path):
    need_package("nginx", "/usr/sbin/nginx")
    many = tmp_path / "many"
    many.mkdir()
    for i in range(1001):
        (many / f"{i}.conf").write_text("")
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"events {{}}\ninclude {many}/*.conf;\n")
    code, found, _ = bounded_discover("--exec-start", f"/usr/sbin/nginx -c {conf}")
    assert code == 0 and any("more than 1000 entries" in w for w in found["warnings"]), found


# daemon -> (its binary, a configuration that includes itself (SELF), argv naming CONF, its own depth limit)
SELF_INCLUDES = {
    "nginx": ("/usr/sbin/nginx", "events {}\ninclude SELF;\n", "/usr/sbin/nginx -c CONF", None),
    "apache": ("/usr/sbin/apache2", "Include SELF\n", "/usr/sbin/apache2 -f CONF", "apache"),
    "redis": ("/usr/bin/redis-server", "port 7000\ninclude SELF\n", "/usr/bin/redis-server CONF", None),
    "sshd": ("/usr/sbin/sshd", "Port 2222\nInclude SELF\n", "/usr/sbin/sshd -D -f CONF", "sshd"),
    "postgres": ("/usr/lib/postgresql", "port = 5433\ninclude 'SELF'\n",
                 "/usr/lib/postgresql/15/bin/postgres -c config_file=CONF", "postgres"),
    "mariadb": ("/usr/sbin/mariadbd", "[mysqld]\nport = 3307\n!include SELF\n",
                "/usr/sbin/mariadbd --defaults-file=CONF", "mysql"),
}


@pytest.mark.parametrize("daemon", sorted(SELF_INCLUDES))
def test_an_include_loop_stops_at_its_daemon_s_depth(tmp_path, daemon):
    """A loop stops where the daemon stops it: a failed start (no addresses known), or for MariaDB a
    skipped `!include` (the server starts with what it read); bindguard's own bound where there is none."""
    from bindguard.request.discover.common import DAEMON_INCLUDE_DEPTH, MAX_INCLUDE_DEPTH

    binary, text, argv, own = SELF_INCLUDES[daemon]
    need_package(daemon, binary)
    conf = tmp_path / "daemon.conf"
    conf.write_text(text.replace("SELF", str(conf)))
    code, found, _ = bounded_discover("--exec-start", argv.replace("CONF", str(conf)))
    depth = DAEMON_INCLUDE_DEPTH[own] if own else MAX_INCLUDE_DEPTH
    assert code == 0, found
    if daemon == "mariadb":
        assert [f["address"] for f in found["findings"]] == ["0.0.0.0:3307", "[::]:3307"], found
        assert [w for w in found["warnings"] if w.startswith(f"{conf}:3: ") and "not read" in w], found
        return
    assert found["findings"] == [], found
    assert [w for w in found["warnings"] if f"{conf}:" in w and f"nested more than {depth} deep" in w], found


# An include chain: the file the daemon starts from (depth 0) includes one at depth 1, and so on; the
# deepest holds LEAF, and with "and an include of nothing" also an include that names no file.
# daemon -> (its binary, its limit's key, argv naming DIR and CONF, the first file's head, an include of
# NEXT, the deepest file, an include of nothing)
DEBIAN_PACKAGES = {"sshd": "openssh-server", "postgres": "postgresql-15", "mariadb": "mariadb-server",
                   "apache": "apache2"}
CHAINS = {
    "sshd": ("/usr/sbin/sshd", "sshd", "/usr/sbin/sshd -D -f CONF", "", "Include NEXT\n", "Port 2299\n",
             "Include DIR/none/*.conf\n"),
    "postgres": ("/usr/lib/postgresql/15/bin/postgres", "postgres",
                 "/usr/lib/postgresql/15/bin/postgres -c config_file=CONF", "", "include 'NEXT'\n", "port = 5499\n",
                 "include_if_exists 'DIR/none.conf'\n"),
    "mariadb": ("/usr/sbin/mariadbd", "mysql", "/usr/sbin/mariadbd --defaults-file=CONF", "",
                "[mysqld]\nport = 33DEPTH\n!include NEXT\n", "[mysqld]\nport = 33DEPTH\n", "!includedir DIR/none\n"),
    "apache": ("/usr/sbin/apache2", "apache", "/usr/sbin/apache2 -d DIR -f CONF",
               "LoadModule mpm_event_module /usr/lib/apache2/modules/mod_mpm_event.so\nErrorLog /dev/null\n"
               "ServerName localhost\nPidFile DIR/pid\n", "Include NEXT\n", "Listen 127.0.0.1:8099\n",
               "IncludeOptional DIR/none/*.conf\n"),
}
# (daemon, how much deeper than its limit the deepest file is, whether it includes nothing too): what the
# daemon does, checked on the daemon itself: "read" (it starts with everything), "refused" (it does not
# start), "skipped" (it starts without what the deepest `!` line names, and warns)
DEPTHS = [
    ("sshd", 0, False, "read"), ("sshd", 1, False, "refused"), ("sshd", 0, True, "read"),
    ("postgres", 0, False, "read"), ("postgres", 1, False, "refused"), ("postgres", 0, True, "refused"),
    ("mariadb", 0, False, "read"), ("mariadb", 1, False, "skipped"), ("mariadb", 0, True, "skipped"),
    ("apache", 0, False, "read"), ("apache", 1, False, "refused"), ("apache", 0, True, "refused"),
]


@pytest.fixture
def shared_dir():
    """A directory every user may read (PostgreSQL runs as postgres), removed after the test; its name and
    its files' are short, as Apache's message names every file of a chain, in a buffer of its own."""
    where = Path(tempfile.mkdtemp(prefix="bg-"))
    where.chmod(0o755)
    try:
        yield where
    finally:
        shutil.rmtree(where)


def _chain(where: Path, daemon: str, deepest: int, nothing: bool) -> Path:
    _, _, _, head, include, leaf, include_nothing = CHAINS[daemon]
    files = [where / f"d{depth}" for depth in range(deepest + 1)]
    for depth, path in enumerate(files):
        text = (head if depth == 0 else "") + (include if depth < deepest else leaf + (include_nothing * nothing))
        text = text.replace("NEXT", str(files[depth + 1]) if depth < deepest else "")
        path.write_text(text.replace("DEPTH", f"{depth:02d}").replace("DIR", str(where)))
        path.chmod(0o644)
    return files[0]


def _daemon_verdict(daemon: str, where: Path, conf: Path) -> str:
    """What the daemon itself does with conf: read, refused or skipped."""
    if daemon == "sshd":  # its privilege separation directory, on a /run of its own
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(where / "key")], check=True)
        argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                'mount -t tmpfs tmpfs /run && mkdir /run/sshd && exec /usr/sbin/sshd -t -f "$0" -h "$1"',
                str(conf), str(where / "key")]
    elif daemon == "postgres":
        (where / "data").mkdir(mode=0o700)
        shutil.chown(where / "data", "postgres")
        argv = ["runuser", "-u", "postgres", "--", CHAINS[daemon][0], "-D", str(where / "data"), "-c",
                f"config_file={conf}", "-C", "port"]
    elif daemon == "mariadb":
        argv = ["/usr/sbin/mariadbd", f"--defaults-file={conf}", "--print-defaults"]
    else:
        argv = ["/usr/sbin/apache2", "-d", str(where), "-f", str(conf), "-t"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    said = done.stdout + done.stderr
    if done.returncode != 0:
        assert any(why in said for why in ("Too many recursive configuration includes", "maximum nesting depth "
                                           "exceeded", "Exceeded maximum include depth of 128")), said
        return "refused"
    return "skipped" if "Warning: skipping '!include" in said else "read"


@pytest.mark.parametrize("daemon, past, nothing, verdict", DEPTHS)
def test_includes_are_read_exactly_as_deep_as_the_daemon_reads_them(shared_dir, daemon, past, nothing, verdict):
    """At its limit the finder reads what the daemon reads (a finder must never turn down what its daemon
    starts with); one deeper it does what the daemon does; both checked against the daemon itself."""
    from bindguard.request.discover.common import DAEMON_INCLUDE_DEPTH

    binary, limit_key, argv = CHAINS[daemon][:3]
    need_package(DEBIAN_PACKAGES[daemon], binary)
    need_root("running the daemons themselves, as their users")
    limit = DAEMON_INCLUDE_DEPTH[limit_key]
    conf = _chain(shared_dir, daemon, limit + past, nothing)
    assert _daemon_verdict(daemon, shared_dir, conf) == verdict
    code, found, _ = bounded_discover("--exec-start", argv.replace("DIR", str(shared_dir)).replace("CONF", str(conf)))
    assert code == 0, found
    ports = {f["address"].rsplit(":", 1)[1] for f in found["findings"]}
    too_deep = [w for w in found["warnings"] if f"nested more than {limit} deep" in w]
    skipped = [w for w in found["warnings"] if "skips a `!` directive" in w]
    if verdict == "refused":
        assert not ports and too_deep and not skipped, found
    else:
        port = {"sshd": "2299", "postgres": "5499", "apache": "8099"}.get(daemon, f"33{limit:02d}")
        assert ports == {port} and not too_deep and bool(skipped) == (verdict == "skipped"), found


LONG = "1" * 100_000
# daemon -> (its binary, a configuration with a 100,000-character address, argv naming CONF)
LONG_ADDRESSES = {
    "redis": ("/usr/bin/redis-server", f"port 7000\nbind {LONG}\n", "/usr/bin/redis-server CONF"),
    "nginx": ("/usr/sbin/nginx", f"events {{}}\nstream {{ server {{ listen {LONG}; listen 127.0.0.1:{LONG}; }} }}\n",
              "/usr/sbin/nginx -c CONF"),
    "haproxy": ("/usr/sbin/haproxy", f"frontend f\n  bind {LONG}\n", "/usr/sbin/haproxy -f CONF"),
    "apache": ("/usr/sbin/apache2", f"Listen {LONG}x\n", "/usr/sbin/apache2 -f CONF"),
}


@pytest.mark.parametrize("daemon", sorted(LONG_ADDRESSES))
def test_a_long_address_is_quoted_in_part(tmp_path, daemon):
    """A warning names the address the file's user wrote, but not all 100,000 characters of it."""
    binary, text, argv = LONG_ADDRESSES[daemon]
    need_package(daemon, binary)
    conf = tmp_path / "daemon.conf"
    conf.write_text(text)
    code, found, _ = bounded_discover("--exec-start", argv.replace("CONF", str(conf)))
    assert code == 0 and found["findings"] == [], found
    warnings = [w for w in found["warnings"] if w.startswith(f"{conf}:")]
    assert warnings and all("'1111111111" in w and len(w) < len(str(conf)) + 300 for w in warnings), \
        [w[:300] for w in found["warnings"]]


@pytest.mark.integration
def test_the_guard_fails_open_on_a_fifo_in_the_units_configuration(systemd_rig, hostile):
    """Under the every-service guard, a FIFO in nginx's configuration costs a warning, not the start."""
    need_package("nginx", "/usr/sbin/nginx")
    rig = systemd_rig
    conf = hostile / "nginx.conf"
    conf.write_text(f"events {{}}\ninclude {hostile / 'fifo'};\nhttp {{ server {{ listen 127.0.0.1:18191; }} }}\n")
    guard = f"/usr/bin/env PYTHONPATH={SRC} {sys.executable} -m bindguard check --unit %n"
    log = rig.log("web.log")
    rig.write_unit("web.service", f"[Service]\nExecStartPre=+{guard}\nExecStart=/usr/sbin/nginx -c {conf}\n"
                                  f"StandardError=append:{log}\n")
    started = rig.start("web.service", timeout=60)
    assert started.pre_status[0] == 0, (started, log.read_text())
    assert f"{hostile / 'fifo'}: a FIFO, not a regular file" in log.read_text()
    rig.stop("web.service")
