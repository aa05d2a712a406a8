"""bindguard.systemd.bus against a real systemd user manager and its session bus (the rig)."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import AS_NOBODY, NOBODY, need, need_root

from bindguard.evidence import owners
from bindguard.systemd.context import proven_manager
from bindguard.systemd.unitexec import enabled_socket_units
from bindguard.systemd.unitfiles import unit_name
from bindguard.model.endpoints import TCP, UDP, AddressError, Endpoint
from bindguard.systemd.bus import (
    SYSTEM,
    USER,
    Listen,
    Systemd,
    SystemdError,
    SystemdRefused,
    SystemdUnavailable,
    UnitNotFound,
    choose_bus,
    listen_endpoint,
)


# --- pure logic ----------------------------------------------------------------------------

def test_choose_bus_follows_flags_then_managerpid():
    assert choose_bus(True, {}) == USER
    assert choose_bus(False, {"MANAGERPID": "4242"}) == SYSTEM
    assert choose_bus(None, {"MANAGERPID": "1"}) == SYSTEM
    assert choose_bus(None, {}) == SYSTEM
    # $MANAGERPID is a claim: only a live process running systemd's binary proves a manager; a root
    # guard's environment may be a unit's that its user wrote, so as root the claim alone is not taken
    claimed = {"MANAGERPID": str(os.getpid())}
    assert choose_bus(None, claimed) == (SYSTEM if os.geteuid() == 0 else USER)
    assert proven_manager(True, claimed) is None
    assert proven_manager(True, {}) is None


@pytest.mark.parametrize(
    "path, unit",
    [
        ("/system.slice/nginx.service", "nginx.service"),
        ("/user.slice/user-1000.slice/user@1000.service/app.slice/web.service", "web.service"),
        ("/system.slice/docker.service/.control", "docker.service"),
        ("/system.slice/system-getty.slice/getty@tty1.service", "getty@tty1.service"),
        ("/system.slice/systemd-fsck@dev-disk-by\\x2duuid-1.service", "systemd-fsck@dev-disk-by\\x2duuid-1.service"),
        ("/user.slice/user-1000.slice/session-3.scope", "session-3.scope"),
        # a delegated unit's own cgroups are named as its user likes: no unit systemd could have
        ("/user.slice/user-1000.slice/user@1000.service/app.slice/web.service/x$(reboot);.service", "web.service"),
        (f"/system.slice/docker.service/{'a' * 250}.service", "docker.service"),
        # a valid name is taken, wherever its user put it: only the manager confirms it (unit_status "cgroup")
        ("/user.slice/user-1000.slice/user@1000.service/x/nginx.service", "nginx.service"),
        ("/user.slice/user-1000.slice", None),
        ("/", None),
    ],
)
def test_unit_from_cgroup(path, unit):
    assert owners.unit_from_cgroup(path) == unit


def test_listen_endpoint_resolves_protocol_and_dual_stack():
    any6 = ipaddress.ip_address("::")
    assert listen_endpoint(Listen("Stream", "[::]:80"), "both", bindv6only=True) == (Endpoint(TCP, any6, 80), False)
    assert listen_endpoint(Listen("Stream", "[::]:80"), "ipv6-only", bindv6only=False) == (Endpoint(TCP, any6, 80), True)
    assert listen_endpoint(Listen("Stream", "[::]:80"), "default", bindv6only=True)[1] is True
    assert listen_endpoint(Listen("Stream", "[::]:80"), "default", bindv6only=False)[1] is False
    udp, v6only = listen_endpoint(Listen("Datagram", "127.0.0.1:53"), "ipv6-only")
    assert udp == Endpoint(UDP, ipaddress.ip_address("127.0.0.1"), 53) and v6only is False
    assert listen_endpoint(Listen("Stream", "8080"), "both")[0].port == 8080  # never in Listen, but robust
    with pytest.raises(AddressError):
        listen_endpoint(Listen("SequentialPacket", "/run/x.sock"), "default")


def test_enabled_socket_units_are_the_install_symlinks(tmp_path):
    etc, run = tmp_path / "etc", tmp_path / "run"
    (etc / "sockets.target.wants").mkdir(parents=True)
    (etc / "multi-user.target.requires").mkdir(parents=True)
    (run / "sockets.target.wants").mkdir(parents=True)
    for link in ("sockets.target.wants/a.socket", "sockets.target.wants/a.service",
                 "multi-user.target.requires/b@x.socket", "multi-user.target.requires/c@.socket"):
        (etc / link).symlink_to("/dev/null")
    (run / "sockets.target.wants" / "d.socket").symlink_to("/dev/null")
    (etc / "e.socket").write_text("")  # a unit file, not enabled
    found = enabled_socket_units([str(etc), str(tmp_path / "missing"), str(run)])
    assert found == {"a.socket": "enabled", "b@x.socket": "enabled", "d.socket": "enabled"}


# --- under the rig -------------------------------------------------------------------------

@pytest.fixture
def user_bus(systemd_rig, monkeypatch):
    """A Systemd connection to the rig's manager, from the test process (the bus is a path)."""
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", systemd_rig.bus_address)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(systemd_rig.runtime_dir))
    monkeypatch.setenv("SYSTEMD_BUS_TIMEOUT", "10s")
    with Systemd(USER) as sd:
        yield sd


LOADED_BY_THE_BUS = r"""
import json, os, sys
from bindguard.systemd.bus import USER, Systemd
with Systemd(USER) as sd:
    pid = sd.manager_pid()
print(json.dumps([pid, sorted(m for m in sys.modules if m.split(".")[0] in ("pystemd", "lxml"))]))
"""


@pytest.mark.integration
def test_asking_the_bus_loads_pystemds_binding_alone(systemd_rig):
    """The guard talks through pystemd.dbuslib; pystemd's object layer (its __init__: pystemd.DBus,
    pystemd.base, lxml) is never imported, a fifth of what pystemd costs a guard asking the bus."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path), "SYSTEMD_BUS_TIMEOUT": "10s",
           "DBUS_SESSION_BUS_ADDRESS": systemd_rig.bus_address, "XDG_RUNTIME_DIR": str(systemd_rig.runtime_dir)}
    done = subprocess.run([sys.executable, "-c", LOADED_BY_THE_BUS], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    pid, loaded = json.loads(done.stdout)
    assert pid > 0 and "pystemd.dbuslib" in loaded, loaded
    assert not {"pystemd.base", "pystemd.DBus", "lxml", "lxml.etree"} & set(loaded), loaded


# The same questions through the binding as bindguard loads it (stand-ins for pprint and
# pystemd.utils while it is imported) and as `import pystemd.dbuslib` loads it (all of pystemd):
# bytes, which bindguard sends, a str, which only pystemd's own x2char_star converts, and an
# argument the binding cannot append, whose TypeError pprint.pformat words.
BINDING_CALLS = r"""
import json, sys
LIGHTENED = ("pprint", "pystemd.utils")
if sys.argv[1] == "ordinary":
    import pystemd.dbuslib as lib
    bus = lib.DBusAddress(sys.argv[2].encode())
    bus.open()
else:
    from bindguard.systemd.bus import USER, Systemd, _dbuslib
    lib, bus = _dbuslib(), Systemd(USER)._dbus
def ask(signature, *args):
    try:
        return bus.call_method(b"org.freedesktop.DBus", b"/org/freedesktop/DBus", b"org.freedesktop.DBus",
                               b"GetConnectionUnixProcessID", lib.apply_signature(signature, list(args))).body
    except TypeError as exc:
        return f"TypeError: {exc}"
answers = [ask(b"s", b"org.freedesktop.systemd1")]
before = [m for m in (*LIGHTENED, "pystemd") if m in sys.modules]
answers += [ask(b"s", "org.freedesktop.systemd1"), ask(b"ss", b"x" * 80, 5)]
print(json.dumps({"binding": lib.__file__, "answers": answers, "before": before,
                  "after": [m for m in LIGHTENED if m in sys.modules]}))
"""
DEBIAN_PYSTEMD = "/usr/lib/python3/dist-packages/pystemd"


@pytest.mark.integration
@pytest.mark.parametrize("python", [sys.executable, "/usr/bin/python3"], ids=["pip-pystemd", "debian-pystemd"])
def test_the_binding_loads_without_pprint_and_pystemd_utils_and_answers_as_ever(systemd_rig, python):
    """pprint and pystemd.utils cost pystemd's binding 12 of its 14 ms, for two names it takes from
    them (bus._StandIn). Loaded with stand-ins, the binding asks the bus without either being
    imported, and every answer and message is the one an ordinary import of pystemd gives: for
    pip's pystemd in this venv and Debian's python3-pystemd (0.11, the oldest pinned)."""
    import bindguard

    if python == "/usr/bin/python3" and not os.path.isdir(DEBIAN_PYSTEMD):
        need(f"Debian's python3-pystemd ({DEBIAN_PYSTEMD})")
    src = os.path.dirname(os.path.dirname(bindguard.__file__))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path) if python == sys.executable else src,
           "SYSTEMD_BUS_TIMEOUT": "10s", "DBUS_SESSION_BUS_ADDRESS": systemd_rig.bus_address,
           "XDG_RUNTIME_DIR": str(systemd_rig.runtime_dir)}
    seen = {}
    for how in ("stand-ins", "ordinary"):
        done = subprocess.run([python, "-c", BINDING_CALLS, how, systemd_rig.bus_address], env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        seen[how] = json.loads(done.stdout)
    light, ordinary = seen["stand-ins"], seen["ordinary"]
    assert light["binding"] == ordinary["binding"]
    assert light["binding"].startswith(DEBIAN_PYSTEMD if python == "/usr/bin/python3" else sys.prefix)
    assert light["before"] == [] and ordinary["before"] == ["pprint", "pystemd.utils", "pystemd"]
    assert light["answers"][0] == light["answers"][1] == systemd_rig.manager_pid
    assert "\n" in light["answers"][2]  # pformat's own wrapping, not a repr
    assert light["answers"] == ordinary["answers"]
    assert light["after"] == ["pprint", "pystemd.utils"]  # imported for the str and the TypeError alone


LATER_PYSTEMD = {
    "__init__.py": "raise RuntimeError('pystemd.__init__ ran')\n",
    "dbusexc.py": "class DBusBaseError(Exception):\n    pass\n",
    "utils.py": ("def x2char_star(what, convert_all=False):\n    return what\n\n\n"
                 "def str2cmd(cmd):\n    return cmd.split()\n"),
    "dbuslib.py": ("import pprint\nfrom pprint import pformat, pp\nfrom pystemd.utils import x2char_star, str2cmd\n"
                   "PRINTER = pprint.PrettyPrinter\n"),
}
LOAD_LATER_PYSTEMD = r"""
import json, sys
sys.path[:0] = sys.argv[1:3]
from bindguard.systemd import bus
lib = bus._dbuslib()
import pprint
utils = sys.modules["pystemd.utils"]
print(json.dumps({"binding": lib.__file__, "utils": utils.__file__, "pp": lib.pp is pprint.pp,
                  "printer": lib.PRINTER is pprint.PrettyPrinter, "str2cmd": lib.str2cmd is utils.str2cmd,
                  "module": lib.pprint.saferepr is pprint.saferepr, "package": "pystemd" in sys.modules,
                  "stand_ins_left": [n for n, m in sys.modules.items() if isinstance(m, bus._StandIn)]}))
"""


def test_a_pystemd_that_takes_more_from_those_modules_gets_the_real_ones(tmp_path):
    """A pystemd whose binding takes other names from pprint and pystemd.utils, or pprint whole,
    gets them from the real modules, imported then; its __init__ still never runs, and no stand-in
    is left in sys.modules."""
    import bindguard

    package = tmp_path / "pystemd"
    package.mkdir()
    for name, text in LATER_PYSTEMD.items():
        (package / name).write_text(text)
    src = os.path.dirname(os.path.dirname(bindguard.__file__))
    done = subprocess.run([sys.executable, "-I", "-c", LOAD_LATER_PYSTEMD, str(tmp_path), src],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "binding": str(package / "dbuslib.py"), "utils": str(package / "utils.py"), "pp": True, "printer": True,
        "str2cmd": True, "module": True, "package": False, "stand_ins_left": []}


@pytest.mark.integration
def test_unit_of_pid_and_unit_settings(systemd_rig, user_bus):
    rig = systemd_rig
    rig.write_unit("web.service", f"""\
[Service]
Type=notify
ExecStart={rig.serve({"host": "127.0.0.1", "port": 8080})}
KillMode=process
TimeoutStartSec=7
Environment=A=1 "B=two words"
EnvironmentFile=-{rig.root}/web.env
""")
    assert rig.start("web.service").ok
    main_pid = rig.main_pid("web.service")

    assert user_bus.manager_pid() == rig.manager_pid
    assert user_bus.unit_of_pid(main_pid) == "web.service"
    assert user_bus.unit_of_pid(os.getpid()) is None  # the test process is in no unit of the rig
    assert user_bus.unit_of_pid(rig.manager_pid) == "init.scope"

    web = user_bus.unit("web.service")
    assert (web.name, web.load_state, web.active_state, web.sub_state) == ("web.service", "loaded", "active", "running")
    assert web.main_pid == main_pid
    assert web.control_group.endswith(f"{rig.name}/app.slice/web.service")
    assert web.invocation_id == rig.prop("web.service", "InvocationID")
    assert web.timeout_start_usec == 7_000_000 and web.timeout_start_sec == 7.0
    assert web.kill_mode == "process"
    assert web.n_restarts == 0 and web.result == "success"
    assert web.exec_start[0].argv[:2] == (sys.executable, str(rig.serve({}).split()[1]))
    assert web.exec_start[0].pid == main_pid
    assert web.environment == ("A=1", "B=two words")
    assert web.environment_files == ((f"{rig.root}/web.env", True),)
    assert web.sockets == ()
    assert web.unit_file_state == "" and user_bus.unit("web.service", file_state=True).unit_file_state == "static"

    with pytest.raises(UnitNotFound, match="'nope.service' not found on the user manager"):
        user_bus.unit("nope.service")


@pytest.mark.integration
def test_exec_start_pre_status_is_read_from_the_service(systemd_rig, user_bus):
    rig = systemd_rig
    rig.write_unit("refused.service", "[Service]\nExecStartPre=/bin/sh -c 'exit 98'\nExecStart=/bin/true\n")
    assert not rig.start("refused.service").ok
    unit = user_bus.unit("refused.service")
    assert unit.active_state == "failed" and unit.result == "exit-code"
    assert unit.exec_main_status == 0  # the recipe's finding: the ExecStartPre status is not here
    assert [(c.code, c.status) for c in unit.exec_start_pre] == [(1, 98)]  # CLD_EXITED


@pytest.mark.integration
def test_socket_units_listening_latent_and_not_yet_loaded(systemd_rig, user_bus):
    rig = systemd_rig
    rig.write_unit("demo.socket", """\
[Socket]
ListenStream=127.0.0.1:18080
ListenStream=[::]:18082
ListenDatagram=[::1]:18081
ListenStream=%t/demo.sock
BindIPv6Only=both
ReusePort=yes
""", reload=False)
    rig.write_unit("demo.service", "[Service]\nExecStart=/bin/sleep infinity\n", reload=False)
    rig.write_unit("later.socket", "[Socket]\nListenStream=[::]:19090\nBindIPv6Only=ipv6-only\n"
                   "[Install]\nWantedBy=sockets.target\n", reload=False)
    rig.write_unit("later.service", "[Service]\nExecStart=/bin/sleep infinity\n", reload=False)
    rig.write_unit("boot.socket", "[Socket]\nListenStream=0.0.0.0:19091\nService=later.service\n"
                   "[Install]\nWantedBy=sockets.target\n")
    assert rig.start("demo.socket").ok
    assert rig.systemctl("enable", "later.socket").returncode == 0  # loaded (a reload), not started
    assert rig.systemctl("enable", "--no-reload", "boot.socket").returncode == 0  # not even loaded

    units = {u.name: u for u in user_bus.socket_units()}
    assert set(units) == {"demo.socket", "later.socket", "boot.socket"}  # gpg-agent & co. are AF_UNIX
    demo = units["demo.socket"]
    assert demo.listening and demo.load_state == "loaded"
    assert demo.listens == (
        Listen("Stream", "127.0.0.1:18080"), Listen("Stream", "[::]:18082"), Listen("Datagram", "[::1]:18081"),
    )
    assert demo.bind_ipv6_only == "both" and demo.reuse_port is True
    assert demo.triggers == ("demo.service",)
    assert user_bus.unit("demo.service").sockets == ("demo.socket",)

    later = units["later.socket"]
    assert (later.load_state, later.active_state, later.unit_file_state) == ("loaded", "inactive", "enabled")
    assert not later.listening and later.bind_ipv6_only == "ipv6-only" and later.reuse_port is False

    boot = units["boot.socket"]
    assert (boot.active_state, boot.unit_file_state) == ("inactive", "enabled")
    assert boot.listens == (Listen("Stream", "0.0.0.0:19091"),) and boot.triggers == ("later.service",)

    assert [u.name for u in user_bus.socket_units(ports=[18081])] == ["demo.socket"]
    assert {u.name for u in user_bus.socket_units(include_unloaded=False)} == {"demo.socket", "later.socket"}

    # What the entries resolve to (listen_endpoint) is what the kernel shows for the real sockets.
    listening = rig.run(["ss", "-Hltnu"]).stdout.split()
    for listen, endpoint, v6only in demo.endpoints():
        shown = f"*:{endpoint.port}" if endpoint.is_wildcard and not v6only else endpoint.address()
        assert shown in listening, (listen, listening)


@pytest.mark.integration
def test_the_guard_in_exec_start_pre_finds_its_unit_and_manager(systemd_rig):
    rig = systemd_rig
    out = rig.log("probe.out")
    probe = ("import os, time; from bindguard.systemd.bus import *; from bindguard.systemd.context import proven_manager; "
             "from bindguard.systemd.unitfiles import own_unit as guarded_unit; bus = choose_bus(); sd = Systemd(bus); "
             "me = sd.unit(guarded_unit()); "
             "print(guarded_unit(), bus, sd.manager_pid(), proven_manager(bus == USER)[0], sd.unit_of_pid(os.getpid()), "
             "me.active_state, round(me.start_deadline() - time.monotonic()))")
    rig.write_unit("guarded.service", f"""\
[Service]
ExecStartPre={sys.executable} -c "{probe}"
ExecStart=/bin/sleep infinity
TimeoutStartSec=30
StandardOutput=file:{out}
StandardError=inherit
""")
    run = rig.start("guarded.service")
    assert run.ok, (run.output, out.read_text())
    manager = str(rig.manager_pid)
    assert out.read_text().split() == ["guarded.service", "user", manager, manager, "guarded.service", "activating", "30"]


@pytest.mark.integration
def test_a_root_guard_takes_the_user_search_path_from_its_manager_not_the_units_environment(systemd_rig, tmp_path):
    """As root (`ExecStartPre=+`) the environment is the unit's: its $HOME and $XDG_* do not say where
    the user manager's units are, and its $MANAGERPID counts only for a proven manager of root's.
    The directories come from the manager's own environment, what its search path was made from."""
    rig = systemd_rig
    out = rig.log("paths.out")
    planted = tmp_path / "planted"
    probe = ("import json; from bindguard.systemd import unitexec, unitfiles; "
             "print(json.dumps([unitfiles.user_manager(), unitexec.user_unit_path()]))")
    rig.write_unit("paths.service", f"""\
[Service]
Type=oneshot
Environment=HOME={planted} XDG_CONFIG_HOME={planted}/config XDG_RUNTIME_DIR={planted}/run
Environment=XDG_DATA_HOME={planted}/data XDG_CONFIG_DIRS={planted}/xdg XDG_DATA_DIRS={planted}/share
ExecStart={sys.executable} -c "{probe}"
ExecStart=/usr/bin/env MANAGERPID={os.getpid()} {sys.executable} -c "{probe}"
StandardOutput=append:{out}
StandardError=append:{out}
""")
    run = rig.start("paths.service")
    assert run.ok, (run.output, out.read_text())
    (user, dirs), (planted_user, _) = [json.loads(line) for line in out.read_text().splitlines()]
    assert user and not planted_user  # this test's PID: a live process of root's, but no systemd
    assert not [d for d in dirs if d.startswith(str(planted))], dirs
    assert dirs == [
        f"{rig.config_home}/systemd/user.control", f"{rig.runtime_dir}/systemd/user.control",
        f"{rig.runtime_dir}/systemd/transient", f"{rig.runtime_dir}/systemd/generator.early",
        f"{rig.config_home}/systemd/user", "/etc/xdg/systemd/user", "/etc/systemd/user",
        f"{rig.runtime_dir}/systemd/user", "/run/systemd/user", f"{rig.runtime_dir}/systemd/generator",
        f"{rig.home}/.local/share/systemd/user", "/usr/local/share/systemd/user", "/usr/share/systemd/user",
        "/usr/local/lib/systemd/user", "/usr/lib/systemd/user", f"{rig.runtime_dir}/systemd/generator.late",
    ]


# `check ARGS` with every proof of $MANAGERPID counted: each reads its exe link and its status.
COUNTED_PROOFS = r"""
import json, posix, sys
claim = posix.environ[b"MANAGERPID"].decode()
seen = {"exe": 0, "status": 0}
readlink = posix.readlink
def counted(path, *args, **kwargs):
    seen["exe"] += path == f"/proc/{claim}/exe"
    return readlink(path, *args, **kwargs)
posix.readlink = counted
sys.addaudithook(lambda event, args: seen.__setitem__("status", seen["status"] + (
    event == "open" and args[0] == f"/proc/{claim}/status")))
from bindguard.cli import main
code = main(sys.argv[1:])
print(json.dumps([code, seen]))
"""


@pytest.mark.integration
def test_a_root_guard_proves_its_user_manager_once_a_run(systemd_rig):
    """Under `ExecStartPre=+` the guard proves $MANAGERPID from /proc once, and every question
    that needs the manager shares that proof: the fast path (which bus, the user search path)
    and the full command it hands over to (the bus, the manager the evidence names, ...). The one
    more is made after the manager's own environment is read for the user search path, so that
    what was read was that manager's (unitexec.user_unit_path): 2 a run, where it was 2 and 5."""
    rig = systemd_rig
    rig.hold({"proto": "tcp", "host": "127.0.0.1", "port": 9000, "reuseaddr": True})
    out, script = rig.log("proofs.out"), rig.log("counted_proofs.py")
    script.write_text(COUNTED_PROOFS)
    rig.write_unit("proofs.service", f"""\
[Service]
Type=oneshot
ExecStartPre=+{sys.executable} {script} check --unit %n --wait 0 127.0.0.1:8080
ExecStartPre=-+{sys.executable} {script} check --unit %n --wait 0 127.0.0.1:9000
ExecStart=/bin/true
StandardOutput=append:{out}
StandardError=append:{out}
""")
    run = rig.start("proofs.service")
    assert run.ok, (run.output, out.read_text())
    counted = [json.loads(line) for line in out.read_text().splitlines() if line.startswith("[")]
    assert counted == [[0, {"exe": 2, "status": 2}], [98, {"exe": 2, "status": 2}]], out.read_text()


def test_the_managers_environment_counts_only_while_the_pid_still_proves_a_manager(tmp_path, monkeypatch):
    """The proof of $MANAGERPID is kept for the run, the PID alone: the manager's environment, read
    later (a recorded discovery makes the user search path again), is used only if the PID proves a
    manager again after the read. Here the kept proof names a process that is no systemd (as a
    PID reused by then would be): its environment, where a user planted directories, is not read
    into the search path."""
    from bindguard.systemd import unitexec, unitfiles

    need_root("a root guard's rule")
    planted = tmp_path / "planted"
    other = subprocess.Popen(["sleep", "60"], env={"XDG_CONFIG_HOME": str(planted), "HOME": str(planted)})
    try:
        claim = str(other.pid)
        monkeypatch.setenv("MANAGERPID", claim)
        monkeypatch.setitem(unitfiles._own_proof, (claim, os.geteuid()), other.pid)  # proven, then reused
        monkeypatch.setattr(unitexec, "_proven_managers_path", {})
        assert unitfiles.proven_user_manager() == other.pid
        for _ in range(500):  # until it has exec'd: before, /proc shows the environment it was forked with
            if unitfiles.process_environment(other.pid).get("XDG_CONFIG_HOME") == str(planted):
                break
            time.sleep(0.01)
        assert unitfiles.process_environment(other.pid)["XDG_CONFIG_HOME"] == str(planted)
        assert not [d for d in unitexec.user_unit_path() if d.startswith(str(planted))]
    finally:
        other.kill()
        other.wait()


@pytest.mark.integration
def test_no_bus_is_systemd_unavailable_naming_the_bus(systemd_rig, user_bus, monkeypatch):
    systemd_rig.stop_bus()
    with pytest.raises(SystemdUnavailable, match="cannot connect to the user bus: .*no session bus at"):
        Systemd(USER)
    with pytest.raises(SystemdUnavailable, match="the user manager did not answer"):
        user_bus.unit_of_pid(systemd_rig.manager_pid)
    # systemctl still works over the manager's private socket: the manager is fine, the bus is not.
    assert systemd_rig.systemctl("is-system-running").stdout.strip() in ("running", "degraded")


def test_system_bus_absent_is_systemd_unavailable(monkeypatch, tmp_path):
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no-bus")
    monkeypatch.setenv("SYSTEMD_BUS_TIMEOUT", "5s")  # Systemd() would set it for the whole process
    with pytest.raises(SystemdUnavailable, match=f"cannot connect to the system bus: no socket at {tmp_path}/no-bus"):
        Systemd(SYSTEM)


def test_no_bus_socket_costs_no_pystemd_import(tmp_path):
    code = ("import sys\nfrom bindguard.systemd.bus import Systemd, SystemdUnavailable\n"
            "try:\n    Systemd('system')\nexcept SystemdUnavailable as exc:\n    print(exc)\n"
            "print(any(m.startswith('pystemd') for m in sys.modules))\n")
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={tmp_path}/no-bus"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.stdout.splitlines() == [f"cannot connect to the system bus: no socket at {tmp_path}/no-bus", "False"]


@pytest.mark.integration
def test_unit_names_are_valid_where_the_manager_takes_them(user_bus):
    """unitfiles.unit_name() rejects exactly what the manager's LoadUnit rejects ("Unit name ... is
    not valid"): a valid name it does not know is UnitNotFound, an invalid one SystemdRefused."""
    names = ["plain.service", "a@b@c.service", "foo\\x2dbar.service", "-x.service", "a:b_c.d-e.service",
             "sda.device", "home.automount", "x" * 247 + ".service",  # valid, and unknown to the manager
             "a/b.service", "a b.service", "\u00e9.service", "x" * 248 + ".service", "@x.service",
             "foo@.service", ".service", "nosuffix"]
    for name in names:
        try:
            user_bus.unit(name)
            accepted = True
        except UnitNotFound:
            accepted = True
        except SystemdRefused as exc:
            assert "Unit name" in str(exc), exc  # "... is not valid", "... is missing the instance name"
            accepted = False
        assert accepted == (unit_name(name) == name), name


@pytest.mark.integration
def test_every_failure_is_a_systemd_error(user_bus):
    with pytest.raises(SystemdRefused, match="the user manager refused LoadUnit: Unit name a/b is not valid"):
        user_bus.active_state("a/b")
    assert issubclass(SystemdRefused, SystemdError) and issubclass(UnitNotFound, SystemdError)
    assert issubclass(SystemdUnavailable, SystemdError)


@pytest.mark.parametrize("address, why", [
    ("tcp:host=127.0.0.1,port=1", "names no unix:path= socket, the only kind bindguard uses"),
    ("unixexec:path=/bin/true", "names no unix:path= socket, the only kind bindguard uses"),  # would run a program
    ("unix:abstract=bus", "names no unix:path= socket"),
])
def test_only_a_unix_path_is_a_bus(monkeypatch, address, why):
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", address)
    with pytest.raises(SystemdUnavailable, match=why):
        Systemd(SYSTEM)


@pytest.mark.parametrize("address", ["tcp:host=" + "x" * 100_000, "unix:path=/" + "x" * 100_000])
def test_a_bus_address_is_cut_in_the_message_that_quotes_it(monkeypatch, address):
    """The unit's environment (its user's EnvironmentFile=) names the bus under ExecStartPre=+: what
    the root guard's note quotes of it is bounded."""
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", address)
    with pytest.raises(SystemdUnavailable) as raised:
        Systemd(SYSTEM)
    assert "xxx…" in str(raised.value) and len(str(raised.value)) < 400, len(str(raised.value))


def test_a_bus_socket_is_trusted_only_with_every_directory_above_it_and_its_links_resolved(tmp_path):
    """The socket from $DBUS_*_BUS_ADDRESS is checked as the root guard's other paths are
    (bindguard.resolve_trusted): a directory of another user's above a socket of root's lets that
    user swap it; through a link, the socket it leads to is checked, and that path is connected to."""
    from bindguard.systemd.busaddress import check_socket

    need_root("giving a directory to another user")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(theirs / "bus"))
    try:
        os.chown(theirs, NOBODY, NOBODY)
        with pytest.raises(SystemdUnavailable, match=f"{theirs} belongs to uid {NOBODY}, not root"):
            check_socket(SYSTEM, str(theirs / "bus"))
        os.chown(theirs, 0, 0)
        os.chmod(theirs / "bus", 0o777)  # as the system bus's: anyone may connect, no one else change it
        link = tmp_path / "link"
        link.symlink_to(theirs / "bus")
        assert check_socket(SYSTEM, str(link)) == str(theirs / "bus")
        os.chown(theirs, NOBODY, NOBODY)  # the link is root's, what it leads to is not
        with pytest.raises(SystemdUnavailable, match=f"{theirs} belongs to uid {NOBODY}"):
            check_socket(SYSTEM, str(link))
        with pytest.raises(SystemdUnavailable, match="is no path"):  # %00 in the address
            check_socket(SYSTEM, f"{theirs}/bus\0")
    finally:
        server.close()


def test_a_bus_socket_of_another_user_is_not_asked(monkeypatch, tmp_path):
    """A socket someone else made could answer for systemd: only root's or our own is used."""
    path = tmp_path / "a bus"  # a space: escaped as %20 in the address
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    try:
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={str(path).replace(' ', '%20')},guid=0")
        if os.geteuid() == 0:  # as any other user, a socket of its own cannot be given away
            os.chown(path, NOBODY, NOBODY)
            untrusted = f"{path} is not trusted: {path} belongs to uid {NOBODY}, not root"
            with pytest.raises(SystemdUnavailable, match=untrusted):
                Systemd(SYSTEM)
            os.chown(path, 0, 0)
        with pytest.raises(SystemdUnavailable, match=f"the system bus at {path} did not answer within 1 s"):
            Systemd(SYSTEM)
    finally:
        server.close()


# A process of nobody's that makes itself non-dumpable (prctl PR_SET_DUMPABLE 0), as a service's user
# could make an `LD_PRELOAD=x.so /usr/lib/systemd/systemd` they run: proc(5) then shows the files in its
# /proc/PID as root's (Linux keeps /proc/PID itself its effective uid's, task_dump_owner).
UNDUMPABLE = """\
import ctypes, sys, time
ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0
sys.stdout.write("ready\\n")
sys.stdout.flush()
time.sleep(60)
"""


def test_a_non_dumpable_process_of_another_user_is_no_manager_of_roots(monkeypatch):
    """A root guard believes $MANAGERPID only of a manager root runs: by the real and effective uid
    on the Uid: line of /proc/PID/status, not by who owns a file in /proc/PID, which for a
    non-dumpable process proc(5) shows as root."""
    from bindguard.systemd import unitfiles

    need_root("the root guard's rule (setpriv)")
    process = subprocess.Popen([*AS_NOBODY, "/usr/bin/python3", "-I", "-c", UNDUMPABLE], stdout=subprocess.PIPE)
    try:
        assert process.stdout.readline() == b"ready\n"
        assert os.stat(f"/proc/{process.pid}/status").st_uid == 0  # what an owner in /proc would prove
        assert unitfiles.status_ids(process.pid) == (NOBODY, NOBODY)
        assert not unitfiles.root_runs(process.pid)
        assert unitfiles.root_runs(os.getpid())
        # Its exe cannot be systemd's binary without it being systemd: grant that, so the uid decides.
        monkeypatch.setattr(unitfiles, "runs_systemd", lambda pid: True)
        assert unitfiles.proven_user_manager({"MANAGERPID": str(process.pid)}) is None
        assert unitfiles.proven_user_manager({"MANAGERPID": str(os.getpid())}) == os.getpid()
    finally:
        process.kill()
        process.wait()
