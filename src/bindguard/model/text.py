"""Untrusted text made safe to show: one line, every character that is not printable escaped. Pure, no imports.

The request stage quotes a file's text in its errors and the report stage writes every line
through escape(): both use this one rule.
"""

# What escape() writes for the few with a short form; every other one as \xNN, \uNNNN or \UNNNNNNNN.
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape(text: str) -> str:
    """Text the guard does not control (a process's argv or name, a unit name from a cgroup, a
    file's contents or name) made one harmless line: every character str.isprintable() rejects is
    written as an escape (a newline as \\n, ESC as \\x1b, RIGHT-TO-LEFT OVERRIDE as \\u202e), so
    that it can neither start a journal entry of its own (a forged "clear"), nor drive a terminal,
    nor reorder or hide what is shown (bidi controls, zero-width and other format characters, line
    and paragraph separators), nor fail to be written (a byte that was not UTF-8, kept as a lone
    surrogate). Those are the control, format, separator (but the space), surrogate, private-use
    and unassigned characters. Every line emit() writes goes through it; text written to stdout
    some other way must be passed through it first."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escaped(char) for char in text)


def _escaped(char: str) -> str:
    code = ord(char)
    if char in _SHORT:
        return _SHORT[char]
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


EXCERPT = 40  # characters of a file's text an error message quotes


def excerpt(text: str, limit: int = EXCERPT, quote: str = "'") -> str:
    """At most `limit` characters of a file's (or any untrusted) text, escaped and quoted, for an
    error message that must name what it could not use without printing the whole file."""
    cut = text[:limit]
    return quote + escape(cut) + quote + ("..." if len(text) > limit else "")


def shortened(text: str, limit: int) -> str:
    """Text of at most `limit` characters kept as it is, longer text cut there and marked with '…':
    a character no name has, so that what was cut is never taken for a whole name (shell_word)."""
    return text if len(text) <= limit else text[:limit] + "…"


# What a name may hold to be written into a shell command as it is: letters, digits, _ . - (what
# container engines, Kubernetes and useradd allow in names; no quoting, expansion or separator).
_SHELL_WORD = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


def shell_word(name: str) -> bool:
    """Whether an observed name (a container's, a pod's, a user's, a chain's) can stand in a command
    the guard advises, as it is: only then does a remedy write it into one; else it says in words
    what to do. Anything else a process, a user or the holder of CAP_NET_ADMIN chose (a chain may be
    named `x;reboot`) would run as root when the advice is pasted. Not beginning with '-', which
    the command would take for an option."""
    return bool(name) and name[0] != "-" and all(c in _SHELL_WORD for c in name)


_COMMAND_PLAIN = _SHELL_WORD | frozenset(":@")  # a unit name a shell reads as it is


def unit_word(unit: str) -> str:
    """A unit name as one shell word: as it is, or in single quotes where it holds systemd's escapes
    (`foo\\x2dbar.service`: a shell reads \\x as x) or anything else a shell would act on (each '
    then written '\\'')."""
    if unit and all(c in _COMMAND_PLAIN for c in unit):
        return unit
    return "'" + unit.replace("'", "'\\''") + "'"


def command_unit(unit: str) -> str:
    """A unit name as the commands the guard advises write it as an argument (`systemctl stop UNIT`,
    `bindguard config check UNIT`): unit_word(), after `--` where it begins with '-', which the
    command would read as options: `-.mount` is the root file system's, and a user may name a
    cgroup `-Hroot@host:x.service`, which systemctl reads as -H, a host to run it on over ssh. An
    option's value is written `--unit=WORD` (journalctl) instead, read as a value whatever it begins with."""
    word = unit_word(unit)
    return "-- " + word if unit.startswith("-") else word
