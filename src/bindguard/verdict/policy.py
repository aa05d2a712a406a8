"""What the guard does about a conflict when a unit's policy names no action for its kind. Pure."""

from __future__ import annotations

from bindguard.model.kinds import LATENT_SOCKET_UNIT, REFUSE, WAIT, WARN
from bindguard.verdict.conflicts import Conflict


def default_action(conflict: Conflict) -> str:
    if conflict.kind == LATENT_SOCKET_UNIT or not conflict.blocking:
        return WARN
    return WAIT if conflict.clears else REFUSE
