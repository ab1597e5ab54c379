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
