"""tools/generate.py, which the Debian build runs (debian/rules) with Debian's python3 and its
python3-argparse-manpage and python3-shtab: its command line, and the pages it writes from this
tree, which render without warnings (tests/test_package.py checks the installed ones)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from bindguard.cli.commands import COMMANDS
from conftest import need

ROOT = Path(__file__).resolve().parent.parent
GENERATE = ROOT / "tools" / "generate.py"
SYSTEM = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def generate(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    missing = subprocess.run(["/usr/bin/python3", "-c", "import build_manpages, shtab"], capture_output=True, env=SYSTEM)
    if missing.returncode != 0:
        reason = "Debian's python3-argparse-manpage and python3-shtab are missing: ./setup.sh --test installs them"
        need(reason)
    return subprocess.run(["/usr/bin/python3", str(GENERATE), *args], cwd=cwd, capture_output=True, text=True,
                          env=SYSTEM, timeout=120)


def test_help_prints_a_usage_and_makes_nothing(tmp_path):
    done = generate("--help", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("usage: tools/generate.py [-h] [OUTDIR]"), done
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("args", [["-x"], ["--", "--help"], ["--", "-o"], ["out", "more"]])
def test_an_output_that_is_no_directory_name_is_refused(tmp_path, args):
    done = generate(*args, cwd=tmp_path)
    assert done.returncode == 2 and "usage:" in done.stderr and "Traceback" not in done.stderr, done
    assert not any(tmp_path.iterdir())


def test_every_page_is_written_and_renders_without_warnings(tmp_path):
    done = generate("out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    pages = sorted((tmp_path / "out" / "man").iterdir())
    assert {p.name for p in pages} == {"bindguard.8", "bindguard.yaml.5"} | {f"bindguard-{c}.8" for c in COMMANDS}
    assert {p.name for p in (tmp_path / "out" / "completion").iterdir()} == {"bindguard", "_bindguard"}
    for page in pages:
        rendered = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True, text=True,
                                  env={**SYSTEM, "MANWIDTH": "80"})
        assert rendered.returncode == 0 and rendered.stdout and rendered.stderr == "", (page.name, rendered.stderr)


def test_the_build_takes_only_the_argparse_manpage_series_generate_py_was_written_for():
    """generate.py uses argparse-manpage's private _ManpageFormatter, as 1.2.x has it: debian/control
    bounds the Build-Depends to that series, and this machine's, with which the pages are tested,
    is in it."""
    control = (ROOT / "debian" / "control").read_text()
    build_depends = re.search(r"^Build-Depends:(.*?)^\S", control, re.MULTILINE | re.DOTALL).group(1)
    bounds = re.findall(r"\bpython3-argparse-manpage \(([<>=]+) ([^)]+)\)", build_depends)
    assert sorted(bounds) == [("<<", "1.3~"), (">=", "1.2.2")], bounds
    installed = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "python3-argparse-manpage"],
                               capture_output=True, text=True, env=SYSTEM).stdout
    for relation, version in bounds:
        operator = {"<<": "lt", ">=": "ge"}[relation]
        assert subprocess.run(["dpkg", "--compare-versions", installed, operator, version], env=SYSTEM).returncode \
            == 0, f"python3-argparse-manpage {installed!r} is not {relation} {version}"
