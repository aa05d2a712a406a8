"""The sockets on a port, as the kernel reports them: sock_diag netlink, with /proc/net as a fallback.

The request (bindguard.evidence.sockdiag builds and sends it) is the one `ss -tan 'sport = :PORT'`
sends: a NETLINK_SOCK_DIAG dump with a state mask and a bytecode filter (INET_DIAG_BC_S_GE / S_LE
on the source port) that the kernel runs on every socket, so only the port in question crosses
into user space. The port is also set in the request's id.idiag_sport, which lets the kernel
skip non-matching sockets in the listening and established hash walks before it runs the
bytecode; the walk over bound-but-inactive sockets (bit 13 of the state mask, Linux 6.8+)
honours the bytecode only. For TCP it is one TCPDIAG_GETSOCK dump (struct inet_diag_req), which
the kernel answers for IPv4 and IPv6 in one walk; UDP takes a SOCK_DIAG_BY_FAMILY dump
(inet_diag_req_v2) per family. Any state but LISTEN makes the kernel visit every connection in
the namespace, and BOUND every bound socket too: 10 ms and 13 ms at 100k sockets here. The fast
path starts that walk early when its trial bind is refused (sockdiag's early walk), and the
guard's first look at every state of that port reads its answer while it is fresh.

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

from bindguard.evidence import sockdiag
from bindguard.model.endpoints import TCP, UDP, Endpoint
from bindguard.model.facts import BOUND, TCP_STATES, SocketFact

# include/uapi/linux/inet_diag.h: the reply's attributes
INET_DIAG_SKV6ONLY = 11
INET_DIAG_CGROUP_ID = 21
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER

ALL_UDP_STATES = (1 << sockdiag.TCP_ESTABLISHED) | (1 << sockdiag.TCP_CLOSE)
STATE_NUMBERS = {name: number for number, name in TCP_STATES.items()}
LISTEN = "LISTEN"
PROTOCOLS = {TCP: _socket.IPPROTO_TCP, UDP: _socket.IPPROTO_UDP}

# struct inet_diag_msg: family, state, timer, retrans; sport, dport (network order, read as
# native and swapped); src[16], dst[16]; if; cookie; expires, rqueue, wqueue, uid, inode.
DIAG_MSG = struct.Struct("=BBBBHH16s16sIQIIIII")


class ObservationError(Exception):
    """Neither sock_diag nor /proc/net could be read."""


def sockets_on_port(
    proto: str,
    port: int,
    notes: list[str] | None = None,
    *,
    states: Iterable[str] | None = None,
    source: str = "auto",
    early_walk: bool = False,
) -> list[SocketFact]:
    """The sockets of `proto` whose local port is `port`, IPv4 and IPv6: every state, or `states`.

    `states` names states as the facts do (LISTEN, BOUND, TIME_WAIT, ESTABLISHED, ...); asking
    for fewer is cheaper: LISTEN alone never walks the established hash, any other state
    makes the kernel visit every socket in the namespace (see the module's docstring).
    `source` is "auto" (sock_diag, else /proc/net), "netlink" or "procfs" (for tests).
    `early_walk`: the fast path's walk of every state of the port may answer, if it is fresh; for
    a caller that has just found no listener on the port, as that walk's start did
    (bindguard.evidence.sockdiag).
    """
    return _observe(proto, port, state_mask(proto, states), notes, source, early_walk)


def listening_sockets(proto: str, notes: list[str] | None = None, *, source: str = "auto") -> list[SocketFact]:
    """The TCP sockets in LISTEN, or the unconnected bound UDP sockets, on every port."""
    return _observe(proto, None, state_mask(proto, [LISTEN if proto == TCP else BOUND]), notes, source, False)


def state_mask(proto: str, states: Iterable[str] | None) -> int:
    """The idiag_states bits for state names; None means every state."""
    if states is None:
        return sockdiag.ALL_TCP_STATES if proto == TCP else ALL_UDP_STATES
    mask = 0
    for name in states:
        if name == BOUND:
            mask |= (1 << sockdiag.TCP_CLOSE) | ((1 << sockdiag.TCP_BOUND_INACTIVE) if proto == TCP else 0)
        elif name in STATE_NUMBERS and (proto == TCP or name == "ESTABLISHED"):
            mask |= 1 << STATE_NUMBERS[name]
        else:
            raise ValueError(f"no {proto} socket state {name!r}")
    return mask


def _observe(proto: str, port: int | None, states: int, notes: list[str] | None, source: str,
             early_walk: bool) -> list[SocketFact]:
    if proto not in PROTOCOLS:
        raise ValueError(f"unknown protocol {proto!r}")
    if source not in ("auto", "netlink", "procfs"):
        raise ValueError(f"unknown source {source!r}")
    netlink_error: OSError | None = None
    if source != "procfs":
        try:
            return _query_sock_diag(proto, port, states, early_walk)
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


def _query_sock_diag(proto: str, port: int | None, states: int, early_walk: bool = False) -> list[SocketFact]:
    facts: list[SocketFact] = []

    def parse(buffer: bytearray, start: int, end: int) -> None:
        facts.append(_parse_diag_msg(buffer, start, end, proto))

    walk = None
    if early_walk and proto == TCP and port is not None and states == sockdiag.ALL_TCP_STATES:
        walk = sockdiag.take_walk(port)
    nl = walk.socket if walk is not None else sockdiag.open_socket()
    try:
        buffer = bytearray(sockdiag.RECV_BUFFER)
        if proto == TCP:
            try:
                if walk is not None:  # the fast path asked already: the answer is on its socket
                    walk.wait()
                else:
                    nl.sendto(sockdiag.request_both_families(port, states, 1), (0, 0))
                sockdiag.receive(nl, buffer, 1, parse)
                return facts
            except OSError:  # a kernel or policy without the old request: one per family
                facts.clear()
        for seq, family in enumerate((_socket.AF_INET, _socket.AF_INET6), start=2):  # not 1: what remains of it
            nl.sendto(sockdiag.request(family, PROTOCOLS[proto], port, states, seq), (0, 0))
            sockdiag.receive(nl, buffer, seq, parse)
    finally:
        if walk is None:
            nl.close()
        else:
            walk.close()
    return facts


def _parse_diag_msg(buffer: bytearray, start: int, end: int, proto: str) -> SocketFact:
    (family, state, timer, _, sport, dport, src, dst, ifindex, _, expires, _, _, uid, inode) = DIAG_MSG.unpack_from(
        buffer, start
    )
    v6only: bool | None = None
    cgroup_id: int | None = None
    offset = start + DIAG_MSG.size
    while offset + sockdiag.NLATTR.size <= end:
        length, kind = sockdiag.NLATTR.unpack_from(buffer, offset)
        if length < sockdiag.NLATTR.size:
            break
        kind &= NLA_TYPE_MASK
        if kind == INET_DIAG_SKV6ONLY:
            v6only = bool(buffer[offset + sockdiag.NLATTR.size])
        elif kind == INET_DIAG_CGROUP_ID:
            (cgroup_id,) = struct.unpack_from("=Q", buffer, offset + sockdiag.NLATTR.size)
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
    if state in (sockdiag.TCP_CLOSE, sockdiag.TCP_BOUND_INACTIVE):
        return BOUND
    if proto == UDP and state == sockdiag.TCP_ESTABLISHED:
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
