"""The drop-in that puts `bindguard check` in a unit's ExecStartPre=, and writing or removing it.

bindguard owns one file per unit, `UNIT.d/bindguard.conf`, recognised by its first line. It
never overwrites or removes a file it did not write.
"""

from __future__ import annotations

import errno
import os
import re
import shlex
import stat
import subprocess
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from bindguard import ROOT, __version__, checked_path, untrusted
from bindguard.model.errors import ConfigError, UsageError
from bindguard.model.text import command_unit
from bindguard.request import files
from bindguard.systemd.unitfiles import normalize_unit

DROPIN_NAME = "bindguard.conf"
MARKER = "# Written by `bindguard install`"
SYSTEM_DIR = Path("/etc/systemd/system")
# Where the Debian package installs the program (bin/bindguard); drop-ins name it when it is there.
PACKAGED_PROGRAM = Path("/usr/bin/bindguard")

# Characters that need no quoting in an ExecStartPre= argument (after % and $ are doubled).
_PLAIN = re.compile(r"[A-Za-z0-9_@%+=:,./\[\]$-]+")

PRIVILEGE_NOTE = """\
The "+" prefix runs the check with full privileges, whatever User=, Group= and capability
settings the service has: a trial bind of a port below 1024 needs CAP_NET_BIND_SERVICE, and
naming the process that holds an address means reading /proc/PID/fd of other users'
processes. The price: the check runs as root (it reads, binds and closes test sockets, may
run a known daemon's configuration dump as README's "Trust model" allows, and writes only
discovery's answer under /run/bindguard/; it kills nothing unless asked). It still runs in
the unit's network namespace (PrivateNetwork=), where the daemon will bind (seen with
systemd 252). Drop the "+" when the service runs as root anyway, or when
its ports are 1024 and up and a diagnosis without the holder's name will do."""
USER_PRIVILEGE_NOTE = """\
Under a user manager the check runs as you with or without the "+", which only frees it
from the unit's capability and system call restrictions."""


@dataclass(frozen=True)
class DropIn:
    unit: str
    path: Path
    text: str


# The unit types whose ExecStartPre= runs before their sockets are bound, and the drop-in's section.
GUARDED_SECTIONS = {".service": "Service", ".socket": "Socket"}


def guarded_unit_name(text: str) -> str:
    """The unit a drop-in is for: a unit name as systemctl takes it (`nginx` means nginx.service;
    a template foo@.service guards every instance), a service or a socket unit (its ExecStartPre=
    runs before the manager binds its sockets)."""
    name = normalize_unit(text, template=True)
    if not name.endswith(tuple(GUARDED_SECTIONS)):
        raise UsageError(
            f"{name}: bindguard guards services and socket units (it runs in ExecStartPre=)",
            f"install it on the service or socket unit that binds the address, e.g. {name.rsplit('.', 1)[0]}.service",
        )
    return name


def unit_dir(user: bool, environ: os._Environ | dict | None = None) -> Path:
    """Where the administrator's unit files and drop-ins go: /etc/systemd/system, or for the
    user manager $XDG_CONFIG_HOME/systemd/user (~/.config/systemd/user)."""
    if not user:
        return SYSTEM_DIR
    environ = os.environ if environ is None else environ
    config = environ.get("XDG_CONFIG_HOME") or os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".config")
    return Path(config) / "systemd" / "user"


def dropin_path(unit: str, user: bool, environ: os._Environ | dict | None = None) -> Path:
    return unit_dir(user, environ) / f"{unit}.d" / DROPIN_NAME


def trusted_program(path: str, owners: tuple[int, ...] = (ROOT,)) -> tuple[str, str | None]:
    """(the path a drop-in names for this program, why it should not run it: None when it may).

    The check runs as root before every start, so the program must be an executable regular file
    (not a link to one) of root's (or of one of `owners`) that no one else can write, under
    directories no one else can change either (bindguard.untrusted: whoever can write one of
    them can put another file in its place). The path named is the one checked: with the links
    of the directories above resolved, for whoever owns a link's directory could re-point it."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return path, "does not exist"
    except (OSError, ValueError) as exc:  # ValueError: a NUL
        return path, f"cannot be examined ({getattr(exc, 'strerror', None) or exc})"
    if not stat.S_ISREG(info.st_mode):
        return path, "is not a regular file"
    if info.st_uid not in owners:
        return path, f"is owned by uid {info.st_uid}, not {'root' if set(owners) == {ROOT} else 'root or you'}"
    if info.st_mode & 0o022:
        return path, "can be written by others than its owner"
    if not info.st_mode & 0o111:
        return path, "is not executable"
    real, why = checked_path(path, owners)
    return real, None if why is None else f"can be replaced by others ({why})"


def bindguard_command(owners: tuple[int, ...] = (ROOT,), packaged: Path | None = None) -> tuple[list[str], str | None]:
    """How a unit runs bindguard, and why that is not the Debian package's program (None when it is).

    The package's /usr/bin/bindguard (`packaged`) whenever it is installed as root's alone, also when
    install runs from a venv: the drop-in outlives the venv it was written from, and root runs it
    before every start. Else this bindguard's launcher (the one that runs us, else the one beside
    our interpreter), else `python -I -m bindguard` (as root with the unit's environment: -I, or
    its PYTHONPATH would choose the code that runs). The launcher and the python3 it runs, or the
    interpreter and the bindguard package it imports, only as trusted_program() and
    bindguard.untrusted() trust them for `owners`: UsageError when they do not."""
    packaged = packaged or PACKAGED_PROGRAM
    flaw = launcher_flaw(str(packaged))[1]
    if flaw is None:
        return [str(packaged)], None
    scripts = (sys.argv[0] if sys.argv else "", os.path.join(os.path.dirname(sys.executable), "bindguard"))
    launchers = dict.fromkeys(os.path.realpath(script) for script in scripts
                              if script and os.path.basename(script) == "bindguard" and os.path.isfile(script))
    refusals = []
    for found in launchers:
        launcher, why = launcher_flaw(found, owners)
        if why is None:
            return [launcher], f"{packaged} {flaw}"
        refusals.append(f"{launcher} {why}")
    if not launchers:
        package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bindguard/, above action/
        why = _interpreter_flaw(sys.executable, owners) or _reach(package, owners) or _search_flaw(package, owners)
        if why is None:
            return [sys.executable, "-I", "-m", "bindguard"], f"{packaged} {flaw}"
        refusals.append(f"{sys.executable} -I -m bindguard {why}")
    raise UsageError(f"no bindguard that a unit may run as root: {packaged} {flaw}; {'; '.join(refusals)}",
                     "install the bindguard package, or give --program")


def launcher_flaw(path: str, owners: tuple[int, ...] = (ROOT,)) -> tuple[str, str | None]:
    """(the path a drop-in names for this launcher, why root should not run it: None when it may):
    the launcher as trusted_program() trusts it, and the interpreter it runs (launcher_interpreter)
    as _interpreter_flaw() does. --program and the launcher install falls back to, alike."""
    launcher, why = trusted_program(path, owners)
    if why is None:
        python, why = launcher_interpreter(launcher)
        if why is None:
            why = _interpreter_flaw(python, owners)
    return launcher, why


SHEBANG_BYTES = 256  # a `#!` line; the kernel reads at most BINPRM_BUF_SIZE (256) of it
# The one option word a kernel passes from a `#!` line: -I among Python's flags that take no value
# (in -WI or -XI the I is -W's or -X's value, and Python does not run isolated).
ISOLATED_OPTIONS = re.compile(rb"-[BEIOPRSbdqsuv]*I[BEIOPRSbdqsuv]*")


def launcher_interpreter(launcher: str) -> tuple[str, str | None]:
    """(the python a launcher runs, why root should not run the launcher: None when it may).

    bin/bindguard's form, `#!/bin/sh`, runs the python3 beside it (else Debian's /usr/bin/python3)
    isolated itself. A console script's `#!` must name its python by an absolute path and run it
    isolated (-I): run as root with the unit's environment, a python without -I takes PYTHONPATH
    from it, and the user site-packages from the $HOME systemd gives a `+` command of a unit with
    User=; a relative one is looked up in the unit's working directory, `env` on the unit's PATH.
    """
    try:
        with open(launcher, "rb") as f:
            first = f.read(SHEBANG_BYTES).split(b"\n", 1)[0]
    except OSError as exc:
        return "", f"cannot be read ({exc.strerror or exc})"
    words = first[2:].split() if first.startswith(b"#!") else []
    if words == [b"/bin/sh"]:
        beside = os.path.join(os.path.dirname(launcher), "python3")
        return (beside if os.access(beside, os.X_OK) else "/usr/bin/python3"), None
    if not words or not os.path.basename(words[0]).startswith(b"python"):
        return "", "is no bindguard launcher (its first line is neither #!/bin/sh nor #! and a python)"
    python = os.fsdecode(words[0])
    if not python.startswith("/"):
        return python, f"runs {python!r}, which the unit's working directory would decide"
    options = words[1:]
    if not (len(options) == 1 and ISOLATED_OPTIONS.fullmatch(options[0])):
        return python, f"runs {python} without -I, which takes PYTHONPATH and a user's site-packages from the unit"
    return python, None


def _interpreter_flaw(python: str, owners: tuple[int, ...]) -> str | None:
    """Why root should not run this interpreter: bindguard.untrusted() of it (the link it is, where
    that leads, every directory above either), and of the two directories it reads a pyvenv.cfg
    from when it starts, isolated or not (its own, as it is named, and the one above), which are
    not excused by a sticky bit as a directory above is: whoever may add a pyvenv.cfg to either
    names the standard library root runs. Then the pyvenv.cfg it reads, and the standard library
    it finds (_venv_flaw)."""
    own = os.path.dirname(os.path.abspath(python))
    return (_reach(own, owners) or _reach(os.path.dirname(own), owners) or _reach(python, owners)
            or _venv_flaw(python, owners))


PYVENV_CFG = "pyvenv.cfg"
# CPython's getpath reads at most this much of a pyvenv.cfg: with 32 KiB or more it does not start.
PYVENV_CFG_BYTES = 32 * 1024 - 1
DEBIAN_PYTHON = (3, 11)  # Debian 12's python3, which the package depends on


def pyvenv_settings(data: bytes) -> dict[str, str]:
    """Each key of a pyvenv.cfg (lowercase) with its first value, as CPython 3.11's getpath reads
    the file for `home`: UTF-8 (a byte that is not kept as a surrogate), up to its first NUL, lines
    ended by a newline, a key and a value on either side of a line's first `=`, each stripped; a
    line without `=` is no setting."""
    settings: dict[str, str] = {}
    for line in data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape").split("\n"):
        key, equals, value = line.partition("=")
        if equals:
            settings.setdefault(key.strip().lower(), value.strip())
    return settings


def _venv_flaw(python: str, owners: tuple[int, ...]) -> str | None:
    """Why root should not run this interpreter for what it reads as it starts, after where it is
    (_interpreter_flaw). Python reads the pyvenv.cfg of the directory above its own, else of its
    own (the first that holds one; a directory of that name reads as empty): bindguard.untrusted()
    of that file, whose `home` decides where the standard library comes from, and which must be
    one Python reads (a regular file under PYVENV_CFG_BYTES). That home, or without one the
    directory the interpreter really is in, is where _library_flaw() looks from."""
    own = os.path.dirname(os.path.abspath(python))
    settings: dict[str, str] = {}
    for cfg in (os.path.join(os.path.dirname(own), PYVENV_CFG), os.path.join(own, PYVENV_CFG)):
        if not os.path.lexists(cfg):
            continue
        why = _reach(cfg, owners)
        if why is not None:
            return why
        if os.path.isdir(cfg):
            break
        try:
            settings = pyvenv_settings(files.read_regular(cfg, PYVENV_CFG_BYTES))
        except files.Refused as exc:
            return f"reads {cfg} when it starts, which is {exc}"
        except OSError as exc:
            return f"reads {cfg} when it starts, which cannot be read ({exc.strerror or exc})"
        home = settings.get("home", "")
        if home and not home.startswith("/"):
            return f"reads {cfg} when it starts, whose home {home!r} the unit's working directory would decide"
        break
    home = settings.get("home") or os.path.dirname(os.path.realpath(python))
    return _reach_where_made(home, owners) or _library_flaw(python, home, settings.get("version", ""), owners)


def _library_flaw(python: str, home: str, venv_version: str, owners: tuple[int, ...]) -> str | None:
    """Why root should not run this interpreter for its standard library: _reach_where_made() of
    each place CPython 3.11's getpath looks for it from home, the standard library directories,
    whose modules root imports, among them. From home up, home first, the last before / (getpath's
    dirname: what is before the last /), it looks in each directory's lib/ for python311.zip (none
    there: in every one), for python3.11/os.py or os.pyc (the first found holds the standard
    library) and for python3.11/lib-dynload; what it does not find so, it takes where it was built
    to look. Whoever may add such a file on the way, or change what is found, decides what root runs.

    The version, the lib/ directory's name and where it was built to look are the binary's: the
    running interpreter's own when it is this one; for another they are assumed Debian's (lib/,
    /usr), of the version its venv recorded in pyvenv.cfg, else of Debian 12's python3 (3.11)."""
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        import sysconfig

        major, minor = sys.version_info[:2]
        built = (sysconfig.get_config_var("prefix") or "/usr", sysconfig.get_config_var("exec_prefix") or "/usr")
        lib = sys.platlibdir
    else:
        recorded = re.match(r"(\d+)\.(\d+)", venv_version)
        major, minor = map(int, recorded.groups()) if recorded else DEBIAN_PYTHON
        lib, built = "lib", ("/usr", "/usr")
    stdlib = f"{lib}/python{major}.{minor}"
    places = []
    prefix = exec_prefix = None
    directory = home
    while directory and not os.path.lexists(directory):  # nothing is found in what is not there (_venv_flaw
        # checked where it could be made)
        directory = directory.rpartition("/")[0]
    while directory:
        places.append(os.path.join(directory, lib, f"python{major}{minor}.zip"))
        if prefix is None:
            places.append(os.path.join(directory, stdlib))
            if any(os.path.isfile(os.path.join(directory, stdlib, name)) for name in ("os.py", "os.pyc")):
                prefix = directory
        if exec_prefix is None:
            places.append(os.path.join(directory, stdlib, "lib-dynload"))
            if os.path.isdir(places[-1]):
                exec_prefix = directory
        directory = directory.rpartition("/")[0]
    if prefix is None:
        places.append(os.path.join(built[0], stdlib))
    if exec_prefix is None:
        places.append(os.path.join(built[1], stdlib, "lib-dynload"))
    for place in dict.fromkeys(places):
        why = _reach_where_made(place, owners)
        if why is not None:
            return why
    return None


def _search_flaw(package: str, owners: tuple[int, ...]) -> str | None:
    """Why root should not run `python -I -m bindguard` with this package: bindguard.untrusted() of
    the directories whose entries that Python reads, which are not excused by a sticky bit as a
    directory above the package is: each site directory of this interpreter's, as site found them
    (this form is chosen run as `python -m bindguard`, site on; site runs without -S and runs the
    `import` lines of every *.pth file in each; -I leaves the user's out), and the one the package
    is imported from. Whoever may add a file to either decides code root runs. A
    site directory not there is checked where one could be made: the nearest directory above it
    that is."""
    import site

    for directory in dict.fromkeys([*site.getsitepackages(), os.path.dirname(package)]):
        why = _reach_where_made(directory, owners)
        if why is not None:
            return why
    return None


def _reach(path: str, owners: tuple[int, ...]) -> str | None:
    why = untrusted(path, owners)
    return None if why is None else f"runs what others can change ({why})"


def _reach_where_made(path: str, owners: tuple[int, ...]) -> str | None:
    """_reach() of an absolute path, or where it is not there, of the nearest directory above it
    that is: whoever may add an entry to that one could make it. A link that leads nowhere is
    checked, and refused, as it is."""
    while path.startswith("/") and not os.path.lexists(path):  # "/" is always there: the climb ends
        path = os.path.dirname(path)
    return _reach(path, owners)


def exec_quote(arg: str) -> str:
    """One argument of an Exec*= line: specifiers (%) and variables ($) doubled, quoted if needed."""
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if _PLAIN.fullmatch(escaped):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def check_arguments(listens: list[str], user: bool, check_args: list[str]) -> list[str]:
    """What follows `check --unit %n` in the drop-in."""
    return [*(["--user"] if user else []), *check_args, *listens]


def refuse_control_characters(args: list[str]) -> None:
    """An argument with a control character could end the ExecStartPre= line and start another
    (a newline) or hide text on a terminal; systemd's quoting cannot carry it safely."""
    for arg in args:
        if any(unicodedata.category(c) == "Cc" for c in arg):
            raise UsageError(f"{arg[:60]!r}: a control character (a newline, a tab, an escape) cannot be "
                             "written into a unit", "give each address and option without one")


def render(unit: str, listens: list[str], user: bool, check_args: list[str], command: list[str]) -> str:
    refuse_control_characters([*command, *check_arguments(listens, user, check_args)])
    argv = [*map(exec_quote, command), "check", "--unit", "%n",
            *map(exec_quote, check_arguments(listens, user, check_args))]
    flag = " --user" if user else ""
    note = "\n".join(f"# {line}" for line in (USER_PRIVILEGE_NOTE if user else PRIVILEGE_NOTE).splitlines())
    section = GUARDED_SECTIONS["." + unit.rsplit(".", 1)[-1]]
    what = "its own Listen*= addresses" if section == "Socket" and not listens else "the addresses below"
    before = f"the manager binds {unit}'s sockets" if section == "Socket" else f"{unit} starts"
    return f"""\
{MARKER} (bindguard {__version__}); `bindguard uninstall{flag} {command_unit(unit)}` removes it.
# Put your own settings in another drop-in: this file is bindguard's and is rewritten.
#
# Before {before}, bindguard checks that {what} can be bound: the start
# goes on, waits out a TIME_WAIT within the unit's start timeout, or fails with exit status
# 98 naming whoever holds an address. It runs after the unit's own ExecStartPre= lines.
#
{note}
#
# With Restart=, a refused start is retried like any failure: RestartPreventExitStatus= does
# not see ExecStartPre= exit codes (systemd checks only the main process). The start rate
# limit bounds the retries; in the unit or another drop-in:
#   [Unit]
#   StartLimitIntervalSec=60
#   StartLimitBurst=3
# Never list 98 in SuccessExitStatus=: the daemon would start despite the refusal.
[{section}]
ExecStartPre=+{" ".join(argv)}
"""


def parse_check_args(text: str | None) -> list[str]:
    if not text:
        return []
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise UsageError(f"--check-args {text!r}: {exc}",
                         "quote it as one shell word, e.g. --check-args='--wait 10'") from None


def owned_by_bindguard(path: Path) -> bool:
    """A regular file (not a link, never a FIFO that would block) whose first line is MARKER."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        return os.read(fd, len(MARKER)).decode("utf-8", "replace") == MARKER
    finally:
        os.close(fd)


def _refuse_foreign(path: Path, unit: str) -> None:
    raise ConfigError(
        f"{path} exists and was not written by bindguard; leaving it alone",
        f"add bindguard's ExecStartPre= line to that file yourself (see `bindguard install --print "
        f"{command_unit(unit)} ...`), or move the file away and run install again",
    )


def _write_error(path: Path, exc: OSError, user: bool) -> ConfigError:
    denied = not user and exc.errno in (errno.EPERM, errno.EACCES, errno.EROFS)
    hint = "run it as root (sudo)" if denied else "check the directory and its permissions"
    return ConfigError(f"cannot write {path}: {exc.strerror}", hint)


def _refuse_outside(path: Path) -> None:
    """A UNIT.d that is a link out of the unit directory is not followed: bindguard writes and
    removes only inside the directory it names."""
    directory = path.parent
    if not directory.is_symlink():
        return
    real, base = os.path.realpath(directory), os.path.realpath(directory.parent)
    if os.path.commonpath([real, base]) != base or real == base:
        raise ConfigError(f"{directory} is a link to {real}, outside {directory.parent}; leaving it alone",
                          f"make {directory.name} a directory of its own, or link it within {directory.parent}")


def differs(dropin: DropIn) -> bool:
    """Whether writing the drop-in would change its file: False when an identical one is already
    there. Refuses as write() does where write() would refuse."""
    path = dropin.path
    _refuse_outside(path)
    if not os.path.lexists(path):
        return True
    if not owned_by_bindguard(path):
        _refuse_foreign(path, dropin.unit)
    return path.read_text() != dropin.text


def write(dropin: DropIn, user: bool) -> bool:
    """Write the drop-in; False when an identical one is already there."""
    path = dropin.path
    if not differs(dropin):
        return False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        if os.path.lexists(tmp):
            os.unlink(tmp)  # left by an install that was interrupted
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(dropin.text)
        os.replace(tmp, path)
    except OSError as exc:
        raise _write_error(path, exc, user) from None
    return True


def remove(unit: str, path: Path, user: bool) -> bool:
    """Remove bindguard's drop-in (and the UNIT.d directory if it is left empty); False if absent."""
    _refuse_outside(path)
    if not os.path.lexists(path):
        return False
    if not owned_by_bindguard(path):
        _refuse_foreign(path, unit)
    try:
        path.unlink()
    except OSError as exc:
        raise _write_error(path, exc, user) from None
    try:
        path.parent.rmdir()
    except OSError:
        pass
    return True


def daemon_reload(user: bool) -> str | None:
    """Make the manager read the change: Manager.Reload over D-Bus, else `systemctl daemon-reload`
    (which also reaches a manager without a bus through its private socket). Returns None on
    success, or why neither worked."""
    from bindguard.systemd.bus import CONNECT_TIMEOUT, Systemd, SystemdError, bus_for

    try:  # a reload of many units takes a while, and a person waits for it anyway
        with Systemd(bus_for(user), budget=CONNECT_TIMEOUT + 90, call_timeout=90) as sd:
            sd.reload()
        return None
    except SystemdError as exc:
        why = str(exc)
    argv = ["systemctl", *(["--user"] if user else []), "daemon-reload"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{why}; {' '.join(argv)}: {exc}"
    if done.returncode == 0:
        return None
    return f"{why}; {' '.join(argv)}: {done.stderr.strip() or f'exit status {done.returncode}'}"


def known_to_manager(unit: str, user: bool) -> bool | None:
    """Whether the manager knows the unit; None when it cannot be asked."""
    from bindguard.systemd.bus import Systemd, SystemdError, UnitNotFound, bus_for

    try:
        with Systemd(bus_for(user)) as sd:
            sd.unit(unit)
        return True
    except UnitNotFound:
        return False
    except SystemdError:
        return None
