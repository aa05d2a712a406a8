"""Addresses in systemd's ListenStream=/ListenDatagram= syntax, and when two overlap.

Only the standard library is imported here: this module is on every path.
"""

from __future__ import annotations

import _socket
import ipaddress

from bindguard.model.host import ipv6_supported
from bindguard.model.record import Record

TCP = "tcp"
UDP = "udp"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class AddressError(ValueError):
    """A listen address that cannot be parsed; the message names it and the fix."""


class Endpoint(Record, frozen=True):
    """One address and port a daemon binds, for TCP or UDP."""

    proto: str
    host: IPAddress
    port: int
    scope: str = ""  # IPv6 zone: interface name or index, for link-local addresses

    @property
    def family(self) -> int:
        return _socket.AF_INET6 if self.host.version == 6 else _socket.AF_INET

    @property
    def is_wildcard(self) -> bool:
        return self.host.is_unspecified

    @property
    def ipv4_equivalent(self) -> ipaddress.IPv4Address | None:
        """The IPv4 address a v4-mapped IPv6 address stands for (the kernel compares it as IPv4)."""
        if self.host.version == 6:
            return self.host.ipv4_mapped
        return self.host

    def sockaddr(self) -> tuple[str, int] | tuple[str, int, int, int]:
        if self.family == _socket.AF_INET:
            return (str(self.host), self.port)
        scope_id = 0
        if self.scope:
            number = ascii_number(self.scope, 10)
            scope_id = number if number is not None else _socket.if_nametoindex(self.scope)
        return (str(self.host), self.port, 0, scope_id)

    def address(self) -> str:
        """The address in ListenStream= form, without the protocol."""
        if self.host.version == 6:
            zone = f"%{self.scope}" if self.scope else ""
            mapped = self.host.ipv4_mapped
            host = f"::ffff:{mapped}" if mapped is not None else str(self.host)
            return f"[{host}{zone}]:{self.port}"
        return f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.proto}:{self.address()}" if self.proto == UDP else self.address()


class SocketOptions(Record, frozen=True):
    """The socket options the daemon sets before bind(); they change the kernel's answer."""

    reuseaddr: bool = True
    reuseport: bool = False
    v6only: bool = False  # resolved: the host default (net.ipv6.bindv6only) unless set
    freebind: bool = False


class Bind(Record, frozen=True):
    """One socket the daemon will bind: where, and with which options."""

    endpoint: Endpoint
    options: SocketOptions
    device: str = ""  # SO_BINDTODEVICE (a socket unit's BindToDevice=): "" for none

    @property
    def v6only(self) -> bool:
        return self.endpoint.family == _socket.AF_INET6 and self.options.v6only

    def __str__(self) -> str:
        return str(self.endpoint)


def ascii_number(text: str, digits: int = 20) -> int | None:
    """The number text writes in at most `digits` ASCII digits, else None.

    str.isdigit() alone also takes '²', on which int() raises, and '٨٠' or '８０', which int()
    reads as 80; and int() refuses more than 4,300 digits. Leading zeros count as digits.
    """
    if not (text.isascii() and text.isdigit()) or len(text) > digits:
        return None
    return int(text)


def ascii_port(text: str) -> int | None:
    """The number 0-65535 that text writes in ASCII digits, leading zeros allowed as daemons and
    systemd take them; else None (see ascii_number)."""
    port = ascii_number(text.lstrip("0") or "0", 5) if text.isascii() else None
    return port if port is not None and port <= 65535 else None


def _parse_port(text: str, original: str) -> int:
    if not (text.isascii() and text.isdigit()):  # str.isdigit() is true of '²', '٨٠' and '８０' too
        raise AddressError(f"{original!r}: port {text!r} is not a number; write a port from 1 to 65535")
    port = ascii_number(text.lstrip("0") or "0", 5)  # leading zeros as systemd takes them
    if port is None or not 1 <= port <= 65535:
        shown = port if port is not None else f"{text[:12]}... ({len(text)} digits)"
        raise AddressError(f"{original!r}: port {shown} is out of range; write a port from 1 to 65535")
    return port


IFNAME_MAX = 15  # IFNAMSIZ - 1


def _is_scope(scope: str) -> bool:
    """An IPv6 zone as the kernel takes it: an interface index, or a name dev_valid_name() accepts
    (printable ASCII here: nothing that could end a line or a word where the address is written)."""
    if ascii_number(scope) is not None:
        return True
    return (len(scope) <= IFNAME_MAX and scope not in (".", "..")
            and all("!" <= c <= "~" and c not in "/:%[]" for c in scope))


def parse_listen(text: str, default_proto: str = TCP) -> Endpoint:
    """Parse one address as systemd.socket(5) writes it, with an optional tcp:/udp: prefix.

    `8080` is `[::]:8080` (or `0.0.0.0:8080` where the host has no IPv6), `0.0.0.0:80`,
    `127.0.0.1:80`, `[::]:80`, `[::1]:80`, `[fe80::1%eth0]:80`.
    """
    original = text
    text = text.strip()
    proto = default_proto
    lowered = text.lower()
    for prefix in (TCP, UDP):
        if lowered.startswith(prefix + ":"):
            proto, text = prefix, text[len(prefix) + 1 :]
            break
    if not text:
        raise AddressError(f"{original!r}: empty address; write e.g. 8080, 0.0.0.0:8080 or [::1]:8080")
    if text.startswith("/") or text.startswith("@") or text.startswith("vsock:"):
        raise AddressError(
            f"{original!r}: not an IP address; bindguard guards IPv4/IPv6 ports, not AF_UNIX or vsock sockets"
        )
    if text.isdigit() or (text.startswith("-") and text[1:].isdigit()):  # a bare port; _parse_port judges it
        port = _parse_port(text, original)
        wildcard = "::" if ipv6_supported() else "0.0.0.0"
        return Endpoint(proto, ipaddress.ip_address(wildcard), port)
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise AddressError(f"{original!r}: an IPv6 address is written [ADDRESS]:PORT, e.g. [::1]:8080")
        inner, port_text = text[1:close], text[close + 2 :]
        scope = ""
        if "%" in inner:
            inner, scope = inner.split("%", 1)
            if not scope:
                raise AddressError(f"{original!r}: empty interface after '%'; write e.g. [fe80::1%eth0]:8080")
            if not _is_scope(scope):
                raise AddressError(f"{original!r}: {scope[:20]!r} is not an interface name (at most "
                                   f"{IFNAME_MAX} characters, no spaces, '/' or ':') or index")
        try:
            host = ipaddress.IPv6Address(inner)
        except ValueError:
            raise AddressError(f"{original!r}: {inner!r} is not an IPv6 address") from None
        port = _parse_port(port_text, original)
        if host.is_link_local and not scope:
            raise AddressError(
                f"{original!r}: a link-local address needs its interface; write e.g. [{host}%eth0]:{port}"
            )
        return Endpoint(proto, host, port, scope)
    if text.count(":") != 1:
        if text.count(":") > 1:
            raise AddressError(f"{original!r}: put an IPv6 address in brackets, e.g. [{text.rsplit(':', 1)[0]}]:PORT")
        raise AddressError(f"{original!r}: missing port; write ADDRESS:PORT, e.g. 127.0.0.1:8080, or a bare port")
    host_text, port_text = text.split(":")
    try:
        v4 = ipaddress.IPv4Address(host_text)
    except ValueError:
        raise AddressError(
            f"{original!r}: {host_text!r} is not an IPv4 address (host names are not resolved; write the address)"
        ) from None
    return Endpoint(proto, v4, _parse_port(port_text, original))


def addresses_overlap(new: Endpoint, new_v6only: bool, old: Endpoint, old_v6only: bool | None) -> bool:
    """Whether two sockets on the same port and protocol compete for an address.

    `0.0.0.0` covers every IPv4 address; `[::]` covers every IPv6 address and, unless v6only,
    every IPv4 address too; v4-mapped addresses count as IPv4; otherwise the addresses must be
    equal. `old_v6only=None` means unknown (sock_diag does not report it for TIME_WAIT), and
    then an IPv6 socket is taken as dual-stack: a dual-stack listener's accepted connections
    are not v6only, and their TIME_WAIT blocks a later `0.0.0.0` bind (seen on Linux 6.18).
    """
    if new.port != old.port or new.proto != old.proto:
        return False
    new_v4, old_v4 = new.ipv4_equivalent, old.ipv4_equivalent
    new_v6 = new.host if new.host.version == 6 and new_v4 is None else None
    old_v6 = old.host if old.host.version == 6 and old_v4 is None else None
    new_dual_any = new_v6 is not None and new_v6.is_unspecified and not new_v6only
    old_dual_any = old_v6 is not None and old_v6.is_unspecified and not old_v6only

    # IPv6 proper: [::] against any IPv6 address, or equal addresses.
    if new_v6 is not None and old_v6 is not None and (
            new_v6.is_unspecified or old_v6.is_unspecified or new_v6 == old_v6):
        return True
    # IPv4 (including v4-mapped), where a dual-stack [::] counts as 0.0.0.0.
    new_v4_any = new_dual_any or (new_v4 is not None and new_v4.is_unspecified)
    old_v4_any = old_dual_any or (old_v4 is not None and old_v4.is_unspecified)
    new_has_v4 = new_v4 is not None or new_dual_any
    old_has_v4 = old_v4 is not None or old_dual_any
    if new_has_v4 and old_has_v4 and (new_v4_any or old_v4_any or new_v4 == old_v4):
        return True
    return old_v6only is None and old_v6 is not None and new_v4 is not None and new_v4.is_unspecified

