"""scan's findings judged on a recorded port map (verdict.scan): each kind from hand-built facts, no
root, no sockets, no manager. The real scan on real sockets and a real manager is tests/test_scan.py."""

from __future__ import annotations

from bindguard.model.endpoints import Bind, SocketOptions, parse_listen
from bindguard.model.facts import ProcessFact, SocketFact
from bindguard.model.hostmap import Claim, ExitedCommand, HostMap, Listener, UnitState
from bindguard.model.kinds import ClaimSource, FindingKind, UnitStatus
from bindguard.verdict.scan import findings


def _claim(unit: str, address: str, source: str = ClaimSource.CONFIG, *, will_run: bool | None = True, v6only: bool = False,
           confident: bool = True, triggers: tuple[str, ...] = (), reuseport: bool = False) -> Claim:
    bind = Bind(parse_listen(address), SocketOptions(v6only=v6only, reuseport=reuseport))
    return Claim(unit, bind, source, "recorded", will_run, confident, triggers)


def _listener(address: str, unit: str | None, status: str | None, pid: int = 4242) -> Listener:
    sock = SocketFact(parse_listen(address), "LISTEN", 0, pid, v6only=False)
    process = ProcessFact(pid, 1, "d", ("/usr/bin/d", "-f"), "/usr/bin/d", 0, "root", 0.0, "/user.slice/x", None)
    return Listener(sock, process, unit, status)


def _kinds(hostmap: HostMap) -> list[str]:
    return [f.kind for f in findings(hostmap)]


def test_two_services_on_overlapping_addresses_collide():
    hostmap = HostMap(claims=[_claim("a.service", "0.0.0.0:8080"), _claim("b.service", "127.0.0.1:8080")])
    [finding] = findings(hostmap)
    assert finding.kind == FindingKind.UNIT_COLLISION and finding.units == ("a.service", "b.service")
    assert (finding.proto, finding.port) == ("tcp", 8080)
    assert "a.service declares 0.0.0.0:8080" in finding.evidence[0]
    # a dual-stack [::] overlaps IPv4; a v6-only one does not
    assert _kinds(HostMap(claims=[_claim("a.service", "[::]:80"), _claim("b.service", "0.0.0.0:80")])) \
        == [FindingKind.UNIT_COLLISION]
    assert _kinds(HostMap(claims=[_claim("a.service", "[::]:80", v6only=True), _claim("b.service", "0.0.0.0:80")])) \
        == []


def test_no_collision_when_one_will_not_run_is_a_guess_or_is_another_port_or_protocol():
    assert _kinds(HostMap(claims=[_claim("a.service", "0.0.0.0:80"),
                                  _claim("b.service", "0.0.0.0:80", will_run=False)])) == []
    assert _kinds(HostMap(claims=[_claim("a.service", "0.0.0.0:80"),
                                  _claim("b.service", "0.0.0.0:80", ClaimSource.DISCOVERED, confident=False)])) == []
    assert _kinds(HostMap(claims=[_claim("a.service", "0.0.0.0:80"), _claim("b.service", "0.0.0.0:81")])) == []
    assert _kinds(HostMap(claims=[_claim("a.service", "0.0.0.0:53"), _claim("b.service", "udp:0.0.0.0:53")])) == []
    # whether it will run is not known (no systemd): it counts
    assert _kinds(HostMap(claims=[_claim("a.service", "0.0.0.0:80", will_run=None),
                                  _claim("b.service", "0.0.0.0:80")])) == [FindingKind.UNIT_COLLISION]


def test_reuseport_collision_says_the_kernel_splits_connections():
    [finding] = findings(HostMap(claims=[_claim("a.service", "0.0.0.0:80", reuseport=True),
                                         _claim("b.service", "0.0.0.0:80", reuseport=True)]))
    assert "SO_REUSEPORT" in finding.evidence[-1]


def test_socket_unit_collision_unless_it_is_the_services_own():
    foreign = HostMap(claims=[_claim("web.socket", "[::]:80", ClaimSource.SOCKET_UNIT, triggers=("web.service",)),
                              _claim("nginx.service", "0.0.0.0:80", ClaimSource.DISCOVERED)])
    [finding] = findings(foreign)
    assert finding.kind == FindingKind.SOCKET_UNIT_COLLISION
    assert finding.summary == "nginx.service and web.socket both bind port 80/tcp"
    assert "systemctl disable --now web.socket" in finding.fix and "Sockets=web.socket" in finding.fix
    own = HostMap(claims=[_claim("web.socket", "[::]:80", ClaimSource.SOCKET_UNIT, triggers=("web.service",)),
                          _claim("web.service", "[::]:80", ClaimSource.DISCOVERED)])
    assert findings(own) == []


def test_unclaimed_listener_in_no_unit_or_in_a_stopped_service():
    stray = HostMap(listeners=[_listener("0.0.0.0:9000", None, UnitStatus.NO_UNIT)],
                    claims=[_claim("app.service", "0.0.0.0:9000", will_run=False)])
    [finding] = findings(stray)
    assert finding.kind == FindingKind.UNCLAIMED_LISTENER and finding.addresses == ("0.0.0.0:9000",)
    assert "the manager places it in no unit" in finding.evidence
    assert any("app.service declares 0.0.0.0:9000" in e and "cannot start" in e for e in finding.evidence)
    assert "ps -o pid,ppid,lstart,cmd -p 4242" in finding.fix and "kill -TERM 4242" in finding.fix
    stopped = HostMap(listeners=[_listener("0.0.0.0:9000", "app.service", UnitStatus.BY_MANAGER)],
                      unit_states={"app.service": "failed"})
    [finding] = findings(stopped)
    assert "its unit app.service is failed, and it still listens" in finding.evidence
    # no manager was asked: the facts, and how to find out what it is, but no kill
    unknown = HostMap(listeners=[_listener("0.0.0.0:9000", None, UnitStatus.UNKNOWN)])
    [finding] = findings(unknown)
    assert "ps -o pid,ppid,lstart,cmd -p 4242" in finding.fix and "kill" not in finding.fix


def test_no_unclaimed_listener_without_proof():
    # the service runs (any state but inactive or failed), or the manager was not asked about it
    for state in ("active", "activating", "deactivating", "reloading", "maintenance"):
        assert findings(HostMap(listeners=[_listener("0.0.0.0:9000", "app.service", UnitStatus.BY_MANAGER)],
                                unit_states={"app.service": state})) == []
    assert findings(HostMap(listeners=[_listener("0.0.0.0:9000", "app.service", UnitStatus.BY_MANAGER)])) == []
    # only its cgroup path names the service: whether it runs is not known
    assert findings(HostMap(listeners=[_listener("0.0.0.0:9000", "app.service", UnitStatus.BY_CGROUP)],
                            unit_states={"app.service": "inactive"})) == []
    # the manager's own sockets (.socket units)
    held = _listener("0.0.0.0:9000", "web.socket", UnitStatus.BY_MANAGER)
    held.by_manager = True
    assert findings(HostMap(listeners=[held])) == []


def test_ephemeral_port_with_the_merged_reservation():
    hostmap = HostMap(claims=[_claim("a.service", "0.0.0.0:40000"), _claim("b.service", "0.0.0.0:8080"),
                              _claim("c.service", "0.0.0.0:40001", ClaimSource.LISTENING),
                              _claim("d.service", "0.0.0.0:40002", will_run=False),
                              _claim("e.service", "0.0.0.0:40003")],
                      port_range=(32768, 60999), reserved="40003")
    [finding] = findings(hostmap)
    assert finding.kind == FindingKind.EPHEMERAL_PORT and finding.units == ("a.service",) and finding.port == 40000
    assert "net.ipv4.ip_local_reserved_ports=40000,40003" in finding.fix
    assert "keeps what is reserved now (40003)" in finding.fix
    assert findings(HostMap(claims=hostmap.claims, port_range=None)) == []  # the range could not be read


def test_restart_loop_from_the_main_process_or_exec_start_pre():
    main = UnitState("web.service", "activating", n_restarts=3, result="exit-code", sub_state="auto-restart",
                     exec_main_status=98)
    [finding] = findings(HostMap(units=[main], claims=[_claim("web.service", "0.0.0.0:80")]))
    assert finding.kind == FindingKind.RESTART_LOOP and finding.port == 80 and finding.addresses == ("0.0.0.0:80",)
    assert "RestartPreventExitStatus=98" in finding.fix and "bindguard explain 0.0.0.0:80" in finding.fix
    pre = UnitState("web.service", "failed", n_restarts=5, result="exit-code", sub_state="failed",
                    exec_start_pre=(ExitedCommand(("/usr/bin/bindguard", "check"), "/usr/bin/bindguard", 1, 98),))
    [finding] = findings(HostMap(units=[pre]))
    assert "ExecStartPre=/usr/bin/bindguard check exited 98" in finding.evidence[1]
    assert "StartLimitBurst=" in finding.fix and "bindguard explain ADDRESS" in finding.fix


def test_no_restart_loop_when_running_never_restarted_or_failed_otherwise():
    running = UnitState("web.service", "active", n_restarts=3, result="exit-code", sub_state="running",
                        exec_main_status=98)
    never = UnitState("web.service", "failed", n_restarts=0, result="exit-code", exec_main_status=98)
    other = UnitState("web.service", "failed", n_restarts=4, result="exit-code", exec_main_status=1)
    killed = UnitState("web.service", "failed", n_restarts=4, result="signal",
                       exec_start_pre=(ExitedCommand((), "/bin/x", 2, 98),))
    for unit in (running, never, other, killed):
        assert findings(HostMap(units=[unit])) == []


def test_config_error_and_the_order_of_findings():
    broken = UnitState("web.service", config_problems=("/etc/bindguard/web.service.yaml:3:5: unknown key",))
    hostmap = HostMap(units=[broken], claims=[_claim("b.service", "0.0.0.0:443"), _claim("a.service", "[::]:443"),
                                              _claim("c.service", "0.0.0.0:40000")],
                      port_range=(32768, 60999))
    found = findings(hostmap)
    assert [(f.kind, f.port) for f in found] == [(FindingKind.UNIT_COLLISION, 443), (FindingKind.EPHEMERAL_PORT, 40000), (FindingKind.CONFIG_ERROR, None)]
    assert found[2].evidence == broken.config_problems and "bindguard config check web.service" in found[2].fix
