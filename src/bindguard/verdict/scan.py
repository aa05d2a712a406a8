"""What in the host's port map needs attention: scan's findings, each with its evidence and its fix.
Pure: judged from the recorded map (model.hostmap) alone, nothing asked again.

  unit-collision         two services, or two .socket units, that will bind overlapping addresses
  socket-unit-collision  a service that binds an address a .socket unit of another service binds
  unclaimed-listener     a listener whose process belongs to no running unit
  ephemeral-port         a declared port inside net.ipv4.ip_local_port_range, not reserved
  restart-loop           a service restarting after a bind conflict (exit status 98)
  config-error           a unit's bindguard YAML file that cannot be used
  nat-shadowed           an address a unit binds whose connections a DNAT/REDIRECT rule takes elsewhere

Overlap is endpoints.addresses_overlap (wildcards, dual-stack), as in the guard.
"""

from __future__ import annotations

from dataclasses import dataclass

from bindguard.model.endpoints import Bind, addresses_overlap
from bindguard.model.errors import ExitCode
from bindguard.model.facts import unit_active
from bindguard.model.hostmap import Claim, HostMap, UnitState
from bindguard.model.kinds import ClaimSource, FindingKind, UnitStatus
from bindguard.model.nat import NatRule
from bindguard.model.text import command_unit
from bindguard.verdict.nat import nat_evidence
from bindguard.verdict.remedies import find_holder, inspect_process, nat_remedy, stop_container

BIND_FAILURE_STATUS = ExitCode.INUSE  # the guard's refusal, and daemons that exit with EADDRINUSE's number
RESERVED_PORTS_FILE = "/etc/sysctl.d/90-bindguard-reserved-ports.conf"


@dataclass(frozen=True)
class Finding:
    kind: FindingKind
    summary: str
    evidence: tuple[str, ...]
    fix: str
    proto: str | None = None
    port: int | None = None
    units: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()


def findings(hostmap: HostMap) -> list[Finding]:
    """Every finding on the map, sorted by port (those without one last), protocol and kind."""
    found = (_config_errors(hostmap) + _collisions(hostmap) + _unclaimed(hostmap) + _ephemeral(hostmap)
             + _restart_loops(hostmap) + _nat_shadowed(hostmap))
    return sorted(found, key=lambda f: (f.port if f.port is not None else 70000, f.proto or "", f.kind))


# --- port ranges ---------------------------------------------------------------------------


def parse_port_ranges(text: str) -> list[tuple[int, int]]:
    """`8080,9000-9010` (the format of ip_local_reserved_ports) as sorted, merged (low, high) ranges."""
    ranges = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        low, _, high = part.partition("-")
        ranges.append((int(low), int(high or low)))
    return merge_ranges(ranges)


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return merged


def format_port_ranges(ranges: list[tuple[int, int]]) -> str:
    return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in ranges)


def reserved_with(current: str, ports: list[int]) -> str:
    """The ip_local_reserved_ports value that keeps what is reserved now and adds ports."""
    return format_port_ranges(merge_ranges(parse_port_ranges(current) + [(p, p) for p in ports]))


# --- findings ----------------------------------------------------------------------------------


def _config_errors(hostmap: HostMap) -> list[Finding]:
    return [Finding(FindingKind.CONFIG_ERROR, f"{u.name}: its bindguard configuration cannot be used",
                    u.config_problems,
                    f"fix the file, then `bindguard config check {command_unit(u.name)}`; until then its addresses "
                    "are discovered",
                    units=(u.name,))
            for u in hostmap.units if u.config_problems]


def _collisions(hostmap: HostMap) -> list[Finding]:
    groups: dict[tuple[FindingKind, str, int, tuple[str, ...]], list[tuple[Claim, Claim]]] = {}
    claims = [c for c in hostmap.claims if c.will_run is not False and c.confident]
    for i, a in enumerate(claims):
        for b in claims[i + 1:]:
            ea, eb = a.bind.endpoint, b.bind.endpoint
            if a.unit == b.unit or ea.port != eb.port or ea.proto != eb.proto:
                continue
            if not addresses_overlap(ea, a.bind.v6only, eb, b.bind.v6only):
                continue
            sockets_a, sockets_b = a.source == ClaimSource.SOCKET_UNIT, b.source == ClaimSource.SOCKET_UNIT
            if sockets_a != sockets_b:
                sock, service = (a, b) if sockets_a else (b, a)
                if service.unit in sock.triggers:
                    continue  # its own socket unit passes it the socket
                kind = FindingKind.SOCKET_UNIT_COLLISION
            else:
                kind = FindingKind.UNIT_COLLISION
            key = (kind, ea.proto, ea.port, tuple(sorted((a.unit, b.unit))))
            groups.setdefault(key, []).append((a, b))
    found = []
    for (kind, proto, port, units), pairs in sorted(groups.items(), key=lambda g: (g[0][2], g[0][1], g[0][3])):
        evidence = list(dict.fromkeys(c.describe() for pair in pairs for c in pair))
        addresses = tuple(dict.fromkeys(str(c.bind.endpoint) for pair in pairs for c in pair))
        if kind == FindingKind.SOCKET_UNIT_COLLISION:
            sock = next(c for pair in pairs for c in pair if c.source == ClaimSource.SOCKET_UNIT)
            service = next(c for pair in pairs for c in pair if c.source != ClaimSource.SOCKET_UNIT)
            owner = ", ".join(sock.triggers) or "its service"
            summary = f"{service.unit} and {sock.unit} both bind port {port}/{proto}"
            fix = (f"never both: {sock.unit} binds it for {owner}. Either `systemctl disable --now "
                   f"{command_unit(sock.unit)}` "
                   f"if {service.unit} should serve it, or move {service.unit} to another address "
                   f"(or let it take the socket from systemd: Sockets={sock.unit} in {service.unit})")
        else:
            summary = f"{units[0]} and {units[1]} will collide on port {port}/{proto}"
            fix = (f"give each its own address: change one of them ({units[1]}'s configuration or ListenStream=), "
                   f"or make them specific addresses that do not overlap (a [::] socket is dual-stack unless "
                   f"IPV6_V6ONLY / BindIPv6Only=ipv6-only); if only one should run, "
                   f"`systemctl disable --now` the other")
        if any(c.bind.options.reuseport for pair in pairs for c in pair):
            evidence.append("SO_REUSEPORT lets sockets of one uid share the port: the kernel then splits "
                            "connections between unrelated daemons, which is almost never meant")
        found.append(Finding(kind, summary, tuple(evidence), fix, proto, port, units, addresses))
    return found


def _unclaimed(hostmap: HostMap) -> list[Finding]:
    """Listeners no running service serves, said as far as known: the manager's word on a unit and
    its state where a bus answered; without one, only what the cgroup path names, marked as such."""
    found = []
    for listener in hostmap.listeners:
        if listener.by_manager:
            continue
        s, p, unit, status = listener.socket, listener.process, listener.unit, listener.unit_status
        service = bool(unit and unit.endswith(".service"))
        if service and status == UnitStatus.BY_CGROUP:
            continue  # no bus: whether that unit runs, and whether it is really this one, is not known
        state = None
        if service and unit is not None:
            state = hostmap.unit_states.get(unit)
            if state is None or unit_active(state):
                continue
        evidence = []
        if p is not None:
            evidence.append(f"PID {p.pid} ({p.command}), user {p.user}, PPID {p.ppid}, "
                            f"cgroup {p.cgroup or '?'}")
            if status == UnitStatus.NO_UNIT:
                evidence.append("the manager places it in no unit")
            elif status == UnitStatus.UNKNOWN:
                evidence.append("its cgroup path names no unit, and no manager was asked")
            elif status == UnitStatus.BY_CGROUP:
                evidence.append(f"its cgroup path names {unit}, not a service (no manager confirmed it)")
            elif not service:
                evidence.append(f"it runs in {unit}, not in a service")
            else:
                evidence.append(f"its unit {unit} is {state}, and it still listens")
            if p.container is not None:
                evidence.append(f"it runs for the {p.container.label}")
        else:
            evidence.append(f"no process found holding it (socket inode {s.inode}, uid {s.uid})")
        for claim in hostmap.claims:
            if claim.source != ClaimSource.LISTENING and claim.unit != unit and addresses_overlap(
                    claim.bind.endpoint, claim.bind.v6only, s.local, s.v6only):
                evidence.append(f"{claim.describe()}: it cannot start while this holds the address")
        if p is not None and p.container is not None:
            fix = f"if the container should not serve this address, {stop_container(p.container)}"
        elif p is not None and (status == UnitStatus.NO_UNIT or (status == UnitStatus.BY_MANAGER and service)):
            fix = (f"if it should run, run it as a unit (a service file, or `systemd-run --unit NAME ...`) so that "
                   f"it is managed and restarted; if it is a leftover, check it with {inspect_process(p.pid)} "
                   f"and stop it: `kill -TERM {p.pid}`")
        elif p is not None:  # no manager asked, or a scope (a login session's, a tool's): what it is, first
            fix = (f"find out what it is with {inspect_process(p.pid)}; if it should run as a service, make it a "
                   "unit (a service file, or `systemd-run --unit NAME ...`)")
        else:
            fix = f"find the holder as root: {find_holder(s.local.port, listening=True)}"
        found.append(Finding(
            FindingKind.UNCLAIMED_LISTENER, f"{s.local} is served by no running service", tuple(evidence), fix,
            s.local.proto, s.local.port, (unit,) if unit else (), (str(s.local),)))
    return found


def _ephemeral(hostmap: HostMap) -> list[Finding]:
    if hostmap.port_range is None:
        return []
    low, high = hostmap.port_range
    reserved = parse_port_ranges(hostmap.reserved)
    ports: dict[int, list[Claim]] = {}
    for claim in hostmap.claims:
        port = claim.bind.endpoint.port
        if claim.source == ClaimSource.LISTENING or not claim.confident or claim.will_run is False:
            continue
        if low <= port <= high and not any(a <= port <= b for a, b in reserved):
            ports.setdefault(port, []).append(claim)
    if not ports:
        return []
    merged = reserved_with(hostmap.reserved, sorted(ports))
    already = f"what is reserved now ({hostmap.reserved})" if hostmap.reserved else "nothing (none is reserved now)"
    fix = (f"reserve it: `sysctl -w net.ipv4.ip_local_reserved_ports={merged}` now, and the line "
           f"`net.ipv4.ip_local_reserved_ports = {merged}` in {RESERVED_PORTS_FILE} for the next boot. "
           f"The value replaces the list, so it keeps {already}; merge it with any other sysctl.d file "
           f"that sets it. Or move the service below {low}")
    found = []
    for port, claims in sorted(ports.items()):
        units = tuple(dict.fromkeys(c.unit for c in claims))
        evidence = [c.describe() for c in claims] + [
            f"net.ipv4.ip_local_port_range is {low} {high}; ip_local_reserved_ports is {hostmap.reserved or 'empty'}",
            "an outgoing connection may draw this port as its source port at any moment, and then the "
            "daemon's bind() fails with EADDRINUSE (intermittently, typically at a restart)"]
        found.append(Finding(
            FindingKind.EPHEMERAL_PORT, f"port {port} of {', '.join(units)} is in the ephemeral port range",
            tuple(evidence), fix,
            claims[0].bind.endpoint.proto, port, units, tuple(dict.fromkeys(str(c.bind.endpoint) for c in claims))))
    return found


def _nat_shadowed(hostmap: HostMap) -> list[Finding]:
    """Each NAT rule that takes away connections to an address a unit binds or will bind: one finding per
    rule and address, naming every unit that claims it."""
    grouped: dict[tuple[object, ...], tuple[NatRule, Bind, list[Claim]]] = {}
    for claim in hostmap.claims:
        if claim.will_run is False:
            continue
        for rule in hostmap.nat_rules:
            if rule.catches(claim.bind):
                key = (rule.source, rule.family, rule.table, rule.chain, rule.handle, rule.hook,
                       str(claim.bind.endpoint))
                grouped.setdefault(key, (rule, claim.bind, []))[2].append(claim)
    found = []
    for rule, bind, claims in grouped.values():
        units = tuple(dict.fromkeys(c.unit for c in claims))
        ep = bind.endpoint
        evidence = (*(c.describe() for c in claims), *nat_evidence(rule))
        found.append(Finding(FindingKind.NAT_SHADOWED, f"{ep} of {', '.join(units)} is redirected to "
                             f"{rule.to or 'somewhere else'} by a NAT rule ({rule.hook})", evidence,
                             nat_remedy(ep, rule), ep.proto, ep.port, units, (str(ep),)))
    return found


def bind_failure(unit: UnitState) -> str | None:
    """How the unit's last run failed on a bind conflict (exit status 98), or None."""
    for command in unit.exec_start_pre:
        if command.code == 1 and command.status == BIND_FAILURE_STATUS:
            return f"ExecStartPre={' '.join(command.argv) or command.path} exited {command.status}"
    if unit.result == "exit-code" and unit.exec_main_status == BIND_FAILURE_STATUS:
        return f"the main process exited {unit.exec_main_status}"
    return None


def _restart_loops(hostmap: HostMap) -> list[Finding]:
    found = []
    for unit in hostmap.units:
        if unit.n_restarts < 1 or (unit.active_state == "active" and unit.sub_state == "running"):
            continue
        why = bind_failure(unit)
        if why is None:
            continue
        claims = [c for c in hostmap.claims if c.unit == unit.name]
        addresses = tuple(str(c.bind.endpoint) for c in claims)
        evidence = (f"NRestarts={unit.n_restarts}, ActiveState={unit.active_state} ({unit.sub_state}), "
                    f"Result={unit.result}", f"{why}: EADDRINUSE, an address is in use")
        probe = f"`bindguard explain {' '.join(addresses)}`" if addresses else "`bindguard explain ADDRESS`"
        if why.startswith("ExecStartPre="):
            stop = ("RestartPreventExitStatus= does not see ExecStartPre= exit codes (systemd checks only the main "
                    "process): bound the retries with StartLimitIntervalSec= and StartLimitBurst= in [Unit]")
        else:
            stop = "add RestartPreventExitStatus=98 to the unit so that systemd stops restarting into the same conflict"
        fix = (f"see who holds the address with {probe} and `systemctl status {command_unit(unit.name)}`; {stop}; "
               f"then `systemctl reset-failed {command_unit(unit.name)}` once it is resolved")
        found.append(Finding(FindingKind.RESTART_LOOP, f"{unit.name} restarts on a bind conflict", evidence, fix,
                             units=(unit.name,), addresses=addresses,
                             port=min((c.bind.endpoint.port for c in claims), default=None)))
    return found
