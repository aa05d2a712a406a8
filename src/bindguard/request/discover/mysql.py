"""MariaDB and MySQL: `bind-address`, `port` and `skip-networking` from the option files and argv.

Option files as the server reads them: /etc/my.cnf, /etc/mysql/my.cnf (Debian: `!includedir`s of
conf.d and mariadb.conf.d), ~/.my.cnf; `--defaults-file=F` replaces them, `--defaults-extra-file=F`
adds one. Groups the server reads: [mysqld], [server], [mariadb], [mariadbd], [client-server],
and their -VERSION forms. The last value wins; the command line comes last. `-` and `_` are the same
in names, and a `loose-` prefix is dropped.
Defaults: every address (`*`), port 3306 (MYSQL_TCP_PORT); a host name binds its first IPv4 address.
Sockets, as checked against MariaDB 10.11 running in a network namespace: SO_REUSEADDR, and
IPV6_V6ONLY on every IPv6 socket, so `*` (and no bind-address) is two sockets, 0.0.0.0 and [::],
and `::` is IPv6 only. MySQL (per its manual) binds `*` and `::` as one dual-stack [::] socket.
"""

from __future__ import annotations

import os
import re

from bindguard.model.host import ipv6_supported
from bindguard.model.text import excerpt
from bindguard.request.discover.common import (
    DAEMON_INCLUDE_DEPTH,
    AddressError,
    DaemonConfigError,
    Findings,
    IncludeDepth,
    any_dual,
    bounded,
    endpoint,
    host_addresses,
    list_directory,
    parse_port,
    read_text,
)

DEFAULT_FILES = ("/etc/my.cnf", "/etc/mysql/my.cnf", os.path.expanduser("~/.my.cnf"))
SERVER_GROUPS = re.compile(r"^(mysqld|server|mariadb|mariadbd|client-server|galera)(-[\d.]+)?$")
WANTED = ("bind-address", "port", "skip-networking", "extra-port")


class _Options:
    def __init__(self) -> None:
        self.values: dict[str, tuple[str, str]] = {}
        self.includes = IncludeDepth("!include", DAEMON_INCLUDE_DEPTH["mysql"])
        self.skipped: list[str] = []  # warnings: directives nested too deep, which the server skips too

    def set(self, name: str, value: str, where: str) -> None:
        name = name.strip().lower().replace("_", "-")
        name = name[len("loose-"):] if name.startswith("loose-") else name
        if name in ("networking", "enable-networking"):
            name, value = "skip-networking", "0" if _flag(value) else "1"
        elif name == "disable-networking":
            name = "skip-networking"
        if name in WANTED:
            self.values[name] = (value, where)

    def read(self, path: str) -> None:
        with self.includes.entering(path):
            group = None
            first_skipped, skipped = "", 0  # one warning for the file, not one a line: it may hold 1 MiB of them
            for number, raw in enumerate(read_text(path).splitlines(), 1):
                line = raw.strip()
                if not line or line[0] in "#;":
                    continue
                where = f"{path}:{number}"
                if line.startswith("!") and self.includes.full:
                    first_skipped = first_skipped or f"{where}: {excerpt(line)} not read"
                    skipped += 1
                    continue
                if line.startswith("!include "):
                    self.read(line.split(None, 1)[1].strip())
                    continue
                if line.startswith("!includedir "):
                    directory = line.split(None, 1)[1].strip()
                    if not os.path.isdir(directory):
                        continue
                    for name in list_directory(directory):
                        if name.endswith(".cnf") and os.path.isfile(os.path.join(directory, name)):
                            self.read(os.path.join(directory, name))
                    continue
                if line.startswith("["):
                    if not line.endswith("]"):
                        raise DaemonConfigError(f"{where}: wrong group definition {excerpt(line)}")
                    group = line[1:-1].strip().lower()
                    continue
                if group is None:
                    raise DaemonConfigError(f"{where}: an option outside any [group]")
                if not SERVER_GROUPS.match(group):
                    continue
                name, eq, value = line.partition("=")
                value = value.split("#", 1)[0].strip() if eq else "1"
                if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                    value = value[1:-1]
                self.set(name, value, where)
            if skipped:
                more = f", nor the {skipped - 1} `!` lines after it" if skipped > 1 else ""
                self.skipped.append(f"{first_skipped}{more}: the server skips a `!` directive in a file included "
                                    f"{self.includes.limit} deep, with a warning")


def _flag(value: str) -> bool:
    return value.lower() not in ("0", "off", "false", "no")


@bounded
def find(argv: list[str], env: dict[str, str], config: str | None = None) -> Findings:
    binary = argv[0] if argv else "mysqld"
    mariadb = "mariadb" in os.path.basename(binary) or "mariadb" in os.path.basename(os.path.realpath(binary))
    findings = Findings("mariadb" if mariadb else "mysqld")
    args = argv[1:]
    defaults_file = config
    extra = None
    cli: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--defaults-file="):
            defaults_file = defaults_file or arg.split("=", 1)[1]
        elif arg.startswith("--defaults-extra-file="):
            extra = arg.split("=", 1)[1]
        elif arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            cli.append((name, value if eq else "1"))
        elif arg in ("-P", "-h") and i + 1 < len(args):
            cli.append(("port" if arg == "-P" else "bind-address", args[i + 1]))
            i += 1
        elif arg.startswith("-P") and len(arg) > 2:
            cli.append(("port", arg[2:]))
        i += 1
    options = _Options()
    files = [defaults_file] if defaults_file else [f for f in DEFAULT_FILES if os.path.isfile(f)]
    if extra:
        files.append(extra)
    try:
        for path in files:
            options.read(path)
    except DaemonConfigError as exc:
        findings.warn(f"{findings.daemon} configuration: {exc}; its listen addresses are not known")
        return findings
    for skipped in options.skipped:
        findings.warn(skipped)
    for name, value in cli:
        options.set(name, value, f"{os.path.basename(argv[0])} --{name}")
    if "skip-networking" in options.values and _flag(options.values["skip-networking"][0]):
        return findings
    first = files[0] if files else os.path.basename(argv[0] if argv else "mysqld")
    default_port = env.get("MYSQL_TCP_PORT", "3306")
    port_text, port_where = options.values.get("port", (default_port, f"{first} (default port)"))
    addresses, where = options.values.get("bind-address", ("*", f"{first} (default bind-address)"))
    try:
        port = parse_port(port_text, port_where) or 3306
        ports = [port]
        if "extra-port" in options.values:
            extra_port = parse_port(*options.values["extra-port"])
            if extra_port:
                ports.append(extra_port)
    except DaemonConfigError as exc:
        findings.warn(f"{findings.daemon} configuration: {exc}")
        return findings
    for host in (h.strip() for h in addresses.split(",")):
        for port in ports:
            if host in ("*", "") and mariadb:
                findings.add(endpoint("0.0.0.0", port), where)
                if ipv6_supported():
                    findings.add(endpoint("::", port), where, v6only=True)
                continue
            if host in ("*", ""):
                findings.add(any_dual(port), where, v6only=False)
                continue
            if host == "::":
                findings.add(endpoint("::", port), where, v6only=mariadb)
                continue
            resolved = host_addresses(host, findings, where)
            if not resolved:
                continue
            choice = next((a for a in resolved if ":" not in a), resolved[0])
            try:
                findings.add(endpoint(choice, port), where, v6only=True)
            except AddressError as exc:
                findings.warn(f"{where}: {exc}")
    return findings
