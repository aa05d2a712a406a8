"""bindguard: will this daemon's bind() succeed, and if not, who is in the way?

Below every stage, so that each may use it: the version, the environment read without os, the
dependencies found on demand, the record of a stop signal, the one walk that resolves a path's
symlinks (strict for the trust check, not for the unit lookup), and the one check of whether a
path is trusted (root's alone, every directory above it too), with posix alone: the fast path's
environment search paths and bus socket are checked by it as discovery's dump programs are.
"""

__version__ = "0.1.0"

_started_with: dict[str, str] = {}


def environment():
    """The process's environment, str to str, without importing os.

    `bindguard check` on its common paths (cli/fastpath.py) loads no module it can do without,
    and os is the largest: 0.8 ms of an interpreter's start (its environ mapping pulls in
    _collections_abc), close to a tenth of the guard's whole run before every service start. Those
    paths call posix directly, and read the environment here. Once os is loaded its environ is the
    authority (whoever loaded it may have changed it since); before that, posix.environ is the
    environment the process started with (but SETUPTOOLS_USE_DISTUTILS, which bin/bindguard
    sets to stdlib in it first), decoded as os decodes it.
    """
    import sys

    os = sys.modules.get("os")
    if os is not None:
        return os.environ
    if not _started_with:
        import posix

        encoding = sys.getfilesystemencoding()
        _started_with.update((key.decode(encoding, "surrogateescape"), value.decode(encoding, "surrogateescape"))
                             for key, value in posix.environ.items())
    return _started_with


def find_dependencies() -> None:
    """Make PyYAML and pystemd importable: run the site processing bin/bindguard skipped (-S).

    Called just before either is imported, not for every full command: in a venv site costs
    about 1.8 ms (it reads every .pth file), a fifth of an empty interpreter's start, and most
    runs of the guard (a daemon's discovery, a refusal from a shell) import neither. The
    launcher has already put bindguard itself on sys.path; without -S site has run at start.
    """
    import sys

    if sys.flags.no_site and "site" not in sys.modules:
        import site

        site.main()


class Stopped(BaseException):
    """A stop signal arrived: SIGTERM (systemd stopping the unit), SIGHUP (a terminal closing) or
    SIGINT (Ctrl-C). The handler bindguard.cli installs records it in `stops`, then raises this.
    Not KeyboardInterrupt: one escaping an exec() of a string (dataclasses, namedtuple) marks the
    interpreter, and under `python -m` CPython 3.11 then ends the process by SIGINT itself instead
    of with the exit code the command returned."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# The stop signals received, first first. Python swallows an exception raised where it cannot
# propagate (a weakref callback, a __del__: "Exception ignored in ..."); every waiting loop calls
# stop_if_asked(), so that a stop swallowed so still ends the command within a poll interval.
stops: list[int] = []


def stop_if_asked() -> None:
    """Raise Stopped again if a stop signal arrived, its first raising swallowed or not."""
    if stops:
        raise Stopped(stops[0])


ROOT = 0
SYMLINKS_MAX = 40  # links one path may pass through before the kernel says ELOOP (MAXSYMLINKS)


def real_path(path: str, links: list[str] | None = None, strict: bool = True) -> str:
    """os.path.realpath(path, strict=strict) as Python 3.11 gives it, with posix alone, within the
    kernel's SYMLINKS_MAX links: the path with every symlink, `.` and `..` resolved. One walk for
    both meanings, which part only at a link and at a part that cannot be examined. Each symlink
    passed on the way is added to links, by a path that holds no other link.

    strict, the trust checks' (where the kernel takes the path): OSError when some part of it is
    missing or not a directory, or past SYMLINKS_MAX links, each counted every time it is passed,
    as the kernel counts them (a loop of links ends there too).

    Not strict, the unit lookup's (where a linked unit file leads, read as it always has been): a
    part that cannot be examined is taken as written and the walk goes on, so a `..` after it goes
    up again. A link met again is not walked again (os.path remembers where each led), so the bound
    counts different links; past it the path is given back as it is, so that opening it fails with
    ELOOP, as systemd's would, where os.path would go on (a chain a user's linked unit can make as
    long as it likes: os.path recursed into RecursionError). A loop of links (whose rest os.path
    normalizes) and a relative path (rare: a unit search path from a relative $HOME) are left to
    os.path itself, loaded only then.
    """
    import _stat
    import posix

    if not strict and not path.startswith("/"):
        return _os_realpath(path)
    if not path:
        raise FileNotFoundError(2, "No such file or directory", path)
    # What is left to walk, next last. Not strict, "" (no name) is pushed below a link's target and
    # the link's path below it: once the target is walked, the link leads where the walk is then.
    pending = [name for name in path.split("/") if name][::-1]
    resolved = "" if path.startswith("/") else posix.getcwd().rstrip("/")  # "" is /
    passed = 0
    led: dict[str, str | None] = {}  # not strict: where each link met leads (None while its target is walked)
    while pending:
        name = pending.pop()
        if not name:
            led[pending.pop()] = resolved
            continue
        if name == ".":
            continue
        if name == "..":
            resolved = resolved.rpartition("/")[0]  # resolved holds no link: its parent is physical
            continue
        candidate = resolved + "/" + name
        try:
            is_link = _stat.S_ISLNK(posix.lstat(candidate).st_mode)
        except OSError:
            if strict:
                raise
            is_link = False  # missing, or not a directory on the way: taken as written
        if not is_link:
            resolved = candidate
            continue
        if links is not None:
            links.append(candidate)
        if strict:
            passed += 1
            if passed > SYMLINKS_MAX:
                raise OSError(40, "Too many levels of symbolic links", path)  # ELOOP
        elif candidate in led:
            known = led[candidate]
            if known is None:  # a loop
                return _os_realpath(path)
            resolved = known
            continue
        elif len(led) >= SYMLINKS_MAX:
            return path
        else:
            led[candidate] = None
            pending += [candidate, ""]
        target = posix.readlink(candidate)
        if target.startswith("/"):
            resolved = ""
        pending += [name for name in target.split("/") if name][::-1]
    return resolved or "/"


def _os_realpath(path: str) -> str:
    import os

    return os.path.realpath(path)


def resolve_trusted(path: str, owners: tuple[int, ...] = (ROOT,)) -> tuple[str, str | None]:
    """(path with its symlinks resolved, why that path is not trusted: None when it is).

    Trusted: the path and every directory above it belong to one of owners (root, and where the
    caller says so the guard's own user), and no one else can write any of them: not other users,
    not a group but root's. So do each symlink passed on the way to it and the directories above
    that link: whoever can re-point a link decides where the path leads. A world-writable
    directory above the path is excused by its sticky bit (no one else can rename or remove what
    is in it, /tmp); the path itself is not, for a directory whose entries are read (a search
    path) is no one's alone when every user may add one. A socket may be writable by all: that is
    who may connect to it.
    What another user could change, or re-point through a symlink, must not decide what the root
    guard reads, runs or asks. OSError when the path cannot be resolved (real_path).
    """
    links: list[str] = []
    real = real_path(path, links)
    for start in (real, *links):
        why = _chain_flaw(start, owners, link=start != real)
        if why:
            return real, why
    return real, None


def _chain_flaw(start: str, owners: tuple[int, ...], link: bool) -> str | None:
    """Why start (a path holding no symlink but, with link, itself one) or a directory above it is
    not trusted as resolve_trusted() says; None when all are."""
    import _stat
    import posix

    part = start
    while True:
        try:
            info = posix.lstat(part)
        except OSError as exc:
            return f"{part}: {exc.strerror or exc}"
        passed_link = link and part == start
        if _stat.S_ISLNK(info.st_mode) and not passed_link:  # swapped in since it was resolved: someone could
            return f"{part} changed while it was checked"
        if info.st_uid not in owners:
            return f"{part} belongs to uid {info.st_uid}, not {_owners_named(owners)}"
        # A socket's write bit lets one connect (the system bus is 0666), not change it; a link's
        # mode is always 0777 and means nothing.
        excused = passed_link or _stat.S_ISSOCK(info.st_mode) or (
            part != start and _stat.S_ISDIR(info.st_mode) and info.st_mode & _stat.S_ISVTX)
        if info.st_mode & _stat.S_IWOTH and not excused:
            return f"{part} can be written by every user"
        if info.st_mode & _stat.S_IWGRP and info.st_gid != ROOT and not excused:
            return f"{part} can be written by group {info.st_gid}"
        if part == "/":
            return None
        part = part.rpartition("/")[0] or "/"


def untrusted(path: str, owners: tuple[int, ...] = (ROOT,)) -> str | None:
    """Why path (symlinks followed) is not trusted as resolve_trusted() says, or None when it is."""
    return checked_path(path, owners)[1]


def checked_path(path: str, owners: tuple[int, ...] = (ROOT,)) -> tuple[str, str | None]:
    """resolve_trusted(), with a path that cannot be resolved given back as it is and why, not raised:
    (the path to use, its links resolved, why it is not trusted or None)."""
    try:
        return resolve_trusted(path, owners)
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        return path, f"{path}: {getattr(exc, 'strerror', None) or exc}"


def _owners_named(owners: tuple[int, ...]) -> str:
    return " or ".join("root" if uid == ROOT else f"uid {uid} (this user)" for uid in dict.fromkeys(owners))
