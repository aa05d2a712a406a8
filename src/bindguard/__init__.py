"""bindguard: will this daemon's bind() succeed, and if not, who is in the way?

Below every stage, so that each may use it: the version, the environment read without os, the
dependencies found on demand, and the record of a stop signal.
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
    environment the process started with, decoded as os decodes it.
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
