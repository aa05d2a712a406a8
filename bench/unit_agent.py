"""Timing from inside a systemd unit: an agent that runs as a service of a real user manager.

`bindguard check` run by a unit (ExecStartPre=) sees INVOCATION_ID, MANAGERPID, the session bus
and its unit's cgroup, and makes its systemd checks over D-Bus. To time that path, UnitAgent starts
the rig of tests/rig.py (a real `systemd --user` in private namespaces), and in it the service
bench-agent.service, whose process is this file run with --agent. The agent enters the loaded
network namespace it is told to, and times whole processes there exactly as bench/run.py does
(posix_spawn, wait4, perf_counter_ns), with the unit's own environment and cgroup.

Protocol, one line each way over two FIFOs: `ns PATH` -> `ok` (`ns -`: back to the rig's own); `run JOB` -> `NS EXITCODE`;
`probe JOB` -> JSON {exit, sample} (the output, its first "limit" characters, default 800);
`rss JOB` -> peak RSS in KiB (GNU time); a JOB is JSON {"argv": [...], "env": {...}, "limit": N},
env added to the unit's own.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
TESTS = BENCH.parent / "tests"
UNIT = "bench-agent.service"
CLONE_NEWNET = 0x40000000
GNU_TIME = "/usr/bin/time"


class UnitAgent:
    """The runner's side: a rig with the agent service running in it."""

    def __init__(self) -> None:
        sys.path.insert(0, str(TESTS))
        from rig import SystemdRig

        self.rig = SystemdRig()
        try:
            self.dir = Path(tempfile.mkdtemp(prefix="bindguard-agent-", dir=self.rig.root))
            requests, answers = self.dir / "requests", self.dir / "answers"
            os.mkfifo(requests)
            os.mkfifo(answers)
            self.rig.write_unit(UNIT, (
                "[Service]\nType=simple\n"
                f"ExecStart={sys.executable} {Path(__file__).resolve()} --agent {requests} {answers}\n"
                f"StandardError=append:{self.dir / 'agent.log'}\n"))
            started = self.rig.systemctl("start", UNIT)
            if started.returncode != 0:
                raise RuntimeError(f"could not start {UNIT}: {started.stderr.strip()}")
            self.requests = _open_writer(requests, deadline=time.monotonic() + 30)
            self.answers = open(answers)
        except BaseException:
            self.rig.close()
            raise

    def add_unit(self, name: str, text: str) -> Path:
        """A unit in the rig's manager (daemon-reload is the caller's)."""
        return self.rig.write_unit(name, text, reload=False)

    def _ask(self, line: str) -> str:
        self.requests.write(line + "\n")
        self.requests.flush()
        answer = self.answers.readline()
        if not answer:
            log = (self.dir / "agent.log").read_text(errors="replace")[-800:]
            raise RuntimeError(f"the agent in {UNIT} stopped answering: {log}")
        return answer.strip()

    def enter(self, netns: str) -> None:
        """Time from now on in the network namespace at path netns ("-": the rig's own)."""
        if self._ask(f"ns {netns}") != "ok":
            raise RuntimeError(f"the agent could not enter {netns}")

    def timed_run(self, argv: list[str], env: dict[str, str]) -> tuple[int, int]:
        elapsed, code = self._ask("run " + json.dumps({"argv": argv, "env": env})).split()
        return int(elapsed), int(code)

    def probe(self, argv: list[str], env: dict[str, str], limit: int = 800) -> dict:
        return json.loads(self._ask("probe " + json.dumps({"argv": argv, "env": env, "limit": limit})))

    def peak_rss_kib(self, argv: list[str], env: dict[str, str], runs: int) -> int | None:
        return max(int(self._ask("rss " + json.dumps({"argv": argv, "env": env}))) for _ in range(runs)) or None

    def close(self) -> None:
        for stream in (getattr(self, "requests", None), getattr(self, "answers", None)):
            if stream is not None:
                stream.close()
        self.rig.close()


def _open_writer(path: Path, deadline: float):
    """Open a FIFO for writing, waiting for its reader but not forever (ENXIO until it comes)."""
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                raise RuntimeError(f"the agent did not open {path}") from exc
            time.sleep(0.02)
            continue
        os.set_blocking(fd, True)
        return os.fdopen(fd, "w")


# ---------------------------------------------------------------- the agent, inside the unit


def _unit_env(extra: dict[str, str]) -> dict[str, str]:
    """The unit's environment, less the rig's PYTHON* settings meant for its tests, plus extra."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}, **extra}


def _timed(argv: list[str], env: dict[str, str]) -> tuple[int, int]:
    actions = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)]
    start = time.perf_counter_ns()
    pid = os.posix_spawn(argv[0], argv, env, file_actions=actions)
    _, status, _ = os.wait4(pid, 0)
    return time.perf_counter_ns() - start, os.waitstatus_to_exitcode(status)


def _peak(argv: list[str], env: dict[str, str]) -> int:
    if not Path(GNU_TIME).exists():
        return 0
    with tempfile.NamedTemporaryFile("r") as out:
        subprocess.run([GNU_TIME, "-f", "%M", "-o", out.name, *argv], env=env, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return int(out.read().split()[-1])


def agent(requests: str, answers: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    with open(requests) as inbox, open(answers, "w") as outbox:
        for line in inbox:
            verb, _, arg = line.strip().partition(" ")
            if verb == "ns":
                fd = home if arg == "-" else os.open(arg, os.O_RDONLY)
                answer = "ok" if libc.setns(fd, CLONE_NEWNET) == 0 else f"error {ctypes.get_errno()}"
                if fd != home:
                    os.close(fd)
            elif verb in ("run", "probe", "rss"):
                job = json.loads(arg)
                argv, env = job["argv"], _unit_env(job["env"])
                if verb == "run":
                    answer = "%d %d" % _timed(argv, env)
                elif verb == "rss":
                    answer = str(_peak(argv, env))
                else:
                    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
                    output = (done.stdout + done.stderr).strip()[: job.get("limit", 800)]
                    answer = json.dumps({"exit": done.returncode, "sample": output})
            else:
                answer = f"error unknown request {verb!r}"
            outbox.write(answer + "\n")
            outbox.flush()


if __name__ == "__main__" and sys.argv[1:2] == ["--agent"]:
    agent(sys.argv[2], sys.argv[3])
