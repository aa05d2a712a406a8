"""The guard's entries in a real journal: a private systemd-journald in the rig (tests/rig.py,
SystemdRig(journal=True)), a refused start, and the journal read back with journalctl by the
fields README's "Reading the journal" documents."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bindguard.report.journal import MESSAGE_IDS
from conftest import need_root

PORT = 18140
ADDRESS = f"127.0.0.1:{PORT}"
GUARD = f"{sys.executable} -m bindguard check --unit %n"
ROOT = Path(__file__).resolve().parent.parent
CATALOG = ROOT / "systemd" / "bindguard.catalog"


@pytest.fixture
def journal_rig():
    """The systemd rig with a journal of its own (journald is in Debian's systemd package)."""
    need_root("the systemd rig")
    from rig import JOURNALD, SystemdRig

    assert os.access(JOURNALD, os.X_OK), f"{JOURNALD} is missing: install systemd"
    rig = SystemdRig(journal=True)
    try:
        yield rig
    finally:
        rig.close()


@pytest.mark.integration
def test_a_refused_start_is_found_by_message_id_port_and_unit(journal_rig):
    rig = journal_rig
    rig.write_unit("holder.service", "[Service]\nType=notify\n"
                   f"ExecStart={rig.serve({'host': '127.0.0.1', 'port': PORT})}\n")
    assert rig.start("holder.service").ok
    holder = rig.main_pid("holder.service")
    rig.write_unit("web.service", f"[Service]\nExecStartPre=+{GUARD} {ADDRESS}\nExecStart=/bin/sleep infinity\n")
    run = rig.start("web.service")
    assert not run.ok and run.pre_status == [98], run

    (entry,) = rig.journal(f"MESSAGE_ID={MESSAGE_IDS['refused']}")
    assert entry["MESSAGE"].startswith(f"bindguard: refusing to start: {ADDRESS} in use (exit 98)\n"), entry
    assert f"PID {holder} (" in entry["MESSAGE"] and "\n    fix: " in entry["MESSAGE"]
    assert (entry["PRIORITY"], entry["SYSLOG_IDENTIFIER"]) == ("3", "bindguard")
    assert (entry["BINDGUARD_ADDRESS"], entry["BINDGUARD_PORT"], entry["BINDGUARD_KIND"]) == (ADDRESS, str(PORT),
                                                                                              "listener")
    assert (entry["BINDGUARD_HOLDER_PID"], entry["BINDGUARD_HOLDER_UNIT"]) == (str(holder), "holder.service")
    # The refused unit is the sender (the guard runs in its cgroup); journald names the holder from OBJECT_PID.
    assert entry["_SYSTEMD_USER_UNIT"] == "web.service" and entry["_SYSTEMD_UNIT"] == f"user@{os.getuid()}.service"
    assert entry["OBJECT_PID"] == str(holder) and entry["OBJECT_SYSTEMD_USER_UNIT"] == "holder.service"

    assert [e["__CURSOR"] for e in rig.journal(f"BINDGUARD_PORT={PORT}")] == [entry["__CURSOR"]]
    assert [e["__CURSOR"] for e in rig.journal("_SYSTEMD_USER_UNIT=web.service",
                                               f"MESSAGE_ID={MESSAGE_IDS['refused']}")] == [entry["__CURSOR"]]
    # `journalctl --user-unit holder.service` (root's) lists the starts the holder blocked
    assert entry["__CURSOR"] in [e["__CURSOR"] for e in rig.journal("--user-unit=holder.service")]
    assert entry["__CURSOR"] in [e["__CURSOR"] for e in rig.journal(f"OBJECT_PID={holder}")]
    # the unit's stderr is the journal's stream too: nothing more of the guard's went that way
    lines = [e["MESSAGE"] for e in rig.journal("_SYSTEMD_USER_UNIT=web.service", "_TRANSPORT=stdout", timeout=0)]
    assert not [line for line in lines if "refusing" in line], lines

    # `journalctl -x` explains it from the catalog the package installs. journalctl reads
    # /usr/lib/systemd/catalog and writes /var/lib/systemd/catalog/database, whatever --root says:
    # both are replaced in a mount namespace of the test's own, never the host's.
    catalogs = rig.root / "catalog"
    catalogs.mkdir()
    shutil.copy(CATALOG, catalogs)
    explained = rig.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                         f"mount -t tmpfs tmpfs /var/lib/systemd/catalog && mount --bind {catalogs} "
                         "/usr/lib/systemd/catalog && journalctl --update-catalog && journalctl -x --no-pager "
                         f"--directory=/run/log/journal BINDGUARD_PORT={PORT}"])
    assert f"Subject: bindguard refused a start: {ADDRESS} cannot be bound" in explained.stdout, explained
    assert f"journalctl BINDGUARD_PORT={PORT}" in explained.stdout


def test_every_outcome_has_its_catalog_entry():
    ids = [line[3:].strip() for line in CATALOG.read_text().splitlines() if line.startswith("-- ")]
    assert sorted(ids) == sorted(MESSAGE_IDS.values()) and len(set(ids)) == len(ids)
    assert "systemd/bindguard.catalog usr/lib/systemd/catalog/" in (ROOT / "debian" / "bindguard.install").read_text()
