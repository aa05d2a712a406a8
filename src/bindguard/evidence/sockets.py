"""The sockets on a port, as the kernel reports them: sock_diag netlink, with /proc/net as a fallback.

The request is the one `ss -tan 'sport = :PORT'` sends: a NETLINK_SOCK_DIAG dump with a state
mask and a bytecode filter (INET_DIAG_BC_S_GE / S_LE on the source port) that the kernel runs on
every socket, so only the port in question crosses into user space. The port is also set in the
request's id.idiag_sport, which lets the kernel skip non-matching sockets in the listening
and established hash walks before it runs the bytecode; the walk over bound-but-inactive
sockets (bit 13 of the state mask, Linux 6.8+) honours the bytecode only. For TCP it is one
TCPDIAG_GETSOCK dump (struct inet_diag_req), which the kernel answers for IPv4 and IPv6 in one
walk of the connection hash; UDP takes a SOCK_DIAG_BY_FAMILY dump (inet_diag_req_v2) per family.
A walk costs about 1 ms per 10,000 sockets in the host's hash: one instead of two is most of
what a refusal for TIME_WAIT saves at 100k sockets.

sock_diag needs no privilege. Where it is unavailable (a kernel without inet_diag or
udp_diag, a seccomp or LSM policy denying AF_NETLINK), /proc/net/{tcp,tcp6,udp,udp6} is read
instead, which cannot see:
  - TCP sockets that are bound but never listened (they are only in the bind hash);
  - IPV6_V6ONLY (v6only is None), the socket's cgroup, or SO_BINDTODEVICE (interface 0).
Each use of the fallback appends a note saying so to `notes`, when the caller passes a list.

What the kernel reports, and so what the facts hold: IPV6_V6ONLY only for AF_INET6 sockets
in LISTEN or CLOSE (bound, unconnected UDP) state, else v6only is None; the cgroup id and
uid only for full sockets (TIME_WAIT and SYN_RECV minisockets have uid 0, inode 0, no
cgroup); `expires_ms` only while a timer runs (TIME_WAIT: the time left of its 60 s).
Bound-but-not-listening TCP sockets come back in state CLOSE, reported as BOUND.

Only the standard library is imported here: this module is on the check path.
"""

from __future__ import annotations

import _socket  # not socket, whose import (selectors, array, enum's IntEnums) is 1 ms of a refusal
import errno
import ipaddress
import os
import struct
from collections.abc import Iterable

from bindguard.model.endpoints import TCP, UDP, Endpoint
from bindguard.model.facts import BOUND, TCP_STATES, SocketFact

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
INET_DIAG_SKV6ONLY = 11
INET_DIAG_CGROUP_ID = 21
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER

TCP_ESTABLISHED = 1
TCP_CLOSE = 7
TCP_BOUND_INACTIVE = 13

ALL_TCP_STATES = sum(1 << state for state in TCP_STATES)  # bits 1..13
ALL_UDP_STATES = (1 << TCP_ESTABLISHED) | (1 << TCP_CLOSE)
STATE_NUMBERS = {name: number for number, name in TCP_STATES.items()}
LISTEN = "LISTEN"
PROTOCOLS = {TCP: _socket.IPPROTO_TCP, UDP: _socket.IPPROTO_UDP}

NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NLATTR = struct.Struct("=HH")  # len, type
# struct inet_diag_req_v2 up to and including id.idiag_sport/idiag_dport (network order):
# family, protocol, ext, pad, states; then src[16], dst[16], if, cookie[2].
REQ_HEAD = struct.Struct("=BBBBI")
REQ_PORTS = struct.Struct("!HH")
REQ_TAIL = bytes(16 + 16 + 4 + 8)
# struct inet_diag_msg: family, state, timer, retrans; sport, dport (network order, read as
# native and swapped); src[16], dst[16]; if; cookie; expires, rqueue, wqueue, uid, inode.
DIAG_MSG = struct.Struct("=BBBBHH16s16sIQIIIII")
RECV_BUFFER = 65536  # the kernel fills dump datagrams up to 32 KiB


class ObservationError(Exception):
    """Neither sock_diag nor /proc/net could be read."""


def sockets_on_port(
    proto: str,
    port: int,
    notes: list[str] | None = None,
    *,
    states: Iterable[str] | None = None,
    source: str = "auto",
) -> list[SocketFact]:
    """The sockets of `proto` whose local port is `port`, IPv4 and IPv6: every state, or `states`.

    `states` names states as the facts do (LISTEN, BOUND, TIME_WAIT, ESTABLISHED, ...); asking
    for fewer is cheaper: LISTEN alone never walks the established hash, any other state
    makes the kernel visit every socket in the namespace (about 1 ms per 10,000 here).
    `source` is "auto" (sock_diag, else /proc/net), "netlink" or "procfs" (for tests).
    """
    return _observe(proto, port, state_mask(proto, states), notes, source)


def listening_sockets(proto: str, notes: list[str] | None = None, *, source: str = "auto") -> list[SocketFact]:
    """The TCP sockets in LISTEN, or the unconnected bound UDP sockets, on every port."""
    return _observe(proto, None, state_mask(proto, [LISTEN if proto == TCP else BOUND]), notes, source)


def state_mask(proto: str, states: Iterable[str] | None) -> int:
    """The idiag_states bits for state names; None means every state."""
    if states is None:
        return ALL_TCP_STATES if proto == TCP else ALL_UDP_STATES
    mask = 0
    for name in states:
        if name == BOUND:
            mask |= (1 << TCP_CLOSE) | ((1 << TCP_BOUND_INACTIVE) if proto == TCP else 0)
        elif name in STATE_NUMBERS and (proto == TCP or name == "ESTABLISHED"):
            mask |= 1 << STATE_NUMBERS[name]
        else:
            raise ValueError(f"no {proto} socket state {name!r}")
    return mask


def _observe(proto: str, port: int | None, states: int, notes: list[str] | None, source: str) -> list[SocketFact]:
    if proto not in PROTOCOLS:
        raise ValueError(f"unknown protocol {proto!r}")
    if source not in ("auto", "netlink", "procfs"):
        raise ValueError(f"unknown source {source!r}")
    netlink_error: OSError | None = None
    if source != "procfs":
        try:
            return _query_sock_diag(proto, port, states)
        except OSError as e:
            if source == "netlink":
                raise ObservationError(f"sock_diag: {_describe(e)}") from e
            netlink_error = e
    try:
        facts = _read_proc_net(proto, port, states)
    except OSError as e:
        reason = f"sock_diag: {_describe(netlink_error)}; " if netlink_error else ""
        raise ObservationError(f"{reason}/proc/net/{proto}: {_describe(e)}") from e
    if notes is not None:
        why = f"sock_diag is unavailable ({_describe(netlink_error)})" if netlink_error else "asked for /proc/net"
        hidden = "TCP sockets bound but not listening, " if proto == TCP else ""
        note = (
            f"{why}: read /proc/net/{proto}* instead, which does not show {hidden}IPV6_V6ONLY, the socket's cgroup"
            " or its bound device"
        )
        if note not in notes:
            notes.append(note)
    return facts


def _describe(error: OSError | None) -> str:
    if error is None:
        return "unknown error"
    if error.errno:
        return f"{errno.errorcode.get(error.errno, error.errno)}: {os.strerror(error.errno)}"
    return str(error)


# sock_diag


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


def _request(family: int, proto: str, port: int | None, states: int, seq: int) -> bytes:
    body = REQ_HEAD.pack(family, PROTOCOLS[proto], 0, 0, states) + REQ_PORTS.pack(port or 0, 0) + REQ_TAIL
    return _dump_message(SOCK_DIAG_BY_FAMILY, body, port, seq)


def _request_both_families(port: int | None, states: int, seq: int) -> bytes:
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


def _query_sock_diag(proto: str, port: int | None, states: int) -> list[SocketFact]:
    facts: list[SocketFact] = []
    nl = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
    try:
        buffer = bytearray(RECV_BUFFER)
        if proto == TCP:
            try:
                nl.sendto(_request_both_families(port, states, 1), (0, 0))
                _receive_dump(nl, buffer, 1, proto, facts)
                return facts
            except OSError:  # a kernel or policy without the old request: one per family
                facts.clear()
        for seq, family in enumerate((_socket.AF_INET, _socket.AF_INET6), start=2):  # not 1: what remains of it
            nl.sendto(_request(family, proto, port, states, seq), (0, 0))
            _receive_dump(nl, buffer, seq, proto, facts)
    finally:
        nl.close()
    return facts


def _receive_dump(nl: _socket.socket, buffer: bytearray, seq: int, proto: str, facts: list[SocketFact]) -> None:
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
                        raise OSError(-code, os.strerror(-code))
                    if kind == NLMSG_DONE:
                        return
                elif kind in (SOCK_DIAG_BY_FAMILY, TCPDIAG_GETSOCK):
                    facts.append(_parse_diag_msg(buffer, payload, offset + length, proto))
            offset += (length + 3) & ~3


def _parse_diag_msg(buffer: bytearray, start: int, end: int, proto: str) -> SocketFact:
    (family, state, timer, _, sport, dport, src, dst, ifindex, _, expires, _, _, uid, inode) = DIAG_MSG.unpack_from(
        buffer, start
    )
    v6only: bool | None = None
    cgroup_id: int | None = None
    offset = start + DIAG_MSG.size
    while offset + NLATTR.size <= end:
        length, kind = NLATTR.unpack_from(buffer, offset)
        if length < NLATTR.size:
            break
        kind &= NLA_TYPE_MASK
        if kind == INET_DIAG_SKV6ONLY:
            v6only = bool(buffer[offset + NLATTR.size])
        elif kind == INET_DIAG_CGROUP_ID:
            (cgroup_id,) = struct.unpack_from("=Q", buffer, offset + NLATTR.size)
        offset += (length + 3) & ~3
    local_host, remote_host = _address(family, src), _address(family, dst)
    dport = _socket.ntohs(dport)
    return SocketFact(
        local=Endpoint(proto, local_host, _socket.ntohs(sport), _scope(local_host, ifindex)),
        state=_state_name(proto, state),
        uid=uid,
        inode=inode,
        remote=Endpoint(proto, remote_host, dport, _scope(remote_host, ifindex)) if dport else None,
        v6only=v6only,
        expires_ms=expires if timer else None,
        interface=ifindex,
        cgroup_id=cgroup_id,
    )


def _address(family: int, raw: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if family == _socket.AF_INET:
        return ipaddress.IPv4Address(raw[:4])
    return ipaddress.IPv6Address(raw)


def _scope(host: ipaddress.IPv4Address | ipaddress.IPv6Address, ifindex: int) -> str:
    """The zone of a link-local IPv6 address: the interface's name (its index if it has none here)."""
    if not ifindex or host.version != 6 or not host.is_link_local:
        return ""
    try:
        return _socket.if_indextoname(ifindex)
    except OSError:
        return str(ifindex)


def _state_name(proto: str, state: int) -> str:
    if state in (TCP_CLOSE, TCP_BOUND_INACTIVE):
        return BOUND
    if proto == UDP and state == TCP_ESTABLISHED:
        return "ESTABLISHED"
    return TCP_STATES.get(state, f"STATE_{state}")


# /proc/net fallback


def _read_proc_net(proto: str, port: int | None, states: int) -> list[SocketFact]:
    """Parse /proc/net/{proto,proto6} (net/ipv4/tcp_ipv4.c, udp.c: get_tcp4_sock and friends).

    A line: sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...; addresses are
    hex words in host byte order, ports hex, `when` in clock ticks (USER_HZ).
    """
    facts: list[SocketFact] = []
    wanted_port = f":{port:04X}" if port is not None else None
    ticks = os.sysconf("SC_CLK_TCK")
    for suffix, family in (("", _socket.AF_INET), ("6", _socket.AF_INET6)):
        path = f"/proc/net/{proto}{suffix}"
        try:
            with open(path) as f:
                lines = f.readlines()[1:]
        except FileNotFoundError:
            if family == _socket.AF_INET6:
                continue  # no IPv6 in this kernel
            raise
        for line in lines:
            fields = line.split()
            local, remote, state_hex, timer_field, uid, inode = (
                fields[1], fields[2], fields[3], fields[5], fields[7], fields[9]
            )
            if wanted_port is not None and not local.endswith(wanted_port):
                continue
            state = int(state_hex, 16)
            if not states & (1 << state):
                continue
            local_host, local_port = _proc_address(local)
            remote_host, remote_port = _proc_address(remote)
            timer, when = timer_field.split(":")
            facts.append(
                SocketFact(
                    local=Endpoint(proto, local_host, local_port),
                    state=_state_name(proto, state),
                    uid=int(uid),
                    inode=int(inode),
                    remote=Endpoint(proto, remote_host, remote_port) if remote_port else None,
                    expires_ms=int(when, 16) * 1000 // ticks if int(timer, 16) else None,
                )
            )
    return facts


def _proc_address(field: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    hex_host, hex_port = field.split(":")
    raw = bytes.fromhex(hex_host)
    # Each 32-bit word is printed in host byte order.
    words = b"".join(
        struct.pack("=I", int.from_bytes(raw[i : i + 4], "big")) for i in range(0, len(raw), 4)
    )
    host = ipaddress.IPv4Address(words) if len(raw) == 4 else ipaddress.IPv6Address(words)
    return host, int(hex_port, 16)
