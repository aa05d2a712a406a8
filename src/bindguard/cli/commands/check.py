"""bindguard check: the ExecStartPre= guard."""

from __future__ import annotations

import os
from collections.abc import Callable

from bindguard.model.endpoints import Bind, ascii_number
from bindguard.model.errors import VERDICTS, BindguardError, ExitCode, UsageError
from bindguard.model.kinds import ANY_KIND, ConflictKind
from bindguard.model.text import excerpt
from bindguard.report import output
from bindguard.request.plan import IF_AVAILABLE, OPTIONAL, RequestOptions, plan
from bindguard.systemd.unitfiles import normalize_unit, own_unit, user_manager

TYPE_CHECKING = False  # typing's own costs an import
if TYPE_CHECKING:  # argparse builds the parser; run() also gets the namespace of fastpath.arguments
    import argparse

DESCRIPTION = """\
Will the daemon's bind() succeed? A trial bind with the daemon's socket options answers,
in this network namespace (and, with SO_REUSEPORT, as the daemon's uid: --daemon-user, or
the unit's User=). If an address is blocked, bindguard
finds the socket in the way (sock_diag), the process and unit holding it, and then
  - passes (exit 0) when every address can be bound,
  - waits, up to --wait seconds, while only what clears by itself is in the way (a TIME_WAIT,
    an address in duplicate address detection, a holder already stopping or exiting),
  - refuses (exit 98, 99, 75 or 13) with who holds what and how to fix it.
The report goes to stderr, plain. Under systemd ($JOURNAL_STREAM names stderr) it is one journal
entry with a MESSAGE_ID and BINDGUARD_* fields (see README), or lines with journald priority
prefixes where journald's socket is missing. stdout carries only --json.

LISTEN is written as in ListenStream=/ListenDatagram= of systemd.socket(5):
  8080            [::]:8080, dual-stack unless --v6only (0.0.0.0:8080 without IPv6)
  0.0.0.0:8080    every IPv4 address      127.0.0.1:8080   one IPv4 address
  [::]:8080       every IPv6 address      [::1]:8080       one IPv6 address
  [fe80::1%eth0]:8080                     a link-local address on an interface
  udp:[::1]:53    a datagram socket (tcp: may be written; TCP is the default)

examples (in a unit):
  ExecStartPre=+/usr/bin/bindguard check --unit %n --v6only 0.0.0.0:80 [::]:80
  ExecStartPre=+/usr/bin/bindguard check --unit %n    (addresses from /etc/bindguard/UNIT.yaml
                                                        or discovered from nginx, sshd, ...; in a
                                                        .socket unit, its own Listen entries)"""

EXIT_CODES: dict[ExitCode, str | None] = dict.fromkeys((
    ExitCode.CLEAR, ExitCode.NOPERM, ExitCode.INTERNAL, ExitCode.TEMPFAIL, ExitCode.CONFIG, ExitCode.INUSE,
    ExitCode.NOTAVAIL))
EXIT_NOTE = """\
With Restart=, systemd retries a refused start like any failure (RestartPreventExitStatus=
does not apply to ExecStartPre=): bound the loop with StartLimitIntervalSec=/StartLimitBurst=."""


LISTEN_SYNTAX = "in ListenStream= syntax: 8080, 0.0.0.0:8080, [::1]:8080, udp:[::1]:53"


def add_listen_argument(parser: argparse.ArgumentParser, help: str, required: bool = False) -> None:
    parser.add_argument("listen", nargs="+" if required else "*", metavar="LISTEN", help=help)


def add_v6only_arguments(group) -> None:
    group.add_argument("--v6only", dest="v6only", action="store_true", default=None,
                       help="IPv6 sockets are IPV6_V6ONLY (default: the host's net.ipv6.bindv6only)")
    group.add_argument("--no-v6only", dest="v6only", action="store_false", help="IPv6 sockets are dual-stack")


def add_socket_arguments(parser: argparse.ArgumentParser) -> None:
    """The daemon's socket options and uid: what changes the kernel's answer to a trial bind."""
    opts = parser.add_argument_group("the daemon's socket options (they change the kernel's answer)")
    opts.add_argument("--reuseaddr", dest="reuseaddr", action="store_true", default=None,
                      help="the daemon sets SO_REUSEADDR (default: nearly every server does)")
    opts.add_argument("--no-reuseaddr", dest="reuseaddr", action="store_false",
                      help="the daemon does not set SO_REUSEADDR")
    opts.add_argument("--reuseport", action="store_true", default=None, help="the daemon sets SO_REUSEPORT")
    add_v6only_arguments(opts)
    opts.add_argument("--freebind", action="store_true", default=None,
                      help="the daemon sets IP_FREEBIND (may bind an address no interface has yet)")
    opts.add_argument("--daemon-user", metavar="USER",
                      help="create the trial sockets as this user (the unit's User=), as the kernel shares "
                           "SO_REUSEPORT only within one uid (default: the guard's own user)")


UNIT_HELP = "the unit being guarded (%%n in a drop-in; default: the unit the guard runs in)"


def add_systemd_arguments(parser: argparse.ArgumentParser, unit_help: str | None = UNIT_HELP) -> None:
    """--unit (for the commands about one unit, with what it means to each), the bus to ask, and
    --no-systemd."""
    sd = parser.add_argument_group("systemd")
    if unit_help:
        sd.add_argument("--unit", metavar="NAME", help=unit_help)
    bus = sd.add_mutually_exclusive_group()
    bus.add_argument("--user", dest="user_bus", action="store_true", default=None,
                     help="talk to the user manager (default when run by one: MANAGERPID is set)")
    bus.add_argument("--system", dest="user_bus", action="store_false", help="talk to the system manager")
    sd.add_argument("--no-systemd", action="store_true",
                    help="do not ask systemd over D-Bus (units are still named from cgroups)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_listen_argument(parser, f"an address the daemon binds ({LISTEN_SYNTAX}; see above); none with --unit: "
                                "the unit's YAML file, else discovery from its daemon's configuration (for a "
                                "socket unit: its own ListenStream=/ListenDatagram= and socket options)")
    add_socket_arguments(parser)
    add_systemd_arguments(parser)
    parser.add_argument("--optional", metavar="LISTEN", action="append",
                        help="an address the daemon starts without, whatever keeps it from binding it (one of "
                             "several sshd ListenAddress lines or PostgreSQL listen_addresses): checked, but any "
                             "conflict on it only warns; repeat for more")
    parser.add_argument("--if-available", metavar="LISTEN", action="append",
                        help="an address the daemon skips when no interface has it (Redis's `bind -::1`): "
                             "checked; that it is unavailable only warns, a holder on it still refuses; "
                             "repeat for more")
    parser.add_argument("--config", metavar="FILE",
                        help="read this YAML file instead of the unit's (see `bindguard config --help`)")
    parser.add_argument("--reap-stale", action="store_true",
                        help="end a holder the manager confirms is a stale instance of the guarded unit (over the "
                             "bus, in the unit's own ControlGroup while the unit runs no instance): SIGTERM, "
                             "SIGKILL after 5 s; nothing else")
    parser.add_argument("--wait", type=float, metavar="SECONDS", default=None,
                        help="wait at most this long while only what clears by itself is in the way (TIME_WAIT, "
                             "an address in duplicate address detection, a holder already leaving); 0 never waits "
                             "(default: 65, a full TIME_WAIT, capped by the unit's start timeout)")
    from bindguard.cli.parser import add_json_option

    add_json_option(parser, "print one JSON object on stdout")
    parser.add_argument("--fail-closed", action="store_true",
                        help="when the guard itself fails, exit 70 instead of letting the start go on")


MAX_UID = 4294967294  # (uid_t) -1 is no uid: chown(2) reads it as "leave unchanged"


def _uid_of(user: str) -> int:
    import pwd

    uid = ascii_number(user)
    if uid is not None and uid <= MAX_UID:
        return uid
    if not user or (user.isascii() and user.isdigit()) or "\0" in user:
        raise UsageError(f"--daemon-user {user!r}: not a user name, nor a uid from 0 to {MAX_UID}",
                         "give a user name from /etc/passwd or a numeric uid")
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise UsageError(f"--daemon-user {user!r}: no such user",
                         "give a user name from /etc/passwd or a numeric uid") from None


def explicit_options(args: argparse.Namespace) -> dict[str, bool]:
    """The socket options given on the command line; they win over a configuration file's."""
    return {name: getattr(args, name) for name in ("reuseaddr", "reuseport", "v6only", "freebind")
            if getattr(args, name, None) is not None}


def optional_addresses(args: argparse.Namespace) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(address, conflict kinds that only warn) for --optional and --if-available (check and
    verify; explain has neither)."""
    return tuple([(text, OPTIONAL) for text in getattr(args, "optional", None) or []]
                 + [(text, IF_AVAILABLE) for text in getattr(args, "if_available", None) or []])


def named_unit(args: argparse.Namespace, guarded: Callable[[], str | None] | None) -> str | None:
    """The unit whose YAML file and `fail:` hold: --unit as systemctl takes it (`web` is
    web.service), else, when no address and no --config name what to check, the unit the guard
    runs in (guarded(): None with --no-systemd)."""
    if args.unit:
        return normalize_unit(args.unit)
    if guarded is None or args.config is not None or args.listen or optional_addresses(args):
        return None
    return guarded()


def request_options(args: argparse.Namespace, unit: str | None) -> RequestOptions:
    """The command line's request, for the request stage (unit: named_unit's)."""
    return RequestOptions(
        listen=tuple(args.listen),
        optional=optional_addresses(args),
        socket_options=explicit_options(args),
        unit=unit,
        config=getattr(args, "config", None),
        user_bus=args.user_bus,
    )


def running_unit() -> str | None:
    """The unit the guard runs in when a service manager started it (INVOCATION_ID, as
    SystemdContext.in_unit says): what its own cgroup path names, without D-Bus."""
    return own_unit() if os.environ.get("INVOCATION_ID") else None


def fails_closed(args: argparse.Namespace) -> bool:
    """Whether a failure of check itself exits 70 (cli.main asks before run)."""
    return declared_fail_closed(args, lambda: named_unit(args, None if args.no_systemd else running_unit))


def declared_fail_closed(args: argparse.Namespace, unit: Callable[[], str | None]) -> bool:
    """--fail-closed, or `fail: closed` in the unit's files (or --config), read from YAML events
    alone so that it holds when reading them fully fails; decided before the command runs, so
    that it holds whatever fails after. Never raises: a fault here leaves the command line's word."""
    if args.fail_closed:
        return True
    try:
        from bindguard.request.config import declares_fail_closed

        return declares_fail_closed(unit(), args.config)
    except Exception:
        return False


def validate_wait(wait: float | None) -> float:
    from bindguard.action.guard import DEFAULT_WAIT

    if wait is None:
        return DEFAULT_WAIT
    if wait < 0 or wait != wait:
        raise UsageError(f"--wait {wait}: must be 0 or more seconds", "use --wait 0 to never wait")
    return wait


def systemd_context(args: argparse.Namespace):
    """What systemd is asked, for --unit as systemctl takes it (`web` is web.service); None with --no-systemd."""
    from bindguard.systemd.context import SystemdContext

    unit = normalize_unit(args.unit) if args.unit else None  # a bad name is a usage error even with --no-systemd
    if args.no_systemd:
        return None
    return SystemdContext(bus_choice=args.user_bus, unit_name=unit)


def daemon_uid(args: argparse.Namespace, ctx, binds: list[Bind]) -> int | None:
    """--daemon-user; else, where SO_REUSEPORT makes the uid matter, the unit's User=."""
    if args.daemon_user is not None:
        return _uid_of(args.daemon_user)
    if any(b.options.reuseport for b in binds) and ctx is not None and ctx.in_unit:
        user = ctx.unit_user()
        if user:
            try:
                return _uid_of(user)
            except UsageError:
                # Not the command line's mistake, and no reason to fail the start: an unknown User=
                # (DynamicUser= without libnss-systemd) leaves the trial sockets the guard's own.
                ctx.notes.append(f"the unit's User={user} is no user this system knows, so the trial sockets "
                                 "are the guard's own uid: SO_REUSEPORT sharing is judged for that uid")
    return None


def privilege_unit(args: argparse.Namespace, ctx) -> str | None:
    """The unit whose credentials and settings may prove a privileged port denied to its daemon
    (only while the guard runs inside it: bindguard.evidence.privilege checks that)."""
    unit = normalize_unit(args.unit) if args.unit else ctx.guarded_unit() if ctx is not None else None
    return None if unit is None or unit.endswith(".socket") else unit  # the manager binds a socket unit's sockets


def run(args: argparse.Namespace, console: output.Console) -> int:
    from bindguard.action import guard
    from bindguard.report import outcome as report
    from bindguard.verdict.policy import Rules

    ctx = systemd_context(args)
    options = request_options(args, named_unit(args, None if ctx is None else running_unit))
    checks = plan(options, ctx, console.warning)
    if checks is None:
        console.emit(output.DEBUG, f"bindguard: nothing to guard for {options.unit}")
        return ExitCode.CLEAR
    for line in checks.sources:
        console.emit(output.INFO, f"bindguard: checking {line}")
    request = guard.Request(
        binds=checks.binds,
        wait=validate_wait(args.wait if args.wait is not None else checks.wait),
        daemon_uid=daemon_uid(args, ctx, checks.binds),
        rules=Rules(
            policy={**checks.policy, **({ConflictKind.NAT_SHADOWED: checks.nat} if checks.nat else {})},
            warn_only={b: (kinds, "the daemon starts without this socket") for b, kinds in checks.survivable.items()}
            | {b: ((ANY_KIND,), "the address is a guess from the unit's command line") for b in checks.guesses},
            needs_one_of=frozenset(b for b in checks.binds if b not in checks.guesses),
        ),
        systemd=ctx,
        advise=True,
        reap_stale=args.reap_stale or checks.reap_stale,
        nat=checks.nat is not None,
        privilege_unit=privilege_unit(args, ctx),
        user_manager=user_manager(args.user_bus),  # as ctx.user_bus: ctx is built from args.user_bus
        log=console.emit,
    )
    answered: list = []  # the kernel's answers, kept apart from everything that explains them
    outcome = None
    json_written = False
    try:
        outcome = guard.run(request, answered)
        if args.json:
            report.write_json(outcome, args.json)
            json_written = True
        report.write_human(console, outcome)
        return outcome.exit_code
    except (BindguardError, BrokenPipeError):
        raise
    except Exception as exc:
        # No failure to learn about a conflict turns the kernel's refusal into a pass: once the
        # trial bind has answered, a fault in observing, attributing or reporting keeps its verdict.
        # Before that, the fault is the guard's own, and bindguard.cli fails open (or 70, --fail-closed).
        if not answered:
            raise
        if args.debug:
            console.traceback()
        fault = f"{type(exc).__name__}: {excerpt(str(exc), 200)}"
        if outcome is None:
            outcome = guard.unexplained(request, answered[-1], fault)
        write_unexplained(console, outcome, fault, json=None if json_written else args.json)
        return outcome.exit_code


def write_unexplained(console: output.Console, outcome, fault: str, json: str | None) -> None:
    """The kernel's verdict where the report could not be made: plain lines, nothing but the
    probe's answers and the fault (the renderer may be what failed)."""
    failed = [r for r in outcome.results if not r.ok]
    answers = ", ".join(f"{r.bind} ({r.error_name})" for r in failed)
    if json:
        from bindguard.report.jsonout import write_json

        write_json({
            "clear": outcome.clear,
            "verdict": VERDICTS.get(outcome.exit_code, "error"),
            "exit_code": outcome.exit_code,
            "addresses": [{"address": str(r.bind), "bindable": r.ok, "error": r.error_name or None}
                          for r in outcome.results],
            "unexplained": fault,
        }, json)
    why = f"the guard could not explain the kernel's answer: {fault}"
    if outcome.clear:
        passed = f"refused only {answers}, where a conflict only warns" if failed else "refused no address"
        console.emit(output.WARNING, [f"bindguard: clear: the kernel's trial bind {passed} (exit 0)", f"  note: {why}"])
        return
    console.emit(output.ERR, [
        f"bindguard: refusing to start: the kernel's trial bind refused {answers} (exit {outcome.exit_code})",
        f"  {why}; `bindguard explain` shows who holds the addresses, --debug a traceback"])
