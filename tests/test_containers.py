"""The container (and pod) behind a holder: a real rootful Podman container publishing a port (its
monitor, conmon, holds the port, and netavark's NAT rule takes the traffic), and the cgroup paths and
on-disk state of Docker, containerd and CRI-O as they record them.

Podman runs in private mount and network namespaces: its storage and run directories are tmpfs
mounts there, ulimits within the test's own (no CAP_SYS_RESOURCE needed). The image is
busybox-static's binary in a tarball (`podman import`): no registry is asked. A container with a
published port has no cgroup of its own (`--cgroups disabled`: crun refuses a hybrid v1/v2 host, so a
cgroup2 file system is mounted over /sys/fs/cgroup). One on the host's network gets its own cgroup
(`libpod_parent/libpod-ID`, Podman's cgroupfs layout) in the cgroup v1 hierarchies of a hybrid
host, whose cgroup2 part is unmounted in the test's mount namespace: on cgroup2, crun's device
filter is an eBPF program, and loading it raises RLIMIT_MEMLOCK, which takes CAP_SYS_RESOURCE (a
root without it, as in a Firecracker VM, gets "setrlimit (RLIM_MEMLOCK): Operation not
permitted")."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from bindguard.evidence import containers
from bindguard.model.endpoints import Bind, SocketOptions, parse_listen
from bindguard.model.facts import ContainerFact, ProcessFact
from bindguard.model.kinds import ConflictKind
from bindguard.verdict.conflicts import Conflict
from bindguard.verdict.remedies import remedy
from conftest import REQUIRE, need_root

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


def test_docker_and_kubernetes_state_on_disk(tmp_path, monkeypatch):
    docker = tmp_path / "docker" / ID
    docker.mkdir(parents=True)
    (docker / "config.v2.json").write_text(json.dumps({"Name": "/web", "Config": {"Image": "nginx:1.25", "Labels": {
        "io.kubernetes.pod.name": "web-7d4", "io.kubernetes.pod.namespace": "shop"}}}))
    monkeypatch.setattr(containers, "DOCKER_STATE", str(tmp_path / "docker" / "{id}" / "config.v2.json"))
    fact = containers.container_of(os.getpid(), f"/system.slice/docker-{ID}.scope", ())
    assert fact == ContainerFact("docker", ID, "web", "nginx:1.25", "web-7d4", "shop", "cgroup",
                                 str(docker / "config.v2.json"))
    k8s = tmp_path / "k8s" / ID
    k8s.mkdir(parents=True)
    (k8s / "config.json").write_text(json.dumps({"annotations": {
        "io.kubernetes.cri.container-name": "api", "io.kubernetes.cri.image-name": "registry.example/api:2",
        "io.kubernetes.cri.sandbox-name": "api-5f6", "io.kubernetes.cri.sandbox-namespace": "prod"}}))
    monkeypatch.setattr(containers, "CONTAINERD_CONFIG", str(tmp_path / "k8s" / "{id}" / "config.json"))
    fact = containers.container_of(os.getpid(), f"/kubepods/besteffort/pod1b2c/{ID}", ())
    assert (fact.engine, fact.name, fact.pod, fact.namespace) == ("containerd", "api", "api-5f6", "prod")
    monkeypatch.setattr(containers, "DOCKER_STATE", str(tmp_path / "missing" / "{id}"))
    fact = containers.container_of(os.getpid(), f"/docker/{ID}", ())
    assert (fact.engine, fact.name, fact.source) == ("docker", "", "")  # named by engine and id alone
    os.mkfifo(tmp_path / "fifo")
    monkeypatch.setattr(containers, "DOCKER_STATE", str(tmp_path / "fifo"))
    assert containers.container_of(os.getpid(), f"/docker/{ID}", ()).name == ""  # a FIFO is never opened


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


# Run in private mount and network namespaces, the container web1 run by $RUN_WEB1; then the guard's
# explain (JSON) and check on 0.0.0.0:18080. The cgroups Podman made in the host's hierarchies (its
# monitor's libpod_parent/conmon) are removed with the container, where no other container uses them.
PODMAN_SCRIPT = r"""
set -eu
cleanup() {
    podman rm -f -t 0 web1 >/dev/null 2>&1 || true
    for parent in /sys/fs/cgroup/libpod_parent /sys/fs/cgroup/*/libpod_parent; do
        [ -d "$parent" ] && rmdir "$parent/conmon" "$parent" 2>/dev/null || true
    done
}
trap cleanup EXIT
mount -t tmpfs tmpfs /var/lib/containers
mount -t tmpfs tmpfs /run
mkdir -p /run/lock
ip link set lo up
podman import -q "$IMAGE" localhost/bindguard-test:1 >/dev/null
eval "$RUN_WEB1"
$BINDGUARD explain --no-systemd --json 0.0.0.0:18080 > "$OUT/explain.json" 2> "$OUT/explain.err" || true
set +e
$BINDGUARD check --no-systemd --wait 0 0.0.0.0:18080 2> "$OUT/check.err"
echo $? > "$OUT/check.code"
"""
PODMAN_RUN = "podman run -d -q --name web1 --ulimit nofile=1024:1024 --ulimit nproc=4096:4096"
# A published port: conmon holds it, netavark's NAT rule takes its traffic; no cgroup of its own.
RUN_PUBLISHED = f"""mount -t cgroup2 none /sys/fs/cgroup
{PODMAN_RUN} --cgroups disabled -p 18080:8080 localhost/bindguard-test:1 /bin/httpd -f -p 8080 >/dev/null"""
# On the host's network, in a cgroup of its own: the listener is the container's process itself.
# A hybrid host's cgroup2 part is unmounted here, so that crun uses the v1 hierarchies (see above).
RUN_HOST_NETWORK = f"""if [ ! -e /sys/fs/cgroup/cgroup.controllers ] && mountpoint -q /sys/fs/cgroup/unified; then
    umount /sys/fs/cgroup/unified
fi
{PODMAN_RUN} --cgroup-manager cgroupfs --cgroups enabled --network host localhost/bindguard-test:1 \
    /bin/httpd -f -p 18080 >/dev/null"""


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


def need_podman() -> None:
    need_root("podman")
    missing = [p for p in ("/usr/bin/podman", "/usr/bin/conmon", "/usr/bin/crun", "/usr/sbin/nft", "/bin/busybox")
               if not os.access(p, os.X_OK)]
    if missing:
        reason = f"the container test needs {', '.join(missing)} (Debian's podman, conmon, crun, nftables, " \
                 "busybox-static)"
        if REQUIRE:
            pytest.fail(f"BINDGUARD_REQUIRE_INTEGRATION=1 but {reason}")
        pytest.skip(reason)


def _run_podman(tmp_path: Path, run_web1: str) -> dict:
    """The guard's explain report (JSON) on 0.0.0.0:18080 while web1 runs."""
    need_podman()
    env = dict(os.environ, IMAGE=str(_busybox_image(tmp_path)), OUT=str(tmp_path), BINDGUARD=BINDGUARD,
               PYTHONPATH=os.pathsep.join(sys.path), RUN_WEB1=run_web1)
    done = subprocess.run(["unshare", "--net", "--mount", "--propagation", "private", "--", "sh", "-c",
                           PODMAN_SCRIPT], env=env, capture_output=True, text=True, timeout=240)
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


def test_a_conmon_that_is_not_root_names_no_container():
    """Anyone can run a program called conmon with a real container's id: a non-root one is not
    taken for rootful Podman's monitor (its remedy would stop someone else's container)."""
    argv = ("/usr/bin/conmon", "-c", ID, "-n", "web1")
    impostor = subprocess.Popen(["sleep", "30"], user=65534, group=65534)
    try:
        assert containers.container_of(impostor.pid, "/user.slice/user-65534.slice/session-1.scope", argv) is None
    finally:
        impostor.kill()
        impostor.wait()
    assert containers.container_of(os.getpid(), "/", argv).via == "conmon"  # root's is still named
