"""owners.py: the PIDs behind real sockets, their process facts, and cgroup -> unit."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import HOLDER, NOBODY, need, need_root
from observe import query

import bindguard
from bindguard.evidence import owners
from bindguard.model.endpoints import Endpoint
from bindguard.model.facts import SocketFact


def inode_of(ns, port: int, proto: str = "tcp") -> int:
    facts, _ = query(ns, proto=proto, port=port)
    (inode,) = {f["inode"] for f in facts if f["inode"]}
    return inode


FORKED_LISTENER = """
import os, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 8080))
s.listen()
child = os.fork()
if child == 0:
    sys.stdin.read()
    os._exit(0)
print("ready", child, flush=True)
sys.stdin.read()
os.waitpid(child, 0)
"""


def start(ns, argv: list[str], **kwargs) -> tuple[subprocess.Popen, list[str]]:
    """Start a process in the namespace that prints "ready ..." once its sockets are in place."""
    proc = subprocess.Popen(ns.argv(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, **kwargs)
    ns.processes.append(proc)
    words = proc.stdout.readline().split()
    assert words[:1] == ["ready"], f"{argv} did not start"
    return proc, words[1:]


@pytest.mark.integration
def test_find_holders_returns_the_holder(netns):
    holder = netns.hold({"proto": "tcp", "host": "127.0.0.1", "port": 8080})
    other = netns.hold({"proto": "udp", "host": "::", "port": 5353})
    inode, udp_inode = inode_of(netns, 8080), inode_of(netns, 5353, proto="udp")

    found = owners.find_holders({inode, udp_inode, 0})
    assert found == {inode: [holder.pid], udp_inode: [other.pid]}
    assert found.unreadable == 0

    hinted = owners.find_holders({inode}, first_pids=[holder.pid])
    assert hinted == {inode: [holder.pid]} and hinted.scanned == 1


@pytest.mark.integration
def test_shared_listener_reports_the_lowest_pid_and_stops_early(netns):
    parent, (child,) = start(netns, [sys.executable, "-c", FORKED_LISTENER])
    inode = inode_of(netns, 8080)
    pids = sorted([parent.pid, int(child)])

    first = owners.find_holders({inode})
    assert first == {inode: pids[:1]}
    every = owners.find_holders({inode}, every_holder=True)
    assert every == {inode: pids}
    # the default scan stops at the first holder; every_holder reads on through /proc
    assert owners.find_holders({inode}, first_pids=pids).scanned == 1
    assert owners.find_holders({inode}, first_pids=pids, every_holder=True).scanned > 2

    assert owners.find_holders({inode}, first_pids=[pids[1]]) == {inode: pids[1:]}


@pytest.mark.integration
def test_holders_of_gives_the_first_holders_facts_or_every_holders(netns):
    """The one routine check, scan and verify name holders with: the lowest PID's facts (the master
    that forked its workers), or with every_holder all of them, read once each."""
    parent, (child,) = start(netns, [sys.executable, "-c", FORKED_LISTENER])
    facts, _ = query(netns, port=8080)
    sockets = [SocketFact(Endpoint("tcp", ipaddress.ip_address("127.0.0.1"), 8080), "LISTEN", 0, f["inode"],
                          cgroup_id=f["cgroup_id"]) for f in facts if f["inode"]]
    inode = sockets[0].inode
    first = owners.holders_of(sockets)
    assert [p.pid for p in first.processes[inode]] == [min(parent.pid, int(child))] and not first.incomplete
    assert first.first(inode).cmdline[:2] == (sys.executable, "-c")
    every = owners.holders_of(sockets, every_holder=True)
    assert [p.pid for p in every.processes[inode]] == sorted([parent.pid, int(child)])
    assert owners.holders_of([]).processes == {} and first.first(1) is None


def test_an_inode_nobody_holds_scans_everything():
    found = owners.find_holders({1})
    assert found == {} and found.scanned > 1


@pytest.mark.integration
def test_unreadable_processes_are_counted_without_root(netns):
    holder = netns.hold({"proto": "tcp", "host": "127.0.0.1", "port": 8080})
    inode = inode_of(netns, 8080)
    code = (
        "import json, sys\n"
        "from bindguard.evidence import owners\n"
        f"found = owners.find_holders({{{inode}}})\n"
        "print(json.dumps([dict(found), found.unreadable]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(bindguard.__file__).resolve().parents[1])}
    result = subprocess.run(
        [sys.executable, "-c", code], user=NOBODY, group=NOBODY, extra_groups=[], env=env,
        capture_output=True, text=True, cwd="/", timeout=60,
    )
    assert result.returncode == 0, result.stderr
    found, unreadable = json.loads(result.stdout)
    assert found == {} and unreadable > 0
    assert holder.poll() is None


@pytest.mark.integration
def test_process_facts_of_a_holder(netns):
    holder = netns.hold({"proto": "tcp", "host": "127.0.0.1", "port": 8080}, uid=NOBODY)
    facts = owners.process_facts(holder.pid)
    assert facts is not None
    assert facts.pid == holder.pid
    assert facts.ppid == os.getpid()  # nsenter execs the holder in place
    assert facts.name.startswith("python")
    assert str(HOLDER) in facts.cmdline
    assert facts.exe == os.path.realpath(sys.executable)
    assert facts.uid == NOBODY and facts.user == "nobody"
    assert abs(facts.started - time.time()) < 60
    assert facts.cgroup == owners.process_cgroup(os.getpid())
    assert facts.unit == owners.unit_from_cgroup(facts.cgroup)

    assert owners.process_facts(_reaped_pid()) is None


def _reaped_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def scratch_cgroup():
    """A cgroup of our own under the cgroup2 mount, removed afterwards."""
    need_root("cgroups")
    roots = owners._cgroup2_roots()
    if not roots:
        need("no cgroup2 hierarchy is mounted")
    path = f"/bindguard-test-{uuid.uuid4().hex[:8]}"
    directory = Path(roots[0] + path)
    directory.mkdir()
    try:
        yield path, directory
    finally:
        for _ in range(50):
            try:
                directory.rmdir()
                break
            except OSError:  # its processes are still exiting
                time.sleep(0.1)


@pytest.mark.integration
def test_socket_cgroup_leads_to_the_holder(netns, scratch_cgroup):
    path, directory = scratch_cgroup
    procs = directory / "cgroup.procs"
    config = json.dumps({"sockets": [{"proto": "tcp", "host": "::", "port": 8080}]})
    holder, _ = start(netns, [sys.executable, str(HOLDER), config], preexec_fn=lambda: procs.write_text("0"))
    (fact,), _ = query(netns, port=8080)

    assert owners.cgroup_path_for_id(fact["cgroup_id"]) == path
    assert owners._walk_for_cgroup(str(directory.parent), fact["cgroup_id"]) == str(directory)
    assert owners.cgroup_pids(path) == [holder.pid]
    assert owners.process_cgroup(holder.pid) == path
    socket_fact = SocketFact(
        local=Endpoint("tcp", ipaddress.ip_address("::"), 8080), state="LISTEN", uid=0,
        inode=fact["inode"], cgroup_id=fact["cgroup_id"],
    )
    assert owners.socket_cgroup_pids([socket_fact]) == [holder.pid]
    found = owners.find_holders({fact["inode"]}, first_pids=owners.socket_cgroup_pids([socket_fact]))
    assert found == {fact["inode"]: [holder.pid]} and found.scanned == 1

    netns.stop(holder)
    assert owners.cgroup_pids(path) == []


def test_cgroup_path_for_a_removed_cgroup_is_none():
    assert owners.cgroup_path_for_id(2**62) is None


@pytest.mark.parametrize(
    "path, unit",
    [
        ("/system.slice/nginx.service", "nginx.service"),
        ("/system.slice/foo.service/payload", "foo.service"),
        ("/system.slice/system-getty.slice/getty@tty1.service", "getty@tty1.service"),
        ("/user.slice/user-1000.slice/user@1000.service/app.slice/web.service", "web.service"),
        ("/user.slice/user-1000.slice/user@1000.service/init.scope", "init.scope"),
        ("/user.slice/user-1000.slice/session-3.scope", "session-3.scope"),
        ("/system.slice/docker-4f2a.scope", "docker-4f2a.scope"),
        ("/system.slice/web.socket", "web.socket"),
        ("/system.slice/mnt-data.mount", "mnt-data.mount"),
        ("/init.scope", "init.scope"),
        ("/system.slice/_cpu.weird.service", "cpu.weird.service"),
        ("/system.slice", None),
        ("/user.slice/user-1000.slice", None),
        ("/", None),
        ("", None),
        ("/bindguard-test", None),
        ("/.service", None),
    ],
)
def test_unit_from_cgroup(path, unit):
    assert owners.unit_from_cgroup(path) == unit


HYBRID = """12:pids:/system.slice/nginx.service
1:name=systemd:/system.slice/nginx.service
0::/system.slice/nginx.service
"""
LEGACY = """9:name=systemd:/system.slice/sshd.service
8:pids:/system.slice/sshd.service
0::/
"""
UNIFIED = "0::/user.slice/user-1000.slice/user@1000.service/app.slice/web.service\n"
CONTAINER_ROOT = "0::/\n"


@pytest.mark.parametrize(
    "text, path",
    [
        (HYBRID, "/system.slice/nginx.service"),
        (LEGACY, "/system.slice/sshd.service"),
        (UNIFIED, "/user.slice/user-1000.slice/user@1000.service/app.slice/web.service"),
        (CONTAINER_ROOT, "/"),
        ("", None),
    ],
)
def test_cgroup_from_proc_file(text, path):
    assert owners.cgroup_from_proc_file(text) == path
