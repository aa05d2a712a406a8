"""The host's port map and what in it needs attention.

What listens now (sock_diag, with each socket's holder and unit), what every .socket unit listens
on, and what every service declares (its YAML file) or is discovered to bind (its daemon's
configuration); then the findings, each with its evidence and its fix:

  unit-collision         two services, or two .socket units, that will bind overlapping addresses
  socket-unit-collision  a service that binds an address a .socket unit of another service binds
  unclaimed-listener     a listener whose process belongs to no running unit
  ephemeral-port         a declared port inside net.ipv4.ip_local_port_range, not reserved
  restart-loop           a service restarting after a bind conflict (exit status 98)
  config-error           a unit's bindguard YAML file that cannot be used

Overlap is endpoints.addresses_overlap (wildcards, dual-stack), as in the guard.
"""

from __future__ import annotations

import functools
import socket
import time
from dataclasses import dataclass, field

from bindguard.model.endpoints import TCP, UDP, Bind, SocketOptions, addresses_overlap
from bindguard.model.errors import EXIT_INUSE
from bindguard.model.facts import ProcessFact, SocketFact
from bindguard.model.host import host_bindv6only
from bindguard.model.kinds import NO_UNIT, UNIT_BY_CGROUP, UNIT_BY_MANAGER, UNIT_UNKNOWN
from bindguard.verdict.conflicts import holder_unit

UNIT_COLLISION = "unit-collision"
SOCKET_UNIT_COLLISION = "socket-unit-collision"
UNCLAIMED_LISTENER = "unclaimed-listener"
EPHEMERAL_PORT = "ephemeral-port"
RESTART_LOOP = "restart-loop"
CONFIG_ERROR = "config-error"
FINDING_KINDS = (UNIT_COLLISION, SOCKET_UNIT_COLLISION, UNCLAIMED_LISTENER, EPHEMERAL_PORT, RESTART_LOOP,
                 CONFIG_ERROR)
CONFLICT_KINDS = (UNIT_COLLISION, SOCKET_UNIT_COLLISION)

EXIT_ATTENTION = 1
BIND_FAILURE_STATUS = EXIT_INUSE  # the guard's refusal, and daemons that exit with EADDRINUSE's number
ACTIVE_STATES = frozenset({"active", "activating", "reloading", "deactivating"})
ENABLED_STATES = frozenset({"enabled", "enabled-runtime", "generated"})  # started by the manager itself
RESERVED_PORTS_FILE = "/etc/sysctl.d/90-bindguard-reserved-ports.conf"
SCAN_BUS_BUDGET = 30.0  # seconds of D-Bus: a scan asks about every service, and no start waits for it

# Sources of a claim.
CONFIG = "config"
DISCOVERED = "discovered"
SOCKET_UNIT = "socket-unit"
LISTENING = "listening"


@dataclass
class Listener:
    """A listening socket (TCP LISTEN, or an unconnected bound UDP socket) and who holds it."""

    socket: SocketFact
    process: ProcessFact | None = None
    unit: str | None = None  # the holder's unit (GetUnitByPID, else its cgroup); held by the manager: its socket unit
    unit_status: str | None = None  # how `unit` is known: verdict.UNIT_STATUSES; None without a holder
    by_manager: bool = False  # held by the proven service manager: a .socket unit
    socket_unit: str | None = None

    @property
    def owner(self) -> str | None:
        return self.socket_unit or self.unit


@dataclass
class Claim:
    """An address a unit binds or will bind, and where that is known from."""

    unit: str
    bind: Bind
    source: str  # CONFIG, DISCOVERED, SOCKET_UNIT or LISTENING
    detail: str  # file:line:column, the daemon's file, "nginx -T", ...
    will_run: bool | None = None  # active or enabled; None when not known (no systemd)
    confident: bool = True
    triggers: tuple[str, ...] = ()  # a .socket unit: the services it passes its sockets to

    def describe(self) -> str:
        ep = self.bind.endpoint
        stack = " dual-stack" if ep.family == socket.AF_INET6 and ep.is_wildcard and not self.bind.v6only else ""
        reuse = " SO_REUSEPORT" if self.bind.options.reuseport else ""
        what = {CONFIG: "declares", DISCOVERED: "binds", SOCKET_UNIT: "listens on",
                LISTENING: "listens on"}[self.source]
        guess = ", a guess" if not self.confident else ""
        return f"{self.unit} {what} {ep}{stack}{reuse} ({self.detail}{guess})"


@dataclass
class Finding:
    kind: str
    summary: str
    evidence: list[str]
    fix: str
    proto: str | None = None
    port: int | None = None
    units: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()


@dataclass
class UnitState:
    """A service as the scan saw it: where its addresses came from and how it runs."""

    name: str
    active_state: str = ""
    unit_file_state: str = ""
    source: str = ""  # CONFIG, DISCOVERED or "" (nothing known)
    n_restarts: int = 0
    result: str = ""
    warnings: list[str] = field(default_factory=list)


@dataclass
class Scan:
    listeners: list[Listener] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)
    units: list[UnitState] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    port_range: tuple[int, int] | None = None
    reserved: str = ""
    bus: str | None = None  # the manager asked, None without systemd
    scanned_at: float = field(default_factory=time.time)

    @property
    def needs_attention(self) -> bool:
        return bool(self.findings)

    @property
    def exit_code(self) -> int:
        return EXIT_ATTENTION if self.findings else 0

    def count(self, kind: str) -> int:
        return sum(1 for f in self.findings if f.kind == kind)


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


def _read_sysctl(name: str) -> str | None:
    try:
        with open(f"/proc/sys/{name.replace('.', '/')}") as f:
            return f.read().strip()
    except OSError:
        return None


# --- gathering -------------------------------------------------------------------------------


def _listeners(scan: Scan) -> list[Listener]:
    from bindguard.evidence import owners, sockets

    found: list[SocketFact] = []
    for proto in (TCP, UDP):
        try:
            found += sockets.listening_sockets(proto, scan.notes)
        except sockets.ObservationError as exc:
            scan.notes.append(f"could not list the {proto} listeners: {exc}")
    inodes = {s.inode for s in found if s.inode}
    holders = owners.find_holders(inodes, owners.socket_cgroup_pids(found)) if inodes else owners.Holders()
    if holders.unreadable and len(holders) < len(inodes):
        scan.notes.append("some processes could not be inspected (permission denied): run as root to name every holder")
    facts: dict[int, ProcessFact | None] = {}
    listeners = []
    for s in found:
        pids = holders.get(s.inode, [])
        process = None
        if pids:
            if pids[0] not in facts:
                facts[pids[0]] = owners.process_facts(pids[0])
            process = facts[pids[0]]
        listeners.append(Listener(s, process))
    return listeners


def _connect(bus_choice: bool | None, scan: Scan):
    from bindguard.systemd import bus

    which = bus.choose_bus(bus_choice)
    try:
        connection = bus.Systemd(which, budget=SCAN_BUS_BUDGET)
        scan.bus = which
        return connection
    except bus.SystemdError as exc:
        scan.notes.append(f"{exc}; units are named from cgroups, and only units with a bindguard file are checked")
        return None


def _manager_pid(connection, bus_choice: bool | None) -> int | None:
    """The manager's PID from the bus, else where /proc proves it (attribution.proven_manager)."""
    from bindguard.systemd import bus
    from bindguard.systemd.context import proven_manager

    if connection is not None:
        return connection.manager_pid()
    proven = proven_manager(bus.choose_bus(bus_choice) == bus.USER)
    return proven[0] if proven else None


def _attribute_listeners(scan: Scan, connection, manager_pid: int | None, socket_units) -> None:
    """Each listener's unit as the check's attribution knows it (verdict.holder_unit): the manager's
    answer where a bus is open, else the name the cgroup path bears, marked as such."""
    from bindguard.systemd.context import ask_units

    endpoints = [(unit.name, endpoint) for unit in socket_units for _, endpoint, _ in unit.endpoints()]
    held = [(listener, listener.process) for listener in scan.listeners if listener.process is not None]
    answered: dict[int, str | None] = {}
    if connection is not None:
        ask_units(connection, [process.pid for _, process in held if process.pid != manager_pid], answered)
    for listener, process in held:
        if process.pid == manager_pid:
            listener.by_manager = True
            local = listener.socket.local
            listener.socket_unit = next((name for name, ep in endpoints if (ep.proto, ep.host, ep.port)
                                         == (local.proto, local.host, local.port)), None)
            listener.unit = listener.socket_unit
            listener.unit_status = UNIT_BY_MANAGER if listener.socket_unit else UNIT_UNKNOWN
        else:
            listener.unit, listener.unit_status = holder_unit(process, answered)


def _will_run(info, live_sockets: set[str]) -> bool:
    """Running, enabled, or activated by a .socket unit that listens (or will, being enabled)."""
    return (info.active_state in ACTIVE_STATES or info.unit_file_state in ENABLED_STATES
            or any(unit in live_sockets for unit in info.sockets))


def _service_claims(scan: Scan, connection, socket_units) -> list:
    """Claims of every loaded service and every unit with a bindguard file; returns the UnitInfos read."""
    from bindguard.model.errors import ConfigError
    from bindguard.request import config, discover
    from bindguard.systemd import bus, unitfiles

    live_sockets = {u.name for u in socket_units if u.listening or u.unit_file_state in ENABLED_STATES}
    names = {u for u in unitfiles.configured_units() if u.endswith(".service")}
    if connection is not None:
        names |= {name for name, load, _ in connection.list_units("*.service") if load == "loaded"}
    infos = []
    for name in sorted(names):
        info = None
        if connection is not None:
            try:
                info = connection.unit(name, file_state=True)
            except bus.UnitNotFound:
                info = None
            if info is not None and info.load_state != "loaded":
                info = None
        state = UnitState(name)
        if info is not None:
            infos.append(info)
            state.active_state, state.unit_file_state = info.active_state, info.unit_file_state
            state.n_restarts, state.result = info.n_restarts, info.result
        will_run = _will_run(info, live_sockets) if info is not None else None
        try:
            unit_config = config.load_unit_config(name)
        except ConfigError as exc:
            problems = getattr(exc, "problems", None) or [exc.message]
            scan.findings.append(Finding(
                CONFIG_ERROR, f"{name}: its bindguard configuration cannot be used", problems,
                f"fix the file, then `bindguard config check {name}`; until then its addresses are discovered",
                units=(name,)))
            unit_config = None
        if unit_config is not None and unit_config.listen is not None:
            state.source = CONFIG
            for entry, bind in zip(unit_config.listen, unit_config.binds(), strict=True):
                scan.claims.append(Claim(name, bind, CONFIG, str(entry.origin), will_run))
        elif info is not None:
            sources = unit_config.discovery_sources if unit_config is not None else discover.SOURCES
            found = discover.discover_unit(name, functools.partial(connection.unit_facts, info=info),
                                           [s for s in discover.SOURCES if s in sources])
            state.warnings = found.warnings
            daemon_binds = [f for f in found.findings if f.socket_unit is None]
            if daemon_binds:
                state.source = DISCOVERED
            for f in daemon_binds:
                scan.claims.append(Claim(name, f.bind, DISCOVERED, f.source, will_run, f.confident))
        scan.units.append(state)
    return infos


def _socket_unit_claims(scan: Scan, socket_units) -> None:
    for unit in socket_units:
        will_run = unit.listening or unit.unit_file_state in ENABLED_STATES
        for listen, endpoint, v6only in unit.endpoints():
            bind = Bind(endpoint, SocketOptions(reuseport=unit.reuse_port, v6only=v6only))
            detail = f"Listen{listen.type}={listen.address}, {unit.active_state}"
            scan.claims.append(Claim(unit.name, bind, SOCKET_UNIT, detail, will_run, triggers=unit.triggers))


def _listening_claims(scan: Scan) -> None:
    """A running service's listeners count as its claims where nothing declares them."""
    for listener in scan.listeners:
        unit = listener.unit
        if listener.by_manager or not unit or not unit.endswith(".service"):
            continue
        local = listener.socket.local
        if any(c.unit == unit and c.bind.endpoint == local for c in scan.claims):
            continue
        v6only = listener.socket.v6only if listener.socket.v6only is not None else host_bindv6only()
        bind = Bind(local, SocketOptions(v6only=local.family == socket.AF_INET6 and v6only))
        pid = listener.process.pid if listener.process else "?"
        scan.claims.append(Claim(unit, bind, LISTENING, f"PID {pid}, now", True))


# --- findings ----------------------------------------------------------------------------------


def _collisions(scan: Scan) -> None:
    groups: dict[tuple, list[tuple[Claim, Claim]]] = {}
    claims = [c for c in scan.claims if c.will_run is not False and c.confident]
    for i, a in enumerate(claims):
        for b in claims[i + 1:]:
            ea, eb = a.bind.endpoint, b.bind.endpoint
            if a.unit == b.unit or ea.port != eb.port or ea.proto != eb.proto:
                continue
            if not addresses_overlap(ea, a.bind.v6only, eb, b.bind.v6only):
                continue
            sockets_a, sockets_b = a.source == SOCKET_UNIT, b.source == SOCKET_UNIT
            if sockets_a != sockets_b:
                sock, service = (a, b) if sockets_a else (b, a)
                if service.unit in sock.triggers:
                    continue  # its own socket unit passes it the socket
                kind = SOCKET_UNIT_COLLISION
            else:
                kind = UNIT_COLLISION
            key = (kind, ea.proto, ea.port, tuple(sorted((a.unit, b.unit))))
            groups.setdefault(key, []).append((a, b))
    for (kind, proto, port, units), pairs in sorted(groups.items(), key=lambda g: (g[0][2], g[0][1], g[0][3])):
        evidence = list(dict.fromkeys(c.describe() for pair in pairs for c in pair))
        addresses = tuple(dict.fromkeys(str(c.bind.endpoint) for pair in pairs for c in pair))
        if kind == SOCKET_UNIT_COLLISION:
            sock = next(c for pair in pairs for c in pair if c.source == SOCKET_UNIT)
            service = next(c for pair in pairs for c in pair if c.source != SOCKET_UNIT)
            owner = ", ".join(sock.triggers) or "its service"
            summary = f"{service.unit} and {sock.unit} both bind port {port}/{proto}"
            fix = (f"never both: {sock.unit} binds it for {owner}. Either `systemctl disable --now {sock.unit}` "
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
        scan.findings.append(Finding(kind, summary, evidence, fix, proto, port, units, addresses))


def _active_state(connection, unit: str) -> str | None:
    from bindguard.systemd import bus

    try:
        return connection.unit(unit).active_state
    except bus.UnitNotFound:
        return None


def _unclaimed(scan: Scan, connection) -> None:
    """Listeners no running service serves, said as far as known: the manager's word on a unit and
    its state where a bus answered; without one, only what the cgroup path names, marked as such."""
    states: dict[str, str] = {u.name: u.active_state for u in scan.units if u.active_state}
    for listener in scan.listeners:
        if listener.by_manager:
            continue
        s, p, unit, status = listener.socket, listener.process, listener.unit, listener.unit_status
        service = bool(unit and unit.endswith(".service"))
        if service and status == UNIT_BY_CGROUP:
            continue  # no bus: whether that unit runs, and whether it is really this one, is not known
        state = None
        if service and unit is not None:
            state = states.get(unit)
            if state is None and connection is not None:
                state = _active_state(connection, unit)
            if state is None or state in ACTIVE_STATES:
                continue
        evidence = []
        if p is not None:
            evidence.append(f"PID {p.pid} ({' '.join(p.cmdline) or p.name}), user {p.user}, PPID {p.ppid}, "
                            f"cgroup {p.cgroup or '?'}")
            if status == NO_UNIT:
                evidence.append("the manager places it in no unit")
            elif status == UNIT_UNKNOWN:
                evidence.append("its cgroup path names no unit, and no manager was asked")
            elif status == UNIT_BY_CGROUP:
                evidence.append(f"its cgroup path names {unit}, not a service (no manager confirmed it)")
            elif not service:
                evidence.append(f"it runs in {unit}, not in a service")
            else:
                evidence.append(f"its unit {unit} is {state}: a stray copy")
        else:
            evidence.append(f"no process found holding it (socket inode {s.inode}, uid {s.uid})")
        for claim in scan.claims:
            if claim.source != LISTENING and claim.unit != unit and addresses_overlap(
                    claim.bind.endpoint, claim.bind.v6only, s.local, s.v6only):
                evidence.append(f"{claim.describe()}: it cannot start while this holds the address")
        if p is not None:
            fix = (f"if it should run, run it as a unit (a service file, or `systemd-run --unit NAME ...`) so that "
                   f"it is managed and restarted; if it is a leftover, check it with `ps -o pid,ppid,lstart,cmd "
                   f"-p {p.pid}` and stop it: `kill -TERM {p.pid}`")
        else:
            fix = f"find the holder as root: `ss -lntup 'sport = :{s.local.port}'`"
        scan.findings.append(Finding(
            UNCLAIMED_LISTENER, f"{s.local} is served by no running service", evidence, fix, s.local.proto,
            s.local.port, (unit,) if unit else (), (str(s.local),)))


def _ephemeral(scan: Scan) -> None:
    text = _read_sysctl("net.ipv4.ip_local_port_range")
    if text is None:
        scan.notes.append("cannot read net.ipv4.ip_local_port_range: the ephemeral range is not checked")
        return
    low, high = (int(x) for x in text.split())
    scan.port_range = (low, high)
    scan.reserved = _read_sysctl("net.ipv4.ip_local_reserved_ports") or ""
    reserved = parse_port_ranges(scan.reserved)
    ports: dict[int, list[Claim]] = {}
    for claim in scan.claims:
        port = claim.bind.endpoint.port
        if claim.source == LISTENING or not claim.confident or claim.will_run is False:
            continue
        if low <= port <= high and not any(a <= port <= b for a, b in reserved):
            ports.setdefault(port, []).append(claim)
    if not ports:
        return
    merged = reserved_with(scan.reserved, sorted(ports))
    already = f"what is reserved now ({scan.reserved})" if scan.reserved else "nothing (none is reserved now)"
    fix = (f"reserve it: `sysctl -w net.ipv4.ip_local_reserved_ports={merged}` now, and the line "
           f"`net.ipv4.ip_local_reserved_ports = {merged}` in {RESERVED_PORTS_FILE} for the next boot. "
           f"The value replaces the list, so it keeps {already}; merge it with any other sysctl.d file "
           f"that sets it. Or move the service below {low}")
    for port, claims in sorted(ports.items()):
        units = tuple(dict.fromkeys(c.unit for c in claims))
        evidence = [c.describe() for c in claims] + [
            f"net.ipv4.ip_local_port_range is {low} {high}; ip_local_reserved_ports is {scan.reserved or 'empty'}",
            "an outgoing connection may draw this port as its source port at any moment, and then the "
            "daemon's bind() fails with EADDRINUSE (intermittently, typically at a restart)"]
        scan.findings.append(Finding(
            EPHEMERAL_PORT, f"port {port} of {', '.join(units)} is in the ephemeral port range", evidence, fix,
            claims[0].bind.endpoint.proto, port, units, tuple(dict.fromkeys(str(c.bind.endpoint) for c in claims))))


def bind_failure(info) -> str | None:
    """How the unit's last run failed on a bind conflict (exit status 98), or None."""
    for command in info.exec_start_pre:
        if command.code == 1 and command.status == BIND_FAILURE_STATUS:
            return f"ExecStartPre={' '.join(command.argv) or command.path} exited {command.status}"
    if info.result == "exit-code" and info.exec_main_status == BIND_FAILURE_STATUS:
        return f"the main process exited {info.exec_main_status}"
    return None


def _restart_loops(scan: Scan, infos) -> None:
    for info in infos:
        if info.n_restarts < 1 or (info.active_state == "active" and info.sub_state == "running"):
            continue
        why = bind_failure(info)
        if why is None:
            continue
        addresses = tuple(str(c.bind.endpoint) for c in scan.claims if c.unit == info.name)
        evidence = [f"NRestarts={info.n_restarts}, ActiveState={info.active_state} ({info.sub_state}), "
                    f"Result={info.result}", f"{why}: EADDRINUSE, an address is in use"]
        probe = f"`bindguard explain {' '.join(addresses)}`" if addresses else "`bindguard explain ADDRESS`"
        if why.startswith("ExecStartPre="):
            stop = ("RestartPreventExitStatus= does not see ExecStartPre= exit codes (systemd checks only the main "
                    "process): bound the retries with StartLimitIntervalSec= and StartLimitBurst= in [Unit]")
        else:
            stop = "add RestartPreventExitStatus=98 to the unit so that systemd stops restarting into the same conflict"
        fix = (f"see who holds the address with {probe} and `systemctl status {info.name}`; {stop}; then "
               f"`systemctl reset-failed {info.name}` once it is resolved")
        scan.findings.append(Finding(RESTART_LOOP, f"{info.name} restarts on a bind conflict", evidence, fix,
                                     units=(info.name,), addresses=addresses,
                                     port=min((c.bind.endpoint.port for c in scan.claims if c.unit == info.name),
                                              default=None)))


def run(bus_choice: bool | None = None, use_systemd: bool = True) -> Scan:
    """One scan of this host (this network namespace), with systemd over D-Bus unless use_systemd is False."""
    scan = Scan()
    scan.listeners = _listeners(scan)
    connection = _connect(bus_choice, scan) if use_systemd else None
    try:
        from bindguard.systemd import bus

        socket_units = []
        infos = []
        try:
            manager_pid = _manager_pid(connection, bus_choice)
            if connection is not None:
                socket_units = connection.socket_units()
            _attribute_listeners(scan, connection, manager_pid, socket_units)
            _socket_unit_claims(scan, socket_units)
            infos = _service_claims(scan, connection, socket_units)
        except bus.SystemdError as exc:
            scan.notes.append(f"{exc}; the scan is incomplete")
        _listening_claims(scan)
        _collisions(scan)
        _unclaimed(scan, connection)
        _ephemeral(scan)
        _restart_loops(scan, infos)
    finally:
        if connection is not None:
            connection.close()
    scan.findings.sort(key=lambda f: (f.port if f.port is not None else 70000, f.proto or "", f.kind))
    return scan


# --- rendering --------------------------------------------------------------------------------
