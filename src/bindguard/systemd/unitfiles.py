"""Unit names, a process's unit from its cgroup, and where a unit's bindguard files are: posix alone.

This is on the path of every start the every-service drop-in guards, so finding that a unit
has nothing to guard must cost a few stat() calls and nothing more; not even the import of os
(see bindguard.environment): the few path functions that path needs are here, as os.path has them.
"""

import _stat
import posix

import bindguard

DEFAULT_SEARCH_PATH = ("/etc/bindguard", "/run/bindguard", "/usr/lib/bindguard")
SEARCH_PATH_ENV = "BINDGUARD_CONFIG_PATH"
# The unit types systemd knows (unit_type_from_string) and the characters a name may have before
# its type (VALID_CHARS_WITH_AT in systemd's unit-name.c); systemd's UNIT_NAME_MAX (256) counts the NUL.
UNIT_TYPES = ("service", "socket", "target", "device", "mount", "automount", "swap", "timer", "path", "slice", "scope")
UNIT_SUFFIXES = tuple("." + kind for kind in UNIT_TYPES)
UNIT_NAME_MAX = 255
UNIT_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789:-_.\\@")
PROCESS_UNIT_SUFFIXES = (".service", ".scope", ".socket", ".mount", ".swap")  # units whose cgroup holds processes


def join(path: str, *names: str) -> str:
    """os.path.join for str paths."""
    for name in names:
        if name.startswith("/"):
            path = name
        elif not path or path.endswith("/"):
            path += name
        else:
            path += "/" + name
    return path


def lexists(path: str) -> bool:
    """os.path.lexists."""
    try:
        posix.lstat(path)
    except (OSError, ValueError):
        return False
    return True


def isfile(path: str) -> bool:
    """os.path.isfile."""
    try:
        return _stat.S_ISREG(posix.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def user_manager(choice: bool | None = None, environ=None) -> bool:
    """Whether to talk to a user manager: --user/--system (True/False) decide; otherwise
    $MANAGERPID, which a manager sets for what it starts, other than 1 means a user manager. The
    root guard believes it only of a user manager /proc proves (proven_user_manager): under
    `ExecStartPre=+` its environment is the unit's, where a service's user may have planted it."""
    if choice is not None:
        return choice
    if posix.geteuid() == bindguard.ROOT:
        return proven_user_manager(environ) is not None
    manager = _claimed_pid(_claim(environ))
    return manager is not None and manager != 1


def _claim(environ) -> str:
    """$MANAGERPID as the environment has it: the guard's own (environ None) or environ's."""
    return (bindguard.environment() if environ is None else environ).get("MANAGERPID", "")


def _claimed_pid(claim: str) -> int | None:
    """The PID a $MANAGERPID names in ASCII digits (int() reads '٥' as 5 and raises on '²'), else None."""
    return int(claim) if claim.isascii() and claim.isdigit() and len(claim) <= 10 else None


# Where systemd's binary is; /proc/PID/exe names the file the process runs (merged /usr: the first).
SYSTEMD_BINARIES = ("/usr/lib/systemd/systemd", "/lib/systemd/systemd")
ENVIRON_BYTES = 1 << 16  # a manager's own environment: a few hundred bytes from PAM and user@.service


def runs_systemd(pid: int) -> bool:
    """Whether /proc shows PID running systemd's own binary (a name is no proof: any process can
    call itself "systemd"; only root or the process's owner may read its exe link)."""
    try:
        exe = posix.readlink(f"/proc/{pid}/exe")
    except (OSError, ValueError):
        return False
    return exe.removesuffix(" (deleted)") in SYSTEMD_BINARIES  # (deleted): upgraded while running


def proven_user_manager(environ=None) -> int | None:
    """$MANAGERPID when /proc proves it a user manager, else None: a live process other than PID 1
    running systemd's binary, and for a root guard one that root runs (root_runs). A manager starts its
    services as its own user, so a root guard under another user's manager was not started by it:
    that user (who may exec systemd with an environment of their choosing) planted the PID.

    The guard's own $MANAGERPID (environ None) is proven once per process, a run of the guard, and
    the answer shared: choosing the bus, the manager the evidence names and the user search path
    each ask, and a proof reads /proc twice. Kept by the claim's text and the uid that judged it
    (the rule is stricter for root), so a changed environment is proven anew; a planted PID that
    failed stays refused. What is read from the process later is read with a proof made after it
    (proof_of, as unitexec.user_unit_path reads its environment): the PID alone is kept here."""
    claim = _claim(environ)
    if environ is not None:
        return proof_of(claim)
    judged = (claim, posix.geteuid())
    if judged not in _own_proof:
        _own_proof[judged] = proof_of(claim)
    return _own_proof[judged]


# The guard's own $MANAGERPID's proof by (its text, the euid that judged it): proven_user_manager().
_own_proof: dict[tuple[str, int], int | None] = {}


def proof_of(claim: str) -> int | None:
    """The PID claim ($MANAGERPID's text) names when /proc proves it a user manager now
    (proven_user_manager's rule), else None."""
    pid = _claimed_pid(claim)
    if pid is None or pid <= 1 or not runs_systemd(pid):
        return None
    if posix.geteuid() == bindguard.ROOT and not root_runs(pid):
        return None
    return pid


def root_runs(pid: int) -> bool:
    """Whether the process's real and effective uid are root's (the Uid: line of /proc/PID/status).
    Not /proc/PID's owner: proc(5) shows a process that made itself non-dumpable (prctl
    PR_SET_DUMPABLE 0) as root's, whoever runs it."""
    return status_ids(pid) == (bindguard.ROOT, bindguard.ROOT)


STATUS_BYTES = 1 << 14  # /proc/PID/status: about 1.5 KiB; the Uid: line is its ninth


def status_ids(pid: int | str) -> tuple[int, int] | None:
    """(real, effective) UID from the Uid: line of /proc/PID/status, of its first STATUS_BYTES;
    None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            text = f.read(STATUS_BYTES)
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(b"Uid:"):
            ids = line.split()
            try:
                return int(ids[1]), int(ids[2])
            except (ValueError, IndexError):
                return None
    return None


def process_environment(pid: int) -> dict[str, str]:
    """The environment PID started with (/proc/PID/environ, at most ENVIRON_BYTES; an entry the
    bound cuts is left out), {} when it cannot be read."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            data = f.read(ENVIRON_BYTES + 1)
    except OSError:
        return {}
    entries = data.split(b"\0")
    if len(data) > ENVIRON_BYTES:
        entries.pop()
    found: dict[str, str] = {}
    for entry in entries:
        key, equals, value = entry.partition(b"=")
        if equals and key:
            found.setdefault(key.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
    return found


def search_path() -> list[str]:
    value = bindguard.environment().get(SEARCH_PATH_ENV)
    if value is None:
        return list(DEFAULT_SEARCH_PATH)
    return environment_dirs(value)


def environment_dirs(value: str) -> list[str]:
    """The directories of a colon-separated search path taken from the environment that
    trusted_dirs keeps. Under `ExecStartPre=+` the environment is the unit's, which its user may
    write (an EnvironmentFile=): a directory of that user's, or a link of theirs to one of root's,
    must not become where the root guard reads its configuration or unit files."""
    return trusted_dirs(value.split(":"))


def trusted_dirs(dirs) -> list[str]:
    """Those of dirs that are directories root or the guard's own user owns with every directory
    above them, and no one else can write (bindguard.resolve_trusted), with their symlinks resolved:
    the path checked is the one read, not a link someone could re-point."""
    owners = (bindguard.ROOT, posix.geteuid())
    kept = []
    for directory in dirs:
        try:
            real, why = bindguard.resolve_trusted(directory, owners)
            if why is None and _stat.S_ISDIR(posix.stat(real).st_mode):
                kept.append(real)
        except (OSError, ValueError):  # missing, or gone since
            continue
    return kept


def unit_name(text: str, template: bool = False) -> str | None:
    """The unit name systemctl makes of text (`nginx` -> nginx.service, `getty@tty1` ->
    getty@tty1.service), or None where systemd rejects it (normalize_unit says why)."""
    name, problem = _named(text, template)
    return None if problem else name


def normalize_unit(text: str, template: bool = False) -> str:
    """unit_name(), or a UsageError (exit 64) naming the input and what systemd accepts.

    A template (foo@.service) is a unit name only where template=True: a drop-in may apply to
    every instance, but a guard always runs for one instance (%n).
    """
    name, problem = _named(text, template)
    if problem is None:
        return name
    from bindguard.model.errors import UsageError

    shown = repr(text[:80]) + ("..." if len(text) > 80 else "")
    hint = ("name one instance, e.g. foo@NAME.service" if problem.endswith("template") else
            "write a unit name such as nginx.service; `systemd-escape` makes one from a path or other text")
    raise UsageError(f"{shown} is not a unit name: {problem}", hint)


def _named(text: str, template: bool) -> tuple[str, str | None]:
    """The one reading of a unit name: text with .service appended when it names no unit type (as
    systemctl does), and what systemd's unit_name_is_valid() finds wrong with it, or None."""
    name = text if text.endswith(UNIT_SUFFIXES) else text + ".service"
    prefix = name[: name.rfind(".")]
    if not prefix:
        return name, "the name before its type is empty"
    if len(name) > UNIT_NAME_MAX:
        return name, f"it is longer than {UNIT_NAME_MAX} characters"
    bad = sorted(set(prefix) - UNIT_NAME_CHARS)
    if bad:
        return name, (f"{', '.join(repr(c) for c in bad[:5])} cannot be in a unit name "
                      "(ASCII letters, digits and : - _ . \\ @ can)")
    if prefix.startswith("@"):
        return name, "it starts with '@'"
    if is_template(name) and not template:
        return name, f"{name} is a template"
    return name, None


def is_template(name: str) -> bool:
    """foo@.service: a template, which only its instances (foo@bar.service) run. As systemd reads
    it, the first '@' decides (a@b@.service is an instance of a@.service)."""
    prefix = name[: name.rfind(".")]
    return prefix.find("@") == len(prefix) - 1


def daemon_for_unit_name(unit: str) -> str | None:
    """The daemon a unit runs, judged by its name alone (postgresql@15-main.service -> postgres)."""
    from bindguard.systemd.unitexec import UNIT_NAMES  # the one table of known daemons

    return UNIT_NAMES.get(unit.rsplit(".", 1)[0].split("@", 1)[0])


def template_of(name: str) -> str | None:
    """The template of an instance (foo@bar.service -> foo@.service); None for any other name."""
    prefix, at, rest = name.partition("@")
    if not at or rest.startswith("."):
        return None
    return f"{prefix}@{rest[rest.rfind('.'):]}"


def with_template(unit: str) -> list[str]:
    """The unit's own name and, for an instance foo@bar.service, its template foo@.service: the
    names its unit files and its bindguard files are looked up by."""
    template = template_of(unit)
    return [unit, template] if template else [unit]


def masks_with_nothing(path: str) -> bool:
    """A link to /dev/null (the null device): the file masks the same name below with nothing.
    Anything else that is not a regular file is read, and reported, as a configuration."""
    try:
        st = posix.stat(path)
    except (OSError, ValueError):
        return False
    return _stat.S_ISCHR(st.st_mode) and st.st_rdev == posix.makedev(1, 3)


def config_files(unit: str) -> list[str]:
    """The files that make up a unit's configuration, in the order they apply."""
    dirs = search_path()
    main = None
    for name in with_template(unit):
        for d in dirs:
            candidate = join(d, name + ".yaml")
            if lexists(candidate):
                main = candidate  # a file (even empty, or a link to /dev/null) masks those below
                break
        if main is not None:
            break
    dropins: dict[str, str] = {}
    for name in reversed(with_template(unit)):  # the instance's drop-ins mask the template's
        for d in reversed(dirs):  # lower precedence first, so higher ones overwrite
            dropin_dir = join(d, name + ".yaml.d")
            try:
                entries = posix.listdir(dropin_dir)
            except OSError:
                continue
            for entry in entries:
                if entry.endswith(".yaml"):
                    dropins[entry] = join(dropin_dir, entry)
    files = [main] if main is not None and not masks_with_nothing(main) else []
    files += [dropins[name] for name in sorted(dropins) if not masks_with_nothing(dropins[name])]
    return files


def configured_units() -> list[str]:
    """Every unit with a configuration file or drop-in directory in the search path (templates left out)."""
    units: set[str] = set()
    for directory in search_path():
        try:
            entries = posix.listdir(directory)
        except (OSError, ValueError):
            continue
        for entry in entries:
            name = entry[: -len(".yaml")] if entry.endswith(".yaml") else entry[: -len(".yaml.d")] \
                if entry.endswith(".yaml.d") else None
            if name and name.endswith(UNIT_SUFFIXES) and not is_template(name):
                units.add(name)
    return sorted(units)


CGROUP_FILE_BYTES = 1 << 16  # /proc/PID/cgroup: a line a hierarchy, a few hundred bytes


def process_cgroup(pid: int | str) -> str | None:
    """The cgroup path systemd tracks the process by, from /proc/PID/cgroup.

    The unified (cgroup2, `0::`) line when it names a unit, else the name=systemd (cgroup v1)
    line: on legacy and hybrid hosts a manager may track its units in the v1 hierarchy while
    the `0::` line stays elsewhere. None if the process is gone.
    """
    text = cgroup_file(pid)
    return None if text is None else cgroup_from_proc_file(text)


def cgroup_file(pid: int | str) -> str | None:
    """The text of /proc/PID/cgroup, at most CGROUP_FILE_BYTES of it; None if the process is gone."""
    try:
        with open(f"/proc/{pid}/cgroup", "rb") as f:
            return f.read(CGROUP_FILE_BYTES).decode("utf-8", "replace")
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


def own_unit() -> str | None:
    """The unit this process runs in, as its cgroup path names it (an ExecStartPre= runs in its
    service's cgroup): the kernel's word, without D-Bus."""
    path = process_cgroup("self")
    return unit_from_cgroup(path) if path else None


def unit_from_cgroup(path: str) -> str | None:
    """The systemd unit a cgroup path names: its innermost component that systemd would accept as
    the name of a unit holding processes (a .service, .scope, .socket, .mount or .swap name that
    unit_name_is_valid() takes), after undoing systemd's cgroup escaping (a leading "_").

    /system.slice/nginx.service -> nginx.service; /system.slice/foo.service/payload ->
    foo.service; /user.slice/user-1000.slice/user@1000.service/app.slice/web.service ->
    web.service (a unit of the user manager); /init.scope -> init.scope (PID 1). Slices
    hold no processes of their own: /system.slice -> None. A directory a delegated unit made below
    itself is named by that unit's user: one no unit could be named (a character systemd allows in
    none) is passed over for the one above it, but one with a valid name is taken
    (…/user@1000.service/x/nginx.service -> nginx.service), which only the manager can confirm:
    callers without its answer mark the unit unconfirmed (UnitStatus.BY_CGROUP).
    """
    for component in reversed(path.split("/")):
        name = component[1:] if component.startswith("_") else component
        if name.endswith(PROCESS_UNIT_SUFFIXES) and _named(name, template=False)[1] is None:
            return name
    return None
