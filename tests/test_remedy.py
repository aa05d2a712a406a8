"""The fix texts and the unit advice on recorded evidence (pure logic): advice must be safe for the
unit it is about. Confirm PID and command first; never `fuser -k` (it kills whatever has the port
open, the rightful owner too); `kill` only for a process
proven to be stale (an orphan, or the guarded unit's own leftover); and never advice to change a
setting the unit may have on purpose (KillMode=process in Debian's ssh.service)."""

from __future__ import annotations

import re

import pytest

from bindguard.systemd.context import SystemdContext
from bindguard.model.endpoints import Bind, SocketOptions, parse_listen
from bindguard.model.facts import BOUND, ProcessFact, SocketFact
from bindguard.verdict.remedies import remedy
from bindguard.systemd.bus import UnitInfo
from bindguard.model.kinds import ConflictKind, UnitStatus
from bindguard.model.text import command_unit
from bindguard.verdict.conflicts import Conflict


def bind(text, **opts):
    return Bind(parse_listen(text), SocketOptions(**opts))


def holder(pid=4242, unit=None, cgroup="/user.slice/user-0.slice/session-3.scope"):
    return ProcessFact(pid, 1, "webd", ("/usr/bin/webd", "--serve"), "/usr/bin/webd", 0, "root", 1.0e9,
                       cgroup, unit)


def sock(text, state="LISTEN"):
    return SocketFact(parse_listen(text), state, 0, 100)


PROVEN_STALE = (ConflictKind.ORPHAN, ConflictKind.OWN_INSTANCE)

CASES = [
    Conflict(bind("0.0.0.0:80"), ConflictKind.LISTENER, socket=sock("0.0.0.0:80"), process=holder()),
    Conflict(bind("0.0.0.0:80"), ConflictKind.LISTENER, socket=sock("0.0.0.0:80"),
             process=holder(unit="apache2.service", cgroup="/system.slice/apache2.service"), unit="apache2.service"),
    Conflict(bind("udp:0.0.0.0:53"), ConflictKind.BOUND, socket=sock("udp:0.0.0.0:53", BOUND), process=holder()),
    Conflict(bind("0.0.0.0:80"), ConflictKind.BOUND, socket=sock("0.0.0.0:80", BOUND), process=holder()),
    Conflict(bind("0.0.0.0:22"), ConflictKind.OWN_INSTANCE, socket=sock("0.0.0.0:22"),
             process=holder(unit="ssh.service", cgroup="/system.slice/ssh.service"), unit="ssh.service"),
    Conflict(bind("0.0.0.0:80"), ConflictKind.ORPHAN, socket=sock("0.0.0.0:80"), process=holder(cgroup="/system.slice/web.service")),
]


@pytest.mark.parametrize("conflict", CASES, ids=lambda c: c.kind + ("-" + c.unit if c.unit else ""))
def test_kill_only_for_a_proven_stale_process_and_only_after_confirming_it(conflict):
    text = remedy(conflict)
    kill = re.search(r"`kill ", text)
    if conflict.kind not in PROVEN_STALE:
        assert kill is None, text
    else:
        assert kill is not None and re.search(r"[Cc]onfirm", text[:kill.start()]), text
        assert "ps -o pid,ppid,lstart,cmd -p 4242" in text[:kill.start()], text
    assert "fuser" not in text, text


def test_own_instance_is_not_told_to_change_the_unit_s_killmode():
    text = remedy(CASES[4])
    assert "KillMode" not in text and "control-group" not in text, text


def test_self_conflict_of_a_dual_stack_request_points_to_the_request_not_to_nginx():
    """`install nginx.service 0.0.0.0:80 [::]:80` without --v6only: nginx already sets ipv6only=on,
    so the fix is the guard's --v6only, not a setting nginx has by default."""
    dual, ipv4 = bind("[::]:80", v6only=False), bind("0.0.0.0:80", v6only=False)
    text = remedy(Conflict(dual, ConflictKind.SELF_CONFLICT, other_bind=ipv4))
    assert "--v6only" in text and "ipv6only=on" not in text, text
    assert text.index("--v6only") < text.index("ipv6only=off"), text


def test_self_conflict_of_two_ipv4_sockets():
    text = remedy(Conflict(bind("127.0.0.1:80"), ConflictKind.SELF_CONFLICT, other_bind=bind("0.0.0.0:80")))
    assert "v6only" not in text and "bind only one" in text, text


def ssh_context(kill_mode="process", n_restarts=0) -> SystemdContext:
    """Debian's ssh.service as the manager describes it (recorded: KillMode=process)."""
    ctx = SystemdContext(unit_name="ssh.service")
    ctx._tried = True
    ctx._unit_info = UnitInfo(name="ssh.service", load_state="loaded", active_state="activating",
                              sub_state="start-pre", unit_file_state="", control_group="/system.slice/ssh.service",
                              invocation_id="", triggered_by=(), kill_mode=kill_mode, n_restarts=n_restarts)
    return ctx


def test_a_unit_name_with_systemd_s_escapes_is_quoted_in_a_command():
    """`systemctl stop foo\\x2dbar.service` in a shell would stop foox2dbar.service."""
    unit = "web\\x2d1.service"
    c = Conflict(bind("0.0.0.0:80"), ConflictKind.LISTENER, socket=sock("0.0.0.0:80"),
                 process=holder(unit=unit, cgroup=f"/system.slice/{unit}"), unit=unit, unit_status=UnitStatus.BY_MANAGER)
    assert "`systemctl stop 'web\\x2d1.service'`" in remedy(c)
    assert command_unit("nginx.service") == "nginx.service" and command_unit("getty@tty1.service") == "getty@tty1.service"
    assert command_unit("it's.service") == "'it'\\''s.service'"


def test_a_unit_name_beginning_with_a_dash_follows_double_dash_in_a_command():
    """`systemctl stop -Hroot@host:x.service` would run on a host of the cgroup's namer's choosing
    (-H); `-.mount` is the root file system's. After `--` each is an argument, as systemctl reads it."""
    unit = "-Hroot@host:x.service"
    c = Conflict(bind("0.0.0.0:80"), ConflictKind.LISTENER, socket=sock("0.0.0.0:80"), process=holder(
        unit=unit, cgroup=f"/user.slice/user-1000.slice/user@1000.service/{unit}"), unit=unit,
        unit_status=UnitStatus.BY_CGROUP)
    advice = remedy(c)
    assert f"`systemctl stop -- {unit}` once `systemctl status -- {unit}` lists PID" in advice, advice
    assert f"systemctl stop {unit}" not in advice and f"status {unit}" not in advice
    assert command_unit("-.mount") == "-- -.mount" and command_unit("-it's.service") == "-- '-it'\\''s.service'"


def test_no_advice_about_the_unit_on_a_clear_start():
    assert ssh_context().advice([], refused=False) == []


def test_no_killmode_advice_for_a_conflict_the_unit_s_settings_do_not_explain():
    assert ssh_context().advice([CASES[1]], refused=True) == []


def test_own_instance_advice_says_what_holds_and_keeps_the_unit_s_killmode():
    (line,) = ssh_context().advice([CASES[4]], refused=True)
    assert "KillMode=process" in line and "PID 4242" in line, line
    assert "control-group" not in line and "mixed" not in line and "leave it" in line, line


def test_restart_loop_advice_only_when_refused():
    ctx = ssh_context(n_restarts=3)
    assert any("StartLimitBurst=" in line for line in ctx.advice([CASES[1]], refused=True))
    assert ctx.advice([], refused=False) == []
