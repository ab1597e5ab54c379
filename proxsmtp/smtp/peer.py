"""The proxy as an SMTP client (RFC 5321): the one reply reader, and the
proxy's own commands, EHLO, STARTTLS (RFC 3207) and XCLIENT.

A Peer is a connection the proxy speaks SMTP on itself: the server leg
(ServerLeg, for NOOP, XCLIENT, DATA, RSET and STARTTLS) or a filter node
(filters.node).  Both read replies with Peer.take_reply, from a news
callback or awaited through Peer.read_reply; what a failure to read one
means (the session's end, or a filter's error) is the `failure` each is
made with.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import Awaitable, Callable

from ..net import tls, tlssessions
from ..net.channel import CRLF, Channel, ChannelClosed
from ..process.log import clean, log
from .ends import SERVER_GONE, SERVER_TIMEOUT, SessionEnd
from .replies import R_REPLYTOOLONG
from .syntax import is_continued, xtext

# The longest reply read whole (generous for any real EHLO answer).
REPLY_MAX_LINES = 1000
REPLY_MAX_BYTES = 64 * 1024


class ReplyTooLong(ChannelClosed):
    """A peer's reply ran past REPLY_MAX_LINES or REPLY_MAX_BYTES: not a
    conversation any more; the connection is given up."""


def too_long_reply(name: str) -> ReplyTooLong:
    """The error for a reply that ran past REPLY_MAX_LINES or REPLY_MAX_BYTES
    (ReplyQueue.server_line compares inline: the check runs for every reply line)."""
    return ReplyTooLong("%s: reply longer than %d lines or %d bytes"
                        % (name, REPLY_MAX_LINES, REPLY_MAX_BYTES))


class Refused(str):
    """Why STARTTLS did not happen, when the peer merely refused it: the
    connection goes on as it was, in plaintext."""


# A failure to read a reply (ReplyTooLong, ChannelClosed or TimeoutError),
# as the Peer's user raises it.
Failure = Callable[[Exception], Exception]


class Peer:
    """One connection the proxy speaks SMTP on as the client."""

    def __init__(self, channel: Channel, timeout: float, who: str, failure: Failure) -> None:
        self.channel = channel
        self.timeout = timeout      # seconds to wait for news of a reply
        self.who = who              # "the server", "the filter node": for the log
        self.failure = failure
        # the TLS session to keep for resumption once a reply came inside TLS
        self.unkept: tlssessions.Key | None = None
        self._lines: list[bytes] = []   # a reply's lines so far (take_reply)
        self._size = 0                  # and their bytes

    async def read_reply(self, timeout: float | None = None,
                         known: tuple[bytes, list[bytes]] | None = None) -> list[bytes]:
        """One whole (multi-line) reply (take_reply), waiting for it up to
        `timeout` seconds between news (TimeoutError); a failure to read it
        raises what `failed` makes of it."""
        try:
            while True:
                reply = self.take_reply(known)
                if reply is not None:
                    return reply
                await self.channel.wait(self.timeout if timeout is None else timeout)
        except (ChannelClosed, asyncio.TimeoutError) as exc:
            raise self.failed(exc) from None

    def take_reply(self, known: tuple[bytes, list[bytes]] | None = None) -> list[bytes] | None:
        """One whole (multi-line) reply as `heard` takes it, when it is here;
        else None, its lines so far kept for the next call.  `known`'s lines
        when its bytes come again (Reader.take_known).  An overlong line is
        cut short; an endless reply raises ReplyTooLong, the peer's EOF
        before the reply's end ChannelClosed (the caller's `failed` says
        what either means).  Not a coroutine: the callbacks of a channel's
        news read replies with it too."""
        channel = self.channel
        lines = self._lines
        reply = None
        while channel.buf:
            if not lines:       # all of it here at once: the common case
                if known is not None and channel.take_known(known[0]):
                    reply = known[1]
                    break
                reply = channel.take_reply()
                if reply is not None:
                    break
            got = channel.take_line()
            if got is None:
                break
            line, too_long = got
            if too_long:
                log.warning("%s: SMTP response line too long. discarded extra", channel.tag)
                line = line[:-2].rstrip(b"\r\n") + CRLF
            lines.append(line)
            self._size += len(line)
            if len(lines) > REPLY_MAX_LINES or self._size > REPLY_MAX_BYTES:
                raise too_long_reply(channel.name)
            if not is_continued(line):
                reply, self._lines, self._size = lines, [], 0
                break
        if reply is None:
            if channel.eof:
                raise ChannelClosed("%s: connection closed by peer" % channel.name,
                                    channel.name)
            return None
        if self.unkept is not None:
            self.keep_session()
        return self.heard(reply)

    def heard(self, reply: list[bytes]) -> list[bytes]:
        """A whole reply read: given to the reader's caller as it is (a
        filter node's connection keeps count, filters.nodepool)."""
        return reply

    def failed(self, exc: Exception) -> Exception:
        """What a reply not read whole means: the `failure` the Peer was made with."""
        return self.failure(exc)

    def write(self, data: bytes, trace: bool = True) -> None:
        """Bytes for the peer (trace=False: message content, never logged);
        ChannelClosed if it is gone."""
        self.channel.write(data, trace)

    def send(self, *lines: bytes) -> None:
        """Commands in one write: a pipelined group (RFC 2920) when there are several."""
        self.channel.write(b"".join(lines))

    def command(self, line: bytes) -> Awaitable[list[bytes]]:
        """Send one command; its reply, to await.  (read_reply's own
        coroutine: no frame of its own to resume through.)"""
        self.channel.write(line)
        return self.read_reply()

    def ehlo(self, name: str) -> Awaitable[list[bytes]]:
        """EHLO with the proxy's `name` for itself; the reply, to await."""
        return self.command(b"EHLO %s\r\n" % name.encode("utf-8", "surrogateescape"))

    def xclient(self, ip: str, helo: str | None = None) -> Awaitable[list[bytes]]:
        """XCLIENT ADDR (and HELO): who the client really is (Postfix's
        XCLIENT_README); the reply, to await."""
        return self.command(xclient_line(ip, helo))

    async def starttls(self, context: ssl.SSLContext, server_hostname: str | None,
                       timeout: float) -> str | None:
        """STARTTLS (RFC 3207): None when TLS is up, else why not.  A refusal
        (Refused) leaves the connection as it was; plaintext the peer sent
        behind its 220 is never read as if it had come inside TLS (the
        STARTTLS injection attack): the connection is closed unread, as it is
        after a failed handshake."""
        channel = self.channel
        reply = await self.command(b"STARTTLS\r\n")
        if reply[-1][:3] != b"220":
            return Refused("%s refused STARTTLS: %s" % (self.who, clean(reply[-1].strip())))
        if channel.pending:
            unread = channel.pending
            channel.close()
            return ("%s sent %d bytes behind its 220 to STARTTLS (plaintext injected?), not read"
                    % (self.who, unread))
        try:
            await channel.start_tls(context, False, timeout, server_hostname)
        except (OSError, asyncio.TimeoutError) as exc:
            channel.close()
            return "TLS handshake with %s failed: %s" % (self.who, tls.reason(exc))
        ssl_object = channel.transport.get_extra_info("ssl_object")
        if channel.tls is not None:
            self.unkept = channel.tls.resume_key
        log.debug("%s: %s TLS: %s%s", channel.tag, channel.name, tls.describe(channel.transport),
                  " resumed" if ssl_object.session_reused else "")
        return None

    def keep_session(self) -> None:
        """The TLS session, for the next connection to resume (tlssessions):
        read once a reply came inside TLS, as a TLS 1.3 ticket comes after
        the handshake."""
        key, self.unkept = self.unkept, None
        if not self.channel.closed and self.channel.transport is not None:
            tlssessions.keep(key, self.channel.transport.get_extra_info("ssl_object"))


def xclient_line(ip: str, helo: str | None = None) -> bytes:
    """`XCLIENT ADDR=ip [HELO=helo]`, the values as xtext (Postfix's XCLIENT_README)."""
    line = "XCLIENT ADDR=%s%s" % ("IPv6:" if ":" in ip else "", xtext(ip))
    if helo:
        line += " HELO=%s" % xtext(helo)
    return line.encode("ascii") + CRLF


def server_failure(exc: Exception) -> SessionEnd:
    """The server failed us: the session ends (counted as the server's error)."""
    if isinstance(exc, ReplyTooLong):
        return SessionEnd(str(exc), R_REPLYTOOLONG)
    if isinstance(exc, ChannelClosed):
        return SessionEnd(SERVER_GONE, server_error="closed")
    return SessionEnd(SERVER_TIMEOUT, server_error="timeout")


class ServerLeg(Peer):
    """The server connection for commands the proxy sends itself; a reply
    it cannot read whole ends the session (SessionEnd)."""

    def __init__(self, channel: Channel, timeout: float, keepalives: int) -> None:
        super().__init__(channel, timeout, "the server", server_failure)
        self.keepalives = keepalives
        # The keywords of the server's last EHLO reply (syntax.ehlo_keywords):
        # how a message goes on (BDAT needs CHUNKING, its chunks PIPELINING).
        self.offers: set[str] = set()

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
