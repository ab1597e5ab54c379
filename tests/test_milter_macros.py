"""The macros the session's milters get (proxsmtpd(8) MILTERS, Macros), in
process: the values Postfix 3.7's smtpd gives them (smtpd_milter.c) for
what tests/test_milter_peers.py cannot show beside a Postfix on loopback:
an IPv6 client, a client of unknown address, an address without a domain;
and the MAIL stage's null sender as Postfix sends it."""

from __future__ import annotations

import socket
import ssl
import threading

import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st

from proxsmtp import __version__
from proxsmtp.message.envelope import Envelope
from proxsmtp.process.config import Config
from proxsmtp.session.milters import MilterStages, arguments, tls_macros

pytestmark = pytest.mark.unit


def stages(client_ip: str = "192.0.2.7", local_ip: str = "198.51.100.1") -> MilterStages:
    config = Config(Milters=())
    config.milter_hostname = "proxy.example"
    return MilterStages(config, Envelope("T1", client_ip=client_ip, local_ip=local_ip), "T1")


def test_the_connect_macros_of_an_ipv4_client():
    assert stages().connect_macros("192.0.2.7", 40001) == {
        "j": "proxy.example", "{daemon_name}": "proxy.example", "{daemon_addr}": "198.51.100.1",
        "v": "proxsmtpd " + __version__, "_": "unknown [192.0.2.7]",
        "{client_addr}": "192.0.2.7", "{client_name}": "unknown", "{client_port}": "40001"}


def test_an_ipv6_client_address_has_postfixs_prefix_in_client_addr_only():
    macros = stages("2001:db8::7", "2001:db8::1").connect_macros("2001:db8::7", 40001)
    assert macros["{client_addr}"] == "IPv6:2001:db8::7"      # smtpd_peer.c's rfc_addr
    assert macros["_"] == "unknown [2001:db8::7]"
    assert macros["{daemon_addr}"] == "2001:db8::1"


def test_a_client_of_unknown_address():
    macros = stages("UNKNOWN", "UNKNOWN").connect_macros("UNKNOWN", 0)
    assert (macros["{client_addr}"], macros["_"], macros["{daemon_addr}"],
            macros["{client_port}"]) == ("unknown", "unknown [unknown]", "unknown", "0")


@pytest.mark.parametrize("value, address, host", [
    ("a@Example.ORG", "a@example.org", "Example.ORG"),
    ("<>", "", "proxy.example"),
    ("postmaster", "postmaster", "proxy.example"),
    ('"odd@local"@x.test', '"odd@local"@x.test', "x.test"),
])
def test_the_mail_and_rcpt_macros(value, address, host):
    milters = stages()
    assert milters.macros("mail", value) == {
        "i": "T1", "{mail_addr}": address, "{mail_host}": host, "{mail_mailer}": "smtp"}
    assert milters.macros("rcpt", value) == {
        "i": "T1", "{rcpt_addr}": address, "{rcpt_host}": host, "{rcpt_mailer}": "smtp"}


@given(st.text())
def test_every_address_gives_its_macros(value):
    macros = stages().macros("rcpt", value)
    if "@" in value:
        assert macros["{rcpt_addr}"] == value.lower()
        assert "@" + macros["{rcpt_host}"] == value[value.rindex("@"):]
    else:
        assert macros["{rcpt_host}"] == "proxy.example"
        assert macros["{rcpt_addr}"] == ("" if value == "<>" else value)


def test_auth_type_is_the_mechanism_the_server_accepted_as_written():
    milters = stages()
    milters.auth_tried(b"AUTH login\r\n")
    assert "{auth_type}" not in milters.macros("mail", "a@x.test")     # not accepted yet
    milters.auth_tried(b"AUTH PLAIN AGpvZQBzZWNyZXQ=\r\n")
    milters.authenticated()
    assert milters.macros("mail", "a@x.test")["{auth_type}"] == "PLAIN"
    assert "{auth_type}" not in milters.macros("rcpt", "b@y.test")


def test_the_null_sender_goes_to_the_milters_as_postfix_sends_it():
    assert arguments(b"MAIL FROM:<> BODY=8BITMIME\r\n", "<>") == ["<>", "BODY=8BITMIME"]
    assert arguments(b"MAIL FROM:<a@x.test>\r\n", "a@x.test") == ["<a@x.test>"]


def test_no_tls_macros_in_plaintext():
    assert tls_macros(None) == {}


def test_the_tls_macros_of_a_tls_connection():
    """A real TLS handshake on a socket pair (the client leg's transport is
    read for its ssl_object, as tls.details does)."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("proxy.example").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    left, right = socket.socketpair()
    with left, right:
        server = server_context.wrap_socket(left, server_side=True, do_handshake_on_connect=False)
        handshake = threading.Thread(target=server.do_handshake)
        handshake.start()
        client = client_context.wrap_socket(right, server_hostname="proxy.example")
        handshake.join(10)

        class Transport:
            def get_extra_info(self, name):
                return server if name == "ssl_object" else None

        name, _, bits = client.cipher()
        assert tls_macros(Transport()) == {"{tls_version}": client.version(), "{cipher}": name,
                                           "{cipher_bits}": str(bits)}
        client.close()
        server.close()
