"""The guard's vocabulary: conflict kinds, the actions a policy may name, and where a holder's
unit comes from. Bare strings for now (they are the JSON's values); no I/O, no imports."""

LISTENER = "listener"
BOUND_KIND = "bound"
TIME_WAIT = "time-wait"
ADDRESS_UNAVAILABLE = "address-unavailable"
SELF_CONFLICT = "self-conflict"
SOCKET_UNIT = "socket-unit"
LATENT_SOCKET_UNIT = "latent-socket-unit"
OWN_INSTANCE = "own-instance"
ORPHAN = "orphan"
PERMISSION_DENIED = "permission-denied"
GUARD_TRIAL = "guard-trial"

KINDS = (
    LISTENER,
    BOUND_KIND,
    TIME_WAIT,
    ADDRESS_UNAVAILABLE,
    SELF_CONFLICT,
    SOCKET_UNIT,
    LATENT_SOCKET_UNIT,
    OWN_INSTANCE,
    ORPHAN,
    PERMISSION_DENIED,
    GUARD_TRIAL,
)

# Why a holder is already leaving (a conflict's `leaving`, the JSON's too): its unit is stopping (ExecStop=
# or TimeoutStopSec= still running, as the manager says), or the kernel is ending its process. Such a
# conflict clears by itself, as a TIME_WAIT does: the guard waits for it within the start budget.
UNIT_DEACTIVATING, PROCESS_EXITING = "unit-deactivating", "process-exiting"

# Every conflict kind, where a rule names the kinds that only warn on an address (an optional one).
ANY_KIND = "*"

# What the guard may do about a conflict (a unit's YAML `policy` names them per kind).
REFUSE, WAIT, WARN, IGNORE = "refuse", "wait", "warn", "ignore"
ACTIONS = (REFUSE, WAIT, WARN, IGNORE)

# Where a conflict's `unit` comes from (the JSON `unit_status`): the manager's word (GetUnitByPID, or
# its socket unit), the name the holder's cgroup path bears when no bus answered (unconfirmed), the
# manager's word that the holder is in no unit, or nothing known (no bus, and the path names no unit).
UNIT_BY_MANAGER, UNIT_BY_CGROUP, NO_UNIT, UNIT_UNKNOWN = "manager", "cgroup", "no-unit", "unknown"
UNIT_STATUSES = (UNIT_BY_MANAGER, UNIT_BY_CGROUP, NO_UNIT, UNIT_UNKNOWN)

# A NAT rule (DNAT, REDIRECT) takes the address's traffic elsewhere: the bind succeeds, its clients
# reach something else. Not a bind conflict: `explain` and `scan` report it always; `check` only when
# the unit's YAML sets `nat:` to one of NAT_MODES (a `policy` cannot name it).
NAT_SHADOWED = "nat-shadowed"
NAT_MODES = (WARN, REFUSE)
