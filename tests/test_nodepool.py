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


XCLIENT = b"XCLIENT ADDR=127.0.0.9 HELO=client.example\r\n"
EHLO = b"EHLO client.example\r\n"
NODE_EHLO = b"250-node.test\r\n250 PIPELINING\r\n"


@pytest.mark.parametrize("said, ehlo_sent, first", [
    ([b"220 node.test ESMTP\r\n"], True, [b"220 node.test ESMTP\r\n"]),
    # EHLO only once the line is whole
    ([b"22", b"0 node.test", b" ESMTP\r\n"], True, [b"220 node.test ESMTP\r\n"]),
    # refused: the task's to read
    ([b"550 5.7.0 not you\r\n"], False, [b"550 5.7.0 not you\r\n"]),
    # more than one line: the task's
    ([b"220-node.test\r\n220 ESMTP\r\n"], False, [b"220-node.test\r\n", b"220 ESMTP\r\n"]),
    # something behind it: out of step
    ([b"220 node.test ESMTP\r\n250 what\r\n"], False, [b"220 node.test ESMTP\r\n"]),
    # a continuation line: the rest is still to come
    ([b"220-node.test\r\n", b"220 ESMTP\r\n"], False, [b"220-node.test\r\n", b"220 ESMTP\r\n"]),
    ([b"2x0 node.test\r\n"], False, [b"2x0 node.test\r\n"]),
    ([b""], False, None),                                   # EOF
    ([b"22", b""], False, None),                            # EOF in the line
])
def test_ehlo_goes_from_the_news_only_behind_a_whole_2xx_line(said, ehlo_sent, first):
    """NodePeer.xclient_then_ehlo: EHLO is written from the channel's news
    once XCLIENT's reply is one whole 2xx line with nothing behind it, never
    before, and the task wakes once for both replies; for anything else the
    task wakes with EHLO unsent, and both replies are left for read_reply."""
    from proxsmtp.net.channel import Channel

    loop = asyncio.new_event_loop()
    channel = Channel("FILTER", trace=False, loop=loop)
    transport = channel.transport = FakeTransport()
    node = nodepool.NodePeer(channel, 5.0, KEY, lambda exc: exc)
    node.due = 0
    step = loop.create_task(node.xclient_then_ehlo(XCLIENT, "client.example"))
    written = []

    async def feed() -> None:
        await asyncio.sleep(0)
        for piece in said:
            assert transport.written == [XCLIENT]       # nothing ahead of XCLIENT's reply
            if piece:
                channel.data_received(piece)
            else:
                channel.eof_received()
            await asyncio.sleep(0)
        written.extend(transport.written)
        if ehlo_sent:
            assert not step.done()          # the task sleeps on until EHLO's reply
            channel.data_received(NODE_EHLO)
        await step

    try:
        loop.run_until_complete(asyncio.wait_for(feed(), 5))
        assert step.result() is ehlo_sent
        assert written == [XCLIENT, EHLO] if ehlo_sent else [XCLIENT]
        assert node.due == (2 if ehlo_sent else 1)
        if first is not None:
            assert loop.run_until_complete(node.read_reply()) == first
        if ehlo_sent:
            assert loop.run_until_complete(node.ehlo_reply()) == NODE_EHLO.splitlines(True)
            assert node.due == 0
    finally:
        loop.close()


def test_a_node_silent_after_xclient_times_out():
    """No reply to XCLIENT within the node's timeout: what `failed` makes of
    the TimeoutError is raised (Stale on a reused connection), EHLO unsent."""
    from proxsmtp.net.channel import Channel

    loop = asyncio.new_event_loop()
    channel = Channel("FILTER", trace=False, loop=loop)
    channel.transport = FakeTransport()
    failures = []
    node = nodepool.NodePeer(channel, 0.05, KEY, lambda exc: failures.append(exc) or exc)
    try:
        with pytest.raises(asyncio.TimeoutError):
            loop.run_until_complete(asyncio.wait_for(node.xclient_then_ehlo(XCLIENT, "c"), 5))
        assert len(failures) == 1 and channel.transport.written == [XCLIENT]
    finally:
        loop.close()
