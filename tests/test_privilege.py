"""What proves a daemon is denied a privileged port (bindguard.evidence.privilege), piece by piece: the
capability sets as systemd merges their lines, and what may give a program the capability when
it runs (real files with a setuid bit and with file capabilities). The whole, under a real
systemd manager, is in test_permission_denied.py."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess

import pytest

from bindguard.evidence import privilege
from bindguard.model.endpoints import Bind, SocketOptions, parse_listen
from bindguard.model.facts import BindPrivilege, Evidence
from bindguard.model.kinds import ConflictKind
from bindguard.verdict.conflicts import permission_denied


@pytest.mark.parametrize("values, unset, expected", [
    ([], True, True),  # no CapabilityBoundingSet=: the bounding set is not limited
    ([], False, False),  # no AmbientCapabilities=: none
    (["CAP_NET_BIND_SERVICE"], False, True),
    (["cap_net_bind_service CAP_CHOWN"], False, True),
    (["~CAP_NET_BIND_SERVICE"], True, False),
    (["~CAP_SYS_ADMIN"], True, True),
    (["CAP_CHOWN"], True, False),  # a list without it leaves it out
    (["CAP_NET_BIND_SERVICE", "~CAP_NET_BIND_SERVICE"], True, False),  # "~" lines AND
    (["CAP_CHOWN", "CAP_NET_BIND_SERVICE"], True, True),  # plain lines OR
    (["CAP_CHOWN", "~"], True, True),  # "~" alone: the full set again
    (["%i"], True, None),
])
def test_capability_sets_merge_as_systemd_merges_them(values, unset, expected):
    assert privilege._includes_cap(values, unset) is expected


def settings(**values) -> dict[str, list[str]]:
    return {key: values.get(key, []) for key in privilege.SETTINGS}


def test_a_plain_program_cannot_gain_the_capability(tmp_path):
    program = tmp_path / "daemon"
    shutil.copy("/bin/true", program)
    assert privilege._may_gain([str(program)], settings()) is None
    assert privilege._may_gain([f"-{program} --flag"], settings()) is None


def test_what_may_give_a_program_the_capability(tmp_path):
    program = tmp_path / "daemon"
    shutil.copy("/bin/true", program)
    os.chmod(program, 0o4755)
    assert "setuid" in privilege._may_gain([str(program)], settings())
    assert privilege._may_gain([str(program)], settings(NoNewPrivileges=["yes"])) is None
    assert privilege._may_gain([str(program)], settings(NoNewPrivileges=["y"])) is None  # systemd's boolean
    assert "setuid" in privilege._may_gain([str(program)], settings(NoNewPrivileges=["yes", "off"]))
    assert "setuid" in privilege._may_gain([f"@{program} daemon"], settings())  # @: the path is still the program
    os.chmod(program, 0o755)
    subprocess.run(["setcap", "cap_net_bind_service+ep", str(program)], check=True)
    assert "file capabilities" in privilege._may_gain([str(program)], settings())
    assert "runs sh" in privilege._may_gain(["/bin/sh -c 'exec daemon'"], settings())
    assert "authbind" in privilege._may_gain(["/usr/bin/authbind --deep /usr/sbin/daemon"], settings())
    assert "not an absolute path" in privilege._may_gain(["daemon"], settings())
    script = tmp_path / "start-daemon"
    script.write_text("#!/bin/sh\nexec authbind --deep /usr/sbin/daemon\n")
    script.chmod(0o755)
    assert "is a script" in privilege._may_gain([str(script)], settings())
    assert "LD_PRELOAD" in privilege._may_gain(["/bin/true"], settings(Environment=["LD_PRELOAD=/x.so"]))
    env_file = tmp_path / "env"
    env_file.write_text("LD_PRELOAD=/usr/lib/authbind/libauthbind.so.1\n")
    assert "LD_PRELOAD" in privilege._may_gain(["/bin/true"], settings(EnvironmentFile=[f"-{env_file}"]))
    # what the guard cannot read whole: an interpreter's script, a glob or a specifier, a long file
    assert "interpreter" in privilege._may_gain(["/usr/bin/python3 /opt/app/server.py"], settings())
    assert "interpreter" in privilege._may_gain(["/usr/bin/python3.11 -m app"], settings())
    for pattern in (f"{tmp_path}/env.d/*.env", f"{tmp_path}/env-%i"):
        assert "LD_PRELOAD" in privilege._may_gain(["/bin/true"], settings(EnvironmentFile=[f"-{pattern}"]))
    env_file.write_text("A=1\n" * privilege.ENV_FILE_LIMIT + "LD_PRELOAD=/x.so\n")
    assert "LD_PRELOAD" in privilege._may_gain(["/bin/true"], settings(EnvironmentFile=[str(env_file)]))
    env_file.write_text("A=1\n")
    assert privilege._may_gain(["/bin/true"], settings(EnvironmentFile=[str(env_file)])) is None


def bind(text: str) -> Bind:
    return Bind(parse_listen(text), SocketOptions())


def test_the_conflict_only_where_proven_and_below_the_start():
    proven = Evidence(privilege=BindPrivilege(1024, "nobody", facts=("fact",)))
    (by_kernel,) = permission_denied(bind("127.0.0.1:80"), errno.EACCES, proven)
    assert by_kernel.kind == ConflictKind.PERMISSION_DENIED and not by_kernel.predicted and by_kernel.error == "EACCES"
    assert by_kernel.blocking and by_kernel.evidence == ("fact",)
    (from_settings,) = permission_denied(bind("127.0.0.1:80"), 0, proven)
    assert from_settings.predicted and from_settings.blocking
    assert permission_denied(bind("127.0.0.1:1024"), 0, proven) == []
    unproven = Evidence(privilege=BindPrivilege(1024, "nobody", unproven="ExecStart= runs sh"))
    assert permission_denied(bind("127.0.0.1:80"), errno.EACCES, unproven) == []
    assert permission_denied(bind("127.0.0.1:80"), errno.EACCES, Evidence()) == []
