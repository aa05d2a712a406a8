"""Messages on stderr, in the form the journal understands.

Not on a terminal (as under systemd), each line starts with a syslog priority prefix such as
`<3>`, which journald turns into the entry's priority. On a terminal the text is plain.
SYSTEMD_LOG_LEVEL (err, warning, notice, info, debug, or 0-7) hides the less important lines.
"""

from __future__ import annotations

import os
import sys

ERR, WARNING, NOTICE, INFO, DEBUG = 3, 4, 5, 6, 7
_LEVEL_NAMES = {"emerg": 0, "alert": 1, "crit": 2, "err": 3, "error": 3, "warning": 4, "warn": 4,
                "notice": 5, "info": 6, "debug": 7}


def _max_level() -> int:
    value = os.environ.get("SYSTEMD_LOG_LEVEL", "").strip().lower()
    if value.isascii() and value.isdigit() and len(value) <= 20:  # int() raises on '²', reads '٧' as 7
        return min(int(value), DEBUG)
    return _LEVEL_NAMES.get(value, INFO)


def emit(priority: int, text: str, stream=None) -> None:
    """Write text (one or more lines) at a priority, unless SYSTEMD_LOG_LEVEL hides it."""
    if priority > _max_level():
        return
    stream = stream or sys.stderr
    if stream.isatty():
        stream.write(text.rstrip("\n") + "\n")
    else:
        stream.write("".join(f"<{priority}>{line}\n" for line in text.rstrip("\n").split("\n")))
    stream.flush()


def error(message: str, hint: str | None = None) -> None:
    emit(ERR, f"bindguard: error: {message}" + (f"\n  hint: {hint}" if hint else ""))


def warning(message: str) -> None:
    emit(WARNING, f"bindguard: warning: {message}")
