"""The sock_diag netlink exchange: dump requests as bytes, the replies' messages, and one walk started early.

bindguard.evidence.sockets builds its facts from what this module sends and receives. This module
imports only built-in modules and struct, so that the fast path (bindguard.cli.fastpath) can
start a walk before the full command's imports (ipaddress, the model: 7 ms).

The early walk. To find the sockets on one port in states other than LISTEN (a TIME_WAIT, a
connection, a socket bound but not listening), the kernel walks every connection in the
namespace, and from Linux 6.8 every bound socket as well: 23 ms at 100k sockets here, most of a
refusal's time there. It walks inside the sendto() of the dump request, until the first reply
datagram is full. When the fast path's trial bind is refused as in use on a TCP port, it starts
that walk (start_walk) in a thread that does nothing but that one sendto(), so that the kernel
walks while the full command starts (imports, the plan, its own probe). The guard's first look
at every state of that port (sockets.sockets_on_port) takes the answer from that socket
(take_walk) while it is under FRESH seconds old, and only after a look at LISTEN alone has found
no listener there either; otherwise it asks again.

The kernel decides: the guard's verdict still comes from its probes. What a walk started before
the full command's probe can change is how the first look explains it. A socket that closed
since is shown: a full socket then has no process left to hold it, which the guard treats as
fleeting (it probes and looks again: bindguard.verdict.policy.fleeting); a TIME_WAIT is shown as
it was, the time it has left counted from the look, not the walk, so up to FRESH too long (a
wait's deadline allows a second: bindguard.action.guard). A socket other than a listener that
appeared since is missed. When nothing else explains the refusal, it has no socket, which is
fleeting too. When something else does (a TIME_WAIT), the first look reports that alone: with
time to wait, the guard waits and looks again within OBSERVE_INTERVAL (bindguard.action.guard),
and finds the newcomer; with none, it refuses for what it found (75, where a look after the probe
would have named the newcomer too and refused with 98): a refusal either way, its explanation
short of a socket that arrived in the few milliseconds between the walk and the probe.

No walk is started where a look at LISTEN alone finds a listener (listeners alone usually
explain the refusal: guard._sockets_explaining), nor where the process may run on one CPU only
(nothing to gain from a thread there): a walk nobody reads costs a whole walk, and the exit waits
for the kernel to finish it.
"""

import _socket
import _thread
import errno
import posix
import struct
import time

# include/uapi/linux/netlink.h
NETLINK_SOCK_DIAG = 4
NLM_F_REQUEST = 0x01
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLMSG_ERROR = 2
NLMSG_DONE = 3
# include/uapi/linux/sock_diag.h
SOCK_DIAG_BY_FAMILY = 20
TCPDIAG_GETSOCK = 18  # include/uapi/linux/inet_diag.h: the first request type, TCP only
# include/uapi/linux/inet_diag.h
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_S_GE = 2
INET_DIAG_BC_S_LE = 3

# include/net/tcp_states.h: ESTABLISHED (1) to BOUND_INACTIVE (13); bindguard.model.facts names them
TCP_ESTABLISHED = 1
TCP_CLOSE = 7
TCP_LISTEN = 10
TCP_BOUND_INACTIVE = 13
ALL_TCP_STATES = (1 << (TCP_BOUND_INACTIVE + 1)) - 2  # bits 1..13

NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NLATTR = struct.Struct("=HH")  # len, type
# struct inet_diag_req_v2 up to and including id.idiag_sport/idiag_dport (network order):
# family, protocol, ext, pad, states; then src[16], dst[16], if, cookie[2].
REQ_HEAD = struct.Struct("=BBBBI")
REQ_PORTS = struct.Struct("!HH")
REQ_TAIL = bytes(16 + 16 + 4 + 8)
RECV_BUFFER = 65536  # the kernel fills dump datagrams up to 32 KiB


def open_socket() -> _socket.socket:
    return _socket.socket(_socket.AF_NETLINK, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)


def _bytecode_port_equals(port: int) -> bytes:
    """`sport >= port && sport <= port`: two inet_diag_bc_op pairs (code, yes, no; then the port).

    A jump that lands exactly on the end of the program accepts; one 4 bytes past it rejects.
    """
    op = struct.Struct("=BBH")
    return b"".join(
        (
            op.pack(INET_DIAG_BC_S_GE, 8, 16 + 4),
            op.pack(0, 0, port),
            op.pack(INET_DIAG_BC_S_LE, 8, 8 + 4),
            op.pack(0, 0, port),
        )
    )


def request(family: int, protocol: int, port: int | None, states: int, seq: int) -> bytes:
    """A SOCK_DIAG_BY_FAMILY dump of one family's sockets of `protocol` (IPPROTO_*)."""
    body = REQ_HEAD.pack(family, protocol, 0, 0, states) + REQ_PORTS.pack(port or 0, 0) + REQ_TAIL
    return _dump_message(SOCK_DIAG_BY_FAMILY, body, port, seq)


def request_both_families(port: int | None, states: int, seq: int) -> bytes:
    """TCPDIAG_GETSOCK with a struct inet_diag_req (family, src_len, dst_len, ext; the sockid as in
    v2; states; dbs): the kernel answers it for both families in one walk (it sets the family to
    AF_UNSPEC), where a SOCK_DIAG_BY_FAMILY request per family walks every connection twice."""
    # family AF_UNSPEC (0), src_len, dst_len, ext: four zero bytes
    body = bytes(4) + REQ_PORTS.pack(port or 0, 0) + REQ_TAIL + struct.pack("=II", states, 0)
    return _dump_message(TCPDIAG_GETSOCK, body, port, seq)


def _dump_message(kind: int, body: bytes, port: int | None, seq: int) -> bytes:
    """A dump request of `kind` with its request struct `body`, filtered to the port if one is given."""
    if port is not None:
        bytecode = _bytecode_port_equals(port)
        body += NLATTR.pack(NLATTR.size + len(bytecode), INET_DIAG_REQ_BYTECODE) + bytecode
    header = NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
    return header + body


def receive(nl: _socket.socket, buffer: bytearray, seq: int, on_message) -> None:
    """Read the dump numbered `seq` to its end, calling on_message(buffer, start, end) with each
    socket's message (its struct inet_diag_msg and attributes); OSError for the kernel's error."""
    view = memoryview(buffer)
    while True:
        size, _, flags, _ = nl.recvmsg_into([view])
        if flags & _socket.MSG_TRUNC:
            raise OSError(errno.EMSGSIZE, "sock_diag reply larger than the receive buffer")
        offset = 0
        while offset + NLMSGHDR.size <= size:
            length, kind, _, msg_seq, _ = NLMSGHDR.unpack_from(buffer, offset)
            if length < NLMSGHDR.size or offset + length > size:
                raise OSError(errno.EBADMSG, "malformed netlink message from sock_diag")
            payload = offset + NLMSGHDR.size
            if msg_seq == seq:
                if kind in (NLMSG_DONE, NLMSG_ERROR):
                    # Both carry an int: a negative errno, or 0 (end of dump / an ACK).
                    (code,) = struct.unpack_from("=i", buffer, payload) if length >= NLMSGHDR.size + 4 else (0,)
                    if code < 0:
                        raise OSError(-code, posix.strerror(-code))
                    if kind == NLMSG_DONE:
                        return
                elif kind in (SOCK_DIAG_BY_FAMILY, TCPDIAG_GETSOCK):
                    on_message(buffer, payload, offset + length)
            offset += (length + 3) & ~3


# The early walk (see the module's docstring)

FRESH = 0.1  # seconds: the full command's look comes 10-20 ms after the walk starts


class _Walk:
    """A TCPDIAG_GETSOCK dump of every TCP state on one port, sent by a thread of its own: the
    thread runs one sendto(), in which the kernel walks; the reader reads the answer."""

    def __init__(self, port: int, nl: _socket.socket) -> None:
        self.port = port
        self.socket = nl
        self.started = time.monotonic()
        self._error: BaseException | None = None
        self._sent = _thread.allocate_lock()
        self._sent.acquire()

    def start(self) -> None:
        running = _thread.allocate_lock()
        running.acquire()
        try:
            _thread.start_new_thread(self._send, (request_both_families(self.port, ALL_TCP_STATES, 1), running))
        except BaseException:
            self._sent.release()  # no thread: nothing will send on the socket
            raise
        # Until the thread runs: from then on it holds the interpreter's lock only until the
        # kernel walks (sendto releases it), where otherwise it could wait for its first turn
        # until this thread's imports gave it one.
        running.acquire()

    def _send(self, message: bytes, running) -> None:
        running.release()
        try:
            self.socket.sendto(message, (0, 0))
        except BaseException as exc:  # the reader's: its fallback decides, as for its own sendto
            self._error = exc
        finally:
            self._sent.release()

    def fresh(self) -> bool:
        return time.monotonic() - self.started <= FRESH

    def wait(self) -> None:
        """Until the kernel has walked; the sendto()'s error, if it failed."""
        with self._sent:
            pass
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Close the socket, unless the thread may still send on it (a reader stopped while it
        waited): a descriptor closed under it could be another file's by then. The exit closes it."""
        if not self._sent.locked():
            self.socket.close()


_walk: _Walk | None = None


def start_walk(port: int) -> None:
    """Start the early walk of a TCP port where the trial bind was refused as in use, unless a
    fresh one has started, the process may run on one CPU only, or a look at LISTEN alone finds a
    listener (or fails). One no look took is closed first (another run in the same process)."""
    global _walk
    if _walk is not None:
        if _walk.fresh():
            return
        _walk.close()
        _walk = None
    if len(posix.sched_getaffinity(0)) < 2:
        return
    listeners: list = []
    try:
        nl = open_socket()
    except OSError:
        return  # the full command meets it again, and falls back as it does without the fast path
    try:
        nl.sendto(request_both_families(port, 1 << TCP_LISTEN, 1), (0, 0))
        receive(nl, bytearray(RECV_BUFFER), 1, lambda *_: listeners.append(True))
        if not listeners:
            # On this socket, which the look has read to its end: its recvmsg() of RECV_BUFFER
            # bytes raised the size of the kernel's dump replies to it from a page to 32 KiB,
            # so the thread's sendto() walks until that much is found (340 TIME_WAITs, not 39).
            _walk = _Walk(port, nl)  # before the thread starts: the socket is the walk's from then on
            _walk.start()
    except (OSError, RuntimeError):  # RuntimeError: no thread could be started
        _walk = None
    finally:
        if _walk is None or _walk.socket is not nl:
            nl.close()


def take_walk(port: int) -> _Walk | None:
    """The early walk of every TCP state on `port`, if it is under FRESH seconds old: once (the
    reader closes it); None otherwise. An older one is closed and forgotten."""
    global _walk
    if _walk is None or _walk.port != port:
        return None
    walk, _walk = _walk, None
    if not walk.fresh():
        walk.close()
        return None
    return walk
