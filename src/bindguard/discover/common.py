"""What every daemon finder shares: findings, addresses, includes, host names, running a dump."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

from bindguard.endpoints import (
    TCP,
    AddressError,
    Bind,
    Endpoint,
    SocketOptions,
    host_bindv6only,
    ipv6_supported,
    parse_listen,
)

CONFIDENT = "confident"
GUESS = "guess"
DUMP_TIMEOUT = 10.0


class DaemonConfigError(Exception):
    """A daemon's configuration file that cannot be read or parsed; str() names the file (and line)."""


@dataclass(frozen=True)
class Finding:
    """One socket a unit will bind (or systemd binds for it), where that was learnt, and how sure it is."""

    bind: Bind
    source: str  # "/etc/nginx/sites-enabled/default:22", "sshd -T", "ExecStart=", "nginx.socket"
    confidence: str  # CONFIDENT or GUESS
    note: str = ""
    socket_unit: str | None = None  # set when systemd binds it (socket activation): the daemon does not

    @property
    def confident(self) -> bool:
        return self.confidence == CONFIDENT


@dataclass
class Findings:
    """What one finder learnt: findings, and warnings about what it could not read."""

    daemon: str
    findings: list[Finding] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add(self, endpoint: Endpoint, source: str, *, confident: bool = True, reuseaddr: bool = True,
            reuseport: bool = False, v6only: bool | None = None, freebind: bool = False, note: str = "") -> None:
        """Record a socket; v6only None means the daemon leaves the host default (net.ipv6.bindv6only)."""
        if endpoint.host.version == 4:
            v6only = False
        elif v6only is None:
            v6only = host_bindv6only()
        options = SocketOptions(reuseaddr=reuseaddr, reuseport=reuseport, v6only=v6only, freebind=freebind)
        bind = Bind(endpoint, options)
        if any(f.bind == bind for f in self.findings):
            return
        self.findings.append(Finding(bind, source, CONFIDENT if confident else GUESS, note))

    def warn(self, message: str) -> None:
        self.warnings.append(message)


def endpoint(host: str, port: int, proto: str = TCP) -> Endpoint:
    """An Endpoint from a literal address (no brackets) and a port; raises AddressError."""
    literal = f"[{host}]" if ":" in host else host
    return parse_listen(f"{proto}:{literal}:{port}")


def wildcard(port: int, version: int, proto: str = TCP) -> Endpoint:
    return endpoint("::" if version == 6 else "0.0.0.0", port, proto)


def any_dual(port: int, proto: str = TCP) -> Endpoint:
    """The all-addresses endpoint a dual-stack daemon binds: [::] where the host has IPv6, else 0.0.0.0."""
    return wildcard(port, 6 if ipv6_supported() else 4, proto)


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.split("%", 1)[0])
        return True
    except ValueError:
        return False


def hosts_file_addresses(name: str, hosts_file: str = "/etc/hosts") -> list[str]:
    """The addresses /etc/hosts gives a name, in file order. No DNS: the guard must not hang at boot."""
    found: list[str] = []
    try:
        with open(hosts_file, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split("#", 1)[0].split()
                if len(fields) >= 2 and name.lower() in (n.lower() for n in fields[1:]) and is_ip(fields[0]):
                    if fields[0] not in found:
                        found.append(fields[0])
    except OSError:
        pass
    if not found and name.lower() == "localhost":
        found = ["127.0.0.1", "::1"] if ipv6_supported() else ["127.0.0.1"]
    return found


def host_addresses(host: str, findings: Findings, where: str) -> list[str]:
    """A literal address as itself; a name through /etc/hosts, with a warning when it is not there."""
    if is_ip(host):
        return [host]
    addresses = hosts_file_addresses(host)
    if not addresses:
        findings.warn(f"{where}: host name {host!r} is not in /etc/hosts and bindguard does not ask DNS; "
                      f"that address is left out")
    return addresses


def expand_glob(pattern: str, base: str) -> list[str]:
    """An include pattern relative to base, its matches sorted as the daemons' glob() sorts them."""
    import glob

    path = pattern if os.path.isabs(pattern) else os.path.join(base, pattern)
    if glob.has_magic(path):
        return sorted(glob.glob(path))
    return [path]


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError as exc:
        raise DaemonConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None


def run_dump(argv: list[str], env: dict[str, str] | None = None) -> tuple[bool, str, str]:
    """Run a daemon's own configuration dump; (ok, stdout, the first line of the complaint)."""
    import subprocess

    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=DUMP_TIMEOUT,
                              env=env, stdin=subprocess.DEVNULL, errors="replace")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, "", f"{' '.join(argv)}: {exc}"
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        why = next((line for line in lines if "emerg" in line or "rror" in line), lines[0] if lines else "")
        return False, proc.stdout, f"{' '.join(argv)} failed (exit {proc.returncode}): {why.strip()}"
    return True, proc.stdout, ""


def parse_port(text: str, where: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise DaemonConfigError(f"{where}: {text!r} is not a port number")
    return int(text)


__all__ = [
    "AddressError", "CONFIDENT", "GUESS", "DaemonConfigError", "Finding", "Findings", "any_dual", "endpoint",
    "expand_glob", "host_addresses", "hosts_file_addresses", "is_ip", "parse_port", "read_text", "run_dump",
    "wildcard",
]
