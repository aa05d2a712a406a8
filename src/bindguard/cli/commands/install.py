"""bindguard install: add the guard to a unit as a drop-in, and reload the manager."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from bindguard import ROOT
from bindguard.action import install
from bindguard.cli.parser import add_json_option, build_parser
from bindguard.model.endpoints import AddressError, parse_listen
from bindguard.model.errors import ExitCode, UsageError
from bindguard.model.text import command_unit
from bindguard.report import output

DESCRIPTION = f"""\
Add `bindguard check` to a service's or socket unit's ExecStartPre= without editing its unit
file: write the drop-in UNIT.d/{install.DROPIN_NAME} (in /etc/systemd/system, or with --user in
$XDG_CONFIG_HOME/systemd/user, by default ~/.config/systemd/user), then daemon-reload.
LISTEN is each address the daemon binds, in ListenStream= syntax (8080, 0.0.0.0:80, [::]:443,
udp:[::1]:53). An existing {install.DROPIN_NAME} that bindguard did not write is never touched.

Without LISTEN, the guard reads the addresses at each start from the unit's bindguard file, else
from its daemon's configuration (nginx, Apache, HAProxy, sshd, Redis, PostgreSQL, MariaDB: see
`bindguard discover UNIT`), with the socket options and optional addresses found there; for a
socket unit, from its own ListenStream=/ListenDatagram= and socket options, before the manager
binds them; install refuses when none gives an address. With LISTEN, for a daemon discovery knows, what discovery
says about those addresses is written into the drop-in: --v6only/--reuseport/--freebind where
every matching address agrees (nginx's ipv6only=on), and --optional or --if-available for an
address the daemon starts without (sshd's, PostgreSQL's; Redis's `bind -::1`). --check-args
wins over both. A bare port (80) is the whole port, dual-stack, and takes nothing from discovery;
an address the daemon binds that LISTEN leaves out is named in a warning.

The drop-in runs `ExecStartPre=+PROGRAM check --unit %n ...`, PROGRAM being {install.PACKAGED_PROGRAM}
where the Debian package installed it (also when install runs from a venv), else this run's own
launcher, with a warning: the unit cannot start once that launcher's venv or checkout is gone. The
launcher and its python3 must be beyond others' reach as --program must be, or install refuses.
{install.PRIVILEGE_NOTE}"""

EPILOG = """\
examples:
  bindguard install nginx.service                 # addresses and options from nginx's configuration
  bindguard install nginx.service 0.0.0.0:80 [::]:80 0.0.0.0:443 [::]:443 --check-args=--v6only
  bindguard install redis-server.service 127.0.0.1:6379 --if-available [::1]:6379
  bindguard install ssh.service 22 --check-args='--wait 10'
  bindguard install --user web.service 127.0.0.1:8080
  bindguard install ssh.socket                    # its own ListenStream=/ListenDatagram=, before they are bound
  bindguard install --print nginx.service         # show the drop-in, write nothing
  bindguard install --json --print ssh.service 22 # would install change the file? ("changed")"""
EXIT_CODES: dict[ExitCode, str | None] = {
    ExitCode.CLEAR: ("the drop-in is in place, whether written now or already there (--json's \"changed\" says "
                     "which; a failed daemon-reload is a warning: run it yourself)"),
    ExitCode.USAGE: ("a malformed address, unit name or check option; a control character in any of them; "
                     "no LISTEN and no address to be found; a --program root should not run, or without the "
                     "package, no launcher of this bindguard that it should"),
    ExitCode.CONFIG: ("cannot write: a file bindguard did not write is in the way, a UNIT.d that links out of "
                      "the unit directory, or no permission (--print --json refuses the first two as well)"),
}

OPTION_FLAGS = {"reuseaddr": ("--reuseaddr", "--no-reuseaddr"), "reuseport": ("--reuseport", None),
                "v6only": ("--v6only", "--no-v6only"), "freebind": ("--freebind", None)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("unit", metavar="UNIT",
                        help="the service or socket unit to guard (nginx means nginx.service)")
    parser.add_argument("listen", metavar="LISTEN", nargs="*",
                        help="an address the daemon binds; none: found at each start (see above)")
    parser.add_argument("--optional", metavar="LISTEN", action="append", default=[],
                        help="an address the daemon starts without, whatever keeps it from binding it: any "
                             "conflict on it only warns (check --optional); repeat for more")
    parser.add_argument("--if-available", metavar="LISTEN", action="append", default=[],
                        help="an address the daemon skips when no interface has it (Redis's `bind -::1`): "
                             "only that warns (check --if-available); repeat for more")
    parser.add_argument("--user", action="store_true", help="a unit of your user manager (systemctl --user)")
    parser.add_argument(
        "--check-args", metavar="OPTIONS",
        help="more `bindguard check` options for the drop-in, as one shell word: --check-args='--wait 10'",
    )
    parser.add_argument("--print", action="store_true", help="print the drop-in to stdout and write nothing")
    parser.add_argument("--program", metavar="PATH",
                        help=f"the bindguard the drop-in runs, an absolute path to an executable file named "
                             f"bindguard that only root (with --user, or you) can change, nor any directory above "
                             f"it, nor the python3 it runs (a console script's #! must run an absolute python with "
                             f"-I); the drop-in names it with the links above it resolved "
                             f"(default: {install.PACKAGED_PROGRAM} where the package installed it)")
    parser.add_argument("--no-reload", action="store_true",
                        help="write the drop-in but leave the daemon-reload to the caller, who reloads once for "
                             "many units (as systemctl --no-reload enable)")
    add_json_option(parser, 'print one JSON object on stdout: "unit", "path", "dropin" (its text) and "changed", '
                            "whether the file did not hold that text (install wrote it; with --print, would)")


def _program(given: str | None, user: bool, console: output.Console) -> list[str]:
    """The command the drop-in runs: --program, else what install.bindguard_command() chooses, with a
    warning when that is not the package's program. Root's alone; for a unit of your user manager
    (--user), which runs it as you, root's or yours."""
    owners = (ROOT, os.geteuid()) if user else (ROOT,)
    if given is not None:
        flaw: str | None
        if not os.path.isabs(given):
            named, flaw = given, "is not an absolute path"
        elif os.path.basename(given) != "bindguard":  # ExecStartPre=+/usr/bin/dash check ... runs no guard
            named, flaw = given, "is not named bindguard"
        else:
            named, flaw = install.launcher_flaw(given, owners)
        if flaw:
            raise UsageError(f"--program {given!r} {flaw}", "name bindguard's program, an executable that only root "
                             f"{'(or you) ' if user else ''}can change, nor any directory above it, "
                             f"e.g. {install.PACKAGED_PROGRAM}")
        return [named]
    command, flaw = install.bindguard_command(owners)
    if flaw:
        console.warning(f"the drop-in runs {shlex.join(command)}, outside the Debian package ({flaw}): the unit "
                        "cannot start once that is gone; install the bindguard package and run install again, or "
                        "give --program")
    return command


def _address(text: str):
    try:
        return parse_listen(text)
    except AddressError as exc:
        raise UsageError(str(exc), "write each LISTEN as in ListenStream=, e.g. 8080 or 127.0.0.1:8080") from None


def _systemd(unit: str, user: bool):
    """The manager install writes for, to ask about a unit that has no unit file on disk."""
    from bindguard.systemd.context import SystemdContext

    return SystemdContext(bus_choice=user, unit_name=unit)


def _found_at_each_start(unit: str, user: bool, console: output.Console) -> None:
    """Without LISTEN: say what the guard will check now, or refuse when it would find nothing."""
    from bindguard.request import config
    from bindguard.request.plan import discovered

    unit_config = config.load_unit_config(unit)
    if unit_config is not None and unit_config.listen:
        console.emit(output.INFO, f"bindguard: the guard checks the listen list of {unit_config.origins['listen']}")
        return
    if unit.endswith(".socket"):
        _socket_unit_listens(unit, user, console)
        return
    findings = discovered(unit, user, unit_config, _systemd(unit, user), console.warning,
                          unavailable="install cannot tell what to check")
    if not findings:
        raise UsageError(f"no address to guard for {unit}: no LISTEN given, and no listen list in a bindguard "
                         "file or address in its daemon's configuration was found",
                         f"give the addresses, e.g. `bindguard install {command_unit(unit)} 0.0.0.0:8080`")
    for f in findings:
        optional = " (optional: the daemon starts without it)" if f.survives else ""
        console.emit(output.INFO, f"bindguard: at each start the guard reads what {unit} binds; now "
                                 f"{f.bind} from {f.source}{optional}")


def _socket_unit_listens(unit: str, user: bool, console: output.Console) -> None:
    """A socket unit's guard checks its own IP Listen entries: say which, or refuse when it has none."""
    from bindguard.request import socketunit

    found, why = socketunit.settings_of(unit, user, _systemd(unit, user))
    request = socketunit.binds_of(unit, found) if found is not None else socketunit.SocketUnitRequest()
    for warning in request.warnings:
        console.warning(warning)
    if not request.binds:
        reason = why or "it lists no IP address in ListenStream= or ListenDatagram="
        raise UsageError(f"no address to guard for {unit}: {reason}",
                         f"check the unit with `systemctl{' --user' if user else ''} cat {command_unit(unit)}`")
    for line in request.sources:
        console.emit(output.INFO, f"bindguard: at each start the guard checks {line}")


def _carried_over(unit: str, listens: list[str], given, user: bool,
                  console: output.Console) -> tuple[list[str], dict[str, str]]:
    """What discovery knows about the given addresses, as check options: the socket options on
    which every matching address agrees (and the command line does not set), and which addresses
    the daemon starts without (address -> --optional or --if-available). Nothing for a daemon
    discovery does not know."""
    from bindguard.cli.commands.check import explicit_options
    from bindguard.model.host import host_bindv6only
    from bindguard.request.plan import IF_AVAILABLE, OPTIONAL, discovered

    found = {f.bind.endpoint: f for f in discovered(unit, user, None, _systemd(unit, user), console.warning,
                                                    unavailable="the addresses are taken as given")}
    # A bare port stands for the whole port (dual-stack [::]:PORT): nothing is carried over to it.
    whole = {(e.proto, e.port) for text, e in zip(listens, map(_address, listens), strict=True)
             if text.lower().removeprefix(e.proto + ":").isdigit()}
    matched = {text: found[_address(text)] for text in listens
               if _address(text) in found and (_address(text).proto, _address(text).port) not in whole}
    for f in found.values():
        endpoint = f.bind.endpoint
        if endpoint not in set(map(_address, listens)) and (endpoint.proto, endpoint.port) not in whole:
            console.warning(f"{unit} also binds {f.bind} ({f.source}), which is not given: the guard will not "
                           "check it; add it, or install without addresses to check what the daemon binds")
    optional = {}
    for text, f in matched.items():
        flag = {OPTIONAL: "--optional", IF_AVAILABLE: "--if-available"}.get(f.survives)
        if flag is not None:
            optional[text] = flag
            console.emit(output.INFO, f"bindguard: {flag} {text} for {unit}, from {f.source}: {f.note}")
    flags = []
    defaults = {"reuseaddr": True, "reuseport": False, "v6only": host_bindv6only(), "freebind": False}
    stated = explicit_options(given)
    for name, (on, off) in OPTION_FLAGS.items():
        relevant = [f for f in matched.values() if name != "v6only" or f.bind.endpoint.host.version == 6]
        values = {getattr(f.bind.options, name) for f in relevant}
        if name in stated or len(values) != 1 or values == {defaults[name]}:
            if len(values) > 1 and name not in stated:
                console.warning(f"discovery finds {name} set on some of the addresses of {unit} and not on others; "
                               "the drop-in leaves it at its default (a bindguard file can set it per address)")
            continue
        flag = on if values.pop() else off
        if flag is not None:
            flags.append(flag)
            sources = ", ".join(sorted({f.source for f in relevant}))
            console.emit(output.INFO, f"bindguard: {flag} for {unit}, from {sources}")
    return flags, optional


def validate_check_args(listens: list[str], user: bool, check_args: list[str]):
    """Parse the generated check command line with check's own parser, so a typo fails now and
    not at the next start; the parsed arguments."""
    parser = build_parser("check")
    try:
        return parser.parse_args(["check", "--unit", "x.service", *install.check_arguments(listens, user, check_args)])
    except UsageError as exc:
        raise UsageError(f"check options {' '.join(check_args)!r}: {exc.message}",
                         "see `bindguard check --help`") from None


def run(args: argparse.Namespace, console: output.Console) -> int:
    unit = install.guarded_unit_name(args.unit)
    listens = [text.strip() for text in args.listen]
    marked = {text.strip(): "--optional" for text in args.optional} | \
             {text.strip(): "--if-available" for text in args.if_available}
    endpoints = [_address(text) for text in [*listens, *args.optional, *args.if_available]]
    for twice in (e for e in endpoints if endpoints.count(e) > 1):
        raise UsageError(f"{twice} is given twice", "give each address once: as LISTEN, --optional or --if-available")
    check_args = install.parse_check_args(args.check_args)
    command = _program(args.program, args.user, console)
    install.refuse_control_characters([*listens, *marked, *check_args])
    given = validate_check_args(listens, args.user, check_args)
    if not listens and not marked:
        _found_at_each_start(unit, args.user, console)
    elif listens and not unit.endswith(".socket"):  # discovery reads a service's daemon
        flags, carried = _carried_over(unit, listens, given, args.user, console)
        listens = [text for text in listens if text not in carried]
        marked |= carried
        check_args += flags
    for text, flag in marked.items():
        check_args += [flag, text]
    validate_check_args(listens, args.user, check_args)
    path = install.dropin_path(unit, args.user)
    text = install.render(unit, listens, args.user, check_args, command)
    dropin = install.DropIn(unit, path, text)
    if args.print and not args.json:
        sys.stdout.write(dropin.text)
        return 0

    changed = install.differs(dropin) if args.print else install.write(dropin, args.user)
    if args.json:
        from bindguard.report.jsonout import write_json
        write_json({"unit": unit, "path": str(path), "changed": changed, "dropin": text}, args.json)
    if args.print:
        return 0
    flag = " --user" if args.user else ""
    if not changed:
        console.emit(output.INFO, f"bindguard: {path} is already in place, unchanged")
        return 0
    console.emit(output.NOTICE, f"bindguard: wrote {path}")
    if args.no_reload:
        console.emit(output.INFO, f"bindguard: {unit} is guarded from its next start after `systemctl{flag} "
                                  "daemon-reload`")
        return 0
    failure = install.daemon_reload(args.user)
    if failure:
        console.warning(f"daemon-reload failed ({failure}); run `systemctl{flag} daemon-reload` before the next start")
    elif install.known_to_manager(unit, args.user) is False:
        console.warning(f"the{' user' if args.user else ''} manager knows no unit {unit} yet; "
                       "the drop-in applies once it is installed")
    else:
        console.emit(output.INFO, f"bindguard: {unit} is guarded from its next start; see "
                                  f"`systemctl{flag} cat {command_unit(unit)}`")
    return 0
