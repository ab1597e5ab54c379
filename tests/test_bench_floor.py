"""bench/floor.py, the contract floor of the benchmark, keeps the contract it
claims to measure: whole messages arrive intact, the client hears the
server's verdict and only after the server gave it, replies keep their
order in a pipelined group (the proxy's own among them), and the EHLO reply
is filtered but stays well formed.  A floor that skipped any of it would
make proxsmtpd look worse than it is."""

from __future__ import annotations

import smtplib
import socket
import subprocess
import sys
import threading
import time

import pytest

from harness import REPO, RecordingServer, answers, free_port, stop_process, wait_until

pytest.importorskip("uvloop")


@pytest.fixture
def upstream():
    server = RecordingServer(extensions=("SIZE 10240000", "PIPELINING", "BINARYMIME",
                                         "CHUNKING"), refuse=("nobody@y.test",))
    yield server
    server.stop()


@pytest.fixture
def floor(upstream):
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "floor.py"), "--workers", "1",
                             "127.0.0.1:%d" % port, upstream.address])
    try:
        wait_until(lambda: answers("127.0.0.1", port), what="floor.py to answer")
        yield port
    finally:
        stop_process(proc)


def replies(reader, count: int) -> list[bytes]:
    """The last lines of `count` whole replies."""
    got = []
    while len(got) < count:
        line = reader.readline()
        assert line, "connection closed after %r" % got
        if line[3:4] != b"-":
            got.append(line.rstrip(b"\r\n"))
    return got


def test_messages_arrive_intact_and_the_verdict_is_the_servers(floor, upstream):
    events = []

    def verdict(message, conn):
        if b"REJECT-ME" in message.raw:
            return "554 5.7.1 not this one"
        if b"Subject: slow" in message.raw:
            time.sleep(0.3)        # a proxy that answered on its own would be done by now
            events.append("server said 250")
        return "250 2.0.0 Ok: queued"

    upstream.data_reply = verdict
    bodies = [b"Subject: one\r\n\r\n.a leading dot\r\n..two\r\n.\r\nend\r\n",
              b"Subject: slow\r\n\r\n" + b"x" * 78 * 2000 + b"\r\n",
              b"Subject: empty\r\n\r\n"]
    with smtplib.SMTP("127.0.0.1", floor, timeout=10) as smtp:
        code, _ = smtp.ehlo("client.test")
        assert code == 250
        assert smtp.has_extn("pipelining") and smtp.has_extn("size")
        assert not smtp.has_extn("chunking") and not smtp.has_extn("binarymime")
        assert smtp.has_extn("xfiltered")       # the removed last line, replaced
        for body in bodies:
            assert smtp.sendmail("a@x.test", ["b@y.test", "nobody@y.test"], body) \
                == {"nobody@y.test": (550, b"5.1.1 <nobody@y.test>: Recipient address rejected")}
            if b"slow" in body:
                events.append("client heard 250")
        with pytest.raises(smtplib.SMTPDataError) as refused:
            smtp.sendmail("a@x.test", ["b@y.test"], b"Subject: no\r\n\r\nREJECT-ME\r\n")
        assert (refused.value.smtp_code, refused.value.smtp_error) == (554, b"5.7.1 not this one")
    assert events == ["server said 250", "client heard 250"]
    got = upstream.wait_messages(3)
    assert [message.raw + b"\r\n" for message in got] == \
        [body.replace(b"\r\n.", b"\r\n..") for body in bodies]
    assert all(m.sender == "a@x.test" and m.recipients == ["b@y.test"] for m in got)


def test_pipelined_groups_get_their_replies_in_order(floor, upstream):
    with socket.create_connection(("127.0.0.1", floor), timeout=10) as sock:
        reader = sock.makefile("rb")
        assert replies(reader, 1)[0].startswith(b"220")
        sock.sendall(b"EHLO client.test\r\n")
        assert replies(reader, 1) == [b"250 XFILTERED"]
        sock.sendall(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
        assert [r[:3] for r in replies(reader, 3)] == [b"250", b"250", b"354"]
        sock.sendall(b"Subject: piped\r\n\r\nhello\r\n.\r\n")
        assert replies(reader, 1) == [b"250 2.0.0 Ok: queued as TEST"]
        # the proxy's own replies keep their places; no recipient: the server's DATA answer
        sock.sendall(b"MAIL FROM:<a@x.test>\r\nXCLIENT ADDR=192.0.2.1\r\nBDAT 10 LAST\r\n"
                     b"RCPT TO:<nobody@y.test>\r\nDATA\r\n")
        assert [r[:3] for r in replies(reader, 5)] == [b"250", b"554", b"502", b"550", b"503"]
        # the message and a command after its dot in one write
        sock.sendall(b"RSET\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
        assert [r[:3] for r in replies(reader, 4)] == [b"250", b"250", b"250", b"354"]
        sock.sendall(b"Subject: second\r\n\r\n.\r\nNOOP\r\n")
        assert [r[:3] for r in replies(reader, 2)] == [b"250", b"250"]
        # bytes after DATA, before its 354: neither commands nor the message
        sock.sendall(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n"
                     b"Subject: smuggled\r\n\r\n.\r\n")
        assert replies(reader, 3)[2].startswith(b"554 5.5.0")
        assert reader.readline() == b""
    upstream.wait_for(lambda: sum(conn.closed for conn in upstream.connections) == 2,
                      what="the server connection closed")
    assert [m.raw for m in upstream.messages] == [b"Subject: piped\r\n\r\nhello",
                                                  b"Subject: second\r\n"]
    verbs = upstream.verbs(1)
    assert "XCLIENT" not in verbs and "BDAT" not in verbs
    assert verbs.count("DATA") == 3         # two messages, and the one without recipients
