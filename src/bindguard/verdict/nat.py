"""Which of a request's addresses a NAT rule takes elsewhere (nat-shadowed). Pure: no I/O."""

from __future__ import annotations

from bindguard.model.endpoints import Bind
from bindguard.model.kinds import ConflictKind
from bindguard.model.nat import NatRule
from bindguard.verdict.conflicts import Conflict


def nat_evidence(rule: NatRule) -> tuple[str, ...]:
    """The rule as facts: where it is, what it matches, where the traffic goes, who made it."""
    facts = [f"{rule.where()}, hooked at {rule.hook}: {rule.describe()}"]
    if rule.hook == "prerouting":
        facts.append("it rewrites connections arriving from other hosts; this host's own connections pass "
                     "through the output hook instead")
    else:
        facts.append("it rewrites connections this host itself makes")
    if rule.comment:
        facts.append(f"the rule's comment: {rule.comment}")
    if rule.owner:
        facts.append(f"made by {rule.owner}, as its chain's name says ({rule.owner_hint})")
    if rule.also:
        facts.append("only where its other conditions hold too: " + "; ".join(rule.also))
    return tuple(facts)


def nat_conflicts(binds: list[Bind], rules: list[NatRule]) -> list[Conflict]:
    """One warning per (bind, rule) where the rule may redirect the bind's traffic; the kernel lets
    the bind succeed, so it is never blocking: only a policy (`nat: refuse`) makes it refuse."""
    return [Conflict(bind, ConflictKind.NAT_SHADOWED, blocking=False, nat=rule, evidence=nat_evidence(rule))
            for bind in binds for rule in rules if rule.catches(bind)]
