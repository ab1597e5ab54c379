"""The relay loop: lines from either side of a session, as they come.

This is the one hot file: every command and every reply of every session
goes through `Pump.relay_lines`.  Its rules:

- **No task wake-up per line.**  While the session's task sleeps in
  `passthru`, the channels' callbacks (`Channel.data_received`) call
  `on_news`, which relays what it can there and then and only wakes the
  task for what must wait on something (a handler that returns an
  awaitable, a message's filter or its send from disk, either side
  closing).
- **No new call layer.**  A client line goes from relay_lines straight to
  its handler in `commands.HANDLERS` (the screens: a line too long, a bare
  CR, TLS still owed, XCLIENT due, are the choice of another handler, made
  here); a server line goes to `ReplyQueue.server_line`.  A helper between
  them costs every line of every session.
- **Corking.**  Lines that came together leave together: when more is
  buffered behind the line at hand, both channels are corked and uncorked
  once the turn is done (RFC 2920 groups: the server gets a group's
  commands in one write, the client their replies in one).
- **Fairness.**  LINES_PER_TURN lines, then the task yields to the
  worker's other sessions.
- **Back-pressure.**  No client command is taken while either peer is not
  reading what we write or MAX_PENDING_REPLIES are due: its lines stay in
  the buffer, the buffer's high-water mark pauses reading, and TCP slows
  the client down.
- **What a callback may do.**  Write, cork, take a place in the reply
  queue, start a Transfer that needs nothing the task waits on; raise
  SessionEnd (it is handed to the task, as if the task had relayed the
  line).  Never await, never block, never call back into the loop.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from typing import Coroutine

from ..message.transfer import Transfer
from ..net.channel import CRLF, Channel
from ..net.waits import wait_any
from ..process.log import log
from ..smtp.ends import (CLIENT_GONE, IDLE, READ_TIMEOUT, SERVER_GONE, SERVER_TIMEOUT, SessionEnd,
                         client_wait, unfinished_line)
from ..smtp.peer import ServerLeg
from ..smtp.replies import FINAL_REPLY_WAIT, R_SERVERGONE
from ..smtp.syntax import verb_of
from .commands import HANDLERS, bare_cr, relay, tls_first, too_long, xclient_first
from .replyqueue import OnReply, ReplyQueue
from .starttls import BEFORE_TLS

# Fairness and back-pressure (one client must neither starve its worker nor
# make it buffer without bound): lines handled before yielding to other
# sessions, and replies still due before the client's next commands wait.
LINES_PER_TURN = 64
MAX_PENDING_REPLIES = 512


class Next(enum.Enum):
    """What the session's task does after relay_lines()."""

    WAIT = "wait"          # for news from either side (lines come in meanwhile)
    COMMAND = "command"    # run a command that waits on something, or send a message from disk
    YIELD = "yield"        # a turn's worth of lines done: let other sessions run
    DONE = "done"          # either side closed: the session is over


# Read once per line: module names, not Next.X (an enum class's attributes
# go through EnumType.__getattr__).
WAIT, COMMAND, YIELD, DONE = Next.WAIT, Next.COMMAND, Next.YIELD, Next.DONE


class Pump:
    """The relay of a Session: every attribute it uses is declared here and
    set by Session.__init__."""

    tag: str
    debug: bool
    timeout: float                   # TimeOut
    client: Channel
    server: Channel
    server_leg: ServerLeg
    replies: ReplyQueue
    transfer: Transfer | None        # the message in progress
    deferred: Coroutine[None, None, None] | None    # a command the task must run
    ended: bool                      # relay_lines saw either side close
    tls_gate: bool                   # a leg that must be encrypted may not be yet
    xclient_due: bool                # XClient: XCLIENT goes before the next command
    on_reply: OnReply                # state changes per whole server reply

    async def passthru(self) -> None:
        """Relay until either side closes or both are idle for TimeOut.

        relay_lines() relays the plain commands and replies, here and, while
        this task sleeps, straight from the channels' callbacks (on_news).
        The task itself only runs what waits on something: what a handler
        left it (DATA, STARTTLS, XCLIENT, the first EHLO with ServerTLS), or
        what a message's Transfer left it (its filter, its send from disk)."""
        client = self.client
        while True:
            step = self.relay_lines()
            if step is WAIT:
                try:
                    await wait_any((client, self.server), self.idle_wait(), self.on_news)
                except asyncio.TimeoutError:
                    if self.receiving:      # said as Intake.wait says it in the task
                        raise (SessionEnd(READ_TIMEOUT, None) if client.line_started is None
                               else unfinished_line(READ_TIMEOUT, self.timeout)) from None
                    if self.replies.proxy_command_due:
                        raise SessionEnd(SERVER_TIMEOUT, server_error="timeout") from None
                    # A begun line bounded this wait (the loop's timer may fire a
                    # hair early, so its deadline is not re-checked): say so.
                    if client.line_started is not None:
                        raise unfinished_line(IDLE, self.timeout) from None
                    raise SessionEnd(IDLE, None, server_error="timeout"
                                     if self.replies.waiting_for_server else None) from None
            elif step is COMMAND:
                command, self.deferred = self.deferred, None
                if command is None:     # the Transfer's: its filter, or a send from disk
                    transfer = self.transfer
                    command, transfer.task = transfer.task, None    # type: ignore[union-attr]
                await command       # type: ignore[misc]
            elif step is YIELD:           # let the worker's other sessions run
                await asyncio.sleep(0)
            else:
                return

    def relay_lines(self) -> Next:
        """Relay up to LINES_PER_TURN lines, server replies first; what comes next."""
        if self.deferred is not None:
            return COMMAND
        if self.ended:
            return DONE
        client, server = self.client, self.server
        corked = False
        try:
            for _ in range(LINES_PER_TURN):
                transfer = self.transfer
                if transfer is not None:
                    if transfer.receiving:          # the server waits meanwhile
                        if not transfer.receive():
                            if client.eof:
                                raise SessionEnd(CLIENT_GONE, None)
                            return WAIT
                        continue
                    if transfer.task is not None:   # the filter, or a send under flow control
                        return COMMAND
                got = server.take_line() if server.buf else None
                if got is not None:
                    if server.buf and not corked:   # more replies came with it: one write for all
                        client.cork()
                        server.cork()
                        corked = True
                    self.replies.server_line(got[0], got[1], self.tag, self.on_reply)
                    continue
                if server.eof:
                    return self.server_closed()
                got = (client.take_line() if client.buf and transfer is None and not self.backed_up
                       else None)
                if got is not None:
                    if client.buf and not corked:   # a pipelined group: its commands in one write
                        client.cork()
                        server.cork()
                        corked = True
                    line = got[0]
                    verb = verb_of(line)
                    handler = HANDLERS.get(verb, relay)
                    if got[1]:
                        handler = too_long
                    elif 0 <= line.find(b"\r") != len(line) - 2:     # a CR not before the LF
                        handler = bare_cr
                    elif self.tls_gate and verb not in BEFORE_TLS:
                        handler = tls_first
                    elif self.xclient_due and verb != b"STARTTLS":
                        handler = xclient_first
                    self.deferred = handler(self, line, verb)     # type: ignore[arg-type]
                    if self.deferred is not None:
                        return COMMAND
                    continue
                if client.eof and not self.replies.waiting_for_server:
                    return self.client_closed()
                return WAIT
            return YIELD
        finally:
            if corked:
                client.uncork()
                server.uncork()

    def idle_wait(self) -> float:
        """How long passthru waits for news: TimeOut, or less for a begun
        line; for the server's verdict on a message, as long as RFC 5321 says."""
        transfer = self.transfer
        if transfer is not None and transfer.awaiting_final:
            return max(self.timeout, FINAL_REPLY_WAIT)
        client = self.client
        if client.line_started is None:
            return self.timeout
        return client_wait(client, self.timeout, READ_TIMEOUT if self.receiving else IDLE)

    @property
    def receiving(self) -> bool:
        """A message is coming in through the relay's callbacks."""
        return self.transfer is not None and self.transfer.receiving

    def on_news(self) -> None:
        """A channel has news while passthru sleeps: relay what is plain here,
        wake the task only for what it must do itself."""
        client = self.client
        waiter = client.waiter
        if waiter is None or waiter.done():   # already woken: the task takes it from here
            return
        try:
            if self.relay_lines() is WAIT:
                client.extend_wait(self.timeout if self.transfer is None and client.line_started is None
                                   else self.idle_wait())
                return
        except Exception as exc:      # raised in the task, as if it had relayed the line
            del waiter      # the future is to hold `exc`, whose traceback holds this frame
            client.fail(exc)
            return
        client.wake()

    def client_closed(self) -> Next:
        """The client closed the connection and has had every reply: done."""
        if self.debug:
            log.debug("%s: client closed the connection", self.tag)
        self.ended = True
        return DONE

    def server_closed(self) -> Next:
        """The server closed the connection: its last words go to the client;
        SessionEnd if the client is still owed a reply."""
        self.ended = True
        if self.replies.proxy_command_due:      # mid-DATA: as ServerLeg.read_reply says it
            raise SessionEnd(SERVER_GONE, server_error="closed")
        rest = self.server.rest()
        if rest.strip() and not self.client.closed:
            self.client.write(rest.rstrip(b"\r\n") + CRLF)
        elif self.replies.waiting_for_server:     # the client must not wait forever
            raise SessionEnd("server closed the connection before replying",
                             R_SERVERGONE, logging.WARNING, server_error="closed")
        if self.debug:
            log.debug("%s: server closed the connection", self.tag)
        return DONE

    @property
    def backed_up(self) -> bool:
        """Take no more client commands for now: the server is not reading what
        we send, the client is not reading its replies, or too many replies are
        still due.  Its lines then stay in its buffer, the buffer's high-water
        mark pauses reading, and TCP slows the client down."""
        return (self.server.backed_up or self.client.backed_up
                or len(self.replies.places) >= MAX_PENDING_REPLIES)

    async def drain_replies(self) -> None:
        """Relay every reply still due, so the proxy may speak to the server."""
        while self.replies.waiting_for_server:
            for line in await self.server_leg.read_reply():
                self.replies.server_line(line, False, self.tag, self.on_reply)
