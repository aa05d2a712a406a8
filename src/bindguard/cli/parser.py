"""Building the argparse parser: only the chosen subcommand's module is imported."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Mapping

from bindguard import __version__
from bindguard.cli.commands import COMMANDS
from bindguard.model.errors import COMMON_EXIT_CODES, ExitCode, UsageError
from bindguard.report.jsonout import DEFAULT_MODE, MODES

DESCRIPTION = """\
Stop "bind: Address already in use" from taking services down.

Run `bindguard check` from a unit's ExecStartPre= with the addresses the daemon binds.
It asks the kernel with a trial bind whether the daemon's bind() will succeed, waits out
a TIME_WAIT that will clear by itself, or refuses the start and says who holds the
address and how to fix it."""


HELP_WIDTH = 92  # as the hand-written epilogs were


def exit_codes_help(codes: Mapping[ExitCode, str | None], title: str = "exit codes:") -> str:
    """The `exit codes:` block of a --help epilog: each code with its line (ExitCode.help, unless the
    command says what the code means for it), those with the same line on one row; every command
    also gives COMMON_EXIT_CODES."""
    lines = {code: text or code.help for code, text in codes.items()}
    for code in COMMON_EXIT_CODES:
        lines.setdefault(code, code.help)
    rows: dict[str, list[int]] = {}
    for code in sorted(lines):
        rows.setdefault(lines[code], []).append(code)
    out = [title]
    for text, numbers in sorted(rows.items(), key=lambda row: row[1][0]):
        shown = ", ".join(map(str, numbers))
        out += _wrapped(f"  {shown:<3} {text}" if len(shown) <= 3 else f"  {shown}  {text}", " " * 6)
    return "\n".join(out)


def _wrapped(line: str, indent: str) -> list[str]:
    """line cut at spaces to HELP_WIDTH (textwrap would cost the guard an import)."""
    out = []
    while len(line) > HELP_WIDTH and " " in line[len(indent):HELP_WIDTH]:
        cut = line.rindex(" ", len(indent), HELP_WIDTH)
        out.append(line[:cut])
        line = indent + line[cut + 1:]
    return [*out, line]


def epilog(module) -> str:
    """A command's epilog: its EPILOG (examples), its exit codes (EXIT_CODES), then its EXIT_NOTE."""
    parts = [getattr(module, "EPILOG", ""), exit_codes_help(module.EXIT_CODES), getattr(module, "EXIT_NOTE", "")]
    return "\n\n".join(p for p in parts if p)


JSON_OPTION = "--json"


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's exit 2 and usage dump -> one line, exit 64
        raise UsageError(f"{message}", f"see `{self.prog} --help`")

    def parse_known_args(self, args=None, namespace=None):
        """--json takes a mode only when one follows (`--json short`, `--json=short`); alone it is
        --json=pretty. argparse's nargs="?" would take any next word as the mode, so that
        `check --json 127.0.0.1:80` read the address as one."""
        if JSON_OPTION in self._option_string_actions:
            args = list(sys.argv[1:] if args is None else args)
            end = args.index("--") if "--" in args else len(args)
            for i in range(end):
                if args[i] == JSON_OPTION and (i + 1 == end or args[i + 1] not in MODES):
                    args[i] = f"{JSON_OPTION}={DEFAULT_MODE}"
        return super().parse_known_args(args, namespace)


def add_legend_option(parser: argparse.ArgumentParser) -> None:
    """--no-legend, as systemctl's lists take it."""
    parser.add_argument("--no-legend", action="store_true",
                        help="print no header line, and nothing when there is no row: the rows only, for scripts")


def add_json_option(parser: argparse.ArgumentParser, what: str) -> None:
    """--json[=short|pretty], as systemd's tools take --json=MODE."""
    parser.add_argument(JSON_OPTION, nargs="?", choices=MODES, metavar="MODE", default=None,
                        help=f"{what}: MODE {' or '.join(MODES)} (one line, or indented); --json alone means "
                             f"{DEFAULT_MODE}. The object starts with its schema_version (see README)")


def build_parser(only: str | None = None) -> Parser:
    parser = Parser(
        prog="bindguard",
        description=DESCRIPTION,
        epilog=exit_codes_help({}, "exit codes of every command (`bindguard COMMAND --help` lists each one's own):"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"bindguard {__version__}")
    parser.add_argument("--debug", action="store_true", help="also show a traceback when the guard itself fails")
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
            epilog=epilog(module),
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
