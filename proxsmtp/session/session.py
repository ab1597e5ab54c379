"""A Session: the state of one client connection, and its life cycle.

`Session.run` serves a connection from accept(2) to the close: the PROXY
header and TLSWrapper (open_client), the server connection (connect), the
relay (pump.py: lines from either side, as they come; commands.py: what the
proxy does with each command), and the end (smtp/ends.py: logged once,
with a last word where one is owed).  The rooms around it: replyqueue.py
keeps each reply in its command's place, message/transfer.py takes DATA
over, starttls.py does STARTTLS on either leg (RFC 3207).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
from typing import Coroutine

from ..message import datapath
from ..message.chunks import Chunks
from ..message.envelope import Envelope
from ..message.transfer import Transfer
from ..net import addresses, destination, proxyproto, tls
from ..net.channel import Channel, ChannelClosed
from ..process import stats
from ..process.config import Config
from ..process.log import clean, log
from ..smtp.ends import SessionEnd, channel_closed
from ..smtp.peer import ServerLeg
from ..smtp.replies import R_CANTCONNECT, R_FAILED, R_SHUTDOWN, R_SYNC, Status
from . import commands
from .milters import MilterStages
from .pump import Pump
from .replyqueue import GREETING, ReplyQueue

# After a PROXY LOCAL header (a balancer's health check): how long to wait
# for the checker to close before the server is connected.  A TCP check
# closes right behind its header; one that waits for the greeting (haproxy
# `option smtpchk`) gets it this much later.
LOCAL_WAIT = 1.0

_ids = itertools.count(0x100000)


def next_id() -> str:
    """A short id for log lines (six hex digits, more once past FFFFFF);
    `set_id_source()` makes it unique across workers."""
    return "%06X" % next(_ids)


def set_id_source(counter) -> None:
    """Use another counter (an iterator of ints) for session ids."""
    global _ids
    _ids = counter


class Session(Pump):
    """State of one client connection; `run()` serves it to the end."""

    # The reply queue hands it each whole server reply the client is owed.
    on_reply = commands.on_reply

    def __init__(self, config: Config, sock: socket.socket,
                 loop: asyncio.AbstractEventLoop | None = None, peer: object = None) -> None:
        self.config = config
        self.sock = sock
        # The client's sockaddr as accept(2) gave it.  Never asked again
        # later: a peer that has reset the connection by then has no address
        # for getpeername(2), and ProxyProtocolFrom must not take it for a
        # unix socket's.  None: not known (a session made outside a worker).
        self.peer = peer
        # The worker's loop (None: the running one when run() starts), kept
        # because CPython 3.11 asks the OS for the pid when the running loop is
        # looked up, and the session needs its loop at several steps.
        self.loop = loop
        self.timeout = float(config.TimeOut)
        self.tag = next_id()
        # The log asked once per session: a log call below its level still
        # makes its call, and the lines below are made for every session.
        self.debug = log.isEnabledFor(logging.DEBUG)
        self.info = log.isEnabledFor(logging.INFO)
        self.envelope = Envelope(self.tag)
        self.milters = MilterStages(config, self.envelope, self.tag) if config.Milters else None
        self.proxy_header: proxyproto.ProxyHeader | None = None
        self.client = Channel("CLIENT", self.tag, keep_open_on_eof=True, loop=loop,
                              trace=self.debug)
        self.server = Channel("SERVER", self.tag, loop=loop, trace=self.debug)
        self.server_leg = ServerLeg(self.server, float(config.TimeOut), config.KeepAlives)
        self.server_tls_tried = config.ServerTLS == "off"   # STARTTLS to the server done with
        # Some commands wait for TLS (commands.tls_first), with these settings only.
        self.tls_gate = config.ClientTLS == "encrypt" or config.ServerTLS in ("encrypt", "verify")
        self.replies = ReplyQueue(self.client)
        self.authenticated = self.auth_started = False
        self.xclient_due = False              # XClient: XCLIENT before the next command
        self.xclient_sent = False
        self.hello_line = b""                 # the client's last EHLO/HELO, as it sent it
        self.in_data = False
        # The largest message taken (0: no limit): MaxMessageSize, or the
        # server's SIZE if smaller (ehlo.size_limit, at each EHLO reply).
        self.size_limit: int = config.MaxMessageSize
        self.transfer: Transfer | None = None
        self.chunking = False   # the client's last EHLO reply offered CHUNKING (RFC 3030)
        self.chunks: Chunks | None = None
        self.deferred: Coroutine[None, None, None] | None = None   # a command left to the task
        self.ended = False                    # relay_lines saw either side close
        self.messages = 0                     # DATA commands done: a retiring worker watches it

    @property
    def finishing(self) -> bool:
        """The server has the whole message and its verdict is due: a shutdown
        must not cut this (the client would retry a message the server took)."""
        return self.transfer is not None and self.transfer.awaiting_final

    @property
    def idle(self) -> bool:
        """Between messages with nothing outstanding: safe to close at shutdown."""
        return not self.in_data and not self.envelope.in_transaction and not self.replies

    @property
    def skipping(self) -> bool:
        if self.authenticated and self.config.skip_authenticated:
            log.debug("%s: skipping processing because client is authenticated", self.tag)
            return True
        return False

    def log_message(self, status: Status) -> None:
        """The one info line per message: client, from, to..., outcome, status;
        counted for /metrics with the same status word."""
        if self.info:       # built only when someone reads it
            log.info("%s: %s", self.tag, self.envelope.log_line(status))
        stats.message(status, self.envelope.size, self.envelope.filter_seconds)

    # --- life cycle -----------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection; never raises (but for cancellation)."""
        self.loop = self.loop or asyncio.get_running_loop()
        envelope = self.envelope
        if not await self.open_client():
            self.client.close()
            self.sock.close()
            return
        try:
            if self.info:
                log.info("%s: accepted connection from: %s", self.tag, envelope.client_ip)
            if self.milters is not None:    # the real client, before the server hears of it
                await self.milters.connect(self)
            await self.connect()
            await self.passthru()
        except SessionEnd as end:
            self._ended(end)
        except ChannelClosed as exc:    # a write found a peer gone: as a read finds it
            self._ended(channel_closed(exc, self.server.name))
        except asyncio.CancelledError:
            self._last_word(R_SHUTDOWN)
            raise
        except Exception as exc:   # a bug must cost one session, not the worker
            log.error("%s: local error: %s", self.tag, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            self._last_word(R_FAILED)
        finally:
            if self.deferred is not None:   # the task never got to it
                self.deferred.close()
                self.deferred = None
            if self.transfer is not None:
                self.transfer.close()
            commands.drop_chunks(self)      # a BDAT transaction cut short: its spool goes
            if self.milters is not None:
                self.milters.close()
            self.client.close()
            self.server.close()
            if self.debug:
                log.debug("%s: connection closed", self.tag)

    @property
    def handshake_timeout(self) -> float:
        """The deadline of a PROXY header and of a client's TLS handshake:
        HandshakeTimeOut, but never longer than TimeOut."""
        return float(min(self.config.TimeOut, self.config.HandshakeTimeOut))

    async def open_client(self) -> bool:
        """The client's side, set up: its address (accept(2)'s), the PROXY
        header with ProxyProtocol (in plaintext, before any TLS: a balancer
        sends it ahead of the client's bytes), the transport and with
        TLSWrapper its handshake.  False, logged and counted, when the
        session ends here."""
        config, envelope, loop = self.config, self.envelope, self.loop
        if self.peer is not None and (config.ProxyProtocol or config.TLSWrapper):
            # for ProxyProtocolFrom and the log lines of these steps; the
            # others set it at the end, with the local address
            envelope.client_ip = addresses.peer_ip(self.peer)
        try:
            if config.ProxyProtocol:
                await self.read_proxy_header()
            if config.TLSWrapper:
                await self.client.accept_tls(self.sock, config.listening_tls,
                                             self.handshake_timeout)
                envelope.client_tls = tls.describe(self.client.transport)
                stats.client_tls("established")
            else:
                await loop.connect_accepted_socket(lambda: self.client, self.sock)
        except proxyproto.ProxyHeaderError as exc:
            log.log(exc.level, "%s: %s: %s", self.tag, envelope.client_ip, exc)
            stats.proxy_header(exc.kind)
            stats.connection("refused")
            proxyproto.discard_unread(self.sock)
            return False
        except (OSError, asyncio.TimeoutError) as exc:
            if config.TLSWrapper:
                stats.client_tls("failed")
                log.warning("%s: TLS handshake with client %s failed: %s", self.tag,
                            envelope.client_ip, tls.reason(exc))
            else:
                log.error("%s: couldn't set up the client connection: %s", self.tag, exc)
            stats.connection("refused")
            return False
        except asyncio.CancelledError:      # shutting down: the socket is not left to the GC
            self.client.close()
            self.sock.close()
            raise
        header = self.proxy_header
        if header is None or header.source is None:
            envelope.client_ip, envelope.local_ip = self.client_addresses()
        return True

    def client_addresses(self) -> tuple[str, str]:
        """(client IP, local IP): the client's from accept(2), the local one
        from the client's transport, which learnt it when it was made."""
        transport = self.client.transport
        peer = self.peer
        if transport is not None:
            local = transport.get_extra_info("sockname")
            if peer is None:
                peer = transport.get_extra_info("peername")
        else:       # already gone
            try:
                local = self.sock.getsockname()
            except OSError:
                local = None
        return destination.client_addresses(peer, local, self.sock, self.config)

    async def read_proxy_header(self) -> None:
        """ProxyProtocol: the client and local addresses are the ones the load
        balancer's header names (unless it names none: a health check).
        ProxyProtocolFrom is checked against the address accept(2) gave; a
        TCP peer without one is refused (only a unix socket's peer has none)."""
        envelope = self.envelope
        peer = None if self.sock.family == socket.AF_UNIX else envelope.client_ip
        header = self.proxy_header = await proxyproto.read(
            self.sock, peer, self.config.ProxyProtocolFrom, self.handshake_timeout, self.loop)
        log.debug("%s: %s sent %s", self.tag, envelope.client_ip, proxyproto.describe(header))
        if header.local and await proxyproto.left_at_once(
                self.sock, min(LOCAL_WAIT, self.handshake_timeout), self.loop):
            raise proxyproto.ProxyHeaderError(
                "closed the connection after a PROXY LOCAL header (a health check); no server "
                "connection opened", logging.INFO, kind="local")
        stats.proxy_header("local" if header.source is None else "proxied")
        if header.source is not None:
            envelope.client_ip, envelope.local_ip = header.source[0], header.dest[0]

    def _ended(self, end: SessionEnd) -> None:
        """How the session ended: logged once, at its level; counted if the
        server failed us; the last word the client is owed."""
        log.log(end.level, "%s: %s", self.tag, end)
        if end.server_error:
            stats.server_error(end.server_error)
        self._last_word(end.reply)

    def _last_word(self, reply: bytes | None) -> None:
        """Best effort: a client gone by now hears nothing (as in the reply queue)."""
        if reply and not self.client.closed:
            try:
                self.client.write(reply)
            except ChannelClosed:
                pass

    async def connect(self) -> None:
        """Open the server connection (proxsmtpd.conf(5) OutAddress), or tell the client 421;
        the server's greeting goes to the client."""
        try:
            await self.open_server()
        except destination.Refused as exc:
            stats.connection("refused")
            raise SessionEnd(str(exc), R_CANTCONNECT) from None
        except destination.DestinationError as exc:
            stats.connection("accepted")
            raise SessionEnd(str(exc), R_CANTCONNECT, server_error="connect") from None
        stats.connection("accepted")
        self.replies.expect(GREETING)

    async def open_server(self) -> None:
        """A new server connection (the first, or the plaintext retry after a
        failed TLS handshake with ServerTLS may); DestinationError if none."""
        channel = self.server
        if channel.transport is not None or channel.eof:    # not the first: a fresh channel
            channel = Channel("SERVER", self.tag, loop=self.loop, trace=self.debug)
        self.envelope.server_ip = await destination.open_channel(
            self.config, self.envelope, self.sock, self.proxy_header, channel, self.loop, self.peer)
        if channel is not self.server:
            self.server.close()
            self.server = self.server_leg.channel = channel
        if self.debug:
            log.debug("%s: SERVER connected to: %s", self.tag, self.envelope.server_ip)

    # --- DATA ------------------------------------------------------------------

    async def data(self) -> None:
        """DATA the relay's callbacks do not take (see callbacks_data): once
        every earlier reply is relayed, the Transfer's task steps run here;
        its offer's replies then come through the reply queue, and
        data_done() ends it.

        DATA ends a pipelined group (RFC 2920): a client that sent more before
        hearing the answer to DATA is out of step.  Those bytes are neither
        commands (if DATA is refused) nor safely the message (a smuggling
        trick, or lost first lines): the session ends with 554 5.5.0, as
        Postfix's smtpd does, and nothing is delivered."""
        self.in_data = True
        if self.replies.waiting_for_server:
            await self.drain_replies()
        await self.new_transfer(datapath.choose(self.config, self.envelope, self.skipping)).run()

    @property
    def callbacks_data(self) -> datapath.Path | None:
        """This DATA's way (datapath's) when the relay's callbacks take its
        message in (Transfer.start); else None: the task does (data())."""
        config = self.config
        path = datapath.choose(config, self.envelope,
                               self.authenticated and config.skip_authenticated)
        if datapath.callbacks_may_take(path, config, bool(self.replies), self.xclient_due):
            return path
        return None

    def start_data(self, path: datapath.Path) -> None:
        """DATA in the relay's callbacks (callbacks_data said so)."""
        self.new_transfer(path).start()

    def data_done(self, status: Status | None) -> None:
        """The Transfer is over: its message logged (unless none was taken); commands again."""
        if status is not None:
            self.log_message(status)
        self.in_data = False
        self.transfer = self.chunks = None
        self.messages += 1
        self.envelope.reset()

    def new_transfer(self, path: datapath.Path) -> Transfer:
        """The Transfer of this DATA; nothing may follow DATA before its
        answer (see data())."""
        if self.client.buf:
            raise SessionEnd("improper pipelining after DATA from the client: %s"
                             % clean(bytes(self.client.buf[:60])), R_SYNC, logging.WARNING)
        self.in_data = True
        transfer = self.transfer = Transfer(
            self.config, self.envelope, self.client, self.server_leg, self.replies,
            self.data_done, path, self.size_limit, self.info, self.debug, self.milters)
        return transfer
