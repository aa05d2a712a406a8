"""The policy: probe, explain what blocks, then pass, wait for what clears by itself, or refuse.

Observation is paid for only when the probe fails (or when asked to explain): the clear path
is one trial bind per address.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable

from bindguard import stop_if_asked
from bindguard.evidence.probe import probe
from bindguard.model import errors
from bindguard.model.endpoints import TCP, Bind
from bindguard.model.facts import BindPrivilege, Evidence, ProbeResult
from bindguard.model.kinds import Action, ConflictKind
from bindguard.model.notes import WARNING, Note, notices
from bindguard.model.record import Record, replace
from bindguard.systemd.context import SystemdContext
from bindguard.verdict.conflicts import (
    Conflict,
    conflicts_for,
    could_block,
    kernel_answer_alone,
    latent_socket_units,
    permission_denied,
)
from bindguard.verdict.policy import Decision, Rules, decide, fleeting

DEFAULT_WAIT = 65.0  # a full TIME_WAIT (60 s, fixed in the kernel) and the timer's slack
POLL_INTERVAL = 0.1
# Another guard's trial socket holds an address for microseconds, longer when that guard is
# preempted on a busy machine, and many guards started together take turns on one address: while
# only such sockets refuse, probe again, pausing 10 ms at first and twice as long each time up to
# 160 ms (jittered, so guards fall out of step), for up to SETTLE_BUDGET when the socket was gone
# or had no holder visible, and up to GUARD_SETTLE_BUDGET while the holder is another guard
# (within the unit's TimeoutStartSec=).
SETTLE_BUDGET = 1.0
GUARD_SETTLE_BUDGET = 5.0
SETTLE_INTERVAL = 0.01
SETTLE_INTERVAL_MAX = 0.16
OBSERVE_INTERVAL = 1.0


class Request(Record, frozen=True):
    binds: list[Bind]
    wait: float = DEFAULT_WAIT
    daemon_uid: int | None = None  # the uid the daemon's sockets will have; None: the guard's own
    rules: Rules = Rules()  # the unit's policy and the addresses the daemon starts without
    observe_always: bool = False  # explain: look at the ports even when the probe passes
    advise: bool = False  # check: the guarded unit's own settings' advice about what blocks, as warnings
    # Look for NAT rules that take the traffic elsewhere (nat-shadowed; `explain` always does, `check`
    # when the unit's YAML sets `nat:`, whose action is in rules.policy). Reading the ruleset runs nft.
    nat: bool = False
    systemd: SystemdContext | None = None  # None: leave systemd out (--no-systemd)
    reap_stale: bool = False  # end holders proven to be stale instances of the guarded unit
    # The guarded unit, when the guard may run inside it: its credentials and settings can prove
    # that the daemon will be denied a privileged port (bindguard.evidence.privilege).
    privilege_unit: str | None = None
    user_manager: bool = False
    # Where --reap-stale writes each step as it happens: (syslog priority, line), the console's emit.
    log: Callable[[int, str], None] = lambda priority, line: None


class Outcome(Record, frozen=True):
    """The guard's answer, built once when it is decided."""

    exit_code: int
    conflicts: tuple[Conflict, ...]  # what blocks (blocking) and what is only worth a warning
    results: tuple[ProbeResult, ...]
    evidence: Evidence
    waited: float = 0.0
    waited_for: tuple[str, ...] = ()
    reaped: tuple[str, ...] = ()
    notes: tuple[Note, ...] = ()  # what the report says beside the verdict, each at its priority

    @property
    def clear(self) -> bool:
        return self.exit_code == errors.ExitCode.CLEAR


def _tentative_addresses() -> frozenset:
    """IPv6 addresses in duplicate address detection (IFA_F_TENTATIVE in /proc/net/if_inet6)."""
    import ipaddress

    found = set()
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 5 and int(fields[4], 16) & 0x40:
                    found.add(ipaddress.IPv6Address(int(fields[0], 16)))
    except OSError:
        pass
    return frozenset(found)


def _sockets_explaining(proto: str, port: int, failed: list[Bind], notes: list[str]) -> list:
    """The sockets on the port: listeners alone when they explain every refused bind there.

    Asking sock_diag for LISTEN only spares the kernel a walk of every connection in the
    namespace (0.2 ms against 23 ms at 100k sockets: bindguard.evidence.sockets); the other
    states are asked for only when a listener does not explain the refusal, and always for
    explain."""
    from bindguard.evidence import sockets

    if proto != TCP or not failed:
        return sockets.sockets_on_port(proto, port, notes)
    listeners = sockets.sockets_on_port(proto, port, notes, states=["LISTEN"])
    # With SO_REUSEPORT a listener may be a group the daemon would join, and not the obstacle.
    if not any(bind.options.reuseport for bind in failed) and \
            all(any(could_block(bind, s) for s in listeners) for bind in failed):
        return listeners
    # The fast path's early walk answers only where no listener has come since it began: it
    # found none there either (bindguard.evidence.sockdiag).
    return sockets.sockets_on_port(proto, port, notes, early_walk=not listeners)


def observe(binds: list[Bind], results: list[ProbeResult] | None) -> Evidence:
    """Gather the evidence about the ports that failed (all of them when results is None)."""
    from bindguard.evidence import owners, sockets

    evidence = Evidence(observed_at=time.monotonic())
    if results is None:
        wanted = {(b.endpoint.proto, b.endpoint.port) for b in binds}
    else:
        wanted = {(r.bind.endpoint.proto, r.bind.endpoint.port) for r in results
                  if r.error in (errno.EADDRINUSE, errno.EACCES) and r.collides_with is None}
    for proto, port in sorted(wanted):
        failed = [r.bind for r in results or () if r.bind.endpoint.port == port and r.bind.endpoint.proto == proto
                  and r.error == errno.EADDRINUSE and r.collides_with is None]
        try:
            evidence.sockets.extend(_sockets_explaining(proto, port, failed, evidence.notes))
        except sockets.ObservationError as exc:
            evidence.notes.append(f"could not list the sockets on port {port}: {exc}")
    if results is not None and any(r.error == errno.EADDRNOTAVAIL for r in results):
        evidence.tentative = _tentative_addresses()
    held = owners.holders_of(evidence.sockets)
    evidence.holders.update((inode, processes[0]) for inode, processes in held.processes.items())
    if held.incomplete:
        evidence.notes.append(
            "some processes could not be inspected (permission denied): run as root, or with "
            "the + prefix in ExecStartPre=, to name every holder")
    return evidence


Probe = Callable[[list[Bind], "int | None"], list[ProbeResult]]
Observe = Callable[[list[Bind], "list[ProbeResult] | None"], Evidence]


def _observe_again_or_not(request: Request, results: list[ProbeResult], cache: dict, look: Observe) -> Evidence:
    """The evidence for these results; while waiting, the last one if the kernel's answer has not
    changed and it is under OBSERVE_INTERVAL old: on a host of 100k sockets every look costs a
    walk of every connection (23 ms), and a wait probes ten times a second."""
    answer = [(r.error, r.collides_with) for r in results]
    last = cache.get("observed")
    if last is not None and last[0] == answer and time.monotonic() - last[1].observed_at < OBSERVE_INTERVAL:
        return last[1]
    evidence = look(request.binds, None if request.observe_always else results)
    cache["observed"] = (answer, evidence)
    return evidence


def _investigate(request: Request, cache: dict, answered: list, trial: Probe,
                 look: Observe) -> tuple[list[ProbeResult], Evidence, list[Conflict]]:
    """One probe, and the evidence and conflicts that explain its answer, each built once."""
    results = trial(request.binds, request.daemon_uid)
    answered.append(results)
    failed = [r for r in results if not r.ok]
    observed = _observe_again_or_not(request, results, cache, look) if failed or request.observe_always \
        else Evidence()
    notes = list(observed.notes)
    ctx = request.systemd
    systemd = observed.systemd
    if ctx is not None and (request.observe_always or observed.holders
                            or ctx.in_unit and (failed or ctx.socket_units_may_claim(request.binds))):
        holder_pids = frozenset(p.pid for p in observed.holders.values())
        if cache.get("pids") != holder_pids:
            cache.update(pids=holder_pids, facts=ctx.facts(request.binds, list(observed.holders.values())))
        systemd = cache["facts"]
        notes += [n for n in ctx.notes if n not in notes]
    privilege = _privilege(request, results, cache)
    notes += [n for n in _denied_port_notes(request, results, privilege) if n not in notes]
    nat = _nat_rules(request, cache) if request.nat or request.observe_always else None
    if nat is not None:
        notes += [n for n in nat[1] if n not in notes]
    evidence = replace(observed, systemd=systemd, privilege=privilege, notes=notes)
    uid = request.daemon_uid if request.daemon_uid is not None else os.geteuid()
    conflicts: list[Conflict] = []
    for r in results:
        conflicts.extend(permission_denied(r.bind, r.error, evidence))
        conflicts.extend(conflicts_for(r.bind, r.error, r.collides_with, evidence, uid))
    conflicts.extend(latent_socket_units(request.binds, evidence))
    if nat is not None:
        from bindguard.verdict.nat import nat_conflicts

        conflicts.extend(nat_conflicts(request.binds, nat[0]))
    return results, evidence, conflicts


def _nat_rules(request: Request, cache: dict) -> tuple[list, list[str]]:
    """The host's DNAT/REDIRECT rules and what could not be read of them, read once a run."""
    if "nat" not in cache:
        from bindguard.evidence.nat import NAT_SECONDS, nat_rules

        cache["nat"] = nat_rules(_nat_seconds(request, NAT_SECONDS))
    return cache["nat"]


def _nat_seconds(request: Request, most: float) -> float:
    """How long reading the NAT rules may take: `most`, and where the manager runs the guard, no longer
    than the unit's start budget leaves (a start killed on TimeoutStartSec= is a refusal, which `nat:
    warn` must never cause). The bus is asked only there: elsewhere nothing kills the guard."""
    import bindguard

    if request.systemd is None or not bindguard.environment().get("INVOCATION_ID"):
        return most
    budget = request.systemd.start_budget()
    return most if budget is None else min(most, budget)


def _privilege(request: Request, results: list[ProbeResult], cache: dict):
    """What the guard can prove about the daemon's right to privileged ports; asked once a run."""
    if request.privilege_unit is None:
        return None
    denied_to_guard = any(r.error == errno.EACCES for r in results)
    key = ("privilege", denied_to_guard)
    if key not in cache:
        from bindguard.evidence import privilege

        ports = {r.bind.endpoint.port for r in results}
        cache[key] = privilege.assess(request.privilege_unit, request.user_manager, ports, denied_to_guard)
    return cache[key]


def _denied_port_notes(request: Request, results: list[ProbeResult], privilege: BindPrivilege | None) -> list[str]:
    """Where the kernel denied the guard a port, what the verdict rests on instead."""
    notes = []
    for port in sorted({r.bind.endpoint.port for r in results if r.error == errno.EACCES}):
        if privilege is not None and privilege.denied:
            continue  # a permission-denied conflict says it
        if privilege is not None:
            note = (f"no trial bind for port {port}: the guard runs with {request.privilege_unit}'s credentials "
                    "and the kernel denied it the port (EACCES); the daemon will be denied too unless its "
                    f"program gains CAP_NET_BIND_SERVICE when it runs, which cannot be ruled out "
                    f"({privilege.unproven}), so the verdict is a prediction from the sockets on the port")
        else:
            note = (f"no trial bind for port {port}: it is below net.ipv4.ip_unprivileged_port_start and the "
                    "guard lacks CAP_NET_BIND_SERVICE, so the verdict is a prediction from the sockets on the "
                    "port (run the guard as root, `ExecStartPre=+...`, for the kernel's own answer)")
        notes.append(note)
    return notes


def _exit_code(blocking: list[Conflict]) -> int:
    kinds = {c.kind for c in blocking}
    if kinds - {ConflictKind.TIME_WAIT, ConflictKind.ADDRESS_UNAVAILABLE, ConflictKind.PERMISSION_DENIED}:
        return errors.ExitCode.INUSE
    if ConflictKind.PERMISSION_DENIED in kinds:
        return errors.ExitCode.NOPERM
    if ConflictKind.ADDRESS_UNAVAILABLE in kinds:
        return errors.ExitCode.NOTAVAIL
    return errors.ExitCode.TEMPFAIL


def _seconds_until_clear(conflicts: list[Conflict]) -> float | None:
    """When the last TIME_WAIT in the way ends, by the kernel's own timer; None if unknown."""
    times = [c.socket.expires_ms for c in conflicts if c.socket is not None]
    known = [t for t in times if t is not None]
    if not times or len(known) < len(times):
        return None
    return max(known) / 1000.0


def _reap(refusing: list[Conflict], request: Request, evidence: Evidence, reaped: list[str],
          reaped_pids: set[int]) -> bool:
    """End the proven stale instances among the holders; True if any was ended (probe again)."""
    from bindguard.action import reap

    info = request.systemd.unit_info() if request.systemd is not None else None
    control_group = info.control_group if info is not None else ""
    ended = False
    for c in refusing:
        reason = reap.why_reapable(c, evidence.systemd, control_group)
        if reason and c.process is not None and c.process.pid not in reaped_pids:
            reaped_pids.add(c.process.pid)
            reaped.append(reap.terminate(c, reason, request.log))
            ended = True
    return ended


def _wait_budget(request: Request) -> tuple[float, str | None]:
    """--wait, capped so that the manager's TimeoutStartSec= never kills the start mid-wait."""
    budget = max(request.wait, 0.0)
    unit_budget = request.systemd.start_budget() if request.systemd is not None and budget > 0 else None
    if unit_budget is not None and unit_budget < budget:
        return unit_budget, f"the wait is capped at {unit_budget:.1f} s, within the unit's TimeoutStartSec="
    return budget, None


def _settling(request: Request, guard_met: bool, since: float, now: float, cache: dict) -> bool:
    """Whether to probe again rather than report fleeting conflicts (see SETTLE_BUDGET); guard_met:
    another guard was seen holding the address since they began (a later look may find its socket
    and no process: the process list is read after the sockets)."""
    if now < since + SETTLE_BUDGET:
        return True
    if not guard_met or now >= since + GUARD_SETTLE_BUDGET:
        return False
    if "start_deadline" not in cache:  # the bus is asked only when a guard holds on past a second
        budget = request.systemd.start_budget() if request.systemd is not None else None
        cache["start_deadline"] = None if budget is None else now + budget
    return cache["start_deadline"] is None or now < cache["start_deadline"]


def _settle_pause(pauses: int) -> float:
    return min(SETTLE_INTERVAL * 2 ** pauses, SETTLE_INTERVAL_MAX) * (1 + os.urandom(1)[0] / 255)


def _note_other_guards(fleeting: list[Conflict], notes: list[str]) -> None:
    for c in fleeting:
        if c.process is None or c.socket is None or c.kind != ConflictKind.GUARD_TRIAL:
            continue
        where = f"{c.process.unit}'s guard" if c.process.unit else "another guard"
        note = (f"{where} (PID {c.process.pid}) was checking {c.socket.local} at the same moment, so the "
                f"address was probed again; if both daemons bind it, only the first to start can")
        if note not in notes:
            notes.append(note)


def _notes(request: Request, evidence: Evidence, met: list[str], shown: tuple[Conflict, ...],
           code: int) -> tuple[Note, ...]:
    """The report's notes: what could not be observed, and what the loop met (other guards, the
    wait's cap); for check, then, what the guarded unit's own settings add about what blocks
    (warnings), and what asking for that could not learn."""
    said = [*evidence.notes, *met]
    ctx = request.systemd
    if ctx is None or not request.advise:
        return notices(said)
    advice = ctx.advice([c for c in shown if c.blocking], refused=code != errors.ExitCode.CLEAR)
    unlearned = [n for n in ctx.notes if n not in said]  # an unknown unit, a bus gone quiet
    return (*notices(said), *(Note(WARNING, line) for line in advice), *notices(unlearned))


def _acting(decisions: tuple[Decision, ...], action: str) -> list[Conflict]:
    return [d.conflict for d in decisions if d.action == action]


def run(request: Request, answered: list | None = None, *, trial: Probe | None = None,
        look: Observe | None = None) -> Outcome:
    """Decide, waiting within request.wait seconds for what the policy says to wait for.

    Each answer of the kernel (the probe's results) is appended to `answered` as it comes, before
    anything explains it: a caller keeps the kernel's verdict when what follows fails (unexplained).
    trial and look stand in for the trial bind (probe) and the look at the ports (observe): tests
    give recorded ones."""
    answered = [] if answered is None else answered
    trial, look = trial or probe, look or observe
    start = time.monotonic()
    deadline = None
    waiting_since = None  # when the first sleep began: Outcome.waited is time slept, not time spent
    cache: dict = {}
    waited_for: list[str] = []
    met: list[str] = []  # notes of the loop's own: other guards met, the wait's cap
    reaped: list[str] = []
    reaped_pids: set[int] = set()
    settling_since = None  # while only fleeting sockets refuse: since when
    guard_met = False  # another guard seen holding the address since then
    pauses = 0

    def outcome(code: int) -> Outcome:
        waited = now - waiting_since if waiting_since is not None else 0.0
        shown = tuple(d.conflict for d in decisions if d.action != Action.IGNORE)
        return Outcome(code, shown, tuple(results), evidence, waited, tuple(waited_for), tuple(reaped),
                       notes=_notes(request, evidence, met, shown, code))

    while True:
        stop_if_asked()  # each pass follows a sleep or a reaping
        results, evidence, conflicts = _investigate(request, cache, answered, trial, look)
        decisions = decide(conflicts, request.rules)
        refusing, waiting = _acting(decisions, Action.REFUSE), _acting(decisions, Action.WAIT)
        now = time.monotonic()
        if not refusing and not waiting:
            return outcome(errors.ExitCode.CLEAR)
        # Probed again while every refusal may pass by itself in a moment (another guard's trial, a
        # holder the kernel is ending, which the policy would otherwise wait for: not at all with --wait 0).
        passing_refusals = [c for c in refusing if fleeting(c)]
        passing = passing_refusals + [c for c in waiting if fleeting(c)]
        # A holder that stays (a refusal that is not fleeting; or, nothing refusing, a wait that is
        # not, such as a TIME_WAIT): no reason to probe again.
        if not passing or len(passing_refusals) < len(refusing) or not refusing and len(passing) < len(waiting):
            settling_since, guard_met, pauses = None, False, 0
        else:
            settling_since = now if settling_since is None else settling_since
            guard_met = guard_met or any(c.kind == ConflictKind.GUARD_TRIAL for c in passing)
            if _settling(request, guard_met, settling_since, now, cache):
                _note_other_guards(passing, met)
                cache.pop("observed", None)
                time.sleep(_settle_pause(pauses))
                pauses += 1
                continue
            decisions = decide(conflicts, request.rules, held_for=now - settling_since)
        if refusing and request.reap_stale and _reap(refusing, request, evidence, reaped, reaped_pids):
            cache.pop("observed", None)  # the holders have changed: look again
            continue
        if refusing:
            return outcome(_exit_code(refusing + waiting))
        if deadline is None:
            budget, note = _wait_budget(request)
            deadline = start + budget
            if note:
                met.append(note)
        clears_in = _seconds_until_clear(waiting)
        if clears_in is not None:
            clears_in -= now - evidence.observed_at  # the timer has run on since the evidence was read
        hopeless = clears_in is not None and now + clears_in > deadline + 1.0
        if now >= deadline or hopeless:
            return outcome(_exit_code(waiting))
        for c in waiting:
            label = f"{c.kind} on {c.bind}"
            if label not in waited_for:
                waited_for.append(label)
        if waiting_since is None:
            waiting_since = now
        time.sleep(min(POLL_INTERVAL, max(deadline - now, 0.0)))


def unexplained(request: Request, results: list[ProbeResult], fault: str) -> Outcome:
    """The kernel's answer alone, where explaining it failed: a refusal stays a refusal.

    Each failed bind is a conflict of the kind its errno gives with no evidence
    (verdict.conflicts.kernel_answer_alone), under the request's policy and optional addresses.
    Nothing is waited for, and the guard's own EACCES (no trial bind of a privileged port) passes
    as before a prediction: what the daemon may do there was never the kernel's answer."""
    evidence = Evidence(notes=[f"the guard could not explain the kernel's answer: {fault}"])
    uid = request.daemon_uid if request.daemon_uid is not None else os.geteuid()
    conflicts = [c for r in results for c in kernel_answer_alone(r.bind, r.error, r.collides_with, uid)]
    decisions = decide(conflicts, request.rules)
    refusing = [d.conflict for d in decisions if d.action in (Action.REFUSE, Action.WAIT)]
    shown = tuple(d.conflict for d in decisions if d.action != Action.IGNORE)
    code = _exit_code(refusing) if refusing else errors.ExitCode.CLEAR
    return Outcome(code, shown, tuple(results), evidence, notes=notices(evidence.notes))
