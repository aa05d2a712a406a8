"""Discovery runs nothing another user controls as root (issue 9, items 1, 2 and 4).

Real parts: units under the systemd user-manager rig guarded by `ExecStartPre=+... check --unit
%n` (so the guard gets the unit's environment, as the every-service drop-in gives it), files and
directories owned by `nobody`, Debian's nginx, and an nginx module built here with gcc. Each
program the guard must not run as root leaves a line with its uid in a marker file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bindguard.request.discover import discover
from conftest import NOBODY, need_root
from test_discover import need_package

pytestmark = pytest.mark.integration

SRC = Path(__file__).resolve().parent.parent / "src"
GUARD = f"/usr/bin/env PYTHONPATH={SRC} {sys.executable} -m bindguard check --unit %n"
MODULE_C = r"""
#include <stdio.h>
#include <unistd.h>
__attribute__((constructor)) static void loaded(void) {
    FILE *f = fopen(MARKER, "a");
    if (f) { fprintf(f, "%d module\n", (int)geteuid()); fclose(f); }
}
"""


@pytest.fixture
def world():
    """A directory every user can enter (a rig's own root is root's alone), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="bindguard-trust-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def owned_by_nobody(path: Path) -> Path:
    os.chown(path, NOBODY, NOBODY)
    return path


def nobody_dir(parent: Path, name: str) -> Path:
    directory = parent / name
    directory.mkdir(mode=0o755)
    return owned_by_nobody(directory)


def fake_nginx(directory: Path, marker: Path) -> Path:
    """An executable named nginx that records its uid and arguments, then idles like a daemon."""
    program = directory / "nginx"
    program.write_text(f"#!/bin/sh\necho \"$(id -u) $*\" >> {marker}\nexec sleep 300\n")
    program.chmod(0o755)
    return program


def marker_lines(marker: Path) -> list[str]:
    return marker.read_text().splitlines() if marker.exists() else []


def unit_text(exec_start: str, log: Path, extra: str = "") -> str:
    return (f"[Service]\n{extra}ExecStartPre=+{GUARD}\nExecStart={exec_start}\n"
            f"StandardOutput=append:{log}\nStandardError=append:{log}\n")


def test_a_binary_the_service_user_owns_is_never_run_as_root(systemd_rig, world):
    rig = systemd_rig
    home = nobody_dir(world, "nobody")
    marker = home / "marker"
    marker.touch()
    owned_by_nobody(marker)
    program = owned_by_nobody(fake_nginx(home, marker))
    conf = world / "nginx.conf"
    conf.write_text("events {}\nhttp {\n  server { listen 127.0.0.1:18188; }\n}\n")
    log = rig.log("web.log")
    rig.write_unit("web.service", unit_text(f"{program} -c {conf} -g 'daemon off;'", log, "User=nobody\n"))
    started = rig.start("web.service")
    assert started.ok and started.pre_status == [0], (started, log.read_text())
    assert not [line for line in marker_lines(marker) if line.split()[0] == "0"], marker_lines(marker)
    report = log.read_text()
    assert "nginx -T not run" in report and f"uid {NOBODY}" in report, report
    assert "127.0.0.1:18188" in report  # still guarded: the files were read instead
    # scan discovers every loaded service: it must not run it either
    scan = rig.bindguard("scan", "--user", "--json")
    assert scan.returncode in (0, 1), scan.stderr
    assert not [line for line in marker_lines(marker) if line.split()[0] == "0"], marker_lines(marker)
    rig.stop("web.service")


def build_module(directory: Path, marker: Path) -> Path:
    source = directory / "evil.c"
    source.write_text(f'#define MARKER "{marker}"\n' + MODULE_C)
    module = directory / "evil.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(module), str(source)], check=True, timeout=60)
    return module


def test_a_module_the_service_user_configured_is_not_loaded_as_root(systemd_rig, world):
    need_package("nginx", "/usr/sbin/nginx")
    rig = systemd_rig
    home = nobody_dir(world, "nobody")
    marker = home / "marker"
    marker.touch()
    owned_by_nobody(marker)
    marker.chmod(0o666)
    module = owned_by_nobody(build_module(home, marker))
    conf = home / "nginx.conf"
    conf.write_text(f"load_module {module};\npid {home}/nginx.pid;\nerror_log stderr;\nevents {{}}\n"
                    "http {\n  access_log off;\n  server { listen 127.0.0.1:18189; }\n}\n")
    owned_by_nobody(conf)
    exec_start = f"/usr/sbin/nginx -c {conf} -g 'daemon off;'"

    # User=nobody: the dump runs as nobody, never as root
    log = rig.log("web.log")
    rig.write_unit("web.service", unit_text(exec_start, log, "User=nobody\nGroup=nogroup\n"))
    started = rig.start("web.service")
    assert started.pre_status == [0], (started, log.read_text())
    assert "0 module" not in marker_lines(marker), (marker_lines(marker), log.read_text())
    assert "127.0.0.1:18189" in log.read_text()
    rig.stop("web.service")

    # no User=: the service's own user is root, and a configuration nobody can write is not dumped
    marker.write_text("")
    rig.write_unit("rootweb.service", unit_text(exec_start, rig.log("rootweb.log")))
    guard = rig.bindguard("check", "--user", "--unit", "rootweb.service")
    assert guard.returncode == 0, guard.stderr
    assert marker_lines(marker) == [], marker_lines(marker)
    assert "nginx -T not run: it would run as root" in guard.stderr and f"uid {NOBODY}" in guard.stderr, guard.stderr
    assert "127.0.0.1:18189" in guard.stderr or "127.0.0.1:18189" in guard.stdout


def test_a_bare_exec_start_name_is_not_found_through_the_units_path(systemd_rig, world):
    need_package("nginx", "/usr/sbin/nginx")
    rig = systemd_rig
    planted = world / "bin"
    planted.mkdir()
    marker = world / "marker"
    fake_nginx(planted, marker)  # root's own file even: the unit's PATH must not choose the program
    conf = world / "nginx.conf"
    conf.write_text(f"pid {world}/nginx.pid;\nerror_log stderr;\nevents {{}}\n"
                    "http {\n  access_log off;\n  server { listen 127.0.0.1:18190; }\n}\n")
    log = rig.log("web.log")
    rig.write_unit("web.service", unit_text(f"nginx -c {conf} -g 'daemon off;'", log,
                                            f"Environment=PATH={planted}\n"))
    started = rig.start("web.service")
    assert started.pre_status == [0], (started, log.read_text())
    assert not [line for line in marker_lines(marker) if "-T" in line.split()], marker_lines(marker)
    report = log.read_text()
    assert "(nginx -T)" in report or "127.0.0.1:18190" in report, report  # systemd's nginx was dumped
    rig.stop("web.service")


def test_a_dump_gets_a_clean_environment_and_the_units_user(monkeypatch):
    """The dump's child: the unit's uid, gid and groups, PATH=/usr/sbin:/usr/bin and nothing else."""
    from bindguard.request.discover import dump

    need_root("changing user")
    monkeypatch.setenv("LD_PRELOAD", "/nonexistent.so")
    monkeypatch.setenv("PYTHONPATH", "/nonexistent")
    runs_as = dump.credentials("nobody", "")
    assert runs_as == dump.Credentials(NOBODY, NOBODY, (NOBODY,))
    ok, out, why = dump.run(["/usr/bin/env"], runs_as)
    assert ok and out.splitlines() == ["PATH=/usr/sbin:/usr/bin"], (why, out)
    ok, out, why = dump.run(["/usr/bin/sh", "-c", "id -u; id -g; id -G"], runs_as)
    assert ok and out.split() == [str(NOBODY)] * 3, (why, out)  # uid, gid, and no other group
    assert isinstance(dump.credentials("no-such-user-here", ""), str)  # DynamicUser=: never run


def test_a_dump_is_stopped_at_its_time_and_output_budget(monkeypatch):
    from bindguard.request.discover import common, dump

    monkeypatch.setattr(dump, "DUMP_SECONDS", 1.0)
    ok, out, why = dump.run(["/usr/bin/sleep", "30"], dump.Credentials(None))
    assert not ok and "no answer in 1.0 s" in why, why
    with common.discovery_scope():
        common.current_budget().bytes_left = 1 << 20
        ok, out, why = dump.run(["/usr/bin/yes"], dump.Credentials(None))
    assert not ok and "more than 1 MiB of output" in why, why


CHILD_REPORT = ("import fcntl, json, os; print(json.dumps({'cwd': os.getcwd(), 'stdin': os.readlink('/proc/self/fd/0'), "
                "'stdin_mode': fcntl.fcntl(0, fcntl.F_GETFL) & os.O_ACCMODE, "
                "'session': os.getsid(0) == os.getpid(), 'fds': os.listdir('/proc/self/fd'), 'uid': os.getuid(), "
                "'env': open('/proc/self/environ').read()}))")  # as exec'd: Python adds LC_CTYPE to os.environ


@pytest.mark.parametrize("user", ["", "nobody"])
def test_a_dump_child_is_the_same_spawned_or_forked(user, tmp_path, monkeypatch):
    """A dump that keeps the guard's credentials (a root service's, by the root guard) is started by
    posix_spawn, one that changes user by subprocess's fork; either child gets / as its working
    directory, /dev/null as stdin, a session of its own, no signal of 1-31 ignored (Python ignores
    SIGPIPE and SIGXFSZ), the clean environment, and no descriptor of the guard's; the guard's
    working directory stays its own."""
    import json

    from bindguard.request.discover import dump

    need_root("changing user")
    spawned = []
    real_spawn = os.posix_spawn
    monkeypatch.setattr(os, "posix_spawn", lambda *a, **k: spawned.append(a[0]) or real_spawn(*a, **k))
    monkeypatch.chdir(tmp_path)
    leaked = os.open("/etc/hostname", os.O_RDONLY)
    try:
        os.dup2(leaked, 100, inheritable=True)
        ok, out, why = dump.run(["/usr/bin/python3", "-c", CHILD_REPORT], dump.credentials(user, ""))
        ok_status, status, _ = dump.run(["/usr/bin/grep", "SigIgn", "/proc/self/status"], dump.credentials(user, ""))
    finally:
        os.close(leaked)
        os.close(100)
    assert ok and ok_status, why
    child = json.loads(out)
    assert spawned == ([] if user else [os.path.realpath("/usr/bin/python3"), os.path.realpath("/usr/bin/grep")])
    assert child["uid"] == (NOBODY if user else 0)
    assert child["cwd"] == "/" and child["stdin"] == "/dev/null" and child["stdin_mode"] == os.O_RDWR, child
    assert child["session"], child
    assert int(status.split()[1], 16) & 0x7FFFFFFF == 0, status  # bit N-1: signal N
    assert "100" not in child["fds"] and child["env"] == "PATH=/usr/sbin:/usr/bin\0", child
    assert os.getcwd() == str(tmp_path)


@pytest.mark.parametrize("user", ["", "nobody"])
def test_a_dump_that_closes_its_output_and_lingers_is_stopped_at_its_time_budget(user, monkeypatch):
    """Its exit is awaited within the budget too, not only its output."""
    from bindguard.request.discover import dump

    need_root("changing user")
    monkeypatch.setattr(dump, "DUMP_SECONDS", 1.0)
    ok, out, why = dump.run(["/usr/bin/sh", "-c", "exec >&- 2>&-; sleep 30"], dump.credentials(user, ""))
    assert not ok and "no answer in 1.0 s" in why, why


@pytest.mark.parametrize("user", ["", "nobody"])
def test_a_dump_runs_where_sigchld_is_ignored(user):
    """A guard started with SIGCHLD ignored (a disposition that survives exec): its children are
    reaped by the kernel, and a dump still runs and gives its output, spawned or forked alike."""
    import signal

    from bindguard.request.discover import dump

    need_root("changing user")
    previous = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        ok, out, why = dump.run(["/usr/bin/echo", "dumped"], dump.credentials(user, ""))
    finally:
        signal.signal(signal.SIGCHLD, previous)
    assert ok and out == "dumped\n", why


def test_a_path_is_resolved_as_the_kernel_resolves_it(tmp_path, monkeypatch):
    """bindguard.real_path (posix alone, for the fast path) agrees with os.path.realpath(strict=True)."""
    import bindguard

    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "file").write_text("")
    (tmp_path / "up").symlink_to("a/b/..")  # relative, with .. after a directory
    (tmp_path / "abs").symlink_to(tmp_path / "up" / "b")
    (tmp_path / "chain").symlink_to("abs/../../abs/file")  # .. taken after the link is resolved
    (tmp_path / "loop").symlink_to("loop")
    monkeypatch.chdir(tmp_path / "a")
    for path in ("/", "/usr/bin/env", f"{tmp_path}/up", f"{tmp_path}//abs/./file", f"{tmp_path}/chain",
                 "b/file", "..", "../chain", "/proc/self"):
        assert bindguard.real_path(path) == os.path.realpath(path, strict=True), path
    for path in (f"{tmp_path}/loop", f"{tmp_path}/missing", f"{tmp_path}/a/b/file/x", ""):
        with pytest.raises(OSError):
            bindguard.real_path(path)


def test_which_paths_are_roots_alone(world):
    import bindguard
    from bindguard.request.discover import dump

    assert bindguard.untrusted("/usr/bin/env") is None
    assert bindguard.untrusted("/tmp") == "/tmp can be written by every user"  # anyone may add to it
    mine = world / "prog"
    mine.write_text("")
    assert bindguard.untrusted(str(mine)) is None  # below /tmp: sticky, so no one else may replace it
    mine.chmod(0o666)
    assert "can be written by every user" in bindguard.untrusted(str(mine))
    owned_by_nobody(mine)
    assert f"belongs to uid {NOBODY}" in bindguard.untrusted(str(mine))
    link = world / "link"
    link.symlink_to(mine)  # a root-owned link to a file nobody owns: the file is what counts
    assert f"belongs to uid {NOBODY}" in bindguard.untrusted(str(link))
    assert bindguard.untrusted(str(world / "missing")) == f"{world}/missing: No such file or directory"
    assert "null byte" in bindguard.untrusted("/usr/bin/env\0")  # from a file's text: untrusted, no crash
    assert dump.systemd_resolved("env") in ("/usr/bin/env", "/bin/env")
    assert dump.systemd_resolved("no-such-program-here") is None


def test_a_link_on_the_way_counts_as_much_as_where_it_leads(world):
    """Whoever can re-point a symlink passed on the way decides where the path leads: the link
    and the directories above it must be root's alone too, though its target is /usr/bin/env."""
    import bindguard

    theirs = nobody_dir(world, "theirs")
    (theirs / "env").symlink_to("/usr/bin/env")
    via = world / "via"
    via.symlink_to(theirs / "env")  # root's link, to a link in a directory nobody owns
    assert f"{theirs} belongs to uid {NOBODY}" in bindguard.untrusted(str(via))
    assert f"{theirs} belongs to uid {NOBODY}" in bindguard.untrusted(str(theirs / "env"))
    os.chown(theirs, 0, 0)
    assert bindguard.untrusted(str(via)) is None
    os.lchown(theirs / "env", NOBODY, NOBODY)  # its own link in a sticky /tmp-like place: theirs to replace
    assert f"{theirs}/env belongs to uid {NOBODY}" in bindguard.untrusted(str(via))
    assert bindguard.resolve_trusted(str(via))[0] in ("/usr/bin/env", "/bin/env")


def test_what_decides_a_dump_as_root(tmp_path):
    """Without User= a dump runs as root only when every file that decides it is root's alone;
    a missing optional EnvironmentFile= decides nothing."""
    need_package("nginx", "/usr/sbin/nginx")
    need_root("ownership")
    conf = tmp_path / "nginx.conf"
    conf.write_text("events {}\nhttp {\n  server { listen 127.0.0.1:18192; }\n}\n")
    argv = [["/usr/sbin/nginx", "-c", str(conf)]]
    clean = discover(argv, [], ["-/nonexistent/default"], [], "web.service")
    assert clean.warnings == [] and clean.findings[0].source == f"{conf}:3 (nginx -T)"
    envfile = tmp_path / "env"
    envfile.write_text("X=1\n")
    owned_by_nobody(envfile)
    planted = discover(argv, [], [str(envfile)], [], "web.service")
    assert planted.findings[0].source == f"{conf}:3"  # read, not dumped
    assert planted.warnings == [f"nginx -T not run: it would run as root, and {envfile} is not root's alone "
                                f"({envfile} belongs to uid {NOBODY}, not root); reading {conf} directly"]
