"""Only ASCII digits make a port in a daemon's configuration too: str.isdigit() is true of '²'
(int() raises), '٨٠' and '８０' (int() reads 80), and int() refuses more than 4,300 digits. Each
parser warns about such a port and carries on; none takes it for port 80, none fails."""

from __future__ import annotations

import pytest

from bindguard.request.discover import discover

LONG = "9" * 4301
CONFIGS = {  # daemon -> (configuration file name, its text, the command line reading it)
    "nginx": ("nginx.conf", f"events {{}}\nhttp {{\n server {{ listen ٨٠; }}\n server {{ listen 127.0.0.1:８１; }}\n"
                            f" server {{ listen ²; }}\n server {{ listen 127.0.0.1:{LONG}; }}\n}}\n",
              ["/nonexistent/nginx", "-c", "{conf}"]),
    "apache": ("apache2.conf", f"Listen ٨٠\nListen 127.0.0.1:８１\nListen {LONG}\n",
               ["/nonexistent/apache2", "-f", "{conf}"]),
    "haproxy": ("haproxy.cfg", f"frontend a\n  bind :٨٠\n  bind 127.0.0.1:٨١-٨٢\n  bind :{LONG}\n",
                ["/nonexistent/haproxy", "-f", "{conf}"]),
    "sshd": ("sshd_config", "Port ٢٢\n", ["/nonexistent/sshd", "-D", "-f", "{conf}"]),
    "sshd -p": ("sshd_config", "Port 2222\n", ["/nonexistent/sshd", "-D", "-f", "{conf}", "-p", "٢٢", "-p", LONG]),
    "redis": ("redis.conf", "port ٨٠\nbind 127.0.0.1\n", ["/nonexistent/redis-server", "{conf}"]),
    "redis, long": ("redis.conf", f"port {LONG}\n", ["/nonexistent/redis-server", "{conf}"]),
    "command line": (None, "", ["/usr/bin/webd", "--port", "٨٠", "--listen", "127.0.0.1:８１", "--bind", f":{LONG}"]),
}


@pytest.mark.parametrize("daemon", CONFIGS)
def test_no_port_from_unicode_digits_or_4301_digits(daemon, tmp_path):
    name, text, argv = CONFIGS[daemon]
    conf = tmp_path / (name or "unused")
    conf.write_text(text)
    result = discover([[arg.format(conf=conf) for arg in argv]], [], [], [], "web.service")
    assert [str(f.bind) for f in result.findings if f.bind.endpoint.port in (22, 80, 81, 82)] == []
    assert not any("discovery failed" in w for w in result.warnings), result.warnings
