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

import pytest
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
    spooled(transfer, b"a\r\n.\r\n")
    transfer.offer()
    assert made.server.transport.written == b"DATA\r\n"
    server_says(made, b"354 go\r\n")
    assert made.server.transport.written == b"DATA\r\na\r\n..\r\n.\r\n"


@pytest.mark.session
def test_a_message_on_disk_goes_in_chunks_under_flow_control(session, monkeypatch):
    """Streamed by the task, in BDAT_CHUNK chunks to a pipelining server;
    a refused chunk is the client's reason when the LAST is refused too."""
    monkeypatch.setattr(spool, "BDAT_CHUNK", 10)
    made, transfer = session(in_memory=False, Header="X-P: 1")
    spooled(transfer, MESSAGE)
    transfer.offer()
    assert transfer.streaming and made.server.transport.written == b""
    asyncio.run(transfer.stream())
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
    asyncio.run(transfer.stream())
    assert made.server.transport.written == b"BDAT %d LAST\r\n" % len(MESSAGE) + MESSAGE
    assert server_says(made, b"250 ok\r\n") == b"250 ok\r\n"
