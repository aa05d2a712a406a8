"""A NAT rule that takes traffic for a port elsewhere (DNAT, REDIRECT), as read from the host's
nftables ruleset or iptables-legacy's nat tables, and whether it catches what a daemon binds. No I/O.

A published port of Docker (userland-proxy=false), Kubernetes (hostPort, NodePort) or Podman
(netavark) is such a rule and no socket: the daemon's bind() succeeds and its clients reach a
container instead. The rule is kept as its matches were written: what it needs and cannot be
read here (an input interface, an iptables match) is listed in `also`, never guessed."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from bindguard.model.endpoints import Bind
from bindguard.model.text import shell_word

IPV4_FAMILIES = frozenset({"ip", "inet"})
IPV6_FAMILIES = frozenset({"ip6", "inet"})


@dataclass(frozen=True)
class NatRule:
    family: str  # ip, ip6, inet
    table: str
    chain: str  # the chain holding the dnat/redirect
    path: tuple[str, ...]  # from the hooked chain down to `chain`, through jump/goto
    hook: str  # prerouting (traffic from outside) or output (this host's own)
    handle: int | None  # what deletes it: nft's rule handle; iptables-legacy's number of the rule in its chain
    action: str  # "dnat" or "redirect"
    to: str  # where the traffic goes: "192.0.2.7:80", "port 9443", "" when not readable
    protos: frozenset[str] | None = None  # tcp, udp, ...; None: any
    ports: tuple[tuple[int, int], ...] | None = None  # destination port ranges; None: any port
    ports_negated: bool = False
    daddrs: tuple[str, ...] | None = None  # destination networks; None: any address
    daddrs_negated: bool = False
    local_only: bool = False  # `fib daddr type local` (iptables' addrtype LOCAL)
    also: tuple[str, ...] = ()  # further conditions, as written (iifname != "docker0", ...)
    comment: str = ""
    owner: str = ""  # who made it, where the chain's name says so (Docker, Kubernetes, Podman)
    owner_hint: str = ""  # where to see the container or service behind it
    source: str = "nftables"  # where it was read: "nftables", or the legacy tool that lists it, "iptables-legacy" or
    # "ip6tables-legacy" (its rules are not in nftables)

    @property
    def legacy(self) -> bool:
        return self.source != "nftables"

    def catches(self, bind: Bind) -> bool:
        """Whether traffic to bind's address and port may be redirected by this rule."""
        ep = bind.endpoint
        if self.protos is not None and ep.proto not in self.protos:
            return False
        if self.ports is not None:
            inside = any(low <= ep.port <= high for low, high in self.ports)
            if inside == self.ports_negated:
                return False
        v4 = self.family in IPV4_FAMILIES and (ep.host.version == 4 or ep.is_wildcard and not bind.v6only)
        v6 = self.family in IPV6_FAMILIES and ep.host.version == 6
        if not (v4 or v6):
            return False
        if self.hook == "prerouting" and ep.host.is_loopback:
            return False  # from outside, a loopback destination is a martian and dropped (route_localnet=0)
        if self.daddrs is None or ep.is_wildcard:
            return True  # a wildcard bind serves every address the rule may name
        host = ep.host
        if host.version == 6 and host.ipv4_mapped is not None:
            host = host.ipv4_mapped
        inside = any(host in ipaddress.ip_network(n, strict=False) for n in self.daddrs
                     if ipaddress.ip_network(n, strict=False).version == host.version)
        return inside != self.daddrs_negated

    def where(self) -> str:
        """table/chain as nft (or the iptables-legacy tool) names it, with the path the traffic took there."""
        via = f" (via {' -> '.join(self.path)})" if len(self.path) > 1 else ""
        table = f"{self.source} table {self.table}" if self.legacy else f"table {self.family} {self.table}"
        return f"{table}, chain {self.chain}{via}"

    def listing(self) -> str:
        """The command that lists the rule's chain with what identifies the rule (handle, number); the
        whole nat table's where a name in the ruleset is not safe in a command as it is (the kernel
        takes any bytes for a chain's name: `x;reboot` too)."""
        if not all(shell_word(name) for name in (self.family, self.table, self.chain)):
            return f"{self.source}-save -t nat" if self.legacy else "nft -a list ruleset"
        if self.legacy:
            return f"{self.source} -t {self.table} -n -L {self.chain} --line-numbers"
        return f"nft -a list chain {self.family} {self.table} {self.chain}"

    def describe(self) -> str:
        parts = []
        if self.protos is not None:
            parts.append("/".join(sorted(self.protos)))
        if self.ports is not None:
            ports = ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.ports)
            parts.append(f"dport {'!= ' if self.ports_negated else ''}{ports}")
        if self.daddrs is not None:
            parts.append(f"daddr {'!= ' if self.daddrs_negated else ''}{', '.join(self.daddrs)}")
        if self.local_only:
            parts.append("daddr type local")
        parts.extend(self.also)
        target = self.action + (f" to {self.to}" if self.to else " (target not readable: an iptables-nft rule; "
                                                                    "`iptables-nft -t nat -S` shows it)")
        handle = "" if self.handle is None else f" # rule {self.handle}" if self.legacy else f" # handle {self.handle}"
        return " ".join([*parts, target]) + handle
