"""The fast path gives the full command's answer, or none: never a different one.

Every test's guards here run with a /run/bindguard of their own (netns is netns_own_run): what
they remember starts empty, and is neither the host's nor another test's."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import bytecode_compiled, remembered, user_units

COMPARE = r"""
import contextlib, io, json, sys
from bindguard import cli
from bindguard.cli import fastpath
from bindguard.report.output import Console

def run(args, fast):
    console = Console(io.StringIO())
    real, read = fastpath.check, fastpath.arguments
    with contextlib.redirect_stdout(io.StringIO()):
        if fast:  # as cli.main asks it: the command line read once, the fast path's answer on that reading
            reading = read(args)
            code = real(reading, console) if reading is not None else None
        else:  # argparse's reading, the authority on syntax
            fastpath.check, fastpath.arguments = (lambda a, c: None), (lambda a: None)
            try:
                code = cli.main(["check", *args], console=console)
            finally:
                fastpath.check, fastpath.arguments = real, read
    return code, console.stream.getvalue()

out = []
for args in json.loads(sys.argv[1]):
    out.append([args, run(args, True), run(args, False)])
print(json.dumps(out))
"""


@pytest.fixture
def netns(netns_own_run):
    return netns_own_run


ANSWERED = [  # the fast path must answer these itself
    ["8080"],
    ["udp:8080"],
    ["0.0.0.0:8080"],
    ["127.0.0.1:8080", "udp:[::1]:8080"],
    ["[::1]:8080"],
    ["[::ffff:127.0.0.1]:8080"],
    ["--v6only", "[::]:8080", "0.0.0.0:8080"],
    ["--no-reuseaddr", "--reuseport", "--freebind", "127.0.0.1:8080"],
    ["--wait", "3", "TCP:8080"],
    ["--wait=0", "--no-systemd", "--unit", "cron", "8080"],
    ["--unit", "cron.service"],
    ["--unit=systemd-journald.service", "--user"],
]
# Inside a unit the fast path reads the unit files, the full command asks D-Bus as well (and
# says so when there is no bus): the same verdict, not the same words.
ANSWERED_IN_UNIT = [
    ["--unit", "web.service", "8080"],
]
DEFERRED = [  # these go to the full command, which knows better
    ["[::]:8080", "0.0.0.0:8080"],  # collides with itself
    ["127.000.0.1:8080"],
    ["0"],
    ["70000"],
    ["[2001:db8::1]:8080"],
    ["--unit", "nginx.service"],  # discovery knows nginx, and nothing is remembered yet
    ["--json", "8080"],
    ["--wait", "-1", "8080"],
    ["--v6only", "[::ffff:127.0.0.1]:8080"],
    ["[fe80::1%lo]:8080"],
    ["--daemon-user", "nobody", "8080"],
    ["8080", "--bogus"],
    ["--unit", "a/b", "8080"],  # not a unit name: 64
    ["--unit", "-x", "8080"],  # argparse takes -x for an option: 64
    ["--unit", "foo@", "8080"],  # a template, never the unit a guard runs for
    ["8080", "--v6only", "9090"],  # argparse takes the addresses as one run: 64
    ["--user", "--system", "8080"],  # argparse refuses the pair: 64
]


@pytest.mark.integration
def test_fast_path_agrees_with_the_full_command(netns, tmp_path):
    netns.hold({"proto": "tcp", "host": "127.0.0.1", "port": 9000, "reuseaddr": True})
    proc = netns.run([sys.executable, "-c", COMPARE, json.dumps(ANSWERED + ANSWERED_IN_UNIT + DEFERRED)],
                     env={"BINDGUARD_CONFIG_PATH": str(tmp_path), "PATH": "/usr/bin:/bin",
                          "PYTHONPATH": ":".join(sys.path)})
    assert proc.returncode == 0, proc.stderr
    for args, (fast_code, fast_err), (full_code, full_err) in json.loads(proc.stdout):
        if args in ANSWERED_IN_UNIT:
            assert fast_code == full_code == 0, (args, fast_err, full_err)
            continue
        if args in ANSWERED:
            assert fast_code == 0, (args, fast_err, full_err)
        else:
            assert fast_code is None, (args, fast_err)
        if fast_code is not None:
            assert (fast_code, fast_err) == (full_code, full_err), args


IN_UNIT = r"""
import io, json, sys
from bindguard.cli import fastpath
from bindguard.report.output import Console
print(json.dumps([fastpath.check(fastpath.arguments(args), Console(io.StringIO()))
                  for args in json.loads(sys.argv[1])]))
"""


@pytest.mark.integration
def test_inside_a_unit_the_fast_path_reads_the_unit_files(netns, tmp_path):
    units, env = user_units(tmp_path, INVOCATION_ID="0" * 32)
    (units / "web.service").write_text("[Service]\nExecStart=/usr/bin/webd\n")
    (units / "loose.service").write_text("[Service]\nExecStart=/usr/bin/webd\nKillMode=process\n")
    (units / "later.socket").write_text("[Socket]\nListenStream=0.0.0.0:8081\n[Install]\nWantedBy=sockets.target\n")
    (units / "sockets.target.wants" / "later.socket").symlink_to(units / "later.socket")
    cases = [
        ["--user", "--unit", "web.service", "8080"],  # nothing else claims 8080: clear, no D-Bus
        ["--user", "--unit", "web.service", "8081"],  # an enabled socket unit declares 8081
        ["--user", "--unit", "loose.service", "8080"],  # KillMode=process is no reason to look closer
        ["--user", "8080"],  # the unit from /proc/self/cgroup: none here, so the full command
    ]
    proc = netns.run([sys.executable, "-c", IN_UNIT, json.dumps(cases)], env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [0, None, 0, None]


@pytest.mark.integration
def test_a_socket_unit_with_nothing_held_is_answered_from_its_unit_files(netns, tmp_path):
    """`check --unit NAME.socket` (the socket.d drop-in) reads the unit's own Listen entries and
    options from its files and answers a clear start itself, without D-Bus; its own enabled file
    is no socket unit that will claim its port. What it cannot read as the manager binds goes to
    the full command."""
    netns.hold({"proto": "tcp", "host": "127.0.0.1", "port": 9000, "reuseaddr": True})
    units, env = user_units(tmp_path)
    files = {
        "web.socket": "[Socket]\nListenStream=127.0.0.1:8080\nListenDatagram=[::1]:8080\nBindIPv6Only=ipv6-only\n"
                      "[Install]\nWantedBy=sockets.target\n",
        "local.socket": "[Socket]\nListenStream=/run/local.sock\n",
        "audit.socket": "[Socket]\nListenNetlink=audit 1\n",  # as systemd-journald-audit.socket
        "held.socket": "[Socket]\nListenStream=127.0.0.1:9000\n",
        "shared.socket": "[Socket]\nListenStream=8081\nReusePort=yes\n",
        "later.socket": "[Socket]\nListenStream=0.0.0.0:8082\n[Install]\nWantedBy=sockets.target\n",
        "clash.socket": "[Socket]\nListenStream=127.0.0.1:8082\n",
    }
    for name, text in files.items():
        (units / name).write_text(text)
    for name in ("web.socket", "later.socket"):
        (units / "sockets.target.wants" / name).symlink_to(units / name)
    cases = [
        ["--user", "--unit", "web.socket"],  # clear, and its own enabled file does not count
        ["--user", "--unit", "local.socket"],  # no IP socket: nothing to guard
        ["--user", "--unit", "audit.socket"],  # no Listen entry the guard reads: nothing to guard
        ["--user", "--unit", "gone.socket"],  # no unit file on disk: the full command asks the manager
        ["--user", "--unit", "held.socket"],  # refused: the full command explains
        ["--user", "--unit", "shared.socket"],  # ReusePort=: the uid matters, the full command
        ["--user", "--unit", "clash.socket"],  # an enabled socket unit declares 8082
        ["--user", "--v6only", "--unit", "web.socket"],  # an option over the unit's: the full command
    ]
    proc = netns.run([sys.executable, "-c", IN_UNIT, json.dumps(cases)], env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [0, 0, 0, None, None, None, None, None]
    proc = netns.run([sys.executable, "-c", COMPARE, json.dumps(cases[:3] + cases[4:5])], env=env)
    assert proc.returncode == 0, proc.stderr
    answers = [(fast[0], full[0]) for _, fast, full in json.loads(proc.stdout)]
    assert answers == [(0, 0), (0, 0), (0, 0), (None, 98)]



# What the common paths load, run as bin/bindguard runs Python (-I -S, the package put on sys.path).
LOADED = r"""
import sys
sys.path.insert(0, sys.argv.pop(1))
from bindguard.cli import main
code = main(sys.argv[1:])
print(code, " ".join(sorted(sys.modules)))
"""
NEVER_LOADED = {"os", "argparse", "dataclasses", "enum", "ipaddress", "inspect", "shlex", "pystemd", "yaml"}


@pytest.mark.integration
def test_the_common_paths_load_no_module_they_can_do_without(netns, tmp_path):
    """os alone is 0.8 ms of a 9 ms start (bindguard.environment): the clear path, the every-service
    path with nothing to guard and the one with a remembered discovery (Debian's nginx) load
    neither it nor anything only the full command needs; the first start after a change, which
    runs discovery, loads no dataclasses, argparse or D-Bus code."""
    from test_discover import need_package

    from bindguard.request import cache

    need_package("nginx", "/usr/sbin/nginx")
    bytecode_compiled()  # else a fresh tree's first discovery, writing __pycache__, is not remembered
    units, env = user_units(tmp_path)
    (units / "web.service").write_text("[Service]\nExecStart=/usr/bin/webd --port 8080\n")
    package = str(Path(cache.__file__).parent.parent.parent)
    packaged = {**env, "PYTHONPATH": package}
    first = netns.run([sys.executable, "-m", "bindguard", "check", "--unit", "nginx.service"], env=packaged)
    assert first.returncode == 0 and remembered(netns, "nginx.service", packaged), first.stderr
    for args in (["8080"], ["--user", "--unit", "web.service"], ["--unit", "nginx.service"]):
        proc = netns.run([sys.executable, "-I", "-S", "-c", LOADED, package, "check", *args], env=env)
        code, _, loaded = proc.stdout.strip().partition(" ")
        assert code == "0", (args, proc.stderr)
        assert not NEVER_LOADED & set(loaded.split()), (args, sorted(NEVER_LOADED & set(loaded.split())))
        if args == ["8080"]:  # from a shell, with no unit named: no unit file to read
            assert "bindguard.systemd" not in loaded.split(), loaded
    # The first start after a change: discovery runs (nginx -T), with its records as Records too.
    assert not remembered(netns, "nginx.service", packaged, forget=True)
    proc = netns.run([sys.executable, "-I", "-S", "-c", LOADED, package, "check", "--unit", "nginx.service"], env=env)
    code, _, loaded = proc.stdout.strip().partition(" ")
    assert code == "0" and remembered(netns, "nginx.service", packaged), proc.stderr
    unwanted = {"argparse", "dataclasses", "inspect", "pystemd", "yaml"}
    assert not unwanted & set(loaded.split()), sorted(unwanted & set(loaded.split()))


@pytest.mark.integration
def test_a_refusal_from_a_shell_loads_neither_argparse_nor_dataclasses_nor_the_bus(netns, tmp_path):
    """A refusal explains itself without argparse (fastpath.arguments reads the command line),
    without dataclasses (bindguard.model.record) and, with no bus to ask, without bindguard.systemd.bus
    and pystemd (systemd.busaddress finds no socket first)."""
    netns.hold({"proto": "tcp", "host": "127.0.0.1", "port": 9000, "reuseaddr": True})
    package = str(Path(__file__).resolve().parent.parent / "src")
    env = {"BINDGUARD_CONFIG_PATH": str(tmp_path / "none"), "PATH": "/usr/bin:/bin",
           "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={tmp_path}/no-bus"}
    proc = netns.run([sys.executable, "-I", "-S", "-c", LOADED, package, "check", "127.0.0.1:9000"], env=env)
    code, _, loaded = proc.stdout.strip().partition(" ")
    assert code == "98", proc.stderr
    unwanted = {"argparse", "dataclasses", "inspect", "pystemd", "yaml", "bindguard.systemd.bus"}
    assert not unwanted & set(loaded.split()), sorted(unwanted & set(loaded.split()))


WALKED = r"""
import json, sys
sys.path.insert(0, sys.argv.pop(1))
failing = sys.argv.pop(1) == "failing"
from bindguard.evidence import sockdiag
started, taken = [], []
real_start, real_take = sockdiag.start_walk, sockdiag.take_walk
def start_walk(port):
    if failing:
        raise ValueError("a bug of the early walk's")
    real_start(port)
    started.append([port, sockdiag._walk is not None])
def take_walk(port):
    walk = real_take(port)
    taken.append([port, walk is not None])
    return walk
sockdiag.start_walk, sockdiag.take_walk = start_walk, take_walk
from bindguard.cli import main
code = main(sys.argv[1:])
print(json.dumps([code, started, taken]))
"""


@pytest.mark.integration
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="no early walk on one CPU (tests/test_sockdiag.py)")
def test_a_refusal_reads_the_walk_of_the_kernel_the_fast_path_started(netns):
    """The fast path's trial refused on a port where nothing listens: the kernel walks its sockets
    while the full command starts (bindguard.evidence.sockdiag), and the explanation reads that
    walk. Where a listener holds the port no walk starts: listeners alone explain it. A walk that
    fails to start in a way nobody foresaw leaves the refusal as it is."""
    netns.hold({"proto": "tcp", "host": "127.0.0.1", "port": 8080, "reuseaddr": False, "mode": "timewait-server"})
    netns.hold({"proto": "tcp", "host": "127.0.0.1", "port": 9000, "reuseaddr": True})
    package = str(Path(__file__).resolve().parent.parent / "src")
    time_wait = ["--no-reuseaddr", "--wait", "0", "127.0.0.1:8080"]
    for how, args, code, started, taken in (
        ("working", time_wait, 75, [[8080, True]], [[8080, True]]),
        ("working", ["127.0.0.1:9000"], 98, [[9000, False]], []),
        ("failing", time_wait, 75, [], [[8080, False]]),
    ):
        proc = netns.run([sys.executable, "-I", "-S", "-c", WALKED, package, how, "check", *args])
        assert json.loads(proc.stdout) == [code, started, taken], proc.stderr
        if code == 75:
            assert "TIME_WAIT" in proc.stderr and "clears by itself" in proc.stderr, proc.stderr


READ = [  # command lines fastpath.arguments reads for the full command, as argparse does
    [], ["8080"], ["--unit", "web", "8080"], ["--unit=web.service"], ["--wait", "5", "8080", "--unit", "x"],
    ["--wait=inf", "--no-systemd", "--no-systemd", "udp:[::1]:53", "0.0.0.0:80"], ["8080", "9090", "--v6only"],
    ["--user", "--user", "8080"], ["--system"], ["--reuseaddr", "--no-reuseaddr", "--reuseport", "--freebind", "80"],
    ["--no-v6only", "--v6only", "[::]:80"], ["--unit=-x", "8080"], ["", "8080"], ["--wait", "1e1", "8080"],
]
NOT_READ = [  # left to argparse: what it refuses (the first four), what run() refuses, what the fast path does not read
    ["8080", "--v6only", "9090"], ["--user", "--system"], ["--unit"], ["--unit", "-x"], ["--wait", "-1", "8080"],
    ["--wait", "nan"], ["--wait", "x"], ["--json", "8080"], ["--fail-closed", "8080"], ["--", "8080"], ["-h"],
    ["--no-sys", "8080"], ["--v6only=yes", "8080"], ["--daemon-user", "nobody", "8080"], ["-", "8080"],
]


def test_the_fast_path_reads_the_full_commands_arguments_as_argparse_does():
    """The full command runs on fastpath.arguments' reading, without argparse: the same namespace
    argparse makes, or None for argparse to read (and refuse)."""
    from bindguard.cli import fastpath
    from bindguard.cli.parser import build_parser
    from bindguard.model.errors import UsageError

    for args in READ:
        parsed = vars(build_parser("check").parse_args(["check", *args]))
        assert fastpath.arguments(args) == {k: v for k, v in parsed.items() if k not in ("run", "fails_closed")}, args
    for args in NOT_READ:
        assert fastpath.arguments(args) is None, args
    for args in NOT_READ[:4]:
        with pytest.raises(UsageError):
            build_parser("check").parse_args(["check", *args])


def test_the_command_line_is_read_once_and_the_full_command_runs_on_that_reading(monkeypatch):
    """cli.main reads `check`'s arguments once (fastpath.arguments), hands that reading to the fast
    path, and when it has no answer runs the full command on the same reading, unchanged by it."""
    import io

    from bindguard import cli
    from bindguard.cli import fastpath
    from bindguard.report.output import Console

    args = ["--no-systemd", "--wait", "0", "70000"]  # read here, refused by the full command: no trial
    real, readings = fastpath.arguments, []

    def reading(args):
        readings.append(real(args))
        return readings[-1]

    from bindguard.cli.commands import check

    real_check, answers = fastpath.check, []
    real_run, ran_on = check.run, []

    def checked(read, console):
        answers.append(real_check(read, console))
        return answers[-1]

    def run(args, console):
        ran_on.append(args)
        return real_run(args, console)

    monkeypatch.setattr(fastpath, "arguments", reading)
    monkeypatch.setattr(fastpath, "check", checked)
    monkeypatch.setattr(check, "run", run)
    console = Console(io.StringIO())
    assert cli.main(["check", *args], console=console) == 64, console.stream.getvalue()
    assert "port 70000 is out of range" in console.stream.getvalue()
    assert readings == [real(args)] and readings[0] is not None
    assert answers == [None]  # the fast path handed over ...
    [full] = ran_on  # ... and the full command ran on that reading, not on argparse's
    assert full.listen is readings[0]["listen"] and {k: getattr(full, k) for k in readings[0]} == readings[0]
