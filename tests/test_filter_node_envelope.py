"""FilterType smtp: the filter node gets what the client said.

MAIL's and RCPT's ESMTP parameters (RFC 5321 4.1.2) as the server accepted
them, each only when the node's EHLO offers its extension (SIZE with the
message's real size); the proxy's own EHLO name, FilterHelo; and the node's
reply to an accepted message in the log line (`filter_reply=`).
"""

from __future__ import annotations

import re
import socket

import pytest
from harness import send_mail
from hypothesis import given
from hypothesis import strategies as st

from proxsmtp.filters.node import MAIL_PARAMS, RCPT_PARAMS, node_params
from proxsmtp.message.envelope import Envelope
from proxsmtp.process import config
from proxsmtp.smtp.replies import Status
from proxsmtp.smtp.syntax import esmtp_params

BODY = b"Subject: params\r\nFrom: a@x.test\r\n\r\nhello\r\n"


# --- the parser, and what a node gets ------------------------------------------------

@pytest.mark.parametrize("line, params", [
    (b"MAIL FROM:<a@x> SIZE=1234 BODY=8BITMIME\r\n", [("SIZE", "1234"), ("BODY", "8BITMIME")]),
    (b"mail from: <> ret=HDRS  ENVID=a+2Bb\r\n", [("ret", "HDRS"), ("ENVID", "a+2Bb")]),
    (b'MAIL FROM:<"a> b"@x> SMTPUTF8\r\n', [("SMTPUTF8", None)]),
    (b"RCPT TO:<b@y> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@y\r\n",
     [("NOTIFY", "SUCCESS,FAILURE"), ("ORCPT", "rfc822;b@y")]),
    (b"MAIL FROM:a@x SIZE=1 SIZE=2\r\n", [("SIZE", "1")]),
    ("MAIL FROM:<ü@x> SMTPUTF8 X-A=é\r\n".encode(), [("SMTPUTF8", None), ("X-A", "é")]),
    (b"MAIL FROM:<a@x> =v -K=v K= K=a=b K2=\xff K3=a\x01 OK\r\n", [("OK", None)]),
    (b"MAIL FROM:<a@x\r\n", []),
    (b"MAIL\r\n", []),
])
@pytest.mark.unit
def test_esmtp_params(line, params):
    assert esmtp_params(line) == params


@given(st.binary(max_size=300) | st.text(max_size=120).map(
    lambda text: ("MAIL FROM:" + text).encode("utf-8", "surrogatepass")))
@pytest.mark.unit
def test_esmtp_params_never_raise(line):
    """Whatever a client wrote and a server accepted: a list of esmtp-params."""
    for keyword, value in esmtp_params(line):
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", keyword)
        assert value is None or value and "=" not in value and value.isprintable() \
            and " " not in value


@pytest.mark.unit
def test_node_params_only_for_what_the_node_offers():
    mail = "MAIL FROM:<a@x> SIZE=10 body=8BITMIME SMTPUTF8 RET=FULL ENVID=e1 AUTH=<>\r\n".encode()
    everything = {"SIZE", "8BITMIME", "SMTPUTF8", "DSN", "AUTH", "BINARYMIME"}
    assert node_params(mail, MAIL_PARAMS, everything, 2048) == \
        " SIZE=2048 body=8BITMIME SMTPUTF8 RET=FULL ENVID=e1"
    assert node_params(mail, MAIL_PARAMS, set(), 2048) == ""
    assert node_params(mail, MAIL_PARAMS, {"8BITMIME", "PIPELINING"}, 2048) == " body=8BITMIME"
    assert node_params(b"MAIL FROM:<a@x> BODY=BINARYMIME\r\n", MAIL_PARAMS, {"8BITMIME"}) == ""
    rcpt = b"RCPT TO:<b@y> NOTIFY=NEVER ORCPT=rfc822;b@y SIZE=1\r\n"
    assert node_params(rcpt, RCPT_PARAMS, everything) == " NOTIFY=NEVER ORCPT=rfc822;b@y"
    assert node_params(rcpt, RCPT_PARAMS, {"SIZE"}) == ""


@pytest.mark.unit
def test_log_line_has_the_node_reply_and_reset_forgets_it():
    envelope = Envelope("TAG", client_ip="10.0.0.2", sender="a@x", recipients=["b@y"],
                        mail_line=b"MAIL FROM:<a@x> SIZE=1\r\n", rcpt_lines=[b"RCPT TO:<b@y>\r\n"])
    envelope.filter_seconds, envelope.filter_reply = 0.5, '250 2.0.0 Ok: "queued" as ABC\x01'
    line = envelope.log_line(Status.FILTERED)
    assert "filter=0.500, filter_reply=\"250 2.0.0 Ok: 'queued' as ABC\\x01\", status=" in line
    envelope.reset()
    assert envelope.filter_reply is None and envelope.mail_line == b"" \
        and envelope.rcpt_lines == []


# --- FilterHelo -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mx1.example.com", "localhost", "[192.0.2.1]",
                                  "[IPv6:2001:db8::1]", "a-b.c0"])
@pytest.mark.unit
def test_filter_helo_accepts_a_domain_or_an_address_literal(name):
    loaded = config.parse("OutAddress: 2525\nFilterType: smtp\nFilterCommand: 127.0.0.1\n"
                          "FilterHelo: %s\nListen: 127.0.0.1:10025\n" % name)
    assert loaded.FilterHelo == name and loaded.warnings == []


@pytest.mark.parametrize("name", ["a_b.example", "-a.example", "a..b", "[::1]", "[1.2.3]",
                                  "x" * 64 + ".example", "ä.example", "a.example."])
@pytest.mark.unit
def test_filter_helo_refuses_anything_else(name):
    with pytest.raises(config.ConfigError, match=r"line 4: FilterHelo: expected a domain name "
                       r"or an address literal such as \[192\.0\.2\.1\]"):
        config.parse("OutAddress: 2525\nFilterType: smtp\nFilterCommand: 127.0.0.1\n"
                     "FilterHelo: %s\n" % name)


@pytest.mark.unit
def test_filter_helo_defaults_to_the_host_name():
    loaded = config.parse("OutAddress: 2525\nFilterType: smtp\nFilterCommand: 127.0.0.1\n")
    assert loaded.FilterHelo == socket.getfqdn() != "proxsmtp"


# --- against nodes -----------------------------------------------------------------------

def filtered(upstream, node, **extra) -> dict:
    return {"OutAddress": upstream.address, "FilterType": "smtp",
            "FilterCommand": node.address, **extra}


def transaction(client, mail: str, rcpts: list[str], body: bytes = BODY) -> list[str]:
    assert client.cmd("EHLO client.example")[-1].startswith("250")
    assert client.cmd(mail)[-1].startswith("250")
    for rcpt in rcpts:
        assert client.cmd(rcpt)[-1].startswith("250")
    assert client.cmd("DATA")[-1].startswith("354")
    client.send(body + b".\r\n")
    return client.reply()


@pytest.mark.e2e
@pytest.mark.slow
def test_a_node_gets_only_the_parameters_it_offers(proxy, upstream, make_upstream):
    """The server takes every parameter; a node without SIZE, 8BITMIME,
    SMTPUTF8 and DSN gets none of them, one with DSN only DSN's."""
    bare = make_upstream(extensions=("PIPELINING", "XCLIENT ADDR HELO"), name="bare.test")
    dsn = make_upstream(extensions=("DSN", "XCLIENT ADDR HELO"), name="dsn.test")
    mail = "MAIL FROM:<a@x.test> SIZE=99 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=e+2B1"
    rcpt = "RCPT TO:<b@y.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@y.test"
    for node in (bare, dsn):
        p = proxy(filtered(upstream, node), debug=3)
        with p.connect() as client:
            assert transaction(client, mail, [rcpt])[0].startswith("250")
        node.wait_messages(1)
        p.stop()
    assert mail in upstream.commands() and rcpt in upstream.commands()
    assert "MAIL FROM:<a@x.test>" in bare.commands()
    assert "RCPT TO:<b@y.test>" in bare.commands()
    assert "MAIL FROM:<a@x.test> RET=HDRS ENVID=e+2B1" in dsn.commands()
    assert rcpt in dsn.commands()
    assert upstream.commands().count(mail) == 2


@pytest.mark.e2e
@pytest.mark.slow
def test_the_node_hears_filter_helo_and_its_reply_is_logged(proxy, upstream, make_upstream):
    node = make_upstream(extensions=("XCLIENT ADDR HELO",), name="node.test",
                         data_reply="250 2.0.0 Ok: queued as NODE42")
    p = proxy(filtered(upstream, node, FilterHelo="filter-client.example"), debug=3)
    with p.connect() as client:
        assert send_mail(client, "a@x.test", ["b@y.test"], BODY)[0].startswith("250")
    node.wait_messages(1)
    assert node.commands()[0] == "EHLO filter-client.example"
    p.wait_log(r'filter=\d+\.\d{3}, filter_reply="250 2\.0\.0 Ok: queued as NODE42", '
               r'reply="250 2\.0\.0 Ok: queued as TEST", status=FILTERED$')


@pytest.mark.e2e
@pytest.mark.slow
def test_a_refusing_node_is_logged_once_as_reply(proxy, upstream, make_upstream):
    node = make_upstream(extensions=("XCLIENT ADDR HELO",), data_reply="554 5.7.1 Spam")
    p = proxy(filtered(upstream, node), debug=3)
    with p.connect() as client:
        assert send_mail(client, "a@x.test", ["b@y.test"], BODY) == ["554 5.7.1 Spam"]
    line = p.wait_log(r"^.*status=REJECTED$").group(0)
    assert "filter_reply" not in line and line.count("5.7.1 Spam") == 1, line
    assert node.commands()[0] == "EHLO %s" % socket.getfqdn()


def debugged_postfix(postfix, **main_cf):
    """A Postfix node that logs the commands it is sent (debug_peer_list)."""
    return postfix(debug_peer_list="127.0.0.1", debug_peer_level=2, **main_cf)


@pytest.mark.e2e
@pytest.mark.root
@pytest.mark.slow
def test_postfix_node_gets_size_and_body_and_filter_helo(proxy, upstream, postfix):
    node = debugged_postfix(postfix)
    p = proxy(filtered(upstream, node, FilterHelo="proxy.example"), debug=3)
    with p.connect() as client:
        reply = transaction(client, "MAIL FROM:<a@x.test> SIZE=1234 BODY=8BITMIME",
                            ["RCPT TO:<b@y.test>"])
    assert reply[0].startswith("250")
    queued = node.messages(1)
    log = node.wait_log("MAIL FROM:<a@x.test> SIZE=%d BODY=8BITMIME" % len(BODY))
    assert re.search(r": < \S+: EHLO proxy\.example$", log, re.M), log
    assert re.search(r": < \S+: XCLIENT ADDR=127\.0\.0\.1 HELO=client\.example$", log, re.M)
    p.wait_log(r'filter_reply="250 2\.0\.0 Ok: queued as %s", reply="250 2\.0\.0 Ok: queued '
               r'as TEST", status=FILTERED$' % queued[0]["queue_id"])


@pytest.mark.e2e
@pytest.mark.root
@pytest.mark.slow
def test_postfix_node_gets_a_utf8_envelope_and_header(proxy, upstream, postfix):
    node = debugged_postfix(postfix)
    body = "Subject: Grüße\r\nFrom: jörg@bücher.test\r\n\r\nhallo\r\n".encode()
    p = proxy(filtered(upstream, node), debug=3)
    with p.connect() as client:
        reply = transaction(client, "MAIL FROM:<jörg@bücher.test> SMTPUTF8",
                            ["RCPT TO:<zoë@例え.test>"], body)
    assert reply[0].startswith("250")
    queued = node.messages(1)[0]
    assert queued["sender"] == "jörg@bücher.test" and queued["recipients"] == ["zoë@例え.test"]
    assert "Subject: Grüße".encode() in queued["content"]
    node.wait_log("MAIL FROM:<jörg@bücher.test> SMTPUTF8")
    assert upstream.wait_messages(1)[0].raw == body.rstrip(b"\r\n")


@pytest.mark.e2e
@pytest.mark.root
@pytest.mark.slow
def test_postfix_node_without_smtputf8_gets_no_utf8_address(proxy, upstream, postfix):
    """No SMTPUTF8 offered: no UTF-8 address is sent (RFC 6531 3.2), the
    message is refused with 553 5.6.7; an ASCII envelope goes without the
    parameter."""
    node = debugged_postfix(postfix, smtputf8_enable="no")
    p = proxy(filtered(upstream, node), debug=3)
    with p.connect() as client:
        assert transaction(client, "MAIL FROM:<a@x.test> SMTPUTF8",
                           ["RCPT TO:<zoë@例え.test>"]) == \
            ["553 5.6.7 Non-ASCII addresses not permitted by the filter node"]
        assert transaction(client, "MAIL FROM:<a@x.test> SMTPUTF8",
                           ["RCPT TO:<b@y.test>"])[0].startswith("250")
    assert node.messages(1)[0]["recipients"] == ["b@y.test"]
    log = node.wait_log("MAIL FROM:<a@x.test>\n")
    assert "SMTPUTF8" not in log and "RCPT TO:<zo" not in log
    p.wait_log(r'reply="553 5\.6\.7 Non-ASCII addresses not permitted by the filter node", '
               r'.*status=REJECTED$')
    assert len(upstream.wait_messages(1)) == 1
