"""Unit names and where a unit's bindguard files are: the standard library's os alone.

This is on the path of every start the every-service drop-in guards, so finding that a unit
has nothing to guard must cost a few stat() calls and nothing more.
"""

from __future__ import annotations

import os

DEFAULT_SEARCH_PATH = ("/etc/bindguard", "/run/bindguard", "/usr/lib/bindguard")
SEARCH_PATH_ENV = "BINDGUARD_CONFIG_PATH"
UNIT_SUFFIXES = (".service", ".socket", ".target", ".mount", ".timer", ".path", ".scope", ".slice", ".swap")

# Unit names of Debian's packaged daemons -> the discovery module that knows them. For these,
# discovery (which asks systemd over D-Bus what the unit runs) is worth its price without a file.
UNIT_NAMES = {
    "nginx": "nginx",
    "apache2": "apache",
    "httpd": "apache",
    "haproxy": "haproxy",
    "ssh": "sshd",
    "sshd": "sshd",
    "redis-server": "redis",
    "redis": "redis",
    "postgresql": "postgres",
    "mariadb": "mysql",
    "mysql": "mysql",
    "mysqld": "mysql",
}


def search_path() -> list[str]:
    value = os.environ.get(SEARCH_PATH_ENV)
    if value is None:
        return list(DEFAULT_SEARCH_PATH)
    return [d for d in value.split(":") if d]


def normalize_unit(unit: str) -> str:
    """`nginx` -> `nginx.service`, as systemctl does for a name without a type suffix."""
    if not unit or "/" in unit:
        from bindguard.errors import ConfigError

        raise ConfigError(f"{unit!r} is not a unit name", "write a unit name such as nginx.service")
    return unit if unit.endswith(UNIT_SUFFIXES) else unit + ".service"


def daemon_for_unit_name(unit: str) -> str | None:
    """The daemon a unit runs, judged by its name alone (postgresql@15-main.service -> postgres)."""
    return UNIT_NAMES.get(unit.rsplit(".", 1)[0].split("@", 1)[0])


def _names(unit: str) -> list[str]:
    """The unit's own name and, for an instance foo@bar.service, its template foo@.service."""
    names = [unit]
    prefix, at, rest = unit.partition("@")
    if at and not rest.startswith("."):
        names.append(f"{prefix}@{rest[rest.rfind('.'):]}")
    return names


def _is_file(path: str) -> bool:
    try:
        return os.path.isfile(path)
    except (OSError, ValueError):
        return False


def config_files(unit: str) -> list[str]:
    """The files that make up a unit's configuration, in the order they apply."""
    dirs = search_path()
    main = None
    for name in _names(unit):
        for d in dirs:
            candidate = os.path.join(d, name + ".yaml")
            if os.path.lexists(candidate):
                main = candidate  # a file (even empty, or a link to /dev/null) masks those below
                break
        if main is not None:
            break
    dropins: dict[str, str] = {}
    for name in reversed(_names(unit)):  # the instance's drop-ins mask the template's
        for d in reversed(dirs):  # lower precedence first, so higher ones overwrite
            dropin_dir = os.path.join(d, name + ".yaml.d")
            try:
                entries = os.listdir(dropin_dir)
            except OSError:
                continue
            for entry in entries:
                if entry.endswith(".yaml"):
                    dropins[entry] = os.path.join(dropin_dir, entry)
    files = [main] if main is not None and _is_file(main) else []
    files += [dropins[name] for name in sorted(dropins) if _is_file(dropins[name])]
    return files


def configured_units() -> list[str]:
    """Every unit with a configuration file or drop-in directory in the search path (templates left out)."""
    units: set[str] = set()
    for directory in search_path():
        try:
            entries = os.listdir(directory)
        except OSError:
            continue
        for entry in entries:
            name = entry[: -len(".yaml")] if entry.endswith(".yaml") else entry[: -len(".yaml.d")] \
                if entry.endswith(".yaml.d") else None
            if name and name.endswith(UNIT_SUFFIXES) and not name.split(".")[0].endswith("@"):
                units.add(name)
    return sorted(units)
