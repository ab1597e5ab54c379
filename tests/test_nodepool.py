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
