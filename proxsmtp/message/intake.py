"""The client's message bytes coming in, the same on every DATA path.

Each chunk counts towards the size limit (MaxMessageSize, or the server's
SIZE: RFC 1870), its first bytes give the log line its Message-ID, and it
goes to the spool, whose write errors are kept, not raised: past the limit
or after a failed write the rest of the message is still read (and
dropped), so the client hears 552 or 451 in step with the protocol.
"""

from __future__ import annotations

import asyncio
import time

from ..net.channel import Channel
from ..process.log import log
from ..smtp.ends import CLIENT_GONE, READ_TIMEOUT, SessionEnd, client_wait
from ..smtp.peer import ServerLeg
from ..smtp.replies import FAILED, TOO_BIG, Status
from . import spool
from .envelope import Envelope
from .header import HEAD_LIMIT, message_id

REJECTED, FILTER_ERROR = Status.REJECTED, Status.FILTER_ERROR


class Intake:
    """One message's bytes from the client: size, Message-ID, spool errors."""

    def __init__(self, envelope: Envelope, client: Channel, server: ServerLeg,
                 size_limit: int, info: bool, debug: bool) -> None:
        self.envelope = envelope
        self.client = client
        self.server = server
        self.size_limit = size_limit      # bytes; 0: none (MaxMessageSize, server's SIZE)
        self.too_big = False
        self.error = ""                   # the spool failed: the message is dropped with 451
        self.debug = debug
        # The first bytes, for the Message-ID of the log line (only read at INFO).
        self.head: bytearray | None = bytearray() if info else None

    def seen(self, data: bytes) -> None:
        """Message bytes arrived: keep the first ones (Message-ID) and the size.
        The head is let go at the end of the header block: a session held in
        the middle of a long message does not keep HEAD_LIMIT bytes with it."""
        if self.head is not None:
            start = max(0, len(self.head) - 3)
            self.head += data[:HEAD_LIMIT - len(self.head)]
            if (len(self.head) >= HEAD_LIMIT or self.head.find(b"\r\n\r\n", start) >= 0
                    or self.head.find(b"\n\n", start) >= 0):
                self.seen_all()
        self.envelope.size = (self.envelope.size or 0) + len(data)
        if self.size_limit and self.envelope.size > self.size_limit:
            self.too_big = True

    def seen_all(self) -> None:
        """The header block (or the whole message) is in: its Message-ID."""
        if self.head is not None:
            self.envelope.msgid = message_id(bytes(self.head))
            self.head = None

    def absorb(self, message: spool.Spool) -> bool:
        """Move what the client has sent of the message into `message`;
        True once its end was seen."""
        data, done = self.client.take_data()
        if data:
            self.keep(message, data)
        return done

    def keep(self, message: spool.Spool, data: bytes) -> None:
        """Count the client's `data` and spool it, unless the message is
        refused already (too big, or the spool failed): then it is dropped."""
        self.seen(data)
        if not self.error and not self.too_big:
            try:
                message.write(data)
            except OSError as exc:
                self.error = "couldn't write to cache file: %s" % exc.strerror

    def received(self, message: spool.Spool) -> tuple[str, Status] | None:
        """The whole message is in `message`: None, or the refusal the
        client is to hear instead of the offer (logged here), with its status."""
        self.seen_all()
        try:
            message.finish()
        except OSError as exc:
            self.error = self.error or "couldn't write to cache file: %s" % exc.strerror
        if self.debug:
            log.debug("%s: wrote %d bytes to cache", self.envelope.tag, message.size)
        if self.too_big:
            log.info("%s: message larger than %d bytes refused", self.envelope.tag,
                     self.size_limit)
            return TOO_BIG, REJECTED
        if self.error:
            log.error("%s: %s", self.envelope.tag, self.error)
            return FAILED, FILTER_ERROR
        return None

    async def take(self, message: spool.Spool, timeout: float, keepalives: int) -> None:
        """Read the client's whole message into `message`, in the session's
        task.  A steady upload keeps the server alive too (KeepAlives): the
        server only sees us when we write."""
        client = self.client
        client.start_data()
        while not self.absorb(message):
            if client.eof:
                raise SessionEnd(CLIENT_GONE, None)
            if self.server.keepalive_due:
                await self.server.keepalive()
                continue
            await self.wait(timeout, keepalives)

    async def take_chunk(self, message: spool.Spool, size: int, timeout: float,
                         keepalives: int) -> None:
        """Read one BDAT chunk of `size` bytes into `message` (RFC 3030):
        counted, as the client sent it (no dot-unstuffing, no end line);
        past the limit or after a spool error it is read all the same, and
        dropped.  The channel's high-water mark holds the client back
        meanwhile, as for DATA."""
        client = self.client
        while size:
            data = client.take_count(size)
            if data:
                size -= len(data)
                self.keep(message, data)
                del data
                continue
            if client.eof:
                raise SessionEnd(CLIENT_GONE, None)
            if self.server.keepalive_due:
                await self.server.keepalive()
                continue
            await self.wait(timeout, keepalives)

    async def relay(self, timeout: float) -> None:
        """Skip: the client's message straight on to the server, which is in
        its DATA (no keepalive can be said in the middle of it), dot-stuffed
        as it came and ended with the final dot."""
        client, server, guard = self.client, self.server.channel, spool.DotGuard()
        client.start_data()
        while True:
            data, done = client.take_data()
            if data:
                self.seen(data)
                server.write(guard.feed(data), False)
                del data    # not kept alive by this frame while it waits on the server
                await server.drain(timeout)
            if done:
                break
            if client.eof:
                raise SessionEnd(CLIENT_GONE, None)
            await self.wait(timeout, 0)
        self.seen_all()
        server.write(guard.finish(), False)
        server.write(b".\r\n")

    async def wait(self, timeout: float, keepalives: int) -> None:
        """Wait for more of the message, keeping the server alive meanwhile
        (every `keepalives` seconds; 0: never).

        Returns after each keepalive too: data that arrives while the NOOP's
        reply is awaited wakes no one, so the caller must look at the buffer.
        """
        step = min(timeout, keepalives) if keepalives > 0 else timeout
        try:
            await self.client.wait(min(step, client_wait(self.client, timeout, READ_TIMEOUT)))
        except asyncio.TimeoutError:
            if time.monotonic() >= self.client.last_action + timeout:
                raise SessionEnd(READ_TIMEOUT, None) from None
            client_wait(self.client, timeout, READ_TIMEOUT)
            if keepalives:
                await self.server.keepalive()


async def discard_chunk(client: Channel, size: int, timeout: float) -> None:
    """Read a refused BDAT chunk's `size` bytes and drop them: they are the
    client's message, never to be read as its commands (RFC 3030 2: a
    refused chunk is still sent, and must be consumed)."""
    while size:
        size -= len(client.take_count(size))
        if not size:
            return
        if client.eof:
            raise SessionEnd(CLIENT_GONE, None)
        try:
            await client.wait(client_wait(client, timeout, READ_TIMEOUT))
        except asyncio.TimeoutError:
            raise SessionEnd(READ_TIMEOUT, None) from None
