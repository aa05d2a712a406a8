"""`bindguard discover UNIT` with the unit read over D-Bus from a real systemd user manager (the rig)."""

from __future__ import annotations

import json

import pytest

from test_discover import need_package

pytestmark = pytest.mark.integration


def test_discover_unit_over_dbus(systemd_rig):
    need_package("nginx", "/usr/sbin/nginx")
    rig = systemd_rig
    conf = rig.root / "nginx.conf"
    conf.write_text("events {}\nhttp {\n  server { listen 127.0.0.1:8088 reuseport; }\n}\n")
    (rig.root / "web.env").write_text("NGINX_CONF=" + str(conf) + "\n")
    rig.write_unit("web.socket", "[Socket]\nListenStream=127.0.0.1:18090\nListenDatagram=[::1]:18091\n"
                                 "BindIPv6Only=ipv6-only\nReusePort=yes\n", reload=False)
    rig.write_unit("web.service", f"""\
[Service]
EnvironmentFile=-{rig.root}/web.env
Environment=OTHER=1
ExecStart=/usr/sbin/nginx -c $NGINX_CONF -g 'daemon off;'
""")
    assert rig.start("web.socket").ok  # a socket unit triggers its service once loaded (at boot: enabled)
    proc = rig.bindguard("discover", "--user", "--json", "web.service")
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert found["daemons"] == ["nginx"] and found["warnings"] == []
    assert [(f["address"], f["source"], f["confidence"], f["reuseport"], f["v6only"], f["socket_unit"])
            for f in found["findings"]] == [
        ("127.0.0.1:8088", f"{conf}:3 (nginx -T)", "confident", True, False, None),
        ("127.0.0.1:18090", "web.socket", "confident", True, False, "web.socket"),
        ("udp:[::1]:18091", "web.socket", "confident", True, True, "web.socket"),
    ]
    text = rig.bindguard("discover", "--user", "--no-legend", "web")
    assert text.returncode == 0 and text.stdout.splitlines()[0].split()[:3] == [
        "127.0.0.1:8088", "confident", f"{conf}:3"]


def test_discover_unknown_unit(systemd_rig):
    proc = systemd_rig.bindguard("discover", "--user", "nothere.service")
    assert proc.returncode == 64
    assert "nothere.service" in proc.stderr and "Traceback" not in proc.stderr
