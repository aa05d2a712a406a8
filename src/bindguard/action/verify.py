"""verify's run: poll sock_diag until every address the daemon needs has a socket on it (or the
timeout passes), find the holders of what listens on those ports (owners.holders_of, every holder),
ask the manager their units, and judge each address (verdict.verify)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from bindguard import stop_if_asked
from bindguard.model.endpoints import TCP, Bind
from bindguard.model.facts import BOUND, SocketFact
from bindguard.verdict.verify import Check, Holder, assess, exact, exit_code, holders

POLL_INTERVAL = 0.1

Observed = dict[tuple[str, int], list[SocketFact]]  # (proto, port) -> the sockets listening on it


@dataclass
class Verification:
    unit: str
    checks: list[Check]
    waited: float
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return exit_code(self.checks)


def _observe(binds: list[Bind], notes: list[str]) -> Observed:
    from bindguard.evidence import sockets

    found = {}
    for proto, port in sorted({(b.endpoint.proto, b.endpoint.port) for b in binds}):
        state = "LISTEN" if proto == TCP else BOUND
        found[(proto, port)] = [s for s in sockets.sockets_on_port(proto, port, notes, states=[state])
                                if s.remote is None]
    return found


def wait_for_listeners(binds: list[Bind], timeout: float, notes: list[str],
                       optional: frozenset[Bind] = frozenset()) -> tuple[Observed, float]:
    """Poll until every address the daemon needs (all of them, if it needs none) has a socket on
    it, or timeout seconds pass; the last observation."""
    awaited = [b for b in binds if b not in optional] or binds
    start = time.monotonic()
    while True:
        stop_if_asked()
        observed = _observe(binds, notes)
        elapsed = time.monotonic() - start
        if all(any(exact(b, s) for s in observed[(b.endpoint.proto, b.endpoint.port)]) for b in awaited) \
                or elapsed >= timeout:
            return observed, elapsed
        time.sleep(min(POLL_INTERVAL, max(timeout - elapsed, 0.0)))


def _holders(observed: Observed, unit: str, notes: list[str], ctx=None) -> dict[int, Holder]:
    """Every holder of every socket observed, each with its unit as the manager (else its cgroup
    path) names it and whether it is the verified unit's own."""
    from bindguard.evidence import owners
    from bindguard.systemd import bus
    from bindguard.systemd.context import ask_units, own_unit_cgroup

    all_sockets = [s for socks in observed.values() for s in socks]
    held = owners.holders_of(all_sockets, every_holder=True)
    if held.incomplete:
        notes.append("some processes could not be inspected (permission denied): run verify as root "
                     "(ExecStartPost=+...) to see every holder")
    answered: dict[int, str | None] = {}
    connection = ctx.connection() if ctx is not None and held.processes else None
    if connection is not None:
        try:
            ask_units(connection, sorted({p.pid for ps in held.processes.values() for p in ps}), answered)
        except bus.SystemdError as exc:
            notes.append(f"{exc}; units are named from cgroup paths")
    if ctx is not None:
        notes.extend(n for n in ctx.notes if n not in notes)
    return holders(all_sockets, held.processes, answered, unit, own_unit_cgroup(unit))


def run(unit: str, binds: list[Bind], optional: frozenset[Bind], v6only_stated: bool, timeout: float,
        ctx=None) -> Verification:
    """Wait for the daemon's listeners, then judge each address."""
    notes: list[str] = []
    observed, waited = wait_for_listeners(binds, timeout, notes, optional)
    held = _holders(observed, unit, notes, ctx)
    checks = [assess(b, observed[(b.endpoint.proto, b.endpoint.port)], held, unit, v6only_stated, waited,
                     b in optional) for b in binds]
    return Verification(unit, checks, waited, notes)
