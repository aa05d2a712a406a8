"""bindguard install: add the guard to a unit as a drop-in, and reload the manager."""

from __future__ import annotations

import argparse
import sys

from bindguard import install, output
from bindguard.endpoints import AddressError, parse_listen
from bindguard.errors import UsageError

DESCRIPTION = f"""\
Add `bindguard check` to a service's ExecStartPre= without editing its unit file: write the
drop-in UNIT.d/{install.DROPIN_NAME} (in /etc/systemd/system, or with --user in
$XDG_CONFIG_HOME/systemd/user, by default ~/.config/systemd/user), then daemon-reload.
LISTEN is each address the daemon binds, in ListenStream= syntax (8080, 0.0.0.0:80, [::]:443,
udp:[::1]:53). An existing {install.DROPIN_NAME} that bindguard did not write is never touched.

The drop-in runs `ExecStartPre=+bindguard check --unit %n ...`.
{install.PRIVILEGE_NOTE}"""

EPILOG = """\
examples:
  bindguard install nginx.service 0.0.0.0:80 [::]:80 0.0.0.0:443 [::]:443 --check-args=--v6only
  bindguard install ssh.service 22 --check-args='--wait 10'
  bindguard install --user web.service 127.0.0.1:8080
  bindguard install --print nginx.service 80      # show the drop-in, write nothing

exit codes:
  0   the drop-in is in place (a failed daemon-reload is a warning: run it yourself)
  64  a malformed address, unit name or check option
  78  cannot write: a file bindguard did not write is in the way, or no permission"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("unit", metavar="UNIT", help="the service to guard (nginx means nginx.service)")
    parser.add_argument("listen", metavar="LISTEN", nargs="+", help="an address the daemon binds")
    parser.add_argument("--user", action="store_true", help="a unit of your user manager (systemctl --user)")
    parser.add_argument(
        "--check-args", metavar="OPTIONS",
        help="more `bindguard check` options for the drop-in, as one shell word: --check-args='--wait 10'",
    )
    parser.add_argument("--print", action="store_true", help="print the drop-in to stdout and write nothing")


def run(args: argparse.Namespace) -> int:
    unit = install.service_name(args.unit)
    listens = []
    for text in args.listen:
        try:
            parse_listen(text)
        except AddressError as exc:
            raise UsageError(str(exc), "write each LISTEN as in ListenStream=, e.g. 8080 or 127.0.0.1:8080") from None
        listens.append(text.strip())
    check_args = install.parse_check_args(args.check_args)
    install.validate_check_args(listens, args.user, check_args)
    path = install.dropin_path(unit, args.user)
    dropin = install.DropIn(unit, path, install.render(unit, listens, args.user, check_args, install.bindguard_command()))
    if args.print:
        sys.stdout.write(dropin.text)
        return 0

    changed = install.write(dropin, args.user)
    flag = " --user" if args.user else ""
    if not changed:
        output.emit(output.INFO, f"bindguard: {path} is already in place, unchanged")
        return 0
    output.emit(output.NOTICE, f"bindguard: wrote {path}")
    failure = install.daemon_reload(args.user)
    if failure:
        output.warning(f"daemon-reload failed ({failure}); run `systemctl{flag} daemon-reload` before the next start")
    elif install.known_to_manager(unit, args.user) is False:
        output.warning(f"the{' user' if args.user else ''} manager knows no unit {unit} yet; "
                       "the drop-in applies once it is installed")
    else:
        output.emit(output.INFO, f"bindguard: {unit} is guarded from its next start; see `systemctl{flag} cat {unit}`")
    return 0
