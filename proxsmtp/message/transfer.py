"""One DATA, from the client's DATA line to the final reply (proxsmtpd(8)
FILTERS; docs/BEHAVIOUR.md, DATA).

The way it goes is datapath's decision.  The client's message comes in
through an Intake (into a Spool; with Skip straight on to the server), the
filter, if any, gives its verdict, and then one set of steps offers the
message to the server through the reply queue: DATA; on 354 the message;
the final reply, which the client gets verbatim and only then.  A refusal
(the filter's, the size limit's, a failure's) gets the client its reply
and the server RSET.  `done` gets the message's Status at the end (None:
no message was taken, the server refused DATA without recipients).

While nothing else is waited on, the relay's callbacks take the message
in (`start()`, then `receive()` as bytes arrive), filtered or not, so the
session's task does not wake for each step.  Otherwise (keepalives to
send meanwhile, replies or XCLIENT still due) the task takes it in with
`run()` and hands over to the same steps.  What waits on something after the
final dot is the task's too, handed to it as `task`: the filter
(`filter()`), and what is sent under flow control (`stream()`: a message
on disk, the filter's new version, Skip's upload).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Coroutine, Protocol

from .. import filters
from ..net.channel import CRLF, Channel, ChannelClosed
from ..process.config import Config
from ..process.log import clean, log
from ..smtp.ends import SessionEnd
from ..smtp.peer import ServerLeg
from ..smtp.replies import FAILED, R_DATAINTERMED, Status
from . import datapath, milterstep, spool
from .envelope import Envelope
from .header import render as render_header
from .intake import Intake

FILTERED, REJECTED, SKIPPED, FILTER_ERROR = (
    Status.FILTERED, Status.REJECTED, Status.SKIPPED, Status.FILTER_ERROR)

OnReply = Callable[[list[bytes]], None]
Done = Callable[[Status | None], None]


class Replies(Protocol):
    """What a Transfer needs of the session's reply queue: a place, in
    command order, for the reply to a command of the proxy's own."""

    def expect_own(self, on_reply: OnReply) -> None: ...


class Transfer:
    """One DATA command, from the client's DATA line to the final reply."""

    def __init__(self, config: Config, envelope: Envelope, client: Channel, server: ServerLeg,
                 replies: Replies, done: Done, path: datapath.Path, size_limit: int = 0,
                 info: bool | None = None, debug: bool | None = None,
                 milters: milterstep.Milters | None = None) -> None:
        self.config = config
        self.envelope = envelope
        self.client = client
        self.server = server
        self.replies: Replies | None = replies
        self.done: Done | None = done
        self.path = path
        # What the log line says of a message the server had its say on.
        self.status = SKIPPED if path is datapath.SKIPPED else FILTERED
        info = log.isEnabledFor(logging.INFO) if info is None else info
        self.debug = log.isEnabledFor(logging.DEBUG) if debug is None else debug
        self.intake = Intake(envelope, client, server, size_limit, info, self.debug)
        self.message: spool.Spool | None = None
        self.source: str | None = None    # the filter's new version of the message (pipe)
        self.milters = milters            # the session's milters, if any (Milters)
        self.replay = False               # they changed the envelope: the server hears it again
        self.receiving = False            # the client's message is coming in, in the callbacks
        self.task: Coroutine[None, None, None] | None = None    # its next: filter(), stream()
        self.awaiting_final = False       # the server has the message; its verdict is due
        self.chunk_refusal: list[bytes] | None = None   # a BDAT chunk's refusal (_on_chunk)
        self.timeout = float(config.TimeOut)
        self.started = time.monotonic()

    @property
    def tag(self) -> str:
        return self.envelope.tag

    # --- the ways in ------------------------------------------------------------

    def start(self) -> None:
        """Take the message in the relay's callbacks (datapath.callbacks_may_take):
        the relay feeds the client's bytes to receive() as they arrive."""
        if self.open_spool() is None:
            self.refuse(FAILED, FILTER_ERROR)
            return
        self.receiving = True
        self.client.write(R_DATAINTERMED)
        self.client.start_data()

    def receive(self) -> bool:
        """The client's bytes so far; True once the whole message is in (and
        has gone on: to the server, or to the filter, in the task)."""
        message = self.message
        if not self.intake.absorb(message):
            return False
        self.receiving = False
        refusal = self.intake.received(message)
        if refusal is not None:
            self.refuse(*refusal)
        elif self.path is datapath.FILTERED:
            self.task = self.filter(message)
        else:
            self.offer()
        return True

    async def run(self) -> None:
        """The steps of this DATA that wait on something, in the session's
        task; the offer's replies come later, through the reply queue."""
        path = self.path
        if path is datapath.SKIPPED:        # the server's 354, and the upload (stream())
            self._command(b"DATA\r\n", self._on_354)
            return
        if path is datapath.NO_RECIPIENT:
            self._command(b"DATA\r\n", self._on_refused_data)
            return
        if path is datapath.REJECTED:
            self._refused(filters.reject_reply(self.config.FilterReject))
            self._end(REJECTED)
            return
        message = self.open_spool()
        if message is None:
            self.refuse(FAILED, FILTER_ERROR)
            return
        self.client.write(R_DATAINTERMED)
        await self.intake.take(message, self.timeout, self.config.KeepAlives)
        await self.taken(message)

    def open_spool(self) -> spool.Spool | None:
        """The message's spool: in memory while small when no program reads
        it; None (logged) when no temp file can be made."""
        config = self.config
        try:
            self.message = spool.Spool(
                config.TempDirectory,
                in_memory=not config.FilterCommand or config.FilterType == "smtp")
        except OSError as exc:
            log.error("%s: couldn't open cache file in %s: %s", self.tag,
                      config.TempDirectory, exc.strerror)
            return None
        return self.message

    async def taken(self, message: spool.Spool) -> None:
        """The whole message is in `message`, taken by the task (DATA's final
        dot, BDAT's LAST chunk): refused, or filtered, and offered."""
        refusal = self.intake.received(message)
        if refusal is not None:
            self.refuse(*refusal)
        elif self.path is datapath.FILTERED:
            await self.filter(message)
        else:
            self.offer()

    async def filter(self, message: spool.Spool) -> None:
        """The whole message through the milters, then the filter (which sees
        it as they left it), and offered; a milter's discard or refusal, or
        the filter's failure (451), ends it here."""
        started = time.monotonic()      # the milters' and the filter's time, for the log
        try:
            if self.milters is not None:
                message = await milterstep.run(self, self.milters)
                if message is None:
                    return
            verdict = await filters.check(self.config, self.envelope, message,
                                          self.server.keepalive)
        except filters.FilterError as exc:
            log.error("%s: %s", self.tag, exc)
            self.refuse(FAILED, FILTER_ERROR)
            return
        finally:
            self.envelope.filter_seconds = time.monotonic() - started
        if not verdict.accept:
            self.refuse(verdict.reply, REJECTED)
            return
        self.source = verdict.path
        if self.replay and not await milterstep.replay(self):
            return
        self.offer()

    # --- the offer, through the reply queue ---------------------------------------

    @property
    def by_bdat(self) -> bool:
        """The message goes on by BDAT: it came by BDAT, and the server takes
        it (RFC 3030); else by DATA, dot-stuffed."""
        return self.envelope.chunked and "CHUNKING" in self.server.offers

    def offer(self) -> None:
        """The message to the server: by DATA, or by BDAT with no 354 to
        wait for (the Header line counted in its size); a message on disk
        or the filter's new version is sent by the task (stream())."""
        if not self.by_bdat:
            self._command(b"DATA\r\n", self._on_354)
            return
        message = self.message
        if self.source is not None or message.memory is None:
            self.task = self.stream()
            return
        header = self._header()
        data = message.memory if header is None else b"".join(
            spool.with_header(message.reader(), header))
        if self.debug:
            log.debug("%s: the message to the server by BDAT: %d bytes in 1 chunk(s)",
                      self.tag, len(data))
        self.server.write(b"BDAT %d LAST\r\n" % len(data) + data, False)
        self._await_final()

    async def _stream_bdat(self) -> None:
        """A message on disk by BDAT, under flow control: in chunks of
        BDAT_CHUNK to a server that takes pipelined commands (each chunk's
        reply in its place in the queue), else in one chunk."""
        path = self.source or self.message.path
        header = self._header()
        total = spool.with_header_size(open(path, "rb"), os.path.getsize(path), header)
        chunk = spool.BDAT_CHUNK if "PIPELINING" in self.server.offers else max(total, 1)
        chunks = spool.bdat_chunks(total, chunk)
        if self.debug:
            log.debug("%s: the message to the server by BDAT: %d bytes in %d chunk(s)",
                      self.tag, total, chunks)
        for _ in range(chunks - 1):
            self.replies.expect_own(self._on_chunk)
        await spool.send_bdat(self.server.channel, open(path, "rb"), header, total, chunk,
                              self.timeout)

    def _on_chunk(self, reply: list[bytes]) -> None:
        """A BDAT chunk's reply before the last: the first refusal is the
        verdict's reason (RFC 3030 2: the transaction has failed)."""
        if reply[-1][:1] != b"2" and self.chunk_refusal is None:
            self.chunk_refusal = reply

    def _command(self, line: bytes, on_reply: OnReply) -> None:
        self.server.write(line)
        self.replies.expect_own(on_reply)

    def refuse(self, reply: str, status: Status) -> None:
        """The message is not offered: the client hears `reply` (the log line
        its last line), the server gets RSET to forget the transaction."""
        self._refused(reply)
        self._command(b"RSET\r\n", lambda lines: self._end(status))

    def _refused(self, reply: str) -> None:
        self.envelope.reply = (reply.splitlines() or [""])[-1]
        self._verdict(reply.encode("utf-8", "surrogateescape") + CRLF)

    def _on_refused_data(self, reply: list[bytes]) -> None:
        """DATA without accepted recipients: the server says why (503...)."""
        if reply[-1][:3] == b"354":
            raise SessionEnd("server accepted DATA without recipients")
        self.client.write(b"".join(reply))
        self._end(None)

    def _on_354(self, reply: list[bytes]) -> None:
        if reply[-1][:3] != b"354":
            log.debug("%s: server refused data transfer", self.tag)
            self._final(reply)
            self._end(self.status)
            return
        message = self.message
        if message is None:             # Skip: the client uploads to the server itself
            self.client.write(b"".join(reply))
        if message is None or self.source is not None or message.memory is None:
            self.task = self.stream()   # sent by the task
            return
        chunked = self.envelope.chunked     # by DATA to a server without CHUNKING
        if not self.config.Header and not chunked:
            self.server.write(message.as_sent(), False)
        else:
            self.server.write(b"".join(spool.data_pieces(message.reader(), self._header(),
                                                         chunked)), False)
        self._await_final()

    async def stream(self) -> None:
        """The task sends the message under flow control: from disk (a spool
        that outgrew memory, the filter's new version), or Skip's upload."""
        if self.message is None:
            await self.intake.relay(self.timeout)
        elif self.by_bdat:
            await self._stream_bdat()
        else:
            source = open(self.source, "rb") if self.source else self.message.reader()
            await spool.send(self.server.channel, source, self._header(), self.timeout,
                             self.envelope.chunked)
        self._await_final()

    def _await_final(self) -> None:
        """The final reply is waited for as long as RFC 5321 4.5.3.2.6 says
        (Session.idle_wait: FINAL_REPLY_WAIT, not TimeOut), and a shutdown
        does not cut it (Session.finishing)."""
        self.awaiting_final = True
        self.replies.expect_own(self._on_final)

    def _on_final(self, reply: list[bytes]) -> None:
        self.awaiting_final = False
        if reply[-1][:1] != b"2" and self.chunk_refusal is not None:
            reply = self.chunk_refusal      # why the last chunk was refused too
        self._final(reply)
        self._end(self.status)

    def _end(self, status: Status | None) -> None:
        done = self.done
        if self.milters is not None:        # the milters' transaction is over too
            self.milters.end_transaction()
        self.close()
        done(status)

    def close(self) -> None:
        """The transfer is over, finished (_end) or cut short with its session:
        its spool goes (and the filter's file with it), and so do its links
        back to the session (`done`, and the reply queue that holds this
        transfer's callbacks), which holds it: a session must not be left in
        a cycle for the collector."""
        if self.message is not None:
            self.message.remove()
        if self.task is not None:       # the session's task never got to it
            self.task.close()
            self.task = None
        self.done = self.replies = None

    # --- what the client hears ------------------------------------------------------

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

    def _header(self) -> bytes | None:
        """The Header setting's line for this message, if any."""
        if not self.config.Header:
            return None
        return render_header(self.config.Header, self.envelope.client_ip,
                             self.envelope.local_ip, self.tag, self.envelope.client_tls)

