"""Rendering an outcome: the human report (stderr, journald priorities) and the JSON object."""

from __future__ import annotations

import time

from bindguard.action.guard import Outcome
from bindguard.model import errors
from bindguard.model.endpoints import TCP
from bindguard.model.kinds import ConflictKind
from bindguard.report import output
from bindguard.verdict.conflicts import Conflict, attribution, unit_phrase
from bindguard.verdict.remedies import remedy

TYPE_CHECKING = False  # typing's own costs an import on the guard's path
if TYPE_CHECKING:  # only types here: the guard loads no NAT code unless asked
    from bindguard.model.facts import ContainerFact
    from bindguard.model.nat import NatRule


def _ago(started: float) -> str:
    seconds = max(0, int(time.time() - started))
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    if seconds < 172800:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min ago"
    return f"{seconds // 86400} days ago"


def conflict_json(c: Conflict) -> dict:
    s, p = c.socket, c.process
    return {
        "address": str(c.bind),
        "kind": c.kind,
        "blocking": c.blocking,
        "clears_by_itself": c.clears,
        "predicted": c.predicted,
        "error": c.error or None,
        "local_address": str(s.local) if s else None,
        "remote_address": str(s.remote) if s and s.remote else None,
        "state": s.state if s else None,
        "expires_s": s.expires_ms / 1000 if s and s.expires_ms is not None else None,
        "v6only": s.v6only if s else None,
        "inode": s.inode if s and s.inode else None,
        "uid": s.uid if s else (p.uid if p else None),
        "pid": p.pid if p else None,
        "ppid": p.ppid if p else None,
        "name": p.name if p else None,
        "command": " ".join(p.cmdline) if p else None,
        "exe": p.exe if p else None,
        "user": p.user if p else None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(p.started)) if p else None,
        "started_ago_s": round(time.time() - p.started, 1) if p else None,
        "cgroup": p.cgroup if p else None,
        "unit": c.unit,
        "unit_status": c.unit_status,
        "socket_unit": c.socket_unit,
        "own_socket_unit": c.own_socket_unit if c.socket_unit else None,
        "leaving": c.leaving or None,  # unit-deactivating, process-exiting: clears by itself
        "other_address": str(c.other_bind) if c.other_bind else None,
        "nat": nat_json(c.nat) if c.nat else None,
        "container": container_json(p.container) if p and p.container else None,
        "evidence": c.evidence,
        "remedy": remedy(c),
    }


def outcome_json(outcome: Outcome) -> dict:
    return {
        "clear": outcome.clear,
        "verdict": errors.VERDICTS.get(outcome.exit_code, "error"),
        "exit_code": outcome.exit_code,
        "waited_s": round(outcome.waited, 3),
        "waited_for": outcome.waited_for,
        "addresses": [
            {
                "address": str(r.bind),
                "proto": r.bind.endpoint.proto,
                "bindable": r.ok,
                "error": r.error_name or None,
                "failed_at": r.step or None,
                "reuseaddr": r.bind.options.reuseaddr,
                "reuseport": r.bind.options.reuseport,
                "v6only": r.bind.v6only if r.bind.endpoint.host.version == 6 else None,
                "freebind": r.bind.options.freebind,
                "device": r.bind.device or None,
            }
            for r in outcome.results
        ],
        "conflicts": [conflict_json(c) for c in outcome.conflicts],
        "unit": outcome.evidence.systemd.guarded_unit if outcome.evidence.systemd else None,
        "reaped": outcome.reaped,
        "notes": [note.text for note in outcome.notes],
    }


def write_json(outcome: Outcome, mode: str | None = None) -> None:
    from bindguard.report.jsonout import write_json  # json only for --json

    write_json(outcome_json(outcome), mode)


def container_json(container: ContainerFact) -> dict:
    return {"engine": container.engine, "id": container.id, "name": container.name or None,
            "image": container.image or None, "pod": container.pod or None,
            "namespace": container.namespace or None, "via": container.via, "source": container.source or None,
            "user": container.user or None}


def nat_json(rule: NatRule) -> dict:
    return {"family": rule.family, "table": rule.table, "chain": rule.chain, "path": list(rule.path),
            "hook": rule.hook, "handle": rule.handle, "action": rule.action, "to": rule.to or None,
            "rule": rule.describe(), "owner": rule.owner or None, "comment": rule.comment or None,
            "source": rule.source}


def describe_holder(c: Conflict) -> str:
    """One line: the socket in the way and who holds it."""
    parts = []
    s, p = c.socket, c.process
    if s is not None:
        where = f"{s.local}" + (f" -> {s.remote}" if s.remote else "")
        parts.append(f"{where} {s.state}")
        if s.v6only is False and s.local.host.version == 6 and s.local.is_wildcard:
            parts[-1] += " (dual-stack)"
        if s.expires_ms is not None and c.kind == ConflictKind.TIME_WAIT:
            parts.append(f"clears in {s.expires_ms / 1000:.1f} s")
    if p is not None:
        command = p.command
        parts.append(f"PID {p.pid} ({command})")
        parts.append(f"user {p.user}")
        parts.append(f"PPID {p.ppid}")
        parts.append(f"started {_ago(p.started)}")
    elif s is not None and s.inode:
        parts.append(f"uid {s.uid}, holder not found")
    if c.socket_unit:
        parts.append(f"socket unit {c.socket_unit}")
    elif c.kind == ConflictKind.SOCKET_UNIT:
        parts.append("socket unit unknown")
    elif c.unit_status:
        parts.append(unit_phrase(c.unit, c.unit_status))
    if c.other_bind is not None:
        parts.append(f"the request's own {c.other_bind}")
    if p is not None and p.container is not None:
        parts.append(p.container.label)
    if c.nat is not None:
        parts.append(f"{c.nat.action} to {c.nat.to or 'a target nft cannot show'} by {c.nat.where()}"
                     + (f", made by {c.nat.owner}" if c.nat.owner else ""))
    if not parts and c.kind == ConflictKind.PERMISSION_DENIED and c.privilege is not None:
        who = f"User={c.privilege.user}" if c.privilege.user else "its user"
        return (f"the daemon ({who}) lacks CAP_NET_BIND_SERVICE, which ports below "
                f"{c.privilege.unprivileged_port_start} need")
    if not parts and c.kind == ConflictKind.ADDRESS_UNAVAILABLE:
        return "IPv6 is not available here" if c.error == "EAFNOSUPPORT" else f"no interface has {c.bind.endpoint.host}"
    return ", ".join(parts) if parts else "no holder visible"


def _headline(outcome: Outcome, explain: bool) -> tuple[int, str]:
    blocking = [c for c in outcome.conflicts if c.blocking]
    if not blocking and outcome.exit_code == errors.ExitCode.INUSE:  # refused by `nat: refuse` alone
        blocking = [c for c in outcome.conflicts if c.kind == ConflictKind.NAT_SHADOWED]
    refusing = "a start now would be refused" if explain else "refusing to start"
    addrs = ", ".join(dict.fromkeys(str(c.bind) for c in blocking))
    code = outcome.exit_code
    if code == errors.ExitCode.CLEAR:
        all_addrs = ", ".join(str(r.bind) for r in outcome.results)
        waited_for = "; ".join(outcome.waited_for)
        waited = f" after waiting {outcome.waited:.1f} s for {waited_for}" if outcome.waited_for else ""
        return output.INFO, f"bindguard: clear: {all_addrs} can be bound{waited}"
    if code == errors.ExitCode.TEMPFAIL:
        left = [c.socket.expires_ms for c in blocking if c.socket is not None and c.socket.expires_ms is not None]
        clears = f"it clears by itself in {max(left) / 1000:.1f} s" if left else "it clears by itself"
        if explain:  # explain never waits: say what a guard would meet, not what happened to one
            return output.ERR, (f"bindguard: {addrs} blocked by TIME_WAIT now; {clears} (`check` waits for it "
                                f"within --wait; exit {code})")
        waited = f"after waiting {outcome.waited:.1f} s" if outcome.waited else "without waiting"
        return output.ERR, (f"bindguard: {refusing}: {addrs} still blocked by TIME_WAIT {waited}; {clears}, "
                            f"past the wait budget (exit {code})")
    if code == errors.ExitCode.NOTAVAIL:
        return output.ERR, f"bindguard: {refusing}: {addrs} not available on any interface (exit {code})"
    if code == errors.ExitCode.NOPERM:
        return output.ERR, f"bindguard: {refusing}: {addrs} denied to the daemon (exit {code})"
    waited = f" after waiting {outcome.waited:.1f} s" if outcome.waited else ""
    if blocking and all(c.kind == ConflictKind.NAT_SHADOWED for c in blocking):
        return output.ERR, f"bindguard: {refusing}: {addrs} redirected elsewhere by a NAT rule (exit {code})"
    return output.ERR, f"bindguard: {refusing}: {addrs} in use{waited} (exit {code})"


def write_human(console: output.Console, outcome: Outcome, explain: bool = False) -> None:
    priority, headline = _headline(outcome, explain)
    entries: list[tuple[int, list[str]]] = [(priority, [headline])]
    entries += [(output.WARNING, [f"  reaped: {line}"]) for line in outcome.reaped]
    for c in outcome.conflicts:
        tag = "prediction: " if c.predicted else ""
        level = output.ERR if c.blocking and not outcome.clear else output.WARNING
        lines = [f"  {c.bind}: {tag}{c.kind}: {describe_holder(c)}"]
        if explain or c.evidence:
            lines += [f"    evidence: {e}" for e in c.evidence]
        lines.append(f"    fix: {remedy(c)}")
        entries.append((level, lines))
    for note in outcome.notes:
        entries.append((note.priority, [f"  {'warning' if note.priority <= output.WARNING else 'note'}: {note.text}"]))
    if explain:  # a person's question, not a start: no outcome of the guard's to record
        for level, lines in entries:
            console.emit(level, lines)
        return
    console.report(entries, journal_outcome(outcome), journal_fields(outcome))


def journal_outcome(outcome: Outcome) -> str:
    """The guard's outcome as report.journal names its MESSAGE_ID: cleared, waited or refused."""
    if not outcome.clear:
        return "refused"
    return "waited" if outcome.waited_for else "cleared"


def journal_fields(outcome: Outcome) -> list[tuple[str, str]]:
    """The fields to filter the journal on: each address the outcome is about (the blocking ones
    of a refusal, every one of a clear start) with its port, and for each conflict its kind and
    holder; OBJECT_PID names the first holder process, whose unit journald then adds."""
    blocking = [c for c in outcome.conflicts if c.blocking] if not outcome.clear else []
    binds = [c.bind for c in blocking] or [r.bind for r in outcome.results]
    fields = []
    for bind in dict.fromkeys(binds):
        fields += [("BINDGUARD_ADDRESS", str(bind)), ("BINDGUARD_PORT", str(bind.endpoint.port))]
    for c in blocking or outcome.conflicts:
        fields.append(("BINDGUARD_KIND", str(c.kind)))
        if c.process is not None:
            fields.append(("BINDGUARD_HOLDER_PID", str(c.process.pid)))
        if c.unit or c.socket_unit:
            fields.append(("BINDGUARD_HOLDER_UNIT", str(c.unit or c.socket_unit)))
    holder = next((c.process.pid for c in blocking or outcome.conflicts if c.process is not None), None)
    if holder is not None:
        fields.append(("OBJECT_PID", str(holder)))
    return list(dict.fromkeys(fields))


def write_observed(console: output.Console, outcome: Outcome) -> None:
    """explain: each address's answer, then everything on the ports, not only what blocks."""
    for r in outcome.results:
        answer = "can be bound" if r.ok else f"{r.error_name} at {r.step}()"
        console.emit(output.INFO, f"  {r.bind}: {answer}")
    if not outcome.evidence.sockets:
        ports = ", ".join(sorted({f"{r.bind.endpoint.port}/{r.bind.endpoint.proto}" for r in outcome.results}))
        console.emit(output.INFO, f"  nothing else is on port {ports}")
        return
    console.emit(output.INFO, "  on these ports now:")
    for s in outcome.evidence.sockets:
        p = outcome.evidence.holders.get(s.inode)
        held = attribution(s, outcome.evidence)
        where = f"socket unit {held.socket_unit}" if held.socket_unit else unit_phrase(held.unit, held.unit_status)
        who = f"PID {p.pid} ({p.command}), {where}" if p else (
            "no process (kernel timer)" if not s.inode else f"uid {s.uid}")
        proto = "" if s.local.proto == TCP else "udp "
        console.emit(output.INFO, f"    {proto}{s.local.address()} {s.state}: {who}")
