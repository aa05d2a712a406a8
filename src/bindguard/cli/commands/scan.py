"""bindguard scan: the host's port map, and what in it needs attention."""

from __future__ import annotations

import argparse
import os
import sys

from bindguard.cli.commands.check import add_systemd_arguments
from bindguard.cli.parser import add_json_option, add_legend_option
from bindguard.model.errors import BindguardError, ExitCode, UsageError
from bindguard.report import output

DESCRIPTION = """\
One view of this host (this network namespace): every listening socket with its PID, command
and unit; every .socket unit and what it listens on; every loaded service's addresses, from its
bindguard file (listen:) or discovered from its daemon's configuration. Then what needs attention,
each with the evidence and the fix:

  unit-collision         two services (or two .socket units) that will bind overlapping
                         addresses: the same address, a wildcard and a specific one, or a
                         dual-stack [::] and an IPv4 address
  socket-unit-collision  a service binds an address that a .socket unit of another service
                         binds (its own .socket unit passing it the socket is fine)
  unclaimed-listener     a listener whose process belongs to no running unit
  ephemeral-port         a declared port inside net.ipv4.ip_local_port_range and not reserved:
                         an outgoing connection can take it at any moment (the sysctl line to
                         reserve it is given, merged with what is reserved already)
  restart-loop           a service restarting after a bind conflict (exit status 98)
  nat-shadowed           an address a unit claims whose connections a NAT rule (DNAT, REDIRECT)
                         takes elsewhere: a published container port, a hostPort or NodePort
  config-error           a unit's bindguard file that cannot be used

The table (sorted by port) goes to stdout, COMMAND cut at 60 characters only on a terminal (a
pipe or a file gets it whole; --no-legend leaves out the header); the findings and notes go to
stderr, with journald priority prefixes on the journal's stream ($JOURNAL_STREAM), as for `check`.
--json puts one JSON object on stdout
instead of the table. Nothing is changed or killed.

examples:
  bindguard scan
  bindguard scan --json | jq '.findings[] | select(.kind == "unit-collision")'
  bindguard scan --quiet --prometheus /var/lib/prometheus/node-exporter/bindguard.prom"""

EXIT_CODES: dict[ExitCode, str | None] = {
    ExitCode.CLEAR: "nothing needs attention",
    ExitCode.ATTENTION: "at least one finding (the kinds above)",
    ExitCode.USAGE: ("usage error: a bad option, or --prometheus in a directory that does not exist, is not "
                     "writable or that another user's symlink leads to"),
    ExitCode.INTERNAL: "the scan itself failed",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_systemd_arguments(parser, unit_help=None)
    add_json_option(parser, "print one JSON object on stdout instead of the table")
    parser.add_argument("--prometheus", metavar="FILE",
                        help="also write the metrics for node_exporter's textfile collector to FILE (*.prom), "
                             "atomically")
    add_legend_option(parser)
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="no table on stdout (findings still go to stderr): for timers")


def _check_prometheus_path(path: str) -> None:
    """The checks write_prometheus() makes again when it writes, made before the scan's work."""
    from bindguard.report.scan import UntrustedLink, open_directory

    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.close(open_directory(directory))
    except UntrustedLink as exc:
        raise UsageError(f"--prometheus {path}: {exc.strerror}; refusing to write through it as uid {os.geteuid()}",
                         "make the directory and every directory above it reachable without another "
                         "user's symlink, or run the scan as that user") from None
    except (FileNotFoundError, NotADirectoryError):
        raise UsageError(f"--prometheus {path}: directory {directory} does not exist",
                         "give a file in node_exporter's --collector.textfile.directory, "
                         "e.g. /var/lib/prometheus/node-exporter/bindguard.prom") from None
    except OSError as exc:
        raise UsageError(f"--prometheus {path}: cannot open {directory}: {exc.strerror}",
                         "run as a user who may, or as root") from None
    if not os.access(directory, os.W_OK):
        raise UsageError(f"--prometheus {path}: cannot write in {directory}", "run as a user who may, or as root")


def run(args: argparse.Namespace, console: output.Console) -> int:
    from bindguard.action import scan
    from bindguard.report import scan as render

    if args.prometheus:
        _check_prometheus_path(args.prometheus)
        if not args.prometheus.endswith(".prom"):
            console.warning(f"--prometheus {args.prometheus}: node_exporter reads only files ending in .prom")
    try:
        result = scan.run(args.user_bus, not args.no_systemd)
        if args.prometheus:
            render.write_prometheus(result, args.prometheus)
    except BindguardError:
        raise
    except Exception as exc:
        if args.debug:
            console.traceback()
        raise BindguardError(f"the scan failed: {type(exc).__name__}: {exc}",
                             "rerun with --debug for a traceback") from None
    if args.json:
        from bindguard.report.jsonout import write_json

        write_json(render.scan_json(result), args.json)
    elif not args.quiet:
        render.write_table(result, sys.stdout, legend=not args.no_legend)
    render.write_findings(console, result)
    return result.exit_code
