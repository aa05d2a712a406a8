#!/bin/sh
# iptables-legacy nat rules for tests/test_nat.py: run in a network namespace of the test's own
# (legacy tables are per namespace); nat.save and nat6.save are what iptables-legacy-save -t nat
# (ip6tables-legacy-save) printed after it. Targets are documentation addresses: nothing is sent.
set -e
v4=/usr/sbin/iptables-legacy
v6=/usr/sbin/ip6tables-legacy
# Docker's layout (userland-proxy=false): PREROUTING and OUTPUT jump to DOCKER for local addresses
$v4 -t nat -N DOCKER
$v4 -t nat -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
$v4 -t nat -A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
$v4 -t nat -A DOCKER -i docker0 -j RETURN
$v4 -t nat -A DOCKER ! -i docker0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 192.0.2.7:80
# DNAT to another address, REDIRECT to another port, a NodePort-style range
$v4 -t nat -A PREROUTING -p tcp -m tcp --dport 9000 -j DNAT --to-destination 192.0.2.9:90
$v4 -t nat -A PREROUTING -p udp -m udp --dport 53 -j REDIRECT --to-ports 5353
$v4 -t nat -A PREROUTING -p tcp -m tcp --dport 30000:32767 -m comment --comment "default/web:http" -j DNAT --to-destination 192.0.2.8
# for one address only (192.0.2.50, not .51); multiport to a range of ports
$v4 -t nat -A PREROUTING -d 192.0.2.50/32 -p tcp -m tcp --dport 9020 -j DNAT --to-destination 192.0.2.9
$v4 -t nat -A PREROUTING -d 192.0.2.99/32 -p tcp -m multiport --dports 443,8443,9500:9510 -j REDIRECT --to-ports 9443-9444
# negations read: every address but .50; every port but 1-9100
$v4 -t nat -A PREROUTING ! -d 192.0.2.50/32 -p tcp -m tcp --dport 9040 -j DNAT --to-destination 192.0.2.13
$v4 -t nat -A PREROUTING -d 192.0.2.51/32 -p tcp -m tcp ! --dport 1:9100 -j DNAT --to-destination 192.0.2.10-192.0.2.11:8000-8010
# negations not read (conntrack, tcp flags) and one that excludes every local address: never claimed
$v4 -t nat -A PREROUTING -p tcp -m tcp --dport 9030 -m conntrack ! --ctstate DNAT -j DNAT --to-destination 192.0.2.11
$v4 -t nat -A PREROUTING -p tcp -m tcp --dport 9060 ! --tcp-flags FIN,SYN,RST,ACK SYN -j REDIRECT --to-ports 9061
$v4 -t nat -A PREROUTING -m addrtype ! --dst-type LOCAL -p tcp -m tcp --dport 9050 -j DNAT --to-destination 192.0.2.14
# a match not read: claimed, with the match listed
$v4 -t nat -A PREROUTING -p tcp -m tcp --dport 9031 -m conntrack --ctstate NEW -j DNAT --to-destination 192.0.2.12
# not a DNAT/REDIRECT: nothing to claim
$v4 -t nat -A POSTROUTING -s 10.0.0.0/8 -j MASQUERADE
$v6 -t nat -A PREROUTING -d 2001:db8::5/128 -p tcp -m tcp --dport 8080 -j DNAT --to-destination "[2001:db8::7]:80"
$v6 -t nat -A OUTPUT -p udp -m udp --dport 7777 -j REDIRECT --to-ports 7778
