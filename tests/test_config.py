"""YAML configuration: precedence, drop-ins, validation positions, the CLI, and the cheap no-file path."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bindguard.request import config
from bindguard.systemd import unitfiles
from bindguard.model.endpoints import parse_listen
from bindguard.model.errors import ExitCode, ConfigError


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """etc, run and lib config directories, in that order of precedence, as the search path."""
    found = {name: tmp_path / name for name in ("etc", "run", "lib")}
    for d in found.values():
        d.mkdir()
    monkeypatch.setenv(unitfiles.SEARCH_PATH_ENV, ":".join(str(d) for d in found.values()))
    return found


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def bindguard(*args: str, env_path: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if env_path is not None:
        env[unitfiles.SEARCH_PATH_ENV] = env_path
    return subprocess.run([sys.executable, "-m", "bindguard", *args], capture_output=True, text=True, env=env,
                          timeout=60)


# --- lookup and merge ---------------------------------------------------------------------------

def test_no_file_is_none(dirs):
    assert config.load_unit_config("nginx.service") is None


def test_etc_masks_run_and_lib(dirs):
    write(dirs["lib"] / "web.service.yaml", "wait: 1\n")
    write(dirs["run"] / "web.service.yaml", "wait: 2\n")
    assert config.load_unit_config("web.service").wait == 2
    etc = write(dirs["etc"] / "web.service.yaml", "wait: 3\n")
    loaded = config.load_unit_config("web")
    assert loaded.wait == 3
    assert loaded.files == [str(etc)]
    assert str(loaded.origins["wait"]) == f"{etc}:1:7"


def test_dev_null_link_masks_and_reads_nothing(dirs):
    write(dirs["lib"] / "web.service.yaml", "wait: 1\n")
    (dirs["etc"] / "web.service.yaml").symlink_to("/dev/null")
    assert config.load_unit_config("web.service") is None


def test_dropins_merge_in_lexical_order_across_directories(dirs):
    main = write(dirs["lib"] / "web.service.yaml", """
        listen: [80, "127.0.0.1:8080"]
        wait: 10
        options: {reuseport: true}
        policy: {orphan: warn}
        """)
    write(dirs["lib"] / "web.service.yaml.d" / "20-wait.yaml", "wait: 20\n")
    masked = write(dirs["lib"] / "web.service.yaml.d" / "30-policy.yaml", "policy: {listener: ignore}\n")
    over = write(dirs["etc"] / "web.service.yaml.d" / "30-policy.yaml", "policy: {listener: warn}\n")
    late = write(dirs["run"] / "web.service.yaml.d" / "40-listen.yaml", """
        listen:
          - "[::1]:9000"
        options: {v6only: true}
        """)
    loaded = config.load_unit_config("web.service")
    assert loaded.files == [str(main), str(dirs["lib"] / "web.service.yaml.d" / "20-wait.yaml"), str(over), str(late)]
    assert str(masked) not in loaded.files
    assert loaded.wait == 20
    assert loaded.policy == {"orphan": "warn", "listener": "warn"}
    assert loaded.options == {"reuseport": True, "v6only": True}
    assert [str(e.endpoint) for e in loaded.listen] == ["[::1]:9000"]  # a drop-in's listen list replaces
    assert str(loaded.origins["listen"]) == f"{late}:2:3"
    assert str(loaded.origins["options.reuseport"]) == f"{main}:3:22"


def test_dropins_without_main_file(dirs):
    write(dirs["etc"] / "web.service.yaml.d" / "x.yaml", "fail: closed\n")
    loaded = config.load_unit_config("web.service")
    assert loaded.fail_closed and loaded.listen is None


def test_instance_reads_its_template(dirs):
    write(dirs["lib"] / "pg@.service.yaml", "listen: [5432]\n")
    write(dirs["etc"] / "pg@.service.yaml.d" / "a.yaml", "wait: 4\n")
    write(dirs["etc"] / "pg@15-main.service.yaml.d" / "b.yaml", "wait: 5\n")
    loaded = config.load_unit_config("pg@15-main.service")
    assert [e.endpoint.port for e in loaded.listen] == [5432]
    assert loaded.wait == 5
    write(dirs["lib"] / "pg@15-main.service.yaml", "listen: [5433]\n")
    assert [e.endpoint.port for e in config.load_unit_config("pg@15-main.service").listen] == [5433]


def test_explicit_file_is_the_whole_configuration(dirs, tmp_path):
    write(dirs["etc"] / "web.service.yaml", "wait: 3\n")
    explicit = write(tmp_path / "mine.yaml", "wait: 7\n")
    assert config.load_unit_config("web.service", explicit).wait == 7
    with pytest.raises(ConfigError, match="no such configuration file"):
        config.load_unit_config("web.service", tmp_path / "missing.yaml")


def test_binds_resolve_options(dirs):
    write(dirs["etc"] / "web.service.yaml", """
        listen:
          - 80
          - {address: "udp:0.0.0.0:53", reuseport: true}
          - address: "[::]:443"
            v6only: true
        options: {reuseaddr: false}
        discovery: [socket-units]
        """)
    loaded = config.load_unit_config("web.service")
    binds = loaded.binds(bindv6only=False)
    assert [str(b) for b in binds] == [str(parse_listen("80")), "udp:0.0.0.0:53", "[::]:443"]
    assert [b.options.reuseaddr for b in binds] == [False, False, False]
    assert [b.options.reuseport for b in binds] == [False, True, False]
    assert binds[2].v6only and not binds[0].options.v6only
    assert loaded.discovery_sources == {"socket-units"}


def test_optional_listen_entries(dirs):
    write(dirs["etc"] / "redis-server.service.yaml", """
        listen:
          - 127.0.0.1:6379
          - {address: "[::1]:6379", optional: if-available}
          - {address: "127.0.0.2:6379", optional: yes}
          - {address: "127.0.0.3:6379", optional: false}
        """)
    loaded = config.load_unit_config("redis-server")
    assert [e.optional for e in loaded.listen] == [False, "if-available", True, False]


def test_discovery_false_and_empty_file(dirs):
    write(dirs["etc"] / "a.service.yaml", "discovery: false\n")
    assert config.load_unit_config("a.service").discovery_sources == frozenset()
    write(dirs["etc"] / "b.service.yaml", "# nothing yet\n")
    empty = config.load_unit_config("b.service")
    assert empty.listen is None and empty.discovery_sources == set(config.DISCOVERY_SOURCES)


# --- validation: every problem, each at file:line:column ------------------------------------------

BAD = """\
listen:
  - 80
  - "[::1]:8080"
  - {address: "udp:0.0.0.0:53", reuseport: yes, mtu: 3}
  - 80
  - "300.1.1.1:80"
  - true
  - {reuseport: true}
lisen: 3
options: {reuseport: maybe, v6only: true}
wait: -3
policy:
  time-wait: wait
  orphans: ignore
  listener: kill
fail: open
fail: closed
discovery: [daemon-config, foo, daemon-config]
reap_stale: 1
"""


def test_every_problem_with_its_position(tmp_path):
    path = write(tmp_path / "x.yaml", BAD)
    problems = config.validate_file(path)
    assert problems == [
        f"{path}:4:49: unknown key 'mtu'; known keys: address, reuseaddr, reuseport, v6only, freebind, optional",
        f"{path}:5:5: duplicate listen entry {parse_listen('80')} (also at line 2)",
        f"{path}:6:5: bad listen address: '300.1.1.1:80': '300.1.1.1' is not an IPv4 address "
        "(host names are not resolved; write the address)",
        f"{path}:7:5: a listen address must be a port or ADDRESS:PORT, found true",
        f"{path}:8:5: a listen entry written as a mapping needs 'address', e.g. {{address: 80, reuseport: true}}",
        f"{path}:9:1: unknown key 'lisen'; did you mean 'listen'?",
        f"{path}:10:22: option 'reuseport' must be true or false, found 'maybe'",
        f"{path}:11:7: wait must be a number of seconds, 0 or more, found -3",
        f"{path}:14:3: unknown key 'orphans'; did you mean 'orphan'?",
        f"{path}:15:13: policy for 'listener' must be one of refuse, wait, warn, ignore, found 'kill'",
        f"{path}:17:1: duplicate key 'fail' (first set at line 16)",
        f"{path}:18:28: unknown discovery source 'foo'; write any of daemon-config, exec-start, socket-units",
        f"{path}:18:33: duplicate discovery source 'daemon-config'",
        f"{path}:19:13: reap_stale must be true or false, found 1",
    ]


@pytest.mark.parametrize("text, expected", [
    ("listen: [80\nwait: 3\n",
     "2:5: YAML syntax error: while parsing a flow sequence expected ',' or ']', but got ':'"),
    ("- 80\n", "1:1: expected a mapping of settings (listen, options, wait, policy, fail, reap_stale, discovery, "
               "trust_guesses, nat), "
               "found a list"),
    ("wait: 1\n---\nwait: 2\n", "3:1: a second YAML document; write one document per file (remove the '---')"),
    ("listen: 80\n", "1:9: listen must be a list of addresses, e.g. [80, \"[::1]:8080\"], found '80'"),
    ("options: [reuseport]\n", "1:10: options must be a mapping such as {reuseport: true}, found a list"),
    ("wait: soon\n", "1:7: wait must be a number of seconds, 0 or more, found 'soon'"),
    ("fail: sometimes\n", "1:7: fail must be 'open' or 'closed', found 'sometimes'"),
    ("discovery: maybe\n", "1:12: discovery must be true, false or a list of sources "
                           "(daemon-config, exec-start, socket-units), found 'maybe'"),
    ("policy: refuse\n", "1:9: policy must map conflict kinds to actions, e.g. {time-wait: wait}, found 'refuse'"),
    ("listen: ['[fe80::1]:80']\n", "1:10: bad listen address: '[fe80::1]:80': a link-local address needs its "
                                   "interface; write e.g. [fe80::1%eth0]:80"),
    ("reap-stale: true\n", "1:1: unknown key 'reap-stale'; did you mean 'reap_stale'?"),
    ("zzz: 1\n", "1:1: unknown key 'zzz'; known keys: listen, options, wait, policy, fail, reap_stale, discovery, "
                "trust_guesses, nat"),
    ("nat: sometimes\n", "1:6: nat must be one of off, warn, refuse, found 'sometimes'"),
    ("trust_guesses: sometimes\n", "1:16: trust_guesses must be true or false, found 'sometimes'"),
    ("listen: [{address: 80, optional: maybe}]\n",
     "1:34: optional must be true, false or if-available, found 'maybe'"),
])
def test_one_problem(tmp_path, text, expected):
    path = write(tmp_path / "one.yaml", text)
    assert config.validate_file(path) == [f"{path}:{expected}"]


def test_load_raises_config_error_with_all_problems(dirs):
    path = write(dirs["etc"] / "web.service.yaml", "wait: -1\nfail: x\n")
    with pytest.raises(ConfigError) as caught:
        config.load_unit_config("web.service")
    assert caught.value.exit_code == ExitCode.CONFIG == 78
    assert caught.value.problems == [
        f"{path}:1:7: wait must be a number of seconds, 0 or more, found -1",
        f"{path}:2:7: fail must be 'open' or 'closed', found 'x'",
    ]


def test_valid_example_file():
    example = Path(__file__).resolve().parent.parent / "examples" / "bindguard.yaml.example"
    assert config.validate_file(example) == []


# --- the CLI ------------------------------------------------------------------------------------

def test_config_check_cli(dirs, tmp_path):
    search = os.environ[unitfiles.SEARCH_PATH_ENV]
    good = write(dirs["etc"] / "web.service.yaml", "listen: [8080]\n")
    proc = bindguard("config", "check", "web.service", env_path=search)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"{good}: ok\n", "")
    bad = write(tmp_path / "bad.yaml", "wait: x\nlisen: []\n")
    proc = bindguard("config", "check", str(bad), env_path=search)
    assert proc.returncode == 78
    assert proc.stderr.splitlines() == [
        f"{bad}:1:7: wait must be a number of seconds, 0 or more, found 'x'",
        f"{bad}:2:1: unknown key 'lisen'; did you mean 'listen'?",
    ]
    write(dirs["lib"] / "db.service.yaml.d" / "x.yaml", "fail: maybe\n")
    proc = bindguard("config", "check", env_path=search)
    assert proc.returncode == 78 and "db.service.yaml.d/x.yaml:1:7: fail must be" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = bindguard("config", "check", str(tmp_path / "nope.yaml"), env_path=search)
    assert proc.returncode == 64 and "no such file" in proc.stderr


def test_config_show_cli(dirs):
    search = os.environ[unitfiles.SEARCH_PATH_ENV]
    main = write(dirs["lib"] / "web.service.yaml", "listen: [\"127.0.0.1:8080\"]\nwait: 10\n")
    drop = write(dirs["etc"] / "web.service.yaml.d" / "10.yaml", "wait: 2.5\npolicy: {orphan: warn}\n")
    proc = bindguard("config", "show", "web", env_path=search)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"# web.service: {main}, {drop}"
    assert any(line.startswith('  - "127.0.0.1:8080"') and line.endswith(f"# {main}:1:10") for line in lines)
    assert any(line.startswith("wait: 2.5") and line.endswith(f"# {drop}:1:7") for line in lines)
    assert any(line.startswith("  orphan: warn") and line.endswith(f"# {drop}:2:18") for line in lines)
    assert any(line.startswith("  time-wait: wait") and line.endswith("# default") for line in lines)
    proc = bindguard("config", "show", "none.service", env_path=search)
    assert proc.returncode == 0 and "no configuration file" in proc.stdout
    write(dirs["etc"] / "broken.service.yaml", "listen: [\n")
    proc = bindguard("config", "show", "broken.service", env_path=search)
    assert proc.returncode == 78 and "YAML syntax error" in proc.stderr and "Traceback" not in proc.stderr



def test_config_show_states_the_defaults_the_guard_applies(dirs):
    """`config show` prints, for a kind the files leave alone, what the guard then does: an address
    still in IPv6 duplicate address detection clears by itself and is waited for, not refused."""
    from bindguard.model.endpoints import Bind, SocketOptions
    from bindguard.model.kinds import POLICY_KINDS, Action, ConflictKind
    from bindguard.verdict.conflicts import Conflict
    from bindguard.verdict.policy import default_action

    proc = bindguard("config", "show", "web.service", env_path=os.environ[unitfiles.SEARCH_PATH_ENV])
    assert proc.returncode == 0, proc.stderr
    stated = {}  # kind -> (the action, as a file writes it; the comment saying when the guard waits instead)
    for line in proc.stdout.splitlines():
        text, _, comment = line.partition("# ")
        if line.startswith("  ") and comment.startswith("default") and ": " in text:
            kind, action = text.strip().split(": ", 1)
            stated[kind] = (action, comment.removeprefix("default").strip(" ()"))
    assert set(stated) >= {str(kind) for kind in POLICY_KINDS}
    bind = Bind(parse_listen("[2001:db8::1]:80"), SocketOptions())
    in_dad = Conflict(bind, ConflictKind.ADDRESS_UNAVAILABLE, clears=True)
    absent = Conflict(bind, ConflictKind.ADDRESS_UNAVAILABLE)
    assert (default_action(in_dad), default_action(absent)) == (Action.WAIT, Action.REFUSE)
    assert stated["address-unavailable"] == ("refuse", "wait while the address is in duplicate address detection")
    assert stated["listener"] == ("refuse", "wait while its holder is stopping or exiting")
    # Every kind a leaving holder can have (verdict.conflicts.attribution) says it is waited for.
    for kind in ("bound", "socket-unit", "own-instance", "orphan"):
        assert stated[kind] == ("refuse", "wait while its holder is stopping or exiting"), kind
    assert (stated["time-wait"], stated["latent-socket-unit"], stated["self-conflict"]) == (
        ("wait", ""), ("warn", ""), ("refuse", ""))

# --- the cheap path -----------------------------------------------------------------------------

def test_no_file_does_not_import_yaml(dirs):
    code = ("import sys; from bindguard.request import config; "
            "assert config.load_unit_config('nothing.service') is None; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('yaml', 'pathlib', 'difflib')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# --- hostile or broken files: a file:line problem (78) each, never an internal error ------------

UNREADABLE_VALUES = [
    ("wait: !foo 3\n", "1:7: unsupported tag '!foo'; write plain values (strings, numbers, true/false)"),
    ("wait: !!int abc\n", "1:7: 'abc' is not a valid !!int"),
    ("wait: !!float x\n", "1:7: 'x' is not a valid !!float"),
    ("wait: 1" + "0" * 5000 + "\n", "1:7: the number '1000000000000000000000000000000000000000'... is too large"),
    ("listen: [!!binary aGVsbG8=]\n",
     "1:10: unsupported tag '!!binary'; write plain values (strings, numbers, true/false)"),
    ("wait: !!timestamp 2001-01-01\n",
     "1:7: unsupported tag '!!timestamp'; write plain values (strings, numbers, true/false)"),
    ("options: !!set {reuseport}\n", "1:10: unsupported tag '!!set'; write a plain list or mapping"),
    ("fail: closed\nx: !!python/object/apply:os.system [true]\n",
     "2:4: unsupported tag '!!python/object/apply:os.system'; write a plain list or mapping"),
    ("listen: " + "[" * 2000 + "]" * 2000 + "\n", "1:40: YAML syntax error: nested deeper than 32 levels"),
]


@pytest.mark.parametrize("text, expected", UNREADABLE_VALUES)
def test_unreadable_values_are_problems_at_their_position(tmp_path, text, expected):
    path = write(tmp_path / "x.yaml", text)
    assert config.validate_file(path) == [f"{path}:{expected}"]


def test_unreadable_values_exit_78_from_check_and_config_check(tmp_path):
    """They were "internal error", exit 0, even in a file that says `fail: closed`."""
    for n, (text, expected) in enumerate(UNREADABLE_VALUES):
        path = write(tmp_path / f"{n}.yaml", "fail: closed\n" + text if not text.startswith("fail:") else text)
        for args in (("config", "check", str(path)), ("check", "--no-systemd", "--config", str(path), "127.0.0.1:9")):
            proc = bindguard(*args)
            assert proc.returncode == 78, (args, proc.stderr)
            assert str(path) in proc.stderr and "internal error" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("text, expected", [
    ("listen: [1:20]\n", "1:10: bad listen address: '1:20': '1' is not an IPv4 address "
                         "(host names are not resolved; write the address)"),  # YAML 1.1: 80 (base 60)
    ("listen: [\"٨٠\"]\n", "1:10: bad listen address: '٨٠': port '٨٠' is not a number; write a port from 1 to 65535"),
    ("listen: [８０]\n", "1:10: bad listen address: '８０': port '８０' is not a number; write a port from 1 to 65535"),
    ("listen: [0x50]\n", "1:10: bad listen address: '0x50': missing port; write ADDRESS:PORT, "
                         "e.g. 127.0.0.1:8080, or a bare port"),
    ("wait: 1:30\n", "1:7: wait must be a number of seconds, 0 or more, found '1:30'"),
    ("wait: .inf\n", "1:7: wait must be a number of seconds, 0 or more, found .inf"),
])
def test_no_yaml_11_numbers_and_only_ascii_ports(tmp_path, text, expected):
    path = write(tmp_path / "x.yaml", text)
    assert config.validate_file(path) == [f"{path}:{expected}"]


def test_a_leading_zero_is_decimal(dirs):
    write(dirs["etc"] / "web.service.yaml", "listen: [010, \"127.0.0.1:0080\"]\nwait: 010\n")
    loaded = config.load_unit_config("web.service")
    assert [e.endpoint.port for e in loaded.listen] == [10, 80] and loaded.wait == 10  # YAML 1.1: 8


def _non_files(etc: Path) -> dict:
    """What can stand at a configuration path other than a file, made for real."""
    return {
        "dangling link": lambda p: p.symlink_to(etc / "nowhere.yaml"),
        "looping link": lambda p: p.symlink_to(p.name),
        "directory": lambda p: p.mkdir(),
        "FIFO": lambda p: os.mkfifo(p),
        "link to /dev/zero": lambda p: p.symlink_to("/dev/zero"),
    }


@pytest.mark.parametrize("what", list(_non_files(Path("/"))))
def test_a_non_file_is_a_problem_and_does_not_mask(dirs, what):
    """It masked the packaged file (even `fail: closed`): exit 0, nothing said, `config check` ok."""
    write(dirs["lib"] / "web.service.yaml", "fail: closed\nlisten: [\"127.0.0.1:9\"]\n")
    path = dirs["etc"] / "web.service.yaml"
    _non_files(dirs["etc"])[what](path)
    with pytest.raises(ConfigError) as caught:
        config.load_unit_config("web.service")
    assert caught.value.message.startswith(f"{path}: ")
    search = os.environ[unitfiles.SEARCH_PATH_ENV]
    for args in (("check", "--unit", "web.service", "--no-systemd"), ("config", "check", "web.service"),
                 ("config", "check"), ("config", "check", str(path))):
        proc = bindguard(*args, env_path=search)
        assert proc.returncode == 78, (args, proc.stderr)
        assert f"{path}: " in proc.stderr


def test_a_non_file_drop_in_is_a_problem_and_dev_null_masks_one(dirs):
    write(dirs["lib"] / "web.service.yaml.d" / "10.yaml", "wait: 1\n")
    write(dirs["lib"] / "web.service.yaml.d" / "20.yaml", "wait: 2\n")
    (dirs["etc"] / "web.service.yaml.d").mkdir()
    (dirs["etc"] / "web.service.yaml.d" / "20.yaml").symlink_to("/dev/null")
    assert config.load_unit_config("web.service").wait == 1
    os.mkfifo(dirs["etc"] / "web.service.yaml.d" / "10.yaml")
    with pytest.raises(ConfigError, match="10.yaml: a FIFO, not a regular file"):
        config.load_unit_config("web.service")


def test_size_and_problem_count_are_bounded(tmp_path):
    """400,000 unknown keys took 24 s and 633 MB; a 50 MB comment 27 s."""
    big = tmp_path / "big.yaml"
    big.write_text("#" * (config.MAX_FILE_BYTES + 1))
    assert config.validate_file(big) == [f"{big}: {config.MAX_FILE_BYTES + 1} bytes, more than the 1 MiB "
                                         "bindguard reads of one file; a configuration is a YAML file "
                                         "(only a link to /dev/null masks one)"]
    many = write(tmp_path / "many.yaml", "".join(f"lisen{i}: 1\n" for i in range(20000)))
    problems = config.validate_file(many)
    assert len(problems) == config.MAX_PROBLEMS + 1
    assert problems[-1] == f"{many}: more problems; only the first {config.MAX_PROBLEMS} are listed"


def _run_with_a_fault_in(target: str, *args: str, env_path: str) -> subprocess.CompletedProcess:
    """bindguard with one of its own functions broken, as a bug or a botched upgrade would."""
    module, name = target.rsplit(".", 1)
    code = (f"import sys, importlib; m = importlib.import_module({module!r}); "
            f"setattr(m, {name!r}, lambda *a, **k: 1 / 0); "
            "from bindguard.cli import main; sys.exit(main(sys.argv[1:]))")
    env = dict(os.environ, **{unitfiles.SEARCH_PATH_ENV: env_path})
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=60)


def test_fail_closed_in_the_file_holds_for_a_fault_while_reading_it(dirs):
    write(dirs["lib"] / "web.service.yaml", "listen: [\"127.0.0.1:9\"]\nfail: closed\n")
    search = os.environ[unitfiles.SEARCH_PATH_ENV]
    for broken in ("bindguard.request.config._merge", "bindguard.action.guard.run"):
        proc = _run_with_a_fault_in(broken, "check", "--unit", "web.service", "--no-systemd", env_path=search)
        assert proc.returncode == 70, (broken, proc.stderr)
        assert "internal error: ZeroDivisionError" in proc.stderr and "failing closed" in proc.stderr
    write(dirs["etc"] / "web.service.yaml.d" / "open.yaml", "fail: 'open'\n")  # a later file wins
    proc = _run_with_a_fault_in("bindguard.request.config._merge", "check", "--unit", "web.service", "--no-systemd",
                                env_path=search)
    assert proc.returncode == 0 and "letting the start go on" in proc.stderr


def test_fail_closed_in_the_file_of_the_unit_the_guard_runs_in_holds_from_the_start(dirs):
    # No --unit: the unit is the one the guard runs in (its cgroup names it, here web.service). The
    # file's `fail: closed` is decided before check runs, so a fault in its very first step (the
    # systemd context) fails closed too; it used to reach the handler only once the plan had run.
    write(dirs["lib"] / "web.service.yaml", "listen: [\"127.0.0.1:9\"]\nfail: closed\n")
    code = ("import sys; from bindguard.systemd import unitfiles; from bindguard.cli.commands import check; "
            "unitfiles.unit_from_cgroup = lambda path: 'web.service'; "
            "check.systemd_context = lambda args: 1 / 0; "
            "from bindguard.cli import main; sys.exit(main(sys.argv[1:]))")
    env = dict(os.environ, INVOCATION_ID="0123456789abcdef0123456789abcdef")
    proc = subprocess.run([sys.executable, "-c", code, "check"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 70, proc.stderr
    assert "internal error: ZeroDivisionError" in proc.stderr and "failing closed" in proc.stderr
