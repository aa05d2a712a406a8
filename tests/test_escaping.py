"""Untrusted text never reaches the journal or a terminal raw: a holder whose command line holds a
newline, a forged "clear" line and a terminal escape is reported on one line per message, with
the newline and ESC written as \\n and \\x1b (bindguard.model.text.escape, used by every renderer)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

import holder
from test_cli import on_a_terminal
from bindguard.model.text import escape, excerpt
from bindguard.model.endpoints import parse_listen
from bindguard.model.facts import ProcessFact, SocketFact
from bindguard.action.scan import Scan
from bindguard.model.hostmap import Listener
from bindguard.report.scan import write_table
from bindguard.model.kinds import UnitStatus

PORT = 18533
FORGED = "\nbindguard: clear: [::]:80 can be bound\n\x1b[2J"
BINDGUARD = [sys.executable, "-m", "bindguard"]


@pytest.fixture
def hostile(netns):
    proc = holder.start(netns.argv, [{"proto": "tcp", "host": "127.0.0.1", "port": PORT, "reuseaddr": True}],
                        extra_argv=[FORGED])
    netns.processes.append(proc)
    return proc


def env():
    return {**os.environ, "PYTHONPATH": ":".join(sys.path), "BINDGUARD_CONFIG_PATH": "/nonexistent"}


def assert_one_line_per_message(text: str, holding_lines: int) -> None:
    assert "\x1b" not in text and "\r" not in text, repr(text)
    lines = text.splitlines()
    assert not any(line.startswith("bindguard: clear") for line in lines), lines  # no forged message
    named = [line for line in lines if "holder.py" in line]
    assert len(named) == holding_lines, lines
    assert all("\\nbindguard: clear: [::]:80 can be bound\\n\\x1b[2J" in line for line in named), named


@pytest.mark.integration
def test_check_and_explain_escape_a_holder_s_command_line(netns, hostile):
    for command, holding_lines in (("check", 1), ("explain", 2)):  # explain also lists what is on the port
        proc = netns.run([*BINDGUARD, command, "--no-systemd", f"127.0.0.1:{PORT}"], env=env())
        assert proc.returncode == 98, proc.stderr
        assert_one_line_per_message(proc.stdout if command == "explain" else proc.stderr, holding_lines)


@pytest.mark.integration
def test_json_keeps_the_command_line_exact(netns, hostile):
    proc = netns.run([*BINDGUARD, "check", "--json", "--no-systemd", f"127.0.0.1:{PORT}"], env=env())
    (conflict,) = json.loads(proc.stdout)["conflicts"]
    assert conflict["command"].endswith(FORGED)  # JSON escapes it itself; the value stays exact


@pytest.mark.integration
def test_scan_findings_escape_it(netns, hostile):
    proc = netns.run([*BINDGUARD, "scan", "--no-systemd"], env=env())
    assert proc.returncode == 1, proc.stderr
    assert "\x1b" not in proc.stdout
    assert_one_line_per_message(proc.stderr, 1)


@pytest.mark.integration
def test_a_command_line_that_would_reorder_or_hide_what_is_shown_is_escaped(netns):
    """A right-to-left override, an isolate, a zero-width space, a line separator and a byte that is
    not UTF-8 in a holder's command line: each is shown as an escape, and the report is written
    (the byte does not stop it), in UTF-8 that decodes strictly."""
    hidden = "\u202egnirts\u2066\u200b\u2028\udcff"  # the last: the byte 0xff in the argv
    proc = holder.start(netns.argv, [{"proto": "tcp", "host": "127.0.0.1", "port": PORT + 1, "reuseaddr": True}],
                        extra_argv=[hidden])
    netns.processes.append(proc)
    for command in ("check", "explain"):
        result = netns.run([*BINDGUARD, command, "--no-systemd", f"127.0.0.1:{PORT + 1}"], env=env(), text=False)
        assert result.returncode == 98, result.stderr
        text = (result.stdout + result.stderr).decode("utf-8")  # strict
        assert all(line.isprintable() for line in text.splitlines()), repr(text)
        assert "\\u202egnirts\\u2066\\u200b\\u2028" in text, text


def test_scan_table_escapes_every_cell():
    """The table on recorded evidence (a live command line is cut at 60 characters before its
    hostile part would show): a command and a unit name from a cgroup with control characters."""
    hostile = ProcessFact(4242, 1, "x\x1b]0;owned\x07", ("\x1b[2Jd\naemon",), "/usr/bin/daemon", 0, "root", 1.0e9,
                          "/system.slice/evil\nunit.service", "evil\nunit.service")
    scan = Scan(listeners=[Listener(SocketFact(parse_listen("127.0.0.1:8080"), "LISTEN", 0, 7), hostile,
                                    unit="evil\nunit.service", unit_status=UnitStatus.BY_CGROUP)])
    out = io.StringIO()
    write_table(scan, out)
    (header, row) = out.getvalue().splitlines()
    assert "\x1b" not in row and "evil\\nunit.service" in row and "\\x1b[2Jd\\naemon" in row, row


@pytest.mark.integration
def test_explain_on_a_terminal_gets_no_escape_sequence(netns, hostile):
    code, out = on_a_terminal(netns.argv([*BINDGUARD, "explain", "--no-systemd", f"127.0.0.1:{PORT}"]), env())
    assert code == 98
    text = out.decode()
    assert f"PID {hostile.pid}" in text, text
    for colour in (b"\x1b[1;31m", b"\x1b[33m", b"\x1b[0m"):  # the console's own, around whole lines
        out = out.replace(colour, b"")
    assert b"\x1b" not in out, text
    assert "\\x1b[2J" in text


def test_escape_and_excerpt():
    assert escape("a\nb\x1b[2J\r\t\x7f\x9bc é") == "a\\nb\\x1b[2J\\r\\t\\x7f\\x9bc é"
    # Bidi controls, zero-width and other format characters, line and paragraph separators, a byte
    # that was not UTF-8 (a lone surrogate), a tag character, a no-break space: escaped, as every
    # character str.isprintable() rejects; letters of any script and the space are kept.
    hidden = "\u202eevil\u2066\u2028\u2029\u200b\ufeff\udcff\U000e0041\u00a0"
    assert escape(hidden) == "\\u202eevil\\u2066\\u2028\\u2029\\u200b\\ufeff\\udcff\\U000e0041\\xa0"
    assert escape("nginx: wörker — 日本 ok") == "nginx: wörker — 日本 ok"
    assert all(char.isprintable() for char in escape("".join(map(chr, range(0x3000)))))
    assert excerpt("root:x:0:0:root:/root:/bin/bash\nnext line", 12) == "'root:x:0:0:r'..."
    assert excerpt("a\nb") == "'a\\nb'"


def test_a_path_with_a_newline_stays_on_the_error_s_line(tmp_path):
    forged = str(tmp_path / "x\nbindguard: clear: [::]:80 can be bound")
    proc = subprocess.run([*BINDGUARD, "check", "--config", forged, "80"], capture_output=True, text=True,
                          env=env(), timeout=60)
    assert proc.returncode == 78, proc.stderr
    (line, hint) = proc.stderr.splitlines()
    assert line.startswith("bindguard: error: ") and "x\\nbindguard: clear" in line, proc.stderr
    assert hint.startswith("  hint: ")


def test_several_problems_of_one_file_are_one_line_each(tmp_path):
    config = tmp_path / "web.yaml"
    config.write_text("lisen: [80]\nwiat: 3\n")
    proc = subprocess.run([*BINDGUARD, "check", "--config", str(config), "80"], capture_output=True, text=True,
                          env=env(), timeout=60)
    assert proc.returncode == 78, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("bindguard: error: 2 problems") and len(lines) == 4, lines
    assert "lisen" in lines[1] and "wiat" in lines[2] and lines[3].startswith("  hint: "), lines
