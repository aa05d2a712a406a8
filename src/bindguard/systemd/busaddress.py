"""Where the manager's bus is, and whether a socket is there that may be asked: without D-Bus.

A guard with no bus to ask (a refusal from a shell on a host without a system bus, early boot,
a container) learns it here, from a stat(), before bindguard.systemd.bus and pystemd are
imported at all. The errors every D-Bus failure is raised as are here too (bus raises them).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Mapping

import bindguard
from bindguard.systemd.unitfiles import user_manager

SYSTEM = "system"
USER = "user"


class SystemdError(Exception):
    """Any failure to learn something from systemd over D-Bus: the one root callers catch.

    What systemd would have told is evidence about a conflict, never the verdict itself, so a
    caller that catches this keeps the kernel's answer and says what it could not learn.
    """


class SystemdUnavailable(SystemdError):
    """The bus or the manager cannot be reached; the message names the bus and the reason."""


def choose_bus(user: bool | None = None, environ: Mapping[str, str] | None = None) -> str:
    """USER or SYSTEM: --user/--system (True/False) decide, else $MANAGERPID (unitfiles.user_manager)."""
    return bus_for(user_manager(user, environ))


def bus_for(user: bool) -> str:
    """USER for a user manager's bus, else SYSTEM."""
    return USER if user else SYSTEM


def address(bus: str) -> str:
    """The bus's D-Bus address: $DBUS_SESSION_BUS_ADDRESS or $DBUS_SYSTEM_BUS_ADDRESS, else the standard one."""
    if bus == USER:
        runtime = os.environ.get("XDG_RUNTIME_DIR", "$XDG_RUNTIME_DIR")
        return os.environ.get("DBUS_SESSION_BUS_ADDRESS") or f"unix:path={runtime}/bus"
    return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or "unix:path=/run/dbus/system_bus_socket"


def socket_path(bus: str) -> str:
    """The socket file of the bus address's first `unix:path=` entry (its %XX escapes undone)."""
    named = address(bus)
    for entry in named.split(";"):
        transport, _, pairs = entry.partition(":")
        if transport != "unix":
            continue
        for pair in pairs.split(","):
            key, _, value = pair.partition("=")
            if key == "path" and value:
                return _address_unescape(value)
    raise SystemdUnavailable(f"cannot connect to the {bus} bus: its address {shown(named)!r} names no "
                             "unix:path= socket, the only kind bindguard uses")


def shown(text: str) -> str:
    """An address or path from $DBUS_*_BUS_ADDRESS, which a unit's environment sets (a service's user,
    through its EnvironmentFile=), cut for a message: the root guard's notes reach the journal."""
    from bindguard.model.text import shortened  # only for a message: the bus's own path is short

    return shortened(text, SHOWN_CHARS)


SHOWN_CHARS = 200


def _address_unescape(value: str) -> str:
    raw, i = bytearray(), 0
    data = value.encode("utf-8", "surrogateescape")
    while i < len(data):
        if data[i] == ord("%") and i + 3 <= len(data):
            try:
                raw.append(int(data[i + 1:i + 3], 16))
                i += 3
                continue
            except ValueError:
                pass
        raw.append(data[i])
        i += 1
    return os.fsdecode(bytes(raw))


def check_socket(bus: str, path: str) -> str:
    """The bus socket's path with its symlinks resolved, which is what must be connected to. It
    must be a socket, and it and every directory above it must belong to root or to this user with
    no one else able to write them (bindguard.resolve_trusted): a socket someone else made, or a
    link or directory of theirs on the way to it (named by an environment a service's user wrote),
    would let them answer for systemd."""
    try:
        real, why = bindguard.resolve_trusted(path, (bindguard.ROOT, os.geteuid()))
        mode = os.lstat(real).st_mode
    except ValueError:  # a NUL: %00 in the address
        raise SystemdUnavailable(f"cannot connect to the {bus} bus: {shown(path)!r} is no path") from None
    except OSError as exc:
        raise SystemdUnavailable(f"cannot connect to the {bus} bus: no socket at {shown(path)}"
                                 + ("" if exc.errno == errno.ENOENT else f" ({exc.strerror})")) from None
    if why:
        raise SystemdUnavailable(f"cannot connect to the {bus} bus: {shown(path)} is not trusted: {shown(why)}")
    if not stat.S_ISSOCK(mode):
        raise SystemdUnavailable(f"cannot connect to the {bus} bus: {shown(path)} is not a socket")
    return real
