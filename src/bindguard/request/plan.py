"""The plan: what to check and how, from the command line's request, the unit's YAML file and
discovery (check and verify plan alike; install asks discovery the same way).

The command line reaches this stage as a RequestOptions, a frozen record the CLI builds from its
parser: nothing here reads argparse. Warnings (a unit that cannot be read, discovery's doubts) go
to the `warn` given, the console's in the CLI.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from bindguard.model.endpoints import AddressError, Bind, SocketOptions, parse_listen
from bindguard.model.errors import UsageError
from bindguard.model.host import host_bindv6only
from bindguard.model.kinds import ANY_KIND, DISCOVERY_SOURCES, ConflictKind, ordered_sources
from bindguard.model.record import Record, field, replace
from bindguard.systemd.unitfiles import user_manager

Warn = Callable[[str], None]

# The conflict kinds that only warn on an optional address: any (--optional, `optional: true`),
# or only that no interface has it (--if-available, `optional: if-available`).
OPTIONAL = (ANY_KIND,)
IF_AVAILABLE = (ConflictKind.ADDRESS_UNAVAILABLE,)


class RequestOptions(Record, frozen=True):
    """What the command line asks to check, as the CLI read it."""

    listen: tuple[str, ...] = ()  # LISTEN
    # --optional and --if-available: (address, the conflict kinds that only warn on it)
    optional: tuple[tuple[str, tuple[str, ...]], ...] = ()
    socket_options: Mapping[str, bool] = field(default_factory=dict)  # only those given: they win over a file's
    unit: str | None = None  # normalised: --unit, else the unit the guard runs in when nothing else is named
    config: str | None = None  # --config FILE, instead of the unit's files
    user_bus: bool | None = None  # --user / --system / neither

    @property
    def addresses_given(self) -> bool:
        return bool(self.listen or self.optional)


class Plan(Record, frozen=True):
    """What to check and how, from the command line, the unit's YAML file and discovery."""

    binds: list[Bind]
    guesses: frozenset[Bind] = frozenset()
    survivable: Mapping[Bind, tuple[str, ...]] = field(default_factory=dict)  # conflict kinds the daemon survives
    policy: Mapping[str, str] = field(default_factory=dict)
    wait: float | None = None
    reap_stale: bool = False
    nat: str | None = None  # the file's `nat:` (warn, refuse); None: NAT rules are not read
    sources: tuple[str, ...] = ()  # where discovered addresses came from


def build_binds(options: RequestOptions, base: Mapping[str, bool] | None = None) -> list[Bind]:
    """The command line's addresses: LISTEN, then each optional one."""
    texts = [*options.listen, *(text for text, _ in options.optional)]
    if not texts:
        raise UsageError("no address to check", "give at least one LISTEN address, e.g. `bindguard check 8080`")
    merged = {"reuseaddr": True, "reuseport": False, "v6only": host_bindv6only(), "freebind": False}
    merged |= {**(base or {}), **options.socket_options}
    v6only = merged["v6only"]
    socket_options = SocketOptions(**merged)
    binds = []
    for text in texts:
        try:
            endpoint = parse_listen(text)
        except AddressError as exc:
            raise UsageError(str(exc), "see `bindguard check --help` for the address syntax") from None
        if endpoint.host.version == 6 and endpoint.host.ipv4_mapped is not None and v6only:
            raise UsageError(f"{text!r}: a v4-mapped address cannot be bound on a v6only socket",
                             f"write it as IPv4 ({endpoint.host.ipv4_mapped}:{endpoint.port}) or drop --v6only")
        binds.append(Bind(endpoint, socket_options))
    return binds


def plan(options: RequestOptions, ctx, warn: Warn) -> Plan | None:
    """None when a unit has nothing to guard: no address given, no file, nothing discovered.

    That is the path of the every-service drop-in, so it costs a few stat() calls: no YAML parser
    unless a file exists, and D-Bus only for units that bindguard can discover something about.
    """
    from bindguard.request import config

    unit = options.unit
    unit_config = config.load_unit_config(unit, options.config) if unit or options.config else None
    base = dict(unit_config.options) if unit_config else {}
    settings = Plan(  # the file's settings, whatever the addresses come from
        [],
        policy=dict(unit_config.policy) if unit_config else {},
        wait=unit_config.wait if unit_config else None,
        reap_stale=bool(unit_config and unit_config.reap_stale),
        nat=unit_config.nat if unit_config and unit_config.nat != "off" else None,
    )
    if options.addresses_given:
        binds = build_binds(options, base)
        optional = binds[len(options.listen):]
        for twice in (b for b in optional if binds.count(b) > 1):
            raise UsageError(f"{twice} is given twice",
                             "give each address once: as LISTEN, --optional or --if-available")
        kinds = [kinds for _, kinds in options.optional]
        return replace(settings, binds=binds, survivable=dict(zip(optional, kinds, strict=True)))
    if unit_config is not None and unit_config.listen is not None:
        binds = [Bind(b.endpoint, replace(b.options, **options.socket_options)) for b in unit_config.binds()]
        survivable: dict[Bind, tuple[str, ...]] = {
            b: IF_AVAILABLE if entry.optional == config.IF_AVAILABLE else OPTIONAL
            for b, entry in zip(binds, unit_config.listen, strict=True) if entry.optional}
        return replace(settings, binds=binds, survivable=survivable)
    if unit is None:
        raise UsageError("no address to check", "give LISTEN addresses, --unit NAME or --config FILE")
    if unit.endswith(".socket"):
        return socket_unit_plan(unit, settings, options, ctx, warn)
    findings = discovered(unit, options.user_bus, unit_config, ctx, warn)
    if not findings:
        return None
    overrides = base | dict(options.socket_options)  # the file's options, then the command line's, over discovery's
    binds = [Bind(f.bind.endpoint, replace(f.bind.options, **overrides)) for f in findings]
    trusted = bool(unit_config and unit_config.trust_guesses)
    guesses = frozenset() if trusted else frozenset(b for b, f in zip(binds, findings, strict=True) if not f.confident)
    survivable = {b: f.survives for b, f in zip(binds, findings, strict=True) if f.survives}
    sources = tuple(f"{f.bind} from {f.source}" + ("" if f.confident else " (a guess)") for f in findings)
    return replace(settings, binds=binds, guesses=guesses, survivable=survivable, sources=sources)


def socket_unit_plan(unit: str, settings: Plan, options: RequestOptions, ctx, warn: Warn) -> Plan | None:
    """A .socket unit's own IP sockets, as its manager will bind them after its ExecStartPre=
    (bindguard.request.socketunit); None when it has none, or they cannot be read (a warning)."""
    from bindguard.request import socketunit

    found, why = socketunit.settings_of(unit, user_manager(options.user_bus), ctx)
    if found is None:
        warn(f"cannot read what {unit} listens on: {why}; nothing checked")
        return None
    request = socketunit.binds_of(unit, found, dict(options.socket_options))
    for warning in request.warnings:
        warn(warning)
    if not request.binds:
        return None
    return replace(settings, binds=request.binds, sources=tuple(request.sources))


def discovered(unit: str, bus_choice: bool | None, unit_config, ctx, warn: Warn,
               unavailable: str = "nothing checked") -> list:
    """The addresses the unit's daemon itself binds, as discovery finds them (not its socket units'),
    for a unit of the manager unitfiles.user_manager(bus_choice) names (a context's bus_choice is
    the same: SystemdContext.user_bus).

    The unit's command line is read from its unit files (no D-Bus), whatever the unit is called;
    systemd is asked over D-Bus only for a unit not on disk that has a YAML file or a known
    daemon's name. Guesses count only for a unit with a YAML file.
    """
    from bindguard.request import cache, discover

    sources = unit_config.discovery_sources if unit_config is not None else DISCOVERY_SOURCES
    if not sources:
        return []
    result = cache.discover_from_files(unit, user_manager(bus_choice), ordered_sources(sources))
    if result is None:  # no ExecStart= in its unit files
        if unit_config is None and discover.daemon_for_unit_name(unit) is None:
            return []
        if ctx is None:
            warn(f"cannot discover what {unit} binds: no unit file of that name, and --no-systemd; nothing checked")
            return []
        from bindguard.systemd.bus import SystemdError

        try:
            result = discover.discover_unit(unit, ctx.unit_facts, list(sources))
        except SystemdError as exc:
            warn(f"cannot discover what {unit} binds: {exc}; {unavailable}")
            return []
    for warning in result.warnings:
        warn(warning)
    return [f for f in result.findings if f.socket_unit is None and (f.confident or unit_config is not None)]
