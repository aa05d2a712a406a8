"""OpenSSH sshd: Port, ListenAddress and AddressFamily.

Reads sshd_config and its Includes, then prefers `sshd -T` (sshd's own effective configuration: it
prints one `listenaddress` per socket) when discover.dump allows it: as the unit's User=, or as
root only when root alone controls sshd, every file read and each EnvironmentFile=. sshd -T needs
the host keys and the privilege separation directory (/run/sshd, which the unit's
RuntimeDirectory= creates); where it cannot run, what was read from the files stands.
sshd sets SO_REUSEADDR on its listeners and IPV6_V6ONLY on the IPv6 ones (sshd.c, listen_on_addrs).
"""

from __future__ import annotations

import os
import shlex

from bindguard.model.endpoints import ascii_port
from bindguard.request.discover import dump
from bindguard.request.discover.common import (
    DAEMON_INCLUDE_DEPTH,
    AddressError,
    DaemonConfigError,
    Findings,
    IncludeDepth,
    bounded,
    endpoint,
    expand_glob,
    host_addresses,
    is_ip,
    parse_port,
    read_text,
)

DEFAULT_CONF = "/etc/ssh/sshd_config"
# sshd -T exits 255 without its privilege separation directory, which ssh.service's
# RuntimeDirectory=sshd makes before its ExecStartPre= runs: elsewhere it is not there.
PRIVSEP_DIR = "/run/sshd"


def _split_address(text: str) -> tuple[str, str | None]:
    """`host`, `host:port`, `[v6]:port` or a bare IPv6 address (no port)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else None
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, port
    return text, None


def _add(findings: Findings, host: str, port: int, source: str, family: str = "any") -> None:
    for address in host_addresses(host, findings, source):
        if (family == "inet" and ":" in address) or (family == "inet6" and ":" not in address):
            continue
        try:
            findings.add(endpoint(address, port), source, v6only=True)
        except AddressError as exc:
            findings.warn(f"{source}: {exc}")


def _from_dump(findings: Findings, text: str) -> None:
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "listenaddress":
            host, port = _split_address(value.strip())
            if port is not None:
                _add(findings, host, int(port), "sshd -T")


def _options(argv: list[str]) -> tuple[str | None, list[str], list[str], str | None]:
    """-f FILE, -o OPTION (repeatable), -p PORT (repeatable), -4/-6 from sshd's command line."""
    conf, options, ports, family = None, [], [], None
    i = 1
    while i < len(argv):
        arg = argv[i]
        flag, value = arg[:2], arg[2:]
        if flag in ("-f", "-o", "-p"):
            if not value and i + 1 < len(argv):
                value, i = argv[i + 1], i + 1
            if flag == "-f":
                conf = value
            elif flag == "-o":
                options.append(value)
            else:
                ports.append(value)
        elif arg in ("-4", "-6"):
            family = "inet" if arg == "-4" else "inet6"
        i += 1
    return conf, options, ports, family


class _Config:
    def __init__(self) -> None:
        self.ports: list[tuple[int, str]] = []
        self.listen: list[tuple[str, str | None, str]] = []
        self.family: str | None = None
        self.includes = IncludeDepth("Include", DAEMON_INCLUDE_DEPTH["sshd"])
        self.files: list[str] = []  # every file read

    def read(self, path: str, in_match: bool = False) -> bool:
        """Read a file; returns whether it ended inside a Match block."""
        with self.includes.entering(path):
            self.files.append(path)
            for number, line in enumerate(read_text(path).splitlines(), 1):
                try:
                    words = shlex.split(line, comments=True)
                except ValueError:
                    raise DaemonConfigError(f"{path}:{number}: unbalanced quotes") from None
                if not words:
                    continue
                key, args = words[0].lower(), words[1:]
                if "=" in key:
                    key, _, first = key.partition("=")
                    args = [first] + args
                where = f"{path}:{number}"
                if key == "match":
                    in_match = not (args and args[0].lower() == "all")
                elif key == "include":
                    for pattern in args:
                        for included in expand_glob(pattern, "/etc/ssh"):
                            if os.path.exists(included):
                                in_match = self.read(included, in_match)
                elif in_match:
                    continue
                elif key == "port" and args:
                    self.ports.append((parse_port(args[0], where), where))
                elif key == "listenaddress" and args:
                    host, port = _split_address(args[0])
                    self.listen.append((host, port, where))
                elif key == "addressfamily" and args and self.family is None:
                    self.family = args[0].lower()
        return in_match


def _from_files(findings: Findings, config: _Config, conf: str, cli_options: list[str], cli_ports: list[str],
                family: str | None) -> None:
    for option in cli_options:  # -o comes first: for most keywords the first value wins
        key, _, value = option.replace("=", " ", 1).partition(" ")
        if key.lower() == "addressfamily":
            config.family = value.strip().lower()
    config.read(conf)
    family = family or config.family or "any"
    ports = ([(port, "sshd -p") for port in map(ascii_port, cli_ports) if port] or config.ports
             or [(22, f"{conf} (default Port 22)")])
    listens = config.listen or [(host, None, where) for host in ("0.0.0.0", "::")
                                for where in [f"{conf} (no ListenAddress: all addresses)"]]
    for host, port_text, where in listens:
        if port_text is not None:
            _add(findings, host, parse_port(port_text, where), where, family)
        else:
            for port, port_where in ports:
                _add(findings, host, port, where if config.listen else port_where, family)


@bounded
def find(argv: list[str], env: dict[str, str], config: str | None = None) -> Findings:
    findings = Findings("sshd")
    conf, options, ports, family = _options(argv)
    conf = config or conf or DEFAULT_CONF
    from_files, read = Findings("sshd"), _Config()
    try:
        _from_files(from_files, read, conf, options, ports, family)
        problem = None
    except DaemonConfigError as exc:
        problem = exc
    program = argv[0] if argv else ""
    runs_as, refused = dump.allowed(program, None if problem else read.files)
    if refused:
        findings.warn(f"sshd -T not run: {refused}; reading {conf} instead")
    elif runs_as is not None and not os.path.isdir(PRIVSEP_DIR):
        # Checked here, not left to its failure: a dump that fails is never remembered
        # (bindguard.request.cache), a directory that is missing is, until it appears.
        findings.warn(f"sshd -T not run: {PRIVSEP_DIR}, its privilege separation directory, is missing "
                      f"(ssh.service's RuntimeDirectory= makes it); reading {conf} instead")
        runs_as = None
    if runs_as is not None:
        command = [program, "-T", "-f", conf] + [a for o in options for a in ("-o", o)]
        command += [a for p in ports for a in ("-p", p)] + ({"inet": ["-4"], "inet6": ["-6"]}.get(family or "", []))
        ok, out, why = dump.run(command, runs_as)
        if ok:
            if any(not is_ip(host.strip("[]")) for host, _, _ in read.listen):
                from bindguard.request.cache import incomplete

                incomplete("sshd -T resolves a ListenAddress host name itself (DNS)")
            _from_dump(findings, out)
            findings.all_survivable("sshd starts if at least one of its addresses binds")
            return findings
        findings.warn(f"{why}; reading {conf} instead")
    if problem is not None:
        findings.warn(f"sshd configuration: {problem}; its listen addresses are not known")
        return findings
    findings.findings += from_files.findings
    findings.warnings += from_files.warnings
    findings.all_survivable("sshd starts if at least one of its addresses binds")
    return findings
