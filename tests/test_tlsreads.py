"""net/tls.py's RecordReads: the TLS reads of the loop's protocol allocate a
record's worth, not the 256 KiB it asks for (each such allocation was an
mmap, a page fault and a munmap in a worker).  In this process, over memory
BIOs."""

from __future__ import annotations

import ssl
import tracemalloc

import pytest
import trustme

from proxsmtp.net import tls

pytestmark = pytest.mark.unit

ASKED = 256 * 1024      # uvloop's and asyncio's SSL_READ_MAX_SIZE


def pump(source: ssl.MemoryBIO, sink: ssl.MemoryBIO) -> None:
    data = source.read()
    if data:
        sink.write(data)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """An established client (connecting context) and server (listening
    context) over memory BIOs: (client, server, client_in, client_out,
    server_in, server_out)."""
    directory = tmp_path_factory.mktemp("pki")
    cert = trustme.CA().issue_cert("127.0.0.1")
    chain, key = directory / "server.pem", directory / "server.key"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key))
    bios = [ssl.MemoryBIO() for _ in range(4)]
    client_in, client_out, server_in, server_out = bios
    client = tls.connecting_context("may", None).wrap_bio(client_in, client_out)
    server = tls.listening_context(str(chain), str(key)).wrap_bio(server_in, server_out,
                                                                   server_side=True)
    for _ in range(10):
        for end in (client, server):
            try:
                end.do_handshake()
            except ssl.SSLWantReadError:
                pass
        pump(client_out, server_in)
        pump(server_out, client_in)
    assert client.version() and server.version()
    return client, server, client_in, client_out, server_in, server_out


def test_both_contexts_make_record_reads():
    assert tls.connecting_context("may", None).sslobject_class is tls.RecordReads
    assert tls.connecting_context("verify", None).sslobject_class is tls.RecordReads


@pytest.mark.parametrize("direction", ["to the client", "to the server"])
def test_a_read_allocates_a_record_not_what_was_asked(pair, direction):
    client, server, client_in, client_out, server_in, server_out = pair
    writer, reader, out, into = ((server, client, server_out, client_in)
                                 if direction == "to the client"
                                 else (client, server, client_out, server_in))
    payload = bytes(range(256)) * 400       # 100 KiB: seven records
    writer.write(payload)
    pump(out, into)
    got = []
    tracemalloc.start()
    try:
        while True:
            try:
                chunk = reader.read(ASKED)
            except ssl.SSLWantReadError:
                break
            got.append(len(chunk))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sum(got) == len(payload) and max(got) <= tls.RECORD_MAX
    assert peak < 4 * tls.RECORD_MAX, peak
