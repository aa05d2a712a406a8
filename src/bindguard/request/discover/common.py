"""What every daemon finder shares: findings, addresses, includes, host names, and the one reader
of daemon configuration files with the budget of one discovery."""

from __future__ import annotations

import contextlib
import contextvars
import errno
import functools
import ipaddress
import itertools
import os
import time

from bindguard.model.endpoints import (
    TCP,
    AddressError,
    Bind,
    Endpoint,
    SocketOptions,
    ascii_port,
    parse_listen,
)
from bindguard.model.host import host_bindv6only, ipv6_supported
from bindguard.model.kinds import ANY_KIND, Confidence
from bindguard.model.record import Record, field, replace
from bindguard.model.text import excerpt
from bindguard.request import files
from bindguard.request.cache import incomplete

# What one discovery (one unit, or one `bindguard discover`) may cost. A daemon's configuration
# can belong to its service's user (Debian's /etc/redis/redis.conf belongs to redis), so every
# include is hostile input to the root guard. Debian's default trees are 1 to 60 files of a few
# KiB each: these bounds are far above them and far below what would delay a start.
MAX_FILE_BYTES = 1 << 20  # one file
MAX_FILES = 1000  # files read, and entries of each include glob or directory
MAX_BYTES = 16 << 20  # all files read, and a daemon's dump
MAX_SECONDS = 10.0  # reading, parsing and a daemon's dump together
# How deep includes may nest: the file a daemon starts from is at depth 0, a file it includes at 1.
# Where the daemon has a limit, its finder reads exactly as deep and does past it what the daemon does
# (DAEMON_INCLUDE_DEPTH; checked against Debian 12's daemons by tests/test_discover_bounds.py). nginx and
# redis set none (nginx reads 1,200 nested files): their finders stop at MAX_INCLUDE_DEPTH, bindguard's
# own bound, which ends an include loop long before Python's recursion limit; a deeper tree, which the
# daemon would read, leaves the unit's addresses unknown, with a warning that says so.
MAX_INCLUDE_DEPTH = 16
DAEMON_INCLUDE_DEPTH = {
    # servconf.c SERVCONF_MAX_DEPTH: a file deeper is fatal ("Too many recursive configuration includes")
    "sshd": 16,
    # CONF_FILE_MAX_DEPTH (guc-file.l): a file deeper, even a missing include_if_exists, fails the start
    "postgres": 10,
    # my_default.c max_recursion_level: a `!` directive in a file at this depth is skipped with a
    # warning, and the rest of the file is read
    "mysql": 10,
    # AP_MAX_INCLUDE_DEPTH (core.c include_config): an Include in a file at this depth fails the
    # configuration, whether it names a file or not
    "apache": 128,
}


class DaemonConfigError(Exception):
    """A daemon's configuration file that cannot be read or parsed; str() names the file (and line)."""


class Finding(Record, frozen=True):
    """One socket a unit will bind (or systemd binds for it), where that was learnt, and how sure it is."""

    bind: Bind
    source: str  # "/etc/nginx/sites-enabled/default:22", "sshd -T", "ExecStart=", "nginx.socket"
    confidence: Confidence
    note: str = ""
    socket_unit: str | None = None  # set when systemd binds it (socket activation): the daemon does not
    survives: tuple[str, ...] = ()  # conflict kinds the daemon starts despite (ANY_KIND: any)

    @property
    def confident(self) -> bool:
        return self.confidence == Confidence.CONFIDENT


class Findings(Record):
    """What one finder learnt: findings, and warnings about what it could not read."""

    daemon: str
    findings: list[Finding] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add(self, endpoint: Endpoint, source: str, *, confident: bool = True, reuseaddr: bool = True,
            reuseport: bool = False, v6only: bool | None = None, freebind: bool = False, note: str = "",
            survives: tuple[str, ...] = ()) -> None:
        """Record a socket; v6only None means the daemon leaves the host default (net.ipv6.bindv6only)."""
        if endpoint.host.version == 4:
            v6only = False
        elif v6only is None:
            v6only = host_bindv6only()
        options = SocketOptions(reuseaddr=reuseaddr, reuseport=reuseport, v6only=v6only, freebind=freebind)
        bind = Bind(endpoint, options)
        # A set of what was found: a configuration the service's user may write can list thousands
        # of addresses (haproxy's port ranges), and comparing each to all before it took minutes.
        seen = self.__dict__.get("_seen")
        if seen is None or len(seen) != len(self.findings):  # findings added or replaced by hand
            seen = self.__dict__["_seen"] = {f.bind for f in self.findings}
        if bind in seen:
            return
        seen.add(bind)
        confidence = Confidence.CONFIDENT if confident else Confidence.GUESS
        self.findings.append(Finding(bind, source, confidence, note, survives=survives))

    def all_survivable(self, note: str) -> None:
        """The daemon starts when at least one of several sockets binds (sshd, PostgreSQL)."""
        if len(self.findings) > 1:
            self.findings = [replace(f, survives=(ANY_KIND,), note="; ".join(n for n in (f.note, note) if n))
                             for f in self.findings]

    def warn(self, message: str) -> None:
        self.warnings.append(message)


# Longer than any address a socket takes (45 characters of IPv6, a zone of at most 20 more).
ADDRESS_CHARS = 80


def endpoint(host: str, port: int, proto: str = TCP) -> Endpoint:
    """An Endpoint from a literal address (no brackets) and a port; raises AddressError. The
    address comes from a file the service's user may write: parse_listen's message, which quotes
    it whole, is kept only for an address short enough to quote."""
    literal = f"[{host}]" if ":" in host else host
    try:
        return parse_listen(f"{proto}:{literal}:{port}")
    except AddressError:
        if len(host) <= ADDRESS_CHARS:
            raise
        raise AddressError(f"{excerpt(host, ADDRESS_CHARS)} ({len(host)} characters) is not an address a "
                           f"socket can bind") from None


def wildcard(port: int, version: int, proto: str = TCP) -> Endpoint:
    return endpoint("::" if version == 6 else "0.0.0.0", port, proto)


def any_dual(port: int, proto: str = TCP) -> Endpoint:
    """The all-addresses endpoint a dual-stack daemon binds: [::] where the host has IPv6, else 0.0.0.0."""
    return wildcard(port, 6 if ipv6_supported() else 4, proto)


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.split("%", 1)[0])
        return True
    except ValueError:
        return False


def hosts_file_addresses(name: str, hosts_file: str = "/etc/hosts") -> list[str]:
    """The addresses /etc/hosts gives a name, in file order. No DNS: the guard must not hang at boot."""
    found: list[str] = []
    try:
        with open(hosts_file, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split("#", 1)[0].split()
                if (len(fields) >= 2 and name.lower() in (n.lower() for n in fields[1:]) and is_ip(fields[0])
                        and fields[0] not in found):
                    found.append(fields[0])
    except OSError:
        pass
    if not found and name.lower() == "localhost":
        found = ["127.0.0.1", "::1"] if ipv6_supported() else ["127.0.0.1"]
    return found


def host_addresses(host: str, findings: Findings, where: str) -> list[str]:
    """A literal address as itself; a name through /etc/hosts, with a warning when it is not there."""
    if is_ip(host):
        return [host]
    addresses = hosts_file_addresses(host)
    if not addresses:
        findings.warn(f"{where}: host name {excerpt(host)} is not in /etc/hosts and bindguard does not ask DNS; "
                      f"that address is left out")
    return addresses


class BudgetExceeded(DaemonConfigError):
    """Discovery has read as many files or bytes, or spent as long, as one discovery may."""


def _cut_short(why: str) -> None:
    """A discovery that stopped on its budget: its answer depends on more than the files it read."""
    from bindguard.request.cache import incomplete

    incomplete(why)


class Budget:
    """Files, bytes and time left to one discovery; spending past them raises BudgetExceeded."""

    def __init__(self, files: int = MAX_FILES, size: int = MAX_BYTES, seconds: float = MAX_SECONDS) -> None:
        self.files_left = files
        self.bytes_left = size
        self.deadline = time.monotonic() + seconds
        self.limits = (files, size, seconds)

    def seconds_left(self) -> float:
        return max(self.deadline - time.monotonic(), 0.0)

    def spend(self, path: str, files: int = 0, size: int = 0) -> None:
        files_limit, bytes_limit, seconds_limit = self.limits
        if time.monotonic() > self.deadline:
            _cut_short("its time budget")
            raise BudgetExceeded(f"{path}: discovery stopped after {seconds_limit:g} s (an include loop, or "
                                 f"files that include each other many times?)")
        self.files_left -= files
        if self.files_left < 0:
            raise BudgetExceeded(f"{path}: discovery stopped after {files_limit} files (an include loop, or "
                                 f"files that include each other many times?)")
        self.bytes_left -= size
        if self.bytes_left < 0:
            raise BudgetExceeded(f"{path}: discovery stopped after {bytes_limit >> 20} MiB read")


class IncludeDepth:
    """How deep a finder is in its daemon's includes; limit: the deepest a file may be (DAEMON_INCLUDE_DEPTH)."""

    def __init__(self, directive: str, limit: int = MAX_INCLUDE_DEPTH) -> None:
        self.directive = directive  # as the daemon's files write it, for the message
        self.limit = limit
        self.reading = 0  # files being read: the innermost is at depth reading - 1

    @property
    def full(self) -> bool:
        """Whether a file included by the one being read would be deeper than the limit."""
        return self.reading > self.limit

    def too_deep(self, where: str) -> DaemonConfigError:
        return DaemonConfigError(f"{where}: {self.directive} nested more than {self.limit} deep (an include loop?)")

    @contextlib.contextmanager
    def entering(self, path: str):
        """Reading path, one include deeper; DaemonConfigError where that is deeper than the limit."""
        if self.full:
            raise self.too_deep(path)
        self.reading += 1
        try:
            yield
        finally:
            self.reading -= 1


class Service(Record, frozen=True):
    """Whom a discovery is for: the unit's User= and Group= ("": root, as systemd runs it) and its
    EnvironmentFile=s, which decide as whom a daemon's dump may run (bindguard.request.discover.dump)."""

    user: str = ""
    group: str = ""
    environment_files: tuple[str, ...] = ()


class _Scope(Record):
    budget: Budget
    service: Service


_scope: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar("bindguard_discovery", default=None)


@contextlib.contextmanager
def discovery_scope(service: Service | None = None):
    """One discovery: one budget for everything read inside the block, and the service it is for.
    Inside an enclosing discovery, that one's budget and service."""
    if _scope.get() is not None:
        yield
        return
    token = _scope.set(_Scope(Budget(), service or Service()))
    try:
        yield
    finally:
        _scope.reset(token)


def bounded(find):
    """A finder's entry point, run as one discovery (its caller's, if it runs in one)."""
    @functools.wraps(find)
    def wrapper(*args, **kwargs):
        with discovery_scope():
            return find(*args, **kwargs)
    return wrapper


def current_budget() -> Budget:
    """The budget of the discovery under way; outside one, a fresh one for this call alone."""
    scope = _scope.get()
    return scope.budget if scope else Budget()


def current_service() -> Service:
    scope = _scope.get()
    return scope.service if scope else Service()


def read_text(path: str) -> str:
    """A daemon configuration file's text, as every finder reads one: only a regular file (never a
    FIFO, a device or a directory), at most MAX_FILE_BYTES of it, within the discovery's budget.
    Raises DaemonConfigError (BudgetExceeded once the budget is spent) naming the file."""
    budget = current_budget()
    budget.spend(path, files=1)
    try:
        data = files.read_regular(path, MAX_FILE_BYTES)
    except files.Refused as exc:
        raise DaemonConfigError(f"{path}: {exc}; not read") from None
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR):  # a missing file is recorded as missing
            incomplete(f"{path} could not be read")  # EACCES, EIO, EMFILE: the next run may read it
        raise DaemonConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    budget.spend(path, size=len(data))
    return data.decode("utf-8", errors="replace")


def _at_most(paths, where: str) -> list[str]:
    """At most MAX_FILES entries of an include glob or directory, else BudgetExceeded."""
    found = list(itertools.islice(paths, MAX_FILES + 1))
    if len(found) > MAX_FILES:
        raise BudgetExceeded(f"{where}: more than {MAX_FILES} entries; discovery does not read that many")
    current_budget().spend(where)
    return found


def expand_glob(pattern: str, base: str) -> list[str]:
    """An include pattern relative to base, its matches sorted as the daemons' glob() sorts them."""
    import glob

    path = pattern if os.path.isabs(pattern) else os.path.join(base, pattern)
    if glob.has_magic(path):
        return sorted(_at_most(glob.iglob(path), path))
    return [path]


def list_directory(directory: str) -> list[str]:
    """The names in an included directory, sorted; DaemonConfigError when it cannot be listed."""
    try:
        with os.scandir(directory) as entries:
            return sorted(_at_most((e.name for e in entries), directory))
    except OSError as exc:
        raise DaemonConfigError(f"{directory}: cannot list: {exc.strerror or exc}") from None


def parse_port(text: str, where: str) -> int:
    port = ascii_port(text)
    if port is None:
        raise DaemonConfigError(f"{where}: {excerpt(text)} is not a port number")
    return port


__all__ = [
    "AddressError", "Budget", "BudgetExceeded", "DaemonConfigError", "Finding", "Findings", "IncludeDepth",
    "Service", "any_dual", "bounded", "current_budget", "current_service", "discovery_scope", "endpoint",
    "expand_glob", "host_addresses", "hosts_file_addresses", "is_ip", "list_directory", "parse_port", "read_text",
    "wildcard",
]
