"""The host's NAT rules that take a port elsewhere: read from `nft -j list ruleset`.

nftables and iptables-nft (what Docker, kube-proxy, the CNI portmap plugin and netavark use on
Debian 12) both land in the kernel's nftables ruleset, which `nft` prints as JSON. Read here:
chains of type nat hooked at prerouting (traffic from outside) or output (this host's own), and
the chains they jump or goto to (at most MAX_DEPTH deep), for rules that DNAT or REDIRECT, with the
protocol, destination ports (values, ranges, anonymous and named sets) and destination addresses
they match. iptables-legacy's rules are not in nftables: evidence/iptables_legacy.py reads them where
the kernel has a legacy nat table, and walks them here.

Root runs `nft` (and iptables-legacy-save) only by its absolute path in /usr/sbin, when root owns it
and every directory above it and no one else can write them, with PATH=/usr/sbin:/usr/bin alone, no
stdin, a session of its own, killed after TOOL_SECONDS or TOOL_MAX_BYTES of output (run_tool). Parsing
(rules_from_ruleset) is pure and bounded too. All of it, tools, parsing and walking, shares one time
budget (NAT_SECONDS, or less where the guard's unit leaves less before TimeoutStartSec=): a kube-proxy
host's ruleset of some MiB takes seconds to walk, and a start killed on its timeout is a refusal that
`nat: warn` must never cause. What is not read by then is said in a note.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from dataclasses import dataclass, field, replace

from bindguard.model.nat import NatRule

TYPE_CHECKING = False
if TYPE_CHECKING:
    from bindguard.request.discover.common import Budget

NFT = "/usr/sbin/nft"
TOOL_ENVIRONMENT = {"PATH": "/usr/sbin:/usr/bin", "LC_ALL": "C"}
TOOL_SECONDS = 5.0
NAT_SECONDS = 5.0  # reading the NAT rules: the tools, parsing and walking together
CHECK_EVERY = 256  # lines or rules between two looks at the clock
TOOL_MAX_BYTES = 64 << 20  # a kube-proxy host with thousands of services prints some MiB
MAX_DEPTH = 16  # jump/goto levels below a hooked chain
MAX_VISITS = 200_000  # rules looked at, over every path: a ruleset cannot make the walk unbounded
HOOKS = ("prerouting", "output")
PORT_PROTOCOLS = frozenset({"tcp", "udp", "sctp", "dccp", "udplite", "th"})
L4_NUMBERS = {6: "tcp", 17: "udp", 132: "sctp", 33: "dccp", 136: "udplite"}
L4_WITH_PORTS = frozenset(L4_NUMBERS.values())  # what a daemon may bind: `l4proto != tcp` leaves these but tcp
# Statements known to act on every packet that reaches them and let it go on: before an accept or a
# drop they leave it unconditional (`counter accept`). Any other statement may stop some packets
# (limit, quota, ct count, a meter; one nft adds later): a verdict after it is a condition's.
UNCONDITIONAL = frozenset({"counter", "log", "mangle", "notrack", "dup", "secmark", "ct helper", "ct timeout",
                           "ct expectation"})
# What the walk itself reads in a rule: matches, verdicts and NAT targets (xt: iptables-nft's).
READ = frozenset({"match", "xt", "accept", "drop", "return", "continue", "jump", "goto", "dnat", "redirect"})

# Who writes rules in chains of these names (the chain's own name, or one on the path to it), and
# where to look for the container or service that published the port.
OWNERS = (
    ("DOCKER", "Docker", "`docker ps` shows the container publishing the port"),
    ("CNI-HOSTPORT", "Kubernetes hostPort (CNI portmap)", "a pod's hostPort: `kubectl get pods -A -o wide`"),
    ("CNI-DN-", "the CNI portmap plugin", "a container's published port (Podman: `podman ps`; Kubernetes: a hostPort)"),
    ("KUBE-NODEPORTS", "Kubernetes NodePort (kube-proxy)", "`kubectl get svc -A` lists the service with this nodePort"),
    ("KUBE-", "Kubernetes (kube-proxy)", "`kubectl get svc -A` lists the service"),
    ("nodeport", "Kubernetes NodePort (kube-proxy)", "`kubectl get svc -A` lists the service with this nodePort"),
    ("NETAVARK-", "Podman (netavark)", "`podman ps` shows the container publishing the port"),
)


class NatUnreadable(Exception):
    """The ruleset could not be read; str() says why."""


def nat_budget(seconds: float = NAT_SECONDS) -> Budget:
    """The time budget of one reading of the NAT rules (discovery's Budget: its clock alone counts)."""
    from bindguard.request.discover.common import Budget

    return Budget(seconds=seconds)


def spent(budget: Budget | None, count: int) -> bool:
    """Whether the budget's time is up; looked at once every CHECK_EVERY lines or rules."""
    return budget is not None and count % CHECK_EVERY == 0 and budget.seconds_left() <= 0


def not_all_read(what: str, budget: Budget) -> str:
    return f"{what} not all read: {stopped(budget)}; a rule not read is not reported"


def stopped(budget: Budget) -> str:
    return f"reading the NAT rules stops after {budget.limits[2]:g} s"


@dataclass
class _Conditions:
    protos: frozenset[str] | None = None
    ports: tuple[tuple[int, int], ...] | None = None
    ports_negated: bool = False
    daddrs: tuple[str, ...] | None = None
    daddrs_negated: bool = False
    local_only: bool = False
    also: list[str] = field(default_factory=list)
    family_of_daddr: str | None = None

    def copy(self) -> _Conditions:
        return _Conditions(self.protos, self.ports, self.ports_negated, self.daddrs, self.daddrs_negated,
                           self.local_only, list(self.also), self.family_of_daddr)


def run_tool(path: str, package: str, *args: str, budget: Budget | None = None) -> bytes:
    """The output of the tool at path (absolute, under /usr/sbin) run with args, within TOOL_SECONDS and
    what is left of budget; NatUnreadable when it is missing, untrusted or fails. What is executed is the
    checked file path resolves to; argv[0] stays path, since a multi-call binary (xtables-legacy-multi)
    picks its applet by that name."""
    import bindguard
    from bindguard.request.discover.dump import run_bounded

    if not os.path.exists(path):
        raise NatUnreadable(f"{path} is not installed (Debian's {package} package)")
    program, why = bindguard.checked_path(path)  # program: the file checked, which is the one run
    if why:
        raise NatUnreadable(f"{path} is not run: {why}")
    command = " ".join([os.path.basename(path), *args])
    seconds = TOOL_SECONDS if budget is None else min(TOOL_SECONDS, budget.seconds_left())
    if budget is not None and seconds <= 0:
        raise NatUnreadable(f"`{command}` not run: {stopped(budget)}")
    try:
        code, out, err, failure = run_bounded([path, *args], TOOL_ENVIRONMENT, seconds, TOOL_MAX_BYTES,
                                              program=program)
    except OSError as exc:
        raise NatUnreadable(f"{path}: {exc}") from None
    if failure:
        raise NatUnreadable(f"`{command}`: {failure}; stopped")
    if code != 0:
        from bindguard.model.text import excerpt

        first = next((line for line in err.decode("utf-8", "replace").splitlines() if line.strip()), "")
        raise NatUnreadable(f"`{command}` failed (exit {code}): {excerpt(first.strip())}")
    return out


def read_ruleset(budget: Budget | None = None) -> dict:
    """`nft -j list ruleset`, parsed; NatUnreadable when nft is missing, untrusted or fails."""
    out = run_tool(NFT, "nftables", "-j", "list", "ruleset", budget=budget)
    try:
        ruleset = json.loads(out or b'{"nftables": []}')
    except ValueError as exc:
        raise NatUnreadable(f"`nft -j list ruleset` printed no JSON: {exc}") from None
    if not isinstance(ruleset, dict):
        raise NatUnreadable("`nft -j list ruleset` printed no JSON object")
    return ruleset


def _owner(path: tuple[str, ...]) -> tuple[str, str]:
    for chain in reversed(path):
        for prefix, who, hint in OWNERS:
            if chain.startswith(prefix):
                return who, hint
    return "", ""


def _elements(value, sets: dict[str, list]) -> list | None:
    """The elements a match's right side names: one value, a range, a prefix, a set (anonymous or
    @named, from this table); None when it is something else (a map, a concatenation)."""
    if isinstance(value, str) and value.startswith("@"):
        named = sets.get(value[1:])
        return None if named is None else [e for v in named for e in (_elements(v, sets) or [None])]
    if isinstance(value, dict) and "set" in value and isinstance(value["set"], list):
        return [e for v in value["set"] for e in (_elements(v, sets) or [None])]
    if isinstance(value, dict) and "elem" in value and isinstance(value["elem"], dict):
        return _elements(value["elem"].get("val"), sets)
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        return [value]
    if isinstance(value, dict) and ("range" in value or "prefix" in value):
        return [value]
    return None


def _port_ranges(elements: list) -> tuple[tuple[int, int], ...] | None:
    ranges = []
    for e in elements:
        if isinstance(e, int) and not isinstance(e, bool):
            ranges.append((e, e))
        elif isinstance(e, dict) and isinstance(e.get("range"), list) and len(e["range"]) == 2 \
                and all(isinstance(x, int) for x in e["range"]):
            ranges.append((e["range"][0], e["range"][1]))
        else:
            return None  # a port by service name, or something unread: the rule is not claimed
    return tuple(ranges)


def _networks(elements: list) -> tuple[str, ...] | None:
    nets = []
    for e in elements:
        try:
            if isinstance(e, str):
                nets.append(str(ipaddress.ip_network(e, strict=False)))
            elif isinstance(e, dict) and isinstance(e.get("prefix"), dict):
                nets.append(str(ipaddress.ip_network(f"{e['prefix']['addr']}/{e['prefix']['len']}", strict=False)))
            elif isinstance(e, dict) and isinstance(e.get("range"), list) and len(e["range"]) == 2:
                low, high = (ipaddress.ip_address(x) for x in e["range"])
                nets.extend(str(n) for n in ipaddress.summarize_address_range(low, high))
            else:
                return None
        except (ValueError, TypeError, KeyError):
            return None
    return tuple(nets)


def _protocols(elements: list) -> frozenset[str] | None:
    names = set()
    for e in elements:
        if isinstance(e, str):
            names.add(e)
        elif isinstance(e, int) and e in L4_NUMBERS:
            names.add(L4_NUMBERS[e])
        else:
            return None
    return frozenset(names)


def _short(expr) -> str:
    """An unread match as a few words: its left side's key and the value."""
    text = json.dumps(expr, separators=(",", ":"), sort_keys=True)
    return text if len(text) <= 120 else text[:117] + "..."


def _apply_match(match: dict, cond: _Conditions, sets: dict[str, list]) -> bool:
    """Add one match's condition; False when the match can never hold with those already there."""
    op, left, right = match.get("op", "=="), match.get("left"), match.get("right")
    negated = op == "!="
    if op not in ("==", "!=", "in"):
        cond.also.append(_short(match))
        return True
    elements = _elements(right, sets)
    payload = left.get("payload") if isinstance(left, dict) else None
    meta = left.get("meta") if isinstance(left, dict) else None
    fib = left.get("fib") if isinstance(left, dict) else None
    if isinstance(payload, dict) and payload.get("field") == "dport" and payload.get("protocol") in PORT_PROTOCOLS:
        ranges = _port_ranges(elements) if elements is not None else None
        proto = payload["protocol"]
        if proto != "th":
            cond.protos = frozenset({proto}) if cond.protos is None else cond.protos & {proto}
        if ranges is None:
            cond.also.append(_short(match))
        elif cond.ports is None:
            cond.ports, cond.ports_negated = ranges, negated
        elif not negated and not cond.ports_negated:  # a jump's ports, then the rule's own: both must hold
            cond.ports = tuple((max(a, c), min(b, d)) for a, b in cond.ports for c, d in ranges
                               if max(a, c) <= min(b, d))
            return bool(cond.ports)
        else:
            cond.also.append(_short(match))  # a negated second port match: kept as written
        return True
    if isinstance(payload, dict) and payload.get("field") == "daddr" and payload.get("protocol") in ("ip", "ip6"):
        nets = _networks(elements) if elements is not None else None
        if nets is None or cond.daddrs is not None:
            cond.also.append(_short(match))
        else:
            cond.daddrs, cond.daddrs_negated = nets, negated
            cond.family_of_daddr = payload["protocol"]
        return True
    is_l4 = (isinstance(meta, dict) and meta.get("key") == "l4proto") or (
        isinstance(payload, dict) and (payload.get("protocol"), payload.get("field")) in (("ip", "protocol"),
                                                                                          ("ip6", "nexthdr")))
    if is_l4:
        names = _protocols(elements) if elements is not None else None
        if names is None:
            cond.also.append(_short(match))
        elif negated:  # every protocol with ports but those: never claimed for the one it excludes
            cond.protos = (L4_WITH_PORTS if cond.protos is None else cond.protos) - names
        else:
            cond.protos = names if cond.protos is None else cond.protos & names
        return True
    if isinstance(fib, dict) and fib.get("result") == "type" and fib.get("flags") == ["daddr"] and \
            right == "local" and not negated:
        cond.local_only = True
        return True
    if isinstance(meta, dict) and isinstance(right, str):
        cond.also.append(f"{meta.get('key')} {op} {json.dumps(right)}")
        return True
    cond.also.append(_short(match))
    return True


def _written(value) -> str | None:
    """A NAT target's address or port as nft writes it: one value, a range a-b or a prefix a/n;
    None for what is looked up in a map at run time."""
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, dict):
        span, prefix = value.get("range"), value.get("prefix")
        if isinstance(span, list) and len(span) == 2 and all(isinstance(v, (str, int)) for v in span):
            return f"{span[0]}-{span[1]}"
        if isinstance(prefix, dict) and isinstance(prefix.get("addr"), str) and isinstance(prefix.get("len"), int):
            return f"{prefix['addr']}/{prefix['len']}"
    return None


def _target(expr: dict) -> tuple[str, str] | None:
    """(action, where to) for a dnat/redirect statement (native, or iptables-nft's xt target)."""
    if "dnat" in expr:
        to = expr["dnat"] or {}
        addr, port = to.get("addr"), to.get("port")
        where = ""
        if addr is not None:
            where = _written(addr) or "a map"
            if ":" in where and port is not None:  # IPv6, bracketed before a port as nft writes it
                where = "-".join(f"[{end}]" for end in where.split("-"))
        if port is not None:
            written = _written(port)
            where += f":{written}" if written else " (port from a map)"
        return "dnat", where
    if "redirect" in expr:
        port = (expr["redirect"] or {}).get("port")
        written = _written(port) if port is not None else None
        if written is None:
            return "redirect", "this host"
        return "redirect", f"{'ports' if '-' in written else 'port'} {written} on this host"
    xt = expr.get("xt")
    if isinstance(xt, dict) and xt.get("type") == "target" and xt.get("name") in ("DNAT", "REDIRECT"):
        return xt["name"].lower(), ""
    return None


def rules_from_ruleset(ruleset: dict, source: str = "nftables",
                       budget: Budget | None = None) -> tuple[list[NatRule], list[str]]:
    """Every DNAT/REDIRECT reachable from a nat chain hooked at prerouting or output, with the
    conditions on the way to it; and notes on what was not read (within budget's time, where given).
    `source` names where the ruleset was read (iptables_legacy translates iptables-legacy-save's rules
    into the same JSON)."""
    items = ruleset.get("nftables") if isinstance(ruleset, dict) else None
    if not isinstance(items, list):
        return [], ["the nftables ruleset has no `nftables` list"]
    chains: dict[tuple[str, str, str], dict] = {}
    rules: dict[tuple[str, str, str], list[dict]] = {}
    sets: dict[tuple[str, str], dict[str, list]] = {}
    for count, item in enumerate(items):
        if spent(budget, count):
            assert budget is not None
            return [], [not_all_read(f"the {source} ruleset", budget)]
        if not isinstance(item, dict):
            continue
        for what, body in item.items():
            if not isinstance(body, dict):
                continue
            table = (str(body.get("family")), str(body.get("table")))
            if what == "chain":
                chains[(*table, str(body.get("name")))] = body
            elif what == "rule" and isinstance(body.get("expr"), list):
                rules.setdefault((*table, str(body.get("chain"))), []).append(body)
            elif what in ("set", "map") and isinstance(body.get("elem"), list):
                sets.setdefault(table, {})[str(body.get("name"))] = body["elem"]
    found: list[NatRule] = []
    notes: list[str] = []
    visits = 0
    out_of_time = False

    def walk(key: tuple[str, str, str], hook: str, cond: _Conditions, path: tuple[str, ...]) -> bool:
        """Read the chain `key` for packets under `cond`; True when every such packet ends the
        hook's nat pass in it (an accept, a drop, a NAT target or a goto with no condition), so
        that the rules after the jump that led here are never reached."""
        nonlocal visits, out_of_time
        for rule in rules.get(key, ()):
            visits += 1
            out_of_time = out_of_time or spent(budget, visits)
            if visits > MAX_VISITS or out_of_time:
                return False
            here = cond.copy()
            matched = False
            for expr in rule["expr"]:
                if not isinstance(expr, dict):
                    continue
                if "match" in expr and isinstance(expr["match"], dict):
                    matched = True
                    if not _apply_match(expr["match"], here, sets.get(key[:2], {})):
                        break  # its conditions contradict those on the way here: never matches
                    continue
                if isinstance(expr.get("xt"), dict) and expr["xt"].get("type") == "match":
                    # iptables-nft's JSON names the match only; iptables_legacy keeps it as written
                    here.also.append(str(expr["xt"].get("written") or f"iptables match {expr['xt'].get('name')}"))
                    matched = True
                    continue
                if "vmap" in expr:  # kube-proxy's nftables mode, netavark's nftables driver
                    note = (f"chain {key[2]} of table {key[0]} {key[1]} sends packets through a verdict map, whose "
                            "chains were not read: a port taken elsewhere through it is not reported")
                    if note not in notes:
                        notes.append(note)
                    matched = True  # a packet not in the map goes on to the next rule
                    continue
                if not READ.intersection(expr) and not UNCONDITIONAL.intersection(expr):
                    here.also.append(_short(expr))  # limit, quota, ct count...: not every packet passes
                    matched = True
                    continue
                if not matched and "return" in expr:
                    return False  # every packet goes back to the chain that jumped here
                if not matched and ("accept" in expr or "drop" in expr):
                    return True  # every packet's nat pass ends here
                target = _target(expr)
                if target is not None:
                    if here.protos is not None and not here.protos:
                        break  # tcp and udp at once: never matches
                    owner = _owner(path)
                    found.append(NatRule(
                        family=key[0], table=key[1], chain=key[2], path=path, hook=hook,
                        handle=rule.get("handle") if isinstance(rule.get("handle"), int) else None,
                        action=target[0], to=target[1], protos=here.protos, ports=here.ports,
                        ports_negated=here.ports_negated, daddrs=here.daddrs, daddrs_negated=here.daddrs_negated,
                        local_only=here.local_only, also=tuple(here.also),
                        comment=str(rule.get("comment") or ""), owner=owner[0], owner_hint=owner[1],
                        source=source))
                    if not matched:
                        return True  # a NAT target is a verdict: no rule below sees the packet
                    break
                for verb in ("jump", "goto"):
                    if isinstance(expr.get(verb), dict):
                        name = str(expr[verb].get("target"))
                        if name in path:
                            break
                        if len(path) > MAX_DEPTH:
                            notes.append(f"chain {name} is more than {MAX_DEPTH} jumps below {path[0]}: not read")
                            break
                        ends = walk((key[0], key[1], name), hook, here, (*path, name))
                        if not matched and (ends or verb == "goto"):
                            # a goto never comes back here: its chain's end is this chain's end
                            return ends
                        break
        return False  # the chain's end: back to the chain that jumped here, or the base chain's policy

    for key, chain in chains.items():
        if chain.get("type") == "nat" and chain.get("hook") in HOOKS:
            walk(key, str(chain["hook"]), _Conditions(), (key[2],))
    if visits > MAX_VISITS:
        notes.append(f"the {source} ruleset has more than {MAX_VISITS} rules on the nat paths: not all were read")
    if out_of_time:
        assert budget is not None
        notes.append(not_all_read(f"the {source} ruleset", budget))
    return found, notes


_TABLE = re.compile(r"^table (\S+) (\S+) \{")
_CHAIN = re.compile(r"^\s*chain (\S+) \{")
_XLATED = re.compile(r"\b(dnat|redirect) to (\S+).*# handle (\d+)\s*$")


def xt_targets_from_text(text: str, budget: Budget | None = None) -> dict[tuple[str, str, str, int], str]:
    """Where iptables-nft's DNAT/REDIRECT targets send the traffic, from `nft -a list ruleset`: its
    text (not its JSON) translates an xt target back (`dnat to 10.88.0.2:8080`), keyed by the rule's
    (family, table, chain, handle); those read within budget's time."""
    found: dict[tuple[str, str, str, int], str] = {}
    table: tuple[str, str] | None = None
    chain = ""
    for count, line in enumerate(text.splitlines()):
        if spent(budget, count):
            break
        if m := _TABLE.match(line):
            table, chain = (m.group(1), m.group(2)), ""
        elif m := _CHAIN.match(line):
            chain = m.group(1)
        elif table and chain and (m := _XLATED.search(line)):
            to = m.group(2)
            found[(*table, chain, int(m.group(3)))] = (f"port {to[1:]} on this host" if m.group(1) == "redirect"
                                                      and to.startswith(":") else to)
    return found


def nat_rules(seconds: float = NAT_SECONDS) -> tuple[list[NatRule], list[str]]:
    """The host's DNAT/REDIRECT rules, from nftables and from iptables-legacy's nat tables where the
    kernel has them, read within `seconds`, and notes on what could not be read."""
    from bindguard.evidence.iptables_legacy import legacy_nat_rules

    budget = nat_budget(seconds)
    rules, notes = _nftables_rules(budget)
    legacy, legacy_notes = legacy_nat_rules(budget)
    return rules + legacy, notes + legacy_notes


def _nftables_rules(budget: Budget) -> tuple[list[NatRule], list[str]]:
    """The nftables ruleset's DNAT/REDIRECT rules and notes; ([], [why]) when it cannot be read.

    Where iptables-nft wrote a rule, the JSON names its target only ("xt target DNAT"): then the
    text listing is read once more for where the traffic goes."""
    try:
        rules, notes = rules_from_ruleset(read_ruleset(budget), budget=budget)
    except NatUnreadable as exc:
        return [], [f"NAT rules not read: {exc}"]
    if any(not r.to for r in rules):
        try:
            text = run_tool(NFT, "nftables", "-a", "list", "ruleset", budget=budget).decode("utf-8", "replace")
        except NatUnreadable as exc:
            notes.append(f"where iptables-nft's DNAT/REDIRECT rules send the traffic was not read: {exc}")
        else:
            targets = xt_targets_from_text(text, budget)
            rules = [replace(r, to=targets.get((r.family, r.table, r.chain, r.handle or -1), r.to)) if not r.to
                     else r for r in rules]
            if any(not r.to for r in rules) and budget.seconds_left() <= 0:  # the text was cut short
                notes.append(not_all_read("where iptables-nft's DNAT/REDIRECT rules send the traffic", budget))
    return rules, notes
