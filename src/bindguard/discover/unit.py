"""A unit's facts for discovery, read from systemd over D-Bus (bindguard.systemd)."""

from __future__ import annotations

from bindguard.discover import UnitFacts, UnitFactsSource


def unit_facts_from(systemd) -> UnitFactsSource:
    """A UnitFactsSource on an open bindguard.systemd.Systemd connection.

    ExecStart= argv come as the manager stores them (specifiers resolved, $VARIABLES not yet);
    socket listens are those of the .socket units that trigger the unit, with their
    BindIPv6Only= and ReusePort=.
    """

    def read(unit: str) -> UnitFacts:
        info = systemd.unit(unit)
        listens: list[tuple[str, ...]] = []
        if info.sockets:
            for socket_unit in systemd.socket_units(include_unloaded=False):
                if socket_unit.name in info.sockets:
                    listens += [(entry.type, entry.address, socket_unit.name, socket_unit.bind_ipv6_only,
                                 socket_unit.reuse_port) for entry in socket_unit.listens]
        return UnitFacts(
            exec_start=[list(command.argv) for command in info.exec_start],
            environment=list(info.environment),
            environment_files=[("-" if optional else "") + path for path, optional in info.environment_files],
            socket_listens=listens,
        )

    return read
