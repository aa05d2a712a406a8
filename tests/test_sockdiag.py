"""The early walk (bindguard.evidence.sockdiag) against real sockets in real network namespaces.

Each test runs a short program inside the namespace: the fast path starts the walk, and the look
at the port that bindguard's explanation makes (sockets.sockets_on_port) reads it, or asks for
itself when the walk is not the one it wants.
"""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from bindguard.evidence import sockdiag
from bindguard.model.facts import TCP_STATES

pytestmark = pytest.mark.integration

TIME_WAIT = {"proto": "tcp", "host": "127.0.0.1", "port": 8080, "reuseaddr": True, "mode": "timewait-server"}

PRELUDE = """
import json
from bindguard.evidence import sockdiag, sockets

def states(facts):
    return sorted(f"{f.local.port} {f.state}" for f in facts)

def pending():
    return None if sockdiag._walk is None else sockdiag._walk.port
"""


def run(netns, program: str) -> dict:
    result = netns.run([sys.executable, "-c", PRELUDE + textwrap.dedent(program)])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_every_state_of_the_port_is_read_from_the_early_walk_once(netns):
    netns.hold(TIME_WAIT)
    answer = run(netns, """
        sockdiag.start_walk(8080)
        started = pending()
        first = states(sockets.sockets_on_port("tcp", 8080))
        after = pending()
        again = states(sockets.sockets_on_port("tcp", 8080))
        print(json.dumps({"started": started, "first": first, "after": after, "again": again}))
    """)
    assert answer == {"started": 8080, "first": ["8080 TIME_WAIT"], "after": None, "again": ["8080 TIME_WAIT"]}


def test_no_early_walk_where_a_listener_holds_the_port(netns):
    netns.hold({"proto": "tcp", "host": "::", "port": 8080, "v6only": False})
    answer = run(netns, """
        sockdiag.start_walk(8080)
        print(json.dumps({"started": pending()}))
    """)
    assert answer == {"started": None}


def test_a_look_at_another_port_or_fewer_states_leaves_the_early_walk_alone(netns):
    netns.hold(TIME_WAIT)
    netns.hold({"proto": "tcp", "host": "127.0.0.1", "port": 8081, "mode": "outgoing"})
    answer = run(netns, """
        sockdiag.start_walk(8080)
        other = states(sockets.sockets_on_port("tcp", 8081))
        fewer = states(sockets.sockets_on_port("tcp", 8080, states=["LISTEN", "TIME_WAIT"]))
        udp = states(sockets.sockets_on_port("udp", 8080))
        left = pending()
        walked = states(sockets.sockets_on_port("tcp", 8080))
        print(json.dumps({"other": other, "fewer": fewer, "udp": udp, "left": left, "walked": walked,
                          "after": pending()}))
    """)
    assert answer == {"other": ["8081 ESTABLISHED"], "fewer": ["8080 TIME_WAIT"], "udp": [], "left": 8080,
                      "walked": ["8080 TIME_WAIT"], "after": None}


def test_a_walk_whose_request_fails_hands_its_error_to_the_reader(netns):
    """The thread's sendto() fails (here on a socket closed before it): the reader meets the error
    where it would have met its own, and falls back as it would, to /proc/net with its note."""
    netns.hold(TIME_WAIT)
    answer = run(netns, """
        opened = sockdiag.open_socket
        sockets_opened = []
        def second_closed():  # the look at listeners gets a working socket, the walk a closed one
            nl = opened()
            sockets_opened.append(nl)
            if len(sockets_opened) == 2:
                nl.close()
            return nl
        sockdiag.open_socket = second_closed
        sockdiag.start_walk(8080)
        started = pending()
        notes = []
        facts = states(sockets.sockets_on_port("tcp", 8080, notes))
        print(json.dumps({"started": started, "facts": facts, "notes": notes, "after": pending()}))
    """)
    assert answer["started"] == 8080 and answer["after"] is None
    assert answer["facts"] == ["8080 TIME_WAIT"]
    assert len(answer["notes"]) == 1 and "sock_diag is unavailable (EBADF" in answer["notes"][0]


def test_a_kernel_without_the_old_request_starts_no_walk_and_is_asked_per_family(netns):
    netns.hold(TIME_WAIT)
    answer = run(netns, """
        import struct
        both = sockdiag.request_both_families
        def unknown(port, states, seq):  # a request type the kernel does not know: EINVAL
            message = both(port, states, seq)
            return message[:4] + struct.pack("=H", 99) + message[6:]
        sockdiag.request_both_families = unknown
        sockdiag.start_walk(8080)
        started = pending()
        notes = []
        facts = states(sockets.sockets_on_port("tcp", 8080, notes))
        print(json.dumps({"started": started, "facts": facts, "notes": notes}))
    """)
    assert answer == {"started": None, "facts": ["8080 TIME_WAIT"], "notes": []}


def test_every_tcp_state_is_the_kernels_thirteen():
    assert sum(1 << state for state in TCP_STATES) == sockdiag.ALL_TCP_STATES


def test_bytecode_is_what_the_kernel_accepts():
    """The filter program: S_GE then S_LE on the port, jumps landing on the end or 4 past it."""
    program = sockdiag._bytecode_port_equals(8080)
    assert len(program) == 16
    assert program[:4] == bytes([sockdiag.INET_DIAG_BC_S_GE, 8]) + (20).to_bytes(2, sys.byteorder)
    assert int.from_bytes(program[6:8], sys.byteorder) == 8080
    assert program[8:12] == bytes([sockdiag.INET_DIAG_BC_S_LE, 8]) + (12).to_bytes(2, sys.byteorder)
