"""Messages on stderr, in the form the journal understands.

Not on a terminal (as under systemd), each line starts with a syslog priority prefix such as
`<3>`, which journald turns into the entry's priority. On a terminal the text is plain.
SYSTEMD_LOG_LEVEL (err, warning, notice, info, debug, or 0-7) hides the less important lines.
"""

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


def emit(priority: int, text: str | list[str] | tuple[str, ...], stream=None) -> None:
    """Write at a priority, unless SYSTEMD_LOG_LEVEL hides it: a str is one line, a list one line
    per item. A newline inside a line is escaped like every control character (see escape()):
    only the structure the guard itself gives its message makes lines."""
    if priority > _max_level():
        return
    from bindguard.model.text import escape  # not before a line is written: the every-service path writes none

    lines = [escape(line) for line in ([text] if isinstance(text, str) else text)]
    stream = stream or sys.stderr
    if stream.isatty():
        stream.write("".join(f"{line}\n" for line in lines))
    else:
        stream.write("".join(f"<{priority}>{line}\n" for line in lines))
    stream.flush()


def error(message: str, hint: str | None = None, problems: list[str] | tuple[str, ...] = ()) -> None:
    """A BindguardError on one line (a path or name in it with a newline stays on it, escaped);
    a configuration error with several problems: its first line, then one line per problem."""
    lines = [message] if len(problems) < 2 else [message.split("\n", 1)[0], *problems]
    emit(ERR, [f"bindguard: error: {lines[0]}", *lines[1:], *([f"  hint: {hint}"] if hint else [])])


def warning(message: str) -> None:
    emit(WARNING, f"bindguard: warning: {message}")
