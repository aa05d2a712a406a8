"""bindguard: will this daemon's bind() succeed, and if not, who is in the way?"""

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
