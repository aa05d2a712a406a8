"""A loaded host in a private network namespace: many sockets, many idle processes holding them.

    sudo .venv/bin/python bench/load.py --sockets 20000 --processes 2000    # build, print, wait for Enter

What it builds, inside a namespace of its own (`unshare --net`, lo up) that dies with it:
- sockets, about: 5% TCP listeners (ports 10000+, on 0.0.0.0, [::] dual-stack, 127.0.0.1 and ::1),
  5% bound UDP sockets, 60% ends of established loopback connections (half of them IPv6),
  30% TIME_WAIT (server side, as a web server closing first leaves them);
- idle processes (`sleep infinity`, forked from this one and exec'd), each holding a log file, a
  pipe, /dev/null and its share of the sockets; shares follow a Zipf law (a few big daemons, a
  long tail of small ones; some hold no socket at all), so a /proc fd scan costs what it costs on a
  busy host;
- services: where the cgroup hierarchies are writable, the processes are spread over cgroups named
  like systemd services (`bindguard-bench-PID/load-N.service`, about 20 processes each), so that a
  holder's cgroup names its unit as on a systemd host;
- three ports for the benchmark: FREE_PORT (nothing on it); HELD_PORT, a dual-stack listener made by
  a process alone in `held.service` (so sock_diag reports that cgroup) which gets the highest PID
  there is when /proc/sys/kernel/ns_last_pid allows (the last process a PID-ordered /proc scan
  reaches); TIMEWAIT_PORT, a fresh TIME_WAIT on [::1], remade by `refresh`.

TIME_WAIT lasts 60 s in Linux and cannot be made longer, so the bulk is made in six batches and a
batch is remade once it is 45 s old (`refresh`, between benchmark rounds): the count stays between
the target and 25% above it.

Children get PR_SET_PDEATHSIG=SIGKILL: if this process dies, so do they, and with them the namespace.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

FREE_PORT = 9001
HELD_PORT = 9002
TIMEWAIT_PORT = 9003
TIMEWAIT_SERVER_PORTS = range(9100, 9116)
BACKEND_PORTS = range(9200, 9216)
LOAD_PORT_BASE = 10000
MAX_LOAD_PORTS = 10000
EPHEMERAL_RANGE = "20000 60999"
TIMEWAIT_BATCHES = 6
TIMEWAIT_REMAKE_AGE = 45.0

PROCESSES_PER_SERVICE = 20
CGROUP_ROOT = Path("/sys/fs/cgroup")
IP_BIND_ADDRESS_NO_PORT = 24
PR_SET_PDEATHSIG = 1
LISTENER_HOSTS = ("0.0.0.0", "::", "127.0.0.1", "::1")
UDP_HOSTS = ("0.0.0.0", "127.0.0.1", "::")


@dataclass(frozen=True)
class Size:
    sockets: int
    processes: int

    @property
    def label(self) -> str:
        return f"{_short(self.sockets)} sockets, {self.processes:,} processes"

    @classmethod
    def parse(cls, text: str) -> Size:
        """'20k:2000' -> Size(20000, 2000)."""
        try:
            sockets, processes = text.split(":")
            return cls(_count(sockets), _count(processes))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad size {text!r}: want SOCKETS:PROCESSES, e.g. 20k:2000") from None


def _count(text: str) -> int:
    text = text.strip().lower()
    value = int(float(text[:-1]) * 1000) if text.endswith("k") else int(text)
    if value <= 0:
        raise ValueError(text)
    return value


def _short(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 and n >= 1000 else f"{n:,}"


@dataclass(frozen=True)
class Mix:
    listeners: int
    udp: int
    pairs: int
    timewait: int

    @classmethod
    def for_sockets(cls, sockets: int) -> Mix:
        listeners = max(1, round(sockets * 0.05))
        udp = round(sockets * 0.05)
        timewait = round(sockets * 0.30)
        pairs = max(0, (sockets - listeners - udp - timewait) // 2)
        if max(listeners, udp) > MAX_LOAD_PORTS:
            raise ValueError(f"{sockets} sockets need more than {MAX_LOAD_PORTS} listener ports")
        return cls(listeners, udp, pairs, timewait)


def zipf_shares(total: int, buckets: int, rng: random.Random) -> list[int]:
    """total split over buckets by a Zipf law (largest remainder), in shuffled order."""
    weights = [1.0 / (rank + 1) for rank in range(buckets)]
    rng.shuffle(weights)
    scale = total / sum(weights)
    exact = [w * scale for w in weights]
    shares = [int(x) for x in exact]
    by_remainder = sorted(range(buckets), key=lambda i: exact[i] - shares[i], reverse=True)
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares


# ---------------------------------------------------------------- inside the namespace


def _sysctl(key: str, value: str) -> None:
    Path("/proc/sys", *key.split(".")).write_text(value)


def _listener(host: str, port: int, backlog: int = 4096, reuseaddr: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    if reuseaddr:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6 and host == "::":
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind((host, port))
    s.listen(backlog)
    return s


def _cgroup_hierarchies() -> list[Path]:
    """Where systemd keeps track of units: cgroup2 alone, or name=systemd and unified (hybrid)."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return [CGROUP_ROOT]
    return [h for h in (CGROUP_ROOT / "systemd", CGROUP_ROOT / "unified") if (h / "cgroup.procs").exists()]


class Services:
    """Cgroups named like services under bindguard-bench-PID in each hierarchy; removed by close()."""

    def __init__(self, names: list[str]) -> None:
        self.roots: list[Path] = []
        for hierarchy in _cgroup_hierarchies():
            root = hierarchy / f"bindguard-bench-{os.getpid()}"
            try:
                root.mkdir()
            except OSError:  # read-only or delegated elsewhere: the load runs without services
                continue
            self.roots.append(root)
            for name in names:
                (root / name).mkdir()

    def join(self, name: str) -> None:
        """Move the calling process into the service `name` (in every hierarchy), as far as allowed."""
        for root in self.roots:
            try:
                (root / name / "cgroup.procs").write_text("0")
            except OSError:
                pass

    def close(self) -> None:
        for root in self.roots:
            for cgroup in [*(c for c in root.iterdir() if c.is_dir()), root]:
                for _ in range(50):  # a killed process may linger in cgroup.procs for a moment
                    try:
                        cgroup.rmdir()
                        break
                    except OSError:
                        time.sleep(0.02)
        self.roots.clear()


def _peer(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


class Host:
    """The builder and keeper of the load; runs inside the namespace, as root."""

    def __init__(self, size: Size, seed: int = 1) -> None:
        self.size = size
        self.mix = Mix.for_sockets(size.sockets)
        self.rng = random.Random(seed)
        self.children: list[int] = []
        self.files = Path(tempfile.mkdtemp(prefix="bindguard-bench-"))
        self.timewait_servers = [_listener("127.0.0.1", p) for p in TIMEWAIT_SERVER_PORTS]
        self.backends = [_listener("127.0.0.1" if i % 2 == 0 else "::", p) for i, p in enumerate(BACKEND_PORTS)]
        self.timewait_batches: list[tuple[float, int]] = []
        self.timewait_counter = 0
        self.source_counter = 0
        self.held_pid = 0
        self.held_rank = 0
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.service_names = [f"load-{k}.service" for k in range(max(1, size.processes // PROCESSES_PER_SERVICE))]
        self.services = Services([*self.service_names, "held.service"])

    # -- sockets

    def _connect(self, host: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        c = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_INET:
            self.source_counter += 1
            n = self.source_counter % 64
            c.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            c.bind((f"127.2.{n}.1", 0))
        c.connect((host, port))
        return c

    def _pairs(self, count: int, listeners: list[tuple[str, socket.socket]]) -> list[socket.socket]:
        ends = []
        targets = listeners or [("127.0.0.1" if i % 2 == 0 else "::", s) for i, s in enumerate(self.backends)]
        for k in range(count):
            host, server = targets[k % len(targets)]
            client = self._connect(_peer(host), server.getsockname()[1])
            accepted, _ = server.accept()
            ends += [client, accepted]
        return ends

    def _timewait(self, count: int) -> None:
        """count server-side TIME_WAIT sockets, each on a 4-tuple never used before."""
        for _ in range(count):
            n = self.timewait_counter
            self.timewait_counter += 1
            server = self.timewait_servers[n % len(self.timewait_servers)]
            source = n // 40000
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            client.bind((f"127.3.{source // 250}.{source % 250 + 1}", 20000 + n % 40000))
            client.connect(server.getsockname())
            accepted, _ = server.accept()
            accepted.close()
            client.close()

    def timewait_on_benchmark_port(self) -> None:
        server = _listener("::", TIMEWAIT_PORT, 1, reuseaddr=True)
        client = socket.create_connection(("::1", TIMEWAIT_PORT))
        accepted, _ = server.accept()
        accepted.close()
        client.recv(1)
        client.close()
        server.close()

    # -- processes

    def _spawn_holder(self, index: int, sockets: list[socket.socket], service: str,
                      make: Callable[[], list[socket.socket]] | None = None) -> int:
        """A `sleep infinity` in `service` holding `sockets`, and those `make` creates there (in its cgroup)."""
        fds = [s.fileno() for s in sockets]
        log = self.files / f"proc{index}.log"
        parent = os.getpid()
        made_r, made_w = os.pipe() if make else (-1, -1)
        pid = os.fork()
        if pid == 0:
            try:
                self.libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                if os.getppid() != parent:
                    os._exit(1)
                self.services.join(service)
                own = make() if make else []
                devnull = os.open("/dev/null", os.O_RDWR)
                for std in (0, 1, 2):
                    os.dup2(devnull, std)
                held = [os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), *os.pipe(), *fds, *(s.fileno() for s in own)]
                for fd in held:
                    os.set_inheritable(fd, True)
                if make:
                    os.write(made_w, b"ok")
                os.execv("/bin/sleep", ["sleep", "infinity"])
            finally:
                os._exit(127)
        for s in sockets:
            s.close()
        if make:
            os.close(made_w)
            made = os.read(made_r, 2)
            os.close(made_r)
            if made != b"ok":
                raise RuntimeError(f"load process {index} ({service}) could not make its sockets")
        return pid

    def build(self) -> None:
        size, mix = self.size, self.mix
        listeners = zipf_shares(mix.listeners, size.processes, self.rng)
        udp = zipf_shares(mix.udp, size.processes, self.rng)
        pairs = zipf_shares(mix.pairs, size.processes, self.rng)
        next_listener = next_udp = 0
        for i in range(size.processes):
            own: list[tuple[str, socket.socket]] = []
            for _ in range(listeners[i]):
                host = LISTENER_HOSTS[next_listener % len(LISTENER_HOSTS)]
                own.append((host, _listener(host, LOAD_PORT_BASE + next_listener)))
                next_listener += 1
            sockets = [s for _, s in own] + self._pairs(pairs[i], own)
            for _ in range(udp[i]):
                host = UDP_HOSTS[next_udp % len(UDP_HOSTS)]
                u = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
                u.bind((host, LOAD_PORT_BASE + next_udp))
                sockets.append(u)
                next_udp += 1
            service = self.service_names[self.rng.randrange(len(self.service_names))]
            self.children.append(self._spawn_holder(i, sockets, service))
        batch = -(-mix.timewait // TIMEWAIT_BATCHES)
        left = mix.timewait
        while left > 0:
            self._timewait(min(batch, left))
            self.timewait_batches.append((time.monotonic(), min(batch, left)))
            left -= batch
        self.timewait_on_benchmark_port()
        _ask_for_the_last_pid()
        self.held_pid = self._spawn_holder(size.processes, [], "held.service",
                                           lambda: [_listener("::", HELD_PORT, 128)])
        self.children.append(self.held_pid)
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
        self.held_rank = sum(1 for pid in pids if pid <= self.held_pid)

    def refresh(self) -> None:
        """Remake TIME_WAIT batches about to expire, and the one on TIMEWAIT_PORT."""
        now = time.monotonic()
        for k, (made, count) in enumerate(self.timewait_batches):
            if now - made >= TIMEWAIT_REMAKE_AGE:
                self._timewait(count)
                self.timewait_batches[k] = (time.monotonic(), count)
        self.timewait_on_benchmark_port()

    def close(self) -> None:
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in self.children:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        self.children.clear()
        self.services.close()
        shutil.rmtree(self.files, ignore_errors=True)


def _ask_for_the_last_pid() -> None:
    """Make the next fork get pid_max - 1, if free (another fork may race us: then it is only likely)."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    try:
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid_max - 2))
    except OSError:
        pass


def sockstat() -> dict[str, int]:
    """This namespace's socket counts, from /proc/net/sockstat{,6}."""
    counts = {"tcp": 0, "timewait": 0, "udp": 0}
    for name in ("sockstat", "sockstat6"):
        for line in Path("/proc/net", name).read_text().splitlines():
            proto, _, rest = line.partition(":")
            fields = rest.split()
            values = dict(zip(fields[::2], fields[1::2]))
            if proto in ("TCP", "TCP6"):
                counts["tcp"] += int(values.get("inuse", 0))
                counts["timewait"] += int(values.get("tw", 0))
            elif proto in ("UDP", "UDP6"):
                counts["udp"] += int(values.get("inuse", 0))
    counts["total"] = counts["tcp"] + counts["timewait"] + counts["udp"]
    return counts


def serve(size: Size) -> None:
    """Build the load, print one JSON line, then obey stdin: 'refresh' or 'stats'; EOF ends all."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    _sysctl("net.ipv4.ip_local_port_range", EPHEMERAL_RANGE)
    _sysctl("net.ipv4.tcp_max_tw_buckets", "1048576")
    _sysctl("net.core.somaxconn", "65535")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    started = time.monotonic()
    host = Host(size)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        host.build()
        ready = {
            "pid": os.getpid(),
            "size": asdict(size),
            "mix": asdict(host.mix),
            "free_port": FREE_PORT,
            "held_port": HELD_PORT,
            "held_pid": host.held_pid,
            "held_scan_position": f"{host.held_rank} of {sum(1 for n in os.listdir('/proc') if n.isdigit())}",
            "services": len(host.service_names) if host.services.roots else 0,
            "timewait_port": TIMEWAIT_PORT,
            "processes": len(host.children),
            "build_seconds": round(time.monotonic() - started, 2),
            "sockstat": sockstat(),
        }
        print(json.dumps(ready), flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command == "refresh":
                host.refresh()
            print(json.dumps({"sockstat": sockstat()}), flush=True)
    finally:
        host.close()


# ---------------------------------------------------------------- outside: the handle


@dataclass
class Load:
    """A loaded namespace, built by a child process; use as a context manager."""

    size: Size
    python: str = sys.executable
    info: dict = field(default_factory=dict)
    process: subprocess.Popen | None = None

    def __enter__(self) -> Load:
        self.process = subprocess.Popen(
            ["unshare", "--net", "--", self.python, str(Path(__file__).resolve()), "--serve",
             f"{self.size.sockets}:{self.size.processes}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            self.__exit__()
            raise RuntimeError(f"load generator for {self.size.label} failed (exit {code})")
        self.info = json.loads(line)
        return self

    @property
    def netns(self) -> str:
        return f"/proc/{self.info['pid']}/ns/net"

    def _ask(self, command: str, timeout: float = 120) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        if not select.select([self.process.stdout], [], [], timeout)[0]:
            raise RuntimeError(f"load generator did not answer {command!r} in {timeout} s")
        return json.loads(self.process.stdout.readline())

    def refresh(self) -> dict:
        """Remake expiring TIME_WAIT; returns the namespace's socket counts."""
        return self._ask("refresh")["sockstat"]

    def stats(self) -> dict:
        return self._ask("stats")["sockstat"]

    def __exit__(self, *_exc) -> None:
        if self.process is None:
            return
        if self.process.stdin:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()  # its children die with it (PR_SET_PDEATHSIG)
            self.process.wait()
        self.process.stdout.close()
        self.process = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sockets", type=_count, default=20000)
    parser.add_argument("--processes", type=_count, default=2000)
    parser.add_argument("--serve", type=Size.parse, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    if os.geteuid() != 0:
        raise SystemExit("load.py: needs root (unshare --net, many file descriptors); run it with sudo")
    with Load(Size(args.sockets, args.processes)) as load:
        print(json.dumps(load.info, indent=2))
        print(f"namespace: nsenter --net={load.netns} -- ss -s", file=sys.stderr)
        input("press Enter to tear it down ")


if __name__ == "__main__":
    main()
