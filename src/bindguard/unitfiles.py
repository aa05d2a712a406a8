"""Unit names, a process's unit from its cgroup, and where a unit's bindguard files are: os alone.

This is on the path of every start the every-service drop-in guards, so finding that a unit
has nothing to guard must cost a few stat() calls and nothing more.
"""

from __future__ import annotations

import os

DEFAULT_SEARCH_PATH = ("/etc/bindguard", "/run/bindguard", "/usr/lib/bindguard")
SEARCH_PATH_ENV = "BINDGUARD_CONFIG_PATH"
UNIT_SUFFIXES = (".service", ".socket", ".target", ".mount", ".timer", ".path", ".scope", ".slice", ".swap")
PROCESS_UNIT_SUFFIXES = (".service", ".scope", ".socket", ".mount", ".swap")  # units whose cgroup holds processes

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


def user_manager(choice: bool | None = None, environ=None) -> bool:
    """Whether to talk to a user manager: --user/--system (True/False) decide; otherwise
    $MANAGERPID, which a manager sets for what it starts, other than 1 means a user manager."""
    if choice is not None:
        return choice
    manager = (os.environ if environ is None else environ).get("MANAGERPID", "")
    return manager.isdigit() and int(manager) != 1


def manager_pid_from_env(user: bool, environ=None) -> int | None:
    """The manager's PID without asking D-Bus: 1 for the system manager, $MANAGERPID for a user
    manager; None when nothing tells."""
    if not user:
        return 1
    manager = (os.environ if environ is None else environ).get("MANAGERPID", "")
    return int(manager) if manager.isdigit() else None


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


def process_cgroup(pid: int | str) -> str | None:
    """The cgroup path systemd tracks the process by, from /proc/PID/cgroup.

    The unified (cgroup2, `0::`) line when it names a unit, else the name=systemd (cgroup v1)
    line: on legacy and hybrid hosts a manager may track its units in the v1 hierarchy while
    the `0::` line stays elsewhere. None if the process is gone.
    """
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            return cgroup_from_proc_file(f.read())
    except OSError:
        return None


def cgroup_from_proc_file(text: str) -> str | None:
    """The path process_cgroup() picks from the text of a /proc/PID/cgroup file."""
    unified = systemd_v1 = None
    for line in text.splitlines():
        if line.count(":") < 2:
            continue
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and controllers == "":
            unified = path
        elif controllers == "name=systemd":
            systemd_v1 = path
    if unified is not None and (unit_from_cgroup(unified) or systemd_v1 in (None, "/")):
        return unified
    return systemd_v1 if systemd_v1 is not None else unified


def unit_from_cgroup(path: str) -> str | None:
    """The systemd unit a cgroup path names: its innermost component that is a unit holding processes.

    /system.slice/nginx.service -> nginx.service; /system.slice/foo.service/payload ->
    foo.service; /user.slice/user-1000.slice/user@1000.service/app.slice/web.service ->
    web.service (a unit of the user manager); /init.scope -> init.scope (PID 1). Slices
    hold no processes of their own: /system.slice -> None. systemd's cgroup escaping (a
    leading "_") is undone.
    """
    for component in reversed(path.split("/")):
        name = component[1:] if component.startswith("_") else component
        for suffix in PROCESS_UNIT_SUFFIXES:
            if name.endswith(suffix) and len(name) > len(suffix):
                return name
    return None
