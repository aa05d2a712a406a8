"""The vocabulary and the records every stage speaks: the base of most records, with what
dataclasses gave and not what they cost (record; a NAT rule, scan's host map and the records of
scan, verify and install are dataclasses), addresses (endpoints), the evidence's records
(facts), scan's host map (hostmap), every kind, action, status, source and confidence as a
StrEnum (kinds), errors and the exit codes with their help lines (errors), a report's notes with
their priority (notes), untrusted text made one safe line (text), and the namespace's settings
that decide how an address is read (host: net.ipv6.bindv6only, whether IPv6 exists,
ip_unprivileged_port_start; each one read of /proc/sys, the only I/O here). Imports nothing from
bindguard but bindguard itself.
"""
