"""Fixtures: real network namespaces, and processes that hold real sockets in them.

Integration tests need root (unshare --net). Without it they skip with the reason, unless
BINDGUARD_REQUIRE_INTEGRATION=1 (as in CI), where a skip would hide an untested claim and
is turned into a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import holder
import pytest
from rig import OWN_RUN_DIR

from bindguard.request.cache import ENTRIES, RUN_DIR

TESTS = Path(__file__).resolve().parent
HOLDER = TESTS / "holder.py"
REQUIRE = os.environ.get("BINDGUARD_REQUIRE_INTEGRATION") == "1"

# Another user, for what root must not trust or what runs without privilege: Debian's nobody.
NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]  # then the argv to run so



def quoted_commands(text: str) -> list[str]:
    """The commands a report advises: each `backtick-quoted` span of its text."""
    return re.findall(r"`([^`]*)`", text)


def user_units(tmp_path: Path, config: Path | None = None, **extra: str) -> tuple[Path, dict[str, str]]:
    """A user unit directory of the test's own ($XDG_CONFIG_HOME/systemd/user, with an empty
    sockets.target.wants/) and the environment a guard reads it with: bindguard files from `config`
    (by default none), this checkout's package, and `extra`."""
    units = tmp_path / "config" / "systemd" / "user"
    (units / "sockets.target.wants").mkdir(parents=True, exist_ok=True)
    env = {"BINDGUARD_CONFIG_PATH": str(config or tmp_path / "none"), "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "config"), "PYTHONPATH": ":".join(sys.path),
           **extra}
    return units, env


# The guard as a unit's ExecStartPre= runs it: `check --unit %n`, from this checkout's package.
GUARD = f"{sys.executable} -m bindguard check --unit %n"


def guarded(rig, address: str, spec: dict, name: str = "web.service", check_args: str = "", extra: str = "",
            fork: bool = False, exec_start: str | None = None) -> Path:
    """A Type=notify service in the rig whose daemon holds `spec` (tests/serve.py, or exec_start),
    with the guard (`check --unit %n CHECK_ARGS ADDRESS`, as root) in ExecStartPre= and EXTRA
    [Service] lines; returns the guard's log."""
    log = rig.log(f"{name}.log")
    rig.write_unit(name, f"""\
[Service]
Type=notify
ExecStartPre=+{GUARD} {check_args} {address}
ExecStart={exec_start or rig.serve(spec, fork=fork)}
StandardError=append:{log}
{extra}
""")
    return log


def need(reason: str) -> None:
    """What a test needs is missing: a failure under BINDGUARD_REQUIRE_INTEGRATION=1 (CI, where a
    skip would hide an untested claim), else a skip saying why."""
    if REQUIRE:
        pytest.fail(f"BINDGUARD_REQUIRE_INTEGRATION=1 but {reason}")
    pytest.skip(reason)


def need_root(what: str = "network namespaces") -> None:
    missing = [tool for tool in ("unshare", "nsenter", "ip") if shutil.which(tool) is None]
    reason = None
    if os.geteuid() != 0:
        reason = f"{what} need root"
    elif missing:
        reason = f"{what} need {', '.join(missing)} (install util-linux and iproute2)"
    if reason:
        need(reason)


class NetNS:
    """A private network namespace with lo up, alive while its anchor process lives. With
    own_run_dir, also a mount namespace whose /run/bindguard is its own (OWN_RUN_DIR), empty at
    first and gone with the anchor; what runs in it starts in /, as nsenter leaves it."""

    def __init__(self, own_run_dir: bool = False) -> None:
        unshare = ["unshare", "--net", *(["--mount", "--propagation", "private"] if own_run_dir else []), "--"]
        setup = f"{OWN_RUN_DIR} && " if own_run_dir else ""
        self.anchor = subprocess.Popen(
            [*unshare, "sh", "-c", f"{setup}ip link set lo up && echo up && exec sleep infinity"],
            stdout=subprocess.PIPE,
            text=True,
        )
        if self.anchor.stdout.readline().strip() != "up":
            self.anchor.kill()
            self.anchor.wait()
            raise RuntimeError("could not set up a new network namespace")
        self.path = f"/proc/{self.anchor.pid}/ns/net"
        self.namespaces = [f"--net={self.path}", *([f"--mount=/proc/{self.anchor.pid}/ns/mnt"] if own_run_dir else [])]
        self.processes: list[subprocess.Popen] = []

    def argv(self, argv: list[str]) -> list[str]:
        return ["nsenter", *self.namespaces, "--", *argv]

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 120)
        return subprocess.run(self.argv(argv), **kwargs)

    def ip(self, *args: str) -> None:
        subprocess.run(self.argv(["ip", *args]), check=True)

    def sysctl(self, key: str, value: str) -> None:
        subprocess.run(self.argv(["sysctl", "-qw", f"{key}={value}"]), check=True)

    def hold(self, *specs: dict, uid: int | None = None) -> subprocess.Popen:
        """Start a process holding the sockets described by specs (see holder.py)."""
        proc = holder.start(self.argv, specs, uid)
        self.processes.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.stdin.close()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        for proc in self.processes:
            self.stop(proc)
        self.anchor.send_signal(signal.SIGKILL)
        self.anchor.wait()


# Whether the guard has a discovery of UNIT (bindguard.request.cache.lookup), first forgotten if
# the first argument is "forget": asked in the namespace and with the environment the guard ran in
# (its /run/bindguard, unit search path and bindguard package).
REMEMBERED = r"""
import sys
from bindguard.request import cache
action, unit, manager = sys.argv[1:]
if action == "forget":
    cache.forget(unit, manager == "user")
print(cache.lookup(unit, manager == "user") is not None)
"""


def remembered(ns: NetNS, unit: str, env: dict[str, str], user: bool = False, forget: bool = False) -> bool:
    """Whether a guard run in ns with env would answer unit from a remembered discovery; with
    forget, after the entry was removed."""
    proc = ns.run([sys.executable, "-c", REMEMBERED, "forget" if forget else "look", unit,
                   "user" if user else "system"], env=env)
    assert proc.returncode == 0 and proc.stdout in ("True\n", "False\n"), proc.stderr
    return proc.stdout == "True\n"


def bytecode_compiled() -> None:
    """This checkout's package byte-compiled now, then a pause past what counts as a fresh change
    (bindguard.request.cache.FRESH_NS): a guard that discovers writes no __pycache__ as it goes,
    which would change the directories its discovery looked at and leave it unremembered, however
    the runs before it were told about bytecode (PYTHONDONTWRITEBYTECODE, -I)."""
    import compileall
    import time

    from bindguard.request import cache

    compileall.compile_dir(Path(cache.__file__).parents[1], quiet=1)
    time.sleep(cache.FRESH_NS / 1e9 + 0.05)


@pytest.fixture(scope="session", autouse=True)
def _the_guards_run_dir():
    """Where the tests' guards remember discoveries. Under the netns_own_run fixture and in the
    systemd rig, a tmpfs of their own is mounted on /run/bindguard (OWN_RUN_DIR): the mount point
    is made here (0700, as the guard makes it) where the host has none. Elsewhere a guard run as
    root in the host's mount namespace (the netns fixture) remembers them in the host's
    /run/bindguard/discovery: remove what this session added there, leaving what was there
    before it, the two directories too where the session made them (and nothing else has put an
    entry in them since)."""
    entries = Path(ENTRIES)
    made = [Path(d) for d in (ENTRIES, RUN_DIR) if not os.path.lexists(d)]  # child first: rmdir needs it empty
    before = set(os.listdir(entries)) if entries.is_dir() else set()
    if Path(RUN_DIR) in made:
        try:
            os.mkdir(RUN_DIR, 0o700)
        except OSError:  # not root: the tests that need it say so
            pass
    yield
    if entries.is_dir():
        for name in set(os.listdir(entries)) - before:
            (entries / name).unlink(missing_ok=True)
    for directory in made:
        try:
            directory.rmdir()
        except OSError:  # not made after all, or not empty
            pass


@pytest.fixture
def netns():
    need_root()
    ns = NetNS()
    try:
        yield ns
    finally:
        ns.close()


@pytest.fixture
def netns_own_run():
    """A netns whose processes see a /run/bindguard of their own (NetNS(own_run_dir=True)): for a
    test that looks at what the guard remembers, or needs it to remember nothing yet."""
    need_root()
    ns = NetNS(own_run_dir=True)
    try:
        yield ns
    finally:
        ns.close()


@pytest.fixture
def systemd_rig():
    """A real `systemd --user` manager with its session bus, in private mount and network
    namespaces and its own cgroup (tests/rig.py); ended, with everything it ran, afterwards."""
    need_root("the systemd rig")
    from rig import SYSTEMD, SystemdRig

    if not os.access(SYSTEMD, os.X_OK) or not os.path.exists("/usr/lib/systemd/user/dbus.socket"):
        reason = f"the systemd rig needs {SYSTEMD} and the user unit dbus.socket (install systemd, dbus-user-session)"
        need(reason)
    rig = SystemdRig()
    try:
        yield rig
    finally:
        rig.close()
