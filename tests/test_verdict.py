"""The verdict on recorded evidence: classification, attribution and prediction (pure logic)."""

import errno

from bindguard.model.endpoints import Bind, SocketOptions, parse_listen
from bindguard.model.facts import BOUND, Evidence, ProcessFact, SocketFact, SocketUnitFact, SystemdFacts
from bindguard.model.kinds import Action
from bindguard.verdict.policy import default_action
from bindguard.verdict.conflicts import certainly_blocks, conflicts_for, latent_socket_units

ROOT = 0


def bind(text, **opts):
    return Bind(parse_listen(text), SocketOptions(**opts))


def sock(text, state="LISTEN", inode=100, uid=0, v6only=False, expires_ms=None):
    return SocketFact(parse_listen(text), state, uid, inode, v6only=v6only, expires_ms=expires_ms)


def proc(pid, ppid=1, unit="web.service", name="webd"):
    return ProcessFact(pid, ppid, name, (name, "--serve"), f"/usr/bin/{name}", 0, "root", 1.0e9,
                       f"/system.slice/{unit}" if unit else "/", unit)


def evidence(*socks, holders=None, systemd=None):
    return Evidence(sockets=list(socks), holders=holders or {}, systemd=systemd)


def test_listener_with_its_holder():
    ev = evidence(sock("0.0.0.0:80"), sock("127.0.0.1:81"), holders={100: proc(42)})
    (c,) = conflicts_for(bind("80"), errno.EADDRINUSE, None, ev, ROOT)
    assert (c.kind, c.process.pid, c.unit, c.blocking, c.clears) == ("listener", 42, "web.service", True, False)


def test_time_wait_clears_and_live_holder_comes_first():
    ev = evidence(sock("127.0.0.1:80", "TIME_WAIT", inode=0, expires_ms=30000), sock("0.0.0.0:80", BOUND, inode=7),
                  holders={7: proc(9)})
    conflicts = conflicts_for(bind("0.0.0.0:80"), errno.EADDRINUSE, None, ev, ROOT)
    assert [c.kind for c in conflicts] == ["bound", "time-wait"]
    assert conflicts[1].clears and default_action(conflicts[1]) == Action.WAIT
    assert default_action(conflicts[0]) == Action.REFUSE


def test_unexplained_in_use_still_refuses():
    (c,) = conflicts_for(bind("80"), errno.EADDRINUSE, None, evidence(), ROOT)
    assert c.kind == "bound" and c.blocking and "no socket on this port is visible" in c.evidence[0]


def test_self_conflict():
    other = bind("0.0.0.0:80")
    (c,) = conflicts_for(bind("80"), errno.EADDRINUSE, other, evidence(), ROOT)
    assert c.kind == "self-conflict" and c.other_bind == other


def test_address_unavailable_and_tentative():
    (c,) = conflicts_for(bind("[2001:db8::1]:80"), errno.EADDRNOTAVAIL, None, evidence(), ROOT)
    assert c.kind == "address-unavailable" and not c.clears
    ev = evidence()
    ev.tentative = frozenset({parse_listen("[2001:db8::1]:80").host})
    (c,) = conflicts_for(bind("[2001:db8::1]:80"), errno.EADDRNOTAVAIL, None, ev, ROOT)
    assert c.clears


def test_manager_socket_is_a_socket_unit_and_own_one_says_so():
    units = [SocketUnitFact("web.socket", "active", parse_listen("[::]:80"), False, ("web.service",))]
    sd = SystemdFacts(manager_pid=1, guarded_unit="web.service", socket_units=units)
    ev = evidence(sock("[::]:80"), holders={100: proc(1, ppid=0, unit="init.scope", name="systemd")}, systemd=sd)
    (c,) = conflicts_for(bind("80"), errno.EADDRINUSE, None, ev, ROOT)
    assert (c.kind, c.socket_unit, c.own_socket_unit) == ("socket-unit", "web.socket", True)
    sd.guarded_unit = "api.service"
    (c,) = conflicts_for(bind("80"), errno.EADDRINUSE, None, ev, ROOT)
    assert not c.own_socket_unit


def test_own_instance_and_orphan():
    """Only the manager's word makes these: the unit it places a PID in, and that unit's state."""
    sd = SystemdFacts(manager_pid=1, manager_proof="PID 1 is systemd", guarded_unit="web.service",
                      guarded_instance_running=False, guarded_state="activating (start-pre)",
                      unit_states={"old.service": "inactive", "db.service": "active", "session-3.scope": "active"},
                      unit_of_pid={50: "web.service"})
    ev = evidence(sock("0.0.0.0:80"), holders={100: proc(50, ppid=1, unit="web.service")}, systemd=sd)
    c = conflicts_for(bind("80"), errno.EADDRINUSE, None, ev, ROOT)[0]
    assert (c.kind, c.unit, c.unit_status) == ("own-instance", "web.service", "manager")
    sd.guarded_instance_running, sd.guarded_state = True, "active (running)"  # `check --unit` by hand
    c = conflicts_for(bind("80"), errno.EADDRINUSE, None, ev, ROOT)[0]
    assert c.kind == "listener" and "its running instance" in c.evidence[0]

    sd.unit_of_pid = {50: "old.service"}
    ev.holders = {100: proc(50, ppid=1, unit="old.service")}
    c = conflicts_for(bind("80"), errno.EADDRINUSE, None, ev, ROOT)[0]
    assert c.kind == "orphan" and any("inactive" in e for e in c.evidence)
    sd.unit_of_pid = {50: None}
    c = conflicts_for(bind("80"), errno.EADDRINUSE, None, ev, ROOT)[0]
    assert (c.kind, c.unit, c.unit_status) == ("orphan", None, "no-unit")
    sd.unit_of_pid = {50: "session-3.scope"}  # `sudo nginx` in a login session, adopted by PID 1
    ev.holders = {100: proc(50, ppid=1, unit="session-3.scope")}
    assert conflicts_for(bind("80"), errno.EADDRINUSE, None, ev, ROOT)[0].kind == "listener"
    sd.unit_of_pid = {50: "db.service"}
    ev.holders = {100: proc(50, ppid=1, unit="db.service")}  # a running service's main process
    assert conflicts_for(bind("80"), errno.EADDRINUSE, None, ev, ROOT)[0].kind == "listener"
    sd.unit_of_pid = {50: "old.service"}
    ev.holders = {100: proc(50, ppid=49, unit="old.service")}  # not re-parented: PPID alone decides nothing
    assert conflicts_for(bind("80"), errno.EADDRINUSE, None, ev, ROOT)[0].kind == "listener"


def test_without_the_managers_word_nothing_is_own_instance_or_orphan():
    """No bus: a cgroup path's unit name is reported as such, never taken for proof; no proven
    manager: PPID 1 is a fact, not a re-parenting."""
    sd = SystemdFacts(manager_pid=1, manager_proof="PID 1 is systemd", guarded_unit="web.service")
    ev = evidence(sock("0.0.0.0:80"), holders={100: proc(50, ppid=1, unit="web.service")}, systemd=sd)
    c = conflicts_for(bind("80"), errno.EADDRINUSE, None, ev, ROOT)[0]
    assert (c.kind, c.unit, c.unit_status) == ("listener", "web.service", "cgroup")
    ev.holders = {100: proc(50, ppid=1, unit=None)}
    c = conflicts_for(bind("80"), errno.EADDRINUSE, None, ev, ROOT)[0]
    assert (c.kind, c.unit, c.unit_status) == ("listener", None, "unknown")
    sd.manager_pid, sd.unit_of_pid = None, {50: None}
    assert conflicts_for(bind("80"), errno.EADDRINUSE, None, ev, ROOT)[0].kind == "listener"


def test_latent_socket_units_warn_but_not_own():
    units = [
        SocketUnitFact("other.socket", "inactive", parse_listen("0.0.0.0:80"), False, ("other.service",)),
        SocketUnitFact("web.socket", "inactive", parse_listen("[::]:80"), False, ("web.service",)),
        SocketUnitFact("far.socket", "inactive", parse_listen("127.0.0.1:81"), False, ("far.service",)),
        SocketUnitFact("v6.socket", "inactive", parse_listen("[::]:80"), True, ("v6.service",)),
    ]
    ev = evidence(systemd=SystemdFacts(manager_pid=1, guarded_unit="web.service", socket_units=units))
    found = latent_socket_units([bind("127.0.0.1:80")], ev)
    assert [c.socket_unit for c in found] == ["other.socket"]
    assert not found[0].blocking and default_action(found[0]) == Action.WARN


def test_prediction_rules():
    listener = sock("0.0.0.0:80")
    assert certainly_blocks(bind("0.0.0.0:80"), listener, ROOT) is True
    assert certainly_blocks(bind("0.0.0.0:80", reuseport=True), listener, ROOT) is None  # its flag is unseen
    assert certainly_blocks(bind("0.0.0.0:80", reuseport=True), listener, 1000) is True  # other uid
    assert certainly_blocks(bind("[::]:80", v6only=True), listener, ROOT) is False
    tw = sock("127.0.0.1:80", "TIME_WAIT", inode=0)
    assert certainly_blocks(bind("0.0.0.0:80", reuseaddr=False), tw, ROOT) is True
    assert certainly_blocks(bind("0.0.0.0:80"), tw, ROOT) is None
    udp = sock("udp:0.0.0.0:53", BOUND)
    assert certainly_blocks(bind("udp:0.0.0.0:53", reuseaddr=False), udp, ROOT) is True
    assert certainly_blocks(bind("udp:0.0.0.0:53"), udp, ROOT) is None


def test_predicted_conflicts_block_only_when_certain():
    ev = evidence(sock("0.0.0.0:80"), sock("127.0.0.1:80", "TIME_WAIT", inode=0))
    conflicts = conflicts_for(bind("0.0.0.0:80"), errno.EACCES, None, ev, ROOT)
    assert [(c.kind, c.blocking, c.predicted) for c in conflicts] == [
        ("listener", True, True), ("time-wait", False, True)]


def test_no_ipv6_in_the_namespace_is_address_unavailable():
    (c,) = conflicts_for(bind("[::]:80"), errno.EAFNOSUPPORT, None, evidence(), ROOT)
    assert c.kind == "address-unavailable" and c.blocking and "IPv6 is not available" in c.evidence[0]


def test_a_holder_already_leaving_clears_by_itself_and_is_waited_for():
    """Issue 14.4: a holder whose unit the manager says is deactivating, or whose process the
    kernel is ending, keeps its kind (listener) and clears by itself; the same holder in a unit
    that is active, or known only from its cgroup path, still refuses."""
    from bindguard.model.record import replace

    def conflict(holder, states, answered=True):
        sd = SystemdFacts(manager_pid=1, unit_of_pid={holder.pid: holder.unit} if answered else {},
                          unit_states=states)
        (c,) = conflicts_for(bind("0.0.0.0:80"), errno.EADDRINUSE, None,
                             evidence(sock("0.0.0.0:80"), holders={100: holder}, systemd=sd), ROOT)
        return c

    stopping = conflict(proc(42, ppid=1, unit="old.service"), {"old.service": "deactivating"})
    assert (stopping.kind, stopping.clears, stopping.leaving) == ("listener", True, "unit-deactivating")
    assert default_action(stopping) == Action.WAIT and "old.service is deactivating" in stopping.evidence[-1]
    exiting = conflict(replace(proc(43, ppid=1, unit="old.service"), exiting=True), {"old.service": "active"})
    assert (exiting.kind, exiting.clears, exiting.leaving) == ("listener", True, "process-exiting")
    for c in (conflict(proc(44, ppid=1, unit="old.service"), {"old.service": "active"}),
              conflict(proc(45, ppid=1, unit="old.service"), {"old.service": "deactivating"}, answered=False)):
        assert (c.clears, c.leaving, default_action(c)) == (False, "", Action.REFUSE)
