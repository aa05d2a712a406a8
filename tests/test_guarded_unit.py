"""`check --unit NAME` under a real systemd user manager: the name as systemctl takes it, and
what the manager does not know, never turning the kernel's refusal into a pass (issue 10.4)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration

ADDRESS = "127.0.0.1:18080"
SPEC = {"host": "127.0.0.1", "port": 18080}


def serving_unit(rig, name: str) -> int:
    """A Type=notify service holding ADDRESS; returns its main PID."""
    rig.write_unit(name, f"[Service]\nType=notify\nExecStart={rig.serve(SPEC)}\n")
    run = rig.start(name)
    assert run.ok, run.output
    return rig.main_pid(name)


def test_a_name_without_its_type_is_the_service(systemd_rig):
    pid = serving_unit(systemd_rig, "web.service")
    done = systemd_rig.bindguard("check", "--user", "--unit", "web", ADDRESS)
    assert done.returncode == 98, done.stderr
    assert f"PID {pid}" in done.stderr and "web.service" in done.stderr
    assert "internal error" not in done.stderr


def test_a_unit_the_manager_does_not_know_keeps_the_kernels_refusal(systemd_rig):
    pid = serving_unit(systemd_rig, "other.service")
    for name in ("nosuch.service", "nosuch"):
        done = systemd_rig.bindguard("check", "--user", "--unit", name, ADDRESS)
        assert done.returncode == 98, done.stderr
        assert f"PID {pid}" in done.stderr and "unit other.service" in done.stderr
        assert "'nosuch.service' not found on the user manager" in done.stderr  # a note says what is unknown
        assert "internal error" not in done.stderr


def test_a_unit_the_manager_does_not_know_on_a_free_address_passes(systemd_rig):
    done = systemd_rig.bindguard("check", "--user", "--unit", "nosuch.service", ADDRESS)
    assert done.returncode == 0, done.stderr
    assert "internal error" not in done.stderr


def test_a_bad_unit_name_is_a_usage_error_in_check_and_install(systemd_rig):
    for args in (("check", "--user", "--unit", "a/b", ADDRESS), ("install", "--user", "a/b", ADDRESS)):
        done = systemd_rig.bindguard(*args)
        assert done.returncode == 64, done.stderr
        assert "'a/b' is not a unit name" in done.stderr
