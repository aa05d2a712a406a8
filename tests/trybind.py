"""The test's own bind(): what the kernel answers a daemon with these options, right now.

    python trybind.py '<json spec>'   ->  prints "ok" or the errno name (EADDRINUSE, ...)

Spec keys as in holder.py, plus "uid" to create the socket as that user (via setfsuid,
keeping the privilege to bind low ports, as bindguard's own probe does).
"""

import ctypes
import errno
import json
import socket
import sys


def main() -> None:
    spec = json.loads(sys.argv[1])
    family = socket.AF_INET6 if ":" in spec["host"] else socket.AF_INET
    kind = socket.SOCK_DGRAM if spec.get("proto") == "udp" else socket.SOCK_STREAM
    libc = ctypes.CDLL(None)
    if "uid" in spec:
        libc.setfsuid(spec["uid"])
    s = socket.socket(family, kind)
    if "uid" in spec:
        libc.setfsuid(0)
    if spec.get("reuseaddr", True):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if spec.get("reuseport"):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6 and spec.get("v6only") is not None:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(spec["v6only"]))
    if spec.get("freebind"):
        s.setsockopt(socket.SOL_IP, 15, 1)
    try:
        s.bind((spec["host"], spec["port"]))
        if kind == socket.SOCK_STREAM:
            s.listen(1)
    except OSError as exc:
        print(errno.errorcode[exc.errno])
        return
    print("ok")


if __name__ == "__main__":
    main()
