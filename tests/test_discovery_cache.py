"""Discovery's answer remembered (bindguard.request.cache): used only while everything it read is
unchanged, never past a change, and never from an entry that is not root's alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from bindguard.model.kinds import DISCOVERY_SOURCES
from bindguard.request import cache
from conftest import bytecode_compiled, need_root, remembered
from test_discover import need_package

SRC = Path(__file__).resolve().parent.parent / "src"
NGINX = "/usr/sbin/nginx"
DEBIAN_NGINX_UNIT = "/lib/systemd/system/nginx.service"


def nginx_conf(root: Path, port: int, include: str = "") -> str:
    return (f"pid {root}/nginx.pid;\nerror_log stderr;\nevents {{}}\n"
            f"http {{\n  access_log off;\n  {include}\n  server {{ listen 127.0.0.1:{port}; }}\n}}\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A unit running nginx on a configuration of its own, in a unit directory of its own, with
    the cache's entries in a directory of the test's."""
    need_root("the cache is root's alone")
    need_package("nginx", NGINX)
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    monkeypatch.setattr(cache, "RUN_DIR", str(run))
    monkeypatch.setattr(cache, "ENTRIES", str(run / "discovery"))
    units = tmp_path / "units"
    units.mkdir()
    monkeypatch.setenv("SYSTEMD_UNIT_PATH", str(units))
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_conf(tmp_path, 18181, f"include {tmp_path}/conf.d/*.conf;"))
    (tmp_path / "conf.d").mkdir()
    unit = f"cached-{uuid.uuid4().hex[:8]}.service"
    (units / unit).write_text(f"[Service]\nExecStart={NGINX} -c {conf} -g 'daemon off;'\n")
    return unit, conf, tmp_path


def ports(result) -> list[int]:
    return sorted(f.bind.endpoint.port for f in result.findings)


def settled() -> None:
    """Past the moment a change could leave a file's signature as it was (cache.FRESH_NS)."""
    time.sleep(cache.FRESH_NS / 1e9 + 0.05)


def test_a_changed_listen_line_is_read_at_the_next_run(site):
    unit, conf, _ = site
    settled()
    assert ports(cache.discover_from_files(unit, False, list(DISCOVERY_SOURCES))) == [18181]
    remembered = cache.lookup(unit, False)
    assert remembered is not None and [f[0] for f in remembered.findings] == ["127.0.0.1:18181"]
    assert ports(remembered.discovery()) == [18181]
    # Same size, same inode, written in place right away: only its mtime and ctime tell.
    with open(conf, "r+") as f:
        text = f.read()
        f.seek(0)
        f.write(text.replace("18181", "18182"))
    assert cache.lookup(unit, False) is None
    assert ports(cache.discover_from_files(unit, False, list(DISCOVERY_SOURCES))) == [18182]
    assert cache.lookup(unit, False) is None, "remembered a file that had just changed"
    settled()
    assert ports(cache.discover_from_files(unit, False, list(DISCOVERY_SOURCES))) == [18182]
    assert cache.lookup(unit, False) is not None


def test_the_program_a_dump_ran_is_part_of_what_is_remembered(site):
    """A new nginx binary (an upgrade) is a change like any file read: the dump's program (run by
    posix_spawn for a service that runs as root, as by subprocess for one that changes user) is in
    the entry."""
    unit, _, _ = site
    settled()
    result = cache.discover_from_files(unit, False, list(DISCOVERY_SOURCES))
    assert [f.source.endswith("(nginx -T)") for f in result.findings] == [True], result
    entry = Path(cache._entry_path(unit, False)).read_text()
    assert f"\nread\t1\t{os.path.realpath(NGINX)}\t" in entry, entry


def test_the_program_a_dump_spawns_is_recorded_as_it_is_run():
    """What the test above finds could come from the dump's other looks at its program (allowed()
    stats it by the name given): run through a link, only the spawn itself (the audit event of
    os.posix_spawn) records the file it runs, followed."""
    from bindguard.request.discover import dump

    program = "/usr/bin/python3"  # Debian's link to python3.11
    assert os.path.islink(program)
    with cache.recording() as recorder:
        ok, _, why = dump.run([program, "-c", "pass"], dump.Credentials(None))
    assert ok, why
    assert (os.path.realpath(program), True) in recorder.reads, recorder.reads


def test_a_file_new_in_an_include_glob_is_read(site):
    unit, _, root = site
    settled()
    assert ports(cache.discover_from_files(unit, False, list(DISCOVERY_SOURCES))) == [18181]
    assert cache.lookup(unit, False) is not None
    (root / "conf.d" / "more.conf").write_text("server { listen 127.0.0.1:18183; }\n")
    assert cache.lookup(unit, False) is None
    assert ports(cache.discover_from_files(unit, False, list(DISCOVERY_SOURCES))) == [18181, 18183]


def test_a_new_drop_in_or_environment_file_is_read(site, monkeypatch):
    unit, conf, root = site
    other = root / "other.conf"
    other.write_text(nginx_conf(root, 18184))
    units = Path(os.environ["SYSTEMD_UNIT_PATH"])
    (units / unit).write_text(f"[Service]\nEnvironmentFile=-{root}/env\nExecStart={NGINX} -c $CONF\n")
    settled()
    # no CONF: the default file
    assert 18181 not in ports(cache.discover_from_files(unit, False, list(DISCOVERY_SOURCES)))
    (root / "env").write_text(f"CONF={conf}\n")  # an optional EnvironmentFile= that appears
    assert cache.lookup(unit, False) is None
    assert ports(cache.discover_from_files(unit, False, list(DISCOVERY_SOURCES))) == [18181]
    settled()
    cache.discover_from_files(unit, False, list(DISCOVERY_SOURCES))
    assert cache.lookup(unit, False) is not None
    (units / f"{unit}.d").mkdir()
    (units / f"{unit}.d" / "override.conf").write_text(f"[Service]\nEnvironment=CONF={other}\nEnvironmentFile=\n")
    assert cache.lookup(unit, False) is None
    assert ports(cache.discover_from_files(unit, False, list(DISCOVERY_SOURCES))) == [18184]



def test_a_drop_in_in_a_unit_directory_that_appears_later_is_read(site, monkeypatch):
    """A unit directory that was missing when discovery was remembered counts, although the same
    process had looked at the unit path before the recording began (as the every-service path
    does, bindguard.systemd.unitexec remembering which directories exist): a drop-in that appears
    in it is read at the next run."""
    from bindguard.systemd import unitexec

    unit, _, root = site
    other = root / "other.conf"
    other.write_text(nginx_conf(root, 18185))
    config = root / "config"
    (config / "systemd" / "user").mkdir(parents=True)
    (config / "systemd" / "user" / unit).write_text((Path(os.environ["SYSTEMD_UNIT_PATH"]) / unit).read_text())
    monkeypatch.delenv("SYSTEMD_UNIT_PATH")
    for name, path in (("HOME", root), ("XDG_CONFIG_HOME", config), ("XDG_DATA_HOME", root / "data"),
                       ("XDG_RUNTIME_DIR", root / "runtime")):
        monkeypatch.setenv(name, str(path))
    assert unitexec.unit_files(unit, True), "the unit is in the user unit path"
    settled()
    assert ports(cache.discover_from_files(unit, True, list(DISCOVERY_SOURCES))) == [18181]
    assert cache.lookup(unit, True) is not None
    dropin = config / "systemd" / "user.control" / f"{unit}.d"  # before systemd/user in the path
    dropin.mkdir(parents=True)
    (dropin / "override.conf").write_text(f"[Service]\nExecStart=\nExecStart={NGINX} -c {other}\n")
    assert cache.lookup(unit, True) is None
    assert ports(cache.discover_from_files(unit, True, list(DISCOVERY_SOURCES))) == [18185]


def test_an_entry_not_roots_alone_or_malformed_is_ignored(site):
    unit, _, _ = site
    settled()
    cache.discover_from_files(unit, False, list(DISCOVERY_SOURCES))
    entry = Path(cache._entry_path(unit, False))
    good = entry.read_bytes()
    assert cache.lookup(unit, False) is not None
    os.chown(entry, 1, 0)
    assert cache.lookup(unit, False) is None, "an entry of another user's"
    os.chown(entry, 0, 0)
    entry.chmod(0o622)
    assert cache.lookup(unit, False) is None, "an entry others may write"
    entry.chmod(0o600)
    entry.rename(entry.with_name("real"))
    entry.symlink_to(entry.with_name("real"))
    assert cache.lookup(unit, False) is None, "an entry that is a symlink"
    entry.unlink()
    cut_at_a_line_end = good[:good.index(b"\nread\t") + 1]  # the header alone: no read vouches for anything
    for corrupt in (good[:len(good) // 2], cut_at_a_line_end, good.replace(b"finding\t", b"finding\t\t"),
                    b"\xff\xfe", b""):
        entry.write_bytes(corrupt)
        entry.chmod(0o600)
        assert cache.lookup(unit, False) is None, corrupt[:80]
    entry.write_bytes(good)
    assert cache.lookup(unit, False) is not None
    os.chown(cache.ENTRIES, 1, 1)
    assert cache.lookup(unit, False) is None, "a directory of another user's"
    assert ports(cache.discover_from_files(unit, False, list(DISCOVERY_SOURCES))) == [18181]
    assert entry.read_bytes() == good, "wrote into a directory of another user's"
    os.chown(cache.ENTRIES, 0, 0)


def test_run_dir_is_made_root_only(site, monkeypatch, tmp_path):
    unit, _, _ = site
    fresh = tmp_path / "fresh"
    monkeypatch.setattr(cache, "RUN_DIR", str(fresh))
    monkeypatch.setattr(cache, "ENTRIES", str(fresh / "discovery"))
    settled()
    cache.discover_from_files(unit, False, list(DISCOVERY_SOURCES))
    for directory in (fresh, fresh / "discovery"):
        info = directory.stat()
        assert (info.st_uid, info.st_mode & 0o777) == (0, 0o700), directory
    assert cache.lookup(unit, False) is not None


def test_a_discovery_cut_short_is_not_remembered(site, monkeypatch):
    unit, _, _ = site
    from bindguard.request.discover import common

    monkeypatch.setattr(common, "MAX_SECONDS", 0.0)
    monkeypatch.setattr(common.Budget.__init__, "__defaults__", (common.MAX_FILES, common.MAX_BYTES, 0.0))
    settled()
    result = cache.discover_from_files(unit, False, list(DISCOVERY_SOURCES))
    assert any("discovery stopped after" in w for w in result.warnings), result.warnings
    assert cache.lookup(unit, False) is None


@pytest.mark.integration
def test_every_service_dropin_checks_a_changed_listen_line_at_the_next_start(systemd_rig):
    """Through the shipped drop-in, as the guard runs at each start: remembered on a clear start,
    answered from the entry (the fast path) while nothing changed, and a listen line changed in
    place (same size, same inode) or a file new in an include glob is checked at the next start."""
    need_package("nginx", NGINX)
    rig = systemd_rig
    shipped = (SRC.parent / "systemd" / "service.d" / "bindguard.conf").read_text()
    rig.write_dropin("service", "bindguard.conf",
                     shipped.replace("/usr/bin/bindguard", f"/usr/bin/env PYTHONPATH={SRC} {sys.executable} "
                                                            "-m bindguard"), reload=False)
    (rig.root / "state").mkdir()
    (rig.root / "conf.d").mkdir()
    conf = rig.root / "nginx.conf"
    conf.write_text(nginx_conf(rig.root / "state", 18191, f"include {rig.root}/conf.d/*.conf;"))
    unit = f"cached-{uuid.uuid4().hex[:8]}.service"
    log = rig.log("web.log")
    rig.write_unit(unit, f"[Service]\nType=oneshot\nExecStart={NGINX} -t -q -c {conf}\nStandardError=append:{log}\n")
    entry = rig.seen(cache._entry_path(unit, True))  # in the rig's own /run/bindguard
    settled()
    assert rig.start(unit).ok, log.read_text()
    assert entry.is_file(), log.read_text()
    before = entry.stat()
    assert rig.start(unit).ok, log.read_text()
    assert entry.stat().st_mtime_ns == before.st_mtime_ns, "the entry was rewritten: not used"
    assert log.read_text().count(f"checking 127.0.0.1:18191 from {conf}:7 (nginx -T)") == 2, log.read_text()

    holder = rig.hold({"proto": "tcp", "host": "127.0.0.1", "port": 18192, "reuseaddr": True})
    with open(conf, "r+") as f:
        text = f.read()
        f.seek(0)
        f.write(text.replace("18191", "18192"))
    refused = rig.start(unit)
    assert refused.pre_status == [98], (refused, log.read_text())
    assert "127.0.0.1:18192 in use" in log.read_text()
    rig.release(holder)

    settled()
    assert rig.start(unit).ok, log.read_text()
    holder = rig.hold({"proto": "tcp", "host": "127.0.0.1", "port": 18193, "reuseaddr": True})
    (rig.root / "conf.d" / "more.conf").write_text("server { listen 127.0.0.1:18193; }\n")
    refused = rig.start(unit)
    assert refused.pre_status == [98], (refused, log.read_text())
    assert "127.0.0.1:18193 in use" in log.read_text()
    rig.release(holder)


@pytest.mark.integration
def test_the_fast_path_says_what_the_full_command_says_from_a_remembered_discovery(netns_own_run):
    """Debian's nginx.service and configuration: once remembered, the fast path answers, in the
    full command's words (its findings' sources, then the verdict). Nothing is remembered at first
    (a /run/bindguard of the test's own)."""
    from test_fastpath import COMPARE

    netns = netns_own_run
    need_package("nginx", NGINX)
    # Run first (or alone) on a fresh tree, the guard would write __pycache__ as it discovers, and
    # the directories it looked at would change under it (test_a_module_compiled_again_...).
    bytecode_compiled()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}
    first = netns.run([sys.executable, "-m", "bindguard", "check", "--unit", "nginx.service"], env=env)
    assert first.returncode == 0, first.stderr
    assert remembered(netns, "nginx.service", env), "Debian's nginx files were not remembered"
    proc = netns.run([sys.executable, "-c", COMPARE, json.dumps([["--unit", "nginx.service"]])], env=env)
    assert proc.returncode == 0, proc.stderr
    [[_, (fast_code, fast_err), (full_code, full_err)]] = json.loads(proc.stdout)
    assert (fast_code, fast_err) == (full_code, full_err) == (0, first.stderr), (fast_err, full_err)
    assert "checking [::]:80 from /etc/nginx/sites-enabled/default" in fast_err


SSHD_APPEARS = r"""
import os, sys, time
from bindguard.request import cache
from bindguard.model.kinds import DISCOVERY_SOURCES
root = sys.argv[1]
cache.RUN_DIR, cache.ENTRIES = root + "/run", root + "/run/discovery"
os.environ["SYSTEMD_UNIT_PATH"] = root + "/units"
time.sleep(cache.FRESH_NS / 1e9 + 0.05)
first = cache.discover_from_files("ssh.service", False, list(DISCOVERY_SOURCES))
print(first.warnings[0].split(",")[0], sorted({f.source for f in first.findings}))
print("remembered", cache.lookup("ssh.service", False) is not None)
os.mkdir("/run/sshd")
print("remembered", cache.lookup("ssh.service", False) is not None)
then = cache.discover_from_files("ssh.service", False, list(DISCOVERY_SOURCES))
print(then.warnings, sorted({f.source for f in then.findings}))
"""


def test_sshd_dump_runs_once_its_privilege_separation_directory_appears(tmp_path):
    """Without /run/sshd, sshd -T is not run (it would fail) and the answer from its files is
    remembered; the directory appearing (ssh.service's RuntimeDirectory=) forgets it."""
    need_package("openssh-server", "/usr/sbin/sshd")
    need_root("a private /run")
    (tmp_path / "units").mkdir()
    (tmp_path / "units" / "ssh.service").write_text("[Service]\nExecStart=/usr/sbin/sshd -D\n")
    script = f"mount -t tmpfs tmpfs /run && exec {sys.executable} -c \"$0\" {tmp_path}"
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, SSHD_APPEARS],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "sshd -T not run: /run/sshd ['/etc/ssh/sshd_config (default Port 22)']",
        "remembered True",
        "remembered False",
        "[] ['sshd -T']",
    ], proc.stdout


DISCOVER_NGINX = r"""
import os, sys
from bindguard.model.kinds import DISCOVERY_SOURCES  # the finders are imported as the guard does: recorded
from bindguard.request import cache
root = sys.argv[1]
cache.RUN_DIR, cache.ENTRIES = root + "/run", root + "/run/discovery"
os.environ["SYSTEMD_UNIT_PATH"] = root + "/units"
found = cache.discover_from_files("nginx.service", False, list(DISCOVERY_SOURCES))
print(sorted({f.source.rpartition(" ")[2] for f in found.findings}), cache.lookup("nginx.service", False) is not None)
"""


def test_a_module_compiled_again_during_its_discovery_leaves_it_remembered(tmp_path):
    """A module a discovery imports whose .pyc is older than its source (an edit, an upgrade without
    byte-compiling) is compiled again and its .pyc rewritten during that discovery: Python's bytecode
    cache is no input of the answer (the source is), and the answer is remembered at once. (A tree
    with no __pycache__ yet is not: the directories the import system looks at change as it writes one.)"""
    import compileall
    import shutil

    need_package("nginx", NGINX)
    need_root("the cache is root's alone")
    package = tmp_path / "package"
    shutil.copytree(SRC / "bindguard", package / "bindguard", ignore=shutil.ignore_patterns("__pycache__"))
    assert compileall.compile_dir(package, quiet=1)
    (tmp_path / "units").mkdir()
    shutil.copy(DEBIAN_NGINX_UNIT, tmp_path / "units" / "nginx.service")
    source = package / "bindguard" / "request" / "discover" / "dump.py"  # imported as discovery runs nginx -T
    os.utime(source, ns=(time.time_ns() - 10**10,) * 2)  # its .pyc no longer matches it
    time.sleep(cache.FRESH_NS / 1e9 + 0.05)  # past the files' own change
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(package)}  # bytecode written (no PYTHONDONTWRITEBYTECODE)
    proc = subprocess.run([sys.executable, "-c", DISCOVER_NGINX, str(tmp_path)], capture_output=True, text=True,
                          timeout=60, env=env)
    assert (proc.returncode, proc.stdout) == (0, "['-T)'] True\n"), (proc.stdout, proc.stderr)


SSHD_RESOLVES = r"""
import os, sys, time
from bindguard.request import cache
from bindguard.model.kinds import DISCOVERY_SOURCES
root = sys.argv[1]
cache.RUN_DIR, cache.ENTRIES = root + "/run", root + "/run/discovery"
os.environ["SYSTEMD_UNIT_PATH"] = root + "/units"
os.mkdir("/run/sshd")
time.sleep(cache.FRESH_NS / 1e9 + 0.05)
for unit in ("literal.service", "named.service"):
    found = cache.discover_from_files(unit, False, list(DISCOVERY_SOURCES))
    print(unit, sorted({f.source for f in found.findings}), cache.lookup(unit, False) is not None)
"""


def test_sshd_dump_resolving_a_host_name_is_not_remembered(tmp_path):
    """sshd -T resolves a ListenAddress host name itself (DNS, which no file read shows): its
    answer is not remembered; with addresses only, it is."""
    need_package("openssh-server", "/usr/sbin/sshd")
    need_root("a private /run")
    (tmp_path / "units").mkdir()
    for name, address in (("literal", "127.0.0.1"), ("named", "localhost")):
        conf = tmp_path / f"{name}.conf"
        conf.write_text(f"Port 2299\nListenAddress {address}\n")
        (tmp_path / "units" / f"{name}.service").write_text(f"[Service]\nExecStart=/usr/sbin/sshd -D -f {conf}\n")
    script = f"mount -t tmpfs tmpfs /run && exec {sys.executable} -c \"$0\" {tmp_path}"
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, SSHD_RESOLVES],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["literal.service ['sshd -T'] True", "named.service ['sshd -T'] False"], \
        proc.stdout


def test_fields_survive_the_entry_format():
    for text in ["plain", "tab\there", "line\nend\r", "back\\slash\\t", "nul\0", "ünï\udcff", "\\", ""]:
        escaped = cache._escape(text)
        assert not set(escaped) & {"\t", "\n", "\r", "\0"} and cache._unescape(escaped) == text, text


def test_every_source_in_any_order_is_remembered(site):
    # A YAML file's discovery sources are a set, whose order depends on the hash seed: with all of
    # them it is the same discovery, and is remembered and used as one.
    unit, _, _ = site
    settled()
    assert ports(cache.discover_from_files(unit, False, list(reversed(DISCOVERY_SOURCES)))) == [18181]
    assert cache.lookup(unit, False) is not None


def test_a_file_that_could_not_be_read_is_not_remembered(site):
    # A configuration file unreadable for a passing reason (EIO here; EACCES, EMFILE) leaves no trace
    # in what discovery recorded: its answer, "addresses not known", must not be given again.
    unit, _, root = site
    from bindguard.request.discover import common

    real = common.files.read_regular

    def failing(path, limit):
        if path.startswith(str(root / "conf.d")) or path.endswith("nginx.conf"):
            raise OSError(5, "Input/output error")
        return real(path, limit)

    settled()
    common.files.read_regular = failing
    try:
        cache.discover_from_files(unit, False, list(DISCOVERY_SOURCES))
    finally:
        common.files.read_regular = real
    assert cache.lookup(unit, False) is None, "an I/O error was remembered as the configuration's answer"
