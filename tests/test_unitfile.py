"""Reading a service's command line from its unit files (no D-Bus): Debian's real units, and
drop-ins, masking, templates and specifiers in a private unit path."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import bindguard
from conftest import NOBODY, need, need_root

from bindguard.action import install
from bindguard.systemd import unitfiles
from bindguard.model.errors import UsageError
from bindguard.request.discover import discover
from bindguard.request.discover.common import hosts_file_addresses
from bindguard.model.endpoints import parse_listen
from bindguard.systemd.unitfacts import unit_facts_from_files
from test_discover import need_package


def findings_of(unit: str) -> list[tuple[str, str]]:
    facts = unit_facts_from_files(unit)
    result = discover(facts.exec_start, facts.environment, facts.environment_files, [], unit)
    return [(str(f.bind.endpoint), f.confidence) for f in result.findings]


@pytest.mark.parametrize("unit, package, path, expected", [
    ("nginx.service", "nginx", "/usr/sbin/nginx", ["0.0.0.0:80", "[::]:80"]),
    ("apache2.service", "apache2", "/usr/sbin/apache2", [str(parse_listen("80"))]),
    ("redis-server.service", "redis-server", "/etc/redis/redis.conf", ["127.0.0.1:6379", "[::1]:6379"]),
    ("redis.service", "redis-server", "/etc/redis/redis.conf", ["127.0.0.1:6379", "[::1]:6379"]),  # an alias
    ("postgresql@15-main.service", "postgresql", "/etc/postgresql/15/main/postgresql.conf",
     [f"[{h}]:5432" if ":" in h else f"{h}:5432" for h in hosts_file_addresses("localhost")]),
    ("mariadb.service", "mariadb-server", "/usr/sbin/mariadbd", ["127.0.0.1:3306"]),
    ("haproxy.service", "haproxy", "/usr/sbin/haproxy", []),
])
def test_debian_units(unit, package, path, expected):
    need_package(package, path)
    assert findings_of(unit) == [(address, "confident") for address in expected]


def test_ssh_and_its_alias(monkeypatch):
    need_package("openssh-server", "/usr/sbin/sshd")
    monkeypatch.setenv("PATH", "/nonexistent")  # read the files: /run/sshd is not there outside the unit
    assert findings_of("ssh.service") == findings_of("sshd.service") == [("0.0.0.0:22", "confident"),
                                                                          ("[::]:22", "confident")]


def test_unknown_unit_is_empty():
    facts = unit_facts_from_files("nothere-at-all.service")
    assert facts.exec_start == [] and facts.environment == []


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


@pytest.fixture
def unit_path(tmp_path, monkeypatch):
    dirs = [tmp_path / "etc", tmp_path / "run", tmp_path / "lib"]
    for d in dirs:
        d.mkdir()
    monkeypatch.setenv("SYSTEMD_UNIT_PATH", ":".join(map(str, dirs)))
    return dirs


def test_dropins_reset_and_append(unit_path):
    etc, run, lib = unit_path
    write(lib / "web-app.service", """
        [Unit]
        Description=ExecStart=/not/this
        [Service]
        Environment="A=1 2" B=3
        ExecStart=/usr/bin/web --port 1
        ExecStart=-/usr/bin/other \\
            --port 2
        """)
    write(lib / "web-app.service.d" / "10-reset.conf",
          "[Service]\nExecStart=\nExecStart=@/usr/bin/web web-name --port 3\n")
    write(etc / "web-app.service.d" / "10-reset.conf", "[Service]\nExecStart=\nExecStart=/usr/bin/web --port 4\n")
    write(run / "service.d" / "20-all.conf", "[Service]\nEnvironment=C=%n\n")
    write(lib / "web-.service.d" / "30-prefix.conf", "[Service]\nEnvironmentFile=-%t/web.env\n")
    facts = unit_facts_from_files("web-app.service")
    assert facts.exec_start == [["/usr/bin/web", "--port", "4"]]
    assert facts.environment == ["A=1 2", "B=3", "C=web-app.service"]
    assert facts.environment_files == ["-/run/web.env"]


def test_template_instance_specifiers_and_masking(unit_path):
    etc, run, lib = unit_path
    write(lib / "db@.service", "[Service]\nExecStart=/usr/bin/db --data /srv/%i --port %I --name %p\n")
    facts = unit_facts_from_files("db@main.service")
    assert facts.exec_start == [["/usr/bin/db", "--data", "/srv/main", "--port", "main", "--name", "db"]]
    write(lib / "db@x.service", "[Service]\nExecStart=/usr/bin/special\n")
    assert unit_facts_from_files("db@x.service").exec_start == [["/usr/bin/special"]]
    (etc / "db@x.service").symlink_to("/dev/null")
    assert unit_facts_from_files("db@x.service").exec_start == []
    write(lib / "old.service", "[Service]\nExecStart=/usr/bin/new-daemon\n")
    (run / "alias.service").symlink_to(lib / "old.service")
    write(lib / "old.service.d" / "x.conf", "[Service]\nEnvironment=FROM_TARGET_NAME=1\n")
    aliased = unit_facts_from_files("alias.service")
    assert aliased.exec_start == [["/usr/bin/new-daemon"]] and aliased.environment == ["FROM_TARGET_NAME=1"]


# Unit files that are links, by name -> target as written (relative to the link's directory,
# etc/), as aliases, masks and linked units are, and as a unit directory's owner may make them.
LINKED_UNITS = {
    "chain.service": "../run/mid.service",  # -> run/mid.service -> lib/real.service (absolute)
    "gone.service": "/nonexistent/bindguard/gone.service",  # dangling: the directory is missing
    "missing.service": "nothere.service",  # dangling, in the same directory
    "to-gone.service": "gone.service",  # a chain ending in a dangling link
    "mask.service": "/dev/null",
    "through-dir.service": "../libdir/./real.service",  # through a linked directory
    "up-again.service": "../libdir/../lib//real.service",  # `..` after a linked directory
    "missing-then-up.service": "nowhere/../../lib/real.service",  # os.path walks up from what is missing
    "not-a-dir.service": "../lib/real.service/x",
    "loop-a.service": "loop-b.service",
    "loop-b.service": "loop-a.service",
    "self.service": "self.service",
    "into-loop.service": "loop-a.service/../real.service",
}


def test_a_linked_unit_file_resolves_as_os_path_does_without_os(unit_path, tmp_path):
    """A unit file that is a link is resolved as os.path.realpath resolves it, dangling links and
    loops included (the name a link leads to is an alias), without loading os where it can."""
    from bindguard.systemd import unitexec

    etc, run, lib = unit_path
    write(lib / "real.service", "[Service]\nExecStart=/usr/sbin/nginx\n")
    (run / "mid.service").symlink_to(lib / "real.service")
    (tmp_path / "libdir").symlink_to(lib)
    for name, target in LINKED_UNITS.items():
        (etc / name).symlink_to(target)
    for name in LINKED_UNITS:
        link = str(etc / name)
        assert bindguard.real_path(link, strict=False) == unitexec._resolved(link) == os.path.realpath(link), name
    assert unitexec._resolved(str(etc / "chain.service")) == str(lib / "real.service")
    assert unitexec._resolved(str(etc / "mask.service")) == "/dev/null"
    assert unitexec._resolved(str(etc / "to-gone.service")) == "/nonexistent/bindguard/gone.service"
    assert unitexec.unit_files("chain.service") == [str(lib / "real.service")]
    assert unitexec.unit_files("gone.service") == [] and unitexec.unit_files("loop-a.service") == []
    # Every-service's path, from the launcher's interpreter (-I -S): a chain of links loads no os.
    src = str(Path(__file__).resolve().parent.parent / "src")
    probe = (f"import sys; sys.path.insert(0, {src!r}); from bindguard.systemd import unitexec; "
             f"print(unitexec._resolved({str(etc / 'chain.service')!r}), 'os' in sys.modules)")
    done = subprocess.run([sys.executable, "-I", "-S", "-c", probe], capture_output=True, text=True)
    assert done.stdout.split() == [str(lib / "real.service"), "False"], done.stderr


def test_a_chain_of_links_is_followed_as_far_as_the_kernel_follows_one(unit_path, tmp_path):
    """Up to the kernel's 40 links a linked unit file resolves as os.path.realpath resolves it; past
    them (a chain a user's linked unit can make as long as it likes) it is given back as it is, so
    that reading it fails with ELOOP as systemd's does, and the unit has no file: no recursion, no
    RecursionError (os.path.realpath raises one for a chain of a few thousand links)."""
    from bindguard.systemd import unitexec

    etc, _, lib = unit_path
    write(lib / "real.service", "[Service]\nExecStart=/usr/sbin/nginx\n")
    links = tmp_path / "links"
    links.mkdir()

    def chain(name: str, length: int) -> str:
        target = str(lib / "real.service")
        for i in range(length - 1):
            (links / f"{name}-{i}").symlink_to(target)
            target = str(links / f"{name}-{i}")
        (etc / f"{name}.service").symlink_to(target)
        return str(etc / f"{name}.service")

    within = chain("within", bindguard.SYMLINKS_MAX)
    assert bindguard.real_path(within, strict=False) == os.path.realpath(within) == str(lib / "real.service")
    assert unitexec.unit_files("within.service") == [str(lib / "real.service")]
    for name, length in (("past", bindguard.SYMLINKS_MAX + 1), ("long", 3000)):
        path = chain(name, length)
        assert bindguard.real_path(path, strict=False) == path, name
        assert unitexec.unit_files(f"{name}.service") == [], name


def test_runs_known_daemon_without_imports(unit_path, tmp_path):
    from bindguard.systemd import unitexec

    etc, _, lib = unit_path
    write(lib / "a.service", "[Service]\nExecStart=/usr/bin/env LANG=C /usr/sbin/nginx -g 'daemon off;'\n")
    write(lib / "b.service", "[Service]\nExecStart=/bin/sh -c \"ulimit -n 9; exec /usr/bin/redis-server /x.conf\"\n")
    write(lib / "c.service", "[Service]\nExecStart=/usr/bin/python3 -m http.server 8000\n")
    write(etc / "c.service.d" / "x.conf", "[Service]\nExecStart=\nExecStart=/usr/sbin/sshd -D\n")
    write(lib / "d.service", "[Service]\nExecStart=/usr/bin/sleep infinity\n")
    # env before a shell, and `@` naming argv[0]: read as discovery and the unit-file reader read them
    write(lib / "e.service", "[Service]\nExecStart=/usr/bin/env LANG=C /bin/sh -c \"exec /usr/sbin/nginx\"\n")
    write(lib / "f.service", "[Service]\nExecStart=@/usr/bin/env env /usr/sbin/sshd -D\n")
    assert [unitexec.runs_known_daemon(u) for u in ("a.service", "b.service", "c.service", "d.service",
                                                    "nothere.service", "e.service", "f.service")] \
        == [True, True, True, False, False, True, True]



def test_a_search_path_from_the_environment_keeps_only_directories_root_alone_can_change(tmp_path):
    """$SYSTEMD_UNIT_PATH and $BINDGUARD_CONFIG_PATH come from the unit's environment: a directory is
    kept, its links resolved, only when it and every directory above it are root's (or the guard's
    user's) and no one else can write them; a root-owned directory below another user's is not."""
    from bindguard.systemd.unitfiles import environment_dirs

    need_root("giving a directory to another user")
    theirs = tmp_path / "theirs"
    units = theirs / "units"
    units.mkdir(parents=True)
    os.chown(theirs, NOBODY, NOBODY)  # they may rename units and put their own in its place
    mine = tmp_path / "mine"
    mine.mkdir()
    (tmp_path / "link").symlink_to(mine)
    (tmp_path / "their-link").symlink_to(units)
    open_to_all = tmp_path / "open"
    open_to_all.mkdir()
    open_to_all.chmod(0o1777)  # sticky, as /tmp: still anyone may add a unit file to it
    assert environment_dirs(f"{units}:{tmp_path}/link:{tmp_path}/their-link:{open_to_all}::{mine}") \
        == [str(mine), str(mine)]


@pytest.mark.parametrize("environ", [
    {"HOME": "/h", "XDG_RUNTIME_DIR": "/rt"},
    {"HOME": "/h", "XDG_RUNTIME_DIR": "/rt", "XDG_CONFIG_DIRS": "/cfg/a:/cfg/b", "XDG_DATA_DIRS": "/data/a:/data/b"},
    {"HOME": "/h", "XDG_CONFIG_DIRS": "/etc:/etc/xdg", "XDG_DATA_DIRS": "/usr/lib:/usr/share"},  # repeats: the first counts
    {"HOME": "/h", "XDG_CONFIG_HOME": "/c", "XDG_DATA_HOME": "/d", "XDG_CONFIG_DIRS": "", "XDG_DATA_DIRS": "::/x"},
    {},
])
def test_the_user_search_path_is_systemds_own(environ):
    """The user manager's search path, in the order of systemd.unit(5), as systemd itself makes it
    from an environment (`systemd-analyze --user unit-paths`: systemd's own lookup code)."""
    from bindguard.systemd import unitexec

    analyze = subprocess.run(["systemd-analyze", "--user", "unit-paths"], env={"PATH": "/usr/bin:/bin", **environ},
                             capture_output=True, text=True, timeout=30)
    if analyze.returncode != 0:
        need(f"systemd-analyze: {analyze.stderr.strip()}")
    assert list(unitexec.user_unit_path(environ)) == analyze.stdout.split()


def test_as_root_without_a_proven_manager_the_environments_user_directories_must_be_roots(tmp_path, monkeypatch):
    """`--user` as root with no $MANAGERPID to prove: $HOME and $XDG_* are the unit's, so a directory
    they name is kept only when root alone can change it (bindguard.resolve_trusted)."""
    from bindguard.systemd import unitexec

    need_root("the root guard's rule")
    theirs = tmp_path / "theirs"
    (theirs / "systemd" / "user").mkdir(parents=True)
    os.chown(theirs, NOBODY, NOBODY)
    mine = tmp_path / "mine"
    (mine / "systemd" / "user").mkdir(parents=True)
    monkeypatch.delenv("MANAGERPID", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(theirs))
    (tmp_path / "link").symlink_to(mine)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "link"))
    dirs = unitexec.user_unit_path()
    assert f"{mine}/systemd/user" in dirs and not [d for d in dirs if d.startswith(str(theirs))], dirs
    assert not [d for d in dirs if d.startswith(f"{tmp_path}/link")], dirs  # what is read is what was checked


def test_a_unit_directory_that_appears_is_read_a_moment_later(tmp_path, monkeypatch):
    """Which unit directories exist is remembered for a moment only (unitexec.PRESENT_FOR): a guard
    that waits reads a directory that appeared meanwhile. A directory reached twice (as Debian's
    /lib/systemd/system is /usr/lib/systemd/system) is read once, where it comes first."""
    import time

    from bindguard.systemd import unitexec

    for name, path in (("HOME", tmp_path), ("XDG_CONFIG_HOME", tmp_path / "config"),
                       ("XDG_DATA_HOME", tmp_path / "data"), ("XDG_RUNTIME_DIR", tmp_path / "runtime")):
        monkeypatch.setenv(name, str(path))
    monkeypatch.delenv("SYSTEMD_UNIT_PATH", raising=False)
    monkeypatch.setattr(unitexec, "PRESENT_FOR", 0.05)
    assert unitexec.unit_files("late.service", True) == []
    unit = write(tmp_path / "config" / "systemd" / "user" / "late.service", "[Service]\nExecStart=/usr/bin/late\n")
    time.sleep(0.1)
    assert unitexec.unit_files("late.service", True) == [str(unit)]
    (tmp_path / "runtime").symlink_to(tmp_path / "config")  # runtime/systemd/user is config/systemd/user
    time.sleep(0.1)
    dropin = write(tmp_path / "config" / "systemd" / "user" / "late.service.d" / "x.conf", "[Service]\n")
    assert unitexec.unit_files("late.service", True) == [str(unit), str(dropin)]


# --- unit names: one normaliser, as systemd's unit_name_is_valid() and systemctl take them --------

@pytest.mark.parametrize("text, name", [
    ("web", "web.service"),  # no type: a service, as systemctl takes it
    ("web.service", "web.service"),
    ("web.socket", "web.socket"),
    ("sda.device", "sda.device"),
    ("home.automount", "home.automount"),
    ("web.foo", "web.foo.service"),  # .foo is no unit type
    ("getty@tty1", "getty@tty1.service"),
    ("a@b@c.service", "a@b@c.service"),  # only the first @ starts the instance
    ("foo\\x2dbar", "foo\\x2dbar.service"),  # systemd-escape's escapes are characters a name may have
    ("x" * 247, "x" * 247 + ".service"),  # 255 characters in all
])
def test_unit_names_systemd_accepts(text, name):
    assert unitfiles.unit_name(text) == unitfiles.normalize_unit(text) == name


@pytest.mark.parametrize("text, why", [
    ("a/b", "'/' cannot be in a unit name"),
    ("a b", "' ' cannot be in a unit name"),
    ("web\n.service", "'\\n' cannot be in a unit name"),
    ("\u00b2", "'\u00b2' cannot be in a unit name"),  # only ASCII letters and digits
    ("", "the name before its type is empty"),
    (".service", "the name before its type is empty"),
    ("x" * 248, "longer than 255 characters"),
    ("@foo.service", "it starts with '@'"),
    ("foo@", "foo@.service is a template"),
])
def test_unit_names_systemd_rejects(text, why):
    assert unitfiles.unit_name(text) is None
    with pytest.raises(UsageError, match=re.escape(why)) as raised:
        unitfiles.normalize_unit(text)
    assert raised.value.exit_code == 64 and repr(text[:80]) in raised.value.message


def test_a_template_is_a_unit_name_where_one_is_asked_for():
    assert unitfiles.normalize_unit("foo@", template=True) == "foo@.service"
    assert unitfiles.unit_name("foo@.service", template=True) == "foo@.service"


@pytest.mark.parametrize("args", [
    ["check", "--no-systemd", "--unit", "a/b", "127.0.0.1:8080"],
    ["check", "--unit", "a/b", "127.0.0.1:8080"],
    ["check", "--unit", "a/b"],
    ["install", "--print", "a/b", "127.0.0.1:8080"],
    ["uninstall", "a/b"],
    ["config", "check", "@x"],
    ["discover", "a b"],
])
def test_a_bad_unit_name_is_a_usage_error_from_every_command(args):
    done = subprocess.run([sys.executable, "-m", "bindguard", *args], capture_output=True, text=True,
                          env={**os.environ, "BINDGUARD_CONFIG_PATH": "/nonexistent"})
    assert done.returncode == 64, done.stderr
    assert "is not a unit name" in done.stderr and "Traceback" not in done.stderr


def test_install_takes_services_socket_units_and_their_templates():
    assert install.guarded_unit_name("nginx") == "nginx.service"
    assert install.guarded_unit_name("getty@tty1.service") == "getty@tty1.service"
    assert install.guarded_unit_name("getty@") == "getty@.service"  # a drop-in for every instance
    assert install.guarded_unit_name("web.socket") == "web.socket"  # ExecStartPre= runs before it binds
    for bad in ("", "a b.service", "../x.service", "nginx.timer", "-.mount"):
        with pytest.raises(UsageError):
            install.guarded_unit_name(bad)


def test_one_reading_of_a_template_name(tmp_path, monkeypatch):
    """A template is a template whatever its prefix holds (systemd: the first '@' right before the
    type): its bindguard file names no unit of its own, and only where a template is allowed
    (install) is it a unit name."""
    for name in ("web.service.yaml", "web@.service.yaml", "web.v2@.service.yaml", "db@main.service.yaml"):
        (tmp_path / name).write_text("wait: 1\n")
    monkeypatch.setenv(unitfiles.SEARCH_PATH_ENV, str(tmp_path))
    assert unitfiles.configured_units() == ["db@main.service", "web.service"]
    for template in ("web@.service", "web.v2@.service", "web@.socket"):
        assert unitfiles.is_template(template) and unitfiles.unit_name(template) is None
        assert unitfiles.unit_name(template, template=True) == template
    assert not unitfiles.is_template("a@b@.service") and unitfiles.unit_name("a@b@.service") == "a@b@.service"
    assert unitfiles.with_template("db@main.service") == ["db@main.service", "db@.service"]
    with pytest.raises(UsageError, match="is a template"):
        unitfiles.normalize_unit("web.v2@.service")


def test_a_unit_file_that_is_no_regular_file_or_too_large_is_not_read(unit_path):
    # The root guard reads a user manager's unit directories, which are the user's: a FIFO there
    # must not hang it, nor a huge file cost it; neither is read (as if the unit had no such file).
    from bindguard.systemd import unitexec

    etc, _, lib = unit_path
    write(lib / "big.service", "[Service]\nExecStart=/usr/sbin/nginx\n" + "# padding\n" * (unitexec.UNIT_FILE_MAX // 10))
    os.mkfifo(etc / "fifo.service")
    write(lib / "fine.service", "[Service]\nExecStart=/usr/sbin/nginx\n")
    assert [unitexec.runs_known_daemon(u) for u in ("big.service", "fifo.service", "fine.service")] \
        == [False, False, True]
