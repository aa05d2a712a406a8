"""`bindguard check` on its common paths, paying for little more than the interpreter's start.

The guard runs before every start of every unit it guards. Two answers need no argparse, no
dataclasses, no ipaddress, no D-Bus and not even os (see bindguard.environment), so they are
given here from posix and _socket alone:
  - the every-service drop-in's unit with nothing to guard (no YAML file, neither its name nor
    its unit files' ExecStart= name a daemon discovery knows): exit 0 after a few stat() calls;
  - every address can be bound, outside a unit or with --no-systemd: one trial bind each.
Anything else (an error, an unusual option, a blocked address, a unit whose socket units must
be checked) returns None, and the full command runs from the start; it, not this module, is
the authority on syntax and the one that explains. An address in use on a TCP port where nothing
listens leaves the kernel walking that port's sockets for it meanwhile, in a thread, where the
process may run on two CPUs (bindguard.evidence.sockdiag).
tests/test_fastpath.py holds the two to the same answers.
"""

import bindguard

SOCKET_FLAGS = {
    "--reuseaddr": ("reuseaddr", True),
    "--no-reuseaddr": ("reuseaddr", False),
    "--reuseport": ("reuseport", True),
    "--v6only": ("v6only", True),
    "--no-v6only": ("v6only", False),
    "--freebind": ("freebind", True),
}
DEFAULT_OPTIONS = {"reuseaddr": True, "reuseport": False, "v6only": None, "freebind": False}
BUS_FLAGS = ("--user", "--system")  # which bus to ask: nothing here asks one
# check's options this module does not read, as argparse leaves them when they are not given
# (cli.commands.check.add_arguments), and the top-level ones.
NOT_READ = {"command": "check", "debug": False, "daemon_user": None, "optional": None, "if_available": None,
            "config": None, "reap_stale": False, "json": None, "fail_closed": False}
V4_MAPPED_PREFIX = b"\0" * 10 + b"\xff\xff"


def _parse(text: str, v6only: bool, ipv6: bool) -> tuple[tuple, str] | None:
    """(trial spec, the address as the report shows it), or None to leave it to the full parser."""
    import _socket  # here, not above: the every-service path that finds nothing to guard never needs it

    kind, shown_proto = _socket.SOCK_STREAM, ""
    prefix = text[:4].lower()
    if prefix in ("tcp:", "udp:"):
        text = text[4:]
        if prefix == "udp:":
            kind, shown_proto = _socket.SOCK_DGRAM, "udp:"
    if text.isascii() and text.isdigit():
        family, host, port = (_socket.AF_INET6, "::", text) if ipv6 else (_socket.AF_INET, "0.0.0.0", text)
    elif text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            return None
        family, host, port = _socket.AF_INET6, text[1:close], text[close + 2 :]
    else:
        host, colon, port = text.partition(":")
        if not colon or ":" in port:
            return None
        family = _socket.AF_INET
    # Only ASCII digits make a port (int() reads '٨٠' as 80, raises on '²' and on 4,301 digits);
    # anything unusual, leading zeros beyond five digits included, goes to the full parser.
    if not (port.isascii() and port.isdigit() and len(port) <= 5) or not 1 <= int(port) <= 65535:
        return None
    try:
        packed = _socket.inet_pton(family, host)
    except (OSError, ValueError):
        return None
    canonical = _socket.inet_ntop(family, packed)
    if family == _socket.AF_INET:
        if canonical != host:
            return None
        shown = f"{canonical}:{int(port)}"
        sockaddr: tuple = (canonical, int(port))
    else:
        mapped = packed[:12] == V4_MAPPED_PREFIX
        link_local = packed[0] == 0xFE and packed[1] & 0xC0 == 0x80
        if link_local or (mapped and v6only) or ("." in canonical and not mapped):
            return None
        shown = f"[{canonical}]:{int(port)}"
        sockaddr = (canonical, int(port), 0, 0)
    return (family, kind, sockaddr, None, None, family == _socket.AF_INET6 and v6only, None), shown_proto + shown


def arguments(args: list[str]) -> dict | None:
    """`bindguard check ARGS` as argparse reads it: the attributes of its namespace (the top-level
    ones and the command's name included, not run and fails_closed), when every argument is one
    this module reads; None for anything else, whatever argparse would refuse included. The full
    command runs on them without argparse (0.5 ms to import, 4 ms to build the parser)."""
    listen: list[str] = []
    read = {**NOT_READ, "listen": listen, "reuseaddr": None, "reuseport": None, "v6only": None, "freebind": None,
            "unit": None, "user_bus": None, "no_systemd": False, "wait": None}
    bus_flag = None
    run_ended = False  # argparse takes the addresses as one run of arguments: none after an option that follows them
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        name, eq, value = arg.partition("=")
        if not arg.startswith("-"):
            if run_ended:
                return None
            listen.append(arg)
            continue
        run_ended = bool(listen)
        if arg in SOCKET_FLAGS:
            key, setting = SOCKET_FLAGS[arg]
            read[key] = setting
        elif arg == "--no-systemd":
            read["no_systemd"] = True
        elif arg in BUS_FLAGS:
            if bus_flag not in (None, arg):  # --user and --system: argparse refuses the pair
                return None
            bus_flag = arg
            read["user_bus"] = arg == "--user"
        elif name in ("--unit", "--wait"):
            if not eq:
                if not rest or rest[0].startswith("-"):  # argparse takes it for an option: a usage error
                    return None
                value = rest.pop(0)
            if name == "--unit":
                read["unit"] = value
            else:
                read["wait"] = _wait(value)
                if read["wait"] is None:
                    return None
        else:
            return None
    return read


def check(read: dict, console) -> int | None:
    """The exit code when it can be given cheaply and surely, else None. read is the command line as
    arguments() read it, left unchanged: when this returns None, the full command runs on it."""
    options = {key: default if read[key] is None else read[key] for key, default in DEFAULT_OPTIONS.items()}
    per_bind: list[tuple] | None = None  # each address's own options, from a remembered discovery
    told: list[tuple[int, str]] = []  # what the full command says before its verdict
    unit, listen, no_systemd, user_bus = read["unit"], list(read["listen"]), read["no_systemd"], read["user_bus"]

    from bindguard.report import output

    in_unit = unit is None and not no_systemd and bindguard.environment().get("INVOCATION_ID")
    if unit is None and not in_unit:
        return _trial(listen, options, None, None, [], console)  # from a shell: no unit to read
    from bindguard.systemd import unitfiles

    user_bus = unitfiles.user_manager(user_bus)
    if in_unit:
        unit = unitfiles.own_unit()
    unit = unitfiles.unit_name(unit) if unit is not None else None
    if unit is None:  # no unit in its cgroup, or a name systemd rejects: the full command says why
        return None
    if unitfiles.config_files(unit):
        return None
    if not listen and unit.endswith(".socket"):
        if any(options[key] != value for key, value in DEFAULT_OPTIONS.items()):
            return None  # the command line's options over the unit's: the full command
        socket_listen = _socket_unit_listen(unit, user_bus, options)
        if socket_listen is None:
            return None
        if not socket_listen:
            console.emit(output.DEBUG, f"bindguard: nothing to guard for {unit}: it listens on no IP address")
            return 0
        listen = socket_listen
    if not listen:
        from bindguard.systemd import unitexec

        if unitfiles.daemon_for_unit_name(unit) is None and not unitexec.runs_known_daemon(unit, user_bus):
            console.emit(output.DEBUG, f"bindguard: nothing to guard for {unit}")
            return 0
        remembered = _remembered(unit, user_bus, options)
        if remembered is None:
            return None
        listen, per_bind, told = remembered
    if not no_systemd and _unit_needs_a_closer_look(unit, user_bus, listen):
        return None
    if not no_systemd and (options["reuseport"] or any(o[1] for o in per_bind or ())):
        return None  # SO_REUSEPORT shares a port within one uid: the trial needs the unit's User=
    return _trial(listen, options, per_bind, unit, told, console, user_bus)


def _trial(listen: list[str], options: dict, per_bind: list[tuple] | None, unit: str | None,
           told: list[tuple[int, str]], console, user_bus: bool = False) -> int | None:
    """The trial bind of every address, and the clear report when all can be bound; None for
    anything the full command must read or explain."""
    if not listen:
        return None
    from bindguard.evidence import probe
    from bindguard.model import host
    from bindguard.report import output

    v6only = options["v6only"] if options["v6only"] is not None else host.host_bindv6only()
    ipv6 = host.ipv6_supported()
    specs, shown = [], []
    for i, text in enumerate(listen):
        if per_bind is None:
            parsed = _parse(text, v6only, ipv6)
            if parsed is None:
                return None
            spec, address = parsed
            specs.append(spec[:3] + (options["reuseaddr"], options["reuseport"], spec[5], options["freebind"]))
        else:
            reuseaddr, reuseport, bind_v6only, freebind = per_bind[i]
            parsed = _parse(text, bind_v6only, ipv6)
            if parsed is None:
                return None
            spec, address = parsed
            specs.append(spec[:3] + (reuseaddr, reuseport, spec[5], freebind))
        shown.append(address)
    if unit is not None and not unit.endswith(".socket") \
            and min(spec[2][1] for spec in specs) < host.unprivileged_port_start():
        from bindguard.evidence import privilege

        if privilege.worth_a_look(unit, user_bus):
            return None  # the unit's User= may be denied a port the guard can bind
    answers = probe.trial(specs)
    if any(error for error, _ in answers):
        try:
            _walk_early(specs, answers)
        except Exception:  # only ever a head start: what went wrong the full command meets itself
            pass
        return None
    for priority, line in told:
        console.emit(priority, line)
    fields = [(name, value) for address in shown
              for name, value in (("BINDGUARD_ADDRESS", address), ("BINDGUARD_PORT", address.rpartition(":")[2]))]
    console.report([(output.INFO, [f"bindguard: clear: {', '.join(shown)} can be bound"])], "cleared", fields)
    return 0


def _walk_early(specs: list[tuple], answers: list[tuple[int, str]]) -> None:
    """Have the kernel walk its sockets for the lowest TCP port refused as in use (the first the
    full command explains), while the full command starts (bindguard.evidence.sockdiag)."""
    import _socket
    import errno

    refused = [spec[2][1] for spec, (error, _) in zip(specs, answers, strict=True)
               if error == errno.EADDRINUSE and spec[1] == _socket.SOCK_STREAM]
    if refused:
        from bindguard.evidence import sockdiag

        sockdiag.start_walk(min(refused))


def _remembered(unit: str, user: bool, options: dict) -> tuple[list[str], list[tuple], list[tuple[int, str]]] | None:
    """A known daemon's addresses as its last discovery found them, while nothing it read has
    changed (bindguard.request.cache): (addresses, each one's socket options, the lines the full
    command writes before its verdict); None for the full command (no usable entry, an option on
    the command line, a finding the fast path does not judge)."""
    if options != DEFAULT_OPTIONS:
        return None  # the command line's options over discovery's: the full command merges them
    from bindguard.request import cache

    remembered = cache.lookup(unit, user)
    if remembered is None:
        return None
    from bindguard.report import output

    told = [(output.WARNING, f"bindguard: warning: {w}") for w in remembered.warnings]
    listen, per_bind = [], []
    for text, flags, confidence, socket_unit, _survives, source, _note in remembered.findings:
        if socket_unit:
            continue  # systemd binds it: the full command does not check those for a unit either
        if confidence != "confident":  # model.kinds.Confidence.CONFIDENT (enum is not imported here)
            continue  # a guess counts only with a YAML file, which sends every unit to the full command
        listen.append(text)
        per_bind.append(flags)
        told.append((output.INFO, f"bindguard: checking {text} from {source}"))
    return (listen, per_bind, told) if listen else None


def _unit_needs_a_closer_look(unit: str, user: bool, listen: list[str]) -> bool:
    """Inside a unit the guard also warns about socket units that will claim its ports (a
    latent-socket-unit conflict, which no trial bind shows). They are read here from the unit
    files; only a unit where one may apply goes to the full command (which asks systemd over
    D-Bus and compares addresses exactly). The unit's own settings (KillMode=, ...) matter only
    to explain a conflict actually found, never on a clear path."""
    from bindguard.systemd import unitexec

    return unitexec.socket_units_may_claim({unitexec.listen_port(text) for text in listen}, user, unit)


def _socket_unit_listen(unit: str, user: bool, options: dict) -> list[str] | None:
    """A .socket unit's own IP sockets as LISTEN arguments, its BindIPv6Only=, FreeBind= and
    Transparent= into options, from its unit files; None for what the full command reads
    (no Listen entry on disk, specifiers, ReusePort=, BindToDevice=, SocketProtocol=, an IP
    ListenSequentialPacket=). bindguard.request.socketunit is the authority."""
    from bindguard.systemd import unitexec

    values = unitexec.socket_unit_settings(unit, user)
    last = {key: values[key][-1].strip() if values[key] else "" for key in unitexec.SOCKET_OPTION_KEYS}
    entries = [(key, value.strip()) for key in unitexec.SOCKET_LISTEN_KEYS for value in values[key]]
    if not entries:  # ListenNetlink=, ListenFIFO=, ... alone; or no unit file on disk (the full command asks D-Bus)
        return [] if unitexec.unit_files(unit, user) else None
    if unitexec.parse_boolean(last["ReusePort"]) or last["BindToDevice"] or last["SocketProtocol"] \
            or any("%" in value for _, value in entries):
        return None
    listen = []
    for key, value in entries:
        if value.startswith(("/", "@")):
            continue  # a file system or abstract AF_UNIX socket
        if key == "ListenSequentialPacket":
            return None
        listen.append(("udp:" if key == "ListenDatagram" else "") + value)
    if last["BindIPv6Only"] in ("both", "ipv6-only"):
        options["v6only"] = last["BindIPv6Only"] == "ipv6-only"
    if unitexec.parse_boolean(last["FreeBind"]) or unitexec.parse_boolean(last["Transparent"]):
        options["freebind"] = True
    return listen


def _wait(value: str) -> float | None:
    """--wait's seconds as argparse reads them (float), None for what the full command refuses."""
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None
