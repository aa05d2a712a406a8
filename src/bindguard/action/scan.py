"""One scan of the host: the port map gathered once (evidence.hostmap), then judged
(verdict.scan). Nothing is changed or killed; report.scan renders the result."""

from __future__ import annotations

from dataclasses import dataclass, field

from bindguard.model.errors import ExitCode
from bindguard.model.hostmap import HostMap
from bindguard.verdict.scan import Finding, findings


@dataclass
class Scan(HostMap):
    """The port map and what in it needs attention."""

    findings: list[Finding] = field(default_factory=list)

    @property
    def needs_attention(self) -> bool:
        return bool(self.findings)

    @property
    def exit_code(self) -> int:
        return ExitCode.ATTENTION if self.findings else ExitCode.CLEAR

    def count(self, kind: str) -> int:
        return sum(1 for f in self.findings if f.kind == kind)


def run(bus_choice: bool | None = None, use_systemd: bool = True) -> Scan:
    """One scan of this host (this network namespace), with systemd over D-Bus unless use_systemd is False."""
    from bindguard.evidence.hostmap import gather

    scan = Scan()
    gather(bus_choice, use_systemd, scan)
    scan.findings = findings(scan)
    return scan
