"""The filter node's connections, kept open between messages (proxsmtpd(8) FILTERS).

A worker offers every filtered message to the same node (FilterType smtp).
A new connection for each costs a connect, the greeting, EHLO and, under
ServerTLS, a TLS handshake: more than the message itself.  So a connection
on which the node accepted a message goes back to the worker's pool, and
the next message takes it (filters/node.py).  The node's 2xx to the final
dot ended the transaction (RFC 5321 3.3, 4.1.1.4), so no RSET is owed:
the next message starts with XCLIENT for its client (Postfix's
XCLIENT_README: XCLIENT may be sent between transactions; its 220 starts
the session over) and EHLO; or, when the connection's session already
speaks for that same client (the XCLIENT attributes it would send are
those it sent last), with MAIL at once, as the client's own next
transaction in one session would.

- One pool per worker (one event loop), keyed by what makes a connection
  fit for a message: the node's address and the TLS policy and context.
- FilterConnections idle connections are kept.  A message that finds
  none idle opens one more; given back, it is kept too while the burst
  that needed it lasts: a second (SURPLUS_WINDOW) in which some idle
  connections beyond FilterConnections were never all needed (the fewest
  idle over that second) closes that many (QUIT), oldest first.  Closing
  it at once instead cost a connection, EHLO and a TLS handshake for each
  message that found every kept one busy.  Idle ones are taken oldest
  first, so that the messages go round all of them, and round the nodes a
  balancer connected them to.
- An idle connection is closed after FilterIdleTime seconds (one timer for
  the pool, set for the oldest), and at once when the node says anything
  or closes it while it is idle; all are closed (QUIT) when the worker stops.
- Health: a connection goes back only after the node accepted a message
  (2xx to the final dot) with every reply read, nothing unread, no 421 and
  the connection open.  A refusal ends it, so that a node's count of a
  client's errors (Postfix's smtpd_soft_error_limit slows down a client that
  errs without delivering mail) never builds up across messages.
- A reused connection that turns out dead before the message left (EOF, a
  reset, a timeout or 421 in answer to XCLIENT, EHLO, MAIL, RCPT or
  DATA) raises Stale: the message gets one more try on a new connection.
  Once the node said 354, or the message left by BDAT, it may be on its
  way: a reply lost then is FilterError (451) as on a new connection,
  never a second offer.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Hashable

from ..net.channel import REPLY_FAST, Channel, ChannelClosed
from ..process.log import clean, log
from ..smtp.peer import Failure, Peer, ReplyTooLong
from ..smtp.syntax import ehlo_keywords, ehlo_offers
from .verdict import FilterError

# How long a stopping worker waits for its idle connections to close.
CLOSE_WAIT = 1.0
# The pool's timer may fire this much early (the loop's clock granularity).
_SLACK = 0.01
# Seconds over which idle connections beyond FilterConnections that were
# never all needed are closed: a loaded worker's next message comes within
# milliseconds, so a second that left some unused means the burst is over.
SURPLUS_WINDOW = 1.0


class Stale(FilterError):
    """A pooled connection failed before the message left: try a new one."""


class NodePeer(Peer):
    """A connection to the filter node as the pool keeps it: what was said on
    it for the current message (whether the message may be on its way, how
    many replies are owed) and since when it is idle."""

    def __init__(self, channel: Channel, timeout: float, key: Hashable,
                 failure: Failure) -> None:
        # `failure`: a lost reply on a new connection, or after 354 (`failed`
        # below makes the others Stale).
        super().__init__(channel, timeout, "the filter node", failure)
        self.key = key
        self.reused = False         # taken from the pool for this message
        self.committed = False      # 354, or BDAT sent: the message may be on its way
        self.due = 1                # replies owed (the greeting, then for what was sent)
        self.pipelining = False     # the node's last EHLO offered PIPELINING
        self.offered: set[str] = set()      # the keywords of the node's last EHLO
        self._ehlo: list[bytes] = []        # that EHLO reply
        # its bytes, and it, while they are few enough to be taken whole
        # again (Reader.take_known)
        self._known: tuple[bytes, list[bytes]] | None = None
        # The XCLIENT attributes the session speaks for since its EHLO after
        # XCLIENT; None before, or while they change.
        self.client: tuple | None = None
        self.last = b""             # the code of the last reply read
        self.uses = 1               # messages offered on it, this one included
        self.idle_since = 0.0       # loop time it went back to the pool

    def stale(self, exc: Exception) -> Stale | None:
        """Stale when a reused connection failed (EOF, reset, timeout) before
        the message left; None when the failure is the message's to bear."""
        if not self.reused or self.committed or isinstance(exc, ReplyTooLong):
            return None
        why = str(exc) if isinstance(exc, ChannelClosed) else "timed out"
        return Stale("reused connection to the filter node failed: %s" % why)

    def send(self, *lines: bytes) -> None:
        self.due += len(lines)
        Peer.send(self, *lines)

    def command(self, line: bytes):
        self.due += 1
        return Peer.command(self, line)

    async def ehlo(self, name: str) -> list[bytes]:
        self.due += 1
        self.channel.write(b"EHLO %s\r\n" % name.encode("utf-8", "surrogateescape"))
        reply = await self.read_reply(None, self._known)
        if reply is not self._ehlo and reply != self._ehlo:    # a node says the same every time
            self._ehlo = reply
            self.pipelining = ehlo_offers(reply, b"PIPELINING")
            self.offered = ehlo_keywords(reply)
            known = b"".join(reply)
            self._known = (known, reply) if len(known) < REPLY_FAST else None
        return reply

    def sending_chunk(self) -> None:
        """The message leaves by BDAT, with no 354 before it (RFC 3030): it is
        on its way from now (a reply lost is the message's, never Stale),
        and its chunk's reply, the verdict, is owed."""
        self.committed = True
        self.due += 1

    def failed(self, exc: Exception) -> Exception:
        """A lost reply (EOF, reset, timeout) on a reused connection before
        354 is Stale; else it is the `failure` this connection was made with."""
        return self.stale(exc) or self.failure(exc)

    def heard(self, reply: list[bytes]) -> list[bytes]:
        """Peer.take_reply's reply, counted: 354 commits the message; on a
        reused connection 421 before that is Stale."""
        self.due -= 1
        code = self.last = reply[-1][:3]
        if not self.committed:
            if code == b"354":
                self.committed = True
                self.due += 1       # the reply to the message's final dot
            elif code == b"421" and self.reused:
                raise Stale("reused connection to the filter node: %s"
                            % clean(reply[-1].strip()))
        return reply

    @property
    def reusable(self) -> bool:
        """The node accepted the message, every reply is read and nothing
        else came: the connection is fit for the next message."""
        channel = self.channel
        return (self.committed and self.due == 0 and self.last[:1] == b"2"
                and not channel.closed and not channel.eof and not channel.pending)


def retire(node: NodePeer, why: str) -> None:
    """Close a node connection: QUIT first when the exchange is in step (no
    reply owed), else it is cut."""
    channel = node.channel
    channel.on_ready = None
    if node.due == 0 and not channel.closed and not channel.eof:
        try:
            channel.write(b"QUIT\r\n")
        except ChannelClosed:
            pass
    channel.close()
    log.debug("%s: FILTER: connection to the filter node closed (%s) after %d message%s",
              channel.tag, why, node.uses, "" if node.uses == 1 else "s")


class NodePool:
    """One worker's idle connections to the filter node."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.idle: dict[Hashable, list[NodePeer]] = {}    # oldest first
        self.count = 0
        self.idle_time = 30.0
        self.cap = 0                # FilterConnections, as last given back
        self.fewest = 0             # the fewest idle since the surplus was last trimmed
        self._sweep: asyncio.TimerHandle | None = None
        self._trim: asyncio.TimerHandle | None = None

    def _out(self) -> None:
        """An idle connection left the pool (taken or closed)."""
        self.count -= 1
        if self.count < self.fewest:
            self.fewest = self.count

    def take(self, key: Hashable, tag: str) -> NodePeer | None:
        """The oldest idle connection for `key`, made ready for a message of
        session `tag`, or None."""
        idle = self.idle.get(key)
        while idle:
            node = idle.pop(0)
            self._out()
            channel = node.channel
            channel.on_ready = None
            if channel.closed or channel.eof or channel.pending:
                retire(node, "gone while idle")
                continue
            if node.idle_since + self.idle_time <= self.loop.time():
                retire(node, "idle for FilterIdleTime")
                continue
            channel.tag = tag
            node.reused, node.committed, node.last = True, False, b""
            node.uses += 1
            log.debug("%s: FILTER: reusing a connection to the filter node (message %d on it)",
                      tag, node.uses)
            return node
        return None

    def give_back(self, node: NodePeer, cap: int, idle_time: float) -> None:
        """After the verdict: kept when it is fit, else closed.  Beyond `cap`
        idle, the surplus timer decides how long (_trim_surplus)."""
        if not node.reusable:
            retire(node, "said %s" % node.last.decode("ascii", "replace") if node.last
                   else "not in step")
            return
        self.idle_time, self.cap = idle_time, cap
        node.idle_since = self.loop.time()
        node.channel.on_ready = functools.partial(self._news, node)
        self.idle.setdefault(node.key, []).append(node)
        self.count += 1
        if self._sweep is None:
            self._sweep = self.loop.call_at(node.idle_since + idle_time, self._expire)
        if self.count > cap and self._trim is None:
            self.fewest = self.count
            self._trim = self.loop.call_later(SURPLUS_WINDOW, self._trim_surplus)

    def _trim_surplus(self) -> None:
        """The timer, each SURPLUS_WINDOW while more than FilterConnections are
        idle: close those beyond it that stayed idle all along, oldest first."""
        self._trim = None
        for _ in range(min(self.fewest, self.count - self.cap)):
            idle = min((idle for idle in self.idle.values() if idle),
                       key=lambda idle: idle[0].idle_since)
            self.count -= 1
            retire(idle.pop(0), "FilterConnections %d idle already" % self.cap)
        if self.count > self.cap:
            self.fewest = self.count
            self._trim = self.loop.call_later(SURPLUS_WINDOW, self._trim_surplus)

    def _news(self, node: NodePeer) -> None:
        """Bytes or EOF on an idle connection: the node is closing it (a
        timeout's 421, a shutdown) or out of step; either way it is done."""
        channel = node.channel
        if not (channel.eof or channel.pending or channel.closed):
            return
        self.idle[node.key].remove(node)
        self._out()
        said = channel.rest().split(b"\n", 1)[0].strip()
        retire(node, "the node %s while idle" % ("said %s" % clean(said) if said else "closed it"))

    def _expire(self) -> None:
        """The timer: close the connections idle for FilterIdleTime, and set
        it again for the oldest of the others."""
        self._sweep = None
        now = self.loop.time()
        oldest = None
        for idle in self.idle.values():
            while idle and idle[0].idle_since + self.idle_time <= now + _SLACK:
                self._out()
                retire(idle.pop(0), "idle for FilterIdleTime")
            if idle and (oldest is None or idle[0].idle_since < oldest):
                oldest = idle[0].idle_since
        if oldest is not None:
            self._sweep = self.loop.call_at(oldest + self.idle_time, self._expire)

    async def close_all(self) -> None:
        """The worker stops: every idle connection says QUIT and is closed."""
        for timer in (self._sweep, self._trim):
            if timer is not None:
                timer.cancel()
        self._sweep = self._trim = None
        nodes = [node for idle in self.idle.values() for node in idle]
        self.idle.clear()
        self.count = 0
        for node in nodes:
            retire(node, "the worker stops")
        deadline = self.loop.time() + CLOSE_WAIT
        while any(node.channel.transport is not None for node in nodes) \
                and self.loop.time() < deadline:
            await asyncio.sleep(0.02)


_pool: NodePool | None = None


def worker_pool() -> NodePool:
    """This worker's pool (one per event loop: an in-process test's next loop
    gets a new one)."""
    global _pool
    loop = asyncio.get_running_loop()
    if _pool is None or _pool.loop is not loop:
        _pool = NodePool(loop)
    return _pool


def done(node: NodePeer, pool: NodePool | None, cap: int, idle_time: float,
         offered: bool) -> None:
    """The message's exchange on `node` is over (`offered`: a verdict came):
    the connection goes back to the pool, or is closed."""
    if pool is None:
        retire(node, "FilterConnections 0")
    elif not offered:
        retire(node, "the exchange failed")
    else:
        pool.give_back(node, cap, idle_time)


async def close_idle() -> None:
    """The worker stops: its idle node connections are closed (QUIT)."""
    if _pool is not None:
        await _pool.close_all()
