"""ListenStream= syntax and the overlap rule: pure logic."""

import ipaddress

import pytest

from bindguard.model.endpoints import TCP, UDP, AddressError, Endpoint, addresses_overlap, parse_listen


def ep(text: str) -> Endpoint:
    return parse_listen(text)


@pytest.mark.parametrize(
    "text, proto, host, port, shown",
    [
        ("8080", TCP, "::", 8080, "[::]:8080"),
        ("0.0.0.0:80", TCP, "0.0.0.0", 80, "0.0.0.0:80"),
        ("127.0.0.1:8080", TCP, "127.0.0.1", 8080, "127.0.0.1:8080"),
        ("[::]:443", TCP, "::", 443, "[::]:443"),
        ("[::1]:8080", TCP, "::1", 8080, "[::1]:8080"),
        ("udp:[::1]:53", UDP, "::1", 53, "udp:[::1]:53"),
        ("UDP:53", UDP, "::", 53, "udp:[::]:53"),
        ("tcp:127.0.0.1:1", TCP, "127.0.0.1", 1, "127.0.0.1:1"),
        ("[fe80::1%lo]:80", TCP, "fe80::1", 80, "[fe80::1%lo]:80"),
        ("[::ffff:127.0.0.1]:80", TCP, "::ffff:127.0.0.1", 80, "[::ffff:127.0.0.1]:80"),
    ],
)
def test_parse(text, proto, host, port, shown):
    e = parse_listen(text)
    assert (e.proto, e.host, e.port, str(e)) == (proto, ipaddress.ip_address(host), port, shown)


@pytest.mark.parametrize(
    "text, says",
    [
        ("0", "out of range"),
        ("70000", "out of range"),
        ("1.2.3.4:0", "out of range"),
        ("localhost:80", "not an IPv4 address"),
        ("1.2.3:80", "not an IPv4 address"),
        ("::1:80", "brackets"),
        ("[::1]80", "[ADDRESS]:PORT"),
        ("[zz::1]:80", "not an IPv6 address"),
        ("[fe80::1]:80", "needs its interface"),
        ("127.0.0.1", "missing port"),
        ("127.0.0.1:http", "not a number"),
        ("/run/foo.sock", "not an IP address"),
        ("", "empty"),
        ("udp:", "empty"),
    ],
)
def test_bad_addresses_say_what_and_how(text, says):
    with pytest.raises(AddressError) as exc:
        parse_listen(text)
    assert says in str(exc.value)
    assert repr(text) in str(exc.value)


OVERLAP = [
    # new, new_v6only, old, old_v6only, overlaps
    ("0.0.0.0:1", False, "127.0.0.1:1", False, True),
    ("127.0.0.1:1", False, "0.0.0.0:1", False, True),
    ("127.0.0.1:1", False, "127.0.0.2:1", False, False),
    ("[::]:1", False, "0.0.0.0:1", False, True),
    ("[::]:1", True, "0.0.0.0:1", False, False),
    ("0.0.0.0:1", False, "[::]:1", False, True),
    ("0.0.0.0:1", False, "[::]:1", True, False),
    ("127.0.0.1:1", False, "[::]:1", False, True),
    ("[::]:1", True, "[::]:1", False, True),
    ("[::1]:1", False, "[::]:1", True, True),
    ("[::1]:1", False, "127.0.0.1:1", False, False),
    ("0.0.0.0:1", False, "[::1]:1", False, False),  # live: bhash2 keeps them apart
    ("0.0.0.0:1", False, "[::1]:1", None, True),  # TIME_WAIT of unknown v6only: it may block
    ("[::ffff:127.0.0.1]:1", False, "127.0.0.1:1", False, True),
    ("[::ffff:127.0.0.1]:1", False, "0.0.0.0:1", False, True),
    ("[::ffff:127.0.0.1]:1", False, "127.0.0.2:1", False, False),
    ("0.0.0.0:1", False, "0.0.0.0:2", False, False),
    ("udp:0.0.0.0:1", False, "0.0.0.0:1", False, False),
]


@pytest.mark.parametrize("new, new_v6only, old, old_v6only, expected", OVERLAP)
def test_overlap(new, new_v6only, old, old_v6only, expected):
    assert addresses_overlap(ep(new), new_v6only, ep(old), old_v6only) is expected
