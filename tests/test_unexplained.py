"""No failure to learn about a conflict turns the kernel's refusal into a pass (issue 10, item 4).

Once the trial bind has answered EADDRINUSE, a fault in any stage that explains the refusal
(listing the sockets, reading /proc, attributing the holder, rendering the report) still ends in
the refusal, with a line saying the guard could not explain it; only a fault before the kernel
answered fails open. The fault is injected into a real guard run against a real held port.
"""

from __future__ import annotations

import json
import sys

import pytest

pytestmark = pytest.mark.integration

PORT = 18181
SECRET = "forged\n<6>bindguard: clear"

# module, function: one per stage that runs after the kernel answered
STAGES = [
    ("bindguard.evidence.sockets", "sockets_on_port"),  # sock_diag
    ("bindguard.evidence.owners", "process_facts"),  # /proc
    ("bindguard.verdict.conflicts", "attribution"),  # who the holder is
    ("bindguard.report.outcome", "write_human"),  # the report
]


def guard_with_fault(netns, module: str, function: str, *args: str, full_command: bool = False):
    """`check ARGS` with `function` of `module` raising; full_command: not answered by the fast path,
    which alone answers a clear port (and runs none of the stages above)."""
    code = f"""
import importlib, sys
def fault(*args, **kwargs):
    raise RuntimeError({SECRET!r})
setattr(importlib.import_module({module!r}), {function!r}, fault)
if {full_command!r}:
    import bindguard.cli.fastpath
    bindguard.cli.fastpath.check = lambda args, console: None
from bindguard.cli import main
sys.exit(main(sys.argv[1:]))
"""
    return netns.run([sys.executable, "-c", code, "check", "--no-systemd", "--wait", "0", *args])


@pytest.mark.parametrize("module,function", STAGES, ids=[f for _, f in STAGES])
def test_a_fault_explaining_a_refusal_keeps_the_refusal(netns, module, function):
    netns.hold({"host": "127.0.0.1", "port": PORT, "reuseaddr": True})
    done = guard_with_fault(netns, module, function, f"127.0.0.1:{PORT}")
    assert done.returncode == 98, done.stderr
    assert "could not explain" in done.stderr and "RuntimeError" in done.stderr, done.stderr
    assert "forged\\n<6>bindguard: clear" in done.stderr, done.stderr  # escaped: one line, no forged entry
    assert "\n<6>bindguard: clear" not in done.stderr and "fail-open" not in done.stderr, done.stderr


def test_the_refusal_is_in_the_json_too(netns):
    netns.hold({"host": "127.0.0.1", "port": PORT, "reuseaddr": True})
    done = guard_with_fault(netns, "bindguard.evidence.sockets", "sockets_on_port", "--json", f"127.0.0.1:{PORT}")
    assert done.returncode == 98, done.stderr
    report = json.loads(done.stdout)
    assert report["clear"] is False and report["exit_code"] == 98 and "RuntimeError" in report["unexplained"]


def test_an_optional_address_still_only_warns(netns):
    netns.hold({"host": "127.0.0.1", "port": PORT, "reuseaddr": True})
    done = guard_with_fault(netns, "bindguard.evidence.sockets", "sockets_on_port", f"127.0.0.2:{PORT}",
                            "--optional", f"127.0.0.1:{PORT}")
    assert done.returncode == 0, done.stderr
    assert "could not explain" in done.stderr, done.stderr


@pytest.mark.parametrize("module,function", STAGES, ids=[f for _, f in STAGES])
def test_a_fault_on_a_clear_port_passes(netns, module, function):
    done = guard_with_fault(netns, module, function, f"127.0.0.1:{PORT}", full_command=True)
    assert done.returncode == 0, done.stderr


def test_a_fault_before_the_kernel_answered_fails_open_or_closed(netns):
    netns.hold({"host": "127.0.0.1", "port": PORT, "reuseaddr": True})
    for extra, code in (((), 0), (("--fail-closed",), 70)):
        done = guard_with_fault(netns, "bindguard.action.guard", "probe", *extra, f"127.0.0.1:{PORT}")
        assert done.returncode == code, done.stderr
        assert "internal error" in done.stderr, done.stderr

