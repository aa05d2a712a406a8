"""The host's port map, gathered once: every listening socket with its holder and unit (sock_diag,
/proc, the manager's GetUnitByPID), what every .socket unit listens on, what every service declares
(its bindguard file) or is discovered to bind (its daemon's configuration), how each service runs,
and the ephemeral port range. Everything the scan asks systemd is asked here; verdict.scan then
judges the map without asking again."""

from __future__ import annotations

import functools
import socket

from bindguard.model.endpoints import TCP, UDP, Bind, SocketOptions
from bindguard.model.errors import ConfigError
from bindguard.model.facts import SocketFact, holder_unit, unit_active
from bindguard.model.host import host_bindv6only
from bindguard.model.hostmap import Claim, ExitedCommand, HostMap, Listener, UnitState
from bindguard.model.kinds import DISCOVERY_SOURCES, ClaimSource, UnitStatus, ordered_sources
from bindguard.systemd import bus
from bindguard.systemd.unitfiles import user_manager

ENABLED_STATES = frozenset({"enabled", "enabled-runtime", "generated"})  # started by the manager itself
SCAN_BUS_BUDGET = 30.0  # seconds of D-Bus: a scan asks about every service, and no start waits for it


def gather(bus_choice: bool | None = None, use_systemd: bool = True, hostmap: HostMap | None = None) -> HostMap:
    """This host's (this network namespace's) port map, with systemd over D-Bus unless use_systemd is
    False. What could not be observed is a note on the map, never an exception."""
    hostmap = hostmap if hostmap is not None else HostMap()
    hostmap.listeners = _listeners(hostmap)
    user = user_manager(bus_choice)  # which manager the scan asks, decided once for all it asks
    connection = _connect(user, hostmap) if use_systemd else None
    try:
        try:
            manager_pid = _manager_pid(connection, user)
            socket_units = connection.socket_units() if connection is not None else _enabled_socket_units(user)
            _attribute_listeners(hostmap, connection, manager_pid, socket_units)
            _socket_unit_claims(hostmap, socket_units)
            _service_claims(hostmap, connection, socket_units)
            _listener_unit_states(hostmap, connection)
        except bus.SystemdError as exc:
            hostmap.notes.append(f"{exc}; the scan is incomplete")
        _listening_claims(hostmap)
        _port_range(hostmap)
        _nat_rules(hostmap)
    finally:
        if connection is not None:
            connection.close()
    return hostmap


def _nat_rules(hostmap: HostMap) -> None:
    from bindguard.evidence.nat import nat_rules

    hostmap.nat_rules, notes = nat_rules()
    hostmap.notes.extend(notes)


def _read_sysctl(name: str) -> str | None:
    try:
        with open(f"/proc/sys/{name.replace('.', '/')}") as f:
            return f.read().strip()
    except OSError:
        return None


def _port_range(hostmap: HostMap) -> None:
    text = _read_sysctl("net.ipv4.ip_local_port_range")
    if text is None:
        hostmap.notes.append("cannot read net.ipv4.ip_local_port_range: the ephemeral range is not checked")
        return
    low, high = (int(x) for x in text.split())
    hostmap.port_range = (low, high)
    hostmap.reserved = _read_sysctl("net.ipv4.ip_local_reserved_ports") or ""


def _listeners(hostmap: HostMap) -> list[Listener]:
    from bindguard.evidence import owners, sockets

    found: list[SocketFact] = []
    for proto in (TCP, UDP):
        try:
            found += sockets.listening_sockets(proto, hostmap.notes)
        except sockets.ObservationError as exc:
            hostmap.notes.append(f"could not list the {proto} listeners: {exc}")
    held = owners.holders_of(found)
    if held.incomplete:
        hostmap.notes.append("some processes could not be inspected (permission denied): run as root to name every "
                             "holder")
    return [Listener(s, held.first(s.inode)) for s in found]


def _connect(user: bool, hostmap: HostMap) -> bus.Systemd | None:
    which = bus.bus_for(user)
    try:
        connection = bus.Systemd(which, budget=SCAN_BUS_BUDGET)
        hostmap.bus = which
        return connection
    except bus.SystemdError as exc:
        hostmap.notes.append(f"{exc}; units are named from cgroups, and only units with a bindguard file and "
                             "enabled socket units (from their unit files) are checked")
        return None


def _manager_pid(connection: bus.Systemd | None, user: bool) -> int | None:
    """The manager's PID from the bus, else where /proc proves it (context.proven_manager)."""
    from bindguard.systemd.context import proven_manager

    if connection is not None:
        return connection.manager_pid()
    proven = proven_manager(user)
    return proven[0] if proven else None


def _attribute_listeners(hostmap: HostMap, connection: bus.Systemd | None, manager_pid: int | None,
                         socket_units: list[bus.SocketUnit]) -> None:
    """Each listener's unit as the check's attribution knows it (facts.holder_unit): the manager's
    answer where a bus is open, else the name the cgroup path bears, marked as such."""
    from bindguard.systemd.context import ask_units

    endpoints = [(unit.name, endpoint) for unit in socket_units for _, endpoint, _ in unit.endpoints()]
    held = [(listener, listener.process) for listener in hostmap.listeners if listener.process is not None]
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
            listener.unit_status = UnitStatus.BY_MANAGER if listener.socket_unit else UnitStatus.UNKNOWN
        else:
            listener.unit, listener.unit_status = holder_unit(process, answered)


def _will_run(info: bus.UnitInfo, live_sockets: set[str]) -> bool:
    """Running, enabled, or activated by a .socket unit that listens (or will, being enabled)."""
    return (unit_active(info.active_state) or info.unit_file_state in ENABLED_STATES
            or any(unit in live_sockets for unit in info.sockets))


def _loaded_unit(connection: bus.Systemd, name: str) -> bus.UnitInfo | None:
    try:
        info = connection.unit(name, file_state=True)
    except bus.UnitNotFound:
        return None
    return info if info.load_state == "loaded" else None


def _unit_state(name: str, info: bus.UnitInfo | None) -> UnitState:
    if info is None:
        return UnitState(name)
    return UnitState(
        name, active_state=info.active_state, unit_file_state=info.unit_file_state, n_restarts=info.n_restarts,
        result=info.result, sub_state=info.sub_state, exec_main_status=info.exec_main_status,
        exec_start_pre=tuple(ExitedCommand(c.argv, c.path, c.code, c.status) for c in info.exec_start_pre))


def _service_claims(hostmap: HostMap, connection: bus.Systemd | None, socket_units: list[bus.SocketUnit]) -> None:
    """Claims and states of every loaded service and every unit with a bindguard file."""
    from bindguard.request import config, discover
    from bindguard.systemd import unitfiles

    live_sockets = {u.name for u in socket_units if u.listening or u.unit_file_state in ENABLED_STATES}
    names = {u for u in unitfiles.configured_units() if u.endswith(".service")}
    if connection is not None:
        names |= {name for name, load, _ in connection.list_units("*.service") if load == "loaded"}
    for name in sorted(names):
        info = _loaded_unit(connection, name) if connection is not None else None
        state = _unit_state(name, info)
        if info is not None:
            hostmap.unit_states[name] = info.active_state
        will_run = _will_run(info, live_sockets) if info is not None else None
        try:
            unit_config = config.load_unit_config(name)
        except ConfigError as exc:
            state.config_problems = tuple(getattr(exc, "problems", None) or [exc.message])
            unit_config = None
        if unit_config is not None and unit_config.listen is not None:
            state.source = ClaimSource.CONFIG
            for entry, bind in zip(unit_config.listen, unit_config.binds(), strict=True):
                hostmap.claims.append(Claim(name, bind, ClaimSource.CONFIG, str(entry.origin), will_run))
        elif info is not None and connection is not None:
            sources = unit_config.discovery_sources if unit_config is not None else DISCOVERY_SOURCES
            found = discover.discover_unit(name, functools.partial(connection.unit_facts, info=info),
                                           ordered_sources(sources))
            state.warnings = found.warnings
            daemon_binds = [f for f in found.findings if f.socket_unit is None]
            if daemon_binds:
                state.source = ClaimSource.DISCOVERED
            for f in daemon_binds:
                hostmap.claims.append(Claim(name, f.bind, ClaimSource.DISCOVERED, f.source, will_run, f.confident))
        hostmap.units.append(state)


def _listener_unit_states(hostmap: HostMap, connection: bus.Systemd | None) -> None:
    """The ActiveState= of each service a listener's holder runs in (as the manager named it) that the
    services above did not answer: whether it still runs decides an unclaimed listener."""
    if connection is None:
        return
    asked = set(hostmap.unit_states)
    for listener in hostmap.listeners:
        unit = listener.unit
        if (listener.by_manager or not unit or not unit.endswith(".service")
                or listener.unit_status == UnitStatus.BY_CGROUP or unit in asked):
            continue
        asked.add(unit)  # once per unit, however many of its sockets listen
        try:
            hostmap.unit_states[unit] = connection.unit(unit).active_state
        except bus.UnitNotFound:
            continue


def _enabled_socket_units(user: bool) -> list[bus.SocketUnit]:
    """Without a bus, the enabled .socket units and their IP Listen entries from their unit files, as
    the guard reads them (request.socketunit): they will listen after the next boot. Whether one
    listens now is not known (its claim's detail says so)."""
    from bindguard.systemd import unitexec
    from bindguard.systemd.unitfacts import socket_unit_from_files

    found = []
    for name, state in sorted(unitexec.enabled_socket_units(unitexec.unit_path(user)).items()):
        settings = socket_unit_from_files(name, user)
        if settings is None:
            continue
        listens = tuple(bus.Listen(kind, address) for kind, address in settings.listens
                        if bus.is_network_listen(kind, address))
        if listens:
            service = unitexec.unit_settings(name, user, "Socket", ("Service",))["Service"]
            found.append(bus.SocketUnit(name, "", "unknown (no bus)", state, listens, settings.bind_ipv6_only,
                                        settings.reuse_port, (service[-1] if service else name[:-7] + ".service",)))
    return found


def _socket_unit_claims(hostmap: HostMap, socket_units: list[bus.SocketUnit]) -> None:
    for unit in socket_units:
        will_run = unit.listening or unit.unit_file_state in ENABLED_STATES
        for listen, endpoint, v6only in unit.endpoints():
            bind = Bind(endpoint, SocketOptions(reuseport=unit.reuse_port, v6only=v6only))
            detail = f"Listen{listen.type}={listen.address}, {unit.active_state}"
            hostmap.claims.append(Claim(unit.name, bind, ClaimSource.SOCKET_UNIT, detail, will_run,
                                        triggers=unit.triggers))


def _listening_claims(hostmap: HostMap) -> None:
    """A running service's listeners count as its claims where nothing declares them."""
    for listener in hostmap.listeners:
        unit = listener.unit
        if listener.by_manager or not unit or not unit.endswith(".service"):
            continue
        local = listener.socket.local
        if any(c.unit == unit and c.bind.endpoint == local for c in hostmap.claims):
            continue
        v6only = listener.socket.v6only if listener.socket.v6only is not None else host_bindv6only()
        bind = Bind(local, SocketOptions(v6only=local.family == socket.AF_INET6 and v6only))
        pid = listener.process.pid if listener.process else "?"
        hostmap.claims.append(Claim(unit, bind, ClaimSource.LISTENING, f"PID {pid}, now", True))
