"""The command line's entry point: the fast path, dispatch to one subcommand, and the exit code.
The cli stage may import every stage; the stages never import it.

Nothing heavy is imported before the subcommand needs it: `bindguard check` on its common
paths (see fastpath.py) never imports argparse, nor bindguard.model.errors; nor argparse on the
others (a refusal, discovery) when every argument is one the fast path reads (fastpath.arguments).
"""

import _signal
import sys

import bindguard

TYPE_CHECKING = False  # typing's own costs an import
if TYPE_CHECKING:
    import argparse

# How the line names each stop signal; SIGINT first, so that its handler is the first installed.
STOP_SIGNALS = {_signal.SIGINT: "interrupted (SIGINT)", _signal.SIGTERM: "stopped by SIGTERM",
                _signal.SIGHUP: "stopped by SIGHUP"}


def _stop(signum, frame):
    bindguard.stops.append(signum)  # first: the raise below may be swallowed (bindguard.stops)
    raise bindguard.Stopped(signum)


def main(argv: list[str] | None = None, console=None) -> int:
    """Run the command line `argv` and return its exit code. Messages go to `console`
    (a bindguard.report.output.Console; by default one on sys.stderr), made here once."""
    argv = sys.argv[1:] if argv is None else argv
    previous: dict = {}  # the handlers _main replaced, put back on the way out
    unraisable = sys.unraisablehook

    def swallowed(report) -> None:  # a stop is recorded (bindguard.stops) and said in one line, not a traceback
        if not isinstance(report.exc_value, bindguard.Stopped):
            unraisable(report)

    sys.unraisablehook = swallowed
    try:
        return _main(argv, console, previous)
    finally:
        sys.unraisablehook = unraisable
        for signum, handler in previous.items():
            _signal.signal(signum, handler)


def _main(argv: list[str], console, previous: dict) -> int:
    debug = "--debug" in argv
    from bindguard.report import output

    console = console or output.Console()

    fail_closed = "--fail-closed" in argv  # until the command's own rule has decided (fails_closed)
    try:
        # Ended by a signal, the guard says so (under ExecStartPre= the line reaches the journal)
        # and exits as a shell reports it, 128 + the signal's number; `finally` blocks run first.
        # Installed here, inside the handlers below, so that no signal can arrive between the two.
        bindguard.stops.clear()  # a stop belongs to the run it ended (tests run main() again)
        previous.update({signum: _signal.signal(signum, _stop) for signum in STOP_SIGNALS})
        try:
            code = read = None
            if argv[:1] == ["check"]:
                from bindguard.cli import fastpath

                read = fastpath.arguments(argv[1:])  # once: the full command runs on it too
                code = fastpath.check(read, console) if read is not None else None
            if code is None:
                from types import SimpleNamespace

                args: argparse.Namespace | SimpleNamespace
                if read is not None:  # every argument one the fast path reads as argparse does
                    from bindguard.cli.commands import check

                    args = SimpleNamespace(**read, run=check.run, fails_closed=check.fails_closed)
                else:
                    from bindguard.cli.parser import build_parser, chosen_command

                    args = build_parser(chosen_command(argv)).parse_args(argv)
                if args.command is None:
                    from bindguard.model.errors import ExitCode

                    build_parser().print_help(console.stream)
                    code = ExitCode.USAGE
                else:
                    # Decided before the command runs, so that it holds whatever fails in it (check, verify).
                    fail_closed = args.fails_closed(args) if args.fails_closed is not None else False
                    code = args.run(args, console)
            bindguard.stop_if_asked()  # a stop swallowed on the way still ends the command as a stop
            return code
        finally:
            if sys.stdout is not None:
                sys.stdout.flush()  # here, where a closed pipe can still be told apart
    except bindguard.Stopped as stop:
        return _stopped(console, stop.signum)
    except KeyboardInterrupt:  # SIGINT before _stop was installed for it
        return _stopped(console, _signal.SIGINT)
    except Exception as exc:
        from bindguard.model.errors import BindguardError, ExitCode, GuardFailure

        if bindguard.stops:  # what failed ran on after a stop that was swallowed: the stop ended it
            return _stopped(console, bindguard.stops[0])
        if isinstance(exc, BindguardError):
            console.error(exc.message, exc.hint, getattr(exc, "problems", ()))
            return exc.exit_code
        if isinstance(exc, BrokenPipeError) and _reader_gone():
            _discard_output()  # `| head`: a quiet end, as for other tools
            return ExitCode.BROKEN_PIPE
        if debug:  # then the report: the guard's own failure must not take the service down, debugged or not
            console.traceback()
        own = isinstance(exc, GuardFailure)
        from bindguard.model.text import shortened

        said = shortened(str(exc), 300)  # emit() escapes it; an exception may quote what a service's user wrote
        if not own:
            said = f"{type(exc).__name__}: {said}"
        console.report(
            [(output.ERR if fail_closed else output.WARNING,
              [f"bindguard: cannot check: {said}" if own else f"bindguard: internal error: {said}",
               "  failing closed (--fail-closed)" if fail_closed else "  letting the start go on (fail-open)"
               + ("" if own or debug else "; rerun with --debug for a traceback")])],
            "guard-failed", [],
        )
        return ExitCode.INTERNAL if fail_closed else 0


def end(code) -> None:
    """End the process with `code` as sys.exit(code) would, exit handlers first (atexit, and with it
    weakref.finalize), then stdout and stderr flushed, but without the interpreter's teardown: it
    frees every object of every module one by one and collects, which the kernel does anyway (1.1
    ms of the clear path, 7.56 to 6.49 ms measured interleaved; 3.8 ms of nginx.service's first
    start after a change, with its 130 modules). posix._exit also skips the C library's exit
    handlers and stdio buffers, which nothing of bindguard's uses. For the entry points
    (bin/bindguard, python -m bindguard), never main(): returns, for the caller to exit as Python
    does, when output cannot be written (the broken pipe's own exit), a threading thread is still
    running (one whose work Python's exit would wait for), or the code is not an int. The handlers
    have run by then, and atexit runs each once. The early walk's thread (evidence.sockdiag) is
    not one: it has nothing to finish but the kernel's walk, which the exit waits for anyway."""
    threading = sys.modules.get("threading")
    if not isinstance(code, int) or threading is not None and threading.active_count() > 1:
        return
    try:
        import atexit
        import posix

        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        posix._exit(code)
    except Exception:
        pass


def _stopped(console, signum: int) -> int:
    from bindguard.report import output

    code = 128 + signum
    console.emit(output.ERR, f"bindguard: {STOP_SIGNALS[signum]} before it finished (exit {code})")
    return code


def _reader_gone() -> bool:
    """Whether stdout's or stderr's reader has gone (a pipe or socket with no one at the other end),
    as opposed to a broken pipe of the guard's own."""
    import select

    poller = select.poll()
    for fd in (1, 2):
        poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def _discard_output() -> None:
    """Point stdout and stderr at /dev/null, so that nothing left in a buffer fails again at exit."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
