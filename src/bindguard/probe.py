"""The trial bind: ask the kernel itself whether the daemon's sockets can be bound.

Every requested socket is created with the daemon's options, bound and (TCP) listened, and
all are held open together, as the daemon holds them, then closed. A listening socket that
never accepted a connection closes without leaving TIME_WAIT behind.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from dataclasses import dataclass

from bindguard.endpoints import TCP, Bind

IP_FREEBIND = 15
IPV6_FREEBIND = 78


@dataclass(frozen=True)
class ProbeResult:
    bind: Bind
    error: int = 0  # errno of the failing step, 0 when the socket bound (and listened)
    step: str = ""  # "bind" or "listen" when it failed there
    collides_with: Bind | None = None  # another socket of the same request, when that is the obstacle

    @property
    def ok(self) -> bool:
        return self.error == 0

    @property
    def error_name(self) -> str:
        return errno.errorcode.get(self.error, str(self.error)) if self.error else ""


def _set_fsuid(uid: int) -> int:
    """setfsuid(2): the uid new sockets are created with, without giving up capabilities."""
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.setfsuid(uid)


def _open(bind: Bind, socket_uid: int | None) -> socket.socket:
    ep, opts = bind.endpoint, bind.options
    kind = socket.SOCK_STREAM if ep.proto == TCP else socket.SOCK_DGRAM
    if socket_uid is None:
        sock = socket.socket(ep.family, kind)
    else:
        # The kernel compares the uid a socket was created with (SO_REUSEPORT is only shared
        # within one uid), so the trial socket must carry the daemon's uid.
        previous = _set_fsuid(socket_uid)
        try:
            sock = socket.socket(ep.family, kind)
        finally:
            _set_fsuid(previous)
    try:
        if opts.reuseaddr:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if opts.reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if ep.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(opts.v6only))
        if opts.freebind:
            if ep.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def _attempt(bind: Bind, held: list[socket.socket], socket_uid: int | None) -> tuple[int, str]:
    sock = _open(bind, socket_uid)
    held.append(sock)
    try:
        sock.bind(bind.endpoint.sockaddr())
    except OSError as exc:
        return exc.errno or errno.EIO, "bind"
    if bind.endpoint.proto == TCP:
        try:
            sock.listen(1)
        except OSError as exc:
            return exc.errno or errno.EIO, "listen"
    return 0, ""


def _try_together(binds: list[Bind], socket_uid: int | None) -> list[tuple[int, str]]:
    held: list[socket.socket] = []
    try:
        return [_attempt(bind, held, socket_uid) for bind in binds]
    finally:
        for sock in held:
            sock.close()


def probe(binds: list[Bind], socket_uid: int | None = None) -> list[ProbeResult]:
    """Bind (and listen) every socket of the request together; one result per bind, in order.

    An address in use that binds fine alone is blocked by the request itself (say `0.0.0.0:80`
    beside a dual-stack `[::]:80`); its result names the earlier bind that is in the way.
    `socket_uid`: create the sockets as this uid (the daemon's User=) when running as root.
    """
    if socket_uid is not None and (os.geteuid() != 0 or socket_uid == os.geteuid()):
        socket_uid = None
    outcomes = _try_together(binds, socket_uid)
    results = []
    for index, (bind, (error, step)) in enumerate(zip(binds, outcomes)):
        collides_with = None
        if error == errno.EADDRINUSE and index > 0:
            if _try_together([bind], socket_uid)[0][0] == 0:
                collides_with = _first_blocker(binds[:index], bind, socket_uid)
                error, step = (0, "") if collides_with is None else (error, step)
        results.append(ProbeResult(bind, error, step, collides_with))
    return results


def _first_blocker(earlier: list[Bind], bind: Bind, socket_uid: int | None) -> Bind | None:
    for other in earlier:
        outcome = _try_together([other, bind], socket_uid)
        if outcome[0][0] == 0 and outcome[1][0] == errno.EADDRINUSE:
            return other
    return None
