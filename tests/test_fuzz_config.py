"""Fuzzing the YAML loader: whatever a configuration file says, `config check FILE` and
`check --config FILE` answer 0 or 78, never a traceback or "internal error", and name the file.

A fixed seed (derandomize) and a bounded number of cases keep it repeatable and quick. Files are
made from the keys and values bindguard reads, YAML tags (known, unknown, PyYAML's own), numbers
YAML 1.1 reads strangely (1:20, 010, 0x50), Unicode digits, huge integers, deep nesting, aliases
and raw text. Each runs through the command line's entry point, in-process, in a network
namespace of its own (check probes the addresses of a valid file there): the two commands
must agree on whether the file is valid.
"""

from __future__ import annotations

import sys

import pytest

pytestmark = pytest.mark.integration

FUZZ = r"""
import contextlib, io, os, sys
from hypothesis import HealthCheck, example, given, settings, strategies as st
from bindguard import cli
from bindguard.report.output import Console

TOP = ["listen", "options", "wait", "policy", "fail", "reap_stale", "discovery", "trust_guesses", "lisen", "<<", "x"]
INNER = ["address", "optional", "reuseaddr", "reuseport", "v6only", "freebind", "time-wait", "listener", "orphan", "y"]
SCALARS = ["80", "8080", "0", "65536", "010", "0x50", "1:20", "1_000", "1e3", ".inf", "-.inf", ".nan", "-1", "1.5",
           "true", "yes", "off", "y", "~", "null", "", "'127.0.0.1:8080'", '"[::1]:8080"', "'[fe80::1%lo]:80'",
           "udp:0.0.0.0:53", "'٨٠'", "８０", "'²'", "open", "closed", "refuse", "wait", "if-available",
           "daemon-config", "socket-units", "2001-01-01", "9" * 30, "9" * 5000, "'a\\x1bb'", '"\\u0000"', "*a",
           "&a 80", "? x"]
TAGS = ["!!int", "!!float", "!!str", "!!bool", "!!null", "!!binary", "!!timestamp", "!!set", "!!omap", "!!pairs",
        "!!python/object/apply:os.system", "!!python/name:os.system", "!foo", "!", "!<tag:yaml.org,2002:int>",
        "!!merge", "!!value", "!!yaml"]
RAW = list("abc019:-[]{},#&*!|>'\"%@` \n\t.?") + ["\u00b2", "\u0668", "\uff18", "\x00", "\x1b", "\ufeff", "\r"]

scalars = st.one_of(st.sampled_from(SCALARS), st.integers(-10**6, 10**6).map(str),
                    st.text(alphabet=RAW, max_size=8).map(lambda t: repr(t).replace("\\'", "''")))
tagged = st.builds(lambda tag, value: f"{tag} {value}", st.sampled_from(TAGS), scalars)
values = st.recursive(
    scalars | tagged,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda items: "[" + ", ".join(items) + "]"),
        st.dictionaries(st.sampled_from(INNER + TOP), inner, max_size=4).map(
            lambda d: "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"),
        st.builds(lambda tag, v: f"{tag} {v}", st.sampled_from(TAGS), inner),
    ),
    max_leaves=12,
)
documents = st.dictionaries(st.sampled_from(TOP), values, max_size=6).map(
    lambda d: "".join(f"{k}: {v}\n" for k, v in d.items()))
texts = st.one_of(
    documents,
    st.lists(documents, min_size=2, max_size=3).map("---\n".join),
    st.text(alphabet=RAW, max_size=60),
    st.integers(1, 3000).map(lambda n: "listen: " + "[" * n + "]" * n + "\n"),
    st.builds(lambda n, body: "listen:\n" + "".join("  " * i + "- " for i in range(n)) + body + "\n",
              st.integers(1, 60), scalars),
)

PATH = os.path.join(os.getcwd(), "fuzzed.yaml")


def run(argv):
    console = Console(io.StringIO())
    with contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(argv, console=console)
    return code, console.stream.getvalue()


def judge(argv, code, err):
    assert code in (0, 78), (argv, code, err)
    assert "Traceback" not in err and "internal error" not in err, (argv, err)
    if code == 78:
        assert PATH in err, (argv, err)


@settings(max_examples=int(sys.argv[1]), derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
@given(texts)
def fuzz(text):
    with open(PATH, "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write(text)
    validated = run(["config", "check", PATH])
    judge(text, *validated)
    checked = run(["check", "--no-systemd", "--wait", "0", "--config", PATH, "127.0.0.1:9"])
    judge(text, *checked)
    assert validated[0] == checked[0], (text, validated, checked)


for known in ("wait: !foo 3\n", "wait: !!int abc\n", "wait: !!float x\n", "wait: 1" + "0" * 5000 + "\n",
              "listen: " + "[" * 2000 + "]" * 2000 + "\n", "listen: [1:20]\n", "listen: [!!binary aGVsbG8=]\n",
              "fail: closed\nx: !!python/object/apply:os.system [true]\n", "a: &a [*a]\n", "listen: ['٨٠']\n",
              "listen: [{address: 80, optional: if-available}]\nfail: closed\n", "wait: !!timestamp 2001-01-01\n"):
    fuzz = example(known)(fuzz)
fuzz()
print("fuzzed")
"""


def test_any_configuration_file_is_valid_or_a_config_error_naming_it(netns, tmp_path):
    proc = netns.run([sys.executable, "-c", FUZZ, "400"], cwd=tmp_path, timeout=300,
                     env={"BINDGUARD_CONFIG_PATH": str(tmp_path / "none"), "PATH": "/usr/bin:/bin",
                          "PYTHONPATH": ":".join(sys.path), "HOME": str(tmp_path)})
    assert proc.returncode == 0 and proc.stdout.strip() == "fuzzed", proc.stderr[-4000:]
