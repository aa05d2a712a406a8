#!/usr/bin/python3
"""Build-time documents generated from the code, so that they cannot drift from `--help`:

  man/bindguard.8, man/bindguard-COMMAND.8   from the argument parser (argparse-manpage)
  man/bindguard.yaml.5                       from README's configuration sections, whose key
                                             table must name exactly config.TOP_KEYS
  completion/bindguard, completion/_bindguard   bash and zsh, from the argument parser (shtab)

    python3 tools/generate.py OUTDIR      (run with src/ importable: the Debian build does)

This is the one place outside the program that names its parser.

Why not argparse-manpage's public Manpage class: at the version debian/rules builds with (bookworm's
python3-argparse-manpage 1.2.2) it writes `.TH PROG "1" Manual` with no way to set section 8, date,
source or manual, puts every subcommand in one page, and takes extra sections (EXIT STATUS, FILES,
SEE ALSO) only as plain text broken at each line, with nothing escaped. So its _ManpageFormatter
sets the options, as Manpage does, and this file writes the rest of the roff.

These reasons, and the private _ManpageFormatter, hold for the 1.2.x series, the versions
debian/control's Build-Depends allows (>= 1.2.2, << 1.3~): a later argparse-manpage must be read
again (a private class may change or go without notice) before that bound is raised.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
from pathlib import Path

import shtab
from build_manpages.manpage import _ManpageFormatter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from bindguard import __version__  # noqa: E402
from bindguard.request.config import TOP_KEYS  # noqa: E402
from bindguard.cli.parser import build_parser  # noqa: E402

SECTION = "8"  # run by root, from units: system administration
SOURCE = f"bindguard {__version__}"
# The date of the release, not of the build, so that builds are reproducible.
DATE = datetime.datetime.fromtimestamp(int(os.environ.get("SOURCE_DATE_EPOCH") or datetime.datetime.now().timestamp()),
                                       datetime.timezone.utc).strftime("%Y-%m-%d")
UNIT_DESTS = ("unit",)  # arguments that name a systemd unit: completed from systemctl list-units


# --- roff ----------------------------------------------------------------------------------------

def escape(text: str) -> str:
    """Plain text as roff: backslashes, hyphens (minus signs in options), quotes' dumb forms."""
    return text.replace("\\", "\\e").replace("-", "\\-").replace("'", "\\(aq").replace("`", "\\(ga")


def line(text: str) -> str:
    """One input line; a leading . or ' would be a request."""
    return "\\&" + text if text[:1] in (".", "'") else text


def prose(text: str) -> list[str]:
    """--help text (RawDescriptionHelpFormatter: hard-wrapped paragraphs, indented blocks for
    examples and lists) as roff: paragraphs are filled, indented blocks kept as written."""
    out: list[str] = []
    block = False
    for raw in text.strip("\n").splitlines():
        indented = raw.startswith(" ")
        if not raw.strip():
            if block:
                out += [".fi", ".RE"]
                block = False
            out.append(".PP")
            continue
        if indented and not block:
            out += [".RS 2", ".nf"]
            block = True
        elif not indented and block:
            out += [".fi", ".RE"]
            block = False
        out.append(line(escape(raw[2:] if indented else raw)))
    if block:
        out += [".fi", ".RE"]
    return out


def header(name: str, section: str, summary: str) -> list[str]:
    manual = "System Administration" if section == "8" else "File Formats"
    return [f'.TH {name.upper()} {section} "{DATE}" "{SOURCE}" "{manual}"', ".SH NAME",
            f"{escape(name)} \\- {escape(summary)}"]


def synopsis(parser: argparse.ArgumentParser) -> list[str]:
    words = parser.format_usage().split(":", 1)[1].split()
    prog = len(parser.prog.split())
    return [".SH SYNOPSIS", ".B " + escape(" ".join(words[:prog])), escape(" ".join(words[prog:]))]


class Formatter(_ManpageFormatter):
    """argparse-manpage's option list, with --help text set as prose."""

    def format_text(self, text):
        return "\n".join(prose(text)) + "\n"

    def _format_action(self, action):
        parts = super()._format_action(action)
        return [p for p in parts if p] if isinstance(parts, list) else parts


def options(parser: argparse.ArgumentParser) -> list[str]:
    formatter = Formatter(parser.prog, parser._get_formatter())
    out = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions
                   if a.help != argparse.SUPPRESS and "--help" not in a.option_strings
                   and not isinstance(a, argparse._SubParsersAction)]
        if not actions:
            continue
        if group.title not in ("options", "optional arguments", "positional arguments"):
            out += [".SS " + escape(group.title)]
            if group.description:
                out += prose(group.description)
        for action in actions:
            out += [p for p in formatter._format_action(action) if p]
    nested = []  # a command's own subcommands (config check, config show): one subsection each
    for name, (child, summary) in subcommands(parser).items():
        nested += [f'.SS "{escape(child.prog)}"', *synopsis(child)[1:], ".PP", *prose(child.description or summary)]
        nested += options(child)[1:]
    return ([".SH OPTIONS", *out] if out else []) + nested


def epilog(text: str | None) -> list[str]:
    """A command's epilog: 'exit codes:' opens EXIT STATUS, 'examples:' EXAMPLES."""
    if not text:
        return []
    out: list[str] = []
    for chunk in re.split(r"\n(?=\S[^\n]*:\n)", text.strip("\n")):
        head, _, body = chunk.partition("\n")
        titles = {"exit codes:": "EXIT STATUS", "examples:": "EXAMPLES"}
        if head.strip().lower() in titles and body:
            out += [".SH " + titles[head.strip().lower()], *prose(body)]
        elif head.lower().startswith("exit codes") and head.rstrip().endswith(":") and body:  # of every command
            out += [".SH EXIT STATUS", *prose(head.rstrip(":") + "."), ".PP", *prose(body)]
        elif head.lower().startswith("exit codes:"):  # one line: "exit codes: 0 valid, 78 ..."
            out += [".SH EXIT STATUS", *prose(chunk.split(":", 1)[1].strip())]
        else:
            out += [".SH NOTES", *prose(chunk)]
    return out


def subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.ArgumentParser, str]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            return {name: (child, helps[name]) for name, child in action.choices.items()}
    return {}


def see_also(*pages: str) -> list[str]:
    refs = [f"\\fB{escape(p.rsplit('(', 1)[0])}\\fR({p.rsplit('(', 1)[1]}" for p in pages]
    return [".SH SEE ALSO", ",\n".join(refs)]


def command_pages(parser: argparse.ArgumentParser) -> dict[str, str]:
    commands = subcommands(parser)
    pages = {}
    others = [f"bindguard-{name}(8)" for name in commands]
    summary = parser.description.splitlines()[0].rstrip(".")
    top = [*header("bindguard", SECTION, summary[:1].lower() + summary[1:]),  # whatis: "bindguard - stop ..."
           *synopsis(parser), ".SH DESCRIPTION", *prose(parser.description.split("\n", 1)[1]),
           *options(parser), ".SH COMMANDS"]
    for name, (_, summary) in commands.items():
        top += [".TP", f"\\fBbindguard {name}\\fR, see \\fBbindguard\\-{name}\\fR(8)", escape(summary)]
    top += [*epilog(parser.epilog),
            ".SH FILES", ".TP", "/usr/share/doc/bindguard/examples/",
            "drop\\-ins and configurations to copy", ".TP", "/usr/share/doc/bindguard/README.Debian",
            "how the package bindguard\\-every\\-service guards every service and socket unit: its drop\\-ins "
            "in the system unit directory's service.d/ and socket.d/",
            *see_also(*others, "bindguard.yaml(5)", "systemd.service(5)", "systemd.exec(5)", "systemd.socket(5)")]
    pages["bindguard.8"] = top
    for name, (child, summary) in commands.items():
        pages[f"bindguard-{name}.8"] = [
            *header(f"bindguard-{name}", SECTION, summary), *synopsis(child),
            ".SH DESCRIPTION", *prose(child.description or summary), *options(child), *epilog(child.epilog),
            *see_also("bindguard(8)", *(p for p in others if p != f"bindguard-{name}(8)"), "bindguard.yaml(5)")]
    return {page: "\n".join(lines) + "\n" for page, lines in pages.items()}


# --- bindguard.yaml(5), from README ----------------------------------------------------------------

def markdown_inline(text: str) -> str:
    text = escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"\\fB\1\\fR", text)
    return re.sub(r"\\\(ga(.+?)\\\(ga", r"\\fB\1\\fR", text)


def markdown(lines: list[str]) -> list[str]:
    """The Markdown README uses in its configuration sections: paragraphs, bullets, tables,
    code blocks."""
    out: list[str] = []
    table: list[list[str]] = []

    def flush_table():
        if not table:
            return
        head, rows = table[0], table[1:]
        for row in rows:
            first = markdown_inline(row[0])
            rest = [f"{markdown_inline(h)}: {markdown_inline(c)}" for h, c in zip(head[1:-1], row[1:-1])]
            out.extend([".TP", first + (" (" + "; ".join(rest) + ")" if rest else ""),
                        markdown_inline(row[-1]) if len(row) > 1 else ""])
        table.clear()

    code = False
    for raw in lines:
        if raw.startswith("```"):
            flush_table()
            out += [".PP", ".RS 2", ".nf"] if not code else [".fi", ".RE"]
            code = not code
        elif code:
            out.append(line(escape(raw)))
        elif re.fullmatch(r"\|[-:| ]+\|", raw.strip()):
            continue  # a table's header rule
        elif raw.startswith("|"):
            table.append(re.split(r"\s*\|\s*", raw.strip().strip("|").strip()))
        elif not raw.strip():
            flush_table()
            out.append(".PP")
        elif raw.startswith("- "):
            flush_table()
            out += [".IP \\(bu 2", line(markdown_inline(raw[2:]))]
        else:
            out.append(line(markdown_inline(raw.strip())))
    flush_table()
    cleaned: list[str] = []
    for request in out:  # no empty paragraphs, no paragraph right after a heading or list item
        if request == ".PP" and (not cleaned or cleaned[-1].startswith((".SH", ".PP", ".IP", ".TP"))):
            continue
        cleaned.append(request)
    return cleaned


def readme_section(readme: str, title: str) -> list[str]:
    match = re.search(rf"^(#+) {re.escape(title)}\n(.*?)(?=^#{{1,3}} )", readme, re.M | re.S)
    if not match:
        raise SystemExit(f"generate: README.md has no section {title!r}; update tools/generate.py")
    return match.group(2).strip("\n").splitlines()


def config_page() -> str:
    readme = (ROOT / "README.md").read_text()
    keys = readme_section(readme, "Keys")
    documented = tuple(m.group(1) for m in (re.match(r"\| `(\w+)`", k) for k in keys) if m)
    if documented != TOP_KEYS:
        raise SystemExit(f"generate: README's key table names {documented}, the code reads {TOP_KEYS}")
    intro = readme_section(readme, "Configuration and discovery")
    lines = [*header("bindguard.yaml", "5", "per-unit configuration of bindguard"),
             ".SH SYNOPSIS", "/etc/bindguard/\\fIUNIT\\fR.yaml, /run/bindguard/\\fIUNIT\\fR.yaml, "
             "/usr/lib/bindguard/\\fIUNIT\\fR.yaml, and \\fIUNIT\\fR.yaml.d/*.yaml in each",
             ".SH DESCRIPTION", *markdown(intro),
             ".SH FILES", *markdown(readme_section(readme, "Where the files are")),
             ".SH KEYS", *markdown(keys),
             ".SH VALIDATION", *markdown(readme_section(readme, "Validation")),
             *see_also("bindguard(8)", "bindguard-config(8)", "bindguard-check(8)", "systemd.socket(5)")]
    text = "\n".join(lines) + "\n"
    return text.replace("examples/bindguard.yaml.example", "/usr/share/doc/bindguard/examples/bindguard.yaml.example")


# --- completion ---------------------------------------------------------------------------------

BASH_UNITS = r"""
# Unit names from the manager that the command line talks to (--user: the user manager).
_bindguard_units() {
  local scope=--system word unit rest
  for word in "${COMP_WORDS[@]}"; do [[ $word == --user ]] && scope=--user; done
  compgen -W "$(systemctl "$scope" list-units --all --plain --no-legend --full 2>/dev/null |
                while read -r unit rest; do printf '%s\n' "$unit"; done)" -- "$1"
}
"""
ZSH_UNITS = r"""
# Unit names from the manager that the command line talks to (--user: the user manager).
_bindguard_units() {
  local -a units
  local scope=--system
  (( ${words[(I)--user]} )) && scope=--user
  units=(${${(f)"$(systemctl $scope list-units --all --plain --no-legend --full 2>/dev/null)"}%% *})
  compadd -a units
}
"""


def completions(parser: argparse.ArgumentParser) -> dict[str, str]:
    def mark(p: argparse.ArgumentParser) -> None:
        for action in p._actions:
            if action.dest in UNIT_DESTS:
                action.complete = {"bash": "_bindguard_units", "zsh": "_bindguard_units"}
            if isinstance(action, argparse._SubParsersAction):
                helps = {a.dest: a.help for a in action._choices_actions}
                for name, child in action.choices.items():
                    # zsh shows the first line of a command's description beside it: the
                    # one-line summary --help lists is the line meant for that
                    child.description = helps.get(name) or child.description
                    mark(child)

    mark(parser)
    return {"completion/bindguard": shtab.complete(parser, "bash", preamble={"bash": BASH_UNITS}),
            "completion/_bindguard": shtab.complete(parser, "zsh", preamble={"zsh": ZSH_UNITS})}


def main() -> int:
    cli = argparse.ArgumentParser(
        prog="tools/generate.py",
        description="Write bindguard's man pages and shell completions, generated from its argument parser "
                    "and README, under OUTDIR (man/, completion/).")
    cli.add_argument("outdir", metavar="OUTDIR", nargs="?", default="build/generated",
                     help="where to write them (default: %(default)s)")
    outdir = cli.parse_args().outdir
    if outdir.startswith("-"):  # after `--`: a mistyped option, not a directory to make
        cli.error(f"OUTDIR {outdir!r} starts with '-': give a directory name (./{outdir} if you mean it)")
    out = Path(outdir)
    files = {f"man/{page}": text for page, text in command_pages(build_parser()).items()}
    files["man/bindguard.yaml.5"] = config_page()
    files.update(completions(build_parser()))
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    print(f"generate: {len(files)} files in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
