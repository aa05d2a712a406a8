"""One vocabulary (model/kinds.py): enum members whose values are the strings the JSON always carried.
A script reading `kind`, `unit_status`, `source` or `confidence` must see no change."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bindguard.action.scan import Scan
from bindguard.model.endpoints import Bind, SocketOptions, parse_listen
from bindguard.model.facts import SocketFact
from bindguard.model.hostmap import Claim, Listener
from bindguard.model.kinds import (
    Action,
    ClaimSource,
    Confidence,
    ConflictKind,
    FindingKind,
    Leaving,
    UnitStatus,
    VerifyKind,
)
from bindguard.report.scan import scan_json
from bindguard.verdict.scan import Finding

BINDGUARD = [sys.executable, "-m", "bindguard"]
PORT = 18561

# The strings as the JSON, the YAML policy and the README have them (written out, not derived).
STRINGS = {
    ConflictKind: ["listener", "bound", "time-wait", "address-unavailable", "self-conflict", "socket-unit",
                   "latent-socket-unit", "own-instance", "orphan", "permission-denied", "guard-trial", "nat-shadowed"],
    Leaving: ["unit-deactivating", "process-exiting"],
    Action: ["refuse", "wait", "warn", "ignore"],
    UnitStatus: ["manager", "cgroup", "no-unit", "unknown"],
    FindingKind: ["unit-collision", "socket-unit-collision", "unclaimed-listener", "ephemeral-port", "restart-loop",
                  "config-error", "nat-shadowed"],
    ClaimSource: ["config", "discovered", "socket-unit", "listening"],
    VerifyKind: ["not-listening", "wrong-address", "shared", "foreign-owner"],
    Confidence: ["confident", "guess"],
}


def test_every_kind_keeps_its_string():
    for vocabulary, strings in STRINGS.items():
        assert [member.value for member in vocabulary] == strings, vocabulary.__name__
        for member in vocabulary:
            assert json.dumps(member) == json.dumps(member.value) and f"{member}" == member.value


def test_scan_json_carries_the_same_strings():
    bind = Bind(parse_listen("127.0.0.1:8080"), SocketOptions())
    scan = Scan(scanned_at=0.0)
    scan.findings = [Finding(kind, "s", (), "f") for kind in FindingKind]
    scan.claims = [Claim("web.service", bind, source, "d") for source in ClaimSource]
    scan.listeners = [Listener(SocketFact(bind.endpoint, "LISTEN", 0, 7), unit="web.service",
                               unit_status=UnitStatus.BY_CGROUP)]
    text = json.dumps(scan_json(scan))
    data = json.loads(text)
    assert [f["kind"] for f in data["findings"]] == STRINGS[FindingKind]
    assert sorted(c["source"] for c in data["claims"]) == sorted(STRINGS[ClaimSource])
    assert data["listeners"][0]["unit_status"] == "cgroup"
    assert [k for k in data["counts"] if k not in ("conflicts", "listeners")] == STRINGS[FindingKind]
    assert data["counts"]["conflicts"] == 2  # unit-collision and socket-unit-collision, not the guard's kinds
    assert "Kind." not in text and "Source." not in text and "Status." not in text


def test_check_verify_and_discover_json_carry_the_same_strings(netns):
    """The real commands: check refusing a port a process listens on, verify finding nothing on a
    free one, discover guessing a port from a command line."""
    netns.hold({"host": "127.0.0.1", "port": PORT, "proto": "tcp", "reuseaddr": True})
    check = netns.run([*BINDGUARD, "check", "--no-systemd", "--wait", "0", "--json", f"127.0.0.1:{PORT}"])
    assert check.returncode == 98, check.stderr
    data = json.loads(check.stdout)
    assert data["verdict"] == "in-use" and data["exit_code"] == 98
    assert [c["kind"] for c in data["conflicts"]] == ["listener"]
    assert data["conflicts"][0]["unit_status"] in ("cgroup", "unknown")

    verify = netns.run([*BINDGUARD, "verify", "--no-systemd", "--unit", "web.service", "--timeout", "0", "--json",
                        f"127.0.0.1:{PORT + 1}"])
    assert verify.returncode == 1, verify.stderr
    assert [a["kind"] for a in json.loads(verify.stdout)["addresses"]] == ["not-listening"]

    discover = subprocess.run([*BINDGUARD, "discover", "--json", "--exec-start", "/usr/bin/webd --port 8080"],
                              capture_output=True, text=True, timeout=60)
    assert discover.returncode == 0, discover.stderr
    assert "guess" in {f["confidence"] for f in json.loads(discover.stdout)["findings"]}


# --- exit codes: one ExitCode enum, every --help epilog and README's tables from it ------------------

README = Path(__file__).resolve().parent.parent / "README.md"


def _exit_lines(command: str) -> dict[int, str]:
    """What `bindguard COMMAND --help` says of each exit code it lists (as the parser builds it)."""
    from bindguard.cli import parser

    module = importlib.import_module(f"bindguard.cli.commands.{command}")
    text = parser.exit_codes_help(module.EXIT_CODES)
    lines: dict[int, str] = {}
    for row in re.split(r"\n(?=  \d)", text.split("\n", 1)[1]):
        codes, meaning = re.match(r"  (\d+(?:, \d+)*)\s+(\S.*)", " ".join(row.split("\n      "))).groups()
        for code in codes.split(", "):
            lines[int(code)] = meaning
    return lines


def _readme_table(command: str) -> dict[int, str]:
    section = README.read_text().split(f"\n## `bindguard {command}`\n", 1)[1].split("\n## ", 1)[0]
    table = section.split("| code | meaning |\n|---|---|\n", 1)[1].split("\n\n", 1)[0]
    rows: dict[int, str] = {}
    for row in table.splitlines():
        codes, meaning = row.strip("|").replace("\\|", "\0").split("|")
        for code in codes.split(","):
            rows[int(code)] = meaning.strip().replace("\0", "|").replace("`", "")
    return rows


@pytest.mark.parametrize("command", ["check", "scan", "verify"])
def test_readme_exit_code_tables_are_the_ones_help_gives(command):
    """README (which the man pages' sources are beside) names every exit code the command's --help
    lists, each with the same line; a code the enum describes for every command reads the same."""
    assert _readme_table(command) == {code: text.replace("`", "") for code, text in _exit_lines(command).items()}


def test_each_command_lists_its_own_exit_codes_and_the_top_level_only_the_common_ones():
    from bindguard.cli.commands import COMMANDS
    from bindguard.cli.parser import build_parser
    from bindguard.model.errors import COMMON_EXIT_CODES, ExitCode

    top = build_parser().epilog
    assert "98" not in top and "75" not in top and all(str(code) in top for code in COMMON_EXIT_CODES)
    for name, (module_name, _) in COMMANDS.items():
        lines = _exit_lines(module_name)
        assert set(lines) >= {int(c) for c in COMMON_EXIT_CODES}, name
        assert set(lines) <= {int(c) for c in ExitCode}, name
    # codes only the guard gives, never the commands that change or read files
    for name in ("config", "install", "uninstall", "discover", "scan"):
        assert not set(_exit_lines(name)) & {13, 75, 98, 99}, name
    assert 1 not in _exit_lines("check") and 70 not in _exit_lines("explain") and 78 not in _exit_lines("explain")
