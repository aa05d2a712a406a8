"""bindguard check: the ExecStartPre= guard."""

from __future__ import annotations

import argparse
import os

from bindguard.endpoints import AddressError, Bind, SocketOptions, host_bindv6only, parse_listen
from bindguard.errors import EXIT_CODES_HELP, UsageError

DESCRIPTION = """\
Will the daemon's bind() succeed? A trial bind with the daemon's socket options answers,
in this network namespace and as the daemon's uid. If an address is blocked, bindguard
finds the socket in the way (sock_diag), the process and unit holding it, and then
  - passes (exit 0) when every address can be bound,
  - waits, up to --wait seconds, while only a TIME_WAIT is in the way (it clears by itself),
  - refuses (exit 98, 99 or 75) with who holds what and how to fix it.
The report goes to stderr with journald priority prefixes (plain on a terminal);
stdout carries only --json.

LISTEN is written as in ListenStream=/ListenDatagram= of systemd.socket(5):
  8080            [::]:8080, dual-stack unless --v6only (0.0.0.0:8080 without IPv6)
  0.0.0.0:8080    every IPv4 address      127.0.0.1:8080   one IPv4 address
  [::]:8080       every IPv6 address      [::1]:8080       one IPv6 address
  [fe80::1%eth0]:8080                     a link-local address on an interface
  udp:[::1]:53    a datagram socket (tcp: may be written; TCP is the default)

example (in a unit):
  ExecStartPre=+/usr/bin/bindguard check --unit %n 0.0.0.0:80 [::]:443"""

EPILOG = EXIT_CODES_HELP


def add_request_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("listen", nargs="*", metavar="LISTEN", help="an address the daemon binds (see above)")
    opts = parser.add_argument_group("the daemon's socket options (they change the kernel's answer)")
    opts.add_argument("--reuseaddr", dest="reuseaddr", action="store_true", default=True,
                      help="the daemon sets SO_REUSEADDR (default: nearly every server does)")
    opts.add_argument("--no-reuseaddr", dest="reuseaddr", action="store_false",
                      help="the daemon does not set SO_REUSEADDR")
    opts.add_argument("--reuseport", action="store_true", help="the daemon sets SO_REUSEPORT")
    opts.add_argument("--v6only", dest="v6only", action="store_true", default=None,
                      help="IPv6 sockets are IPV6_V6ONLY (default: the host's net.ipv6.bindv6only)")
    opts.add_argument("--no-v6only", dest="v6only", action="store_false", help="IPv6 sockets are dual-stack")
    opts.add_argument("--freebind", action="store_true",
                      help="the daemon sets IP_FREEBIND (may bind an address no interface has yet)")
    opts.add_argument("--daemon-user", metavar="USER",
                      help="create the trial sockets as this user (the unit's User=), as the kernel shares "
                           "SO_REUSEPORT only within one uid (default: the guard's own user)")


def add_systemd_arguments(parser: argparse.ArgumentParser) -> None:
    sd = parser.add_argument_group("systemd")
    sd.add_argument("--unit", metavar="NAME",
                    help="the unit being guarded (%%n in a drop-in; default: the unit the guard runs in)")
    bus = sd.add_mutually_exclusive_group()
    bus.add_argument("--user", dest="user_bus", action="store_true", default=None,
                     help="talk to the user manager (default when run by one: MANAGERPID is set)")
    bus.add_argument("--system", dest="user_bus", action="store_false", help="talk to the system manager")
    sd.add_argument("--no-systemd", action="store_true",
                    help="do not ask systemd over D-Bus (units are still named from cgroups)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_request_arguments(parser)
    add_systemd_arguments(parser)
    parser.add_argument("--reap-stale", action="store_true",
                        help="end a holder proven to be a stale instance of the guarded unit (in its cgroup, "
                             "or an orphan running its executable): SIGTERM, SIGKILL after 5 s; nothing else")
    parser.add_argument("--wait", type=float, metavar="SECONDS", default=None,
                        help="wait at most this long while only TIME_WAIT is in the way; 0 never waits "
                             "(default: 65, a full TIME_WAIT, capped by the unit's start timeout)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (schema in README)")
    parser.add_argument("--fail-closed", action="store_true",
                        help="when the guard itself fails, exit 70 instead of letting the start go on")


def _uid_of(user: str) -> int:
    import pwd

    try:
        return int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid
    except KeyError:
        raise UsageError(f"--daemon-user {user!r}: no such user", "give a user name from /etc/passwd or a numeric uid") from None


def build_binds(args: argparse.Namespace) -> list[Bind]:
    if not args.listen:
        raise UsageError("no address to check", "give at least one LISTEN address, e.g. `bindguard check 8080`")
    v6only = args.v6only if args.v6only is not None else host_bindv6only()
    options = SocketOptions(reuseaddr=args.reuseaddr, reuseport=args.reuseport, v6only=v6only,
                            freebind=args.freebind)
    binds = []
    for text in args.listen:
        try:
            endpoint = parse_listen(text)
        except AddressError as exc:
            raise UsageError(str(exc), "see `bindguard check --help` for the address syntax") from None
        if endpoint.host.version == 6 and endpoint.host.ipv4_mapped is not None and v6only:
            raise UsageError(f"{text!r}: a v4-mapped address cannot be bound on a v6only socket",
                             f"write it as IPv4 ({endpoint.host.ipv4_mapped}:{endpoint.port}) or drop --v6only")
        binds.append(Bind(endpoint, options))
    return binds


def validate_wait(wait: float | None) -> float:
    from bindguard.guard import DEFAULT_WAIT

    if wait is None:
        return DEFAULT_WAIT
    if wait < 0 or wait != wait:
        raise UsageError(f"--wait {wait}: must be 0 or more seconds", "use --wait 0 to never wait")
    return wait


def systemd_context(args: argparse.Namespace):
    from bindguard.attribution import SystemdContext

    if args.no_systemd:
        return None
    return SystemdContext(bus_choice=args.user_bus, unit_name=args.unit)


def daemon_uid(args: argparse.Namespace, ctx) -> int | None:
    """--daemon-user; else, where SO_REUSEPORT makes the uid matter, the unit's User=."""
    if args.daemon_user:
        return _uid_of(args.daemon_user)
    if args.reuseport and ctx is not None and ctx.in_unit:
        info = ctx.unit_info()
        if info is not None and info.user:
            return _uid_of(info.user)
    return None


def run(args: argparse.Namespace) -> int:
    from bindguard import guard, report

    ctx = systemd_context(args)
    request = guard.Request(
        binds=build_binds(args),
        wait=validate_wait(args.wait),
        daemon_uid=daemon_uid(args, ctx),
        systemd=ctx,
        reap_stale=args.reap_stale,
    )
    outcome = guard.run(request)
    if args.json:
        report.write_json(outcome)
    report.write_human(outcome)
    return outcome.exit_code
