"""One SMTP session relayed between a client and the real server.

This is upstream's smtp_passthru: lines from whichever side is ready are
relayed, with the exceptions docs/BEHAVIOUR.md lists (Commands).  Plain commands and replies are
relayed straight from the channels' callbacks (relay_lines), and so is a
message no filter has to see (data.py's Transfer.start); the session's task
only runs what waits on something else.  The rooms around it:
relay.py keeps each reply in its command's place, envelope.py holds what
the server accepted (and the log line), data.py takes DATA over,
starttls.py does STARTTLS on either leg (RFC 3207), with tls.py's contexts.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import re
import socket

from .. import filters
from ..message import datapath
from ..message.envelope import Envelope
from ..message.transfer import Transfer
from ..net import addresses, destination, proxyproto, tls
from ..net.channel import CRLF, Channel, ChannelClosed
from ..net.waits import wait_any
from ..process import stats
from ..process.config import Config
from ..process.log import clean, log
from ..smtp.ends import (CLIENT_GONE, IDLE, READ_TIMEOUT, SERVER_GONE, SERVER_TIMEOUT, SessionEnd,
                         client_wait, unfinished_line)
from ..smtp.peer import ServerLeg
from ..smtp.replies import (FINAL_REPLY_WAIT, R_AUTHTLS, R_BARECR, R_CANTCONNECT, R_FAILED,
                            R_FEATURE, R_NOTAUTH, R_NOTSUPP, R_SERVERGONE, R_SHUTDOWN, R_SIZE,
                            R_STARTTLS, R_SYNC, R_TOOLONG, Status)
from ..smtp.syntax import envelope_address, parse_xforward, verb_of
from .replyqueue import GREETING, ReplyQueue, ServerAnswers
from .starttls import BEFORE_TLS, StartTLS, refusal_before_tls

# Fairness and back-pressure (one client must neither starve its worker nor
# make it buffer without bound): lines handled before yielding to other
# sessions, and replies still due before the client's next commands wait.
LINES_PER_TURN = 64
MAX_PENDING_REPLIES = 512

_SIZE_PARAM = re.compile(rb"\sSIZE=(\d{1,20})(?=\s|$)", re.I)


# After a PROXY LOCAL header (a balancer's health check): how long to wait
# for the checker to close before the server is connected.  A TCP check
# closes right behind its header; one that waits for the greeting (haproxy
# `option smtpchk`) gets it this much later.
LOCAL_WAIT = 1.0


class Next(enum.Enum):
    """What the session's task does after relay_lines()."""

    WAIT = "wait"          # for news from either side (lines come in meanwhile)
    COMMAND = "command"    # run a command that waits on something, or send a message from disk
    YIELD = "yield"        # a turn's worth of lines done: let other sessions run
    DONE = "done"          # either side closed: the session is over


# Read once per line: module names, not Next.X (an enum class's attributes
# go through EnumType.__getattr__).
WAIT, COMMAND, YIELD, DONE = Next.WAIT, Next.COMMAND, Next.YIELD, Next.DONE

# The only verbs whose line can be a MAIL FROM:/RCPT TO: (see commands.py).
_ENVELOPE = (b"MAIL", b"RCPT")

# PIPELINING passes (RFC 2920): the reply queue keeps every reply in order.
FILTERED_FEATURES = {b"STARTTLS", b"CHUNKING", b"BINARYMIME",
                     b"CHECKPOINT", b"XCLIENT", b"XEXCH50"}

_ids = itertools.count(0x100000)


def next_id() -> str:
    """A short id for log lines (six hex digits, more once past FFFFFF);
    `set_id_source()` makes it unique across workers."""
    return "%06X" % next(_ids)


def set_id_source(counter) -> None:
    """Use another counter (an iterator of ints) for session ids."""
    global _ids
    _ids = counter


class Session:
    """State of one client connection; `run()` serves it to the end."""

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
        self.proxy_header: proxyproto.ProxyHeader | None = None
        self.client = Channel("CLIENT", self.tag, keep_open_on_eof=True, loop=loop,
                              trace=self.debug)
        self.server = Channel("SERVER", self.tag, loop=loop, trace=self.debug)
        self.server_leg = ServerLeg(self.server, float(config.TimeOut), config.KeepAlives)
        self.server_tls_tried = config.ServerTLS == "off"   # STARTTLS to the server done with
        # Some commands wait for TLS (refusal_before_tls): with these settings only.
        self.tls_gate = config.ClientTLS == "encrypt" or config.ServerTLS in ("encrypt", "verify")
        self.replies = ReplyQueue(self.client)
        self.authenticated = False
        self.auth_started = False
        self.xclient_supported = False
        self.xclient_sent = False
        self.hello_line = b""                 # the client's last EHLO/HELO, as it sent it
        self.in_data = False
        self.server_size = 0                  # the server's EHLO SIZE (0: none given)
        self.transfer: Transfer | None = None
        self.deferred: tuple[bytes, bool] | None = None   # a command left to the task
        self.ended = False                    # relay_lines saw either side close
        self.messages = 0                     # DATA commands done: a retiring worker watches it

    @property
    def size_limit(self) -> int:
        """The largest message taken: the smaller of MaxMessageSize and the
        server's SIZE (0: no limit)."""
        mine, server = self.config.MaxMessageSize, self.server_size
        if mine > 0 and server > 0:
            return min(mine, server)
        return mine if mine > 0 else max(server, 0)

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

    def log_message(self, status: str) -> None:
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
            await self.connect()
            await self.passthru()
        except SessionEnd as end:
            log.log(end.level, "%s: %s", self.tag, end)
            if end.server_error:
                stats.server_error(end.server_error)
            self._last_word(end.reply)
        except ChannelClosed as exc:
            log.warning("%s: %s", self.tag, exc)
            if exc.channel == self.server.name:
                stats.server_error("timeout" if exc.timed_out else "closed")
            self._last_word(R_FAILED)
        except asyncio.CancelledError:
            self._last_word(R_SHUTDOWN)
            raise
        except Exception as exc:   # a bug must cost one session, not the worker
            log.error("%s: local error: %s", self.tag, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            self._last_word(R_FAILED)
        finally:
            if self.transfer is not None:
                self.transfer.close()
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

    def _last_word(self, reply: bytes | None) -> None:
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

    async def passthru(self) -> None:
        """Relay until either side closes or both are idle for TimeOut.

        relay_lines() relays the plain commands and replies, here and, while
        this task sleeps, straight from the channels' callbacks (on_news): a
        line costs no task wake-up.  The task itself only does what waits on
        something: DATA, STARTTLS, XCLIENT, the first EHLO with ServerTLS."""
        client = self.client
        while True:
            step = self.relay_lines()
            if step is WAIT:
                try:
                    await wait_any((client, self.server), self.idle_wait(), self.on_news)
                except asyncio.TimeoutError:
                    if self.receiving:
                        raise SessionEnd(READ_TIMEOUT, None) from None
                    if self.replies.proxy_command_due:
                        raise SessionEnd(SERVER_TIMEOUT, server_error="timeout") from None
                    # A begun line bounded this wait (the loop's timer may fire a
                    # hair early, so its deadline is not re-checked): say so.
                    if client.line_started is not None:
                        raise unfinished_line(IDLE, self.timeout) from None
                    raise SessionEnd(IDLE, None, server_error="timeout"
                                     if self.replies.waiting_for_server else None) from None
            elif step is COMMAND:
                if self.deferred is None:       # a relayed message to send from disk
                    await self.transfer.stream()    # type: ignore[union-attr]
                    continue
                line, self.deferred = self.deferred, None
                await self.on_client_line(*line)
            elif step is YIELD:           # let the worker's other sessions run
                await asyncio.sleep(0)
            else:
                return

    def relay_lines(self) -> Next:
        """Relay every complete line ready on either side (up to
        LINES_PER_TURN), server replies first; what the session does next."""
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
                    if transfer.streaming:
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
                    self.ended = True
                    self.server_closed()
                    return DONE
                got = (client.take_line() if client.buf and transfer is None and not self.backed_up
                       else None)
                if got is not None:
                    if client.buf and not corked:   # a pipelined group: its commands in one write
                        client.cork()
                        server.cork()
                        corked = True
                    if not self.command(got[0], got[1]):
                        self.deferred = got
                        return COMMAND
                    continue
                if client.eof and not self.replies.waiting_for_server:
                    if self.debug:
                        log.debug("%s: client closed the connection", self.tag)
                    self.ended = True
                    return DONE
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

    def server_closed(self) -> None:
        """The server closed the connection: its last words go to the client;
        SessionEnd if the client is still owed a reply."""
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

    @property
    def backed_up(self) -> bool:
        """Take no more client commands for now: the server is not reading what
        we send, the client is not reading its replies, or too many replies are
        still due.  Its lines then stay in its buffer, the buffer's high-water
        mark pauses reading, and TCP slows the client down."""
        return (self.server.backed_up or self.client.backed_up
                or len(self.replies.places) >= MAX_PENDING_REPLIES)

    # --- client commands ------------------------------------------------------

    @property
    def xclient_due(self) -> bool:
        """XClient: the server takes XCLIENT and has not had it yet."""
        return self.xclient_supported and not self.xclient_sent and self.config.XClient

    def hello_due(self, verb: bytes) -> bool:
        """This EHLO/HELO is the one to try STARTTLS to the server at (hello())."""
        return not self.server_tls_tried and (verb == b"EHLO" or self.config.ServerTLS != "may")

    def command(self, line: bytes, too_long: bool) -> bool:
        """Handle a client command that needs no waiting (relay it, or answer
        it from the proxy); False, with nothing done, for one that must wait
        on something: on_client_line() does it in the session's task."""
        answer = self.replies.answer
        if too_long:
            answer(R_TOOLONG)
            return True
        cr = line.find(b"\r")
        if cr >= 0 and cr != len(line) - 2:       # a bare CR: a server may split the line there
            log.warning("%s: bare CR in a command from the client: %s", self.tag, clean(line[:80]))
            answer(R_BARECR)
            return True
        verb = verb_of(line)
        if self.tls_gate and verb not in BEFORE_TLS:
            refusal = refusal_before_tls(self)
            if refusal:
                answer(refusal)
                return True
        if verb == b"DATA" and self.relayed_data:
            self.start_data()
            return True
        if verb == b"STARTTLS" or verb == b"DATA" or self.xclient_due:
            return False
        if verb in (b"EHLO", b"HELO"):
            if self.hello_due(verb):
                return False
            self.note_hello(verb, line)
        elif verb == b"BDAT":
            log.debug("%s: ESMTP feature not supported", self.tag)
            answer(R_NOTSUPP)
            return True
        elif verb == b"XCLIENT":
            log.warning("%s: client attempted use of privileged XCLIENT feature", self.tag)
            answer(R_NOTAUTH)
            return True
        elif verb == b"AUTH":
            if self.auth_needs_client_tls:
                log.info("%s: refused AUTH from a client in plaintext: the server leg is "
                         "encrypted", self.tag)
                answer(R_AUTHTLS)
                return True
            self.auth_started = True
        elif verb in _ENVELOPE and (address := envelope_address(line)) is not None:
            verb = address[0]
            if self.config.FilterType == "reject" and not self.skipping:
                self.reject_envelope(*address)
                return True
            if verb == b"MAIL" and self.too_big(line):
                answer(R_SIZE)
                return True
            self.server.write(line)
            self.replies.expect(ServerAnswers(verb, line, address[1]))
            return True
        self.server.write(line)
        self.replies.expect(ServerAnswers(verb, line))
        return True

    async def on_client_line(self, line: bytes, too_long: bool) -> None:
        """A client command command() left to the task: XCLIENT goes to the
        server first if due, then the command itself."""
        verb = verb_of(line)
        if verb == b"STARTTLS":
            await StartTLS(self).client(line)
            return
        if self.xclient_due:
            await self.send_xclient(verb in (b"EHLO", b"HELO"))
        if verb == b"DATA":
            await self.data()
        elif verb in (b"EHLO", b"HELO") and self.hello_due(verb):
            self.note_hello(verb, line)
            await StartTLS(self).hello(verb, line)
        else:
            self.command(line, too_long)

    @property
    def auth_needs_client_tls(self) -> bool:
        """The server leg is encrypted and the client leg is not.  A server
        may offer AUTH only over TLS (Postfix's smtpd_tls_auth_only), and
        would then take credentials that crossed the client leg in cleartext:
        AUTH is neither offered to nor taken from such a client (RFC 4954 4:
        538 when the mechanism needs encryption)."""
        return not self.envelope.client_tls and bool(self.envelope.server_tls)

    def note_hello(self, verb: bytes, line: bytes) -> None:
        """EHLO/HELO: the client's name (and its command, said again to the
        server after XCLIENT); a HELO client gets XCLIENT anyway."""
        self.hello_line = line
        words = line.split()
        self.envelope.helo = words[1].decode("utf-8", "surrogateescape") if len(words) > 1 else ""
        if verb == b"HELO":
            log.debug("%s: XCLIENT support assumed", self.tag)
            self.xclient_supported = True

    def too_big(self, mail: bytes) -> bool:
        """MAIL FROM with a SIZE= above the limit: refused before any data."""
        match = _SIZE_PARAM.search(mail)
        limit = self.size_limit
        return bool(match and limit and int(match.group(1)) > limit)

    # --- FilterType reject -------------------------------------------------------

    def reject_envelope(self, verb: bytes, address: str) -> None:
        """FilterType reject: refuse MAIL and RCPT outright, log it as the message."""
        if verb == b"MAIL":
            self.envelope.sender = address
        else:
            self.envelope.recipients = [address]
            self.envelope.sender = None
        self.log_message("REJECTED")
        self.envelope.reset()
        reply = filters.reject_reply(self.config.FilterReject)
        self.replies.answer(reply.encode("utf-8", "surrogateescape") + CRLF)

    async def data(self) -> None:
        """DATA the relay's callbacks do not take (see relayed_data): once
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
    def relayed_data(self) -> bool:
        """This DATA is taken in the relay's callbacks (Transfer.start):
        datapath says it is relayed unfiltered, and it needs nothing the
        task waits on."""
        config = self.config
        return datapath.callbacks_may_take(
            datapath.choose(config, self.envelope,
                            self.authenticated and config.skip_authenticated),
            config, bool(self.replies), self.xclient_due)

    def start_data(self) -> None:
        """DATA in the relay's callbacks (relayed_data said so)."""
        self.new_transfer(datapath.RELAYED).start()

    def data_done(self, status: Status | None) -> None:
        """The Transfer is over: its message is logged (unless none was
        taken) and the session takes commands again."""
        if status is not None:
            self.log_message(status)
        self.in_data = False
        self.transfer = None
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
            self.data_done, path, self.size_limit, self.info, self.debug)
        return transfer

    async def send_xclient(self, hello_follows: bool) -> None:
        """XClient: tell the server who the client really is, once.

        A server that takes XCLIENT answers with a new greeting and starts
        the session over (Postfix's XCLIENT_README): the client's EHLO/HELO
        is said again, and its reply read here, before anything else.
        Without it Postfix refuses MAIL (smtpd_helo_required), or takes what
        follows as improper pipelining (smtpd_forbid_unauth_pipelining), and
        its Received line has no HELO name.  `hello_follows`: the command at
        hand is the client's own EHLO/HELO, which does it; the client then
        hears that reply, and one reply per command as ever."""
        await self.drain_replies()
        self.xclient_sent = True
        ip = self.envelope.client_ip
        log.debug("%s: sending XCLIENT", self.tag)
        reply = await self.server_leg.command(
            b"XCLIENT ADDR=%s%s\r\n" % (b"IPv6:" if ":" in ip else b"", ip.encode()))
        if not reply[-1][:1] == b"2":
            log.warning("%s: server didn't accept XCLIENT: %s", self.tag, clean(reply[-1].strip()))
            return
        if hello_follows:
            return
        if not self.envelope.helo:      # the client gave no name: the server judges that
            log.debug("%s: no HELO name to give the server after XCLIENT", self.tag)
            return
        reply = await self.server_leg.command(self.hello_line)
        if reply[-1][:1] != b"2":       # its answer to the client's next command says the rest
            log.warning("%s: server refused %s after XCLIENT: %s", self.tag,
                        clean(self.hello_line.split()[0]), clean(reply[-1].strip()))

    async def drain_replies(self) -> None:
        """Relay every reply still due, so the proxy may speak to the server."""
        while self.replies.waiting_for_server:
            for line in await self.server_leg.read_reply():
                self.replies.server_line(line, False, self.tag, self.on_reply)

    # --- server replies -------------------------------------------------------

    def on_reply(self, place: ServerAnswers, lines: list[bytes]) -> list[bytes]:
        """State changes for a whole server reply; what the client gets of it."""
        if lines[-1][:1] != b"2":
            return lines
        verb, command, envelope = place.verb, place.line, self.envelope
        if verb in (b"EHLO", b"HELO"):
            envelope.reset()
            if verb == b"EHLO":
                return self.filter_features(lines)
        elif verb == b"MAIL" and place.address is not None:
            envelope.sender = place.address
        elif verb == b"RCPT" and place.address is not None:
            envelope.recipients.append(place.address)
        elif verb == b"XFORWARD":
            attrs = parse_xforward(command)
            envelope.xforward_addr = attrs.get("ADDR", envelope.xforward_addr)
            envelope.xforward_helo = attrs.get("HELO", envelope.xforward_helo)
        elif verb == b"RSET":
            envelope.reset()
        elif lines[-1][:3] == b"235":
            if self.auth_started:
                log.debug("%s: client authenticated successfully", self.tag)
                self.authenticated = True
            else:
                log.warning("%s: authentication success code without AUTH", self.tag)
        return lines

    def filter_features(self, lines: list[bytes]) -> list[bytes]:
        """Drop EHLO keywords we can't pass through; keep the reply well formed.

        SIZE is noted (the server's limit is enforced here too) and, with
        MaxMessageSize, says the smaller limit, added if the server gave none.
        STARTTLS is the proxy's own offer (ClientTLS), never the server's.
        AUTH (and the old `AUTH=` form) is dropped while only the server leg
        is encrypted (see auth_needs_client_tls)."""
        kept = lines[:1]
        self.server_size = 0
        size_at = None
        no_auth = self.auth_needs_client_tls if self.envelope.server_tls else False
        for line in lines[1:]:
            words = line[4:].split()
            keyword = words[0].upper() if words else b""
            if keyword == b"XCLIENT":
                log.debug("%s: XCLIENT supported", self.tag)
                self.xclient_supported = True
            if keyword in FILTERED_FEATURES or (
                    no_auth and (keyword == b"AUTH" or keyword.startswith(b"AUTH="))):
                log.debug("%s: filtered ESMTP feature: %s", self.tag, clean(line.strip()))
                if line is lines[-1]:
                    kept.append(R_FEATURE)
                continue
            if keyword == b"SIZE":
                size_at = len(kept)
                if len(words) > 1 and words[1].isdigit() and len(words[1]) <= 20:
                    self.server_size = int(words[1])
            kept.append(line)
        if self.config.MaxMessageSize:
            size = b"250-SIZE %d\r\n" % self.size_limit
            if size_at is not None:
                kept[size_at] = kept[size_at][:4] + size[4:]
            elif len(kept) > 1:
                kept.insert(len(kept) - 1, size)
            else:
                kept = [b"250-" + kept[0][4:], b"250 " + size[4:]]
        if self.config.ClientTLS != "off" and not self.envelope.client_tls:
            first = kept[0]
            if len(kept) == 1:          # `250 name` becomes `250-name`, STARTTLS goes last
                kept = [first[:3] + b"-" + first[4 if first[3:4] == b" " else 3:],
                        b"250 STARTTLS\r\n"]
            else:
                kept.insert(1, R_STARTTLS)
        return kept
