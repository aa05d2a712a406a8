"""Exit codes (errno- and sysexits-like, for scripts and `systemctl status`) and user-facing errors."""

import enum

_STOPPED = ("ended by SIGHUP, SIGINT or SIGTERM before it finished (128 + the signal's number), "
            "with a line saying so")


class ExitCode(enum.IntEnum):
    """Every exit code bindguard gives, each with the line that explains it. The one place they are
    described: every command's --help lists the ones it gives from here (a command may say what a
    code means for it, cli/commands/*.EXIT_CODES), and tests/test_vocabulary.py holds README's
    exit-code tables to them."""

    help: str

    def __new__(cls, code: int, help: str) -> "ExitCode":
        member = int.__new__(cls, code)
        member._value_ = code
        member.help = help
        return member

    CLEAR = 0, "clear: every address can be bound (or the guard failed, failing open)"
    ATTENTION = 1, "something is not as intended (scan: a finding; verify: an address not served as intended)"
    NOPERM = 13, ("the daemon's user lacks CAP_NET_BIND_SERVICE for a port below "
                  "net.ipv4.ip_unprivileged_port_start (as errno EACCES)")
    USAGE = 64, "usage error: a malformed address or option"  # EX_USAGE
    INTERNAL = 70, "the guard itself failed and --fail-closed was given"  # EX_SOFTWARE
    TEMPFAIL = 75, "only TIME_WAIT was in the way and it had not cleared when the wait ran out (EX_TEMPFAIL)"
    CONFIG = 78, "a configuration file is wrong"  # EX_CONFIG
    INUSE = 98, ("held by something that does not go away by itself, or a holder still leaving when the wait "
                 "ran out (as errno EADDRINUSE)")
    NOTAVAIL = 99, "the address is on no interface (as errno EADDRNOTAVAIL)"
    # 128 + the signal's number, as a shell reports it (bindguard.cli, which must not import this).
    HANGUP = 129, _STOPPED
    INTERRUPTED = 130, _STOPPED
    TERMINATED = 143, _STOPPED
    BROKEN_PIPE = 141, "the reader of stdout or stderr went away (`| head`): a quiet end, as SIGPIPE ends other tools"


# What every command can give: a bad command line, a signal, a reader gone.
COMMON_EXIT_CODES = (ExitCode.USAGE, ExitCode.HANGUP, ExitCode.INTERRUPTED, ExitCode.TERMINATED, ExitCode.BROKEN_PIPE)

# The verdict each of the guard's answers is called in JSON (`verdict`); any other code is "error".
VERDICTS: dict[int, str] = {
    ExitCode.CLEAR: "clear",
    ExitCode.INUSE: "in-use",
    ExitCode.NOTAVAIL: "address-unavailable",
    ExitCode.TEMPFAIL: "time-wait",
    ExitCode.NOPERM: "permission-denied",
}


class GuardFailure(Exception):
    """The guard itself could not do its work (out of file descriptors, ...): the start goes on,
    or exit 70 when failing closed. Not a fault in the input, and not the kernel's answer."""


class BindguardError(Exception):
    """An error a person can fix: one line saying what is wrong, one hint saying what to do."""

    exit_code: int = ExitCode.INTERNAL

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(BindguardError):
    exit_code = ExitCode.USAGE


class ConfigError(BindguardError):
    """A configuration that cannot be used; problems: every one found (file:line:column each)."""

    exit_code = ExitCode.CONFIG

    def __init__(self, message: str, hint: str | None = None, problems: list[str] | tuple[str, ...] = ()) -> None:
        super().__init__(message, hint)
        self.problems = list(problems)
