"""A daemon for test units: binds sockets like tests/holder.py, tells systemd it is ready, sleeps.

    ExecStart=python serve.py '{"sockets": [{"host": "127.0.0.1", "port": 8080}], "fork": false}'

With "fork": true it forks a child that keeps the sockets too, so that `KillMode=process`
leaves the child behind holding them (a stale instance in the unit's cgroup). Use it with
Type=notify: `systemctl start` returns once the sockets are bound (or the bind failed).
"""

import json
import os
import signal
import socket
import sys

from holder import make


def notify(message: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(address)
        s.sendall(message.encode())


def main() -> None:
    config = json.loads(sys.argv[1])
    keep = []
    for spec in config["sockets"]:
        s = make(spec)
        if spec.get("proto", "tcp") == "tcp" and spec.get("listen", True):
            s.listen(16)
        keep.append(s)
    if config.get("fork") and os.fork() == 0:
        while True:
            signal.pause()
    notify("READY=1")
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
