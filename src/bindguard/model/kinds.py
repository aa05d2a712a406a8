"""The vocabulary: the guard's conflict kinds, why a holder is leaving, the actions, where a holder's
unit comes from, scan's finding kinds and claim sources, verify's kinds and discovery's confidence. Each value is the
string the JSON carries (a StrEnum member is that str); no I/O.

Not on the guard's fast path (cli/fastpath.py), which must not pay for `enum`."""

import enum
from collections.abc import Collection


class ConflictKind(enum.StrEnum):
    """What is in the way of one requested socket (check's and explain's `kind`)."""

    LISTENER = "listener"
    BOUND = "bound"
    TIME_WAIT = "time-wait"
    ADDRESS_UNAVAILABLE = "address-unavailable"
    SELF_CONFLICT = "self-conflict"
    SOCKET_UNIT = "socket-unit"
    LATENT_SOCKET_UNIT = "latent-socket-unit"
    OWN_INSTANCE = "own-instance"
    ORPHAN = "orphan"
    PERMISSION_DENIED = "permission-denied"
    GUARD_TRIAL = "guard-trial"
    # A NAT rule (DNAT, REDIRECT) takes the address's traffic elsewhere: the bind succeeds, its clients
    # reach something else. Not a bind conflict: `explain` and `scan` report it always; `check` only
    # when the unit's YAML sets `nat:` to one of NAT_MODES (a `policy` cannot name it).
    NAT_SHADOWED = "nat-shadowed"


# The kinds a unit's YAML `policy` may name.
POLICY_KINDS = tuple(kind for kind in ConflictKind if kind != ConflictKind.NAT_SHADOWED)


class Leaving(enum.StrEnum):
    """Why a holder is already leaving (a conflict's `leaving`, the JSON's too): its unit is stopping
    (ExecStop= or TimeoutStopSec= still running, as the manager says), or the kernel is ending its
    process. Such a conflict clears by itself, as a TIME_WAIT does: the guard waits for it within the
    start budget."""

    UNIT_DEACTIVATING = "unit-deactivating"
    PROCESS_EXITING = "process-exiting"


# Every conflict kind, where a rule names the kinds that only warn on an address (an optional one).
ANY_KIND = "*"


class Action(enum.StrEnum):
    """What the guard may do about a conflict (a unit's YAML `policy` names them per kind)."""

    REFUSE = "refuse"
    WAIT = "wait"
    WARN = "warn"
    IGNORE = "ignore"


# What `nat:` in a unit's YAML may make check do about a nat-shadowed address.
NAT_MODES = (Action.WARN, Action.REFUSE)


class UnitStatus(enum.StrEnum):
    """Where a holder's `unit` comes from (the JSON `unit_status`): the manager's word (GetUnitByPID,
    or its socket unit), the name the holder's cgroup path bears when no bus answered (unconfirmed),
    the manager's word that the holder is in no unit, or nothing known (no bus, and the path names
    no unit)."""

    BY_MANAGER = "manager"
    BY_CGROUP = "cgroup"
    NO_UNIT = "no-unit"
    UNKNOWN = "unknown"


class FindingKind(enum.StrEnum):
    """What scan finds needs attention on a host."""

    UNIT_COLLISION = "unit-collision"
    SOCKET_UNIT_COLLISION = "socket-unit-collision"
    UNCLAIMED_LISTENER = "unclaimed-listener"
    EPHEMERAL_PORT = "ephemeral-port"
    RESTART_LOOP = "restart-loop"
    CONFIG_ERROR = "config-error"
    NAT_SHADOWED = "nat-shadowed"  # an address a unit binds whose connections a NAT rule takes elsewhere


# Scan's findings that are two units colliding on an address (JSON counts' `conflicts`, the metric's
# kinds); not the guard's ConflictKind.
COLLISION_KINDS = (FindingKind.UNIT_COLLISION, FindingKind.SOCKET_UNIT_COLLISION)


class ClaimSource(enum.StrEnum):
    """Where scan knows that a unit binds an address from."""

    CONFIG = "config"  # its bindguard file
    DISCOVERED = "discovered"  # its daemon's configuration
    SOCKET_UNIT = "socket-unit"  # a .socket unit's Listen*=
    LISTENING = "listening"  # sock_diag: it listens now


class VerifyKind(enum.StrEnum):
    """What verify finds wrong with one address."""

    NOT_LISTENING = "not-listening"
    WRONG_ADDRESS = "wrong-address"
    SHARED = "shared"
    FOREIGN_OWNER = "foreign-owner"


class Confidence(enum.StrEnum):
    """How sure discovery is of an address: read from the daemon's own configuration or a .socket
    unit, or guessed from common option forms."""

    CONFIDENT = "confident"
    GUESS = "guess"


# Where discovery learns a unit's addresses, in the order it asks them (a YAML file's `discovery:`
# names a subset; a remembered discovery is one made with all of them).
DISCOVERY_SOURCES = ("daemon-config", "exec-start", "socket-units")


def ordered_sources(chosen: Collection[str]) -> list[str]:
    """The chosen discovery sources (a config's set of them) in the order discovery asks them."""
    return [s for s in DISCOVERY_SOURCES if s in chosen]
