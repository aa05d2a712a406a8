"""nginx: every `listen` in http, stream and mail servers, through `include`s.

Reads the files from disk first (which files, and which modules they load), then prefers them as
`nginx -T` dumps them (nginx itself resolved the includes and found the configuration valid) when
discover.dump allows the dump: nginx runs as the unit's User=, or as root only when root alone
controls nginx, every file read and every module loaded. Otherwise, or when `nginx -T` fails, what
was read from disk stands.
Socket options as nginx sets them (ngx_open_listening_sockets): SO_REUSEADDR on every listening
socket, SO_REUSEPORT with `reuseport`, IPV6_V6ONLY on unless `ipv6only=off` (the default since 1.3.4).
Like nginx, a specific address on a port where the same server group also listens on the wildcard
is served by the wildcard socket and gets no socket of its own, unless `bind` (or a parameter that
implies it) is given. An http server without `listen` listens on *:80 (nginx run as root).
"""

from __future__ import annotations

import os
import re

from bindguard.model.endpoints import TCP, UDP, Endpoint, ascii_port
from bindguard.model.record import Record
from bindguard.model.text import excerpt
from bindguard.request.discover import dump
from bindguard.request.discover.common import (
    AddressError,
    DaemonConfigError,
    Findings,
    IncludeDepth,
    bounded,
    endpoint,
    expand_glob,
    host_addresses,
    read_text,
)

DEFAULT_CONF = "/etc/nginx/nginx.conf"
DEFAULT_PREFIX = "/usr/share/nginx"
GROUPS = ("http", "stream", "mail")
IMPLY_BIND = ("bind", "deferred", "reuseport")
IMPLY_BIND_PREFIXES = ("backlog=", "rcvbuf=", "sndbuf=", "setfib=", "fastopen=", "accept_filter=", "ipv6only=",
                       "so_keepalive=")


class _Listen(Record):
    group: str
    endpoint: Endpoint
    v6only: bool
    reuseport: bool
    bind: bool
    source: str
    note: str = ""


def _tokens(text: str, path: str):
    """(token, line, quoted) as ngx_conf_read_token splits them; ';', '{' and '}' are tokens of their own."""
    i, line, n = 0, 1, len(text)
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
            i += 1
        elif c.isspace():
            i += 1
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif c in ";{}":
            yield c, line, False
            i += 1
        elif c in "\"'":
            start_line, j, out = line, i + 1, []
            while j < n and text[j] != c:
                if text[j] == "\\" and j + 1 < n:
                    j += 1
                if text[j] == "\n":
                    line += 1
                out.append(text[j])
                j += 1
            if j >= n:
                raise DaemonConfigError(f"{path}:{start_line}: unterminated quoted string")
            yield "".join(out), start_line, True
            i = j + 1
        else:
            j = i
            while j < n and not text[j].isspace() and text[j] not in ";{}":
                if text[j] == "\\" and j + 1 < n:
                    j += 1
                j += 1
            yield text[i:j], line, False
            i = j


class _Parser:
    def __init__(self, prefix: str, files: dict[str, str] | None, label: str, findings: Findings,
                 module_prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix  # of include paths: the configuration file's directory
        self.module_prefix = module_prefix  # of load_module paths: nginx's -p, else its compiled-in prefix
        self.files = files  # from `nginx -T`; None: read from disk
        self.label = label
        self.findings = findings
        self.listens: list[_Listen] = []
        self.server_listens: list[int] = []  # listen directives seen in each open server block
        self.includes = IncludeDepth("include")
        self.read: list[str] = []  # every file parsed
        self.modules: list[str] = []  # every load_module path

    def text(self, path: str) -> str:
        if self.files is not None:
            if path not in self.files:
                raise DaemonConfigError(f"{path}: not in the nginx -T dump")
            return self.files[path]
        return read_text(path)

    def parse_file(self, path: str, contexts: list[str]) -> None:
        with self.includes.entering(path):
            self.read.append(path)
            tokens = _tokens(self.text(path), path)
            self._block(tokens, path, contexts, closing=False)

    def _includes(self, pattern: str) -> list[str]:
        if self.files is not None:
            import fnmatch

            full = pattern if os.path.isabs(pattern) else os.path.join(self.prefix, pattern)
            return sorted(p for p in self.files if fnmatch.fnmatchcase(p, full))
        return expand_glob(pattern, self.prefix)

    def _block(self, tokens, path: str, contexts: list[str], closing: bool) -> None:
        words: list[tuple[str, int]] = []
        for token, line, quoted in tokens:
            if quoted or token not in ";{}":
                words.append((token, line))
                continue
            if token == "}":
                if words or not closing:
                    raise DaemonConfigError(f"{path}:{line}: unexpected '}}'")
                return
            if not words:
                raise DaemonConfigError(f"{path}:{line}: unexpected '{token}'")
            name, first_line = words[0]
            args = [w for w, _ in words[1:]]
            words = []
            if token == "{":
                inner = contexts + [name]
                if name == "server":
                    self.server_listens.append(0)
                self._block(tokens, path, inner, closing=True)
                if name == "server" and self.server_listens.pop() == 0 and contexts[-1] == "http":
                    self._default_listen(path, first_line)
                continue
            if name == "include" and args:
                for included in self._includes(args[0]):
                    self.parse_file(included, contexts)
            elif name == "load_module" and args:
                self.modules.append(os.path.join(self.module_prefix, args[0]))
            elif name == "listen" and args and contexts[-1] == "server" and len(contexts) >= 2:
                group = contexts[-2]
                if group in GROUPS:
                    self.server_listens[-1] += 1
                    self._listen(group, args, f"{path}:{first_line}{self.label}")
        if words:
            raise DaemonConfigError(f"{path}: unexpected end of file, expecting ';' after the directive at line "
                                    f"{words[0][1]}")
        if closing:
            raise DaemonConfigError(f"{path}: unexpected end of file, expecting '}}'")

    def _default_listen(self, path: str, line: int) -> None:
        self.listens.append(_Listen("http", endpoint("0.0.0.0", 80), False, False, False,
                                    f"{path}:{line}{self.label}", "a server without listen: nginx's default *:80"))

    def _listen(self, group: str, args: list[str], source: str) -> None:
        address, params = args[0], args[1:]
        if address.startswith("unix:"):
            return
        proto = UDP if group == "stream" and "udp" in params else TCP
        host, port = self._split(address, group, source)
        if port is None:
            return
        ipv6only = True
        for p in params:
            if p in ("ipv6only=off", "ipv6only=on"):
                ipv6only = p == "ipv6only=on"
        reuseport = "reuseport" in params
        bind = any(p in IMPLY_BIND or p.startswith(IMPLY_BIND_PREFIXES) for p in params)
        addresses = [host] if host in ("0.0.0.0", "::") else host_addresses(host, self.findings, source)
        note = "" if addresses == [host] else f"host name {host!r}, from /etc/hosts"
        for a in addresses:
            try:
                ep = endpoint(a, port, proto)
            except AddressError as exc:
                self.findings.warn(f"{source}: {exc}")
                continue
            self.listens.append(_Listen(group, ep, ipv6only, reuseport, bind, source, note))

    def _split(self, address: str, group: str, source: str) -> tuple[str, int | None]:
        default_port = 80 if group == "http" else None
        if address.startswith("["):
            close = address.find("]")
            host, rest = address[1:close], address[close + 1:]
            port_text = rest[1:] if rest.startswith(":") else ""
        elif ascii_port(address) is not None:
            return "0.0.0.0", ascii_port(address)
        elif ":" in address:
            host, port_text = address.rsplit(":", 1)
        else:
            host, port_text = address, ""
        if host == "*":
            host = "0.0.0.0"
        if not port_text:
            if default_port is None:
                self.findings.warn(f"{source}: listen {excerpt(address)} has no port; nginx refuses it")
                return host, None
            return host, default_port
        port = ascii_port(port_text)
        if not port:
            self.findings.warn(f"{source}: listen {excerpt(address)}: {excerpt(port_text)} is not a port")
            return host, None
        return host, port


def _merge(parser: _Parser, findings: Findings) -> None:
    """Keep the sockets nginx really opens: one per address, specific addresses under a wildcard folded."""
    wild = {(listen.group, listen.endpoint.proto, listen.endpoint.host.version, listen.endpoint.port)
            for listen in parser.listens if listen.endpoint.is_wildcard}
    for listen in parser.listens:
        key = (listen.group, listen.endpoint.proto, listen.endpoint.host.version, listen.endpoint.port)
        if not listen.endpoint.is_wildcard and key in wild and not listen.bind:
            continue
        findings.add(listen.endpoint, listen.source, reuseport=listen.reuseport, v6only=listen.v6only, note=listen.note)


def _split_dump(text: str) -> dict[str, str]:
    files: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("# configuration file ") and line.endswith(":"):
            current = files.setdefault(line[len("# configuration file "):-1], [])
            continue
        if current is not None:
            current.append(line)
    return {path: "\n".join(lines) + "\n" for path, lines in files.items()}


def _options(argv: list[str]) -> tuple[str | None, str | None, list[str]]:
    conf = prefix = None
    globals_: list[str] = []
    i = 1
    while i < len(argv):
        arg = argv[i]
        for flag in ("-c", "-p", "-g"):
            if arg == flag and i + 1 < len(argv):
                value, i = argv[i + 1], i + 1
            elif arg.startswith(flag) and len(arg) > 2:
                value = arg[2:]
            else:
                continue
            if flag == "-c":
                conf = value
            elif flag == "-p":
                prefix = value
            else:
                globals_.append(value)
            break
        i += 1
    return conf, prefix, globals_


@bounded
def find(argv: list[str], env: dict[str, str], config: str | None = None) -> Findings:
    findings = Findings("nginx")
    conf, prefix, globals_ = _options(argv)
    conf = config or conf or DEFAULT_CONF
    if not os.path.isabs(conf):
        conf = os.path.join(prefix or DEFAULT_PREFIX, conf)
    conf_prefix = os.path.dirname(conf)
    on_disk = _Parser(conf_prefix, None, "", Findings("nginx"), prefix or DEFAULT_PREFIX)
    try:
        on_disk.parse_file(conf, ["main"])
        problem = None
    except DaemonConfigError as exc:
        problem = exc
    parser = _dumped(argv, conf, prefix, globals_, on_disk if problem is None else None, findings)
    if parser is None:
        if problem is not None:
            findings.warn(f"nginx configuration: {problem}; its listen addresses are not known")
            return findings
        parser = on_disk
        findings.warnings += on_disk.findings.warnings
    _merge(parser, findings)
    return findings


def _dumped(argv: list[str], conf: str, prefix: str | None, globals_: list[str], on_disk: _Parser | None,
            findings: Findings) -> _Parser | None:
    """The configuration as `nginx -T` dumps it, parsed; None when the dump may not run or failed
    (the reason is a warning), or is not needed (no nginx)."""
    if not os.path.isfile(conf):
        return None
    program = argv[0] if argv else ""
    runs_as, refused = dump.allowed(program, None if on_disk is None else [*on_disk.read, *on_disk.modules])
    if refused:
        findings.warn(f"nginx -T not run: {refused}; reading {conf} directly")
    if runs_as is None:
        return None
    command = [program, "-T", "-q", "-c", conf] + (["-p", prefix] if prefix else [])
    command += [a for g in globals_ for a in ("-g", g)]
    ok, out, why = dump.run(command, runs_as)
    if not ok:
        why = re.sub(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (\[\w+\]) \d+#\d+: ", r"\1 ", why)
        findings.warn(f"{why}; reading {conf} directly")
        return None
    parser = _Parser(os.path.dirname(conf), _split_dump(out), " (nginx -T)", findings)
    try:
        parser.parse_file(conf, ["main"])
    except DaemonConfigError as exc:
        findings.warn(f"nginx -T: {exc}; reading {conf} directly")
        return None
    return parser
