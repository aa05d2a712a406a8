"""Guards started together see each other's trial sockets (issue 10, item 11).

Units whose configurations name the same address start in one transaction (boot, `systemctl
start a b ...`): each guard's trial socket holds the address for a moment, and another guard
that meets it must not blame it. A trial socket is not a holder; a daemon is.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

PORT = 18080
# Several addresses on one port, held together by each guard: the window in which two guards
# meet is as wide as a daemon's request of a few sockets.
ADDRESSES = " ".join(f"127.0.0.{i}:{PORT}" for i in range(1, 13))
GUARD = f"{sys.executable} -m bindguard check --unit %n --wait 0 --json"
UNITS = [f"together{i}.service" for i in range(20)]


def logs(rig, names) -> str:
    return "\n".join(f"--- {n}\n{rig.log(n + '.log').read_text()}" for n in names if rig.log(n + ".log").exists())


def start_together(rig, rounds: int) -> None:
    for name in UNITS:
        rig.write_unit(name, f"""\
[Service]
Type=oneshot
ExecStartPre=+{GUARD} {ADDRESSES}
ExecStart=/bin/true
StandardError=append:{rig.log(name + '.log')}
""", reload=False)
    rig.daemon_reload()
    for _ in range(rounds):
        done = rig.systemctl("start", *UNITS, timeout=120)
        refused = [n for n in UNITS if rig.prop(n, "Result") != "success"]
        assert done.returncode == 0 and not refused, logs(rig, refused)
    text = logs(rig, UNITS)
    assert "refusing" not in text and "no holder visible" not in text and "holder not found" not in text


def test_guards_started_together_do_not_refuse_each_other(systemd_rig):
    start_together(systemd_rig, rounds=3)


@contextlib.contextmanager
def cpu_load(processes: int):
    """Busy loops on every core, so that a guard holding its trial sockets is preempted there."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        yield
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()


def test_guards_started_together_under_cpu_load(systemd_rig):
    # 20 guards of 12 sockets each on one port, with three busy loops per core: a guard
    # is preempted while its trial sockets are open, for longer than a quiet machine would show.
    with cpu_load(3 * (os.cpu_count() or 1)):
        start_together(systemd_rig, rounds=4)


def test_a_real_holder_is_named_when_many_start_together(systemd_rig):
    rig = systemd_rig
    spec = {"host": "127.0.0.1", "port": PORT}
    rig.write_unit("holder.service", f"[Service]\nType=notify\nExecStart={rig.serve(spec)}\n")
    assert rig.start("holder.service").ok
    holder_pid = rig.main_pid("holder.service")
    for name in UNITS:
        rig.write_unit(name, f"""\
[Service]
Type=notify
ExecStartPre=+{GUARD} 127.0.0.1:{PORT}
ExecStart={rig.serve(spec)}
StandardError=append:{rig.log(name + '.log')}
""", reload=False)
    rig.daemon_reload()
    rig.systemctl("start", *UNITS, timeout=120)
    for name in UNITS:
        out = rig.log(name + ".log").read_text()
        assert rig.prop(name, "ActiveState") != "active", out
        assert f"PID {holder_pid}" in out and "unit holder.service" in out, out
        assert "no holder visible" not in out and "holder not found" not in out, out


def hold_as_a_guard(netns, tmp_path: Path, spec: dict) -> subprocess.Popen:
    """tests/holder.py under the name `bindguard`: what `ps` shows of another guard's trial."""
    import holder

    disguised = tmp_path / "bindguard"
    shutil.copy(holder.__file__, disguised)
    proc = subprocess.Popen(netns.argv([sys.executable, str(disguised), json.dumps([spec])]),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    netns.processes.append(proc)
    return proc


def test_a_guards_fleeting_socket_is_probed_again_not_blamed(netns, tmp_path):
    trial = hold_as_a_guard(netns, tmp_path, {"host": "127.0.0.1", "port": PORT, "reuseaddr": True})
    guard = subprocess.Popen(netns.argv([sys.executable, "-m", "bindguard", "check", "--json", "--wait", "0",
                                         f"127.0.0.1:{PORT}"]), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    time.sleep(0.3)  # the guard has met the socket by now, and probes again
    netns.stop(trial)
    out, err = guard.communicate(timeout=30)
    assert guard.returncode == 0, err
    assert json.loads(out)["clear"]
    assert f"another guard (PID {trial.pid}) was checking 127.0.0.1:{PORT}" in err, err


def test_a_guard_that_holds_on_is_reported_after_a_bounded_time(netns, tmp_path):
    trial = hold_as_a_guard(netns, tmp_path, {"host": "127.0.0.1", "port": PORT, "reuseaddr": True})
    started = time.monotonic()
    proc = netns.run([sys.executable, "-m", "bindguard", "check", "--json", "--wait", "0", f"127.0.0.1:{PORT}"])
    assert time.monotonic() - started < 20
    assert proc.returncode == 98, proc.stderr
    (conflict,) = json.loads(proc.stdout)["conflicts"]
    assert conflict["kind"] == "guard-trial" and conflict["pid"] == trial.pid and "bindguard" in conflict["command"]
    assert "another guard trying this address" in conflict["remedy"] and "already serves" not in proc.stderr, proc.stderr
    assert ": listener:" not in proc.stderr, proc.stderr


def test_a_guard_preempted_for_seconds_is_waited_for(netns, tmp_path):
    # On a busy machine another guard may hold its trial socket for longer than a second: while
    # the holder is a guard, the guard probes again for longer (GUARD_SETTLE_BUDGET) and passes.
    trial = hold_as_a_guard(netns, tmp_path, {"host": "127.0.0.1", "port": PORT, "reuseaddr": True})
    guard = subprocess.Popen(netns.argv([sys.executable, "-m", "bindguard", "check", "--json", "--wait", "0",
                                         f"127.0.0.1:{PORT}"]), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    time.sleep(2.0)
    netns.stop(trial)
    out, err = guard.communicate(timeout=30)
    assert guard.returncode == 0, err
    assert json.loads(out)["clear"]
