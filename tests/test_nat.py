"""NAT rules that take a port away (nat-shadowed): recorded rulesets, and real nftables rules
(nft and iptables-nft) and iptables-legacy rules in network namespaces, read by `explain` and by
`check` as a unit's YAML asks.

Rules name documentation addresses only (192.0.2.0/24, 198.51.100.0/24, 2001:db8::/32) as their
targets: nothing is sent anywhere."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bindguard.evidence.iptables_legacy import rules_from_save
from bindguard.evidence.nat import MAX_DEPTH, rules_from_ruleset, xt_targets_from_text
from bindguard.model.endpoints import Bind, SocketOptions, parse_listen
from bindguard.verdict.nat import nat_conflicts
from conftest import need, quoted_commands

DATA = Path(__file__).resolve().parent / "data" / "nft"
LEGACY = Path(__file__).resolve().parent / "data" / "iptables-legacy"  # rules.sh, and what -save printed after it
BINDGUARD = [sys.executable, "-m", "bindguard"]


def bind(text: str, v6only: bool = False) -> Bind:
    return Bind(parse_listen(text), SocketOptions(v6only=v6only))


def caught(rules, text: str, v6only: bool = False) -> list:
    return [c.nat for c in nat_conflicts([bind(text, v6only)], rules)]


def recorded(name: str):
    rules, notes = rules_from_ruleset(json.loads((DATA / name).read_text()))
    assert notes == []
    return rules


# --- recorded rulesets (`nft -j list ruleset` of tests/data/nft/published.nft, and of rootful Podman) ---


def test_dnat_through_a_jump_names_its_target_and_owner():
    rules = recorded("published.json")
    found = caught(rules, "0.0.0.0:8080")
    assert {(r.chain, r.hook, r.to) for r in found} >= {("DOCKER", "prerouting", "192.0.2.7:80"),
                                                       ("DOCKER", "output", "192.0.2.7:80")}
    docker = next(r for r in found if r.chain == "DOCKER")
    assert docker.path[-1] == "DOCKER" and docker.local_only and docker.owner == "Docker"


def test_loopback_is_not_taken_by_prerouting_nor_by_an_output_rule_that_excludes_it():
    rules = recorded("published.json")
    assert caught(rules, "127.0.0.1:8080") == []  # OUTPUT: ip daddr != 127.0.0.0/8


def test_a_nodeport_range_in_a_named_set_reached_by_goto():
    rules = recorded("published.json")
    found = caught(rules, "0.0.0.0:31000")
    assert [(r.chain, r.to, r.path) for r in found] == [("KUBE-NODEPORTS", "192.0.2.8",
                                                         ("PREROUTING", "other", "KUBE-NODEPORTS"))]
    assert found[0].comment == "default/web:http" and found[0].owner.startswith("Kubernetes NodePort")
    assert caught(rules, "0.0.0.0:29999") == []


def test_redirect_to_another_port_and_the_protocol_it_names():
    rules = recorded("published.json")
    assert [r.to for r in caught(rules, "udp:192.0.2.1:53")] == ["port 5353 on this host"]
    assert caught(rules, "192.0.2.1:53") == []  # the rule is for UDP


def test_a_rule_for_another_address_does_not_match():
    rules = recorded("published.json")
    assert [r.to for r in caught(rules, "192.0.2.99:8443")] == ["port 9443 on this host"]
    assert caught(rules, "192.0.2.98:8443") == []
    assert [r.to for r in caught(rules, "198.51.100.5:443")] == ["192.0.2.3"]  # a prefix in an anonymous set
    assert caught(rules, "203.0.113.5:443") == []


def test_ip6_rules_leave_ipv4_alone_and_a_v6only_wildcard_takes_no_ipv4_rule():
    rules = recorded("published.json")
    assert [r.to for r in caught(rules, "[::1]:8080")] == []  # ::1 under prerouting: never from outside
    six = [c.nat.to for c in nat_conflicts([bind("[::]:7777", v6only=True)], rules)]
    assert six == ["port 7778 on this host"]
    assert caught(rules, "0.0.0.0:7777") == []


def test_podman_netavark_rules_recorded_from_a_real_container():
    """Rootful Podman 4.3 with netavark: iptables-nft rules (xt targets), one chain for the network
    with a rule per published port; the jump's port and the rule's must both hold."""
    rules = recorded("podman-netavark.json")
    found = caught(rules, "0.0.0.0:18080")
    assert {r.hook for r in found} == {"prerouting", "output"}
    assert all(r.chain.startswith("NETAVARK-DN-") and r.owner == "Podman (netavark)" and r.ports == ((18080, 18080),)
               for r in found)
    assert all(r.to == "" for r in found)  # the JSON names the xt target only; nat_rules reads the text
    assert caught(rules, "0.0.0.0:18082") == []


def test_xt_targets_read_back_from_the_text_listing():
    text = ("table ip nat { # handle 1\n\tchain PREROUTING { # handle 1\n"
            "\t\ttcp dport 9000 counter packets 0 bytes 0 dnat to 192.0.2.9:90 # handle 2\n\t}\n"
            "\tchain OUTPUT { # handle 3\n"
            "\t\ttcp dport 9001-9010 fib daddr type local counter packets 0 bytes 0 redirect to :7000 # handle 4\n"
            "\t}\n}\n")
    assert xt_targets_from_text(text) == {("ip", "nat", "PREROUTING", 2): "192.0.2.9:90",
                                          ("ip", "nat", "OUTPUT", 4): "port 7000 on this host"}


def _chain(name: str, hook: str | None = None) -> dict:
    body = {"family": "ip", "table": "nat", "name": name}
    if hook:
        body |= {"type": "nat", "hook": hook}
    return {"chain": body}


def _rule(chain: str, *expr: dict) -> dict:
    return {"rule": {"family": "ip", "table": "nat", "chain": chain, "expr": list(expr)}}


def test_a_jump_loop_and_a_deep_chain_are_walked_within_bounds():
    loop = {"nftables": [_chain("pre", "prerouting"), _chain("a"), _chain("b"),
                         _rule("pre", {"jump": {"target": "a"}}), _rule("a", {"jump": {"target": "b"}}),
                         _rule("b", {"jump": {"target": "a"}}), _rule("b", {"redirect": {"port": 1}})]}
    rules, notes = rules_from_ruleset(loop)
    assert [r.path for r in rules] == [("pre", "a", "b")]
    depth = MAX_DEPTH + 5
    deep = {"nftables": [_chain("pre", "prerouting"), *(_chain(f"c{i}") for i in range(depth)),
                         _rule("pre", {"jump": {"target": "c0"}}),
                         *(_rule(f"c{i}", {"jump": {"target": f"c{i + 1}"}}) for i in range(depth - 1)),
                         _rule(f"c{depth - 1}", {"redirect": {"port": 1}})]}
    rules, notes = rules_from_ruleset(deep)
    assert rules == [] and any("jumps below pre" in n for n in notes)


def test_an_unconditional_return_ends_the_chain_and_garbage_is_no_rule():
    ruleset = {"nftables": [_chain("pre", "prerouting"), _rule("pre", {"return": None}),
                            _rule("pre", {"redirect": {"port": 1}})]}
    assert rules_from_ruleset(ruleset)[0] == []
    for junk in ({}, {"nftables": "x"}, {"nftables": [1, "a", {"rule": {"expr": "x"}}, {"chain": []}]}):
        assert rules_from_ruleset(junk)[0] == []


def test_rules_after_a_chain_every_packet_leaves_the_nat_pass_in_are_never_reached():
    """accept, drop, a NAT target or a goto in a chain jumped to without a condition ends the nat
    pass for every packet: the rules after the jump are not claimed. A return comes back."""
    later = _rule("pre", {"redirect": {"port": 2}})
    for verdict in ({"accept": None}, {"drop": None}, {"redirect": {"port": 1}}):
        ruleset = {"nftables": [_chain("pre", "prerouting"), _chain("a"), _rule("pre", {"jump": {"target": "a"}}),
                                _rule("a", verdict), later]}
        assert all(r.chain == "a" for r in rules_from_ruleset(ruleset)[0]), verdict
    returns = {"nftables": [_chain("pre", "prerouting"), _chain("a"), _rule("pre", {"jump": {"target": "a"}}),
                            _rule("a", {"return": None}), later]}
    assert [r.chain for r in rules_from_ruleset(returns)[0]] == ["pre"]
    # a goto never comes back: the chain that went there ends where the chain it went to ends
    goto = {"nftables": [_chain("pre", "prerouting"), _chain("mid"), _chain("a"),
                         _rule("pre", {"jump": {"target": "mid"}}), _rule("mid", {"goto": {"target": "a"}}),
                         _rule("mid", {"redirect": {"port": 3}}), later]}
    assert sorted(r.to for r in rules_from_ruleset(goto)[0]) == ["port 2 on this host"]
    # with a condition on the jump, only the packets it matches leave: the rules after it stay
    tcp = {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}
    conditional = {"nftables": [_chain("pre", "prerouting"), _chain("a"),
                                _rule("pre", tcp, {"jump": {"target": "a"}}), _rule("a", {"accept": None}), later]}
    assert [r.chain for r in rules_from_ruleset(conditional)[0]] == ["pre"]


TCP_8083 = {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 8083}}


@pytest.mark.parametrize("statement", [{"limit": {"rate": 10, "burst": 5, "per": "second"}},
                                       {"quota": {"val": 1000, "val_unit": "bytes"}}, {"ct count": {"val": 10}},
                                       {"some statement nft adds later": {}}])
def test_a_rate_limit_or_quota_is_a_condition_not_a_verdict_for_every_packet(statement):
    """`limit rate 10/second accept` (as nft 1.0.6 writes it in JSON) accepts only the packets under
    the rate: the others go on to the rules after it. So does any statement not known to take every
    packet; a counter does, and its accept ends the chain."""
    later = _rule("pre", TCP_8083, {"dnat": {"addr": "192.0.2.8", "port": 80}})
    ruleset = {"nftables": [_chain("pre", "prerouting"), _rule("pre", statement, {"accept": None}), later]}
    assert [r.to for r in rules_from_ruleset(ruleset)[0]] == ["192.0.2.8:80"]
    limited = {"nftables": [_chain("pre", "prerouting"), _rule("pre", TCP_8083, statement,
                                                                {"dnat": {"addr": "192.0.2.8", "port": 80}})]}
    [rule] = rules_from_ruleset(limited)[0]
    assert rule.also and next(iter(statement)) in rule.also[0]  # the rule is said with its condition
    counted = {"nftables": [_chain("pre", "prerouting"), _rule("pre", {"counter": {"packets": 0, "bytes": 0}},
                                                               {"accept": None}), later]}
    assert rules_from_ruleset(counted)[0] == []


def test_a_verdict_map_in_a_nat_chain_is_noted_as_not_followed():
    """kube-proxy's nftables mode and netavark's nftables driver send ports through verdict maps
    (`tcp dport vmap @ports`, as nft 1.0.6 writes it in JSON): they are not followed, and a note
    says so; the rules after one are still read (a packet not in the map goes on)."""
    key = {"payload": {"protocol": "tcp", "field": "dport"}}
    ruleset = {"nftables": [
        _chain("pre", "prerouting"), _chain("svc"),
        {"map": {"family": "ip", "table": "nat", "name": "ports", "type": "inet_service", "map": "verdict",
                 "elem": [[8081, {"jump": {"target": "svc"}}]]}},
        _rule("svc", {"dnat": {"addr": "192.0.2.7", "port": 80}}),
        _rule("pre", {"vmap": {"key": key, "data": "@ports"}}),
        _rule("pre", {"vmap": {"key": key, "data": {"set": [[8082, {"jump": {"target": "svc"}}]]}}}),
        _rule("pre", TCP_8083, {"dnat": {"addr": "192.0.2.8", "port": 80}})]}
    rules, notes = rules_from_ruleset(ruleset)
    assert [r.to for r in rules] == ["192.0.2.8:80"]
    assert len(notes) == 1 and "verdict map" in notes[0] and "chain pre" in notes[0], notes


def test_a_negated_protocol_leaves_that_protocol_alone():
    ruleset = {"nftables": [_chain("pre", "prerouting"), _rule("pre", {"match": {
        "op": "!=", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}, {"redirect": {"port": 1}})]}
    rules = rules_from_ruleset(ruleset)[0]
    assert caught(rules, "0.0.0.0:80") == [] and len(caught(rules, "udp:0.0.0.0:80")) == 1


def test_a_redirect_to_a_port_range_names_the_range():
    ruleset = {"nftables": [_chain("pre", "prerouting"), _rule("pre", {"redirect": {"port": {"range": [9443, 9444]}}})]}
    assert [r.to for r in rules_from_ruleset(ruleset)[0]] == ["ports 9443-9444 on this host"]


def test_dnat_to_ranges_and_a_prefix_is_named_as_nft_writes_it():
    """The statements as `nft -j list ruleset` gave them for `dnat to 192.0.2.1-192.0.2.5:8080-8090`,
    `dnat to 192.0.2.0/28`, `dnat to [2001:db8::1]-[2001:db8::5]:8080`; a map stays a map."""
    targets = [{"addr": {"range": ["192.0.2.1", "192.0.2.5"]}, "port": {"range": [8080, 8090]}},
               {"addr": {"prefix": {"addr": "192.0.2.0", "len": 28}}},
               {"addr": {"range": ["2001:db8::1", "2001:db8::5"]}, "port": 8080},
               {"addr": {"map": {"key": {"ip": {"saddr": None}}, "data": "@m"}}, "port": {"map": {}}}]
    ruleset = {"nftables": [_chain("pre", "prerouting"),
                            *(_rule("pre", {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                                                      "right": 80 + i}}, {"dnat": to}) for i, to in enumerate(targets))]}
    assert [r.to for r in rules_from_ruleset(ruleset)[0]] == [
        "192.0.2.1-192.0.2.5:8080-8090", "192.0.2.0/28", "[2001:db8::1]-[2001:db8::5]:8080", "a map (port from a map)"]


# --- recorded iptables-legacy-save output (of tests/data/iptables-legacy/rules.sh) ---------------


def legacy(name: str, family: str):
    rules, notes = rules_from_save((LEGACY / name).read_text(), family)
    assert notes == []
    return rules


def test_legacy_docker_chain_reached_for_local_addresses():
    rules = legacy("nat.save", "ip")
    found = caught(rules, "0.0.0.0:8080")
    assert sorted((r.hook, r.path, r.to) for r in found) == [("output", ("OUTPUT", "DOCKER"), "192.0.2.7:80"),
                                                            ("prerouting", ("PREROUTING", "DOCKER"), "192.0.2.7:80")]
    docker = next(r for r in found if r.hook == "prerouting")
    assert docker.local_only and docker.owner == "Docker" and docker.source == "iptables-legacy"
    assert docker.also == ('iifname != "docker0"',) and docker.handle == 2  # `-L DOCKER --line-numbers`
    assert docker.where() == "iptables-legacy table nat, chain DOCKER (via PREROUTING -> DOCKER)"
    assert caught(rules, "127.0.0.1:8080") == []  # OUTPUT: ! -d 127.0.0.0/8; PREROUTING: never loopback


def test_legacy_dnat_redirect_ranges_and_multiport():
    rules = legacy("nat.save", "ip")
    assert [r.to for r in caught(rules, "0.0.0.0:9000")] == ["192.0.2.9:90"]
    assert [r.to for r in caught(rules, "udp:0.0.0.0:53")] == ["port 5353 on this host"]
    assert caught(rules, "0.0.0.0:53") == []  # the rule is for UDP
    nodeport = caught(rules, "192.0.2.50:31000")  # 0.0.0.0 too is .51, where `! --dport 1:9100` holds
    assert [(r.to, r.comment) for r in nodeport] == [("192.0.2.8", "default/web:http")]
    assert caught(rules, "192.0.2.50:29999") == []
    assert [r.to for r in caught(rules, "192.0.2.99:9505")] == ["ports 9443-9444 on this host"]
    assert caught(rules, "192.0.2.99:444") == []


def test_legacy_rule_for_another_address_does_not_match():
    rules = legacy("nat.save", "ip")
    assert [r.to for r in caught(rules, "192.0.2.50:9020")] == ["192.0.2.9"]
    assert caught(rules, "192.0.2.51:9020") == []


def test_legacy_negations_read_and_not_read():
    rules = legacy("nat.save", "ip")
    assert [r.to for r in caught(rules, "192.0.2.51:9040")] == ["192.0.2.13"]  # ! -d 192.0.2.50
    assert caught(rules, "192.0.2.50:9040") == []
    assert [r.to for r in caught(rules, "192.0.2.51:9500")] == ["192.0.2.10-192.0.2.11:8000-8010"]  # ! --dport 1:9100
    assert caught(rules, "192.0.2.51:9099") == []
    for port in (9030, 9060, 9050):  # ! --ctstate, ! --tcp-flags: not read; ! --dst-type LOCAL: no local address
        assert caught(rules, f"0.0.0.0:{port}") == []
    assert [r.also for r in caught(rules, "0.0.0.0:9031")] == [("-m conntrack --ctstate NEW",)]  # read as written


def test_legacy_ip6_rules():
    rules = legacy("nat6.save", "ip6")
    assert [r.to for r in caught(rules, "[2001:db8::5]:8080")] == ["[2001:db8::7]:80"]
    assert caught(rules, "[2001:db8::6]:8080") == []
    assert [(r.source, r.to) for r in caught(rules, "udp:[::]:7777", v6only=True)] == [
        ("ip6tables-legacy", "port 7778 on this host")]
    assert caught(rules, "udp:0.0.0.0:7777") == []


def test_legacy_lines_not_read_are_noted_and_bad_words_claim_nothing():
    text = ("*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -m comment --comment \"open -j DNAT\n"
            "-A PREROUTING -p tcp -m tcp --dport 99999 -j DNAT --to-destination 192.0.2.1\n"
            "-A PREROUTING ! -f -p tcp -m tcp --dport 7 -j DNAT --to-destination 192.0.2.2\n"
            "-A PREROUTING -p tcp -j NOSUCH\nCOMMIT\n*filter\n-A PREROUTING -j DNAT --to-destination 192.0.2.3\n")
    rules, notes = rules_from_save(text, "ip")
    assert len(notes) == 1 and "unbalanced quotes" in notes[0]
    assert [(r.ports, r.also) for r in rules] == [(None, ("-m tcp --dport 99999",))]  # kept as written


def test_a_legacy_line_not_read_still_counts_in_its_chains_rule_numbers():
    """`iptables -L CHAIN --line-numbers` counts every rule: the one after a line not read is rule 2."""
    text = ("*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -m comment --comment \"open -j DNAT\n"
            "-A PREROUTING -p tcp -m tcp --dport 8080 -j DNAT --to-destination 192.0.2.7:80\nCOMMIT\n")
    rules, notes = rules_from_save(text, "ip")
    assert len(notes) == 1 and [r.handle for r in rules] == [2]


def _kube_proxy_save(services: int) -> str:
    """iptables-legacy-save's nat table as kube-proxy writes it for `services` NodePort services: a
    rule per service in KUBE-NODEPORTS, each a jump to a chain of its own that DNATs."""
    lines = ["*nat", ":PREROUTING ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]", ":KUBE-NODEPORTS - [0:0]"]
    lines += [f":KUBE-SVC-{i} - [0:0]" for i in range(services)]
    lines += ["-A PREROUTING -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"]
    for i in range(services):
        port = 30000 + i % 2768
        lines += [f"-A KUBE-NODEPORTS -p tcp -m tcp --dport {port} -j KUBE-SVC-{i}",
                  f"-A KUBE-SVC-{i} -p tcp -j DNAT --to-destination 192.0.2.{i % 250 + 1}:80"]
    return "\n".join([*lines, "COMMIT", ""])


class _Ticks:
    """A NAT reading's budget (nat_budget's) whose time is up after `looks` looks at the clock."""

    def __init__(self, looks: int) -> None:
        self.looks, self.limits = looks, (0, 0, 5.0)

    def seconds_left(self) -> float:
        self.looks -= 1
        return 1.0 if self.looks >= 0 else 0.0


def test_reading_a_large_ruleset_stops_at_its_deadline_with_a_note():
    """20,000 kube-proxy services (some MiB of iptables-legacy-save) took seconds to parse and walk,
    with no bound but the tools'. A spent budget stops the parse at once (a table read in part
    claims nothing: the rule that ends a chain could be among those not read), and the walk where it
    is: what it found before stands, the rest is said not read."""
    from bindguard.evidence.nat import nat_budget

    text = _kube_proxy_save(20_000)
    rules, notes = rules_from_save(text, "ip", nat_budget(0))
    assert rules == [] and len(notes) == 1 and "iptables-legacy nat table not all read" in notes[0], notes
    ruleset = json.loads(json.dumps({"nftables": [
        _chain("pre", "prerouting"),
        *(_rule("pre", {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                                  "right": 30000 + i}}, {"dnat": {"addr": "192.0.2.1", "port": i}})
          for i in range(2000))]}))
    whole, notes = rules_from_ruleset(ruleset)
    assert len(whole) == 2000 and notes == []
    part, notes = rules_from_ruleset(ruleset, budget=_Ticks(10))  # a look every 256 items, then rules
    assert 0 < len(part) < 2000 and part == whole[:len(part)], len(part)
    assert len(notes) == 1 and "nftables ruleset not all read" in notes[0] and "after 5 s" in notes[0], notes


def test_no_tool_runs_once_the_nat_reading_has_spent_its_time():
    from bindguard.evidence.nat import NFT, NatUnreadable, nat_budget, run_tool

    with pytest.raises(NatUnreadable, match="not run: reading the NAT rules stops after 0 s"):
        run_tool(NFT, "nftables", "-j", "list", "ruleset", budget=nat_budget(0))


def test_the_guard_reads_nat_rules_within_its_units_start_budget(monkeypatch):
    """Run by the manager (INVOCATION_ID), the NAT reading ends before TimeoutStartSec= would kill the
    start; elsewhere it takes its own bound, and the bus is not asked for it."""
    from types import SimpleNamespace

    from bindguard.action.guard import _nat_seconds

    asked = []

    def request(left):
        return SimpleNamespace(systemd=SimpleNamespace(start_budget=lambda: asked.append(left) or left))

    monkeypatch.delenv("INVOCATION_ID", raising=False)
    assert _nat_seconds(request(1.5), 5.0) == 5.0 and asked == []
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef0123456789abcdef")
    assert _nat_seconds(request(1.5), 5.0) == 1.5
    assert _nat_seconds(request(None), 5.0) == 5.0
    assert _nat_seconds(request(30.0), 5.0) == 5.0
    assert _nat_seconds(SimpleNamespace(systemd=None), 5.0) == 5.0


# --- real nftables rules in a network namespace ---------------------------------------------------


def need_nft() -> None:
    missing = [p for p in ("/usr/sbin/nft", "/usr/sbin/iptables-nft") if not os.access(p, os.X_OK)]
    if missing:
        reason = f"NAT tests need {', '.join(missing)} (Debian's nftables and iptables packages)"
        need(reason)


def explain(netns, *listen: str) -> dict:
    proc = netns.run([*BINDGUARD, "explain", "--no-systemd", "--json", *listen])
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def shadowed(report: dict) -> list[tuple[str, str | None, str]]:
    return sorted((c["address"], c["nat"]["to"], c["nat"]["chain"]) for c in report["conflicts"]
                  if c["kind"] == "nat-shadowed")


def test_explain_reports_dnat_redirect_and_a_nodeport_range(netns):
    need_nft()
    netns.ip("addr", "add", "192.0.2.99/32", "dev", "lo")
    netns.ip("addr", "add", "192.0.2.98/32", "dev", "lo")
    subprocess.run(netns.argv(["nft", "-f", str(DATA / "published.nft")]), check=True)
    report = explain(netns, "0.0.0.0:8080", "192.0.2.99:8443", "192.0.2.98:8443", "0.0.0.0:31000",
                     "udp:0.0.0.0:53", "127.0.0.1:9999")
    assert report["clear"] and report["exit_code"] == 0  # the kernel lets every bind succeed
    found = shadowed(report)
    assert ("0.0.0.0:8080", "192.0.2.7:80", "DOCKER") in found
    assert ("192.0.2.99:8443", "port 9443 on this host", "other") in found
    assert ("0.0.0.0:31000", "192.0.2.8", "KUBE-NODEPORTS") in found
    assert ("udp:0.0.0.0:53", "port 5353 on this host", "other") in found
    assert not [f for f in found if f[0] in ("192.0.2.98:8443", "127.0.0.1:9999")]  # another address; no rule
    docker = next(c for c in report["conflicts"] if c["kind"] == "nat-shadowed" and c["nat"]["chain"] == "DOCKER")
    assert "Docker" in docker["remedy"] and "192.0.2.7:80" in docker["remedy"] and "kill" not in docker["remedy"]
    assert docker["blocking"] is False


def test_a_chain_named_with_shell_text_is_not_written_into_a_command(netns):
    """The kernel takes any bytes for a chain's name, and nft's JSON input writes them (its command
    line takes no `;`): anyone with CAP_NET_ADMIN in the namespace can name a chain `x;reboot`. The
    remedy's command then lists the whole ruleset; the name is never in a command."""
    need_nft()
    subprocess.run(netns.argv(["nft", "-j", "-f", str(DATA / "shell-text-chain.json")]), check=True)
    report = explain(netns, "0.0.0.0:8080")
    found = [c for c in report["conflicts"] if c["kind"] == "nat-shadowed"]
    assert [c["nat"]["chain"] for c in found] == ["x;reboot"], report
    assert quoted_commands(found[0]["remedy"]) == ["nft -a list ruleset"], found[0]["remedy"]


def test_iptables_nft_rules_are_read_with_their_targets(netns):
    need_nft()
    for rule in (["-A", "PREROUTING", "-p", "tcp", "--dport", "9000", "-j", "DNAT", "--to-destination", "192.0.2.9:90"],
                 ["-A", "OUTPUT", "-p", "tcp", "--dport", "9001:9010", "-m", "addrtype", "--dst-type", "LOCAL",
                  "-j", "REDIRECT", "--to-ports", "7000"],
                 ["-A", "PREROUTING", "-d", "192.0.2.50", "-p", "tcp", "--dport", "9020", "-j", "DNAT",
                  "--to-destination", "192.0.2.9"]):
        subprocess.run(netns.argv(["/usr/sbin/iptables-nft", "-t", "nat", *rule]), check=True)
    netns.ip("addr", "add", "192.0.2.50/32", "dev", "lo")
    netns.ip("addr", "add", "192.0.2.51/32", "dev", "lo")
    found = shadowed(explain(netns, "0.0.0.0:9000", "0.0.0.0:9005", "0.0.0.0:9011", "192.0.2.50:9020",
                             "192.0.2.51:9020"))
    assert found == [("0.0.0.0:9000", "192.0.2.9:90", "PREROUTING"),
                     ("0.0.0.0:9005", "port 7000 on this host", "OUTPUT"),
                     ("192.0.2.50:9020", "192.0.2.9", "PREROUTING")]  # the rule is for .50, not .51


def need_legacy() -> None:
    tools = ("/usr/sbin/iptables-legacy", "/usr/sbin/iptables-legacy-save", "/usr/sbin/ip6tables-legacy-save")
    missing = [p for p in tools if not os.access(p, os.X_OK)]
    if missing:
        reason = f"iptables-legacy tests need {', '.join(missing)} (Debian's iptables package)"
        need(reason)


def legacy_tables(netns, version: str = "") -> list[str]:
    """The legacy tables the kernel lists in netns: none where the file is missing, as it is on a modular
    kernel until ip_tables (ip6_tables) is loaded, which the first iptables-legacy call does."""
    names = f"/proc/net/ip{version}_tables_names"
    return netns.run(["sh", "-c", 'if [ -e "$1" ]; then cat "$1"; fi', "sh", names], check=True).stdout.split()


def without_comments(text: str) -> list[str]:
    return [line for line in text.splitlines() if not line.startswith("#")]


def test_explain_reads_iptables_legacy_rules(netns):
    need_legacy()
    assert "nat" not in legacy_tables(netns)  # a namespace of its own: its legacy tables are its own
    for address in ("192.0.2.50", "192.0.2.51", "192.0.2.99"):
        netns.ip("addr", "add", f"{address}/32", "dev", "lo")
    netns.ip("addr", "add", "2001:db8::5/128", "dev", "lo", "nodad")
    subprocess.run(netns.argv(["sh", str(LEGACY / "rules.sh")]), check=True)
    for tool, name in (("iptables-legacy-save", "nat.save"), ("ip6tables-legacy-save", "nat6.save")):
        printed = netns.run([f"/usr/sbin/{tool}", "-t", "nat"], check=True).stdout
        assert without_comments(printed) == without_comments((LEGACY / name).read_text())  # the recording holds
    report = explain(netns, "0.0.0.0:8080", "0.0.0.0:9000", "udp:0.0.0.0:53", "192.0.2.50:31000", "192.0.2.50:9020",
                     "192.0.2.51:9020", "192.0.2.51:9040", "0.0.0.0:9030", "0.0.0.0:9050", "[2001:db8::5]:8080")
    assert report["clear"] and report["exit_code"] == 0
    assert shadowed(report) == [
        ("0.0.0.0:8080", "192.0.2.7:80", "DOCKER"), ("0.0.0.0:8080", "192.0.2.7:80", "DOCKER"),  # both hooks
        ("0.0.0.0:9000", "192.0.2.9:90", "PREROUTING"),
        ("192.0.2.50:31000", "192.0.2.8", "PREROUTING"),
        ("192.0.2.50:9020", "192.0.2.9", "PREROUTING"),  # the rule for .50 leaves .51 alone
        ("192.0.2.51:9040", "192.0.2.13", "PREROUTING"),
        ("[2001:db8::5]:8080", "[2001:db8::7]:80", "PREROUTING"),
        ("udp:0.0.0.0:53", "port 5353 on this host", "PREROUTING")]  # 9030, 9050: negations never claimed
    nat = [c for c in report["conflicts"] if c["kind"] == "nat-shadowed"]
    assert {c["nat"]["source"] for c in nat} == {"iptables-legacy", "ip6tables-legacy"}
    nine = next(c for c in nat if c["address"] == "0.0.0.0:9000")
    assert "`iptables-legacy -t nat -n -L PREROUTING --line-numbers`" in nine["remedy"]
    assert nine["nat"]["handle"] == 2 and nine["nat"]["rule"].endswith("dnat to 192.0.2.9:90 # rule 2")


def test_a_legacy_nat_table_is_read_only_where_the_kernel_has_one(netns, tmp_path):
    """Looking makes no legacy nat table (iptables-legacy-save would), and a table there whose tool
    is missing is a note."""
    need_legacy()
    explain(netns, "0.0.0.0:9000")
    assert "nat" not in legacy_tables(netns) and "nat" not in legacy_tables(netns, "6")
    subprocess.run(netns.argv(["sh", str(LEGACY / "rules.sh")]), check=True)
    assert "nat" in legacy_tables(netns)  # rules.sh loaded the modules it needs: the note below is the table's
    proc = netns.run(["unshare", "--mount", "--", "sh", "-c",
                      f"mount -t tmpfs tmpfs /usr/sbin && exec {' '.join(BINDGUARD)} explain --no-systemd --json "
                      "0.0.0.0:9000"])
    assert proc.returncode == 0, proc.stderr
    notes = json.loads(proc.stdout)["notes"]
    assert any("the kernel has an iptables-legacy nat table (/proc/net/ip_tables_names)" in n and
               "/usr/sbin/iptables-legacy-save is not installed (Debian's iptables package)" in n for n in notes), notes


def unit_yaml(tmp_path: Path, nat: str | None) -> dict:
    (tmp_path / "web.service.yaml").write_text('listen: ["0.0.0.0:8080"]\n' + (f"nat: {nat}\n" if nat else ""))
    return dict(os.environ, BINDGUARD_CONFIG_PATH=str(tmp_path))


@pytest.mark.parametrize("nat, code", [(None, 0), ("off", 0), ("warn", 0), ("refuse", 98)])
def test_check_reads_nat_rules_only_when_the_unit_asks(netns, tmp_path, nat, code):
    need_nft()
    subprocess.run(netns.argv(["nft", "-f", str(DATA / "published.nft")]), check=True)
    proc = netns.run([*BINDGUARD, "check", "--no-systemd", "--unit", "web.service"], env=unit_yaml(tmp_path, nat))
    assert proc.returncode == code, proc.stderr
    if nat in (None, "off"):
        assert "nat-shadowed" not in proc.stderr
    else:
        assert "nat-shadowed: dnat to 192.0.2.7:80" in proc.stderr
    if nat == "refuse":
        assert "0.0.0.0:8080 redirected elsewhere by a NAT rule (exit 98)" in proc.stderr


def test_check_without_nft_says_so_and_passes(netns, tmp_path):
    """A host without nftables: the rules cannot be read; that is a note, never a refusal."""
    proc = netns.run(["unshare", "--mount", "--", "sh", "-c",
                      f"mount -t tmpfs tmpfs /usr/sbin && exec {' '.join(BINDGUARD)} check --no-systemd "
                      "--unit web.service"], env=unit_yaml(tmp_path, "refuse"))
    assert proc.returncode == 0, proc.stderr
    assert "NAT rules not read: /usr/sbin/nft is not installed" in proc.stderr


def test_nat_key_is_validated(tmp_path):
    (tmp_path / "web.service.yaml").write_text("listen: [8080]\nnat: sometimes\n")
    proc = subprocess.run([*BINDGUARD, "config", "check", str(tmp_path / "web.service.yaml")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 78
    assert "nat must be one of off, warn, refuse, found 'sometimes'" in proc.stderr


def test_nft_is_run_with_a_clean_environment(netns, tmp_path):
    """A PATH or LD_PRELOAD planted in the guard's environment never reaches nft (it gets
    PATH=/usr/sbin:/usr/bin alone), and an `nft` earlier in PATH is never run."""
    need_nft()
    subprocess.run(netns.argv(["nft", "-f", str(DATA / "published.nft")]), check=True)
    fake = tmp_path / "nft"
    fake.write_text(f"#!/bin/sh\ntouch {tmp_path}/ran\n")
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}")
    proc = netns.run([*BINDGUARD, "explain", "--no-systemd", "0.0.0.0:8080"], env=env)
    assert "nat-shadowed: dnat to 192.0.2.7:80" in proc.stdout
    assert not (tmp_path / "ran").exists()
    assert shutil.which("nft", path=env["PATH"]) == str(fake)


def test_scan_reports_a_declared_address_a_nat_rule_takes(netns, tmp_path):
    need_nft()
    subprocess.run(netns.argv(["nft", "-f", str(DATA / "published.nft")]), check=True)
    (tmp_path / "web.service.yaml").write_text('listen: ["0.0.0.0:8080"]\n')
    (tmp_path / "api.service.yaml").write_text('listen: ["127.0.0.1:8080", "0.0.0.0:8090"]\n')
    env = dict(os.environ, BINDGUARD_CONFIG_PATH=str(tmp_path))
    env.pop("SYSTEMD_LOG_LEVEL", None)
    done = netns.run([*BINDGUARD, "scan", "--no-systemd", "--json"], env=env)
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    nat = [(f["addresses"], f["units"], f["summary"]) for f in report["findings"] if f["kind"] == "nat-shadowed"]
    assert sorted(nat) == [
        (["0.0.0.0:8080"], ["web.service"], "0.0.0.0:8080 of web.service is redirected to 192.0.2.7:80 by a NAT rule "
                                            "(output)"),
        (["0.0.0.0:8080"], ["web.service"], "0.0.0.0:8080 of web.service is redirected to 192.0.2.7:80 by a NAT rule "
                                            "(prerouting)")]  # 127.0.0.1 and port 8090: no rule takes them
    assert report["counts"]["nat-shadowed"] == 2
    finding = next(f for f in report["findings"] if f["kind"] == "nat-shadowed")
    assert any("chain DOCKER" in e for e in finding["evidence"]) and "Docker" in finding["fix"]


def test_a_tool_runs_as_the_file_its_check_resolved(tmp_path, monkeypatch):
    """run_tool resolves the tool's links once, in its trust check (bindguard.checked_path, through
    bindguard.real_path), and runs that file: no second resolution, whose answer a re-pointed link
    could change in between."""
    import bindguard
    from bindguard.evidence import nat

    tool = tmp_path / "real-tool"
    tool.write_text("#!/bin/sh\necho \"$0 $*\"\n")  # $0: the script the kernel ran
    tool.chmod(0o755)
    (tmp_path / "nft").symlink_to(tool)
    real_path, resolved = bindguard.real_path, []

    def watched(path, *args, **kwargs):
        resolved.append(path)
        return real_path(path, *args, **kwargs)

    monkeypatch.setattr(bindguard, "real_path", watched)
    assert nat.run_tool(str(tmp_path / "nft"), "nftables", "-j") == f"{tool} -j\n".encode()
    monkeypatch.undo()
    assert resolved == [str(tmp_path / "nft")], resolved
    os.chmod(tmp_path, 0o777)  # anyone could re-point the link: not run
    with pytest.raises(nat.NatUnreadable, match=f"{tmp_path}/nft is not run: {tmp_path} can be written by every user"):
        nat.run_tool(str(tmp_path / "nft"), "nftables", "-j")
    os.chmod(tmp_path, 0o700)
