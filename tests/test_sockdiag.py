"""The early walk (bindguard.evidence.sockdiag) against real sockets in real network namespaces.

Each test runs a short program inside the namespace: the fast path starts the walk, and the look
at the port that bindguard's explanation makes (sockets.sockets_on_port with early_walk, as
guard._sockets_explaining asks it) reads it, or asks for itself when the walk is not the one it
wants.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import textwrap

import pytest

from bindguard.evidence import sockdiag
from bindguard.model.facts import TCP_STATES

pytestmark = pytest.mark.integration
# The early walk starts only where the process may run on two CPUs (test_no_early_walk_on_one_cpu).
needs_two_cpus = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="no early walk on one CPU")

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


@needs_two_cpus
def test_every_state_of_the_port_is_read_from_the_early_walk_once(netns):
    netns.hold(TIME_WAIT)
    answer = run(netns, """
        sockdiag.start_walk(8080)
        started = pending()
        first = states(sockets.sockets_on_port("tcp", 8080, early_walk=True))
        after = pending()
        again = states(sockets.sockets_on_port("tcp", 8080, early_walk=True))
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


@needs_two_cpus
def test_a_look_at_another_port_or_fewer_states_leaves_the_early_walk_alone(netns):
    netns.hold(TIME_WAIT)
    netns.hold({"proto": "tcp", "host": "127.0.0.1", "port": 8081, "mode": "outgoing"})
    answer = run(netns, """
        sockdiag.start_walk(8080)
        other = states(sockets.sockets_on_port("tcp", 8081, early_walk=True))
        fewer = states(sockets.sockets_on_port("tcp", 8080, states=["LISTEN", "TIME_WAIT"], early_walk=True))
        udp = states(sockets.sockets_on_port("udp", 8080, early_walk=True))
        left = pending()
        walked = states(sockets.sockets_on_port("tcp", 8080, early_walk=True))
        print(json.dumps({"other": other, "fewer": fewer, "udp": udp, "left": left, "walked": walked,
                          "after": pending()}))
    """)
    assert answer == {"other": ["8081 ESTABLISHED"], "fewer": ["8080 TIME_WAIT"], "udp": [], "left": 8080,
                      "walked": ["8080 TIME_WAIT"], "after": None}


@needs_two_cpus
def test_a_look_that_does_not_ask_for_the_walk_or_follows_a_listener_leaves_it(netns):
    """A look at every state reads the walk only when its caller asks (sockets_on_port's early_walk):
    the guard does after a look at LISTEN alone found no listener, as the walk's start did. A
    listener that came since, on an address of its own that does not explain the refusal, is
    then in the evidence, with the TIME_WAIT, from a look of the guard's own."""
    netns.hold(TIME_WAIT)
    answer = run(netns, """
        import socket
        from bindguard.action import guard
        from bindguard.model.endpoints import Bind, SocketOptions, parse_listen

        sockdiag.start_walk(8080)
        unasked = states(sockets.sockets_on_port("tcp", 8080))
        left = pending()
        newcomer = socket.create_server(("127.0.0.2", 8080))
        refused = [Bind(parse_listen("127.0.0.1:8080"), SocketOptions(reuseaddr=False))]
        explained = states(guard._sockets_explaining("tcp", 8080, refused, []))
        print(json.dumps({"unasked": unasked, "left": left, "explained": explained, "after": pending()}))
    """)
    assert answer == {"unasked": ["8080 TIME_WAIT"], "left": 8080, "explained": ["8080 LISTEN", "8080 TIME_WAIT"],
                      "after": 8080}


@needs_two_cpus
def test_a_walk_no_look_took_gives_way_to_a_new_one(netns):
    """Another run in the same process: a walk past its freshness that no look took is closed when
    the next refusal starts its own."""
    netns.hold(TIME_WAIT)
    answer = run(netns, """
        sockdiag.start_walk(8080)
        first = sockdiag._walk
        first.wait()
        again_at_once = sockdiag.start_walk(8080) or sockdiag._walk is first
        first.started -= sockdiag.FRESH + 0.01
        sockdiag.start_walk(8080)
        second = sockdiag._walk
        print(json.dumps({"kept while fresh": again_at_once, "first closed": first.socket.fileno() == -1,
                          "second": second is not first and second.port,
                          "read": states(sockets.sockets_on_port("tcp", 8080, early_walk=True))}))
    """)
    assert answer == {"kept while fresh": True, "first closed": True, "second": 8080, "read": ["8080 TIME_WAIT"]}


@needs_two_cpus
def test_a_walk_whose_request_fails_hands_its_error_to_the_reader(netns):
    """The thread's sendto() fails (here a request larger than the socket's send buffer: EMSGSIZE):
    the reader meets the error where it would have met its own, and asks per family as it would."""
    netns.hold(TIME_WAIT)
    answer = run(netns, """
        both = sockdiag.request_both_families
        def oversized(port, states, seq):  # the walk's request only, not the look at listeners
            message = both(port, states, seq)
            return message + bytes(1 << 20) if states == sockdiag.ALL_TCP_STATES else message
        sockdiag.request_both_families = oversized
        sockdiag.start_walk(8080)
        walk = sockdiag._walk
        notes = []
        facts = states(sockets.sockets_on_port("tcp", 8080, notes, early_walk=True))
        print(json.dumps({"started": walk.port, "error": walk._error.errno, "facts": facts, "notes": notes,
                          "closed": walk.socket.fileno() == -1}))
    """)
    assert answer == {"started": 8080, "error": errno.EMSGSIZE, "facts": ["8080 TIME_WAIT"], "notes": [],
                      "closed": True}


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
        facts = states(sockets.sockets_on_port("tcp", 8080, notes, early_walk=True))
        print(json.dumps({"started": started, "facts": facts, "notes": notes}))
    """)
    assert answer == {"started": None, "facts": ["8080 TIME_WAIT"], "notes": []}


@needs_two_cpus
def test_a_walk_past_its_freshness_is_closed_and_the_look_asks_again(netns):
    """A walk read later than FRESH after it began (a second pass of the guard's loop, another
    run in the same process) could show a TIME_WAIT with more time left than it has."""
    netns.hold(TIME_WAIT)
    answer = run(netns, """
        sockdiag.start_walk(8080)
        walk = sockdiag._walk
        walk.wait()
        walk.started -= sockdiag.FRESH + 0.01
        taken = sockdiag.take_walk(8080)
        facts = states(sockets.sockets_on_port("tcp", 8080, early_walk=True))
        print(json.dumps({"taken": taken is not None, "closed": walk.socket.fileno() == -1,
                          "left": pending(), "facts": facts}))
    """)
    assert answer == {"taken": False, "closed": True, "left": None, "facts": ["8080 TIME_WAIT"]}


def test_no_early_walk_on_one_cpu(netns):
    netns.hold(TIME_WAIT)
    result = netns.run(["taskset", "-c", "0", sys.executable, "-c", PRELUDE + textwrap.dedent("""
        sockdiag.start_walk(8080)
        print(json.dumps({"started": pending()}))
    """)])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"started": None}


@needs_two_cpus
def test_the_walk_goes_on_until_a_reply_of_32_kib_is_full(netns):
    """The walk's socket is the one the look at listeners read with a buffer of RECV_BUFFER bytes,
    which raised the kernel's size of its dump replies from a page: 200 TIME_WAITs on the port
    come back in the reply the thread's sendto() fills, where a new socket's holds 39."""
    answer = run(netns, """
        import socket, time
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 8080))
        listener.listen(256)
        pairs = [(socket.create_connection(("127.0.0.1", 8080)), listener.accept()[0]) for _ in range(200)]
        for _, accepted in pairs:  # the server closes first: its side stays in TIME_WAIT
            accepted.close()
        time.sleep(0.2)
        for client, _ in pairs:
            client.close()
        listener.close()

        def first_reply(nl):
            buffer = bytearray(sockdiag.RECV_BUFFER)
            size = nl.recv_into(buffer)
            count, offset = 0, 0
            while offset + sockdiag.NLMSGHDR.size <= size:
                length, kind, *_ = sockdiag.NLMSGHDR.unpack_from(buffer, offset)
                count += kind == sockdiag.TCPDIAG_GETSOCK
                offset += (length + 3) & ~3
            return count

        sockdiag.start_walk(8080)
        walk = sockdiag.take_walk(8080)
        walk.wait()
        early = first_reply(walk.socket)
        nl = sockdiag.open_socket()
        nl.sendto(sockdiag.request_both_families(8080, sockdiag.ALL_TCP_STATES, 1), (0, 0))
        print(json.dumps({"early": early, "new socket": first_reply(nl)}))
    """)
    assert answer["early"] == 200 and answer["new socket"] < 200, answer


def test_every_tcp_state_is_the_kernels_thirteen():
    assert sum(1 << state for state in TCP_STATES) == sockdiag.ALL_TCP_STATES


def test_bytecode_is_what_the_kernel_accepts():
    """The filter program: S_GE then S_LE on the port, jumps landing on the end or 4 past it."""
    program = sockdiag._bytecode_port_equals(8080)
    assert len(program) == 16
    assert program[:4] == bytes([sockdiag.INET_DIAG_BC_S_GE, 8]) + (20).to_bytes(2, sys.byteorder)
    assert int.from_bytes(program[6:8], sys.byteorder) == 8080
    assert program[8:12] == bytes([sockdiag.INET_DIAG_BC_S_LE, 8]) + (12).to_bytes(2, sys.byteorder)
