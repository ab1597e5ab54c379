"""BDAT taken from the client (RFC 3030): the count and the chunk reader on
their own (hypothesis), then a raw client through the proxy (swaks and
aiosmtpd have no BDAT) to a hand-made server that takes BDAT and DATA and
keeps every message byte for byte (this Postfix's smtp-sink does not offer
CHUNKING), and to a real Postfix.  The replies of RFC 3030 2 and Postfix's
smtpd, a chunk's bytes consumed whatever its answer (a dot or a command
line in a chunk is data), pipelining, RSET, the size limit, a filter, a
client that lies about a chunk's size, and a 50 MB message's memory."""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import time

import pytest
from harness import Proxy, RawServer, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_session_freed import Sink, freed_after, logged, reply

from proxsmtp.net.channel import Channel
from proxsmtp.smtp.syntax import bdat_args

BODY = b"Subject: chunked\r\n\r\nhello\r\n"


# --- the count ------------------------------------------------------------------------------

@pytest.mark.parametrize("line, args", [
    (b"BDAT 10 LAST\r\n", (10, True)),
    (b"bdat 0 last\r\n", (0, True)),
    (b"BDAT 0\r\n", (0, False)),
    (b"BDAT  7\t LAST \r\n", (7, True)),
    (b"BDAT 99999999999999999999\r\n", (99999999999999999999, False)),
    (b"BDAT\r\n", None),
    (b"BDAT x\r\n", None),
    (b"BDAT -1\r\n", None),
    (b"BDAT +1\r\n", None),
    (b"BDAT 1 LASTING\r\n", None),
    (b"BDAT 1 LAST x\r\n", None),
    (b"BDAT 100000000000000000000\r\n", None),        # 21 digits: refused unparsed
    (b"BDAT \xd9\xa1\r\n", None),                     # a digit, but not an ASCII one
])
@pytest.mark.unit
def test_bdat_args(line, args):
    assert bdat_args(line) == args


@given(st.integers(0, 10**20 - 1), st.sampled_from(["", " LAST", " last", " LaSt"]))
@pytest.mark.unit
def test_bdat_args_reads_every_count(count, last):
    assert bdat_args(b"BDAT %d%s\r\n" % (count, last.encode())) == (count, bool(last))


@given(st.binary(max_size=40))
@pytest.mark.unit
def test_bdat_args_takes_any_line(junk):
    args = bdat_args(b"BDAT " + junk + b"\r\n")
    assert args is None or (args[0] >= 0 and isinstance(args[1], bool))


# --- the chunk reader -----------------------------------------------------------------------

CHUNK_BYTES = st.lists(st.sampled_from([b"a", b"\r\n", b"\n", b".", b"\r\n.\r\n", b"..",
                                        b"MAIL FROM:<x@y>\r\n", b"\x00\xff", b"\r"]),
                       max_size=40).map(b"".join)


@given(CHUNK_BYTES, st.lists(st.integers(1, 30), max_size=12))
@pytest.mark.unit
def test_take_count_reads_exactly_the_chunk_however_it_arrives(chunk, cuts):
    """The chunk comes in pieces, with the next command behind it: the
    reader hands out the chunk's bytes and no more, and the command stays
    a command (no dot line or command line in a chunk is either)."""
    channel = Channel("CLIENT", trace=False)
    stream = chunk + b"NOOP\r\n"
    taken, at = b"", 0
    for cut in cuts + [len(stream)]:
        piece, at = stream[at:at + cut], at + cut
        if piece:
            channel.data_received(piece)
        taken += channel.take_count(len(chunk) - len(taken))
    assert taken == chunk
    assert channel.take_line() == (b"NOOP\r\n", False)
    assert channel.line_started is None


# --- a server that takes BDAT ---------------------------------------------------------------

class BdatServer(RawServer):
    """Offers CHUNKING and PIPELINING; takes BDAT and DATA; keeps each
    message's bytes as they came (DATA's dot-unstuffed) and every command."""

    def __init__(self, extensions: tuple[bytes, ...] = (b"PIPELINING", b"CHUNKING",
                                                        b"8BITMIME")) -> None:
        self.extensions = extensions
        self.lines: list[bytes] = []
        self.messages: list[tuple[str, bytes]] = []     # (how it came, its bytes)
        self.digests: list[tuple[int, str]] = []        # (size, sha256) of every message
        self.keep = True
        self.final_delay = 0.0          # seconds before the first message's verdict
        self.cond = threading.Condition()
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        conn.sendall(b"220 bdat.test ESMTP\r\n")
        chunks: list[bytes] = []
        while line := reader.readline():
            with self.cond:
                self.lines.append(line)
            verb = line.split(None, 1)[0].upper() if line.split() else b""
            if verb == b"EHLO":
                conn.sendall(b"250-bdat.test\r\n" + b"".join(
                    b"250%s%s\r\n" % (b" " if at == len(self.extensions) - 1 else b"-", ext)
                    for at, ext in enumerate(self.extensions)))
            elif verb == b"BDAT":
                match = re.fullmatch(rb"BDAT (\d+)( LAST)?\r\n", line)
                data = reader.read(int(match.group(1)))
                chunks.append(data)
                if match.group(2):
                    if self.final_delay and not self.digests:
                        time.sleep(self.final_delay)
                    self.record("BDAT", b"".join(chunks))
                    chunks = []
                    conn.sendall(b"250 2.0.0 Ok: queued as B%d\r\n" % len(self.digests))
                else:
                    conn.sendall(b"250 2.0.0 %d octets\r\n" % len(data))
            elif verb == b"DATA":
                conn.sendall(b"354 go ahead\r\n")
                raw = b""
                while (part := reader.readline()) != b".\r\n":
                    raw += part[1:] if part.startswith(b".") else part
                self.record("DATA", raw)
                conn.sendall(b"250 2.0.0 Ok: queued as D%d\r\n" % len(self.digests))
            elif verb == b"RSET":
                chunks = []
                conn.sendall(b"250 2.0.0 Ok\r\n")
            elif verb == b"QUIT":
                conn.sendall(b"221 2.0.0 Bye\r\n")
                return
            elif verb in (b"MAIL", b"RCPT", b"NOOP"):
                conn.sendall(b"250 2.1.0 Ok\r\n")
            elif verb == b"AUTH":
                conn.sendall(b"235 2.7.0 Authentication successful\r\n")
            else:
                conn.sendall(b"502 5.5.2 Error: command not recognized\r\n")

    def record(self, how: str, data: bytes) -> None:
        with self.cond:
            self.digests.append((len(data), hashlib.sha256(data).hexdigest()))
            if self.keep:
                self.messages.append((how, data))
            self.cond.notify_all()

    def verbs(self) -> list[bytes]:
        with self.cond:
            return [line.split(None, 1)[0].upper() for line in self.lines if line.split()]


class Raw:
    """A client over a plain socket that can send anything in one write."""

    def __init__(self, address: tuple[str, int], timeout: float = 20.0) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.reader = self.sock.makefile("rb")
        assert self.replies(1)[0].startswith(b"220")

    def replies(self, count: int) -> list[bytes]:
        """The last lines of the next `count` replies, without CRLF."""
        found = []
        while len(found) < count:
            line = self.reader.readline()
            assert line, "connection closed after %r" % found
            if line[3:4] != b"-":
                found.append(line.rstrip(b"\r\n"))
        return found

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def hello(self) -> list[bytes]:
        self.send(b"EHLO client.test\r\n")
        lines = []
        while (line := self.reader.readline())[3:4] == b"-":
            lines.append(line)
        return lines + [line]

    def transaction(self) -> None:
        self.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n")
        assert [r[:3] for r in self.replies(2)] == [b"250", b"250"]

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def bdat(data: bytes, last: bool = False) -> bytes:
    return b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"") + data


@pytest.fixture
def server():
    made = BdatServer()
    yield made
    made.stop()


@pytest.fixture
def client(proxy, server):
    """A raw client through a proxy to the BDAT server, past EHLO."""
    clients = []

    def make(**settings) -> tuple[Raw, Proxy]:
        p = proxy({"OutAddress": server.address, **settings})
        raw = Raw(p.address)
        clients.append(raw)
        assert b"250-CHUNKING\r\n" in raw.hello()
        return raw, p
    yield make
    for raw in clients:
        raw.close()


# --- replies and errors ---------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.slow
def test_chunks_answered_by_the_proxy_and_the_last_by_the_server(client, server):
    raw, p = client()
    raw.transaction()
    raw.send(bdat(b"Subject: x\r\n\r\n"))
    assert raw.replies(1) == [b"250 2.0.0 14 octets received"]
    assert server.verbs() == [b"EHLO", b"MAIL", b"RCPT"]     # nothing of it yet
    raw.send(bdat(b".\r\nQUIT\r\n", last=True))
    assert raw.replies(1) == [b"250 2.0.0 Ok: queued as B1"]
    assert server.messages == [("BDAT", b"Subject: x\r\n\r\n.\r\nQUIT\r\n")]
    p.wait_log(r"size=23, .*reply=\"250 2\.0\.0 Ok: queued as B1\", status=FILTERED")


@pytest.mark.e2e
@pytest.mark.slow
def test_refused_chunks_are_consumed_never_read_as_commands(client, server):
    """503 before MAIL and before RCPT, the chunk's bytes dropped: its
    command lines never reach the server; 501 for a count that is none."""
    raw, _ = client()
    smuggled = b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\n"
    raw.send(bdat(smuggled, last=True) + b"NOOP\r\n")
    assert raw.replies(2) == [b"503 5.5.1 Error: need MAIL command", b"250 2.1.0 Ok"]
    raw.send(b"MAIL FROM:<a@x.test>\r\n" + bdat(smuggled) + b"NOOP\r\n")
    assert raw.replies(3) == [b"250 2.1.0 Ok", b"503 5.5.1 Error: need RCPT command",
                              b"250 2.1.0 Ok"]
    for line in (b"BDAT\r\n", b"BDAT ten\r\n", b"BDAT 1 LAST now\r\n"):
        raw.send(line)
        assert raw.replies(1) == [b"501 5.5.4 Syntax: BDAT count [LAST]"]
    assert server.verbs() == [b"EHLO", b"NOOP", b"MAIL", b"NOOP"]
    assert server.messages == []


@pytest.mark.e2e
@pytest.mark.slow
def test_data_mail_and_rcpt_after_bdat_refused_and_bdat_0_last_ends(client, server):
    raw, _ = client()
    raw.transaction()
    raw.send(bdat(b"Subject: x\r\n\r\nbody\r\n") + b"DATA\r\nMAIL FROM:<c@x.test>\r\n"
             b"RCPT TO:<d@y.test>\r\n" + bdat(b"", last=True))
    assert raw.replies(5) == [b"250 2.0.0 20 octets received",
                              b"503 5.5.1 Error: DATA after BDAT",
                              b"503 5.5.1 Error: MAIL after BDAT",
                              b"503 5.5.1 Error: RCPT after BDAT",
                              b"250 2.0.0 Ok: queued as B1"]
    assert server.messages == [("BDAT", b"Subject: x\r\n\r\nbody\r\n")]
    assert server.verbs().count(b"MAIL") == 1 and b"DATA" not in server.verbs()
    # the transaction is over: a chunk now finds none, and DATA works again
    raw.send(bdat(b"x") + b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
    assert [r[:3] for r in raw.replies(4)] == [b"503", b"250", b"250", b"354"]
    raw.send(b"..dot\r\n.\r\n")
    assert raw.replies(1) == [b"250 2.0.0 Ok: queued as D2"]
    assert server.messages[1] == ("DATA", b".dot\r\n")


# --- pipelining, RSET, commands after LAST --------------------------------------------------

@pytest.mark.e2e
@pytest.mark.slow
def test_a_whole_transaction_and_the_next_commands_in_one_write(client, server):
    raw, _ = client()
    raw.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n" + bdat(b"Subject: p\r\n")
             + bdat(b"\r\n.\r\n", last=True) + b"NOOP\r\nMAIL FROM:<a@x.test>\r\n"
             b"RCPT TO:<b@y.test>\r\n" + bdat(b"second", last=True) + b"QUIT\r\n")
    assert raw.replies(9) == [
        b"250 2.1.0 Ok", b"250 2.1.0 Ok", b"250 2.0.0 12 octets received",
        b"250 2.0.0 Ok: queued as B1", b"250 2.1.0 Ok", b"250 2.1.0 Ok", b"250 2.1.0 Ok",
        b"250 2.0.0 Ok: queued as B2", b"221 2.0.0 Bye"]
    assert server.messages == [("BDAT", b"Subject: p\r\n\r\n.\r\n"), ("BDAT", b"second")]


@pytest.mark.e2e
@pytest.mark.slow
def test_rset_mid_chunks_drops_the_spool(client, server):
    """With a pipe filter the spool is a temp file: RSET removes it at once."""
    raw, p = client(FilterCommand="cat")
    raw.transaction()
    raw.send(bdat(b"Subject: forgotten\r\n\r\n"))
    assert raw.replies(1)[0].startswith(b"250 2.0.0")
    assert len(p.spool_files()) == 1
    raw.send(b"RSET\r\n")
    assert raw.replies(1) == [b"250 2.0.0 Ok"]
    assert p.spool_files() == []
    raw.transaction()
    raw.send(bdat(BODY, last=True))
    assert raw.replies(1)[0].startswith(b"250 2.0.0 Ok: queued")
    assert server.messages == [("BDAT", BODY)]


@pytest.mark.e2e
@pytest.mark.slow
def test_ehlo_mid_chunks_drops_the_transaction(client, server):
    raw, _ = client()
    raw.transaction()
    raw.send(bdat(b"Subject: forgotten\r\n\r\n"))
    raw.replies(1)
    assert b"250-CHUNKING\r\n" in raw.hello()
    raw.send(bdat(b"x", last=True))
    assert raw.replies(1) == [b"503 5.5.1 Error: need MAIL command"]
    assert server.messages == []


# --- limits, filters, a lying client --------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.slow
def test_the_chunk_past_the_size_limit_is_refused_and_the_rest_dropped(client, server):
    raw, p = client(MaxMessageSize=1000)
    raw.transaction()
    raw.send(bdat(b"a" * 600) + bdat(b"b" * 600) + bdat(b"c" * 600, last=True)
             + b"NOOP\r\n")
    assert raw.replies(4) == [b"250 2.0.0 600 octets received",
                              b"552 5.3.4 Message size exceeds fixed limit",
                              b"503 5.5.1 Error: need MAIL command", b"250 2.1.0 Ok"]
    assert server.messages == [] and b"RSET" in server.verbs()
    p.wait_log(r"size=1200, .*status=REJECTED")


@pytest.mark.e2e
@pytest.mark.slow
def test_a_size_over_the_limit_said_in_one_count_is_refused(client, server):
    raw, _ = client(MaxMessageSize=1000)
    raw.transaction()
    raw.send(bdat(b"x" * 5000, last=True) + b"NOOP\r\n")
    assert raw.replies(2) == [b"552 5.3.4 Message size exceeds fixed limit", b"250 2.1.0 Ok"]


@pytest.mark.parametrize("settings", [{"FilterCommand": "cat"},
                                      {"FilterType": "file", "FilterCommand": "true"}])
@pytest.mark.e2e
@pytest.mark.slow
def test_a_filter_sees_a_chunked_message_and_passes_it(client, server, settings):
    raw, p = client(**settings)
    raw.transaction()
    message = b"Subject: filtered\r\n\r\n.\r\n..two\r\nbare\nend"
    raw.send(bdat(message[:20]) + bdat(message[20:], last=True))
    assert raw.replies(2)[1].startswith(b"250 2.0.0 Ok: queued")
    # as the server would store the filter's output sent by DATA: ended by CRLF
    assert server.messages == [("BDAT", message + b"\r\n")]
    p.wait_log(r"filter=.*status=FILTERED")


REWRITE = "sed -e 's/^\\.\\./&S/'%s\nprintf '.\\r\\n..z\\r\\n.w\\n'%s\n"


@pytest.mark.parametrize("filter_type, script", [
    ("pipe", "cat"), ("pipe", REWRITE % ("", "")), ("file", "true"),
    ("file", REWRITE % (' -i "$EMAIL"', ' >>"$EMAIL"'))])
@pytest.mark.e2e
@pytest.mark.slow
def test_a_pipe_or_file_filter_makes_of_a_bdat_message_what_it_makes_by_data(
        client, server, tmp_path, filter_type, script):
    """The filter gets a BDAT message dot-stuffed as by DATA (sed sees `..`
    where a DATA client sent it), and its output reaches the server by BDAT
    byte-equal to what the same message by DATA reaches it with."""
    path = tmp_path / "filter.sh"
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)
    raw, p = client(FilterType=filter_type, FilterCommand=str(path))
    message = b"Subject: dots\r\n\r\n.x\r\n..y\r\n.\r\nbare\n.after\r\n.\nend\r\n"
    raw.transaction()
    raw.send(bdat(message[:23]) + bdat(message[23:], last=True))
    assert raw.replies(2)[1].startswith(b"250 2.0.0 Ok: queued as B1")
    raw.transaction()
    raw.send(b"DATA\r\n")
    assert raw.replies(1)[0].startswith(b"354")
    raw.send(re.sub(rb"(^|\n)\.", rb"\1..", message) + b".\r\n")
    assert raw.replies(1)[0].startswith(b"250 2.0.0 Ok: queued as D2")
    (how_b, by_bdat), (how_d, by_data) = server.messages
    assert (how_b, how_d) == ("BDAT", "DATA") and by_bdat == by_data
    if script == "cat" or script == "true":
        assert by_bdat == message
    else:
        assert by_bdat.startswith(b"Subject: dots\r\n\r\n.Sx\r\n.S.y\r\n.S\r\n")
        assert by_bdat.endswith(b"end\r\n.\r\n.z\r\nw\n\r\n")


@pytest.mark.e2e
@pytest.mark.slow
def test_a_refusing_filter_is_the_last_chunks_answer(client, server, tmp_path):
    script = tmp_path / "refuse.sh"
    script.write_text("#!/bin/sh\ncat >/dev/null\necho 'Go away' >&2\nexit 1\n")
    script.chmod(0o755)
    raw, _ = client(FilterCommand=str(script))
    raw.transaction()
    raw.send(bdat(b"spam\r\n") + bdat(b"more\r\n", last=True))
    got = raw.replies(2)
    assert got[0] == b"250 2.0.0 6 octets received" and got[1].startswith(b"550")
    assert server.messages == []


@pytest.mark.e2e
@pytest.mark.slow
def test_a_client_that_sends_less_than_it_said(client, server):
    """Its commands after the short chunk are message bytes, as the count
    says: nothing is run, nothing delivered; the session ends at its close."""
    raw, p = client(TimeOut=5, FilterCommand="cat")       # its spool a temp file
    raw.transaction()
    raw.send(bdat(b"first chunk\r\n") + b"BDAT 100 LAST\r\nshort\r\nQUIT\r\n")
    assert raw.replies(1) == [b"250 2.0.0 13 octets received"]
    raw.sock.shutdown(socket.SHUT_WR)
    assert raw.reader.readline() == b""
    p.wait_log(r"unexpected end of data from client")
    assert server.messages == [] and b"QUIT" not in server.verbs()
    wait_until(lambda: not p.spool_files(), 10, what="the temp file removed")


class ChunkingSink(Sink):
    """test_session_freed's Sink, offering CHUNKING."""

    async def serve(self, reader, writer) -> None:
        real = writer.write

        def write(data: bytes) -> None:
            real(data.replace(b"250 PIPELINING", b"250-PIPELINING\r\n250 CHUNKING"))
        writer.write = write
        await super().serve(reader, writer)


@pytest.mark.session
def test_a_session_ended_mid_chunks_is_freed_with_its_spool(tmp_path):
    """The client leaves in the middle of its second chunk: the session,
    its Chunks and Transfer are freed by reference counting, the temp file
    removed (freed_after checks both)."""
    async def script(reader, writer, task, sink):
        assert await reply(reader) == b"220"
        for command in (b"EHLO me\r\n", b"MAIL FROM:<a@x.test>\r\n", b"RCPT TO:<b@y.test>\r\n",
                        bdat(b"Subject: t\r\n\r\n")):
            writer.write(command)
            assert await reply(reader) == b"250"
        writer.write(b"BDAT 100 LAST\r\nhalf")
        await writer.drain()
        writer.close()
        await writer.wait_closed()
    lines = freed_after(script, tmp_path, ChunkingSink(), settings="FilterCommand: cat\n")
    assert logged(lines, "unexpected end of data from client")


@pytest.mark.e2e
@pytest.mark.slow
def test_a_client_that_sends_more_than_it_said(client, server):
    """The count rules: the bytes past it are commands (the server's 502)."""
    raw, _ = client()
    raw.transaction()
    raw.send(b"BDAT 5 LAST\r\nhello world\r\n")
    assert raw.replies(2) == [b"250 2.0.0 Ok: queued as B1",
                              b"502 5.5.2 Error: command not recognized"]
    assert server.messages == [("BDAT", b"hello")]


@pytest.mark.e2e
@pytest.mark.slow
def test_a_huge_count_is_read_and_dropped_without_memory(client, server):
    raw, _ = client(MaxMessageSize=1000)
    raw.transaction()
    raw.send(b"BDAT 99999999999999999999 LAST\r\n" + b"x" * 300000)
    raw.sock.shutdown(socket.SHUT_WR)
    assert raw.reader.readline() == b""
    assert server.messages == []


@pytest.mark.e2e
@pytest.mark.slow
def test_skip_relays_a_chunked_message_unfiltered(client, server):
    raw, p = client(Skip="authenticated", FilterCommand="false")
    raw.send(b"AUTH PLAIN AGFAAGI=\r\n")
    assert raw.replies(1)[0].startswith(b"235")
    raw.transaction()
    raw.send(bdat(b"Subject: s\r\n") + bdat(b"\r\nskipped\r\n", last=True))
    assert raw.replies(2)[1].startswith(b"250 2.0.0 Ok: queued")
    assert server.messages == [("BDAT", b"Subject: s\r\n\r\nskipped\r\n")]
    p.wait_log(r"status=SKIPPED")


@pytest.mark.e2e
@pytest.mark.slow
def test_chunks_behind_a_message_awaiting_its_verdict_are_held_back(proxy, server):
    """The server takes 4 s over its verdict; the client goes on with the
    next transaction and an 8 MB chunk meanwhile: the proxy stops reading it
    (its buffer's high-water mark) instead of holding it all, and then takes
    it in turn."""
    server.final_delay = 4.0
    p = proxy({"OutAddress": server.address, "Workers": 1, "TimeOut": 30})
    [worker] = [pid for pid, title in p.children().items() if "worker" in title]
    raw = Raw(p.address, timeout=60)
    try:
        raw.hello()
        raw.transaction()
        raw.send(bdat(b"first", last=True))
        time.sleep(0.5)
        before = rss_kib(worker)
        big = b"y" * (8 * 1024 * 1024)
        sender = threading.Thread(target=raw.send, args=(
            b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n" + bdat(big, last=True),))
        sender.start()
        time.sleep(2.5)
        assert server.digests == []             # the first verdict is still due
        grown = rss_kib(worker) - before
        assert grown < 4 * 1024, "worker grew %d KiB while holding back" % grown
        assert raw.replies(4) == [b"250 2.0.0 Ok: queued as B1", b"250 2.1.0 Ok",
                                  b"250 2.1.0 Ok", b"250 2.0.0 Ok: queued as B2"]
        sender.join(10)
    finally:
        raw.close()
    assert server.messages[0] == ("BDAT", b"first") and server.messages[1] == ("BDAT", big)


# --- milters ------------------------------------------------------------------------------

MILTER_BODY = b"X-Test-Milter: %s\r\nSubject: m\r\n\r\n.\r\n..two\r\nbare\nend\r\n"


@pytest.mark.e2e
@pytest.mark.slow
def test_a_chunked_message_goes_through_the_milters_as_it_came(client, server, test_milter):
    """The milter gets the body as sent (BDAT has no dot-stuffing to take
    off) and adds its header: the server gets the message with it, every
    other byte as the client sent it, by BDAT."""
    milter = test_milter()
    raw, p = client(Milters=milter.spec)
    raw.transaction()
    message = MILTER_BODY % b"addheader X-Added yes"
    raw.send(bdat(message[:30]) + bdat(message[30:], last=True))
    assert raw.replies(2) == [b"250 2.0.0 30 octets received", b"250 2.0.0 Ok: queued as B1"]
    [(how, data)] = server.messages
    assert how == "BDAT"
    head, body = data.split(b"\r\n\r\n", 1)
    assert body == b".\r\n..two\r\nbare\nend\r\n"
    assert b"X-Test-Milter-Seen: test" in head and b"X-Added: yes" in head
    seen = b"".join(event["data"].encode() for event in milter.events()
                    if event["event"] == "body")
    assert seen == b".\r\n..two\r\nbare\nend\r\n"
    p.wait_log(r"status=FILTERED")


@pytest.mark.e2e
@pytest.mark.slow
def test_a_milters_verdict_is_the_last_chunks_answer(client, server, test_milter):
    milter = test_milter()
    raw, p = client(Milters=milter.spec)
    raw.transaction()
    message = MILTER_BODY % b"reject"
    raw.send(bdat(message[:10]) + bdat(message[10:], last=True) + b"NOOP\r\n")
    assert raw.replies(3) == [b"250 2.0.0 10 octets received",
                              b"550 5.7.1 Command rejected", b"250 2.1.0 Ok"]
    assert server.messages == [] and b"RSET" in server.verbs()
    p.wait_log(r"milter=%s, status=REJECTED" % re.escape(milter.spec))


@pytest.mark.e2e
@pytest.mark.slow
def test_a_discard_before_the_chunks_discards_the_chunked_message(client, server, test_milter):
    """A milter's discard at RCPT (proxsmtpd(8) MILTERS, Verdicts): each
    chunk is taken, the LAST is answered 250, the server gets RSET and no
    BDAT, and the milter hears nothing of the message."""
    milter = test_milter()
    raw, p = client(Milters=milter.spec)
    raw.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<discard@y.test>\r\n")
    assert [r[:3] for r in raw.replies(2)] == [b"250", b"250"]
    message = MILTER_BODY % b"addheader X-Never no"
    raw.send(bdat(message[:10]) + bdat(message[10:], last=True) + b"NOOP\r\n")
    assert raw.replies(3) == [b"250 2.0.0 10 octets received", b"250 2.0.0 Ok",
                              b"250 2.1.0 Ok"]
    assert server.messages == [] and b"RSET" in server.verbs() and b"BDAT" not in server.verbs()
    p.wait_log(r"milter=%s, status=DISCARDED" % re.escape(milter.spec))
    assert [e["event"] for e in milter.events() if e["event"] in ("data", "header", "eom")] == []


@pytest.mark.e2e
@pytest.mark.slow
def test_a_refusal_at_the_milters_data_stage_answers_the_first_chunk(client, server,
                                                                      bad_milter):
    milter = bad_milter("close", stage="data")
    raw, _ = client(Milters=milter.spec, MilterDefaultAction="reject")
    raw.transaction()
    raw.send(bdat(b"NOOP\r\n" * 3) + bdat(b"more", last=True) + b"NOOP\r\n")
    assert raw.replies(3) == [b"550 5.5.0 Service unavailable",
                              b"503 5.5.1 Error: need MAIL command", b"250 2.1.0 Ok"]
    assert server.messages == [] and server.verbs().count(b"NOOP") == 1


# --- random messages in random chunks (hypothesis) ------------------------------------------

MESSAGE_BITS = st.sampled_from([b"Subject: r\r\n", b"\r\n", b".\r\n", b"..\r\n", b"\n", b".",
                                b"\r\n.\r\n", b"\r\n.\r\nMAIL FROM:<evil@x>\r\n", b"\r",
                                b"BDAT 5 LAST\r\n", b"\x00\xff\x80", b"x" * 700, b"line\r\n"])


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    bdat_server = BdatServer()
    px = Proxy(tmp_path_factory.mktemp("bdat"), {"OutAddress": bdat_server.address,
                                                  "TimeOut": 10, "Workers": 1}).start()
    yield px, bdat_server
    px.stop()
    bdat_server.stop()
    assert px.spool_files() == []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(MESSAGE_BITS, max_size=40).map(b"".join), st.data(), st.booleans())
@pytest.mark.e2e
@pytest.mark.slow
def test_random_chunks_arrive_byte_equal(relay, message, data, pipelined):
    px, bdat_server = relay
    cuts = sorted(data.draw(st.lists(st.integers(0, len(message)), max_size=6)))
    pieces = [message[a:b] for a, b in zip([0] + cuts, cuts + [len(message)])]
    commands = [bdat(piece, last=at == len(pieces) - 1) for at, piece in enumerate(pieces)]
    before = len(bdat_server.messages)
    raw = Raw(px.address)
    try:
        raw.hello()
        raw.transaction()
        if pipelined:
            raw.send(b"".join(commands))
            got = raw.replies(len(commands))
        else:
            got = []
            for command in commands:
                raw.send(command)
                got += raw.replies(1)
        assert got[:-1] == [b"250 2.0.0 %d octets received" % len(piece)
                            for piece in pieces[:-1]]
        assert got[-1].startswith(b"250 2.0.0 Ok: queued as B")
    finally:
        raw.close()
    assert bdat_server.messages[before:] == [("BDAT", message)]


# --- memory ------------------------------------------------------------------------------

def rss_kib(pid: int) -> int:
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for %d" % pid)


@pytest.mark.e2e
@pytest.mark.slow
def test_a_50_mb_message_by_bdat_within_the_memory_target(proxy, server):
    """In 1 MB chunks, pipelined as fast as the proxy takes them: the spool
    goes to a file, the client's buffer is bounded by its high-water mark,
    and the worker's RSS grows by less than 20 MB (as for DATA)."""
    server.keep = False
    p = proxy({"OutAddress": server.address, "Workers": 1, "TimeOut": 30})
    [worker] = [pid for pid, title in p.children().items() if "worker" in title]
    before = rss_kib(worker)
    raw = Raw(p.address, timeout=60)
    try:
        raw.hello()
        raw.transaction()
        piece = (b"x" * 998 + b"\r\n") * 1000
        digest = hashlib.sha256()
        peak = 0
        for at in range(50):
            last = at == 49
            raw.send(bdat(piece, last))
            digest.update(piece)
            peak = max(peak, rss_kib(worker))
        assert raw.replies(50)[-1].startswith(b"250 2.0.0 Ok: queued as B")
        peak = max(peak, rss_kib(worker))
    finally:
        raw.close()
    wait_until(lambda: server.digests, 10, what="the message at the server")
    assert server.digests == [(50 * len(piece), digest.hexdigest())]
    assert peak - before < 20 * 1024, "worker grew %d KiB" % (peak - before)


# --- a real Postfix -----------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.root
def test_chunks_through_the_proxy_to_postfix(proxy, postfix):
    """Postfix 3.7 takes BDAT by default: the chunks' message arrives in its
    queue as the client sent it (postcat gives LF line ends)."""
    server = postfix()
    p = proxy({"OutAddress": server.address})
    raw = Raw(p.address)
    try:
        assert b"CHUNKING" in [line[4:].strip() for line in raw.hello()]
        raw.send(b"MAIL FROM:<a@example.org>\r\n")
        assert raw.replies(1)[0].startswith(b"250")
        raw.send(b"RCPT TO:<b@example.org>\r\n")
        assert raw.replies(1)[0].startswith(b"250")
        message = b"Subject: to postfix\r\n\r\n.\r\n..two\r\nlast line\r\n"
        raw.send(bdat(message[:9]) + bdat(message[9:30]) + bdat(message[30:], last=True))
        got = raw.replies(3)
        assert got[:2] == [b"250 2.0.0 9 octets received", b"250 2.0.0 21 octets received"]
        assert re.fullmatch(rb"250 2\.0\.0 Ok: 44 bytes queued as \w+", got[2])
    finally:
        raw.close()
    [queued] = server.messages(1)
    assert queued["recipients"] == ["b@example.org"]
    content = queued["content"]
    assert b"\nSubject: to postfix\n" in content and content.endswith(b"\n\n.\n..two\nlast line\n")
