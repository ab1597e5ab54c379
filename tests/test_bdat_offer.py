"""A message that came by BDAT goes on by BDAT (RFC 3030), byte for byte:
to the server (message/transfer.py's offer, message/spool.py's framing)
and to a filter node that offers CHUNKING; and the client's ESMTP
parameters pass untouched.  The framing on its own, the Transfer in a
session of fakes, then a real Postfix as the BDAT-taking server."""

from __future__ import annotations

import asyncio
import io
import re
import socket
import subprocess

import pytest
from harness import Client, send_mail
from hypothesis import given
from hypothesis import strategies as st

from proxsmtp.message import datapath, spool
from proxsmtp.process import config as configuration
from proxsmtp.session.session import Session

# --- the framing --------------------------------------------------------------------------


def unframe(stream: bytes) -> tuple[bytes, list[int], bool]:
    """(the bytes, the chunk sizes, whether the last said LAST) of BDAT-framed `stream`."""
    data, sizes, last = b"", [], False
    while stream:
        assert not last, "bytes after the LAST chunk"
        line, stream = stream.split(b"\r\n", 1)
        match = re.fullmatch(rb"BDAT (\d+)( LAST)?", line)
        assert match, line
        size = int(match.group(1))
        data, stream = data + stream[:size], stream[size:]
        sizes.append(size)
        last = bool(match.group(2))
    return data, sizes, last


MESSAGES = st.lists(st.sampled_from([b"Subject: x\r\n", b"\r\n", b".\r\n", b"..\r\n", b"a\n",
                                     b".", b"\r", b"\x00\xff", b"body line\r\n", b"  \r\n"]),
                    max_size=30).map(b"".join)
HEADERS = st.sampled_from([None, b"X-Filtered: yes", b"Received: by proxy"])


@given(MESSAGES, HEADERS, st.integers(1, 40))
@pytest.mark.unit
def test_bdat_framing_says_each_size_and_keeps_every_byte(message, header, chunk):
    """However the chunks fall, the bytes are with_header()'s, each count
    is right, only the last says LAST, and the size is known beforehand."""
    expected = b"".join(spool.with_header(io.BytesIO(message), header))
    total = spool.with_header_size(io.BytesIO(message), len(message), header)
    assert total == len(expected)
    pieces = spool.with_header(io.BytesIO(message), header)
    framed = b"".join(spool.bdat_framed(pieces, total, chunk))
    data, sizes, last = unframe(framed)
    assert data == expected and last
    assert len(sizes) == spool.bdat_chunks(total, chunk)
    assert all(size == chunk for size in sizes[:-1])


@given(MESSAGES, st.data())
@pytest.mark.unit
def test_a_bdat_message_by_data_is_dot_stuffed_whole(message, data):
    """However it is split, every line that begins with a dot gets a second
    one (after CRLF or a bare LF), so a server unstuffing each line gets the
    bytes the client sent, and no line is a lone dot."""
    cuts = sorted(data.draw(st.lists(st.integers(0, len(message)), max_size=5)))
    pieces = [message[a:b] for a, b in zip([0] + cuts, cuts + [len(message)])]
    out = b"".join(spool.dot_stuffed(iter(pieces)))
    assert re.sub(rb"(^|\n)\.", rb"\1", out) == message
    assert out == b"".join(spool.dot_stuffed(iter([message])))
    framed = b"".join(spool.data_pieces(io.BytesIO(message), None, True))
    assert framed.endswith(b"\r\n.\r\n") or framed == message + b".\r\n" == b".\r\n"
    assert all(line.rstrip(b"\r") != b"." for line in framed[:-3].split(b"\n"))


def server_unstuff(stream: bytes) -> bytes:
    """What a server stores of `stream` sent after DATA's 354: each line
    (a bare LF ends one too, as for Postfix) with its first dot taken off,
    up to `.` CRLF, which must be the last line; no line before it may be
    read as the end, by a strict server or one that drops CRs (RFC 5321 4.5.2)."""
    lines = io.BytesIO(stream).readlines()
    stored = []
    for at, line in enumerate(lines):
        if line.rstrip(b"\r\n") == b".":
            assert at == len(lines) - 1 and line == b".\r\n", lines
            return b"".join(stored)
        stored.append(line[1:] if line.startswith(b".") else line)
    raise AssertionError("no end of DATA in %r" % stream)


OUTPUTS = st.lists(st.sampled_from([b"Subject: x\r\n", b"\r\n", b"\n", b".\r\n", b"..\r\n",
                                    b".", b"..", b"x", b"\r", b".\r\r\n", b".x\n", b"\xff"]),
                   max_size=30).map(b"".join)


@given(OUTPUTS, st.data())
@pytest.mark.unit
def test_a_filters_output_goes_by_bdat_as_the_server_stores_it_by_data(output, data):
    """Any output of a pipe or file filter, however it is read in pieces,
    becomes by BDAT exactly what the server stores of it sent by DATA."""
    cuts = sorted(data.draw(st.lists(st.integers(0, len(output)), max_size=6)))
    pieces = [output[a:b] for a, b in zip([0] + cuts, cuts + [len(output)])]
    by_bdat = b"".join(spool.stored_by_data(iter(pieces)))
    assert by_bdat == server_unstuff(b"".join(spool.outgoing(io.BytesIO(output), None)))
    assert by_bdat == b"".join(spool.stored_by_data(iter([output])))
    if output.endswith(b"\r\n") or not output:   # a BDAT message through `cat` is kept
        assert b"".join(spool.stored_by_data(spool.dot_stuffed(iter([output])))) == output


@pytest.mark.unit
def test_with_header_inserts_as_data_does_but_stuffs_nothing():
    message = b"Subject: x\r\n\r\n.\r\n..\r\nbare\nend"
    out = b"".join(spool.with_header(io.BytesIO(message), b"X-A: 1"))
    assert out == b"Subject: x\r\nX-A: 1\r\n\r\n.\r\n..\r\nbare\nend"
    received = b"".join(spool.with_header(io.BytesIO(message), b"Received: by p"))
    assert received == b"Received: by p\r\n" + message
    assert b"".join(spool.with_header(io.BytesIO(b"Subject: x"), b"X-A: 1")) == \
        b"Subject: x\r\nX-A: 1\r\n"
    assert b"".join(spool.with_header(io.BytesIO(b""), b"X-A: 1")) == b"X-A: 1\r\n"


@pytest.mark.unit
def test_bdat_framing_refuses_a_count_it_cannot_keep():
    with pytest.raises(ValueError):
        list(spool.bdat_framed(iter([b"abc"]), 2, 10))
    with pytest.raises(ValueError):
        list(spool.bdat_framed(iter([b"abc"]), 4, 10))
    assert list(spool.bdat_framed(iter([]), 0, 10)) == [b"BDAT 0 LAST\r\n"]


# --- the Transfer's offer, in a session of fakes ------------------------------------------

class Transport:
    """What a Channel writes to: the bytes, kept."""

    def __init__(self) -> None:
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


@pytest.fixture
def session(tmp_path):
    """A session whose server offered `offers`, in a transaction, its
    client's message in by BDAT (envelope.chunked), no reply still due."""
    with socket.socket() as sock:
        def make(offers=("CHUNKING", "PIPELINING"), in_memory=True, **settings):
            made = Session(configuration.Config(TempDirectory=str(tmp_path), **settings), sock)
            made.client.connection_made(Transport())
            made.server.connection_made(Transport())
            made.server_leg.offers = set(offers)
            made.envelope.sender = "a@x.test"
            made.envelope.recipients = ["b@y.test"]
            made.envelope.chunked = True
            transfer = made.new_transfer(datapath.RELAYED)
            transfer.message = spool.Spool(str(tmp_path), in_memory=in_memory)
            return made, transfer
        yield make


def spooled(transfer, data: bytes) -> None:
    transfer.message.write(data)
    transfer.message.finish()


def server_says(session, *replies: bytes) -> bytes:
    """The server's replies through the relay; what the client heard."""
    session.server.buf += b"".join(replies)
    session.relay_lines()
    return session.client.transport.written


MESSAGE = b"Subject: bdat\r\n\r\n.\r\n..\r\nbare\nlone\r\n.\n"


@pytest.mark.session
def test_a_bdat_message_goes_on_by_bdat_byte_exact(session):
    made, transfer = session()
    spooled(transfer, MESSAGE)
    transfer.offer()
    assert made.server.transport.written == b"BDAT %d LAST\r\n" % len(MESSAGE) + MESSAGE
    assert transfer.awaiting_final
    assert server_says(made, b"250 2.0.0 Ok: queued as B1\r\n") == \
        b"250 2.0.0 Ok: queued as B1\r\n"
    assert made.transfer is None


@pytest.mark.session
def test_the_header_line_is_in_the_bdat_count(session):
    made, transfer = session(Header="X-Proxied: yes")
    spooled(transfer, MESSAGE)
    transfer.offer()
    data, sizes, last = unframe(made.server.transport.written)
    assert data == b"Subject: bdat\r\nX-Proxied: yes\r\n" + MESSAGE[15:] and last
    assert sizes == [len(MESSAGE) + len(b"X-Proxied: yes\r\n")]


@pytest.mark.session
def test_a_data_message_still_goes_by_data(session):
    made, transfer = session()
    made.envelope.chunked = False
    spooled(transfer, b"a\r\n.\r\n")
    transfer.offer()
    assert made.server.transport.written == b"DATA\r\n"


@pytest.mark.session
def test_a_server_without_chunking_gets_data_dot_stuffed(session):
    """A client that used BDAT unoffered, behind a server without CHUNKING:
    DATA, the lone dot escaped, never a BDAT the server cannot take."""
    made, transfer = session(offers=("PIPELINING",))
    spooled(transfer, b"a\r\n.\r\n..\r\n.x\nb")
    transfer.offer()
    assert made.server.transport.written == b"DATA\r\n"
    server_says(made, b"354 go\r\n")
    assert made.server.transport.written == \
        b"DATA\r\na\r\n..\r\n...\r\n..x\nb\r\n.\r\n"


@pytest.mark.session
def test_a_message_on_disk_goes_in_chunks_under_flow_control(session, monkeypatch):
    """Streamed by the task, in BDAT_CHUNK chunks to a pipelining server;
    a refused chunk is the client's reason when the LAST is refused too."""
    monkeypatch.setattr(spool, "BDAT_CHUNK", 10)
    made, transfer = session(in_memory=False, Header="X-P: 1")
    spooled(transfer, MESSAGE)
    transfer.offer()
    assert transfer.task is not None and made.server.transport.written == b""
    command, transfer.task = transfer.task, None    # as the session's task takes it
    asyncio.run(command)
    data, sizes, last = unframe(made.server.transport.written)
    assert data == b"Subject: bdat\r\nX-P: 1\r\n" + MESSAGE[15:] and last
    assert sizes == [10, 10, 10, 10, 5]
    heard = server_says(made, b"250 ok\r\n", b"554 5.6.0 no\r\n", b"503 5.5.1 bad\r\n",
                        b"503 5.5.1 bad\r\n", b"503 5.5.1 bad\r\n")
    assert heard == b"554 5.6.0 no\r\n" and made.transfer is None


@pytest.mark.session
def test_a_server_without_pipelining_gets_one_chunk(session):
    made, transfer = session(offers=("CHUNKING",), in_memory=False)
    spooled(transfer, MESSAGE)
    transfer.offer()
    command, transfer.task = transfer.task, None    # as the session's task takes it
    asyncio.run(command)
    assert made.server.transport.written == b"BDAT %d LAST\r\n" % len(MESSAGE) + MESSAGE
    assert server_says(made, b"250 ok\r\n") == b"250 ok\r\n"


# --- a real Postfix 3.7 as the BDAT-taking server -----------------------------------------

# What a DATA relay would change: the `..` line (DATA unstuffs it to `.`),
# the lone dots (stuffed, then unstuffed: kept either way), the bare LFs.
TRICKY = (b"Subject: chunked\r\nX-Tricky: yes\r\n\r\nbefore\r\n.\r\n..\r\n...\r\n"
          b"bare\nlf\n.\nafter\r\n")


def stored(message: bytes) -> bytes:
    """What Postfix's queue holds of `message` (postcat: LF line ends, each
    record a line; a bare LF ends a record too)."""
    return message.replace(b"\r\n", b"\n")


def queued(server, count: int = 1) -> list[dict]:
    """Postfix's queued messages, each one's content without the Received:
    line Postfix puts first (and its continuation lines)."""
    found = server.messages(count)
    for message in found:
        lines = message["content"].split(b"\n")
        assert lines[0].startswith(b"Received: "), lines[:3]
        at = 1
        while lines[at][:1] in (b" ", b"\t"):
            at += 1
        message["content"] = b"\n".join(lines[at:])
    return found


def bdat_session(client, sender: str, recipient: str, message: bytes, chunks: int = 1,
                 mail_params: str = "", rcpt_params: str = "") -> list[str]:
    """EHLO (which must offer CHUNKING), MAIL, RCPT, and `message` in
    `chunks` BDAT chunks; the LAST chunk's reply."""
    ehlo = client.cmd("EHLO client.example")
    assert "250-CHUNKING" in ehlo or "250 CHUNKING" in ehlo, ehlo
    assert client.cmd(("MAIL FROM:<%s>%s" % (sender, mail_params)).encode())[-1][:3] == "250"
    assert client.cmd(("RCPT TO:<%s>%s" % (recipient, rcpt_params)).encode())[-1][:3] == "250"
    size = -(-len(message) // chunks)
    pieces = [message[at:at + size] for at in range(0, len(message), size)] or [b""]
    for piece in pieces[:-1]:
        client.send(b"BDAT %d\r\n" % len(piece) + piece)
        assert client.reply()[-1][:3] == "250"
    client.send(b"BDAT %d LAST\r\n" % len(pieces[-1]) + pieces[-1])
    return client.reply()


@pytest.fixture
def server(postfix):
    """Postfix 3.7 as the server, its EHLO checked for CHUNKING (on by default);
    it adds no header but its Received: line (local_header_rewrite_clients
    empty: no Message-Id or Date of its own for a client on loopback)."""
    instance = postfix(local_header_rewrite_clients="")
    with Client(instance.host, instance.port) as client:
        assert [line for line in client.cmd("EHLO check.test") if line[4:] == "CHUNKING"]
        client.cmd("QUIT")
    return instance


@pytest.mark.e2e
def test_a_bdat_message_reaches_postfix_byte_exact(proxy, server):
    """Bare LF, lone-dot and `..` lines as the client sent them: the proxy's
    log says BDAT to the server, Postfix's queue holds every line."""
    p = proxy({"OutAddress": server.address}, debug=4)
    with p.connect() as client:
        reply = bdat_session(client, "a@x.test", "b@y.test", TRICKY, chunks=3)
        assert reply[-1].startswith("250 2.0.0 Ok: "), reply
    message = queued(server)[0]
    assert message["content"] == stored(TRICKY)
    assert "to the server by BDAT: %d bytes in 1 chunk(s)" % len(TRICKY) in p.log()


@pytest.mark.e2e
def test_the_header_line_and_a_message_on_disk_by_bdat(proxy, server):
    """A message past the memory limit is spooled to disk and sent in
    several pipelined chunks; the Header line is inserted and counted."""
    body = b"".join(b"%06d.\r\n..\r\n.\nline\n" % n for n in range(70000))   # ~1.6 MB
    message = b"Subject: big\r\n\r\n" + body
    p = proxy({"OutAddress": server.address, "Header": "X-Proxied: yes"}, debug=4)
    with p.connect() as client:
        reply = bdat_session(client, "a@x.test", "b@y.test", message, chunks=4)
        assert reply[-1].startswith("250 2.0.0 Ok: "), reply
    content = queued(server)[0]["content"]
    assert content == stored(b"Subject: big\r\nX-Proxied: yes\r\n\r\n" + body)
    total = len(message) + len(b"X-Proxied: yes\r\n")
    assert "to the server by BDAT: %d bytes in 2 chunk(s)" % total in p.log()


@pytest.mark.e2e
def test_a_data_message_still_goes_to_postfix_by_data(proxy, server):
    p = proxy({"OutAddress": server.address}, debug=4)
    with p.connect() as client:
        reply = send_mail(client, "a@x.test", ["b@y.test"], b"Subject: d\r\n\r\n..\r\n")
        assert reply[-1].startswith("250"), reply
    assert queued(server)[0]["content"] == b"Subject: d\n\n.\n"
    assert "BDAT" not in p.log()


@pytest.mark.e2e
def test_smtputf8_and_dsn_pass_untouched_by_bdat(proxy, server):
    """SMTPUTF8 and DSN's parameters reach Postfix as the client wrote
    them, with a UTF-8 envelope and header."""
    message = "Subject: grüße\r\nFrom: jörg@bücher.test\r\n\r\nüber\r\n".encode()
    p = proxy({"OutAddress": server.address}, debug=4)
    with p.connect() as client:
        reply = bdat_session(client, "jörg@bücher.test", "zoë@y.test", message,
                             mail_params=" SMTPUTF8 RET=HDRS ENVID=env+2B1",
                             rcpt_params=" NOTIFY=SUCCESS,DELAY ORCPT=rfc822;z@y.test")
        assert reply[-1].startswith("250"), reply
    got = queued(server)[0]
    assert got["sender"] == "jörg@bücher.test" and got["recipients"] == ["zoë@y.test"]
    assert got["content"] == stored(message)
    envelope = subprocess.run(["postcat", "-c", str(server.config), "-e", "-q",
                               got["queue_id"]], capture_output=True, check=True).stdout
    for record in (b"named_attribute: envelope_id=env+1\n", b"named_attribute: ret_flags=2\n",
                   b"named_attribute: notify_flags=10\n",     # SUCCESS 2 | DELAY 8
                   b"named_attribute: dsn_orig_rcpt=rfc822;z@y.test\n"):
        assert record in envelope, envelope
    # The message_size record's last field: Postfix's SMTPUTF8 flags, 1 = requested
    size_record = re.search(rb"^message_size: (.*)$", envelope, re.M).group(1).split()
    assert int(size_record[-1]) & 1, size_record


@pytest.mark.parametrize("filter_type", ["pipe", "file", "smtp", "smtp, node without CHUNKING"])
@pytest.mark.e2e
@pytest.mark.slow
def test_every_filter_type_takes_a_bdat_message_utf8_and_all(proxy, server, postfix,
                                                             filter_type):
    """A BDAT message with a UTF-8 envelope and header through each filter
    type reaches Postfix byte-exact; a filter node gets it by BDAT when it
    offers CHUNKING, else by DATA dot-stuffed, and stores it byte-exact too."""
    message = "Subject: grüße\r\n\r\n".encode() + TRICKY.split(b"\r\n\r\n", 1)[1]
    settings = {"OutAddress": server.address, "FilterType": filter_type.split(",")[0]}
    node = None
    if filter_type == "pipe":
        settings["FilterCommand"] = "cat"
    elif filter_type == "file":
        settings["FilterCommand"] = "true"
    else:
        extra = {"smtpd_discard_ehlo_keywords": "chunking"} if "without" in filter_type else {}
        node = postfix(local_header_rewrite_clients="", **extra)
        settings.update(FilterCommand=node.address, FilterTLS="off")
    p = proxy(settings, debug=4)
    with p.connect() as client:
        reply = bdat_session(client, "jörg@bücher.test", "zoë@y.test", message, chunks=2,
                             mail_params=" SMTPUTF8")
        assert reply[-1].startswith("250 2.0.0 Ok: "), reply
    got = queued(server)[0]
    assert got["sender"] == "jörg@bücher.test" and got["recipients"] == ["zoë@y.test"]
    assert got["content"] == stored(message)
    if node is not None:
        at_node = queued(node)[0]
        assert at_node["sender"] == "jörg@bücher.test" and at_node["content"] == stored(message)
        by_data = "FILTER > DATA" in p.log()
        assert by_data == ("without" in filter_type)


@pytest.mark.unit
def test_requiretls_to_a_node_only_when_it_offers_it():
    """RFC 8689: REQUIRETLS goes to a filter node that offers it, and the
    other parameters with it, as the client wrote them."""
    from proxsmtp.filters.node import MAIL_PARAMS, node_params
    mail = b"MAIL FROM:<a@x> REQUIRETLS BODY=BINARYMIME SMTPUTF8 RET=FULL\r\n"
    offered = {"REQUIRETLS", "8BITMIME", "BINARYMIME", "SMTPUTF8", "DSN"}
    assert node_params(mail, MAIL_PARAMS, offered) == \
        " REQUIRETLS BODY=BINARYMIME SMTPUTF8 RET=FULL"
    assert node_params(mail, MAIL_PARAMS, offered - {"REQUIRETLS"}) == \
        " BODY=BINARYMIME SMTPUTF8 RET=FULL"


@pytest.mark.e2e
def test_extension_parameters_reach_the_server_untouched(proxy, make_upstream):
    """SMTPUTF8, DSN's, BODY and REQUIRETLS: MAIL and RCPT reach the server
    byte for byte (the server says what it takes, not the proxy)."""
    upstream = make_upstream(extensions=("PIPELINING", "8BITMIME", "SMTPUTF8", "DSN",
                                         "REQUIRETLS", "CHUNKING", "BINARYMIME"))
    mail = "MAIL FROM:<jörg@bücher.test> SMTPUTF8 BODY=8BITMIME REQUIRETLS RET=HDRS ENVID=a+2Bb"
    rcpt = "RCPT TO:<zoë@y.test> NOTIFY=SUCCESS,FAILURE ORCPT=utf-8;zo\\x{EB}@y.test"
    p = proxy({"OutAddress": upstream.address})
    with p.connect() as client:
        ehlo = client.cmd("EHLO client.example")
        assert {"250-SMTPUTF8", "250-DSN", "250-REQUIRETLS", "250-8BITMIME"} <= set(ehlo)
        assert client.cmd(mail.encode())[-1][:3] == "250"
        assert client.cmd(rcpt.encode())[-1][:3] == "250"
        assert client.cmd("RSET")[-1][:3] == "250"
        reply = send_mail(client, "a@x.test", ["b@y.test"], b"Subject: x\r\n\r\nx\r\n")
        assert reply[-1][:3] == "250"
    commands = upstream.commands()
    assert mail in commands and rcpt in commands
