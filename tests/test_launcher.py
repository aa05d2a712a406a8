"""The installed command, bin/bindguard, as the every-service drop-in runs it: as root, with the
unit's environment. Its interpreter is isolated from that environment, and a broken install
(a package that does not load, no interpreter at all) lets every service start and says why."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_console import journal_stream_run

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src"
SHIPPED_DROPIN = REPO / "systemd" / "service.d" / "bindguard.conf"
VENV_LAUNCHER = Path(sys.executable).parent / "bindguard"  # as pip installed it in .venv/bin


def installed_launcher() -> Path:
    """The venv's bin/bindguard, which must be bin/bindguard as it is now (pip copies it at install)."""
    if not VENV_LAUNCHER.is_file() or VENV_LAUNCHER.read_bytes() != (REPO / "bin" / "bindguard").read_bytes():
        pytest.fail(f"{VENV_LAUNCHER} is not this tree's bin/bindguard: rerun ./setup.sh --test to install it")
    return VENV_LAUNCHER


def launcher_tool():
    """tools/launcher.py, which writes the Debian package's form of the launcher."""
    spec = importlib.util.spec_from_file_location("launcher", REPO / "tools" / "launcher.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def package_launcher(python: Path) -> str:
    """The Debian package's form of the launcher: bin/bindguard's Python text as a `#!PYTHON -IS` script."""
    return launcher_tool().script(str(python))


# The launcher's two forms: bin/bindguard (/bin/sh, for a venv, whose interpreter may go away),
# and the package's script, which its python3 runs directly (a dependency dpkg keeps installed).
FORMS = ("sh", "script")


def copy_install(root: Path, form: str = "sh") -> Path:
    """A second install of this tree: a venv of the same interpreter (Debian's psutil, PyYAML and
    pystemd from the system site), the package copied into it, and the launcher in `form`. Returns
    its bin/."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(root)], check=True)
    site = root / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    shutil.copytree(SRC / "bindguard", site / "bindguard", ignore=shutil.ignore_patterns("__pycache__"))
    if form == "sh":
        shutil.copy2(REPO / "bin" / "bindguard", root / "bin" / "bindguard")
    else:
        launcher_tool().write(root / "bin" / "bindguard", str(root / "bin" / "python3"))
    return root / "bin"


def break_install(bin_dir: Path, how: str) -> None:
    site = next(bin_dir.parent.glob("lib/python3*/site-packages"))
    if how == "syntax error":
        with open(site / "bindguard" / "cli" / "__init__.py", "a") as f:
            f.write("\ndef (\n")
    elif how == "missing module":
        (site / "bindguard" / "cli" / "fastpath.py").unlink()
    elif how == "no interpreter":  # the venv's python3 gone (an upgrade), and /usr/bin/python3 as well
        for python in bin_dir.glob("python*"):
            python.unlink()
        launcher = bin_dir / "bindguard"
        launcher.write_text(launcher.read_text().replace("/usr/bin/python3", "/nonexistent/python3"))


def test_the_installed_launcher_is_bin_bindguard():
    assert installed_launcher().stat().st_mode & 0o111


@pytest.mark.integration
@pytest.mark.parametrize("form", FORMS)
def test_the_units_environment_does_not_reach_the_interpreter(systemd_rig, form, tmp_path):
    """ExecStartPre=+ keeps the unit's Environment= and WorkingDirectory=: with PYTHONPATH naming
    a directory of the service's, its bindguard/ and sitecustomize.py would run as root."""
    if form == "sh":
        launcher = installed_launcher()
    else:  # this checkout's, as the venv's python finds it (its editable install's .pth)
        launcher = tmp_path / "bindguard"
        launcher.write_text(package_launcher(VENV_LAUNCHER.parent / "python3"))
        launcher.chmod(0o755)
    rig = systemd_rig
    planted, marker = rig.root / "planted", rig.root / "marker"
    user_site = planted / "userbase" / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    for directory in (planted / "bindguard", user_site):
        directory.mkdir(parents=True)
    payload = f"open({str(marker)!r}, 'a').write(__name__ + '\\n')\nraise SystemExit(0)\n"
    for name in ("bindguard/__init__.py", "sitecustomize.py", "usercustomize.py", "planted_warning.py"):
        (planted / name).write_text(payload)
    (user_site / "usercustomize.py").write_text(payload)
    log = rig.log("web.log")
    rig.write_unit("web.service", f"""[Service]
Environment=PYTHONPATH={planted} PYTHONUSERBASE={planted}/userbase PYTHONSTARTUP={planted}/sitecustomize.py
Environment=PYTHONWARNINGS=ignore::planted_warning.Warning PYTHONINSPECT=1
WorkingDirectory={planted}
ExecStartPre=+{launcher} check --wait 0 127.0.0.1:18090
ExecStart=/bin/sleep infinity
StandardError=append:{log}
""")
    holder = rig.hold({"proto": "tcp", "host": "127.0.0.1", "port": 18090, "reuseaddr": True})
    refused = rig.start("web.service")
    assert refused.pre_status == [98], (refused, log.read_text())
    assert "127.0.0.1:18090 in use" in log.read_text()
    assert not marker.exists(), marker.read_text()
    rig.release(holder)
    assert rig.start("web.service").ok, log.read_text()
    assert "bindguard: clear: 127.0.0.1:18090 can be bound" in log.read_text()
    assert not marker.exists(), marker.read_text()


@pytest.mark.integration
@pytest.mark.parametrize("form", FORMS)
def test_a_broken_install_lets_every_service_start_and_says_why(systemd_rig, form):
    rig = systemd_rig
    cases = {  # how the install is broken -> what the unit's log says
        "whole": "bindguard: nothing to guard for whole.service",
        "syntax error": "bindguard: cannot load the bindguard package with {bin}/python3 (SyntaxError: invalid "
                        "syntax (__init__.py, line",
        "missing module": "bindguard: internal error: ImportError: cannot import name 'fastpath' from 'bindguard.cli' "
                          "({bin.parent}/lib/",
        "no interpreter": "bindguard: no Python interpreter at {bin}/python3 nor /nonexistent/python3; "
                          "nothing was checked, failing open",
    }
    shipped = SHIPPED_DROPIN.read_text()
    assert "ExecStartPre=+/usr/bin/bindguard check --unit %n\n" in shipped
    if form == "script":
        del cases["no interpreter"]  # the package's python3 is a dependency: dpkg keeps it installed
    for how, says in cases.items():
        unit = how.replace(" ", "-") + ".service"
        bin_dir = copy_install(rig.root / unit.replace(".service", ""), form)
        break_install(bin_dir, how)
        rig.write_dropin("service", "bindguard.conf", shipped.replace("/usr/bin/bindguard", str(bin_dir / "bindguard")),
                         reload=False)
        log = rig.log(unit.replace(".service", ".log"))
        rig.write_unit(unit, f"[Service]\nEnvironment=SYSTEMD_LOG_LEVEL=debug\nExecStart=/bin/sleep infinity\n"
                             f"StandardError=append:{log}\n", reload=False)
        rig.write_unit("plain.service", "[Service]\nExecStart=/bin/sleep infinity\n")
        for name in (unit, "plain.service"):
            started = rig.start(name)
            assert started.ok and started.pre_status == [0], (how, started, log.read_text())
            rig.stop(name)
        text = log.read_text()
        expected = says.format(bin=bin_dir)  # a log file, not the journal's stream: no priority prefix
        assert expected in text and "<4>" not in text, (how, text)
        # the package's own handler (cli.main) words a module missing below it in two lines
        assert "Traceback" not in text and len(text.splitlines()) == (2 if how == "missing module" else 1), (how, text)


def test_python_m_bindguard_fails_open_on_a_broken_package(tmp_path):
    shutil.copytree(SRC / "bindguard", tmp_path / "bindguard", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "bindguard" / "cli" / "__init__.py").write_text("def (\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)}
    opened = subprocess.run([sys.executable, "-m", "bindguard", "check", "80"], capture_output=True, text=True, env=env, timeout=60)
    assert opened.returncode == 0 and opened.stdout == "", opened.stderr
    assert opened.stderr.startswith("bindguard: cannot load the bindguard package with ")
    assert opened.stderr.endswith("; nothing was checked, failing open\n") and opened.stderr.count("\n") == 1
    code, err = journal_stream_run([sys.executable, "-m", "bindguard", "check", "--fail-closed", "80"], env)
    assert code == 70 and err.startswith("<3>bindguard: cannot load") and err.endswith("failing closed (--fail-closed)\n")


def test_no_interpreter_fails_closed_when_asked(tmp_path):
    launcher = tmp_path / "bindguard"
    launcher.write_text((REPO / "bin" / "bindguard").read_text().replace("/usr/bin/python3", "/nonexistent/python3"))
    launcher.chmod(0o755)
    opened = subprocess.run([str(launcher), "check", "80"], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert (opened.returncode, opened.stderr) == (0, f"bindguard: no Python interpreter at {tmp_path}/python3 nor "
                                                     "/nonexistent/python3; nothing was checked, failing open\n")
    code, err = journal_stream_run([str(launcher), "check", "--fail-closed", "80"], {"PATH": "/usr/bin:/bin"})
    assert code == 70 and err.startswith("<3>bindguard: no Python interpreter at ")
    assert err.endswith("failing closed (--fail-closed)\n")


def test_a_symlink_to_the_launcher_finds_its_interpreter(tmp_path):
    (tmp_path / "bindguard").symlink_to(installed_launcher())
    proc = subprocess.run([str(tmp_path / "bindguard"), "--version"], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and proc.stdout.startswith("bindguard "), proc.stderr


@pytest.mark.integration
def test_a_guard_stopped_under_exec_start_pre_says_so(systemd_rig):
    """systemd ends a start that runs out of TimeoutStartSec= with SIGTERM: the guard's line is
    what the journal (here the unit's stderr log) keeps of it."""
    rig = systemd_rig
    log = rig.log("slow.log")
    rig.write_unit("slow.service", f"""[Service]
ExecStartPre=+{installed_launcher()} verify --unit %n --no-systemd --timeout 60 127.0.0.1:18092
ExecStart=/bin/sleep infinity
TimeoutStartSec=2
StandardError=append:{log}
""")
    started = rig.start("slow.service")
    assert not started.ok and started.result == "timeout", started
    assert log.read_text() == "bindguard: stopped by SIGTERM before it finished (exit 143)\n"


EXIT_HOOKS = """
import atexit as _atexit, threading as _threading, time as _time
def _mark(what):
    with open({marker!r}, "a") as f:
        f.write(what + "\\n")
_atexit.register(_mark, "exit handler ran")
_atexit.register(print, "said at exit")  # to stdout, which a pipe buffers: flushed after the handlers
if {thread!r}:
    _threading.Thread(target=lambda: (_time.sleep(0.3), _mark("thread finished"))).start()
"""


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("thread", [False, True])
def test_the_process_ends_with_its_output_written_and_its_exit_handlers_run(tmp_path, form, thread):
    """The launcher ends the process without the interpreter's teardown: still, JSON on a pipe is
    whole, the exit code is the command's, exit handlers run, and a thread that is still running
    is waited for (the exit then is Python's own)."""
    bin_dir = copy_install(tmp_path / "venv", form)
    site = next(bin_dir.parent.glob("lib/python3*/site-packages"))
    marker = tmp_path / "marker"
    with open(site / "bindguard" / "cli" / "__init__.py", "a") as f:
        f.write(EXIT_HOOKS.format(marker=str(marker), thread=thread))
    env = {"PATH": "/usr/bin:/bin"}
    clear = subprocess.run([str(bin_dir / "bindguard"), "check", "--json=short", "--no-systemd", "127.0.0.1:18473"],
                           capture_output=True, text=True, env=env, timeout=60)
    report, said = clear.stdout.rsplit("\n", 2)[:2] if clear.stdout.endswith("\n") else (clear.stdout, "")
    assert clear.returncode == 0 and json.loads(report)["verdict"] == "clear", clear.stderr
    assert said == "said at exit", clear.stdout
    usage = subprocess.run([str(bin_dir / "bindguard"), "check", "--no-systemd", "127.0.0.1:99999"],
                           capture_output=True, text=True, env=env, timeout=60)
    assert usage.returncode == 64 and "out of range" in usage.stderr, usage.stderr
    assert usage.stdout == "said at exit\n", usage.stdout
    lines = marker.read_text().splitlines()
    assert sorted(lines) == sorted(["exit handler ran"] * 2 + ["thread finished"] * 2 * thread), lines


SITE_MARKER_PTH = "import os; open({marker!r}, 'a').write('site ran\\n')\n"


def test_site_runs_only_for_a_dependency(tmp_path):
    """bin/bindguard runs python3 -I -S: the package from the venv's own site-packages, no .pth
    file processed on the fast path, nor on a full command that needs no dependency; site runs
    just before PyYAML (or pystemd) is imported."""
    bin_dir = copy_install(tmp_path / "venv")
    site = next(bin_dir.parent.glob("lib/python3*/site-packages"))
    marker = tmp_path / "marker"
    (site / "zz-marker.pth").write_text(SITE_MARKER_PTH.format(marker=str(marker)))
    env = {"PATH": "/usr/bin:/bin"}
    clear = subprocess.run([str(bin_dir / "bindguard"), "check", "--no-systemd", "127.0.0.1:18471"],
                           capture_output=True, text=True, env=env, timeout=60)
    assert clear.returncode == 0 and "clear: 127.0.0.1:18471 can be bound" in clear.stderr, clear.stderr
    assert not marker.exists(), "site ran on the fast path"
    full = subprocess.run([str(bin_dir / "bindguard"), "check", "--json", "--no-systemd", "127.0.0.1:18471"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert full.returncode == 0 and '"clear": true' in full.stdout, full.stderr
    assert not marker.exists(), "site ran for a full command that imports no dependency"
    config = tmp_path / "web.service.yaml"
    config.write_text("listen: [127.0.0.1:18471]\n")
    checked = subprocess.run([str(bin_dir / "bindguard"), "config", "check", str(config)],
                             capture_output=True, text=True, env=env, timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert "site ran" in marker.read_text()
    marker.unlink()
    for writable in (site, site / "bindguard"):  # others may write what runs: nothing is imported from it
        writable.chmod(0o777)
        try:
            again = subprocess.run([str(bin_dir / "bindguard"), "check", "--no-systemd", "127.0.0.1:18471"],
                                   capture_output=True, text=True, env=env, timeout=60)
            closed = subprocess.run([str(bin_dir / "bindguard"), "check", "--fail-closed", "--no-systemd",
                                     "127.0.0.1:18471"], capture_output=True, text=True, env=env, timeout=60)
        finally:
            writable.chmod(0o755)
        assert again.returncode == 0 and not marker.exists(), again.stderr
        assert f"{writable} can be written by others than root" in again.stderr and "failing open" in again.stderr
        assert closed.returncode == 70 and "clear" not in closed.stderr, closed.stderr


@pytest.mark.parametrize("form", FORMS)
def test_site_sees_the_launchers_setuptools_setting_not_the_units(tmp_path, form):
    """setuptools' distutils-precedence.pth shims distutils unless SETUPTOOLS_USE_DISTUTILS=stdlib:
    the launcher sets it for site, whatever the unit's environment says, in both forms."""
    bin_dir = copy_install(tmp_path / "venv", form)
    site = next(bin_dir.parent.glob("lib/python3*/site-packages"))
    marker = tmp_path / "marker"
    (site / "zz-setting.pth").write_text(
        f"import os; open({str(marker)!r}, 'a').write(os.environ.get('SETUPTOOLS_USE_DISTUTILS', '-') + '\\n')\n")
    config = tmp_path / "web.service.yaml"
    config.write_text("listen: [127.0.0.1:18473]\n")
    checked = subprocess.run([str(bin_dir / "bindguard"), "config", "check", str(config)], capture_output=True,
                             text=True, env={"PATH": "/usr/bin:/bin", "SETUPTOOLS_USE_DISTUTILS": "local"})
    assert checked.returncode == 0, checked.stderr
    # (site reads a --system-site-packages venv's .pth files twice: once in its venv step)
    assert set(marker.read_text().splitlines()) == {"stdlib"}, marker.read_text()


def test_an_editable_install_is_found_by_its_path_line_alone(tmp_path):
    """pip's editable install names the source tree in __editable__.bindguard-VERSION.pth: that line
    is read, any other (an `import` line that site would run) is not."""
    root = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(root)], check=True)
    site = next(root.glob("lib/python3*/site-packages"))
    marker = tmp_path / "marker"
    (site / "__editable__.bindguard-0.1.0.pth").write_text(SITE_MARKER_PTH.format(marker=str(marker)) + f"{SRC}\n")
    shutil.copy2(REPO / "bin" / "bindguard", root / "bin" / "bindguard")
    clear = subprocess.run([str(root / "bin" / "bindguard"), "check", "--no-systemd", "127.0.0.1:18472"],
                           capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"},
                            timeout=60)
    assert clear.returncode == 0 and "clear: 127.0.0.1:18472 can be bound" in clear.stderr, clear.stderr
    assert not marker.exists(), "a line of the .pth file other than the path ran"


def test_the_package_launcher_is_written_from_bin_bindguard_alone(tmp_path):
    """tools/launcher.py, which debian/rules runs: the text after its #! line is what bin/bindguard
    passes to python3 -I -S -c; a #! line it cannot write is refused in one line."""
    text = package_launcher(Path("/usr/bin/python3"))
    first, _, rest = text.partition("\n")
    assert first == "#!/usr/bin/python3 -IS"
    assert rest.split("\n", 1)[1] in (REPO / "bin" / "bindguard").read_text()
    out = tmp_path / "bindguard"
    written = subprocess.run([sys.executable, str(REPO / "tools" / "launcher.py"), str(out)], capture_output=True, text=True)
    assert written.returncode == 0 and out.read_text() == text and out.stat().st_mode & 0o777 == 0o755, written.stderr
    for argv in (["--python", "python3", str(out)], ["--python", "/opt/my python/bin/python3", str(out)], ["-x"]):
        refused = subprocess.run([sys.executable, str(REPO / "tools" / "launcher.py"), *argv], capture_output=True, text=True)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    quoted = (REPO / "bin" / "bindguard").read_text().replace("import sys, posix\n", "import sys, posix  # it's\n", 1)
    with pytest.raises(ValueError, match="single quote"):
        launcher_tool().python_text(quoted)
