"""Every command, drop-in and YAML file we ship (examples/, systemd/, the READMEs and --help) lets
its real daemon start on free ports, and refuses it when a holder takes its port.

The daemons are Debian's packages under their own unit files, copied as they are from
/usr/lib/systemd/system into the user manager of the rig (tests/rig.py), with Debian's default
configurations as installed. What a user manager cannot apply is adapted, and only that:
  - the rig's mount namespace gets private directories where the daemons write (a tmpfs over
    /run, /var/log/nginx, /var/lib/nginx, /var/log/redis, /var/lib/redis, /var/lib/prometheus),
    so that nothing they write reaches the host and two rigs at once do not share a PID file.
    /run/sshd is made by hand: ssh.service's RuntimeDirectory=sshd makes it in /run under the
    system manager, but a user manager makes it under $XDG_RUNTIME_DIR, where sshd does not look;
  - redis-server.service loses User=/Group= with CapabilityBoundingSet= and PrivateUsers= (a
    user manager runs its units as its own user; redis as root without capabilities could not
    write its own directories), PrivateTmp= (the rig's runtime directory, with the manager's
    notify socket, is under /tmp) and ProtectHome=, ProtectKernelLogs=, ProtectKernelTunables=
    (the user manager cannot set up those mounts here: 226/NAMESPACE). None of these changes
    an address redis binds;
  - the rig has a network namespace of its own, so the daemons' own ports (80, 22, 6379) are
    free there and nothing is moved;
  - each shipped drop-in and unit is installed verbatim, with only the program path replaced
    (/usr/bin/bindguard, where the Debian package installs it, is this checkout's
    `python -m bindguard`), and the guard's stderr goes to a file through a second drop-in (the
    rig has no journal).
The `bindguard install` commands of the documentation are run as written, with --user added
(the rig is a user manager).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rig import TREE_PROGRAM
from test_discover import need_package

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
INSTALLED = "/usr/bin/bindguard"
GUARD = f"/usr/bin/env PYTHONPATH={SRC} {sys.executable} -m bindguard"
DEBIAN_UNITS = Path("/usr/lib/systemd/system")
DOCS = [ROOT / "README.md", ROOT / "examples" / "README.md", ROOT / "systemd" / "README.md"]
SHIPPED = [p for p in sorted((ROOT / "examples").rglob("*")) + sorted((ROOT / "systemd").rglob("*"))
           if p.is_file() and p.suffix != ".md"]
COMMANDS = ("check", "explain", "verify", "scan", "discover", "install", "uninstall", "config")
INVOCATION = re.compile(r"(?:^|[\s/+$(])bindguard\s+(" + "|".join(COMMANDS) + r")\b(.*)")
# Words of a synopsis, not of a command: `bindguard check [OPTIONS] LISTEN...`, `install UNIT LISTEN...`
PLACEHOLDER = re.compile(r"^(\[-.*|\[[A-Z].*|<.*>|[A-Z][A-Z_]+(\.\.\.)?\]?|.*\.\.\.\]?)$")

PRIVATE_DIRS = ("mount -t tmpfs -o mode=755 tmpfs /run && mkdir -p /run/systemd/system /run/sshd /run/redis"
                " && chown redis:redis /run/redis"
                " && for d in /var/log/nginx /var/lib/nginx /var/log/redis /var/lib/redis; do"
                " mount -t tmpfs tmpfs $d || exit 1; done && chown redis:redis /var/log/redis /var/lib/redis"
                " && if [ -d /var/lib/prometheus ]; then mount -t tmpfs tmpfs /var/lib/prometheus"
                " && mkdir /var/lib/prometheus/node-exporter; fi")
REDIS_NOT_FOR_A_USER_MANAGER = ("User", "Group", "CapabilityBoundingSet", "PrivateUsers", "PrivateTmp",
                                "ProtectHome", "ProtectKernelLogs", "ProtectKernelTunables")


# --- the documented commands ---------------------------------------------------------------

def _code_lines(path: Path) -> list[str]:
    """The lines of a README's fenced code blocks; a shipped file's Exec*= lines and the
    `# (or: bindguard ...)` that names the command which writes the same drop-in."""
    if path.suffix != ".md":
        return [line for line in path.read_text().splitlines()
                if re.match(r"\s*Exec\w*=", line) or re.match(r"#\s*\(or: ", line)]
    lines, inside = [], False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
        elif inside:
            lines.append(line)
    return lines


def _help_lines() -> list[str]:
    """The example lines of every command's --help."""
    lines = []
    for command in COMMANDS:
        done = subprocess.run([sys.executable, "-m", "bindguard", command, "--help"], capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=60)
        assert done.returncode == 0, done.stderr
        lines += [line for line in done.stdout.splitlines() if re.match(r"\s+(Exec\w*=\S*)?bindguard ", line)]
    return lines


def invocations(lines: list[str]) -> list[list[str]]:
    """Each `bindguard COMMAND ARGS` written in these lines, as argv after `bindguard`; synopses
    (`[OPTIONS]`, `LISTEN...`, `UNIT`) are left out."""
    found = []
    for line in lines:
        for match in INVOCATION.finditer(line):
            rest = re.split(r"\s+#|\s\|\s|\s&&\s|`|\)$|\)\s|\s{2,}", match.group(2))[0]
            try:
                words = shlex.split(rest)
            except ValueError:
                continue
            if any(PLACEHOLDER.match(w) for w in words) or (words and words[0] in ("--help",)):
                continue
            found.append([match.group(1), *[w.replace("%n", "web.service") for w in words]])
    return found


def documented() -> list[list[str]]:
    lines = [line for path in DOCS + SHIPPED for line in _code_lines(path)]
    return invocations(lines + _help_lines())


def test_the_documentation_shows_commands_to_check():
    argvs = documented()
    shown = {" ".join(a) for a in argvs}
    assert "install nginx.service 0.0.0.0:80 [::]:80 --check-args=--v6only" in shown, shown
    assert any(a[0] == "check" and "--v6only" in a for a in argvs), shown
    assert {a[0] for a in argvs} >= {"check", "install", "uninstall", "discover", "scan", "config", "verify"}


@pytest.mark.parametrize("argv", documented(), ids=" ".join)
def test_every_documented_invocation_parses(argv):
    from bindguard.cli.commands import check
    from bindguard.cli.parser import build_parser
    from bindguard.request.plan import build_binds

    args = build_parser(argv[0]).parse_args(argv)
    if argv[0] in ("check", "explain") and args.listen:
        build_binds(check.request_options(args, unit=None))  # every address is valid, with the options given


def _without_print(args: list[str]) -> list[str]:
    """A documented install's arguments but --print and --json: with --print alone, it prints the
    drop-in's text (--json would print an object that holds it)."""
    return [a for a in args if a != "--print" and a.partition("=")[0] != "--json"]


def _install_check_args(argv: list[str], tmp_path: Path) -> list[str]:
    """What an install command puts after `check` in its drop-in (from its --print output)."""
    printed = run_bindguard(["install", "--print", *_without_print(argv[1:])], tmp_path)
    assert printed.returncode == 0, printed.stderr
    (line,) = [l for l in printed.stdout.splitlines() if l.startswith("ExecStartPre=")]
    words = shlex.split(line.split("=", 1)[1].lstrip("+"))
    return [w.replace("%%", "%").replace("%n", "web.service") for w in words[words.index("check") + 1:]]


def run_bindguard(argv: list[str], tmp_path: Path, netns=None, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "BINDGUARD_CONFIG_PATH": str(tmp_path / "no-config"),
           "XDG_CONFIG_HOME": str(tmp_path / "config")}
    env.pop("INVOCATION_ID", None)
    full = [sys.executable, "-m", "bindguard", *argv]
    return subprocess.run(netns.argv(full) if netns else full, capture_output=True, text=True, env=env,
                          timeout=60, **kwargs)


@pytest.mark.integration
@pytest.mark.parametrize("argv", [a for a in documented() if a[0] in ("check", "install")], ids=" ".join)
def test_every_documented_check_is_clear_on_free_ports(argv, netns, tmp_path):
    """On free ports, the addresses and options of every documented check (and of the drop-in every
    documented install writes) can all be bound together: no self-conflict, no bad option."""
    check_args = _install_check_args(argv, tmp_path) if argv[0] == "install" else argv[1:]
    check_args = [a for a in check_args if a not in ("--json",)]
    if "--unit" in check_args:  # outside a manager: the unit's name only picks its (absent) files
        check_args += ["--no-systemd"]
    done = run_bindguard(["check", "--wait", "0", *check_args], tmp_path, netns)
    assert done.returncode == 0, f"bindguard check {shlex.join(check_args)}:\n{done.stderr}"


# --- the real daemons under their own unit files ---------------------------------------------

@pytest.fixture
def daemons(systemd_rig):
    rig = systemd_rig
    done = rig.run(["sh", "-c", PRIVATE_DIRS])
    assert done.returncode == 0, done.stderr
    return rig


def debian_unit(rig, name: str) -> None:
    """Debian's unit file as installed, adapted only where a user manager cannot apply it."""
    text = (DEBIAN_UNITS / name).read_text()
    if name == "redis-server.service":
        text = "".join(line for line in text.splitlines(keepends=True)
                       if line.split("=", 1)[0] not in REDIS_NOT_FOR_A_USER_MANAGER)
    (rig.unit_dir / name).write_text(text)


def shipped_dropin(path: Path) -> str:
    text = path.read_text()
    assert INSTALLED in text, path
    return text.replace(INSTALLED, GUARD)


def guard_log(rig, unit: str) -> Path:
    log = rig.log(f"{unit}.log")
    rig.write_dropin(unit, "zz-test-log.conf", f"[Service]\nStandardError=append:{log}\n", reload=False)
    return log


def listening(rig, port: int) -> str:
    return rig.run(["ss", "-Hltn", f"sport = :{port}"]).stdout


def clean_slate(rig, unit: str) -> None:
    """Stop the unit and any restart of it that is pending, and forget its failures."""
    rig.systemctl("stop", unit)
    rig.systemctl("reset-failed", unit)


def starts_free_and_is_refused_when_held(rig, unit: str, port: int, held: list[dict], log: Path) -> None:
    log.write_text("")
    started = rig.start(unit)
    assert started.ok, (started, log.read_text(), rig.systemctl("status", "--no-pager", unit).stdout)
    assert started.pre_status[-1] == 0, started
    deadline = time.monotonic() + 10  # a Type=simple daemon is "started" before it listens
    while not listening(rig, port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert listening(rig, port), f"{unit} started but nothing listens on {port}"
    report = log.read_text()
    assert "KillMode" not in report, report  # no advice about the unit's settings on a clear start
    clean_slate(rig, unit)

    holder = rig.hold(*held)
    try:
        refused = rig.start(unit)
        assert not refused.ok and refused.pre_status[-1] == 98, (refused, log.read_text())
        report = log.read_text()
        assert f"PID {holder.pid}" in report or "holder" in report, report
        assert "KillMode" not in report, report
    finally:
        clean_slate(rig, unit)
        rig.release(holder)


def _install_as_documented(rig, argv: list[str]) -> None:
    """Run a documented install in the rig (with --user: the rig is a user manager); a --print
    one's output becomes the drop-in, as the documentation suggests."""
    if "--print" in argv:
        printed = rig.bindguard("install", "--print", *_without_print(argv[1:]), "--program", TREE_PROGRAM)
        assert printed.returncode == 0, printed.stderr
        unit = next(a for a in argv[1:] if a.endswith(".service"))
        rig.write_dropin(unit, "bindguard.conf", printed.stdout.replace(f" check --unit %n", " check --unit %n --user"),
                         reload=False)
        rig.daemon_reload()
        return
    done = rig.bindguard("install", "--user", "--program", TREE_PROGRAM, *argv[1:])
    assert done.returncode == 0, done.stderr


def each_shipped_way_starts_free_and_is_refused_when_held(rig, unit: str, dropins: list[Path], port: int,
                                                          held: list[dict], log: Path) -> None:
    """The unit under each shipped drop-in in turn, then under each drop-in a documented install
    of it writes."""
    for path in dropins:
        rig.write_dropin(unit, "bindguard.conf", shipped_dropin(path))
        starts_free_and_is_refused_when_held(rig, unit, port, held, log)
    if dropins:
        (rig.unit_dir / f"{unit}.d" / "bindguard.conf").unlink()
    installs = [a for a in documented() if a[0] == "install" and unit in a[1:]]
    assert installs, f"the documentation shows no install of {unit}"
    for argv in installs:
        _install_as_documented(rig, argv)
        starts_free_and_is_refused_when_held(rig, unit, port, held, log)
        assert rig.bindguard("uninstall", "--user", unit).returncode == 0


NGINX_HELD = [{"proto": "tcp", "host": "0.0.0.0", "port": 80, "reuseaddr": True}]
# sshd starts when one of its addresses binds (discovery knows it): hold both to make it fail
SSH_HELD = [{"proto": "tcp", "host": "0.0.0.0", "port": 22, "reuseaddr": True},
            {"proto": "tcp", "host": "::", "port": 22, "reuseaddr": True, "v6only": True}]
REDIS_HELD = [{"proto": "tcp", "host": "127.0.0.1", "port": 6379, "reuseaddr": True}]


@pytest.mark.integration
@pytest.mark.parametrize("unit, binary, dropins, port, held", [
    ("nginx.service", "/usr/sbin/nginx", ["examples/nginx/bindguard.conf", "systemd/bindguard.conf.example"],
     80, NGINX_HELD),
    # Debian's ssh.service keeps KillMode=process (a restart keeps open sessions): it starts under
    # the guard with no advice to change that (starts_free_and_is_refused_when_held checks)
    ("ssh.service", "/usr/sbin/sshd", ["examples/ssh/bindguard.conf"], 22, SSH_HELD),
    ("redis-server.service", "/usr/bin/redis-server", [], 6379, REDIS_HELD),
])
def test_debian_s_daemons_with_the_shipped_dropins_and_documented_installs(daemons, unit, binary, dropins, port,
                                                                           held):
    need_package(unit.split(".")[0], binary)
    rig = daemons
    debian_unit(rig, unit)
    log = guard_log(rig, unit)
    each_shipped_way_starts_free_and_is_refused_when_held(rig, unit, [ROOT / d for d in dropins], port, held, log)


@pytest.mark.integration
def test_the_every_service_dropin_with_debian_s_daemons(daemons):
    """systemd/service.d/bindguard.conf: nginx, ssh and redis-server are checked on what their own
    configuration says, start on free ports, and are refused when their port is held."""
    need_package("nginx", "/usr/sbin/nginx")
    need_package("openssh-server", "/usr/sbin/sshd")
    need_package("redis-server", "/usr/bin/redis-server")
    rig = daemons
    for unit in ("nginx.service", "ssh.service", "redis-server.service"):
        debian_unit(rig, unit)
    logs = {unit: guard_log(rig, unit) for unit in ("nginx.service", "ssh.service", "redis-server.service")}
    rig.write_dropin("service", "bindguard.conf", shipped_dropin(ROOT / "systemd" / "service.d" / "bindguard.conf"))
    for unit, port, held in (("nginx.service", 80, NGINX_HELD), ("ssh.service", 22, SSH_HELD),
                             ("redis-server.service", 6379, REDIS_HELD)):
        starts_free_and_is_refused_when_held(rig, unit, port, held, logs[unit])
    holder = rig.hold(SSH_HELD[0])  # sshd starts on [::]:22 alone: one address held is a warning
    try:
        started = rig.start("ssh.service")
        assert started.ok, (started, logs["ssh.service"].read_text())
        assert "a warning only" in logs["ssh.service"].read_text()
    finally:
        clean_slate(rig, "ssh.service")
        rig.release(holder)


@pytest.mark.integration
def test_the_yaml_example_with_nginx(daemons, tmp_path):
    """examples/bindguard.yaml.example as nginx.service's file, read by the every-service drop-in."""
    need_package("nginx", "/usr/sbin/nginx")
    rig = daemons
    debian_unit(rig, "nginx.service")
    log = guard_log(rig, "nginx.service")
    config = rig.root / "bindguard"
    config.mkdir()
    shutil.copy(ROOT / "examples" / "bindguard.yaml.example", config / "nginx.service.yaml")
    rig.write_dropin("nginx.service", "zz-test-config.conf", f"[Service]\nEnvironment=BINDGUARD_CONFIG_PATH={config}\n",
                     reload=False)
    rig.write_dropin("service", "bindguard.conf", shipped_dropin(ROOT / "systemd" / "service.d" / "bindguard.conf"))
    starts_free_and_is_refused_when_held(rig, "nginx.service", 80, NGINX_HELD, log)


@pytest.mark.integration
def test_the_user_web_example_its_install_and_verify(daemons):
    """examples/user-web: the unit and its drop-in as shipped; the documented install; and the
    README's ExecStartPre= check with ExecStartPost= verify."""
    rig = daemons
    (rig.home / "public_html").mkdir()
    rig.write_unit("web.service", (ROOT / "examples" / "user-web" / "web.service").read_text(), reload=False)
    log = guard_log(rig, "web.service")
    web = [{"proto": "tcp", "host": "127.0.0.1", "port": 8080, "reuseaddr": True}]
    each_shipped_way_starts_free_and_is_refused_when_held(
        rig, "web.service", [ROOT / "examples" / "user-web" / "web.service.d" / "bindguard.conf"], 8080, web, log)
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```ini\n(\[Service\]\nExecStartPre=.*?)```", readme, re.S).group(1)
    assert "ExecStartPost=" in block and "verify" in block, block
    rig.write_dropin("web.service", "bindguard.conf", block.replace(INSTALLED, GUARD))
    starts_free_and_is_refused_when_held(rig, "web.service", 8080, web, log)


@pytest.mark.integration
def test_the_prometheus_scan_service_and_timer(daemons):
    """examples/prometheus: the oneshot scan writes node_exporter's file where Debian's
    prometheus-node-exporter reads it, with nginx running; its timer starts."""
    need_package("prometheus", "/usr/bin/promtool")
    need_package("nginx", "/usr/sbin/nginx")
    rig = daemons
    debian_unit(rig, "nginx.service")
    for name in ("bindguard-scan.service", "bindguard-scan.timer"):
        text = (ROOT / "examples" / "prometheus" / name).read_text()
        rig.write_unit(name, text.replace(INSTALLED, GUARD), reload=False)
    log = guard_log(rig, "bindguard-scan.service")
    assert rig.start("nginx.service").ok
    scanned = rig.start("bindguard-scan.service")
    assert scanned.ok, (scanned, log.read_text())
    metrics = rig.run(["cat", "/var/lib/prometheus/node-exporter/bindguard.prom"])
    assert metrics.returncode == 0 and "bindguard_listeners 2" in metrics.stdout, (metrics, log.read_text())
    checked = rig.run(["promtool", "check", "metrics"], input=metrics.stdout)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert rig.start("bindguard-scan.timer").ok
    assert rig.prop("bindguard-scan.timer", "ActiveState") == "active"


@pytest.mark.integration
def test_the_readme_s_first_check_says_what_the_readme_says(netns, tmp_path):
    """README: 'exits 0 when all three can be bound, 98 when something holds one (an sshd on port
    22, say: the report names its PID, command and unit)'."""
    # the README shows it twice, from the venv and from the Debian package: the same check
    (argv,) = {tuple(a) for a in documented() if a[0] == "check" and "22" in a and "8080" in a}
    argv = list(argv)
    assert run_bindguard(argv, tmp_path, netns).returncode == 0
    held = netns.hold({"proto": "tcp", "host": "0.0.0.0", "port": 22, "reuseaddr": True})
    done = run_bindguard(argv, tmp_path, netns)
    assert done.returncode == 98, done.stderr
    assert f"PID {held.pid} (" in done.stderr and "holder.py" in done.stderr and "unit" in done.stderr, done.stderr
