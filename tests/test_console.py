"""The console (report/output.py) and the journal's native protocol (report/journal.py), with the
CLI run in-process: bindguard.cli.main(argv, console=...) writes to a StringIO and, as under
systemd, to a journal socket the test binds itself. The real journald: tests/test_journal.py."""

from __future__ import annotations

import io
import os
import socket
import subprocess
from contextlib import redirect_stdout

import pytest

from bindguard.cli import main
from bindguard.report import journal
from bindguard.report.output import ERR, INFO, NOTICE, WARNING, Console


def cli(*argv: str, console: Console | None = None) -> tuple[int, str, str]:
    """Run the command line in this process: its exit code, stdout and what the console got."""
    console = console or Console(io.StringIO(), environ={})
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(list(argv), console=console)
    return code, out.getvalue(), console.stream.getvalue()


def journal_stream_run(argv: list[str], env: dict, names_it: bool = True) -> tuple[int, str]:
    """Run argv with stderr on a pipe that $JOURNAL_STREAM names (as systemd names the stream it
    connects to the journal), or, names_it=False, a variable inherited from a parent whose stderr
    was the journal's: its exit code and its stderr. (No journald socket is made: the host has
    none in a test, or one the test must not write to; report() then writes prefixed lines.)"""
    read_end, write_end = os.pipe()
    stream = os.fstat(write_end) if names_it else os.stat(os.devnull)
    try:
        proc = subprocess.Popen(argv, stderr=write_end, stdout=subprocess.DEVNULL,
                                env={**env, "JOURNAL_STREAM": f"{stream.st_dev}:{stream.st_ino}"})
    finally:
        os.close(write_end)
    with os.fdopen(read_end) as err:
        text = err.read()
    return proc.wait(timeout=60), text


def parse(datagram: bytes) -> list[tuple[str, bytes]]:
    """The native protocol read back: FIELD=value lines, and FIELD\\n<64-bit length>value\\n."""
    fields, rest = [], datagram
    while rest:
        line, newline, after = rest.partition(b"\n")
        name, eq, value = line.partition(b"=")
        if eq:
            fields.append((name.decode(), value))
            rest = after
        else:
            size = int.from_bytes(after[:8], "little")
            fields.append((line.decode(), after[8 : 8 + size]))
            assert after[8 + size : 9 + size] == b"\n"
            rest = after[9 + size :]
    return fields


@pytest.fixture
def journal_socket(tmp_path):
    """A datagram socket where the journal's would be, and a console on the journal's stream."""
    path = str(tmp_path / "socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield sock, Console(io.StringIO(), environ={}, journal=True, journal_socket=path)
    sock.close()


def test_priority_prefixes_only_on_the_journal_s_stream():
    console = Console(io.StringIO(), environ={}, journal=True)
    console.emit(WARNING, ["a", "b\n<6>forged"])
    assert console.stream.getvalue() == "<4>a\n<4>b\\n<6>forged\n"
    plain = Console(io.StringIO(), environ={"JOURNAL_STREAM": "1:2"})  # a StringIO is no stream of systemd's
    plain.emit(WARNING, "a")
    assert (plain.journal, plain.color, plain.stream.getvalue()) == (False, False, "a\n")


def test_a_report_falls_back_to_prefixed_lines_without_the_journal_s_socket(tmp_path):
    console = Console(io.StringIO(), environ={}, journal=True, journal_socket=str(tmp_path / "none"))
    console.report([(ERR, ["bindguard: refusing"]), (NOTICE, ["  note: x"])], "refused", [("BINDGUARD_PORT", "80")])
    assert console.stream.getvalue() == "<3>bindguard: refusing\n<5>  note: x\n"


def test_a_report_is_one_structured_entry(journal_socket):
    sock, console = journal_socket
    console.report([(WARNING, ["bindguard: clear: x", "  [::]:80: latent"]), (INFO, ["  note: y"])], "cleared",
                   [("BINDGUARD_PORT", "80"), ("BINDGUARD_HOLDER_UNIT", "evil\nMESSAGE_ID=forged")])
    entry = parse(sock.recv(65536))
    assert console.stream.getvalue() == ""
    assert dict(entry)["MESSAGE"] == b"bindguard: clear: x\n  [::]:80: latent\n  note: y"
    assert dict(entry)["PRIORITY"] == b"4" and dict(entry)["SYSLOG_IDENTIFIER"] == b"bindguard"
    assert [v for k, v in entry if k == "MESSAGE_ID"] == [journal.MESSAGE_IDS["cleared"].encode()]
    assert dict(entry)["BINDGUARD_HOLDER_UNIT"] == b"evil\nMESSAGE_ID=forged"  # a value, length-prefixed


def test_untrusted_values_are_bounded_and_names_are_the_guard_s_own():
    entry = dict(parse(journal.encode(ERR, ["x" * 100_000], "refused", [("BINDGUARD_HOLDER_UNIT", "u" * 5000)])))
    assert len(entry["MESSAGE"]) == journal.MAX_MESSAGE and len(entry["BINDGUARD_HOLDER_UNIT"]) == journal.MAX_VALUE
    for name in ("lower", "_TRUSTED", "A\nB", "A=B", ""):
        with pytest.raises(ValueError):
            journal.encode(ERR, ["x"], "refused", [(name, "v")])


@pytest.mark.integration
def test_a_refused_start_names_its_holder_in_the_journal(journal_socket):
    sock, console = journal_socket
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        code, out, err = cli("check", "--no-systemd", "--wait", "0", f"127.0.0.1:{port}", console=console)
    assert (code, out, err) == (98, "", "")
    entry = parse(sock.recv(65536))
    fields = dict(entry)
    assert fields["MESSAGE_ID"] == journal.MESSAGE_IDS["refused"].encode() and fields["PRIORITY"] == b"3"
    assert fields["MESSAGE"].startswith(f"bindguard: refusing to start: 127.0.0.1:{port} in use (exit 98)\n".encode())
    assert (fields["BINDGUARD_ADDRESS"], fields["BINDGUARD_PORT"]) == (f"127.0.0.1:{port}".encode(), str(port).encode())
    assert fields["BINDGUARD_KIND"] == b"listener"
    assert fields["BINDGUARD_HOLDER_PID"] == fields["OBJECT_PID"] == str(os.getpid()).encode()


@pytest.mark.integration
def test_the_clear_fast_path_records_its_addresses(journal_socket):
    sock, console = journal_socket
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    code, _, err = cli("check", "--no-systemd", f"127.0.0.1:{port}", f"udp:127.0.0.1:{port}", console=console)
    assert (code, err) == (0, "")
    entry = parse(sock.recv(65536))
    assert dict(entry)["MESSAGE_ID"] == journal.MESSAGE_IDS["cleared"].encode()
    assert [v for k, v in entry if k == "BINDGUARD_ADDRESS"] == [f"127.0.0.1:{port}".encode(),
                                                                 f"udp:127.0.0.1:{port}".encode()]
    assert [v for k, v in entry if k == "BINDGUARD_PORT"] == [str(port).encode()] * 2


def test_a_conflict_the_start_survives_is_a_warning_in_a_clear_entry(journal_socket):
    """Recorded evidence: a clear start with a latent socket unit on its port (the real one:
    tests/test_systemd_guard.py::test_4_latent_socket_unit_warns_without_blocking)."""
    from bindguard.action.guard import Outcome
    from bindguard.model.endpoints import Bind, SocketOptions, parse_listen
    from bindguard.model.facts import Evidence, ProbeResult
    from bindguard.report import outcome as report
    from bindguard.verdict.conflicts import Conflict

    bind = Bind(parse_listen("127.0.0.1:18080"), SocketOptions())
    latent = Conflict(bind, "latent-socket-unit", blocking=False, predicted=True, socket_unit="later.socket",
                      unit="later.socket")
    outcome = Outcome(exit_code=0, conflicts=(latent,), results=(ProbeResult(bind),), evidence=Evidence())
    on_stderr = Console(io.StringIO(), environ={}, journal=True, journal_socket="/nonexistent/socket")
    report.write_human(on_stderr, outcome)
    lines = on_stderr.stream.getvalue().splitlines()
    assert lines[0] == "<6>bindguard: clear: 127.0.0.1:18080 can be bound"
    assert lines[1].startswith("<4>  127.0.0.1:18080: prediction: latent-socket-unit: ") and len(lines) == 3, lines
    sock, console = journal_socket
    report.write_human(console, outcome)
    entry = dict(parse(sock.recv(65536)))
    assert entry["MESSAGE_ID"] == journal.MESSAGE_IDS["cleared"].encode() and entry["PRIORITY"] == b"4"
    assert (entry["BINDGUARD_KIND"], entry["BINDGUARD_HOLDER_UNIT"]) == (b"latent-socket-unit", b"later.socket")
    assert "OBJECT_PID" not in entry


def test_a_guard_failure_is_its_own_entry(journal_socket, monkeypatch):
    from bindguard.evidence import probe

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(probe, "trial", broken)
    monkeypatch.setattr(probe, "probe", broken)
    sock, console = journal_socket
    assert cli("check", "--no-systemd", "127.0.0.1:9", console=console)[0] == 0  # fail-open
    entry = dict(parse(sock.recv(65536)))
    assert entry["MESSAGE_ID"] == journal.MESSAGE_IDS["guard-failed"].encode() and entry["PRIORITY"] == b"4"
    assert entry["MESSAGE"].startswith(b"bindguard: internal error: RuntimeError: simulated failure\n  letting")


@pytest.mark.parametrize("code, waited_for, outcome_id", [
    (0, (), "cleared"), (0, ("[::]:80 in TIME_WAIT",), "waited"), (75, ("[::]:80 in TIME_WAIT",), "refused"),
    (98, (), "refused")])
def test_each_outcome_has_its_message_id(code, waited_for, outcome_id):
    from bindguard.action.guard import Outcome
    from bindguard.model.endpoints import Bind, SocketOptions, parse_listen
    from bindguard.model.facts import Evidence, ProbeResult
    from bindguard.report import outcome as report

    bind = Bind(parse_listen("[::]:80"), SocketOptions())
    outcome = Outcome(code, (), (ProbeResult(bind, error=0 if code == 0 else 98),), Evidence(), waited_for=waited_for)
    assert report.journal_outcome(outcome) == outcome_id
    assert ("BINDGUARD_PORT", "80") in report.journal_fields(outcome)
