"""The filter node pool's rules in this process (proxsmtp/filters/nodepool.py):
how many idle connections a worker keeps, on fakes of the node connections,
the pool's timers called by hand.  The whole path against real nodes is in
test_filter_pool.py."""

from __future__ import annotations

import asyncio

import pytest

from proxsmtp.filters import nodepool

pytestmark = pytest.mark.unit

KEY = ("127.0.0.1:10025", "off", None)


class FakeChannel:
    def __init__(self) -> None:
        self.closed = self.eof = False
        self.pending = 0
        self.on_ready = None
        self.tag = ""
        self.transport = None
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True


class FakeNode:
    """A connection on which the node accepted a message, every reply read."""

    reusable = True

    def __init__(self) -> None:
        self.channel = FakeChannel()
        self.key = KEY
        self.due = 0
        self.uses = 1
        self.idle_since = 0.0
        self.reused = self.committed = False
        self.last = b"250"


@pytest.fixture
def pool():
    loop = asyncio.new_event_loop()
    yield nodepool.NodePool(loop)
    loop.close()


def busy(pool, count: int) -> list[FakeNode]:
    """`count` connections in use at once: those idle taken, the rest new."""
    nodes = []
    for _ in range(count):
        nodes.append(pool.take(KEY, "tag") or FakeNode())
    return nodes


def closed(nodes) -> int:
    return sum(node.channel.closed for node in nodes)


def test_a_burst_keeps_its_connections_while_it_lasts(pool):
    """FilterConnections 2, four messages at once: the two connections opened
    beyond it are kept when given back, and the next burst takes all four
    again (no new connection); a window in which two were never needed
    closes those two (QUIT), oldest first."""
    first = busy(pool, 4)
    for node in first:
        pool.give_back(node, 2, 30.0)
    assert pool.count == 4 and closed(first) == 0 and pool._trim is not None
    second = busy(pool, 4)
    assert second == first              # the same four, oldest first
    for node in second:
        pool.give_back(node, 2, 30.0)
    pool._trim_surplus()                # all four were in use in this window
    assert pool.count == 4 and closed(first) == 0
    pool._trim_surplus()                # none was needed in this one
    assert pool.count == 2 and closed(first) == 2
    assert [node.channel.written for node in first if node.channel.closed] == [[b"QUIT\r\n"]] * 2
    assert pool._trim is None           # back to FilterConnections: no timer


def test_only_the_connections_idle_all_the_window_are_closed(pool):
    """FilterConnections 1: the window starts when a second connection is
    given back; those given back after it, or taken in it, stay."""
    nodes = busy(pool, 5)
    for node in nodes:
        pool.give_back(node, 1, 30.0)
    pool._trim_surplus()                # two were idle from the window's start
    assert pool.count == 3 and [node.channel.closed for node in nodes] == [True] * 2 + [False] * 3
    for node in busy(pool, 2):          # two of the three needed at once
        pool.give_back(node, 1, 30.0)
    pool._trim_surplus()
    assert pool.count == 2 and closed(nodes) == 3
    pool._trim_surplus()
    assert pool.count == 1 and closed(nodes) == 4 and pool._trim is None


def test_the_surplus_timer_is_cancelled_when_the_worker_stops(pool):
    for node in busy(pool, 3):
        pool.give_back(node, 1, 30.0)
    assert pool._trim is not None
    pool.loop.run_until_complete(pool.close_all())
    assert pool._trim is None and pool.count == 0


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return False


def test_the_node_ehlo_reply_said_again_is_taken_whole_and_a_new_one_read_anew():
    """NodePeer.ehlo: the node's EHLO reply, when it comes again byte for
    byte, is the reply read before (Reader.take_known), what follows it
    left for the next read; a reply that changed is read and its keywords
    taken again."""
    from proxsmtp.net.channel import Channel

    loop = asyncio.new_event_loop()
    channel = Channel("FILTER", trace=False, loop=loop)
    channel.transport = FakeTransport()
    node = nodepool.NodePeer(channel, 5.0, KEY, lambda exc: exc)
    node.due = 0
    first = b"250-node.test\r\n250-PIPELINING\r\n250-SMTPUTF8\r\n250 8BITMIME\r\n"

    def ehlo(said: bytes) -> list[bytes]:
        channel.data_received(said)
        return loop.run_until_complete(node.ehlo("client.example"))

    try:
        reply = ehlo(first)
        assert reply == first.splitlines(keepends=True)
        assert node.pipelining and node.offered == {"PIPELINING", "SMTPUTF8", "8BITMIME"}
        again = ehlo(first + b"250 2.1.0 Ok\r\n")
        assert again is reply and bytes(channel.buf) == b"250 2.1.0 Ok\r\n"
        node.send(b"MAIL FROM:<>\r\n")       # that reply's command
        assert loop.run_until_complete(node.read_reply()) == [b"250 2.1.0 Ok\r\n"]
        changed = ehlo(b"250-node.test\r\n250-CHUNKING\r\n250 8BITMIME\r\n")
        assert changed == [b"250-node.test\r\n", b"250-CHUNKING\r\n", b"250 8BITMIME\r\n"]
        assert not node.pipelining and node.offered == {"CHUNKING", "8BITMIME"}
        assert ehlo(b"250-node.test\r\n250-CHUNKING\r\n250 8BITMIME\r\n") is changed
        assert channel.transport.written == [b"EHLO client.example\r\n"] * 2 + [
            b"MAIL FROM:<>\r\n"] + [b"EHLO client.example\r\n"] * 2
        assert node.due == 0 and node.last == b"250"
    finally:
        loop.close()


class ChunkingNode:
    """A filter node on loopback that takes BDAT (RFC 3030) and XCLIENT, and
    records each message's bytes; a message with `die` in it gets no reply:
    the node closes the connection once it has read it."""

    EHLO = b"250-node.test\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 XCLIENT ADDR HELO\r\n"

    def __init__(self) -> None:
        self.connections = 0
        self.messages: list[bytes] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(b"220 node.test\r\n")
        while line := await reader.readline():
            verb = line.split(b" ", 1)[0].strip().upper()
            if verb == b"EHLO":
                writer.write(self.EHLO)
            elif verb == b"XCLIENT":
                writer.write(b"220 node.test\r\n")
            elif verb in (b"MAIL", b"RCPT"):
                writer.write(b"250 2.1.0 Ok\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                message = await reader.readuntil(b"\r\n.\r\n")
                if not self.took(message[:-3], writer):
                    break
            elif verb == b"BDAT":
                message = await reader.readexactly(int(line.split()[1]))
                if not self.took(message, writer):
                    break
            else:
                writer.write(b"221 bye\r\n")
                break
            await writer.drain()
        writer.close()

    def took(self, message: bytes, writer: asyncio.StreamWriter) -> bool:
        self.messages.append(message)
        if b"die" in message:
            return False
        writer.write(b"250 2.0.0 Ok: queued as N%d\r\n" % len(self.messages))
        return True


def test_a_message_by_bdat_is_on_its_way_as_one_after_354_is(tmp_path, monkeypatch):
    """By BDAT there is no 354 before the message leaves (RFC 3030): the
    connection is kept after the node's 2xx like any other, and a reply lost
    after the chunk is the message's FilterError (451), never Stale, which
    would offer the message a second time on a new connection."""
    from proxsmtp.filters import node as nodefilter
    from proxsmtp.filters.verdict import FilterError
    from proxsmtp.message import spool
    from proxsmtp.message.envelope import Envelope
    from proxsmtp.process import config

    node = ChunkingNode()
    sent = {}
    real_chunk = nodepool.NodePeer.sending_chunk

    def sending_chunk(self) -> None:
        sent["reused"] = self.reused
        real_chunk(self)
    monkeypatch.setattr(nodepool.NodePeer, "sending_chunk", sending_chunk)

    def message(body: bytes, chunked: bool) -> tuple[Envelope, spool.Spool]:
        envelope = Envelope("TAG", client_ip="127.0.0.1", helo="client.test", sender="a@x.test",
                            recipients=["b@y.test"], mail_line=b"MAIL FROM:<a@x.test>\r\n",
                            rcpt_lines=[b"RCPT TO:<b@y.test>\r\n"])
        envelope.chunked = chunked
        kept = spool.Spool(str(tmp_path), in_memory=True)
        kept.write(b"Subject: pooled\r\n\r\n" + body + b"\r\n")
        kept.finish()
        return envelope, kept

    async def offers() -> None:
        server = await asyncio.start_server(node.serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        conf = config.parse("OutAddress: 127.0.0.1:25\nFilterType: smtp\n"
                            "FilterCommand: 127.0.0.1:%d\nFilterConnections: 1\n"
                            "FilterTLS: off\nFilterTimeout: 3\n" % port)
        try:
            assert (await nodefilter.smtp_verdict(conf, *message(b"one", False))).accept
            with pytest.raises(FilterError) as failed:      # on the kept connection
                await nodefilter.smtp_verdict(conf, *message(b"die", True))
            assert not isinstance(failed.value, nodepool.Stale)
            assert sent["reused"], "the BDAT message went on the kept connection"
            for body in (b"two", b"three"):     # a new connection, kept after BDAT too
                assert (await nodefilter.smtp_verdict(conf, *message(body, True))).accept
        finally:
            await nodepool.close_idle()
            server.close()
            await server.wait_closed()

    asyncio.run(offers())
    assert [m.split(b"\r\n\r\n", 1)[1] for m in node.messages] == \
        [b"one\r\n", b"die\r\n", b"two\r\n", b"three\r\n"], "die offered once"
    assert node.connections == 2, "the second one kept after a message by BDAT"
