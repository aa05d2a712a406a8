"""What a unit will bind, learnt from the unit and from its daemon's own configuration.

The entry point takes plain data about the unit (what systemd says over D-Bus), so it runs and
is tested without systemd:

    discover(exec_start, environment, environment_files, socket_listens, unit_name) -> Discovery

Sources, each of which a unit's YAML configuration can allow or not (`discovery:`):
  daemon-config  the daemon named by ExecStart= (nginx, apache2/httpd, haproxy, sshd, redis-server,
                 postgres/pg_ctlcluster, mariadbd/mysqld): its own dump (`nginx -T`, `sshd -T`)
                 or its files, from the path ExecStart= names. Confident.
  exec-start     for other daemons, the common forms in ExecStart= and the environment
                 (--port 8080, --bind 0.0.0.0:8080, -p 8080, PORT=8080, LISTEN=...). Guesses.
  socket-units   the unit's .socket units: systemd binds those, and the daemon inherits them.

A daemon configuration that cannot be read gives a warning naming the file and no findings
from it: discovery never makes a start fail because a file could not be read. Files are read by
one reader (common.read_text: regular files only, size-capped) within one budget of files, bytes
and time per discovery; a daemon's dump runs only as dump.py allows (never as root on anything
another user controls). Only the finder of the daemon found is imported.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from bindguard.model.facts import UnitFacts
from bindguard.model.kinds import DISCOVERY_SOURCES, Confidence
from bindguard.model.record import Record, field
from bindguard.request.discover.common import DaemonConfigError, Finding, Service, discovery_scope, read_text
from bindguard.systemd.unitexec import DAEMONS, shell_script_index, unwrap_env
from bindguard.systemd.unitfiles import daemon_for_unit_name  # noqa: F401 (this module's API too)

UnitFactsSource = Callable[[str], UnitFacts]


class Discovery(Record):
    findings: list[Finding] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    daemons: list[str] = field(default_factory=list)  # the daemons recognised in ExecStart=

    def confident(self) -> list[Finding]:
        return [f for f in self.findings if f.confidence == Confidence.CONFIDENT]

    def daemon_binds(self):
        """The confident sockets the daemon itself binds (not those systemd binds for it)."""
        return [f.bind for f in self.confident() if f.socket_unit is None]


def read_environment_file(path: str) -> dict[str, str]:
    """KEY=VALUE lines as systemd reads an EnvironmentFile= (comments, quotes, `export ` ignored)."""
    values: dict[str, str] = {}
    text = read_text(path).replace("\\\n", "")
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        name, eq, value = line.partition("=")
        if not eq:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[name.strip()] = value
    return values


def unit_environment(environment: Sequence[str], environment_files: Sequence[str],
                     warnings: list[str]) -> dict[str, str]:
    """The variables a unit's ExecStart= sees: Environment=, then EnvironmentFile= over it."""
    env: dict[str, str] = {}
    for assignment in environment:
        name, eq, value = assignment.partition("=")
        if eq:
            env[name] = value
    for entry in environment_files:
        optional = entry.startswith("-")
        path = entry[1:] if optional else entry
        if optional and not os.path.lexists(path):
            continue
        try:
            env.update(read_environment_file(path))
        except DaemonConfigError as exc:
            warnings.append(f"EnvironmentFile={exc}")
    return env


def _expand_word(word: str, env: dict[str, str]) -> str:
    out, i = [], 0
    while i < len(word):
        if word[i] == "$" and word.startswith("{", i + 1) and "}" in word[i + 2:]:
            end = word.index("}", i + 2)
            out.append(env.get(word[i + 2:end], ""))
            i = end + 1
        elif word.startswith("$$", i):
            out.append("$")
            i += 2
        else:
            out.append(word[i])
            i += 1
    return "".join(out)


def expand_argv(argv: Sequence[str], env: dict[str, str]) -> list[str]:
    """Environment variables in an ExecStart= argv as systemd expands them: a word that is only
    $NAME splits into the words of its value; ${NAME} is replaced within a word."""
    words: list[str] = []
    for word in argv:
        if len(word) > 1 and word[0] == "$" and (word[1:].replace("_", "a").isalnum()):
            words += env.get(word[1:], "").split()
        else:
            words.append(_expand_word(word, env))
    return words


def _commands(argv: list[str], env: dict[str, str]) -> list[list[str]]:
    """The command lines to look at: argv itself (past `env`), or the commands inside `sh -c SCRIPT`."""
    argv = unwrap_env(argv)
    script = shell_script_index(argv)
    if script is not None:
        import shlex

        try:
            lexer = shlex.shlex(argv[script], posix=True, punctuation_chars=";&|()")
            lexer.whitespace_split = True
            words = list(lexer)
        except ValueError:
            return [argv]
        commands: list[list[str]] = []
        current: list[str] = []
        for word in words:
            if word and set(word) <= set(";&|()"):
                commands.append(current)
                current = []
            elif word != "exec" or current:
                current.append(word)
        commands.append(current)
        return [unwrap_env(expand_argv(c, env)) for c in commands if c]
    return [argv]


def daemon_of(argv: Sequence[str]) -> str | None:
    if not argv:
        return None
    return DAEMONS.get(os.path.basename(argv[0]))


def _finder(module: str):
    """A daemon's finder module, imported by __import__ (what importlib.import_module does for a
    name like this, without importing importlib and warnings: 0.2 ms of a first start)."""
    name = f"bindguard.request.discover.{module}"
    __import__(name)
    return sys.modules[name]


def _as_systemd_runs_it(argv: list[str]) -> list[str]:
    """An ExecStart= argv with a bare program name resolved as systemd resolves it (never by $PATH)."""
    from bindguard.request.discover.dump import systemd_resolved

    if argv and "/" not in argv[0]:
        return [systemd_resolved(argv[0]) or argv[0], *argv[1:]]
    return argv


def discover(exec_start: Sequence[Sequence[str]], environment: Sequence[str], environment_files: Sequence[str],
             socket_listens: Sequence[tuple[str | bool, ...]], unit_name: str,
             sources: Sequence[str] = DISCOVERY_SOURCES, user: str = "", group: str = "") -> Discovery:
    """Everything a unit will bind that can be learnt from its unit settings and its daemon's files.

    socket_listens: (type, address) as the Listen property of its .socket units gives them
    ("Stream", "[::]:80"), optionally with the socket unit's name as a third item.
    user, group: the unit's User= and Group= ("" when unset): whom a daemon's dump may run as.
    """
    service = Service(user, group, tuple(f.lstrip("-") for f in environment_files))
    with discovery_scope(service):
        return _discover(exec_start, environment, environment_files, socket_listens, unit_name, sources)


def _discover(exec_start, environment, environment_files, socket_listens, unit_name, sources) -> Discovery:
    result = Discovery()
    env = unit_environment(environment, environment_files, result.warnings)
    commands = [c for argv in exec_start for c in _commands(_as_systemd_runs_it(expand_argv(argv, env)), env)]
    if "daemon-config" in sources:
        for argv in commands:
            module = daemon_of(argv)
            if module is None:
                continue
            try:
                found = _finder(module).find(argv, env)
            except Exception as exc:  # a finder's bug must not stop the start it was meant to guard
                result.warnings.append(f"{module}: discovery failed ({type(exc).__name__}: {exc}); "
                                       f"its addresses are not known")
                continue
            result.daemons.append(found.daemon)
            result.findings += found.findings
            result.warnings += found.warnings
    if "exec-start" in sources and not result.daemons:
        from bindguard.request.discover import generic

        found = generic.find_in_command_lines(commands, env)
        result.findings += found.findings
        result.warnings += found.warnings
    if "socket-units" in sources and socket_listens:
        from bindguard.request.discover import generic

        found = generic.find_in_socket_listens(socket_listens, unit_name)
        result.findings += found.findings
        result.warnings += found.warnings
    return result


def discover_daemon(daemon: str, argv: Sequence[str] = (), config: str | None = None) -> Discovery:
    """One daemon's findings from an explicit configuration file (bindguard discover --daemon D --config F)."""
    name = DAEMONS.get(daemon) or (daemon if daemon in set(DAEMONS.values()) else None)
    if name is None:
        raise ValueError(daemon)
    with discovery_scope():
        found = _finder(name).find(_as_systemd_runs_it(list(argv) or [daemon]), dict(os.environ), config)
    return Discovery(found.findings, found.warnings, [found.daemon])


def discover_unit(unit: str, unit_facts: UnitFactsSource, sources: Sequence[str] = DISCOVERY_SOURCES) -> Discovery:
    """discover() for a unit by name, its facts asked of unit_facts (the systemd module's D-Bus reader)."""
    facts = unit_facts(unit)
    return discover(facts.exec_start, facts.environment, facts.environment_files, facts.socket_listens, unit,
                    sources, facts.user, facts.group)


__all__ = ["DAEMONS", "Discovery", "Finding", "UnitFacts", "UnitFactsSource",
           "discover", "discover_daemon", "discover_unit", "expand_argv", "unit_environment"]
