"""A service's ExecStart=, Environment= and EnvironmentFile= read from its unit files, without D-Bus.

For the guard that a top-level drop-in (service.d/bindguard.conf) runs before every service:
a unit with nothing to guard must cost no D-Bus round trip, so its command line is read from the
files the manager loaded it from. Lookup as systemd does it: the unit search path in order of
precedence, the first fragment found (a symlink is followed: aliases), an instance reads its
template's fragment; drop-ins NAME.d/*.conf of the unit, its template, its prefixes (foo-.service.d
for foo-bar.service) and the type (service.d), a file name in a higher directory masking the same
name below, applied in lexical order; an empty assignment resets a list. Specifiers %n %N %p %P
%i %I %j %J %f and the fixed directories (%t %S %C %L %E %T %V %h) are resolved.

Socket units are not read here (whether one is running needs the manager): socket_listens is empty.
When the manager's view matters, use discover.unit.unit_facts_from() over D-Bus instead.
"""

from __future__ import annotations

import os
import re
import shlex

from bindguard.discover import UnitFacts

SYSTEM_UNIT_PATH = (
    "/etc/systemd/system.control", "/run/systemd/system.control", "/run/systemd/transient",
    "/run/systemd/generator.early", "/etc/systemd/system", "/etc/systemd/system.attached",
    "/run/systemd/system", "/run/systemd/system.attached", "/run/systemd/generator",
    "/usr/local/lib/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system",
    "/run/systemd/generator.late",
)
LIST_KEYS = ("ExecStart", "Environment", "EnvironmentFile")


def user_unit_path(environ: dict[str, str] | None = None) -> tuple[str, ...]:
    env = os.environ if environ is None else environ
    home = env.get("HOME", "/root")
    config = env.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    runtime = env.get("XDG_RUNTIME_DIR", "")
    dirs = [os.path.join(config, "systemd", "user.control")]
    if runtime:
        dirs += [os.path.join(runtime, "systemd", d) for d in ("user.control", "transient", "generator.early")]
    dirs += [os.path.join(config, "systemd", "user"), "/etc/systemd/user"]
    if runtime:
        dirs += [os.path.join(runtime, "systemd", "user"), os.path.join(runtime, "systemd", "generator")]
    dirs += [os.path.join(env.get("XDG_DATA_HOME") or os.path.join(home, ".local", "share"), "systemd", "user"),
             "/usr/local/lib/systemd/user", "/usr/lib/systemd/user", "/lib/systemd/user"]
    if runtime:
        dirs.append(os.path.join(runtime, "systemd", "generator.late"))
    return tuple(dirs)


def _unit_path() -> tuple[str, ...]:
    override = os.environ.get("SYSTEMD_UNIT_PATH")
    if override:
        return tuple(d for d in override.split(":") if d)
    return SYSTEM_UNIT_PATH


def _template_of(name: str) -> str | None:
    prefix, at, rest = name.partition("@")
    if not at or rest.startswith("."):
        return None
    return f"{prefix}@{rest[rest.rfind('.'):]}"


def _unescape(text: str) -> str:
    text = text.replace("-", "/")
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), text)


def _specifiers(unit: str, fragment: str | None, user: bool) -> dict[str, str]:
    name, _, suffix = unit.rpartition(".")
    prefix, at, instance = name.partition("@")
    runtime = os.environ.get("XDG_RUNTIME_DIR", "/run") if user else "/run"
    return {
        "n": unit, "N": name, "p": prefix, "P": _unescape(prefix), "i": instance, "I": _unescape(instance),
        "j": prefix.rsplit("-", 1)[-1], "J": _unescape(prefix.rsplit("-", 1)[-1]),
        "f": "/" + _unescape(instance if at else name), "t": runtime, "S": "/var/lib", "C": "/var/cache",
        "L": "/var/log", "E": "/etc", "T": "/tmp", "V": "/var/tmp", "h": os.path.expanduser("~") if user else "/root",
        "%": "%",
    }


def _resolve(text: str, specifiers: dict[str, str]) -> str:
    return re.sub(r"%(.)", lambda m: specifiers.get(m.group(1), m.group(0)), text)


def _find_fragment(names: list[str], dirs: tuple[str, ...]) -> tuple[str | None, list[str]]:
    """The fragment path, and every name the unit is known by (its aliases through symlinks)."""
    known = list(names)
    for name in names:
        for d in dirs:
            path = os.path.join(d, name)
            if not os.path.lexists(path):
                continue
            target = os.path.realpath(path)
            if target == "/dev/null":
                return None, known  # masked
            alias = os.path.basename(target)
            if alias != name and alias not in known:
                known.append(alias)
            return (target if os.path.isfile(target) else None), known
    return None, known


def _dropin_dir_names(names: list[str]) -> list[str]:
    """Drop-in directories, lowest precedence first: the type, each dash prefix, then the names."""
    result: list[str] = []
    for name in names:
        stem, _, suffix = name.rpartition(".")
        parts = stem.split("-")
        prefixes = [f"{suffix}.d"] + [f"{'-'.join(parts[:i])}-.{suffix}.d" for i in range(1, len(parts))]
        for directory in prefixes + [f"{name}.d"]:
            if directory not in result:
                result.append(directory)
    return result


def _dropins(names: list[str], dirs: tuple[str, ...]) -> list[str]:
    chosen: dict[str, str] = {}
    for dropin_dir in _dropin_dir_names(names):
        for d in reversed(dirs):
            try:
                entries = os.listdir(os.path.join(d, dropin_dir))
            except OSError:
                continue
            for entry in entries:
                if entry.endswith(".conf"):
                    chosen[entry] = os.path.join(d, dropin_dir, entry)
    return [chosen[entry] for entry in sorted(chosen) if os.path.isfile(chosen[entry])]


def _assignments(path: str):
    """(key, value) of the [Service] section, with continuation lines joined."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return
    section, pending = None, ""
    for raw in lines:
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        if section == "Service" and "=" in line:
            key, _, value = line.partition("=")
            yield key.strip(), value.strip()


def _split(value: str) -> list[str]:
    try:
        return shlex.split(value)
    except ValueError:
        return value.split()


def _exec_argv(value: str) -> list[str]:
    words = _split(value)
    if not words:
        return []
    first = words[0]
    prefixes = first[:len(first) - len(first.lstrip("-@:+!"))]
    words[0] = first[len(prefixes):]
    if "@" in prefixes and len(words) >= 2:
        words = [words[0]] + words[2:]  # the second word is only argv[0]'s name
    return words


def unit_fragment(unit: str, user: bool = False) -> str | None:
    """The file a unit is loaded from (following aliases; an instance's template), or None."""
    dirs = user_unit_path() if user else _unit_path()
    return _find_fragment([unit] + ([t] if (t := _template_of(unit)) else []), dirs)[0]


def unit_facts_from_files(unit: str, user: bool = False) -> UnitFacts:
    """UnitFacts of a service from its unit files; empty when the unit has no fragment (or is masked)."""
    dirs = user_unit_path() if user else _unit_path()
    names = [unit] + ([t] if (t := _template_of(unit)) else [])
    fragment, known = _find_fragment(names, dirs)
    values: dict[str, list[str]] = {key: [] for key in LIST_KEYS}
    if fragment is None:
        return UnitFacts()
    specifiers = _specifiers(unit, fragment, user)
    for path in [fragment] + _dropins(known, dirs):
        for key, value in _assignments(path):
            if key not in values:
                continue
            if not value:
                values[key] = []
            elif key == "Environment":
                values[key] += _split(_resolve(value, specifiers))
            else:
                values[key].append(_resolve(value, specifiers))
    return UnitFacts(
        exec_start=[argv for argv in (_exec_argv(v) for v in values["ExecStart"]) if argv],
        environment=values["Environment"],
        environment_files=values["EnvironmentFile"],
    )
