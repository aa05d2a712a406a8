"""`bindguard config check|show`: validate configuration files, show a unit's merged configuration."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from bindguard.cli.parser import add_json_option
from bindguard.model.errors import ConfigError, ExitCode, UsageError
from bindguard.model.kinds import POLICY_KINDS, ordered_sources
from bindguard.model.text import escape
from bindguard.report import output
from bindguard.report.jsonout import write_json
from bindguard.request import config
from bindguard.systemd.unitfiles import normalize_unit
from bindguard.verdict.policy import stated_default

DESCRIPTION = """\
Validate bindguard's YAML configuration files, or show a unit's merged configuration.

  bindguard config check                 every file in the search path
  bindguard config check FILE            one file
  bindguard config check UNIT            the files of one unit (UNIT.yaml and its drop-ins)
  bindguard config show UNIT             the merged settings and the file:line that set each one

`config show` prints YAML that a bindguard file for the unit could hold, each value's origin
(file:line:column, or the default that applies) as a comment; --json gives the same as one
object: "settings" in the file's keys, "origins" by key (options.reuseport, listen.0, ...).

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
    add_json_option(show, "print the settings and their origins as one JSON object on stdout")


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


TOP_LEVEL_SCALARS = ("fail", "reap_stale", "discovery", "trust_guesses", "nat")
NOT_SET = {"listen": "not set: the LISTEN arguments or discovery give the addresses",
           "wait": "not set: check's --wait applies"}


def _settings(loaded: config.UnitConfig) -> tuple[dict, dict[str, str]]:
    """The merged settings in the file's own keys (a setting no file makes is None, or its
    default), and where each came from: "file:line:column", or what default applies."""
    origins: dict[str, str] = {}

    def origin(key: str, default: str = "default") -> str:
        found = loaded.origins.get(key)
        origins[key] = str(found) if found else default
        return origins[key]

    listen = None
    if loaded.listen is not None:
        origin("listen")
        listen = []
        for i, entry in enumerate(loaded.listen):
            origins[f"listen.{i}"] = str(entry.origin)
            listen.append({"address": str(entry.endpoint), **entry.options,
                           **({"optional": entry.optional} if entry.optional else {})})
    else:
        origins["listen"] = NOT_SET["listen"]
    defaults = {"reuseaddr": True, "reuseport": False, "v6only": config.host_bindv6only(), "freebind": False}
    options = {}
    for name in config.OPTION_NAMES:
        options[name] = loaded.options.get(name, defaults[name])
        origin(f"options.{name}", "default (net.ipv6.bindv6only)" if name == "v6only" else "default")
    if loaded.wait is None:
        origins["wait"] = NOT_SET["wait"]
    else:
        origin("wait")
    policy = {}
    for kind in POLICY_KINDS:
        action, otherwise = stated_default(kind)
        policy[kind] = loaded.policy.get(kind) or action
        origin(f"policy.{kind}", f"default ({otherwise})" if otherwise else "default")
    sources = loaded.discovery_sources
    settings = {
        "listen": listen, "options": options, "wait": loaded.wait, "policy": policy,
        "fail": loaded.fail or "open", "reap_stale": bool(loaded.reap_stale),
        "discovery": ordered_sources(sources) if sources else False,
        "trust_guesses": bool(loaded.trust_guesses), "nat": loaded.nat or "off",
    }
    for key in TOP_LEVEL_SCALARS:
        origin(key)
    return settings, origins


_PLAIN_YAML = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "nan", "inf"}


def _yaml(value) -> str:
    """One value in YAML's flow style; text that YAML could read as anything but itself quoted
    (as JSON, whose strings YAML reads), so the output loads as the file would."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, float):  # YAML 1.1 reads 1e-05 as text: a float needs its point
        return repr(value) if "e" not in repr(value) else f"{value:.20f}".rstrip("0")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(_yaml, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_yaml(item)}" for key, item in value.items()) + "}"
    text = str(value)
    if _PLAIN_YAML.fullmatch(text) and text.lower() not in _YAML_WORDS:
        return text
    return json.dumps(text)


def _comment(text: str) -> str:
    return "# " + escape(text)


def _show_yaml(unit: str, loaded: config.UnitConfig | None, settings: dict, origins: dict[str, str]) -> None:
    """The settings as a bindguard file for the unit would write them, each line's origin as a comment."""
    if loaded is None:
        print(_comment(f"{unit}: no configuration file in {', '.join(config.search_path())}; built-in defaults apply"))
    else:
        print(_comment(f"{unit}: " + ", ".join(loaded.files)))
    rows: list[tuple[str, str]] = []
    if settings["listen"] is None:
        rows.append(("", f"listen: {origins['listen']}"))
    else:
        rows.append(("listen:" + (" []" if not settings["listen"] else ""), origins["listen"]))
        for i, entry in enumerate(settings["listen"]):
            shown = _yaml(entry["address"]) if list(entry) == ["address"] else _yaml(entry)
            rows.append((f"  - {shown}", origins[f"listen.{i}"]))
    rows.append(("options:", ""))
    for name, value in settings["options"].items():
        rows.append((f"  {name}: {_yaml(value)}", origins[f"options.{name}"]))
    if settings["wait"] is None:
        rows.append(("", f"wait: {origins['wait']}"))
    else:
        rows.append((f"wait: {_yaml(settings['wait'])}", origins["wait"]))
    rows.append(("policy:", ""))
    for kind, action in settings["policy"].items():
        rows.append((f"  {kind}: {_yaml(action)}", origins[f"policy.{kind}"]))
    for key in TOP_LEVEL_SCALARS:
        rows.append((f"{key}: {_yaml(settings[key])}", origins[key]))
    width = max(len(text) for text, _ in rows) + 2
    for text, where in rows:
        if not text:
            print(_comment(where))
        else:
            print(f"{text:<{width}}{_comment(where)}" if where else text)


def _show(unit: str, explicit: str | None, json_mode: str | None) -> int:
    unit = normalize_unit(unit)
    loaded = config.load_unit_config(unit, explicit)
    settings, origins = _settings(loaded or config.UnitConfig(unit=unit))
    if json_mode:
        write_json({"unit": unit, "files": loaded.files if loaded else [], "settings": settings,
                    "origins": origins}, json_mode)
    else:
        _show_yaml(unit, loaded, settings, origins)
    return ExitCode.CLEAR


def run(args: argparse.Namespace, console: output.Console) -> int:
    try:
        if args.action == "check":
            return _check(args.target, console)
        return _show(args.unit, args.config, args.json)
    except ConfigError as exc:
        for problem in getattr(exc, "problems", None) or [exc.message]:
            console.emit(output.ERR, problem)
        return ExitCode.CONFIG
    finally:
        sys.stdout.flush()
