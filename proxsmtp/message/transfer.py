"""DATA: the proxy takes the message over (proxsmtpd(8) FILTERS; docs/BEHAVIOUR.md, DATA).

The message is read from the client into a Spool, the filter gives its
verdict (filters.py), and only an accepted message is offered to the server,
whose final reply the client gets verbatim.  A refusal by the filter gets the
client the filter's reply and the server an RSET.  `Transfer.run()` returns
the status word of the message's log line (or None: no message was taken).

A message no filter sees (and with no keepalives to send) takes the same
steps in the relay's callbacks instead (`Transfer.start()`): its bytes go to
the spool as they arrive and the server's replies to the proxy's DATA and
final dot come through the reply queue, so the session's task does not wake
for each step.  Where a step must wait on something else, the task does it:
a filter, a keepalive, a message sent from disk under flow control.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from .. import filters
from ..net.channel import CRLF, Channel, ChannelClosed
from ..process.config import Config
from ..process.log import clean, log
from ..session.replyqueue import ProxyCommand, ReplyQueue
from ..smtp.ends import CLIENT_GONE, READ_TIMEOUT, SessionEnd, client_wait
from ..smtp.peer import ServerLeg
from ..smtp.replies import FAILED, FINAL_REPLY_WAIT, R_DATAINTERMED, TOO_BIG
from . import spool
from .envelope import Envelope
from .header import HEAD_LIMIT, message_id
from .header import render as render_header


class Transfer:
    """One DATA command, from the client's DATA line to the final reply."""

    def __init__(self, config: Config, envelope: Envelope, client: Channel,
                 server: ServerLeg, skip: bool, size_limit: int = 0,
                 info: bool | None = None, debug: bool | None = None) -> None:
        self.config = config
        self.envelope = envelope
        self.client = client
        self.server = server
        self.skip = skip                  # authenticated, and FilterType says so
        self.size_limit = size_limit      # bytes; 0: none (MaxMessageSize, server's SIZE)
        self.too_big = False
        self.error = ""                   # the spool failed: the message is dropped with 451
        # Taken in the relay's callbacks (start()): where it stands.
        self.receiving = False            # the client's message is coming in
        self.streaming = False            # the task is to send it (it is on disk)
        self.message: spool.Spool | None = None
        self.replies: ReplyQueue | None = None
        self.done: Callable[[str], None] | None = None
        self.awaiting_final = False       # the server has the message; its verdict is due
        self.timeout = float(config.TimeOut)
        self.started = time.monotonic()
        # The log's levels, as the session asked them (None: ask the log now).
        if info is None:
            info = log.isEnabledFor(logging.INFO)
        self.debug = log.isEnabledFor(logging.DEBUG) if debug is None else debug
        # The first bytes, for the Message-ID of the log line (only read at INFO).
        self.head: bytearray | None = bytearray() if info else None

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
            self._verdict(reply.encode("utf-8", "surrogateescape") + CRLF)
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
        while not self.absorb(message):
            if client.eof:
                raise SessionEnd(CLIENT_GONE, None)
            if self.server.keepalive_due:
                await self.server.keepalive()
                continue
            await self.wait_client_data()
        return self.received(message)

    def absorb(self, message: spool.Spool) -> bool:
        """Move what the client has sent of the message into `message`;
        True once its end was seen."""
        data, done = self.client.take_data()
        if data:
            self._seen(data)
            if not self.error and not self.too_big:
                try:
                    message.write(data)
                except OSError as exc:
                    self.error = "couldn't write to cache file: %s" % exc.strerror
        return done

    def received(self, message: spool.Spool) -> str:
        """The whole message is in `message`: an error, or ''."""
        self._seen_all()
        try:
            message.finish()
        except OSError as exc:
            self.error = self.error or "couldn't write to cache file: %s" % exc.strerror
        if self.debug:
            log.debug("%s: wrote %d bytes to cache", self.tag, message.size)
        return self.error

    # --- DATA in the relay's callbacks ------------------------------------------------

    def start(self, replies: ReplyQueue, done: Callable[[str], None]) -> None:
        """Take the message without the session's task: the relay feeds the
        client's bytes to receive() and the server's replies, through
        `replies`, to this transfer; `done` gets the log line's status at the
        end.  For a message no filter sees, with no keepalives to send (the
        session decides, see Session.relayed_data): the common case, with no
        task wake-up per step.  Only a message that outgrew memory while it
        came in is sent by the task (stream())."""
        self.replies, self.done = replies, done
        self.message = spool.Spool(self.config.TempDirectory, in_memory=True)
        self.receiving = True
        self.client.write(R_DATAINTERMED)
        self.client.start_data()

    def receive(self) -> bool:
        """The client's bytes so far; True once the whole message is in
        (and the transfer has gone on to the server)."""
        if not self.absorb(self.message):
            return False
        self.receiving = False
        error = self.received(self.message)
        if self.too_big:
            log.info("%s: message larger than %d bytes refused", self.tag, self.size_limit)
            self._refuse(TOO_BIG, TOO_BIG)
        elif error:
            log.error("%s: %s", self.tag, error)
            self._refuse(FAILED, "FILTER-ERROR")
        else:
            self._command(b"DATA\r\n", self._on_354)
        return True

    def _command(self, line: bytes, on_reply: Callable[[list[bytes]], None]) -> None:
        self.server.write(line)
        self.replies.expect(ProxyCommand(on_reply))

    def _refuse(self, reply: str, status: str) -> None:
        """As fail_data(): the client hears `reply`, the server gets RSET."""
        self._verdict(reply.encode("utf-8", "surrogateescape") + CRLF)
        self._command(b"RSET\r\n", lambda lines: self._end(status))

    def _on_354(self, reply: list[bytes]) -> None:
        if reply[-1][:3] != b"354":
            log.debug("%s: server refused data transfer", self.tag)
            self._final(reply)
            self._end("FILTERED")
            return
        if self.message.memory is None:     # on disk: sent under flow control, by the task
            self.streaming = True
            return
        header = self._header()
        if header is None:
            self.server.write(spool.framed(self.message.memory), False)
        else:
            self.server.write(b"".join(spool.outgoing(self.message.reader(), header)), False)
        self._await_final()

    async def stream(self) -> None:
        """The session's task sends a message that went to disk (see start())."""
        self.streaming = False
        await spool.send(self.server.channel, self.message.reader(), self._header(), self.timeout)
        self._await_final()

    def _await_final(self) -> None:
        self.awaiting_final = True
        self.replies.expect(ProxyCommand(self._on_final))

    def _on_final(self, reply: list[bytes]) -> None:
        self.awaiting_final = False
        self._final(reply)
        self._end("FILTERED")

    def _end(self, status: str) -> None:
        done = self.done
        self.close()
        done(status)

    def close(self) -> None:
        """The transfer is over, finished (_end) or cut short with its session:
        its spool goes, and so do its links back to the session (`done`, and
        the reply queue that holds this transfer's callbacks), which holds
        it: a session must not be left in a cycle for the collector."""
        if self.message is not None:
            self.message.remove()
        self.done = self.replies = None

    async def wait_client_data(self) -> None:
        """Wait for more of the message, keeping the server alive meanwhile.

        Returns after each keepalive too: data that arrives while the NOOP's
        reply is awaited wakes no one, so the caller must look at the buffer.
        """
        every = self.config.KeepAlives
        step = min(self.timeout, every) if every > 0 else self.timeout
        reason = READ_TIMEOUT
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
        """The server's last word on the message goes to the log and to the client."""
        self.envelope.reply = reply[-1].rstrip(b"\r\n").decode("utf-8", "backslashreplace")
        self.envelope.delay = time.monotonic() - self.started
        self._verdict(b"".join(reply))

    def _verdict(self, reply: bytes) -> None:
        """What became of the message (the server's reply, or the proxy's or
        the filter's refusal), to the client.  It is decided whether or not
        the client is still there to hear it, so a client gone by now costs
        the message neither its log line nor its count (the caller makes
        both); the session then finds the client gone and ends."""
        try:
            self.client.write(reply)
        except ChannelClosed:
            log.warning("%s: client left before the answer to its message: %s", self.tag,
                        clean(reply.rstrip(b"\r\n").rsplit(b"\n", 1)[-1]))

    async def done_data(self, message: spool.Spool, path: str | None) -> None:
        """Offer the message (or the filter's new version at `path`) to the
        server; relay its verdict verbatim."""
        reply = await self.server.command(b"DATA\r\n")
        if reply[-1][:3] != b"354":
            log.debug("%s: server refused data transfer", self.tag)
            self._final(reply)
            return
        source = open(path, "rb") if path else message.reader()
        await spool.send(self.server.channel, source, self._header(), self.timeout)
        self._final(await self.final_reply())

    def _header(self) -> bytes | None:
        """The Header setting's line for this message, if any."""
        if not self.config.Header:
            return None
        return render_header(self.config.Header, self.envelope.client_ip,
                             self.envelope.local_ip, self.tag, self.envelope.client_tls)

    async def fail_data(self, reply: str) -> None:
        """Answer the client with a rejection and make the server forget the message."""
        self._verdict(reply.encode("utf-8", "surrogateescape") + CRLF)
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
                del data    # not kept alive by this frame while it waits on the server
                await server.drain(self.timeout)
            if done:
                break
            if client.eof:
                raise SessionEnd(CLIENT_GONE, None)
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
