"""What the guard does about each conflict: the unit's policy, else the default for its kind, then
the addresses the daemon starts without. Pure: each conflict and its action are decided once, in a
new record, and the guard's loop only reads them.
"""

from __future__ import annotations

from collections.abc import Mapping

from bindguard.model.endpoints import Bind
from bindguard.model.kinds import ANY_KIND, Action, ConflictKind, Leaving
from bindguard.model.record import Record, field, replace
from bindguard.verdict.conflicts import Conflict


class Rules(Record, frozen=True):
    """A unit's rules for conflicts, over the defaults."""

    policy: Mapping[str, str] = field(default_factory=dict)  # kind -> action
    # Binds where some conflicts only warn: bind -> (conflict kinds, ANY_KIND for all; why). A guessed
    # address never refuses; a daemon that starts without one of its sockets is not stopped for it.
    warn_only: Mapping[Bind, tuple[tuple[str, ...], str]] = field(default_factory=dict)
    # The daemon's own (not guessed) binds: it starts without some of them, never without all.
    needs_one_of: frozenset[Bind] = frozenset()


class Decision(Record, frozen=True):
    """A conflict and what the guard does about it: refuse, wait, warn or ignore. When the rules
    turned an action into a warning (or kept it, as no address is left), the conflict's last
    evidence line says why."""

    conflict: Conflict
    action: str


# The defaults, stated once: the guard decides by default_action(), `config show` states them by
# stated_default(), both from action_for(). The kinds whose conflicts can clear by themselves
# (verdict.conflicts sets `clears`), and when: None, always (a TIME_WAIT ends by its timer).
_HOLDER_LEAVING = "while its holder is stopping or exiting"
CLEARS_BY_ITSELF: dict[ConflictKind, str | None] = {
    ConflictKind.TIME_WAIT: None,
    ConflictKind.ADDRESS_UNAVAILABLE: "while the address is in duplicate address detection",
    ConflictKind.LISTENER: _HOLDER_LEAVING,
    ConflictKind.BOUND: _HOLDER_LEAVING,
    ConflictKind.SOCKET_UNIT: _HOLDER_LEAVING,
    ConflictKind.OWN_INSTANCE: _HOLDER_LEAVING,
    ConflictKind.ORPHAN: _HOLDER_LEAVING,
}


def action_for(kind: str, blocking: bool = True, clears: bool = False) -> Action:
    """The default action: a conflict that does not block, or a latent socket unit, only warns;
    one that clears by itself is waited for; anything else refuses the start."""
    if kind == ConflictKind.LATENT_SOCKET_UNIT or not blocking:
        return Action.WARN
    return Action.WAIT if clears else Action.REFUSE


def default_action(conflict: Conflict) -> Action:
    return action_for(conflict.kind, conflict.blocking, conflict.clears)


def stated_default(kind: ConflictKind) -> tuple[Action, str | None]:
    """The default of a kind as `config show` states it: the action, as a file would write it
    ("wait" for a TIME_WAIT, "refuse" for an unavailable address), and when the guard does
    otherwise by default ("wait while the address is in duplicate address detection"), or None."""
    if kind not in CLEARS_BY_ITSELF:
        return action_for(kind), None
    when = CLEARS_BY_ITSELF[kind]
    if when is None:
        return action_for(kind, clears=True), None
    return action_for(kind), f"{action_for(kind, clears=True)} {when}"


def fleeting(c: Conflict) -> bool:
    """A refusal that may be another guard's trial socket, not a holder: its holder is a guard,
    or the socket was gone (or had no process left, or only one the kernel is ending) when looked
    at. Trial sockets live for microseconds; a probe again a moment later tells them from holders.
    A guard that has just closed its trial and ended is seen exiting, its command line already
    gone with its memory, and an exiting process's sockets close with it unless another process
    shares them (only the first holder found is read): probed again, not waited for in the start
    budget (none with --wait 0), as a holder stopping by itself would be; the probe again decides."""
    if c.predicted or c.error != "EADDRINUSE" or c.kind == ConflictKind.SELF_CONFLICT:
        return False
    if c.leaving == Leaving.PROCESS_EXITING:
        return True
    if c.clears:
        return False
    if c.process is not None:
        return c.kind == ConflictKind.GUARD_TRIAL
    return c.socket is None or bool(c.socket.inode)


def decide(conflicts: list[Conflict], rules: Rules, held_for: float | None = None) -> tuple[Decision, ...]:
    """Each conflict's action. held_for: how long another guard's trial socket held its address
    through every probe again (bindguard.action.guard), said in the evidence of the refusal."""
    blocked = {c.bind for c in conflicts if c.blocking}
    none_left = bool(rules.needs_one_of) and rules.needs_one_of <= blocked
    decisions = []
    for conflict in conflicts:
        action, why = _action(conflict, rules, none_left)
        lines: tuple[str, ...] = (why,) if why else ()
        if held_for is not None and action == Action.REFUSE and conflict.kind == ConflictKind.GUARD_TRIAL \
                and fleeting(conflict):
            lines += (f"it held {conflict.bind} through every probe again for {held_for:.1f} s",)
        decisions.append(Decision(replace(conflict, evidence=(*conflict.evidence, *lines)) if lines else conflict,
                                  action))
    return tuple(decisions)


def _action(conflict: Conflict, rules: Rules, none_left: bool) -> tuple[str, str]:
    """The action, and why the rules changed or kept it ("" when only the policy spoke)."""
    action = rules.policy.get(conflict.kind) or default_action(conflict)
    kinds, why = rules.warn_only.get(conflict.bind, ((), ""))
    if (conflict.kind in kinds or ANY_KIND in kinds) and action in (Action.REFUSE, Action.WAIT):
        if none_left and conflict.bind in rules.needs_one_of:
            return action, f"{why}, but not without every one: none of its addresses can be bound"
        return Action.WARN, f"{why}: a warning only"
    return action, ""
