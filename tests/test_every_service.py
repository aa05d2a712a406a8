"""The top-level drop-in (service.d/bindguard.conf) under a real systemd user manager: a service
whose daemon's configuration names a held address is refused; one with nothing to guard starts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from test_discover import need_package

pytestmark = pytest.mark.integration

SHIPPED = Path(__file__).resolve().parent.parent / "systemd" / "service.d" / "bindguard.conf"


def test_one_dropin_for_every_service(systemd_rig):
    need_package("nginx", "/usr/sbin/nginx")
    rig = systemd_rig
    shipped = SHIPPED.read_text()
    assert "ExecStartPre=+/usr/bin/bindguard check --unit %n\n" in shipped
    src = Path(__file__).resolve().parent.parent / "src"
    dropin = shipped.replace("/usr/bin/bindguard", f"/usr/bin/env PYTHONPATH={src} {sys.executable} -m bindguard")
    conf = rig.root / "nginx.conf"
    conf.write_text(f"pid {rig.root}/nginx.pid;\nerror_log stderr;\nevents {{}}\n"
                    "http {\n  access_log off;\n  server { listen 127.0.0.1:18088; }\n}\n")
    rig.write_unit("web.service", f"[Service]\nExecStart=/usr/sbin/nginx -c {conf} -g 'daemon off;'\n"
                                  f"StandardError=append:{rig.log('web.log')}\n", reload=False)
    rig.write_unit("quiet.service", "[Service]\nExecStart=/bin/sleep infinity\n", reload=False)
    rig.write_dropin("service", "bindguard.conf", dropin)

    holder = rig.hold({"proto": "tcp", "host": "127.0.0.1", "port": 18088, "reuseaddr": True})
    refused = rig.start("web.service")
    assert not refused.ok and refused.pre_status == [98], refused
    report = rig.log("web.log").read_text()
    assert "127.0.0.1:18088" in report and "bindguard" in report, report
    assert rig.start("quiet.service").ok

    rig.release(holder)
    assert rig.start("web.service").ok
