"""iptables-legacy's nat tables: read with `iptables-legacy-save -t nat`, walked as nftables' are.

iptables-legacy keeps its rules in the kernel's x_tables, not in nftables, so `nft` never shows them
(Docker or kube-proxy on a host switched to iptables-legacy). The kernel lists the legacy tables in
use in /proc/net/ip_tables_names and ip6_tables_names (per network namespace); only where `nat` is
listed is `/usr/sbin/iptables-legacy-save -t nat` (`ip6tables-legacy-save`) run, under the same rules
as nft (evidence/nat.py run_tool): running it anywhere else would load an empty nat table.

Its `-A CHAIN ...` lines are translated into the expressions of `nft -j list ruleset` (matches,
jump, goto, return, dnat, redirect) and walked by evidence/nat.py's rules_from_ruleset, so what is
reachable, the depth bound and how conditions along a path combine are decided in one place. Read:
`-p`, `-d`, `-i`/`-o`, `--dport` of -m tcp/udp/sctp/dccp/udplite, `-m multiport --dports`,
`-m addrtype --dst-type LOCAL`, `-m comment`, `-j DNAT --to-destination`, `-j REDIRECT --to-ports`,
RETURN, ACCEPT, and jumps and gotos to the table's own chains. Any other match is kept as written
and listed with the rule, as iptables-nft's matches are; a negated one (`-m conntrack ! --ctstate
DNAT`) keeps the rule from being claimed at all, since what it leaves out cannot be told. So does
`! --dst-type LOCAL`: a daemon's addresses are local, so such a rule never takes them.
"""

from __future__ import annotations

import ipaddress
import shlex

from bindguard.evidence.nat import NatUnreadable, not_all_read, rules_from_ruleset, run_tool, spent
from bindguard.model.nat import NatRule

TYPE_CHECKING = False
if TYPE_CHECKING:
    from bindguard.request.discover.common import Budget

# family: (the kernel's list of legacy tables in use, the tool that prints them)
LEGACY_TABLES = {
    "ip": ("/proc/net/ip_tables_names", "/usr/sbin/iptables-legacy-save"),
    "ip6": ("/proc/net/ip6_tables_names", "/usr/sbin/ip6tables-legacy-save"),
}
SOURCES = {"ip": "iptables-legacy", "ip6": "ip6tables-legacy"}  # a rule's source (NatRule.source), by family
NAMES_MAX_BYTES = 4096  # a handful of table names
BUILTIN_HOOKS = {"PREROUTING": "prerouting", "INPUT": "input", "OUTPUT": "output", "POSTROUTING": "postrouting"}
PORT_MODULES = frozenset({"tcp", "udp", "sctp", "dccp", "udplite"})
# Options whose values are known and not evaluated: they narrow which clients are caught, as an input
# interface does, either way round; kept with the rule as written.
CLIENT_OPTIONS = frozenset({"-s", "--source", "--sport", "--source-port", "--sports", "--source-ports"})
# The destination options of the read modules; any other option of theirs is kept as written.
DESTINATION_OPTIONS = {
    **{module: frozenset({"--dport", "--destination-port"}) for module in PORT_MODULES},
    "multiport": frozenset({"--dports", "--destination-ports"}),
    "addrtype": frozenset({"--dst-type"}),
}
MATCH_OR_TARGET = frozenset({"-m", "--match", "-j", "--jump", "-g", "--goto"})


class _Unclaimable(Exception):
    """A rule whose conditions cannot be told to hold: it is left out, never claimed."""


def _in_use(names_path: str) -> bool | str:
    """Whether the kernel lists a legacy nat table, or why that could not be read."""
    from bindguard.request.files import Refused, read_regular

    try:
        names = read_regular(names_path, NAMES_MAX_BYTES).decode("ascii", "replace").split()
    except FileNotFoundError:
        return False  # x_tables is not loaded: there is no legacy table at all
    except (OSError, Refused) as exc:
        return f"{names_path} not read: {getattr(exc, 'strerror', None) or exc}"
    return "nat" in names


def legacy_nat_rules(budget: Budget | None = None) -> tuple[list[NatRule], list[str]]:
    """The DNAT/REDIRECT rules of the legacy nat tables the kernel has, read within budget's time, and
    notes on what was not read."""
    rules: list[NatRule] = []
    notes: list[str] = []
    for family, (names_path, tool) in LEGACY_TABLES.items():
        in_use = _in_use(names_path)
        if in_use is False:
            continue
        if isinstance(in_use, str):
            notes.append(f"iptables-legacy's nat rules not read: {in_use}")
            continue
        try:
            text = run_tool(tool, "iptables", "-t", "nat", budget=budget).decode("utf-8", "replace")
        except NatUnreadable as exc:
            notes.append(f"the kernel has an iptables-legacy nat table ({names_path}), whose rules are not in "
                         f"nftables, but they were not read: {exc}")
            continue
        found, more = rules_from_save(text, family, budget)
        rules.extend(found)
        notes.extend(more)
    return rules, notes


def rules_from_save(text: str, family: str, budget: Budget | None = None) -> tuple[list[NatRule], list[str]]:
    """The DNAT/REDIRECT rules reachable in the nat table of iptables-legacy-save's text, read within
    budget's time, and notes."""
    ruleset, notes = ruleset_from_save(text, family, budget)
    if ruleset is None:
        return [], notes
    rules, more = rules_from_ruleset(ruleset, SOURCES[family], budget)
    return rules, notes + more


def ruleset_from_save(text: str, family: str, budget: Budget | None = None) -> tuple[dict | None, list[str]]:
    """iptables-save's nat table as `nft -j list ruleset` would show it: chains (the built-in ones
    hooked), and per rule its number in the chain, comment and expressions; notes on lines not read.
    None where budget's time ran out first: a table read in part could lose the rule that ends a chain."""
    items: list[dict] = []
    notes: list[str] = []
    table = ""
    user_chains: set[str] = set()
    numbers: dict[str, int] = {}
    lines = text.splitlines()
    source = SOURCES[family]
    for count, line in enumerate(lines):  # chains first: a rule may jump to a chain declared after it is used
        if spent(budget, count):
            assert budget is not None
            return None, [not_all_read(f"the {source} nat table", budget)]
        if line.startswith("*"):
            table = line[1:].strip()
        elif table == "nat" and line.startswith(":") and line[1:].split():
            name, *policy = line[1:].split()
            body = {"family": family, "table": "nat", "name": name}
            if policy and policy[0] != "-" and name in BUILTIN_HOOKS:
                body |= {"type": "nat", "hook": BUILTIN_HOOKS[name]}
            else:
                user_chains.add(name)
            items.append({"chain": body})
    table = ""
    for count, line in enumerate(lines):
        if spent(budget, count):
            assert budget is not None
            return None, [*notes, not_all_read(f"the {source} nat table", budget)]
        if line.startswith("*"):
            table = line[1:].strip()
        head = line.split(maxsplit=2) if table == "nat" and line.startswith("-A ") else []
        if len(head) < 2:
            continue
        chain = head[1]  # counted before the rest is read: iptables numbers every rule
        numbers[chain] = numbers.get(chain, 0) + 1
        try:
            words = shlex.split(line)
        except ValueError:
            from bindguard.model.text import excerpt

            notes.append(f"an iptables-legacy rule not read (unbalanced quotes): {excerpt(line)}")
            continue
        try:
            expr, comment = _expressions(words[2:], family, user_chains)
        except _Unclaimable:
            continue
        rule = {"family": family, "table": "nat", "chain": chain, "handle": numbers[chain], "expr": expr}
        if comment:
            rule["comment"] = comment
        items.append({"rule": rule})
    return {"nftables": items}, notes


def _written(words: list[str], negated: bool = False) -> dict:
    """A condition the walk keeps as written (an xt match, as iptables-nft's JSON has it)."""
    return {"xt": {"type": "match", "written": shlex.join(["!", *words] if negated else words)}}


def _match(left: dict, right, negated: bool) -> dict:
    return {"match": {"op": "!=" if negated else "==", "left": left, "right": right}}


def _port(text: str) -> int | dict:
    """`80` or `8000:8010` (iptables' range), as nft's JSON writes a port or a range."""
    low, sep, high = text.partition(":")
    if not sep:
        return _number(low)
    return {"range": [_number(low or "0"), _number(high or "65535")]}


def _number(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) > 65535:
        raise ValueError(text)
    return int(text)


def _expressions(words: list[str], family: str, user_chains: set[str]) -> tuple[list[dict], str]:
    """One rule's words after `-A CHAIN` as nft expressions, and its comment; _Unclaimable when a
    condition cannot be told to hold (a negated one not read here)."""
    expr: list[dict] = []
    comment = ""
    protocol = ""
    module = ""  # the -m whose options follow; "" before the first: iptables' own options
    i = 0
    while i < len(words):
        negated = words[i] == "!"
        start = i
        i += negated
        option = words[i] if i < len(words) else ""
        value = words[i + 1] if i + 1 < len(words) else ""
        if option in ("-j", "--jump", "-g", "--goto"):
            expr.extend(_verdict(option, words[i + 1:], user_chains))
            break
        if option in ("-m", "--match"):
            module, i = value, i + 2
            continue
        if module == "comment" and option == "--comment":
            comment, i = value, i + 2
            continue
        if not module and option in ("-p", "--protocol"):
            protocol = "" if negated else value
            if value != "all" or negated:
                expr.append(_match({"meta": {"key": "l4proto"}}, int(value) if value.isdigit() else value, negated))
        elif not module and option in ("-d", "--destination"):
            expr.append(_destination(value, family, negated))
        elif not module and option in ("-i", "--in-interface", "-o", "--out-interface"):
            key = "iifname" if option in ("-i", "--in-interface") else "oifname"
            expr.append(_match({"meta": {"key": key}}, value, negated))
        elif option in CLIENT_OPTIONS:
            expr.append(_written([*(["-m", module] if module else []), option, value], negated))
        elif option in DESTINATION_OPTIONS.get(module, ()):
            expr.append(_module_option(module, option, value, negated, protocol))
        else:  # not read here: the rest of this module (or up to the next one) is kept as written
            end = next((j for j in range(i, len(words)) if words[j] in MATCH_OR_TARGET), len(words))
            rest = words[start:end]
            if "!" in rest:
                raise _Unclaimable
            expr.append(_written([*(["-m", module] if module else []), *rest]))
            i = end
            continue
        i += 2
    return expr, comment


def _destination(value: str, family: str, negated: bool) -> dict:
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:  # a non-contiguous mask: kept as written, or the rule is not claimed
        if negated:
            raise _Unclaimable from None
        return _written(["-d", value])
    return _match({"payload": {"protocol": family, "field": "daddr"}}, str(network), negated)


def _module_option(module: str, option: str, value: str, negated: bool, protocol: str) -> dict:
    """A destination match of -m tcp/udp/..., multiport or addrtype, as nft's expression."""
    if module == "addrtype" and value == "LOCAL":
        if negated:
            raise _Unclaimable  # to no local address: never to one a daemon binds
        return _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local", False)
    try:
        if module == "multiport" and protocol in PORT_MODULES:  # --dports
            ports = [_port(p) for p in value.split(",")]
            return _match({"payload": {"protocol": protocol, "field": "dport"}}, {"set": ports}, negated)
        if module in PORT_MODULES:  # --dport
            return _match({"payload": {"protocol": module, "field": "dport"}}, _port(value), negated)
    except ValueError:
        pass
    if negated:
        raise _Unclaimable
    return _written(["-m", module, option, value])


def _verdict(option: str, words: list[str], user_chains: set[str]) -> list[dict]:
    """What `-j TARGET ...` or `-g CHAIN` does, as nft's statements; [] for a target that takes no
    traffic elsewhere (MASQUERADE, SNAT, MARK, LOG...)."""
    target = words[0] if words else ""
    options = {word: words[i + 1] for i, word in enumerate(words[:-1]) if word.startswith("--")}
    if target in user_chains:
        return [{"goto" if option in ("-g", "--goto") else "jump": {"target": target}}]
    if target == "DNAT" and "--to-destination" in options:
        return [{"dnat": {"addr": options["--to-destination"]}}]  # as written: 192.0.2.7:80, [2001:db8::7]:80
    if target == "REDIRECT":
        ports = options.get("--to-ports", "")
        low, _, high = ports.partition("-")
        if low.isdigit() and (not high or high.isdigit()):
            port: int | dict = int(low) if not high else {"range": [int(low), int(high)]}
            return [{"redirect": {"port": port}}]
        return [{"redirect": {}}]
    if target in ("RETURN", "ACCEPT"):
        return [{target.lower(): None}]
    return []
