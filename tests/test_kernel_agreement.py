"""The verdict against the kernel: real sockets in a real network namespace.

Each case puts holders on the port, runs `bindguard check --json --wait 0` in the namespace,
and does the daemon's bind() itself (tests/trybind.py): bindguard must pass exactly when the
kernel lets the daemon bind, and name the right kind of obstacle and its PID.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import AS_NOBODY, NOBODY

TRYBIND = Path(__file__).with_name("trybind.py")
P = 8080


def listen(host, **kw):
    return {"proto": "tcp", "host": host, "port": P, "reuseaddr": True, **kw}


def udp(host, **kw):
    return {"proto": "udp", "host": host, "port": P, **kw}


@dataclass
class Case:
    name: str
    holders: list  # [(spec, uid or None)]
    request: list  # CLI arguments after `check`
    daemon: list  # the daemon's sockets, as trybind specs, bound together in order
    kind: str | None  # the first conflict's kind; None when clear
    pid: bool = True  # the conflict names the holder's PID
    extra_setup: list = field(default_factory=list)


CASES = [
    Case("v4 wildcard blocks dual-stack [::]", [(listen("0.0.0.0"), None)], ["8080"],
         [listen("::", v6only=False)], "listener"),
    Case("v4 wildcard does not block v6only [::]", [(listen("0.0.0.0"), None)], ["--v6only", "8080"],
         [listen("::", v6only=True)], None),
    Case("specific v4 blocks v4 wildcard", [(listen("127.0.0.1"), None)], ["0.0.0.0:8080"],
         [listen("0.0.0.0")], "listener"),
    Case("v4 wildcard blocks specific v4", [(listen("0.0.0.0"), None)], ["127.0.0.1:8080"],
         [listen("127.0.0.1")], "listener"),
    Case("different specific v4 addresses", [(listen("127.0.0.1"), None)], ["127.0.0.2:8080"],
         [listen("127.0.0.2")], None),
    Case("v6only [::] leaves 0.0.0.0 free", [(listen("::", v6only=True), None)], ["0.0.0.0:8080"],
         [listen("0.0.0.0")], None),
    Case("dual-stack [::] blocks 0.0.0.0", [(listen("::", v6only=False), None)], ["0.0.0.0:8080"],
         [listen("0.0.0.0")], "listener"),
    Case("dual-stack [::] blocks 127.0.0.1", [(listen("::", v6only=False), None)], ["127.0.0.1:8080"],
         [listen("127.0.0.1")], "listener"),
    Case("[::1] blocks [::]", [(listen("::1", v6only=False), None)], ["[::]:8080"],
         [listen("::", v6only=False)], "listener"),
    Case("[::1] leaves 127.0.0.1 free", [(listen("::1", v6only=False), None)], ["127.0.0.1:8080"],
         [listen("127.0.0.1")], None),
    Case("[::1] dual-stack leaves 0.0.0.0 free", [(listen("::1", v6only=False), None)], ["0.0.0.0:8080"],
         [listen("0.0.0.0")], None),
    Case("v4-mapped request against its IPv4 listener", [(listen("127.0.0.1"), None)],
         ["--no-v6only", "[::ffff:127.0.0.1]:8080"], [listen("::ffff:127.0.0.1", v6only=False)], "listener"),
    Case("SO_REUSEPORT on both, same uid", [(listen("0.0.0.0", reuseport=True), None)],
         ["--reuseport", "0.0.0.0:8080"], [listen("0.0.0.0", reuseport=True)], None),
    Case("SO_REUSEPORT on both, different uid", [(listen("0.0.0.0", reuseport=True), NOBODY)],
         ["--reuseport", "0.0.0.0:8080"], [listen("0.0.0.0", reuseport=True)], "listener"),
    Case("SO_REUSEPORT on both, the daemon's uid given", [(listen("0.0.0.0", reuseport=True), NOBODY)],
         ["--reuseport", "--daemon-user", str(NOBODY), "0.0.0.0:8080"],
         [listen("0.0.0.0", reuseport=True, uid=NOBODY)], None),
    Case("SO_REUSEPORT only on the daemon", [(listen("0.0.0.0"), None)],
         ["--reuseport", "0.0.0.0:8080"], [listen("0.0.0.0", reuseport=True)], "listener"),
    Case("bound, never listened, without SO_REUSEADDR", [(listen("0.0.0.0", reuseaddr=False, listen=False), None)],
         ["0.0.0.0:8080"], [listen("0.0.0.0")], "bound"),
    Case("bound, never listened, both SO_REUSEADDR", [(listen("0.0.0.0", listen=False), None)],
         ["0.0.0.0:8080"], [listen("0.0.0.0")], None),
    Case("bound, never listened, daemon without SO_REUSEADDR", [(listen("0.0.0.0", listen=False), None)],
         ["--no-reuseaddr", "0.0.0.0:8080"], [listen("0.0.0.0", reuseaddr=False)], "bound"),
    Case("server TIME_WAIT from a SO_REUSEADDR listener", [(listen("127.0.0.1", mode="timewait-server"), None)],
         ["127.0.0.1:8080"], [listen("127.0.0.1")], None),
    Case("server TIME_WAIT from a listener without SO_REUSEADDR",
         [(listen("127.0.0.1", reuseaddr=False, mode="timewait-server"), None)],
         ["127.0.0.1:8080"], [listen("127.0.0.1")], "time-wait", pid=False),
    Case("server TIME_WAIT blocks the v4 wildcard",
         [(listen("127.0.0.1", reuseaddr=False, mode="timewait-server"), None)],
         ["0.0.0.0:8080"], [listen("0.0.0.0")], "time-wait", pid=False),
    Case("server TIME_WAIT leaves another address free",
         [(listen("127.0.0.1", reuseaddr=False, mode="timewait-server"), None)],
         ["127.0.0.2:8080"], [listen("127.0.0.2")], None),
    Case("TIME_WAIT of a dual-stack listener's [::1] connection blocks 0.0.0.0",
         [(listen("::", reuseaddr=False, v6only=False, mode="timewait-server"), None)],
         ["0.0.0.0:8080"], [listen("0.0.0.0")], "time-wait", pid=False),
    Case("TIME_WAIT of a v6only listener's [::1] connection leaves 0.0.0.0 free",
         [(listen("::", reuseaddr=False, v6only=True, mode="timewait-server"), None)],
         ["0.0.0.0:8080"], [listen("0.0.0.0")], None),
    Case("server TIME_WAIT with SO_REUSEADDR, daemon without it",
         [(listen("127.0.0.1", mode="timewait-server"), None)],
         ["--no-reuseaddr", "127.0.0.1:8080"], [listen("127.0.0.1", reuseaddr=False)], "time-wait", pid=False),
    Case("client TIME_WAIT on the port, without SO_REUSEADDR",
         [(listen("127.0.0.1", reuseaddr=False, mode="timewait-client"), None)],
         ["127.0.0.1:8080"], [listen("127.0.0.1")], "time-wait", pid=False),
    Case("outgoing connection from the port",
         [(listen("127.0.0.1", reuseaddr=False, mode="outgoing"), None)],
         ["127.0.0.1:8080"], [listen("127.0.0.1")], "bound"),
    Case("UDP without SO_REUSEADDR blocks", [(udp("0.0.0.0"), None)], ["udp:0.0.0.0:8080"],
         [udp("0.0.0.0")], "bound"),
    Case("UDP with SO_REUSEADDR on both shares", [(udp("0.0.0.0", reuseaddr=True), None)],
         ["udp:0.0.0.0:8080"], [udp("0.0.0.0", reuseaddr=True)], None),
    Case("UDP dual-stack [::] blocks 0.0.0.0", [(udp("::", v6only=False), None)], ["udp:0.0.0.0:8080"],
         [udp("0.0.0.0")], "bound"),
    Case("UDP SO_REUSEPORT same uid", [(udp("0.0.0.0", reuseport=True), None)],
         ["--no-reuseaddr", "--reuseport", "udp:0.0.0.0:8080"], [udp("0.0.0.0", reuseaddr=False, reuseport=True)],
         None),
    Case("UDP SO_REUSEPORT different uid", [(udp("0.0.0.0", reuseport=True), NOBODY)],
         ["--no-reuseaddr", "--reuseport", "udp:0.0.0.0:8080"], [udp("0.0.0.0", reuseaddr=False, reuseport=True)],
         "bound"),
    Case("TCP listener leaves UDP free", [(listen("0.0.0.0"), None)], ["udp:0.0.0.0:8080"], [udp("0.0.0.0")], None),
    Case("address on no interface", [], ["192.0.2.1:8080"], [listen("192.0.2.1")], "address-unavailable",
         pid=False),
    Case("address on no interface, with --freebind", [], ["--freebind", "192.0.2.1:8080"],
         [listen("192.0.2.1", freebind=True)], None),
    Case("address added to lo", [], ["192.0.2.1:8080"], [listen("192.0.2.1")], None,
         extra_setup=[["addr", "add", "192.0.2.1/32", "dev", "lo"]]),
]


def check_in(netns, args: list[str]) -> tuple[int, dict, str]:
    proc = netns.run([sys.executable, "-m", "bindguard", "check", "--json", "--wait", "0", *args])
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def kernel_allows(netns, daemon: list[dict]) -> bool:
    """The daemon's bind() (and listen()) for each of its sockets, done by the test itself."""
    answers = []
    for spec in daemon:
        out = netns.run([sys.executable, str(TRYBIND), json.dumps(spec)]).stdout.strip()
        answers.append(out)
    return all(a == "ok" for a in answers)


@pytest.mark.integration
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_verdict_agrees_with_kernel(netns, case: Case):
    for args in case.extra_setup:
        netns.ip(*args)
    procs = [netns.hold(spec, uid=uid) for spec, uid in case.holders]
    code, report, stderr = check_in(netns, case.request)
    allowed = kernel_allows(netns, case.daemon)
    assert (code == 0) == allowed, f"bindguard exit {code}, kernel {'allows' if allowed else 'refuses'}\n{stderr}"
    assert report["clear"] == allowed
    if case.kind is None:
        assert not [c for c in report["conflicts"] if c["blocking"]], report
        return
    first = report["conflicts"][0]
    assert first["kind"] == case.kind, report
    assert first["blocking"]
    assert first["remedy"]
    if case.pid:
        holder_pids = {p.pid for p in procs}
        assert first["pid"] in holder_pids, report
        assert first["command"] and "holder.py" in first["command"]
    expected_exit = {"time-wait": 75, "address-unavailable": 99}.get(case.kind, 98)
    assert code == expected_exit


@pytest.mark.integration
def test_request_that_collides_with_itself(netns):
    code, report, stderr = check_in(netns, ["0.0.0.0:8080", "[::]:8080"])
    assert code == 98
    (conflict,) = report["conflicts"]
    assert conflict["kind"] == "self-conflict"
    assert conflict["address"] == "[::]:8080" and conflict["other_address"] == "0.0.0.0:8080"
    # and with v6only the same pair is fine, as for the kernel
    code, report, _ = check_in(netns, ["--v6only", "0.0.0.0:8080", "[::]:8080"])
    assert code == 0, report


@pytest.mark.integration
def test_uid_of_holder_is_reported(netns):
    netns.hold(listen("0.0.0.0"), uid=NOBODY)
    code, report, _ = check_in(netns, ["0.0.0.0:8080"])
    assert code == 98
    (conflict,) = report["conflicts"]
    assert conflict["uid"] == NOBODY and conflict["user"] == "nobody"
    assert conflict["state"] == "LISTEN" and conflict["local_address"] == "0.0.0.0:8080"
    assert conflict["ppid"] and conflict["started_ago_s"] is not None


@pytest.mark.integration
def test_time_wait_reports_time_left(netns):
    netns.hold(listen("127.0.0.1", reuseaddr=False, mode="timewait-server"))
    code, report, stderr = check_in(netns, ["127.0.0.1:8080"])
    assert code == 75
    conflict = report["conflicts"][0]
    assert conflict["kind"] == "time-wait" and conflict["clears_by_itself"]
    assert 0 < conflict["expires_s"] <= 60
    assert conflict["state"] == "TIME_WAIT"


@pytest.mark.integration
def test_privileged_port_without_privilege_is_predicted(netns):
    netns.hold(listen("0.0.0.0", port=80))
    proc = netns.run([*AS_NOBODY, sys.executable, "-m", "bindguard", "check", "--json", "--wait", "0", "0.0.0.0:80"])
    report = json.loads(proc.stdout)
    assert proc.returncode == 98, proc.stderr
    assert report["conflicts"][0]["predicted"] and report["conflicts"][0]["kind"] == "listener"
    assert "prediction" in proc.stderr
    proc = netns.run([*AS_NOBODY, sys.executable, "-m", "bindguard", "check", "--json", "--wait", "0", "0.0.0.0:81"])
    assert proc.returncode == 0, proc.stderr
    assert "predict" in proc.stderr
