"""The command line: exit codes, bad input, output channels. No traceback, ever."""

from __future__ import annotations

import io
import json
import os
import pty
import signal
import subprocess
import sys
import time

import pytest

from bindguard.report.output import Console
from test_console import cli as in_process
from test_console import journal_stream_run

BINDGUARD = [sys.executable, "-m", "bindguard"]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*BINDGUARD, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize(
    "args, says",
    [
        (["check", "0"], "'0': port 0 is out of range"),
        (["check", "70000"], "'70000': port 70000 is out of range"),
        (["check", "localhost:80"], "is not an IPv4 address"),
        (["check", "[::1]"], "[ADDRESS]:PORT"),
        (["check", "--bogus", "80"], "unrecognized arguments: --bogus"),
        (["check"], "no address to check"),
        (["check", "--wait", "-1", "80"], "--wait -1.0: must be 0 or more"),
        (["check", "--wait", "soon", "80"], "invalid float value: 'soon'"),
        (["check", "--v6only", "[::ffff:127.0.0.1]:80"], "v4-mapped address cannot be bound on a v6only socket"),
        (["check", "--daemon-user", "no-such-user-here", "80"], "no such user"),
        (["check", "udp:/run/x.sock"], "not an IP address"),
        (["check", "²"], "'²': port '²' is not a number"),  # str.isdigit() takes it, int() raises
        (["check", "127.0.0.1:²"], "'127.0.0.1:²': port '²' is not a number"),
        (["check", "٨٠"], "'٨٠': port '٨٠' is not a number"),  # int() reads these as 80
        (["check", "[::1]:８０"], "'[::1]:８０': port '８０' is not a number"),
        (["check", "udp:127.0.0.1:٨٠"], "port '٨٠' is not a number"),
        (["check", "9" * 4301], "(4301 digits) is out of range"),  # past int()'s 4,300-digit limit
        (["check", "--daemon-user", "²", "80"], "--daemon-user '²': no such user"),
        (["check", "--daemon-user", "", "80"], "--daemon-user '': not a user name, nor a uid from 0 to 4294967294"),
        (["check", "--daemon-user", "4294967295", "80"], "nor a uid from 0 to 4294967294"),
        (["check", "--daemon-user", "9" * 4301, "80"], "nor a uid from 0 to 4294967294"),
        (["verify", "--unit", "web.service", "--timeout", "inf", "80"], "--timeout inf: must be 0 or more seconds, and finite"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "usage: bindguard"),
    ],
)
def test_bad_input_is_one_clear_message_and_exit_64(args, says):
    code, out, err = in_process(*args)  # the CLI in this process, its console on a StringIO
    assert code == 64, err
    assert says in err
    assert "Traceback" not in err
    assert out == ""


def test_bad_input_from_the_real_command():
    proc = run("check", "--wait", "soon", "80")
    assert (proc.returncode, proc.stdout) == (64, "") and "invalid float value: 'soon'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_teaches_syntax_and_exit_codes():
    proc = run("check", "--help")
    assert proc.returncode == 0
    for text in ("ListenStream=", "udp:[::1]:53", "--reuseport", "--wait", "98", "99", "75", "ExecStartPre=+"):
        assert text in proc.stdout


def on_the_journal_stream(*args: str, names_it: bool = True) -> tuple[int, str]:
    return journal_stream_run([*BINDGUARD, *args], dict(os.environ), names_it)


def test_errors_carry_journal_priority_on_the_journal_s_stream():
    code, err = on_the_journal_stream("check", "70000")
    assert code == 64 and err.startswith("<3>bindguard: error: ") and "\n<3>  hint: " in err, err


@pytest.mark.parametrize("journal_stream", [None, "0:0", "x:y", "9" * 4301 + ":1"])
def test_a_log_file_or_pipe_gets_plain_lines(journal_stream):
    # CI, Ansible or `2>log` is not the journal, whether or not JOURNAL_STREAM came along
    env = {"JOURNAL_STREAM": journal_stream} if journal_stream else {}
    proc = run("check", "70000", env={**env, "NO_COLOR": ""})
    assert proc.returncode == 64
    assert proc.stderr.startswith("bindguard: error: ") and "\n  hint: " in proc.stderr, proc.stderr
    assert on_the_journal_stream("check", "70000", names_it=False)[1].startswith("bindguard: error: ")


def on_a_terminal(argv: list[str], env: dict | None = None) -> tuple[int, bytes]:
    """Run argv with a pty as its terminal: its exit code and all it wrote there."""
    pid, fd = pty.fork()
    if pid == 0:
        os.execvpe(argv[0], argv, env if env is not None else os.environ)
    out = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out


def test_plain_text_on_a_terminal():
    code, out = on_a_terminal([*BINDGUARD, "check", "70000"], env={**os.environ, "NO_COLOR": "1"})
    assert code == 64
    assert out.startswith(b"bindguard: error: ") and b"<3>" not in out and b"\x1b" not in out


def test_errors_in_colour_on_a_terminal_unless_no_color():
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"} | {"TERM": "xterm"}
    code, out = on_a_terminal([*BINDGUARD, "check", "70000"], env=env)
    assert code == 64 and out.startswith(b"\x1b[1;31mbindguard: error: ") and b"<3>" not in out, out


@pytest.mark.parametrize("env", [{"SYSTEMD_LOG_LEVEL": "²"}, {"SYSTEMD_LOG_LEVEL": "9" * 4301},
                                 {"MANAGERPID": "²"}, {"MANAGERPID": "9" * 4301}])
def test_odd_digits_in_the_environment_are_not_numbers(env):
    proc = run("check", "--no-systemd", "--unit", "cron.service", "70000", env=env)
    assert proc.returncode == 64 and "port 70000 is out of range" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr


def test_systemd_log_level_hides_info():
    proc = run("check", "70000", env={"SYSTEMD_LOG_LEVEL": "emerg"})
    assert proc.returncode == 64 and proc.stderr == ""
    console = Console(io.StringIO(), environ={"SYSTEMD_LOG_LEVEL": "emerg"})
    assert in_process("check", "70000", console=console) == (64, "", "")


@pytest.mark.integration
def test_clear_path_json_schema(netns):
    proc = netns.run([*BINDGUARD, "check", "--json", "8080", "udp:127.0.0.1:8080"])
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report) >= {"clear", "verdict", "exit_code", "waited_s", "waited_for", "addresses", "conflicts", "notes"}
    assert report["clear"] is True and report["verdict"] == "clear" and report["conflicts"] == []
    assert [a["address"] for a in report["addresses"]] == ["[::]:8080", "udp:127.0.0.1:8080"]
    assert proc.stderr == "bindguard: clear: [::]:8080, udp:127.0.0.1:8080 can be bound\n"


@pytest.mark.integration
def test_refusal_report_names_holder_and_fix(netns):
    holder = netns.hold({"proto": "tcp", "host": "0.0.0.0", "port": 8080, "reuseaddr": True})
    proc = netns.run([*BINDGUARD, "check", "--wait", "0", "8080"])
    assert proc.returncode == 98
    lines = proc.stderr.splitlines()
    assert lines[0] == "bindguard: refusing to start: [::]:8080 in use (exit 98)"
    assert f"\n  [::]:8080: listener: 0.0.0.0:8080 LISTEN, PID {holder.pid} (" in proc.stderr
    assert "\n    fix: " in proc.stderr and "already serves this address" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.integration
def test_explain_shows_everything_on_the_port(netns):
    netns.hold({"proto": "tcp", "host": "127.0.0.1", "port": 8080, "reuseaddr": True},
               {"proto": "udp", "host": "::", "port": 8080})
    proc = netns.run([*BINDGUARD, "explain", "127.0.0.2:8080"])
    assert proc.returncode == 0, proc.stderr
    assert "127.0.0.1:8080 LISTEN: PID" in proc.stdout  # the report is explain's output: stdout
    proc = netns.run([*BINDGUARD, "explain", "0.0.0.0:8080", "udp:0.0.0.0:8080"])
    assert proc.returncode == 98 and proc.stderr == ""
    assert proc.stdout.startswith("bindguard: a start now would be refused: 0.0.0.0:8080, udp:0.0.0.0:8080 in use")
    assert "listener" in proc.stdout and "udp:0.0.0.0:8080: bound" in proc.stdout
    assert "already receives on this UDP port" in proc.stdout


def with_sitecustomize(tmp_path, source: str) -> dict[str, str]:
    """This environment, with a sitecustomize.py of `source` in tmp_path that Python loads first."""
    (tmp_path / "sitecustomize.py").write_text(source)
    return {**os.environ, "PYTHONPATH": f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}"}


def broken_probe(netns, tmp_path, message: str) -> dict[str, str]:
    """The environment of a guard whose full path's probe raises RuntimeError(message), with port
    8080 held in netns so that the fast path hands over to it."""
    netns.hold({"proto": "tcp", "host": "0.0.0.0", "port": 8080, "reuseaddr": True})
    return with_sitecustomize(tmp_path, "import bindguard.evidence.probe as p\n"
                                        "def broken(*a, **k):\n"
                                        f"    raise RuntimeError({message!r})\n"
                                        "p.probe = broken\n")


@pytest.mark.integration
def test_guard_failure_fails_open_or_closed(netns, tmp_path):
    # A guard that breaks before the kernel answered (here: the full path's probe raises) must not
    # block the start unless --fail-closed is given. (Once the kernel refused, a fault explaining
    # it keeps the refusal: tests/test_unexplained.py.)
    env = broken_probe(netns, tmp_path, "simulated failure")
    proc = netns.run([*BINDGUARD, "check", "--wait", "0", "8080"], env=env)
    assert proc.returncode == 0 and "internal error" in proc.stderr and "fail-open" in proc.stderr
    proc = netns.run([*BINDGUARD, "check", "--fail-closed", "--wait", "0", "8080"], env=env)
    assert proc.returncode == 70 and "Traceback" not in proc.stderr


@pytest.mark.integration
def test_debug_adds_a_traceback_and_still_fails_open(netns, tmp_path):
    # --debug (on the ExecStartPre= line root wrote) shows where the guard failed, one escaped line
    # at a time, and changes nothing else: the start goes on. The unit's environment cannot ask.
    env = broken_probe(netns, tmp_path, "simulated\nforged")
    proc = netns.run([*BINDGUARD, "--debug", "check", "--wait", "0", "8080"], env=env)
    assert proc.returncode == 0 and "fail-open" in proc.stderr, proc.stderr
    assert "Traceback (most recent call last):" in proc.stderr and "RuntimeError: simulated\\nforged" in proc.stderr
    assert "\nforged" not in proc.stderr, proc.stderr
    proc = netns.run([*BINDGUARD, "check", "--wait", "0", "8080"], env={**env, "BINDGUARD_DEBUG": "1"})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr


def test_a_closed_stdout_ends_the_command_quietly():
    # `bindguard ... | head`: the reader goes away; like other tools, no complaint about it. stdout
    # is buffered, as bin/bindguard's `python3 -I` has it whatever the caller's environment: with
    # PYTHONUNBUFFERED=1, a later Python's argparse (3.11.7's, not Debian's 3.11.2) swallows the
    # EPIPE of writing the help itself, and the command exits 0.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([*BINDGUARD, "check", "--help"], stdout=write_end, stderr=subprocess.PIPE, text=True,
                              timeout=60, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)})
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (141, "")


def _catches(pid: int, signum: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        caught = next(line.split()[1] for line in f if line.startswith("SigCgt:"))
    return bool(int(caught, 16) & (1 << (signum - 1)))


@pytest.mark.integration
@pytest.mark.parametrize("signum, says", [
    (signal.SIGTERM, "bindguard: stopped by SIGTERM before it finished (exit 143)\n"),
    (signal.SIGHUP, "bindguard: stopped by SIGHUP before it finished (exit 129)\n"),
    (signal.SIGINT, "bindguard: interrupted (SIGINT) before it finished (exit 130)\n"),
])
def test_a_signal_ends_the_command_with_a_line_saying_so(netns, signum, says):
    # verify polls for a listener that never comes: a command that is busy when the signal arrives
    proc = subprocess.Popen(netns.argv([*BINDGUARD, "verify", "--unit", "web.service", "--no-systemd", "--timeout", "60",
                                        "127.0.0.1:9"]), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not _catches(proc.pid, signal.SIGTERM) and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert (proc.returncode, err) == (128 + signum, says)


def _verify_with(netns, tmp_path, shim: str, timeout: str) -> subprocess.CompletedProcess:
    """verify waiting for a listener that never comes, with sitecustomize `shim` loaded first."""
    return netns.run([*BINDGUARD, "verify", "--unit", "web.service", "--no-systemd", "--timeout", timeout,
                      "127.0.0.1:9"], env=with_sitecustomize(tmp_path, shim), timeout=30)


@pytest.mark.integration
def test_a_sigint_in_code_run_from_a_string_exits_130(netns, tmp_path):
    # dataclasses and namedtuple build their methods with exec() of a string. A KeyboardInterrupt
    # raised in one marks CPython 3.11's interpreter, which under `python -m` then ended the process
    # by SIGINT (status -2) though the command had caught it and said "exit 130". Here SIGINT lands
    # in such code each time, where a busy machine had it land now and then.
    shim = ("import bindguard.action.verify as v\n"
            "real = v._observe\n"
            "def observe(*a, **k):\n"
            "    exec('import os, signal, time\\nos.kill(os.getpid(), signal.SIGINT)\\ntime.sleep(20)')\n"
            "    return real(*a, **k)\n"
            "v._observe = observe\n")
    proc = _verify_with(netns, tmp_path, shim, "60")
    assert (proc.returncode, proc.stderr) == (130, "bindguard: interrupted (SIGINT) before it finished (exit 130)\n")


# verify's first look at the ports drops an object whose weakref callback sends the guard `signum`
# and sleeps: the handler's exception is raised in the callback, which Python reports as "Exception
# ignored in" and goes on, as in importlib's module-lock callback. The callback writes the time
# of sending to `sent`, then the exception that left it.
SWALLOWED = """
import os, time, weakref
import bindguard.action.verify as v
real, done = v._observe, []
class Dropped:
    pass
def swallowing(ref):
    with open({sent!r}, "w") as f:
        f.write(repr(time.monotonic()))
        f.flush()
        try:
            os.kill(os.getpid(), {signum})
            time.sleep(20)
        except BaseException as exc:
            f.write(" " + type(exc).__name__)
            raise
def observe(*a, **k):
    if not done:
        done.append(True)
        dropped = Dropped()
        ref = weakref.ref(dropped, swallowing)
        del dropped
    return real(*a, **k)
v._observe = observe
"""


@pytest.mark.integration
@pytest.mark.parametrize("timeout", ["60", "0"])
@pytest.mark.parametrize("signum, says", [
    (signal.SIGTERM, "bindguard: stopped by SIGTERM before it finished (exit 143)\n"),
    (signal.SIGINT, "bindguard: interrupted (SIGINT) before it finished (exit 130)\n"),
])
def test_a_stop_python_swallowed_still_ends_the_command(netns, tmp_path, timeout, signum, says):
    sent = tmp_path / "sent"
    proc = _verify_with(netns, tmp_path, SWALLOWED.format(sent=str(sent), signum=int(signum)), timeout)
    ended = time.monotonic()
    when, raised = sent.read_text().split()
    assert raised == "Stopped"  # raised in the callback, where Python swallows it
    assert proc.returncode == 128 + signum
    if timeout == "60":  # verify's waiting loop raises it again: the one line, no "Exception ignored"
        assert proc.stderr == says
    else:  # verify ends, its report said, before anything looks again: main tells the stop after it
        assert "does not serve 127.0.0.1:9 as intended (exit 1)" in proc.stderr and proc.stderr.endswith(says)
        assert "Exception ignored" not in proc.stderr
    assert ended - float(when) < 2.0
