"""Output that fits the tools an administrator pipes it into: --json[=short|pretty] with a schema
version on every JSON object, scan's and discover's tables whole off a terminal and without their
legend on request, `config show` as YAML that loads (and validates as a bindguard file) and as JSON.

Each command runs as a person runs it, `python -m bindguard ...` in a subprocess; scan in a network
namespace of its own, with a real listener whose command line is longer than a terminal's cut.
"""

from __future__ import annotations

import json
import os
import pty
import socket
import subprocess
import sys
from pathlib import Path

import holder
import pytest
import yaml

from bindguard.report.jsonout import SCHEMA_VERSION

LONG_ARGUMENT = "an-argument-long-enough-that-a-terminal-would-cut-the-command-column-" * 2


def bindguard(*args: str, env: dict | None = None, wrap=lambda argv: argv, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(wrap([sys.executable, "-m", "bindguard", *args]), capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})}, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- --json[=MODE] and the schema version ----------------------------------------------------------

def test_json_modes_as_systemd_takes_them_and_every_object_carries_the_schema_version():
    address = f"127.0.0.1:{free_port()}"
    pretty = bindguard("explain", "--json", address)  # a bare --json before LISTEN is pretty, not a mode
    assert pretty.returncode == 0, pretty.stderr
    assert pretty.stdout.startswith('{\n  "schema_version": 1,\n') and SCHEMA_VERSION == 1
    document = json.loads(pretty.stdout)
    assert list(document)[0] == "schema_version" and document["addresses"][0]["address"] == address
    for args in (["--json=short", address], ["--json", "short", address], [address, "--json=short"]):
        short = bindguard("explain", *args)
        assert short.returncode == 0, (args, short.stderr)
        assert short.stdout.count("\n") == 1 and json.loads(short.stdout) == document | {
            "addresses": json.loads(short.stdout)["addresses"]}, args
    assert bindguard("explain", address, "--json=pretty").stdout.startswith('{\n  "schema_version"')
    wrong = bindguard("explain", "--json=compact", address)
    assert wrong.returncode == 64 and "--json: invalid choice: 'compact'" in wrong.stderr
    assert "Traceback" not in wrong.stderr


def test_discover_and_config_show_objects_carry_the_schema_version(tmp_path):
    conf = tmp_path / "nginx.conf"
    conf.write_text("events {}\nhttp { server { listen 8080; } }\n")
    found = bindguard("discover", "--daemon", "nginx", "--config", str(conf), "--json=short")
    assert found.returncode == 0, found.stderr
    assert found.stdout.count("\n") == 1 and json.loads(found.stdout)["schema_version"] == SCHEMA_VERSION
    shown = bindguard("config", "show", "web", "--json", env={"BINDGUARD_CONFIG_PATH": str(tmp_path)})
    assert shown.returncode == 0 and json.loads(shown.stdout)["schema_version"] == SCHEMA_VERSION


# --- explain: the report on stdout ----------------------------------------------------------------

@pytest.mark.integration
def test_explain_writes_its_report_to_stdout_and_with_json_to_stderr(netns):
    netns.hold({"host": "127.0.0.1", "port": 8080})
    # a JOURNAL_STREAM inherited from a unit names another stream: the pipe gets plain lines
    piped = bindguard("explain", "--no-systemd", "127.0.0.1:8080", wrap=netns.argv, env={"JOURNAL_STREAM": "1:2"})
    assert piped.returncode == 98 and piped.stderr == ""
    assert piped.stdout.startswith("bindguard: a start now would be refused: 127.0.0.1:8080 in use")
    assert "    fix: " in piped.stdout and "on these ports now:" in piped.stdout and "<3>" not in piped.stdout
    with_json = bindguard("explain", "--no-systemd", "--json=short", "127.0.0.1:8080", wrap=netns.argv)
    assert with_json.returncode == 98
    assert json.loads(with_json.stdout)["verdict"] == "in-use"  # stdout: the object alone
    assert with_json.stderr.startswith("bindguard: a start now would be refused")


# --- tables: whole off a terminal, --no-legend -----------------------------------------------------

@pytest.mark.integration
def test_scan_table_is_whole_in_a_pipe_cut_on_a_terminal_and_has_no_legend_on_request(netns):
    netns.processes.append(holder.start(netns.argv, [{"host": "127.0.0.1", "port": 8080}],
                                        extra_argv=[LONG_ARGUMENT]))
    piped = bindguard("scan", "--no-systemd", wrap=netns.argv)
    assert piped.returncode == 1, piped.stderr  # 1: the unclaimed listener is a finding
    header, row = piped.stdout.splitlines()
    assert header.split()[:3] == ["PORT", "ADDRESS", "STATE"] and row.startswith("8080/tcp")
    assert row.endswith(LONG_ARGUMENT) and "..." not in row  # the command line whole

    bare = bindguard("scan", "--no-systemd", "--no-legend", wrap=netns.argv)
    assert bare.returncode == 1 and [line.split() for line in bare.stdout.splitlines()] == [row.split()]

    main, child = pty.openpty()  # a terminal: the COMMAND column is cut, as before
    try:
        shown = subprocess.run(netns.argv([sys.executable, "-m", "bindguard", "scan", "--no-systemd"]),
                               stdout=child, stderr=subprocess.DEVNULL, timeout=60)
        os.close(child)
        child = -1
        text = b""
        while chunk := _read(main):
            text += chunk
    finally:
        if child >= 0:
            os.close(child)
        os.close(main)
    assert shown.returncode == 1
    terminal_row = text.decode().splitlines()[1]
    assert terminal_row.endswith("...") and LONG_ARGUMENT not in terminal_row
    assert len(terminal_row) < len(row)


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: the terminal's other side is closed and read
        return b""


@pytest.mark.integration
def test_scan_with_nothing_and_no_legend_prints_nothing(netns):
    done = bindguard("scan", "--no-systemd", "--no-legend", wrap=netns.argv)
    assert done.returncode == 0 and done.stdout == ""
    assert bindguard("scan", "--no-systemd", wrap=netns.argv).stdout.startswith("nothing listens")


def test_discover_table_has_a_header_that_no_legend_leaves_out(tmp_path):
    conf = tmp_path / "nginx.conf"
    conf.write_text("events {}\nhttp { server { listen 8080 reuseport; listen [::1]:8081; } }\n")
    shown = bindguard("discover", "--daemon", "nginx", "--config", str(conf))
    assert shown.returncode == 0, shown.stderr
    header, *rows = shown.stdout.splitlines()
    assert header.split() == ["ADDRESS", "CONFIDENCE", "SOURCE", "OPTIONS"]
    assert [row.split()[0] for row in rows] == ["0.0.0.0:8080", "[::1]:8081"]
    bare = bindguard("discover", "--daemon", "nginx", "--config", str(conf), "--no-legend")
    assert [line.split() for line in bare.stdout.splitlines()] == [row.split() for row in rows]
    conf.write_text("events {}\nhttp { }\n")
    assert bindguard("discover", "--daemon", "nginx", "--config", str(conf)).stdout.startswith("nothing found")
    assert bindguard("discover", "--daemon", "nginx", "--config", str(conf), "--no-legend").stdout == ""


# --- config show: YAML that loads, and JSON ------------------------------------------------------

def test_config_show_is_yaml_that_loads_and_validates_with_origins_as_comments(tmp_path):
    search = tmp_path / "etc"
    search.mkdir()
    unit_file = search / "web.service.yaml"
    unit_file.write_text('listen: ["0.0.0.0:8080", {address: "[::]:8080", v6only: true, optional: true}, '
                         '{address: "[::1]:9", optional: if-available}]\n'
                         "options: {reuseport: true}\nwait: 0.00001\npolicy: {time-wait: refuse}\nnat: off\n")
    env = {"BINDGUARD_CONFIG_PATH": str(search)}
    shown = bindguard("config", "show", "web", env=env)
    assert shown.returncode == 0, shown.stderr
    settings = yaml.safe_load(shown.stdout)
    assert settings["listen"] == ["0.0.0.0:8080", {"address": "[::]:8080", "v6only": True, "optional": True},
                                  {"address": "[::1]:9", "optional": "if-available"}]
    assert settings["wait"] == 0.00001 and settings["options"]["reuseport"] is True
    assert settings["policy"]["time-wait"] == "refuse" and settings["nat"] == "off"
    lines = shown.stdout.splitlines()
    assert lines[0] == f"# web.service: {unit_file}"
    assert any(line.startswith("  reuseport: true") and line.endswith(f"# {unit_file}:2:22") for line in lines)
    assert any(line.startswith("  self-conflict: refuse") and line.endswith("# default") for line in lines)
    assert any(line.startswith("  listener: refuse") and line.endswith("# default (wait while its holder is stopping or exiting)")
               for line in lines)

    # what it prints is a bindguard file for the unit, which says the same again
    again = tmp_path / "again"
    again.mkdir()
    (again / "web.service.yaml").write_text(shown.stdout)
    checked = bindguard("config", "check", "web.service", env={"BINDGUARD_CONFIG_PATH": str(again)})
    assert checked.returncode == 0, checked.stderr
    assert yaml.safe_load(bindguard("config", "show", "web", env={"BINDGUARD_CONFIG_PATH": str(again)}).stdout) \
        == settings

    # nothing set: listen and wait are comments, not values the guard would read differently
    empty = bindguard("config", "show", "none.service", env=env)
    defaults = yaml.safe_load(empty.stdout)
    assert "listen" not in defaults and "wait" not in defaults and defaults["fail"] == "open"
    assert "# listen: not set" in empty.stdout


def test_config_show_json_has_the_settings_and_each_origin(tmp_path):
    unit_file = tmp_path / "web.service.yaml"
    unit_file.write_text('listen: ["127.0.0.1:8080"]\nwait: 10\n')
    shown = bindguard("config", "show", "web", "--json=short", env={"BINDGUARD_CONFIG_PATH": str(tmp_path)})
    assert shown.returncode == 0, shown.stderr
    document = json.loads(shown.stdout)
    assert document["unit"] == "web.service" and document["files"] == [str(unit_file)]
    assert document["settings"]["listen"] == [{"address": "127.0.0.1:8080"}]
    assert document["settings"]["wait"] == 10 and document["settings"]["policy"]["time-wait"] == "wait"
    assert document["origins"]["wait"] == f"{unit_file}:2:7"
    assert document["origins"]["listen.0"] == f"{unit_file}:1:10"
    assert document["origins"]["options.v6only"] == "default (net.ipv6.bindv6only)"
    assert Path(document["files"][0]).exists()
