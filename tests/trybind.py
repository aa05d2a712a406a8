"""The test's own bind(): what the kernel answers a daemon with these options, right now.

    python trybind.py '<json spec>'   ->  prints "ok" or the errno name (EADDRINUSE, ...)

Spec keys as in holder.py (SO_REUSEADDR on unless "reuseaddr": false, as in the daemon
bindguard assumes), plus "uid" to create the socket as that user via setfsuid, keeping the
privilege to bind low ports, as bindguard's own probe does.
"""

import ctypes
import errno
import json
import sys

import holder


def main() -> None:
    spec = json.loads(sys.argv[1])
    spec.setdefault("reuseaddr", True)
    libc = ctypes.CDLL(None)
    if "uid" in spec:
        libc.setfsuid(spec["uid"])
    try:
        sock = holder.make(spec)
        if spec.get("proto", "tcp") == "tcp":
            sock.listen(1)
    except OSError as exc:
        print(errno.errorcode[exc.errno])
        return
    finally:
        libc.setfsuid(0)
    print("ok")


if __name__ == "__main__":
    main()
