"""A service's [Service] settings from its unit files, with posix alone.

On the path of every start the every-service drop-in guards: whether a unit runs a daemon that
discovery knows is answered from its unit files, with no D-Bus round trip and no import beyond
posix (not even os: see bindguard.environment).
Lookup as systemd does it: the unit search path in order of precedence, the first fragment found
(a symlink is followed: aliases, /dev/null masks), an instance falls back to its template;
drop-ins NAME.d/*.conf of the type (service.d), of each dash prefix (foo-.service.d for
foo-bar.service), of the template and of the unit and its aliases, a file name in a higher
directory masking the same name below, applied in lexical order of file name; an empty
assignment resets a list. Specifiers and quoting are left to bindguard.systemd.unitfacts.
"""

import _stat
import posix

import bindguard
from bindguard.systemd.unitfiles import (
    environment_dirs,
    is_template,
    isfile,
    join,
    lexists,
    process_environment,
    proof_of,
    proven_user_manager,
    trusted_dirs,
    with_template,
)

SYSTEM_UNIT_PATH = (
    "/etc/systemd/system.control", "/run/systemd/system.control", "/run/systemd/transient",
    "/run/systemd/generator.early", "/etc/systemd/system", "/etc/systemd/system.attached",
    "/run/systemd/system", "/run/systemd/system.attached", "/run/systemd/generator",
    "/usr/local/lib/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system",
    "/run/systemd/generator.late",
)
LIST_KEYS = ("ExecStart", "Environment", "EnvironmentFile")

# The daemons discovery knows, in one table (here, not in bindguard.model: the every-service
# drop-in's path reads it, and this module is the one that path loads anyway). By unit name,
# discovery (which asks systemd over D-Bus what the unit runs) is worth its price without a
# bindguard file; by binary, discovery picks the module that reads the daemon's configuration.
# discovery module: (unit names, without the .service or @instance; ExecStart= binary names)
KNOWN_DAEMONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "nginx": (("nginx",), ("nginx",)),
    "apache": (("apache2", "httpd"), ("apache2", "apachectl", "apache2ctl", "httpd")),
    "haproxy": (("haproxy",), ("haproxy",)),
    "sshd": (("ssh", "sshd"), ("sshd",)),
    "redis": (("redis-server", "redis"), ("redis-server",)),
    "postgres": (("postgresql",), ("postgres", "postmaster", "pg_ctl", "pg_ctlcluster")),
    "mysql": (("mariadb", "mysql", "mysqld"), ("mariadbd", "mysqld", "mysqld_safe", "mariadbd-safe")),
}

# ExecStart= binary name -> the discovery module that knows the daemon.
DAEMONS = {binary: module for module, (_, binaries) in KNOWN_DAEMONS.items() for binary in binaries}
# Unit name (postgresql of postgresql@15-main.service) -> the discovery module.
UNIT_NAMES = {name: module for module, (names, _) in KNOWN_DAEMONS.items() for name in names}
# Shells whose `-c` script discovery reads as the commands it runs.
SHELLS = ("sh", "bash", "dash", "zsh")



def user_unit_path(environ=None) -> tuple[str, ...]:
    """A user manager's unit search path, in systemd 252's order (systemd.unit(5), "User Unit Search
    Path"; `systemd-analyze --user unit-paths` prints the same), each directory once.

    With environ, from it. Otherwise from the guard's own environment, which a user manager's
    service inherits from it; but the root guard's environment is the unit's (`ExecStartPre=+`),
    so as root it is taken from the proven user manager's own environment (/proc/PID/environ: what
    its search path was made from), and where no manager is proven (`--user` alone) the
    directories $HOME and $XDG_* name are kept only when root alone can change them (trusted_dirs).
    """
    if environ is not None:
        return _search_path(environ)
    environ = bindguard.environment()
    if posix.geteuid() != bindguard.ROOT:
        return _search_path(environ)
    claim = environ.get("MANAGERPID", "")
    if claim not in _proven_managers_path:
        manager = proven_user_manager()  # the guard's own claim: proven once, shared with the bus's choice
        managers = process_environment(manager) if manager is not None else None
        # Read from the process the claim names now, which the proof above may predate (a run
        # makes the path again at each recorded discovery): proven again after the read, or the
        # PID could be another process's by then, and the path made from its environment.
        if managers is not None and proof_of(claim) != manager:
            managers = None
        _proven_managers_path[claim] = _search_path(managers) if managers is not None else None
    return _proven_managers_path[claim] or _search_path(environ, trusted_only=True)


# The search path of a proven user manager by the $MANAGERPID that named it (None: none proven):
# each unit file a run reads asks for it, and making it reads the manager's /proc/PID/environ.
# The path made from directories that must exist to be trusted is not kept.
# look_at_directories_again() forgets it.
_proven_managers_path: dict[str, tuple[str, ...] | None] = {}


def _search_path(environ, trusted_only: bool = False) -> tuple[str, ...]:
    named = _user_dirs_from_environment(environ)
    if trusted_only:
        named = {key: trusted_dirs(dirs) for key, dirs in named.items()}
    dirs = [*named["control"], *named["config"], "/etc/systemd/user", *named["runtime"], "/run/systemd/user",
            *named["generator"], *named["data"], "/usr/local/lib/systemd/user", "/usr/local/share/systemd/user",
            "/usr/lib/systemd/user", "/usr/share/systemd/user", *named["late"]]
    return tuple(dict.fromkeys(dirs))


def _user_dirs_from_environment(env) -> dict[str, list[str]]:
    """The user search path's directories that $HOME, $XDG_CONFIG_HOME, $XDG_CONFIG_DIRS,
    $XDG_RUNTIME_DIR, $XDG_DATA_HOME and $XDG_DATA_DIRS name, by their place in it."""
    home = env.get("HOME", "/root")
    config = env.get("XDG_CONFIG_HOME") or join(home, ".config")
    data = env.get("XDG_DATA_HOME") or join(home, ".local", "share")
    runtime = env.get("XDG_RUNTIME_DIR", "")
    in_runtime = (lambda *names: [join(runtime, "systemd", n) for n in names]) if runtime else (lambda *n: [])

    def listed(key: str, default: str) -> list[str]:  # an unset list is the default; an empty one is empty
        return [join(d, "systemd", "user") for d in env.get(key, default).split(":") if d.startswith("/")]

    return {
        "control": [join(config, "systemd", "user.control"),
                    *in_runtime("user.control", "transient", "generator.early")],
        "config": [join(config, "systemd", "user"), *listed("XDG_CONFIG_DIRS", "/etc/xdg")],
        "runtime": in_runtime("user"),
        "generator": in_runtime("generator"),
        "data": [join(data, "systemd", "user"), *listed("XDG_DATA_DIRS", "/usr/local/share:/usr/share")],
        "late": in_runtime("generator.late"),
    }


def unit_path(user: bool = False) -> tuple[str, ...]:
    """$SYSTEMD_UNIT_PATH (colon-separated, as systemd honours it; only directories root or the
    guard's user owns and no one else can write) or the manager's standard path."""
    override = bindguard.environment().get("SYSTEMD_UNIT_PATH")
    if override:
        return tuple(environment_dirs(override))
    return user_unit_path() if user else SYSTEM_UNIT_PATH


# Unit directory -> (its device and inode, None when missing; when that was seen: time.monotonic()).
_present: dict[str, tuple[tuple[int, int] | None, float]] = {}
PRESENT_FOR = 1.0  # seconds: a guard that waits sees a directory that appears in the meantime


def _present_dirs(dirs: tuple[str, ...]) -> tuple[str, ...]:
    """The directories of a unit search path that exist, in their order, each once (Debian's
    /lib/systemd/system is /usr/lib/systemd/system, through the /lib link). Reading a unit probes
    a dozen names in each directory of the path, and the clear path inside a unit reads every
    enabled socket unit; on most hosts half the path's directories are missing. lstat, not stat:
    what a remembered discovery (bindguard.request.cache) must key on is that the directory is
    there, not its every entry (the probes inside it are recorded themselves)."""
    import time  # built in, loaded at start

    now = time.monotonic()
    present, identities = [], set()
    for directory in dirs:
        seen = _present.get(directory)
        if seen is None or now - seen[1] > PRESENT_FOR:
            try:
                info = posix.lstat(directory)
                seen = ((info.st_dev, info.st_ino), now)
            except (OSError, ValueError):
                seen = (None, now)
            _present[directory] = seen
        if seen[0] is not None and seen[0] not in identities:
            identities.add(seen[0])
            present.append(directory)
    return tuple(present)


def look_at_directories_again() -> None:
    """Forget which unit directories exist, and the user managers' search paths: a discovery being
    remembered must make every look itself."""
    _present.clear()
    _proven_managers_path.clear()


def _find_fragment(names: list[str], dirs: tuple[str, ...]) -> tuple[str | None, list[str]]:
    """The fragment path, and every name the unit is known by (its aliases through symlinks)."""
    known = list(names)
    for name in names:
        for d in dirs:
            path = join(d, name)
            if not lexists(path):
                continue
            target = _resolved(path)
            if target == "/dev/null":
                return None, known
            alias = target.rpartition("/")[2]
            if alias not in known:
                known.append(alias)
            return (target if isfile(target) else None), known
    return None, known


def _resolved(path: str) -> str:
    """A unit file found in the search path, where it leads: a file that is no symlink is taken
    where it was found; a link (an alias, a mask, a linked unit) as os.path.realpath resolves it
    (bindguard.real_path, not strict, without loading os)."""
    try:
        if not _stat.S_ISLNK(posix.lstat(path).st_mode):
            return path
    except (OSError, ValueError):
        return path
    return bindguard.real_path(path, strict=False)


def _basename(path: str) -> str:
    """os.path.basename."""
    return path.rpartition("/")[2]


def _dropin_dir_names(names: list[str]) -> list[str]:
    """Drop-in directory names, lowest precedence first: the type, each dash prefix, then the names."""
    result: list[str] = []
    for name in names:
        stem, _, suffix = name.rpartition(".")
        parts = stem.split("-")
        for directory in [f"{suffix}.d"] + [f"{'-'.join(parts[:i])}-.{suffix}.d" for i in range(1, len(parts))] \
                + [f"{name}.d"]:
            if directory not in result:
                result.append(directory)
    return result


def unit_files(unit: str, user: bool = False) -> list[str]:
    """The fragment and its drop-ins, in the order they apply; empty for no unit (or a masked one)."""
    dirs = _present_dirs(unit_path(user))
    names = with_template(unit)
    fragment, known = _find_fragment(names, dirs)
    if fragment is None:
        return []
    ordered = [n for n in known if n != unit] + [unit]  # the template's drop-ins first
    chosen: dict[str, str] = {}
    for dropin_dir in _dropin_dir_names(ordered):
        for d in reversed(dirs):
            try:
                entries = posix.listdir(join(d, dropin_dir))
            except OSError:
                continue
            for entry in entries:
                if entry.endswith(".conf"):
                    chosen[entry] = join(d, dropin_dir, entry)
    return [fragment] + [chosen[e] for e in sorted(chosen) if isfile(chosen[e])]


UNIT_FILE_MAX = 1 << 20  # bytes of one unit file, as for every file bindguard reads (README, "What it reads")


def _unit_file_text(path: str) -> str | None:
    """A unit file's text when it is a regular file of at most UNIT_FILE_MAX bytes, else None.
    A user manager's unit directories are its user's: what is at the path may be a FIFO, or a
    link to a device whose open() acts (a watchdog). As request.files reads (which this stage may
    not import, and which loads os): O_PATH first, which opens nothing, then that same inode."""
    try:
        handle = posix.open(path, posix.O_PATH | posix.O_CLOEXEC)
    except (OSError, ValueError):
        return None
    try:
        info = posix.fstat(handle)
        if not _stat.S_ISREG(info.st_mode) or info.st_size > UNIT_FILE_MAX:
            return None
        fd = posix.open(f"/proc/self/fd/{handle}", posix.O_RDONLY | posix.O_NONBLOCK | posix.O_NOCTTY | posix.O_CLOEXEC)
    except OSError:
        return None
    finally:
        posix.close(handle)
    try:
        data = b""
        while len(data) <= UNIT_FILE_MAX:
            chunk = posix.read(fd, 1 << 16)
            if not chunk:
                break
            data += chunk
    except OSError:
        return None
    finally:
        posix.close(fd)
    return None if len(data) > UNIT_FILE_MAX else data.decode("utf-8", "replace")


def _assignments(path: str, section_wanted: str = "Service"):
    """(key, value) in one section, continuation lines joined."""
    text = _unit_file_text(path)
    if text is None:
        return
    lines = text.splitlines()
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
        elif section == section_wanted and "=" in line:
            key, _, value = line.partition("=")
            yield key.strip(), value.strip()


def unit_settings(unit: str, user: bool = False, section: str = "Service",
                  keys: tuple[str, ...] = LIST_KEYS) -> dict[str, list[str]]:
    """The raw values of list settings in one section, after resets (an empty assignment)."""
    values: dict[str, list[str]] = {key: [] for key in keys}
    for path in unit_files(unit, user):
        for key, value in _assignments(path, section):
            if key in values:
                if value:
                    values[key].append(value)
                else:
                    values[key] = []
    return values


def service_settings(unit: str, user: bool = False) -> dict[str, list[str]]:
    """The raw values of ExecStart=, Environment= and EnvironmentFile=, after resets."""
    return unit_settings(unit, user)


def enabled_socket_units(dirs: tuple[str, ...] | list[str]) -> dict[str, str]:
    """Socket units enabled in these unit directories (the manager's UnitPath): the symlinks in
    their `*.wants/`, `*.requires/` and `*.upholds/` directories that `systemctl enable` makes.
    Name -> "enabled", or "enabled-runtime" for /run. Unreadable directories are skipped."""
    found: dict[str, str] = {}
    for directory in _present_dirs(tuple(dirs)):
        try:
            entries = posix.listdir(directory)
        except OSError:
            continue
        for entry in entries:
            if not entry.endswith((".wants", ".requires", ".upholds")):
                continue
            try:
                names = posix.listdir(join(directory, entry))
            except OSError:
                continue
            state = "enabled-runtime" if directory.startswith("/run/") else "enabled"
            for name in names:
                if name.endswith(".socket") and not is_template(name):
                    found.setdefault(name, state)
    return found


# A .socket unit's own sockets, and the [Socket] settings that change the kernel's answer to the
# manager's bind() (for a setting, the last assignment wins). systemd always sets SO_REUSEADDR.
SOCKET_LISTEN_KEYS = ("ListenStream", "ListenDatagram", "ListenSequentialPacket")
SOCKET_OPTION_KEYS = ("ReusePort", "BindIPv6Only", "FreeBind", "Transparent", "BindToDevice", "SocketProtocol")


def socket_unit_settings(unit: str, user: bool = False) -> dict[str, list[str]]:
    """A .socket unit's Listen*= values and its SOCKET_OPTION_KEYS, as written, after resets."""
    return unit_settings(unit, user, "Socket", SOCKET_LISTEN_KEYS + SOCKET_OPTION_KEYS)


def parse_boolean(text: str) -> bool | None:
    """A boolean as systemd's parse_boolean() reads it; None for anything else."""
    lowered = text.strip().lower()
    if lowered in ("1", "yes", "y", "true", "t", "on"):
        return True
    if lowered in ("0", "no", "n", "false", "f", "off"):
        return False
    return None


def socket_listen_values(unit: str, user: bool = False) -> list[str]:
    """A .socket unit's ListenStream= and ListenDatagram= values, as written."""
    values = unit_settings(unit, user, "Socket", ("ListenStream", "ListenDatagram"))
    return values["ListenStream"] + values["ListenDatagram"]


def listen_port(value: str) -> int | None:
    """The port of a Listen value or LISTEN argument as written ("8080", "0.0.0.0:8080",
    "[::]:8080", "udp:..."): its digits after the last colon; None for a path or vsock address."""
    digits = value.rpartition(":")[2].strip()
    return int(digits) if digits.isascii() and digits.isdigit() and len(digits) <= 20 else None


def socket_units_may_claim(ports: set[int | None], user: bool = False, guarded: str | None = None) -> bool:
    """Whether the unit files of an enabled .socket unit list one of these ports: on a clear
    start the one thing that needs the manager (a latent socket unit), read without D-Bus. The
    guarded unit is not counted: a socket unit's own ports are what its guard checks."""
    ports = ports - {None}
    return any(listen_port(value) in ports
               for socket_unit in enabled_socket_units(unit_path(user)) if socket_unit != guarded
               for value in socket_listen_values(socket_unit, user))


# How an ExecStart= command's argv is read, in one place: the unit-file reader (unitfacts, which
# unquotes with shlex), discovery (request.discover, on argv from the bus or the files) and, on the
# every-service path, command_names below (which must not import shlex) share these.
EXEC_PREFIXES = "-@:+!"
SCRIPT_PUNCTUATION = ";&|()`"


def split_words(value: str) -> list[str]:
    """A unit file value's words (ExecStart=, Environment=), unquoted (by shlex: near enough to
    systemd's rules); split at blanks where its quotes do not balance."""
    import shlex  # here, not above: the every-service path loads this module, and no shlex

    try:
        return shlex.split(value)
    except ValueError:
        return value.split()


def exec_prefixes(words: list[str]) -> str:
    """The -@:+! prefixes of an ExecStart= command, from its unquoted words ("" for none)."""
    first = words[0] if words else ""
    return first[:len(first) - len(first.lstrip(EXEC_PREFIXES))]


def exec_argv(words: list[str]) -> list[str]:
    """An ExecStart= command as the argv it runs, from its unquoted words: the -@:+! prefixes taken
    off the path, and with `@` the second word dropped (it only names argv[0])."""
    if not words:
        return []
    prefixes = exec_prefixes(words)
    argv = [words[0][len(prefixes):], *words[1:]]
    return [argv[0], *argv[2:]] if "@" in prefixes and len(argv) >= 2 else argv


def unwrap_env(argv: list[str]) -> list[str]:
    """`env [-i] [NAME=VALUE ...] COMMAND ...` -> COMMAND ... (the assignments are the daemon's business)."""
    if argv and _basename(argv[0]) == "env":
        rest = argv[1:]
        while rest and (rest[0].startswith("-") or "=" in rest[0]):
            rest = rest[1:]
        return rest
    return argv


def shell_script_index(argv: list[str]) -> int | None:
    """Where the script of `sh [-OPTION] -c SCRIPT` is in argv (a shell of SHELLS), else None."""
    if argv and _basename(argv[0]) in SHELLS and "-c" in argv[1:3]:
        index = argv.index("-c") + 1
        return index if index < len(argv) else None
    return None


def command_names(exec_start: str) -> list[str]:
    """The names of the programs an ExecStart= value runs: its binary, and inside `sh -c` the words
    (split at blanks with the quotes dropped: a cheap superset of the script's commands)."""
    argv = unwrap_env(exec_argv(exec_start.replace("'", " ").replace('"', " ").split()))
    script = shell_script_index(argv)
    if script is not None:
        return [_basename(w.strip(SCRIPT_PUNCTUATION)) for w in argv[script:]]
    return [_basename(argv[0])] if argv else []


def runs_known_daemon(unit: str, user: bool = False) -> bool:
    """Whether an ExecStart= of the unit runs a daemon that discovery knows."""
    return any(name in DAEMONS for value in service_settings(unit, user)["ExecStart"]
               for name in command_names(value))
