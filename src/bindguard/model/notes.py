"""What a report says beside its verdict, each line with its priority decided where it is made.

A note (NOTICE) says what could not be observed or asked, and on what the verdict rests instead;
a warning (WARNING) is advice about the guarded unit's own settings. The priorities are syslog's
numbers, the ones journald reads from a line's `<N>` prefix (bindguard.report.output writes them).
"""

from __future__ import annotations

from bindguard.model.record import Record

WARNING, NOTICE = 4, 5


class Note(Record, frozen=True):
    priority: int  # WARNING or NOTICE
    text: str


def notices(texts: list[str] | tuple[str, ...]) -> tuple[Note, ...]:
    """Lines of what could not be observed, as notes."""
    return tuple(Note(NOTICE, text) for text in texts)
