"""The trial bind: ask the kernel itself whether the daemon's sockets can be bound.

Every requested socket is created with the daemon's options, bound and (TCP) listened, and
the sockets on one port are held open together, as the daemon holds them, then closed (only
sockets on the same port can collide with each other). A listening socket that
never accepted a connection closes without leaving TIME_WAIT behind.

Only _socket and errno are imported at module level: `trial()` is the clear path's whole cost.
"""

import _socket
import errno

IP_FREEBIND = 15
IPV6_FREEBIND = 78

# One socket to try: (family, type, sockaddr, reuseaddr, reuseport, v6only, freebind[, device])
Spec = tuple


def _set_fsuid(uid: int) -> int:
    """setfsuid(2): the uid new sockets are created with, without giving up capabilities."""
    import ctypes

    return ctypes.CDLL(None, use_errno=True).setfsuid(uid)


def _open(spec: Spec, socket_uid: int | None) -> _socket.socket:
    family, kind, _, reuseaddr, reuseport, v6only, freebind, *device = spec
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
        if device and device[0]:
            try:
                sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_BINDTODEVICE, device[0].encode())
            except OSError:
                pass  # systemd too only warns when BindToDevice= cannot be set, and binds without it
    except BaseException:
        sock.close()
        raise
    return sock


def _opened(spec: Spec, held: list, socket_uid: int | None) -> int:
    """Create spec's socket with its options into held (None where that failed); its errno or 0."""
    try:
        held.append(_open(spec, socket_uid))
    except OSError as exc:  # EAFNOSUPPORT: no IPv6 in this namespace, as the daemon will find too
        held.append(None)
        return exc.errno or errno.EIO
    return 0


def _bound(sock: _socket.socket, spec: Spec) -> tuple[int, str]:
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


def _held_together(specs: list[Spec], socket_uid: int | None) -> list[tuple[int, str]]:
    """Every socket is created and given its options first, then bound and listened, then all are
    closed: the address is taken only from the first bind() to the close, so that another guard
    checking it meanwhile (units started together) is less likely to meet the trial."""
    held: list = []
    try:
        errors = [_opened(spec, held, socket_uid) for spec in specs]
        return [(error, "socket") if error else _bound(sock, spec)
                for error, sock, spec in zip(errors, held, specs, strict=True)]
    finally:
        for sock in held:
            if sock is not None:
                sock.close()


def _same_port_groups(specs: list[Spec]) -> list[list[int]]:
    """Indices of the specs by protocol and port, in order: only sockets on one port can collide
    with each other, so only they need to be held together."""
    groups: dict[tuple, list[int]] = {}
    for index, spec in enumerate(specs):
        groups.setdefault((spec[1], spec[2][1]), []).append(index)
    return list(groups.values())


def trial(specs: list[Spec], socket_uid: int | None = None) -> list[tuple[int, str]]:
    """Bind (and listen) every socket, those on one port together; (errno, failing step) for each,
    (0, "") if it worked. Sockets are held no longer than their port's group needs: another
    guard checking the same address meanwhile is less likely to meet them, and a request of a
    thousand ports needs a few file descriptors, not a thousand."""
    results: list = [None] * len(specs)
    for group in _same_port_groups(specs):
        outcome = _held_together([specs[i] for i in group], socket_uid)
        if any(error == errno.EMFILE for error, _ in outcome) and _raise_fd_limit():
            outcome = _held_together([specs[i] for i in group], socket_uid)
        for index, answer in zip(group, outcome, strict=True):
            results[index] = answer
    return results


_fd_limit_raised = False


def _raise_fd_limit() -> bool:
    """Raise the soft RLIMIT_NOFILE to the hard one, once; True if that gave more room."""
    global _fd_limit_raised
    if _fd_limit_raised:
        return False
    _fd_limit_raised = True
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft >= hard:
        return False
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return False
    return True


def fd_limits() -> tuple[int, int]:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)


def effective_uid(socket_uid: int | None) -> int | None:
    """The uid to create trial sockets with, or None for the guard's own (no privilege to change it)."""
    import os

    if socket_uid is None or os.geteuid() != 0 or socket_uid == os.geteuid():
        return None
    return socket_uid


# The guard's own failures, not the kernel's answer about an address: out of file descriptors
# (the process's, the system's), out of buffer space or memory.
OWN_FAILURES = {
    errno.EMFILE: "the guard is out of file descriptors",
    errno.ENFILE: "the system's file table is full (fs.file-max)",
    errno.ENOBUFS: "the kernel has no buffer space left for a socket",
    errno.ENOMEM: "the kernel has no memory left for a socket",
}


def probe(binds: list, socket_uid: int | None = None) -> list:
    """Try every Bind of the request (those on one port together); one facts.ProbeResult per bind.

    An address in use that binds fine alone is blocked by the request itself (say `0.0.0.0:80`
    beside a dual-stack `[::]:80`); its result names the earlier bind on its port that is in the
    way. `socket_uid`: create the sockets as this uid (the daemon's User=) when running as root.
    Raises GuardFailure when the guard itself could not ask the kernel (EMFILE, ENOBUFS, ...).
    """
    from bindguard.model.facts import ProbeResult

    socket_uid = effective_uid(socket_uid)
    specs = [_spec(b) for b in binds]
    answers = trial(specs, socket_uid)
    _raise_own_failure(binds, answers)
    results = []
    for index, (bind, (error, step)) in enumerate(zip(binds, answers, strict=True)):
        collides_with = None
        earlier = [i for i in range(index) if specs[i][1] == specs[index][1] and specs[i][2][1] == specs[index][2][1]] \
            if error == errno.EADDRINUSE else []  # only a refused bind is compared with those before it
        if earlier and trial([specs[index]], socket_uid)[0][0] == 0:
            collides_with = _first_blocker([binds[i] for i in earlier], [specs[i] for i in earlier], specs[index],
                                           socket_uid)
            if collides_with is None:  # the obstacle left between the two tries
                error, step = 0, ""
        results.append(ProbeResult(bind, error, step, collides_with))
    return results


def _raise_own_failure(binds: list, answers: list[tuple[int, str]]) -> None:
    for bind, (error, _) in zip(binds, answers, strict=True):
        if error in OWN_FAILURES:
            from bindguard.model.errors import GuardFailure

            name = errno.errorcode[error]
            limit = ""
            if error == errno.EMFILE:
                soft, hard = fd_limits()
                limit = f", RLIMIT_NOFILE {soft}:{hard}; the unit's LimitNOFILE= sets it"
            raise GuardFailure(f"{OWN_FAILURES[error]} ({name}{limit}), so the kernel could not be asked "
                               f"about {bind}: this says nothing about the address")


def _spec(bind) -> Spec:
    ep, opts = bind.endpoint, bind.options
    kind = _socket.SOCK_STREAM if ep.proto == "tcp" else _socket.SOCK_DGRAM
    try:
        sockaddr = ep.sockaddr()
    except OSError:  # an interface name that does not exist: the kernel would say ENODEV
        sockaddr = (str(ep.host), ep.port, 0, 0xFFFFFFFF)
    return (ep.family, kind, sockaddr, opts.reuseaddr, opts.reuseport, bind.v6only, opts.freebind, bind.device)


def _first_blocker(earlier: list, earlier_specs: list[Spec], spec: Spec, socket_uid: int | None):
    """The earlier bind that spec collides with: the pair fails twice in a row, so that a socket
    someone else held for a moment (another guard's trial) is not taken for the request's own."""
    for other, other_spec in zip(earlier, earlier_specs, strict=True):
        if all(_pair_collides(other_spec, spec, socket_uid) for _ in range(2)):
            return other
    return None


def _pair_collides(first: Spec, second: Spec, socket_uid: int | None) -> bool:
    outcome = _held_together([first, second], socket_uid)
    return outcome[0][0] == 0 and outcome[1][0] == errno.EADDRINUSE
