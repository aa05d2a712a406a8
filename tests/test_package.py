"""The Debian packages, as `./setup.sh --test` builds them from this tree (tools/build-deb):
bindguard, installed with apt, and bindguard-every-service, which is never installed here (it
would guard every service of this machine) but read from its .deb. /usr/bin/bindguard from the
package guards a unit under the drop-in bindguard-every-service ships, talks to the manager
through Debian's pystemd, its man pages render, lintian has nothing to say, and bash completes it.

Every test here runs the installed package, never this checkout's code: the tests fail (never
skip) when the package is missing or older than the tree, with the command that installs it.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from bindguard.cli.commands import COMMANDS
from bindguard.cli.parser import build_parser
from conftest import need_root
from rig import TREE_PROGRAM
from test_discover import need_package
from test_examples import NGINX_HELD, daemons, debian_unit, guard_log, starts_free_and_is_refused_when_held  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = Path("/usr/bin/bindguard")
SITE = Path("/usr/lib/python3/dist-packages/bindguard")
DROPINS = {"service.d/bindguard.conf": ROOT / "systemd" / "service.d" / "bindguard.conf",
           "socket.d/bindguard.conf": ROOT / "systemd" / "socket.d" / "bindguard.conf"}
BASH_COMPLETION = Path("/usr/share/bash-completion/completions/bindguard")
SYSTEM = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
REINSTALL = "rerun ./setup.sh --test (it builds the package from this tree and installs it)"


def package_files() -> list[str]:
    listed = subprocess.run(["dpkg", "-L", "bindguard"], capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.fail(f"the bindguard package is not installed: {REINSTALL}")
    return listed.stdout.splitlines()


@pytest.fixture(scope="module")
def installed() -> list[str]:
    """The package's files, once the package is shown to be this tree's."""
    files = package_files()
    stale = [str(path.relative_to(ROOT)) for path in sorted((ROOT / "src" / "bindguard").rglob("*.py"))
             if not (SITE / path.relative_to(ROOT / "src" / "bindguard")).is_file()
             or (SITE / path.relative_to(ROOT / "src" / "bindguard")).read_bytes() != path.read_bytes()]
    assert not stale, f"the installed package is not this tree ({', '.join(stale[:5])} differ): {REINSTALL}"
    names = set(files)
    expected = {"/usr/share/man/man8/bindguard.8.gz", "/usr/share/doc/bindguard/README.Debian", str(BASH_COMPLETION)}
    # a slim container image tells dpkg not to install man pages and documentation
    assert expected <= names and all(Path(f).exists() for f in expected), (
        f"dpkg did not install {sorted(expected - {f for f in names if Path(f).exists()})}: a path-exclude in "
        f"/etc/dpkg/dpkg.cfg.d/ (a slim image) leaves them out; remove it and {REINSTALL}")
    return files


def test_the_program_is_the_launcher_on_debian_s_python(installed):
    """bin/bindguard's Python text as a script of Debian's python3 (tools/launcher.py), not a pip entry point."""
    from test_launcher import package_launcher

    assert str(PROGRAM) in installed
    assert PROGRAM.read_text() == package_launcher(Path("/usr/bin/python3"))
    assert PROGRAM.read_text().startswith("#!/usr/bin/python3 -IS\n")
    where = subprocess.run(["/usr/bin/python3", "-I", "-c", "import bindguard, pystemd, yaml\n"
                            "print(bindguard.__file__, pystemd.__file__, yaml.__file__)"],
                           capture_output=True, text=True, env=SYSTEM)
    assert where.returncode == 0, where.stderr
    assert all(p.startswith("/usr/lib/python3/dist-packages/") for p in where.stdout.split()), where.stdout
    version = subprocess.run([PROGRAM, "--version"], capture_output=True, text=True, env=SYSTEM)
    assert version.stdout.startswith("bindguard "), version


def test_the_package_depends_on_what_bindguard_imports(installed):
    # psutil is the benchmark's reference, not a dependency: process facts come from /proc
    depends = subprocess.run(["dpkg-query", "-W", "-f", "${Depends}", "bindguard"], capture_output=True, text=True,
                             env=SYSTEM).stdout
    names = {item.split()[0] for item in depends.split(", ")}
    assert {"python3-yaml", "python3-pystemd"} <= names and "python3-psutil" not in names, depends


@pytest.mark.parametrize("argv", [[str(PROGRAM)], ["/usr/bin/python3", "-I", "-m", "bindguard"],
                                  [sys.executable, "-m", "bindguard"], [TREE_PROGRAM]],
                         ids=["program", "python3 -m", "venv python -m", "venv launcher"])
def test_install_names_the_installed_program(installed, argv, tmp_path):
    """Whichever way bindguard is run, the package's or this checkout's in its venv, the drop-in
    runs /usr/bin/bindguard, and nothing warns."""
    printed = subprocess.run([*argv, "install", "--print", "web.service", "127.0.0.1:8080"],
                             capture_output=True, text=True, env=SYSTEM, cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    assert f"\nExecStartPre=+{PROGRAM} check --unit %n 127.0.0.1:8080\n" in printed.stdout, printed.stdout
    assert "warning" not in printed.stderr, printed.stderr


def test_the_program_package_guards_no_unit(installed):
    assert not [f for f in installed if "/systemd/" in f and ".d/" in f + "/"], \
        "a drop-in in bindguard itself would guard units as soon as it is installed"
    examples = "/usr/share/doc/bindguard/examples/"
    assert {examples + "nginx/bindguard.conf", examples + "ssh/bindguard.conf",
            examples + "bindguard.conf.example"} <= set(installed)
    readme = Path("/usr/share/doc/bindguard/README.Debian").read_text()
    assert "apt install ./bindguard-every-service_*.deb" in readme
    assert "apt remove bindguard-every-service" in readme


def built_deb(name: str) -> Path:
    debs = glob.glob(str(ROOT / f"{name}_*_all.deb"))
    assert len(debs) == 1, f"expected the one {name} package tools/build-deb built in {ROOT}, found {debs}: {REINSTALL}"
    return Path(debs[0])


def deb_field(deb: Path, field: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", deb, field], capture_output=True, text=True, env=SYSTEM,
                          check=True).stdout.strip()


def systemd_unit_dir() -> str:
    """The system unit directory as systemd.pc names it, as debian/rules asks (Debian 12: /lib/systemd/system)."""
    done = subprocess.run(["pkg-config", "--variable=systemdsystemunitdir", "systemd"], capture_output=True,
                          text=True, env=SYSTEM)
    assert done.returncode == 0 and done.stdout.strip().startswith("/"), done
    return done.stdout.strip()


@pytest.fixture(scope="module")
def every_service(installed, tmp_path_factory) -> Path:
    """bindguard-every-service unpacked (dpkg-deb -x) into a directory of its own, once it is shown
    to be of the installed bindguard's version (its drop-ins are compared with the tree's below)."""
    deb = built_deb("bindguard-every-service")
    installed_version = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "bindguard"], capture_output=True,
                                       text=True, env=SYSTEM).stdout
    assert deb_field(deb, "Version") == deb_field(built_deb("bindguard"), "Version") == installed_version, \
        f"{deb.name} is not of the installed bindguard's version: {REINSTALL}"
    root = tmp_path_factory.mktemp("every-service")
    subprocess.run(["dpkg-deb", "-x", deb, root], check=True, env=SYSTEM)
    return root


def test_bindguard_every_service_puts_the_dropins_in_systemd_s_unit_directory(every_service):
    deb = built_deb("bindguard-every-service")
    version = deb_field(deb, "Version")
    assert deb_field(deb, "Architecture") == "all"
    assert deb_field(deb, "Depends") == f"bindguard (= {version})"
    description = deb_field(deb, "Description")
    assert "every service" in description and "Removing this package turns it off" in description
    listed = subprocess.run(["dpkg-deb", "-c", deb], capture_output=True, text=True, env=SYSTEM, check=True).stdout
    files = sorted(line.split()[-1].removeprefix(".") for line in listed.splitlines() if line.startswith("-"))
    unit_dir = systemd_unit_dir()
    assert [f for f in files if not f.startswith("/usr/share/doc/")] == [f"{unit_dir}/{d}" for d in sorted(DROPINS)]
    for name, source in DROPINS.items():
        assert (every_service / unit_dir.lstrip("/") / name).read_bytes() == source.read_bytes(), name


# What the maintainer scripts of bindguard-every-service ask of the manager, as debhelper's snippets for
# a unit file do (dh_installsystemd: postinst-systemd-dont-enable, postrm-systemd-reload-only): a
# reload after configure (and the abort-* that put the package back) and after remove, never on an
# upgrade's or purge's steps, and only where systemd runs (/run/systemd/system) and not in a DPKG_ROOT.
RELOADS = {("postinst", "configure"): True, ("postinst", "abort-upgrade"): True,
           ("postinst", "abort-remove"): True, ("postinst", "abort-deconfigure"): True,
           ("postrm", "remove"): True, ("postrm", "purge"): False, ("postrm", "upgrade"): False,
           ("postrm", "abort-install"): False}


def test_bindguard_every_service_reloads_the_manager_as_debhelper_s_snippets_do(tmp_path):
    """The scripts run for real, in a mount namespace of their own where /run/systemd/system is made
    (or not) on a tmpfs and `systemctl` is a stand-in that records its arguments: no manager of this
    machine is asked anything."""
    need_root("a mount namespace")
    control = tmp_path / "control"
    subprocess.run(["dpkg-deb", "--control", built_deb("bindguard-every-service"), control], env=SYSTEM, check=True)
    record = tmp_path / "systemctl.log"
    stand_in = tmp_path / "bin" / "systemctl"
    stand_in.parent.mkdir()
    stand_in.write_text(f'#!/bin/sh\necho "$*" >>{record}\n')
    stand_in.chmod(0o755)
    for (script, step), reloads in RELOADS.items():
        for booted, root in ((True, ""), (False, ""), (True, "/tmp/elsewhere")):
            record.unlink(missing_ok=True)
            made = "mkdir /run/systemd/system && " if booted else ""
            run = subprocess.run(
                ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                 f'mount -t tmpfs bindguard-test /run/systemd && {made}exec sh "$0" "$1"', control / script, step],
                env={**SYSTEM, "PATH": f"{stand_in.parent}:{SYSTEM['PATH']}"} | ({"DPKG_ROOT": root} if root else {}),
                capture_output=True, text=True, timeout=30)
            assert run.returncode == 0, (script, step, run.stdout + run.stderr)
            asked = record.read_text() if record.exists() else ""
            expected = "--system daemon-reload\n" if reloads and booted and not root else ""
            assert asked == expected, (script, step, f"booted={booted}", f"DPKG_ROOT={root}", asked)


@pytest.mark.integration
def test_a_start_is_refused_under_the_every_service_package_s_dropin(installed, every_service, daemons):
    """bindguard-every-service's drop-in (it runs /usr/bin/bindguard), in the manager's service.d/ as
    the package puts it in the system manager's: Debian's nginx starts on a free port 80 and is
    refused (98) while another process holds it."""
    need_package("nginx", "/usr/sbin/nginx")
    rig = daemons
    debian_unit(rig, "nginx.service")
    log = guard_log(rig, "nginx.service")
    enabled = rig.unit_dir / "service.d" / "bindguard.conf"
    enabled.parent.mkdir()
    enabled.symlink_to(every_service / systemd_unit_dir().lstrip("/") / "service.d" / "bindguard.conf")
    rig.daemon_reload()
    assert str(enabled) in rig.show("nginx.service", "DropInPaths")["DropInPaths"].split()
    starts_free_and_is_refused_when_held(rig, "nginx.service", 80, NGINX_HELD, log)
    assert "in use" in log.read_text() and "nginx" in log.read_text(), log.read_text()


def release(version: str) -> tuple[int, ...]:
    """0.11 and 0.11.0 alike."""
    parts = [int(n) for n in version.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def lowest_pystemd() -> str:
    """The lowest pystemd pyproject.toml allows."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in dependencies if re.match(r"pystemd\b", d)]
    return re.fullmatch(r"pystemd>=([\d.]+)", pin).group(1)


def test_the_package_depends_on_the_lowest_pystemd_pyproject_allows():
    """debian/control repeats pyproject.toml's pin: the .deb built from it asks apt for that version."""
    depends = deb_field(built_deb("bindguard"), "Depends")
    bound = re.search(r"\bpython3-pystemd \(>= ([\d.]+)\)", depends)
    assert bound and release(bound.group(1)) == release(lowest_pystemd()), (depends, lowest_pystemd())


@pytest.mark.integration
def test_the_program_asks_the_manager_through_debian_s_pystemd_at_the_pinned_version(installed, systemd_rig):
    """Debian's python3-pystemd (bookworm: 0.11.0) is the lowest pyproject.toml pins and the one
    pystemd the program's python3 finds, and through it the holder's unit comes back as the
    manager's word: `unit_status: manager` is set only from GetUnitByPID's answer over D-Bus."""
    debian = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "python3-pystemd"], capture_output=True,
                            text=True, env=SYSTEM).stdout
    assert debian and release(debian.split("-")[0]) == release(lowest_pystemd()), (debian, lowest_pystemd())
    # with site's whole path, /usr/local first: the launcher puts dist-packages before all of it
    where = subprocess.run(["/usr/bin/python3", "-I", "-c", "import pystemd.dbuslib; print(pystemd.dbuslib.__file__)"],
                           capture_output=True, text=True, env=SYSTEM)
    owner = subprocess.run(["dpkg", "-S", where.stdout.strip()], capture_output=True, text=True, env=SYSTEM).stdout
    assert owner.startswith("python3-pystemd:"), (where, owner)

    rig = systemd_rig
    rig.write_unit("other.service", "[Service]\nType=notify\n"
                   f"ExecStart={rig.serve({'host': '127.0.0.1', 'port': 18091})}\n")
    assert rig.start("other.service").ok
    done = rig.run([str(PROGRAM), "check", "--user", "--json", "--wait", "0", "--unit", "web.service",
                    "127.0.0.1:18091"])
    assert done.returncode == 98, done.stderr
    (conflict,) = json.loads(done.stdout)["conflicts"]
    assert (conflict["pid"], conflict["unit"], conflict["unit_status"]) == (
        rig.main_pid("other.service"), "other.service", "manager"), conflict


def man_pages(installed: list[str]) -> list[str]:
    return sorted(f for f in installed if f.startswith("/usr/share/man/") and f.endswith(".gz"))


def test_every_command_and_the_configuration_file_have_a_page(installed):
    pages = {os.path.basename(p) for p in man_pages(installed)}
    expected = {"bindguard.8.gz", "bindguard.yaml.5.gz"} | {f"bindguard-{name}.8.gz" for name in COMMANDS}
    assert pages == expected
    found = subprocess.run(["man", "-w", "bindguard"], capture_output=True, text=True, env=SYSTEM)
    assert found.stdout.strip() == "/usr/share/man/man8/bindguard.8.gz", found


def test_every_page_renders_without_warnings(installed):
    for page in man_pages(installed):
        rendered = subprocess.run(["man", "--warnings", "-l", page], capture_output=True, text=True,
                                  env={**SYSTEM, "MANWIDTH": "80"})
        assert rendered.returncode == 0 and rendered.stdout, (page, rendered.stderr)
        assert rendered.stderr == "", (page, rendered.stderr)


def test_the_pages_say_what_help_says(installed):
    """Generated from the parser: each command's page lists each of its options."""
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, child in commands.items():
        text = subprocess.run(["man", "-l", f"/usr/share/man/man8/bindguard-{name}.8.gz"], capture_output=True,
                              text=True, env={**SYSTEM, "MANWIDTH": "1000"}).stdout
        nested = [a.choices.values() for a in child._actions if isinstance(a, argparse._SubParsersAction)]
        for parser in [child, *(p for choices in nested for p in choices)]:
            for action in parser._actions:
                for option in action.option_strings:
                    assert option in ("-h", "--help") or option in text, (name, option)
    yaml5 = subprocess.run(["man", "-l", "/usr/share/man/man5/bindguard.yaml.5.gz"], capture_output=True, text=True,
                           env={**SYSTEM, "MANWIDTH": "1000"}).stdout
    from bindguard.request.config import TOP_KEYS
    assert all(f"\n       {key} (type: " in yaml5 for key in TOP_KEYS), yaml5


def test_lintian_is_clean(installed, tmp_path):
    debs = [built_deb("bindguard"), built_deb("bindguard-every-service")]
    # lintian leaves its ELF caches (mldbm-elf-*) in TMPDIR: the test's own, removed with it
    done = subprocess.run(["lintian", "--pedantic", "-I", "--fail-on", "error,warning", *debs],
                          capture_output=True, text=True, env={**SYSTEM, "TMPDIR": str(tmp_path)}, timeout=300)
    tags = [line for line in done.stdout.splitlines() if line[:2] in ("E:", "W:", "I:", "P:", "X:")]
    assert done.returncode == 0 and not tags, done.stdout + done.stderr


def complete(words: list[str], run=subprocess.run, env=None) -> list[str]:
    """What bash offers for the last of `words`, after bash-completion loads bindguard's file as
    it does on the first Tab."""
    line = " ".join(words)
    script = f"""
source /usr/share/bash-completion/bash_completion
_completion_loader bindguard
complete -p bindguard >&2
COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; COMP_LINE="{line}"; COMP_POINT=${{#COMP_LINE}}
func=$(complete -p bindguard | sed -n 's/.* -F \\([^ ]*\\) .*/\\1/p')
"$func" bindguard "{words[-1]}" "{words[-2]}"
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    done = run(["bash", "--norc", "--noprofile", "-c", script], capture_output=True, text=True,
               **({"env": env} if env is not None else {}))
    assert done.returncode == 0, done.stderr
    assert "complete -o filenames -F _shtab_bindguard bindguard" in done.stderr, done.stderr
    return done.stdout.split()


def test_bash_completes_commands_and_options(installed):
    assert str(BASH_COMPLETION) in installed
    assert "/usr/share/zsh/vendor-completions/_bindguard" in installed
    assert complete(["bindguard", "ch"], env=SYSTEM) == ["check"]
    assert complete(["bindguard", "check", "--reuse"], env=SYSTEM) == ["--reuseaddr", "--reuseport"]
    assert "--print" in complete(["bindguard", "install", "--pr"], env=SYSTEM)


@pytest.mark.integration
def test_bash_completes_unit_names_from_the_manager(installed, systemd_rig):
    """--unit and a command's UNIT take the names the manager lists (--user: the user manager)."""
    rig = systemd_rig
    rig.write_unit("completion-probe.service", "[Service]\nExecStart=/bin/sleep infinity\n")
    assert rig.start("completion-probe.service").ok
    assert "completion-probe.service" in complete(["bindguard", "check", "--user", "--unit", "completion-"],
                                                  run=rig.run)
    assert "completion-probe.service" in complete(["bindguard", "uninstall", "--user", "completion-"], run=rig.run)


def test_zsh_loads_the_completion(installed):
    """zsh's compinit finds _bindguard in vendor-completions and maps bindguard to it."""
    zsh = Path("/usr/share/zsh/vendor-completions/_bindguard")
    assert str(zsh) in installed
    assert subprocess.run(["zsh", "-n", str(zsh)], capture_output=True, text=True, env=SYSTEM).returncode == 0
    done = subprocess.run(["zsh", "-f", "-c", 'autoload -Uz compinit && compinit -u -D && print -r -- "$_comps[bindguard]"'
                           ' && autoload -Uz +X _bindguard && whence -w _bindguard'],
                          capture_output=True, text=True, env={**SYSTEM, "HOME": "/nonexistent"})
    assert done.stdout.split("\n")[:2] == ["_bindguard", "_bindguard: function"], done
