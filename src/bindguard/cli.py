"""The command line's entry point: the fast path, dispatch to one subcommand, and the exit code.

Nothing heavy is imported before the subcommand needs it: `bindguard check` on its common
paths (see fastpath.py) never imports argparse.
"""

from __future__ import annotations

import os
import sys

from bindguard.errors import EXIT_INTERNAL, EXIT_USAGE, BindguardError


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
        fail_closed = bool(getattr(args, "fail_closed", False)) or (args is None and "--fail-closed" in argv)
        output.emit(
            output.ERR if fail_closed else output.WARNING,
            f"bindguard: internal error: {type(exc).__name__}: {exc}\n"
            + ("  failing closed (--fail-closed)" if fail_closed else "  letting the start go on (fail-open); "
               "rerun with --debug for a traceback"),
        )
        return EXIT_INTERNAL if fail_closed else 0
