"""verify's judgement: whether each address has exactly one intended listener (or a SO_REUSEPORT
group of them) owned by the unit's own processes, on the intended local address, with nothing else
bound to it. Pure: from the sockets on the port, their holders' facts and the manager's answers.

  not-listening   nothing listens on the address: the daemon never reached listen()
  wrong-address   the unit listens on this port, but on another address (or on [::] with
                  another IPV6_V6ONLY than stated)
  shared          a process outside the unit is bound to the address too
  foreign-owner   a process outside the unit owns the address
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from bindguard.model.endpoints import Bind, addresses_overlap
from bindguard.model.errors import ExitCode
from bindguard.model.facts import ProcessFact, SocketFact, cgroup_within, holder_unit
from bindguard.model.kinds import UnitStatus, VerifyKind
from bindguard.model.text import command_unit, unit_word
from bindguard.verdict.conflicts import unit_phrase
from bindguard.verdict.remedies import find_holder, inspect_process

# What an optional address may be: the unit does not hold it (a daemon that starts without it).
NOT_HELD = (VerifyKind.NOT_LISTENING, VerifyKind.WRONG_ADDRESS, VerifyKind.FOREIGN_OWNER)


@dataclass(frozen=True)
class Holder:
    socket: SocketFact
    processes: Sequence[ProcessFact]
    in_unit: bool  # one of the processes is proven to be in the verified unit (see in_unit)
    units: Sequence[tuple[str | None, UnitStatus]] = ()  # each process's facts.holder_unit


@dataclass(frozen=True)
class Check:
    bind: Bind
    kind: VerifyKind | None = None  # None: served as intended
    holders: tuple[Holder, ...] = ()  # every listener overlapping the address
    evidence: tuple[str, ...] = ()
    fix: str = ""
    optional: bool = False  # the daemon starts without this address

    @property
    def ok(self) -> bool:
        return self.kind is None or self.optional and self.kind in NOT_HELD


def exit_code(checks: Iterable[Check]) -> ExitCode:
    kinds = {c.kind for c in checks if not c.ok}
    if kinds & {VerifyKind.SHARED, VerifyKind.FOREIGN_OWNER}:
        return ExitCode.INUSE
    return ExitCode.ATTENTION if kinds else ExitCode.CLEAR


def in_unit(unit: str, process: ProcessFact, named: tuple[str | None, UnitStatus], own_cgroup: str | None) -> bool:
    """Whether process belongs to unit: the manager's word where it answered; else the kernel's,
    where verify runs in the unit itself (ExecStartPost=: the same cgroup); else only the name its
    cgroup path bears, which the evidence marks as unconfirmed."""
    name, status = named
    if status in (UnitStatus.BY_MANAGER, UnitStatus.NO_UNIT) or own_cgroup is None:
        return name == unit
    return cgroup_within(process.cgroup, own_cgroup)


def holders(sockets: Iterable[SocketFact], processes: Mapping[int, Sequence[ProcessFact]],
            answered: Mapping[int, str | None], unit: str, own_cgroup: str | None) -> dict[int, Holder]:
    """Each socket's Holder (by inode): its processes, their units and whether one is the unit's own."""
    result = {}
    for s in sockets:
        held = tuple(processes.get(s.inode, ()))
        units = tuple(holder_unit(p, answered) for p in held)
        result[s.inode] = Holder(s, held, any(in_unit(unit, p, named, own_cgroup)
                                              for p, named in zip(held, units, strict=True)), units)
    return result


def exact(bind: Bind, sock: SocketFact) -> bool:
    ep, local = bind.endpoint, sock.local
    return (local.proto, local.host, local.port) == (ep.proto, ep.host, ep.port)


def _who(holder: Holder) -> str:
    if not holder.processes:
        return f"{holder.socket.local} {holder.socket.state} (holder not found, uid {holder.socket.uid})"
    p = holder.processes[0]
    unit, status = holder.units[0] if holder.units else holder_unit(p, {})
    more = f" and {len(holder.processes) - 1} more" if len(holder.processes) > 1 else ""
    return (f"{holder.socket.local} {holder.socket.state}: PID {p.pid} ({p.command}){more}, "
            f"{unit_phrase(unit, status)}, cgroup {p.cgroup or '?'}")


def assess(bind: Bind, sockets_on_port: Sequence[SocketFact], holders: Mapping[int, Holder], unit: str,
           v6only_stated: bool, waited: float, optional: bool = False) -> Check:
    """The verdict for one address, from the listeners on its port and who holds them."""
    ep = bind.endpoint
    on_port = [holders[s.inode] for s in sockets_on_port if s.inode in holders]
    overlapping = tuple(h for h in on_port if addresses_overlap(ep, bind.v6only, h.socket.local, h.socket.v6only))
    exactly = [h for h in overlapping if exact(bind, h.socket)]
    ours, foreign = [h for h in exactly if h.in_unit], [h for h in overlapping if not h.in_unit]
    elsewhere = [h for h in on_port if h.in_unit and h not in exactly]
    kind: VerifyKind | None = None
    fix = ""
    if not ours and foreign:
        kind = VerifyKind.FOREIGN_OWNER
        evidence = [f"held outside {unit}: {_who(h)}" for h in foreign]
        h = next((h for h in foreign if h.processes), None)
        p = h.processes[0] if h else None
        named = (h.units[0] if h.units else holder_unit(p, {})) if h and p else (None, "")
        holder, how = named
        stop = (f"`systemctl stop {command_unit(holder)}`"
                if how == UnitStatus.BY_MANAGER and holder and holder.endswith(".service")
                else f"the way it was started, after finding out what it is with {inspect_process(p.pid)}" if p
                else f"find it as root with {find_holder(ep.port, listening=True)}")
        fix = (f"{unit} does not own {ep}: if {unit} should serve it, stop the holder ({stop}) and restart "
               f"{unit} (a `bindguard check` in ExecStartPre= refuses such a start up front); if the holder is "
               f"the address's rightful owner, give {unit} another address")
    elif not ours and elsewhere:
        kind = VerifyKind.WRONG_ADDRESS
        evidence = [f"{unit} listens elsewhere on the port: {_who(h)}" for h in elsewhere]
        fix = (f"the daemon binds {', '.join(str(h.socket.local) for h in elsewhere)} instead of {ep}: "
               "correct its listen setting, or the address given to verify")
    elif not ours:
        kind = VerifyKind.NOT_LISTENING
        evidence = [f"nothing listens on {ep} after {waited:.1f} s"]
        fix = (f"the daemon did not reach listen() on {ep}: see why in `systemctl status {command_unit(unit)}` "
               f"and `journalctl --unit={unit_word(unit)}`; if it is only slow, raise --timeout or make the unit "
               "Type=notify so that ExecStartPost= runs once it is ready")
    elif foreign:
        kind = VerifyKind.SHARED
        evidence = [f"{unit} holds {_who(h)}" for h in ours] + [
            f"shared with a process outside {unit}: {_who(h)}" for h in foreign]
        p = next((h.processes[0] for h in foreign if h.processes), None)
        who = f"PID {p.pid} ({p.command})" if p else "another process"
        fix = (f"{who} is bound to {ep} as well (SO_REUSEPORT, or SO_REUSEADDR for UDP), and the kernel "
               f"splits the traffic between it and {unit}: stop it, or give one of them another address")
    elif v6only_stated and ep.is_wildcard and ep.host.version == 6 and any(
            h.socket.v6only is not None and h.socket.v6only != bind.v6only for h in ours):
        # (binding a specific IPv6 address sets IPV6_V6ONLY in the kernel: only [::] can differ)
        kind = VerifyKind.WRONG_ADDRESS
        want = "IPV6_V6ONLY" if bind.v6only else "dual-stack"
        evidence = [f"{_who(h)}, v6only={h.socket.v6only}" for h in ours]
        fix = (f"{ep} was meant to be {want}: set the daemon's ipv6only/BindIPv6Only accordingly, or "
               "correct --v6only/--no-v6only")
    else:
        evidence = [f"{unit} holds {_who(h)}" for h in ours]
        if len(ours) > 1:
            evidence.append(f"a SO_REUSEPORT group of {len(ours)} sockets, all in {unit}")
    return Check(bind, kind, overlapping, tuple(evidence), fix, optional)
