"""Waiting out a real TIME_WAIT: bindguard returns as soon as the kernel lets the bind through."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

SPEC = {"proto": "tcp", "host": "127.0.0.1", "port": 8080, "reuseaddr": False, "mode": "timewait-server"}
KERNEL_POLL = """
import socket, sys, time
while True:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", 8080)); s.listen(1)
    except OSError:
        s.close(); time.sleep(0.02); continue
    s.close(); print(time.monotonic(), flush=True); break
"""


@pytest.mark.integration
def test_wait_budget_too_short_for_the_time_wait_fails_fast(netns):
    netns.hold(SPEC)
    started = time.monotonic()
    proc = netns.run([sys.executable, "-m", "bindguard", "check", "--json", "--wait", "5", "127.0.0.1:8080"])
    assert proc.returncode == 75, proc.stderr
    assert time.monotonic() - started < 5, "it must not sit out a wait that cannot succeed"
    report = json.loads(proc.stdout)
    assert report["verdict"] == "time-wait" and [c["kind"] for c in report["conflicts"]] == ["time-wait"]
    assert report["waited_for"] == [] and report["waited_s"] == 0, "it did not wait: it must not say it did"
    assert "clears by itself in" in proc.stderr and "without waiting" in proc.stderr


@pytest.mark.integration
@pytest.mark.slow
def test_waits_out_a_real_time_wait_and_returns_when_it_clears(netns):
    netns.hold(SPEC)
    guard = subprocess.Popen(
        netns.argv([sys.executable, "-m", "bindguard", "check", "--json", "--wait", "70", "127.0.0.1:8080"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The test's own view of the kernel: bind every 20 ms until it works.
    kernel = subprocess.run(netns.argv([sys.executable, "-c", KERNEL_POLL]), capture_output=True, text=True,
                            timeout=90)
    kernel_clear_at = float(kernel.stdout)
    out, err = guard.communicate(timeout=30)
    guard_done_at = time.monotonic()
    assert guard.returncode == 0, err
    report = json.loads(out)
    assert report["clear"] and report["waited_for"] == ["time-wait on 127.0.0.1:8080"]
    assert 40 < report["waited_s"] <= 65
    assert guard_done_at - kernel_clear_at < 0.5, "the guard must return within a fraction of a second"
    assert "after waiting" in err
