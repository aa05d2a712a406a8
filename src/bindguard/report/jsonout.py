"""--json's output, the same for every command: one JSON object on stdout, indented, a newline, flushed
(a reader that waits for the object gets it before the command goes on to its report on stderr)."""

from __future__ import annotations

import json
import sys
from typing import Any


def write_json(document: dict[str, Any]) -> None:
    json.dump(document, sys.stdout, indent=2)
    sys.stdout.write("\n")
    sys.stdout.flush()
