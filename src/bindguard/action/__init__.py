"""What the guard does: the probe, wait and refuse loop (guard), ending a proven stale instance
(reap), writing and removing drop-ins (install), the host-wide scan (scan: the map gathered by
evidence.hostmap, judged by verdict.scan), and verify's wait for the daemon's listeners (verify).
Writes nothing to the console itself: a caller passes what it logs with. Imports every stage below
it (model, systemd, request, evidence, verdict), never bindguard.report or bindguard.cli.
"""
