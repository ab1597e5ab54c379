"""The milter settings (proxsmtpd.conf(5)): Milters in Postfix's syntax
(MILTER_README: inet:host:port, inet:[IPv6]:port, unix:/path), its parser
tried with hypothesis, and MilterDefaultAction and MilterTimeout's checks."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxsmtp.net import addresses
from proxsmtp.net.addresses import AddressError, MilterAddress
from proxsmtp.process import config

pytestmark = pytest.mark.unit

FAST = settings(max_examples=300, deadline=None)
LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
HOSTNAME = st.lists(LABEL, min_size=1, max_size=4).map(".".join).filter(
    lambda name: not name.replace(".", "").isdigit())
IPV4 = st.ip_addresses(v=4).map(str)
IPV6 = st.ip_addresses(v=6).map(str)
PORT = st.integers(1, 65535)
PATH = st.lists(st.from_regex(r"[A-Za-z0-9_.-]{1,12}", fullmatch=True), min_size=1,
                max_size=4).map(lambda parts: "/" + "/".join(parts))


def parse(text: str) -> config.Config:
    return config.parse("OutAddress: 127.0.0.1:2525\n" + text + "\n", "milter.conf")


@FAST
@given(st.one_of(HOSTNAME, IPV4), PORT)
def test_inet_host_port_round_trips(host, port):
    spec = "inet:%s:%d" % (host, port)
    assert addresses.parse_milter(spec) == MilterAddress(spec, "inet", host, port, "")


@FAST
@given(IPV6, PORT)
def test_inet_bracketed_ipv6_round_trips(host, port):
    spec = "inet:[%s]:%d" % (host, port)
    parsed = addresses.parse_milter(spec)
    assert parsed == MilterAddress(spec, "inet", str(ipaddress.IPv6Address(host)), port, "")


@FAST
@given(PATH, st.sampled_from(["unix", "local", "UNIX"]))
def test_unix_path_round_trips(path, family):
    spec = "%s:%s" % (family, path)
    assert addresses.parse_milter(spec) == MilterAddress(spec, "unix", "", 0, path)


@FAST
@given(st.lists(st.one_of(
    st.tuples(st.one_of(HOSTNAME, IPV4), PORT).map(lambda hp: "inet:%s:%d" % hp),
    st.tuples(IPV6, PORT).map(lambda hp: "inet:[%s]:%d" % hp),
    PATH.map("unix:".__add__)), min_size=1, max_size=5),
    st.sampled_from([",", ", ", " ", " ,\t"]))
def test_a_chain_keeps_its_order_and_specs(specs, separator):
    chain = addresses.parse_milters(separator.join(specs))
    assert [milter.spec for milter in chain] == specs


@FAST
@given(st.text(max_size=60))
def test_parse_milters_only_raises_address_error(text):
    try:
        chain = addresses.parse_milters(text)
    except AddressError:
        return
    for milter in chain:
        assert milter.family in ("inet", "unix")
        assert (milter.path.startswith("/") if milter.family == "unix"
                else milter.host and 0 < milter.port < 65536)


@pytest.mark.parametrize("spec", [
    "inet:127.0.0.1", "inet:127.0.0.1:0", "inet:127.0.0.1:65536", "inet:::1:8891",
    "inet:[::1]8891", "inet:[nonsense]:8891", "inet::8891", "tcp:127.0.0.1:8891",
    "unix:relative/path", "127.0.0.1:8891", "/run/milter.sock", "inet:host name:25",
    "inet:*:8891",
])
def test_bad_milters_are_refused(spec):
    with pytest.raises(AddressError):
        addresses.parse_milter(spec)


def test_settings_and_defaults():
    loaded = parse("")
    assert (loaded.milters, loaded.MilterDefaultAction, loaded.MilterTimeout) == ((), "tempfail",
                                                                                  30)
    loaded = parse("Milters: inet:localhost:11332, unix:/run/opendkim.sock\n"
                   "MilterDefaultAction: ACCEPT\nMilterTimeout: 5")
    assert loaded.milters == (MilterAddress("inet:localhost:11332", "inet", "localhost", 11332),
                              MilterAddress("unix:/run/opendkim.sock", "unix",
                                            path="/run/opendkim.sock"))
    assert (loaded.MilterDefaultAction, loaded.MilterTimeout) == ("accept", 5)


@pytest.mark.parametrize("line, message", [
    ("Milters: inet:127.0.0.1", "line 2: Milters: inet:host:port expected (an IPv6 address in "
     "brackets): inet:127.0.0.1 (expected milters in Postfix's syntax, inet:host:port, "
     "inet:[IPv6]:port or unix:/path, separated by commas)"),
    ("MilterDefaultAction: bounce", 'line 2: MilterDefaultAction: expected one of tempfail, '
     'accept, reject, not "bounce"'),
    ("MilterTimeout: 0", 'line 2: MilterTimeout: expected an integer from 1 to 86400, not "0"'),
])
def test_bad_values_name_the_setting(line, message):
    with pytest.raises(config.ConfigError) as refused:
        parse(line)
    assert str(refused.value) == "milter.conf, " + message


def test_milter_reuse_names_milters_of_the_chain():
    chain = parse("Milters: inet:127.0.0.1:11332, unix:/run/m.sock\n"
                  "MilterReuse: inet:127.0.0.1:11332")
    assert chain.milter_reuse == frozenset({"inet:127.0.0.1:11332"})
    other = parse("Milters: unix:/run/m.sock\nMilterReuse: inet:127.0.0.1:1")
    assert other.milter_reuse == frozenset()
    assert any("MilterReuse" in warning for warning in other.warnings)
    with pytest.raises(config.ConfigError, match="MilterReuse"):
        parse("Milters: unix:/run/m.sock\nMilterReuse: tcp:nowhere")
