"""From the kernel's answer and the evidence to conflicts, each with a kind. Pure: no I/O.

The trial bind decides whether an address is blocked; the evidence says by what. Only where no
probe was possible (a privileged port without the privilege) are the kernel's rules applied to
the evidence, and such conflicts are marked as predictions.
"""

from __future__ import annotations

import errno
import os

from bindguard.model.endpoints import TCP, Bind, addresses_overlap
from bindguard.model.facts import (
    BindPrivilege,
    Evidence,
    ProcessFact,
    SocketFact,
    SocketUnitFact,
    holder_unit,
    unit_active,
)
from bindguard.model.kinds import ConflictKind, Leaving, UnitStatus
from bindguard.model.record import Record, replace

TYPE_CHECKING = False  # typing's own costs an import on the guard's path
if TYPE_CHECKING:  # only a field's type: the guard loads no NAT code unless asked
    from bindguard.model.nat import NatRule

# States of a socket no process holds any more; the kernel ends them by a timer.
CLOSING_STATES = {"TIME_WAIT", "FIN_WAIT1", "FIN_WAIT2", "CLOSING", "LAST_ACK"}


class Conflict(Record, frozen=True):
    """One reason a requested socket cannot (or, predicted, would not) be bound, built once with its
    kind decided; what the guard does about it is a verdict.policy.Decision."""

    bind: Bind  # the requested socket this is about
    kind: ConflictKind
    blocking: bool = True  # the kernel refuses (or, predicted, would refuse) this bind
    clears: bool = False  # goes away by itself (TIME_WAIT, an address in DAD)
    socket: SocketFact | None = None
    process: ProcessFact | None = None
    unit: str | None = None  # the unit to act on: the holder's, or the socket unit whose socket it is
    unit_status: UnitStatus | None = None  # how `unit` is known; None without a holder process
    socket_unit: str | None = None
    own_socket_unit: bool = False  # the socket unit activates the guarded service itself
    other_bind: Bind | None = None  # the request's own socket in the way (self-conflict)
    predicted: bool = False
    error: str = ""  # the kernel's errno name for this bind, when probed
    evidence: tuple[str, ...] = ()
    privilege: BindPrivilege | None = None  # permission-denied: what was proven about the daemon
    leaving: str = ""  # a Leaving: the holder is on its way out (clears)
    nat: NatRule | None = None  # nat-shadowed: the rule that takes the traffic elsewhere


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


def _kind_of_socket(sock: SocketFact | None) -> tuple[ConflictKind, bool]:
    if sock is None:
        return ConflictKind.BOUND, False
    if sock.state == "LISTEN":
        return ConflictKind.LISTENER, False
    if sock.inode == 0 and sock.state in CLOSING_STATES:
        return ConflictKind.TIME_WAIT, True
    return ConflictKind.BOUND, False


def unit_phrase(unit: str | None, status: str | None) -> str:
    """How the report says where a holder belongs, keeping "in no unit" apart from "not known"."""
    if status == UnitStatus.BY_MANAGER:
        return f"unit {unit}"
    if status == UnitStatus.BY_CGROUP:
        return f"unit {unit} (named by its cgroup path only; no bus confirmed it)"
    if status == UnitStatus.NO_UNIT:
        return "in no unit"
    return "unit unknown (no answer from the manager)" if status == UnitStatus.UNKNOWN else ""


class Attribution(Record, frozen=True):
    """Who holds a socket, and what the evidence proves about it (the Conflict's holder fields)."""

    process: ProcessFact | None = None
    kind: ConflictKind | None = None  # socket-unit, own-instance or orphan when proven; None: the socket's kind
    unit: str | None = None
    unit_status: UnitStatus | None = None
    socket_unit: str | None = None
    own_socket_unit: bool = False
    evidence: tuple[str, ...] = ()
    leaving: str = ""  # a Leaving, with its fact in evidence


def attribution(sock: SocketFact, evidence: Evidence) -> Attribution:
    """Which process holds sock, which unit it is in, and what it is, claiming only what is proven;
    and whether it is already leaving: the kernel is ending its process, or the manager says its
    unit is deactivating (a stop or restart running its ExecStop=, a handover)."""
    holder = _attribution(sock, evidence)
    process, sd = holder.process, evidence.systemd
    if process is None:
        return holder
    if holder.kind == ConflictKind.SOCKET_UNIT:
        stopping = sd is not None and any(u.name == holder.socket_unit and u.active_state == "deactivating"
                                          for u in sd.socket_units)
        return replace(holder, leaving=Leaving.UNIT_DEACTIVATING, evidence=(
            *holder.evidence, f"the manager says {holder.socket_unit} is deactivating: it is stopping (its "
                              "ExecStopPre= still running), and the manager closes its sockets when that ends")) \
            if stopping else holder
    if process.exiting:
        return replace(holder, leaving=Leaving.PROCESS_EXITING,
                       evidence=(*holder.evidence, f"PID {process.pid} is exiting (/proc/{process.pid}/stat)"))
    state = sd.unit_states.get(holder.unit) if sd is not None and holder.unit else None
    if holder.unit_status == UnitStatus.BY_MANAGER and state == "deactivating":
        return replace(holder, leaving=Leaving.UNIT_DEACTIVATING, evidence=(
            *holder.evidence, f"the manager says {holder.unit} is deactivating: it is stopping (its ExecStop= or "
                              "TimeoutStopSec= still running), and its processes leave when it has stopped"))
    return holder


def _attribution(sock: SocketFact, evidence: Evidence) -> Attribution:
    """attribution() but for the holder's leaving.

    The manager's PID, a process's unit and a unit's state count only as the manager or /proc
    proved them (SystemdFacts). A cgroup path's name proves nothing (another user's manager has
    its own nginx.service), and neither does PPID 1 where PID 1 is no service manager.
    """
    process = evidence.holders.get(sock.inode) if sock.inode else None
    if process is None:
        return Attribution()
    sd = evidence.systemd
    manager = sd.manager_pid if sd is not None else None
    if sd is not None and manager is not None and process.pid == manager:
        owner = _socket_unit_for(sock, sd.socket_units, active=True)
        held = f"held by the service manager itself (PID {process.pid}: {sd.manager_proof})"
        if owner is None:
            return Attribution(process, ConflictKind.SOCKET_UNIT, unit_status=UnitStatus.UNKNOWN, evidence=(held,))
        return Attribution(process, ConflictKind.SOCKET_UNIT, owner.name, UnitStatus.BY_MANAGER, owner.name,
                           sd.guarded_unit is not None and sd.guarded_unit in owner.triggers,
                           (f"{owner.name} listens on {owner.endpoint.address()}", held))
    unit, status = holder_unit(process, sd.unit_of_pid if sd is not None else {})
    if sd is not None and status == UnitStatus.BY_MANAGER and unit == sd.guarded_unit:
        if sd.guarded_instance_running is False:
            return Attribution(process, ConflictKind.OWN_INSTANCE, unit, status, evidence=(
                f"the manager places PID {process.pid} in {unit}, whose cgroup is {process.cgroup}",
                f"{unit} is {sd.guarded_state}: it runs no instance, so this one is left from an earlier run"))
        if sd.guarded_instance_running:
            return Attribution(process, None, unit, status, evidence=(
                f"{unit} is {sd.guarded_state}: this is its running instance",))
    if sd is not None and manager is not None and process.ppid == manager \
            and status in (UnitStatus.BY_MANAGER, UnitStatus.NO_UNIT):
        parent = f"its parent is the service manager (PPID {process.ppid}: {sd.manager_proof})"
        if status == UnitStatus.NO_UNIT:
            return Attribution(process, ConflictKind.ORPHAN, None, status, evidence=(
                parent, f"the manager places it in no unit (cgroup {process.cgroup or '?'})"))
        state = sd.unit_states.get(unit) if unit is not None else None
        if state is not None and not unit_active(state):
            return Attribution(process, ConflictKind.ORPHAN, unit, status,
                               evidence=(parent, f"its unit {unit} is {state}"))
    return Attribution(process, None, unit, status)


def is_guard(process: ProcessFact) -> bool:
    """Whether a process is a bindguard run: `bindguard` among its first words (`/usr/bin/bindguard
    check ...`, `python3 -I -m bindguard check ...`). A process may call itself that to look like
    one: that buys it only the bounded re-probing (bindguard.action.guard), never a pass."""
    return any(os.path.basename(w) == "bindguard" for w in process.cmdline[:4])


def _holder_conflict(bind: Bind, sock: SocketFact, evidence: Evidence, *, error: str = "",
                     blocking: bool = True, predicted: bool = False, notes: tuple[str, ...] = ()) -> Conflict:
    """The conflict sock makes for bind, with its holder: the kind decided before it is built."""
    kind, clears = _kind_of_socket(sock)
    holder = attribution(sock, evidence)
    if holder.process is not None and holder.process.pid != os.getpid() and is_guard(holder.process):
        kind = ConflictKind.GUARD_TRIAL  # another guard's trial socket, whatever its state and unit: never a daemon
        holder = replace(holder, leaving="")
    else:
        kind = holder.kind or kind
    clears = clears or bool(holder.leaving)
    return Conflict(bind, kind, blocking=blocking, clears=clears, socket=sock,
                    process=holder.process, unit=holder.unit, unit_status=holder.unit_status,
                    socket_unit=holder.socket_unit, own_socket_unit=holder.own_socket_unit,
                    predicted=predicted, error=error, evidence=(*notes, *holder.evidence), leaving=holder.leaving)


# A socket unit's sockets are open in these states (systemd's socket_set_state keeps them through
# ExecStopPre=: deactivating), and closed in every other.
SOCKET_UNIT_LISTENING_STATES = ("active", "reloading", "deactivating")


def _socket_unit_for(sock: SocketFact, units: list[SocketUnitFact], active: bool) -> SocketUnitFact | None:
    for unit in units:
        if (unit.active_state in SOCKET_UNIT_LISTENING_STATES) == active and unit.endpoint.proto == sock.local.proto \
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
            # its own sockets are what a socket unit's guard checks, not yet bound
            if unit.active_state in SOCKET_UNIT_LISTENING_STATES or sd.guarded_unit in unit.triggers \
                    or unit.name == sd.guarded_unit:
                continue
            if addresses_overlap(bind.endpoint, bind.v6only, unit.endpoint, unit.v6only):
                conflicts.append(
                    Conflict(
                        bind,
                        ConflictKind.LATENT_SOCKET_UNIT,
                        blocking=False,
                        socket_unit=unit.name,
                        evidence=(f"{unit.name} ({unit.active_state}) declares {unit.endpoint}",),
                    )
                )
    return conflicts


def permission_denied(bind: Bind, error: int, evidence: Evidence) -> list[Conflict]:
    """The daemon's own EACCES, where the guard proved that its process lacks CAP_NET_BIND_SERVICE
    (evidence.privilege) and the port is below net.ipv4.ip_unprivileged_port_start. From the
    guard's own EACCES with the daemon's credentials it is the kernel's answer; from the unit's
    settings (the guard could bind) it is a prediction."""
    privilege = evidence.privilege
    if privilege is None or not privilege.denied or bind.endpoint.port >= privilege.unprivileged_port_start \
            or error == errno.EAFNOSUPPORT:
        return []
    by_kernel = error == errno.EACCES
    return [Conflict(bind, ConflictKind.PERMISSION_DENIED, predicted=not by_kernel, error="EACCES" if by_kernel else "",
                     evidence=privilege.facts, privilege=privilege)]


def conflicts_for(bind: Bind, error: int, collides_with: Bind | None, evidence: Evidence,
                  daemon_uid: int) -> list[Conflict]:
    """The conflicts that explain one bind's outcome in the trial (error 0: none)."""
    if error == 0:
        return []
    name = errno.errorcode.get(error, str(error))
    if collides_with is not None:
        return [Conflict(bind, ConflictKind.SELF_CONFLICT, other_bind=collides_with, error=name)]
    if error == errno.EAFNOSUPPORT:
        return [Conflict(bind, ConflictKind.ADDRESS_UNAVAILABLE, error=name,
                         evidence=("IPv6 is not available in this network namespace",))]
    if error in (errno.EADDRNOTAVAIL, errno.ENODEV):
        tentative = bind.endpoint.host in evidence.tentative
        return [Conflict(bind, ConflictKind.ADDRESS_UNAVAILABLE, clears=tentative, error=name,
                         evidence=("the address is still in duplicate address detection",) if tentative else ())]
    if error == errno.EACCES:
        return _predicted(bind, evidence, daemon_uid)
    if error != errno.EADDRINUSE:
        return [Conflict(bind, ConflictKind.BOUND, error=name, evidence=(f"the kernel answered {name}",))]
    conflicts = []
    for sock in evidence.sockets:
        if could_block(bind, sock):
            conflicts.append(_holder_conflict(bind, sock, evidence, error=name))
    if not conflicts:
        conflicts.append(Conflict(bind, ConflictKind.BOUND, error=name, evidence=(
            "no socket on this port is visible: a bound, never-listened socket on a kernel older "
            "than 6.8, or a socket this user may not see",)))
    elif any(not c.clears for c in conflicts):
        # A live holder is in the way; what clears by itself does not change the verdict.
        conflicts = [c for c in conflicts if not c.clears] + [c for c in conflicts if c.clears]
    return conflicts


def kernel_answer_alone(bind: Bind, error: int, collides_with: Bind | None, daemon_uid: int) -> list[Conflict]:
    """The conflicts one bind's outcome makes where nothing explains it (the evidence could not be
    gathered): the kind its errno gives (EADDRINUSE: `bound`, EADDRNOTAVAIL: `address-unavailable`),
    without evidence, and none that clears by itself (without the sockets, TIME_WAIT cannot be told
    from a holder)."""
    return [replace(c, evidence=(), clears=False)
            for c in conflicts_for(bind, error, collides_with, Evidence(), daemon_uid)]


def _predicted(bind: Bind, evidence: Evidence, daemon_uid: int) -> list[Conflict]:
    conflicts = []
    for sock in evidence.sockets:
        certain = certainly_blocks(bind, sock, daemon_uid)
        if certain is False:
            continue
        unsure = ("it depends on that socket's SO_REUSEADDR/SO_REUSEPORT, which no tool shows",)
        conflicts.append(_holder_conflict(bind, sock, evidence, blocking=bool(certain), predicted=True,
                                          notes=unsure if certain is None else ()))
    return conflicts
