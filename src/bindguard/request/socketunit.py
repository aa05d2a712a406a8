"""What a .socket unit's guard checks: the unit's own IP sockets, as its manager will bind them.

A socket unit's ExecStartPre= runs before the manager creates and binds its sockets, so the
guard can ask the kernel first. The sockets are the unit's ListenStream= (TCP) and
ListenDatagram= (UDP) entries that are IP addresses, with SO_REUSEADDR (systemd always sets
it) and the unit's ReusePort=, BindIPv6Only=, FreeBind=, Transparent= (IP_TRANSPARENT lets a
non-local address bind, as IP_FREEBIND does) and BindToDevice=. Read from the unit files, without
D-Bus; over D-Bus only for a unit with no file on disk. What the trial cannot ask as the manager
would (SCTP: ListenSequentialPacket= and SocketProtocol=sctp; UDP-Lite) is left out with a
warning, so it can never refuse a start.
"""

from __future__ import annotations

from bindguard.model.endpoints import TCP, UDP, AddressError, Bind, SocketOptions, parse_listen
from bindguard.model.facts import SocketUnitSettings
from bindguard.model.host import host_bindv6only
from bindguard.model.record import Record, field, replace

TYPES = {"Stream": TCP, "Datagram": UDP}


class SocketUnitRequest(Record):
    binds: list[Bind] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # "[::]:8080 from web.socket's ListenStream="
    warnings: list[str] = field(default_factory=list)  # entries left out, and why


def binds_of(unit: str, settings: SocketUnitSettings, overrides: dict[str, bool] | None = None) -> SocketUnitRequest:
    """The sockets the manager will bind for unit, as Binds (options from the command line win)."""
    request = SocketUnitRequest()
    protocol = settings.protocol if settings.protocol in ("sctp", "udplite") else ""
    for kind, address in settings.listens:
        try:
            endpoint = parse_listen(address, default_proto=TYPES.get(kind, TCP))
        except AddressError:
            continue  # a file system path, an abstract name, vsock: not an IP socket
        where = f"{unit}'s Listen{kind}={address}"
        if kind not in TYPES or protocol == "sctp" or (protocol == "udplite" and kind == "Datagram"):
            what = "an SCTP" if kind != "Datagram" else "a UDP-Lite"
            request.warnings.append(f"{where} is not checked: it is {what} socket, which the trial bind "
                                    "does not try")
            continue
        if endpoint.host.version == 6 and settings.bind_ipv6_only != "default":
            v6only = settings.bind_ipv6_only == "ipv6-only"
        else:
            v6only = host_bindv6only()
        options = SocketOptions(reuseaddr=True, reuseport=settings.reuse_port, v6only=v6only,
                                freebind=settings.free_bind or settings.transparent)
        bind = Bind(endpoint, replace(options, **(overrides or {})), settings.bind_to_device)
        if bind not in request.binds:
            request.binds.append(bind)
            request.sources.append(f"{bind} from {where}")
    return request


def settings_of(unit: str, user: bool, ctx) -> tuple[SocketUnitSettings | None, str]:
    """The unit's settings from its files, else over D-Bus; (None, why) when neither has them."""
    from bindguard.systemd.unitfacts import socket_unit_from_files

    settings = socket_unit_from_files(unit, user)
    if settings is not None:
        return settings, ""
    if ctx is None:
        return None, f"no unit file of {unit} on disk, and --no-systemd"
    from bindguard.systemd.bus import SystemdError

    connection = ctx.connection()
    if connection is None:
        return None, f"no unit file of {unit} on disk, and no bus"
    try:
        return connection.socket_unit_settings(unit), ""
    except SystemdError as exc:
        return None, str(exc)
