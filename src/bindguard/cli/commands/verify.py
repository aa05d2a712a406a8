"""bindguard verify: after the start, the unit's own processes listen where intended (ExecStartPost=)."""

from __future__ import annotations

import argparse

from bindguard.cli.commands import check
from bindguard.cli.parser import add_json_option
from bindguard.model.endpoints import Bind
from bindguard.model.errors import ExitCode, UsageError
from bindguard.report import output
from bindguard.systemd.unitfiles import normalize_unit
from bindguard.verdict.verify import Check

DESCRIPTION = """\
After the daemon started: does each address have exactly one intended listener (or a
SO_REUSEPORT group of them), owned by the unit's own processes (as the manager places them;
without a bus, in verify's own cgroup), on the intended local address, with nothing else bound
to it? verify polls sock_diag until every address has a listener or --timeout runs out, then
reports and exits non-zero if anything is wrong, so that the start fails and `systemctl
status` shows why:

  not-listening   nothing listens on the address: the daemon never reached listen()
  wrong-address   the unit listens on this port, but on another address (or on [::] with
                  another IPV6_V6ONLY than --v6only/--no-v6only or its configuration says)
  shared          a process outside the unit is bound to the address too (SO_REUSEPORT, or
                  SO_REUSEADDR for UDP): the kernel splits the traffic between them
  foreign-owner   a process outside the unit owns the address

An address the daemon starts without (--optional, --if-available, `optional:` in the unit's
bindguard file, or as discovery knows it: Redis's `bind -::1`) is not waited for, and that
the unit does not hold it (not-listening, wrong-address, foreign-owner) is only a note.

The addresses are planned as `check` plans them: the LISTEN arguments; without them, the
unit's bindguard file (listen:, or --config), else discovery from its daemon's configuration.
The unit is --unit, else the unit verify runs in. The report goes to stderr with journald
priority prefixes (plain on a terminal); stdout carries only --json.

example (in a unit):
  ExecStartPost=/usr/bin/bindguard verify 0.0.0.0:80 [::]:443"""

EXIT_CODES: dict[ExitCode, str | None] = {
    ExitCode.CLEAR: "every address is served as intended",
    ExitCode.ATTENTION: "the unit does not listen where intended (not-listening, wrong-address)",
    ExitCode.USAGE: "usage error: a malformed address or option, or no unit or address to verify",
    ExitCode.INTERNAL: "verify itself failed and --fail-closed was given (otherwise it lets the unit run: 0)",
    ExitCode.CONFIG: "the unit's bindguard file is wrong",
    ExitCode.INUSE: "a process outside the unit owns or shares an address (foreign-owner, shared)",
}

DEFAULT_TIMEOUT = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    check.add_listen_argument(parser, f"an address the unit must serve ({check.LISTEN_SYNTAX}); none: the "
                                      "unit's bindguard file, else discovery from its daemon's configuration")
    check.add_v6only_arguments(parser.add_argument_group("the daemon's IPv6 sockets (how [::] must be bound)"))
    check.add_systemd_arguments(parser, unit_help="the unit whose processes must serve the addresses (%%n in "
                                                  "a drop-in; default: the unit verify runs in)")
    for flag, example in (("--optional", "one of several sshd ListenAddress lines"),
                          ("--if-available", "Redis's `bind -::1`")):
        parser.add_argument(flag, metavar="LISTEN", action="append",
                            help=f"an address the daemon starts without ({example}), as given to `check`: "
                                 "not waited for, and not holding it is only a note; repeat for more")
    parser.add_argument("--config", metavar="FILE",
                        help="read this YAML file instead of the unit's (see `bindguard config --help`)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"wait at most this long for the daemon to listen (default {DEFAULT_TIMEOUT:g}); "
                             "keep it well within the unit's TimeoutStartSec=")
    add_json_option(parser, "print one JSON object on stdout")
    parser.add_argument("--fail-closed", action="store_true",
                        help="when verify itself fails, exit 70 instead of letting the unit run")


def _verified_unit(args: argparse.Namespace) -> str | None:
    """--unit, else the unit verify runs in when a service manager started it (from a shell, the
    cgroup names the shell's session scope, which is no unit to verify)."""
    return args.unit or check.running_unit()


def fails_closed(args: argparse.Namespace) -> bool:
    """Whether a failure of verify itself exits 70 (cli.main asks before run)."""
    return check.declared_fail_closed(args, lambda: _verified_unit(args))


def _resolve(args: argparse.Namespace,
             console: output.Console) -> tuple[str, list[Bind], frozenset[Bind], bool, object]:
    """The unit, its addresses (as `check` plans them), those the daemon starts without, whether
    IPV6_V6ONLY was stated, and the SystemdContext that asks the manager (None with --no-systemd)."""
    from bindguard.request import config
    from bindguard.request.plan import plan as plan_of

    unit = _verified_unit(args)
    if not unit:
        raise UsageError("verify needs the unit whose processes must own the addresses",
                         "run it from the unit's ExecStartPost=, or give --unit NAME")
    args.unit = normalize_unit(unit)
    given = args.listen or check.optional_addresses(args)
    if not given and args.no_systemd and args.config is None and config.load_unit_config(args.unit) is None:
        raise UsageError(f"no address to verify for {args.unit}: no LISTEN, and no bindguard file",
                         "give the addresses, e.g. `bindguard verify 0.0.0.0:80`")
    ctx = check.systemd_context(args)
    plan = plan_of(check.request_options(args, args.unit), ctx, console.warning)
    if plan is None or not plan.binds:
        raise UsageError(f"no address to verify for {args.unit}: no LISTEN, no listen: in its bindguard file, "
                         "and discovery found none", "give the addresses as LISTEN arguments")
    for line in plan.sources:
        console.emit(output.INFO, f"bindguard: verifying {line}")
    binds = [b for b in plan.binds if b not in plan.guesses]
    if not binds:
        raise UsageError(f"discovery only guessed the addresses of {args.unit}; verify does not judge on guesses",
                         "give the addresses as LISTEN arguments, or a listen: list in its bindguard file")
    return args.unit, binds, frozenset(plan.survivable), args.v6only is not None or not args.listen, ctx


def _report(console: output.Console, unit: str, checks: list[Check], code: int, waited: float,
            notes: list[str]) -> None:
    if code == 0:
        served = [c for c in checks if c.kind is None]
        what = ", ".join(str(c.bind) for c in served) or "none of its addresses, all optional,"
        console.emit(output.INFO, f"bindguard: verify: {unit} serves {what} as intended")
        for c in checks:
            if c.kind is None:
                console.emit(output.INFO, [f"  {c.bind}: {e}" for e in c.evidence])
            else:
                _note_optional(console, c)
    else:
        wrong = ", ".join(str(c.bind) for c in checks if not c.ok)
        console.emit(output.ERR, f"bindguard: verify: {unit} does not serve {wrong} as intended (exit {code})")
        for c in checks:
            if c.kind is None:
                console.emit(output.INFO, f"  {c.bind}: ok")
                continue
            if c.ok:
                _note_optional(console, c)
                continue
            lines = [f"  {c.bind}: {c.kind}"] + [f"    evidence: {e}" for e in c.evidence] + [f"    fix: {c.fix}"]
            console.emit(output.ERR, lines)
    for note in notes:
        console.emit(output.NOTICE, f"  note: {note}")


def _note_optional(console: output.Console, c: Check) -> None:
    console.emit(output.NOTICE, [f"  note: {c.bind}: {c.kind}, an optional address: the daemon starts without it",
                                *(f"    evidence: {e}" for e in c.evidence)])


def _json(unit: str, checks: list[Check], code: int, waited: float, notes: list[str]) -> dict:
    return {
        "ok": code == 0,
        "exit_code": code,
        "unit": unit,
        "waited_s": round(waited, 3),
        "addresses": [{
            "address": str(c.bind),
            "ok": c.ok,
            "kind": c.kind,
            "optional": c.optional,
            "listeners": [{
                "local_address": str(h.socket.local), "state": h.socket.state, "v6only": h.socket.v6only,
                "in_unit": h.in_unit, "pids": [p.pid for p in h.processes],
                "units": sorted({unit for unit, _ in h.units if unit}),
                "unit_statuses": [status for _, status in h.units],
                "command": " ".join(h.processes[0].cmdline) if h.processes else None,
            } for h in c.holders],
            "evidence": c.evidence,
            "fix": c.fix or None,
        } for c in checks],
        "notes": notes,
    }


def run(args: argparse.Namespace, console: output.Console) -> int:
    from bindguard.action import verify

    if not 0 <= args.timeout < float("inf"):  # inf would poll for ever, nan compares false
        raise UsageError(f"--timeout {args.timeout}: must be 0 or more seconds, and finite", "e.g. --timeout 5")
    unit, binds, optional, v6only_stated, ctx = _resolve(args, console)
    result = verify.run(unit, binds, optional, v6only_stated, args.timeout, ctx)
    code = result.exit_code
    if args.json:
        from bindguard.report.jsonout import write_json

        write_json(_json(unit, result.checks, code, result.waited, result.notes), args.json)
    _report(console, unit, result.checks, code, result.waited, result.notes)
    return code
