"""DATA: the proxy takes the message over (SPEC §5).

The message is read from the client into a Spool, the filter gives its
verdict (filters.py), and only an accepted message is offered to the server,
whose final reply the client gets verbatim.  A refusal by the filter gets the
client the filter's reply and the server an RSET.  `Transfer.run()` returns
the status word of the message's log line (or None: no message was taken).
"""

from __future__ import annotations

import asyncio
import logging
import time

from . import filters, spool
from .config import Config
from .envelope import Envelope
from .header import HEAD_LIMIT, message_id, render as render_header
from .log import log
from .relay import FINAL_REPLY_WAIT, R_FAILED, ServerLeg, SessionEnd, client_wait
from .spio import CRLF, Channel

R_DATAINTERMED = b"354 Start mail input; end with <CRLF>.<CRLF>\r\n"
FAILED = R_FAILED.decode().strip()
TOO_BIG = "552 5.3.4 Message size exceeds fixed limit"


class Transfer:
    """One DATA command, from the client's DATA line to the final reply."""

    def __init__(self, config: Config, envelope: Envelope, client: Channel,
                 server: ServerLeg, skip: bool, size_limit: int = 0) -> None:
        self.config = config
        self.envelope = envelope
        self.client = client
        self.server = server
        self.skip = skip                  # authenticated, and FilterType says so
        self.size_limit = size_limit      # bytes; 0: none (MaxMessageSize, server's SIZE)
        self.too_big = False
        self.awaiting_final = False       # the server has the message; its verdict is due
        self.timeout = float(config.TimeOut)
        self.started = time.monotonic()
        # The first bytes, for the Message-ID of the log line (only read at INFO).
        self.head: bytearray | None = bytearray() if log.isEnabledFor(logging.INFO) else None

    @property
    def tag(self) -> str:
        return self.envelope.tag

    async def run(self) -> str | None:
        """Skip, reject, or spool, filter and forward."""
        if self.skip:
            await self.pass_data()
            return "SKIPPED"
        if self.config.FilterType == "reject":
            reply = filters.reject_reply(self.config.FilterReject)
            self.client.write(reply.encode("utf-8", "surrogateescape") + CRLF)
            return "REJECTED"
        if not self.envelope.recipients:
            await self.refused_data()
            return None
        in_memory = not self.config.FilterCommand or self.config.FilterType == "smtp"
        try:
            message = spool.Spool(self.config.TempDirectory, in_memory=in_memory)
        except OSError as exc:
            log.error("%s: couldn't open cache file in %s: %s", self.tag,
                      self.config.TempDirectory, exc.strerror)
            await self.fail_data(FAILED)
            return "FILTER-ERROR"
        # (one coroutine from here to the final reply: each wait resumes through it)
        try:
            self.client.write(R_DATAINTERMED)
            error = await self.cache_data(message)
            if self.too_big:
                log.info("%s: message larger than %d bytes refused", self.tag, self.size_limit)
                await self.fail_data(TOO_BIG)
                return TOO_BIG
            if error:
                log.error("%s: %s", self.tag, error)
                await self.fail_data(FAILED)
                return "FILTER-ERROR"
            if self.config.FilterCommand:
                verdict = await self.run_filter(message)
                if verdict is None:
                    return "FILTER-ERROR"
                if not verdict.accept:
                    await self.fail_data(verdict.reply)
                    return verdict.status
                await self.done_data(message, verdict.path)
            else:
                await self.done_data(message, None)
            return "FILTERED"
        finally:
            message.remove()

    async def run_filter(self, message: spool.Spool) -> filters.Verdict | None:
        """The filter's verdict, timed for the log; None (the client told
        451) when the filter failed."""
        started = time.monotonic()
        try:
            return await filters.check(self.config, self.envelope, message, self.server.keepalive)
        except filters.FilterError as exc:
            log.error("%s: %s", self.tag, exc)
            await self.fail_data(FAILED)
            return None
        finally:
            self.envelope.filter_seconds = time.monotonic() - started

    def _seen(self, data: bytes) -> None:
        """Message bytes arrived: keep the first ones (Message-ID) and the size.
        The head is let go at the end of the header block: a session held in
        the middle of a long message does not keep HEAD_LIMIT bytes with it."""
        if self.head is not None:
            start = max(0, len(self.head) - 3)
            self.head += data[:HEAD_LIMIT - len(self.head)]
            if (len(self.head) >= HEAD_LIMIT or self.head.find(b"\r\n\r\n", start) >= 0
                    or self.head.find(b"\n\n", start) >= 0):
                self._seen_all()
        self.envelope.size = (self.envelope.size or 0) + len(data)
        if self.size_limit and self.envelope.size > self.size_limit:
            self.too_big = True

    def _seen_all(self) -> None:
        if self.head is not None:
            self.envelope.msgid = message_id(bytes(self.head))
            self.head = None

    async def cache_data(self, message: spool.Spool) -> str:
        """Read the client's message into the spool; returns an error or ''.

        On a disk error, or once the message is past the size limit, the rest
        of the message is still read (and dropped) so that the client can be
        told 451 or 552 in step with the protocol.  A steady upload keeps the
        server alive too (KeepAlives): the server only sees us when we write.
        """
        client = self.client
        client.start_data()
        error = ""
        while True:
            data, done = client.take_data()
            if data:
                self._seen(data)
                if not error and not self.too_big:
                    try:
                        message.write(data)
                    except OSError as exc:
                        error = "couldn't write to cache file: %s" % exc.strerror
            del data        # not kept alive by this frame while it waits: one per held session
            if done:
                break
            if client.eof:
                raise SessionEnd("unexpected end of data from client", None)
            if self.server.keepalive_due:
                await self.server.keepalive()
                continue
            await self.wait_client_data()
        self._seen_all()
        try:
            message.finish()
        except OSError as exc:
            error = error or "couldn't write to cache file: %s" % exc.strerror
        log.debug("%s: wrote %d bytes to cache", self.tag, message.size)
        return error

    async def wait_client_data(self) -> None:
        """Wait for more of the message, keeping the server alive meanwhile.

        Returns after each keepalive too: data that arrives while the NOOP's
        reply is awaited wakes no one, so the caller must look at the buffer.
        """
        every = self.config.KeepAlives
        step = min(self.timeout, every) if every > 0 else self.timeout
        reason = "network operation timed out reading message"
        try:
            await self.client.wait(min(step, client_wait(self.client, self.timeout, reason)))
        except asyncio.TimeoutError:
            if time.monotonic() >= self.client.last_action + self.timeout:
                raise SessionEnd(reason, None) from None
            client_wait(self.client, self.timeout, reason)
            await self.server.keepalive()

    async def final_reply(self) -> list[bytes]:
        """The server's reply to the message: waited for as long as RFC 5321
        says (not TimeOut), and never cut short by a shutdown (see worker.py)."""
        self.awaiting_final = True
        try:
            return await self.server.read_reply(max(self.timeout, FINAL_REPLY_WAIT))
        finally:
            self.awaiting_final = False

    def _final(self, reply: list[bytes]) -> None:
        """The server's last word on the message goes to the client and the log."""
        self.envelope.reply = reply[-1].rstrip(b"\r\n").decode("utf-8", "backslashreplace")
        self.envelope.delay = time.monotonic() - self.started
        self.client.write(b"".join(reply))

    async def done_data(self, message: spool.Spool, path: str | None) -> None:
        """Offer the message (or the filter's new version at `path`) to the
        server; relay its verdict verbatim."""
        reply = await self.server.command(b"DATA\r\n")
        if reply[-1][:3] != b"354":
            log.debug("%s: server refused data transfer", self.tag)
            self._final(reply)
            return
        header = None
        if self.config.Header:
            header = render_header(self.config.Header, self.envelope.client_ip,
                                   self.envelope.local_ip, self.tag, self.envelope.client_tls)
        source = open(path, "rb") if path else message.reader()
        await spool.send(self.server.channel, source, header, self.timeout)
        self._final(await self.final_reply())

    async def fail_data(self, reply: str) -> None:
        """Answer the client with a rejection and make the server forget the message."""
        self.client.write(reply.encode("utf-8", "surrogateescape") + CRLF)
        await self.server.command(b"RSET\r\n")

    async def pass_data(self) -> None:
        """Skip: relay DATA and the message straight to the server."""
        reply = await self.server.command(b"DATA\r\n")
        self.client.write(b"".join(reply))
        if reply[-1][:3] != b"354":
            return
        client, server, guard = self.client, self.server.channel, spool.DotGuard()
        client.start_data()
        while True:
            data, done = client.take_data()
            if data:
                self._seen(data)
                server.write(guard.feed(data), False)
                del data    # as in cache_data
                await server.drain(self.timeout)
            if done:
                break
            if client.eof:
                raise SessionEnd("unexpected end of data from client", None)
            await self.wait_client_data()
        self._seen_all()
        server.write(guard.finish(), False)
        server.write(b".\r\n")
        self._final(await self.final_reply())

    async def refused_data(self) -> None:
        """DATA without accepted recipients: the server says why (503...)."""
        reply = await self.server.command(b"DATA\r\n")
        if reply[-1][:3] == b"354":
            raise SessionEnd("server accepted DATA without recipients")
        self.client.write(b"".join(reply))
