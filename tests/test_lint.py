"""The linter and the type checker, as tests: CI runs them with everything else (pyproject.toml
configures both: ruff's rules; mypy, strict on bindguard.model and bindguard.verdict)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(tool: str, *args: str) -> subprocess.CompletedProcess:
    if shutil.which(tool, path=str(Path(sys.executable).parent)) is None:
        pytest.fail(f"{tool} is not installed: ./setup.sh --test installs the test extras")
    return subprocess.run([sys.executable, "-m", tool, *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_finds_nothing_in_src():
    done = _run("ruff", "check", "src")
    assert done.returncode == 0, done.stdout + done.stderr



def test_mypy_finds_nothing_in_src():
    done = _run("mypy")
    assert done.returncode == 0, done.stdout + done.stderr
