"""The command/reply relay: which reply belongs to which command.

Every command line the session passes to the server, and every reply the
proxy makes itself, takes a place in one queue, in the order the client
sent the commands.  Server replies fill the places in turn; a proxy reply
is sent as soon as everything before it has been answered.  So a client
that pipelines gets every reply in order, whoever made it.

Also here: SessionEnd, the way a session ends with a last word to the
client, and ServerLeg, the server connection as the proxy's own commands
(NOOP, XCLIENT, DATA, RSET) use it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from ..net.channel import (CRLF, REPLY_MAX_BYTES, REPLY_MAX_LINES, Channel, ChannelClosed,
                           ReplyTooLong, too_long_reply)
from ..process.log import log
from ..smtp.replies import R_FAILED, R_REPLYTOOLONG

SERVER_GONE = "server disconnected unexpectedly"
SERVER_TIMEOUT = "network operation timed out waiting for server"
# RFC 5321 §4.5.3.2.6: a client waits 10 minutes for the reply to the final
# dot.  Giving up sooner makes the client retry a message the server may
# already have taken: a duplicate.
FINAL_REPLY_WAIT = 600.0


class SessionEnd(Exception):
    """Ends the session; `reply` (if any) is the last thing the client hears.
    `server_error` (connect, closed, timeout) when the server failed us: counted
    for /metrics (stats.server_error)."""

    def __init__(self, reason: str, reply: bytes | None = R_FAILED, level: int = logging.ERROR,
                 server_error: str | None = None):
        super().__init__(reason)
        self.reply = reply
        self.level = level
        self.server_error = server_error


@dataclass(slots=True)
class ServerAnswers:
    """A place for the server's reply to a command the proxy relayed."""

    verb: bytes              # EHLO, MAIL, RCPT, ... (b"" for the greeting)
    line: bytes              # the command as the client sent it
    address: str | None = None   # MAIL's or RCPT's address, parsed once


@dataclass(slots=True)
class ProxyAnswers:
    """A reply the proxy makes itself, sent when its turn comes."""

    reply: bytes


@dataclass(slots=True)
class ProxyCommand:
    """A place for the server's reply to a command of the proxy's own (the
    DATA of a message taken in the relay's callbacks, its final dot, an
    RSET): the reply goes to `on_reply`, never to the client."""

    on_reply: Callable[[list[bytes]], None]


GREETING = ServerAnswers(b"", b"")

# What to send the client for a whole server reply: (the command it answers, its lines).
OnReply = Callable[[ServerAnswers, list[bytes]], list[bytes]]


class ReplyQueue:
    """The places of replies still due to the client, in command order.

    It keeps no reference to the session (its `on_reply` comes with each
    line): a session and all it holds are freed by reference counting the
    moment it ends, not left for the cyclic garbage collector."""

    def __init__(self, client: Channel) -> None:
        self.client = client
        self.places: collections.deque[ServerAnswers | ProxyAnswers | ProxyCommand] = \
            collections.deque()
        self.lines: list[bytes] = []            # the server reply read so far
        self.size = 0                           # ...and its bytes

    def __len__(self) -> int:
        return len(self.places)

    @property
    def waiting_for_server(self) -> bool:
        """Some reply due to the client can only come from the server."""
        return any(not isinstance(place, ProxyAnswers) for place in self.places)

    @property
    def proxy_command_due(self) -> bool:
        """The next server reply answers a command of the proxy's own."""
        return bool(self.places) and isinstance(self.places[0], ProxyCommand)

    def expect(self, place: ServerAnswers | ProxyCommand) -> None:
        """A command went to the server: its reply takes the next place."""
        self.places.append(place)

    def answer(self, reply: bytes) -> None:
        """A reply made by the proxy, kept in order behind outstanding ones."""
        if self.places:
            self.places.append(ProxyAnswers(reply))
        else:
            self.client.write(reply)

    def server_line(self, line: bytes, too_long: bool, tag: str, on_reply: OnReply) -> None:
        """One line from the server; a whole reply goes to the client in its
        place, as `on_reply` makes it."""
        if too_long:
            log.warning("%s: SMTP response line too long. discarded extra", tag)
            line = line[:-2].rstrip(b"\r\n") + CRLF
        lines = self.lines
        lines.append(line)
        size = self.size = self.size + len(line)
        if len(lines) > REPLY_MAX_LINES or size > REPLY_MAX_BYTES:
            raise SessionEnd(str(too_long_reply("SERVER")), R_REPLYTOOLONG)
        if line[3:4] == b"-" and line[:3].isdigit():     # is_continued(), inline: once per line
            return
        self.lines, self.size = [], 0
        places = self.places
        place = places.popleft() if places else GREETING
        if isinstance(place, ProxyAnswers):      # no reply was due: unsolicited
            places.appendleft(place)
            place = GREETING
        client = self.client
        if isinstance(place, ProxyCommand):
            place.on_reply(lines)
        else:
            lines = on_reply(place, lines)
            try:
                client.write(lines[0] if len(lines) == 1 else b"".join(lines))
            except ChannelClosed:       # the client is gone: the session ends at its next step
                pass
        try:
            while places and isinstance(places[0], ProxyAnswers):
                client.write(places.popleft().reply)
        except ChannelClosed:           # as above
            pass


class ServerLeg:
    """The server connection for commands the proxy sends itself."""

    def __init__(self, channel: Channel, timeout: float, keepalives: int) -> None:
        self.channel = channel
        self.timeout = timeout
        self.keepalives = keepalives

    def write(self, data: bytes, trace: bool = True) -> None:
        self.channel.write(data, trace)

    async def read_reply(self, timeout: float | None = None) -> list[bytes]:
        """One whole (multi-line) reply; SessionEnd if the server fails us."""
        try:
            return await self.channel.read_reply(self.timeout if timeout is None else timeout)
        except ReplyTooLong as exc:
            raise SessionEnd(str(exc), R_REPLYTOOLONG) from None
        except ChannelClosed:
            raise SessionEnd(SERVER_GONE, server_error="closed") from None
        except asyncio.TimeoutError:
            raise SessionEnd(SERVER_TIMEOUT, server_error="timeout") from None

    def command(self, line: bytes) -> Awaitable[list[bytes]]:
        """Send one command of the proxy's own; its reply, to await.
        (read_reply's own coroutine: no frame of its own to resume through.)"""
        self.write(line)
        return self.read_reply()

    @property
    def keepalive_due(self) -> bool:
        """KeepAlives seconds since we last sent the server anything: its idle
        timer counts from then, however busy the client is meanwhile."""
        every = self.keepalives
        return every > 0 and time.monotonic() - self.channel.last_sent > every

    async def keepalive(self) -> None:
        """KeepAlives: NOOP to a server left idle while the client or filter works."""
        if self.keepalive_due and not self.channel.closed:
            log.debug("%s: sending NOOP to server as keepalive", self.channel.tag)
            await self.command(b"NOOP\r\n")


def client_wait(client: Channel, timeout: float, reason: str) -> float:
    """How long to wait for the client: TimeOut, but a line it has begun must
    be finished TimeOut after its first byte (a slow-loris trickle of bytes
    does not start the clock again); raises SessionEnd once that is past."""
    started = client.line_started
    if started is None:
        return timeout
    left = started + timeout - time.monotonic()
    if left <= 0:
        raise unfinished_line(reason, timeout)
    return min(timeout, left)


def unfinished_line(reason: str, timeout: float) -> SessionEnd:
    return SessionEnd(reason + " (a line unfinished for %d seconds)" % timeout, None)
