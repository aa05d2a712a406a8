"""Guesses from a command line and its environment, and the sockets a unit's .socket units hold.

For a daemon bindguard does not know, the common forms are read from ExecStart= and the
environment: --port 8080, --port=8080, -p 8080, --bind 0.0.0.0:8080, --listen :8080,
--web.listen-address=:9100, --host H --port P, PORT=8080, LISTEN=..., HTTP_PORT=... Each is a
guess (what an option means is the daemon's business), and a port without an address is taken
as all addresses.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from bindguard.model.endpoints import TCP, UDP, Endpoint, ascii_port, parse_listen
from bindguard.model.kinds import Confidence
from bindguard.request.discover.common import AddressError, Findings, any_dual, endpoint, is_ip

ADDRESS_WORDS = {"port", "listen", "bind"}
HOST_OPTIONS = {"host", "address", "addr", "bind-address", "bind-addr", "listen-host"}
SHORT_PORT = {"-p": "port", "-b": "bind"}
ENV_NAME = re.compile(r"^(?:[A-Z0-9]+_)*(PORT|LISTEN|BIND|LISTEN_ADDR(?:ESS)?|BIND_ADDR(?:ESS)?)$")
SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


def _words(option: str) -> list[str]:
    return [w for w in re.split(r"[-_.]", option.lower().lstrip("-")) if w]


def parse_value(value: str) -> list[Endpoint]:
    """Endpoints from an option's value: 8080, :8080, host:8080, [::1]:8080, http://0.0.0.0:8080, lists."""
    endpoints = []
    for part in re.split(r"[,\s]+", value.strip()):
        part = SCHEME.sub("", part).rstrip("/")
        if not part:
            continue
        if part.isascii() and part.isdigit():
            port = ascii_port(part)
            if port:
                endpoints.append(any_dual(port))
            continue
        host, sep, port_text = part.rpartition(":")
        port = ascii_port(port_text)
        if not sep or not port:
            continue
        host = host.strip("[]")
        try:
            if host in ("", "*"):
                endpoints.append(any_dual(port))
            elif is_ip(host):
                endpoints.append(endpoint(host, port))
        except AddressError:
            continue
    return endpoints


def _options(argv: Sequence[str]) -> list[tuple[str, str]]:
    """(option, value) pairs: --name=value, --name value, -p value."""
    pairs = []
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "=" in arg:
            name, _, value = arg.partition("=")
            pairs.append((name, value))
        elif (arg.startswith("--") or arg in SHORT_PORT) and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            pairs.append((arg, argv[i + 1]))
            i += 1
        i += 1
    return pairs


def find_in_command_lines(commands: Sequence[Sequence[str]], env: dict[str, str]) -> Findings:
    findings = Findings("command line")
    for argv in commands:
        pairs = _options(argv)
        host = next((v for n, v in pairs if n.lstrip("-").lower() in HOST_OPTIONS and is_ip(v.strip("[]"))), None)
        for name, value in pairs:
            words = _words(SHORT_PORT.get(name, name))
            if not ADDRESS_WORDS & set(words):
                continue
            for ep in parse_value(value):
                note = f"read from {name} {value}"
                if value.strip().isdigit() and host is not None:
                    try:
                        ep = endpoint(host.strip("[]"), ep.port)
                    except AddressError:  # an IP is_ip() takes that no socket can bind (fe80::1, no zone)
                        continue
                elif value.strip().isdigit():
                    note += "; no address given, so all addresses"
                findings.add(ep, "ExecStart=", confident=False, note=note)
    for name, value in sorted(env.items()):
        if ENV_NAME.match(name):
            for ep in parse_value(value):
                note = f"read from {name}={value}" + ("; no address given, so all addresses"
                                                     if value.strip().isdigit() else "")
                findings.add(ep, f"Environment {name}=", confident=False, note=note)
    return findings


def find_in_socket_listens(listens: Sequence[tuple], unit: str) -> Findings:
    """The IP sockets of the unit's .socket units: systemd binds them (SO_REUSEADDR), the daemon inherits.

    Each entry: (type, address[, socket unit[, BindIPv6Only=[, ReusePort=]]]), e.g. ("Stream", "[::]:80").
    """
    from bindguard.model.endpoints import Bind, SocketOptions
    from bindguard.model.host import host_bindv6only
    from bindguard.request.discover.common import Finding

    findings = Findings("socket units")
    for listen in listens:
        kind, address = listen[0], listen[1]
        socket_unit = listen[2] if len(listen) > 2 else unit.rsplit(".", 1)[0] + ".socket"
        bind_ipv6_only = listen[3] if len(listen) > 3 else "default"
        reuse_port = bool(listen[4]) if len(listen) > 4 else False
        proto = {"Stream": TCP, "Datagram": UDP}.get(kind)
        if proto is None:
            continue
        try:
            ep = parse_listen(address, proto)
        except AddressError:
            continue  # AF_UNIX, netlink, FIFOs...: nothing to guard
        v6only = {"ipv6-only": True, "both": False}.get(bind_ipv6_only, host_bindv6only())
        options = SocketOptions(reuseaddr=True, reuseport=reuse_port, v6only=ep.host.version == 6 and v6only)
        findings.findings.append(Finding(Bind(ep, options), socket_unit, Confidence.CONFIDENT,
                                         "systemd binds this socket and passes it to the service",
                                         socket_unit=socket_unit))
    return findings
