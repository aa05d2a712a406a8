"""One module per subcommand: each has DESCRIPTION, add_arguments(parser) and run(args) -> exit code.

parser.py imports only the module of the subcommand being run, so `check` pays for nothing else.
"""

# subcommand: (its module in this package, the one line `bindguard --help` shows)
COMMANDS = {
    "check": ("check", "will the daemon's bind() succeed? pass, wait, or refuse (ExecStartPre=)"),
    "explain": ("explain", "what is on these addresses, who holds them, and how to fix it"),
    "config": ("config", "validate YAML configuration files; show a unit's merged configuration"),
    "discover": ("discover", "what a unit will bind, from its daemon's configuration and its unit"),
    "install": ("install", "add the guard to a unit as a drop-in (ExecStartPre=), then daemon-reload"),
    "uninstall": ("uninstall", "remove the drop-in `bindguard install` wrote"),
    "scan": ("scan", "every listener, socket unit and declared address on this host; what needs attention"),
    "verify": ("verify", "after the start: the unit's own processes listen where intended (ExecStartPost=)"),
}
