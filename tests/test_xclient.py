"""XCLIENT starts the receiving server's session over (Postfix's
XCLIENT_README: its 220 is a new greeting, and the client must send EHLO or
HELO again).  The proxy says the client's EHLO/HELO again, and reads its
reply, before anything else: on the server leg (XClient) and on the filter
node leg (FilterType smtp).

RecordingServer plays a server as strict as Postfix with
smtpd_helo_required: MAIL before EHLO/HELO, in the session XCLIENT started,
is refused with 503.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
import trustme

from harness import send_mail

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BODY = b"Subject: xclient\r\nFrom: a@x.test\r\n\r\nhello\r\n"
EXTENSIONS = ("SIZE 10240000", "PIPELINING", "XCLIENT NAME ADDR PROTO HELO", "8BITMIME")


def strict(name: str = "strict.test", extensions: tuple[str, ...] = EXTENSIONS) -> dict:
    """RecordingServer settings: XCLIENT's 220 forgets the HELO name, MAIL
    without one is refused (as Postfix's smtpd_helo_required does).  The EHLO
    reply after XCLIENT names `after-xclient.test`, so that a test can tell
    whether it reached the client."""
    def hello(line, conn):
        conn.greeted = True
        host = "after-xclient.test" if conn.xclient else name
        if line.split(" ", 1)[0].upper() == "HELO":
            return "250 " + host
        lines = ["250-%s" % host] + ["250-%s" % ext for ext in extensions]
        return "\r\n".join(lines[:-1] + ["250 " + lines[-1][4:]])

    def xclient(line, conn):
        conn.greeted = False
        return "220 %s ESMTP after XCLIENT" % name

    def mail(line, conn):
        if not getattr(conn, "greeted", False):
            return "503 5.5.1 Error: send HELO/EHLO first"
        return "250 2.1.0 Ok"

    return {"extensions": extensions, "name": name, "greeting": "220 %s ESMTP" % name,
            "replies": {"EHLO": hello, "HELO": hello, "XCLIENT": xclient, "MAIL": mail}}


# --- the server leg ------------------------------------------------------------------

def test_server_hears_the_clients_ehlo_again_after_xclient(proxy, make_upstream):
    upstream = make_upstream(**strict())
    p = proxy({"OutAddress": upstream.address, "XClient": "on"})
    with p.connect() as client:
        ehlo = client.cmd("EHLO client.example")
        assert ehlo[0] == "250-strict.test"
        assert client.cmd("MAIL FROM:<a@x.test>") == ["250 2.1.0 Ok"]
        assert client.cmd("RCPT TO:<b@y.test>")[0].startswith("250")
        assert client.cmd("DATA")[0].startswith("354")
        client.send(BODY + b".\r\n")
        assert client.reply()[0].startswith("250")
        assert client.cmd("QUIT")[0].startswith("221")
    message = upstream.wait_messages(1)[0]
    assert upstream.commands(message.conn)[:4] == [
        "EHLO client.example", "XCLIENT ADDR=127.0.0.1", "EHLO client.example",
        "MAIL FROM:<a@x.test>"]
    # XCLIENT due at the client's own EHLO: that EHLO is the one the server
    # hears after XCLIENT (no EHLO of the proxy's before it), and its reply,
    # from the server, is the one the client gets
    with p.connect() as client:
        assert client.cmd("EHLO first.example")[0] == "250-strict.test"
        assert client.cmd("EHLO second.example")[0] == "250-after-xclient.test"
        assert send_mail(client, "a@x.test", ["b@y.test"], BODY,
                         helo="EHLO third.example")[0].startswith("250")
    message = upstream.wait_messages(2)[1]
    assert upstream.commands(message.conn)[:5] == [
        "EHLO first.example", "XCLIENT ADDR=127.0.0.1", "EHLO second.example",
        "EHLO third.example", "MAIL FROM:<a@x.test>"]


def test_helo_client_is_said_again_with_helo(proxy, make_upstream):
    upstream = make_upstream(**strict())
    p = proxy({"OutAddress": upstream.address, "XClient": "on"})
    with p.connect() as client:
        assert send_mail(client, "a@x.test", ["b@y.test"], BODY,
                         helo="HELO client.example")[0].startswith("250")
    message = upstream.wait_messages(1)[0]
    assert upstream.commands(message.conn)[:4] == [
        "HELO client.example", "XCLIENT ADDR=127.0.0.1", "HELO client.example",
        "MAIL FROM:<a@x.test>"]


def test_pipelining_client_gets_one_reply_per_command(proxy, make_upstream):
    """The server's reply to the proxy's own EHLO never reaches the client;
    a pipelined group gets its replies in order, one each."""
    upstream = make_upstream(**strict())
    p = proxy({"OutAddress": upstream.address, "XClient": "on"})
    with p.connect() as client:
        assert client.cmd("EHLO client.example")[-1].startswith("250 ")
        client.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>\r\nDATA\r\n")
        replies = [client.reply() for _ in range(4)]
        assert [reply[0][:3] for reply in replies] == ["250", "250", "250", "354"]
        assert all(len(reply) == 1 for reply in replies)
        client.send(BODY + b".\r\nNOOP\r\n")
        assert client.reply()[0].startswith("250 2.0.0 Ok: queued")
        assert client.reply() == ["250 2.0.0 Ok"]
        client.sock.settimeout(1)
        assert client.cmd("QUIT") == ["221 2.0.0 Bye"]
        assert client.reply() == []         # nothing more: the server's extra reply stayed here
    message = upstream.wait_messages(1)[0]
    assert message.recipients == ["b@y.test", "c@y.test"]
    assert upstream.verbs(message.conn)[:3] == ["EHLO", "XCLIENT", "EHLO"]


def test_server_refusing_the_ehlo_after_xclient_is_logged(proxy, make_upstream):
    """A server that refuses the name after XCLIENT: a warning says so, and
    the client hears the server's own answer to its command."""
    settings = strict()
    hello = settings["replies"]["EHLO"]
    settings["replies"]["EHLO"] = lambda line, conn: (
        "550 5.7.1 <client.example>: Helo command rejected" if conn.xclient else hello(line, conn))
    upstream = make_upstream(**settings)
    p = proxy({"OutAddress": upstream.address, "XClient": "on"})
    with p.connect() as client:
        assert client.cmd("EHLO client.example")[0] == "250-strict.test"
        assert client.cmd("MAIL FROM:<a@x.test>") == ["503 5.5.1 Error: send HELO/EHLO first"]
    p.wait_log("server refused EHLO after XCLIENT: 550 5.7.1 <client.example>: Helo command rejected")
    assert upstream.verbs()[:4] == ["EHLO", "XCLIENT", "EHLO", "MAIL"]


# --- the filter node leg -----------------------------------------------------------------

def node_filter(upstream, node) -> dict:
    return {"OutAddress": upstream.address, "FilterType": "smtp", "FilterCommand": node.address}


def test_filter_node_hears_ehlo_after_xclient(proxy, upstream, make_upstream):
    node = make_upstream(**strict("node.test"))
    p = proxy(node_filter(upstream, node), debug=3)
    with p.connect() as client:
        assert send_mail(client, "a@x.test", ["b@y.test"], BODY)[0].startswith("250")
    upstream.wait_messages(1)
    checked = node.wait_messages(1)[0]
    assert node.commands(checked.conn)[:4] == [
        "EHLO %s" % socket.getfqdn(), "XCLIENT ADDR=127.0.0.1 HELO=client.example",
        "EHLO client.example",
        "MAIL FROM:<a@x.test>"]
    p.wait_log("status=FILTERED")


def test_filter_node_gets_an_address_literal_for_a_client_without_a_name(proxy, upstream,
                                                                         make_upstream):
    """A client that never said EHLO (the server let it): the node hears the
    client's address literal after XCLIENT."""
    node = make_upstream(**strict("node.test"))
    p = proxy(node_filter(upstream, node))
    with p.connect() as client:
        assert client.cmd("MAIL FROM:<a@x.test>")[0].startswith("250")
        assert client.cmd("RCPT TO:<b@y.test>")[0].startswith("250")
        assert client.cmd("DATA")[0].startswith("354")
        client.send(BODY + b".\r\n")
        assert client.reply()[0].startswith("250")
    upstream.wait_messages(1)
    checked = node.wait_messages(1)[0]
    assert node.commands(checked.conn)[1:3] == ["XCLIENT ADDR=127.0.0.1", "EHLO [127.0.0.1]"]


# --- with a real Postfix (tests/postfix.py: smtpd_helo_required and
# smtpd_forbid_unauth_pipelining on, XCLIENT taken from loopback) ------------------------

CLIENT = "127.0.0.9"        # another loopback address: XCLIENT's ADDR is not the proxy's


def received(message: dict) -> str:
    """The first Received header of a message Postfix queued, unfolded."""
    content = message["content"].decode("utf-8", "replace")
    header = content.split("\n\n", 1)[0].replace("\n\t", " ").replace("\n ", " ")
    return next(line for line in header.splitlines() if line.startswith("Received:"))


def pipelined_mail(client) -> list[str]:
    """EHLO, then MAIL, RCPT and DATA in one group (PIPELINING), then the
    message; every reply, in order."""
    replies = [client.cmd("EHLO client.example")]
    client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
    replies += [client.reply() for _ in range(3)]
    client.send(BODY + b".\r\n")
    replies.append(client.reply())
    return replies


@pytest.mark.root
def test_postfix_server_takes_the_session_after_xclient(proxy, postfix):
    server = postfix()
    p = proxy({"OutAddress": server.address, "XClient": "on"})
    with p.connect(source=CLIENT) as client:
        replies = pipelined_mail(client)
        assert [reply[-1][:3] for reply in replies] == ["250", "250", "250", "354", "250"], replies
        assert client.cmd("QUIT")[0].startswith("221")
    [message] = server.messages(1)
    assert (message["sender"], message["recipients"]) == ("a@example.org", ["b@example.net"])
    # the client's HELO name and address, as if it had spoken to Postfix itself
    assert received(message).startswith("Received: from client.example (unknown [%s])" % CLIENT)
    log = server.log()
    assert "improper command pipelining" not in log and "503 5.5.1" not in log


@pytest.mark.root
def test_postfix_server_with_starttls_then_xclient(proxy, postfix):
    cert = trustme.CA().issue_cert("postfix.test", "127.0.0.1")
    files = Path(tempfile.mkdtemp(prefix="proxsmtp-xclient-tls."))
    try:
        os.chmod(files, 0o755)
        chain, key = files / "cert.pem", files / "key.pem"
        chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(key))
        server = postfix(tls=(chain, key))
        p = proxy({"OutAddress": server.address, "XClient": "on", "ServerTLS": "encrypt"})
        with p.connect(source=CLIENT) as client:
            assert send_mail(client, "a@example.org", ["b@example.net"], BODY,
                             helo="EHLO client.example")[0].startswith("250")
            assert client.cmd("QUIT")[0].startswith("221")
        [message] = server.messages(1)
    finally:
        shutil.rmtree(files, ignore_errors=True)
    # ESMTPS: the TLS came first, then XCLIENT and the EHLO that names the client
    assert re.match(r"Received: from client\.example \(unknown \[%s\]\) .*with ESMTPS "
                    % re.escape(CLIENT), received(message)), received(message)
    log = server.log()
    assert "improper command pipelining" not in log and "503 5.5.1" not in log


@pytest.mark.root
def test_postfix_filter_node_takes_the_session_after_xclient(proxy, postfix, upstream):
    node = postfix()
    p = proxy({"OutAddress": upstream.address, "FilterType": "smtp",
               "FilterCommand": node.address}, debug=3)
    with p.connect(source=CLIENT) as client:
        replies = pipelined_mail(client)
        assert [reply[-1][:3] for reply in replies] == ["250", "250", "250", "354", "250"], replies
    assert upstream.wait_messages(1)[0].body.endswith(b"hello")
    [checked] = node.messages(1)
    assert received(checked).startswith("Received: from client.example (unknown [%s])" % CLIENT)
    p.wait_log("status=FILTERED")
    log = node.log()
    assert "improper command pipelining" not in log and "503 5.5.1" not in log
