"""Per-unit YAML configuration: where the files are, how they merge, and validation with positions.

Files are looked up as systemd looks up unit files and drop-ins. In each directory of the search
path (highest precedence first: /etc/bindguard, /run/bindguard, /usr/lib/bindguard; replaced by
$BINDGUARD_CONFIG_PATH, colon-separated, for tests and private setups):
  UNIT.yaml           the first one found wins; it masks the same name in the directories below
  UNIT.yaml.d/*.yaml  drop-ins from every directory, a name in a higher directory masking the same
                      name below, applied after UNIT.yaml in lexical order of their file names
An instance unit (foo@bar.service) also reads its template's files (foo@.service.yaml and .yaml.d).

Finding no file must stay cheap (the guard runs before every start of every unit): only os.stat
and os.listdir are used until a file exists; PyYAML is imported only to read one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from bindguard.endpoints import AddressError, Bind, Endpoint, SocketOptions, host_bindv6only, parse_listen
from bindguard.errors import ConfigError
from bindguard.verdict import ACTIONS, KINDS, LATENT_SOCKET_UNIT, REFUSE, TIME_WAIT, WAIT, WARN
from bindguard.unitfiles import _is_file, config_files, normalize_unit, search_path  # noqa: F401 (API too)


CONFLICT_KINDS = KINDS
# What `config show` states as the default action of each kind (guard.default_action decides
# from the conflict itself: an address in duplicate address detection is waited for, too).
DEFAULT_POLICY = {kind: REFUSE for kind in KINDS} | {TIME_WAIT: WAIT, LATENT_SOCKET_UNIT: WARN}

FAIL_MODES = ("open", "closed")
DISCOVERY_SOURCES = ("daemon-config", "exec-start", "socket-units")
OPTION_NAMES = ("reuseaddr", "reuseport", "v6only", "freebind")
TOP_KEYS = ("listen", "options", "wait", "policy", "fail", "reap_stale", "discovery", "trust_guesses")
LISTEN_ENTRY_KEYS = ("address",) + OPTION_NAMES


@dataclass(frozen=True)
class Origin:
    """Where a value was set: file, line and column (1-based)."""

    path: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.column}"


@dataclass(frozen=True)
class ListenEntry:
    endpoint: Endpoint
    options: dict[str, bool]  # per-address options, over the unit's options
    origin: Origin


@dataclass
class UnitConfig:
    """The merged configuration of one unit. None (or absent from a dict) means not set here."""

    unit: str
    files: list[str] = field(default_factory=list)  # in the order they were applied
    listen: list[ListenEntry] | None = None
    options: dict[str, bool] = field(default_factory=dict)
    wait: float | None = None
    policy: dict[str, str] = field(default_factory=dict)  # only the kinds the files set
    fail: str | None = None
    reap_stale: bool | None = None
    discovery: frozenset[str] | None = None  # the allowed discovery sources
    trust_guesses: bool | None = None  # probe guessed addresses too (a conflict there can refuse)
    origins: dict[str, Origin] = field(default_factory=dict)  # "wait", "options.reuseport", "policy.orphan", ...

    @property
    def fail_closed(self) -> bool:
        return self.fail == "closed"

    @property
    def discovery_sources(self) -> frozenset[str]:
        return frozenset(DISCOVERY_SOURCES) if self.discovery is None else self.discovery

    def action(self, kind: str) -> str:
        return self.policy.get(kind, DEFAULT_POLICY.get(kind, "refuse"))

    def binds(self, bindv6only: bool | None = None) -> list[Bind]:
        """The listen list as Binds; v6only, where no file sets it, is the host's default."""
        if bindv6only is None:
            bindv6only = host_bindv6only()
        result = []
        for entry in self.listen or []:
            merged = {"v6only": bindv6only} | self.options | entry.options
            result.append(Bind(entry.endpoint, SocketOptions(**merged)))
        return result


# --- reading and validating one file -------------------------------------------------------------


@dataclass
class _Values:
    """What one file sets, with the position of each value."""

    listen: list[ListenEntry] | None = None
    listen_origin: Origin | None = None
    options: dict[str, tuple[bool, Origin]] = field(default_factory=dict)
    wait: tuple[float, Origin] | None = None
    policy: dict[str, tuple[str, Origin]] = field(default_factory=dict)
    fail: tuple[str, Origin] | None = None
    reap_stale: tuple[bool, Origin] | None = None
    discovery: tuple[frozenset[str], Origin] | None = None
    trust_guesses: tuple[bool, Origin] | None = None


class _FileReader:
    def __init__(self, path: str) -> None:
        import yaml

        self.path = path
        self.problems: list[str] = []
        self.constructor = yaml.SafeLoader("")

    def origin(self, node) -> Origin:
        return Origin(self.path, node.start_mark.line + 1, node.start_mark.column + 1)

    def problem(self, node, message: str) -> None:
        self.problems.append(f"{self.origin(node)}: {message}")

    def read(self) -> _Values:
        import yaml

        values = _Values()
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            self.problems.append(f"{self.path}: cannot read: {getattr(exc, 'strerror', None) or exc}")
            return values
        try:
            nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            where = f"{self.path}:{mark.line + 1}:{mark.column + 1}" if mark else self.path
            what = " ".join(part for part in (exc.context, exc.problem) if part)
            self.problems.append(f"{where}: YAML syntax error: {what}")
            return values
        except yaml.YAMLError as exc:
            self.problems.append(f"{self.path}: YAML error: {exc}")
            return values
        nodes = [n for n in nodes if n is not None]
        if len(nodes) > 1:
            self.problem(nodes[1], "a second YAML document; write one document per file (remove the '---')")
        if not nodes or _is_null(nodes[0]):
            return values
        root = nodes[0]
        if not isinstance(root, yaml.MappingNode):
            self.problem(root, f"expected a mapping of settings ({', '.join(TOP_KEYS)}), found {_kind(root)}")
            return values
        for key_node, value_node in self._mapping_items(root, TOP_KEYS):
            getattr(self, "_read_" + key_node.value)(value_node, values)
        return values

    def _mapping_items(self, node, allowed: tuple[str, ...]):
        """The (key, value) pairs of a mapping with known, unique keys; reports the others."""
        import difflib

        import yaml

        seen: dict[str, object] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self.problem(key_node, f"a key must be a plain name, found {_kind(key_node)}")
                continue
            key = key_node.value
            if key in seen:
                self.problem(key_node, f"duplicate key {key!r} (first set at line {seen[key].start_mark.line + 1})")
                continue
            seen[key] = key_node
            if key not in allowed:
                spellings = {a.replace("_", "-"): a for a in allowed}
                close = difflib.get_close_matches(key.replace("_", "-"), list(spellings), 1)
                hint = f"did you mean {spellings[close[0]]!r}?" if close else f"known keys: {', '.join(allowed)}"
                self.problem(key_node, f"unknown key {key!r}; {hint}")
                continue
            yield key_node, value_node

    def _scalar(self, node):
        import yaml

        if not isinstance(node, yaml.ScalarNode):
            return _NOT_SCALAR
        return self.constructor.construct_object(node)

    def _bool(self, node, what: str) -> bool | None:
        value = self._scalar(node)
        if isinstance(value, bool):
            return value
        self.problem(node, f"{what} must be true or false, found {_describe(node, value)}")
        return None

    def _read_listen(self, node, values: _Values) -> None:
        import yaml

        values.listen_origin = self.origin(node)
        if _is_null(node):
            values.listen = []
            return
        if not isinstance(node, yaml.SequenceNode):
            self.problem(node, f"listen must be a list of addresses, e.g. [80, \"[::1]:8080\"], found {_kind(node)}")
            return
        entries: list[ListenEntry] = []
        seen: dict[Endpoint, Origin] = {}
        for item in node.value:
            options: dict[str, bool] = {}
            address_node = item
            if isinstance(item, yaml.MappingNode):
                address_node = None
                for key_node, value_node in self._mapping_items(item, LISTEN_ENTRY_KEYS):
                    if key_node.value == "address":
                        address_node = value_node
                    else:
                        flag = self._bool(value_node, f"listen option {key_node.value!r}")
                        if flag is not None:
                            options[key_node.value] = flag
                if address_node is None:
                    self.problem(item, "a listen entry written as a mapping needs 'address', "
                                       "e.g. {address: 80, reuseport: true}")
                    continue
            endpoint = self._address(address_node)
            if endpoint is None:
                continue
            origin = self.origin(address_node)
            if endpoint in seen:
                self.problem(address_node, f"duplicate listen entry {endpoint} (also at line {seen[endpoint].line})")
                continue
            seen[endpoint] = origin
            entries.append(ListenEntry(endpoint, options, origin))
        values.listen = entries

    def _address(self, node) -> Endpoint | None:
        value = self._scalar(node)
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            self.problem(node, f"a listen address must be a port or ADDRESS:PORT, found {_describe(node, value)}")
            return None
        try:
            return parse_listen(str(value))
        except AddressError as exc:
            self.problem(node, f"bad listen address: {exc}")
            return None

    def _read_options(self, node, values: _Values) -> None:
        import yaml

        if _is_null(node):
            return
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, f"options must be a mapping such as {{reuseport: true}}, found {_kind(node)}")
            return
        for key_node, value_node in self._mapping_items(node, OPTION_NAMES):
            flag = self._bool(value_node, f"option {key_node.value!r}")
            if flag is not None:
                values.options[key_node.value] = (flag, self.origin(value_node))

    def _read_wait(self, node, values: _Values) -> None:
        value = self._scalar(node)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
            self.problem(node, f"wait must be a number of seconds, 0 or more, found {_describe(node, value)}")
            return
        values.wait = (float(value), self.origin(node))

    def _read_policy(self, node, values: _Values) -> None:
        import yaml

        if _is_null(node):
            return
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, "policy must map conflict kinds to actions, e.g. {time-wait: wait}, "
                               f"found {_kind(node)}")
            return
        for key_node, value_node in self._mapping_items(node, CONFLICT_KINDS):
            action = self._scalar(value_node)
            if action not in ACTIONS:
                self.problem(value_node, f"policy for {key_node.value!r} must be one of {', '.join(ACTIONS)}, "
                                         f"found {_describe(value_node, action)}")
                continue
            values.policy[key_node.value] = (action, self.origin(value_node))

    def _read_fail(self, node, values: _Values) -> None:
        value = self._scalar(node)
        if value not in FAIL_MODES:
            self.problem(node, f"fail must be 'open' or 'closed', found {_describe(node, value)}")
            return
        values.fail = (value, self.origin(node))

    def _read_reap_stale(self, node, values: _Values) -> None:
        flag = self._bool(node, "reap_stale")
        if flag is not None:
            values.reap_stale = (flag, self.origin(node))

    def _read_trust_guesses(self, node, values: _Values) -> None:
        flag = self._bool(node, "trust_guesses")
        if flag is not None:
            values.trust_guesses = (flag, self.origin(node))

    def _read_discovery(self, node, values: _Values) -> None:
        import yaml

        if isinstance(node, yaml.SequenceNode):
            sources = set()
            for item in node.value:
                source = self._scalar(item)
                if source not in DISCOVERY_SOURCES:
                    self.problem(item, f"unknown discovery source {_describe(item, source)}; "
                                       f"write any of {', '.join(DISCOVERY_SOURCES)}")
                elif source in sources:
                    self.problem(item, f"duplicate discovery source {source!r}")
                else:
                    sources.add(source)
            values.discovery = (frozenset(sources), self.origin(node))
            return
        flag = self._scalar(node)
        if not isinstance(flag, bool):
            self.problem(node, f"discovery must be true, false or a list of sources "
                               f"({', '.join(DISCOVERY_SOURCES)}), found {_describe(node, flag)}")
            return
        values.discovery = (frozenset(DISCOVERY_SOURCES) if flag else frozenset(), self.origin(node))


_NOT_SCALAR = object()


def _is_null(node) -> bool:
    return node.tag == "tag:yaml.org,2002:null"


def _kind(node) -> str:
    import yaml

    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return f"{node.value!r}"


def _describe(node, value) -> str:
    if value is _NOT_SCALAR:
        return _kind(node)
    if value is None:
        return "nothing"
    return repr(node.value) if isinstance(value, str) else str(node.value)


def _read(path: str) -> tuple[_Values, list[str]]:
    reader = _FileReader(path)
    values = reader.read()
    return values, reader.problems


def validate_file(path: str | os.PathLike) -> list[str]:
    """Every problem in one file, each `file:line:column: message`; empty when it is valid."""
    return _read(os.fspath(path))[1]


def _merge(unit: str, files: list[str]) -> tuple[UnitConfig, list[str]]:
    """Apply files in order: later scalars replace earlier ones, mappings merge by key, a listen list replaces."""
    config = UnitConfig(unit=unit, files=list(files))
    problems: list[str] = []
    for path in files:
        values, file_problems = _read(path)
        problems += file_problems
        if values.listen is not None:
            config.listen = values.listen
            config.origins["listen"] = values.listen_origin
        for name, (flag, origin) in values.options.items():
            config.options[name] = flag
            config.origins[f"options.{name}"] = origin
        for kind, (action, origin) in values.policy.items():
            config.policy[kind] = action
            config.origins[f"policy.{kind}"] = origin
        for name in ("wait", "fail", "reap_stale", "discovery", "trust_guesses"):
            setting = getattr(values, name)
            if setting is not None:
                setattr(config, name, setting[0])
                config.origins[name] = setting[1]
    return config, problems


def _raise(problems: list[str], what: str) -> None:
    message = problems[0] if len(problems) == 1 else f"{len(problems)} problems in {what}:\n" + "\n".join(problems)
    error = ConfigError(message, "fix the file, then check it with `bindguard config check`")
    error.problems = problems
    raise error


def load_unit_config(unit: str | None, explicit: str | os.PathLike | None = None) -> UnitConfig | None:
    """The unit's merged configuration, or None when it has no file. Raises ConfigError listing every problem.

    With explicit (--config FILE), that one file is the whole configuration.
    """
    if explicit is not None:
        path = os.fspath(explicit)
        unit = normalize_unit(unit) if unit else os.path.basename(path)
        if not _is_file(path):
            raise ConfigError(f"{path}: no such configuration file", "check the path given to --config")
        files = [path]
    else:
        unit = normalize_unit(unit)
        files = config_files(unit)
        if not files:
            return None
    config, problems = _merge(unit, files)
    if problems:
        _raise(problems, f"the configuration of {unit}")
    return config
