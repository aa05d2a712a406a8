"""sockets.py against real sockets in real network namespaces.

The query runs inside the namespace (tests/observe.py through nsenter); the holders are
separate processes (tests/holder.py), so inodes and uids are the kernel's own.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys

import pytest

from bindguard.evidence import sockdiag, sockets
from conftest import NOBODY
from observe import query as observe

BOUND_INACTIVE_KERNEL = tuple(int(x) for x in os.uname().release.split(".")[:2]) >= (6, 8)

pytestmark = pytest.mark.integration


def local(fact: dict) -> str:
    host = fact["local"]["host"]
    return f"[{host}]:{fact['local']['port']}" if ":" in host else f"{host}:{fact['local']['port']}"


def test_listeners_ipv4_and_ipv6_with_v6only(netns):
    holder = netns.hold(
        {"proto": "tcp", "host": "0.0.0.0", "port": 8080},
        {"proto": "tcp", "host": "::", "port": 8080, "v6only": True},
        {"proto": "tcp", "host": "::", "port": 8081, "v6only": False},
    )
    facts, notes = observe(netns, port=8080)
    assert notes == []
    by_address = {local(f): f for f in facts}
    assert set(by_address) == {"0.0.0.0:8080", "[::]:8080"}
    v4, v6 = by_address["0.0.0.0:8080"], by_address["[::]:8080"]
    assert v4["state"] == v6["state"] == "LISTEN"
    assert v4["v6only"] is None and v6["v6only"] is True
    assert v4["inode"] > 0 and v6["inode"] > 0 and v4["inode"] != v6["inode"]
    assert v4["uid"] == v6["uid"] == 0
    assert v4["remote"] is None and v4["expires_ms"] is None and v4["interface"] == 0
    assert isinstance(v4["cgroup_id"], int)

    (dual,), _ = observe(netns, port=8081)
    assert local(dual) == "[::]:8081" and dual["v6only"] is False
    assert holder.poll() is None


def test_port_filter_excludes_other_ports(netns):
    netns.hold(
        {"proto": "tcp", "host": "127.0.0.1", "port": 9000},
        {"proto": "tcp", "host": "127.0.0.1", "port": 9001},
        {"proto": "tcp", "host": "127.0.0.1", "port": 8999},
        {"proto": "udp", "host": "127.0.0.1", "port": 9000},
    )
    facts, _ = observe(netns, port=9000)
    assert [local(f) for f in facts] == ["127.0.0.1:9000"]
    assert {f["local"]["proto"] for f in facts} == {"tcp"}
    assert observe(netns, port=9000, states=["LISTEN"])[0] == facts
    assert observe(netns, port=9000, states=["TIME_WAIT", "BOUND"])[0] == []

    everything, _ = observe(netns)  # listening_sockets: every port, LISTEN only
    assert sorted(f["local"]["port"] for f in everything) == [8999, 9000, 9001]


def test_bound_but_not_listening_needs_bit_13(netns):
    netns.hold({"proto": "tcp", "host": "127.0.0.1", "port": 8080, "listen": False})
    facts, _ = observe(netns, port=8080)
    if not BOUND_INACTIVE_KERNEL:
        assert facts == []
        pytest.skip("the kernel reports bound-but-not-listening sockets from Linux 6.8 on")
    (fact,) = facts
    assert local(fact) == "127.0.0.1:8080" and fact["state"] == "BOUND" and fact["inode"] > 0

    without_bit_13 = sockets.state_mask("tcp", None) & ~(1 << sockdiag.TCP_BOUND_INACTIVE)
    code = (
        "import json\n"
        "from bindguard.evidence import sockets\n"
        f"print(json.dumps([str(f.local) for f in sockets._query_sock_diag('tcp', 8080, {without_bit_13})]))\n"
    )
    result = netns.run([sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
    from_proc, notes = observe(netns, port=8080, source="procfs")
    assert from_proc == []
    assert "bound but not listening" in notes[0]


def test_udp_bound_and_connected(netns):
    netns.hold({"proto": "udp", "host": "::", "port": 5353, "v6only": True})
    facts, _ = observe(netns, proto="udp", port=5353, udp_connect=["127.0.0.1", 5353, 9999])
    by_state = {f["state"]: f for f in facts}
    assert set(by_state) == {"BOUND", "ESTABLISHED"}
    bound, connected = by_state["BOUND"], by_state["ESTABLISHED"]
    assert local(bound) == "[::]:5353" and bound["v6only"] is True and bound["remote"] is None
    assert local(connected) == "127.0.0.1:5353"
    assert connected["remote"]["host"] == "127.0.0.1" and connected["remote"]["port"] == 9999
    assert all(f["local"]["proto"] == "udp" for f in facts)

    listening, _ = observe(netns, proto="udp")
    assert [local(f) for f in listening if f["local"]["port"] == 5353] == ["[::]:5353"]


@pytest.mark.parametrize("mode", ["timewait-server", "timewait-client"])
def test_time_wait(netns, mode):
    netns.hold({"proto": "tcp", "host": "127.0.0.1", "port": 8080, "reuseaddr": True, "mode": mode})
    facts, _ = observe(netns, port=8080)
    waiting = [f for f in facts if f["state"] == "TIME_WAIT"]
    assert len(waiting) == 1, facts
    (fact,) = waiting
    assert local(fact) == "127.0.0.1:8080"
    assert fact["inode"] == 0 and fact["uid"] == 0
    assert 0 < fact["expires_ms"] <= 60000
    assert fact["remote"]["host"] == "127.0.0.1" and fact["remote"]["port"] not in (0, 8080)
    assert fact["v6only"] is None and fact["cgroup_id"] is None


def test_outgoing_connection_from_the_port(netns):
    netns.hold({"proto": "tcp", "host": "127.0.0.1", "port": 8080, "mode": "outgoing"})
    (fact,), _ = observe(netns, port=8080)
    assert fact["state"] == "ESTABLISHED" and local(fact) == "127.0.0.1:8080"
    assert fact["inode"] > 0 and fact["remote"]["port"] != 8080


def test_uid_of_an_unprivileged_holder(netns):
    netns.hold({"proto": "tcp", "host": "::1", "port": 8080}, uid=NOBODY)
    (fact,), _ = observe(netns, port=8080)
    assert fact["uid"] == NOBODY and fact["state"] == "LISTEN"


def test_proc_net_fallback(netns):
    netns.hold(
        {"proto": "tcp", "host": "::", "port": 8080, "v6only": True},
        {"proto": "tcp", "host": "127.0.0.1", "port": 8080},
        {"proto": "tcp", "host": "127.0.0.1", "port": 8081},
        {"proto": "udp", "host": "127.0.0.1", "port": 8080},
    )
    netns.hold({"proto": "tcp", "host": "127.0.0.2", "port": 8080, "reuseaddr": True, "mode": "timewait-server"})
    from_netlink, _ = observe(netns, port=8080)
    from_proc, notes = observe(netns, port=8080, source="procfs")
    assert len(notes) == 1 and "/proc/net/tcp" in notes[0]

    def key(f):
        return (local(f), f["state"], f["uid"], f["inode"])

    assert sorted(map(key, from_proc)) == sorted(map(key, from_netlink))
    assert {local(f) for f in from_proc} == {"[::]:8080", "127.0.0.1:8080", "127.0.0.2:8080"}
    assert all(f["v6only"] is None and f["cgroup_id"] is None for f in from_proc)
    (waiting,) = [f for f in from_proc if f["state"] == "TIME_WAIT"]
    assert 0 < waiting["expires_ms"] <= 60000 and waiting["inode"] == 0

    (udp,), _ = observe(netns, proto="udp", port=8080, source="procfs")
    assert local(udp) == "127.0.0.1:8080" and udp["state"] == "BOUND"


def test_fallback_when_netlink_is_refused(netns, tmp_path):
    """With AF_NETLINK denied (as a seccomp filter would), /proc/net answers and says so."""
    netns.hold({"proto": "tcp", "host": "127.0.0.1", "port": 8080})
    code = (
        "import errno, json, _socket\n"  # the module sockdiag makes its sockets with
        "real = _socket.socket\n"
        "class Denied(real):\n"
        "    def __init__(self, family=-1, *args, **kwargs):\n"
        "        if family == _socket.AF_NETLINK:\n"
        "            raise PermissionError(errno.EPERM, 'denied')\n"
        "        super().__init__(family, *args, **kwargs)\n"
        "_socket.socket = Denied\n"
        "from bindguard.evidence import sockets\n"
        "notes = []\n"
        "facts = sockets.sockets_on_port('tcp', 8080, notes)\n"
        "print(json.dumps([[str(f.local), f.state] for f in facts] + [notes]))\n"
    )
    result = netns.run([sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr
    *facts, notes = json.loads(result.stdout)
    assert facts == [["127.0.0.1:8080", "LISTEN"]]
    assert "sock_diag is unavailable (EPERM" in notes[0]


def test_unknown_protocol_or_state_is_refused():
    with pytest.raises(ValueError):
        sockets.sockets_on_port("sctp", 80)
    with pytest.raises(ValueError):
        sockets.sockets_on_port("udp", 80, states=["LISTEN"])


def test_state_masks():
    assert sockets.state_mask("tcp", None) == 0b11_1111_1111_1110
    assert sockets.state_mask("tcp", ["BOUND"]) == (1 << 7) | (1 << 13)
    assert sockets.state_mask("tcp", ["LISTEN", "TIME_WAIT"]) == (1 << 10) | (1 << 6)
    assert sockets.state_mask("udp", None) == sockets.state_mask("udp", ["BOUND", "ESTABLISHED"]) == (1 << 7) | 2


@pytest.mark.skipif(sys.byteorder != "little", reason="the recorded lines are from a little-endian host")
def test_proc_net_address_parsing():
    assert sockets._proc_address("0100007F:1F90") == (ipaddress.ip_address("127.0.0.1"), 8080)
    assert sockets._proc_address("00000000000000000000000001000000:0050") == (ipaddress.ip_address("::1"), 80)
