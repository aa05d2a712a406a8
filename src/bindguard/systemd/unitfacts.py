"""A service's ExecStart=, Environment=, EnvironmentFile=, User= and Group= as discovery's
UnitFacts, from its unit files (bindguard.systemd.unitexec finds them, os only), without D-Bus.

Here the values are split as systemd splits them (quotes, the -@:+! prefixes of ExecStart=, `@`
naming argv[0]) and specifiers are resolved: %n %N %p %P %i %I %j %J %f %% and the fixed
directories %t %S %C %L %E %T %V %h. A service's socket units are not read (whether one is running
needs the manager): socket_listens stays empty; `bindguard discover UNIT` asks D-Bus for those.
A .socket unit's own Listen*= entries and socket options are (socket_unit_from_files): its guard
checks them before the manager binds them.
"""

from __future__ import annotations

import os
import re

from bindguard.model.facts import SocketUnitSettings, UnitFacts
from bindguard.systemd.unitexec import (
    LIST_KEYS,
    SOCKET_LISTEN_KEYS,
    exec_argv,
    parse_boolean,
    socket_unit_settings,
    split_words,
    unit_files,
    unit_settings,
)


def _unescape(text: str) -> str:
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), text.replace("-", "/"))


def _specifiers(unit: str, user: bool) -> dict[str, str]:
    name = unit.rpartition(".")[0]
    prefix, at, instance = name.partition("@")
    last = prefix.rsplit("-", 1)[-1]
    return {
        "n": unit, "N": name, "p": prefix, "P": _unescape(prefix), "i": instance, "I": _unescape(instance),
        "j": last, "J": _unescape(last), "f": "/" + _unescape(instance if at else name),
        "t": os.environ.get("XDG_RUNTIME_DIR", "/run") if user else "/run", "S": "/var/lib", "C": "/var/cache",
        "L": "/var/log", "E": "/etc", "T": "/tmp", "V": "/var/tmp", "h": os.path.expanduser("~") if user else "/root",
        "%": "%",
    }


def _resolve(text: str, specifiers: dict[str, str]) -> str:
    return re.sub(r"%(.)", lambda m: specifiers.get(m.group(1), m.group(0)), text)


def unit_fragment(unit: str, user: bool = False) -> str | None:
    """The file a unit is loaded from (following aliases; an instance's template), or None."""
    files = unit_files(unit, user)
    return files[0] if files else None


def unit_facts_from_files(unit: str, user: bool = False) -> UnitFacts:
    """UnitFacts of a service from its unit files; empty when it has no fragment (or is masked)."""
    settings = unit_settings(unit, user, keys=LIST_KEYS + ("User", "Group"))
    specifiers = _specifiers(unit, user)
    resolved = {key: [_resolve(v, specifiers) for v in values] for key, values in settings.items()}
    return UnitFacts(
        exec_start=[argv for argv in (exec_argv(split_words(value)) for value in resolved["ExecStart"]) if argv],
        environment=[word for value in resolved["Environment"] for word in split_words(value)],
        environment_files=resolved["EnvironmentFile"],
        user=resolved["User"][-1] if resolved["User"] else "",
        group=resolved["Group"][-1] if resolved["Group"] else "",
    )


def socket_unit_from_files(unit: str, user: bool = False) -> SocketUnitSettings | None:
    """A .socket unit's Listen*= entries (specifiers resolved) and the settings that change the
    kernel's answer to its bind(), from its unit files; None when it has no fragment (or is masked).
    A setting systemd would reject as written is left at its default, as systemd does."""
    if unit_fragment(unit, user) is None:
        return None
    settings = socket_unit_settings(unit, user)
    specifiers = _specifiers(unit, user)

    def last(key: str) -> str:
        return _resolve(settings[key][-1], specifiers) if settings[key] else ""

    def flag(key: str) -> bool:
        return bool(parse_boolean(last(key)))

    return SocketUnitSettings(
        listens=tuple((key.removeprefix("Listen"), _resolve(value, specifiers))
                      for key in SOCKET_LISTEN_KEYS for value in settings[key]),
        reuse_port=flag("ReusePort"),
        bind_ipv6_only=last("BindIPv6Only") if last("BindIPv6Only") in ("both", "ipv6-only") else "default",
        free_bind=flag("FreeBind"),
        transparent=flag("Transparent"),
        bind_to_device=last("BindToDevice"),
        protocol=last("SocketProtocol").lower(),
    )

