"""The relayed session (RFC 5321; DESCRIPTION and OPERATION in proxsmtpd(8)), end to
end (client → proxsmtpd → recording server)."""

from __future__ import annotations

import re
import socket
import time

import pytest
from harness import Client, free_port, send_mail

pytestmark = pytest.mark.e2e

BODY = b"Subject: test\r\n\r\nhello\r\n"


def test_relays_a_message(proxy, upstream):
    p = proxy({"OutAddress": upstream.address})
    with p.connect() as client:
        assert client.greeting == ["220 upstream.test ESMTP recorder"]
        final = send_mail(client, "a@example.com", ["b@example.net"], BODY)
        assert final == ["250 2.0.0 Ok: queued as TEST"]
        assert client.cmd("QUIT") == ["221 2.0.0 Bye"]
    message = upstream.wait_messages(1)[0]
    assert message.sender == "a@example.com" and message.recipients == ["b@example.net"]
    assert message.raw == BODY.rstrip(b"\r\n")
    assert upstream.verbs() == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]


def test_ehlo_features_filtered(proxy, make_upstream):
    upstream = make_upstream(extensions=(
        "SIZE 10240000", "PIPELINING", "STARTTLS", "AUTH PLAIN LOGIN", "CHUNKING",
        "BINARYMIME", "CHECKPOINT", "XCLIENT NAME ADDR HELO", "XEXCH50", "8BITMIME", "DSN"))
    p = proxy({"OutAddress": upstream.address})
    with p.connect() as client:
        reply = client.cmd("EHLO client.example")
    assert reply == ["250-upstream.test", "250-SIZE 10240000", "250-PIPELINING",
                     "250-AUTH PLAIN LOGIN", "250-CHUNKING", "250-BINARYMIME", "250-8BITMIME",
                     "250 DSN"]


@pytest.mark.parametrize("settings, offered", [
    ({}, ["250-CHUNKING", "250-BINARYMIME"]),
    ({"FilterType": "reject", "FilterCommand": "x"}, ["250-CHUNKING", "250-BINARYMIME"]),
    ({"FilterCommand": "cat"}, ["250-CHUNKING"]),
    ({"FilterType": "file", "FilterCommand": "true"}, ["250-CHUNKING"]),
    ({"FilterType": "smtp", "FilterCommand": "127.0.0.1:9"}, ["250-CHUNKING"]),
])
def test_chunking_and_binarymime_offered(proxy, make_upstream, settings, offered):
    """CHUNKING as the server offers it; BINARYMIME only when no filter
    reads the message (RFC 3030 3; proxsmtpd(8) CHUNKING)."""
    upstream = make_upstream(extensions=("CHUNKING", "BINARYMIME", "8BITMIME"))
    p = proxy({"OutAddress": upstream.address, **settings})
    with p.connect() as client:
        reply = client.cmd("EHLO client.example")
    assert reply == ["250-upstream.test"] + offered + ["250 8BITMIME"]


def test_binarymime_hidden_without_chunking(proxy, make_upstream):
    """BINARYMIME needs BDAT (RFC 3030 3): without CHUNKING it is not offered."""
    upstream = make_upstream(extensions=("BINARYMIME", "8BITMIME"))
    p = proxy({"OutAddress": upstream.address})
    with p.connect() as client:
        assert client.cmd("EHLO client.example") == ["250-upstream.test", "250 8BITMIME"]


def test_ehlo_last_line_filtered_becomes_xfiltered(proxy, make_upstream):
    upstream = make_upstream(extensions=("8BITMIME", "STARTTLS"))
    p = proxy({"OutAddress": upstream.address})
    with p.connect() as client:
        assert client.cmd("EHLO client.example") == ["250-upstream.test", "250-8BITMIME",
                                                     "250 XFILTERED"]
        # a plain HELO reply and other replies pass untouched
        assert client.cmd("HELO client.example") == ["250 upstream.test"]


def test_starttls_and_bdat_refused_locally(proxy, upstream):
    p = proxy({"OutAddress": upstream.address})
    with p.connect() as client:
        client.cmd("EHLO client.example")
        assert client.cmd("STARTTLS") == ["502 Command not implemented"]
        assert client.cmd("starttls") == ["502 Command not implemented"]
        assert client.cmd("BDAT 10 LAST") == ["502 Command not implemented"]
        assert client.cmd("NOOP")[0].startswith("250")
    upstream.wait_command("NOOP")
    assert upstream.verbs() == ["EHLO", "NOOP"]


def test_client_xclient_refused_and_never_forwarded(proxy, make_upstream):
    upstream = make_upstream(extensions=("XCLIENT ADDR NAME HELO",))
    p = proxy({"OutAddress": upstream.address, "XClient": "on"})
    with p.connect() as client:
        assert client.cmd("XCLIENT ADDR=6.6.6.6") == ["554 Insufficient authorization"]
        client.cmd("EHLO client.example")
        assert client.cmd("XCLIENT ADDR=6.6.6.6") == ["554 Insufficient authorization"]
        assert client.cmd("NOOP")[0].startswith("250")
        client.cmd("QUIT")
    upstream.wait_closed("QUIT")
    assert not any("6.6.6.6" in line for line in upstream.commands())
    assert "client attempted use of privileged XCLIENT" in p.log()


def test_overlong_client_line(proxy, upstream):
    p = proxy({"OutAddress": upstream.address})
    with p.connect() as client:
        client.cmd("EHLO client.example")
        assert client.cmd("NOOP " + "x" * 5000) == ["500 Line too long"]
        long_ok = "NOOP " + "y" * 2000
        assert client.cmd(long_ok)[0].startswith("250")
        assert client.cmd("QUIT")[0].startswith("221")
    assert upstream.commands() == ["EHLO client.example", long_ok, "QUIT"]


def test_overlong_server_line_truncated(proxy, make_upstream):
    upstream = make_upstream(replies={"NOOP": "250 " + "z" * 6000})
    p = proxy({"OutAddress": upstream.address})
    with p.connect() as client:
        reply = client.cmd("NOOP")
        assert reply[0].startswith("250 zzz") and 1000 < len(reply[0]) <= 4096
        assert client.cmd("QUIT")[0].startswith("221")   # still in step
    p.wait_log("too long")


def test_pipelined_commands_answered_in_order(proxy, upstream):
    """Replies made by the proxy itself queue behind outstanding server replies."""
    p = proxy({"OutAddress": upstream.address})
    with p.connect() as client:
        client.cmd("EHLO client.example")
        client.send(b"MAIL FROM:<a@x.test>\r\nSTARTTLS\r\nRCPT TO:<b@y.test>\r\n"
                    b"XCLIENT ADDR=1.2.3.4\r\nNOOP\r\n")
        replies = [client.reply()[0][:3] for _ in range(5)]
    assert replies == ["250", "502", "250", "554", "250"]


def test_xclient_sent_once_when_advertised(proxy, make_upstream):
    upstream = make_upstream(extensions=("XCLIENT NAME ADDR PROTO HELO", "8BITMIME"))
    p = proxy({"OutAddress": upstream.address, "XClient": "on"})
    with p.connect() as client:
        send_mail(client, "a@x.test", ["b@y.test"], BODY)
        client.cmd("RSET")
        send_mail(client, "c@x.test", ["d@y.test"], BODY, helo="EHLO again.example")
        client.cmd("QUIT")
    commands = upstream.commands()
    assert commands.count("XCLIENT ADDR=127.0.0.1") == 1, commands
    # XCLIENT's 220 starts the server's session over: the client's EHLO again
    assert commands[:4] == ["EHLO client.example", "XCLIENT ADDR=127.0.0.1", "EHLO client.example",
                            "MAIL FROM:<a@x.test>"]
    assert len(upstream.messages) == 2


def test_xclient_not_sent_when_not_supported(proxy, upstream):
    p = proxy({"OutAddress": upstream.address, "XClient": "on"})
    with p.connect() as client:
        send_mail(client, "a@x.test", ["b@y.test"], BODY)
    upstream.wait_messages(1)
    assert "XCLIENT" not in upstream.verbs()


def test_xclient_assumed_after_helo(proxy, upstream):
    p = proxy({"OutAddress": upstream.address, "XClient": "yes"})
    with p.connect() as client:
        send_mail(client, "a@x.test", ["b@y.test"], BODY, helo="HELO client.example")
    upstream.wait_messages(1)
    assert upstream.commands()[:4] == ["HELO client.example", "XCLIENT ADDR=127.0.0.1",
                                       "HELO client.example", "MAIL FROM:<a@x.test>"]


def test_xclient_off_by_default(proxy, make_upstream):
    upstream = make_upstream(extensions=("XCLIENT ADDR",))
    p = proxy({"OutAddress": upstream.address})
    with p.connect() as client:
        send_mail(client, "a@x.test", ["b@y.test"], BODY)
    upstream.wait_messages(1)
    assert "XCLIENT" not in upstream.verbs()


def test_xclient_refusal_is_only_a_warning(proxy, make_upstream):
    upstream = make_upstream(extensions=("XCLIENT ADDR",),
                             replies={"XCLIENT": "550 5.7.0 not authorized"})
    p = proxy({"OutAddress": upstream.address, "XClient": "on"})
    with p.connect() as client:
        final = send_mail(client, "a@x.test", ["b@y.test"], BODY)
    assert final[-1].startswith("250")
    upstream.wait_messages(1)
    p.wait_log("server didn't accept XCLIENT: 550 5.7.0 not authorized")
    # no new session on the server: no EHLO said again
    assert upstream.verbs()[:3] == ["EHLO", "XCLIENT", "MAIL"]


def test_refused_recipient(proxy, make_upstream, tmp_path):
    upstream = make_upstream(refuse=("nobody@y.test",))
    out = tmp_path / "recipients"
    p = proxy({"OutAddress": upstream.address, "FilterType": "pipe",
               "FilterCommand": "printf '%%s' \"$RECIPIENTS\" > %s; cat" % out}, debug=3)
    with p.connect() as client:
        client.cmd("EHLO client.example")
        client.cmd("MAIL FROM:<a@x.test>")
        assert client.cmd("RCPT TO:<b@y.test>")[0].startswith("250")
        assert client.cmd("RCPT TO:<nobody@y.test>") == [
            "550 5.1.1 <nobody@y.test>: Recipient address rejected"]
        assert client.cmd("RCPT TO:<c@y.test>")[0].startswith("250")
        assert client.cmd("DATA")[0].startswith("354")
        client.send(BODY + b".\r\n")
        assert client.reply()[0].startswith("250")
    message = upstream.wait_messages(1)[0]
    assert message.recipients == ["b@y.test", "c@y.test"]
    assert out.read_text() == "b@y.test\nc@y.test"
    p.wait_log(r"client=127\.0\.0\.1, from=a@x\.test, to=b@y\.test, to=c@y\.test, (?:.*, )?status=FILTERED")


def test_two_messages_in_one_session(proxy, upstream, tmp_path):
    out = tmp_path / "senders"
    p = proxy({"OutAddress": upstream.address,
               "FilterCommand": "echo \"$SENDER $RECIPIENTS\" >> %s; cat" % out}, debug=3)
    with p.connect() as client:
        assert send_mail(client, "one@x.test", ["r1@y.test"], b"Subject: 1\r\n\r\nfirst\r\n")[0][:3] == "250"
        client.cmd("MAIL FROM:<two@x.test>")
        client.cmd("RCPT TO:<r2@y.test>")
        client.cmd("DATA")
        client.send(b"Subject: 2\r\n\r\nsecond\r\n.\r\n")
        assert client.reply()[0].startswith("250")
        client.cmd("QUIT")
    first, second = upstream.wait_messages(2)
    assert (first.sender, first.recipients) == ("one@x.test", ["r1@y.test"])
    assert (second.sender, second.recipients) == ("two@x.test", ["r2@y.test"])
    assert b"first" in first.raw and b"second" in second.raw
    assert out.read_text() == "one@x.test r1@y.test\ntwo@x.test r2@y.test\n"
    p.wait_log(r"from=two@x\.test, to=r2@y\.test, (?:.*, )?status=FILTERED")
    assert first.conn == second.conn


def test_rset_forgets_sender_and_recipients(proxy, upstream, tmp_path):
    out = tmp_path / "env"
    p = proxy({"OutAddress": upstream.address,
               "FilterCommand": "echo \"$SENDER|$RECIPIENTS|$REMOTE\" > %s; cat" % out})
    with p.connect() as client:
        client.cmd("EHLO client.example")
        assert client.cmd("XFORWARD ADDR=10.9.9.9")[0].startswith("250")
        client.cmd("MAIL FROM:<old@x.test>")
        client.cmd("RCPT TO:<old@y.test>")
        assert client.cmd("RSET")[0].startswith("250")
        client.cmd("MAIL FROM:<new@x.test>")
        client.cmd("RCPT TO:<new@y.test>")
        client.cmd("DATA")
        client.send(BODY + b".\r\n")
        assert client.reply()[0].startswith("250")
    upstream.wait_messages(1)
    assert out.read_text() == "new@x.test|new@y.test|\n"


def test_new_ehlo_forgets_transaction(proxy, upstream, tmp_path):
    out = tmp_path / "env"
    p = proxy({"OutAddress": upstream.address,
               "FilterCommand": "echo \"$SENDER|$RECIPIENTS|$HELO\" > %s; cat" % out})
    with p.connect() as client:
        client.cmd("EHLO first.example")
        client.cmd("MAIL FROM:<old@x.test>")
        client.cmd("RCPT TO:<old@y.test>")
        assert client.cmd("EHLO second.example")[0].startswith("250")
        client.cmd("MAIL FROM:<new@x.test>")
        client.cmd("RCPT TO:<new@y.test>")
        client.cmd("DATA")
        client.send(BODY + b".\r\n")
        assert client.reply()[0].startswith("250")
    upstream.wait_messages(1)
    assert out.read_text() == "new@x.test|new@y.test|second.example\n"


def test_null_sender_kept(proxy, upstream, tmp_path):
    out = tmp_path / "sender"
    p = proxy({"OutAddress": upstream.address,
               "FilterCommand": "printf '%%s' \"$SENDER\" > %s; cat" % out}, debug=3)
    with p.connect() as client:
        send_mail(client, "", ["b@y.test"], BODY)
    upstream.wait_messages(1)
    assert out.read_text() == "<>"
    p.wait_log(r"from=<>, to=b@y\.test, (?:.*, )?status=FILTERED")


def test_xforward_addr_and_helo_reach_filter(proxy, make_upstream, tmp_path):
    upstream = make_upstream(extensions=("XFORWARD NAME ADDR PROTO HELO",))
    out = tmp_path / "env"
    p = proxy({"OutAddress": upstream.address,
               "FilterCommand": "echo \"$REMOTE|$REMOTE_HELO|$HELO\" > %s; cat" % out})
    with p.connect() as client:
        client.cmd("EHLO client.example")
        assert client.cmd("XFORWARD ADDR=192.0.2.7 HELO=mx.remote.example")[0].startswith("250")
        client.cmd("MAIL FROM:<a@x.test>")
        client.cmd("RCPT TO:<b@y.test>")
        client.cmd("DATA")
        client.send(BODY + b".\r\n")
        assert client.reply()[0].startswith("250")
    upstream.wait_messages(1)
    assert "XFORWARD ADDR=192.0.2.7 HELO=mx.remote.example" in upstream.commands()
    assert out.read_text() == "192.0.2.7|mx.remote.example|client.example\n"


def test_xforward_refused_is_not_remembered(proxy, make_upstream, tmp_path):
    upstream = make_upstream(replies={"XFORWARD": "550 5.7.0 no"})
    out = tmp_path / "env"
    p = proxy({"OutAddress": upstream.address,
               "FilterCommand": "echo \"[$REMOTE]\" > %s; cat" % out})
    with p.connect() as client:
        client.cmd("EHLO client.example")
        assert client.cmd("XFORWARD ADDR=192.0.2.7")[0].startswith("550")
        client.cmd("MAIL FROM:<a@x.test>")
        client.cmd("RCPT TO:<b@y.test>")
        client.cmd("DATA")
        client.send(BODY + b".\r\n")
        client.reply()
    upstream.wait_messages(1)
    assert out.read_text() == "[]\n"


def test_auth_then_skip_authenticated(proxy, make_upstream, tmp_path):
    upstream = make_upstream(extensions=("AUTH PLAIN",))
    marker = tmp_path / "filter-ran"
    p = proxy({"OutAddress": upstream.address, "Skip": "authenticated",
               "FilterCommand": "touch %s; cat" % marker}, debug=4)
    body = b"Subject: skip\r\n\r\n..stuffed\r\nend\r\n"
    with p.connect() as client:
        client.cmd("EHLO client.example")
        assert client.cmd("AUTH PLAIN AHVzZXIAcGFzcw==") == ["235 2.7.0 Authentication successful"]
        client.cmd("MAIL FROM:<a@x.test>")
        client.cmd("RCPT TO:<b@y.test>")
        assert client.cmd("DATA") == ["354 End data with <CR><LF>.<CR><LF>"]   # the server's own
        client.send(body + b".\r\n")
        assert client.reply() == ["250 2.0.0 Ok: queued as TEST"]
    message = upstream.wait_messages(1)[0]
    assert message.raw == body.rstrip(b"\r\n")
    p.wait_log(r"from=a@x\.test, to=b@y\.test, (?:.*, )?status=SKIPPED")
    assert not marker.exists()


@pytest.mark.slow
def test_skip_upload_paused_past_keepalives(proxy, make_upstream):
    """Skip with KeepAlives: the server is inside DATA while the client
    uploads, so a pause longer than KeepAlives sends no NOOP (it would be
    part of the message); the message arrives as sent."""
    upstream = make_upstream(extensions=("AUTH PLAIN",))
    p = proxy({"OutAddress": upstream.address, "Skip": "authenticated", "KeepAlives": 1,
               "FilterCommand": "cat"}, debug=4)
    with p.connect() as client:
        client.cmd("EHLO client.example")
        assert client.cmd("AUTH PLAIN AHVzZXIAcGFzcw==")[0].startswith("235")
        client.cmd("MAIL FROM:<a@x.test>")
        client.cmd("RCPT TO:<b@y.test>")
        assert client.cmd("DATA")[0].startswith("354")
        client.send(b"Subject: slow\r\n\r\nfirst\r\n")
        time.sleep(2.5)
        client.send(b"second\r\n.\r\n")
        assert client.reply()[0].startswith("250")
    message = upstream.wait_messages(1)[0]
    assert message.raw == b"Subject: slow\r\n\r\nfirst\r\nsecond"
    assert "NOOP" not in upstream.verbs()
    p.wait_log(r"from=a@x\.test, to=b@y\.test, (?:.*, )?status=SKIPPED")


def test_auth_without_skip_still_filters(proxy, make_upstream, tmp_path):
    upstream = make_upstream(extensions=("AUTH PLAIN",))
    marker = tmp_path / "filter-ran"
    p = proxy({"OutAddress": upstream.address, "FilterCommand": "touch %s; cat" % marker},
              debug=3)
    with p.connect() as client:
        client.cmd("EHLO client.example")
        assert client.cmd("AUTH PLAIN AHVzZXIAcGFzcw==")[0].startswith("235")
        send_mail(client, "a@x.test", ["b@y.test"], BODY, helo="EHLO client.example")
    upstream.wait_messages(1)
    assert marker.exists()
    p.wait_log("status=FILTERED")


def test_failed_auth_does_not_skip(proxy, make_upstream, tmp_path):
    upstream = make_upstream(replies={"AUTH": "535 5.7.8 Authentication failed",
                                      "NOOP": "235 not after AUTH"})
    marker = tmp_path / "filter-ran"
    p = proxy({"OutAddress": upstream.address, "Skip": "authenticated",
               "FilterCommand": "touch %s; cat" % marker}, debug=3)
    with p.connect() as client:
        client.cmd("EHLO client.example")
        assert client.cmd("NOOP")[0].startswith("235")     # 235 without AUTH: not authenticated
        assert client.cmd("AUTH PLAIN AHVzZXIAcGFzcw==")[0].startswith("535")
        send_mail(client, "a@x.test", ["b@y.test"], BODY)
    upstream.wait_messages(1)
    assert marker.exists()
    p.wait_log("status=FILTERED")


def test_filter_type_reject(proxy, upstream):
    p = proxy({"OutAddress": upstream.address, "FilterType": "reject"}, debug=3)
    with p.connect() as client:
        client.cmd("EHLO client.example")
        assert client.cmd("MAIL FROM:<a@x.test>") == ["530 Email Rejected"]
        assert client.cmd("RCPT TO:<b@y.test>") == ["530 Email Rejected"]
        assert client.cmd("NOOP")[0].startswith("250")
        client.cmd("QUIT")
    assert upstream.verbs() == ["EHLO", "NOOP", "QUIT"]
    p.wait_log(r'client=127\.0\.0\.1, from=a@x\.test, reply="530 Email Rejected", status=REJECTED$')


def test_filter_reject_text_normalised(proxy, upstream):
    p = proxy({"OutAddress": upstream.address, "FilterType": "reject",
               "FilterReject": "Go away"})
    with p.connect() as client:
        client.cmd("EHLO client.example")
        assert client.cmd("MAIL FROM:<a@x.test>") == ["550 Content Rejected; Go away"]
    q = proxy({"OutAddress": upstream.address, "FilterType": "reject",
               "FilterReject": "451 4.7.1 Come back later"})
    with q.connect() as client:
        client.cmd("EHLO client.example")
        assert client.cmd("RCPT TO:<b@y.test>") == ["451 4.7.1 Come back later"]
    assert "MAIL" not in upstream.verbs() and "RCPT" not in upstream.verbs()


def test_filter_type_reject_spares_authenticated_with_skip(proxy, make_upstream):
    """As upstream: Skip: authenticated bypasses the reject check too."""
    upstream = make_upstream(extensions=("AUTH PLAIN",))
    p = proxy({"OutAddress": upstream.address, "FilterType": "reject",
               "Skip": "authenticated"}, debug=3)
    with p.connect() as client:
        client.cmd("EHLO client.example")
        assert client.cmd("MAIL FROM:<a@x.test>") == ["530 Email Rejected"]
        assert client.cmd("AUTH PLAIN AHVzZXIAcGFzcw==")[0].startswith("235")
        assert send_mail(client, "a@x.test", ["b@y.test"], BODY, helo="RSET")[0].startswith("250")
    upstream.wait_messages(1)
    p.wait_log(r"from=a@x\.test, to=b@y\.test, (?:.*, )?status=SKIPPED")


def test_server_unreachable_421(proxy):
    port = free_port()
    p = proxy({"OutAddress": "127.0.0.1:%d" % port})
    with p.connect() as client:
        assert client.greeting[0].startswith("421")
        assert client.closed_by_peer()
    p.wait_log(r"connect to 127\.0\.0\.1:%d failed: Connection refused$" % port)


def test_client_close_closes_server(proxy, upstream):
    p = proxy({"OutAddress": upstream.address})
    client = p.connect()
    client.cmd("EHLO client.example")
    client.close()
    upstream.wait_closed("EHLO client.example")
    assert upstream.verbs() == ["EHLO"]


def test_server_close_closes_client(proxy, make_upstream):
    upstream = make_upstream(drop_at="MAIL")
    p = proxy({"OutAddress": upstream.address})
    with p.connect() as client:
        client.cmd("EHLO client.example")
        client.send(b"MAIL FROM:<a@x.test>\r\n")
        assert client.closed_by_peer()


@pytest.mark.slow
def test_idle_timeout(proxy, upstream):
    p = proxy({"OutAddress": upstream.address, "TimeOut": 2})
    with p.connect() as client:
        client.cmd("EHLO client.example")
        started = time.monotonic()
        assert client.closed_by_peer(timeout=30)
        assert time.monotonic() - started >= 1.5
    upstream.wait_closed("EHLO client.example")


def test_ipv6_listen(proxy, upstream):
    if not socket.has_ipv6:
        import pytest
        pytest.skip("no IPv6")
    port = free_port("::1")
    p = proxy({"OutAddress": upstream.address, "Listen": "[::1]:%d" % port}, debug=3)
    with Client("::1", port) as client:
        final = send_mail(client, "a@x.test", ["b@y.test"], BODY)
        assert final[0].startswith("250")
    upstream.wait_messages(1)
    p.wait_log(r"client=::1, from=a@x\.test, to=b@y\.test, (?:.*, )?status=FILTERED")


def test_ipv6_client_xclient_addr(proxy, make_upstream):
    upstream = make_upstream(extensions=("XCLIENT ADDR",))
    port = free_port("::1")
    proxy({"OutAddress": upstream.address, "Listen": "[::1]:%d" % port, "XClient": "on"})
    with Client("::1", port) as client:
        send_mail(client, "a@x.test", ["b@y.test"], BODY)
    upstream.wait_messages(1)
    assert "XCLIENT ADDR=IPv6:::1" in upstream.commands()


def test_message_log_line_at_info(proxy, upstream):
    p = proxy({"OutAddress": upstream.address}, debug=3)
    with p.connect() as client:
        send_mail(client, "a@x.test", ["b@y.test", "c@y.test"], BODY)
        client.cmd("QUIT")
    match = p.wait_log(r"^proxsmtpd: ([0-9A-F]+): client=127\.0\.0\.1, from=a@x\.test, "
                       r"to=b@y\.test, to=c@y\.test, size=%d, relay=127\.0\.0\.1, "
                       r"delay=\d+\.\d{3}, reply=\"250 2\.0\.0 Ok: queued as TEST\", "
                       r"status=FILTERED$" % len(BODY))
    assert match
    log = p.log()
    assert "accepted connection from: 127.0.0.1" in log
    assert "SERVER <" not in log and "CLIENT >" not in log     # no debug trace at -d 3


def test_no_message_line_below_info(proxy, upstream):
    p = proxy({"OutAddress": upstream.address}, debug=2)
    with p.connect() as client:
        send_mail(client, "a@x.test", ["b@y.test"], BODY)
        client.cmd("QUIT")
    upstream.wait_closed("QUIT")
    assert "status=" not in p.log() and "accepted connection" not in p.log()


def test_debug_trace_at_4(proxy, upstream):
    p = proxy({"OutAddress": upstream.address}, debug=4)
    with p.connect() as client:
        client.cmd("EHLO client.example")
    p.wait_log(r"CLIENT < EHLO client\.example")
    p.wait_log(r"SERVER < 220 upstream\.test")


def test_many_sessions_at_once(proxy, upstream):
    p = proxy({"OutAddress": upstream.address})
    clients = [p.connect() for _ in range(10)]
    try:
        for number, client in enumerate(clients):
            client.cmd("EHLO c%d.example" % number)
        for number, client in enumerate(clients):
            assert send_mail(client, "s%d@x.test" % number, ["r@y.test"], BODY,
                             helo="RSET")[0].startswith("250")
    finally:
        for client in clients:
            client.close()
    messages = upstream.wait_messages(10)
    assert sorted(m.sender for m in messages) == sorted("s%d@x.test" % n for n in range(10))


def test_data_without_recipients(proxy, upstream):
    p = proxy({"OutAddress": upstream.address})
    with p.connect() as client:
        client.cmd("EHLO client.example")
        client.cmd("MAIL FROM:<a@x.test>")
        assert client.cmd("DATA") == ["503 5.5.1 Error: need RCPT command"]
        assert client.cmd("NOOP")[0].startswith("250")


def test_message_log_line_traces_the_message(proxy, upstream):
    """size, Message-ID (cleaned), filter time and the server's final reply
    (its queue id) are on the message's one log line."""
    p = proxy({"OutAddress": upstream.address, "FilterCommand": "cat"}, debug=3)
    body = (b"Subject: t\r\nMessage-ID:\r\n <id.1@x.test\x1b[2J>\r\n\r\n"
            b"Message-ID: <not-this@x.test>\r\n")
    with p.connect() as client:
        send_mail(client, "a@x.test", ["b@y.test"], body)
        client.cmd("QUIT")
    line = p.wait_log(r"status=FILTERED$").string.splitlines()[-1]
    assert ", size=%d, msgid=<id.1@x.test\\x1b[2J>, relay=127.0.0.1, delay=" % len(body) in line
    assert re.search(r", filter=\d+\.\d{3}, reply=\"250 2\.0\.0 Ok: queued as TEST\", status=FILTERED$",
                     line), line


def test_message_log_line_of_a_refusal_by_the_server(proxy, make_upstream):
    """A server that refuses the message: its reply is on the line, and the client got it."""
    upstream = make_upstream(data_reply="554 5.7.1 no thanks")
    p = proxy({"OutAddress": upstream.address}, debug=3)
    with p.connect() as client:
        assert send_mail(client, "a@x.test", ["b@y.test"], BODY)[0] == "554 5.7.1 no thanks"
    p.wait_log(r"size=%d, relay=127\.0\.0\.1, delay=\d+\.\d+, reply=\"554 5\.7\.1 no thanks\", "
               r"status=FILTERED$" % len(BODY))


@pytest.mark.parametrize("settings", [{"FilterCommand": "cat"},
                                      {"Milters": "inet:127.0.0.1:9"}])
def test_binarymime_not_offered_is_refused_at_mail(proxy, make_upstream, settings):
    """A client that sends BODY=BINARYMIME though the proxy hid it (a
    filter or a milter reads the message as text) is refused at MAIL
    (RFC 3030 3; RFC 5321 4.2.2: 555); the server never sees that MAIL."""
    upstream = make_upstream(extensions=("CHUNKING", "BINARYMIME", "8BITMIME"))
    p = proxy({"OutAddress": upstream.address, "MilterDefaultAction": "accept", **settings})
    with p.connect() as client:
        assert "250-BINARYMIME" not in client.cmd("EHLO client.example")
        assert client.cmd("MAIL FROM:<a@x.test> BODY=BINARYMIME") == [
            "555 5.5.4 BODY=BINARYMIME not offered"]
        assert client.cmd("MAIL FROM:<a@x.test> BODY=8BITMIME")[0].startswith("250")
    upstream.wait_command("MAIL")
    assert [line for line in upstream.commands() if "BINARYMIME" in line.upper()] == []


def test_binarymime_offered_passes_at_mail(proxy, make_upstream):
    """Offered (no filter, the server has CHUNKING and BINARYMIME): relayed."""
    upstream = make_upstream(extensions=("CHUNKING", "BINARYMIME", "8BITMIME"))
    p = proxy({"OutAddress": upstream.address})
    with p.connect() as client:
        assert "250-BINARYMIME" in client.cmd("EHLO client.example")
        assert client.cmd("MAIL FROM:<a@x.test> BODY=BINARYMIME")[0].startswith("250")
    upstream.wait_command("MAIL")
