"""The host's port map as the scan records it: who listens (Listener), what each unit binds or will
bind and how that is known (Claim), how each service runs (UnitState), and the namespace's ephemeral
port range. evidence.hostmap gathers it (sock_diag, /proc, D-Bus, the units' files); verdict.scan
judges it without asking anything again."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

from bindguard.model.endpoints import Bind
from bindguard.model.facts import ProcessFact, SocketFact
from bindguard.model.kinds import ClaimSource, UnitStatus
from bindguard.model.nat import NatRule


@dataclass
class Listener:
    """A listening socket (TCP LISTEN, or an unconnected bound UDP socket) and who holds it."""

    socket: SocketFact
    process: ProcessFact | None = None
    unit: str | None = None  # the holder's unit (GetUnitByPID, else its cgroup); held by the manager: its socket unit
    unit_status: UnitStatus | None = None  # how `unit` is known; None without a holder
    by_manager: bool = False  # held by the proven service manager: a .socket unit
    socket_unit: str | None = None

    @property
    def owner(self) -> str | None:
        return self.socket_unit or self.unit


@dataclass
class Claim:
    """An address a unit binds or will bind, and where that is known from."""

    unit: str
    bind: Bind
    source: ClaimSource
    detail: str  # file:line:column, the daemon's file, "nginx -T", ...
    will_run: bool | None = None  # active or enabled; None when not known (no systemd)
    confident: bool = True
    triggers: tuple[str, ...] = ()  # a .socket unit: the services it passes its sockets to

    def describe(self) -> str:
        ep = self.bind.endpoint
        stack = " dual-stack" if ep.family == socket.AF_INET6 and ep.is_wildcard and not self.bind.v6only else ""
        reuse = " SO_REUSEPORT" if self.bind.options.reuseport else ""
        what = {ClaimSource.CONFIG: "declares", ClaimSource.DISCOVERED: "binds", ClaimSource.SOCKET_UNIT: "listens on",
                ClaimSource.LISTENING: "listens on"}[self.source]
        guess = ", a guess" if not self.confident else ""
        return f"{self.unit} {what} {ep}{stack}{reuse} ({self.detail}{guess})"


@dataclass(frozen=True)
class ExitedCommand:
    """An ExecStartPre= command's last run, as the manager recorded it."""

    argv: tuple[str, ...]
    path: str
    code: int  # siginfo si_code: 1 exited, 2 killed, 3 dumped
    status: int  # exit status, or the signal number when killed


@dataclass
class UnitState:
    """A service as the scan saw it: where its addresses came from and how it runs."""

    name: str
    active_state: str = ""
    unit_file_state: str = ""
    source: str = ""  # ClaimSource.CONFIG, .DISCOVERED or "" (nothing known)
    n_restarts: int = 0
    result: str = ""
    warnings: list[str] = field(default_factory=list)
    sub_state: str = ""
    exec_main_status: int = 0
    exec_start_pre: tuple[ExitedCommand, ...] = ()
    config_problems: tuple[str, ...] = ()  # its bindguard file cannot be used: why (file:line:column: ...)


@dataclass
class HostMap:
    """Everything the scan observed, once: listeners with their holders and units, every unit's claims,
    the services' states, and the ephemeral port range."""

    listeners: list[Listener] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)
    units: list[UnitState] = field(default_factory=list)
    # The ActiveState= of each unit a listener's holder runs in, as the manager answered (services
    # scanned or not); a unit the manager does not know is absent.
    unit_states: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    port_range: tuple[int, int] | None = None  # net.ipv4.ip_local_port_range; None when unreadable
    reserved: str = ""  # net.ipv4.ip_local_reserved_ports as read
    bus: str | None = None  # the manager asked, None without systemd
    nat_rules: list[NatRule] = field(default_factory=list)  # DNAT/REDIRECT rules from the nftables ruleset
    scanned_at: float = field(default_factory=time.time)
