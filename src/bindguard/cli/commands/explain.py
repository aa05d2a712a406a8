"""bindguard explain: the same investigation for a person at a terminal, clear or not."""

from __future__ import annotations

import argparse
import sys

from bindguard.cli.commands.check import (
    LISTEN_SYNTAX,
    add_listen_argument,
    add_socket_arguments,
    add_systemd_arguments,
    daemon_uid,
    request_options,
    systemd_context,
)
from bindguard.cli.parser import add_json_option
from bindguard.model.errors import ExitCode
from bindguard.report import output

DESCRIPTION = """\
What is on these addresses now, who holds them (PID, command, user, unit), what kind of
conflict each one is, and the fix for that kind, whether or not the daemon could start.
Nothing is waited for, changed or killed. The exit code is the one `bindguard check --wait 0`
would give now (below).

The report goes to stdout, to read, page or grep (`bindguard explain 80 | less`); errors go to
stderr. With --json, stdout carries only the JSON object and the report goes to stderr.

example:
  bindguard explain 80 443 udp:[::]:53"""



# check's codes as they apply to explain: it never waits (75 is TIME_WAIT now), has no --fail-closed
# (no 70) and reads no YAML file (no 78).
EXIT_CODES: dict[ExitCode, str | None] = {
    ExitCode.CLEAR: "clear: every address can be bound now",
    ExitCode.NOPERM: None,
    ExitCode.TEMPFAIL: "only TIME_WAIT is in the way now: it clears by itself (`check` waits for it)",
    ExitCode.INUSE: "held by something in the way now (as errno EADDRINUSE); a holder already leaving clears by "
                    "itself (`check` waits for it)",
    ExitCode.NOTAVAIL: None,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_listen_argument(parser, f"an address to look at ({LISTEN_SYNTAX}; the table is in "
                                "`bindguard check --help`)", required=True)
    add_socket_arguments(parser)
    add_systemd_arguments(parser)
    add_json_option(parser, "print one JSON object on stdout")


def run(args: argparse.Namespace, console: output.Console) -> int:
    from bindguard.action import guard
    from bindguard.report import outcome as report
    from bindguard.request.plan import build_binds

    ctx = systemd_context(args)
    binds = build_binds(request_options(args, unit=None))
    request = guard.Request(
        binds=binds,
        wait=0,
        daemon_uid=daemon_uid(args, ctx, binds),
        observe_always=True,
        systemd=ctx,
    )
    outcome = guard.run(request)
    if args.json:
        report.write_json(outcome, args.json)
    # The report is explain's output, so it is stdout's, as a person pipes it to less or grep; a
    # console of its own decides the form there (plain in a pipe, colour on a terminal, priority
    # prefixes only on the journal's stream).
    shown = console if args.json else output.Console(sys.stdout)
    report.write_human(shown, outcome, explain=True)
    report.write_observed(shown, outcome)
    return outcome.exit_code
