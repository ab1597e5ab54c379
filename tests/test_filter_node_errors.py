"""FilterType smtp: what a filter node says that is no verdict.

Replies to the proxy's own steps (greeting, EHLO, XCLIENT and the EHLO after
it) that are not success, and replies saying the protocol broke (500-504,
554 with an enhanced code 5.5.x) at any step, are the node's or the
proxy's fault, not the message's: the client hears 451 and will try again,
the server gets nothing, one error line is logged.  Only verdicts on the
envelope or the message reach the client as rejections.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, strategies as st

from harness import send_mail
from proxsmtp.filters import protocol_broke

BODY = b"Subject: node\r\nFrom: a@x.test\r\n\r\nhello\r\n"
NODE_EXTENSIONS = ("SIZE 1000000", "PIPELINING", "XCLIENT ADDR HELO NAME", "8BITMIME")


def ehlo_refused_after_xclient(line, conn):
    if conn.xclient:
        return "550 5.7.1 <%s>: Helo command rejected: go away" % line.split()[1]
    return "250-node.test\r\n" + "\r\n".join("250-" + ext for ext in NODE_EXTENSIONS[:-1]) \
        + "\r\n250 " + NODE_EXTENSIONS[-1]


# (how the node is made, the step the log names or None for the proxy's own steps)
FAULTS = {
    "greeting": ({"greeting": "554 5.7.1 node.test no service here"}, "filter node greeting"),
    "ehlo": ({"replies": {"EHLO": "502 5.5.2 Error: command not recognized"}},
             "filter node refused EHLO"),
    "xclient": ({"replies": {"XCLIENT": "550 5.7.0 Error: insufficient authorization"}},
                "filter node refused XCLIENT"),
    "ehlo-after-xclient": ({"replies": {"EHLO": ehlo_refused_after_xclient}},
                           "filter node refused EHLO after XCLIENT"),
    "mail-503": ({"replies": {"MAIL": "503 5.5.1 Error: send HELO/EHLO first"}},
                 "protocol error from filter node at MAIL FROM"),
    "mail-500": ({"replies": {"MAIL": "500 5.5.2 Error: bad syntax"}},
                 "protocol error from filter node at MAIL FROM"),
    "rcpt-501": ({"replies": {"RCPT": "501 5.5.4 Syntax: RCPT TO:<address>"}},
                 "protocol error from filter node at RCPT TO"),
    "rcpt-504": ({"replies": {"RCPT": "504 5.5.4 Unrecognized parameter"}},
                 "protocol error from filter node at RCPT TO"),
    "data-554-sync": ({"replies": {"DATA": "554 5.5.0 Error: SMTP protocol synchronization"}},
                      "protocol error from filter node at DATA"),
    "data-502": ({"replies": {"DATA": "502 5.5.1 Error: command not implemented"}},
                 "protocol error from filter node at DATA"),
    "dot-554-5.5.0": ({"data_reply": "554-5.5.0 Error: out of step\r\n554 5.5.0 really"},
                      "protocol error from filter node at the message"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.e2e
@pytest.mark.slow
def test_node_protocol_trouble_defers_the_message(proxy, upstream, make_upstream, fault):
    node_settings, logged = FAULTS[fault]
    node = make_upstream(**{"extensions": NODE_EXTENSIONS, "name": "node.test", **node_settings})
    p = proxy({"OutAddress": upstream.address, "FilterType": "smtp",
               "FilterCommand": node.address}, debug=3)
    with p.connect() as client:
        assert send_mail(client, "a@x.test", ["b@y.test"], BODY) == ["451 Local Error"]
        assert client.cmd("QUIT")[0].startswith("221")
    upstream.wait_command("RSET")
    assert upstream.messages == [] and "DATA" not in upstream.verbs()
    p.wait_log("status=FILTER-ERROR")
    log = p.log()
    assert log.count(logged) == 1, log


# Verdicts on the envelope or the message: the client hears them as they are.
VERDICTS = {
    "mail-550": ({"replies": {"MAIL": "550 5.7.1 <a@x.test>: Sender address rejected"}},
                 ["550 5.7.1 <a@x.test>: Sender address rejected"]),
    "rcpt-554-relay": ({"replies": {"RCPT": "554 5.7.1 <b@y.test>: Relay access denied"}},
                       ["554 5.7.1 <b@y.test>: Relay access denied"]),
    "dot-554-spam": ({"data_reply": "554 5.7.1 Spam score too high"},
                     ["554 5.7.1 Spam score too high"]),
    "dot-552": ({"data_reply": "552 5.3.4 Message too big"}, ["552 5.3.4 Message too big"]),
    "dot-554-plain": ({"data_reply": "554 Transaction failed"}, ["554 Transaction failed"]),
}


@pytest.mark.parametrize("verdict", sorted(VERDICTS))
@pytest.mark.e2e
@pytest.mark.slow
def test_node_verdicts_still_reach_the_client(proxy, upstream, make_upstream, verdict):
    node_settings, expected = VERDICTS[verdict]
    node = make_upstream(**{"extensions": NODE_EXTENSIONS, "name": "node.test", **node_settings})
    p = proxy({"OutAddress": upstream.address, "FilterType": "smtp",
               "FilterCommand": node.address}, debug=3)
    with p.connect() as client:
        assert send_mail(client, "a@x.test", ["b@y.test"], BODY) == expected
    upstream.wait_command("RSET")
    assert upstream.messages == []
    p.wait_log(r'reply="%s", .*status=REJECTED$' % re.escape(expected[-1]))


@pytest.mark.parametrize("reply, broke", [
    ("500 5.5.2 Error: bad syntax", True),
    ("502 Command not implemented", True),
    ("503 5.5.1 Error: need MAIL command", True),
    ("504 5.5.4 Unrecognized parameter", True),
    ("554 5.5.0 Error: SMTP protocol synchronization", True),
    ("554-5.5.1 Error: no valid recipients\r\n554 5.5.1 really", True),
    ("505 5.5.0 not in RFC 5321", False),
    ("554 5.7.1 Spam", False),
    ("554 5.5.", False),
    ("554 Transaction failed 5.5.0", False),
    ("550 5.5.0 Requested action not taken", False),
    ("451 4.5.0 local problem", False),
])
@pytest.mark.unit
def test_protocol_broke(reply, broke):
    assert protocol_broke(int(reply[:3]), reply) is broke


@given(st.integers(400, 599),
       st.text(max_size=80) | st.from_regex(r"5\.5\.[0-9٣]{0,4}[ \t.x]?.{0,10}", fullmatch=True))
@pytest.mark.unit
@pytest.mark.slow
def test_protocol_broke_on_any_reply_text(code, rest):
    """Any text from a node: no exception; 500-504 always, other codes but
    554 never, 554 only with a 5.5.x enhanced code first."""
    text = "%d %s" % (code, rest)
    broke = protocol_broke(code, text)
    if 500 <= code <= 504:
        assert broke
    elif code != 554:
        assert not broke
    else:
        word = rest.split()[0] if rest[:1].strip() else ""
        parts = word.split(".")
        assert broke == (len(parts) == 3 and parts[:2] == ["5", "5"] and parts[2].isascii()
                         and parts[2].isdigit() and 1 <= len(parts[2]) <= 3)


@pytest.mark.e2e
@pytest.mark.root
@pytest.mark.slow
def test_postfix_node_protocol_error_defers_the_message(proxy, upstream, postfix):
    """A real Postfix as the node, made to answer RCPT with `500 5.5.2 Error:
    command not recognized` (smtpd_command_filter turns RCPT into a verb it
    does not know): the client hears 451, not a bounce."""
    node = postfix()
    table = node.config / "command_filter"
    table.write_text("/^RCPT TO:(.*)$/ XRCPT TO:$1\n")
    with open(node.config / "main.cf", "a") as main_cf:
        main_cf.write("smtpd_command_filter = regexp:%s\n" % table)
    node.postfix("reload")
    p = proxy({"OutAddress": upstream.address, "FilterType": "smtp",
               "FilterCommand": node.address}, debug=3)
    with p.connect() as client:
        assert send_mail(client, "a@example.org", ["b@example.net"], BODY) == ["451 Local Error"]
    upstream.wait_command("RSET")
    assert upstream.messages == [] and node.queued() == []
    p.wait_log("status=FILTER-ERROR")
    assert p.log().count("protocol error from filter node at RCPT TO: 500 5.5.2") == 1, p.log()
