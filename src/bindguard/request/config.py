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

import functools
import os

from bindguard import find_dependencies
from bindguard.model.endpoints import AddressError, Bind, Endpoint, SocketOptions, parse_listen
from bindguard.model.errors import ConfigError
from bindguard.model.host import host_bindv6only
from bindguard.model.kinds import DISCOVERY_SOURCES, NAT_MODES, POLICY_KINDS, Action
from bindguard.model.record import Record, field
from bindguard.model.text import EXCERPT, excerpt
from bindguard.systemd.unitfiles import config_files, masks_with_nothing, normalize_unit, search_path  # noqa: F401 (API too)

TYPE_CHECKING = False  # PyYAML is imported only when a file is read (_yaml)
if TYPE_CHECKING:
    from yaml import Node as YamlNode

FAIL_MODES = ("open", "closed")
OPTION_NAMES = ("reuseaddr", "reuseport", "v6only", "freebind")
TOP_KEYS = ("listen", "options", "wait", "policy", "fail", "reap_stale", "discovery", "trust_guesses", "nat")
NAT_SETTINGS = ("off",) + NAT_MODES  # off: the ruleset is not read (the default)
LISTEN_ENTRY_KEYS = ("address",) + OPTION_NAMES + ("optional",)
IF_AVAILABLE = "if-available"  # optional: only when no interface has the address (Redis's `bind -::1`)


class Origin(Record, frozen=True):
    """Where a value was set: file, line and column (1-based)."""

    path: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.column}"


class ListenEntry(Record, frozen=True):
    endpoint: Endpoint
    options: dict[str, bool]  # per-address options, over the unit's options
    origin: Origin
    # The daemon starts without this socket: True, whatever kept it from binding (a conflict on
    # it only warns); IF_AVAILABLE, only when no interface has the address.
    optional: bool | str = False


class UnitConfig(Record):
    """The merged configuration of one unit. None (or absent from a dict) means not set here."""

    unit: str
    files: list[str] = field(default_factory=list)  # in the order they were applied
    listen: list[ListenEntry] | None = None
    options: dict[str, bool] = field(default_factory=dict)
    wait: float | None = None
    policy: dict[str, str] = field(default_factory=dict)  # only the kinds the files set (verdict.policy: the rest)
    fail: str | None = None
    reap_stale: bool | None = None
    discovery: frozenset[str] | None = None  # the allowed discovery sources
    trust_guesses: bool | None = None  # probe guessed addresses too (a conflict there can refuse)
    nat: str | None = None  # NAT_SETTINGS: whether check reads the NAT rules, and what a match does
    origins: dict[str, Origin] = field(default_factory=dict)  # "wait", "options.reuseport", "policy.orphan", ...

    @property
    def fail_closed(self) -> bool:
        return self.fail == "closed"

    @property
    def discovery_sources(self) -> frozenset[str]:
        return frozenset(DISCOVERY_SOURCES) if self.discovery is None else self.discovery

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

# Bounds on what one file can make the guard do (it runs as root before every start): a real
# configuration is a few hundred bytes; PyYAML reads about half a MiB a second.
MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 32  # nesting of lists and mappings; PyYAML composes recursively
MAX_PROBLEMS = 20  # per file; the rest are counted, not described
MAX_DIGITS = 18  # an integer setting (a port, seconds) never needs more

_TAG = "tag:yaml.org,2002:"
STR, INT, FLOAT, BOOL, NULL, SEQ, MAP = (_TAG + t for t in ("str", "int", "float", "bool", "null", "seq", "map"))
# YAML 1.1's words for booleans (a boolean setting may say yes/no/on/off); only a boolean key accepts one.
BOOLS = {w: True for w in ("yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON")} | \
        {w: False for w in ("no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF")}
NULLS = ("", "~", "null", "Null", "NULL")
_INT = r"[-+]?[0-9]+"
_FLOAT = r"[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+(?=[eE]))(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)"


class _Stop(Exception):
    """Enough problems reported: read no further."""


class _Values(Record):
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
    nat: tuple[str, Origin] | None = None


def _yaml():
    """PyYAML, found through the site processing the launcher leaves to bindguard.find_dependencies."""
    find_dependencies()
    import yaml

    return yaml


@functools.cache
def _loader_class():
    """A SafeLoader that resolves only decimal numbers, booleans and null, and bounds nesting.

    YAML 1.1 would read `1:20` as the number 80 (base 60), `010` as 8 and `0x50` as 80; here
    they stay strings, which no numeric setting takes and no address parses as a port.
    """
    import re

    yaml = _yaml()

    class Loader(yaml.SafeLoader):
        yaml_implicit_resolvers: dict = {}

        def __init__(self, stream) -> None:
            super().__init__(stream)
            self.depth = 0

        def compose_node(self, parent, index):
            if self.depth >= MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                                  self.peek_event().start_mark)
            self.depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    # Nothing else is resolved implicitly: a value is a string unless it is one of these.
    Loader.add_implicit_resolver(NULL, re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""])
    Loader.add_implicit_resolver(BOOL, re.compile(f"^(?:{'|'.join(BOOLS)})$"), list("yYnNtTfFoO"))
    Loader.add_implicit_resolver(INT, re.compile(f"^(?:{_INT})$"), list("-+0123456789"))
    Loader.add_implicit_resolver(FLOAT, re.compile(f"^(?:{_FLOAT})$"), list("-+0123456789."))
    return Loader


class _BadValue(ValueError):
    pass


# Excerpts of unexpected text (an unknown key unlike any known one, a duplicate key, a document
# that is no mapping) the problems of the file being read may still quote: one per file, so that
# a file that is no bindguard configuration (`--config /etc/shadow`) shows one short piece of
# itself, not the start of each of its lines; later problems name the line and column only. The
# value of a known setting (`wait: x`) and a misspelt known key (`lisen`) are quoted as written.
_quotes_left = [1]


def _excerpt(text: str, budgeted: bool = True, quote: str = "'") -> str:
    """A value as a message quotes it (bindguard.model.text.excerpt); past the file's one excerpt
    of unexpected text (budgeted), nothing of it."""
    if budgeted and _quotes_left[0] <= 0:
        return "(not quoted: one excerpt per file)"
    if budgeted:
        _quotes_left[0] -= 1
    return excerpt(text, quote=quote)


def _short_tag(tag: str) -> str:
    return "!!" + tag[len(_TAG):] if tag.startswith(_TAG) else tag


def _construct(node):
    """The value of a scalar node, from its tag; raises _BadValue for a tag or value this reader
    does not take (every other tag: PyYAML's !!binary, !!timestamp, !!set, local !tags, ...)."""
    import re

    tag, text = node.tag, node.value
    if tag == STR:
        return text
    if tag == NULL and text in NULLS:
        return None
    if tag == BOOL and text in BOOLS:
        return BOOLS[text]
    if tag == INT and re.fullmatch(_INT, text, re.ASCII):
        if len(text.lstrip("+-")) > MAX_DIGITS:
            raise _BadValue(f"the number {_excerpt(text)} is too large")
        return int(text)
    if tag == FLOAT and re.fullmatch(f"{_FLOAT}|{_INT}", text, re.ASCII):
        return float(text.replace(".", "", 1) if text.lstrip("+-").lower() in (".inf", ".nan") else text)
    if tag in (STR, NULL, BOOL, INT, FLOAT):
        raise _BadValue(f"{_excerpt(text)} is not a valid {_short_tag(tag)}")
    raise _BadValue(f"unsupported tag {_excerpt(_short_tag(tag))}; write plain values (strings, numbers, "
                    "true/false)")


class _FileReader:
    def __init__(self, path: str) -> None:
        self.path = path
        self.problems: list[str] = []
        self.hidden = 0  # problems past MAX_PROBLEMS

    def origin(self, node) -> Origin:
        return Origin(self.path, node.start_mark.line + 1, node.start_mark.column + 1)

    def _add(self, problem: str) -> None:
        if len(self.problems) >= MAX_PROBLEMS:
            raise _Stop
        self.problems.append(problem)

    def problem(self, node, message: str) -> None:
        self._add(f"{self.origin(node)}: {message}")

    def read(self) -> _Values:
        values = _Values()
        _quotes_left[0] = 1
        try:
            self._read(values)
        except _Stop:
            self.problems.append(f"{self.path}: more problems; only the first {MAX_PROBLEMS} are listed")
        return values

    def _read(self, values: _Values) -> None:
        yaml = _yaml()

        try:
            text = _read_text(self.path)
        except ConfigError as exc:
            self._add(exc.message)
            return
        try:
            nodes = list(yaml.compose_all(text, Loader=_loader_class()))
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            where = f"{self.path}:{mark.line + 1}:{mark.column + 1}" if mark else self.path
            what = " ".join(part for part in (exc.context, exc.problem) if part)
            self._add(f"{where}: YAML syntax error: {what}")
            return
        except yaml.YAMLError as exc:
            self._add(f"{self.path}: YAML error: {exc}")
            return
        nodes = [n for n in nodes if n is not None]
        if len(nodes) > 1:
            self.problem(nodes[1], "a second YAML document; write one document per file (remove the '---')")
        if not nodes:
            return
        if not self._all_values_readable(nodes[0]) or _is_null(nodes[0]):
            return
        root = nodes[0]
        if not isinstance(root, yaml.MappingNode):
            self.problem(root, f"expected a mapping of settings ({', '.join(TOP_KEYS)}), found {_kind(root)}")
            return
        for key_node, value_node in self._mapping_items(root, TOP_KEYS):
            getattr(self, "_read_" + key_node.value)(value_node, values)

    def _all_values_readable(self, root) -> bool:
        """Report every tag and value that cannot be read (each node once, aliases included);
        a document with one is not interpreted further."""
        yaml = _yaml()

        before = len(self.problems)
        seen: set[int] = set()
        stack = [root]
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if isinstance(node, yaml.ScalarNode):
                try:
                    _construct(node)
                except _BadValue as exc:
                    self.problem(node, str(exc))
            elif node.tag not in (SEQ, MAP):
                self.problem(node, f"unsupported tag {_excerpt(_short_tag(node.tag))}; write a plain list or mapping")
            elif isinstance(node, yaml.MappingNode):
                stack.extend(n for pair in reversed(node.value) for n in reversed(pair))
            else:
                stack.extend(reversed(node.value))
        return len(self.problems) == before

    def _mapping_items(self, node, allowed: tuple[str, ...]):
        """The (key, value) pairs of a mapping with known, unique keys; reports the others."""
        import difflib

        yaml = _yaml()

        seen: dict[str, YamlNode] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self.problem(key_node, f"a key must be a plain name, found {_kind(key_node)}")
                continue
            key = key_node.value
            if key in seen:
                first = seen[key].start_mark.line + 1
                self.problem(key_node, f"duplicate key {_excerpt(key, budgeted=key not in allowed)} "
                                       f"(first set at line {first})")
                continue
            seen[key] = key_node
            if key not in allowed:
                spellings = {a.replace("_", "-"): a for a in allowed}
                close = difflib.get_close_matches(key.replace("_", "-"), list(spellings), 1) \
                    if len(key) <= EXCERPT else []
                hint = f"did you mean {spellings[close[0]]!r}?" if close else f"known keys: {', '.join(allowed)}"
                self.problem(key_node, f"unknown key {_excerpt(key, budgeted=not close)}; {hint}")
                continue
            yield key_node, value_node

    def _scalar(self, node):
        yaml = _yaml()

        if not isinstance(node, yaml.ScalarNode):
            return _NOT_SCALAR
        return _construct(node)  # readable: _all_values_readable checked every node

    def _bool(self, node, what: str) -> bool | None:
        value = self._scalar(node)
        if isinstance(value, bool):
            return value
        self.problem(node, f"{what} must be true or false, found {_describe(node, value)}")
        return None

    def _read_listen(self, node, values: _Values) -> None:
        yaml = _yaml()

        values.listen_origin = self.origin(node)
        if _is_null(node):
            values.listen = []
            return
        if not isinstance(node, yaml.SequenceNode):
            self.problem(node, "listen must be a list of addresses, e.g. [80, \"[::1]:8080\"], "
                               f"found {_kind(node, budgeted=False)}")
            return
        entries: list[ListenEntry] = []
        seen: dict[Endpoint, Origin] = {}
        for item in node.value:
            options: dict[str, bool] = {}
            optional: bool | str = False
            address_node = item
            if isinstance(item, yaml.MappingNode):
                address_node = None
                for key_node, value_node in self._mapping_items(item, LISTEN_ENTRY_KEYS):
                    if key_node.value == "address":
                        address_node = value_node
                        continue
                    if key_node.value == "optional":
                        optional = self._optional(value_node)
                        continue
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
            entries.append(ListenEntry(endpoint, options, origin, optional))
        values.listen = entries

    def _optional(self, node) -> bool | str:
        value = self._scalar(node)
        if isinstance(value, bool) or value == IF_AVAILABLE:
            return value
        self.problem(node, f"optional must be true, false or {IF_AVAILABLE}, found {_describe(node, value)}")
        return False

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
        yaml = _yaml()

        if _is_null(node):
            return
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, "options must be a mapping such as {reuseport: true}, "
                               f"found {_kind(node, budgeted=False)}")
            return
        for key_node, value_node in self._mapping_items(node, OPTION_NAMES):
            flag = self._bool(value_node, f"option {key_node.value!r}")
            if flag is not None:
                values.options[key_node.value] = (flag, self.origin(value_node))

    def _read_wait(self, node, values: _Values) -> None:
        value = self._scalar(node)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            self.problem(node, f"wait must be a number of seconds, 0 or more, found {_describe(node, value)}")
            return
        values.wait = (float(value), self.origin(node))

    def _read_policy(self, node, values: _Values) -> None:
        yaml = _yaml()

        if _is_null(node):
            return
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, "policy must map conflict kinds to actions, e.g. {time-wait: wait}, "
                               f"found {_kind(node, budgeted=False)}")
            return
        for key_node, value_node in self._mapping_items(node, tuple(k.value for k in POLICY_KINDS)):
            action = self._scalar(value_node)
            if action not in tuple(Action):
                self.problem(value_node, f"policy for {key_node.value!r} must be one of {', '.join(Action)}, "
                                         f"found {_describe(value_node, action)}")
                continue
            values.policy[key_node.value] = (action, self.origin(value_node))

    def _read_fail(self, node, values: _Values) -> None:
        value = self._scalar(node)
        if value not in FAIL_MODES:
            self.problem(node, f"fail must be 'open' or 'closed', found {_describe(node, value)}")
            return
        values.fail = (value, self.origin(node))

    def _read_nat(self, node, values: _Values) -> None:
        value = self._scalar(node)
        if value is False:  # YAML's `off`, read as a boolean
            value = "off"
        if value not in NAT_SETTINGS:
            self.problem(node, f"nat must be one of {', '.join(NAT_SETTINGS)}, found {_describe(node, value)}")
            return
        values.nat = (value, self.origin(node))

    def _read_reap_stale(self, node, values: _Values) -> None:
        flag = self._bool(node, "reap_stale")
        if flag is not None:
            values.reap_stale = (flag, self.origin(node))

    def _read_trust_guesses(self, node, values: _Values) -> None:
        flag = self._bool(node, "trust_guesses")
        if flag is not None:
            values.trust_guesses = (flag, self.origin(node))

    def _read_discovery(self, node, values: _Values) -> None:
        yaml = _yaml()

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
    return node.tag == NULL


def _kind(node, budgeted: bool = True) -> str:
    yaml = _yaml()

    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return _excerpt(node.value, budgeted)


def _describe(node, value) -> str:
    """A known setting's value as a problem quotes it (always: see _quotes_left)."""
    if value is _NOT_SCALAR:
        return _kind(node, budgeted=False)
    if value is None:
        return "nothing"
    return _excerpt(node.value, budgeted=False, quote="'" if isinstance(value, str) else "")


def _read_text(path: str) -> str:
    """A configuration file's text: a regular file (files.read_regular: a FIFO, a device
    or a directory is never read) of at most MAX_FILE_BYTES of UTF-8; ConfigError otherwise."""
    from bindguard.request import files

    try:
        return files.read_regular(path, MAX_FILE_BYTES).decode("utf-8")
    except files.Refused as exc:
        raise ConfigError(f"{path}: {exc}; a configuration is a YAML file (only a link to /dev/null masks one)",
                          "replace it with a YAML file, or remove it") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); a configuration is a YAML file",
                          "save it as UTF-8") from None
    except OSError as exc:
        dangling = os.path.islink(path) and not os.path.exists(path)
        why = "a link to nothing (dangling)" if dangling else exc.strerror
        raise ConfigError(f"{path}: cannot read: {why}", "check the path and its permissions") from None


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
        if len(problems) >= MAX_PROBLEMS:
            problems.append(f"{path} and the files after it not read: too many problems before them")
            break
        values, file_problems = _read(path)
        problems += file_problems
        if values.listen is not None and values.listen_origin is not None:  # read together
            config.listen = values.listen
            config.origins["listen"] = values.listen_origin
        for name, (flag, origin) in values.options.items():
            config.options[name] = flag
            config.origins[f"options.{name}"] = origin
        for kind, (action, origin) in values.policy.items():
            config.policy[kind] = action
            config.origins[f"policy.{kind}"] = origin
        for name in ("wait", "fail", "reap_stale", "discovery", "trust_guesses", "nat"):
            setting = getattr(values, name)
            if setting is not None:
                setattr(config, name, setting[0])
                config.origins[name] = setting[1]
    return config, problems


def _raise(problems: list[str], what: str) -> None:
    message = problems[0] if len(problems) == 1 else f"{len(problems)} problems in {what}:\n" + "\n".join(problems)
    raise ConfigError(message, "fix the file, then check it with `bindguard config check`", problems)


def load_unit_config(unit: str | None, explicit: str | os.PathLike | None = None) -> UnitConfig | None:
    """The unit's merged configuration, or None when it has no file. Raises ConfigError listing every problem.

    With explicit (--config FILE), that one file is the whole configuration.
    """
    if explicit is not None:
        path = os.fspath(explicit)
        unit = normalize_unit(unit) if unit else os.path.basename(path)
        if not os.path.lexists(path):
            raise ConfigError(f"{path}: no such configuration file", "check the path given to --config")
        files = [path]
    else:
        if unit is None:  # no unit and no file: nothing configured
            return None
        unit = normalize_unit(unit)
        files = config_files(unit)
        if not files:
            return None
    config, problems = _merge(unit, files)
    if problems:
        _raise(problems, f"the configuration of {unit}")
    return config


def declares_fail_closed(unit: str | None, explicit: str | os.PathLike | None = None) -> bool:
    """Whether the unit's files say `fail: closed`, read so that it holds when reading them fully
    fails: the top-level `fail:` of each file from YAML events alone (no composing, no values
    built), the last file's winning as in _merge. Never raises; False when nothing says so.

    The guard's own failure honours this (bindguard.cli.main), whatever stage the failure came from.
    """
    try:
        if explicit is not None:
            files = [os.fspath(explicit)]
        elif unit:
            files = config_files(normalize_unit(unit))
        else:
            return False
        mode = None
        for path in files:
            mode = _top_level_fail(path) or mode
        return mode == "closed"
    except Exception:  # a fault here must not hide the fault being handled
        return False


def _top_level_fail(path: str) -> str | None:
    yaml = _yaml()

    found = None
    try:
        text = _read_text(path)
        depth, is_key, key = 0, True, None
        for event in yaml.parse(text, Loader=_loader_class()):
            if isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent, yaml.CollectionStartEvent)) and depth == 1:
                if is_key:
                    key = event.value if isinstance(event, yaml.ScalarEvent) else None
                elif key == "fail" and isinstance(event, yaml.ScalarEvent):
                    found = event.value
                is_key = not is_key
            if isinstance(event, yaml.CollectionStartEvent):
                if depth == 0 and not isinstance(event, yaml.MappingStartEvent):
                    break
                depth += 1
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
                if depth == 0:
                    break  # one document per file
    except (ConfigError, yaml.YAMLError):
        pass
    return found
