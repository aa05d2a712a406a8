"""Running a daemon's own configuration dump (`nginx -T`, `sshd -T`) without handing root to anyone.

The guard runs as root before a service starts; the daemon's binary, its configuration and the
unit's environment may belong to the service's user. A dump runs only when all of this holds,
else the finder reads the files itself (and says why the dump was not run):

- The program is reached by an absolute path: the one ExecStart= names, or for a bare name the
  path systemd itself resolves it to (its fixed search path, never the unit's $PATH). A bare name
  inside `sh -c` or after `env` is resolved by the unit's $PATH: not run.
- root owns the program and every directory above it, and no one else can write to them (a
  world-writable directory only with the sticky bit). The resolved path is what is executed.
- It runs as the unit's User= and Group= (with the user's supplementary groups), set in the child
  before exec. A User= the system does not know (DynamicUser=) is not run.
- Without User= the service's own user is root, and so is the dump's. Then every file of the
  daemon's configuration (each file the finder's own reading reached, each module it loads) and
  each EnvironmentFile= must be as trusted as the program: root's, with no one else able to write
  them or a directory above them. A configuration that cannot be read through is not dumped.
- The child gets an environment of PATH=/usr/sbin:/usr/bin alone, / as working directory, no
  stdin, a session of its own, and is killed when it outlives the discovery's time budget or
  writes more than its byte budget.
"""

from __future__ import annotations

import _signal  # signal's constants without its enums (as bindguard.cli)
import os
from collections.abc import Callable, Iterable

import bindguard
from bindguard.model.record import Record
from bindguard.model.text import excerpt
from bindguard.request.cache import incomplete
from bindguard.request.discover.common import current_budget, current_service

# Where systemd looks for an ExecStart= program given by name alone (systemd.service(5): a fixed
# search path chosen at compile time; Debian's systemd 252 has no ExecSearchPath= default).
SYSTEMD_SEARCH_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
DUMP_ENVIRONMENT = {"PATH": "/usr/sbin:/usr/bin"}
DUMP_SECONDS = 10.0  # at most; never more than the discovery's time left
ROOT = bindguard.ROOT


def systemd_resolved(name: str) -> str | None:
    """The path systemd runs for a bare ExecStart= name: the first executable in its fixed search path."""
    if not name or "/" in name:
        return None
    for directory in SYSTEMD_SEARCH_PATH:
        path = os.path.join(directory, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


class Credentials(Record, frozen=True):
    """Whom a dump runs as; uid None: the guard's own (it is not root and cannot change it)."""

    uid: int | None
    gid: int | None = None
    groups: tuple[int, ...] = ()

    @property
    def root(self) -> bool:
        return self.uid == ROOT


def _uid_and_name(user: str) -> tuple[int, str | None, int | None]:
    """(uid, name, primary gid) of User=: a name or a number; KeyError when the system does not know it."""
    import pwd

    if user.isascii() and user.isdigit():
        uid = int(user)
        try:
            entry = pwd.getpwuid(uid)
            return uid, entry.pw_name, entry.pw_gid
        except KeyError:
            return uid, None, None
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_name, entry.pw_gid


def _gid(group: str) -> int:
    import grp

    if group.isascii() and group.isdigit():
        return int(group)
    return grp.getgrnam(group).gr_gid


def credentials(user: str | None, group: str | None) -> Credentials | str:
    """Whom a dump for a service with this User= and Group= runs as, or why it cannot run."""
    if os.geteuid() != ROOT:
        return Credentials(None)
    try:
        uid, name, primary = _uid_and_name(user) if user else (ROOT, None, ROOT)
    except KeyError:
        return f"User={user} is not a user this system knows (DynamicUser=?)"
    try:
        gid = _gid(group) if group else primary
    except KeyError:
        return f"Group={group} is not a group this system knows"
    if gid is None:
        return f"User={user} has no group: the dump needs Group="
    groups = tuple(os.getgrouplist(name, gid)) if name and uid != ROOT else (gid,)
    return Credentials(uid, gid, groups)


def allowed(program: str, inputs: Iterable[str] | None) -> tuple[Credentials | None, str]:
    """Whom a dump by program runs as for the discovery under way, or why it must not run:
    (credentials, ""), (None, why), or (None, "") when no program is at that path to run.

    inputs: the files that decide what the dump does (configuration files, modules it loads),
    None when they are not all known (a configuration that could not be read through).
    """
    if not program or (os.path.isabs(program) and not (os.path.isfile(program) and os.access(program, os.X_OK))):
        return None, ""
    service = current_service()
    runs_as = credentials(service.user, service.group)
    if isinstance(runs_as, str):  # a user the system knows only while its unit runs (DynamicUser=)
        incomplete(runs_as)
    if inputs is None and isinstance(runs_as, Credentials) and runs_as.root:
        return None, ""  # the finder says why its configuration could not be read
    present = [path for path in service.environment_files if os.path.lexists(path)]  # "-": maybe missing
    why = refusal(program, runs_as, None if inputs is None else [*inputs, *present])
    if why or isinstance(runs_as, str):  # refusal() gives the string credentials() returned as its why
        return None, why or ""
    if inputs is None:  # it reads what bindguard could not: its answer may change with no file read changing
        incomplete("a dump of a configuration not read through")
    return runs_as, ""


def refusal(program: str, runs_as: Credentials | str, root_inputs: Iterable[str] | None) -> str | None:
    """Why a dump by program, as runs_as, must not run; None when it may.

    root_inputs: every file the dump reads that decides what it does (configuration files,
    modules, environment files) when it runs as root; None when they are not all known.
    """
    if not os.path.isabs(program):
        return f"{program} is not an absolute path (a bare name in a shell or after env: the unit's PATH finds it)"
    why = bindguard.untrusted(program)
    if why:
        return f"{program} is not root's alone ({why})"
    if isinstance(runs_as, str):
        return runs_as
    if runs_as.root:
        if root_inputs is None:
            return "it would run as root, and its configuration could not be read through first"
        for path in root_inputs:
            why = bindguard.untrusted(path)
            if why:
                return f"it would run as root, and {path} is not root's alone ({why})"
    return None


def run_bounded(argv: list[str], env: dict[str, str], seconds: float, limit: int, program: str | None = None,
                runs_as: Credentials | None = None) -> tuple[int, bytes, bytes, str]:
    """Run `program` (default argv[0]; an absolute path, already checked) as runs_as (None: as the
    guard itself) with env alone, / as working directory, no stdin, no descriptor of the guard's
    but its output pipes, and a session of its own; (exit code, stdout, stderr, why it was stopped:
    "" when it was not). Past `seconds` (its output read and its exit awaited), or past `limit`
    bytes of output, it is killed with everything it started. OSError when it cannot be started.

    `program` apart from argv[0]: a multi-call binary (xtables-legacy-multi) picks what it does by
    the name in argv[0], while the file executed is the checked one the name's symlink resolves to."""
    import select
    import time

    deadline = time.monotonic() + seconds
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    try:
        pid, reap = _start(argv, program or argv[0], env, runs_as, out_write, err_write)
    except BaseException:
        for fd in (out_read, err_read):
            os.close(fd)
        raise
    finally:
        os.close(out_write)
        os.close(err_write)
    output = {out_read: bytearray(), err_read: bytearray()}
    failure = ""
    exited: int | None = None
    waiting = {out_read, err_read}  # until both pipes are at their end, and the program has exited
    try:
        exited = _exit_descriptor(pid)  # readable once the program has exited: its wait is bounded too
        if exited is not None:
            waiting.add(exited)
        poller = select.poll()
        for end in waiting:
            poller.register(end, select.POLLIN)
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                failure = f"no answer in {seconds:.1f} s"
                break
            for fd, _ in poller.poll(max(int(left * 1000), 1)):
                chunk = b"" if fd == exited else os.read(fd, 1 << 16)
                if not chunk:
                    poller.unregister(fd)
                    waiting.discard(fd)
                    continue
                output[fd].extend(chunk)
            if len(output[out_read]) + len(output[err_read]) > limit:
                failure = f"more than {limit >> 20} MiB of output"
                break
    finally:
        if waiting:  # stopped, or an exception (a stop signal) on the way: nothing is left running
            try:
                os.killpg(pid, _signal.SIGKILL)  # its own session: the program and anything it started
            except ProcessLookupError:
                pass
        os.close(out_read)
        os.close(err_read)
        if exited is not None:
            os.close(exited)
        code = reap()
    return code, bytes(output[out_read]), bytes(output[err_read]), failure


def _start(argv: list[str], program: str, env: dict[str, str], runs_as: Credentials | None, stdout: int,
           stderr: int) -> tuple[int, Callable[[], int]]:
    """Start the child of run_bounded: (its PID, what reaps it and gives its exit code).

    A child that keeps the guard's credentials (the dump of a service that runs as root, by the root
    guard; the guard's own tools) is started by posix_spawn: the C library's vfork and exec, with no
    copy of the guard's memory and without the subprocess module (its import, its fork and its share
    of the interpreter's teardown were 4.7 ms of a 39.5 ms first start of nginx.service). One that
    must change user is forked by subprocess, which sets its groups, gid and uid before exec. Both
    give the child the same descriptors, working directory, session and signal dispositions (but
    glibc's two internal real-time signals, which _spawn leaves ignored)."""
    switch = runs_as if runs_as is not None and runs_as.uid is not None else None  # None: stay the guard
    if switch is None or _keeps_credentials(switch):
        pid = _spawn(argv, program, env, stdout, stderr)
        if pid is not None:
            return pid, lambda: _reap(pid)
    import subprocess

    try:
        proc = subprocess.Popen(argv, executable=program, env=dict(env), cwd="/", stdin=subprocess.DEVNULL,
                                stdout=stdout, stderr=stderr, start_new_session=True, close_fds=True,
                                user=switch.uid if switch else None, group=switch.gid if switch else None,
                                extra_groups=list(switch.groups) if switch else None)
    except subprocess.SubprocessError as exc:
        raise OSError(f"{program} could not be started: {exc}") from None
    return proc.pid, proc.wait


def _reap(pid: int) -> int:
    """The exit code of a child of posix_spawn, as Popen.wait gives it: 0 when the kernel reaped it
    itself (SIGCHLD ignored, a disposition a parent can leave across exec) and its status is gone."""
    try:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    except ChildProcessError:
        return 0


def _keeps_credentials(runs_as: Credentials) -> bool:
    """Whether a child switched to runs_as would have the guard's own credentials: the same real,
    effective and saved uid and gid, and the same groups (the primary one counted as a group)."""
    gid = runs_as.gid
    return (os.getresuid() == (runs_as.uid,) * 3 and os.getresgid() == (gid,) * 3
            and set(os.getgroups()) | {gid} == set(runs_as.groups) | {gid})


def _spawn(argv: list[str], program: str, env: dict[str, str], stdout: int, stderr: int) -> int | None:
    """posix_spawn the child as Popen(cwd="/", stdin=DEVNULL, close_fds=True, start_new_session=True,
    restore_signals=True) would start it; None when that cannot be done here (an output pipe on
    descriptor 0, 1 or 2, which a dup2 onto itself would leave close-on-exec; no /proc): then Popen.

    posix_spawn has no working directory of its own: the guard's, which is a service's, is left
    for / just around the call and taken back by its descriptor (one thread: nothing else runs).
    A descriptor the guard inherited without close-on-exec is closed in the child: only stdin
    (/dev/null), stdout and stderr (the pipes) go across."""
    if min(stdout, stderr) <= 2:
        return None
    try:
        inherited = [fd for fd in map(int, os.listdir("/proc/self/fd")) if fd > 2 and _inheritable(fd)]
        here = os.open("/proc/self/cwd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDWR, 0), (os.POSIX_SPAWN_DUP2, stdout, 1),
               (os.POSIX_SPAWN_DUP2, stderr, 2), *((os.POSIX_SPAWN_CLOSE, fd) for fd in inherited)]
    pid = None
    try:
        os.chdir("/")
        # Python ignores SIGPIPE and SIGXFSZ, and an ignored signal stays ignored across exec. (glibc
        # leaves its own two internal signals, 32 and 33, ignored in a posix_spawn child, as in any
        # Popen child made by posix_spawn: real-time signals no dump uses.)
        pid = os.posix_spawn(program, argv, env, file_actions=actions, setsid=True,
                             setsigdef=(_signal.SIGPIPE, _signal.SIGXFSZ))
        os.fchdir(here)
        return pid
    except BaseException:
        if pid is not None:  # started, but the guard could not go back: nothing is left running
            os.killpg(pid, _signal.SIGKILL)
            _reap(pid)
        else:
            os.fchdir(here)
        raise
    finally:
        os.close(here)


def _inheritable(fd: int) -> bool:
    try:
        return os.get_inheritable(fd)
    except OSError:  # the descriptor that listed /proc/self/fd, closed since
        return False


def _exit_descriptor(pid: int) -> int | None:
    """A pidfd of the child, readable once it has exited; None where the kernel has none (before 5.3):
    then its exit is awaited without a bound, once its output has ended."""
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def run(argv: list[str], runs_as: Credentials) -> tuple[bool, str, str]:
    """Run a daemon's own configuration dump; (ok, stdout, the first line of the complaint).

    argv[0] must have passed refusal(). Its output counts against the discovery's byte budget,
    its run time against the time budget: past either, it is killed and the dump has failed.
    """
    budget = current_budget()
    program, why = bindguard.checked_path(argv[0])  # the file checked now is the one run: no path re-pointed since
    command = " ".join(argv)
    if why:
        incomplete(f"{command} not run")
        return False, "", f"{command}: not run, {argv[0]} is not root's alone ({why})"
    if budget.seconds_left() <= 0 or budget.bytes_left <= 0:
        incomplete("a dump not run: the budget was spent")
        return False, "", f"{command}: not run, discovery has spent its budget"
    try:
        returncode, out, err, failure = run_bounded([program, *argv[1:]], DUMP_ENVIRONMENT,
                                                    min(DUMP_SECONDS, budget.seconds_left()),
                                                    max(budget.bytes_left, 0), runs_as=runs_as)
    except OSError as exc:
        incomplete(f"{command} could not run")  # a fork, a setuid that failed: the next run may not
        return False, "", f"{command}: {exc}"
    if failure:
        failure = f"{command}: {failure}; stopped"
        incomplete(failure)  # killed on a budget: another run may finish
    budget.bytes_left -= len(out) + len(err)
    if failure:
        return False, "", failure
    stdout = out.decode("utf-8", errors="replace")
    if returncode != 0:
        # It may fail on more than its configuration (sshd -T on a missing /run/sshd, host keys).
        incomplete(f"{command} failed")
        lines = [line for line in err.decode("utf-8", errors="replace").splitlines() if line.strip()]
        why = next((line for line in lines if "emerg" in line or "rror" in line), lines[0] if lines else "")
        # Its complaint may quote the file it was pointed at (a line of it): a short excerpt only.
        return False, stdout, f"{command} failed (exit {returncode}): {excerpt(why.strip())}"
    return True, stdout, ""
