"""From the kernel's answer and the evidence to conflicts, each with a kind. Pure: no I/O.

The trial bind decides whether an address is blocked; the evidence says by what. Only where no
probe was possible (a privileged port without the privilege) are the kernel's rules applied to
the evidence, and such conflicts are marked as predictions.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from bindguard.endpoints import TCP, Bind, addresses_overlap
from bindguard.facts import Evidence, ProcessFact, SocketFact, SocketUnitFact

LISTENER = "listener"
BOUND_KIND = "bound"
TIME_WAIT = "time-wait"
ADDRESS_UNAVAILABLE = "address-unavailable"
SELF_CONFLICT = "self-conflict"
SOCKET_UNIT = "socket-unit"
LATENT_SOCKET_UNIT = "latent-socket-unit"
OWN_INSTANCE = "own-instance"
ORPHAN = "orphan"

KINDS = (
    LISTENER,
    BOUND_KIND,
    TIME_WAIT,
    ADDRESS_UNAVAILABLE,
    SELF_CONFLICT,
    SOCKET_UNIT,
    LATENT_SOCKET_UNIT,
    OWN_INSTANCE,
    ORPHAN,
)

# What the guard may do about a conflict (a unit's YAML `policy` names them per kind).
REFUSE, WAIT, WARN, IGNORE = "refuse", "wait", "warn", "ignore"
ACTIONS = (REFUSE, WAIT, WARN, IGNORE)

# States of a socket no process holds any more; the kernel ends them by a timer.
CLOSING_STATES = {"TIME_WAIT", "FIN_WAIT1", "FIN_WAIT2", "CLOSING", "LAST_ACK"}
ACTIVE_UNIT_STATES = {"active", "activating", "reloading", "deactivating"}


@dataclass
class Conflict:
    bind: Bind  # the requested socket this is about
    kind: str
    blocking: bool = True  # the kernel refuses (or, predicted, would refuse) this bind
    clears: bool = False  # goes away by itself (TIME_WAIT, an address in DAD)
    socket: SocketFact | None = None
    process: ProcessFact | None = None
    unit: str | None = None
    socket_unit: str | None = None
    own_socket_unit: bool = False  # the socket unit activates the guarded service itself
    other_bind: Bind | None = None  # the request's own socket in the way (self-conflict)
    predicted: bool = False
    error: str = ""  # the kernel's errno name for this bind, when probed
    evidence: list[str] = field(default_factory=list)


def could_block(bind: Bind, sock: SocketFact) -> bool:
    """Whether sock is among the sockets that can make bind() fail (flags it may have unseen)."""
    if sock.local.proto != bind.endpoint.proto or sock.local.port != bind.endpoint.port:
        return False
    v6only = sock.v6only if sock.inode else None  # unknown for TIME_WAIT: take the wider case
    return addresses_overlap(bind.endpoint, bind.v6only, sock.local, v6only)


def certainly_blocks(bind: Bind, sock: SocketFact, daemon_uid: int) -> bool | None:
    """The kernel's rule for one existing socket, where flags the evidence cannot show matter.

    True: bind() fails whatever the unseen flags are. False: it cannot fail because of this
    socket. None: it depends on the existing socket's SO_REUSEADDR/SO_REUSEPORT, not observable.
    """
    if not could_block(bind, sock):
        return False
    opts = bind.options
    if bind.endpoint.proto == TCP:
        if sock.state == "LISTEN":
            return None if opts.reuseport and sock.uid == daemon_uid else True
        if sock.inode == 0:  # TIME_WAIT and friends keep the flags of the socket they came from
            return None if opts.reuseaddr or opts.reuseport else True
        return None if opts.reuseaddr or (opts.reuseport and sock.uid == daemon_uid) else True
    if opts.reuseaddr or (opts.reuseport and sock.uid == daemon_uid):
        return None
    return True


def _kind_of_socket(sock: SocketFact | None) -> tuple[str, bool]:
    if sock is None:
        return BOUND_KIND, False
    if sock.state == "LISTEN":
        return LISTENER, False
    if sock.inode == 0 and sock.state in CLOSING_STATES:
        return TIME_WAIT, True
    return BOUND_KIND, False


def _attribute(conflict: Conflict, evidence: Evidence) -> None:
    """Refine a conflict with its holder: which process, which unit, and what systemd says."""
    sock = conflict.socket
    if sock is None or not sock.inode:
        return
    process = evidence.holders.get(sock.inode)
    conflict.process = process
    if process is None:
        return
    sd = evidence.systemd
    conflict.unit = (sd.unit_of_pid.get(process.pid) if sd else None) or process.unit
    if sd is None:
        return
    if process.pid == sd.manager_pid:
        conflict.kind = SOCKET_UNIT
        owner = _socket_unit_for(sock, sd.socket_units, active=True)
        if owner is not None:
            conflict.socket_unit = owner.name
            conflict.own_socket_unit = sd.guarded_unit in owner.triggers
            conflict.evidence.append(f"{owner.name} listens on {owner.endpoint.address()}")
        conflict.evidence.append(f"held by the service manager itself (PID {process.pid})")
        return
    if sd.guarded_unit and conflict.unit == sd.guarded_unit:
        conflict.kind = OWN_INSTANCE
        conflict.evidence.append(f"PID {process.pid} is in {sd.guarded_unit}'s own cgroup ({process.cgroup})")
        return
    # On a systemd host every service's main process has the manager as its parent: PPID alone
    # proves nothing. An orphan is re-parented AND in no unit that is running.
    unit_state = sd.unit_states.get(conflict.unit or "")
    if process.ppid == sd.manager_pid and (
        conflict.unit is None
        or conflict.unit.endswith(".scope")
        or (unit_state is not None and unit_state not in ACTIVE_UNIT_STATES)
    ):
        conflict.kind = ORPHAN
        conflict.evidence.append(f"its parent is the service manager (PPID {process.ppid})")
        if conflict.unit is None:
            conflict.evidence.append("it belongs to no unit")
        elif conflict.unit.endswith(".scope"):
            conflict.evidence.append(f"it sits in {conflict.unit}, a scope, not a service")
        else:
            conflict.evidence.append(f"its unit {conflict.unit} is {unit_state}")


def _socket_unit_for(sock: SocketFact, units: list[SocketUnitFact], active: bool) -> SocketUnitFact | None:
    for unit in units:
        if (unit.active_state == "active") == active and unit.endpoint.proto == sock.local.proto \
                and unit.endpoint.port == sock.local.port and unit.endpoint.host == sock.local.host:
            return unit
    return None


def latent_socket_units(binds: list[Bind], evidence: Evidence) -> list[Conflict]:
    """Socket units not listening now whose addresses will collide when they start."""
    sd = evidence.systemd
    if sd is None:
        return []
    conflicts = []
    for bind in binds:
        for unit in sd.socket_units:
            if unit.active_state == "active" or sd.guarded_unit in unit.triggers:
                continue
            if addresses_overlap(bind.endpoint, bind.v6only, unit.endpoint, unit.v6only):
                conflicts.append(
                    Conflict(
                        bind,
                        LATENT_SOCKET_UNIT,
                        blocking=False,
                        socket_unit=unit.name,
                        evidence=[f"{unit.name} ({unit.active_state}) declares {unit.endpoint}"],
                    )
                )
    return conflicts


def conflicts_for(bind: Bind, error: int, collides_with: Bind | None, evidence: Evidence,
                  daemon_uid: int) -> list[Conflict]:
    """The conflicts that explain one bind's outcome in the trial (error 0: none)."""
    if error == 0:
        return []
    name = errno.errorcode.get(error, str(error))
    if collides_with is not None:
        return [Conflict(bind, SELF_CONFLICT, other_bind=collides_with, error=name)]
    if error == errno.EAFNOSUPPORT:
        return [Conflict(bind, ADDRESS_UNAVAILABLE, error=name,
                         evidence=["IPv6 is not available in this network namespace"])]
    if error in (errno.EADDRNOTAVAIL, errno.ENODEV):
        tentative = bind.endpoint.host in evidence.tentative
        return [Conflict(bind, ADDRESS_UNAVAILABLE, clears=tentative, error=name,
                         evidence=["the address is still in duplicate address detection"] if tentative else [])]
    if error == errno.EACCES:
        return _predicted(bind, evidence, daemon_uid)
    if error != errno.EADDRINUSE:
        return [Conflict(bind, BOUND_KIND, error=name, evidence=[f"the kernel answered {name}"])]
    conflicts = []
    for sock in evidence.sockets:
        if could_block(bind, sock):
            kind, clears = _kind_of_socket(sock)
            conflict = Conflict(bind, kind, clears=clears, socket=sock, error=name)
            _attribute(conflict, evidence)
            conflicts.append(conflict)
    if not conflicts:
        conflicts.append(Conflict(bind, BOUND_KIND, error=name, evidence=[
            "no socket on this port is visible: a bound, never-listened socket on a kernel older "
            "than 6.8, or a socket this user may not see"]))
    elif any(not c.clears for c in conflicts):
        # A live holder is in the way; what clears by itself does not change the verdict.
        conflicts = [c for c in conflicts if not c.clears] + [c for c in conflicts if c.clears]
    return conflicts


def _predicted(bind: Bind, evidence: Evidence, daemon_uid: int) -> list[Conflict]:
    conflicts = []
    for sock in evidence.sockets:
        certain = certainly_blocks(bind, sock, daemon_uid)
        if certain is False:
            continue
        kind, clears = _kind_of_socket(sock)
        conflict = Conflict(bind, kind, blocking=bool(certain), clears=clears, socket=sock, predicted=True)
        if certain is None:
            conflict.evidence.append("it depends on that socket's SO_REUSEADDR/SO_REUSEPORT, which no tool shows")
        _attribute(conflict, evidence)
        conflicts.append(conflict)
    return conflicts
