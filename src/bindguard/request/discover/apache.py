"""Apache httpd: `Listen` through Include/IncludeOptional, with <IfModule> and <IfDefine> evaluated.

Which file: Debian's `apachectl`/`apache2` read $APACHE_CONFDIR/apache2.conf (/etc/apache2);
`httpd` reads /etc/httpd/conf/httpd.conf; `-f FILE` and `-d SERVERROOT` override. Relative paths
are relative to ServerRoot. <IfModule> is decided from the LoadModule lines read so far (and the
modules compiled in), <IfDefine> from `-D` and Define; the content of other conditional sections
(<IfVersion>, <IfFile>, ...) is taken as active, and what it adds is labelled a guess.
Sockets as Apache opens them (server/listen.c): SO_REUSEADDR; `Listen PORT` is one [::] socket that
accepts IPv4 too (v4-mapped, Apache's default on Linux), and a 0.0.0.0 listener on a port where such
a socket exists is not opened.
"""

from __future__ import annotations

import os
import re

from bindguard.model.endpoints import ascii_port
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
    expand_glob,
    host_addresses,
    list_directory,
    read_text,
)

STATIC_MODULES = {"core_module", "so_module", "watchdog_module", "http_module", "log_config_module",
                  "logio_module", "version_module", "unixd_module", "core.c", "mod_so.c", "mod_watchdog.c",
                  "http_core.c", "mod_log_config.c", "mod_logio.c", "mod_version.c", "mod_unixd.c"}
VARIABLE = re.compile(r"\$\{([A-Za-z0-9_]+)\}")


class _Config:
    def __init__(self, server_root: str, defines: dict[str, str], findings: Findings, env: dict[str, str]) -> None:
        self.server_root = server_root
        self.defines = defines
        self.env = env  # the unit's (Environment=, EnvironmentFile=), as apache2 gets it from systemd
        self.findings = findings
        self.modules = set(STATIC_MODULES)
        self.listens: list[tuple[str, str, bool, str]] = []  # (address, where, confident, note)
        self.includes = IncludeDepth("Include", DAEMON_INCLUDE_DEPTH["apache"])

    def expand(self, text: str) -> str:
        return VARIABLE.sub(lambda m: self.defines.get(m.group(1), self.env.get(m.group(1), m.group(0))), text)

    def path(self, text: str) -> str:
        text = self.expand(text)
        return text if os.path.isabs(text) else os.path.join(self.server_root, text)

    def read(self, path: str) -> None:
        with self.includes.entering(path):
            lines = read_text(path).splitlines()
            stack: list[tuple[str, bool, bool, str]] = []  # (section, active, certain, where)
            continued = ""
            start = 0
            for number, raw in enumerate(lines, 1):
                if continued == "":
                    start = number
                if raw.endswith("\\"):
                    continued += raw[:-1] + " "
                    continue
                line = (continued + raw).strip()
                continued = ""
                if not line or line.startswith("#"):
                    continue
                where = f"{path}:{start}"
                active = all(a for _, a, _, _ in stack)
                certain = all(c for _, _, c, _ in stack)
                if line.startswith("</"):
                    name = line[2:].rstrip(">").strip().lower()
                    if not stack or stack[-1][0] != name:
                        raise DaemonConfigError(f"{where}: {excerpt(line)} without a matching opening section")
                    stack.pop()
                    continue
                if line.startswith("<"):
                    if not line.endswith(">"):
                        raise DaemonConfigError(f"{where}: section {excerpt(line)} is not closed with '>'")
                    name, _, arg = line[1:-1].strip().partition(" ")
                    stack.append((name.lower(), *self.condition(name.lower(), self.expand(arg.strip().strip("\"'")),
                                                                 where), where))
                    continue
                if not active:
                    continue
                directive, _, rest = line.partition(" ")
                directive = directive.lower()
                args = self.expand(rest).split()
                if directive == "loadmodule" and len(args) >= 2:
                    self.modules.add(args[0])
                    self.modules.add(os.path.basename(args[1]).rsplit(".", 1)[0] + ".c")
                elif directive == "define" and args:
                    self.defines[args[0]] = args[1] if len(args) > 1 else ""
                elif directive == "serverroot" and args:
                    self.server_root = args[0].strip("\"'")
                elif directive in ("include", "includeoptional") and args:
                    if self.includes.full:  # Apache counts the directive, whatever it names
                        raise self.includes.too_deep(where)
                    matches = expand_glob(self.path(args[0].strip("\"'")), "/")
                    for included in matches:
                        if os.path.isdir(included):
                            included_files = [os.path.join(included, n) for n in list_directory(included)]
                        else:
                            included_files = [included]
                        for file in included_files:
                            if os.path.isfile(file):
                                self.read(file)
                            elif directive == "include" and not any(c in args[0] for c in "*?["):
                                raise DaemonConfigError(f"{where}: Include {args[0]}: no such file")
                elif directive == "listen" and args:
                    sections = [s for s, _, c, _ in stack if not c]
                    note = f"inside <{sections[0]}>, taken as active" if sections else ""
                    self.listens.append((args[0], where, certain, note))
            if stack:
                raise DaemonConfigError(f"{stack[-1][3]}: <{stack[-1][0]}> is not closed")

    def condition(self, section: str, arg: str, where: str) -> tuple[bool, bool]:
        """(active, certain) for a section's content."""
        negate = arg.startswith("!")
        name = arg.lstrip("!")
        if section == "ifmodule":
            return (name in self.modules) != negate, True
        if section == "ifdefine":
            return (name in self.defines) != negate, True
        if section in ("virtualhost", "directory", "directorymatch", "files", "filesmatch", "location",
                       "locationmatch", "proxy", "proxymatch", "limit", "limitexcept", "macro"):
            return True, True
        return True, False


def _envvars(confdir: str) -> dict[str, str]:
    values: dict[str, str] = {}
    try:
        text = read_text(os.path.join(confdir, "envvars"))
    except DaemonConfigError:
        return values
    for line in text.splitlines():
        match = re.match(r"^\s*export\s+([A-Za-z_]\w*)=(\S*)\s*$", line)
        if match:
            values[match.group(1)] = match.group(2).replace("$SUFFIX", "").strip("\"'")
    return values


@bounded
def find(argv: list[str], env: dict[str, str], config: str | None = None) -> Findings:
    findings = Findings("apache")
    name = os.path.basename(argv[0]) if argv else "apache2"
    confdir = env.get("APACHE_CONFDIR", "/etc/apache2")
    debian = name in ("apache2", "apache2ctl") or (name == "apachectl" and os.path.isdir(confdir))
    server_root = confdir if debian else "/etc/httpd"
    conf = os.path.join(confdir, "apache2.conf") if debian else "conf/httpd.conf"
    defines: dict[str, str] = {}
    words = list(argv[1:]) + env.get("APACHE_ARGUMENTS", "").split()
    i = 0
    while i < len(words):
        flag, value = words[i][:2], words[i][2:]
        if flag in ("-f", "-d", "-D", "-C", "-c") and not value and i + 1 < len(words):
            value, i = words[i + 1], i + 1
        if flag == "-f":
            conf = value
        elif flag == "-d":
            server_root = value
        elif flag == "-D":
            defines[value] = ""
        i += 1
    conf = config or conf
    if debian:
        defines.update({k: v for k, v in _envvars(confdir).items() if k not in defines})
    parsed = _Config(server_root, defines, findings, env)
    main = conf if os.path.isabs(conf) else os.path.join(server_root, conf)
    try:
        parsed.read(main)
    except DaemonConfigError as exc:
        findings.warn(f"apache configuration: {exc}; its listen addresses are not known")
        return findings
    _emit(parsed, findings)
    return findings


def _emit(parsed: _Config, findings: Findings) -> None:
    seen: dict[tuple[str, int], str] = {}
    dual_ports = set()
    pending = []
    for address, where, certain, note in parsed.listens:
        if address.isascii() and address.isdigit():
            host, port_text = "", address
        elif address.startswith("["):
            host, _, rest = address[1:].partition("]")
            port_text = rest[1:]
        else:
            host, _, port_text = address.rpartition(":")
        port = ascii_port(port_text)
        if not port:
            findings.warn(f"{where}: Listen {excerpt(address)}: no valid port; Apache refuses it")
            continue
        if (host, port) in seen:
            findings.warn(f"{where}: Listen {excerpt(address)} repeats {seen[(host, port)]}; "
                          f"Apache refuses to start")
            continue
        seen[(host, port)] = where
        if host in ("", "::") and ipv6_supported():
            dual_ports.add(port)
        pending.append((host, port, where, certain, note))
    for host, port, where, certain, note in pending:
        if host == "0.0.0.0" and port in dual_ports:
            continue
        try:
            if host == "":
                findings.add(any_dual(port), where, confident=certain, v6only=False, note=note)
                continue
            for a in ([host] if host in ("0.0.0.0", "::") else host_addresses(host, findings, where)):
                findings.add(endpoint(a, port), where, confident=certain, v6only=False, note=note)
        except AddressError as exc:
            findings.warn(f"{where}: {exc}")
