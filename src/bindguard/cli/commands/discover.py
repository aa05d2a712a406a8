"""`bindguard discover`: what a unit will bind, where that was learnt, and how sure it is."""

from __future__ import annotations

import argparse
import shlex

from bindguard.cli.parser import add_json_option, add_legend_option
from bindguard.model.errors import BindguardError, ExitCode, UsageError
from bindguard.model.kinds import DISCOVERY_SOURCES, ordered_sources
from bindguard.model.text import escape
from bindguard.report import output
from bindguard.report.jsonout import write_json
from bindguard.systemd.unitexec import exec_argv
from bindguard.systemd.unitfiles import normalize_unit

DESCRIPTION = """\
Print each address a unit will bind, with its source and a confidence:

  bindguard discover nginx.service
  bindguard discover --exec-start "/usr/sbin/sshd -D -f /etc/ssh/sshd_config"
  bindguard discover --daemon nginx --config /etc/nginx/nginx.conf

Confident findings come from the daemon's own configuration (nginx, apache2/httpd, haproxy,
sshd, redis-server, postgres, mariadbd/mysqld) and the unit's .socket units; guesses from
the common option forms in ExecStart= and the environment (--port 8080, PORT=8080). A file
that cannot be read is a warning, never an error. The table has a header line (ADDRESS,
CONFIDENCE, SOURCE, OPTIONS, then the note in parentheses); --no-legend leaves it out."""
EXIT_CODES: dict[ExitCode, str | None] = {
    ExitCode.CLEAR: "the addresses found, if any (warnings do not change it)",
    ExitCode.USAGE: "bad arguments or an unknown unit",
    ExitCode.INTERNAL: "systemd cannot be asked, and the unit has no unit file",
    ExitCode.CONFIG: "a broken bindguard YAML file",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("unit", nargs="?", metavar="UNIT", help="a unit name, read from systemd")
    parser.add_argument("--exec-start", action="append", default=[], metavar="CMDLINE",
                        help="an ExecStart= command line instead of the unit's (repeatable)")
    parser.add_argument("--environment", action="append", default=[], metavar="NAME=VALUE",
                        help="an Environment= assignment for --exec-start (repeatable)")
    parser.add_argument("--environment-file", action="append", default=[], metavar="FILE",
                        help="an EnvironmentFile= for --exec-start ('-' prefix: optional; repeatable)")
    parser.add_argument("--socket-listen", action="append", default=[], metavar="ADDRESS",
                        help="a ListenStream= of the unit's .socket unit (udp: prefix for ListenDatagram=)")
    parser.add_argument("--daemon", metavar="NAME", help="read this daemon's configuration (nginx, sshd, ...)")
    parser.add_argument("--config", metavar="FILE", help="with --daemon: the daemon's configuration file")
    add_json_option(parser, "print the findings as one JSON object on stdout")
    add_legend_option(parser)
    bus = parser.add_mutually_exclusive_group()
    bus.add_argument("--user", dest="user_bus", action="store_true", default=None,
                     help="read UNIT from the user manager (default when run by one: MANAGERPID is set)")
    bus.add_argument("--system", dest="user_bus", action="store_false", help="read UNIT from the system manager")


def _read_unit(unit: str, user_bus: bool | None, sources, console: output.Console):
    """discover_unit() with the unit's facts from the system (or user) manager over D-Bus; from
    the unit files when the manager cannot be asked (its .socket units are then not seen)."""
    from bindguard.request import discover
    from bindguard.systemd import bus
    from bindguard.systemd.context import unit_facts
    from bindguard.systemd.unitfacts import unit_facts_from_files, unit_fragment
    from bindguard.systemd.unitfiles import user_manager

    user = user_manager(user_bus)  # one answer for the bus and, without it, the unit files
    try:
        return discover.discover_unit(unit, lambda name: unit_facts(name, user), sources)
    except bus.SystemdError as exc:
        if unit_fragment(unit, user) is None:
            raise BindguardError(f"cannot read {unit} from systemd ({exc}), and no unit file of that name was found",
                                 "check the name, or give the command line with --exec-start") from None
        console.warning(f"{exc}; reading {unit}'s unit files instead (its .socket units are not seen)")
        return discover.discover_unit(unit, lambda name: unit_facts_from_files(name, user), sources)


def _options_text(bind) -> str:
    flags = [name for name in ("reuseaddr", "reuseport", "freebind") if getattr(bind.options, name)]
    if bind.endpoint.host.version == 6:
        flags.append("v6only" if bind.options.v6only else "dual-stack")
    return ",".join(flags)


def _discover(args: argparse.Namespace, console: output.Console):
    from bindguard.request import discover

    if args.daemon:
        if args.unit or args.exec_start:
            raise UsageError("--daemon reads one daemon's configuration; do not combine it with UNIT or --exec-start")
        try:
            return discover.discover_daemon(args.daemon, config=args.config)
        except ValueError:
            known = ", ".join(sorted(set(discover.DAEMONS)))
            raise UsageError(f"--daemon {args.daemon}: not a daemon bindguard knows", f"use one of {known}") from None
    if args.config:
        raise UsageError("--config needs --daemon", "e.g. --daemon nginx --config /etc/nginx/nginx.conf")
    sources = list(DISCOVERY_SOURCES)
    if args.unit:
        from bindguard.request import config

        unit = normalize_unit(args.unit)
        unit_config = config.load_unit_config(unit)
        if unit_config is not None:
            sources = ordered_sources(unit_config.discovery_sources)
            if unit_config.listen is not None:
                console.emit(output.NOTICE, f"bindguard: {unit} has a listen list in {unit_config.origins['listen']}; "
                                           f"`check --unit` uses that, not discovery")
    if args.exec_start:
        exec_start = []
        for line in args.exec_start:
            try:
                exec_start.append(exec_argv(shlex.split(line)))  # an ExecStart= value, prefixes and all
            except ValueError as exc:
                raise UsageError(f"--exec-start {line!r}: {exc}", "quote the command line as a shell would") from None
        listens = [("Datagram", a[4:]) if a.lower().startswith("udp:") else ("Stream", a) for a in args.socket_listen]
        return discover.discover(exec_start, args.environment, args.environment_file, listens,
                                 args.unit or "command-line.service", sources)
    if not args.unit:
        raise UsageError("name a unit, or give --exec-start CMDLINE or --daemon NAME",
                         "e.g. bindguard discover nginx.service")
    return _read_unit(unit, args.user_bus, sources, console)


def run(args: argparse.Namespace, console: output.Console) -> int:
    result = _discover(args, console)
    for warning in result.warnings:
        console.warning(warning)
    if args.json:
        write_json({"daemons": result.daemons, "warnings": result.warnings, "findings": [
            {"address": str(f.bind.endpoint), "proto": f.bind.endpoint.proto, "source": f.source,
             "confidence": f.confidence, "note": f.note, "socket_unit": f.socket_unit,
             "reuseaddr": f.bind.options.reuseaddr, "reuseport": f.bind.options.reuseport,
             "v6only": f.bind.v6only, "freebind": f.bind.options.freebind, "survives": list(f.survives)}
            for f in result.findings]}, args.json)
        return ExitCode.CLEAR
    if not result.findings:
        if not args.no_legend:
            print("nothing found" + (f" ({escape(', '.join(result.daemons))}: no listen address)"
                                     if result.daemons else ""))
        return ExitCode.CLEAR
    rows = [(str(f.bind.endpoint), f.confidence, escape(f.source), _options_text(f.bind), escape(f.note))
            for f in result.findings]
    if not args.no_legend:
        rows.insert(0, ("ADDRESS", "CONFIDENCE", "SOURCE", "OPTIONS", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for address, confidence, source, options, note in rows:
        line = f"{address:<{widths[0]}}  {confidence:<{widths[1]}}  {source:<{widths[2]}}  {options}"
        print(line + (f"  ({note})" if note else ""))
    return ExitCode.CLEAR
