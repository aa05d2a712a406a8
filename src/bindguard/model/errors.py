"""Exit codes (errno- and sysexits-like, for scripts and `systemctl status`) and user-facing errors."""

EXIT_CLEAR = 0
EXIT_NOPERM = 13  # EACCES: the daemon may not bind a port below net.ipv4.ip_unprivileged_port_start
EXIT_USAGE = 64  # EX_USAGE: bad command line
EXIT_INTERNAL = 70  # EX_SOFTWARE: the guard itself failed and --fail-closed was asked for
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL: only TIME_WAIT was in the way, and the wait ran out
EXIT_CONFIG = 78  # EX_CONFIG: a configuration file is wrong
EXIT_INUSE = 98  # EADDRINUSE: held by something that will not go away by itself
EXIT_NOTAVAIL = 99  # EADDRNOTAVAIL: the address is on no interface

# The verdict each of the guard's answers is called in JSON (`verdict`); any other code is "error".
VERDICTS = {
    EXIT_CLEAR: "clear",
    EXIT_INUSE: "in-use",
    EXIT_NOTAVAIL: "address-unavailable",
    EXIT_TEMPFAIL: "time-wait",
    EXIT_NOPERM: "permission-denied",
}

EXIT_CODES_HELP = """\
exit codes:
  0   clear: every address can be bound (or the guard failed and fails open)
  13  the daemon's user lacks CAP_NET_BIND_SERVICE for a port below
      net.ipv4.ip_unprivileged_port_start (as errno EACCES)
  64  usage error: a malformed address or option
  70  the guard itself failed and --fail-closed was given
  75  still only TIME_WAIT in the way when the wait ran out (EX_TEMPFAIL)
  78  configuration error (a YAML file)
  98  held by something that will not go away by itself (as errno EADDRINUSE)
  99  the address is on no interface (as errno EADDRNOTAVAIL)
  129, 130, 143  ended by SIGHUP, SIGINT or SIGTERM before it finished (128 + the signal)
  141 the reader of stdout or stderr went away (`| head`): a quiet end
With Restart=, systemd retries a refused start like any failure (RestartPreventExitStatus=
does not apply to ExecStartPre=): bound the loop with StartLimitIntervalSec=/StartLimitBurst=."""


class GuardFailure(Exception):
    """The guard itself could not do its work (out of file descriptors, ...): the start goes on,
    or exit 70 when failing closed. Not a fault in the input, and not the kernel's answer."""


class BindguardError(Exception):
    """An error a person can fix: one line saying what is wrong, one hint saying what to do."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(BindguardError):
    exit_code = EXIT_USAGE


class ConfigError(BindguardError):
    """A configuration that cannot be used; problems: every one found (file:line:column each)."""

    exit_code = EXIT_CONFIG

    def __init__(self, message: str, hint: str | None = None, problems: list[str] | tuple[str, ...] = ()) -> None:
        super().__init__(message, hint)
        self.problems = list(problems)
