"""systemd's side of the evidence, gathered at most once per run and only when needed.

Over D-Bus when the bus answers; otherwise from /proc alone, with a note saying what is
missing. Without a bus the manager is known only where /proc proves it (proven_manager), and
a unit only as the name a cgroup path bears, which the report marks as unconfirmed. A missing
bus never changes the kernel's verdict.
"""

from __future__ import annotations

import os

from bindguard.model.endpoints import Bind
from bindguard.model.facts import ProcessFact, SocketUnitFact, SystemdFacts, unit_active
from bindguard.model.kinds import ConflictKind
from bindguard.model.record import Record, field
from bindguard.systemd import busaddress
from bindguard.systemd.unitfiles import own_unit, proven_user_manager, runs_systemd, user_manager

# A service between runs: stopped (facts.unit_active), or starting but not yet past ExecCondition=/
# ExecStartPre= (the guard's own phase), or waiting to restart. Processes in its cgroup then are left
# from a run before.
NOT_YET_STARTED_SUB_STATES = ("condition", "start-pre", "auto-restart")


def proven_manager(user: bool, environ=None) -> tuple[int, str] | None:
    """The service manager's PID as /proc proves it without D-Bus, and the proof; None without proof.

    The system manager: PID 1 runs systemd and /run/systemd/system exists (as sd_booted() checks).
    In a container, in CI or under `unshare --pid` PID 1 is something else, and a process whose
    parent is PID 1 was not re-parented to any service manager. A user manager: $MANAGERPID, which
    the manager sets for what it starts, names a live process running systemd (for a root guard,
    one of root's: unitfiles.proven_user_manager).
    """
    if user:
        pid = proven_user_manager(environ)
        return (pid, f"$MANAGERPID {pid} runs systemd") if pid is not None else None
    if os.path.isdir("/run/systemd/system") and runs_systemd(1):
        return 1, "PID 1 is systemd"
    return None


def ask_units(conn, pids, answers: dict[int, str | None]) -> dict[int, str | None]:
    """The manager's answer (GetUnitByPID) for each PID, None for "in no unit", into answers (kept
    as far as they came when the bus fails: SystemdError). The manager answers "no unit" for
    a process that has exited too: that answer is kept only for a process still there after it."""
    for pid in dict.fromkeys(pids):
        if pid not in answers:
            unit = conn.unit_of_pid(pid)
            if unit is not None or os.path.exists(f"/proc/{pid}"):
                answers[pid] = unit
    return answers


def own_unit_cgroup(unit: str) -> str | None:
    """The cgroup of unit when this process runs in it (an ExecStartPre=/ExecStartPost= of the
    unit): the kernel's word, without D-Bus. None when this process is not in unit."""
    from bindguard.systemd.unitfiles import process_cgroup

    parts = (process_cgroup("self") or "").split("/")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] == unit or (parts[i].startswith("_") and parts[i][1:] == unit):
            return "/".join(parts[: i + 1])
    return None


def instance_running(active_state: str, sub_state: str) -> bool:
    """Whether a unit in this state runs an instance now (its processes are that instance)."""
    if not unit_active(active_state):
        return False
    return not (active_state == "activating" and sub_state in NOT_YET_STARTED_SUB_STATES)


class SystemdContext(Record):
    bus_choice: bool | None = None  # --user (True) / --system (False) / detect (None)
    unit_name: str | None = None  # --unit, else the unit the guard runs in
    notes: list[str] = field(default_factory=list)
    _connection: object = None
    _tried: bool = False
    _unavailable: str = ""  # why connection() is None
    _unit_info: object = None
    _unit_info_tried: bool = False
    _proven: tuple[int, str] | None = None  # proven(), once worked out
    _proven_tried: bool = False

    @property
    def user_bus(self) -> bool:
        """Whether this run asks a user manager: unitfiles.user_manager for bus_choice, the rule the
        fast path, the plan and check follow for the same --user/--system, so that all answer
        alike. Nothing is kept here: a root
        guard's one costly step, its proof of $MANAGERPID, is made once a run there and shared
        (unitfiles.proven_user_manager)."""
        return user_manager(self.bus_choice)

    def proven(self) -> tuple[int, str] | None:
        """proven_manager() for this run's bus, worked out once per run: the system manager's proof
        reads /proc/1/exe, and facts() is asked again whenever the holders change."""
        if not self._proven_tried:
            self._proven_tried = True
            self._proven = proven_manager(self.user_bus)
        return self._proven

    def connection(self):
        """The open Systemd connection, or None (with a note) when the bus is unavailable."""
        if not self._tried:
            self._tried = True
            which = busaddress.bus_for(self.user_bus)
            try:
                # checked before bus is imported: without a socket, neither it nor pystemd is loaded
                checked = busaddress.check_socket(which, busaddress.socket_path(which))
                from bindguard.systemd import bus

                self._connection = bus.Systemd(which, checked_socket=checked)
            except busaddress.SystemdError as exc:
                self._unavailable = str(exc)
                self.notes.append(f"{exc}; units are named from cgroups only, socket units are not checked")
        return self._connection

    def unit_facts(self, unit: str):
        """unit_facts() over this run's connection, so that one deadline covers all of a run's D-Bus."""
        from bindguard.systemd import bus

        if self.connection() is None:
            raise bus.SystemdUnavailable(self._unavailable)
        return unit_facts(unit, connection=self._connection)

    def socket_units_may_claim(self, binds: list[Bind]) -> bool:
        """Whether an enabled .socket unit's files list one of these ports: on a clear start in a
        unit, the one reason to ask the manager anything (a latent socket unit). No D-Bus."""
        from bindguard.systemd import unitexec

        return unitexec.socket_units_may_claim({b.endpoint.port for b in binds}, self.user_bus, self.guarded_unit())

    @property
    def in_unit(self) -> bool:
        """Guarding a unit: named with --unit, or running under a manager (INVOCATION_ID is set)."""
        return self.unit_name is not None or bool(os.environ.get("INVOCATION_ID"))

    def guarded_unit(self) -> str | None:
        if self.unit_name is None and self.in_unit:
            self.unit_name = own_unit()  # an ExecStartPre= runs in its service's cgroup
        return self.unit_name

    def unit_info(self):
        """The guarded unit's settings (UnitInfo), or None without a unit or a bus, or when the
        manager knows no such unit (a note says so: the verdict is the kernel's either way)."""
        if self._unit_info is None and not self._unit_info_tried and self.guarded_unit() \
                and self.connection() is not None:
            from bindguard.systemd import bus

            self._unit_info_tried = True
            try:
                self._unit_info = self._connection.unit(self.unit_name)
            except bus.UnitNotFound as exc:
                self.notes.append(f"{exc}; checked without its settings (TimeoutStartSec=, User=, KillMode=)")
            except bus.SystemdError as exc:
                self.notes.append(f"{exc}; checked without {self.unit_name}'s settings")
        return self._unit_info

    def unit_user(self) -> str:
        """The guarded unit's User= ("" runs as root): from its unit files, without D-Bus, when it
        has any; else from the manager."""
        from bindguard.systemd.unitfacts import unit_facts_from_files, unit_fragment

        unit = self.guarded_unit()
        if not unit:
            return ""
        if unit_fragment(unit, self.user_bus) is not None:
            return unit_facts_from_files(unit, self.user_bus).user
        info = self.unit_info()
        return info.user if info is not None else ""

    def facts(self, binds: list[Bind], holders: list[ProcessFact]) -> SystemdFacts:
        """What the manager says about the holders, and who the manager is, as far as proven."""
        user = self.user_bus
        proven = self.proven()
        facts = SystemdFacts(manager_pid=proven[0] if proven else None, manager_proof=proven[1] if proven else "",
                             guarded_unit=self.guarded_unit())
        conn = self.connection()
        if conn is None:
            if proven is None:
                self.notes.append(
                    "no service manager is proven here (" + ("$MANAGERPID names no running systemd" if user else
                                                              "PID 1 is not systemd, or /run/systemd/system is "
                                                              "missing") +
                    ", and the bus did not answer): each holder is described by its PPID and cgroup, and none "
                    "is judged stale")
            return facts
        try:
            facts.manager_pid, facts.manager_proof = conn.manager_pid(), "the bus names it"
            info = self.unit_info()
            if info is not None:
                facts.guarded_instance_running = instance_running(info.active_state, info.sub_state)
                facts.guarded_state = f"{info.active_state} ({info.sub_state})"
            ports = {b.endpoint.port for b in binds}
            for unit in conn.socket_units(ports):
                for _, endpoint, v6only in unit.endpoints():
                    facts.socket_units.append(
                        SocketUnitFact(unit.name, unit.active_state, endpoint, v6only, unit.triggers))
            # the manager's own sockets are its socket units'
            ask_units(conn, [p.pid for p in holders if p.pid != facts.manager_pid], facts.unit_of_pid)
            for unit in dict.fromkeys(u for u in facts.unit_of_pid.values() if u):
                facts.unit_states[unit] = conn.active_state(unit)
        except busaddress.SystemdError as exc:
            self.notes.append(f"{exc}; the verdict stands on the kernel's answer")
        return facts

    def start_budget(self) -> float | None:
        """How long the guard may still wait: until the unit's TimeoutStartSec= runs out (counted
        from the start of this start job, so earlier ExecStartPre= lines are paid for), less a
        safety margin so that the manager never kills the start mid-wait."""
        import time

        info = self.unit_info()
        if info is None or info.timeout_start_sec is None:
            return None
        margin = max(2.0, info.timeout_start_sec * 0.1)
        deadline = info.start_deadline()
        if deadline is None:  # not started by the manager (a person ran check --unit)
            return max(info.timeout_start_sec - margin, 0.0)
        return max(deadline - margin - time.monotonic(), 0.0)

    def advice(self, conflicts: list, refused: bool) -> list[str]:
        """What the guarded unit's own settings add to conflicts actually found: how its own stale
        process came to hold the address, and a restart loop into the same refusal. Nothing on a
        clear start, and never a change to a setting the unit may have on purpose (Debian's
        ssh.service keeps KillMode=process so that a restart keeps open sessions)."""
        info = self.unit_info() if self.in_unit and conflicts else None
        if info is None:
            return []
        lines = []
        own = [c for c in conflicts if c.kind == ConflictKind.OWN_INSTANCE and c.process is not None]
        if own and info.kill_mode in ("process", "none"):
            left = "every process of the unit" if info.kill_mode == "none" else "the processes its main process forked"
            pids = ", ".join(dict.fromkeys(f"PID {c.process.pid} on {c.bind}" for c in own))
            lines.append(
                f"{info.name} has KillMode={info.kill_mode}: a stop leaves {left} running, and one of them "
                f"still holds the address ({pids}). Some units rely on that setting (sshd keeps open sessions "
                "across a restart), so leave it; end only that process, once its PID and command show it is "
                "an old listener of the unit")
        if refused and info.n_restarts > 0:
            lines.append(
                f"systemd has restarted {info.name} {info.n_restarts} time(s) into this refusal, as it "
                "retries a failed ExecStartPre= like any failure: bound the loop with "
                "StartLimitIntervalSec= and StartLimitBurst= in [Unit], or remove the conflict")
        return lines


def unit_facts(unit: str, bus_choice: bool | None = None, connection=None):
    """What discovery needs from systemd about a unit (model.facts.UnitFacts), over D-Bus: over
    `connection` when given, else over a connection of its own.

    Raises SystemdError (SystemdUnavailable without a bus), and UsageError for a unit systemd
    does not know.
    """
    from bindguard.model.errors import UsageError
    from bindguard.systemd import bus

    if connection is None:
        with bus.Systemd(bus.choose_bus(bus_choice)) as own:
            return unit_facts(unit, connection=own)
    try:
        return connection.unit_facts(unit)
    except bus.UnitNotFound as exc:
        raise UsageError(str(exc), "give the unit's full name, e.g. nginx.service") from None
