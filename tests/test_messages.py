"""Every message and help text is true of the command it is in: no wait claimed by a command that
never waits, no option named that does not exist, no "see above" with nothing above, and no
option accepted that means nothing to the command."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bindguard.cli.parser import build_parser

BINDGUARD = [sys.executable, "-m", "bindguard"]
README = Path(__file__).resolve().parent.parent / "README.md"


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*BINDGUARD, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def options_of(command: str) -> set[str]:
    parser = build_parser(command)
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {opt for action in sub._actions for opt in action.option_strings}


def every_option() -> set[str]:
    found = {opt for action in build_parser()._actions for opt in action.option_strings}
    for command in next(a for a in build_parser()._actions if a.dest == "command").choices:
        found |= options_of(command)
    return found


@pytest.mark.integration
def test_explain_never_waits_and_never_says_it_did(netns):
    port = 18431
    netns.hold({"proto": "tcp", "host": "127.0.0.1", "port": port, "mode": "timewait-server"})
    proc = netns.run([*BINDGUARD, "explain", "--json", "--no-reuseaddr", f"127.0.0.1:{port}"],
                     env={**os.environ, "PYTHONPATH": ":".join(sys.path)})
    assert proc.returncode == 75, proc.stderr
    result = json.loads(proc.stdout)
    assert result["waited_s"] == 0 and result["waited_for"] == [], result
    headline = proc.stderr.splitlines()[0]
    assert "TIME_WAIT" in headline and "clears" in headline, headline
    assert "past the wait budget" not in proc.stderr and "still blocked" not in proc.stderr, proc.stderr
    assert " after " not in headline, headline


@pytest.mark.integration
def test_a_clear_check_waited_for_nothing(netns):
    proc = netns.run([*BINDGUARD, "check", "--json", "--no-systemd", "--reuseport", "127.0.0.1:18432"],
                     env={**os.environ, "PYTHONPATH": ":".join(sys.path)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["waited_s"] == 0


@pytest.mark.parametrize("command", ["check", "explain", "verify", "scan", "discover", "install", "config"])
def test_help_points_only_at_what_is_there(command):
    proc = run(command, "--help")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for match in re.finditer(r"see above", text):
        assert "ListenStream=" in text[:match.start()], f"{command} --help says 'see above' with nothing above"


def test_explain_help_does_not_promise_addresses_from_the_unit():
    parser = build_parser("explain")
    sub = next(a for a in parser._actions if a.dest == "command").choices["explain"]
    (listen,) = [a for a in sub._actions if a.dest == "listen"]
    assert "discover" not in listen.help and "YAML" not in listen.help, listen.help
    proc = run("explain", "--unit", "web.service")
    assert proc.returncode == 64 and "LISTEN" in proc.stderr, proc.stderr


def test_explain_help_lists_only_the_exit_codes_explain_gives():
    text = run("explain", "--help").stdout
    codes = text.split("exit codes:", 1)[1]
    for what in ("70 ", "78 ", "when the wait ran out", "Restart="):
        assert what not in codes, f"explain --help: {what!r}"
    assert "75" in codes and "98" in codes


def test_verify_s_unit_is_not_called_guarded():
    text = run("verify", "--help").stdout
    unit = text.split("--unit NAME  ", 1)[1].split("--user", 1)[0]
    assert "guard" not in unit and "verify runs in" in unit, unit


@pytest.mark.parametrize("args", [
    ["verify", "--reuseport", "80"],
    ["verify", "--freebind", "80"],
    ["verify", "--reuseaddr", "80"],
    ["verify", "--no-reuseaddr", "80"],
    ["verify", "--daemon-user", "root", "80"],
    ["scan", "--unit", "web.service"],
])
def test_options_that_mean_nothing_to_a_command_are_refused(args):
    proc = run(*args)
    assert proc.returncode == 64, proc.stderr
    assert "unrecognized arguments" in proc.stderr, proc.stderr
    assert args[1] not in options_of(args[0])
    assert args[1] not in run(args[0], "--help").stdout


def test_options_named_in_the_keys_table_and_config_show_exist(tmp_path):
    known = every_option()
    text = README.read_text()
    keys = text.split("### Keys", 1)[1].split("\n### ", 1)[0]
    shown = run("config", "show", "nosuch.service", env={"BINDGUARD_CONFIG_PATH": str(tmp_path)})
    assert shown.returncode == 0, shown.stderr
    for where, body in (("README's Keys table", keys), ("config show", shown.stdout)):
        for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", body):
            assert option in known, f"{where} names {option}, which no bindguard command has"
