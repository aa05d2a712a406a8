"""Redis: `bind` and `port` (and `tls-port`) from redis.conf, its `include`s and the command line.

`redis-server FILE --name value ...`: options after the file override it, as Redis applies them.
The last `bind`/`port` wins. Defaults (Redis 7): bind `* -::*`, port 6379; port 0 means no TCP.
`*` is every IPv4 address, `::*` every IPv6 address; a `-` before an address lets Redis start when
that address is on no interface (an address in use still stops it).
Redis sets SO_REUSEADDR, and IPV6_V6ONLY on IPv6 sockets (anet.c).
"""

from __future__ import annotations

import os
import shlex

from bindguard.model.host import ipv6_supported
from bindguard.request.discover.common import (
    AddressError,
    DaemonConfigError,
    Findings,
    IncludeDepth,
    bounded,
    endpoint,
    parse_port,
    read_text,
)

DEFAULT_PORT = 6379
DEFAULT_BIND = ["*", "-::*"]


class _Settings:
    def __init__(self) -> None:
        self.values: dict[str, tuple[list[str], str]] = {}
        self.includes = IncludeDepth("include")

    def set(self, key: str, args: list[str], where: str) -> None:
        if key in ("bind", "port", "tls-port"):
            self.values[key] = (args, where)

    def read(self, path: str) -> None:
        with self.includes.entering(path):
            for number, line in enumerate(read_text(path).splitlines(), 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                try:
                    words = shlex.split(line)
                except ValueError:
                    raise DaemonConfigError(f"{path}:{number}: unbalanced quotes") from None
                key, args = words[0].lower(), words[1:]
                if key == "include" and args:
                    self.read(args[0] if os.path.isabs(args[0]) else os.path.join(os.getcwd(), args[0]))
                else:
                    self.set(key, args, f"{path}:{number}")


@bounded
def find(argv: list[str], env: dict[str, str], config: str | None = None) -> Findings:
    findings = Findings("redis")
    settings = _Settings()
    args = argv[1:]
    conf = config
    if args and not args[0].startswith("-"):
        conf = conf or args[0]
        args = args[1:]
    try:
        if conf and conf != "-":
            settings.read(conf)
        i = 0
        while i < len(args):
            if args[i].startswith("--"):
                values = []
                j = i + 1
                while j < len(args) and not args[j].startswith("--"):
                    values += args[j].split()
                    j += 1
                settings.set(args[i][2:].lower(), values, f"redis-server {args[i]}")
                i = j
            else:
                i += 1
        _emit(findings, settings, conf)
    except DaemonConfigError as exc:
        findings.warn(f"redis configuration: {exc}; its listen addresses are not known")
        findings.findings.clear()
    return findings


def _emit(findings: Findings, settings: _Settings, conf: str | None) -> None:
    default_where = f"{conf} (default)" if conf else "redis-server (default)"
    bind, bind_where = settings.values.get("bind", (DEFAULT_BIND, default_where))
    ports = []
    for key, default in (("port", DEFAULT_PORT), ("tls-port", 0)):
        values, where = settings.values.get(key, ([str(default)], default_where))
        port = parse_port(values[0] if values else "", where)
        if port:
            ports.append(port)
    for address in bind:
        optional = address.startswith("-")
        host = address.lstrip("-")
        host = {"*": "0.0.0.0", "::*": "::"}.get(host, host)
        if optional and ":" in host and not ipv6_supported():
            continue  # Redis skips it: no IPv6 on this host (EAFNOSUPPORT counts as unavailable)
        note = "optional: Redis starts without it if the address is on no interface" if optional else ""
        survives = ("address-unavailable",) if optional else ()
        for port in ports:
            try:
                findings.add(endpoint(host, port), bind_where, v6only=True, note=note, survives=survives)
            except AddressError as exc:
                findings.warn(f"{bind_where}: {exc}")
