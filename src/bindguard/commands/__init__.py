"""One module per subcommand: each has HELP, add_arguments(parser) and run(args) -> exit code.

cli.py imports only the module of the subcommand being run, so `check` pays for nothing else.
"""

COMMANDS = {
    "check": ("bindguard.commands.check", "will the daemon's bind() succeed? pass, wait, or refuse (ExecStartPre=)"),
    "explain": ("bindguard.commands.explain", "what is on these addresses, who holds them, and how to fix it"),
    "install": ("bindguard.commands.install", "add the guard to a unit as a drop-in (ExecStartPre=), then daemon-reload"),
    "uninstall": ("bindguard.commands.uninstall", "remove the drop-in `bindguard install` wrote"),
}
