"""Discovery's answer for a unit, remembered under /run/bindguard/discovery/ until anything it
looked at changes.

Discovering what a known daemon binds reads its unit files, its configuration tree and often
runs its own dump (`nginx -T`): tens of milliseconds before every start. The answer depends only
on what that discovery looked at, so while it runs every path it touches is recorded with its
state (stat/lstat are wrapped, in os and in posix, and an audit hook sees every open, directory
listing and program run): inode, size, mode, owner, mtime and ctime of each file and directory
(a directory's mtime changes with its entries: a glob that gains a file), or the error a missing
path gave.
The next run stats each recorded path again and uses the answer only if every one is unchanged;
one difference, and discovery runs again. Also part of the key: the unit, which manager, its
unit search path, the host's net.ipv6.bindv6only and IPv6 support, and bindguard's own code.

Never remembered: a discovery cut short (its time budget, a dump killed), one that used a
relative path, and one where a file it looked at changed less than FRESH_NS before it began
(timestamps tick in jiffies, or in seconds on some filesystems: a change within the same tick
could leave a file's signature as it was, so the signature of a file that fresh proves nothing).

Trust: only root reads or writes entries. /run/bindguard and its discovery/ are created 0700;
one that is not a directory of root's that no one else can write is not used, nor is an entry
that is a symlink, not a regular file, not root's, writable by others, too large or malformed.
A lookup imports nothing but posix (not even os, see bindguard.environment): the every-service
drop-in's fast path makes one.
"""

import posix
import sys

import bindguard

RUN_DIR = "/run/bindguard"
ENTRIES = RUN_DIR + "/discovery"
FORMAT = "bindguard-discovery 1"
MAX_ENTRY_BYTES = 1 << 20
FRESH_NS = 100_000_000  # 10 jiffies at HZ=100
COARSE_FRESH_NS = 2_000_000_000  # filesystems with whole (FAT: even) seconds
NOT_FILES = ("/proc/", "/sys/", "/dev/")  # their signatures say nothing about their contents
# Read by the C library (users and groups for a dump's credentials), where no audit hook sees it.
ALWAYS = ("/etc/passwd", "/etc/group", "/etc/nsswitch.conf")
ROOT = 0
INCOMPLETE_EVENT = "bindguard.discovery.incomplete"


class Remembered:
    """A discovery as remembered: findings as plain fields (the fast path needs no model classes)."""

    def __init__(self) -> None:
        # (endpoint text, (reuseaddr, reuseport, v6only, freebind), confidence, socket unit, survives, source, note)
        self.findings: list[tuple] = []
        self.warnings: list[str] = []
        self.daemons: list[str] = []

    def discovery(self):
        """The remembered answer as a Discovery, as discover() returned it."""
        from bindguard.model.endpoints import Bind, SocketOptions, parse_listen
        from bindguard.model.kinds import Confidence
        from bindguard.request.discover import Discovery, Finding

        findings = [Finding(Bind(parse_listen(text), SocketOptions(*options)), source, Confidence(confidence), note,
                            socket_unit or None, survives)
                    for text, options, confidence, socket_unit, survives, source, note in self.findings]
        return Discovery(findings, list(self.warnings), list(self.daemons))


# ---------------------------------------------------------------- signatures and the key


def signature(path: str, follow: bool, _stat=posix.stat, _lstat=posix.lstat) -> str:
    """What a path is now, in one string: the fields any change to it changes, or the error.

    A directory seen without following links (os.path.realpath, the trust checks of each
    directory above a file) is what it is, its owner and its mode: its entries count where it is
    listed or stat()ed, else every file saved in /etc would forget every entry.
    """
    try:
        st = _stat(path) if follow else _lstat(path)
    except OSError as exc:
        return f"-{exc.errno}"
    if not follow and st.st_mode & 0o170000 == 0o040000:  # S_ISDIR, without importing stat
        return f"{st.st_dev} {st.st_ino} {st.st_mode} {st.st_uid} {st.st_gid}"
    return (f"{st.st_dev} {st.st_ino} {st.st_mode} {st.st_uid} {st.st_gid} {st.st_size} {st.st_mtime_ns} "
            f"{st.st_ctime_ns}")


def _code_files() -> list[str]:
    """bindguard's own files whose code decides a discovery's answer: an upgrade or an edit forgets it.
    Every module of the stages a discovery runs in (the vocabulary, systemd's unit files, the
    request stage and its finders), rather than a list that a new helper module would slip past."""
    import os

    package = os.path.dirname(_install_dir())
    found = []
    for stage in ("model", "systemd", "request", os.path.join("request", "discover")):
        directory = os.path.join(package, stage)
        try:
            found += sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".py"))
        except OSError:
            pass
    return found


def _install_dir() -> str:
    """This module's directory, absolute and normalised (os.path.abspath, which the fast path does
    without: the interpreter gives an absolute, normal __file__ for a package on an absolute path)."""
    here = __file__.rpartition("/")[0]
    if here.startswith("/") and not {"", ".", ".."} & set(here.split("/")[1:]):
        return here
    import os

    return os.path.dirname(os.path.abspath(__file__))


def _key(unit: str, user: bool) -> str:
    from bindguard.model.host import host_bindv6only, ipv6_supported
    from bindguard.systemd.unitexec import unit_path

    parts = [unit, "user" if user else "system", ":".join(unit_path(user)), f"v6only={int(host_bindv6only())}",
             f"ipv6={int(ipv6_supported())}", _install_dir()]
    if user:  # %h and %t of a user unit
        environ = bindguard.environment()
        parts += [environ.get("HOME", ""), environ.get("XDG_RUNTIME_DIR", "")]
    return "\0".join(parts)


def _entry_path(unit: str, user: bool) -> str:
    """One entry per unit, manager and bindguard install (a venv and the Debian package on one
    host would otherwise take it from each other at every start)."""
    import binascii  # built in

    install = binascii.crc32(_install_dir().encode())
    return f"{ENTRIES}/{'user' if user else 'system'}-{install:08x}-{unit}"  # a unit name has no '/'


ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r", "\0": "\\0"}
UNESCAPES = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r", "0": "\0"}


def _escape(text: str) -> str:
    """No tab, line end or NUL left to split on (the unicode_escape codec would cost an import)."""
    for char, escaped in ESCAPES.items():  # the backslash first
        text = text.replace(char, escaped)
    return text


def _unescape(text: str) -> str:
    if "\\" not in text:
        return text
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\":
            out.append(UNESCAPES[text[i + 1]])  # KeyError or IndexError: a malformed entry
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


# ---------------------------------------------------------------- reading an entry


def _root_only(info) -> bool:
    return info.st_uid == ROOT and not info.st_mode & 0o022


def _trusted_dir(path: str) -> bool:
    import _stat

    try:
        info = posix.lstat(path)
    except OSError:
        return False
    return _stat.S_ISDIR(info.st_mode) and _root_only(info)


def _read_entry(path: str) -> str | None:
    import _stat

    if not (_trusted_dir(RUN_DIR) and _trusted_dir(ENTRIES)):
        return None
    try:
        fd = posix.open(path, posix.O_RDONLY | posix.O_NOFOLLOW | posix.O_NONBLOCK | posix.O_NOCTTY | posix.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = posix.fstat(fd)
        if not _stat.S_ISREG(info.st_mode) or not _root_only(info) or info.st_size > MAX_ENTRY_BYTES:
            return None
        data = posix.read(fd, MAX_ENTRY_BYTES + 1)
    except OSError:
        return None
    finally:
        posix.close(fd)
    if len(data) > MAX_ENTRY_BYTES:
        return None
    try:
        return data.decode("utf-8", "surrogateescape")
    except UnicodeDecodeError:
        return None


def lookup(unit: str, user: bool) -> Remembered | None:
    """The remembered discovery of a unit if every path it looked at is as it was; else None."""
    if posix.geteuid() != ROOT:
        return None
    text = _read_entry(_entry_path(unit, user))
    if text is None:
        return None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    # The last line counts the records: an entry cut short, even at a line's end, is no entry
    # (a truncated list of reads would otherwise vouch for fewer paths than discovery looked at).
    if len(lines) < 3 or lines[0] != FORMAT or lines[-1] != f"end\t{len(lines) - 3}":
        return None
    remembered = Remembered()
    try:
        kind, _, key = lines[1].partition("\t")
        if kind != "key" or _unescape(key) != _key(unit, user):
            return None
        for line in lines[2:-1]:
            if not line:
                continue
            kind, *fields = line.split("\t")
            if kind == "read":
                follow, path, recorded = fields
                if signature(_unescape(path), follow == "1") != recorded:
                    return None
            elif kind == "finding":
                text_, options, confidence, socket_unit, survives, source, note = map(_unescape, fields)
                flags = tuple(flag == "1" for flag in options.split(" "))
                if len(flags) != 4:
                    return None
                remembered.findings.append((text_, flags, confidence, socket_unit, tuple(survives.split(",")) if
                                            survives else (), source, note))
            elif kind == "warning":
                remembered.warnings.append(_unescape(*fields))
            elif kind == "daemon":
                remembered.daemons.append(_unescape(*fields))
            else:
                return None
    except (ValueError, TypeError, KeyError, IndexError):  # a malformed entry is no entry
        return None
    return remembered


# ---------------------------------------------------------------- recording a discovery


class Recorder:
    """Every path one discovery looked at, with its signature when first seen."""

    def __init__(self) -> None:
        import time

        self.started_ns = time.time_ns()
        self.reads: dict[tuple[str, bool], str] = {}
        self.incomplete = ""  # why the answer may not be given again

    def saw(self, path, follow: bool, recorded: str | None = None) -> None:
        if isinstance(path, int) or path is None:  # a descriptor: its path was seen when it was opened
            return
        import os  # a recording is part of a discovery, which has loaded it

        try:
            path = os.fsdecode(path)
        except TypeError:
            return
        if not path.startswith("/"):
            self.incomplete = self.incomplete or f"a relative path was read ({path!r})"
            return
        if path.startswith(NOT_FILES) or (path, follow) in self.reads or _bytecode_cache(path):
            return
        self.reads[(path, follow)] = recorded if recorded is not None else signature(path, follow)

    def audit(self, event: str, args: tuple) -> None:
        if event == "open":
            path, _, flags = args
            self.saw(path, not (isinstance(flags, int) and flags & posix.O_NOFOLLOW))
        elif event in ("os.listdir", "os.scandir"):
            self.saw(args[0] if args else ".", True)
        elif event in ("subprocess.Popen", "os.posix_spawn"):  # the program run (a dump)
            self.saw(args[0], True)
        elif event == INCOMPLETE_EVENT:
            self.incomplete = self.incomplete or str(args[0] if args else "cut short")

    def stale_by_then(self) -> str:
        """Why a signature recorded may not prove its file unchanged: one changed too recently."""
        for (path, _), recorded in self.reads.items():
            fields = recorded.split(" ")
            if len(fields) < 8:  # an error, or a directory's identity alone
                continue
            mtime, ctime = int(fields[6]), int(fields[7])
            coarse = mtime % 1_000_000_000 == 0 and ctime % 1_000_000_000 == 0
            if ctime > self.started_ns - (COARSE_FRESH_NS if coarse else FRESH_NS):
                return f"{path} changed just before"
        return ""


def _bytecode_cache(path: str) -> bool:
    """Whether the path is Python's bytecode cache (a .pyc, or its temporary .pyc.NNN, in __pycache__,
    or the directory itself; nothing else a daemon might keep there): a module imported during a discovery
    looks at its old .pyc, then writes a new one where its source changed, so the signature recorded
    was stale at once, and the next start discovered again. What the code is, is its source, which
    _code_files (bindguard's) and the import's own stat of each source file record."""
    name = path.rpartition("/")[2]
    return "/__pycache__/" in path and (name.endswith(".pyc") or ".pyc." in name) or path.endswith("/__pycache__")


_active: list[Recorder] = []
_hooked: list[bool] = []


def _hook(event: str, args: tuple) -> None:
    if _active:
        _active[-1].audit(event, args)


class recording:
    """`with recording() as recorder:` every path the block stats, opens, lists or runs is recorded."""

    def __enter__(self) -> Recorder:
        if not _hooked:  # an audit hook cannot be removed: one per process, idle outside a recording
            sys.addaudithook(_hook)
            _hooked.append(True)
        import os

        from bindguard.systemd.unitexec import look_at_directories_again

        look_at_directories_again()  # looked at before this recording: it must see them itself
        recorder = Recorder()
        real_stat, real_lstat = os.stat, os.lstat

        def recorded_stat(path, *args, dir_fd=None, follow_symlinks=True):
            if dir_fd is not None or args:
                recorder.incomplete = recorder.incomplete or "a path relative to a directory descriptor"
                return real_stat(path, *args, dir_fd=dir_fd, follow_symlinks=follow_symlinks)
            recorder.saw(path, follow_symlinks)
            return real_stat(path, follow_symlinks=follow_symlinks)

        def recorded_lstat(path, *, dir_fd=None):
            if dir_fd is not None:
                recorder.incomplete = recorder.incomplete or "a path relative to a directory descriptor"
                return real_lstat(path, dir_fd=dir_fd)
            recorder.saw(path, False)
            return real_lstat(path)

        self._real = (real_stat, real_lstat)
        # Both modules: the unit-file readers on the every-service path call posix directly (os costs
        # them its import, see bindguard.environment), and os.path calls os.stat.
        os.stat, os.lstat = posix.stat, posix.lstat = recorded_stat, recorded_lstat
        _active.append(recorder)
        return recorder

    def __exit__(self, *exc) -> None:
        import os

        _active.pop()
        os.stat, os.lstat = posix.stat, posix.lstat = self._real


def incomplete(why: str) -> None:
    """Tell a recording under way that this discovery's answer must not be remembered."""
    sys.audit(INCOMPLETE_EVENT, why)


# ---------------------------------------------------------------- writing an entry


def _ensure_dir(path: str) -> bool:
    """path as a directory of root's that no one else can write, made 0700 if missing."""
    try:
        posix.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return False
    return _trusted_dir(path)


def remember(unit: str, user: bool, recorder: Recorder, discovery) -> str:
    """Store a discovery recorded by recorder; "" when stored, else why not."""
    if posix.geteuid() != ROOT:
        return "not root"
    for path in [*ALWAYS, *_code_files()]:
        recorder.saw(path, True)
    why = recorder.incomplete or recorder.stale_by_then()
    if why:
        return why
    if not (_ensure_dir(RUN_DIR) and _ensure_dir(ENTRIES)):
        return f"{RUN_DIR} or {ENTRIES} is not a directory of root's alone"
    lines = [FORMAT, "key\t" + _escape(_key(unit, user))]
    lines += [f"read\t{int(follow)}\t{_escape(path)}\t{recorded}"
              for (path, follow), recorded in recorder.reads.items()]
    for f in discovery.findings:
        o = f.bind.options
        options = " ".join(str(int(flag)) for flag in (o.reuseaddr, o.reuseport, o.v6only, o.freebind))
        fields = (str(f.bind.endpoint), options, f.confidence, f.socket_unit or "", ",".join(f.survives), f.source,
                  f.note)
        lines.append("\t".join(["finding", *map(_escape, fields)]))
    lines += ["warning\t" + _escape(w) for w in discovery.warnings]
    lines += ["daemon\t" + _escape(d) for d in discovery.daemons]
    lines.append(f"end\t{len(lines) - 2}")  # lookup() takes an entry only whole
    target = _entry_path(unit, user)
    temporary = f"{target}.{posix.getpid()}.tmp"
    try:
        fd = posix.open(temporary, posix.O_WRONLY | posix.O_CREAT | posix.O_EXCL | posix.O_NOFOLLOW | posix.O_CLOEXEC,
                        0o600)
        try:
            posix.write(fd, ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))
        finally:
            posix.close(fd)
        posix.rename(temporary, target)
    except OSError as exc:
        try:
            posix.unlink(temporary)
        except OSError:
            pass
        return f"{target}: {exc.strerror or exc}"
    return ""


def forget(unit: str, user: bool) -> None:
    try:
        posix.unlink(_entry_path(unit, user))
    except OSError:
        pass


# ---------------------------------------------------------------- discovery through the cache


def discover_from_files(unit: str, user: bool, sources: list[str]):
    """discover_unit() with the unit's facts from its unit files, remembered when discovery runs
    with every source (no YAML file narrows it) and the guard is root; None when the unit's files
    give it no ExecStart= (not on disk: the caller may ask systemd)."""
    from bindguard.model.kinds import DISCOVERY_SOURCES
    from bindguard.request import discover
    from bindguard.systemd.unitfacts import unit_facts_from_files

    def run():
        facts = unit_facts_from_files(unit, user)
        if not facts.exec_start:
            return None
        return discover.discover_unit(unit, lambda name: facts, sources)

    if set(sources) != set(DISCOVERY_SOURCES) or posix.geteuid() != ROOT:
        return run()
    remembered = lookup(unit, user)
    if remembered is not None:
        return remembered.discovery()
    with recording() as recorder:
        result = run()
    if result is not None:
        remember(unit, user, recorder, result)
    return result
