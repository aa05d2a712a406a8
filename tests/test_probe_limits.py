"""The guard's own limits are not the kernel's answer: running out of file descriptors (EMFILE)
is the guard's failure, never "in use" (issue 9, item 14). Real sockets in a network namespace,
real resource limits (setrlimit in the child before it runs the guard)."""

from __future__ import annotations

import json
import resource
import sys

import pytest

pytestmark = pytest.mark.integration


def limited(soft: int, hard: int):
    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return set_limit


def check(netns, args: list[str], soft: int, hard: int):
    return netns.run([sys.executable, "-m", "bindguard", "check", "--wait", "0", *args],
                     preexec_fn=limited(soft, hard))


def distinct_ports(n: int, first: int = 9000) -> list[str]:
    return [f"127.0.0.1:{port}" for port in range(first, first + n)]


def same_port(n: int, port: int = 8080) -> list[str]:
    return [f"127.0.0.{i}:{port}" for i in range(1, n + 1)]


@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["fast path", "full path"])
def test_more_free_addresses_than_descriptors_pass(netns, json_flag):
    # `ulimit -n 16`: soft and hard limit 16, and 20 free addresses on as many ports.
    proc = check(netns, [*json_flag, *distinct_ports(20)], 16, 16)
    assert proc.returncode == 0, proc.stderr
    assert "in use" not in proc.stderr and "EMFILE" not in proc.stderr
    if json_flag:
        assert json.loads(proc.stdout)["clear"]


def test_a_haproxy_range_of_1024_ports_at_systemds_default_soft_limit(netns):
    # haproxy's `bind 127.0.0.1:9000-10023`, as discovery expands it, under LimitNOFILE=1024:524288.
    for args in (distinct_ports(1024), ["--json", *distinct_ports(1024)]):
        proc = check(netns, args, 1024, max(1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "in use" not in proc.stderr


def test_the_soft_limit_is_raised_to_the_hard_one(netns):
    # Sockets on one port are held together (they may collide with each other): 40 of them
    # need more than a soft limit of 16, and the hard limit allows it.
    proc = check(netns, ["--json", *same_port(40)], 16, 4096)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["clear"]


def test_out_of_descriptors_is_the_guards_own_failure(netns):
    # No room to raise: the guard says it could not check, and fails open (70 when closed).
    proc = check(netns, same_port(40), 16, 16)
    assert proc.returncode == 0, proc.stderr
    assert "in use" not in proc.stderr and "refusing" not in proc.stderr
    assert "EMFILE" in proc.stderr and "file descriptors" in proc.stderr
    assert "letting the start go on" in proc.stderr
    closed = check(netns, ["--fail-closed", *same_port(40)], 16, 16)
    assert closed.returncode == 70, closed.stderr
    assert "in use" not in closed.stderr and "EMFILE" in closed.stderr


def test_a_self_conflict_is_still_found_among_many_ports(netns):
    # Holding sockets port by port keeps what the daemon's own sockets do to each other.
    args = ["--no-v6only", *distinct_ports(20), "0.0.0.0:9005", "[::]:9100", "0.0.0.0:9100"]
    proc = check(netns, ["--json", *args], 16, 16)
    assert proc.returncode == 98, proc.stderr
    report = json.loads(proc.stdout)
    found = sorted((c["address"], c["kind"], c["other_address"]) for c in report["conflicts"])
    assert found == [("0.0.0.0:9005", "self-conflict", "127.0.0.1:9005"),
                     ("0.0.0.0:9100", "self-conflict", "[::]:9100")], report
