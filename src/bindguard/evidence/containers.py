"""The container, and for Kubernetes the pod, behind a holder: from its cgroup path or its command
line, named from the engine's own state on disk. No engine's API is called on the guard's path.

A container's process runs in a cgroup that bears its id: `docker-ID.scope` or `/docker/ID`,
`libpod-ID.scope` or `/libpod_parent/libpod-ID`, `cri-containerd-ID.scope`, `crio-ID.scope`, or
`/kubepods/.../podUID/ID` (never below a service, whose delegated cgroups its user names). Podman's
monitor, conmon, holds a rootful container's published ports itself (it names the container with
`-c ID -n NAME`), believed only when its real uid is root's; so does Docker's userland proxy,
docker-proxy, for dockerd, which names the container's address and port (believed only as root's child
of root's dockerd): the container is the running one whose config.v2.json has that address and publishes
that port. Rootless Podman's port forwarder, rootlessport (believed only where /proc/PID/exe is
the file of Podman's packaged program), names no container: the container is its user's whose process (its
conmon's child) is in the network namespace rootlessport forwards into, named from that user's
storage and with that user's files only.
The id (64 hex digits, nothing else ever makes a path) names the engine's files, read as regular
files of bounded size (request.files):

  docker      /var/lib/docker/containers/ID/config.v2.json      Name, Config.Image, Config.Labels
  podman      /var/lib/containers/storage/overlay-containers/containers.json   names, metadata
              (vfs-containers/ with the vfs driver; a rootless user's: ~/.local/share/containers/storage)
  containerd  /run/containerd/io.containerd.runtime.v2.task/k8s.io/ID/config.json   annotations
  cri-o       /run/containers/storage/overlay-containers/ID/userdata/config.json    annotations

Where the files cannot be read the container is still named by engine and id. Each name, image, pod
and namespace read is kept to ENGINE_TEXT_MAX characters: whoever ran the container chose it.
"""

from __future__ import annotations

import os

from bindguard.model.facts import ContainerFact
from bindguard.model.text import shortened  # loaded with facts already

DOCKER_CONTAINERS = "/var/lib/docker/containers"
DOCKER_STATE = DOCKER_CONTAINERS + "/{id}/config.v2.json"
PODMAN_STORAGE = "/var/lib/containers/storage"  # rootful; a rootless user's is in its home (ROOTLESS_STORAGE)
ROOTLESS_STORAGE = ".local/share/containers/storage"
# Podman's list of containers, in its storage driver's directory: overlay, or vfs where overlay is not
# available (a rootless user on an older kernel, a storage on tmpfs or overlay).
PODMAN_LISTS = ("{storage}/overlay-containers/containers.json", "{storage}/vfs-containers/containers.json")
PODMAN_CONTAINERS = PODMAN_LISTS[0].format(storage=PODMAN_STORAGE)
PODMAN_CONFIG = "/var/lib/containers/storage/overlay-containers/{id}/userdata/config.json"
CONTAINERD_CONFIG = "/run/containerd/io.containerd.runtime.v2.task/k8s.io/{id}/config.json"
CRIO_CONFIG = "/run/containers/storage/overlay-containers/{id}/userdata/config.json"
MAX_STATE_BYTES = 4 << 20  # a container's config; podman's containers.json lists every container: more
MAX_LIST_BYTES = 32 << 20

_ID = r"([0-9a-f]{64})"
# (a text each path of the engine holds, pattern on one cgroup path, engine); the first that matches
# names the engine. Only a path holding the text is searched: on a host without containers re is
# not even imported, and no pattern compiled (re caches them): a millisecond each of every refusal.
CGROUP_PATTERNS = (
    ("docker-", rf"(?:^|/)docker-{_ID}\.scope(?:/|$)", "docker"),
    ("docker/", rf"(?:^|/)docker/{_ID}(?:/|$)", "docker"),
    ("libpod-", rf"(?:^|/)libpod-(?:conmon-)?{_ID}\.scope(?:/|$)", "podman"),
    ("libpod_parent/", rf"(?:^|/)libpod_parent/(?:conmon|libpod-{_ID})(?:/|$)", "podman"),
    ("cri-containerd-", rf"(?:^|/)cri-containerd-{_ID}\.scope(?:/|$)", "containerd"),
    ("crio-", rf"(?:^|/)crio-(?:conmon-)?{_ID}\.scope(?:/|$)", "cri-o"),
    ("kubepods", rf"(?:^|/)kubepods[^/]*/(?:[^/]+/)?pod[0-9a-f_-]+/{_ID}(?:/|$)", "kubernetes"),
)
# Below a service, cgroups are named by whoever the manager delegated the subtree to: a user manager's
# user (`systemd-run --user --scope --unit docker-ID.scope`), a Delegate=yes service's User=. A name
# there proves no container of root's; the engines' own cgroups sit in slices, never in a service.
_DELEGATED_TREE = ".service/"


def container_ref(cgroups: list[str], cmdline: tuple[str, ...]) -> tuple[str, str, str] | None:
    """(engine, id, via) from the process's cgroup paths (every hierarchy's: on a cgroup v1 host the
    engine's path is in the controllers', not the unified one), else from conmon's command line."""
    for path in cgroups:
        if _DELEGATED_TREE in path:
            continue
        for text, pattern, engine in CGROUP_PATTERNS:
            if text not in path:
                continue
            import re

            m = re.search(pattern, path)
            if m and m.group(1):
                return engine, m.group(1), "cgroup"
    if cmdline and cmdline[0].rsplit("/", 1)[-1] == "conmon":
        import re

        cid = _option(cmdline, "-c") or _option(cmdline, "--cid")
        if cid and re.fullmatch(_ID, cid):
            runtime_dir = _option(cmdline, "-b") or _option(cmdline, "--bundle") or ""
            engine = "cri-o" if "/run/containers/storage" in runtime_dir and "/userdata" in runtime_dir \
                and "overlay-containers" in runtime_dir and not runtime_dir.startswith("/var/lib/containers") \
                else "podman"
            return engine, cid, "conmon"
    return None


def _option(argv: tuple[str, ...], flag: str) -> str | None:
    for i, arg in enumerate(argv[:-1]):
        if arg == flag:
            return argv[i + 1]
    for arg in argv:
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _read_json(path: str, limit: int = MAX_STATE_BYTES, owner: int | None = None):
    import json  # only for a container: a refusal on a host without one need not load it

    from bindguard.request.files import Refused, read_regular

    try:
        return json.loads(read_regular(path, limit, owner))
    except (OSError, Refused, ValueError, RecursionError):  # RecursionError: nested deeper than the stack
        return None


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


# Characters kept of a container's name or image, or its pod's name or namespace, as an engine's file
# records them and every refusal, the journal and the JSON show them. Whoever runs `docker run --name
# --label`, or writes a pod spec, chose that text, not the host's administrator, and a file may hold
# MiB of it. 512 keeps whole every Kubernetes name (a pod's at most 253 characters, a namespace's or
# container's 63) and every image reference (a repository at most 255, a tag 128, a sha256 digest 71:
# 456 with all three). Docker and Podman check a name's characters, not its length, and a label's value
# has no limit: longer text is no name anyone reads, and is cut, marked '…' (model.text.shortened), so
# that no one takes it for the whole name and no remedy writes it into a command (shell_word).
ENGINE_TEXT_MAX = 512


def _str(value) -> str:
    """value where it is a string, else "": what the lookup compares (an address, a port), whole."""
    return value if isinstance(value, str) else ""


def _shown(value) -> str:
    """A name, image, pod or namespace from an engine's file: a string, at most ENGINE_TEXT_MAX
    characters of it, longer text cut there and marked."""
    return shortened(_str(value), ENGINE_TEXT_MAX)


def _docker_name(state: dict) -> str:
    """A container's name from its config.v2.json ("/web"), without the slash Docker writes first."""
    return _shown(_str(state.get("Name")).lstrip("/"))


def _from_docker(cid: str) -> ContainerFact:
    path = DOCKER_STATE.format(id=cid)
    return _docker_fact(cid, _read_json(path), path)


# The labels naming a Kubernetes pod's container's pod, and its namespace.
POD_LABELS = ("io.kubernetes.pod.name", "io.kubernetes.pod.namespace")


def _docker_fact(cid: str, state, path: str) -> ContainerFact:
    """The container as its config.v2.json (state, read from path) names it."""
    if not isinstance(state, dict):
        return ContainerFact("docker", cid)
    config = _dict(state.get("Config"))
    labels = _dict(config.get("Labels"))
    pod, namespace = (_shown(labels.get(label)) for label in POD_LABELS)
    return ContainerFact("docker", cid, _docker_name(state), _shown(config.get("Image")), pod, namespace, source=path)


def _from_podman(cid: str, storage: str = PODMAN_STORAGE, owner: int | None = None) -> ContainerFact:
    """Podman's container from the list in its storage; a rootless user's (owner) read only from
    files that user owns."""
    for listing_path in (path.format(storage=storage) for path in PODMAN_LISTS):
        listing = _read_json(listing_path, MAX_LIST_BYTES, owner)
        entry = next((e for e in listing if isinstance(e, dict) and e.get("id") == cid), None) \
            if isinstance(listing, list) else None
        if entry is not None:
            break
    else:
        return ContainerFact("podman", cid)
    names = entry.get("names") if isinstance(entry.get("names"), list) else []
    import json

    try:
        metadata = json.loads(entry.get("metadata") or "{}")
    except (TypeError, ValueError, RecursionError):
        metadata = {}
    metadata = metadata if isinstance(metadata, dict) else {}
    name = _shown(names[0]) if names else _shown(metadata.get("name"))
    annotations = _annotations(PODMAN_CONFIG.format(id=cid)) if owner is None else {}
    return ContainerFact("podman", cid, name, _shown(metadata.get("image-name")),
                         _shown(annotations.get("io.kubernetes.pod.name")),
                         _shown(annotations.get("io.kubernetes.pod.namespace")), source=listing_path)


def _annotations(path: str) -> dict:
    spec = _read_json(path)
    annotations = spec.get("annotations") if isinstance(spec, dict) else None
    return annotations if isinstance(annotations, dict) else {}


# A Kubernetes runtime's OCI config: where it is, and the annotations naming the container's name and
# image and its pod's name and namespace.
CRI_ANNOTATIONS = {
    "containerd": ("io.kubernetes.cri.container-name", "io.kubernetes.cri.image-name",
                   "io.kubernetes.cri.sandbox-name", "io.kubernetes.cri.sandbox-namespace"),
    "cri-o": ("io.kubernetes.container.name", "io.kubernetes.cri-o.ImageName", "io.kubernetes.pod.name",
              "io.kubernetes.pod.namespace"),
}


def _from_cri(engine: str, cid: str) -> ContainerFact:
    path = (CONTAINERD_CONFIG if engine == "containerd" else CRIO_CONFIG).format(id=cid)
    a = _annotations(path)
    name, image, pod, namespace = (_shown(a.get(key)) for key in CRI_ANNOTATIONS[engine])
    return ContainerFact(engine, cid, name, image, pod, namespace, source=path if a else "")


def _from_containerd(cid: str) -> ContainerFact:
    return _from_cri("containerd", cid)


def _from_crio(cid: str) -> ContainerFact:
    return _from_cri("cri-o", cid)


READERS = {"docker": _from_docker, "podman": _from_podman, "containerd": _from_containerd, "cri-o": _from_crio}


def container_of(pid: int, cgroup_file: str, cmdline: tuple[str, ...], real_uid: int,
                 ppid: int | None = None, docker: DockerLook | None = None) -> ContainerFact | None:
    """The container the process runs for, or None when neither its cgroups (cgroup_file: the text
    of its /proc/PID/cgroup, every hierarchy's path) nor its command line name one. real_uid: its
    real uid, from /proc/PID/status; ppid: its parent's PID, from /proc/PID/stat (read here when
    None). What owners.process_facts read once, given here, not read again. docker: the look's
    DockerLook, for a docker-proxy (one of its own when None).
    A Kubernetes pod's container is looked up as containerd's, then CRI-O's."""
    from bindguard.model.record import replace

    cgroups = [line.split(":", 2)[2] for line in cgroup_file.splitlines() if line.count(":") >= 2]
    ref = container_ref(cgroups, cmdline)
    if ref is None:
        program = cmdline[0].rsplit("/", 1)[-1] if cmdline else ""
        if program == "rootlessport" and runs_rootlessport(pid):
            return _from_rootlessport(pid, real_uid)
        if program != "docker-proxy":
            return None
        return _from_docker_proxy(pid, cmdline, real_uid, ppid, docker or DockerLook())
    engine, cid, via = ref
    if via == "conmon" and real_uid != ROOT:
        return None  # any user can run a program named conmon: only rootful Podman's monitor is believed
    if engine == "kubernetes":
        fact = _from_containerd(cid)
        if not fact.source:
            crio = _from_crio(cid)
            fact = crio if crio.source else ContainerFact("kubernetes", cid)
    else:
        fact = READERS[engine](cid)
    return replace(fact, via=via)


ROOT = 0


def _real_uid(pid: int) -> int | None:
    """Another process's real uid (the holder's own is given to container_of); None when it is gone."""
    from bindguard.systemd.unitfiles import status_ids

    ids = status_ids(pid)
    return ids[0] if ids else None


# Rootless Podman's rootlessport holds a container's published ports in the host's network namespace
# and forwards them into the container's; its command line names nothing. The container is the one
# whose process, a child of its monitor conmon (`-c ID`), is in the namespace rootlessport or its
# child forwards into. Everything here is its user's (processes, files): it names that user's
# container, and the remedy is that user's own `podman stop`, which can reach nothing of anyone else.
MAX_PROCESSES = 1 << 16  # /proc entries looked at for the user's conmon processes
# Where Podman's packages install rootlessport: Debian's, and the libexec of other distributions'.
ROOTLESSPORT_PROGRAMS = ("/usr/lib/podman/rootlessport", "/usr/libexec/podman/rootlessport")
MAX_TASKS = 256  # threads of one process whose children are read (a Go program starts its children from any)


def runs_rootlessport(pid: int) -> bool:
    """Whether the process runs Podman's packaged rootlessport, a file root alone can change
    (bindguard.untrusted): any user may call a program of theirs rootlessport, and have it forward
    into a namespace where a conmon of theirs, as fake, has a child. The program is known by its file
    (/proc/PID/exe's device and inode, the packaged path's in the guard's mount namespace), never by
    the path /proc/PID/exe reads as: that is the path in the process's own mount namespace, where a
    user may have mounted a program of theirs over the packaged one (`unshare -Urm`). This proves which
    program runs, not that Podman started it. One upgraded while running is no longer the packaged
    file, and is not believed."""
    import bindguard

    try:
        running = os.stat(f"/proc/{pid}/exe")
    except OSError:
        return False
    for path in ROOTLESSPORT_PROGRAMS:
        try:
            packaged = os.stat(path)
        except OSError:
            continue
        if (packaged.st_dev, packaged.st_ino) == (running.st_dev, running.st_ino):
            return bindguard.untrusted(path) is None
    return False


def _from_rootlessport(pid: int, uid: int) -> ContainerFact | None:
    from bindguard.evidence.owners import netns
    from bindguard.model.record import replace

    if uid == ROOT:
        return None
    served = {netns(p) for p in (pid, *_children(pid))} - {netns("self"), None}
    if not served:
        return None
    found = {cid for conmon, cid in _conmons_of(uid) if any(netns(c) in served for c in _children(conmon))}
    if len(found) != 1:
        return None  # none, or a pod's containers sharing the namespace: which one is not proven
    import pwd

    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return None  # no user to run its podman as
    fact = _from_podman(found.pop(), f"{user.pw_dir.rstrip('/')}/{ROOTLESS_STORAGE}", owner=uid)
    return replace(fact, via="rootlessport", user=user.pw_name)


def _children(pid: int) -> list[int]:
    """The process's children, from each of its threads' /proc/PID/task/TID/children."""
    children: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")[:MAX_TASKS]
    except OSError:
        return children
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                children += [int(word) for word in f.read(1 << 16).split() if word.isdigit()]
        except OSError:
            continue
    return children


def _conmons_of(uid: int) -> list[tuple[int, str]]:
    """(PID, container id) of each conmon the user runs (/proc/PID owned by uid, its comm conmon,
    `-c ID` on its command line)."""
    import re

    from bindguard.evidence.owners import all_pids, read_cmdline, read_stat

    found = []
    for pid in all_pids()[:MAX_PROCESSES]:
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
        except OSError:  # gone
            continue
        stat = read_stat(pid)
        if stat is None or stat.name != "conmon":
            continue
        argv = read_cmdline(pid)
        cid = _option(argv, "-c") or _option(argv, "--cid")
        if cid and re.fullmatch(_ID, cid):
            found.append((pid, cid))
    return found


# Docker's userland proxy, docker-proxy, holds a published port for dockerd; its command line names the
# container's address and port, not the container. Believed only where root runs it and its parent is
# root's dockerd (anyone can name programs so); the container is the running one of Docker's whose
# address on one of its networks is -container-ip and which publishes -container-port/-proto on
# -host-port, in its config.v2.json, each read as a regular file of bounded size. With the proxy off
# (--userland-proxy=false) dockerd binds each published port itself, so that nothing else takes it, and
# a DNAT rule carries the traffic: the container is then the running one publishing that port.
MAX_DOCKER_CONTAINERS = 1024  # config.v2.json files read
DOCKER_SECONDS = 2.0  # reading them, in all of a run, however many ports dockerd holds and however long it waits


def _from_docker_proxy(pid: int, argv: tuple[str, ...], real_uid: int, ppid: int | None,
                       docker: DockerLook) -> ContainerFact | None:
    from bindguard.evidence.owners import read_stat

    if ppid is None:
        stat = read_stat(pid)
        if stat is None:
            return None
        ppid = stat.ppid
    parent = read_stat(ppid)
    if parent is None or parent.name != "dockerd" or real_uid != ROOT or not docker.runs_as_root(ppid):
        return None
    # host-ip: the address it holds
    ip, port, proto, host_port, host_ip = (_option(argv, f"-{flag}") or _option(argv, f"--{flag}") or ""
                                           for flag in ("container-ip", "container-port", "proto", "host-port",
                                                        "host-ip"))
    if not (ip and port and host_port):
        return None
    return _the_docker_container(docker.states(),
                                 lambda state: docker_publishes(state, host_port, proto, ip, port, host_ip),
                                 "docker-proxy")


class DockerLook:
    """Docker's side of one look at the holders (owners.holders_of): each dockerd's real uid is read
    once, and Docker's states listed once (_docker_states: each file stat()ed, and read only where it
    changed), however many ports dockerd holds itself and however many docker-proxy processes (one a
    published port and family) hold them for it. Not kept past the look: the next (a wait looks again
    each poll) sees the containers started, stopped or removed since, and asks again about a PID that
    may since be another process's."""

    __slots__ = ("_root", "_states", "_listed")

    def __init__(self) -> None:
        self._root: dict[int, bool] = {}  # dockerd's PID -> whether its real uid is root's
        self._states: list[tuple[str, dict | None]] | None = None
        self._listed = False

    def runs_as_root(self, pid: int) -> bool:
        """Whether the process (a dockerd) runs with root's real uid: only root's dockerd is believed."""
        if pid not in self._root:
            self._root[pid] = _real_uid(pid) == ROOT
        return self._root[pid]

    def states(self) -> list[tuple[str, dict | None]] | None:
        """Docker's states (_docker_states), listed at the look's first question."""
        if not self._listed:
            self._states, self._listed = _docker_states(), True
        return self._states

    def dockerd_container(self, pid: int, proto: str, port: int, host_ip: str) -> ContainerFact | None:
        """The container the port dockerd (pid) holds itself (its proxy off) on host_ip is published
        for, or None: a dockerd not root's, no container or several, or not every state read in time."""
        if not self.runs_as_root(pid):
            return None
        return _the_docker_container(self.states(),
                                     lambda state: docker_publishes(state, str(port), proto, host_ip=host_ip),
                                     "dockerd")


def _the_docker_container(states: list[tuple[str, dict | None]] | None, publishes, via: str) -> ContainerFact | None:
    """The one container among Docker's states (_docker_states) whose config.v2.json `publishes` says
    yes to; None for none or several, or when not every state was read in time (states None: an unread
    one could say yes too)."""
    from bindguard.model.record import replace

    if states is None:
        return None
    found = [(cid, state) for cid, state in states if publishes(state)]
    if len(found) != 1:
        return None
    cid, state = found[0]
    return replace(_docker_fact(cid, state, DOCKER_STATE.format(id=cid)), via=via)


# Each container's config.v2.json as last read: its id -> (the file's inode, mtime and size; what is kept
# of it, _docker_kept). Each look at the holders lists the states (DockerLook), and the guard looks again
# as it waits: a file is read again only once it changed (Docker rewrites one after each health-check),
# and only the containers listed now are kept.
_docker_states_read: dict[str, tuple[tuple[int, int, int], dict | None]] = {}
# The seconds left to reading them in this run, however often they are asked for: time spent reading,
# not a deadline, so that a wait does not use it up. Set from DOCKER_SECONDS on first use.
_docker_seconds_left: list[float] = []


def _docker_states() -> list[tuple[str, dict | None]] | None:
    """(id, what is kept of its config.v2.json) of Docker's containers, each file read when it changed
    and while the run's DOCKER_SECONDS last; None when not all could be (more than
    MAX_DOCKER_CONTAINERS of them included: a match among some is no proof of the only one)."""
    import re
    import time

    try:
        ids = sorted(name for name in os.listdir(DOCKER_CONTAINERS) if re.fullmatch(_ID, name))
    except OSError:
        return None
    if len(ids) > MAX_DOCKER_CONTAINERS:
        return None
    if not _docker_seconds_left:
        _docker_seconds_left.append(DOCKER_SECONDS)
    states: list[tuple[str, dict | None]] = []
    known: dict[str, tuple[tuple[int, int, int], dict | None]] = {}
    for cid in ids:
        path = DOCKER_STATE.format(id=cid)
        try:
            info = os.stat(path)
        except OSError:
            states.append((cid, None))  # no state to read: a container being created or removed
            continue
        version = (info.st_ino, info.st_mtime_ns, info.st_size)
        seen = _docker_states_read.get(cid)
        if seen is None or seen[0] != version:
            if _docker_seconds_left[0] <= 0:
                continue
            started = time.monotonic()
            seen = (version, _docker_kept(_read_json(path)))
            _docker_seconds_left[0] -= time.monotonic() - started
        known[cid] = seen
        states.append((cid, seen[1]))
    _docker_states_read.clear()
    _docker_states_read.update(known)
    return states if len(states) == len(ids) else None


# The addresses of a container on one of its networks.
NETWORK_ADDRESSES = ("IPAddress", "GlobalIPv6Address")


def _docker_kept(state) -> dict | None:
    """What docker_publishes and _docker_fact read of a config.v2.json, in its shape: states are kept for
    the run, and one may be 4 MiB."""
    if not isinstance(state, dict):
        return None
    config, settings = _dict(state.get("Config")), _dict(state.get("NetworkSettings"))
    labels = _dict(config.get("Labels"))
    networks = {name: {key: _str(_dict(network).get(key)) for key in NETWORK_ADDRESSES}
                for name, network in _dict(settings.get("Networks")).items()}
    ports = {published: [{"HostIp": _str(b.get("HostIp")), "HostPort": _str(b.get("HostPort"))}
                         for b in bindings if isinstance(b, dict)] if isinstance(bindings, list) else None
             for published, bindings in _dict(settings.get("Ports")).items()}
    return {"State": {"Running": _dict(state.get("State")).get("Running") is True}, "Name": "/" + _docker_name(state),
            "Config": {"Image": _shown(config.get("Image")),
                       "Labels": {label: _shown(labels.get(label)) for label in POD_LABELS}},
            "NetworkSettings": {"Networks": networks, "Ports": ports}}


# A published port's HostIp that publishes it on every address of the host.
EVERY_ADDRESS = frozenset({"", "0.0.0.0", "::"})


def docker_publishes(state, host_port: str, proto: str = "", container_ip: str = "", container_port: str = "",
                     host_ip: str = "") -> bool:
    """Whether a container's config.v2.json says it runs and publishes host_port for proto (tcp when
    not said); from container_port, with container_ip on one of its networks, and on host_ip (the
    holder's local address: a port published on 127.0.0.1 is not the one held on 192.0.2.1, nor on
    0.0.0.0), where they are given."""
    if not isinstance(state, dict) or _dict(state.get("State")).get("Running") is not True:
        return False
    settings = _dict(state.get("NetworkSettings"))
    addresses = {_str(_dict(net).get(key)) for net in _dict(settings.get("Networks")).values()
                 for key in NETWORK_ADDRESSES}
    if container_ip and container_ip not in addresses - {""}:
        return False
    for published, bindings in _dict(settings.get("Ports")).items():
        port, _, protocol = _str(published).partition("/")
        if protocol != (proto or "tcp") or (container_port and port != container_port):
            continue
        if isinstance(bindings, list) and any(isinstance(b, dict) and b.get("HostPort") == host_port
                                              and _on_address(_str(b.get("HostIp")), host_ip) for b in bindings):
            return True
    return False


def _on_address(published: str, host_ip: str) -> bool:
    if not host_ip or published in EVERY_ADDRESS:
        return True
    import ipaddress

    try:
        return ipaddress.ip_address(published) == ipaddress.ip_address(host_ip)
    except ValueError:
        return False
