"""What to check: a unit's YAML configuration (config, read through the bounded reader in files)
and what a unit will bind, discovered from its daemon's own configuration and its unit (discover,
one module per daemon), and the plan that puts the command line's request (plan.RequestOptions),
the file and discovery together. Imports only bindguard.model and bindguard.systemd.
"""
