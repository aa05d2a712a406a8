"""The command line's entry point: the fast path, dispatch to one subcommand, and the exit code.

Nothing heavy is imported before the subcommand needs it: `bindguard check` on its common
paths (see fastpath.py) never imports argparse.
"""

from __future__ import annotations

import os
import sys

from bindguard.errors import EXIT_INTERNAL, EXIT_USAGE, BindguardError, GuardFailure


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("BINDGUARD_DEBUG") == "1"
    from bindguard import output

    args = None
    try:
        if argv[:1] == ["check"]:
            from bindguard import fastpath

            code = fastpath.check(argv[1:])
            if code is not None:
                return code
        from bindguard.parser import build_parser, chosen_command

        args = build_parser(chosen_command(argv)).parse_args(argv)
        if args.command is None:
            build_parser().print_help(sys.stderr)
            return EXIT_USAGE
        return args.run(args)
    except BindguardError as exc:
        output.error(exc.message, exc.hint)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the guard's own failure must not take the service down
        if debug:
            raise
        fail_closed = bool(getattr(args, "fail_closed", False)) or (args is None and "--fail-closed" in argv) \
            or _config_says_fail_closed(args)
        own = isinstance(exc, GuardFailure)
        output.emit(
            output.ERR if fail_closed else output.WARNING,
            [f"bindguard: cannot check: {exc}" if own else f"bindguard: internal error: {type(exc).__name__}: {exc}",
             "  failing closed (--fail-closed)" if fail_closed else "  letting the start go on (fail-open)"
             + ("" if own else "; rerun with --debug for a traceback")],
        )
        return EXIT_INTERNAL if fail_closed else 0


def _config_says_fail_closed(args) -> bool:
    """`fail: closed` in the unit's YAML (or --config) holds whatever failed, even reading that file."""
    unit, explicit = getattr(args, "unit", None), getattr(args, "config", None)
    if not (unit or explicit) or getattr(args, "command", None) not in ("check", "verify"):
        return False
    try:
        from bindguard.config import declares_fail_closed

        return declares_fail_closed(unit, explicit)
    except Exception:  # a broken install: the fault being handled is reported as it is
        return False
