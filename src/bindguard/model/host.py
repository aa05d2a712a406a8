"""Facts about this network namespace that change how an address is read. posix alone (the clear
path's, which does not import os: see bindguard.environment)."""

import posix


def ipv6_supported() -> bool:
    try:
        posix.stat("/proc/net/if_inet6")
    except OSError:
        return False
    return True


def host_bindv6only() -> bool:
    """The namespace's default for IPV6_V6ONLY on new sockets (net.ipv6.bindv6only)."""
    try:
        with open("/proc/sys/net/ipv6/bindv6only") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def unprivileged_port_start() -> int:
    """net.ipv4.ip_unprivileged_port_start: ports below it need CAP_NET_BIND_SERVICE (1024 when
    unreadable, the kernel's default)."""
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 1024
