"""HAProxy: `bind` lines in frontend, listen and peers sections of every `-f` file (or directory).

Address forms: `:80` and `*:80` (every IPv4 address), `0.0.0.0:80`, `:::80` and `[::]:80`, `ipv6@:80`,
several addresses in one line (`bind :80,:443`), port ranges (`:8000-8003`), `udp@`/`quic4@` (UDP);
`unix@`, `abns@`, `fd@`, `sockpair@` and paths are not IP sockets. Options: `v4v6` (IPv6 socket that
accepts IPv4), `v6only`, otherwise the host default; `transparent`/`freebind` let a non-local
address bind. HAProxy sets SO_REUSEADDR, and SO_REUSEPORT unless `noreuseport` (global) or `-dR`.
"""

from __future__ import annotations

import os
import re
import shlex

from bindguard.model.endpoints import TCP, UDP, ascii_port
from bindguard.model.text import excerpt
from bindguard.request.discover.common import (
    AddressError,
    DaemonConfigError,
    Findings,
    bounded,
    endpoint,
    host_addresses,
    list_directory,
    read_text,
)

DEFAULT_CONF = "/etc/haproxy/haproxy.cfg"
SECTIONS = {"global", "defaults", "frontend", "backend", "listen", "peers", "resolvers", "userlist", "cache",
            "program", "http-errors", "ring", "mailers", "crt-store", "traces", "log-forward", "fcgi-app"}
BIND_SECTIONS = {"frontend", "listen", "peers", "log-forward"}
NOT_IP = ("unix@", "abns@", "abnsz@", "fd@", "sockpair@", "uxst@", "uxdg@", "rhttp@", "/")
UDP_PREFIXES = ("udp@", "udp4@", "udp6@", "quic4@", "quic6@")
IPV6_PREFIXES = ("ipv6@", "udp6@", "quic6@", "tcp6@")
MAX_RANGE = 1024


def _files(argv: list[str], config: str | None) -> tuple[list[str], bool]:
    """The -f files and directories in order, and whether -dR (no SO_REUSEPORT) was given."""
    paths, no_reuseport = [], False
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg in ("-f", "-C") and i + 1 < len(argv):
            if arg == "-f":
                paths.append(argv[i + 1])
            i += 1
        elif arg.startswith("-f") and len(arg) > 2:
            paths.append(arg[2:])
        elif arg == "-dR":
            no_reuseport = True
        i += 1
    if config:
        paths = [config]
    files = []
    for path in paths or [DEFAULT_CONF]:
        if os.path.isdir(path):
            files += [os.path.join(path, n) for n in list_directory(path) if n.endswith(".cfg")]
        else:
            files.append(path)
    return files, no_reuseport


def _expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{([A-Za-z_]\w*)\}", lambda m: env.get(m.group(1), ""), text)


@bounded
def find(argv: list[str], env: dict[str, str], config: str | None = None) -> Findings:
    findings = Findings("haproxy")
    binds: list[tuple[str, list[str], str]] = []
    try:
        files, no_reuseport = _files(argv, config)
        for path in files:
            section = None
            for number, line in enumerate(read_text(path).splitlines(), 1):
                try:
                    words = shlex.split(_expand(line, env), comments=True)
                except ValueError:
                    raise DaemonConfigError(f"{path}:{number}: unbalanced quotes") from None
                if not words:
                    continue
                keyword = words[0].lower()
                if keyword in SECTIONS:
                    section = keyword
                elif keyword == "noreuseport" and section == "global":
                    no_reuseport = True
                elif keyword == "bind" and section in BIND_SECTIONS:
                    if len(words) < 2:
                        raise DaemonConfigError(f"{path}:{number}: bind without an address")
                    binds.append((words[1], words[2:], f"{path}:{number}"))
    except DaemonConfigError as exc:
        findings.warn(f"haproxy configuration: {exc}; its listen addresses are not known")
        return findings
    for addresses, options, where in binds:
        v6only = True if "v6only" in options else False if "v4v6" in options else None
        freebind = "transparent" in options or "freebind" in options
        for address in addresses.split(","):
            _bind(findings, address, where, v6only=v6only, freebind=freebind, reuseport=not no_reuseport)
    return findings


def _bind(findings: Findings, address: str, where: str, **options) -> None:
    lowered = address.lower()
    if lowered.startswith(NOT_IP) or not address:
        return
    proto = UDP if lowered.startswith(UDP_PREFIXES) else TCP
    version = 6 if lowered.startswith(IPV6_PREFIXES) else None
    if "@" in address:
        address = address.split("@", 1)[1]
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        ports = rest[1:]
    else:
        host, _, ports = address.rpartition(":")
    if host in ("", "*"):
        host = "::" if version == 6 else "0.0.0.0"
    low, _, high = ports.partition("-")
    first, last = ascii_port(low), ascii_port(high or low)
    if first is None or last is None:
        findings.warn(f"{where}: bind {excerpt(address)}: no valid port")
        return
    if last - first >= MAX_RANGE:
        findings.warn(f"{where}: bind {excerpt(address)}: a range of more than {MAX_RANGE} ports; "
                      f"only the first are checked")
        last = first + MAX_RANGE - 1
    for a in ([host] if host in ("0.0.0.0", "::") else host_addresses(host, findings, where)):
        for port in range(first, last + 1):
            try:
                findings.add(endpoint(a, port, proto), where, **options)
            except AddressError as exc:
                findings.warn(f"{where}: {exc}")
                return
