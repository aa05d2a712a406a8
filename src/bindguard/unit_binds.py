"""What `check --unit UNIT` should probe when no address is given on its command line.

In order: the unit's YAML `listen` list; else discovery (when the YAML allows it): the sockets the
daemon itself binds, found with confidence (guesses too when the YAML says `trust_guesses: true`).
Sockets the unit's .socket units hold are not probed (systemd binds those and passes them on):
they are returned apart. YAML `options` override the options discovery found.

The cheap path: with no YAML file, only a few stat() calls are made before discovery, and
discovery asks unit_facts (D-Bus, or the unit files) only when it is allowed and given.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from bindguard.config import CONFLICT_KINDS, UnitConfig, load_unit_config, normalize_unit
from bindguard.endpoints import Bind


@dataclass
class UnitBinds:
    binds: list[Bind]  # what to probe; empty: nothing to guard
    origin: str  # where they come from: "FILE:LINE:COL" of the listen list, "discovery", or ""
    config: UnitConfig | None = None
    discovery: object | None = None  # bindguard.discover.Discovery, when discovery ran
    socket_unit_binds: list[Bind] = field(default_factory=list)  # held by systemd for the unit
    bind_policy: dict[Bind, dict[str, str]] = field(default_factory=dict)  # conflicts the daemon survives: warn
    unused_guesses: list = field(default_factory=list)  # guessed findings not probed
    warnings: list[str] = field(default_factory=list)


def _with_options(bind: Bind, options: dict[str, bool]) -> Bind:
    if not options:
        return bind
    return Bind(bind.endpoint, replace(bind.options, **options))


def unit_binds(unit: str, explicit_config: str | os.PathLike | None = None,
               unit_facts: Callable | None = None) -> UnitBinds:
    """The binds to probe for a unit. Raises ConfigError (exit 78) for a broken YAML file.

    unit_facts: a discover.UnitFactsSource (unit name -> UnitFacts), e.g.
    discover.unit.unit_facts_from(systemd_connection); None skips discovery.
    """
    unit = normalize_unit(unit)
    config = load_unit_config(unit, explicit_config)
    if config is not None and config.listen is not None:
        return UnitBinds(config.binds(), str(config.origins["listen"]), config)
    sources = config.discovery_sources if config is not None else None
    if unit_facts is None or sources == frozenset():
        return UnitBinds([], "", config)
    from bindguard.discover import SOURCES, discover_unit

    discovery = discover_unit(unit, unit_facts, list(sources or SOURCES))
    trust = bool(config and config.trust_guesses)
    overrides = config.options if config is not None else {}
    binds, socket_binds, unused, bind_policy = [], [], [], {}
    for finding in discovery.findings:
        if finding.socket_unit is not None:
            socket_binds.append(finding.bind)
        elif finding.confident or trust:
            bind = _with_options(finding.bind, overrides)
            if bind not in binds:
                binds.append(bind)
            if finding.survives:
                kinds = CONFLICT_KINDS if "*" in finding.survives else finding.survives
                bind_policy[bind] = {kind: "warn" for kind in kinds}
        else:
            unused.append(finding)
    return UnitBinds(binds, "discovery" if binds else "", config, discovery, socket_unit_binds=socket_binds,
                     bind_policy=bind_policy, unused_guesses=unused, warnings=list(discovery.warnings))
