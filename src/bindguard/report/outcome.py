"""Rendering an outcome: the human report (stderr, journald priorities) and the JSON object."""

from __future__ import annotations

import time

from bindguard.action.guard import Outcome
from bindguard.model import errors
from bindguard.model.endpoints import TCP
from bindguard.model.kinds import (
    ADDRESS_UNAVAILABLE,
    BOUND_KIND,
    GUARD_TRIAL,
    LATENT_SOCKET_UNIT,
    LISTENER,
    ORPHAN,
    OWN_INSTANCE,
    PERMISSION_DENIED,
    SELF_CONFLICT,
    SOCKET_UNIT,
    TIME_WAIT,
    UNIT_BY_CGROUP,
    UNIT_BY_MANAGER,
    UNIT_DEACTIVATING,
)
from bindguard.report import output
from bindguard.verdict.conflicts import Conflict, attribution, unit_phrase


def _ago(started: float) -> str:
    seconds = max(0, int(time.time() - started))
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    if seconds < 172800:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min ago"
    return f"{seconds // 86400} days ago"


def _port_ref(c: Conflict) -> str:
    ep = c.bind.endpoint
    return f"{ep.port}/{ep.proto}"


def _self_conflict_remedy(c: Conflict) -> str:
    """Two sockets of the request overlap: most often a dual-stack [::] written for a daemon whose
    IPv6 socket is v6only (nginx's and sshd's are by default), so the request, not the daemon, is
    wrong; only a daemon that really binds both fails too."""
    pair = [b for b in (c.bind, c.other_bind) if b is not None]
    dual = next((b for b in pair if b.endpoint.host.version == 6 and b.endpoint.is_wildcard and not b.v6only), None)
    if dual is None:
        return (f"the daemon's own sockets overlap: {c.other_bind} already covers {c.bind}. Check the addresses "
                "given to the guard; if the daemon binds both, it fails too: bind only one of them")
    ipv4 = next((b for b in pair if b is not dual), None)
    return (f"{dual} was given to the guard as dual-stack, so it covers {ipv4} too. If the daemon makes its "
            "IPv6 sockets IPV6_V6ONLY (nginx and sshd do by default), tell the guard: --v6only on its command "
            "line (or `options: {v6only: true}` in the unit's bindguard file), or give no addresses and let "
            "`check --unit` discover them with their options. Only a daemon that really binds "
            f"{dual} dual-stack beside {ipv4} fails as well: then bind one of them (nginx: drop "
            "`ipv6only=off`; socket units: BindIPv6Only=ipv6-only)")


def _permission_remedy(c: Conflict) -> str:
    assert c.privilege is not None  # remedy() asks only about a denial with its proof
    start = c.privilege.unprivileged_port_start
    if c.privilege.bounding_set:
        grant = ("add CAP_NET_BIND_SERVICE to the unit's CapabilityBoundingSet= (and to AmbientCapabilities= "
                 "if the daemon runs as a user other than root)")
    else:
        grant = "give the daemon the capability: `AmbientCapabilities=CAP_NET_BIND_SERVICE` in [Service]"
    return (f"the daemon's bind() of port {c.bind.endpoint.port} will fail with EACCES (Permission denied): "
            f"{grant}; or let systemd bind the port, in a .socket unit, if the daemon takes its sockets from "
            f"systemd; or use a port at or above {start} (net.ipv4.ip_unprivileged_port_start)")


def remedy(c: Conflict) -> str:
    """What a careful administrator does about this kind of conflict, with the concrete names."""
    ep = c.bind.endpoint
    p = c.process
    pid = p.pid if p else None
    check_pid = f"`ps -o pid,ppid,lstart,cmd -p {pid}`" if pid else f"`ss -tanup 'sport = :{ep.port}'`"
    if c.kind == SELF_CONFLICT:
        return _self_conflict_remedy(c)
    if c.leaving:
        who, how = (c.unit, "is stopping") if c.leaving == UNIT_DEACTIVATING else (f"PID {pid}", "is exiting")
        return (f"{who} {how}, and holds the address until it has gone: the guard waits for that within this "
                "unit's start budget (--wait, capped by TimeoutStartSec=, or TimeoutSec= for a socket unit). If "
                "it takes longer, shorten the holder's stop (its ExecStop=, TimeoutStopSec=) or give this unit "
                "more time; for a handover between two units, order them (`Conflicts=` and `After=` on the new "
                "one) so that it starts only once the old one has stopped")
    if c.kind == PERMISSION_DENIED and c.privilege is not None:
        return _permission_remedy(c)
    if c.kind == ADDRESS_UNAVAILABLE:
        if c.error == "EAFNOSUPPORT":
            return ("the kernel has no IPv6 here (booted with ipv6.disable=1, or no IPv6 module): configure "
                    "the daemon to bind IPv4 addresses only, or enable IPv6")
        if c.clears:
            return ("the IPv6 address is still in duplicate address detection and becomes usable in a "
                    "second or two; wait for it (bindguard does), or add it with `nodad`")
        return (f"{ep.host} is on no interface (`ip -br addr`). If it comes up later in boot, order the "
                "unit After=network-online.target and Wants=network-online.target, or let the daemon bind "
                "it early (IP_FREEBIND: --freebind / FreeBind=yes, or net.ipv4.ip_nonlocal_bind=1)")
    if c.kind == TIME_WAIT:
        left = f" in {c.socket.expires_ms / 1000:.0f} s" if c.socket and c.socket.expires_ms is not None else ""
        return (f"a closed connection's {c.socket.state if c.socket else 'TIME_WAIT'} holds the address and "
                f"clears by itself{left} (TIME_WAIT lasts 60 s; no sysctl shortens it). It blocks because "
                "SO_REUSEADDR was off on the socket it came from or is off in the daemon: enable it in the "
                "daemon, or let bindguard wait it out (--wait SECONDS)")
    if c.kind == SOCKET_UNIT:
        name = c.socket_unit or "a .socket unit"
        if c.own_socket_unit:
            return (f"{name} is this service's own socket unit: systemd binds the address and passes it to "
                    "the daemon (sd_listen_fds, LISTEN_FDS). Configure the daemon to take the socket from "
                    "systemd, or remove the unit's Sockets=: never both")
        return (f"{name} listens there for socket activation: `systemctl stop {name}` and `systemctl disable "
                f"{name}` if it should not, or move one of them to another address")
    if c.kind == GUARD_TRIAL:
        unit = f" for {c.unit}" if c.unit else ""
        status = f"; if it is stuck, `systemctl status {c.unit}` shows its start" if c.unit else ""
        return (f"PID {pid}'s command line is bindguard's: another guard trying this address{unit}, whose trial "
                "socket held it each time this guard probed again. If both units' daemons bind this address, "
                "only one of them can run: give them different addresses, or let only one of them start "
                f"(Conflicts=){status}. If it is no guard ({check_pid}), it is what holds the address")
    if c.kind == LATENT_SOCKET_UNIT:
        return (f"{c.socket_unit} is not listening now but declares this address: it will collide when it "
                f"starts (at next boot if enabled). `systemctl disable --now {c.socket_unit}`, or change its "
                "ListenStream=/ListenDatagram=")
    if c.kind == OWN_INSTANCE:
        unit = c.unit or "the unit"
        if pid is None:
            return (f"a process still in {unit}'s own cgroup holds the port: find it with `systemctl status {unit}` "
                    "and confirm it is an old listener of the unit before ending it")
        return (f"PID {pid} is still in {unit}'s own cgroup from an earlier run, holding the port. Confirm "
                f"with {check_pid} and `systemctl status {unit}` that it is an old listener of {unit} (not a "
                f"process the unit keeps on purpose), then `kill -TERM {pid}`; --reap-stale does exactly "
                "that, for processes proven to be the unit's own")
    if c.kind == ORPHAN:
        return (f"PID {pid} was re-parented to the service manager and belongs to no running unit: a stray "
                f"copy. Confirm it is stale with {check_pid} and `ls -l /proc/{pid}/exe`, then "
                f"`kill -TERM {pid}` (and `kill -KILL {pid}` only if it ignores that)")
    if c.kind == LISTENER:
        who = c.unit if c.unit and c.unit_status == UNIT_BY_MANAGER else f"PID {pid}" if pid else "the listener"
        if c.unit and c.unit.endswith(".service") and c.unit_status in (UNIT_BY_MANAGER, UNIT_BY_CGROUP):
            stop = f"`systemctl stop {c.unit}`"
            if c.unit_status == UNIT_BY_CGROUP:
                stop += f" once `systemctl status {c.unit}` lists PID {pid}: only its cgroup path names that unit"
        else:
            stop = f"the way it was started, after finding out what it is with {check_pid}"
        return (f"{who} already serves this address. If it is the rightful owner, do not start a second "
                f"one; otherwise stop it cleanly ({stop}) or move this service to a free port or another "
                f"address. `fuser -k {_port_ref(c)}` is a last resort: it kills whatever has the port open")
    if c.kind == BOUND_KIND:
        if c.socket is not None and c.socket.state == "ESTABLISHED" and c.socket.remote is not None:
            return (f"a connection uses {ep.port} as its local port (to {c.socket.remote}): often an outgoing "
                    "connection that drew it as an ephemeral port. Reserve the port: "
                    f"`sysctl -w net.ipv4.ip_local_reserved_ports={ep.port}` and the same line in "
                    "/etc/sysctl.d/, then restart the service once that connection is gone")
        who = f"PID {pid}" if pid else "a process"
        if ep.proto != TCP:
            return (f"{who} already receives on this UDP port. If it is the rightful owner, do not start a "
                    f"second one; otherwise find out what it is with {check_pid} and stop it cleanly, or move "
                    "this service to another port (two daemons that both set SO_REUSEADDR would share it "
                    "silently)")
        return (f"{who} has the port bound without listening on it. Find out why with {check_pid}; stop it "
                "cleanly, or give this service another port")
    return "see `bindguard explain` for the details"


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


def write_json(outcome: Outcome) -> None:
    from bindguard.report.jsonout import write_json  # json only for --json

    write_json(outcome_json(outcome))


def describe_holder(c: Conflict) -> str:
    """One line: the socket in the way and who holds it."""
    parts = []
    s, p = c.socket, c.process
    if s is not None:
        where = f"{s.local}" + (f" -> {s.remote}" if s.remote else "")
        parts.append(f"{where} {s.state}")
        if s.v6only is False and s.local.host.version == 6 and s.local.is_wildcard:
            parts[-1] += " (dual-stack)"
        if s.expires_ms is not None and c.kind == TIME_WAIT:
            parts.append(f"clears in {s.expires_ms / 1000:.1f} s")
    if p is not None:
        command = " ".join(p.cmdline) or p.name
        parts.append(f"PID {p.pid} ({command})")
        parts.append(f"user {p.user}")
        parts.append(f"PPID {p.ppid}")
        parts.append(f"started {_ago(p.started)}")
    elif s is not None and s.inode:
        parts.append(f"uid {s.uid}, holder not found")
    if c.socket_unit:
        parts.append(f"socket unit {c.socket_unit}")
    elif c.kind == SOCKET_UNIT:
        parts.append("socket unit unknown")
    elif c.unit_status:
        parts.append(unit_phrase(c.unit, c.unit_status))
    if c.other_bind is not None:
        parts.append(f"the request's own {c.other_bind}")
    if not parts and c.kind == PERMISSION_DENIED and c.privilege is not None:
        who = f"User={c.privilege.user}" if c.privilege.user else "its user"
        return (f"the daemon ({who}) lacks CAP_NET_BIND_SERVICE, which ports below "
                f"{c.privilege.unprivileged_port_start} need")
    if not parts and c.kind == ADDRESS_UNAVAILABLE:
        return "IPv6 is not available here" if c.error == "EAFNOSUPPORT" else f"no interface has {c.bind.endpoint.host}"
    return ", ".join(parts) if parts else "no holder visible"


def _headline(outcome: Outcome, explain: bool) -> tuple[int, str]:
    blocking = [c for c in outcome.conflicts if c.blocking]
    refusing = "a start now would be refused" if explain else "refusing to start"
    addrs = ", ".join(dict.fromkeys(str(c.bind) for c in blocking))
    code = outcome.exit_code
    if code == errors.EXIT_CLEAR:
        all_addrs = ", ".join(str(r.bind) for r in outcome.results)
        waited_for = "; ".join(outcome.waited_for)
        waited = f" after waiting {outcome.waited:.1f} s for {waited_for}" if outcome.waited_for else ""
        return output.INFO, f"bindguard: clear: {all_addrs} can be bound{waited}"
    if code == errors.EXIT_TEMPFAIL:
        left = [c.socket.expires_ms for c in blocking if c.socket is not None and c.socket.expires_ms is not None]
        clears = f"it clears by itself in {max(left) / 1000:.1f} s" if left else "it clears by itself"
        if explain:  # explain never waits: say what a guard would meet, not what happened to one
            return output.ERR, (f"bindguard: {addrs} blocked by TIME_WAIT now; {clears} (`check` waits for it "
                                f"within --wait; exit {code})")
        waited = f"after waiting {outcome.waited:.1f} s" if outcome.waited else "without waiting"
        return output.ERR, (f"bindguard: {refusing}: {addrs} still blocked by TIME_WAIT {waited}; {clears}, "
                            f"past the wait budget (exit {code})")
    if code == errors.EXIT_NOTAVAIL:
        return output.ERR, f"bindguard: {refusing}: {addrs} not available on any interface (exit {code})"
    if code == errors.EXIT_NOPERM:
        return output.ERR, f"bindguard: {refusing}: {addrs} denied to the daemon (exit {code})"
    waited = f" after waiting {outcome.waited:.1f} s" if outcome.waited else ""
    return output.ERR, f"bindguard: {refusing}: {addrs} in use{waited} (exit {code})"


def write_human(outcome: Outcome, explain: bool = False) -> None:
    priority, headline = _headline(outcome, explain)
    output.emit(priority, headline)
    for line in outcome.reaped:
        output.emit(output.WARNING, f"  reaped: {line}")
    for c in outcome.conflicts:
        tag = "prediction: " if c.predicted else ""
        level = output.ERR if c.blocking and not outcome.clear else output.WARNING
        lines = [f"  {c.bind}: {tag}{c.kind}: {describe_holder(c)}"]
        if explain or c.evidence:
            lines += [f"    evidence: {e}" for e in c.evidence]
        lines.append(f"    fix: {remedy(c)}")
        output.emit(level, lines)
    for note in outcome.notes:
        output.emit(note.priority, f"  {'warning' if note.priority <= output.WARNING else 'note'}: {note.text}")


def write_observed(outcome: Outcome) -> None:
    """explain: each address's answer, then everything on the ports, not only what blocks."""
    for r in outcome.results:
        answer = "can be bound" if r.ok else f"{r.error_name} at {r.step}()"
        output.emit(output.INFO, f"  {r.bind}: {answer}")
    if not outcome.evidence.sockets:
        ports = ", ".join(sorted({f"{r.bind.endpoint.port}/{r.bind.endpoint.proto}" for r in outcome.results}))
        output.emit(output.INFO, f"  nothing else is on port {ports}")
        return
    output.emit(output.INFO, "  on these ports now:")
    for s in outcome.evidence.sockets:
        p = outcome.evidence.holders.get(s.inode)
        held = attribution(s, outcome.evidence)
        where = f"socket unit {held.socket_unit}" if held.socket_unit else unit_phrase(held.unit, held.unit_status)
        who = f"PID {p.pid} ({' '.join(p.cmdline) or p.name}), {where}" if p else (
            "no process (kernel timer)" if not s.inode else f"uid {s.uid}")
        proto = "" if s.local.proto == TCP else "udp "
        output.emit(output.INFO, f"    {proto}{s.local.address()} {s.state}: {who}")
