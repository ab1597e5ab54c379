"""The proxy as an SMTP client: the server leg's commands of its own.

ServerLeg is the server connection as the proxy's own commands (NOOP,
XCLIENT, DATA, RSET) use it: a reply read whole, or SessionEnd when the
server fails us.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable

from ..net.channel import CRLF, Channel, ChannelClosed
from ..net.waits import wait_any
from ..process.log import log
from .ends import SERVER_GONE, SERVER_TIMEOUT, SessionEnd
from .replies import R_REPLYTOOLONG
from .syntax import is_continued

# The longest reply read whole (generous for any real EHLO answer).
REPLY_MAX_LINES = 1000
REPLY_MAX_BYTES = 64 * 1024


class ReplyTooLong(ChannelClosed):
    """A peer's reply ran past REPLY_MAX_LINES or REPLY_MAX_BYTES: not a
    conversation any more; the connection is given up."""


def too_long_reply(name: str) -> ReplyTooLong:
    """The error for a reply that ran past REPLY_MAX_LINES or REPLY_MAX_BYTES
    (its readers compare inline: the check runs for every reply line)."""
    return ReplyTooLong("%s: reply longer than %d lines or %d bytes"
                        % (name, REPLY_MAX_LINES, REPLY_MAX_BYTES))


async def read_reply(channel: Channel, timeout: float) -> list[bytes]:
    """One whole (multi-line) SMTP reply; an overlong line is cut short,
    an endless reply raises ReplyTooLong, EOF ChannelClosed, `timeout`
    seconds without news asyncio.TimeoutError."""
    lines: list[bytes] = []
    size = 0
    while True:
        got = channel.take_line()
        if got is None:
            if channel.eof:
                raise ChannelClosed("%s: connection closed by peer" % channel.name, channel.name)
            await wait_any((channel,), timeout)
            continue
        line, too_long = got
        if too_long:
            log.warning("%s: SMTP response line too long. discarded extra", channel.tag)
            line = line[:-2].rstrip(b"\r\n") + CRLF
        lines.append(line)
        size += len(line)
        if len(lines) > REPLY_MAX_LINES or size > REPLY_MAX_BYTES:
            raise too_long_reply(channel.name)
        if not is_continued(line):
            return lines


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
            return await read_reply(self.channel, self.timeout if timeout is None else timeout)
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
