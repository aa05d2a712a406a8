"""`bindguard config check|show`: validate configuration files, show a unit's merged configuration."""

from __future__ import annotations

import argparse
import os
import sys

from bindguard.model.errors import ConfigError, ExitCode, UsageError
from bindguard.model.kinds import POLICY_KINDS
from bindguard.report import output
from bindguard.request import config
from bindguard.systemd.unitfiles import normalize_unit
from bindguard.verdict.policy import stated_default

DESCRIPTION = """\
Validate bindguard's YAML configuration files, or show a unit's merged configuration.

  bindguard config check                 every file in the search path
  bindguard config check FILE            one file
  bindguard config check UNIT            the files of one unit (UNIT.yaml and its drop-ins)
  bindguard config show UNIT             the merged settings and the file:line that set each one

Files are looked up in /etc/bindguard, /run/bindguard, /usr/lib/bindguard (in that order of
precedence; $BINDGUARD_CONFIG_PATH replaces the list). Nothing is probed."""
EXIT_CODES: dict[ExitCode, str | None] = {
    ExitCode.CLEAR: "valid",
    ExitCode.USAGE: "no such file, or not a unit name",
    ExitCode.CONFIG: "a file has problems (each printed as file:line:column: message)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", parser_class=type(parser))
    actions.required = True
    check = actions.add_parser("check", help="validate files without probing anything")
    check.add_argument("target", nargs="?", metavar="FILE|UNIT", help="a file, or a unit name; default: all files")
    show = actions.add_parser("show", help="the merged configuration of a unit, and where each value came from")
    show.add_argument("unit", metavar="UNIT")
    show.add_argument("--config", metavar="FILE", help="show this one file instead of the unit's files")


def _all_files() -> list[str]:
    """Every file in the search path: whatever is named *.yaml is checked (a FIFO or a dangling
    link is a problem there), except links to /dev/null, which mask."""
    files = []
    for directory in config.search_path():
        try:
            entries = sorted(os.listdir(directory))
        except OSError:
            continue
        for entry in entries:
            path = os.path.join(directory, entry)
            if entry.endswith(".yaml"):
                files.append(path)
            elif entry.endswith(".yaml.d") and os.path.isdir(path):
                try:
                    files += [os.path.join(path, e) for e in sorted(os.listdir(path)) if e.endswith(".yaml")]
                except OSError:
                    continue
    return [f for f in files if not config.masks_with_nothing(f)]


def _check(target: str | None, console: output.Console) -> int:
    if target is None:
        files = _all_files()
        what = "in " + ", ".join(config.search_path())
    elif os.sep in target or target.endswith(".yaml") or os.path.lexists(target):
        if not os.path.lexists(target):
            raise UsageError(f"{target}: no such file", "name an existing file, or a unit such as nginx.service")
        if config.masks_with_nothing(target):
            print(f"{target}: a link to /dev/null: masks the same name in the directories below")
            return ExitCode.CLEAR
        files = [target]
        what = target
    else:
        unit = normalize_unit(target)
        files = config.config_files(unit)
        what = f"for {unit}"
    problems = [p for path in files for p in config.validate_file(path)]
    for problem in problems:
        console.emit(output.ERR, problem)
    if problems:
        return ExitCode.CONFIG
    if not files:
        print(f"no configuration files {what}")
    for path in files:
        print(f"{path}: ok")
    return ExitCode.CLEAR


def _value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _show(unit: str, explicit: str | None) -> int:
    unit = normalize_unit(unit)
    loaded = config.load_unit_config(unit, explicit)
    if loaded is None:
        print(f"# {unit}: no configuration file in {', '.join(config.search_path())}; built-in defaults apply")
        loaded = config.UnitConfig(unit=unit)
    else:
        print(f"# {unit}: " + ", ".join(loaded.files))
    rows: list[tuple[str, str]] = []

    def row(text: str, key: str, default: str = "default") -> None:
        origin = loaded.origins.get(key)
        rows.append((text, str(origin) if origin else default))

    if loaded.listen is None:
        row("listen: (not set: from the LISTEN arguments or discovery)", "listen")
    else:
        row("listen:" + (" []" if not loaded.listen else ""), "listen")
        for entry in loaded.listen:
            extra = "".join(f" {k}={_value(v)}" for k, v in entry.options.items())
            extra += f" optional={_value(entry.optional)}" if entry.optional else ""
            rows.append((f"  - {entry.endpoint}{extra}", str(entry.origin)))
    rows.append(("options:", ""))
    bindv6only = config.host_bindv6only()
    defaults = {"reuseaddr": True, "reuseport": False, "v6only": bindv6only, "freebind": False}
    for name in config.OPTION_NAMES:
        value = loaded.options.get(name, defaults[name])
        row(f"  {name}: {_value(value)}", f"options.{name}",
            "default (net.ipv6.bindv6only)" if name == "v6only" else "default")
    row(f"wait: {_value(loaded.wait) if loaded.wait is not None else 'the command line --wait'}", "wait",
        "default")
    rows.append(("policy:", ""))
    for kind in POLICY_KINDS:
        row(f"  {kind}: {loaded.policy.get(kind) or stated_default(kind)}", f"policy.{kind}")
    row(f"fail: {loaded.fail or 'open'}", "fail")
    row(f"reap_stale: {_value(bool(loaded.reap_stale))}", "reap_stale")
    sources = loaded.discovery_sources
    listed = ", ".join(s for s in config.DISCOVERY_SOURCES if s in sources)
    row(f"discovery: {f'[{listed}]' if sources else 'false'}", "discovery")
    row(f"trust_guesses: {_value(bool(loaded.trust_guesses))}", "trust_guesses")
    row(f"nat: {loaded.nat or 'off'}", "nat")
    width = max(len(text) for text, _ in rows) + 2
    for text, where in rows:
        print(f"{text:<{width}}# {where}" if where else text)
    return ExitCode.CLEAR


def run(args: argparse.Namespace, console: output.Console) -> int:
    try:
        if args.action == "check":
            return _check(args.target, console)
        return _show(args.unit, args.config)
    except ConfigError as exc:
        for problem in getattr(exc, "problems", None) or [exc.message]:
            console.emit(output.ERR, problem)
        return ExitCode.CONFIG
    finally:
        sys.stdout.flush()
