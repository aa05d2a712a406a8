"""Run bindguard's socket observation inside a network namespace and print the facts as JSON.

    python observe.py '{"proto": "tcp", "port": 8080, "source": "auto", "states": null,
                        "udp_connect": null}'

"states" (a list of state names) asks the kernel for those states only; "udp_connect":
[host, port, peer_port] first binds a UDP socket to host:port and connects it to
host:peer_port, so that a connected UDP socket exists while the query runs.
Prints {"sockets": [...], "notes": [...]}. Tests call query(ns, ...), which runs this script
in the namespace and returns the decoded facts and notes.
"""

from __future__ import annotations

import json
import socket
import sys

from bindguard.evidence import sockets
from bindguard.model.record import Record


def encode(value):
    if isinstance(value, Record):
        return {name: encode(getattr(value, name)) for name in value._fields}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def query(ns, proto: str = "tcp", port: int | None = None, **options) -> tuple[list[dict], list[str]]:
    result = ns.run([sys.executable, __file__, json.dumps({"proto": proto, "port": port, **options})])
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    return answer["sockets"], answer["notes"]


def main():
    query = json.loads(sys.argv[1])
    keep = []
    if query.get("udp_connect"):
        host, port, peer_port = query["udp_connect"]
        udp = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((host, port))
        udp.connect((host, peer_port))
        keep.append(udp)
    notes = []
    source = query.get("source", "auto")
    if query.get("port") is None:
        facts = sockets.listening_sockets(query["proto"], notes, source=source)
    else:
        facts = sockets.sockets_on_port(query["proto"], query["port"], notes, states=query.get("states"), source=source)
    print(json.dumps({"sockets": [encode(f) for f in facts], "notes": notes}))


if __name__ == "__main__":
    main()
