"""The console: where messages go, and in what form. The CLI makes one Console and hands it to
every renderer; nothing below the report stage writes to a stream.

Whether stderr is the journal is decided as systemd.exec(5) says: $JOURNAL_STREAM holds the
device and inode of the stream systemd connected to the journal, and stderr is the journal only
when fstat() of it shows that same pair (a child whose stderr was redirected to a file or a pipe
inherits the variable, not the stream). On the journal's stream each line starts with a syslog
priority prefix such as `<3>`, which journald turns into the entry's priority; anywhere else (a
terminal, a log file, CI, Ansible) the text is plain. A report with fields (report.journal) goes
to the journal's native socket instead, when stderr is the journal and that socket is there.
SYSTEMD_LOG_LEVEL (err, warning, notice, info, debug, or 0-7) hides the less important lines.
Colour only on a terminal, and never when NO_COLOR is set (https://no-color.org).
"""

import posix  # not os: see bindguard.environment
import sys

import bindguard

ERR, WARNING, NOTICE, INFO, DEBUG = 3, 4, 5, 6, 7
_LEVEL_NAMES = {"emerg": 0, "alert": 1, "crit": 2, "err": 3, "error": 3, "warning": 4, "warn": 4,
                "notice": 5, "info": 6, "debug": 7}
# As systemd's own tools colour a terminal's lines: errors bright red, warnings yellow.
_COLOURS = {0: "\x1b[1;31m", 1: "\x1b[1;31m", 2: "\x1b[1;31m", ERR: "\x1b[1;31m", WARNING: "\x1b[33m"}
_RESET = "\x1b[0m"


def max_level(environ) -> int:
    value = environ.get("SYSTEMD_LOG_LEVEL", "").strip().lower()
    if value.isascii() and value.isdigit() and len(value) <= 20:  # int() raises on '²', reads '٧' as 7
        return min(int(value), DEBUG)
    return _LEVEL_NAMES.get(value, INFO)


def is_journal_stream(stream, environ) -> bool:
    """Whether `stream` is the one systemd connected to the journal ($JOURNAL_STREAM=DEVICE:INODE)."""
    device, colon, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    if not (colon and device.isascii() and device.isdigit() and inode.isascii() and inode.isdigit()) \
            or len(device) > 20 or len(inode) > 20:
        return False
    try:
        st = posix.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):  # a StringIO, a closed stream
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Console:
    """A stream with what the renderers must know of it: whether it is the journal's stream
    (priority prefixes, and the native socket for reports with fields), the most verbose
    priority to show, and whether to colour lines."""

    def __init__(self, stream=None, environ=None, journal: bool | None = None, level: int | None = None,
                 color: bool | None = None, journal_socket: str | None = None) -> None:
        environ = bindguard.environment() if environ is None else environ
        self.stream = sys.stderr if stream is None else stream
        self.journal = is_journal_stream(self.stream, environ) if journal is None else journal
        self.max_level = max_level(environ) if level is None else level
        self.color = (not self.journal and _is_tty(self.stream) and "NO_COLOR" not in environ
                      and environ.get("TERM") != "dumb") if color is None else color
        # The native protocol's socket (report.journal): a test may name its own.
        self.journal_socket = journal_socket

    def shows(self, priority: int) -> bool:
        return priority <= self.max_level

    def emit(self, priority: int, text: str | list[str] | tuple[str, ...]) -> None:
        """Write at a priority, unless SYSTEMD_LOG_LEVEL hides it: a str is one line, a list one line
        per item. A newline inside a line is escaped like every character that is not printable
        (model.text.escape): only the structure the guard itself gives its message makes lines."""
        if not self.shows(priority):
            return
        lines = [text] if isinstance(text, str) else list(text)
        if not all(line.isprintable() for line in lines):  # escape() changes exactly the characters that are not
            from bindguard.model.text import escape  # only then: the clear path's line needs none

            lines = [escape(line) for line in lines]
        if self.journal:
            self.stream.write("".join(f"<{priority}>{line}\n" for line in lines))
        elif self.color and priority in _COLOURS:
            self.stream.write("".join(f"{_COLOURS[priority]}{line}{_RESET}\n" for line in lines))
        else:
            self.stream.write("".join(f"{line}\n" for line in lines))
        self.stream.flush()

    def report(self, entries: list[tuple[int, list[str]]], message_id: str, fields: list[tuple[str, str]]) -> None:
        """An outcome's report: (priority, lines) pairs. On the journal it is one structured entry
        (report.journal: its MESSAGE_ID, fields, the lines SYSTEMD_LOG_LEVEL shows as one message,
        at the most severe of their priorities); elsewhere, or when the journal's socket is not
        there, the lines as emit() writes them."""
        shown = [(priority, lines) for priority, lines in entries if self.shows(priority)]
        if self.journal and shown:
            from bindguard.report import journal

            lines = [line for _, group in shown for line in group]
            if journal.send(min(p for p, _ in shown), lines, message_id, fields, self.journal_socket):
                return
        for priority, lines in shown:
            self.emit(priority, lines)

    def error(self, message: str, hint: str | None = None, problems: list[str] | tuple[str, ...] = ()) -> None:
        """A BindguardError on one line (a path or name in it with a newline stays on it, escaped);
        a configuration error with several problems: its first line, then one line per problem."""
        lines = [message] if len(problems) < 2 else [message.split("\n", 1)[0], *problems]
        self.emit(ERR, [f"bindguard: error: {lines[0]}", *lines[1:], *([f"  hint: {hint}"] if hint else [])])

    def traceback(self) -> None:
        """The traceback of the exception being handled (--debug): its frames, then the exception on
        one line, escaped as every line is (its message may quote what a service's user wrote, and
        a newline in it must not make a line of its own)."""
        import traceback

        exc = sys.exc_info()[1]
        if exc is None:
            return
        frames = [line for frame in traceback.format_tb(exc.__traceback__) for line in frame.rstrip("\n").split("\n")]
        self.emit(ERR, ["Traceback (most recent call last):", *frames, f"{type(exc).__name__}: {exc}"])

    def warning(self, message: str) -> None:
        self.emit(WARNING, f"bindguard: warning: {message}")
