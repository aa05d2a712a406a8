"""PostgreSQL: `listen_addresses` and `port` from postgresql.conf, its includes, postgresql.auto.conf
and the command line.

Which file: Debian's `pg_ctlcluster 15 main` (or `15-main`, as postgresql@15-main.service passes it)
reads /etc/postgresql/15/main/postgresql.conf; `postgres -D DIR` reads DIR/postgresql.conf unless
`-c config_file=...`. `-p`, `-h` and `-c name=value` override the files; PGPORT sets the default port.
Defaults: listen_addresses 'localhost', port 5432; '*' means every IPv4 and IPv6 address, '' no TCP.
PostgreSQL sets SO_REUSEADDR, and IPV6_V6ONLY on IPv6 sockets (pqcomm.c). It starts when at least
one of its addresses binds.
"""

from __future__ import annotations

import os
import re

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
    parse_port,
    read_text,
)

CLUSTER_CONF_ROOT = "/etc/postgresql"
LINE = re.compile(r"""^\s*([A-Za-z_][\w.]*)\s*=?\s*('(?:[^']|'')*'|[^\s#'][^\s#]*|)\s*(?:#.*)?$""")


class _Settings:
    def __init__(self) -> None:
        self.values: dict[str, tuple[str, str]] = {}
        self.includes = IncludeDepth("include", DAEMON_INCLUDE_DEPTH["postgres"])

    def read(self, path: str, required: bool = True) -> None:
        with self.includes.entering(path):  # PostgreSQL checks the depth before it looks for the file
            if not required and not os.path.exists(path):
                return
            base = os.path.dirname(path)
            for number, line in enumerate(read_text(path).splitlines(), 1):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                match = LINE.match(line)
                if match is None:
                    raise DaemonConfigError(f"{path}:{number}: syntax error")
                name, value = match.group(1).lower(), match.group(2)
                if value.startswith("'"):
                    value = value[1:-1].replace("''", "'")
                where = f"{path}:{number}"
                if name in ("include", "include_if_exists"):
                    target = value if os.path.isabs(value) else os.path.join(base, value)
                    self.read(target, required=name == "include")
                elif name == "include_dir":
                    directory = value if os.path.isabs(value) else os.path.join(base, value)
                    for included in expand_glob("*.conf", directory):
                        if not os.path.basename(included).startswith("."):
                            self.read(included)
                else:
                    self.values[name] = (value, where)


def _command_line(argv: list[str], env: dict[str, str]) -> tuple[str | None, list[tuple[str, str]], str | None]:
    """(data directory, [(setting, value)], cluster config file) from postgres/pg_ctl/pg_ctlcluster argv."""
    name = os.path.basename(argv[0]) if argv else ""
    settings: list[tuple[str, str]] = []
    datadir = conf = None
    words = list(argv[1:])
    if name == "pg_ctlcluster":
        positional = [w for w in words if not w.startswith("-")]
        if positional and re.fullmatch(r"\d+(\.\d+)?-.+", positional[0]):
            version, cluster = positional[0].split("-", 1)
        elif len(positional) >= 2:
            version, cluster = positional[0], positional[1]
        else:
            return None, [], None
        root = env.get("PG_CLUSTER_CONF_ROOT", CLUSTER_CONF_ROOT)
        return None, [], os.path.join(root, version, cluster, "postgresql.conf")
    if name == "pg_ctl":
        import shlex

        expanded = []
        i = 0
        while i < len(words):
            if words[i] == "-o" and i + 1 < len(words):
                expanded += shlex.split(words[i + 1])
                i += 2
                continue
            if words[i].startswith("-o"):
                expanded += shlex.split(words[i][2:])
            elif words[i] in ("-D", "--pgdata") and i + 1 < len(words):
                expanded += ["-D", words[i + 1]]
                i += 2
                continue
            elif words[i].startswith("--pgdata="):
                expanded += ["-D", words[i].split("=", 1)[1]]
            i += 1
        words = expanded
    i = 0
    while i < len(words):
        word = words[i]
        value = words[i + 1] if i + 1 < len(words) else ""
        step = 2
        if word in ("-D", "-p", "-h", "-c"):
            key = {"-D": "datadir", "-p": "port", "-h": "listen_addresses", "-c": None}[word]
        elif word.startswith("--") and "=" in word:
            key, value, step = None, word[2:], 1
        else:
            i += 1
            continue
        if key is None:
            setting, _, setting_value = value.partition("=")
            key, value = setting.replace("-", "_").lower(), setting_value
        if key == "datadir":
            datadir = value
        else:
            settings.append((key, value))
        i += step
    return datadir, settings, conf


@bounded
def find(argv: list[str], env: dict[str, str], config: str | None = None) -> Findings:
    findings = Findings("postgres")
    datadir, cli, conf = _command_line(argv, env)
    cli_values = dict(cli)
    conf = config or cli_values.get("config_file") or conf
    if conf is None and datadir:
        conf = os.path.join(datadir, "postgresql.conf")
    if conf is None:
        findings.warn(f"{' '.join(argv)}: cannot tell which postgresql.conf this reads; name it with "
                      f"`bindguard discover --daemon postgres --config FILE`")
        return findings
    settings = _Settings()
    try:
        settings.read(conf)
        data_directory = settings.values.get("data_directory", (datadir or "", ""))[0] or datadir
        if data_directory:
            settings.read(os.path.join(data_directory, "postgresql.auto.conf"), required=False)
    except DaemonConfigError as exc:
        findings.warn(f"postgres configuration: {exc}; its listen addresses are not known")
        return findings
    for key, value in cli:
        settings.values[key] = (value, f"{os.path.basename(argv[0])} command line")
    port_default = env.get("PGPORT", "5432")
    port_text, port_where = settings.values.get("port", (port_default, f"{conf} (default port)"))
    addresses, where = settings.values.get("listen_addresses", ("localhost", f"{conf} (default listen_addresses)"))
    try:
        port = parse_port(port_text, port_where)
    except DaemonConfigError as exc:
        findings.warn(f"postgres configuration: {exc}")
        return findings
    note = ""
    for host in (h.strip() for h in addresses.split(",")):
        if not host:
            continue
        hosts = ["0.0.0.0", "::"] if host == "*" else host_addresses(host, findings, where)
        for address in hosts:
            try:
                findings.add(endpoint(address, port), where, v6only=True, note=note)
            except AddressError as exc:
                findings.warn(f"{where}: {exc}")
    findings.all_survivable("PostgreSQL starts if at least one of its addresses binds")
    return findings
