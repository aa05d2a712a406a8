"""bindguard uninstall: remove the drop-in `bindguard install` wrote, and reload the manager."""

from __future__ import annotations

import argparse

from bindguard.action import install
from bindguard.model.errors import ExitCode
from bindguard.report import output

DESCRIPTION = f"""\
Remove UNIT.d/{install.DROPIN_NAME} written by `bindguard install`, then daemon-reload. A file
of that name that bindguard did not write is left alone (exit 78). Nothing to remove is not an error."""

EXIT_CODES: dict[ExitCode, str | None] = {
    ExitCode.CLEAR: "removed, or there was nothing to remove",
    ExitCode.USAGE: "a malformed unit name",
    ExitCode.CONFIG: "the file was not written by bindguard, or it cannot be removed (permission)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("unit", metavar="UNIT", help="the guarded service (nginx means nginx.service)")
    parser.add_argument("--user", action="store_true", help="a unit of your user manager (systemctl --user)")


def run(args: argparse.Namespace, console: output.Console) -> int:
    unit = install.guarded_unit_name(args.unit)
    path = install.dropin_path(unit, args.user)
    if not install.remove(unit, path, args.user):
        console.emit(output.INFO, f"bindguard: no {path}; nothing to remove")
        return 0
    console.emit(output.NOTICE, f"bindguard: removed {path}")
    failure = install.daemon_reload(args.user)
    if failure:
        flag = " --user" if args.user else ""
        console.warning(f"daemon-reload failed ({failure}); run `systemctl{flag} daemon-reload`")
    return 0
