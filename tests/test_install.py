"""bindguard install/uninstall: the drop-in's text, and the round trip under a real user manager."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bindguard.action import install
from bindguard.model.errors import UsageError
from conftest import AS_NOBODY, NOBODY, need_root
from rig import TREE_PROGRAM

BINDGUARD = [sys.executable, "-m", "bindguard"]
SRC = Path(__file__).resolve().parent.parent / "src"


# --- pure logic ----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "arg, quoted",
    [
        ("0.0.0.0:80", "0.0.0.0:80"),
        ("[::]:80", "[::]:80"),
        ("[fe80::1%eth0]:80", "[fe80::1%%eth0]:80"),  # %e would be a specifier
        ("--wait=10", "--wait=10"),
        ("$HOME", "$$HOME"),  # no variable expansion
        ("two words", '"two words"'),
        ('say "hi"\\', '"say \\"hi\\"\\\\"'),
    ],
)
def test_exec_quote(arg, quoted):
    assert install.exec_quote(arg) == quoted


def test_dropin_paths():
    assert install.dropin_path("nginx.service", False) == Path("/etc/systemd/system/nginx.service.d/bindguard.conf")
    env = {"HOME": "/home/ann", "XDG_CONFIG_HOME": "/home/ann/cfg"}
    assert install.dropin_path("web.service", True, env) == Path("/home/ann/cfg/systemd/user/web.service.d/bindguard.conf")
    assert install.dropin_path("web.service", True, {"HOME": "/home/ann"}) == Path(
        "/home/ann/.config/systemd/user/web.service.d/bindguard.conf"
    )


def test_rendered_dropin():
    text = install.render("nginx.service", ["0.0.0.0:80", "[::]:80"], False, ["--wait", "10"], ["/usr/bin/bindguard"])
    assert text.startswith(install.MARKER)
    assert "[Service]\nExecStartPre=+/usr/bin/bindguard check --unit %n --wait 10 0.0.0.0:80 [::]:80\n" in text
    assert "CAP_NET_BIND_SERVICE" in text and "StartLimitBurst=3" in text
    user = install.render("web.service", ["8080"], True, [], ["/usr/bin/bindguard"])
    assert "ExecStartPre=+/usr/bin/bindguard check --unit %n --user 8080\n" in user
    assert "uninstall --user web.service" in user


def _program(path: Path, mode: int) -> Path:
    path.write_text("#!/bin/sh\n")
    path.chmod(mode)
    return path


def test_the_drop_in_names_the_packaged_program_when_root_alone_can_write_it(tmp_path):
    """Even from a venv (as these tests run): the package's program, never the venv's launcher."""
    packaged = _program(tmp_path / "bindguard", 0o755)
    assert install.bindguard_command(packaged=packaged) == ([str(packaged)], None)


@pytest.mark.parametrize("make, flaw", [
    (lambda p: p, "does not exist"),
    (lambda p: _program(p, 0o775), "can be written by others than its owner"),
    (lambda p: _program(p, 0o644), "is not executable"),
    (lambda p: (p.symlink_to(_program(p.with_name("real"), 0o755)), p)[1], "is not a regular file"),
])
def test_without_the_packaged_program_the_drop_in_names_this_launcher_and_says_why(tmp_path, make, flaw):
    packaged = make(tmp_path / "bindguard")
    command, why = install.bindguard_command(packaged=packaged)
    assert command == [str((Path(sys.executable).parent / "bindguard").resolve())]
    assert why == f"{packaged} {flaw}"


def test_a_venv_only_install_warns_in_one_line_that_the_drop_in_names_a_path_outside_the_package(
        tmp_path, monkeypatch, capsys):
    from bindguard.cli import main

    monkeypatch.setattr(install, "PACKAGED_PROGRAM", tmp_path / "absent")
    assert main(["install", "--print", "web.service", "127.0.0.1:8080"]) == 0
    out, err = capsys.readouterr()
    launcher = (Path(sys.executable).parent / "bindguard").resolve()
    assert f"\nExecStartPre=+{launcher} check --unit %n 127.0.0.1:8080\n" in out
    (warning,) = [line for line in err.splitlines() if "warning" in line]
    assert f"the drop-in runs {launcher}, outside the Debian package ({tmp_path}/absent does not exist)" in warning
    assert "install the bindguard package" in warning


def test_program_names_the_program_and_refuses_one_root_should_not_run(tmp_path):
    mine = _program(tmp_path / "bindguard", 0o755)
    printed = subprocess.run([*BINDGUARD, "install", "--print", "--program", str(mine), "web.service", "8080"],
                             capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0 and f"\nExecStartPre=+{mine} check --unit %n 8080\n" in printed.stdout, printed
    assert "warning" not in printed.stderr
    (tmp_path / "shared").mkdir()
    for given, flaw in (("bindguard", "is not an absolute path"),
                        (str(_program(tmp_path / "shared" / "bindguard", 0o775)),
                         "can be written by others than its owner"),
                        ("/usr/bin/dash", "is not named bindguard"),  # root's alone, but no guard
                        (str(_program(tmp_path / "bindguard-old", 0o755)), "is not named bindguard")):
        done = subprocess.run([*BINDGUARD, "install", "--print", "--program", given, "web.service", "8080"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 64 and f"--program {given!r} {flaw}" in done.stderr, done.stderr
        assert done.stdout == "" and "Traceback" not in done.stderr


def _theirs(tmp_path: Path) -> Path:
    """A directory nobody owns (root's files in it could be replaced by nobody)."""
    need_root("files of another user's")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    return theirs


def _interpreter(where: Path) -> Path:
    """A copy of this interpreter in `where` (a copy, not a link: the check follows links)."""
    python = where / "python3"
    shutil.copy2(os.path.realpath(sys.executable), python)
    return python


STDLIB_NAME = f"python{sys.version_info.major}.{sys.version_info.minor}"  # the standard library's directory in lib/


def _venv(venv: Path, home: str | Path) -> Path:
    """A venv as `python3 -m venv --copies` makes one, with the pyvenv.cfg lines it writes: a copy of
    this interpreter in bin/, whose standard library is found from `home`. Its python3."""
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text(f"home = {home}\ninclude-system-site-packages = false\n"
                                     f"version = {'.'.join(map(str, sys.version_info[:3]))}\n")
    return _interpreter(venv / "bin")


def _standard_library(python: Path) -> str:
    """The directory the interpreter, run as a launcher runs it, imports os from."""
    ran = subprocess.run([str(python), "-I", "-S", "-c", "import os; print(os.__file__)"], capture_output=True,
                         text=True, timeout=60)
    assert ran.returncode == 0, ran
    return os.path.dirname(ran.stdout.strip())


def test_program_under_a_directory_another_user_owns_is_refused(tmp_path):
    """The file is root's and no one else can write it, but nobody owns the directory it is in, and
    could put another file in its place: root would run that before every start."""
    theirs = _theirs(tmp_path)
    program = _program(theirs / "bindguard", 0o755)
    done = subprocess.run([*BINDGUARD, "install", "--print", "--program", str(program), "web.service", "8080"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 64 and done.stdout == "", done
    assert f"--program '{program}' can be replaced by others ({theirs} belongs to uid {NOBODY}, not root)" \
        in done.stderr, done.stderr


@pytest.mark.parametrize("console_script", [False, True])
def test_program_whose_python3_others_can_change_is_refused(tmp_path, console_script):
    """--program is a launcher; root runs the python3 it runs too: the one beside it (bin/bindguard's
    rule), or a console script's `#!` python. Here root's, as is the launcher, but a link into a
    directory nobody owns, who could put another python3 in its place."""
    theirs = _theirs(tmp_path)
    python = _interpreter(theirs)
    home = tmp_path / "bin"
    home.mkdir()
    program = home / "bindguard"
    if console_script:
        program.write_text(f"#!{home}/python -I\nimport bindguard\n")
        program.chmod(0o755)
        (home / "python").symlink_to(python)
    else:
        _program(program, 0o755)
        (home / "python3").symlink_to(python)
    done = subprocess.run([*BINDGUARD, "install", "--print", "--program", str(program), "web.service", "8080"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 64 and done.stdout == "" and "Traceback" not in done.stderr, done
    assert f"--program '{program}' runs what others can change ({theirs} belongs to uid {NOBODY}, not root)" \
        in done.stderr, done.stderr


@pytest.mark.parametrize("first_line, flaw", [
    ("#!/usr/bin/python3", "runs /usr/bin/python3 without -I"),
    ("#!/usr/bin/python3 -S", "runs /usr/bin/python3 without -I"),
    ("#!/usr/bin/python3 -WI", "runs /usr/bin/python3 without -I"),  # I: -W's value
    ("#!/usr/bin/python3 -XI", "runs /usr/bin/python3 without -I"),
    ("#!python", "runs 'python', which the unit's working directory would decide"),
    ("#!/usr/bin/env python3", "is no bindguard launcher"),
    ("import bindguard", "is no bindguard launcher"),
])
def test_a_launcher_that_runs_python_other_than_isolated_is_refused(tmp_path, first_line, flaw):
    """Root runs the drop-in's program with the unit's environment: a console script whose python is
    not isolated (-I) would take PYTHONPATH, and a user's site-packages under the $HOME systemd gives
    a `+` command of a unit with User=, from the unit; a relative or env-found one from its
    working directory or PATH."""
    program = tmp_path / "bindguard"
    program.write_text(f"{first_line}\nimport bindguard\n")
    program.chmod(0o755)
    done = subprocess.run([*BINDGUARD, "install", "--print", "--program", str(program), "web.service", "8080"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 64 and done.stdout == "" and f"--program '{program}' {flaw}" in done.stderr, done
    program.write_text(f"#!{os.path.realpath(sys.executable)} -I\nimport bindguard\n")
    done = subprocess.run([*BINDGUARD, "install", "--print", "--program", str(program), "web.service", "8080"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and f"\nExecStartPre=+{program} check --unit %n 8080\n" in done.stdout, done


def test_program_is_named_with_the_links_above_it_resolved(tmp_path):
    """What is checked is what the drop-in names: a link above the program, which whoever owns the
    link's directory could re-point, is not in it."""
    real = tmp_path / "real"
    real.mkdir()
    program = _program(real / "bindguard", 0o755)
    (tmp_path / "link").symlink_to(real)
    done = subprocess.run([*BINDGUARD, "install", "--print", "--program", str(tmp_path / "link" / "bindguard"),
                           "web.service", "8080"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and f"\nExecStartPre=+{program} check --unit %n 8080\n" in done.stdout, done


def test_a_user_s_own_program_is_taken_for_a_user_unit_only():
    """Run as nobody: the program nobody owns may run a unit of nobody's user manager (--user), which
    runs it as nobody, but not a system unit, which runs it as root."""
    need_root("files of another user's")
    home = Path(tempfile.mkdtemp(prefix="bindguard-test-"))  # not under tmp_path: only root enters that
    try:
        program = _program(home / "bindguard", 0o755)
        for path in (home, program):
            os.chown(path, NOBODY, NOBODY)
        home.chmod(0o755)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "XDG_CONFIG_HOME": str(home), "PYTHONPATH": str(SRC)}
        as_nobody = [*AS_NOBODY, "--", "/usr/bin/python3", "-m", "bindguard", "install", "--print", "--program",
                     str(program)]
        mine = subprocess.run([*as_nobody, "--user", "web.service", "8080"], capture_output=True, text=True, env=env,
                              timeout=60)
        assert mine.returncode == 0 and f"\nExecStartPre=+{program} check --unit %n --user 8080\n" in mine.stdout, mine
        system = subprocess.run([*as_nobody, "web.service", "8080"], capture_output=True, text=True, env=env,
                                timeout=60)
        assert system.returncode == 64 and system.stdout == "", system
        assert f"--program '{program}' is owned by uid {NOBODY}, not root\n" in system.stderr, system.stderr
    finally:
        shutil.rmtree(home)


@pytest.mark.parametrize("launcher_in_theirs", [True, False])
def test_without_the_package_a_launcher_others_can_change_is_refused(tmp_path, monkeypatch, launcher_in_theirs):
    """The venv's launcher, or the python3 beside it that it runs, under a directory nobody owns."""
    theirs = _theirs(tmp_path)
    home = theirs if launcher_in_theirs else tmp_path / "bin"
    home.mkdir(exist_ok=True)
    launcher = _program(home / "bindguard", 0o755)
    python = _interpreter(theirs)
    if not launcher_in_theirs:
        (home / "python3").symlink_to(python)
    monkeypatch.setattr(sys, "argv", [str(launcher), "install"])
    monkeypatch.setattr(sys, "executable", str(home / "python3"))
    with pytest.raises(UsageError) as refused:
        install.bindguard_command(packaged=tmp_path / "absent")
    reason = f"({theirs} belongs to uid {NOBODY}, not root)"
    assert refused.value.message == "no bindguard that a unit may run as root: " + (
        f"{tmp_path}/absent does not exist; " + (f"{launcher} can be replaced by others {reason}" if launcher_in_theirs
                                                 else f"{launcher} runs what others can change {reason}"))
    assert refused.value.hint == "install the bindguard package, or give --program"


def test_without_a_launcher_an_interpreter_others_can_change_is_refused(tmp_path, monkeypatch):
    """`python -I -m bindguard`, the last resort, with a python3 in a directory nobody owns."""
    theirs = _theirs(tmp_path)
    python = _interpreter(theirs)
    monkeypatch.setattr(sys, "argv", ["-m", "install"])
    monkeypatch.setattr(sys, "executable", str(python))
    with pytest.raises(UsageError) as refused:
        install.bindguard_command(packaged=tmp_path / "absent")
    assert f"; {python} -I -m bindguard runs what others can change ({theirs} belongs to uid {NOBODY}, not root)" \
        in refused.value.message


def test_an_interpreter_below_a_directory_every_user_may_add_a_pyvenv_cfg_to_is_refused(tmp_path, monkeypatch):
    """Python reads a pyvenv.cfg in its own directory and the one above when it starts, with -I -S
    too, and its `home` names the standard library: in a sticky world-writable directory (/tmp)
    anyone may add one. The interpreter and its own directory are root's alone here; the one above
    is the sticky one, which excuses it as a directory above the interpreter, not as one read."""
    need_root("a copy of the interpreter root would run")
    shared = tmp_path / "shared"
    (shared / "bin").mkdir(parents=True)
    shared.chmod(0o1777)
    python = _interpreter(shared / "bin")
    planted = tmp_path / "planted"  # a standard library of a user's: here a link to the real one
    stdlib = planted / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    stdlib.parent.mkdir(parents=True)
    (planted / "bin").mkdir()
    stdlib.symlink_to(os.path.dirname(os.__file__))
    (shared / "pyvenv.cfg").write_text(f"home = {planted}/bin\n")
    ran = subprocess.run([str(python), "-I", "-S", "-c", "import os; print(os.__file__)"], capture_output=True,
                         text=True, timeout=60)
    assert ran.stdout == f"{stdlib}/os.py\n", ran
    (shared / "pyvenv.cfg").unlink()
    monkeypatch.setattr(sys, "argv", ["-m", "install"])
    monkeypatch.setattr(sys, "executable", str(python))
    with pytest.raises(UsageError) as refused:
        install.bindguard_command(packaged=tmp_path / "absent")
    assert refused.value.message.endswith(
        f"; {python} -I -m bindguard runs what others can change ({shared} can be written by every user)")


def _run_as_install_does(monkeypatch, python: Path) -> None:
    """bindguard_command() as run by `python -m bindguard install` with no launcher beside python."""
    monkeypatch.setattr(sys, "argv", ["-m", "install"])
    monkeypatch.setattr(sys, "executable", str(python))


def test_a_venv_whose_pyvenv_cfg_every_user_may_write_is_refused(tmp_path, monkeypatch):
    """The venv's own pyvenv.cfg is read when its python starts, -I -S or not: whoever may write it
    may change its `home`, which names the standard library root runs. A venv root's alone is taken;
    the same venv with its pyvenv.cfg writable by every user is refused, the file named."""
    need_root("a copy of the interpreter root would run")
    venv = tmp_path / "venv"
    python = _venv(venv, os.path.dirname(os.path.realpath(sys.executable)))
    _run_as_install_does(monkeypatch, python)
    assert install.bindguard_command(packaged=tmp_path / "absent") == (
        [str(python), "-I", "-m", "bindguard"], f"{tmp_path}/absent does not exist")
    (venv / "pyvenv.cfg").chmod(0o666)
    with pytest.raises(UsageError) as refused:
        install.bindguard_command(packaged=tmp_path / "absent")
    assert refused.value.message.endswith(
        f"; {python} -I -m bindguard runs what others can change ({venv}/pyvenv.cfg can be written by every user)")


def test_a_venv_whose_pyvenv_cfg_python_will_not_read_is_refused(tmp_path, monkeypatch):
    """Python reads less than 32 KiB of a pyvenv.cfg and does not start with a larger one; bindguard
    reads no more of it either, and refuses a venv whose python would not start, the file named."""
    need_root("a copy of the interpreter root would run")
    venv = tmp_path / "venv"
    python = _venv(venv, os.path.dirname(os.path.realpath(sys.executable)))
    with (venv / "pyvenv.cfg").open("a") as cfg:
        cfg.write("#" * (32 * 1024))
    ran = subprocess.run([str(python), "-I", "-S", "-c", "pass"], capture_output=True, text=True, timeout=60)
    assert ran.returncode != 0 and "larger than 32KB" in ran.stderr, ran
    _run_as_install_does(monkeypatch, python)
    with pytest.raises(UsageError) as refused:
        install.bindguard_command(packaged=tmp_path / "absent")
    assert f"; {python} -I -m bindguard reads {venv}/pyvenv.cfg when it starts, which " in refused.value.message


def test_a_venv_whose_pyvenv_cfg_names_a_home_a_user_owns_is_refused(tmp_path, monkeypatch):
    """A venv root's alone, its python made with --copies from a user's Python (a pyenv build in
    their home): its pyvenv.cfg's `home` names the user's directory, from which Python finds its
    standard library, so root would import what the user writes. Refused, that directory named."""
    theirs = _theirs(tmp_path)
    home = theirs / "bin"
    stdlib = theirs / "lib" / STDLIB_NAME  # a user's standard library: here a link to the real one
    home.mkdir()
    stdlib.parent.mkdir()
    stdlib.symlink_to(os.path.dirname(os.__file__))
    for path in (home, stdlib.parent):
        os.chown(path, NOBODY, NOBODY)
    python = _venv(tmp_path / "venv", home)
    assert _standard_library(python) == str(stdlib)
    _run_as_install_does(monkeypatch, python)
    with pytest.raises(UsageError) as refused:
        install.bindguard_command(packaged=tmp_path / "absent")
    assert refused.value.message.endswith(
        f"; {python} -I -m bindguard runs what others can change ({home} belongs to uid {NOBODY}, not root)")


def test_a_launcher_whose_venv_takes_its_standard_library_from_a_user_s_directory_is_refused(tmp_path):
    """`home` names a directory root's alone, but the standard library Python finds from it, in
    HOME/../lib, is in a directory a user owns. The launcher's python is not the one running
    install, so that directory is found as Python's getpath finds it, not from sys."""
    need_root("a copy of the interpreter root would run")
    planted = tmp_path / "planted"
    lib = planted / "lib"
    (planted / "bin").mkdir(parents=True)
    lib.mkdir()
    (lib / STDLIB_NAME).symlink_to(os.path.dirname(os.__file__))  # a user's standard library
    os.chown(lib, NOBODY, NOBODY)
    venv = tmp_path / "venv"
    python = _venv(venv, planted / "bin")
    assert _standard_library(python) == str(lib / STDLIB_NAME)
    launcher = _program(venv / "bin" / "bindguard", 0o755)
    done = subprocess.run([*BINDGUARD, "install", "--print", "--program", str(launcher), "web.service", "8080"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 64 and done.stdout == "" and "Traceback" not in done.stderr, done
    assert f"--program '{launcher}' runs what others can change ({lib} belongs to uid {NOBODY}, not root)" \
        in done.stderr, done.stderr
    (venv / "pyvenv.cfg").write_text(f"home = {os.path.dirname(os.path.realpath(sys.executable))}\n")
    done = subprocess.run([*BINDGUARD, "install", "--print", "--program", str(launcher), "web.service", "8080"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and f"\nExecStartPre=+{launcher} check --unit %n 8080\n" in done.stdout, done


def test_python_m_bindguard_from_a_site_directory_every_user_may_add_a_pth_to_is_refused(tmp_path):
    """`python -I -m bindguard` runs site (it has no -S), which runs the `import` lines of every *.pth
    file in each site directory: a sticky world-writable site-packages keeps others from replacing
    the bindguard package in it, not from adding a .pth beside it. A venv's copied interpreter and
    a copy of the package, root's alone, are taken; with site-packages sticky and world-writable
    they are refused, the directory named."""
    need_root("a copy of the interpreter and the package root would run")
    venv = tmp_path / "venv"
    python = _venv(venv, os.path.dirname(os.path.realpath(sys.executable)))
    site_packages = venv / "lib" / STDLIB_NAME / "site-packages"
    shutil.copytree(SRC / "bindguard", site_packages / "bindguard", ignore=shutil.ignore_patterns("__pycache__"))
    choose = ("import pathlib; from bindguard.action import install; from bindguard.model.errors import UsageError\n"
              "try: print(install.bindguard_command(packaged=pathlib.Path('/absent')))\n"
              "except UsageError as refused: print(refused.message)")
    taken = subprocess.run([str(python), "-I", "-c", choose], capture_output=True, text=True, timeout=60)
    assert taken.stdout == f"([{str(python)!r}, '-I', '-m', 'bindguard'], '/absent does not exist')\n", taken
    site_packages.chmod(0o1777)
    ran = tmp_path / "ran"
    (site_packages / "anyone.pth").write_text(f"import pathlib; pathlib.Path({str(ran)!r}).touch()\n")
    subprocess.run([str(python), "-I", "-m", "bindguard", "--version"], capture_output=True, timeout=60, check=True)
    assert ran.exists()
    (site_packages / "anyone.pth").unlink()
    refused = subprocess.run([str(python), "-I", "-c", choose], capture_output=True, text=True, timeout=60)
    assert refused.stdout == (f"no bindguard that a unit may run as root: /absent does not exist; {python} -I -m "
                              f"bindguard runs what others can change ({site_packages} can be written by every user)\n"
                              ), refused


def test_without_the_package_nor_a_trusted_launcher_install_exits_64_in_one_line(tmp_path, monkeypatch, capsys):
    from bindguard.cli import main

    theirs = _theirs(tmp_path)
    launcher = _program(theirs / "bindguard", 0o755)
    monkeypatch.setattr(install, "PACKAGED_PROGRAM", tmp_path / "absent")
    monkeypatch.setattr(sys, "argv", [str(launcher), "install"])
    monkeypatch.setattr(sys, "executable", str(_interpreter(theirs)))
    assert main(["install", "--print", "web.service", "127.0.0.1:8080"]) == 64
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    error, hint = err.splitlines()
    assert error.startswith("bindguard: error: no bindguard that a unit may run as root:") and str(launcher) in error
    assert hint.strip() == "hint: install the bindguard package, or give --program"


def test_bad_input_is_one_clear_message_and_exit_64(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "XDG_CONFIG_HOME": str(tmp_path), "PYTHONPATH": ":".join(sys.path)}
    for argv, needle in (
        (["install", "--user", "web.service", "127.0.0.1:80x"], "port '80x' is not a number"),
        (["install", "--user", "web.service", "[::1]"], "[ADDRESS]:PORT"),
        (["install", "--user", "web.timer", "80"], "bindguard guards services and socket units"),
        (["install", "--user", "web.service", "80", "--check-args", "'unclosed"], "--check-args"),
        (["install", "--user", "web.service", "80", "--check-args=--bogus"], "check options '--bogus'"),
    ):
        done = subprocess.run([*BINDGUARD, *argv], capture_output=True, text=True, env=env)
        assert done.returncode == 64, (argv, done.stderr)
        assert needle in done.stderr and "Traceback" not in done.stderr
    assert not any(tmp_path.iterdir())


INJECTED = "ExecStartPre=/bin/touch /tmp/INJECTED"


@pytest.mark.parametrize("argv", [
    ["web.service", f"[fe80::1%lo\n{INJECTED}\n#]:8080"],
    ["web.service", "8080", "--check-args", f"--daemon-user 'x\n{INJECTED}'"],
    ["web.service", "8080", "--optional", f"[fe80::1%lo\n{INJECTED}\n#]:8081"],
    ["web.service", "8080", "--check-args", "--daemon-user 'a\x1b[2Jb'"],
    ["web.service", "[fe80::1%" + "x" * 16 + "]:8080"],  # no interface name is that long
])
def test_control_characters_are_refused_before_anything_is_written(tmp_path, argv):
    """install --print rendered an extra ExecStartPre= line from a newline in an argument."""
    env = {"PATH": "/usr/bin:/bin", "XDG_CONFIG_HOME": str(tmp_path), "PYTHONPATH": ":".join(sys.path)}
    for mode in (["--print"], ["--user"]):
        done = subprocess.run([*BINDGUARD, "install", *mode, *argv], capture_output=True, text=True, env=env)
        assert done.returncode == 64, done.stdout + done.stderr
        assert done.stdout == "" and "Traceback" not in done.stderr
    assert not any(tmp_path.iterdir())


def test_a_unit_d_linked_out_of_the_unit_directory_is_not_followed(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "XDG_CONFIG_HOME": str(tmp_path / "cfg"), "PYTHONPATH": ":".join(sys.path)}
    units = tmp_path / "cfg" / "systemd" / "user"
    units.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (units / "web.service.d").symlink_to(elsewhere)
    done = subprocess.run([*BINDGUARD, "install", "--user", "web.service", "8080"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 78 and f"is a link to {elsewhere}" in done.stderr, done.stderr
    assert not any(elsewhere.iterdir())
    done = subprocess.run([*BINDGUARD, "uninstall", "--user", "web.service"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 78
    # a FIFO where the drop-in goes is not bindguard's, and reading it must not block
    (units / "web.service.d").unlink()
    (units / "web.service.d").mkdir()
    os.mkfifo(units / "web.service.d" / "bindguard.conf")
    done = subprocess.run([*BINDGUARD, "install", "--user", "web.service", "8080"], capture_output=True, text=True,
                          env=env, timeout=30)
    assert done.returncode == 78 and "was not written by bindguard" in done.stderr


# --- what discovery knows, carried into the drop-in (Debian's own unit files and configurations) --

def _exec_start_pre(text: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith("ExecStartPre=+"))
    return shlex.split(line[len("ExecStartPre=+"):])


def test_install_takes_socket_options_and_optional_addresses_from_discovery():
    """`install nginx.service 0.0.0.0:80 [::]:80` was refused at every start (self-conflict): nginx
    sets ipv6only=on; Redis's `bind 127.0.0.1 -::1` makes ::1 optional."""
    nginx = subprocess.run([*BINDGUARD, "install", "--print", "nginx.service", "0.0.0.0:80", "[::]:80"],
                           capture_output=True, text=True, timeout=60)
    assert nginx.returncode == 0, nginx.stderr
    assert _exec_start_pre(nginx.stdout)[-5:] == ["--unit", "%n", "--v6only", "0.0.0.0:80", "[::]:80"]
    assert "--v6only for nginx.service, from /etc/nginx/" in nginx.stderr
    stated = subprocess.run([*BINDGUARD, "install", "--print", "nginx.service", "0.0.0.0:80", "[::]:80",
                             "--check-args=--no-v6only"], capture_output=True, text=True, timeout=60)
    assert _exec_start_pre(stated.stdout)[-4:] == ["%n", "--no-v6only", "0.0.0.0:80", "[::]:80"]  # not both
    redis = subprocess.run([*BINDGUARD, "install", "--print", "redis-server.service", "127.0.0.1:6379", "[::1]:6379"],
                           capture_output=True, text=True, timeout=60)
    assert redis.returncode == 0, redis.stderr
    assert _exec_start_pre(redis.stdout)[-4:] == ["--v6only", "--if-available", "[::1]:6379", "127.0.0.1:6379"]
    # a bare port is the whole port: dual-stack, as written (--program: no warning whether or not the
    # package is installed)
    whole = subprocess.run([*BINDGUARD, "install", "--print", "--program", TREE_PROGRAM, "nginx.service", "80"],
                           capture_output=True, text=True, timeout=60)
    assert _exec_start_pre(whole.stdout)[-3:] == ["--unit", "%n", "80"] and "warning" not in whole.stderr
    partial = subprocess.run([*BINDGUARD, "install", "--print", "nginx.service", "0.0.0.0:80"], capture_output=True,
                             text=True, timeout=60)
    assert "nginx.service also binds [::]:80" in partial.stderr and "the guard will not check it" in partial.stderr
    bare = subprocess.run([*BINDGUARD, "install", "--print", "nginx.service"], capture_output=True, text=True,
                          timeout=60)
    assert bare.returncode == 0, bare.stderr
    assert _exec_start_pre(bare.stdout)[-3:] == ["check", "--unit", "%n"]
    assert "now [::]:80 from /etc/nginx/" in bare.stderr
    nothing = subprocess.run([*BINDGUARD, "install", "--print", "nothing-known.service"], capture_output=True,
                             text=True, timeout=60)
    assert nothing.returncode == 64 and "no address to guard for nothing-known.service" in nothing.stderr
    twice = subprocess.run([*BINDGUARD, "install", "--print", "web.service", "80", "--optional", "80"],
                           capture_output=True, text=True, timeout=60)
    assert twice.returncode == 64 and "given twice" in twice.stderr


@pytest.mark.integration
def test_the_rendered_redis_and_nginx_lines_pass_where_the_daemons_start(netns):
    """Run the drop-in's own command line, as systemd would, on a host without IPv6 on lo."""
    netns.sysctl("net.ipv6.conf.lo.disable_ipv6", "1")
    redis = subprocess.run([*BINDGUARD, "install", "--print", "redis-server.service", "127.0.0.1:6379", "[::1]:6379"],
                           capture_output=True, text=True, timeout=60)
    argv = [a.replace("%n", "redis-server.service") for a in _exec_start_pre(redis.stdout)]
    done = netns.run([*argv, "--no-systemd", "--wait", "0"])
    assert done.returncode == 0 and "a warning only" in done.stderr, done.stderr
    netns.sysctl("net.ipv6.conf.lo.disable_ipv6", "0")
    nginx = subprocess.run([*BINDGUARD, "install", "--print", "nginx.service", "0.0.0.0:80", "[::]:80"],
                           capture_output=True, text=True, timeout=60)
    argv = [a.replace("%n", "nginx.service") for a in _exec_start_pre(nginx.stdout)]
    done = netns.run([*argv, "--no-systemd", "--wait", "0"])
    assert done.returncode == 0, done.stderr


# --- under the rig -------------------------------------------------------------------------

WEB = "[Service]\nExecStart=/bin/sleep infinity\n"


@pytest.mark.integration
def test_install_uninstall_round_trip_on_a_user_unit(systemd_rig):
    rig = systemd_rig
    rig.write_unit("web.service", WEB)
    dropin = rig.unit_dir / "web.service.d" / "bindguard.conf"

    done = rig.bindguard("install", "--user", "web", "127.0.0.1:8080", "[::1]:8080")
    assert done.returncode == 0, done.stderr
    assert f"wrote {dropin}" in done.stderr
    assert dropin.read_text().startswith(install.MARKER)
    cat = rig.systemctl("cat", "web.service").stdout
    assert f"# {dropin}" in cat and "check --unit %n --user 127.0.0.1:8080 [::1]:8080" in cat
    # The manager has read it (daemon-reload over D-Bus), with %n filled in.
    shown = rig.show("web.service", "DropInPaths", "NeedDaemonReload", "ExecStartPre")
    assert str(dropin) in shown["DropInPaths"] and shown["NeedDaemonReload"] == "no"
    assert "--unit web.service --user 127.0.0.1:8080 [::1]:8080" in shown["ExecStartPre"].replace(" ; ", " ")
    assert "flags=privileged" in rig.prop("web.service", "ExecStartPreEx")  # the "+"

    again = rig.bindguard("install", "--user", "web.service", "127.0.0.1:8080", "[::1]:8080")
    assert again.returncode == 0 and "already in place" in again.stderr

    changed = rig.bindguard("install", "--user", "web.service", "127.0.0.1:9090")
    assert changed.returncode == 0 and "127.0.0.1:9090" in dropin.read_text()

    theirs = rig.write_dropin("web.service", "override.conf", "[Service]\nEnvironment=KEEP=1\n")
    done = rig.bindguard("uninstall", "--user", "web.service")
    assert done.returncode == 0, done.stderr
    assert not dropin.exists() and theirs.exists()
    assert rig.show("web.service", "DropInPaths")["DropInPaths"] == str(theirs)

    done = rig.bindguard("uninstall", "--user", "web.service")
    assert done.returncode == 0 and "nothing to remove" in done.stderr


@pytest.mark.integration
def test_a_file_bindguard_did_not_write_is_left_alone(systemd_rig):
    rig = systemd_rig
    rig.write_unit("web.service", WEB)
    foreign = rig.write_dropin("web.service", "bindguard.conf", "[Service]\nExecStartPre=/bin/true\n")
    before = foreign.read_text()

    done = rig.bindguard("install", "--user", "web.service", "8080")
    assert done.returncode == 78
    assert f"{foreign} exists and was not written by bindguard" in done.stderr and "hint:" in done.stderr
    assert foreign.read_text() == before

    done = rig.bindguard("uninstall", "--user", "web.service")
    assert done.returncode == 78 and foreign.read_text() == before


@pytest.mark.integration
def test_json_says_whether_the_file_changed_and_print_json_whether_it_would(systemd_rig):
    """What a configuration tool (the Ansible role) reads to report a change only when there is one,
    and in a dry run (--print) what would change without writing; --no-reload leaves the reload to it."""
    rig = systemd_rig
    rig.write_unit("web.service", WEB)
    assert rig.systemctl("start", "web.service").returncode == 0  # kept loaded: `show` would load it afresh
    dropin = rig.unit_dir / "web.service.d" / "bindguard.conf"

    def install_json(*argv: str) -> dict:
        done = rig.bindguard("install", "--user", "--json=short", *argv, "web.service", "127.0.0.1:8080")
        assert done.returncode == 0, done.stderr
        assert len(done.stdout.splitlines()) == 1, done.stdout
        document = json.loads(done.stdout)
        assert document["schema_version"] == 1 and document["unit"] == "web.service"
        assert document["path"] == str(dropin)
        return document

    would = install_json("--print")
    assert would["changed"] is True and not dropin.exists()
    assert "ExecStartPre=+" in would["dropin"] and "127.0.0.1:8080" in would["dropin"]

    wrote = install_json("--no-reload")
    assert wrote["changed"] is True and dropin.read_text() == wrote["dropin"] == would["dropin"]
    assert rig.prop("web.service", "DropInPaths") == ""  # the manager has not read it: the caller reloads

    assert install_json()["changed"] is False
    assert install_json("--print")["changed"] is False
    assert rig.prop("web.service", "DropInPaths") == ""  # nothing changed: no reload
    rig.daemon_reload()
    assert rig.prop("web.service", "DropInPaths") == str(dropin)

    # what install would refuse, --print --json refuses too: a dry run fails where the run would
    dropin.write_text("[Service]\nExecStartPre=/bin/true\n")
    done = rig.bindguard("install", "--user", "--json", "--print", "web.service", "127.0.0.1:8080")
    assert done.returncode == 78 and done.stdout == "", done.stdout
    assert "was not written by bindguard" in done.stderr
    assert rig.bindguard("install", "--user", "--print", "web.service", "127.0.0.1:8080").returncode == 0


@pytest.mark.integration
def test_install_reloads_through_systemctl_when_the_bus_is_down(systemd_rig):
    rig = systemd_rig
    rig.write_unit("web.service", WEB)
    rig.stop_bus()
    done = rig.bindguard("install", "--user", "--program", TREE_PROGRAM, "web.service", "8080")
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr
    assert rig.show("web.service", "NeedDaemonReload")["NeedDaemonReload"] == "no"
    assert "bindguard.conf" in rig.show("web.service", "DropInPaths")["DropInPaths"]


@pytest.mark.integration
def test_install_warns_about_a_unit_the_manager_does_not_know(systemd_rig):
    done = systemd_rig.bindguard("install", "--user", "later.service", "8080")
    assert done.returncode == 0
    assert "knows no unit later.service yet" in done.stderr


@pytest.mark.integration
@pytest.mark.parametrize(
    "example, listens",
    [
        ("systemd/bindguard.conf.example", "--v6only 0.0.0.0:80 [::]:80"),
        ("examples/nginx/bindguard.conf", "--v6only 0.0.0.0:80 [::]:80"),
        ("examples/ssh/bindguard.conf", "--v6only 0.0.0.0:22 [::]:22"),
        ("examples/user-web/web.service.d/bindguard.conf", "--user 127.0.0.1:8080"),
    ],
)
def test_shipped_dropins_parse_as_systemd_reads_them(systemd_rig, example, listens):
    rig = systemd_rig
    rig.write_unit("ex.service", WEB, reload=False)
    text = (Path(__file__).parents[1] / example).read_text()
    rig.write_dropin("ex.service", "bindguard.conf", text)
    shown = rig.show("ex.service", "ExecStartPre", "ExecStartPreEx", "LoadState")
    assert shown["LoadState"] == "loaded"
    assert f"argv[]=/usr/bin/bindguard check --unit ex.service {listens} ;" in shown["ExecStartPre"]
    assert "flags=privileged" in shown["ExecStartPreEx"], shown["ExecStartPreEx"]


@pytest.mark.integration
def test_user_web_example_unit_loads_with_its_dropin(systemd_rig):
    rig = systemd_rig
    example = Path(__file__).parents[1] / "examples" / "user-web"
    rig.write_unit("web.service", (example / "web.service").read_text(), reload=False)
    rig.write_dropin("web.service", "bindguard.conf", (example / "web.service.d" / "bindguard.conf").read_text())
    shown = rig.show("web.service", "LoadState", "StartLimitBurst", "Restart", "ExecStartPre", "ExecStart")
    assert shown["LoadState"] == "loaded" and shown["StartLimitBurst"] == "3" and shown["Restart"] == "on-failure"
    assert "check --unit web.service --user 127.0.0.1:8080" in shown["ExecStartPre"]
    assert f"--directory {rig.home}/public_html" in shown["ExecStart"]


@pytest.mark.integration
def test_hard_arguments_reach_systemd_as_given_and_nothing_more(systemd_rig):
    """Quotes, backslashes, $, % and spaces are carried as one argument each; a newline is refused."""
    rig = systemd_rig
    rig.write_unit("web.service", WEB)
    user = 'a "b" \\c $HOME %n'
    done = rig.bindguard("install", "--user", "web.service", "[fe80::1%lo]:8080",
                         "--check-args", shlex.join(["--daemon-user", user]))
    assert done.returncode == 0, done.stderr
    pre = rig.show("web.service", "ExecStartPre")["ExecStartPre"]
    assert pre.count("argv[]=") == 1 and "INJECTED" not in pre
    # as systemd keeps it: %% became %, and $$ stays until the command runs, when it becomes $
    assert f"--daemon-user {user.replace('$', '$$')} [fe80::1%lo]:8080 ;" in pre, pre
    refused = rig.bindguard("install", "--user", "web.service", f"[fe80::1%lo\n{INJECTED}\n#]:8080")
    assert refused.returncode == 64
    assert rig.show("web.service", "ExecStartPre")["ExecStartPre"] == pre


def test_the_drop_in_names_an_escaped_unit_as_a_shell_takes_it():
    """`bindguard uninstall foo\\x2dbar.service` in a shell would name foox2dbar.service."""
    printed = subprocess.run([*BINDGUARD, "install", "--print", "foo\\x2dbar.service", "8080"],
                             capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0, printed.stderr
    assert "`bindguard uninstall 'foo\\x2dbar.service'` removes it." in printed.stdout, printed.stdout
