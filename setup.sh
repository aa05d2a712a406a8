#!/usr/bin/env bash
# Installs what bindguard needs on Debian 12 and builds ./.venv with it.
#   ./setup.sh          the tool: Debian packages, then bindguard in .venv
#   ./setup.sh --test   the tool and everything the test suite uses, and this tree's Debian
#                       package built (bindguard_VERSION_all.deb) and installed with apt
# Run as root (or with sudo available): it installs Debian packages.
set -euo pipefail
cd "$(dirname "$0")"

packages=(
    python3 python3-venv python3-dev gcc   # the interpreter a distro package would use
    pkg-config libsystemd-dev              # pystemd builds from source against libsystemd
    iproute2 util-linux                    # ss and ip; unshare and nsenter
    systemd dbus dbus-user-session         # a manager and a bus to talk to
)
extras=()
if [ "${1:-}" = "--test" ]; then
    extras=(procps lsof time)   # lsof and GNU time: the benchmark (bench/run.py)
    extras+=(socat)             # a compiled daemon (tests/test_permission_denied.py)
    # discovery is tested on the configuration files these install (none of them is started)
    extras+=(nginx libnginx-mod-stream apache2 haproxy openssh-server redis-server postgresql mariadb-server)
    # the fleet example: ansible-playbook, and the Debian packages its hosts install bindguard on
    # (the test builds the wheel with Debian's setuptools and wheel); promtool checks the alert rules
    extras+=(ansible-core python3-apt python3-yaml python3-pystemd python3-setuptools python3-wheel)
    extras+=(prometheus)
    # NAT rules that take a port away (tests/test_nat.py): real nft, iptables-nft and iptables-legacy rules
    # (iptables provides iptables-legacy-save) in namespaces;
    # a container behind a holder (tests/test_containers.py): rootful and rootless Podman (uidmap and
    # slirp4netns, only recommended by podman) and Docker's engine (docker.io, run by hand by the test,
    # never as a service: its units are disabled below), their image made from busybox-static
    extras+=(nftables iptables podman crun conmon netavark busybox-static uidmap slirp4netns docker.io)
    # the Debian package (tools/build-deb; tests/test_package.py): its Build-Depends, lintian, and
    # what its tests read it with: man-db renders the pages, bash-completion and zsh load the completion
    extras+=(build-essential dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all
             python3-argparse-manpage python3-shtab lintian man-db bash-completion zsh)
fi

sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
missing=()
for p in "${packages[@]}" "${extras[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}" >&2
    # Packages that ship a daemon must not start it here: the tests read their configs only.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
        $sudo chmod 755 /usr/sbin/policy-rc.d
        trap '$sudo rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    # policy-rc.d only keeps a daemon from starting now: docker.io still enables its units (and
    # containerd's, which it brings) for the next boot. The test runs dockerd by hand, never as a
    # service: disable those units, offline too (no running manager needed), but only those this run
    # installs: a Docker someone enabled before is theirs.
    services=()
    if [[ " ${missing[*]} " == *" docker.io "* ]]; then
        services+=(docker.service docker.socket)
        dpkg -s containerd >/dev/null 2>&1 || services+=(containerd.service)
    fi
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    [ ${#services[@]} -eq 0 ] || $sudo systemctl disable --quiet "${services[@]}"
fi

[ -x .venv/bin/python ] || /usr/bin/python3 -m venv .venv
if [ "${1:-}" = "--test" ]; then
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
else
    .venv/bin/pip install -q --disable-pip-version-check -e .
fi
.venv/bin/python -m compileall -q src  # ready bytecode: the guard runs before every start
if [ "${1:-}" = "--test" ]; then
    # The tests run /usr/bin/bindguard from this tree's Debian package too: build it and install
    # it (it stays installed; `apt-get remove bindguard` takes it away). Never the package
    # bindguard-every-service built beside it: it would guard every service of this machine (the
    # tests read it from its .deb).
    tools/build-deb >/dev/null
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --reinstall ./bindguard_*_all.deb >/dev/null
    echo "setup: installed $(ls bindguard_*_all.deb): /usr/bin/bindguard" >&2
fi
echo "setup: done; run .venv/bin/bindguard --help" >&2
