"""Structured journal entries by the journal's native protocol (systemd's "Native Journal Protocol").

One datagram to /run/systemd/journal/socket, the socket systemd-journald listens on for every
manager's services (a user manager's too): FIELD=value lines, and for a value that holds a
newline or is binary, the field's name, a newline, its length as a 64-bit little-endian number,
the bytes and a newline. The socket is a fixed path under /run, which only root can write: no
variable chooses it. Each outcome has its MESSAGE_ID, explained by systemd/bindguard.catalog
(`journalctl -x`); the fields a person filters on are BINDGUARD_ADDRESS, BINDGUARD_PORT,
BINDGUARD_KIND, BINDGUARD_HOLDER_PID, BINDGUARD_HOLDER_UNIT, and OBJECT_PID, with which journald
adds the holder's OBJECT_SYSTEMD_UNIT (so `journalctl -u holder.service` lists the starts it
blocked; journald takes the first OBJECT_PID of an entry only).

Only _socket (which the fast path has loaded already) and bindguard.model.text: the guard's clear
path under systemd sends one entry from here.
"""

import _socket

SOCKET = "/run/systemd/journal/socket"
# An entry is one datagram, far below what the socket takes (no memfd needed): a value is cut at
# MAX_VALUE bytes, the message at MAX_MESSAGE, and an entry carries at most MAX_FIELDS fields.
MAX_VALUE = 1024
MAX_MESSAGE = 32 * 1024
MAX_FIELDS = 64

# `systemd-id128 new`, one per outcome; systemd/bindguard.catalog explains each.
MESSAGE_IDS = {
    "cleared": "a57e632a4fb4422c956d1e99d5835d23",
    "waited": "406cf84aae1749a6bf0f32f6814e0f20",
    "refused": "b9445c3651e747349daf0f41ed9476d4",
    "guard-failed": "6fcbcb63348f45c39c2eb838787e32bf",
}


def _field(name: str, value: str | bytes) -> bytes:
    data = value.encode("utf-8", "backslashreplace") if isinstance(value, str) else value
    if name == "MESSAGE":
        data = data[:MAX_MESSAGE]
    elif len(data) > MAX_VALUE:
        data = data[:MAX_VALUE]
    key = name.encode("ascii")
    if b"\n" in data:
        return key + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
    return key + b"=" + data + b"\n"


def encode(priority: int, lines: list[str], message_id: str, fields: list[tuple[str, str]]) -> bytes:
    """The datagram: MESSAGE (the report's lines, each escaped as on stderr), PRIORITY,
    SYSLOG_IDENTIFIER, MESSAGE_ID and the fields. Field names are the guard's own (upper case,
    digits, underscores: journald drops an entry's other fields); values may hold anything."""
    from bindguard.model.text import escape

    message = "\n".join(escape(line) for line in lines)
    entry = [("MESSAGE", message), ("PRIORITY", str(priority)), ("SYSLOG_IDENTIFIER", "bindguard"),
             ("MESSAGE_ID", MESSAGE_IDS[message_id]), *fields[:MAX_FIELDS]]
    for name, _ in entry:
        if not (name and len(name) <= 64 and name[0].isupper() and all(c.isupper() or c.isdigit() or c == "_"
                                                                        for c in name) and name.isascii()):
            raise ValueError(f"not a journal field name: {name!r}")
    return b"".join(_field(name, value) for name, value in entry)


def send(priority: int, lines: list[str], message_id: str, fields: list[tuple[str, str]],
         path: str | None = None) -> bool:
    """Send one entry; False when the journal's socket is not there or takes nothing (the caller
    then writes the lines to stderr)."""
    data = encode(priority, lines, message_id, fields)
    try:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
    except OSError:
        return False
    try:
        sock.setblocking(False)  # a journald that falls behind must not hold the start: EAGAIN, stderr
        sock.sendto(data, path or SOCKET)
    except OSError:  # no journald (ENOENT, ECONNREFUSED), a full queue, or an entry it would not take
        return False
    finally:
        sock.close()
    return True
