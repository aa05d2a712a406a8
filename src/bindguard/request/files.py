"""Reading a file as root when others may have put something else at its path: only a regular
file is read, and at most so many bytes of it (bindguard's YAML files, daemons' configurations)."""

from __future__ import annotations

import os
import stat


class Refused(Exception):
    """A path that is not read; str() says why, to follow the path: "a FIFO, not a regular file"."""


def file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def _too_large(max_bytes: int, size: int | None = None) -> Refused:
    limit = f"{max_bytes >> 20} MiB" if max_bytes >= 1 << 20 else f"{max_bytes} bytes"
    return Refused(f"{f'{size} bytes, ' if size is not None else ''}more than the {limit} bindguard reads of one file")


def open_regular(path: str, max_bytes: int, owner: int | None = None) -> int:
    """A read-only descriptor of path (symlinks followed) only if it is a regular file of at most
    max_bytes (and, where `owner` is given, that user's: a user's file read for that user, which a
    link could otherwise point at a file only root may read); Refused otherwise, OSError when it
    cannot be opened.

    The path is opened with O_PATH first, which never runs a device's open() and never blocks on
    a FIFO; once fstat() says it is a regular file, that same inode is opened for reading through
    /proc/self/fd, so nothing swapped in at the path between the two opens is ever read.
    """
    handle = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        info = os.fstat(handle)
        if not stat.S_ISREG(info.st_mode):
            raise Refused(f"{file_kind(info.st_mode)}, not a regular file")
        if info.st_size > max_bytes:
            raise _too_large(max_bytes, info.st_size)
        if owner is not None and info.st_uid != owner:
            raise Refused(f"owned by uid {info.st_uid}, not uid {owner}")
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        try:
            return os.open(f"/proc/self/fd/{handle}", flags)
        except FileNotFoundError:  # no /proc: open the path again and make sure it is the same file
            fd = os.open(path, flags)
            again = os.fstat(fd)
            if (again.st_dev, again.st_ino) != (info.st_dev, info.st_ino):
                os.close(fd)
                raise Refused("replaced while being read") from None
            return fd
    finally:
        os.close(handle)


def read_regular(path: str, max_bytes: int, owner: int | None = None) -> bytes:
    """The bytes of a regular file of at most max_bytes (it may grow after fstat(): never more
    than that is read); Refused or OSError as open_regular()."""
    fd = open_regular(path, max_bytes, owner)
    try:
        chunks, size = [], 0
        while size <= max_bytes:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > max_bytes:
        raise _too_large(max_bytes)
    return b"".join(chunks)
