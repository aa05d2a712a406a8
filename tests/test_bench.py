"""The benchmark runs end to end on a tiny load and leaves nothing behind (it asserts nothing about time)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REQUIRE, need_root

RUN = Path(__file__).resolve().parent.parent / "bench" / "run.py"
REFERENCES = ("floor", "ss", "ss_p", "lsof", "psutil")
BINDGUARD_PATHS = ("clear", "held", "timewait", "noop", "clear_yaml", "nat_warn", "noop_unit", "unit",
                   "held_unit")
KNOWN_DAEMON_PATHS = ("daemon_nginx", "daemon_nginx_changed", "daemon_ssh", "daemon_ssh_changed")
SOCKET_UNIT_PATHS = ("socket_path_unit", "socket_clear_unit")


def test_small_benchmark_runs_and_cleans_up(tmp_path):
    need_root("the benchmark's loaded namespaces")
    done = subprocess.run(
        [sys.executable, str(RUN), "--small", "--size", "300:20", "--rounds", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "results.json").read_text())
    [size] = report["sizes"]
    assert size["sockstat_start"]["total"] >= 300
    assert size["sockstat_start"]["timewait"] > 0
    commands = size["commands"]
    for key in REFERENCES + ("clear", "held", "timewait", "noop"):
        assert commands[key]["status"] == "ok", commands[key]
        assert len(commands[key]["times_ms"]) == 2
        assert commands[key]["peak_rss_kib"] > 0
    for key in BINDGUARD_PATHS:
        assert commands[key]["status"] in ("ok", "n/a"), commands[key]
    if REQUIRE:  # CI has the systemd rig and nftables (setup.sh --test): the in-unit paths, the unit's YAML
        # with and without `nat: warn`, the known daemons and the boot storm must have run
        for key in ("unit", "noop_unit", "held_unit", "clear_yaml", "nat_warn", *KNOWN_DAEMON_PATHS,
                    *SOCKET_UNIT_PATHS):
            assert commands[key]["status"] == "ok", commands[key]
            assert len(commands[key]["times_ms"]) == 2
        storm = report["boot_storm"]
        assert set(storm["ways"]) == {"bindguard", "python", "none"} and storm["units"] == 10
        assert all(len(way["times_ms"]) == 2 for way in storm["ways"].values())
        assert "### Boot storm" in done.stdout
    assert "| target | measured | met? |" in done.stdout
    assert not Path(f"/proc/{size['held_pid']}").exists(), "a load process outlived the benchmark"
