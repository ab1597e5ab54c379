"""bench/floor.py, the contract floor of the benchmark, keeps the contract it
claims to measure: whole messages arrive intact, the client hears the
server's verdict and only after the server gave it, replies keep their
order in a pipelined group (the proxy's own among them), and the EHLO reply
is filtered but stays well formed.  A floor that skipped any of it would
make proxsmtpd look worse than it is.  Its two parsers (the end of the
message, the EHLO filter) get property tests of their own."""

from __future__ import annotations

import smtplib
import socket
import subprocess
import sys
import time

import pytest
from hypothesis import given, strategies as st

from harness import REPO, RecordingServer, answers, free_port, stop_process, wait_until

pytest.importorskip("uvloop")
sys.path.insert(0, str(REPO / "bench"))
import floor as floor_py  # noqa: E402


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


@pytest.mark.e2e
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


@pytest.mark.e2e
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


# --- the two parsers of floor.py on their own (hypothesis) ---------------------------------
body_lines = st.lists(st.binary(max_size=30).map(
    lambda line: line.replace(b"\r", b"").replace(b"\n", b"")), max_size=12)


class Capture:
    def __init__(self) -> None:
        self.written = b""

    def write(self, data) -> None:
        self.written += bytes(data)


@given(body_lines, st.binary(max_size=20), st.lists(st.integers(0, 400), max_size=6))
@pytest.mark.unit
def test_the_message_ends_at_the_first_crlf_dot_crlf_wherever_the_reads_split(lines, after, cuts):
    message = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n"
                       for line in lines) + b".\r\n"
    stream = message + after
    session = floor_py.ClientSide(("127.0.0.1", 25))
    session.transport, session.other = Capture(), floor_py.ServerSide()
    session.other.transport = Capture()
    session.state, session.body = floor_py.BODY, bytearray(b"\r\n")
    points = sorted({0, len(stream), *(cut for cut in cuts if cut < len(stream))})
    for start, end in zip(points, points[1:]):
        session.data_received(stream[start:end])
    assert session.state == floor_py.SERVER_354
    assert session.other.transport.written == b"DATA\r\n"
    assert bytes(session.message) == message
    assert session.inbuf == after


@given(st.lists(st.sampled_from([b"SIZE 1000", b"PIPELINING", b"CHUNKING", b"binarymime",
                                 b"8BITMIME", b"XCLIENT NAME ADDR", b"STARTTLS", b""]),
                max_size=6))
@pytest.mark.unit
def test_the_filtered_ehlo_reply_stays_well_formed(keywords):
    lines = [b"250-server.test"] + [b"250-" + word for word in keywords]
    lines[-1] = b"250 " + lines[-1][4:]
    out = floor_py.filter_ehlo(b"".join(line + b"\r\n" for line in lines)).split(b"\r\n")
    assert out[-1] == b"" and out[0][4:] == b"server.test"
    out = out[:-1]
    assert all(line[:4] == b"250-" for line in out[:-1]) and out[-1][:4] == b"250 "
    assert not any(line[4:].split()[:1] and line[4:].split()[0].upper() in floor_py.FILTERED
                   for line in out)
    assert [line[4:] for line in out[1:] if line != b"250 XFILTERED"] == \
        [word for word in keywords if not (word.split()[:1] and word.split()[0].upper()
                                           in floor_py.FILTERED)]
