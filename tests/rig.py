"""A real `systemd --user` manager for tests, in its own mount and network namespaces.

The recipe (../shared/systemd-rig.md, summed up): as root, inside
`unshare --mount --net --propagation private`, put a tmpfs on /run/systemd with
/run/systemd/system in it (a user manager refuses to start without it) and one on /run/bindguard
(the guards' remembered discoveries stay the rig's: OWN_RUN_DIR), bring lo up, give
the manager a private HOME, XDG_RUNTIME_DIR and XDG_CONFIG_HOME, and let Debian's user unit
dbus.socket provide the session bus at $XDG_RUNTIME_DIR/bus. Never `systemd --system`.

Each rig gets its own cgroup (in every writable hierarchy systemd uses) before the manager
starts, so two rigs at once do not create the same /app.slice/NAME.service paths, and every
process the rig leaves behind can be found and ended by PID at teardown.

SystemdRig(journal=True) also runs a private systemd-journald in the rig's mount namespace: its
sockets at the standard paths under the rig's /run/systemd (so the manager connects its units'
stdout and stderr to it, and the native socket is at /run/systemd/journal/socket), its
configuration in /run/systemd/journald.conf.d (volatile storage; no kernel log, no forwarding),
and its files in the rig's directory, bind-mounted on /run/log (read them with journal()). Its
manager runs in a cgroup laid out as a real user manager's, NAME.slice/user@UID.service, so that
journald attributes entries as it does on a host: _SYSTEMD_USER_UNIT=web.service (and
_SYSTEMD_UNIT=user@UID.service), OBJECT_SYSTEMD_USER_UNIT for an OBJECT_PID in a user unit.
The host's journald is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import holder

from bindguard.request.cache import RUN_DIR

# Shell words that give a mount namespace a /run/bindguard of its own, where the guard remembers
# discoveries (bindguard.request.cache): what a test's guards write there never reaches the host's,
# which an installed bindguard uses, and nothing the host has there is seen. The mount point is made
# if the host has none yet (bench/ runs the rig outside pytest). Mode 0700, as the guard makes it:
# the cache takes no directory others may write (a tmpfs is 1777 by default).
OWN_RUN_DIR = f"mkdir -p -m 0700 {RUN_DIR} && mount -t tmpfs -o mode=0700 tmpfs {RUN_DIR}"

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
SERVE = TESTS / "serve.py"
# This checkout's launcher, as pip copied bin/bindguard beside the venv's python: `install --program`
# names it, so that a unit started under a drop-in install wrote runs this tree, not the package's
# /usr/bin/bindguard that install names by default.
TREE_PROGRAM = str(Path(sys.executable).parent / "bindguard")
SYSTEMD = "/usr/lib/systemd/systemd"
JOURNALD = "/usr/lib/systemd/systemd-journald"
JOURNALD_CONF = """[Journal]
Storage=volatile
ReadKMsg=no
ForwardToSyslog=no
ForwardToKMsg=no
ForwardToConsole=no
ForwardToWall=no
RateLimitIntervalSec=0
"""
CGROUP_ROOT = Path("/sys/fs/cgroup")
# Units of the distribution that have no business running in a test manager.
MASKED = ("systemd-tmpfiles-setup.service", "systemd-tmpfiles-clean.timer", "systemd-tmpfiles-clean.service")


class RigError(RuntimeError):
    pass


@dataclass
class UnitRun:
    """What `systemctl --user start|stop|restart UNIT` did, with the unit's state after it."""

    unit: str
    returncode: int  # systemctl's own exit code: 0 when the job succeeded
    output: str  # systemctl's stdout and stderr ("Job for ... failed")
    active_state: str
    result: str  # the unit's Result: success, exit-code, timeout, ...
    pre_status: list[int | None] = field(default_factory=list)  # each ExecStartPre= exit status, None if not run

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _cgroup_hierarchies() -> list[Path]:
    """The hierarchies a manager places units in: the unified one, and name=systemd on v1/hybrid."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return [CGROUP_ROOT]
    return [h for h in (CGROUP_ROOT / "systemd", CGROUP_ROOT / "unified") if (h / "cgroup.procs").exists()]


def _net_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def _parse_exec_status(value: str) -> list[int | None]:
    """Exit statuses from `systemctl show -p ExecStartPre`: `{ path=... ; code=exited ; status=98 }`."""
    statuses: list[int | None] = []
    for record in value.split("}"):
        if "path=" not in record:
            continue
        status = None
        for part in record.split(" ; "):
            key, _, val = part.strip().partition("=")
            if key == "status":
                status = int(val.split("/")[0]) if val.split("/")[0].isdigit() else None
            elif key == "code" and val in ("(null)", ""):
                status = None
        statuses.append(status)
    return statuses


class SystemdRig:
    """A running user manager; see the module doc. Use as the `systemd_rig` fixture."""

    def __init__(self, journal: bool = False) -> None:
        self.name = f"bindguard-rig-{uuid.uuid4().hex[:12]}"
        self.root = Path(tempfile.mkdtemp(prefix="bindguard-rig-"))
        self.home = self.root / "home"
        self.runtime_dir = self.home / "run"
        self.config_home = self.home / "config"
        self.unit_dir = self.config_home / "systemd" / "user"
        self.log_dir = self.root / "log"
        # bind-mounted on /run/log, where journald keeps its volatile files: journal/MACHINE-ID/*.journal
        self.journal_dir = self.root / "journal" if journal else None
        if self.journal_dir:
            self.journal_dir.mkdir()
        for d in (self.home, self.unit_dir, self.log_dir):
            d.mkdir(parents=True)
        self.runtime_dir.mkdir(mode=0o700)
        for unit in MASKED:
            (self.unit_dir / unit).symlink_to("/dev/null")
        pythonpath = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"),
            "LANG": "C.UTF-8",
            "HOME": str(self.home),
            "USER": "root",
            "XDG_RUNTIME_DIR": str(self.runtime_dir),
            "XDG_CONFIG_HOME": str(self.config_home),
            "DBUS_SESSION_BUS_ADDRESS": f"unix:path={self.runtime_dir}/bus",
            "PYTHONPATH": pythonpath,
            "PYTHONDONTWRITEBYTECODE": "1",
            "SYSTEMD_PAGER": "",
            "SYSTEMD_COLORS": "0",
        }
        self.cgroups: list[Path] = []
        self.processes: list[subprocess.Popen] = []
        self.manager: subprocess.Popen | None = None
        self.net_ns: str | None = None
        try:
            self._make_cgroups()
            self._start_manager()
        except BaseException:
            self.close()
            raise

    # --- setup and teardown -------------------------------------------------------------

    def _make_cgroups(self) -> None:
        for hierarchy in _cgroup_hierarchies():
            path = hierarchy / (self.name + ".slice" if self.journal_dir else self.name)
            try:
                path.mkdir()
            except OSError:
                continue
            self.cgroups.append(path)

    def _manager_cgroups(self) -> list[Path]:
        if not self.journal_dir:
            return self.cgroups
        managers = [cg / f"user@{os.getuid()}.service" for cg in self.cgroups]
        for path in managers:
            path.mkdir(exist_ok=True)
        return managers

    def _start_journald(self) -> str:
        """The shell commands, run in the rig's namespace before the manager starts, that start its
        journald and wait (up to 5 s) for its native socket."""
        conf = self.root / "journald.conf"
        conf.write_text(JOURNALD_CONF)
        hide_persistent = "mount -t tmpfs tmpfs /var/log/journal && " if os.path.isdir("/var/log/journal") else ""
        return (
            f"mkdir -p /run/systemd/journald.conf.d /run/log && cp {conf} /run/systemd/journald.conf.d/rig.conf"
            f" && mount --bind {self.journal_dir} /run/log && {hide_persistent}"
            f"{{ {JOURNALD} </dev/null & }} && for i in $(seq 250); do"
            " [ -S /run/systemd/journal/socket ] && [ -S /run/systemd/journal/stdout ] && break; sleep 0.02; done"
            " && [ -S /run/systemd/journal/stdout ] && "
        )

    def _start_manager(self) -> None:
        join = "".join(f'echo $$ > "{cg}/cgroup.procs" && ' for cg in self._manager_cgroups())
        inner = (
            f"mount -t tmpfs -o mode=755 tmpfs /run/systemd && mkdir -p /run/systemd/system && {OWN_RUN_DIR} && "
            + (self._start_journald() if self.journal_dir else "")
            + f"ip link set lo up && exec {SYSTEMD} --user"
        )
        script = f"{join}exec unshare --mount --net --propagation private -- sh -c '{inner}'"
        self.manager = subprocess.Popen(
            ["sh", "-c", script],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=open(self.log_dir / "manager.log", "wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        state = ""
        while time.monotonic() < deadline:
            if self.manager.poll() is not None:
                raise RigError(f"systemd --user exited with {self.manager.returncode}: {self.manager_log()}")
            if self.net_ns is None and Path(f"/proc/{self.manager.pid}/comm").read_text().strip() == "systemd":
                self.net_ns = _net_ns(self.manager.pid)
            if self.net_ns is not None and (self.runtime_dir / "systemd" / "private").exists():
                state = self.systemctl("is-system-running").stdout.strip()
                if state in ("running", "degraded"):
                    break
            time.sleep(0.05)
        else:
            raise RigError(f"systemd --user did not come up (state {state!r}): {self.manager_log()}")
        started = self.systemctl("start", "dbus.service")
        if started.returncode != 0:
            raise RigError(f"could not start the session bus: {started.stderr.strip()}")

    def manager_log(self) -> str:
        return (self.log_dir / "manager.log").read_text(errors="replace")[-2000:]

    def _leftovers(self) -> set[int]:
        """Every process still in the rig's cgroups or network namespace: all of them ours."""
        pids: set[int] = set()
        for cg in self.cgroups:
            for procs in cg.rglob("cgroup.procs"):
                try:
                    pids.update(int(p) for p in procs.read_text().split())
                except OSError:
                    pass
        if self.net_ns is not None:
            for entry in os.listdir("/proc"):
                if entry.isdigit() and _net_ns(int(entry)) == self.net_ns:
                    pids.add(int(entry))
        pids.discard(os.getpid())
        return pids

    def close(self) -> None:
        for proc in self.processes:
            self.release(proc)
        if self.manager is not None and self.manager.poll() is None:
            try:
                self.systemctl("exit", timeout=10)
                self.manager.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.manager.kill()
                self.manager.wait()
        for _ in range(50):
            pids = self._leftovers()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        for cg in self.cgroups:
            for sub in sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                try:
                    sub.rmdir()
                except OSError:
                    pass
            try:
                cg.rmdir()
            except OSError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    # --- running things inside -----------------------------------------------------------

    def argv(self, argv: list[str]) -> list[str]:
        """argv run in the manager's mount and network namespaces, with the rig's environment."""
        assert self.manager is not None
        env = [f"{k}={v}" for k, v in self.env.items()]
        return ["nsenter", f"--target={self.manager.pid}", "--mount", "--net", "--", "env", "-i", *env, *argv]

    def seen(self, path: str) -> Path:
        """path (absolute) as the rig's processes see it, through their mount namespace: its own
        /run/systemd and /run/bindguard."""
        assert self.manager is not None and path.startswith("/")
        return Path(f"/proc/{self.manager.pid}/root{path}")

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 120)
        return subprocess.run(self.argv(argv), **kwargs)

    def bindguard(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        """`python -m bindguard ARGS` inside the rig, as a person at a root shell there would run it."""
        return self.run([sys.executable, "-m", "bindguard", *args], **kwargs)

    def systemctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.run(["systemctl", "--user", *args], timeout=timeout)

    def hold(self, *specs: dict, uid: int | None = None) -> subprocess.Popen:
        """A tests/holder.py process holding these sockets in the rig's network namespace."""
        proc = holder.start(self.argv, specs, uid)
        self.processes.append(proc)
        return proc

    def release(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            if proc.stdin:
                proc.stdin.close()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # --- units ---------------------------------------------------------------------------

    def write_unit(self, name: str, text: str, reload: bool = True) -> Path:
        path = self.unit_dir / name
        path.write_text(text)
        if reload:
            self.daemon_reload()
        return path

    def write_dropin(self, unit: str, name: str, text: str, reload: bool = True) -> Path:
        directory = self.unit_dir / f"{unit}.d"
        directory.mkdir(exist_ok=True)
        path = directory / name
        path.write_text(text)
        if reload:
            self.daemon_reload()
        return path

    def serve(self, *specs: dict, fork: bool = False) -> str:
        """An ExecStart= command line for a Type=notify daemon holding these sockets (tests/serve.py)."""
        config = json.dumps({"sockets": list(specs), "fork": fork})
        return f"{sys.executable} {SERVE} '{config}'"

    def log(self, name: str) -> Path:
        """A file for a unit's StandardOutput=/StandardError= (append:PATH), for a rig without a journal."""
        return self.log_dir / name

    def journal(self, *matches: str, timeout: float = 5) -> list[dict]:
        """The rig's journal entries that `journalctl MATCHES` selects (FIELD=VALUE, -u UNIT, ...),
        as JSON objects; waits up to `timeout` seconds for at least one (journald writes an entry
        a moment after it is sent)."""
        assert self.journal_dir is not None, "SystemdRig(journal=True) keeps a journal"
        argv = ["journalctl", f"--directory={self.journal_dir / 'journal'}", "--output=json", "--no-pager", *matches]
        deadline = time.monotonic() + timeout
        while True:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                                  env={**os.environ, "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"})
            entries = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
            if entries or time.monotonic() > deadline:
                return entries
            time.sleep(0.05)

    def daemon_reload(self) -> None:
        done = self.systemctl("daemon-reload")
        if done.returncode != 0:
            raise RigError(f"daemon-reload failed: {done.stderr.strip()}")

    def _job(self, verb: str, unit: str, timeout: float) -> UnitRun:
        try:
            done = self.systemctl(verb, unit, timeout=timeout)
        except subprocess.TimeoutExpired:
            status = self.systemctl("status", "--no-pager", "--lines=0", unit, timeout=10)
            jobs = self.systemctl("list-jobs", "--no-pager", timeout=10)
            raise RigError(f"systemctl --user {verb} {unit} did not return in {timeout:g} s:\n"
                           f"{status.stdout}\n{jobs.stdout}\n{self._processes_of(unit)}\n"
                           f"manager: {self.manager_log()}") from None
        props = self.show(unit, "ActiveState", "Result", "ExecStartPre")
        return UnitRun(
            unit=unit,
            returncode=done.returncode,
            output=(done.stdout + done.stderr).strip(),
            active_state=props.get("ActiveState", ""),
            result=props.get("Result", ""),
            pre_status=_parse_exec_status(props.get("ExecStartPre", "")),
        )

    def _processes_of(self, unit: str) -> str:
        """The unit's processes with their state and kernel wait channel, to tell where one hangs."""
        group = self.prop(unit, "ControlGroup").lstrip("/")
        lines = []
        for cg in self.cgroups:
            procs = cg.parent / group / "cgroup.procs"
            if group and procs.exists():
                for pid in procs.read_text().split():
                    try:
                        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                        wchan = Path(f"/proc/{pid}/wchan").read_text()
                        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
                    except OSError:
                        continue
                    lines.append(f"  PID {pid} state {state} wchan {wchan}: {cmd}")
                break
        return "processes:\n" + "\n".join(lines)

    def start(self, unit: str, timeout: float = 60) -> UnitRun:
        return self._job("start", unit, timeout)

    def stop(self, unit: str, timeout: float = 60) -> UnitRun:
        return self._job("stop", unit, timeout)

    def restart(self, unit: str, timeout: float = 60) -> UnitRun:
        return self._job("restart", unit, timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """Unit properties as `systemctl show` prints them."""
        args = ["show", unit] + [f"--property={p}" for p in props]
        done = self.systemctl(*args)
        result: dict[str, str] = {}
        for line in done.stdout.splitlines():
            key, sep, value = line.partition("=")
            if sep:  # a property with several values (ExecStartPre=) comes as several lines
                result[key] = f"{result[key]}\n{value}" if key in result else value
        return result

    def prop(self, unit: str, name: str) -> str:
        return self.show(unit, name).get(name, "")

    def main_pid(self, unit: str) -> int:
        return int(self.prop(unit, "MainPID") or 0)

    def stop_bus(self) -> None:
        """Take the session bus away; `systemctl --user` still works over the manager's private socket."""
        done = self.systemctl("stop", "dbus.socket", "dbus.service")
        if done.returncode != 0:
            raise RigError(f"could not stop the session bus: {done.stderr.strip()}")

    @property
    def manager_pid(self) -> int:
        assert self.manager is not None
        return self.manager.pid

    @property
    def bus_address(self) -> str:
        return self.env["DBUS_SESSION_BUS_ADDRESS"]
