"""What check --unit probes: the YAML listen list, else confident discovery; socket units apart."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bindguard import config
from bindguard.discover import UnitFacts
from bindguard.errors import ConfigError
from bindguard.unit_binds import unit_binds


@pytest.fixture
def etc(tmp_path, monkeypatch):
    monkeypatch.setenv(config.SEARCH_PATH_ENV, str(tmp_path))
    return tmp_path


def facts_of(**by_unit: UnitFacts):
    asked = []

    def read(unit: str) -> UnitFacts:
        asked.append(unit)
        return by_unit[unit]

    read.asked = asked
    return read


def redis_facts(tmp_path) -> UnitFacts:
    conf = tmp_path / "redis.conf"
    conf.write_text("bind 127.0.0.1 -::1\nport 6380\n")
    return UnitFacts(exec_start=[["/usr/bin/redis-server", str(conf)]], environment=["PORT=9999"],
                     socket_listens=[("Stream", "127.0.0.1:7000", "cache.socket")])


def test_yaml_listen_list_wins_and_discovery_is_not_asked(etc, tmp_path):
    (etc / "cache.service.yaml").write_text("listen: ['127.0.0.1:8080']\noptions: {reuseport: true}\n")
    facts = facts_of(**{"cache.service": redis_facts(tmp_path)})
    result = unit_binds("cache", unit_facts=facts)
    assert [str(b) for b in result.binds] == ["127.0.0.1:8080"] and result.binds[0].options.reuseport
    assert result.origin == f"{etc}/cache.service.yaml:1:9"
    assert facts.asked == []


def test_confident_discovery_without_yaml(etc, tmp_path):
    facts = facts_of(**{"cache.service": redis_facts(tmp_path)})
    result = unit_binds("cache.service", unit_facts=facts)
    assert [str(b) for b in result.binds] == ["127.0.0.1:6380", "[::1]:6380"]
    assert result.origin == "discovery" and result.config is None
    assert [str(b) for b in result.socket_unit_binds] == ["127.0.0.1:7000"]
    assert result.unused_guesses == []  # a known daemon: no guesses from PORT=


def test_yaml_options_override_discovered_ones_and_sources(etc, tmp_path):
    (etc / "cache.service.yaml").write_text("options: {reuseport: true}\ndiscovery: [socket-units]\n")
    facts = facts_of(**{"cache.service": redis_facts(tmp_path)})
    result = unit_binds("cache.service", unit_facts=facts)
    assert result.binds == [] and [str(b) for b in result.socket_unit_binds] == ["127.0.0.1:7000"]
    (etc / "cache.service.yaml").write_text("options: {reuseport: true}\n")
    result = unit_binds("cache.service", unit_facts=facts)
    assert all(b.options.reuseport for b in result.binds) and len(result.binds) == 2


def test_guesses_are_probed_only_when_trusted(etc):
    facts = facts_of(**{"app.service": UnitFacts(exec_start=[["/opt/app", "--port", "8081"]])})
    result = unit_binds("app.service", unit_facts=facts)
    assert result.binds == [] and result.origin == ""
    assert [str(f.bind.endpoint.port) for f in result.unused_guesses] == ["8081"]
    (etc / "app.service.yaml").write_text("trust_guesses: true\n")
    assert [b.endpoint.port for b in unit_binds("app.service", unit_facts=facts).binds] == [8081]


def test_discovery_off_asks_nothing(etc, tmp_path):
    (etc / "cache.service.yaml").write_text("discovery: false\n")
    facts = facts_of(**{"cache.service": redis_facts(tmp_path)})
    assert unit_binds("cache.service", unit_facts=facts).binds == [] and facts.asked == []


def test_broken_yaml_raises(etc):
    (etc / "x.service.yaml").write_text("listen: [\n")
    with pytest.raises(ConfigError):
        unit_binds("x.service")


def test_nothing_to_guard_imports_no_yaml(etc):
    code = ("import sys; from bindguard.unit_binds import unit_binds; "
            "r = unit_binds('quiet.service'); assert r.binds == [] and r.origin == ''; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('yaml', 'psutil', 'pystemd')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
