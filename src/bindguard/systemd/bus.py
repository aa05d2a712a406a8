"""systemd's view over D-Bus: which unit a PID is in, a unit's settings, and the socket units.

Plain method calls and property reads with known signatures through pystemd's sd-bus binding
(pystemd.dbuslib), never per-object introspection: reading one property is one round trip.
pystemd is imported only when a bus is opened, so the check path pays nothing until it needs
systemd. Every failure leaves this module as a SystemdError (SystemdUnavailable: which bus and
why; UnitNotFound; SystemdRefused), never as pystemd's own exception, and the caller falls back
to what /proc tells.
"""

from __future__ import annotations

import _socket  # not socket, whose import is 1 ms
import errno
import os
import time
import types
from collections.abc import Iterable

import bindguard
from bindguard.model.endpoints import TCP, UDP, AddressError, Endpoint, parse_listen
from bindguard.model.host import host_bindv6only
from bindguard.model.record import Record
from bindguard.systemd.busaddress import (  # noqa: F401 (this module's API too)
    SYSTEM,
    USER,
    SystemdError,
    SystemdUnavailable,
    address,
    bus_for,
    check_socket,
    choose_bus,
    shown,
    socket_path,
)
from bindguard.systemd.unitexec import enabled_socket_units

_DEST = b"org.freedesktop.systemd1"
_MANAGER_PATH = b"/org/freedesktop/systemd1"
_MANAGER = b"org.freedesktop.systemd1.Manager"
_UNIT = b"org.freedesktop.systemd1.Unit"
_SERVICE = b"org.freedesktop.systemd1.Service"
_SOCKET = b"org.freedesktop.systemd1.Socket"
_UNIT_PATH_PREFIX = b"/org/freedesktop/systemd1/unit"

# D-Bus errors that mean a wrong question (no such unit, property, ...), not an unreachable manager.
_QUESTION_ERRORS = frozenset({
    "DBusNoSuchUnitError", "DBusInvalidArgsError", "DBusUnknownObjectError", "DBusUnknownPropertyError",
    "DBusUnknownInterfaceError", "DBusUnknownMethodError",
})


def _dbuslib():
    """pystemd's sd-bus binding, pystemd.dbuslib (with pystemd.dbusexc, its errors), loaded
    without running the package's __init__: that imports pystemd's object layer (pystemd.DBus,
    pystemd.base, lxml), which bindguard never uses: 5 of the 24 ms pystemd costs a guard that
    asks the bus. The package is found as `import pystemd` would find it; an `import pystemd`
    later runs its __init__ as ever. Raises ImportError without pystemd.

    While the binding is imported, and only then, sys.modules holds a _StandIn for each of the
    two modules it takes a name from as it loads (`from pprint import pformat`, `from
    pystemd.utils import x2char_star`, in every pystemd from 0.9 to 0.15.3) that no one has
    imported yet. They were most of what the binding cost: under `python -X importtime`, in a
    guard run by a service, 7.0 ms for pprint (it brings dataclasses, inspect, ast, dis, tokenize)
    and 5.6 ms for pystemd.utils (shlex, pathlib, uuid, platform, typing) of the binding's 13.9 ms;
    without them the refusal such a guard gives takes 30 ms where it took 45. bindguard needs
    neither: pformat only words the TypeError of an argument the binding cannot send, and
    x2char_star turns a string argument into bytes, where bindguard sends bytes. The binding
    answers as an ordinary import's does, word for word (see _StandIn); a pystemd that takes
    another name from either module, or the module itself, gets the real one's.
    """
    import sys

    lib = sys.modules.get("pystemd.dbuslib")
    if lib is not None:
        return lib
    bindguard.find_dependencies()
    stand_ins = [_StandIn(name, light) for name, light in _LIGHT.items() if name not in sys.modules]
    sys.modules.update((module.__name__, module) for module in stand_ins)
    try:
        # pystemd.dbusexc: dbuslib's errors, which _is_unreachable reads
        return _pystemd("pystemd.dbusexc", "pystemd.dbuslib")
    finally:
        for module in stand_ins:
            if sys.modules.get(module.__name__) is module:
                del sys.modules[module.__name__]


def _pystemd(*names: str):
    """The modules of pystemd named (the last returned), imported as `import pystemd.x` would,
    without running the package's __init__ when pystemd is not imported yet (then `pystemd` is in
    sys.modules only while they are imported). ImportError without pystemd."""
    import sys

    if "pystemd" in sys.modules:
        for name in names:
            __import__(name)
        return sys.modules[names[-1]]
    spec = None
    for finder in sys.meta_path:  # as the import system looks for a package (not importlib.machinery's 0.4 ms)
        find_spec = getattr(finder, "find_spec", None)
        spec = find_spec("pystemd", None) if find_spec is not None else None
        if spec is not None:
            break
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("No module named 'pystemd'", name="pystemd")
    package = types.ModuleType("pystemd")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["pystemd"] = package
    try:
        for name in names:
            __import__(name)
    finally:
        del sys.modules["pystemd"]
    return sys.modules[names[-1]]


def _real(name: str):
    """The module itself, in place of its stand-in: imported as ever on the first need (pystemd's
    without its __init__), and kept in sys.modules as an ordinary import keeps it."""
    import sys

    module = sys.modules.get(name)
    if module is None or isinstance(module, _StandIn):
        sys.modules.pop(name, None)
        if name.startswith("pystemd."):
            return _pystemd(name)
        __import__(name)
        module = sys.modules[name]
    return module


def _pformat(*args, **kwargs):
    """pprint.pformat itself, pprint imported on the first call: the binding calls it only to word
    the TypeError of an argument it cannot append to a message."""
    return _real("pprint").pformat(*args, **kwargs)


def _x2char_star(what_to_convert, *args, **kwargs):
    """pystemd.utils.x2char_star: bytes given back as they are, as pystemd's own does (the same
    body from 0.9 to 0.15.3: a Path encoded, bytes returned, a str encoded, anything else returned
    or, with convert_all, its repr encoded), and bytes are all bindguard sends; anything else goes
    to pystemd's own, imported on the first such call."""
    if type(what_to_convert) is bytes:
        return what_to_convert
    return _real("pystemd.utils").x2char_star(what_to_convert, *args, **kwargs)


# What a stand-in holds itself: the names pystemd's binding takes from each module as it loads.
_LIGHT = {"pprint": {"pformat": _pformat}, "pystemd.utils": {"x2char_star": _x2char_star}}


class _StandIn(types.ModuleType):
    """A module in sys.modules under another's name while pystemd's binding is imported (_dbuslib),
    holding the few names it takes from that module as it loads (_LIGHT), each of which imports the
    real module only when called with something it does not answer itself (_pformat, _x2char_star).
    Any other name asked of it, at the binding's import or later (a pystemd that takes another name
    from the module, or the module itself), is the real module's, imported then: a binding given a
    stand-in behaves as the one an ordinary import gives, whichever pystemd it is."""

    def __init__(self, name: str, light: dict) -> None:
        super().__init__(name, f"bindguard's stand-in for {name} while pystemd's binding is imported")
        self.__dict__.update(light)

    def __getattr__(self, attribute: str):  # only for a name not in the stand-in itself
        if attribute == "__path__":  # asked by each `from ... import`: neither module is a package
            raise AttributeError(attribute)
        return getattr(_real(self.__name__), attribute)


def _is_unreachable(exc: Exception) -> bool:
    """Whether a pystemd error means the bus or manager is unreachable (vs. a wrong question)."""
    import sys

    dbusexc = sys.modules.get("pystemd.dbusexc")  # loaded with the binding that raised exc, if it did
    if dbusexc is None or not isinstance(exc, dbusexc.DBusBaseError) or type(exc).__name__ in _QUESTION_ERRORS:
        return False
    name = getattr(exc, "err_name", b"") or b""
    return not (isinstance(name, bytes) and name.startswith(b"org.freedesktop.systemd1."))


_UNIT_PROPERTIES = (
    ("name", b"Id", b"s"),
    ("active_state", b"ActiveState", b"s"),
    ("sub_state", b"SubState", b"s"),
    ("invocation_id", b"InvocationID", b"ay"),
    ("triggered_by", b"TriggeredBy", b"as"),
    ("inactive_exit_usec", b"InactiveExitTimestampMonotonic", b"t"),
)
_EXEC = b"a(sasbttttuii)"
_SERVICE_PROPERTIES = (
    ("control_group", b"ControlGroup", b"s"),
    ("main_pid", b"MainPID", b"u"),
    ("timeout_start_usec", b"TimeoutStartUSec", b"t"),
    ("kill_mode", b"KillMode", b"s"),
    ("n_restarts", b"NRestarts", b"u"),
    ("result", b"Result", b"s"),
    ("exec_main_status", b"ExecMainStatus", b"i"),
    ("exec_start", b"ExecStart", _EXEC),
    ("exec_start_pre", b"ExecStartPre", _EXEC),
    ("environment", b"Environment", b"as"),
    ("environment_files", b"EnvironmentFiles", b"a(sb)"),
    ("user", b"User", b"s"),
)


class SystemdRefused(SystemdError):
    """The manager answered a question with an error (an invalid argument, an unknown property)."""


class UnitNotFound(SystemdError):
    """systemd knows no unit by this name (no unit file, not loaded)."""

    def __init__(self, name: str, bus: str) -> None:
        from bindguard.model.text import command_unit

        flag = " --user" if bus == USER else ""
        super().__init__(f"unit {name!r} not found on the {bus} manager; check the name with "
                         f"`systemctl{flag} status {command_unit(name)}`")
        self.name = name


class ExecCommand(Record, frozen=True):
    """One ExecStart=/ExecStartPre= command, with its last run as the manager recorded it."""

    path: str
    argv: tuple[str, ...]
    ignore_errors: bool
    pid: int  # 0: not run yet (in this invocation)
    code: int  # siginfo si_code: 1 exited, 2 killed, 3 dumped
    status: int  # exit status, or the signal number when killed


class UnitInfo(Record, frozen=True):
    """The settings and state of one unit; service-only fields are empty for other unit types."""

    name: str
    load_state: str  # loaded, not-found, masked, error, ...
    active_state: str  # active, inactive, failed, activating, deactivating, reloading
    sub_state: str
    unit_file_state: str  # enabled, disabled, static, ...; "" unless asked for (unit(file_state=True))
    control_group: str  # "" when it has no cgroup (inactive)
    invocation_id: str  # hex, "" when never started
    triggered_by: tuple[str, ...]  # units that start this one: its .socket, .path, .timer units
    inactive_exit_usec: int = 0  # CLOCK_MONOTONIC µs when it last left inactive/failed: this start began
    main_pid: int = 0
    timeout_start_usec: int = 0  # 2**64-1 is infinity
    kill_mode: str = ""
    n_restarts: int = 0
    result: str = ""  # success, exit-code, timeout, signal, core-dump, ...
    exec_main_status: int = 0
    exec_start: tuple[ExecCommand, ...] = ()
    exec_start_pre: tuple[ExecCommand, ...] = ()
    environment: tuple[str, ...] = ()
    environment_files: tuple[tuple[str, bool], ...] = ()  # (path, may be missing)
    user: str = ""

    @property
    def sockets(self) -> tuple[str, ...]:
        """The .socket units that pass this service its sockets (its own: "never both")."""
        return tuple(u for u in self.triggered_by if u.endswith(".socket"))

    @property
    def timeout_start_sec(self) -> float | None:
        """TimeoutStartSec= in seconds, None for infinity (or 0, which also disables it)."""
        if self.timeout_start_usec in (0, 2**64 - 1):
            return None
        return self.timeout_start_usec / 1_000_000

    def start_deadline(self) -> float | None:
        """When the manager gives up on the current start (TimeoutStartSec= after it began), on
        the time.monotonic() clock; None without a timeout or before any start."""
        if self.timeout_start_sec is None or not self.inactive_exit_usec:
            return None
        return self.inactive_exit_usec / 1_000_000 + self.timeout_start_sec


class Listen(Record, frozen=True):
    """One network entry of a socket unit's Listen property, e.g. ("Stream", "[::]:80")."""

    type: str  # Stream, Datagram, SequentialPacket
    address: str


class SocketUnit(Record, frozen=True):
    """A .socket unit with network addresses, listening now or able to (loaded or enabled)."""

    name: str
    load_state: str
    active_state: str  # active (listening), inactive, failed, ...
    unit_file_state: str
    listens: tuple[Listen, ...]  # network entries only; AF_UNIX, netlink, FIFOs, ... left out
    bind_ipv6_only: str  # default, both, ipv6-only
    reuse_port: bool
    triggers: tuple[str, ...]  # the service(s) it starts

    @property
    def listening(self) -> bool:
        return self.active_state in ("active", "reloading", "deactivating")

    def endpoints(self, bindv6only: bool | None = None) -> list[tuple[Listen, Endpoint, bool]]:
        """Each Listen entry with the Endpoint it binds and whether that is IPv6-only."""
        return [(entry, *listen_endpoint(entry, self.bind_ipv6_only, bindv6only)) for entry in self.listens]


def listen_endpoint(listen: Listen, bind_ipv6_only: str, bindv6only: bool | None = None) -> tuple[Endpoint, bool]:
    """The Endpoint a socket unit's Listen entry binds, and whether it is IPv6-only.

    ListenStream= is TCP, ListenDatagram= UDP; other types raise AddressError. Listen shows
    `[::]:P` for a dual-stack socket as for a v6-only one: BindIPv6Only= decides, `default`
    meaning the sysctl net.ipv6.bindv6only (read from /proc unless given). A bare port cannot
    appear in Listen, but parses as [::]:P.
    """
    proto = {"Stream": TCP, "Datagram": UDP}.get(listen.type)
    if proto is None:
        raise AddressError(f"{listen.type}={listen.address}: not a TCP or UDP socket")
    endpoint = parse_listen(listen.address, default_proto=proto)
    if endpoint.family != _socket.AF_INET6:
        return endpoint, False
    if bind_ipv6_only == "ipv6-only":
        return endpoint, True
    if bind_ipv6_only == "both":
        return endpoint, False
    return endpoint, host_bindv6only() if bindv6only is None else bindv6only


def is_network_listen(kind: str, address: str) -> bool:
    if kind not in ("Stream", "Datagram"):
        return False
    try:
        parse_listen(address)
    except AddressError:
        return False
    return True


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _exec_commands(value) -> tuple[ExecCommand, ...]:
    # a(sasbttttuii): path, argv, ignore errors, 4 timestamps, pid, code, status
    return tuple(
        ExecCommand(_text(path), tuple(_text(a) for a in argv), bool(ignore), int(pid), int(code), int(status))
        for path, argv, ignore, _t1, _t2, _t3, _t4, pid, code, status in value or ()
    )


def _address_escape(path: str) -> bytes:
    return b"".join(bytes([b]) if b in _ADDRESS_PLAIN else b"%%%02x" % b for b in os.fsencode(path))


def _answers(bus: str, path: str, timeout: float) -> None:
    """Raise SystemdUnavailable unless the bus at path answers an authentication request within
    timeout: sd-bus itself would wait 90 s (its authentication timeout) on a bus that never answers."""
    deadline = time.monotonic() + timeout
    probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(timeout)
        probe.connect(path)
        probe.sendall(b"\0AUTH EXTERNAL " + str(os.geteuid()).encode().hex().encode() + b"\r\n")
        answer = b""
        while b"\n" not in answer and len(answer) < 512:
            probe.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = probe.recv(512)
            if not chunk:
                break
            answer += chunk
    except TimeoutError:
        raise SystemdUnavailable(f"the {bus} bus at {path} did not answer within {timeout:g} s") from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
            reason += f" (no {'session' if bus == USER else 'system'} bus at {path})"
        raise SystemdUnavailable(f"cannot connect to the {bus} bus: {reason}") from None
    finally:
        probe.close()
    if not answer.startswith((b"OK", b"REJECTED")):  # REJECTED: it answers, and offers other mechanisms
        raise SystemdUnavailable(f"the {bus} bus at {path} did not answer as a D-Bus bus does")


# The guard runs before every start, and a bus can accept connections and never answer (at boot
# dbus.socket listens before dbus-daemon runs; a wedged dbus-daemon or manager): sd-bus would wait
# 90 s for its authentication, as long as the default TimeoutStartSec=. So a connection gets a
# budget of time spent on D-Bus: the bus must answer the connection within CONNECT_TIMEOUT, each
# question within CALL_TIMEOUT, and no question starts that could take the total past the budget.
BUS_BUDGET = 3.0
CONNECT_TIMEOUT = 1.0
CALL_TIMEOUT = 1.0
# Bytes a D-Bus address value may hold unescaped (the D-Bus specification's "optionally escaped").
_ADDRESS_PLAIN = frozenset(b"-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_/.\\*")


class Systemd:
    """A connection to one manager (SYSTEM or USER bus), within a budget of time. Use as a context manager.

    The bus is a unix socket (`unix:path=` in $DBUS_SYSTEM_BUS_ADDRESS, $DBUS_SESSION_BUS_ADDRESS,
    else the standard path) owned by root or by this user; sd-bus's other transports (one of
    them runs a program) are never used. Before pystemd connects, the socket must answer the
    authentication's first line within CONNECT_TIMEOUT. Raises SystemdUnavailable when the bus
    cannot be opened, does not answer, or the budget is spent.

    What is left unbounded: a bus that answers that first line and falls silent a moment later
    holds pystemd's first call for sd-bus's authentication timeout (90 s). pystemd offers no way
    to bound it (no sd_bus_set_method_call_timeout, and its calls hold the GIL).
    """

    def __init__(self, bus: str = SYSTEM, budget: float = BUS_BUDGET, call_timeout: float = CALL_TIMEOUT,
                 checked_socket: str | None = None) -> None:
        if bus not in (SYSTEM, USER):
            raise ValueError(f"bus must be {SYSTEM!r} or {USER!r}, not {bus!r}")
        self.bus = bus
        self._open = False
        self._budget = budget
        self._call_timeout = min(call_timeout, budget)
        started = time.monotonic()
        self._gave_up: str | None = None  # why no more questions are asked
        # before paying for pystemd's binding (1.5 ms, _dbuslib): early boot, containers; the path checked,
        # its symlinks resolved, is the one connected to (checked_socket: what check_socket returned
        # to a caller that checked before importing this module; one walk up the path is enough)
        path = checked_socket if checked_socket is not None else check_socket(bus, socket_path(bus))
        _answers(bus, path, min(CONNECT_TIMEOUT, self._call_timeout))
        try:
            DBusAddress = _dbuslib().DBusAddress
        except ImportError as exc:
            raise SystemdUnavailable(f"cannot talk to the {bus} bus: pystemd is not installed ({exc})") from None
        self._dbus = DBusAddress(b"unix:path=" + _address_escape(path))
        # sd-bus reads SYSTEMD_BUS_TIMEOUT once, for the Hello that open() queues, and keeps it for
        # every call on this connection; a value from the unit's environment must not stretch it.
        saved = os.environ.get("SYSTEMD_BUS_TIMEOUT")
        os.environ["SYSTEMD_BUS_TIMEOUT"] = f"{int(self._call_timeout * 1_000_000)}us"
        try:
            self._dbus.open()
        except Exception as exc:
            raise SystemdUnavailable(f"cannot connect to the {bus} bus: {self._why(exc)}") from None
        finally:
            if saved is None:
                del os.environ["SYSTEMD_BUS_TIMEOUT"]
            else:
                os.environ["SYSTEMD_BUS_TIMEOUT"] = saved
        self._open = True
        self._spent = time.monotonic() - started  # seconds spent on D-Bus so far

    def __enter__(self) -> Systemd:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._open:
            self._dbus.close()
            self._open = False

    def _why(self, exc: Exception) -> str:
        code = getattr(exc, "errno", 0)
        if isinstance(code, int) and code < 0:  # sd-bus reports -errno
            reason = os.strerror(-code)
            if -code in (errno.ENOENT, errno.ECONNREFUSED):
                reason += f" (no {'session' if self.bus == USER else 'system'} bus at {shown(address(self.bus))})"
            return reason
        message = getattr(exc, "err_message", b"") or str(exc)
        return _text(message).strip() or type(exc).__name__

    def _failed(self, exc: Exception, what: str) -> SystemdError:
        if _is_unreachable(exc):
            return SystemdUnavailable(f"the {self.bus} manager did not answer {what}: {self._why(exc)}")
        answer = _text(getattr(exc, "err_message", b"") or b"").strip()  # the manager's own words
        return SystemdRefused(f"the {self.bus} manager refused {what}: {answer or self._why(exc)}")

    def _ask(self, what: str, question):
        """question(): one round trip, within the budget. Once the manager has not answered, or
        the budget has no room for another CALL_TIMEOUT, nothing more is asked."""
        if self._gave_up is None and self._spent + self._call_timeout > self._budget:
            self._gave_up = (f"stopped asking the {self.bus} manager before {what}: {self._spent:.1f} s of "
                             f"bindguard's {self._budget:g} s for D-Bus are spent")
        if self._gave_up is not None:
            raise SystemdUnavailable(self._gave_up)
        started = time.monotonic()
        try:
            return question()
        except Exception as exc:
            error = self._failed(exc, what)
            if isinstance(error, SystemdUnavailable):
                self._gave_up = str(error)
            raise error from None
        finally:
            self._spent += time.monotonic() - started

    def _call(self, path: bytes, interface: bytes, method: bytes, signature: bytes = b"", args: Iterable = (),
              destination: bytes = _DEST):
        apply_signature = _dbuslib().apply_signature

        def question():
            call_args = apply_signature(signature, list(args)) if signature else None
            return self._dbus.call_method(destination, path, interface, method, call_args).body

        return self._ask(method.decode(), question)

    def _get(self, path: bytes, interface: bytes, name: bytes, signature: bytes):
        return self._ask(f"{interface.decode()}.{name.decode()}",
                         lambda: self._dbus.get_property(_DEST, path, interface, name, signature))

    # --- the manager ---------------------------------------------------------------------

    def manager_pid(self) -> int:
        """The manager's PID: the bus owner of org.freedesktop.systemd1 (1 for the system manager)."""
        return int(self._call(b"/org/freedesktop/DBus", b"org.freedesktop.DBus", b"GetConnectionUnixProcessID",
                              b"s", [_DEST], destination=b"org.freedesktop.DBus"))

    def reload(self) -> None:
        """daemon-reload: re-read every unit file and drop-in (Manager.Reload, waits for it)."""
        self._call(_MANAGER_PATH, _MANAGER, b"Reload")

    # --- units ---------------------------------------------------------------------------

    def unit_of_pid(self, pid: int) -> str | None:
        """The unit a process belongs to (GetUnitByPID), or None when it is in none."""
        try:
            path = self._call(_MANAGER_PATH, _MANAGER, b"GetUnitByPID", b"u", [pid])
        except SystemdRefused:
            return None  # org.freedesktop.systemd1.NoUnitForPID, or no such process
        return _text(_dbuslib().path_decode(path, _UNIT_PATH_PREFIX))

    def _load(self, name: str) -> bytes:
        """A unit's object path, the manager loading the unit if it has not (Manager.LoadUnit)."""
        return self._call(_MANAGER_PATH, _MANAGER, b"LoadUnit", b"s", [name.encode()])

    def active_state(self, name: str) -> str:
        """A unit's ActiveState alone: one LoadUnit and one Get, where unit() reads ~20 properties."""
        path = self._load(name)
        return _text(self._get(path, _UNIT, b"ActiveState", b"s"))

    def unit(self, name: str, file_state: bool = False) -> UnitInfo:
        """A unit's state and settings (loading it if needed). Raises UnitNotFound for an unknown name.

        One LoadUnit, then one Get per property: cheaper than GetAll, which marshals the
        service interface's ~250 properties (measured: 0.06-0.2 ms per Get, 2 ms per GetAll).
        UnitFileState is read only with file_state=True: the manager looks for the unit's
        install symlinks to answer it, 1.5 ms with 360 unit files.
        """
        return self._unit_at(self._load(name), name, file_state)

    def _unit_at(self, path: bytes, name: str, file_state: bool = False) -> UnitInfo:
        load_state = _text(self._get(path, _UNIT, b"LoadState", b"s"))
        if load_state == "not-found":
            raise UnitNotFound(name, self.bus)
        unit = {key: self._get(path, _UNIT, prop, sig) for key, prop, sig in _UNIT_PROPERTIES}
        info: dict = dict(
            name=_text(unit["name"]),
            load_state=load_state,
            active_state=_text(unit["active_state"]),
            sub_state=_text(unit["sub_state"]),
            unit_file_state=_text(self._get(path, _UNIT, b"UnitFileState", b"s")) if file_state else "",
            control_group="",
            invocation_id=bytes(unit["invocation_id"] or b"").hex(),
            triggered_by=tuple(_text(t) for t in unit["triggered_by"] or ()),
            inactive_exit_usec=int(unit["inactive_exit_usec"]),
        )
        kind = info["name"].rsplit(".", 1)[-1]
        if kind == "service":
            s = {key: self._get(path, _SERVICE, prop, sig) for key, prop, sig in _SERVICE_PROPERTIES}
            info.update(
                control_group=_text(s["control_group"]),
                main_pid=int(s["main_pid"]),
                timeout_start_usec=int(s["timeout_start_usec"]),
                kill_mode=_text(s["kill_mode"]),
                n_restarts=int(s["n_restarts"]),
                result=_text(s["result"]),
                exec_main_status=int(s["exec_main_status"]),
                exec_start=_exec_commands(s["exec_start"]),
                exec_start_pre=_exec_commands(s["exec_start_pre"]),
                environment=tuple(_text(e) for e in s["environment"] or ()),
                environment_files=tuple((_text(p), bool(m)) for p, m in s["environment_files"] or ()),
                user=_text(s["user"]),
            )
        elif kind in ("socket", "scope", "mount", "swap", "slice"):
            iface = b"org.freedesktop.systemd1." + kind.capitalize().encode()
            info["control_group"] = _text(self._get(path, iface, b"ControlGroup", b"s"))
            if kind == "socket":  # TimeoutSec= bounds a socket unit's ExecStartPre= as TimeoutStartSec= a service's
                info["timeout_start_usec"] = int(self._get(path, _SOCKET, b"TimeoutUSec", b"t"))
        return UnitInfo(**info)

    def socket_units(self, ports: Iterable[int] | None = None, include_unloaded: bool = True) -> list[SocketUnit]:
        """The .socket units with TCP/UDP addresses: loaded ones, and (include_unloaded) enabled
        ones the manager has not loaded, which will listen after the next boot or daemon-reload.

        Cost: one ListUnitsByPatterns, one Listen read per loaded socket unit, four more reads
        per network one. include_unloaded adds one UnitPath read, a scan of the `*.wants/` and
        `*.requires/` directories in it, and a LoadUnit per enabled socket unit not loaded yet:
        about 1 ms, where ListUnitFilesByPatterns, which reads every unit file, costs 40 ms on
        360 unit files. With `ports`, units on none of these ports are left out before their
        details are read.
        """
        wanted = set(ports) if ports is not None else None
        loaded = self._call(_MANAGER_PATH, _MANAGER, b"ListUnitsByPatterns", b"asas", [[], [b"*.socket"]])
        candidates: dict[str, tuple[bytes, str, str, str]] = {}
        for name, _desc, load, active, _sub, _following, path, *_job in loaded or ():
            candidates[_text(name)] = (path, _text(load), _text(active), "")
        if include_unloaded:
            unit_path = [_text(d) for d in self._get(_MANAGER_PATH, _MANAGER, b"UnitPath", b"as") or ()]
            for name, state in enabled_socket_units(unit_path).items():
                if name not in candidates:
                    path = self._load(name)
                    candidates[name] = (path, "", "", state)

        result = []
        for name, (path, load, active, file_state) in sorted(candidates.items()):
            listens = self._network_listens(path)
            if not listens:
                continue
            if wanted is not None and not any(_port_of(entry.address) in wanted for entry in listens):
                continue
            bind_ipv6_only, reuse_port = self._bind_options(path)
            result.append(SocketUnit(
                name=name,
                load_state=load or _text(self._get(path, _UNIT, b"LoadState", b"s")),
                active_state=active or _text(self._get(path, _UNIT, b"ActiveState", b"s")),
                unit_file_state=file_state or _text(self._get(path, _UNIT, b"UnitFileState", b"s")),
                listens=listens,
                bind_ipv6_only=bind_ipv6_only,
                reuse_port=reuse_port,
                triggers=tuple(_text(t) for t in self._get(path, _UNIT, b"Triggers", b"as") or ()),
            ))
        return result

    def _network_listens(self, path: bytes) -> tuple[Listen, ...]:
        """A socket unit's Listen entries on TCP/UDP addresses (AF_UNIX, netlink, FIFOs, ... left out)."""
        return tuple(Listen(_text(kind), _text(address))
                     for kind, address in self._get(path, _SOCKET, b"Listen", b"a(ss)") or ()
                     if is_network_listen(_text(kind), _text(address)))

    def _bind_options(self, path: bytes) -> tuple[str, bool]:
        """A socket unit's BindIPv6Only= (default, both, ipv6-only) and ReusePort=: how its [::]
        entries bind, and whether they share their port."""
        bind_ipv6_only = _text(self._get(path, _SOCKET, b"BindIPv6Only", b"s"))
        return bind_ipv6_only, bool(self._get(path, _SOCKET, b"ReusePort", b"b"))

    def list_units(self, pattern: str) -> list[tuple[str, str, str]]:
        """(name, load state, active state) of each unit the manager has loaded whose name matches the glob."""
        units = self._call(_MANAGER_PATH, _MANAGER, b"ListUnitsByPatterns", b"asas", [[], [pattern.encode()]])
        return sorted((_text(name), _text(load), _text(active)) for name, _d, load, active, *_rest in units or ())

    def socket_listens(self, name: str) -> list[tuple[str, str, str, str, bool]]:
        """The network entries of one .socket unit's Listen property, as discovery takes them:
        (type, address, the unit's name, its BindIPv6Only=, its ReusePort=)."""
        path = self._load(name)
        listens = self._network_listens(path)
        if not listens:
            return []
        bind_ipv6_only, reuse_port = self._bind_options(path)
        return [(entry.type, entry.address, name, bind_ipv6_only, reuse_port) for entry in listens]

    def socket_unit_settings(self, name: str):
        """A .socket unit's own Listen entries and the settings that change the kernel's answer to
        its bind() (bindguard.model.facts.SocketUnitSettings). Raises UnitNotFound for an unknown name."""
        from bindguard.model.facts import SocketUnitSettings

        path = self._load(name)
        if _text(self._get(path, _UNIT, b"LoadState", b"s")) == "not-found":
            raise UnitNotFound(name, self.bus)
        listens = tuple((_text(kind), _text(address))
                        for kind, address in self._get(path, _SOCKET, b"Listen", b"a(ss)") or ())
        if not any(is_network_listen("Stream", address) for _, address in listens):
            return SocketUnitSettings(listens)
        protocol = int(self._get(path, _SOCKET, b"SocketProtocol", b"i"))
        bind_ipv6_only, reuse_port = self._bind_options(path)
        return SocketUnitSettings(
            listens=listens,
            reuse_port=reuse_port,
            bind_ipv6_only=bind_ipv6_only,
            free_bind=bool(self._get(path, _SOCKET, b"FreeBind", b"b")),
            transparent=bool(self._get(path, _SOCKET, b"Transparent", b"b")),
            bind_to_device=_text(self._get(path, _SOCKET, b"BindToDevice", b"s")),
            protocol={132: "sctp", 136: "udplite"}.get(protocol, ""),
        )

    def unit_facts(self, name: str, info: UnitInfo | None = None):
        """A service's settings as discovery takes them (bindguard.model.facts.UnitFacts)."""
        from bindguard.model.facts import UnitFacts

        path = self._load(name)
        info = info or self._unit_at(path, name)
        return UnitFacts(
            # the program run, then its arguments: argv[0] is another name under ExecStart=@
            exec_start=[[command.path, *command.argv[1:]] for command in info.exec_start if command.path],
            environment=list(info.environment),
            environment_files=[("-" if optional else "") + file for file, optional in info.environment_files],
            socket_listens=[entry for socket_unit in info.sockets for entry in self.socket_listens(socket_unit)],
            user=info.user,
            group=_text(self._get(path, _SERVICE, b"Group", b"s")) if info.user else "",  # else it runs as root
        )


def _port_of(address: str) -> int | None:
    try:
        return parse_listen(address).port
    except AddressError:
        return None
