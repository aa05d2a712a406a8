"""What a careful administrator does about what bindguard found: the fix texts, with the concrete
names. Pure."""

from __future__ import annotations


def inspect_process(pid: int) -> str:
    """The command that shows what a process is (its parent, when it started, its command line):
    what to look at before stopping a holder that no unit accounts for."""
    return f"`ps -o pid,ppid,lstart,cmd -p {pid}`"


def find_holder(port: int, *, listening: bool) -> str:
    """The command that finds, as root, what holds a port when no process was named: the listeners
    only, or every socket on it (a connection or TIME_WAIT can hold it too)."""
    return f"`ss -lntup 'sport = :{port}'`" if listening else f"`ss -tanup 'sport = :{port}'`"
