"""The evidence the guard gathers: plain records, no I/O.

The verdict is a pure function of these, so it can be tested on recorded evidence.
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Mapping

from bindguard.model.endpoints import Bind, Endpoint
from bindguard.model.kinds import UnitStatus
from bindguard.model.record import Record, field
from bindguard.model.text import shell_word

# TCP states as the kernel numbers them (include/net/tcp_states.h).
TCP_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "NEW_SYN_RECV",
    13: "BOUND_INACTIVE",
}
# A TCP socket that is bound but never listened comes back from sock_diag as CLOSE
# (or BOUND_INACTIVE); an unconnected UDP socket as CLOSE too. Both are reported "BOUND".
BOUND = "BOUND"


class SocketFact(Record, frozen=True):
    """One socket on the port in question, as sock_diag (or /proc/net) reports it."""

    local: Endpoint
    state: str  # LISTEN, BOUND, ESTABLISHED, TIME_WAIT, FIN_WAIT2, ... (UDP: BOUND or ESTABLISHED)
    uid: int
    inode: int  # 0 when no process holds it (TIME_WAIT, orphaned FIN_WAIT2)
    remote: Endpoint | None = None
    v6only: bool | None = None  # None: not reported (TIME_WAIT) or not IPv6
    expires_ms: int | None = None  # time left on the socket's timer (TIME_WAIT)
    interface: int = 0  # SO_BINDTODEVICE ifindex, 0 for none
    cgroup_id: int | None = None


class ContainerFact(Record, frozen=True):
    """The container (and pod) a process runs for, from its cgroup path or its command line (conmon's
    -c/-n) and the engine's own files on disk; what could not be read stays empty."""

    engine: str  # docker, podman, containerd, cri-o
    id: str  # the full container id
    name: str = ""
    image: str = ""
    pod: str = ""  # Kubernetes: the pod's name
    namespace: str = ""  # Kubernetes: the pod's namespace
    via: str = ""  # how the process belongs to it: "cgroup", or the engine's process holding its port (VIA_PROXY)
    source: str = ""  # the file the name was read from
    user: str = ""  # a rootless engine's: the user it runs as, whose container it is (root's: "")

    @property
    def label(self) -> str:
        who = self.name or self.id[:12]
        user = f" of user {self.user}" if self.user else ""
        image = f", image {self.image}" if self.image else ""
        pod = f", pod {self.namespace}/{self.pod}" if self.pod else ""
        return f"{self.engine} container {who}{user}{image}{pod}"

    @property
    def handle(self) -> str:
        """What the engine's commands take: the name where it is safe in a shell command as it is
        (model.text.shell_word), else the short id."""
        return self.name if shell_word(self.name) else self.id[:12]


# A process of the engine's own that holds a container's published port (ContainerFact.via), and what
# it is, for the report: Podman's monitor (rootful), rootless Podman's port forwarder, Docker's.
VIA_PROXY = {
    "conmon": "Podman's monitor (conmon) holds the container's published port",
    "rootlessport": "rootless Podman's port forwarder (rootlessport) holds the container's published port",
    "docker-proxy": "Docker's userland proxy (docker-proxy) holds the container's published port",
    "dockerd": "dockerd holds the container's published port itself, its userland proxy off, and a DNAT rule "
               "takes the port's traffic to the container",
}


class ProcessFact(Record, frozen=True):
    """A process that holds a socket."""

    pid: int
    ppid: int
    name: str
    cmdline: tuple[str, ...]
    exe: str
    uid: int
    user: str
    started: float  # seconds since the epoch
    cgroup: str  # the unified-hierarchy path from /proc/PID/cgroup, e.g. /system.slice/nginx.service
    unit: str | None = None  # the systemd unit the cgroup path names, if any
    exiting: bool = False  # the kernel is ending it: /proc/PID/stat says zombie or dead, or PF_EXITING
    container: ContainerFact | None = None  # the container or pod it runs for, where that is proven

    @property
    def command(self) -> str:
        """The process as the evidence names it: its command line, else (a kernel thread, or one that
        cleared its argv) its name."""
        return " ".join(self.cmdline) or self.name


def holder_unit(process: ProcessFact, answered: Mapping[int, str | None]) -> tuple[str | None, UnitStatus]:
    """A process's unit and how it is known (UnitStatus), from the manager's answers (GetUnitByPID,
    None meaning no unit) where it was asked, else from the name its cgroup path bears."""
    if process.pid in answered:
        unit = answered[process.pid]
        if unit is not None and unit.endswith(".slice"):  # a slice holds no process of a unit
            unit = None
        return unit, UnitStatus.BY_MANAGER if unit else UnitStatus.NO_UNIT
    return process.unit, UnitStatus.BY_CGROUP if process.unit else UnitStatus.UNKNOWN


def cgroup_within(cgroup: str, top: str) -> bool:
    """Whether cgroup path is top or below it (a unit's delegated subgroups are its own)."""
    return bool(top) and (cgroup == top or cgroup.startswith(top.rstrip("/") + "/"))


class SocketUnitFact(Record, frozen=True):
    """One network address of a systemd .socket unit."""

    name: str
    active_state: str  # active (listening now), inactive, failed, ...
    endpoint: Endpoint
    v6only: bool
    triggers: tuple[str, ...] = ()  # the services it activates


# systemd's ActiveState= of a unit that runs no instance: stopped, or failed. Every other state
# (active, activating, deactivating, reloading, and those newer managers add) means its processes
# may be its own, so nothing is called orphaned or a stray copy on it.
STOPPED_UNIT_STATES = frozenset({"inactive", "failed"})


def unit_active(active_state: str) -> bool:
    """Whether a unit in this ActiveState= may run processes now (the manager's word)."""
    return active_state not in STOPPED_UNIT_STATES


class SystemdFacts(Record):
    """systemd's view: who the manager is, which unit is guarded, which units claim addresses.

    Only what was proven is here: manager_pid is None unless the bus named the manager, or
    /proc showed a systemd process where $MANAGERPID or PID 1 points (attribution.proven_manager);
    unit_of_pid holds the manager's own answers (GetUnitByPID), None meaning "in no unit", and
    a PID missing from it means nobody asked the manager (no bus).
    """

    manager_pid: int | None
    manager_proof: str = ""  # how the manager is known, for the evidence ("the bus", "$MANAGERPID", ...)
    guarded_unit: str | None = None
    # Whether the guarded unit runs an instance now (its main process, or the start past ExecStartPre=):
    # False means whatever sits in its cgroup is left from an earlier run; None: not known (no bus).
    guarded_instance_running: bool | None = None
    guarded_state: str = ""  # "inactive (dead)", "activating (start-pre)", ...: the evidence for the above
    socket_units: list[SocketUnitFact] = field(default_factory=list)
    unit_states: dict[str, str] = field(default_factory=dict)  # unit -> ActiveState
    unit_of_pid: dict[int, str | None] = field(default_factory=dict)  # GetUnitByPID; None: in no unit


class BindPrivilege(Record, frozen=True):
    """What the guard proved about the daemon's right to bind below net.ipv4.ip_unprivileged_port_start
    (bindguard.evidence.privilege): that it lacks CAP_NET_BIND_SERVICE, unless `unproven` says why not."""

    unprivileged_port_start: int
    user: str  # the daemon's User= as written ("" for root or unset)
    bounding_set: bool = False  # CapabilityBoundingSet= leaves the capability out
    facts: tuple[str, ...] = ()  # the checked facts, as evidence sentences
    unproven: str | None = None  # why the daemon might still get the capability: nothing is claimed

    @property
    def denied(self) -> bool:
        return self.unproven is None


class Evidence(Record):
    """Everything observed about the requested ports, gathered once."""

    sockets: list[SocketFact] = field(default_factory=list)
    holders: dict[int, ProcessFact] = field(default_factory=dict)  # inode -> the holding process
    systemd: SystemdFacts | None = None
    tentative: frozenset[ipaddress.IPv6Address] = frozenset()  # IPv6 addresses still in duplicate-address detection
    notes: list[str] = field(default_factory=list)  # what could not be observed, and why
    privilege: BindPrivilege | None = None  # the daemon's right to privileged ports, where proven
    observed_at: float = 0.0  # time.monotonic() when the sockets were read


class ProbeResult(Record, frozen=True):
    """The kernel's answer to the trial bind of one socket."""

    bind: Bind
    error: int = 0  # errno of the failing step, 0 when the socket bound (and listened)
    step: str = ""  # "bind" or "listen" when it failed there
    collides_with: Bind | None = None  # another socket of the same request, when that is the obstacle

    @property
    def ok(self) -> bool:
        return self.error == 0

    @property
    def error_name(self) -> str:
        return errno.errorcode.get(self.error, str(self.error)) if self.error else ""


class UnitFacts(Record):
    """What systemd says about a unit, as plain data: over D-Bus (systemd.context.unit_facts) or
    from its unit files (systemd.unitfacts.unit_facts_from_files)."""

    exec_start: list[list[str]] = field(default_factory=list)  # argv of each ExecStart=, unexpanded
    environment: list[str] = field(default_factory=list)  # Environment=, "NAME=value" each
    environment_files: list[str] = field(default_factory=list)  # EnvironmentFile=, "-" prefix for optional
    # (type, address[, socket unit, BindIPv6Only=, ReusePort=])
    socket_listens: list[tuple[str | bool, ...]] = field(default_factory=list)
    user: str = ""  # User=, "" when unset (root)
    group: str = ""  # Group=, "" when unset


class SocketUnitSettings(Record, frozen=True):
    """A .socket unit's own sockets as its manager will bind them, from its unit files
    (systemd.unitfacts) or over D-Bus, before it binds them (its ExecStartPre=)."""

    listens: tuple[tuple[str, str], ...] = ()  # (Stream, Datagram or SequentialPacket; address), as written
    reuse_port: bool = False  # ReusePort=
    bind_ipv6_only: str = "default"  # BindIPv6Only=: default (net.ipv6.bindv6only), both, ipv6-only
    free_bind: bool = False  # FreeBind=
    transparent: bool = False  # Transparent= (IP_TRANSPARENT: binds a non-local address, as FreeBind= does)
    bind_to_device: str = ""  # BindToDevice=
    protocol: str = ""  # SocketProtocol=: "" for TCP and UDP, udplite, sctp

