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


# Every control character (C0, DEL, C1) as an escape: \n, \r, \t, else \xNN.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))} | {
    0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}


def escape(text: str) -> str:
    """Text the guard does not control (a process's argv or name, a unit name from a cgroup, a
    file's contents or name) made one harmless line: every control character is written as an
    escape (a newline as \\n, ESC as \\x1b), so that it can neither start a journal entry of its
    own (a forged "clear") nor drive a terminal. Every line emit() writes goes through it; text
    written to stdout some other way must be passed through it first."""
    return text.translate(_ESCAPES)


def excerpt(text: str, limit: int = 40) -> str:
    """At most `limit` characters of a file's (or any untrusted) text, escaped and quoted, for an
    error message that must name what it could not use without printing the whole file."""
    cut = text[:limit]
    return "'" + escape(cut) + ("'..." if len(text) > limit else "'")


def emit(priority: int, text: str | list[str] | tuple[str, ...], stream=None) -> None:
    """Write at a priority, unless SYSTEMD_LOG_LEVEL hides it: a str is one line, a list one line
    per item. A newline inside a line is escaped like every control character (see escape()):
    only the structure the guard itself gives its message makes lines."""
    if priority > _max_level():
        return
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
