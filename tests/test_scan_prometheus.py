"""`scan --prometheus DIR/FILE` as root, where DIR (node_exporter's textfile directory) belongs to
another user: that user can swap a directory on the way for a symlink, and root must not write
through it. Symlinks root (or the scanning user) owns, like /var/run -> /run, are followed."""

from __future__ import annotations

import os
import sys

import pytest

from conftest import NOBODY

BINDGUARD = [sys.executable, "-m", "bindguard"]


def _scan(netns, tmp_path, prom) -> object:
    env = dict(os.environ, BINDGUARD_CONFIG_PATH=str(tmp_path / "no-config"))
    env.pop("SYSTEMD_LOG_LEVEL", None)
    return netns.run([*BINDGUARD, "scan", "--no-systemd", "--quiet", "--prometheus", str(prom)], env=env)


@pytest.mark.integration
def test_scan_never_writes_through_a_symlink_another_user_swapped_in(netns, tmp_path):
    owned = tmp_path / "prometheus"  # the other user's directory, as /var/lib/prometheus is
    (owned / "node-exporter").mkdir(parents=True)
    for path in (owned, owned / "node-exporter"):
        os.chown(path, NOBODY, NOBODY)
    victim = tmp_path / "etc"
    victim.mkdir()
    prom = owned / "node-exporter" / "bindguard.prom"
    assert _scan(netns, tmp_path, prom).returncode == 0 and prom.exists()

    # what the directory's owner can do between two scans: swap node-exporter for a link to /etc
    (owned / "node-exporter").rename(owned / "node-exporter.old")
    (owned / "node-exporter").symlink_to(victim)
    os.lchown(owned / "node-exporter", NOBODY, NOBODY)
    refused = _scan(netns, tmp_path, prom)
    assert refused.returncode == 64, refused.stderr
    assert f"{owned}/node-exporter is a symlink owned by uid {NOBODY}" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert list(victim.iterdir()) == []


@pytest.mark.integration
def test_scan_follows_a_symlink_root_owns(netns, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to("real")  # relative, root's: as /var/run -> /run
    (real / "bindguard.prom").symlink_to("/nonexistent/elsewhere")  # the file itself is replaced, not followed
    done = _scan(netns, tmp_path, tmp_path / "link" / "bindguard.prom")
    assert done.returncode == 0, done.stderr
    assert not (real / "bindguard.prom").is_symlink()
    assert (real / "bindguard.prom").read_text().startswith("# HELP ")
    assert sorted(p.name for p in real.iterdir()) == ["bindguard.prom"]
