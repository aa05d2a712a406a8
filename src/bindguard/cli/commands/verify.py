"""bindguard verify: after the start, the unit's own processes listen where intended (ExecStartPost=)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field

from bindguard.cli.commands import check
from bindguard.model.endpoints import TCP, Bind, addresses_overlap
from bindguard.model.errors import EXIT_INUSE, UsageError
from bindguard.model.facts import BOUND, ProcessFact, SocketFact, holder_unit
from bindguard.model.kinds import NO_UNIT, UNIT_BY_MANAGER
from bindguard.report import output
from bindguard.systemd.unitfiles import normalize_unit
from bindguard.verdict.conflicts import unit_phrase

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

EXIT_NOT_LISTENING = 1

EPILOG = f"""\
exit codes:
  0   every address is served as intended
  {EXIT_NOT_LISTENING}   the unit does not listen where intended (not-listening, wrong-address)
  64  usage error: a malformed address or option, or no unit or address to verify
  70  verify itself failed and --fail-closed was given (otherwise it lets the unit run: 0)
  78  the unit's bindguard file is wrong
  {EXIT_INUSE}  a process outside the unit owns or shares an address (foreign-owner, shared)"""

NOT_LISTENING = "not-listening"
WRONG_ADDRESS = "wrong-address"
SHARED = "shared"
FOREIGN_OWNER = "foreign-owner"
# What an optional address may be: the unit does not hold it (a daemon that starts without it).
NOT_HELD = (NOT_LISTENING, WRONG_ADDRESS, FOREIGN_OWNER)
DEFAULT_TIMEOUT = 5.0
POLL_INTERVAL = 0.1


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
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--fail-closed", action="store_true",
                        help="when verify itself fails, exit 70 instead of letting the unit run")


@dataclass
class Holder:
    socket: SocketFact
    processes: list[ProcessFact]
    in_unit: bool  # one of the processes is proven to be in the verified unit (see _in_unit)
    units: list[tuple[str | None, str]] = field(default_factory=list)  # each process's verdict.holder_unit


@dataclass
class Check:
    bind: Bind
    kind: str | None = None  # None: served as intended
    holders: list[Holder] = field(default_factory=list)  # every listener overlapping the address
    evidence: list[str] = field(default_factory=list)
    fix: str = ""
    optional: bool = False  # the daemon starts without this address

    @property
    def ok(self) -> bool:
        return self.kind is None or self.optional and self.kind in NOT_HELD


def _resolve(args: argparse.Namespace) -> tuple[str, list[Bind], frozenset[Bind], bool, object]:
    """The unit, its addresses (as `check` plans them), those the daemon starts without, whether
    IPV6_V6ONLY was stated, and the SystemdContext that asks the manager (None with --no-systemd)."""
    from bindguard.request import config
    from bindguard.systemd import bus

    unit = args.unit or bus.guarded_unit()
    if not unit:
        raise UsageError("verify needs the unit whose processes must own the addresses",
                         "run it from the unit's ExecStartPost=, or give --unit NAME")
    args.unit = normalize_unit(unit)
    given = args.listen or check.optional_addresses(args)
    if not given and args.no_systemd and args.config is None and config.load_unit_config(args.unit) is None:
        raise UsageError(f"no address to verify for {args.unit}: no LISTEN, and no bindguard file",
                         "give the addresses, e.g. `bindguard verify 0.0.0.0:80`")
    ctx = check.systemd_context(args)
    plan = check.plan(args, ctx)
    if plan is None or not plan.binds:
        raise UsageError(f"no address to verify for {args.unit}: no LISTEN, no listen: in its bindguard file, "
                         "and discovery found none", "give the addresses as LISTEN arguments")
    for line in plan.sources:
        output.emit(output.INFO, f"bindguard: verifying {line}")
    binds = [b for b in plan.binds if b not in plan.guesses]
    if not binds:
        raise UsageError(f"discovery only guessed the addresses of {args.unit}; verify does not judge on guesses",
                         "give the addresses as LISTEN arguments, or a listen: list in its bindguard file")
    return args.unit, binds, frozenset(plan.survivable), args.v6only is not None or not args.listen, ctx


def _observe(binds: list[Bind], notes: list[str]) -> dict[tuple[str, int], list[SocketFact]]:
    from bindguard.evidence import sockets

    found = {}
    for proto, port in sorted({(b.endpoint.proto, b.endpoint.port) for b in binds}):
        state = "LISTEN" if proto == TCP else BOUND
        found[(proto, port)] = [s for s in sockets.sockets_on_port(proto, port, notes, states=[state])
                                if s.remote is None]
    return found


def _exact(bind: Bind, sock: SocketFact) -> bool:
    ep, local = bind.endpoint, sock.local
    return (local.proto, local.host, local.port) == (ep.proto, ep.host, ep.port)


def wait_for_listeners(binds: list[Bind], timeout: float, notes: list[str],
                       optional: frozenset[Bind] = frozenset()) -> tuple[dict, float]:
    """Poll until every address the daemon needs (all of them, if it needs none) has a socket on
    it, or timeout seconds pass; the last observation."""
    awaited = [b for b in binds if b not in optional] or binds
    start = time.monotonic()
    while True:
        observed = _observe(binds, notes)
        elapsed = time.monotonic() - start
        if all(any(_exact(b, s) for s in observed[(b.endpoint.proto, b.endpoint.port)]) for b in awaited) \
                or elapsed >= timeout:
            return observed, elapsed
        time.sleep(min(POLL_INTERVAL, max(timeout - elapsed, 0.0)))


def _in_unit(unit: str, process: ProcessFact, named: tuple[str | None, str], own_cgroup: str | None) -> bool:
    """Whether process belongs to unit: the manager's word where it answered; else the kernel's,
    where verify runs in the unit itself (ExecStartPost=: the same cgroup); else only the name its
    cgroup path bears, which the evidence marks as unconfirmed."""
    from bindguard.evidence.owners import cgroup_within

    name, status = named
    if status in (UNIT_BY_MANAGER, NO_UNIT) or own_cgroup is None:
        return name == unit
    return cgroup_within(process.cgroup, own_cgroup)


def _holders(observed: dict, unit: str, notes: list[str], ctx=None) -> dict[int, Holder]:
    from bindguard.evidence import owners
    from bindguard.systemd import bus
    from bindguard.systemd.context import ask_units, own_unit_cgroup

    all_sockets = [s for socks in observed.values() for s in socks]
    inodes = {s.inode for s in all_sockets if s.inode}
    found = owners.find_holders(inodes, owners.socket_cgroup_pids(all_sockets), every_holder=True)
    if found.unreadable:
        notes.append("some processes could not be inspected (permission denied): run verify as root "
                     "(ExecStartPost=+...) to see every holder")
    facts: dict[int, ProcessFact | None] = {}
    for pids in found.values():
        for pid in pids:
            if pid not in facts:
                facts[pid] = owners.process_facts(pid)
    answered: dict[int, str | None] = {}
    connection = ctx.connection() if ctx is not None and facts else None
    if connection is not None:
        try:
            ask_units(connection, [pid for pid, fact in facts.items() if fact is not None], answered)
        except bus.SystemdError as exc:
            notes.append(f"{exc}; units are named from cgroup paths")
    if ctx is not None:
        notes.extend(n for n in ctx.notes if n not in notes)
    own_cgroup = own_unit_cgroup(unit)
    result = {}
    for s in all_sockets:
        processes = [p for p in (facts[pid] for pid in found.get(s.inode, [])) if p is not None]
        units = [holder_unit(p, answered) for p in processes]
        in_unit = any(_in_unit(unit, p, named, own_cgroup) for p, named in zip(processes, units, strict=True))
        result[s.inode] = Holder(s, processes, in_unit, units)
    return result


def _who(holder: Holder) -> str:
    if not holder.processes:
        return f"{holder.socket.local} {holder.socket.state} (holder not found, uid {holder.socket.uid})"
    p = holder.processes[0]
    unit, status = holder.units[0] if holder.units else holder_unit(p, {})
    more = f" and {len(holder.processes) - 1} more" if len(holder.processes) > 1 else ""
    return (f"{holder.socket.local} {holder.socket.state}: PID {p.pid} ({' '.join(p.cmdline) or p.name}){more}, "
            f"{unit_phrase(unit, status)}, cgroup {p.cgroup or '?'}")


def assess(bind: Bind, sockets_on_port: list[SocketFact], holders: dict[int, Holder], unit: str,
           v6only_stated: bool, waited: float) -> Check:
    """The verdict for one address, from the listeners on its port and who holds them. Pure."""
    check = Check(bind)
    ep = bind.endpoint
    on_port = [holders[s.inode] for s in sockets_on_port if s.inode in holders]
    overlapping = [h for h in on_port if addresses_overlap(ep, bind.v6only, h.socket.local, h.socket.v6only)]
    check.holders = overlapping
    exact = [h for h in overlapping if _exact(bind, h.socket)]
    ours, foreign = [h for h in exact if h.in_unit], [h for h in overlapping if not h.in_unit]
    elsewhere = [h for h in on_port if h.in_unit and h not in exact]
    if not ours and foreign:
        check.kind = FOREIGN_OWNER
        check.evidence = [f"held outside {unit}: {_who(h)}" for h in foreign]
        h = next((h for h in foreign if h.processes), None)
        p = h.processes[0] if h else None
        named = (h.units[0] if h.units else holder_unit(p, {})) if h and p else (None, "")
        holder, how = named
        stop = (f"`systemctl stop {holder}`" if how == UNIT_BY_MANAGER and holder and holder.endswith(".service")
                else f"the way it was started, after finding out what it is with "
                     f"`ps -o pid,ppid,lstart,cmd -p {p.pid}`" if p
                else f"find it as root with `ss -lntup 'sport = :{ep.port}'`")
        check.fix = (f"{unit} does not own {ep}: stop the holder ({stop}) and restart {unit}; a "
                     f"`bindguard check` in ExecStartPre= refuses such a start up front")
    elif not ours and elsewhere:
        check.kind = WRONG_ADDRESS
        check.evidence = [f"{unit} listens elsewhere on the port: {_who(h)}" for h in elsewhere]
        check.fix = (f"the daemon binds {', '.join(str(h.socket.local) for h in elsewhere)} instead of {ep}: "
                     "correct its listen setting, or the address given to verify")
    elif not ours:
        check.kind = NOT_LISTENING
        check.evidence = [f"nothing listens on {ep} after {waited:.1f} s"]
        check.fix = (f"the daemon did not reach listen() on {ep}: see why in `systemctl status {unit}` and "
                     f"`journalctl -u {unit}`; if it is only slow, raise --timeout or make the unit Type=notify "
                     "so that ExecStartPost= runs once it is ready")
    elif foreign:
        check.kind = SHARED
        check.evidence = [f"{unit} holds {_who(h)}" for h in ours] + [
            f"shared with a process outside {unit}: {_who(h)}" for h in foreign]
        p = next((h.processes[0] for h in foreign if h.processes), None)
        who = f"PID {p.pid} ({' '.join(p.cmdline) or p.name})" if p else "another process"
        check.fix = (f"{who} is bound to {ep} as well (SO_REUSEPORT, or SO_REUSEADDR for UDP), and the kernel "
                     f"splits the traffic between it and {unit}: stop it, or give one of them another address")
    elif v6only_stated and ep.is_wildcard and ep.host.version == 6 and any(
            h.socket.v6only is not None and h.socket.v6only != bind.v6only for h in ours):
        # (binding a specific IPv6 address sets IPV6_V6ONLY in the kernel: only [::] can differ)
        check.kind = WRONG_ADDRESS
        want = "IPV6_V6ONLY" if bind.v6only else "dual-stack"
        check.evidence = [f"{_who(h)}, v6only={h.socket.v6only}" for h in ours]
        check.fix = (f"{ep} was meant to be {want}: set the daemon's ipv6only/BindIPv6Only accordingly, or "
                     "correct --v6only/--no-v6only")
    else:
        check.evidence = [f"{unit} holds {_who(h)}" for h in ours]
        if len(ours) > 1:
            check.evidence.append(f"a SO_REUSEPORT group of {len(ours)} sockets, all in {unit}")
    return check


def _report(unit: str, checks: list[Check], code: int, waited: float, notes: list[str]) -> None:
    if code == 0:
        served = [c for c in checks if c.kind is None]
        what = ", ".join(str(c.bind) for c in served) or "none of its addresses, all optional,"
        output.emit(output.INFO, f"bindguard: verify: {unit} serves {what} as intended")
        for c in checks:
            if c.kind is None:
                output.emit(output.INFO, [f"  {c.bind}: {e}" for e in c.evidence])
            else:
                _note_optional(c)
    else:
        wrong = ", ".join(str(c.bind) for c in checks if not c.ok)
        output.emit(output.ERR, f"bindguard: verify: {unit} does not serve {wrong} as intended (exit {code})")
        for c in checks:
            if c.kind is None:
                output.emit(output.INFO, f"  {c.bind}: ok")
                continue
            if c.ok:
                _note_optional(c)
                continue
            lines = [f"  {c.bind}: {c.kind}"] + [f"    evidence: {e}" for e in c.evidence] + [f"    fix: {c.fix}"]
            output.emit(output.ERR, lines)
    for note in notes:
        output.emit(output.NOTICE, f"  note: {note}")


def _note_optional(c: Check) -> None:
    output.emit(output.NOTICE, [f"  note: {c.bind}: {c.kind}, an optional address: the daemon starts without it",
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


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.timeout < float("inf"):  # inf would poll for ever, nan compares false
        raise UsageError(f"--timeout {args.timeout}: must be 0 or more seconds, and finite", "e.g. --timeout 5")
    unit, binds, optional, v6only_stated, ctx = _resolve(args)
    notes: list[str] = []
    observed, waited = wait_for_listeners(binds, args.timeout, notes, optional)
    holders = _holders(observed, unit, notes, ctx)
    checks = [assess(b, observed[(b.endpoint.proto, b.endpoint.port)], holders, unit, v6only_stated, waited)
              for b in binds]
    for c in checks:
        c.optional = c.bind in optional
    kinds = {c.kind for c in checks if not c.ok}
    code = EXIT_INUSE if kinds & {SHARED, FOREIGN_OWNER} else EXIT_NOT_LISTENING if kinds else 0
    if args.json:
        json.dump(_json(unit, checks, code, waited, notes), sys.stdout, indent=2)
        sys.stdout.write("\n")
        sys.stdout.flush()
    _report(unit, checks, code, waited, notes)
    return code
