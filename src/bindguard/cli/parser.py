"""Building the argparse parser: only the chosen subcommand's module is imported."""

from __future__ import annotations

import argparse
import importlib

from bindguard import __version__
from bindguard.cli.commands import COMMANDS
from bindguard.model.errors import EXIT_CODES_HELP, UsageError

DESCRIPTION = """\
Stop "bind: Address already in use" from taking services down.

Run `bindguard check` from a unit's ExecStartPre= with the addresses the daemon binds.
It asks the kernel with a trial bind whether the daemon's bind() will succeed, waits out
a TIME_WAIT that will clear by itself, or refuses the start and says who holds the
address and how to fix it."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's exit 2 and usage dump -> one line, exit 64
        raise UsageError(f"{message}", f"see `{self.prog} --help`")


def build_parser(only: str | None = None) -> Parser:
    parser = Parser(
        prog="bindguard",
        description=DESCRIPTION,
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"bindguard {__version__}")
    parser.add_argument("--debug", action="store_true", help="show a traceback when the guard itself fails")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, (module_name, summary) in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=summary, add_help=False)
            continue
        module = importlib.import_module(f"bindguard.cli.commands.{module_name}")
        child = sub.add_parser(
            name,
            help=summary,
            description=module.DESCRIPTION,
            epilog=getattr(module, "EPILOG", None),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(child)
        # fails_closed(args): whether a failure of the command itself exits 70 (its --fail-closed, and
        # for check and verify the unit's `fail:`); decided before run(args), for cli.main's handler.
        child.set_defaults(run=module.run, fails_closed=getattr(module, "fails_closed", None))
    return parser


def chosen_command(argv: list[str]) -> str | None:
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None
