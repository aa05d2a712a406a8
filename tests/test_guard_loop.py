"""The guard's wait/refuse loop on recorded evidence: the kernel's answers and the sockets on the
port are given as recorded sequences (guard.run's trial and look), so every branch of the loop
is run without root. The real trial bind and sock_diag are tested in namespaces beside this
(tests/test_wait.py, tests/test_guards_together.py, tests/test_cli.py)."""

from __future__ import annotations

import errno
import time

import pytest

from bindguard.action import guard
from bindguard.model import errors
from bindguard.model.endpoints import Bind, SocketOptions, parse_listen
from bindguard.model.facts import Evidence, ProbeResult, ProcessFact, SocketFact
from bindguard.model.kinds import ANY_KIND, ConflictKind
from bindguard.model.record import FrozenInstanceError, replace
from bindguard.verdict.policy import Rules

ADDRESS = Bind(parse_listen("127.0.0.1:8080"), SocketOptions())
OTHER = Bind(parse_listen("127.0.0.2:8080"), SocketOptions())


def process(pid: int, *cmdline: str) -> ProcessFact:
    return ProcessFact(pid, 1, cmdline[0].rsplit("/", 1)[-1], cmdline, cmdline[0], 0, "root", time.time() - 5,
                       "/system.slice/web.service", "web.service")


def time_wait(expires_ms: int) -> Evidence:
    return Evidence(sockets=[SocketFact(ADDRESS.endpoint, "TIME_WAIT", 0, 0, expires_ms=expires_ms)],
                    observed_at=time.monotonic())


def held_by(holder: ProcessFact, bind: Bind = ADDRESS) -> Evidence:
    return Evidence(sockets=[SocketFact(bind.endpoint, "LISTEN", 0, 77)], holders={77: holder},
                    observed_at=time.monotonic())


class Recorded:
    """The kernel's answers in turn (the last one repeats), and what a look at the port finds."""

    def __init__(self, answers: list[dict[Bind, int]], evidence):
        self.answers, self.evidence = answers, evidence
        self.probes = self.looks = 0

    def probe(self, binds: list[Bind], daemon_uid: int | None) -> list[ProbeResult]:
        answer = self.answers[min(self.probes, len(self.answers) - 1)]
        self.probes += 1
        return [ProbeResult(b, answer.get(b, 0), "bind" if answer.get(b) else "") for b in binds]

    def observe(self, binds: list[Bind], results: list[ProbeResult] | None) -> Evidence:
        self.looks += 1
        return self.evidence() if callable(self.evidence) else self.evidence


def run(recorded: Recorded, **request) -> guard.Outcome:
    request.setdefault("binds", [ADDRESS])
    return guard.run(guard.Request(**request), trial=recorded.probe, look=recorded.observe)


IN_USE = {ADDRESS: errno.EADDRINUSE}


def test_a_clear_port_is_one_probe_and_no_look():
    recorded = Recorded([{}], Evidence())
    outcome = run(recorded)
    assert outcome.exit_code == errors.ExitCode.CLEAR and (recorded.probes, recorded.looks) == (1, 0)
    assert outcome.conflicts == () and outcome.waited == 0.0


def test_time_wait_is_waited_out_until_the_kernel_lets_the_address_go():
    recorded = Recorded([IN_USE, IN_USE, {}], lambda: time_wait(200))
    outcome = run(recorded, wait=5)
    assert outcome.exit_code == errors.ExitCode.CLEAR, outcome
    assert recorded.probes == 3 and outcome.waited > 0
    assert outcome.waited_for == (f"{ConflictKind.TIME_WAIT} on {ADDRESS}",)


def test_time_wait_that_outlasts_the_budget_is_refused_without_waiting():
    recorded = Recorded([IN_USE], lambda: time_wait(60_000))
    outcome = run(recorded, wait=2)
    assert outcome.exit_code == errors.ExitCode.TEMPFAIL and recorded.probes == 1 and outcome.waited == 0.0
    assert [c.kind for c in outcome.conflicts] == [ConflictKind.TIME_WAIT]


def test_wait_zero_never_sleeps():
    recorded = Recorded([IN_USE, {}], lambda: time_wait(200))
    outcome = run(recorded, wait=0)
    assert outcome.exit_code == errors.ExitCode.TEMPFAIL and recorded.probes == 1


def test_a_listener_is_refused_at_once():
    recorded = Recorded([IN_USE], held_by(process(42, "/usr/sbin/nginx")))
    outcome = run(recorded)
    assert outcome.exit_code == errors.ExitCode.INUSE and recorded.probes == 1
    (conflict,) = outcome.conflicts
    assert (conflict.kind, conflict.process.pid) == (ConflictKind.LISTENER, 42)


def test_a_listener_on_an_address_the_daemon_starts_without_only_warns():
    recorded = Recorded([IN_USE], held_by(process(42, "/usr/sbin/nginx")))
    rules = Rules(warn_only={ADDRESS: ((ANY_KIND,), "the daemon starts without this socket")},
                  needs_one_of=frozenset({ADDRESS, OTHER}))
    outcome = run(recorded, binds=[ADDRESS, OTHER], rules=rules)
    assert outcome.exit_code == errors.ExitCode.CLEAR
    (conflict,) = outcome.conflicts
    assert conflict.evidence[-1] == "the daemon starts without this socket: a warning only"


def test_without_any_address_left_the_optional_one_refuses():
    evidence = Evidence(sockets=[SocketFact(b.endpoint, "LISTEN", 0, 70 + i) for i, b in enumerate((ADDRESS, OTHER))],
                        holders={70: process(42, "/usr/sbin/nginx"), 71: process(43, "/usr/sbin/nginx")})
    rules = Rules(warn_only={b: ((ANY_KIND,), "the daemon starts without this socket") for b in (ADDRESS, OTHER)},
                  needs_one_of=frozenset({ADDRESS, OTHER}))
    outcome = run(Recorded([{ADDRESS: errno.EADDRINUSE, OTHER: errno.EADDRINUSE}], evidence),
                  binds=[ADDRESS, OTHER], rules=rules)
    assert outcome.exit_code == errors.ExitCode.INUSE
    assert all(c.evidence[-1].endswith("none of its addresses can be bound") for c in outcome.conflicts)


def test_another_guard_s_trial_socket_is_probed_again_and_passes():
    other_guard = process(4242, "/usr/bin/bindguard", "check", "--unit", "web.service")
    recorded = Recorded([IN_USE, {}], held_by(other_guard))
    outcome = run(recorded)
    assert outcome.exit_code == errors.ExitCode.CLEAR and recorded.probes == 2
    assert any("PID 4242" in note.text and "probed again" in note.text for note in outcome.notes), outcome.notes


def test_a_holder_the_kernel_is_ending_is_probed_again_even_with_wait_zero():
    # Units started together: another guard found holding its trial socket, then seen exiting (it
    # has closed the socket and ended; its command line went with its memory, so it is no longer
    # known as a guard). Its sockets close with it: probed again, not waited for (none with --wait 0).
    exiting = replace(process(4242, "python3"), cmdline=(), exiting=True)
    recorded = Recorded([IN_USE, {}], held_by(exiting))
    outcome = run(recorded, wait=0)
    assert outcome.exit_code == errors.ExitCode.CLEAR and recorded.probes == 2, outcome


def test_a_time_wait_beside_a_holder_the_kernel_is_ending_is_decided_at_once():
    # The TIME_WAIT stays whatever the exiting holder does: with --wait 0 the answer comes at the
    # first probe, not after a second (the settle budget) of probing again for the exiting one.
    exiting = replace(process(4242, "python3"), cmdline=(), exiting=True)
    evidence = held_by(exiting)
    evidence.sockets.append(SocketFact(ADDRESS.endpoint, "TIME_WAIT", 0, 0, expires_ms=50_000))
    recorded = Recorded([IN_USE], evidence)
    outcome = run(recorded, wait=0)
    assert outcome.exit_code == errors.ExitCode.INUSE and recorded.probes == 1, outcome


def test_a_holder_that_stays_exiting_is_decided_after_the_settle_budget(monkeypatch):
    monkeypatch.setattr(guard, "SETTLE_BUDGET", 0.05)
    exiting = replace(process(42, "/usr/sbin/nginx"), exiting=True)  # stuck in its exit (D state)
    recorded = Recorded([IN_USE], held_by(exiting))
    outcome = run(recorded, wait=0)
    assert outcome.exit_code == errors.ExitCode.INUSE and recorded.probes > 2
    (conflict,) = outcome.conflicts
    assert "is exiting" in " ".join(conflict.evidence), conflict


def test_another_guard_that_holds_on_is_refused_with_how_long(monkeypatch):
    monkeypatch.setattr(guard, "SETTLE_BUDGET", 0.05)
    monkeypatch.setattr(guard, "GUARD_SETTLE_BUDGET", 0.2)
    recorded = Recorded([IN_USE], lambda: held_by(process(4242, "/usr/bin/bindguard", "check")))
    outcome = run(recorded)
    assert outcome.exit_code == errors.ExitCode.INUSE and recorded.probes > 2
    (conflict,) = outcome.conflicts
    assert conflict.kind == ConflictKind.GUARD_TRIAL and "through every probe again for" in conflict.evidence[-1], conflict


def test_a_guard_met_whose_process_a_later_look_misses_is_still_waited_for(monkeypatch):
    # The process list is read after the sockets: another guard's socket may be seen with no
    # process, once the guard has been met. Those looks still allow the guards' longer budget.
    monkeypatch.setattr(guard, "SETTLE_BUDGET", 0.05)
    monkeypatch.setattr(guard, "GUARD_SETTLE_BUDGET", 5.0)
    first = [held_by(process(4242, "/usr/bin/bindguard", "check"))]

    def look() -> Evidence:
        return first.pop() if first else Evidence(sockets=[SocketFact(ADDRESS.endpoint, "LISTEN", 0, 77)],
                                                  observed_at=time.monotonic())

    recorded = Recorded([IN_USE] * 8 + [{}], look)  # the guard's socket goes after ~0.3 s of pauses
    outcome = run(recorded)
    assert outcome.exit_code == errors.ExitCode.CLEAR and recorded.probes == 9, outcome


def test_one_look_serves_the_probes_of_a_second_while_the_answer_stays():
    recorded = Recorded([IN_USE, IN_USE, IN_USE, {}], time_wait(200))  # one recorded look, read once
    outcome = run(recorded, wait=5)
    assert outcome.exit_code == errors.ExitCode.CLEAR and recorded.probes == 4 and recorded.looks == 1


def test_the_loop_changes_none_of_what_it_was_given():
    evidence = held_by(process(4242, "/usr/bin/bindguard", "check"))
    before = replace(evidence, notes=list(evidence.notes))
    run(Recorded([IN_USE, {}], evidence))
    assert evidence == before


def test_a_decided_conflict_cannot_be_changed():
    outcome = run(Recorded([IN_USE], held_by(process(42, "/usr/sbin/nginx"))))
    with pytest.raises(FrozenInstanceError):
        outcome.conflicts[0].kind = ConflictKind.TIME_WAIT  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        outcome.exit_code = 0  # type: ignore[misc]
