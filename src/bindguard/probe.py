"""The trial bind: ask the kernel itself whether the daemon's sockets can be bound.

Every requested socket is created with the daemon's options, bound and (TCP) listened, and
all are held open together, as the daemon holds them, then closed. A listening socket that
never accepted a connection closes without leaving TIME_WAIT behind.

Only _socket and errno are imported at module level: `trial()` is the clear path's whole cost.
"""

from __future__ import annotations

import errno
import _socket

IP_FREEBIND = 15
IPV6_FREEBIND = 78

# One socket to try: (family, type, sockaddr, reuseaddr, reuseport, v6only, freebind)
Spec = tuple


def _set_fsuid(uid: int) -> int:
    """setfsuid(2): the uid new sockets are created with, without giving up capabilities."""
    import ctypes

    return ctypes.CDLL(None, use_errno=True).setfsuid(uid)


def _open(spec: Spec, socket_uid: int | None) -> _socket.socket:
    family, kind, _, reuseaddr, reuseport, v6only, freebind = spec
    if socket_uid is None:
        sock = _socket.socket(family, kind)
    else:
        # The kernel compares the uid a socket was created with (SO_REUSEPORT is only shared
        # within one uid), so the trial socket must carry the daemon's uid.
        previous = _set_fsuid(socket_uid)
        try:
            sock = _socket.socket(family, kind)
        finally:
            _set_fsuid(previous)
    try:
        if reuseaddr:
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEPORT, 1)
        if family == _socket.AF_INET6:
            sock.setsockopt(_socket.IPPROTO_IPV6, _socket.IPV6_V6ONLY, int(v6only))
        if freebind:
            if family == _socket.AF_INET6:
                sock.setsockopt(_socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
            else:
                sock.setsockopt(_socket.IPPROTO_IP, IP_FREEBIND, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def _attempt(spec: Spec, held: list, socket_uid: int | None) -> tuple[int, str]:
    sock = _open(spec, socket_uid)
    held.append(sock)
    try:
        sock.bind(spec[2])
    except OSError as exc:
        return exc.errno or errno.EIO, "bind"
    if spec[1] == _socket.SOCK_STREAM:
        try:
            sock.listen(1)
        except OSError as exc:
            return exc.errno or errno.EIO, "listen"
    return 0, ""


def trial(specs: list[Spec], socket_uid: int | None = None) -> list[tuple[int, str]]:
    """Bind (and listen) every socket together; (errno, failing step) for each, (0, "") if it worked."""
    held: list = []
    try:
        return [_attempt(spec, held, socket_uid) for spec in specs]
    finally:
        for sock in held:
            sock.close()


def effective_uid(socket_uid: int | None) -> int | None:
    """The uid to create trial sockets with, or None for the guard's own (no privilege to change it)."""
    import os

    if socket_uid is None or os.geteuid() != 0 or socket_uid == os.geteuid():
        return None
    return socket_uid


def probe(binds: list, socket_uid: int | None = None) -> list:
    """Try every Bind of the request together; one facts.ProbeResult per bind, in order.

    An address in use that binds fine alone is blocked by the request itself (say `0.0.0.0:80`
    beside a dual-stack `[::]:80`); its result names the earlier bind that is in the way.
    `socket_uid`: create the sockets as this uid (the daemon's User=) when running as root.
    """
    from bindguard.facts import ProbeResult

    socket_uid = effective_uid(socket_uid)
    specs = [_spec(b) for b in binds]
    results = []
    for index, (bind, (error, step)) in enumerate(zip(binds, trial(specs, socket_uid))):
        collides_with = None
        if error == errno.EADDRINUSE and index > 0 and trial([specs[index]], socket_uid)[0][0] == 0:
            collides_with = _first_blocker(binds[:index], specs[:index], specs[index], socket_uid)
            if collides_with is None:  # the obstacle left between the two tries
                error, step = 0, ""
        results.append(ProbeResult(bind, error, step, collides_with))
    return results


def _spec(bind) -> Spec:
    ep, opts = bind.endpoint, bind.options
    kind = _socket.SOCK_STREAM if ep.proto == "tcp" else _socket.SOCK_DGRAM
    try:
        sockaddr = ep.sockaddr()
    except OSError:  # an interface name that does not exist: the kernel would say ENODEV
        sockaddr = (str(ep.host), ep.port, 0, 0xFFFFFFFF)
    return (ep.family, kind, sockaddr, opts.reuseaddr, opts.reuseport, bind.v6only, opts.freebind)


def _first_blocker(earlier: list, earlier_specs: list[Spec], spec: Spec, socket_uid: int | None):
    for other, other_spec in zip(earlier, earlier_specs):
        outcome = trial([other_spec, spec], socket_uid)
        if outcome[0][0] == 0 and outcome[1][0] == errno.EADDRINUSE:
            return other
    return None
