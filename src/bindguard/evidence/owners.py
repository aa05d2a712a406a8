"""Who holds a socket: inode -> PID through /proc/PID/fd, process facts, cgroup -> systemd unit.

Only the standard library is imported, ctypes (cgroup_path_for_id) and pwd (a holder's user
name) by the functions that need them. Process facts are read from /proc here, not through psutil.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable

from bindguard.model.endpoints import Endpoint
from bindguard.model.facts import ProcessFact, SocketFact
from bindguard.model.record import Record
from bindguard.systemd.unitfiles import (  # noqa: F401 (process_cgroup: API too)
    cgroup_file,
    cgroup_from_proc_file,
    process_cgroup,
    status_ids,
    unit_from_cgroup,
)

TYPE_CHECKING = False  # typing's own costs an import on the guard's path
if TYPE_CHECKING:
    from bindguard.evidence.containers import DockerLook

CGROUP_ROOTS = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")  # cgroup2: unified host, hybrid host
CGROUP_V1_SYSTEMD = "/sys/fs/cgroup/systemd"  # name=systemd hierarchy on legacy and hybrid hosts


class Holders(dict[int, list[int]]):
    """inode -> PIDs holding it, plus what the scan could not see.

    `unreadable` counts the processes whose fd table was denied to us (another user's
    process when not root): an inode missing from the mapping may be held by one of them.
    `scanned` counts the processes whose fds were read.
    """

    def __init__(self) -> None:
        super().__init__()
        self.unreadable = 0
        self.scanned = 0


def find_holders(inodes: set[int], first_pids: Iterable[int] = (), *, every_holder: bool = False) -> Holders:
    """The PIDs whose open files include the socket inodes, read from /proc/PID/fd.

    `first_pids` (a unit's cgroup.procs, say) are searched first, in ascending order, then
    every other process in ascending PID order. The scan stops as soon as each wanted inode
    has a holder, so for a socket shared by forked workers (a listener inherited from a
    master) the PID reported is the lowest one among the first group that holds it: the
    master, which forked before its workers. `every_holder=True` scans every process and
    lists all holders of each inode, in the same order.

    Processes that exit during the scan are skipped; those whose fds cannot be read are
    counted in the result's `unreadable`. Inodes 0 (TIME_WAIT, orphans) are never held.
    """
    holders = Holders()
    wanted = {inode for inode in inodes if inode}
    remaining = set(wanted)
    seen: set[int] = set()
    first = sorted({pid for pid in first_pids if pid > 0})
    for group in (first, None):
        pids = group if group is not None else _own_namespace_first(all_pids())
        for pid in pids:
            if pid in seen:
                continue
            seen.add(pid)
            holders.scanned += 1
            found = _socket_inodes_of(pid, wanted, holders)
            for inode in found:
                holders.setdefault(inode, []).append(pid)
                remaining.discard(inode)
            if not remaining and not every_holder:
                return holders
    return holders


class SocketHolders(Record):
    """Each socket's holders as processes: inode -> ProcessFacts (the first holder whose facts could
    be read, or every one of them), and whether a holder may be missing because some process's fds
    were denied to us."""

    processes: dict[int, list[ProcessFact]]
    incomplete: bool = False

    def first(self, inode: int) -> ProcessFact | None:
        found = self.processes.get(inode)
        return found[0] if found else None


def holders_of(sockets: Iterable[SocketFact], *, every_holder: bool = False) -> SocketHolders:
    """Who holds these sockets: the one routine check, scan and verify use.

    Inode -> PIDs by find_holders, searching first the cgroups sock_diag says the sockets were
    created in (socket_cgroup_pids), and stopping once each inode has a holder unless
    `every_holder`; then each PID's process_facts, read once. A process gone meanwhile is passed
    over for the next holder found. Docker's states are listed once for the whole look (DockerLook),
    however many of the holders are dockerd or its docker-proxy processes."""
    sockets = list(sockets)
    inodes = {s.inode for s in sockets if s.inode}
    if not inodes:
        return SocketHolders({})
    local = {s.inode: s.local for s in sockets if s.inode}
    found = find_holders(inodes, socket_cgroup_pids(sockets), every_holder=every_holder)
    # Without every_holder, an inode with no holder found is the one a denied process may hold.
    incomplete = bool(found.unreadable) and (every_holder or len(found) < len(inodes))
    if not found:
        return SocketHolders({}, incomplete)
    from bindguard.evidence.containers import DockerLook  # process_facts imports it for each holder anyway

    docker = DockerLook()  # Docker's side of this look, shared by all its holders
    facts: dict[int, ProcessFact | None] = {}
    processes: dict[int, list[ProcessFact]] = {}
    for inode, pids in found.items():
        held: list[ProcessFact] = []
        for pid in pids:
            if pid not in facts:
                facts[pid] = process_facts(pid, docker)
            fact = facts[pid]
            if fact is not None:
                held.append(_for_container(fact, local[inode], docker))
                if not every_holder:
                    break
        if held:
            processes[inode] = held
    return SocketHolders(processes, incomplete)


def _for_container(process: ProcessFact, local: Endpoint, docker: DockerLook) -> ProcessFact:
    """The process as the holder of a socket on `local`: dockerd, which holds the ports it publishes
    itself where its userland proxy is off, holds it for the container the port is published for.
    docker: the look's one DockerLook (a dockerd may hold hundreds of ports, and each would otherwise
    read its uid and list Docker's states again)."""
    if process.container is not None or process.name != "dockerd":
        return process
    from bindguard.model.record import replace

    container = docker.dockerd_container(process.pid, local.proto, local.port, str(local.host))
    return replace(process, container=container) if container else process


def all_pids() -> list[int]:
    """Every process's PID in /proc, ascending."""
    return sorted(int(name) for name in os.listdir("/proc") if name.isdigit())


def _own_namespace_first(pids: list[int]) -> list[int]:
    """Processes in this network namespace first: a socket's holder nearly always lives where the
    socket does, and on a host full of containers one stat() per process spares thousands of
    fd reads. The others follow, for a socket passed across namespaces."""
    own = netns("self")
    if own is None:
        return pids
    here: list[int] = []
    elsewhere: list[int] = []
    for pid in pids:
        namespace = netns(pid)  # None: gone, or not ours to look at: kept in the first round
        (here if namespace in (own, None) else elsewhere).append(pid)
    return here + elsewhere


def netns(pid: int | str) -> tuple[int, int] | None:
    """The process's network namespace ("self": the guard's) as namespaces(7) tells one from another:
    the device and inode of /proc/PID/ns/net. None when the process is gone or not ours to look at."""
    try:
        info = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _socket_inodes_of(pid: int, wanted: set[int], holders: Holders) -> set[int]:
    """Which of the wanted socket inodes process `pid` has open (each counted once)."""
    try:
        fd_dir = os.open(f"/proc/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except PermissionError:
        holders.unreadable += 1
        return set()
    except OSError:  # exited, or a kernel thread without an fd table
        return set()
    found: set[int] = set()
    try:
        for name in os.listdir(fd_dir):
            try:
                target = os.readlink(name, dir_fd=fd_dir)
            except OSError:  # closed meanwhile
                continue
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                if inode in wanted:
                    found.add(inode)
    except PermissionError:
        holders.unreadable += 1
    except OSError:
        pass
    finally:
        os.close(fd_dir)
    return found


def process_facts(pid: int, docker: DockerLook | None = None) -> ProcessFact | None:
    """What /proc says about a process (read_stat, /proc/PID/status, cmdline and exe, the same
    facts and rules as psutil's, whose import alone cost a quarter of a refusal) and its cgroup;
    None if it is gone. docker: the look's DockerLook (holders_of's), for a docker-proxy's container."""
    stat = read_stat(pid)
    if stat is None:
        return None
    ids = status_ids(pid)  # read once: the container lookup's conmon rule takes its real uid from here
    if ids is None:
        return None
    real_uid, uid = ids
    cmdline = read_cmdline(pid)
    name = stat.name
    if len(name) >= 15 and cmdline:  # comm is cut to 15 bytes: "gnome-keyring-d" is gnome-keyring-daemon
        extended = os.path.basename(cmdline[0])
        if extended.startswith(name):
            name = extended
    cgroups = cgroup_file(pid) or ""  # read once: unit and container are both named from it
    cgroup = cgroup_from_proc_file(cgroups) or ""
    from bindguard.evidence.containers import container_of

    # An exit that began after the stat was read takes the memory the command line lives in, so a
    # guard's trial could be seen with no command line (not a guard) and not exiting: a refusal. An
    # empty command line is checked against the kernel's flags read after it.
    exiting = _exiting(pid, stat) or (not cmdline and _exiting(pid))
    return ProcessFact(
        exiting=exiting,
        pid=pid,
        ppid=stat.ppid,
        name=name,
        cmdline=cmdline,
        exe=_exe(pid),
        uid=uid,
        user=_user_name(real_uid),
        started=stat.started,
        cgroup=cgroup,
        unit=unit_from_cgroup(cgroup),
        container=container_of(pid, cgroups, cmdline, real_uid, stat.ppid, docker),
    )


PF_EXITING = 0x4  # include/linux/sched.h: the task is in do_exit()
STAT_BYTES = 4096  # /proc/PID/stat: 52 numbers and a name of at most 64 bytes
CMDLINE_BYTES = 1 << 20  # a command line is cut here (the kernel allows ARG_MAX, often 2 MiB)


class ProcStat:
    """The fields of /proc/PID/stat (proc(5), numbered from 1) a report needs. A plain class: a
    dataclass costs half a millisecond to make, on every refusal."""

    __slots__ = ("name", "state", "ppid", "flags", "start_ticks")

    def __init__(self, name: str, state: bytes, ppid: int, flags: int, start_ticks: int) -> None:
        self.name = name  # 2, comm: the executable's name cut to 15 bytes, or what it set (PR_SET_NAME)
        self.state = state  # 3: R, S, D, Z (zombie), X (dead), ...
        self.ppid = ppid  # 4
        self.flags = flags  # 9: the kernel's PF_* flags
        self.start_ticks = start_ticks  # 22, starttime: clock ticks (SC_CLK_TCK) from boot to its start

    @property
    def exiting(self) -> bool:
        """Whether the kernel is ending the process: zombie or dead, or PF_EXITING set."""
        return self.state in (b"Z", b"X", b"x") or bool(self.flags & PF_EXITING)

    @property
    def started(self) -> float:
        """The start time in seconds since the epoch: starttime in ticks after btime, as psutil's
        create_time() reckons it (so a start time read by either matches to the tick)."""
        return self.start_ticks / os.sysconf("SC_CLK_TCK") + _boot_time()


def read_stat(pid: int | str) -> ProcStat | None:
    """/proc/PID/stat parsed, or None if the process is gone or the file unexpected. The name
    (field 2, in parentheses) may hold spaces and ')', so it runs from the first '(' to the
    last ')'; the numbered fields follow the last ')'."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read(STAT_BYTES)
    except OSError:
        return None
    close = data.rfind(b")")
    fields = data[close + 1 :].split()
    if close < 0 or len(fields) < 20:
        return None
    try:
        return ProcStat(name=os.fsdecode(data[data.find(b"(") + 1 : close]), state=fields[0],
                        ppid=int(fields[1]), flags=int(fields[6]), start_ticks=int(fields[19]))
    except ValueError:
        return None


def process_started(pid: int | str) -> float | None:
    """A process's start time in seconds since the epoch, None if it is gone."""
    stat = read_stat(pid)
    return stat.started if stat is not None else None


MAX_THREADS_READ = 1024  # a process with more threads is not read through: not proven exiting


def _exiting(pid: int, leader: ProcStat | None = None) -> bool:
    """Whether the kernel is ending the whole process: every thread zombie, dead or in do_exit().
    The leader's /proc/PID/stat alone proves nothing: a leader that called pthread_exit() shows
    as a zombie while the process's other threads go on holding its sockets."""
    leader = leader or read_stat(pid)
    if leader is None or not leader.exiting:
        return False
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    if len(threads) > MAX_THREADS_READ:
        return False
    for tid in threads:
        stat = read_stat(f"{pid}/task/{tid}")
        if stat is None or not stat.exiting:
            return False
    return True


_boot_times: list[float] = []


def _boot_time() -> float:
    """When the host booted, in seconds since the epoch: the btime line of /proc/stat (read once)."""
    if not _boot_times:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    _boot_times.append(float(line.split()[1]))
                    break
            else:
                raise OSError(errno.ENODATA, "no btime line in /proc/stat")
    return _boot_times[0]


def read_cmdline(pid: int) -> tuple[str, ...]:
    """/proc/PID/cmdline as arguments, () for a kernel thread or a zombie. Arguments end in NUL;
    a process that rewrote its title (setproctitle) may leave one string with spaces instead,
    which is split at the spaces, as psutil does."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(CMDLINE_BYTES)
    except OSError:
        return ()
    if not raw:
        return ()
    data = os.fsdecode(raw)
    sep = "\0" if data.endswith("\0") else " "
    if data.endswith(sep):
        data = data[:-1]
    args = data.split(sep)
    if sep == "\0" and len(args) == 1 and " " in data:
        args = data.split(" ")
    return tuple(args)


def _exe(pid: int) -> str:
    """The executable's path, "" when it cannot be read (a kernel thread, a zombie, another user's
    process when not root). Anything after a NUL is dropped, and the " (deleted)" the kernel adds
    when the file was removed or replaced (a package upgrade) too, unless a file of that very name
    exists: the path still says which program it is, as psutil's exe() gives it."""
    try:
        path = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""
    path = path.split("\0")[0]
    if path.endswith(" (deleted)") and not os.path.lexists(path):
        path = path[: -len(" (deleted)")]
    return path


def _user_name(uid: int) -> str:
    """The user name of a UID (the real one, as psutil's username()), else the number."""
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def cgroup_pids(cgroup_path: str, *, recursive: bool = True) -> list[int]:
    """The PIDs in a cgroup (and, by default, its descendants), from cgroup.procs.

    Read from the cgroup2 mount (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid
    hosts), else from the name=systemd v1 hierarchy. An empty list if the cgroup is gone.
    """
    base = _cgroup_dir(cgroup_path)
    if base is None:
        return []
    pids: list[int] = []
    directories = [base]
    while directories:
        directory = directories.pop()
        try:
            with open(os.path.join(directory, "cgroup.procs")) as f:
                pids.extend(int(line) for line in f.read().split())
            if recursive:
                with os.scandir(directory) as entries:
                    directories.extend(e.path for e in entries if e.is_dir(follow_symlinks=False))
        except OSError:
            continue
    return pids


def _cgroup_dir(cgroup_path: str) -> str | None:
    relative = cgroup_path.strip("/")
    for root in (*_cgroup2_roots(), CGROUP_V1_SYSTEMD):
        directory = os.path.join(root, relative) if relative else root
        if os.path.exists(os.path.join(directory, "cgroup.procs")):
            return directory
    return None


def _cgroup2_roots() -> list[str]:
    return [root for root in CGROUP_ROOTS if os.path.exists(os.path.join(root, "cgroup.controllers"))]


def socket_cgroup_pids(sockets: Iterable[SocketFact]) -> list[int]:
    """The PIDs in the cgroups where these sockets were created: where to look for holders first.

    sock_diag reports each full socket's cgroup, which is the creating process's unit
    (PID 1's init.scope for a systemd socket unit). Pass the result as find_holders'
    first_pids: the holder is then usually the first process read, instead of one among
    thousands. The root cgroup is skipped, as it would name every process.
    """
    pids: list[int] = []
    for cgroup_id in sorted({s.cgroup_id for s in sockets if s.cgroup_id and s.inode}):
        path = cgroup_path_for_id(cgroup_id)
        if path is not None and path != "/":
            pids.extend(cgroup_pids(path))
    return pids


def cgroup_path_for_id(cgroup_id: int) -> str | None:
    """The cgroup2 path (e.g. /system.slice/nginx.service) of the cgroup sock_diag reported.

    A cgroup's id is its directory's inode number on the cgroup2 mount. With
    CAP_DAC_READ_SEARCH the kernel resolves it directly (open_by_handle_at with a kernfs
    file handle: about 0.01 ms, plus 2-4 ms to import ctypes); without it the mount is
    walked, skipping subtrees created after the cgroup (ids only grow): about 6 ms for
    320 cgroups, still far cheaper than scanning /proc for the holder.
    None when there is no cgroup2 mount or no such cgroup (it was removed).
    """
    for root in _cgroup2_roots():
        try:
            directory = _open_cgroup_by_id(root, cgroup_id)
        except OSError:
            directory = _walk_for_cgroup(root, cgroup_id)
        if directory is not None:
            relative = os.path.relpath(directory, root)
            return "/" if relative == "." else "/" + relative
    return None


FILEID_KERNFS = 0xFE


def _open_cgroup_by_id(root: str, cgroup_id: int) -> str | None:
    import ctypes
    import struct

    libc = ctypes.CDLL(None, use_errno=True)
    handle = ctypes.create_string_buffer(struct.pack("=IiQ", 8, FILEID_KERNFS, cgroup_id), 16)
    mount_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = libc.open_by_handle_at(mount_fd, handle, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if fd < 0:
            code = ctypes.get_errno()
            if code == errno.ESTALE:  # no such cgroup
                return None
            raise OSError(code, os.strerror(code))
        try:
            return os.readlink(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
    finally:
        os.close(mount_fd)


def _walk_for_cgroup(root: str, cgroup_id: int) -> str | None:
    try:
        if os.stat(root).st_ino == cgroup_id:
            return root
    except OSError:
        return None
    directories = [root]
    while directories:
        directory = directories.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if not entry.is_dir(follow_symlinks=False):
                        continue
                    inode = entry.inode()
                    if inode == cgroup_id:
                        return entry.path
                    if inode < cgroup_id:
                        directories.append(entry.path)
        except OSError:
            continue
    return None
