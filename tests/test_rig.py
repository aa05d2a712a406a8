"""The systemd rig itself: a real user manager, its bus, units, and a clean teardown."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_rig_runs_units_in_private_namespaces_and_cleans_up(systemd_rig):
    rig = systemd_rig
    assert rig.systemctl("is-system-running").stdout.strip() in ("running", "degraded")
    assert rig.prop("dbus.service", "ActiveState") == "active"
    mounts = rig.run(["cat", "/proc/self/mounts"]).stdout
    assert mounts.count(" /run/systemd tmpfs ") == 1
    # The guards' remembered discoveries: the rig's own, root's alone as the guard requires.
    assert ["mode=700" in fields[3].split(",") for fields in map(str.split, mounts.splitlines())
            if fields[1:3] == ["/run/bindguard", "tmpfs"]] == [True], mounts
    assert not any(rig.seen("/run/bindguard").iterdir()), "the rig's /run/bindguard is empty at first"
    assert os.readlink(f"/proc/{rig.manager_pid}/ns/net") != os.readlink("/proc/self/ns/net")

    rig.write_unit("smoke.service", f"""\
[Service]
Type=notify
ExecStartPre={sys.executable} -c "import bindguard"
ExecStart={rig.serve({"host": "127.0.0.1", "port": 8080})}
""")
    run = rig.start("smoke.service")
    assert run.ok, run.output
    assert run.pre_status == [0]
    pid = rig.main_pid("smoke.service")
    assert pid > 0
    cgroup = Path(f"/proc/{pid}/cgroup").read_text()
    assert "/app.slice/smoke.service" in cgroup
    assert rig.name in cgroup, "the rig's units live under the rig's own cgroup"
    listening = rig.run(["ss", "-Hltn", "sport = :8080"]).stdout
    assert "127.0.0.1:8080" in listening

    failing = rig.write_unit("fails.service", "[Service]\nExecStartPre=/bin/sh -c 'exit 98'\nExecStart=/bin/true\n")
    assert failing.exists()
    run = rig.start("fails.service")
    assert not run.ok and run.result == "exit-code" and run.pre_status == [98]

    root, manager = rig.root, rig.manager_pid
    rig.close()
    assert not root.exists()
    assert not Path(f"/proc/{pid}").exists() and not Path(f"/proc/{manager}").exists()
    assert not any(cg.exists() for cg in rig.cgroups)
