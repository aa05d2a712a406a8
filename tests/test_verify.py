"""bindguard verify: the verdict on recorded listeners, and as a real unit's ExecStartPost= under the
rig (a real systemd user manager): the daemon never listened, listened on the wrong address, shares
the address with a second process, or a foreign process owns it."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from bindguard.evidence import owners
from bindguard.model.kinds import UnitStatus, VerifyKind
from bindguard.model.errors import ExitCode
from bindguard.verdict.verify import Holder, assess, exit_code, holders
from bindguard.model.endpoints import Bind, SocketOptions, parse_listen
from bindguard.model.facts import ProcessFact, SocketFact
from test_discover import need_package

BINDGUARD = [sys.executable, "-m", "bindguard"]


# --- the verdict on recorded evidence --------------------------------------------------------


def _listener(address: str, inode: int, unit: str | None, v6only: bool | None = None) -> Holder:
    sock = SocketFact(parse_listen(address), "LISTEN", 0, inode, v6only=v6only)
    process = ProcessFact(inode, 1, "d", ("d",), "/usr/bin/d", 0, "root", 0.0, f"/system.slice/{unit}", unit)
    return Holder(sock, [process], unit == "web.service")


def _assess(address: str, *holders: Holder, v6only: bool = False, stated: bool = False):
    bind = Bind(parse_listen(address), SocketOptions(v6only=v6only))
    return assess(bind, [h.socket for h in holders], {h.socket.inode: h for h in holders}, "web.service", stated, 1.0)


def test_assess_each_kind():
    assert _assess("127.0.0.1:80").kind == VerifyKind.NOT_LISTENING
    assert _assess("127.0.0.1:80", _listener("127.0.0.1:80", 1, "web.service")).ok
    group = _assess("127.0.0.1:80", _listener("127.0.0.1:80", 1, "web.service"), _listener("127.0.0.1:80", 2, "web.service"))
    assert group.ok and "SO_REUSEPORT group of 2" in group.evidence[-1]
    assert _assess("127.0.0.1:80", _listener("0.0.0.0:80", 1, "web.service")).kind == VerifyKind.WRONG_ADDRESS
    assert _assess("127.0.0.1:80", _listener("127.0.0.2:80", 1, "web.service")).kind == VerifyKind.WRONG_ADDRESS
    assert _assess("127.0.0.1:80", _listener("127.0.0.1:80", 1, "other.service")).kind == VerifyKind.FOREIGN_OWNER
    foreign_wildcard = _assess("127.0.0.1:80", _listener("[::]:80", 1, None, v6only=False))
    assert foreign_wildcard.kind == VerifyKind.FOREIGN_OWNER and "unit unknown" in foreign_wildcard.evidence[0]
    shared = _assess("127.0.0.1:80", _listener("127.0.0.1:80", 1, "web.service"), _listener("127.0.0.1:80", 2, None))
    assert shared.kind == VerifyKind.SHARED and "kill" not in shared.fix
    # a v6only listener on [::] does not overlap 127.0.0.1: it is not in the way
    assert _assess("127.0.0.1:80", _listener("127.0.0.1:80", 1, "web.service"),
                   _listener("[::]:80", 2, None, v6only=True)).ok
    dual = _listener("[::]:80", 1, "web.service", v6only=False)
    assert _assess("[::]:80", dual, v6only=True).ok  # v6only not stated: not checked
    assert _assess("[::]:80", dual, v6only=True, stated=True).kind == VerifyKind.WRONG_ADDRESS
    loopback = _listener("[::1]:80", 1, "web.service", v6only=True)  # the kernel sets it for a specific address
    assert _assess("[::1]:80", loopback, v6only=False, stated=True).ok


def test_holders_belong_to_the_unit_by_the_managers_word_else_by_verifys_own_cgroup():
    sock = SocketFact(parse_listen("127.0.0.1:80"), "LISTEN", 0, 7)
    worker = ProcessFact(11, 10, "d", ("d",), "/usr/bin/d", 0, "root", 0.0, "/system.slice/web.service/worker", None)
    # the manager answered: its word decides, whatever the cgroup path
    assert holders([sock], {7: [worker]}, {11: "web.service"}, "web.service", None)[7].in_unit
    other = holders([sock], {7: [worker]}, {11: "other.service"}, "web.service", "/system.slice/web.service")[7]
    assert not other.in_unit and other.units == (("other.service", UnitStatus.BY_MANAGER),)
    # a slice holds no unit's process: in no unit
    assert holders([sock], {7: [worker]}, {11: "system.slice"}, "web.service", None)[7].units == ((None, UnitStatus.NO_UNIT),)
    # no answer: within verify's own cgroup (ExecStartPost= runs in the unit), delegated subgroups included
    assert holders([sock], {7: [worker]}, {}, "web.service", "/system.slice/web.service")[7].in_unit
    assert not holders([sock], {7: [worker]}, {}, "web.service", "/system.slice/web")[7].in_unit
    # no answer and no own cgroup: the name the cgroup path bears, marked as such
    named = ProcessFact(11, 10, "d", ("d",), "/usr/bin/d", 0, "root", 0.0, "/system.slice/web.service", "web.service")
    held = holders([sock], {7: [named]}, {}, "web.service", None)[7]
    assert held.in_unit and held.units == (("web.service", UnitStatus.BY_CGROUP),)
    # no holder found (another user's process, not root)
    assert holders([sock], {}, {}, "web.service", None)[7] == Holder(sock, (), False, ())


def test_optional_addresses_and_the_exit_code():
    missing = _assess("127.0.0.1:80")
    taken = _assess("127.0.0.1:80", _listener("127.0.0.1:80", 1, "other.service"))
    shared = _assess("127.0.0.1:80", _listener("127.0.0.1:80", 1, "web.service"), _listener("127.0.0.1:80", 2, None))
    assert exit_code([]) == 0 and exit_code([_assess("127.0.0.1:80", _listener("127.0.0.1:80", 1, "web.service"))]) == 0
    assert exit_code([missing]) == ExitCode.ATTENTION
    assert exit_code([missing, taken]) == exit_code([shared]) == 98
    bind = Bind(parse_listen("127.0.0.1:80"), SocketOptions())
    optional = assess(bind, [], {}, "web.service", False, 1.0, optional=True)
    assert optional.kind == VerifyKind.NOT_LISTENING and optional.ok and exit_code([optional]) == 0
    # an optional address shared with a foreign process is still wrong
    h = _listener("127.0.0.1:80", 1, "web.service"), _listener("127.0.0.1:80", 2, None)
    assert not assess(bind, [x.socket for x in h], {x.socket.inode: x for x in h}, "web.service", False, 1.0,
                      optional=True).ok


def test_a_unit_name_beginning_with_a_dash_is_no_option_in_the_commands_advised():
    """As an argument after `--`, as an option's value in `--unit=` (journalctl): never read as options."""
    bind = Bind(parse_listen("127.0.0.1:80"), SocketOptions())
    fix = assess(bind, [], {}, "-Hroot@host:x.service", False, 1.0).fix
    assert "`systemctl status -- -Hroot@host:x.service`" in fix and "`journalctl --unit=-Hroot@host:x.service`" in fix
    assert "`journalctl --unit=web.service`" in _assess("127.0.0.1:80").fix


def test_a_foreign_owner_without_a_unit_is_looked_at_before_it_is_stopped():
    taken = _assess("127.0.0.1:80", _listener("127.0.0.1:80", 4242, None))
    assert taken.kind == VerifyKind.FOREIGN_OWNER and "ps -o pid,ppid,lstart,cmd -p 4242" in taken.fix
    by_manager = Holder(taken.holders[0].socket, taken.holders[0].processes, False, (("db.service", UnitStatus.BY_MANAGER),))
    stopped = _assess("127.0.0.1:80", by_manager)
    assert "`systemctl stop db.service`" in stopped.fix and "ps -o" not in stopped.fix
    # db.service may be the address's rightful owner: stopping it is advised only if web.service should have it
    assert "if web.service should serve it" in stopped.fix and "give web.service another address" in stopped.fix
    unknown = Holder(SocketFact(parse_listen("127.0.0.1:80"), "LISTEN", 0, 5), (), False)
    assert "ss -lntup 'sport = :80'" in _assess("127.0.0.1:80", unknown).fix


# --- the command line, in a network namespace --------------------------------------------------


def _verify(ns, *args: str, **kwargs):
    return ns.run([*BINDGUARD, "verify", *args], **kwargs)


@pytest.mark.integration
def test_verify_usage_errors_and_bounded_wait(netns):
    if owners.unit_from_cgroup(owners.process_cgroup(os.getpid()) or "") is None:  # else verify takes that unit
        done = _verify(netns, "127.0.0.1:80")
        assert done.returncode == 64 and "give --unit NAME" in done.stderr and "Traceback" not in done.stderr
    bad = _verify(netns, "--unit", "web.service", "--timeout", "-1", "80")
    assert bad.returncode == 64 and "--timeout" in bad.stderr
    malformed = _verify(netns, "--unit", "web.service", "300.1.1.1:80")
    assert malformed.returncode == 64 and "'300.1.1.1' is not an IPv4 address" in malformed.stderr
    nothing = _verify(netns, "--unit", "web.service", "--no-systemd",
                      env=dict(os.environ, BINDGUARD_CONFIG_PATH="/nonexistent"))
    assert nothing.returncode == 64 and "no address to verify for web.service" in nothing.stderr

    start = time.monotonic()
    late = _verify(netns, "--unit", "web.service", "--timeout", "0.5", "--json", "127.0.0.1:8080", "udp:[::1]:5353")
    assert time.monotonic() - start < 5
    assert late.returncode == 1
    report = json.loads(late.stdout)
    assert report["ok"] is False and report["unit"] == "web.service" and report["waited_s"] >= 0.5
    assert [(a["address"], a["kind"]) for a in report["addresses"]] == [
        ("127.0.0.1:8080", "not-listening"), ("udp:[::1]:5353", "not-listening")]


@pytest.mark.integration
def test_verify_names_a_foreign_owner_in_a_namespace(netns):
    holder = netns.hold({"host": "0.0.0.0", "port": 8080}, {"proto": "udp", "host": "::1", "port": 5353})
    done = _verify(netns, "--unit", "web.service", "--no-systemd", "--json", "127.0.0.1:8080", "udp:[::1]:5353")
    assert done.returncode == 98, done.stderr
    report = json.loads(done.stdout)
    assert [a["kind"] for a in report["addresses"]] == ["foreign-owner", "foreign-owner"]
    listener = report["addresses"][0]["listeners"][0]
    assert listener["local_address"] == "0.0.0.0:8080" and listener["pids"] == [holder.pid]
    assert "holder.py" in listener["command"]
    assert "does not serve 127.0.0.1:8080, udp:[::1]:5353 as intended (exit 98)" in done.stderr


# --- as ExecStartPost= of real units, under the rig --------------------------------------------


def _post_status(rig, unit: str) -> list[int | None]:
    from rig import _parse_exec_status

    return _parse_exec_status(rig.prop(unit, "ExecStartPost"))


@pytest.mark.integration
def test_verify_in_exec_start_post_of_user_units(systemd_rig):
    rig = systemd_rig
    log = rig.log("verify.log")
    verify = f"{sys.executable} -m bindguard verify --timeout 1.5"

    def unit(name: str, exec_start: str, *addresses: str, kind: str = "notify", extra: str = "") -> None:
        rig.write_unit(name, f"""\
[Service]
Type={kind}
ExecStart={exec_start}
ExecStartPost={verify} {' '.join(addresses)}
StandardError=append:{log}
{extra}""", reload=False)

    serve = rig.serve
    unit("good.service", serve({"host": "127.0.0.1", "port": 18100}), "127.0.0.1:18100")
    slow = rig.root / "slow.sh"
    slow.write_text(f"sleep 0.7\nexec {serve({'host': '127.0.0.1', 'port': 18105})}\n")
    unit("slow.service", f"/bin/sh {slow}", "127.0.0.1:18105", kind="simple")  # listens 0.7 s after the start
    unit("never.service", "/bin/sleep infinity", "127.0.0.1:18101", kind="simple")
    unit("wrong.service", serve({"host": "0.0.0.0", "port": 18102}), "127.0.0.1:18102")
    unit("shared.service", serve({"host": "127.0.0.1", "port": 18103, "reuseport": True}), "127.0.0.1:18103")
    unit("foreign.service", "/bin/sleep infinity", "127.0.0.1:18104", kind="simple")
    config = rig.root / "bindguard"
    config.mkdir()
    (config / "declared.service.yaml").write_text('listen: ["[::1]:18106"]\n')
    unit("declared.service", serve({"host": "::1", "port": 18106}), extra=f"Environment=BINDGUARD_CONFIG_PATH={config}\n")
    rig.daemon_reload()
    rig.hold({"host": "127.0.0.1", "port": 18103, "reuseport": True})
    rig.hold({"host": "127.0.0.1", "port": 18104})

    for name in ("good.service", "slow.service", "declared.service"):
        run = rig.start(name)
        assert run.ok and run.active_state == "active", (name, run.output, log.read_text())
        assert _post_status(rig, name) == [0]
    text = log.read_text()
    assert "bindguard: verify: good.service serves 127.0.0.1:18100 as intended" in text
    assert "bindguard: verify: declared.service serves [::1]:18106 as intended" in text

    expected = {
        "never.service": (1, "not-listening", "nothing listens on 127.0.0.1:18101 after 1.5 s"),
        "wrong.service": (1, "wrong-address", "wrong.service listens elsewhere on the port: 0.0.0.0:18102 LISTEN"),
        "shared.service": (98, "shared", "shared with a process outside shared.service: 127.0.0.1:18103 LISTEN"),
        "foreign.service": (98, "foreign-owner", "held outside foreign.service: 127.0.0.1:18104 LISTEN"),
    }
    for name, (code, kind, evidence) in expected.items():
        log.write_text("")
        run = rig.start(name)
        assert not run.ok and run.result == "exit-code", (name, run.output, log.read_text())
        assert _post_status(rig, name) == [code], (name, log.read_text())
        text = log.read_text()
        assert f"bindguard: verify: {name} does not serve" in text and f"(exit {code})" in text
        assert f": {kind}\n" in text and evidence in text, text
        assert "fix:" in text
    status = rig.systemctl("status", "--no-pager", "foreign.service").stdout
    assert "ExecStartPost=" in status and "status=98" in status


@pytest.mark.integration
def test_verify_discovers_a_real_nginx_units_addresses_over_the_user_bus(systemd_rig):
    """No LISTEN and no bindguard file: verify asks the user manager for the unit's ExecStart=
    (D-Bus) and reads the addresses from nginx's own configuration (`nginx -T`)."""
    rig = systemd_rig
    nginx = "/usr/sbin/nginx"
    if not os.access(nginx, os.X_OK):
        pytest.fail("nginx is missing: ./setup.sh --test installs it")
    prefix = rig.root / "nginx"
    prefix.mkdir()
    conf = prefix / "nginx.conf"
    conf.write_text(f"""\
pid {prefix}/nginx.pid;
error_log stderr;
events {{}}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{ listen 127.0.0.1:18120; }}
}}
""")
    log = rig.log("nginx-verify.log")
    rig.write_unit("nginx.service", f"""\
[Service]
ExecStart={nginx} -c {conf} -g "daemon off;"
ExecStartPost={sys.executable} -m bindguard verify --timeout 3
StandardError=append:{log}
""")
    run = rig.start("nginx.service")
    assert run.ok, (run.output, log.read_text())
    assert "bindguard: verify: nginx.service serves 127.0.0.1:18120 as intended" in log.read_text()


@pytest.mark.integration
def test_verify_lets_redis_start_without_its_optional_ipv6_address(systemd_rig):
    """Redis's Debian default `bind 127.0.0.1 -::1` on a host without IPv6 on lo: Redis starts on
    127.0.0.1 alone, and verify, however the address is marked optional, only notes ::1."""
    need_package("redis-server", "/usr/bin/redis-server")
    rig = systemd_rig
    rig.run(["sysctl", "-qw", "net.ipv6.conf.lo.disable_ipv6=1"], check=True)
    log = rig.log("verify.log")
    data = rig.root / "redis"
    data.mkdir()
    conf = rig.root / "redis.conf"
    conf.write_text(f"bind 127.0.0.1 -::1\nport 18379\nsave \"\"\nappendonly no\ndir {data}\n")
    config = rig.root / "bindguard"
    config.mkdir()
    (config / "redis-server.service.yaml").write_text(
        'listen: ["127.0.0.1:18379", {address: "[::1]:18379", optional: true}]\n')
    verify = f"{sys.executable} -m bindguard verify --timeout 3"
    ways = {
        "--optional": f"{verify} 127.0.0.1:18379 --optional [::1]:18379",
        "--if-available": f"{verify} 127.0.0.1:18379 --if-available [::1]:18379",
        "optional: in its bindguard file": f"{verify}",
        "discovery of `bind 127.0.0.1 -::1`": f"{verify}",
    }
    for way, post in ways.items():
        env = f"Environment=BINDGUARD_CONFIG_PATH={config}\n" if "file" in way else ""
        rig.write_unit("redis-server.service", f"""\
[Service]
ExecStart=/usr/bin/redis-server {conf}
ExecStartPost={post}
StandardError=append:{log}
{env}""")
        log.write_text("")
        run = rig.start("redis-server.service")
        text = log.read_text()
        assert run.ok and run.active_state == "active", (way, run.output, text)
        assert _post_status(rig, "redis-server.service") == [0], (way, text)
        assert "serves 127.0.0.1:18379 as intended" in text, (way, text)
        assert "note: [::1]:18379: " in text and "an optional address: the daemon starts without it" in text, \
            (way, text)
        assert rig.stop("redis-server.service").ok
    # a required address that is not listened on still fails the start
    rig.write_unit("redis-server.service", f"""\
[Service]
ExecStart=/usr/bin/redis-server {conf}
ExecStartPost={verify} 127.0.0.1:18379 [::1]:18379
StandardError=append:{log}
""")
    log.write_text("")
    run = rig.start("redis-server.service")
    assert not run.ok and _post_status(rig, "redis-server.service") == [1], log.read_text()
