"""The sock_diag netlink exchange: dump requests as bytes, the replies' messages, and one walk started early.

bindguard.evidence.sockets builds its facts from what this module sends and receives. This module
imports nothing but _socket, struct and _thread, so that the fast path (bindguard.cli.fastpath)
can start a walk before the full command's imports (ipaddress, the model: 7 ms).

The early walk. To find the sockets on one port in states other than LISTEN (a TIME_WAIT, a
connection, a socket bound but not listening), the kernel walks every connection in the
namespace, and from Linux 6.8 every bound socket as well: 23 ms at 100k sockets, most of a
refusal's time there. The kernel walks inside the sendto() of the dump request. When the fast
path's trial bind is refused on a TCP port where nothing listens, it starts that walk
(start_walk) in a thread that does nothing but that one sendto(), so that the kernel walks
while the full command starts (imports, the plan, its own probe). The full command's first
look at the port (sockets.sockets_on_port, every state) reads the answer from that socket
(walked) instead of asking again.

The walk starts a few milliseconds before the full command's probe instead of just after it.
A holder that appears between the two can be missed by it, as one that closes between a probe
and a later walk is missed today: either way the refusal has no socket to explain it, which the
guard treats as fleeting, probing and looking again (bindguard.verdict.policy.fleeting). Where
a listener holds the port, the full command's look at listeners alone usually explains the
refusal (guard._sockets_explaining), so no walk is started: one nobody reads would only hold
up the exit, which waits for the kernel to finish it.
"""

import _socket
import _thread
import errno
import posix
import struct

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


class _Walk:
    """A TCPDIAG_GETSOCK dump of every TCP state on one port, sent by a thread of its own: the
    thread runs one sendto(), in which the kernel walks; the reader reads the answer."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.socket = open_socket()
        self._error: BaseException | None = None
        self._sent = _thread.allocate_lock()
        self._sent.acquire()
        running = _thread.allocate_lock()
        running.acquire()
        try:
            _thread.start_new_thread(self._send, (request_both_families(port, ALL_TCP_STATES, 1), running))
        except BaseException:
            self.socket.close()
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

    def wait(self) -> None:
        """Until the kernel has walked; the sendto()'s error, if it failed."""
        with self._sent:
            pass
        if self._error is not None:
            raise self._error


_walk: _Walk | None = None


def start_walk(port: int) -> None:
    """Start the early walk of a TCP port where the trial bind was refused, unless one has
    started, or a listener (or an error) answers a look at LISTEN alone."""
    global _walk
    if _walk is not None:
        return
    found: list = []
    try:
        nl = open_socket()
        try:
            nl.sendto(request_both_families(port, 1 << TCP_LISTEN, 1), (0, 0))
            receive(nl, bytearray(RECV_BUFFER), 1, lambda *message: found.append(message))
        finally:
            nl.close()
        if not found:
            _walk = _Walk(port)
    except (OSError, RuntimeError):  # RuntimeError: no thread could be started
        pass  # the full command asks, as it would without the fast path, and says what it finds


def walked(port: int) -> _Walk | None:
    """The early walk of every TCP state on `port`, to be read once (its socket is the reader's
    to close); None when there is none."""
    global _walk
    if _walk is None or _walk.port != port:
        return None
    walk, _walk = _walk, None
    return walk
