"""A file the guard is pointed at is quoted in a message by at most one short excerpt (issue 9,
item 10): `--config /etc/shadow` or a daemon configuration that is really a root-only file of
secrets must not come back line by line in errors or warnings, which reach the journal."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from test_discover import need_package

from bindguard.model.text import EXCERPT

BINDGUARD = [sys.executable, "-m", "bindguard"]
SECRETS = [
    "root:$y$j9T$Zq8Xw7Vv6Uu5Tt4Ss3Rr2Qq1Pp0Oo9Nn8Mm7Ll6Kk5Jj4Ii3:19000:0:99999:7:::",
    "daemon:$6$Hq3Lz7Xk2Vw9Np4Rt8Ys1Jf6Bd5Gm0Cu:19000:0:99999:7:::",
    "api_token=Qm9vX2xpbmUtdHdvLXNlY3JldC12YWx1ZS1oZXJl",
    "aws_secret_access_key wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY",
    "[client]",
    "password=Tr0ub4dor3HorseBatteryStaple9921",
    "<VirtualHost LdapBindPassw0rd-Xy81Kq",
    "</Directory Zx9SecretPathFragment>",
]
# A YAML file whose keys are the secrets (as the lines of /etc/shadow parse), for --config.
YAML_SECRETS = [
    "root:$y$j9T$Zq8Xw7Vv6Uu5Tt4Ss3Rr2Qq1Pp0Oo9Nn8Mm7Ll6Kk5Jj4Ii3:19000:0:99999:7::: x",
    "daemon_Hq3Lz7Xk2Vw9Np4Rt8Ys1Jf6Bd5Gm0Cu: x",
    "api_token_Qm9vX2xpbmUtdHdvLXNlY3JldC12YWx1ZS1oZXJl: x",
    "Tr0ub4dor3HorseBatteryStaple9921: x",
]


def longest_shared(secret: str, text: str) -> int:
    """The length of the longest piece of secret found in text."""
    best = 0
    for start in range(len(secret)):
        length = best + 1
        while start + length <= len(secret) and secret[start:start + length] in text:
            best = length
            length += 1
    return best


def root_only(path, lines: list[str]):
    path.write_text("\n".join(lines) + "\n")
    os.chmod(path, 0o600)
    return path


@pytest.fixture
def secret_file(tmp_path):
    return root_only(tmp_path / "shadow", SECRETS)


def assert_at_most_one_excerpt(text: str, secrets: list[str] = SECRETS) -> None:
    shown = {secret: longest_shared(secret.removesuffix(": x"), text) for secret in secrets}
    quoted = {secret: n for secret, n in shown.items() if n >= 10}
    assert len(quoted) <= 1 and all(n <= EXCERPT for n in quoted.values()), (quoted, text)


def test_a_configuration_that_is_no_configuration_is_quoted_once(tmp_path):
    path = root_only(tmp_path / "shadow", YAML_SECRETS)
    for command in (["check", "--config", str(path), "8080"], ["config", "check", str(path)]):
        done = subprocess.run([*BINDGUARD, *command], capture_output=True, text=True, timeout=60)
        assert done.returncode == 78, done.stderr
        assert f"{path}:2:1: unknown key" in done.stderr, done.stderr  # each problem keeps its line
        assert_at_most_one_excerpt(done.stdout + done.stderr, YAML_SECRETS)


@pytest.mark.parametrize("daemon", ["nginx", "sshd", "apache2", "haproxy", "mariadbd", "postgres", "redis-server"])
def test_a_daemon_configuration_of_secrets_is_quoted_once(secret_file, daemon):
    if daemon == "sshd":  # sshd -T runs, and its complaint quotes the file
        need_package("openssh-server", "/usr/sbin/sshd")
    done = subprocess.run([*BINDGUARD, "discover", "--daemon", daemon, "--config", str(secret_file)],
                                        capture_output=True, text=True, timeout=60)
    assert done.returncode in (0, 1), done.stderr
    assert_at_most_one_excerpt(done.stdout + done.stderr)
