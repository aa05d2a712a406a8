"""The container (and pod) behind a holder: real rootful Podman containers, one publishing a port (its
monitor, conmon, holds the port, and netavark's NAT rule takes the traffic), one on the host's network
in a cgroup of its own; a real rootless one, whose port rootlessport holds as its user; and the cgroup
paths and on-disk state of Docker, containerd and CRI-O as they record them.

Podman runs in private mount and network namespaces: its storage and run directories are tmpfs
mounts there, ulimits within the test's own (no CAP_SYS_RESOURCE needed). The image is
busybox-static's binary in a tarball (`podman import`): no registry is asked. A container with a
published port has no cgroup of its own (`--cgroups disabled`: crun refuses a hybrid v1/v2 host, so a
cgroup2 file system is mounted over /sys/fs/cgroup). One on the host's network gets its own cgroup
(`libpod_parent/libpod-ID`, Podman's cgroupfs layout, below a parent of the test's own) in the
cgroup v1 hierarchies of a hybrid host, whose cgroup2 part is unmounted in the test's mount
namespace: on cgroup2, crun's device filter is an eBPF program, and loading it raises
RLIMIT_MEMLOCK, which takes CAP_SYS_RESOURCE (a root without it, as in a Firecracker VM, gets
"setrlimit (RLIM_MEMLOCK): Operation not permitted")."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pytest

from bindguard.evidence import containers
from bindguard.model.endpoints import Bind, SocketOptions, parse_listen
from bindguard.model.facts import ContainerFact, ProcessFact
from bindguard.model.kinds import ConflictKind
from bindguard.model.text import escape
from bindguard.verdict.conflicts import Conflict
from bindguard.verdict.remedies import remedy
from conftest import AS_NOBODY, NOBODY, need, need_root, quoted_commands

ID = "f70f59f8dfac8409672c00f9015b0a3fd50bce9cbc39d58d9ea9e356e956bb6d"
BINDGUARD = f"{sys.executable} -m bindguard"


# --- cgroup paths and command lines as the engines make them ---------------------------------


@pytest.mark.parametrize("path, engine", [
    (f"/system.slice/docker-{ID}.scope", "docker"),
    (f"/docker/{ID}", "docker"),
    (f"/machine.slice/libpod-{ID}.scope/container", "podman"),
    (f"/libpod_parent/libpod-{ID}", "podman"),
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b2c_3d.slice/cri-containerd-{ID}.scope",
     "containerd"),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1b2c.slice/crio-{ID}.scope", "cri-o"),
    (f"/kubepods/burstable/pod1b2c3d4e-0000-1111-2222-333344445555/{ID}", "kubernetes"),
])
def test_the_engine_and_id_from_a_cgroup_path(path, engine):
    assert containers.container_ref(["/", path], ()) == (engine, ID, "cgroup")


def test_no_container_in_a_service_or_a_look_alike():
    for path in ("/system.slice/nginx.service", f"/system.slice/docker-{ID[:12]}.scope", f"/user.slice/x{ID}",
                 f"/docker/{ID}../../etc"):
        assert containers.container_ref([path], ()) is None
    assert containers.container_ref(["/"], ("/usr/bin/conmon", "-c", "../../etc/passwd")) is None
    # A user names its own scopes under its user manager, or in a Delegate=yes service: no proof of root's container.
    assert containers.container_ref([f"/user.slice/user-1000.slice/user@1000.service/app.slice/docker-{ID}.scope"],
                                    ()) is None
    assert containers.container_ref([f"/system.slice/ci-runner.service/job/docker-{ID}.scope"], ()) is None
    assert containers.container_ref(["/"], ("/usr/bin/nginx", "-c", ID)) is None


def test_conmon_names_its_container():
    argv = ("/usr/bin/conmon", "--api-version", "1", "-c", ID, "-u", ID, "-r", "/usr/bin/crun", "-b",
            f"/var/lib/containers/storage/overlay-containers/{ID}/userdata", "-n", "web1")
    assert containers.container_ref(["/"], argv) == ("podman", ID, "conmon")


# A real config.v2.json: Debian's Docker 20.10 (docker.io), `docker run -d --name web -p 18082:8080 --label
# io.kubernetes.pod.name=web-7d4 --label io.kubernetes.pod.namespace=shop bindguard-test:1 /bin/httpd -f -p
# 8080`, as DOCKER_SCRIPT below runs its engine (the labels are those the kubelet's dockershim set).
DOCKER_RECORDED = Path(__file__).resolve().parent / "data" / "docker" / "config.v2.json"


def test_docker_and_kubernetes_state_on_disk(tmp_path, monkeypatch):
    recorded = json.loads(DOCKER_RECORDED.read_text())
    docker = tmp_path / "docker" / recorded["ID"]
    docker.mkdir(parents=True)
    shutil.copy(DOCKER_RECORDED, docker / "config.v2.json")
    monkeypatch.setattr(containers, "DOCKER_STATE", str(tmp_path / "docker" / "{id}" / "config.v2.json"))
    fact = containers.container_of(os.getpid(), f"0::/system.slice/docker-{recorded['ID']}.scope\n", (), 0)
    assert fact == ContainerFact("docker", recorded["ID"], "web", "bindguard-test:1", "web-7d4", "shop", "cgroup",
                                 str(docker / "config.v2.json"))
    k8s = tmp_path / "k8s" / ID
    k8s.mkdir(parents=True)
    (k8s / "config.json").write_text(json.dumps({"annotations": {
        "io.kubernetes.cri.container-name": "api", "io.kubernetes.cri.image-name": "registry.example/api:2",
        "io.kubernetes.cri.sandbox-name": "api-5f6", "io.kubernetes.cri.sandbox-namespace": "prod"}}))
    monkeypatch.setattr(containers, "CONTAINERD_CONFIG", str(tmp_path / "k8s" / "{id}" / "config.json"))
    fact = containers.container_of(os.getpid(), f"0::/kubepods/besteffort/pod1b2c/{ID}\n", (), 0)
    assert (fact.engine, fact.name, fact.pod, fact.namespace) == ("containerd", "api", "api-5f6", "prod")
    monkeypatch.setattr(containers, "DOCKER_STATE", str(tmp_path / "missing" / "{id}"))
    fact = containers.container_of(os.getpid(), f"4:memory:/docker/{ID}\n0::/\n", (), 0)
    assert (fact.engine, fact.name, fact.source) == ("docker", "", "")  # named by engine and id alone
    os.mkfifo(tmp_path / "fifo")
    monkeypatch.setattr(containers, "DOCKER_STATE", str(tmp_path / "fifo"))
    # a FIFO is never opened
    assert containers.container_of(os.getpid(), f"4:memory:/docker/{ID}\n0::/\n", (), 0).name == ""


def test_what_a_docker_container_publishes_from_its_recorded_state():
    """docker-proxy's -container-ip, -container-port, -proto and -host-port against config.v2.json."""
    state = json.loads(DOCKER_RECORDED.read_text())
    assert containers.docker_publishes(state, "18082", "tcp", "172.17.0.2", "8080")
    assert containers.docker_publishes(state, "18082", "", "172.17.0.2", "8080")  # docker-proxy's default
    assert containers.docker_publishes(state, "18082", "tcp")  # dockerd's own socket: the port alone
    for other in (("18082", "tcp", "172.17.0.3", "8080"), ("18082", "tcp", "172.17.0.2", "8081"),
                  ("18082", "udp", "172.17.0.2", "8080"), ("18083", "tcp", "172.17.0.2", "8080"), ("18083", "tcp")):
        assert not containers.docker_publishes(state, *other), other
    state["State"]["Running"] = False  # only a running container publishes anything
    assert not containers.docker_publishes(state, "18082", "tcp", "172.17.0.2", "8080")


def test_a_docker_port_published_on_one_address_is_that_address_only():
    """`-p 127.0.0.1:18082:8080` publishes HostIp 127.0.0.1: a socket on another address is not its;
    an empty HostIp, 0.0.0.0 or :: (as recorded) publishes every address."""
    state = json.loads(DOCKER_RECORDED.read_text())
    for address in ("0.0.0.0", "::", "127.0.0.1", "192.0.2.1", ""):
        assert containers.docker_publishes(state, "18082", "tcp", host_ip=address), address
    state["NetworkSettings"]["Ports"]["8080/tcp"] = [{"HostIp": "127.0.0.1", "HostPort": "18082"}]
    assert containers.docker_publishes(state, "18082", "tcp", "172.17.0.2", "8080", host_ip="127.0.0.1")
    for address in ("0.0.0.0", "::", "127.0.0.2", "192.0.2.1"):
        assert not containers.docker_publishes(state, "18082", "tcp", host_ip=address), address
    state["NetworkSettings"]["Ports"]["8080/tcp"] = [{"HostIp": "", "HostPort": "18082"}]
    assert containers.docker_publishes(state, "18082", "tcp", host_ip="192.0.2.1")


def _conflict(container: ContainerFact) -> Conflict:
    process = ProcessFact(4242, 1, "conmon", ("/usr/bin/conmon",), "/usr/bin/conmon", 0, "root", 0.0, "/",
                          container=container)
    return Conflict(Bind(parse_listen("0.0.0.0:8080"), SocketOptions()), ConflictKind.LISTENER, process=process)


def test_the_remedy_stops_a_container_with_its_engine_and_leaves_a_pod_to_its_owner():
    text = remedy(_conflict(ContainerFact("docker", ID, "web", "nginx", via="cgroup")))
    assert "`docker stop web`" in text and "kill -TERM" not in text and "fuser" not in text
    text = remedy(_conflict(ContainerFact("containerd", ID, "api", pod="api-5f6", namespace="prod", via="cgroup")))
    assert "the pod api-5f6 in namespace prod" in text and "kill -TERM" not in text


# --- a real Podman container ---------------------------------------------------------------------


# A copy of the directory $1 on a tmpfs, mounted over it in the script's mount namespace: what an
# engine writes there (netavark's /etc/containers/networks, the test's user in /etc/passwd; files the
# host may not have, as /etc/subuid) stays in the namespace, and the host's files are never changed.
PRIVATE_COPY = r"""
private_copy() {
    copy="$OUT/copy$(printf %s "$1" | tr / -)"
    mkdir "$copy"
    mount -t tmpfs tmpfs "$copy"
    chmod --reference="$1" "$copy"
    chown --reference="$1" "$copy"
    cp -a "$1/." "$copy/"
    mount --bind "$copy" "$1"
}
"""
# Run in private mount and network namespaces, the container web1 run by $RUN_WEB1; then the guard's
# explain (JSON) and check on 0.0.0.0:18080.
PODMAN_SCRIPT = "set -eu\n" + PRIVATE_COPY + r"""
mount -t tmpfs tmpfs /var/lib/containers
mount -t tmpfs tmpfs /run
private_copy /etc/containers
cleanup() { podman rm -f -t 0 web1 >/dev/null 2>&1 || true; }
trap cleanup EXIT  # only once Podman's storage is the test's: it would make the host's
mkdir -p /run/lock
ip link set lo up
podman import -q "$IMAGE" localhost/bindguard-test:1 >/dev/null
eval "$RUN_WEB1"
$BINDGUARD explain --no-systemd --json 0.0.0.0:18080 > "$OUT/explain.json" 2> "$OUT/explain.err" || true
set +e
$BINDGUARD check --no-systemd --wait 0 0.0.0.0:18080 2> "$OUT/check.err"
echo $? > "$OUT/check.code"
"""
# busybox httpd, a container's PID 1, ignores SIGTERM (a PID 1 has no default action for it): every
# `podman stop` or `docker stop` waits out the container's stop timeout before SIGKILL, 1 s, not 10.
PODMAN_RUN = "podman run -d -q --name web1 --stop-timeout 1 --ulimit nofile=1024:1024 --ulimit nproc=4096:4096"
# A published port: conmon holds it, netavark's NAT rule takes its traffic; no cgroup of its own.
RUN_PUBLISHED = f"""mount -t cgroup2 none /sys/fs/cgroup
{PODMAN_RUN} --cgroups disabled -p 18080:8080 localhost/bindguard-test:1 /bin/httpd -f -p 8080 >/dev/null"""
# On the host's network, in a cgroup of its own: the listener is the container's process itself.
# A hybrid host's cgroup2 part is unmounted here, so that crun uses the v1 hierarchies (see above). Its
# cgroups (the container's, its monitor's) are below the test's own parent, named as Podman's cgroupfs
# parent (libpod_parent/libpod-ID, libpod_parent/conmon), never in the host's /libpod_parent.
RUN_HOST_NETWORK = f"""if [ ! -e /sys/fs/cgroup/cgroup.controllers ] && mountpoint -q /sys/fs/cgroup/unified; then
    umount /sys/fs/cgroup/unified
fi
{PODMAN_RUN} --cgroup-manager cgroupfs --cgroups enabled --cgroup-parent "$CGROUP_PARENT/libpod_parent" \
    --network host localhost/bindguard-test:1 /bin/httpd -f -p 18080 >/dev/null"""


def _busybox_image(tmp_path: Path) -> Path:
    busybox = Path("/bin/busybox")
    root = tmp_path / "rootfs"
    (root / "bin").mkdir(parents=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    for applet in ("sh", "httpd"):
        (root / "bin" / applet).symlink_to("busybox")
    image = tmp_path / "busybox.tar"
    with tarfile.open(image, "w") as tar:
        tar.add(root, arcname=".")
    return image


def need_engine(*more: str) -> None:
    """Root, Podman's programs and busybox, and `more` (rootless Podman's, Docker's)."""
    need_root("container engines")
    missing = [p for p in ("/usr/bin/podman", "/usr/bin/conmon", "/usr/bin/crun", "/usr/sbin/nft", "/bin/busybox",
                           *more) if not os.access(p, os.X_OK)]
    if missing:
        reason = f"the container test needs {', '.join(missing)} (Debian's podman, conmon, crun, nftables, " \
                 "busybox-static, uidmap, slirp4netns, docker.io: setup.sh --test installs them)"
        need(reason)


def _remove_cgroups(parent: str) -> None:
    """The cgroups an engine made below the test's own parent, at the top of the host's hierarchies
    (/sys/fs/cgroup/*/PARENT and below; PARENT on a cgroup2 host), once the processes in them have left
    (a monitor outlives `rm -f` for a moment): a name no engine uses, so that a real engine's cgroups
    (docker/, libpod_parent/ on a cgroup v1 host) are never looked at. One still in use after 10 s fails
    the test, named with what is in it: the parent's name is the run's own, and no later run removes it."""
    assert parent.startswith("bindguard-test-"), parent
    deadline = time.monotonic() + 10
    left: list[Path] = []
    for top in [*Path("/sys/fs/cgroup").glob(f"*/{parent}"), Path("/sys/fs/cgroup") / parent]:
        below = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
        for cgroup in [*below, top]:
            while cgroup.is_dir():
                try:
                    cgroup.rmdir()
                except OSError:
                    if time.monotonic() > deadline:
                        left.append(cgroup)
                        break
                    time.sleep(0.1)
    assert not left, "cgroups left in use, to remove (rmdir) once empty: " + "; ".join(
        f"{cgroup} (processes: {_cgroup_processes(cgroup) or 'none'})" for cgroup in left)


def _cgroup_processes(cgroup: Path) -> str:
    try:
        return " ".join((cgroup / "cgroup.procs").read_text().split())
    except OSError:
        return ""


@contextlib.contextmanager
def _mount_points(*paths: str):
    """The directories a script mounts over in its mount namespace: one the host lacks (no Debian
    package makes /var/lib/containers or /var/lib/docker) is made for the block, and removed after it."""
    made = []
    try:
        for path in paths:
            if not os.path.lexists(path):
                os.mkdir(path)
                made.append(path)
        yield
    finally:
        for path in reversed(made):
            os.rmdir(path)


# What an engine run on the host would write, were the mounts over them not its own: rootful Podman's and
# Docker's configuration (netavark's networks, dockerd's key.json) and storage, directories that engine
# alone writes, so that any change in them (a file's size or time, an entry more) is an engine's.
PODMAN_PATHS = ("/etc/containers", "/var/lib/containers")
DOCKER_PATHS = ("/etc/docker", "/var/lib/docker")
# The files the rootless script adds its user to (in its private copy of /etc). Other processes may change
# them (a package adds its user, a tool rewrites one as it was): what the test could change is only a
# line of its own user's.
ACCOUNT_FILES = ("/etc/passwd", "/etc/group", "/etc/subuid", "/etc/subgid")


def _state(path: Path) -> list[tuple[str, int, int, int]]:
    """path and everything below it: (path, mode, size, modification time), [] where it is not."""
    try:
        stat = path.lstat()
    except FileNotFoundError:
        return []
    below = sorted(path.iterdir()) if path.is_dir() and not path.is_symlink() else []
    return [(str(path), stat.st_mode, stat.st_size, stat.st_mtime_ns), *(s for p in below for s in _state(p))]


def _account_lines(user: str) -> list[str]:
    """The lines of the host's ACCOUNT_FILES that name `user`."""
    lines = []
    for path in ACCOUNT_FILES:
        with contextlib.suppress(FileNotFoundError):
            lines += [f"{path}: {line}" for line in Path(path).read_text().splitlines() if line.split(":")[0] == user]
    return lines


@contextlib.contextmanager
def _host_unchanged(paths: tuple[str, ...], user: str | None = None):
    """The block leaves the engine's directories `paths` as they were, and adds no line for the test's
    `user` to the host's ACCOUNT_FILES (a user the host must not have)."""
    assert user is None or not _account_lines(user), f"the host has a user {user}: the test's must be its own"
    before = {path: _state(Path(path)) for path in paths}
    yield
    after = {path: _state(Path(path)) for path in paths}
    assert after == before, {path: sorted(set(after[path]) ^ set(before[path])) for path in paths
                             if after[path] != before[path]}
    assert user is None or not _account_lines(user), _account_lines(user)


def _run_engine(tmp_path: Path, script: str, host_paths: tuple[str, ...], *, user: str | None = None,
                mount_points: tuple[str, ...] = (), new_pids: bool = False,
                **variables: str) -> subprocess.CompletedProcess:
    """script run by sh in private mount and network namespaces (and PID namespace: new_pids), as every
    engine test runs its engine: in its environment the busybox image ($IMAGE, made only for a script
    that uses it), the test's directory ($OUT), the guard's command ($BINDGUARD, importing this
    bindguard), the cgroup its engine puts its containers below ($CGROUP_PARENT: the test's own, at the
    top of the host's hierarchies, which the cgroup v1 ones are, shared with the host) and `variables`.
    The engine's directories on the host, host_paths, are left as they were, and no line of the test's
    user is added to the host's account files (_host_unchanged); mount_points the host lacks are made
    for the run and removed after it, and so are the cgroups below the test's parent (the test fails
    naming any still in use)."""
    parent = f"bindguard-test-{uuid.uuid4().hex[:12]}"
    image = {"IMAGE": str(_busybox_image(tmp_path))} if "$IMAGE" in script else {}
    env = dict(os.environ, **image, OUT=str(tmp_path), BINDGUARD=BINDGUARD, PYTHONPATH=os.pathsep.join(sys.path),
               CGROUP_PARENT=f"/{parent}", **variables)
    namespaces = ["--pid", "--fork", "--mount-proc"] if new_pids else []
    try:
        with _mount_points(*mount_points), _host_unchanged(host_paths, user):
            return subprocess.run(["unshare", *namespaces, "--net", "--mount", "--propagation", "private", "--",
                                   "sh", "-c", script], env=env, capture_output=True, text=True, timeout=240)
    finally:
        _remove_cgroups(parent)


def _run_podman(tmp_path: Path, run_web1: str) -> dict:
    """The guard's explain report (JSON) on 0.0.0.0:18080 while web1 runs; the mount point
    /var/lib/containers, if the test made it, goes afterwards."""
    need_engine()
    done = _run_engine(tmp_path, PODMAN_SCRIPT, PODMAN_PATHS, mount_points=("/var/lib/containers",),
                       RUN_WEB1=run_web1)
    assert done.returncode == 0, done.stderr
    return json.loads((tmp_path / "explain.json").read_text())


def test_a_podman_container_is_named_and_stopped_with_podman(tmp_path):
    report = _run_podman(tmp_path, RUN_PUBLISHED)
    held = [c for c in report["conflicts"] if c["kind"] == "listener"]
    assert len(held) == 1, report
    holder = held[0]
    assert holder["name"] == "conmon"
    assert holder["container"]["engine"] == "podman" and holder["container"]["name"] == "web1"
    assert holder["container"]["image"] == "localhost/bindguard-test:1" and holder["container"]["via"] == "conmon"
    assert "`podman stop web1`" in holder["remedy"] and "kill -TERM" not in holder["remedy"]
    nat = [c for c in report["conflicts"] if c["kind"] == "nat-shadowed"]
    assert nat and all(c["nat"]["owner"] == "Podman (netavark)" and c["nat"]["to"].endswith(":8080") for c in nat)
    assert (tmp_path / "check.code").read_text().strip() == "98"
    check = (tmp_path / "check.err").read_text()
    assert "podman container web1, image localhost/bindguard-test:1" in check and "`podman stop web1`" in check


def test_a_podman_container_in_its_own_cgroup_is_named_from_the_cgroup(tmp_path):
    """The listener is the container's own process (host network), named from its cgroup path,
    libpod_parent/libpod-ID, and Podman's containers.json; not from a monitor's command line."""
    report = _run_podman(tmp_path, RUN_HOST_NETWORK)
    held = [c for c in report["conflicts"] if c["kind"] == "listener"]
    assert len(held) == 1, report
    holder = held[0]
    assert holder["name"] == "httpd", holder
    assert holder["container"]["engine"] == "podman" and holder["container"]["name"] == "web1"
    assert holder["container"]["image"] == "localhost/bindguard-test:1" and holder["container"]["via"] == "cgroup"
    assert holder["container"]["source"] == containers.PODMAN_CONTAINERS
    assert "`podman stop web1`" in holder["remedy"] and "kill -TERM" not in holder["remedy"]
    assert "its cgroup is the container's" in holder["remedy"]
    assert (tmp_path / "check.code").read_text().strip() == "98"
    check = (tmp_path / "check.err").read_text()
    assert "podman container web1, image localhost/bindguard-test:1" in check and "`podman stop web1`" in check


# Rootless Podman, run by a user of the test's own: passwd, group, subuid and subgid with that user
# are written in a private copy of /etc in the test's mount namespace, and /run is a tmpfs there, which
# holds its home (ROOTLESS_HOME: not under /home, which may hold this checkout and its python) and
# runtime directory, so the host's files are never changed (nor made, where the host has no /etc/subuid).
# slirp4netns needs /dev/net/tun open to the user: a node of its own,
# mode 666, over the host's (0600 here). crun runs on the cgroup v1 hierarchies (a hybrid host's cgroup2
# part unmounted, as above) and the container has no cgroup (rootless Podman makes none on cgroup v1):
# the port is held by rootlessport alone. Afterwards the user's processes (Podman's pause process) are
# ended by their PIDs: none but the test's run as that user.
ROOTLESS_SCRIPT = "set -eu\n" + PRIVATE_COPY + r"""
as_user() { setpriv --reuid="$TEST_UID" --regid="$TEST_UID" --clear-groups env -i HOME="$TEST_HOME" \
    XDG_RUNTIME_DIR="/run/user/$TEST_UID" PATH=/usr/sbin:/usr/bin:/sbin:/bin USER="$TEST_USER" "$@"; }
cleanup() {
    as_user podman rm -f -t 0 web2 >/dev/null 2>&1 || true
    as_user podman system migrate >/dev/null 2>&1 || true
    for pid in $(pgrep -u "$TEST_UID" || true); do kill -KILL "$pid" 2>/dev/null || true; done
}
mkdir -p "$OUT/dev"
private_copy /etc
echo "$TEST_USER:x:$TEST_UID:$TEST_UID::$TEST_HOME:/bin/sh" >> /etc/passwd
echo "$TEST_USER:x:$TEST_UID:" >> /etc/group
echo "$TEST_USER:200000:65536" > /etc/subuid
echo "$TEST_USER:200000:65536" > /etc/subgid
mount -t tmpfs -o mode=755 tmpfs "$OUT/dev"
mknod -m 666 "$OUT/dev/tun" c 10 200
mount --bind "$OUT/dev/tun" /dev/net/tun
mount -t tmpfs tmpfs /run
trap cleanup EXIT  # only once the user's home and runtime directory are the test's
mkdir -p /run/lock "/run/user/$TEST_UID" "$TEST_HOME"
chown "$TEST_UID:$TEST_UID" "/run/user/$TEST_UID" "$TEST_HOME"
chmod 700 "/run/user/$TEST_UID"
if [ ! -e /sys/fs/cgroup/cgroup.controllers ] && mountpoint -q /sys/fs/cgroup/unified; then
    umount /sys/fs/cgroup/unified
fi
ip link set lo up
cd /
install -o "$TEST_UID" -m 600 "$IMAGE" "$TEST_HOME/image.tar"
as_user podman import -q "$TEST_HOME/image.tar" localhost/bindguard-test:1 >/dev/null
as_user podman run -d -q --name web2 --stop-timeout 1 --cgroups disabled --ulimit nofile=1024:1024 \
    --ulimit nproc=4096:4096 -p 18081:8080 localhost/bindguard-test:1 /bin/httpd -f -p 8080 >/dev/null
ss -ltnp 'sport = :18081' > "$OUT/ss.txt"
$BINDGUARD explain --no-systemd --json 0.0.0.0:18081 > "$OUT/explain.json" 2> "$OUT/explain.err" || true
set +e
$BINDGUARD check --no-systemd --wait 0 0.0.0.0:18081 2> "$OUT/check.err"
echo $? > "$OUT/check.code"
set -e
# The remedy's own command, as the guard wrote it, run as from a root login, whose pam_systemd set root's
# runtime directory and bus; then the port is free.
mkdir -m 700 -p /run/user/0
XDG_RUNTIME_DIR=/run/user/0 DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/0/bus \
    sh -c "$(sed -n 's/.*`\(runuser [^`]*\)`.*/\1/p' "$OUT/check.err" | head -n 1)" > "$OUT/remedy.out" 2>&1 || true
set +e
$BINDGUARD check --no-systemd --wait 0 0.0.0.0:18081 2> "$OUT/after.err"
echo $? > "$OUT/after.code"
"""
ROOTLESS_USER = "bgrootless"
ROOTLESS_HOME = f"/run/home/{ROOTLESS_USER}"  # on the script's own /run


def _free_uid() -> int:
    """A uid no user and no process has: the test's rootless user's."""
    import pwd

    taken = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                taken.add(os.stat(f"/proc/{pid}").st_uid)
            except OSError:
                continue
    for uid in range(64990, 60000, -1):
        try:
            pwd.getpwuid(uid)
        except KeyError:
            if uid not in taken:
                return uid
    raise AssertionError("no free uid for the test's user")


def test_a_rootless_podman_container_behind_rootlessport_is_named_with_its_user(tmp_path):
    """rootlessport holds the published port as the container's user: the container is named from
    that user's Podman storage, and the remedy is that user's `podman stop`, which frees the port."""
    need_engine("/usr/bin/newuidmap", "/usr/bin/slirp4netns", "/usr/lib/podman/rootlessport")
    uid = _free_uid()
    done = _run_engine(tmp_path, ROOTLESS_SCRIPT, (), user=ROOTLESS_USER, TEST_UID=str(uid), TEST_USER=ROOTLESS_USER,
                       TEST_HOME=ROOTLESS_HOME)
    assert done.returncode == 0, done.stderr
    assert '"rootlessport"' in (tmp_path / "ss.txt").read_text()
    report = json.loads((tmp_path / "explain.json").read_text())
    held = [c for c in report["conflicts"] if c["kind"] == "listener"]
    assert len(held) == 1, report
    holder = held[0]
    assert holder["name"] == "rootlessport" and holder["user"] == ROOTLESS_USER, holder
    container = holder["container"]
    assert (container["engine"], container["name"], container["image"], container["via"], container["user"]) == (
        "podman", "web2", "localhost/bindguard-test:1", "rootlessport", ROOTLESS_USER), container
    storage = f"{ROOTLESS_HOME}/{containers.ROOTLESS_STORAGE}"  # the user's home, from its passwd entry
    assert container["source"] in {listed.format(storage=storage) for listed in containers.PODMAN_LISTS}, container
    assert (f"`runuser -u {ROOTLESS_USER} -- env -u XDG_RUNTIME_DIR -u DBUS_SESSION_BUS_ADDRESS podman stop web2`"
            in holder["remedy"]) and "kill -" not in holder["remedy"]
    assert (tmp_path / "check.code").read_text().strip() == "98"
    check = (tmp_path / "check.err").read_text()
    assert f"podman container web2 of user {ROOTLESS_USER}, image localhost/bindguard-test:1" in check
    assert (tmp_path / "after.code").read_text().strip() == "0", (tmp_path / "remedy.out").read_text()
    left = subprocess.run(["pgrep", "--runstates", "D,R,S,T,t", "-u", str(uid)], capture_output=True, text=True)
    assert not left.stdout, left  # nothing of the test's runs on (a zombie is left for PID 1 to reap)


@contextlib.contextmanager
def _nobodys_process():
    """A process of the user nobody's, alive for the block: a program any user could run."""
    process = subprocess.Popen(["sleep", "30"], user=NOBODY, group=NOBODY)
    try:
        yield process
    finally:
        process.kill()
        process.wait()


@pytest.fixture
def named_sleep():
    """named_sleep(NAME[, PROGRAM]): the path of a copy of /bin/sleep (or PROGRAM) called NAME (its
    process's comm), in a directory of root's that every user may run programs from, removed after
    the test."""
    import tempfile

    where = Path(tempfile.mkdtemp(prefix="bindguard-names-"))
    where.chmod(0o755)

    def copy(name: str, program: str = "/bin/sleep") -> str:
        # A new file renamed over the last copy of that name, never written into it: a process of it
        # killed a moment ago may still run it, and opening it to write would fail (ETXTBSY).
        staged = where / f".{name}.new"
        shutil.copy2(program, staged)
        os.replace(staged, where / name)
        return str(where / name)

    try:
        yield copy
    finally:
        shutil.rmtree(where)


def _status_uid(pid: int) -> int | None:
    from bindguard.evidence import owners

    ids = owners.status_ids(pid)
    return ids[0] if ids else None


def _until(ready, what: str) -> None:
    deadline = time.monotonic() + 10
    while not ready():
        assert time.monotonic() < deadline, f"not ready in 10 s: {what}"
        time.sleep(0.02)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def test_a_rootlessport_that_forwards_into_no_container_names_none(named_sleep):
    """A user's program called rootlessport, with no container of that user's behind it, is no container:
    in a network namespace of its own, as the real one's child forwards into, so that what decides is
    that no conmon of the user's has a child there (or, where the guard checks it, its program)."""
    need_root("another user's process in a network namespace")
    packaged = containers.ROOTLESSPORT_PROGRAMS[0]  # the packaged program: its check passes, the namespace's decides
    need_engine(packaged)
    impostor = subprocess.Popen(["unshare", "--net", "--", *AS_NOBODY, packaged], stdin=subprocess.PIPE)
    try:
        _until(lambda: _comm(impostor.pid) == "rootlessport", "the impostor's exec")
        assert containers.runs_rootlessport(impostor.pid)
        assert os.stat(f"/proc/{impostor.pid}/ns/net") != os.stat("/proc/self/ns/net")
        assert _status_uid(impostor.pid) == NOBODY
        from bindguard.evidence import owners

        facts = owners.process_facts(impostor.pid)
        assert facts is not None and facts.cmdline[0].endswith("/rootlessport") and facts.container is None, facts
    finally:
        impostor.kill()
        impostor.wait()


def test_a_name_from_a_users_file_is_no_shell_text():
    fact = ContainerFact("podman", ID, "web2; rm -rf ~", user="bob", via="rootlessport")
    assert fact.handle == ID[:12]
    assert "`runuser -u bob -- env -u XDG_RUNTIME_DIR -u DBUS_SESSION_BUS_ADDRESS podman stop f70f59f8dfac`" in \
        remedy(_conflict(fact))
    assert ContainerFact("podman", ID, "web-2_a.b").handle == "web-2_a.b"
    assert ContainerFact("podman", ID, "-rf").handle == ID[:12]  # an option, not a name


@pytest.mark.parametrize("pod, namespace", [("api;reboot", "prod"), ("api", "$(reboot)"), ("api", "-A")])
def test_a_pod_or_namespace_that_is_no_plain_word_is_in_no_command(pod, namespace):
    text = remedy(_conflict(ContainerFact("containerd", ID, "api", pod=pod, namespace=namespace, via="cgroup")))
    assert f"the pod {pod} in namespace {namespace}" in text
    assert not any(pod in c or namespace in c for c in quoted_commands(text)), text
    plain = remedy(_conflict(ContainerFact("containerd", ID, "api", pod="api-5f6", namespace="prod", via="cgroup")))
    assert "`kubectl -n prod get pod api-5f6 -o yaml`" in plain


@pytest.mark.parametrize("user", ["bob;reboot", "ad\\bob", "bob smith", "-bob"])
def test_a_rootless_users_name_that_is_no_plain_word_is_in_no_command(user):
    text = remedy(_conflict(ContainerFact("podman", ID, "web2", user=user, via="rootlessport")))
    assert f"as its user {user}" in text and "`podman stop web2`" in text
    assert not any(user in c for c in quoted_commands(text)) and "runuser" not in text, text


# Debian's Docker engine (docker.io), run by hand in private PID, mount and network namespaces: its
# data root, /etc/docker (where it writes key.json) and /run are tmpfs there (the data root at the
# default /var/lib/docker; a mount point the host lacks is made for the test), vfs storage, cgroupfs
# on the cgroup v1 hierarchies (a hybrid host's cgroup2 part unmounted, as for Podman; its containers'
# docker/ID below a parent of the test's own, not the host's /docker), its bridge and
# iptables-nft rules in the namespace. dockerd starts its own containerd; everything the test ran ends
# with the PID namespace. web3 publishes a port through docker-proxy (and a DNAT rule), web4 runs on
# the host's network.
DOCKER_SCRIPT = r"""
set -eu
docker=/usr/bin/docker  # Debian's client, as its engine's (another may come first in PATH)
cleanup() {
    $docker rm -f web3 web4 >/dev/null 2>&1 || true
    if [ -s /run/docker.pid ]; then
        pid=$(cat /run/docker.pid); kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
}
mount -t tmpfs tmpfs /var/lib/docker
mount -t tmpfs tmpfs /etc/docker
mount -t tmpfs tmpfs /run
trap cleanup EXIT  # only once /run is the test's: the host's docker.sock and docker.pid are not
mkdir -p /run/lock
if [ ! -e /sys/fs/cgroup/cgroup.controllers ] && mountpoint -q /sys/fs/cgroup/unified; then
    umount /sys/fs/cgroup/unified
fi
ip link set lo up
dockerd --storage-driver vfs --exec-opt native.cgroupdriver=cgroupfs --cgroup-parent "$CGROUP_PARENT/docker" \
    $DOCKERD_OPTIONS > "$OUT/dockerd.log" 2>&1 &
for _ in $(seq 1 120); do $docker info >/dev/null 2>&1 && break; sleep 0.5; done
$docker import "$IMAGE" bindguard-test:1 >/dev/null
$docker run -d --name web3 --stop-timeout 1 -p 18082:8080 bindguard-test:1 /bin/httpd -f -p 8080 >/dev/null
$docker run -d --name web4 --stop-timeout 1 --network host bindguard-test:1 /bin/httpd -f -p 18083 >/dev/null
cp "/var/lib/docker/containers/$($docker inspect -f '{{.Id}}' web3)/config.v2.json" "$OUT/config.v2.json"
for port in 18082 18083; do
    $BINDGUARD explain --no-systemd --json 0.0.0.0:$port > "$OUT/explain-$port.json" 2> "$OUT/explain.err" || true
done
set +e
$BINDGUARD check --no-systemd --wait 0 0.0.0.0:18082 2> "$OUT/check.err"
echo $? > "$OUT/check.code"
set -e
# The remedy's own command, as the guard wrote it (if it wrote one); then the port is free.
$(sed -n 's/[^`]*`\(docker stop [^`]*\)`.*/\1/p' "$OUT/check.err" | head -n 1 | sed "s|^docker|$docker|") >/dev/null
set +e
$BINDGUARD check --no-systemd --wait 0 0.0.0.0:18082 2> "$OUT/after.err"
echo $? > "$OUT/after.code"
"""
DOCKER_PROGRAMS = ("/usr/sbin/dockerd", "/usr/bin/docker", "/usr/sbin/docker-proxy", "/usr/bin/containerd",
                   "/usr/sbin/runc")


def _run_docker(tmp_path: Path, dockerd_options: str = "") -> None:
    """DOCKER_SCRIPT's run; the mount points /var/lib/docker and /etc/docker, if the test made them,
    go afterwards."""
    need_engine(*DOCKER_PROGRAMS)
    done = _run_engine(tmp_path, DOCKER_SCRIPT, DOCKER_PATHS, mount_points=("/var/lib/docker", "/etc/docker"),
                       new_pids=True, DOCKERD_OPTIONS=dockerd_options)
    log = (tmp_path / "dockerd.log").read_text() if (tmp_path / "dockerd.log").exists() else ""
    assert done.returncode == 0, f"{done.stderr}\ndockerd: {log[-3000:]}"


def _assert_web3_named(tmp_path: Path, holder: str, via: str) -> None:
    """Every listener on web3's published port is `holder`, named as web3 (reached `via`) with
    `docker stop web3` as its fix, Docker's DNAT rule takes the port's traffic too, the guard refused
    (98), and the fix freed the port."""
    report = json.loads((tmp_path / "explain-18082.json").read_text())
    held = [c for c in report["conflicts"] if c["kind"] == "listener"]
    assert held, report
    for conflict in held:
        assert conflict["name"] == holder, conflict
        container = conflict["container"]
        assert (container["engine"], container["name"], container["image"], container["via"]) == (
            "docker", "web3", "bindguard-test:1", via), container
        assert "`docker stop web3`" in conflict["remedy"] and "kill -" not in conflict["remedy"]
    nat = [c for c in report["conflicts"] if c["kind"] == "nat-shadowed"]
    assert nat and all(c["nat"]["owner"] == "Docker" and c["nat"]["to"].endswith(":8080") for c in nat), report
    assert (tmp_path / "check.code").read_text().strip() == "98"
    assert "docker container web3, image bindguard-test:1" in (tmp_path / "check.err").read_text()
    assert (tmp_path / "after.code").read_text().strip() == "0", (tmp_path / "after.err").read_text()


def test_a_docker_container_behind_docker_proxy_is_named_and_stopped_with_docker(tmp_path):
    """docker-proxy, root's child of root's dockerd, holds web3's published port: the container is the
    running one whose config.v2.json has -container-ip and publishes -container-port on -host-port. The
    fix's `docker stop web3` frees the port. web4 on the host's network is named from its cgroup."""
    _run_docker(tmp_path)
    _assert_web3_named(tmp_path, "docker-proxy", "docker-proxy")
    host = json.loads((tmp_path / "explain-18083.json").read_text())
    held = [c for c in host["conflicts"] if c["kind"] == "listener"]
    assert len(held) == 1 and held[0]["name"] == "httpd", host
    container = held[0]["container"]
    assert (container["engine"], container["name"], container["image"], container["via"]) == (
        "docker", "web4", "bindguard-test:1", "cgroup"), container
    assert "`docker stop web4`" in held[0]["remedy"]
    state = json.loads((tmp_path / "config.v2.json").read_text())
    ip = next(iter(state["NetworkSettings"]["Networks"].values()))["IPAddress"]
    assert containers.docker_publishes(state, "18082", "tcp", ip, "8080")


def test_a_port_dockerd_holds_itself_without_its_proxy_is_named_as_the_container(tmp_path):
    """With --userland-proxy=false a DNAT rule takes web3's traffic, and dockerd binds the published
    port itself so that nothing else takes it: the daemon's bind would fail. The holder is named as
    web3 (not dockerd, whose stop would stop every container), and the fix's `docker stop web3` frees it."""
    _run_docker(tmp_path, "--userland-proxy=false")
    _assert_web3_named(tmp_path, "dockerd", "dockerd")


@contextlib.contextmanager
def _dockerd_with_proxy(named_sleep, dockerd_uid: int, proxy_uid: int):
    """A process called dockerd run as dockerd_uid whose child called docker-proxy runs as proxy_uid
    (root's or nobody's: a nobody's dockerd drops root after starting its child); the child's PID."""
    runs_as = {0: "", NOBODY: " ".join(AS_NOBODY)}
    script = f'{runs_as[proxy_uid]} "$1" 30 & exec {runs_as[dockerd_uid]} "$2" 30'
    dockerd = subprocess.Popen(["sh", "-c", script, "sh", named_sleep("docker-proxy"), named_sleep("dockerd")])
    proxies: list[int] = []

    def started() -> bool:
        children = Path(f"/proc/{dockerd.pid}/task/{dockerd.pid}/children").read_text().split()
        proxies[:] = [int(c) for c in children if _comm(int(c)) == "docker-proxy"]
        return _comm(dockerd.pid) == "dockerd" and len(proxies) == 1

    try:
        _until(started, "dockerd and its docker-proxy")
        assert (_status_uid(dockerd.pid), _status_uid(proxies[0])) == (dockerd_uid, proxy_uid)
        yield proxies[0]
    finally:
        for pid in proxies:
            os.kill(pid, 9)
        dockerd.kill()
        dockerd.wait()


def test_only_roots_docker_proxy_child_of_roots_dockerd_names_a_container(named_sleep, tmp_path, monkeypatch):
    """Anyone can run a program called docker-proxy with a container's address: only root's, whose
    parent is root's dockerd, is believed; each check decides for a process that passes every other,
    against Docker's state that names the container for root's pair."""
    need_root("processes of other users")
    recorded = json.loads(DOCKER_RECORDED.read_text())
    (tmp_path / recorded["ID"]).mkdir()
    shutil.copy(DOCKER_RECORDED, tmp_path / recorded["ID"] / "config.v2.json")
    docker_states_in(tmp_path, monkeypatch)
    argv = ("/usr/sbin/docker-proxy", "-proto", "tcp", "-host-ip", "0.0.0.0", "-host-port", "18082",
            "-container-ip", "172.17.0.2", "-container-port", "8080")
    for dockerd_uid, proxy_uid, named in ((0, 0, "web"), (0, NOBODY, None), (NOBODY, 0, None)):
        with _dockerd_with_proxy(named_sleep, dockerd_uid, proxy_uid) as proxy:
            fact = containers.container_of(proxy, "0::/\n", argv, _status_uid(proxy))
            assert (fact.name if fact else None) == named, (dockerd_uid, proxy_uid, fact)
    with _nobodys_process() as impostor:
        assert containers.container_of(impostor.pid, "0::/\n", argv, NOBODY) is None
    assert containers.container_of(os.getpid(), "0::/\n", argv, 0) is None  # root's, but its parent is no dockerd


CONMON_ARGV = ["/usr/bin/conmon", "-", "-c", ID, "-n", "web1"]  # python reading its program from stdin


def _named_conmon(user: int | None = None) -> subprocess.Popen:
    """A real process (Debian's python3, which nobody may run too; its argv[0] conmon's path) whose
    command line is conmon's naming a container."""
    proc = subprocess.Popen(CONMON_ARGV, executable="/usr/bin/python3", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            user=user, group=user, text=True)
    proc.stdin.write("import sys, time; print(flush=True); time.sleep(30)\n")
    proc.stdin.close()
    proc.stdout.readline()  # it runs the program: its command line is conmon's
    return proc


def test_a_conmon_that_is_not_root_names_no_container():
    """Anyone can run a program called conmon with a real container's id: a non-root one is not
    taken for rootful Podman's monitor (its remedy would stop someone else's container)."""
    from bindguard.evidence import owners

    for user, named in ((NOBODY, False), (None, True)):  # nobody's is not named; root's is
        conmon = _named_conmon(user)
        try:
            facts = owners.process_facts(conmon.pid)
            assert facts.cmdline == tuple(CONMON_ARGV)
            assert (facts.container is not None and facts.container.via == "conmon") == named, facts
        finally:
            conmon.kill()
            conmon.wait()


READS = r"""
import json, sys
opened = []
sys.addaudithook(lambda event, args: opened.append(args[0]) if event == "open" and isinstance(args[0], str) else None)
from bindguard.evidence import owners
facts = owners.process_facts(int(sys.argv[1]))
print(json.dumps([facts.container.via, opened]))
"""


def test_a_holders_proc_files_are_read_once(tmp_path):
    """process_facts reads /proc/PID/status and /proc/PID/cgroup once each, and the container lookup
    takes what it read (one bound, one read), also for conmon, whose real uid decides."""
    conmon = _named_conmon()
    try:
        done = subprocess.run([sys.executable, "-c", READS, str(conmon.pid)], capture_output=True, text=True,
                              timeout=60, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    finally:
        conmon.kill()
        conmon.wait()
    assert done.returncode == 0, done.stderr
    via, opened = json.loads(done.stdout)
    assert via == "conmon"
    for name in ("status", "cgroup"):
        assert opened.count(f"/proc/{conmon.pid}/{name}") == 1, opened


def test_a_state_file_nested_too_deep_names_the_container_by_engine_and_id(tmp_path, monkeypatch):
    """json raises RecursionError, not ValueError, for nesting deeper than the interpreter's stack: a
    file of the engine's (a rootless user's own containers.json, and the metadata text in it) that
    nests so is a file that names nothing, not a traceback."""
    deep = "[" * 200_000 + "]" * 200_000
    docker = tmp_path / "docker" / ID
    docker.mkdir(parents=True)
    (docker / "config.v2.json").write_text(deep)
    monkeypatch.setattr(containers, "DOCKER_STATE", str(tmp_path / "docker" / "{id}" / "config.v2.json"))
    fact = containers.container_of(os.getpid(), f"0::/system.slice/docker-{ID}.scope\n", (), 0)
    assert (fact.engine, fact.id, fact.name, fact.source) == ("docker", ID, "", "")
    storage = tmp_path / "storage"
    (storage / "overlay-containers").mkdir(parents=True)
    (storage / "overlay-containers" / "containers.json").write_text(json.dumps([{"id": ID, "metadata": deep}]))
    fact = containers._from_podman(ID, str(storage))
    assert (fact.engine, fact.id, fact.name) == ("podman", ID, "")
    (storage / "overlay-containers" / "containers.json").write_text(deep)
    assert containers._from_podman(ID, str(storage)) == ContainerFact("podman", ID)


# A conmon of the user's own making (Debian's python3 copied as conmon, reading its program from stdin,
# `-c ID` on its command line) whose child is a program of theirs called rootlessport: in the network
# namespace the conmon runs in, its child's, as the real rootlessport's child forwards into.
FAKE_CONMON = """\
import subprocess, sys
child = subprocess.Popen([sys.argv[-1], "30"])
print(child.pid, flush=True)
child.wait()
"""


def test_a_rootlessport_that_is_not_podmans_program_names_no_container(named_sleep):
    """Only Podman's packaged rootlessport (/proc/PID/exe, a file root alone can change) is taken for
    the forwarder: a user's program so named, behind which a conmon of the user's own has a child in
    the namespace it serves, would name a container, and advise a stop, that are the user's fiction."""
    need_root("another user's processes in a network namespace")
    rootlessport = named_sleep("rootlessport")
    conmon = _python_called(named_sleep, "conmon")
    fake = subprocess.Popen(["unshare", "--net", "--", *AS_NOBODY, conmon, "-", "-c", ID, "-n", "web1",
                             rootlessport], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    child = None
    try:
        fake.stdin.write(FAKE_CONMON)
        fake.stdin.close()
        child = int(fake.stdout.readline())
        _until(lambda: _comm(child) == "rootlessport", "the impostor's exec")
        assert _comm(fake.pid) == "conmon" and _status_uid(child) == NOBODY
        assert containers._conmons_of(NOBODY) == [(fake.pid, ID)]  # all the rest would name ID
        assert not containers.runs_rootlessport(child)
        from bindguard.evidence import owners

        facts = owners.process_facts(child)
        assert facts is not None and facts.container is None, facts
    finally:
        if child is not None:  # the fake conmon's child: ended by its PID, not left to sleep on
            os.kill(child, 9)
        fake.kill()
        fake.wait()


def test_podmans_rootlessport_is_known_by_its_file_not_by_the_path_its_process_sees(named_sleep):
    """/proc/PID/exe names the program as the process's own mount namespace sees it: a user may
    `unshare -Urm`, mount a program of theirs over Podman's packaged rootlessport, and run it by that
    path. The program is the file the guard finds at the packaged path (device and inode), so the
    mounted one is not believed, and the packaged one, run by the same user, still is."""
    packaged = containers.ROOTLESSPORT_PROGRAMS[0]
    need_engine(packaged)
    genuine = subprocess.Popen([*AS_NOBODY, packaged], stdin=subprocess.PIPE)  # waits for its config
    impostor = subprocess.Popen(["unshare", "-Urm", "--", "sh", "-c",
                                 f'mount --bind "$0" {packaged} && exec {packaged} 30', named_sleep("rootlessport")],
                                user=NOBODY, group=NOBODY)
    try:
        _until(lambda: _comm(genuine.pid) == "rootlessport" and _comm(impostor.pid) == "rootlessport",
               "the programs' exec")
        assert os.readlink(f"/proc/{impostor.pid}/exe") == packaged  # what the name alone would believe
        assert _status_uid(impostor.pid) == NOBODY == _status_uid(genuine.pid)
        assert not containers.runs_rootlessport(impostor.pid)
        assert containers.runs_rootlessport(genuine.pid)
    finally:
        for process in (genuine, impostor):
            process.kill()
            process.wait()


def test_a_name_and_image_from_a_users_own_file_are_bounded(tmp_path):
    """A rootless user's containers.json may name a container in MiB: the name and image kept are cut
    to containers.ENGINE_TEXT_MAX characters, marked so (…), and a cut name is never the engine's
    handle. Root's storage is bounded alike; a name within the bound is kept whole."""
    storage = tmp_path / "storage"
    (storage / "overlay-containers").mkdir(parents=True)
    long = "w" * (1 << 20)
    (storage / "overlay-containers" / "containers.json").write_text(json.dumps(
        [{"id": ID, "names": [long], "metadata": json.dumps({"image-name": "i" * (1 << 20)})}]))
    fact = containers._from_podman(ID, str(storage), owner=os.getuid())
    limit = containers.ENGINE_TEXT_MAX
    assert fact.name == "w" * limit + "…" and fact.image == "i" * limit + "…"
    assert fact.handle == ID[:12] and len(fact.label) < 3 * limit, fact.label
    text = remedy(_conflict(fact))
    assert long not in text and f"podman stop {ID[:12]}" in text
    assert containers._from_podman(ID, str(storage)).name == "w" * limit + "…"  # root's storage: bounded too
    (storage / "overlay-containers" / "containers.json").write_text(json.dumps(
        [{"id": ID, "names": ["w" * limit], "metadata": json.dumps({"image-name": "i" * limit})}]))
    root = containers._from_podman(ID, str(storage))  # within the bound: as written
    assert (root.name, root.image, root.handle) == ("w" * limit, "i" * limit, "w" * limit)


# A process holding 127.0.0.1:18084 in a cgroup named as Docker names a container's (docker-ID.scope,
# below the test's own parent), and that container's config.v2.json in a tmpfs over /var/lib/docker,
# in private mount and network namespaces: the guard reads it as Docker's, no engine running. For each
# state in $STATES ($OUT/STATE.json, copied into place in turn) the guard's check (STATE.err, STATE.code)
# and explain --json (STATE.out) on the same holder.
ENGINE_TEXT_SCRIPT = r"""
set -eu
mount -t tmpfs tmpfs /var/lib/docker
ip link set lo up
if [ -e /sys/fs/cgroup/cgroup.controllers ]; then top=/sys/fs/cgroup; else top=/sys/fs/cgroup/pids; fi
scope="$top$CGROUP_PARENT/docker-$CONTAINER_ID.scope"
mkdir -p "$scope" "/var/lib/docker/containers/$CONTAINER_ID"
"$PYTHON" -c 'import socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", 18084)); s.listen(); open(sys.argv[1], "w").close(); time.sleep(60)' \
    "$OUT/listening" &
holder=$!
trap 'kill -KILL $holder; wait $holder || true' EXIT
echo $holder > "$scope/cgroup.procs"
for _ in $(seq 1 100); do [ -e "$OUT/listening" ] && break; sleep 0.1; done
[ -e "$OUT/listening" ]
for state in $STATES; do
    cp "$OUT/$state.json" "/var/lib/docker/containers/$CONTAINER_ID/config.v2.json"
    set +e
    $BINDGUARD check --no-systemd --wait 0 127.0.0.1:18084 2> "$OUT/$state.err"
    echo $? > "$OUT/$state.code"
    $BINDGUARD explain --no-systemd --json 127.0.0.1:18084 > "$OUT/$state.out" 2> /dev/null
    set -e
done
"""
# What a container's name or label may hold to reach a terminal or the journal: a terminal's escapes
# (clear the screen, set its title, CSI in C1), and a line of its own forging a clear start.
HOSTILE = "\x1b[2J\x1b]0;owned\x07\nbindguard: clear: 127.0.0.1:18084 can be bound\r\x9b31m"


def test_a_name_and_label_of_any_length_reach_the_report_bounded_escaped_and_marked(tmp_path):
    """`docker run --name`/`--label` (or a pod spec) chooses the text in Docker's config.v2.json, not
    the host's administrator: a name and a pod label of 100,000 characters with a terminal's escapes
    reach the refusal and the JSON as their first containers.ENGINE_TEXT_MAX characters, marked '…',
    control characters escaped in the report; everything else (verdict, exit code, remedy, JSON) is
    what the same text within the bound gives."""
    need_root("a container's cgroup")
    limit = containers.ENGINE_TEXT_MAX
    name, pod = "web5" + HOSTILE, "api-7d4" + HOSTILE
    long_name, long_pod = name + "n" * 100_000, pod + "p" * 100_000
    recorded = json.loads(DOCKER_RECORDED.read_text())
    for state, (its_name, its_pod) in {"within": (name, pod), "beyond": (long_name, long_pod)}.items():
        recorded["Name"] = "/" + its_name
        recorded["Config"]["Labels"]["io.kubernetes.pod.name"] = its_pod
        (tmp_path / f"{state}.json").write_text(json.dumps(recorded))
    done = _run_engine(tmp_path, ENGINE_TEXT_SCRIPT, ("/var/lib/docker",), mount_points=("/var/lib/docker",),
                       STATES="within beyond", CONTAINER_ID=ID, PYTHON=sys.executable)
    assert done.returncode == 0, done.stderr
    cut_name, cut_pod = long_name[:limit] + "…", long_pod[:limit] + "…"

    def report(state: str) -> str:
        return re.sub(r"started \d+ s ago", "started N s ago", (tmp_path / f"{state}.err").read_text())

    within, beyond = report("within"), report("beyond")
    assert (tmp_path / "within.code").read_text() == (tmp_path / "beyond.code").read_text() == "98\n"
    assert f"docker container {escape(name)}, image bindguard-test:1, pod shop/{escape(pod)}" in within, within
    assert beyond == within.replace(escape(name), escape(cut_name)).replace(escape(pod), escape(cut_pod)), beyond
    assert not any(c in beyond for c in "\x1b\x9b\x07\r"), repr(beyond)
    assert not any(line.startswith("bindguard: clear") for line in beyond.splitlines())
    assert "n" * limit not in beyond and len(beyond) < len(within) + 8 * limit

    def seen(value, cut: bool):  # a JSON document but its age; cut: with the cut text where the whole text was
        if isinstance(value, str):
            return value.replace(name, cut_name).replace(pod, cut_pod) if cut else value
        if isinstance(value, list):
            return [seen(v, cut) for v in value]
        if isinstance(value, dict):
            return {k: seen(v, cut) for k, v in value.items() if k != "started_ago_s"}
        return value

    docs = {state: json.loads((tmp_path / f"{state}.out").read_text()) for state in ("within", "beyond")}
    (held,) = [c for c in docs["beyond"]["conflicts"] if c["kind"] == "listener"]
    assert (held["container"]["name"], held["container"]["pod"]) == (cut_name, cut_pod)  # JSON escapes them itself
    assert seen(docs["beyond"], cut=False) == seen(docs["within"], cut=True)
    # What is kept of Docker's states for a docker-proxy's or dockerd's port is bounded alike, and names
    # the container as its cgroup does.
    state = json.loads((tmp_path / "beyond.json").read_text())
    kept, path = containers._docker_kept(state), str(tmp_path / "beyond.json")
    assert len(json.dumps(kept)) < 4096, kept
    assert containers._docker_fact(ID, kept, path) == containers._docker_fact(ID, state, path)


def docker_states_in(tmp_path, monkeypatch) -> list[str]:
    """Docker's container states taken from tmp_path/ID/config.v2.json, none read yet in this run;
    the list each read of a state file is appended to."""
    monkeypatch.setattr(containers, "DOCKER_CONTAINERS", str(tmp_path))
    monkeypatch.setattr(containers, "DOCKER_STATE", str(tmp_path / "{id}" / "config.v2.json"))
    monkeypatch.setattr(containers, "_docker_states_read", {})
    monkeypatch.setattr(containers, "_docker_seconds_left", [])
    read_json, reads = containers._read_json, []
    monkeypatch.setattr(containers, "_read_json", lambda path, *args: (reads.append(path), read_json(path, *args))[1])
    return reads


def test_dockers_states_are_read_once_for_every_port_dockerd_holds_and_within_a_time(tmp_path, monkeypatch):
    """dockerd holds each port it publishes with its proxy off: the lookup for each reads Docker's
    states once in a run while their files stay as they were (each look lists them again), a file
    again once it changes, and not past the run's DOCKER_SECONDS, after which no container is named
    (one not read could publish the port too)."""
    need_root("root's dockerd: the lookup believes a holder whose real uid is root's")
    recorded = json.loads(DOCKER_RECORDED.read_text())
    for cid in (recorded["ID"], "a" * 64, "b" * 64):
        (tmp_path / cid).mkdir()
        (tmp_path / cid / "config.v2.json").write_text(json.dumps(recorded if cid == recorded["ID"] else {}))
    reads = docker_states_in(tmp_path, monkeypatch)
    look = containers.DockerLook()
    for port in range(18000, 18010):
        look.dockerd_container(os.getpid(), "tcp", port, "0.0.0.0")
    assert len(reads) == 3, reads
    web = containers.DockerLook().dockerd_container(os.getpid(), "tcp", 18082, "0.0.0.0")  # another look
    assert web == ContainerFact("docker", recorded["ID"], "web", "bindguard-test:1", "web-7d4", "shop", "dockerd",
                                str(tmp_path / recorded["ID"] / "config.v2.json")), web
    assert len(reads) == 3  # named from what was kept of its state
    (tmp_path / ("a" * 64) / "config.v2.json").write_text("{ }")  # Docker replaced a state
    containers.DockerLook().dockerd_container(os.getpid(), "tcp", 18000, "0.0.0.0")
    assert reads[3:] == [str(tmp_path / ("a" * 64) / "config.v2.json")], reads
    monkeypatch.setattr(containers, "_docker_seconds_left", [0.0])  # the run's reading time spent
    # nothing changed: named from what was kept
    assert containers.DockerLook().dockerd_container(os.getpid(), "tcp", 18082, "0.0.0.0").name == "web"
    (tmp_path / ("b" * 64) / "config.v2.json").write_text("{  }")
    assert containers.DockerLook().dockerd_container(os.getpid(), "tcp", 18082, "0.0.0.0") is None
    assert len(reads) == 4


def _python_called(named_sleep, name: str) -> str:
    """A copy of Debian's python3 called name (its process's comm), reading its program from stdin."""
    return named_sleep(name, os.path.realpath("/usr/bin/python3"))


# A process called dockerd (Debian's python3 copied so, reading its program from stdin) holding listeners
# on loopback, as root's dockerd holds the ports it publishes with its proxy off.
FAKE_DOCKERD = """\
import json, socket, time
held = [socket.create_server(("127.0.0.1", 0)) for _ in range(8)]
print(json.dumps([s.getsockname()[1] for s in held]), flush=True)
time.sleep(30)
"""
# One look at the holders of the ports in argv[3], with Docker's states in argv[2]: how often dockerd's
# (argv[1]) /proc/PID/status was opened and the states' directory listed, and the container named for each port.
DOCKERD_LOOK = r"""
import json, sys
from bindguard.evidence import containers, owners, sockets
pid, states, ports = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
containers.DOCKER_CONTAINERS, containers.DOCKER_STATE = states, states + "/{id}/config.v2.json"
held = [s for s in sockets.listening_sockets("tcp") if s.local.port in ports]
asked = []
sys.addaudithook(lambda event, args: asked.append(args[0]) if event in ("open", "os.listdir") else None)
found = owners.holders_of(held)
named = {s.local.port: getattr(found.first(s.inode).container, "name", None) for s in held}
print(json.dumps([asked.count(f"/proc/{pid}/status"), asked.count(states), named]))
"""


def test_a_look_at_every_port_dockerd_holds_reads_its_uid_and_lists_dockers_states_once(named_sleep, tmp_path):
    """holders_of for the ports one dockerd holds: its real uid (/proc/PID/status) is read once for its
    process facts and once for the container lookup, and Docker's states are listed once, not once a
    port; the port a container publishes is still named as that container, and no other."""
    need_root("root's dockerd: the lookup believes a holder whose real uid is root's")
    dockerd = _python_called(named_sleep, "dockerd")
    recorded = json.loads(DOCKER_RECORDED.read_text())
    process = subprocess.Popen([dockerd, "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        process.stdin.write(FAKE_DOCKERD)
        process.stdin.close()
        ports = json.loads(process.stdout.readline())
        recorded["NetworkSettings"]["Ports"]["8080/tcp"] = [{"HostIp": "", "HostPort": str(ports[0])}]
        for cid, state in ((recorded["ID"], recorded), ("a" * 64, {})):
            (tmp_path / cid).mkdir()
            (tmp_path / cid / "config.v2.json").write_text(json.dumps(state))
        done = subprocess.run([sys.executable, "-c", DOCKERD_LOOK, str(process.pid), str(tmp_path), json.dumps(ports)],
                              capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    finally:
        process.kill()
        process.wait()
    assert done.returncode == 0, done.stderr
    status_reads, listings, named = json.loads(done.stdout)
    assert named == {str(port): "web" if port == ports[0] else None for port in ports}, named
    assert (status_reads, listings) == (2, 1)


# A process called dockerd holding one loopback listener itself (as for a port published with its proxy
# off) and starting argv[2] children called docker-proxy (argv[1]), each handed one listener of its own
# on loopback and named by Docker's userland proxy's command line for it: one a published port, as
# Docker's default proxy runs. It prints its own port and each proxy's PID and port.
FAKE_DOCKERD_WITH_PROXIES = """\
import json, socket, subprocess, sys, time
proxy, count = sys.argv[1], int(sys.argv[2])
own = socket.create_server(("127.0.0.1", 0))
proxies = []
for _ in range(count):
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        argv = [proxy, "-c", "import time; time.sleep(30)", "-proto", "tcp", "-host-ip", "127.0.0.1",
                "-host-port", str(port), "-container-ip", "172.17.0.2", "-container-port", "8080"]
        proxies.append([subprocess.Popen(argv, pass_fds=[held.fileno()]).pid, port])
print(json.dumps([own.getsockname()[1], proxies]), flush=True)
time.sleep(30)
"""


def test_a_look_at_every_port_docker_proxy_holds_lists_dockers_states_once(named_sleep, tmp_path):
    """holders_of for ports held by root's docker-proxy processes, children of root's dockerd (one a
    published port), and one port dockerd holds itself: Docker's states are listed once for the whole
    look, not once a proxy, and dockerd's real uid read once for its process facts and once for all
    the lookups; each proxy's port is still named as the container publishing it, and no other."""
    need_root("root's dockerd and docker-proxy: the lookup believes only root's")
    dockerd = _python_called(named_sleep, "dockerd")
    proxy = _python_called(named_sleep, "docker-proxy")
    process = subprocess.Popen([dockerd, "-", proxy, "6"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    proxies: list[list[int]] = []
    try:
        process.stdin.write(FAKE_DOCKERD_WITH_PROXIES)
        process.stdin.close()
        own, proxies = json.loads(process.stdout.readline())
        # Popen returns once the exec has closed the child's descriptors, a moment before the kernel
        # names the process after its new program: until then a proxy is still called dockerd.
        _until(lambda: {_comm(pid) for pid, _ in proxies} == {"docker-proxy"}, "the proxies' exec")
        assert _comm(process.pid) == "dockerd"
        published = proxies[0][1]
        recorded = json.loads(DOCKER_RECORDED.read_text())
        recorded["NetworkSettings"]["Ports"] = {"8080/tcp": [{"HostIp": "", "HostPort": str(published)}],
                                                "8081/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(own)}]}
        for cid, state in ((recorded["ID"], recorded), ("a" * 64, {})):
            (tmp_path / cid).mkdir()
            (tmp_path / cid / "config.v2.json").write_text(json.dumps(state))
        ports = [own, *(port for _, port in proxies)]
        done = subprocess.run([sys.executable, "-c", DOCKERD_LOOK, str(process.pid), str(tmp_path), json.dumps(ports)],
                              capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    finally:
        for pid, _ in proxies:  # dockerd's children: ended by their PIDs, not left to sleep on
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        process.kill()
        process.wait()
    assert done.returncode == 0, done.stderr
    status_reads, listings, named = json.loads(done.stdout)
    assert named == {str(port): "web" if port in (own, published) else None for port in ports}, named
    assert (status_reads, listings) == (2, 1)


def test_a_rewritten_docker_state_is_read_again_alone_and_only_what_is_used_is_kept(tmp_path, monkeypatch):
    """Docker rewrites a container's config.v2.json after each health-check: the states are kept file
    by file, each read again only once its file changed, and of each only what docker_publishes and the
    container's name use (a state may be 4 MiB), with the same answers as the whole state gives."""
    recorded = json.loads(DOCKER_RECORDED.read_text())
    recorded["Config"]["Env"] = ["X=" + "x" * (1 << 16)]  # nothing the lookup uses
    web, other = recorded["ID"], "a" * 64
    for cid in (web, other):
        (tmp_path / cid).mkdir()
        (tmp_path / cid / "config.v2.json").write_text(json.dumps(recorded if cid == web else {"State": {}}))
    reads = docker_states_in(tmp_path, monkeypatch)
    states = dict(containers._docker_states())
    assert sorted(states) == sorted((web, other)) and len(reads) == 2, reads
    assert containers._docker_states() is not None and len(reads) == 2
    kept = states[web]
    assert "x" * 100 not in json.dumps(kept) and len(json.dumps(kept)) < 1024, kept
    for question in (("18082", "tcp", "172.17.0.2", "8080"), ("18082", "", "172.17.0.2", "8080"), ("18082", "tcp"),
                     ("18082", "tcp", "172.17.0.3", "8080"), ("18082", "udp", "172.17.0.2", "8080"),
                     ("18083", "tcp"), ("18082", "tcp", "", "", "127.0.0.1")):
        assert containers.docker_publishes(kept, *question) == containers.docker_publishes(recorded, *question)
    assert containers.docker_publishes(kept, "18082", "tcp")
    rewritten = tmp_path / other / "config.v2.json.tmp"  # as Docker writes one: a new file renamed over it
    rewritten.write_text(json.dumps({"State": {"Running": True}}))
    os.replace(rewritten, tmp_path / other / "config.v2.json")
    states = dict(containers._docker_states())
    assert reads[2:] == [str(tmp_path / other / "config.v2.json")], reads
    assert states[other]["State"]["Running"] is True and states[web] == kept
