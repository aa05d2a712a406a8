"""What systemd says about units: unit names and their normaliser (unitfiles), the unit search
path and a service's settings read from its files without D-Bus (unitexec, with posix alone, as
it runs on every start; unitfacts), the D-Bus client with one exception root, SystemdError (bus),
and the lazy per-run context that asks only when a question needs it (context). Imports only
bindguard.model.
"""
