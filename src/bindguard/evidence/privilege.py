"""Whether the daemon may bind a port below net.ipv4.ip_unprivileged_port_start, where the guard
can prove it: a false "permission denied" would stop a daemon that starts as root and binds
before it drops privileges, so every link of the proof is a fact checked here, and anything
unknown leaves the verdict to the kernel's answer as before.

The proof, for a guard running inside the unit it guards (its ExecStartPre=, same network
namespace, so the same net.ipv4.ip_unprivileged_port_start):
  - no ExecStart= runs with full privileges ("+", "!", "!!" prefixes);
  - CapabilityBoundingSet= leaves CAP_NET_BIND_SERVICE out: then no process of the unit can
    have it, whatever it runs; or else
  - the daemon's credentials lack it: the guard itself got EACCES while running with them (no
    "+" on its line), or the unit's User= is not root and AmbientCapabilities= lacks it; and
  - the daemon cannot gain it when it runs: NoNewPrivileges=yes, or every ExecStart= binary is
    an absolute path to a regular file with no setuid/setgid bit and no file capabilities, not
    a script (#!) nor a program that runs others with privileges (sudo, authbind, a shell,
    ...), and no LD_PRELOAD is set.
Only posix and pwd: read when a requested port is below the start (posix, not os: the fast path
asks worth_a_look() and loads no os, see bindguard.environment).
"""

import _stat
import posix

import bindguard
from bindguard.model.host import unprivileged_port_start

CAP = "CAP_NET_BIND_SERVICE"
SETTINGS = ("ExecStart", "User", "DynamicUser", "AmbientCapabilities", "CapabilityBoundingSet",
            "NoNewPrivileges", "PrivateUsers", "Environment", "EnvironmentFile")
# Programs that run another program, or bind for it, with privileges the unit did not give
# (authbind's setuid helper binds for its client; docker's daemon publishes ports as root),
# or whose command is a script: what finally runs is not known from the unit.
RUNS_OTHERS = frozenset((
    "sh", "bash", "dash", "zsh", "ksh", "busybox", "env", "sudo", "su", "doas", "runuser", "setpriv",
    "pkexec", "capsh", "chpst", "authbind", "docker", "podman", "nsenter", "systemd-run", "start-stop-daemon",
))
# Interpreters (python3, python3.11, perl, node, ...): what they run is a script, which may run
# anything, as a #! script may; by name prefix, as they carry their versions in it.
INTERPRETERS = ("python", "perl", "ruby", "node", "java", "php", "lua", "tclsh", "guile", "bun", "deno", "dotnet")
# An EnvironmentFile= path with these is a glob or a specifier: which files it names is not read here.
NOT_ONE_FILE = ("%", "*", "?", "[")
ENV_FILE_LIMIT = 1 << 16


def guard_runs_in(unit: str) -> bool:
    """Whether this process is one of the unit's own commands (ExecStartPre=): started by a
    manager (INVOCATION_ID) in the unit's cgroup."""
    from bindguard.systemd.unitfiles import process_cgroup, unit_from_cgroup

    if not bindguard.environment().get("INVOCATION_ID"):
        return False
    cgroup = process_cgroup("self")
    if not cgroup:
        return False
    return unit_from_cgroup(cgroup) == unit


def worth_a_look(unit: str, user: bool) -> bool:
    """The fast path's question, for a port below the start: could the unit's settings deny it to
    the daemon although the guard may bind it? (User=, DynamicUser= or CapabilityBoundingSet= set.)"""
    from bindguard.systemd.unitexec import unit_settings

    found = unit_settings(unit, user, keys=("User", "DynamicUser", "CapabilityBoundingSet"))
    return any(found.values())


def _last(values: list[str]) -> str:
    return values[-1] if values else ""


def _includes_cap(values: list[str], unset: bool) -> bool | None:
    """Whether a capability set (CapabilityBoundingSet=, AmbientCapabilities=) as assigned holds
    CAP_NET_BIND_SERVICE: lines merge by OR, "~" lines by AND; None when a value is not plain."""
    result = None
    for value in values:
        invert = value.startswith("~")
        names = value[1:].split() if invert else value.split()
        if any("%" in n or "$" in n for n in names):
            return None
        if invert and not names:  # "~" alone: the full set again
            result = True
            continue
        listed = CAP in (n.upper() for n in names)
        if invert:
            result = (not listed) if result is None else (result and not listed)
        else:
            result = listed if result is None else (result or listed)
    return unset if result is None else result


def _yes(values: list[str]) -> bool:
    """Whether a boolean setting's last assignment is true, as systemd reads it."""
    from bindguard.systemd.unitexec import parse_boolean

    return bool(parse_boolean(_last(values)))


def _prefixes_and_path(value: str) -> tuple[str, str]:
    """An ExecStart= value's -@:+! prefixes, and the program it runs."""
    from bindguard.systemd.unitexec import exec_argv, exec_prefixes, split_words

    words = split_words(value)
    argv = exec_argv(words)
    return exec_prefixes(words), argv[0] if argv else ""


def _may_gain(exec_start: list[str], settings: dict[str, list[str]]) -> str | None:
    """Why the daemon's program might gain CAP_NET_BIND_SERVICE when it runs; None if it cannot."""
    if _yes(settings["NoNewPrivileges"]):
        return None
    environment = " ".join(settings["Environment"])
    if "LD_PRELOAD" in environment:
        return "the unit sets LD_PRELOAD"
    for env_file in settings["EnvironmentFile"]:
        if _mentions_preload(env_file.lstrip("-")):
            return f"{env_file.lstrip('-')} may set LD_PRELOAD"
    for value in exec_start:
        _, path = _prefixes_and_path(value)
        if not path.startswith("/") or "%" in path or "$" in path:
            return f"ExecStart= runs {path!r}, not an absolute path"
        name = path.rpartition("/")[2]
        if name in RUNS_OTHERS:
            return f"ExecStart= runs {name}, which runs other programs with privileges of their own"
        if name.startswith(INTERPRETERS):
            return f"ExecStart= runs {name}, an interpreter: its script may run anything, authbind or sudo among them"
        try:
            st = posix.stat(path)
        except OSError as exc:
            return f"{path} cannot be examined ({exc.strerror})"
        if not _stat.S_ISREG(st.st_mode):
            return f"{path} is not a regular file"
        if st.st_mode & (_stat.S_ISUID | _stat.S_ISGID):
            return f"{path} is setuid or setgid"
        try:
            posix.getxattr(path, "security.capability")
            return f"{path} has file capabilities"
        except OSError:
            pass
        if _is_script(path):
            return f"{path} is a script (#!), which may run anything, authbind or sudo among them"
    return None


def _is_script(path: str) -> bool:
    try:
        fd = posix.open(path, posix.O_RDONLY | posix.O_NONBLOCK | posix.O_NOCTTY)
    except OSError:
        return True  # unreadable: not known not to be one
    try:
        return not _stat.S_ISREG(posix.fstat(fd).st_mode) or posix.read(fd, 2) == b"#!"
    finally:
        posix.close(fd)


def _mentions_preload(path: str) -> bool:
    """Whether an EnvironmentFile= may set LD_PRELOAD: it says so, or it cannot be read whole."""
    if any(char in path for char in NOT_ONE_FILE):
        return True
    try:
        fd = posix.open(path, posix.O_RDONLY | posix.O_NONBLOCK | posix.O_NOCTTY)
    except OSError:
        return False  # systemd fails the start on a missing file unless it is optional ("-")
    try:
        if not _stat.S_ISREG(posix.fstat(fd).st_mode):
            return True
        text = posix.read(fd, ENV_FILE_LIMIT + 1)
        return len(text) > ENV_FILE_LIMIT or b"LD_PRELOAD" in text
    finally:
        posix.close(fd)


def _uid_of(user: str, dynamic: bool, user_manager: bool) -> int | None:
    """The uid the daemon runs as, or None when it cannot be told."""
    if not user:
        if dynamic:
            return 65534  # a dynamic user is never root; its number does not matter here
        return posix.getuid() if user_manager else 0
    if "%" in user or "$" in user:
        return None
    if user.isdigit() and user.isascii():
        return int(user)
    import pwd

    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


def assess(unit: str, user_manager: bool, ports: set[int], denied_to_guard: bool):
    """A facts.BindPrivilege for the unit's daemon, or None when nothing is proven (or no port is
    below the start). denied_to_guard: the guard, running in the unit, got EACCES."""
    from bindguard.model.facts import BindPrivilege
    from bindguard.systemd.unitexec import unit_settings

    start = unprivileged_port_start()
    if all(port >= start for port in ports) or not guard_runs_in(unit):
        return None
    settings = unit_settings(unit, user_manager, keys=SETTINGS)
    exec_start = settings["ExecStart"]
    if not exec_start or any({"+", "!"} & set(_prefixes_and_path(v)[0]) for v in exec_start):
        return None  # no daemon, or one that runs with full privileges
    user = _last(settings["User"])
    shown = user or ("a dynamic user" if _yes(settings["DynamicUser"]) else "")
    facts = [f"ports below {start} need CAP_NET_BIND_SERVICE (net.ipv4.ip_unprivileged_port_start={start})"]
    if _includes_cap(settings["CapabilityBoundingSet"], unset=True) is False:
        facts.append(f"{unit}'s CapabilityBoundingSet= leaves out CAP_NET_BIND_SERVICE: no process of the "
                     "unit can have it")
        return BindPrivilege(start, shown, bounding_set=True, facts=tuple(facts))
    if _yes(settings["PrivateUsers"]):
        return None
    if denied_to_guard:
        facts.append(f"the guard runs as {unit}'s ExecStartPre= with the credentials the daemon gets, and the "
                     "kernel denied it the port (EACCES)")
    else:
        uid = _uid_of(user, _yes(settings["DynamicUser"]), user_manager)
        ambient = _includes_cap(settings["AmbientCapabilities"], unset=False)
        if uid is None or uid == 0 or ambient is not False:
            return None
        facts.append(f"{unit} runs as {shown or f'uid {uid}'} (not root) and its AmbientCapabilities= do not "
                     "include CAP_NET_BIND_SERVICE")
    why_not = _may_gain(exec_start, settings)
    if why_not is not None:
        return BindPrivilege(start, shown, facts=tuple(facts), unproven=why_not) if denied_to_guard else None
    if _yes(settings["NoNewPrivileges"]):
        facts.append("NoNewPrivileges=yes: its programs cannot gain privileges when they run")
    else:
        programs = ", ".join(dict.fromkeys(_prefixes_and_path(v)[1] for v in exec_start))
        facts.append(f"{programs}: no setuid/setgid bit, no file capabilities, not a script, so the daemon "
                     "cannot gain the capability when it runs")
    return BindPrivilege(start, shown, facts=tuple(facts))
