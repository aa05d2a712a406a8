"""A process that holds sockets for a test, then waits to be ended.

    python holder.py '<json list of socket specs>'

Each spec: {"proto": "tcp"|"udp", "host": "::", "port": 8080, "reuseaddr": false,
"reuseport": false, "v6only": null, "listen": true, "freebind": false, "device": "eth0"}. With "uid" at the top
level ({"uid": 65534, "sockets": [...]}) the holder drops to that uid first. Special "mode"s:
  "timewait-server": listen with the spec's flags, accept a connection, close the accepted side
      first (so the server's local port is in TIME_WAIT), close the listener.
  "timewait-client": bind to the spec's port, connect to a listener on another port, close first.
  "outgoing": bind to the spec's port and keep an established connection to another port.
Prints one line "ready" when every socket is in place, then sleeps until stdin closes.
"""

import json
import os
import socket
import subprocess
import sys


def make(spec, kind=socket.SOCK_STREAM):
    family = socket.AF_INET6 if ":" in spec["host"] else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM if spec.get("proto") == "udp" else kind)
    if spec.get("reuseaddr"):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if spec.get("reuseport"):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6 and spec.get("v6only") is not None:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(spec["v6only"]))
    if spec.get("freebind"):
        s.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND
    if spec.get("device"):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, spec["device"].encode())
    s.bind((spec["host"], spec["port"]))
    return s


def peer_for(spec):
    """An address to connect to that reaches the spec's own address."""
    if spec["host"] == "::":
        return "::1"
    if spec["host"] == "0.0.0.0":
        return "127.0.0.1"
    return spec["host"]


def hold(spec, keep):
    mode = spec.get("mode")
    if mode is None:
        s = make(spec)
        if spec.get("listen", spec.get("proto", "tcp") == "tcp"):
            if spec.get("proto", "tcp") == "tcp":
                s.listen(16)
        keep.append(s)
    elif mode == "timewait-server":
        server = make(spec)
        server.listen(1)
        client = socket.create_connection((peer_for(spec), spec["port"]))
        conn, _ = server.accept()
        conn.close()  # the server side closes first: its local port goes to TIME_WAIT
        client.recv(1)
        client.close()
        server.close()
    elif mode in ("timewait-client", "outgoing"):
        peer_host = peer_for(spec)
        family = socket.AF_INET6 if ":" in peer_host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.bind((peer_host, 0))
        listener.listen(1)
        client = make(spec)
        client.connect(listener.getsockname()[:2])
        conn, _ = listener.accept()
        if mode == "outgoing":
            keep.extend([listener, client, conn])
        else:
            client.close()  # the client closes first: its local port goes to TIME_WAIT
            conn.recv(1)
            conn.close()
            listener.close()
    else:
        raise SystemExit(f"unknown mode {mode!r}")


def start(wrap, specs, uid=None, extra_argv=()) -> subprocess.Popen:
    """Run this script (through `wrap`, which enters a namespace) holding specs; wait for "ready".
    extra_argv: more arguments, ignored, that show in its command line (hostile text, say)."""
    config = {"sockets": list(specs)}
    if uid is not None:
        config["uid"] = uid
    proc = subprocess.Popen(wrap([sys.executable, os.path.abspath(__file__), json.dumps(config), *extra_argv]),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError(f"holder for {specs} did not start (exit {proc.wait()})")
    return proc


def main():
    config = json.loads(sys.argv[1])
    if isinstance(config, list):
        config = {"sockets": config}
    if "uid" in config:
        os.setgroups([])
        os.setresgid(config["uid"], config["uid"], config["uid"])
        os.setresuid(config["uid"], config["uid"], config["uid"])
    keep = []
    for spec in config["sockets"]:
        hold(spec, keep)
    print("ready", flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
