"""What a careful administrator does about a conflict, with the concrete names: one remedy per kind
(REMEDIES), and the commands every fix text shares (look at a process before stopping it, find a
holder as root). scan's and verify's fixes use the same commands. Pure."""

from __future__ import annotations

from collections.abc import Callable

from bindguard.model.endpoints import TCP
from bindguard.model.facts import VIA_PROXY
from bindguard.model.kinds import ConflictKind, Leaving, UnitStatus
from bindguard.model.text import command_unit, shell_word
from bindguard.verdict.conflicts import Conflict

TYPE_CHECKING = False  # typing's own costs an import on the guard's path
if TYPE_CHECKING:  # only types here: the guard loads no NAT code unless asked
    from bindguard.model.facts import ContainerFact
    from bindguard.model.nat import NatRule


def inspect_process(pid: int) -> str:
    """The command that shows what a process is (its parent, when it started, its command line):
    what to look at before stopping a holder that no unit accounts for."""
    return f"`ps -o pid,ppid,lstart,cmd -p {pid}`"


def find_holder(port: int, *, listening: bool) -> str:
    """The command that finds, as root, what holds a port when no process was named: the listeners
    only, or every socket on it (a connection or TIME_WAIT can hold it too)."""
    return f"`ss -lntup 'sport = :{port}'`" if listening else f"`ss -tanup 'sport = :{port}'`"


# Kinds whose holder, when it runs for a container, is stopped with the container's engine.
CONTAINER_HOLDER_KINDS = (ConflictKind.LISTENER, ConflictKind.BOUND, ConflictKind.ORPHAN)


def stop_container(container: ContainerFact) -> str:
    """How a container (or a Kubernetes pod) is stopped by its owner, never by a signal to its
    process: the engine (or the pod's controller) restarts what was killed under it."""
    who = container.handle
    if container.pod:
        owner = (f"`kubectl -n {container.namespace} get pod {container.pod} -o yaml` shows its owner"
                 if shell_word(container.namespace) and shell_word(container.pod) else
                 "its metadata.ownerReferences name its owner")
        return (f"the pod {container.pod} in namespace {container.namespace} holds it ({container.engine} container "
                f"{who}): change the pod's hostPort (or hostNetwork port) in its manifest, or delete the pod only if "
                f"nothing recreates it ({owner}); a killed process is restarted by the kubelet")
    if container.engine == "docker":
        return (f"stop it with its engine: `docker stop {who}` (`docker update --restart=no {who}` first if a "
                "restart policy would bring it back), or publish it on another port; killing its process lets "
                "the engine restart it")
    if container.engine == "podman" and container.user:
        # Rootless: only its user's podman knows the container (its storage is in that user's home).
        if not shell_word(container.user):
            return (f"stop it with its engine, as its user {container.user}, whose name is not written into a "
                    f"command here: that user's `podman stop {who}` (or, if a user unit runs it, Quadlet or "
                    "`podman generate systemd`, that unit's stop), or publish it on another port; killing its "
                    "process lets its restart policy bring it back")
        # runuser keeps the caller's environment: a root login's XDG_RUNTIME_DIR (/run/user/0, set by
        # pam_systemd), which that user's podman refuses; without it, podman takes the user's own.
        as_user = f"runuser -u {container.user} -- env -u XDG_RUNTIME_DIR -u DBUS_SESSION_BUS_ADDRESS "
        return (f"stop it with its engine, as its user {container.user}: `{as_user}podman stop {who}` (if a user "
                f"unit runs it, Quadlet or `podman generate systemd`, stop that unit instead: `systemctl --user "
                f"-M {container.user}@ stop UNIT`), or publish it on another port; killing its process lets its "
                "restart policy bring it back")
    if container.engine == "podman":
        return (f"stop it with its engine: `podman stop {who}` (if a systemd unit runs it, Quadlet or `podman "
                "generate systemd`, stop that unit instead), or publish it on another port; killing its process "
                "lets its restart policy bring it back")
    return f"stop the container {who} with {container.engine}'s own tools (crictl stop {container.id[:12]}), not kill"


def _container(c: Conflict) -> str:
    assert c.process is not None and c.process.container is not None  # remedy() asks only then
    container = c.process.container
    how = VIA_PROXY.get(container.via, "its cgroup is the container's")
    relation = "holds it for" if container.via in VIA_PROXY else "is"
    return (f"PID {c.process.pid} {relation} the {container.label} ({how}). If that container should serve "
            f"this address, do not start this service on it; otherwise {stop_container(container)}; or move this "
            "service to another port")


def remedy(c: Conflict) -> str:
    """The fix for this conflict: a holder that is leaving gets the advice to wait or order the
    handover, whatever its kind (but two sockets of the request itself); a container's holder, the
    engine's way to stop it; else its kind's remedy."""
    if c.leaving and c.kind != ConflictKind.SELF_CONFLICT:
        return _leaving(c)
    if c.process is not None and c.process.container is not None and c.kind in CONTAINER_HOLDER_KINDS:
        return _container(c)
    return REMEDIES.get(c.kind, _unknown)(c)


def _pid(c: Conflict) -> int | None:
    return c.process.pid if c.process else None


def _check_pid(c: Conflict) -> str:
    pid = _pid(c)
    return inspect_process(pid) if pid else find_holder(c.bind.endpoint.port, listening=False)


def _leaving(c: Conflict) -> str:
    who, how = (c.unit, "is stopping") if c.leaving == Leaving.UNIT_DEACTIVATING else (f"PID {_pid(c)}", "is exiting")
    return (f"{who} {how}, and holds the address until it has gone: the guard waits for that within this "
            "unit's start budget (--wait, capped by TimeoutStartSec=, or TimeoutSec= for a socket unit). If "
            "it takes longer, shorten the holder's stop (its ExecStop=, TimeoutStopSec=) or give this unit "
            "more time; for a handover between two units, order them (`Conflicts=` and `After=` on the new "
            "one) so that it starts only once the old one has stopped")


def _self_conflict(c: Conflict) -> str:
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


def _permission_denied(c: Conflict) -> str:
    if c.privilege is None:  # a denial is said only with its proof
        return _unknown(c)
    start = c.privilege.unprivileged_port_start
    if c.privilege.bounding_set:
        grant = ("add CAP_NET_BIND_SERVICE to the unit's CapabilityBoundingSet= (and to AmbientCapabilities= "
                 "if the daemon runs as a user other than root)")
    else:
        grant = "give the daemon the capability: `AmbientCapabilities=CAP_NET_BIND_SERVICE` in [Service]"
    return (f"the daemon's bind() of port {c.bind.endpoint.port} will fail with EACCES (Permission denied): "
            f"{grant}; or let systemd bind the port, in a .socket unit, if the daemon takes its sockets from "
            f"systemd; or use a port at or above {start} (net.ipv4.ip_unprivileged_port_start)")


def _address_unavailable(c: Conflict) -> str:
    if c.error == "EAFNOSUPPORT":
        return ("the kernel has no IPv6 here (booted with ipv6.disable=1, or no IPv6 module): configure "
                "the daemon to bind IPv4 addresses only, or enable IPv6")
    if c.clears:
        return ("the IPv6 address is still in duplicate address detection and becomes usable in a "
                "second or two; wait for it (bindguard does), or add it with `nodad`")
    return (f"{c.bind.endpoint.host} is on no interface (`ip -br addr`). If it comes up later in boot, order the "
            "unit After=network-online.target and Wants=network-online.target, or let the daemon bind "
            "it early (IP_FREEBIND: --freebind / FreeBind=yes, or net.ipv4.ip_nonlocal_bind=1)")


def _time_wait(c: Conflict) -> str:
    left = f" in {c.socket.expires_ms / 1000:.0f} s" if c.socket and c.socket.expires_ms is not None else ""
    return (f"a closed connection's {c.socket.state if c.socket else 'TIME_WAIT'} holds the address and "
            f"clears by itself{left} (TIME_WAIT lasts 60 s; no sysctl shortens it). It blocks because "
            "SO_REUSEADDR was off on the socket it came from or is off in the daemon: enable it in the "
            "daemon, or let bindguard wait it out (--wait SECONDS)")


def _socket_unit(c: Conflict) -> str:
    name = c.socket_unit or "a .socket unit"
    if c.own_socket_unit:
        return (f"{name} is this service's own socket unit: systemd binds the address and passes it to "
                "the daemon (sd_listen_fds, LISTEN_FDS). Configure the daemon to take the socket from "
                "systemd, or remove the unit's Sockets=: never both")
    unit = command_unit(c.socket_unit) if c.socket_unit else "UNIT.socket"  # a placeholder, never quoted as a name
    return (f"{name} listens there for socket activation: `systemctl stop {unit}` and `systemctl disable "
            f"{unit}` if it should not, or move one of them to another address")


def _guard_trial(c: Conflict) -> str:
    unit = f" for {c.unit}" if c.unit else ""
    status = f"; if it is stuck, `systemctl status {command_unit(c.unit)}` shows its start" if c.unit else ""
    return (f"PID {_pid(c)}'s command line is bindguard's: another guard trying this address{unit}, whose trial "
            "socket held it each time this guard probed again. If both units' daemons bind this address, "
            "only one of them can run: give them different addresses, or let only one of them start "
            f"(Conflicts=){status}. If it is no guard ({_check_pid(c)}), it is what holds the address")


def _latent_socket_unit(c: Conflict) -> str:
    unit = command_unit(c.socket_unit) if c.socket_unit else "UNIT.socket"  # a placeholder, never quoted as a name
    return (f"{c.socket_unit} is not listening now but declares this address: it will collide when it "
            f"starts (at next boot if enabled). `systemctl disable --now {unit}`, or "
            "change its ListenStream=/ListenDatagram=")


def _own_instance(c: Conflict) -> str:
    unit = c.unit or "the unit"
    command = command_unit(c.unit) if c.unit else "UNIT"  # a placeholder, never quoted as a name
    pid = _pid(c)
    if pid is None:
        return (f"a process still in {unit}'s own cgroup holds the port: find it with `systemctl status "
                f"{command}` and confirm it is an old listener of the unit before ending it")
    return (f"PID {pid} is still in {unit}'s own cgroup from an earlier run, holding the port. Confirm with "
            f"{_check_pid(c)} and `systemctl status {command}` that it is an old listener of {unit} (not a "
            f"process the unit keeps on purpose), then `kill -TERM {pid}`; --reap-stale does exactly "
            "that, for processes proven to be the unit's own")


def _orphan(c: Conflict) -> str:
    pid = _pid(c)
    return (f"PID {pid} was re-parented to the service manager and belongs to no running unit. "
            f"Confirm it is stale with {_check_pid(c)} and `ls -l /proc/{pid}/exe`, then "
            f"`kill -TERM {pid}` (and `kill -KILL {pid}` only if it ignores that)")


def _listener(c: Conflict) -> str:
    pid = _pid(c)
    who = c.unit if c.unit and c.unit_status == UnitStatus.BY_MANAGER else f"PID {pid}" if pid else "the listener"
    if c.unit and c.unit.endswith(".service") and c.unit_status in (UnitStatus.BY_MANAGER, UnitStatus.BY_CGROUP):
        stop = f"`systemctl stop {command_unit(c.unit)}`"
        if c.unit_status == UnitStatus.BY_CGROUP:
            stop += (f" once `systemctl status {command_unit(c.unit)}` lists PID {pid}: only its cgroup path "
                     "names that unit")
    else:
        stop = f"the way it was started, after finding out what it is with {_check_pid(c)}"
    return (f"{who} already serves this address. If it is the rightful owner, do not start a second "
            f"one; otherwise stop it cleanly ({stop}) or move this service to a free port or another "
            f"address")


def _bound(c: Conflict) -> str:
    ep = c.bind.endpoint
    if c.socket is not None and c.socket.state == "ESTABLISHED" and c.socket.remote is not None:
        return (f"a connection uses {ep.port} as its local port (to {c.socket.remote}): often an outgoing "
                "connection that drew it as an ephemeral port. Reserve the port: "
                f"`sysctl -w net.ipv4.ip_local_reserved_ports={ep.port}` and the same line in "
                "/etc/sysctl.d/, then restart the service once that connection is gone")
    pid = _pid(c)
    who = f"PID {pid}" if pid else "a process"
    if ep.proto != TCP:
        return (f"{who} already receives on this UDP port. If it is the rightful owner, do not start a "
                f"second one; otherwise find out what it is with {_check_pid(c)} and stop it cleanly, or move "
                "this service to another port (two daemons that both set SO_REUSEADDR would share it "
                "silently)")
    return (f"{who} has the port bound without listening on it. Find out why with {_check_pid(c)}; stop it "
            "cleanly, or give this service another port")


def nat_remedy(address: object, rule: NatRule) -> str:
    """The fix for an address whose connections a NAT rule takes elsewhere (guard and scan alike)."""
    owner = (f"unpublish or move the port in {rule.owner}, which made the rule ({rule.owner_hint}); editing "
             "the rule by hand is undone when it is written again") if rule.owner else (
        f"find what writes the rule (`{rule.listing()}`) and remove "
        "or narrow it")
    return (f"the daemon can bind {address}, but connections to it are redirected to {rule.to or 'somewhere else'} "
            f"by a NAT rule, not delivered to it. If the daemon is meant to serve this port, {owner}; otherwise "
            "move the daemon to another port")


def _nat_shadowed(c: Conflict) -> str:
    return nat_remedy(c.bind, c.nat) if c.nat is not None else _unknown(c)


def _unknown(c: Conflict) -> str:
    return "see `bindguard explain` for the details"


REMEDIES: dict[str, Callable[[Conflict], str]] = {
    ConflictKind.SELF_CONFLICT: _self_conflict,
    ConflictKind.PERMISSION_DENIED: _permission_denied,
    ConflictKind.ADDRESS_UNAVAILABLE: _address_unavailable,
    ConflictKind.TIME_WAIT: _time_wait,
    ConflictKind.SOCKET_UNIT: _socket_unit,
    ConflictKind.GUARD_TRIAL: _guard_trial,
    ConflictKind.LATENT_SOCKET_UNIT: _latent_socket_unit,
    ConflictKind.OWN_INSTANCE: _own_instance,
    ConflictKind.ORPHAN: _orphan,
    ConflictKind.LISTENER: _listener,
    ConflictKind.BOUND: _bound,
    ConflictKind.NAT_SHADOWED: _nat_shadowed,
}
