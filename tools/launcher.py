#!/usr/bin/python3
"""The launcher the Debian package installs as /usr/bin/bindguard, written from bin/bindguard.

    python3 tools/launcher.py [--python PYTHON] OUTFILE     (debian/rules: /usr/bin/python3)

bin/bindguard is a /bin/sh script so that a venv whose python3 went away (the python3.11 its link
names removed by an upgrade) still fails open: only a launcher that does not need Python can say
that Python is missing. It costs an exec of /bin/sh before every start, about 0.6 ms (7% of an
empty interpreter's start). The package's python3 cannot go away while the package is installed:
dpkg keeps its dependencies. So the package runs the same Python text, the one bin/bindguard
passes to `python3 -I -S -c`, as a script of its own, `#!/usr/bin/python3 -IS`: isolated and
without site processing, as the /bin/sh form runs it, failing open from its first instruction
when the bindguard package does not load. This file is the one place that text is taken from.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SH_LAUNCHER = ROOT / "bin" / "bindguard"
OPENING = "exec \"$python\" -I -S -c '\n"  # the Python text runs from the next line ...
CLOSING = "\n' \"$0\" \"$@\"\n"  # ... to the quote that ends it


def python_text(sh_launcher: str) -> str:
    """The Python text bin/bindguard runs with `python3 -I -S -c`. ValueError if it holds a single
    quote: the shell's string would end there, and the two forms would run different code."""
    start = sh_launcher.index(OPENING) + len(OPENING)
    text = sh_launcher[start:sh_launcher.index(CLOSING, start)] + "\n"
    if "'" in text:
        raise ValueError("bin/bindguard's Python text holds a single quote, which ends its shell string")
    return text


def script(python: str = "/usr/bin/python3") -> str:
    """The launcher as a script of its own, run by `python` isolated and without site (-IS)."""
    if not python.startswith("/") or any(c.isspace() for c in python):
        raise ValueError(f"{python!r}: a #! line needs an absolute path without spaces")
    return (f"#!{python} -IS\n"
            "# bindguard's launcher, written by tools/launcher.py from bin/bindguard's Python text: see there.\n"
            + python_text(SH_LAUNCHER.read_text()))


def write(out: Path, python: str = "/usr/bin/python3") -> None:
    """The launcher script at `out`, mode 755."""
    out.write_text(script(python))
    os.chmod(out, 0o755)


def main() -> int:
    parser = argparse.ArgumentParser(prog="tools/launcher.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default="/usr/bin/python3", help="the interpreter of the #! line")
    parser.add_argument("outfile", help="where to write the launcher (mode 755)")
    args = parser.parse_args()
    if args.outfile.startswith("-"):
        parser.error(f"{args.outfile!r}: an output path that starts with '-' is taken for an option")
    try:
        write(Path(args.outfile), args.python)
    except ValueError as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
