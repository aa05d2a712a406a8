"""What the guard says about a holder is proven, and --reap-stale ends only a proven stale instance.

Issue 10 (1, 2, 3, 9) and issue 9 (5), with real parts: a PID namespace whose PID 1 is not a
service manager, a hand-started daemon in a scope of the rig's user manager, a cgroup whose
path merely ends in the guarded unit's name, and a socket unit that really listens.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

from conftest import NOBODY, guarded, quoted_commands

pytestmark = pytest.mark.integration

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
SERVE = TESTS / "serve.py"
PORT = 18090
ADDRESS = f"127.0.0.1:{PORT}"
SPEC = {"host": "127.0.0.1", "port": PORT}
# The interpreter's own path, as /proc/PID/exe shows it: the old guard took a holder running the
# unit's ExecStart= executable for proof that it is the unit's own stray copy.
PYTHON = os.path.realpath(sys.executable)
SERVED = f"{PYTHON} {SERVE} '{json.dumps({'sockets': [SPEC]})}'"  # a daemon holding SPEC, as PYTHON


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def ppid_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def listener_pid(run, port: int = PORT, timeout: float = 10.0) -> int:
    """The PID holding the TCP listener on port, from `ss -p` (run: a namespace's run())."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"pid=(\d+)", run(["ss", "-Htlnp", f"sport = :{port}"]).stdout)
        if found:
            return int(found.group(1))
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port}")


def text(log: Path) -> str:
    return log.read_text() if log.exists() else ""


# --- issue 10.1: no service manager, no orphan --------------------------------------------------------


def test_a_holder_whose_parent_is_a_pid_1_that_is_not_a_manager_is_a_listener(netns):
    """`unshare --pid --fork` (a container, CI): PID 1 is a shell. The holder it started a moment ago
    is a live listener with PPID 1, and nothing proves a service manager: no orphan, no stray copy."""
    serve = json.dumps({"sockets": [SPEC]})
    script = f"""
{sys.executable} {SERVE} '{serve}' &
for i in $(seq 200); do ss -Htln 'sport = :{PORT}' | grep -q . && break; sleep 0.05; done
{sys.executable} -m bindguard check --json {ADDRESS}
echo "exit=$?" >&2
kill $!
"""
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(SRC), "LANG": "C.UTF-8"}  # no bus, no $MANAGERPID
    done = netns.run(["unshare", "--pid", "--fork", "--mount-proc", "--", "sh", "-c", script], env=env, timeout=60)
    assert "exit=98" in done.stderr, done.stderr
    report = json.loads(done.stdout)
    (conflict,) = report["conflicts"]
    assert conflict["kind"] == "listener", conflict
    assert conflict["ppid"] == 1 and conflict["pid"] != 1
    assert conflict["unit"] is None and conflict["unit_status"] == "unknown"
    assert "kill -TERM" not in conflict["remedy"] and "stray" not in conflict["remedy"]
    said = json.dumps(conflict)
    assert "orphan" not in said + done.stderr and "service manager" not in said and "no unit" not in said
    assert any("no service manager is proven" in note for note in report["notes"]), report["notes"]


# --- issue 10.2: a hand-started daemon in a scope --------------------------------------------------------


def start_in_scope(rig, scope: str = "session-3") -> int:
    """A daemon started by hand in a login session, as `sudo nginx` over SSH is: a process of the
    manager's tree moves itself into a scope (systemd-run --scope) and starts the daemon in the
    background; the manager, a subreaper, adopts it. Returns the daemon's PID."""
    script = rig.root / "login.sh"
    script.write_text(f"#!/bin/sh\n{SERVED} </dev/null >/dev/null 2>&1 &\n")
    rig.write_unit("login.service", "[Service]\nType=oneshot\n"
                   f"ExecStart=/usr/bin/systemd-run --user --scope --unit={scope} -- /bin/sh {script}\n")
    run = rig.start("login.service")
    assert run.ok, run.output
    pid = listener_pid(rig.run)
    assert ppid_of(pid) == rig.manager_pid, "the manager adopted it, as PID 1 adopts a daemonized sudo nginx"
    assert rig.prop(f"{scope}.scope", "ActiveState") == "active"
    return pid


def test_a_daemon_in_a_running_scope_is_a_listener_and_never_reaped(systemd_rig):
    rig = systemd_rig
    daemon = start_in_scope(rig)
    log = guarded(rig, ADDRESS, SPEC, check_args="--reap-stale", exec_start=SERVED)

    done = rig.bindguard("check", "--user", "--json", "--unit", "web.service", "--reap-stale", ADDRESS)
    assert done.returncode == 98, done.stderr
    report = json.loads(done.stdout)
    (conflict,) = report["conflicts"]
    assert (conflict["kind"], conflict["unit"], conflict["unit_status"]) == (
        "listener", "session-3.scope", "manager"), conflict
    assert report["reaped"] == [] and alive(daemon)

    run = rig.start("web.service")
    assert not run.ok and run.pre_status == [98], text(log)
    out = text(log)
    assert "listener" in out and "unit session-3.scope" in out
    assert "orphan" not in out and "reaping" not in out and "no running unit" not in out
    assert alive(daemon), "a daemon someone started by hand must never be ended by the guard"


# --- issue 9.5: a cgroup's name is no proof ------------------------------------------------------------------


def fake_unit_cgroup(rig, pid: int, path: str = "user.slice/user-65534.slice/user@65534.service/app.slice/web.service"):
    """Move pid into a cgroup under the rig's own whose path merely ends in a unit's name."""
    assert rig.cgroups, "the rig has its own cgroup"
    for hierarchy in rig.cgroups:
        group = hierarchy / path
        group.mkdir(parents=True, exist_ok=True)
        (group / "cgroup.procs").write_text(str(pid))
    assert path in Path(f"/proc/{pid}/cgroup").read_text()


def test_a_cgroup_path_that_only_ends_in_the_units_name_is_not_reaped(systemd_rig):
    """Another user's manager has its own nginx.service: a process of uid 65534 in
    .../user@65534.service/app.slice/web.service is not the guarded web.service's stale instance.
    Without a bus nothing confirms the unit, so nothing is reaped."""
    rig = systemd_rig
    rig.hold(SPEC, uid=NOBODY)
    pid = listener_pid(rig.run)
    fake_unit_cgroup(rig, pid)

    log = guarded(rig, ADDRESS, SPEC, check_args="--reap-stale", exec_start=SERVED)
    rig.stop_bus()
    run = rig.start("web.service")
    assert not run.ok and run.pre_status == [98], text(log)
    out = text(log)
    assert alive(pid), out
    assert "reaping" not in out and "own-instance" not in out
    assert "unit web.service (named by its cgroup path only" in out

    done = rig.bindguard("check", "--user", "--json", "--unit", "web.service", "--reap-stale", ADDRESS)
    (conflict,) = json.loads(done.stdout)["conflicts"]
    assert (conflict["kind"], conflict["unit"], conflict["unit_status"]) == ("listener", "web.service", "cgroup")
    assert alive(pid)


def test_a_cgroup_a_delegated_unit_named_is_no_unit_and_reaches_no_command(systemd_rig):
    """Below a delegated unit its user may make cgroups of any name: one named
    `x$(reboot);.service` is no unit systemd could have, so the holder's unit is the one above it,
    and the name reaches no command the advice writes."""
    rig = systemd_rig
    rig.hold(SPEC, uid=NOBODY)
    pid = listener_pid(rig.run)
    fake_unit_cgroup(rig, pid, "user.slice/user-65534.slice/user@65534.service/app.slice/web.service/"
                               "x$(reboot);.service")
    rig.stop_bus()
    done = rig.bindguard("check", "--user", "--json", ADDRESS)
    (conflict,) = json.loads(done.stdout)["conflicts"]
    assert (conflict["unit"], conflict["unit_status"]) == ("web.service", "cgroup"), conflict
    said = rig.bindguard("check", "--user", ADDRESS).stderr
    assert "`systemctl stop web.service`" in said
    assert not [command for command in quoted_commands(said) if "reboot" in command], said


# --- issue 10.3: the unit of a socket-unit conflict is the socket unit ----------------------------------------


def test_a_socket_unit_conflict_names_the_socket_unit(systemd_rig):
    rig = systemd_rig
    rig.write_unit("web.socket", f"[Socket]\nListenStream={ADDRESS}\n", reload=False)
    rig.write_unit("web.service", "[Service]\nExecStart=/bin/sleep infinity\n", reload=False)
    rig.write_unit("api.service", "[Service]\nExecStart=/bin/sleep infinity\n")
    assert rig.start("web.socket").ok
    done = rig.bindguard("check", "--user", "--json", "--unit", "api.service", ADDRESS)
    assert done.returncode == 98, done.stderr
    (conflict,) = json.loads(done.stdout)["conflicts"]
    assert conflict["kind"] == "socket-unit" and conflict["pid"] == rig.manager_pid
    assert (conflict["unit"], conflict["socket_unit"], conflict["unit_status"]) == ("web.socket", "web.socket", "manager")
    said = rig.bindguard("check", "--user", "--unit", "api.service", ADDRESS).stderr
    assert "socket unit web.socket" in said and "init.scope" not in said


# --- issue 10.9: "in no unit" and "unit unknown" are told apart --------------------------------------------


def test_in_no_unit_is_told_from_unit_unknown(systemd_rig):
    rig = systemd_rig
    rig.hold(SPEC)  # started from the test, outside the manager's tree: in none of its units

    done = rig.bindguard("check", "--user", "--json", ADDRESS)
    (conflict,) = json.loads(done.stdout)["conflicts"]
    assert (conflict["unit"], conflict["unit_status"]) == (None, "no-unit"), conflict
    assert "in no unit" in rig.bindguard("check", "--user", ADDRESS).stderr

    rig.stop_bus()
    done = rig.bindguard("check", "--user", "--json", ADDRESS)
    (conflict,) = json.loads(done.stdout)["conflicts"]
    assert (conflict["unit"], conflict["unit_status"]) == (None, "unknown"), conflict
    said = rig.bindguard("check", "--user", ADDRESS).stderr
    assert "unit unknown" in said and "in no unit" not in said


def test_a_pid_1_that_is_not_a_manager_holding_a_socket_is_no_socket_unit(netns):
    """PID 1 of a container holds the socket itself: check and scan say so, not "the service manager"."""
    program = f"""
import json, socket, subprocess, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", {PORT}))
s.listen()
run = lambda *args: subprocess.run([sys.executable, "-m", "bindguard", *args], capture_output=True, text=True)
print(json.dumps({{"check": run("check", "--json", "{ADDRESS}").stdout, "scan": run("scan", "--json").stdout}}))
"""
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(SRC), "LANG": "C.UTF-8"}
    done = netns.run(["unshare", "--pid", "--fork", "--mount-proc", "--", sys.executable, "-c", program],
                     env=env, timeout=60)
    out = json.loads(done.stdout)
    (conflict,) = json.loads(out["check"])["conflicts"]
    assert (conflict["pid"], conflict["kind"], conflict["unit_status"]) == (1, "listener", "unknown"), conflict
    (listener,) = json.loads(out["scan"])["listeners"]
    assert (listener["pid"], listener["held_by_manager"], listener["unit_status"]) == (1, False, "unknown")


def test_verify_takes_the_managers_word_not_a_cgroup_name(systemd_rig):
    """verify: a process of another user's web.service does not serve the guarded web.service."""
    rig = systemd_rig
    rig.write_unit("web.service", "[Service]\nExecStart=/bin/sleep infinity\n")
    rig.hold(SPEC, uid=NOBODY)
    pid = listener_pid(rig.run)
    fake_unit_cgroup(rig, pid)
    done = rig.bindguard("verify", "--user", "--json", "--timeout", "0", "--unit", "web.service", ADDRESS)
    assert done.returncode == 98, done.stderr
    (address,) = json.loads(done.stdout)["addresses"]
    assert address["kind"] == "foreign-owner" and address["listeners"][0]["unit_statuses"] == ["no-unit"]
    assert "in no unit" in address["evidence"][0]


def test_scan_tells_a_scope_no_unit_and_unknown_apart(systemd_rig):
    rig = systemd_rig
    start_in_scope(rig)
    rig.hold({"host": "127.0.0.1", "port": PORT + 1})  # outside the manager's tree

    report = json.loads(rig.bindguard("scan", "--user", "--json").stdout)
    listeners = {entry["port"]: entry for entry in report["listeners"]}
    assert (listeners[PORT]["unit"], listeners[PORT]["unit_status"]) == ("session-3.scope", "manager")
    assert (listeners[PORT + 1]["unit"], listeners[PORT + 1]["unit_status"]) == (None, "no-unit")
    unclaimed = {f["port"]: f for f in report["findings"] if f["kind"] == "unclaimed-listener"}
    assert unclaimed[PORT]["summary"].endswith("is served by no running service")
    assert "it runs in session-3.scope, not in a service" in unclaimed[PORT]["evidence"]
    assert "the manager places it in no unit" in unclaimed[PORT + 1]["evidence"]
    table = rig.bindguard("scan", "--user").stdout
    assert "(no unit)" in table

    rig.stop_bus()
    report = json.loads(rig.bindguard("scan", "--user", "--json").stdout)
    listeners = {entry["port"]: entry for entry in report["listeners"]}
    assert (listeners[PORT]["unit"], listeners[PORT]["unit_status"]) == ("session-3.scope", "cgroup")
    assert (listeners[PORT + 1]["unit"], listeners[PORT + 1]["unit_status"]) == (None, "unknown")


# --- the proof --reap-stale needs, on recorded evidence ---------------------------------------------------


def test_why_reapable_needs_the_managers_word_and_the_units_own_cgroup():
    from bindguard.model.endpoints import Bind, SocketOptions, parse_listen
    from bindguard.model.facts import ProcessFact, SystemdFacts
    from bindguard.action.reap import why_reapable
    from bindguard.model.kinds import ConflictKind
    from bindguard.verdict.conflicts import Conflict

    cgroup = "/system.slice/web.service"
    stale = ProcessFact(4242, 1, "webd", ("webd",), "/usr/bin/python3", 0, "root", 1.0e9, cgroup, "web.service")
    bind = Bind(parse_listen(ADDRESS), SocketOptions())
    facts = SystemdFacts(manager_pid=1, guarded_unit="web.service", guarded_instance_running=False,
                         guarded_state="activating (start-pre)", unit_of_pid={4242: "web.service"})
    conflict = Conflict(bind, ConflictKind.OWN_INSTANCE, process=stale, unit="web.service", unit_status="manager")
    assert "web.service" in why_reapable(conflict, facts, cgroup)
    assert why_reapable(conflict, facts, "") is None  # no ControlGroup from the manager
    assert why_reapable(conflict, facts, "/system.slice/api.service") is None
    assert why_reapable(conflict, facts, "/system.slice") is None  # a path that does not name the unit
    assert why_reapable(Conflict(bind, ConflictKind.LISTENER, process=stale), facts, cgroup) is None
    facts.unit_of_pid = {}  # no bus: the cgroup's name alone
    assert why_reapable(conflict, facts, cgroup) is None
    facts.unit_of_pid = {4242: "web.service"}
    elsewhere = ProcessFact(4242, 1, "webd", ("webd",), "/usr/bin/python3", 65534, "nobody", 1.0e9,
                            "/user.slice/user-65534.slice/user@65534.service/app.slice/web.service", "web.service")
    assert why_reapable(Conflict(bind, ConflictKind.OWN_INSTANCE, process=elsewhere), facts, cgroup) is None
