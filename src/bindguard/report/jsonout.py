"""--json's output, the same for every command: one JSON object on stdout, a newline, flushed (a
reader that waits for the object gets it before the command goes on to its report on stderr).

Every object begins with "schema_version": SCHEMA_VERSION, one number for all of bindguard's JSON
documents (check and explain, scan, discover, verify, config show, install). It goes up when a field
is removed, renamed or changes meaning; new fields are added without a new version.

The layout is chosen as systemd's tools choose it (--json=MODE): "pretty" indents by two spaces,
"short" is the object on one line. Plain --json means pretty."""

from __future__ import annotations

import sys
from collections.abc import Mapping  # not typing: the parser imports this module on every run

SCHEMA_VERSION = 1
MODES = ("short", "pretty")
DEFAULT_MODE = "pretty"


def write_json(document: Mapping[str, object], mode: str | None = DEFAULT_MODE) -> None:
    """mode: short, else pretty."""
    import json  # only when asked for JSON: the parser imports MODES on every run

    versioned = {"schema_version": SCHEMA_VERSION, **document}
    if mode == "short":
        json.dump(versioned, sys.stdout, separators=(",", ":"))
    else:
        json.dump(versioned, sys.stdout, indent=2)
    sys.stdout.write("\n")
    sys.stdout.flush()
