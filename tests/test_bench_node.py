"""bench/node.py, the benchmark's filter node, behaves as the nodes it
stands for: XCLIENT starts the session over as Postfix's does (MAIL before
the next EHLO is refused, and XCLIENT inside a transaction too), STARTTLS
works with the certificate the bench makes and EHLO is required after it,
and pipelined commands and messages get their replies in order.  A node
that accepted MAIL right after XCLIENT would let a connection pool that
forgets the EHLO pass the bench and fail against Postfix."""

from __future__ import annotations

import smtplib
import socket
import subprocess
import sys

import pytest
from harness import REPO, answers, free_port, stop_process, wait_until

sys.path.insert(0, str(REPO / "bench"))
import tlsclient  # noqa: E402


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    return tlsclient.make_certificate(str(tmp_path_factory.mktemp("node-cert")))


@pytest.fixture
def node(certificate):
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "node.py"), "--workers", "1",
                             "--tls", *certificate, "127.0.0.1:%d" % port])
    try:
        wait_until(lambda: answers("127.0.0.1", port), what="node.py to answer")
        yield port
    finally:
        stop_process(proc)


@pytest.mark.e2e
def test_xclient_starts_the_session_over_and_ehlo_is_required_again(node):
    with smtplib.SMTP("127.0.0.1", node, timeout=10) as smtp:
        assert smtp.ehlo("proxy.test")[0] == 250
        assert smtp.has_extn("xclient") and smtp.has_extn("pipelining")
        assert smtp.has_extn("8bitmime") and smtp.has_extn("starttls")
        code, text = smtp.docmd("XCLIENT", "ADDR=192.0.2.1 HELO=client.test")
        assert code == 220, text
        assert smtp.docmd("MAIL", "FROM:<a@x.test>")[0] == 503     # EHLO first
        assert smtp.ehlo("client.test")[0] == 250
        assert smtp.docmd("MAIL", "FROM:<a@x.test> BODY=8BITMIME")[0] == 250
        assert smtp.docmd("XCLIENT", "ADDR=192.0.2.2")[0] == 503   # not inside a transaction
        assert smtp.docmd("RCPT", "TO:<b@y.test>")[0] == 250
        code, text = smtp.data(b"Subject: one\r\n\r\n.leading dot\r\n")
        assert code == 250 and b"queued as" in text
        assert smtp.docmd("XCLIENT", "BOGUS=1")[0] == 501
        assert smtp.rset()[0] == 250
        assert smtp.docmd("XCLIENT", "ADDR=192.0.2.2 NAME=[UNAVAILABLE]")[0] == 220
        assert smtp.ehlo("other.test")[0] == 250
        assert smtp.sendmail("a@x.test", ["b@y.test"], b"Subject: two\r\n\r\n") == {}


@pytest.mark.e2e
def test_starttls_then_ehlo_again_and_no_second_starttls(node):
    with smtplib.SMTP("127.0.0.1", node, timeout=10) as smtp:
        smtp.ehlo("proxy.test")
        smtp.starttls(context=tlsclient.client_context())
        assert smtp.docmd("MAIL", "FROM:<a@x.test>")[0] == 503     # RFC 3207: EHLO again
        assert smtp.ehlo("proxy.test")[0] == 250
        assert not smtp.has_extn("starttls")
        assert smtp.docmd("STARTTLS")[0] == 502
        assert smtp.sendmail("a@x.test", ["b@y.test"], b"Subject: tls\r\n\r\nbody\r\n") == {}


@pytest.mark.e2e
def test_pipelined_group_and_empty_message(node):
    with socket.create_connection(("127.0.0.1", node), timeout=10) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220")
        sock.sendall(b"EHLO p.test\r\nMAIL FROM:<>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
        codes = []
        while len(codes) < 4:
            line = reader.readline()
            if line[3:4] != b"-":
                codes.append(line[:3])
        assert codes == [b"250", b"250", b"250", b"354"]
        sock.sendall(b".\r\nQUIT\r\n")
        assert reader.readline().startswith(b"250 2.0.0 Ok: queued as")
        assert reader.readline().startswith(b"221")
        assert reader.readline() == b""


@pytest.mark.e2e
def test_chunking_node_takes_bdat_chunks_pipelined():
    """--chunking (the bench's bdat section's sink): a chunk's bytes are
    never commands, each chunk is answered after its bytes, LAST queues."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "node.py"), "--workers", "1",
                             "--chunking", "127.0.0.1:%d" % port])
    try:
        wait_until(lambda: answers("127.0.0.1", port), what="node.py to answer")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            reader = sock.makefile("rb")
            assert reader.readline().startswith(b"220")
            sock.sendall(b"EHLO p.test\r\n")
            ehlo = [reader.readline()]
            while ehlo[-1][3:4] == b"-":
                ehlo.append(reader.readline())
            assert b"250-CHUNKING\r\n" in ehlo or ehlo[-1] == b"250 CHUNKING\r\n"
            sock.sendall(b"MAIL FROM:<>\r\nRCPT TO:<b@y.test>\r\nBDAT 6\r\nQUIT\r\nBDAT 3 LAST\r\n"
                         b".\r\nBDAT 0 LAST\r\nQUIT\r\n")
            assert [reader.readline()[:3] for _ in range(3)] == [b"250", b"250", b"250"]
            assert reader.readline().startswith(b"250 2.0.0 Ok: queued as")
            assert reader.readline().startswith(b"503")      # no transaction now
            assert reader.readline().startswith(b"221")
    finally:
        stop_process(proc)
