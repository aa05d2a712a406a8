"""Fuzzing `bindguard check ADDRESS`: whatever the address, one of the documented answers.

A fixed seed (derandomize) and a bounded number of cases keep it repeatable and quick. Each
address goes through the command as it runs (the fast path, then the full parser if the fast
path leaves it) and through the full parser alone, in-process, in a network namespace of its own
where 127.0.0.1:9000 is held: exit 0, 64, 98 or 99 only, never a traceback or "internal error",
a usage error names the address, and where the fast path answers, the full parser agrees.
"""

from __future__ import annotations

import sys

import pytest

pytestmark = pytest.mark.integration

FUZZ = r"""
import contextlib, io, re, sys
from hypothesis import HealthCheck, example, given, settings, strategies as st
from bindguard import cli
from bindguard.cli import fastpath
from bindguard.report.output import Console

ANSWERS = {0, 64, 98, 99}
PORTS = ["80", "9000", "1", "65535", "0", "65536", "00080", "000000080", "-1", "²", "٨٠", "８０", "9" * 4301, ""]
HOSTS = ["", "0.0.0.0", "127.0.0.1", "127.0.0.2", "127.000.0.1", "10.9.8.7", "1.2.3", "localhost", "[::]", "[::1]",
         "[::ffff:127.0.0.1]", "[fe80::1]", "[fe80::1%lo]", "[fe80::1%²]", "[fe80::1%]", "[2001:db8::1]", "::1",
         "[1.2.3.4]", "[", "]", "/run/x.sock", "@abstract", "vsock:2"]
PREFIXES = ["", "tcp:", "udp:", "UDP:", "Tcp:", "tcp:udp:"]
ALPHABET = list("0123456789:.[]%abcdefx/@ \t-_") + ["²", "٨", "٠", "８", "\n", "\x1b", "\u200b"]

addresses = st.one_of(
    st.builds(lambda p, h, sep, port: p + h + sep + port,
              st.sampled_from(PREFIXES), st.sampled_from(HOSTS), st.sampled_from([":", "", "::"]),
              st.sampled_from(PORTS) | st.text(alphabet=ALPHABET, max_size=6)),
    st.text(alphabet=ALPHABET, max_size=24),
    st.text(max_size=12),
).filter(lambda a: not a.startswith("-") or a[1:].isdigit())  # the rest are options, not addresses


def run(address, fast):
    console = Console(io.StringIO())
    real = fastpath.check
    with contextlib.redirect_stdout(io.StringIO()):
        if not fast:
            fastpath.check = lambda args, console: None
        try:
            code = cli.main(["check", "--wait", "0", address], console=console)
        finally:
            fastpath.check = real
    # The holder's age ("started 3 s ago") may tick over between the two runs.
    return code, re.sub(r"started [^,]* ago", "started ... ago", console.stream.getvalue())


def judge(address, code, err):
    assert code in ANSWERS, (address, code, err)
    assert "Traceback" not in err and "internal error" not in err, (address, err)
    if code == 64:
        assert repr(address) in err or repr(address.strip()) in err, (address, err)


@settings(max_examples=int(sys.argv[1]), derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
@given(addresses)
def fuzz(address):
    as_run = run(address, fast=True)
    full = run(address, fast=False)
    judge(address, *as_run)
    judge(address, *full)
    assert as_run == full, (address, as_run, full)


for known in ("²", "127.0.0.1:²", "٨٠", "[::1]:８０", "9" * 4301, "127.0.0.1:9000", "10.9.8.7:80", "8080", "-1"):
    fuzz = example(known)(fuzz)
fuzz()
print("fuzzed")
"""


def test_check_answers_any_address_with_a_documented_exit_code(netns, tmp_path):
    netns.hold({"proto": "tcp", "host": "127.0.0.1", "port": 9000, "reuseaddr": True})
    proc = netns.run([sys.executable, "-c", FUZZ, "1500"], cwd=tmp_path, timeout=300,
                     env={"BINDGUARD_CONFIG_PATH": str(tmp_path), "PATH": "/usr/bin:/bin",
                          "PYTHONPATH": ":".join(sys.path), "HOME": str(tmp_path)})
    assert proc.returncode == 0 and proc.stdout.strip() == "fuzzed", proc.stderr[-4000:]
