"""Socket I/O for one side of a session (upstream's spio.c).

A Channel is an asyncio Protocol that keeps what arrived in a buffer and
hands it out as lines (with upstream's line-length limit) or, during DATA,
as chunks up to the terminating `.` line.  The session polls both of its
channels and sleeps on one shared wake-up future (upstream's spio_select),
so no task is created per line.  A wait is kept cheap: one future, and one
timer per channel moved lazily instead of a timer per wait.  A wait may also
name a callback that handles the channels' news itself (`wait_any(news=)`):
the session relays plain lines from there and wakes its task only for what
the task must do, extending the wait (`extend_wait`) otherwise.  A pipelined
group's lines are written in one piece (`cork`/`uncork`); every wait and
close uncorks first.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
from time import monotonic
from typing import Awaitable, Callable

from ..process.log import clean, log

try:    # the worker's loop (see worker.py); without it TLS is the stdlib's as is
    from uvloop import Loop as _UVLoop
    from uvloop.loop import SSLProtocol as _UVSSLProtocol
except ImportError:
    _UVLoop = _UVSSLProtocol = None

# Whether the event loop's TCP transports set TCP_NODELAY themselves (uvloop's
# do; the worker says so): then a Channel need not ask the kernel again.
SETS_NODELAY = False

# Longest line, CRLF included, that is relayed; longer client lines get 500.
LINE_LIMIT = 4096
CRLF = b"\r\n"
DATA_END = b"\r\n.\r\n"

_READ_HIGH = 256 * 1024     # stop reading from a peer that floods us...
_READ_LOW = 64 * 1024       # ...until the buffer has drained to this
# An ended connection gets this long to hand its last words to the kernel
# (and, over TLS, to trade close_notify alerts); then it is reset.  Without
# it a peer that never reads (or never answers close_notify) would keep the
# socket, its kernel buffers and a descriptor past its session, outside any
# connection limit.
LINGER = 2.0
_RESET = struct.pack("ii", 1, 0)    # SO_LINGER on, 0 s: close(2) sends RST, frees the queues
# A wait's timer may fire this much before its deadline (the loop's clock
# granularity) and still count as due.
_TIMER_SLACK = 0.002


class ChannelClosed(Exception):
    """The peer went away, a write failed, or a read or write timed out."""

    def __init__(self, message: str, channel: str = "", timed_out: bool = False) -> None:
        super().__init__(message)
        self.channel = channel          # the Channel's name: CLIENT, SERVER or FILTER
        self.timed_out = timed_out


class Channel(asyncio.Protocol):
    """One connection (CLIENT, SERVER or FILTER) with line buffering."""

    # Two per session, for as long as it is held: no per-instance dict.
    __slots__ = ("name", "tag", "buf", "eof", "transport", "last_action", "last_sent",
                 "line_started", "on_ready", "_keep_open", "_scan", "_discarding",
                 "_paused_reading", "_paused_writing", "backed_up", "_drain", "_data_started",
                 "_trace", "_loop", "waiter", "_deadline", "_timer", "_timer_at", "_corked",
                 "_linger", "tls")

    def __init__(self, name: str, tag: str = "", keep_open_on_eof: bool = False,
                 loop: asyncio.AbstractEventLoop | None = None, trace: bool | None = None) -> None:
        self.name = name
        self.tag = tag                       # session id for log lines
        self.buf = bytearray()
        self.eof = False
        self.transport: asyncio.Transport | None = None
        self.last_action = monotonic()
        self.last_sent = self.last_action      # when we last wrote to the peer
        self.line_started: float | None = None   # when an unfinished last line began
        self.on_ready = None                 # callable set by the session
        self._keep_open = keep_open_on_eof
        self._scan = 0
        self._discarding: bytes | None = None
        self._paused_reading = False
        self._paused_writing = False
        # The peer is not taking what we write (the transport's buffer is past
        # its high-water mark): stop producing more for it until it drains.
        self.backed_up = False
        self._drain: asyncio.Future | None = None
        self._data_started = False
        # the protocol trace (debug level); None: ask the log
        self._trace = log.isEnabledFor(logging.DEBUG) if trace is None else trace
        # The waits this channel owns (see wait_any): their future, the
        # deadline of the current one, and one timer moved lazily.
        self._loop = loop                    # None: the running one, at the first wait
        self.waiter: asyncio.Future | None = None   # the pending wait's (see wait_any)
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._corked: list[bytes] | None = None   # writes held back by cork()
        self._linger: asyncio.TimerHandle | None = None   # close()'s deadline for the peer
        self.tls: TLSLayer | None = None     # this channel's TLS (see TLSLayer)

    # --- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not SETS_NODELAY:
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                # asyncio only does this for sockets made with proto=IPPROTO_TCP.
                # Without it a reply's last small write waits for a delayed ACK.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        now = self.last_action = monotonic()
        if data[-1:] == b"\n":
            self.line_started = None
        elif self.line_started is None or b"\n" in data:
            self.line_started = now
        if len(buf) > _READ_HIGH and not self._paused_reading and self.transport:
            self._paused_reading = True
            self.transport.pause_reading()
        ready = self.on_ready
        if ready is not None:
            ready()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return self._keep_open

    def connection_lost(self, exc: BaseException | None) -> None:
        """The connection is gone: the transport is let go (it holds this
        protocol, so keeping it would be a reference cycle, and a finished
        session would wait for the cyclic collector to be freed)."""
        self.eof = True
        self.transport = None
        self._wake()
        self._stop_timer()
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self.tls is not None:        # it holds this channel: no cycle left behind
            self.tls.channel = None
            self.tls = None
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def pause_writing(self) -> None:
        self._paused_writing = self.backed_up = True

    def resume_writing(self) -> None:
        self._paused_writing = self.backed_up = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._wake()

    def _wake(self) -> None:
        if self.on_ready is not None:
            self.on_ready()

    # --- waiting (wait_any) ---------------------------------------------------

    def _set_ready(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def wake(self) -> None:
        """End the pending wait (from a news callback): the task goes on."""
        self._set_ready()

    def fail(self, exc: BaseException) -> None:
        """End the pending wait with `exc`, raised in the waiting task."""
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def extend_wait(self, timeout: float) -> None:
        """The pending wait goes on, for `timeout` seconds from now (a news
        callback handled the news itself: as if the task had waited again)."""
        deadline = self._deadline = self._loop.time() + timeout    # type: ignore[union-attr]
        if self._timer is None or self._timer_at > deadline:
            self._set_timer(deadline)

    def _set_timer(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._timed_out)   # type: ignore[union-attr]
        self._timer_at = when

    def _timed_out(self) -> None:
        """The timer is due: the current wait (if any) times out, unless its
        deadline is later than the wait the timer was set for."""
        self._timer = None
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if self._deadline - self._loop.time() > _TIMER_SLACK:     # type: ignore[union-attr]
            self._set_timer(self._deadline)
        else:
            waiter.set_exception(asyncio.TimeoutError())

    def _stop_timer(self) -> None:
        """Done with this channel: its timer must not keep it alive."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # --- reading ------------------------------------------------------------

    def _consumed(self) -> None:
        if self._paused_reading and len(self.buf) < _READ_LOW and self.transport:
            self._paused_reading = False
            self.transport.resume_reading()

    def take_line(self) -> tuple[bytes, bool] | None:
        """The next complete line and whether it was too long (then cut short).

        A line that runs past LINE_LIMIT is read to its end and discarded but
        for its first LINE_LIMIT bytes, as upstream's SPIO_DISCARD.  A partial
        line at end of file is not returned (see `rest()`).
        """
        buf = self.buf
        if not buf:
            return None
        if self._discarding is not None:
            end = buf.find(b"\n")
            if end < 0:
                del buf[:]
                self._consumed()
                return None
            del buf[:end + 1]
            head, self._discarding = self._discarding, None
            self._consumed()
            return head, True
        end = buf.find(b"\n", self._scan)
        if end < 0:
            if len(buf) >= LINE_LIMIT:
                self._discarding = bytes(buf[:LINE_LIMIT])
                del buf[:]
                self._scan = 0
                self._consumed()
                return self.take_line()
            self._scan = len(buf)
            return None
        self._scan = 0
        if end >= LINE_LIMIT:
            line = bytes(buf[:LINE_LIMIT])
            del buf[:end + 1]
            self._consumed()
            return line, True
        if end + 1 == len(buf):         # the common case: the line is all there is
            line = bytes(buf)
            buf.clear()
        else:
            line = bytes(buf[:end + 1])
            del buf[:end + 1]
        if self._paused_reading:
            self._consumed()
        if self._trace:
            self.trace("<", line)
        return line, False

    def skip(self, count: int) -> None:
        """Drop the first `count` bytes (a PROXY header) before any line is
        taken: they are no unfinished line for the slow-client clock."""
        del self.buf[:count]
        self._scan = 0
        if not self.buf or self.buf.endswith(b"\n"):
            self.line_started = None
        self._consumed()

    def discard(self) -> int:
        """Drop everything unread; how many bytes that was."""
        dropped = len(self.buf)
        del self.buf[:]
        self._scan = 0
        self._discarding = None
        self._consumed()
        return dropped

    def rest(self) -> bytes:
        """What is left in the buffer (a partial last line after EOF)."""
        data = bytes(self.buf)
        del self.buf[:]
        self._scan = 0
        return data

    def start_data(self) -> None:
        """The next bytes are a message body, read with take_data()."""
        self._data_started = False
        self._scan = 0

    def take_data(self) -> tuple[bytes, bool]:
        """Message bytes ready to pass on, and whether the final `.` was seen.

        The terminating CRLF.CRLF is not part of the data; its first CRLF is.
        Dot-stuffing is kept: the bytes are what the client sent.
        """
        buf = self.buf
        if not self._data_started:
            if len(buf) < 3 and b".\r\n".startswith(bytes(buf)):
                return b"", False
            self._data_started = True
            if buf.startswith(b".\r\n"):
                del buf[:3]
                self._consumed()
                return b"", True
        end = buf.find(DATA_END)
        if end >= 0:
            data = _cut(buf, end + 2, end + 5)
            self._consumed()
            return data, True
        keep = len(DATA_END) - 1
        if len(buf) <= keep:
            return b"", False
        data = _cut(buf, len(buf) - keep)
        self._consumed()
        return data, False

    def wait(self, timeout: float) -> Awaitable[None]:
        """Sleep until this channel has news (data, EOF), or time out.
        (wait_any's own coroutine: no frame of its own to resume through.)"""
        return wait_any((self,), timeout)

    @property
    def pending(self) -> int:
        """Bytes received and not yet taken (or a long line being discarded)."""
        return len(self.buf) or int(self._discarding is not None)

    async def start_tls(self, context: ssl.SSLContext, server_side: bool, timeout: float,
                        server_hostname: str | None = None) -> None:
        """Upgrade the connection (STARTTLS) for the same Channel.

        Only with nothing unread: bytes that came in plaintext must never be
        taken as if they had come inside TLS (the STARTTLS injection attacks),
        so the caller discards them or gives up first.  Raises OSError (incl.
        ssl.SSLError) or TimeoutError when the handshake fails or takes longer
        than `timeout`; the connection is closed then."""
        if self.pending:
            raise ValueError("%s: plaintext left unread before TLS" % self.name)
        self.uncork()
        self._scan = 0
        self.line_started = None
        self._paused_reading = self._paused_writing = self.backed_up = False
        self._keep_open = False     # the TLS layer keeps a half-closed peer's connection (TLSLayer)
        loop = asyncio.get_running_loop()
        plain = self.transport
        if _UVLoop is not None and isinstance(loop, _UVLoop) and plain is not None:
            # uvloop's start_tls, with our TLS layer in the place of its own
            waiter = loop.create_future()
            layer = TLSLayer(loop, self, context, waiter, server_side, server_hostname,
                             call_connection_made=False, ssl_handshake_timeout=timeout)
            transport = layer._get_app_transport()
            plain.pause_reading()
            plain.set_protocol(layer)
            made = loop.call_soon(layer.connection_made, plain)
            resume = loop.call_soon(plain.resume_reading)
            try:
                await waiter
            except BaseException:
                transport.close()
                made.cancel()
                resume.cancel()
                layer.channel = None
                raise
            if plain.is_closing():      # the handshake ended with the connection
                layer.channel = None
                raise ConnectionResetError("%s: connection closed during TLS handshake" % self.name)
            self.tls = layer
        else:
            transport = await loop.start_tls(plain, self, context, server_side=server_side,
                                             server_hostname=server_hostname,
                                             ssl_handshake_timeout=timeout)
        if transport is None:       # the peer went away during the handshake
            raise ConnectionResetError("%s: connection closed during TLS handshake" % self.name)
        self.transport = transport
        self.last_action = monotonic()

    async def accept_tls(self, sock: socket.socket, context: ssl.SSLContext,
                         timeout: float) -> None:
        """Serve an accepted socket through TLS from its first byte (TLSWrapper):
        the handshake, then this channel's connection_made.  Raises OSError
        (incl. ssl.SSLError) or TimeoutError when the handshake fails or takes
        longer than `timeout`."""
        self._keep_open = False     # as in start_tls
        loop = asyncio.get_running_loop()
        if _UVLoop is None or not isinstance(loop, _UVLoop):
            await loop.connect_accepted_socket(lambda: self, sock, ssl=context,
                                               ssl_handshake_timeout=timeout)
            return
        waiter = loop.create_future()
        layer = TLSLayer(loop, self, context, waiter, True, None,
                         ssl_handshake_timeout=timeout)
        transport = layer._get_app_transport()     # the one connection_made will get
        try:
            await loop.connect_accepted_socket(lambda: layer, sock)
            await waiter
        except BaseException:
            transport.close()
            layer.channel = None
            raise
        if self.transport is None:      # the handshake ended with the connection
            layer.channel = None
            raise ConnectionResetError("%s: connection closed during TLS handshake" % self.name)
        self.tls = layer

    # --- writing ------------------------------------------------------------

    def write(self, data: bytes, trace: bool = True) -> None:
        """Queue bytes for the peer; raises ChannelClosed if it is gone.
        Message content is written with trace=False: it is never logged."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ChannelClosed("%s: connection closed, can't write data" % self.name, self.name)
        if trace and self._trace:
            self.trace(">", data)
        self.last_action = self.last_sent = monotonic()
        if self._corked is not None:
            self._corked.append(data)
        else:
            transport.write(data)

    def cork(self) -> None:
        """Hold writes back until uncork(): the replies to a pipelined group,
        or the group's commands, then leave in one segment instead of one
        per line.  Every wait on this channel (wait_any, drain, start_tls)
        and close() uncork it first, so nothing held back is waited on."""
        if self._corked is None:
            self._corked = []

    def uncork(self) -> None:
        held, self._corked = self._corked, None
        if held and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(held))

    async def drain(self, timeout: float) -> None:
        """Wait until the kernel has taken what was written (flow control)."""
        self.uncork()
        while self._paused_writing:
            if self.transport is None or self.transport.is_closing():
                raise ChannelClosed("%s: connection closed while writing" % self.name, self.name)
            self._drain = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._drain, timeout)
            except asyncio.TimeoutError:
                raise ChannelClosed("%s: network write operation timed out" % self.name, self.name,
                                    timed_out=True) from None
            finally:
                self._drain = None
        if self.transport is None or self.transport.is_closing():
            raise ChannelClosed("%s: connection closed while writing" % self.name, self.name)

    def close(self) -> None:
        """Close gracefully: what was written goes out (over TLS, with
        close_notify), for at most LINGER seconds; then the connection is
        reset (abort()), whether the peer read it all or not."""
        self._stop_timer()
        self.uncork()
        transport = self.transport
        if transport is None:
            return
        if self.tls is None and not transport.get_write_buffer_size():
            # Nothing to wait for: it ends at once (or is ending already, as
            # a server's connection does after its EOF).
            if not transport.is_closing():
                transport.close()
            return
        if not transport.is_closing():
            transport.close()
            if self.tls is not None and self.tls.peer_eof:
                self.tls.finish()
        if self._linger is None and self.transport is not None:
            try:
                loop = self._loop or asyncio.get_running_loop()
            except RuntimeError:        # no loop runs: nothing would ever flush it
                self.abort()
                return
            self._linger = loop.call_later(LINGER, self.abort)

    def abort(self) -> None:
        """Drop the connection now, unsent bytes and all: the peer gets RST."""
        self._linger = None
        transport = self.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family != socket.AF_UNIX:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            except OSError:
                pass
        transport.abort()

    @property
    def closed(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def trace(self, direction: str, data: bytes) -> None:
        """Protocol trace at debug level, one log line per SMTP line."""
        for line in bytes(data).splitlines()[:50]:
            if line:
                log.debug("%s: %s %s %s", self.tag, self.name, direction, clean(line[:120]))


# Without uvloop TLSLayer is never made (see start_tls and accept_tls).
_TLSBase = _UVSSLProtocol if _UVSSLProtocol is not None else object


class TLSLayer(_TLSBase):      # type: ignore[misc,valid-type]
    """uvloop's TLS protocol, but for a peer that shuts its sending side.

    uvloop ends the whole TLS connection when the TCP stream underneath
    reaches EOF (and ignores what its application's eof_received returns):
    whatever is written afterwards is dropped.  A client that sends `.` and
    QUIT and then shuts down its side (shutdown(2) SHUT_WR) is still owed
    the final reply and the 221, as it is in plaintext.  So here EOF from
    the peer only tells the channel (which sees the end of the input); the
    connection stays open for writing until the channel closes it, and then
    ends without waiting for a close_notify that cannot come any more.

    A close_notify alert is another matter: uvloop answers it with its own
    and ends the connection once what was already written is out (the
    receiver "MUST ... close down the connection immediately, discarding any
    pending writes", RFC 5246 §7.2.1); a client that sends it has given up
    on the replies still due."""

    __slots__ = ("channel", "peer_eof")

    def __init__(self, loop: asyncio.AbstractEventLoop, channel: Channel, context: ssl.SSLContext,
                 waiter: asyncio.Future, server_side: bool, server_hostname: str | None,
                 call_connection_made: bool = True, ssl_handshake_timeout: float | None = None) -> None:
        super().__init__(loop, channel, context, waiter, server_side, server_hostname,
                         call_connection_made=call_connection_made,
                         ssl_handshake_timeout=ssl_handshake_timeout)
        self.channel: Channel | None = channel
        self.peer_eof = False

    def eof_received(self) -> bool | None:
        channel = self.channel
        if channel is None or channel.tls is not self or channel.closed:
            # in the handshake (it fails), or once the channel closed (done now)
            return super().eof_received()
        self.peer_eof = True
        channel.eof_received()
        return True         # the stream stays open for what is still to be written

    def finish(self) -> None:
        """The channel closed (its last bytes and our close_notify are
        queued) after the peer's EOF: no close_notify will answer, so the
        connection ends now rather than at the shutdown timeout."""
        super().eof_received()


def _cut(buf: bytearray, size: int, through: int | None = None) -> bytes:
    """The first `size` bytes of `buf`, removed from it with the next ones up
    to `through`: one copy of a message chunk, not two (`bytes(buf[:size])`)."""
    with memoryview(buf) as view:
        data = bytes(view[:size])
    del buf[:size if through is None else through]
    return data


async def wait_any(channels: tuple[Channel, ...], timeout: float,
                   news: Callable[[], None] | None = None) -> None:
    """Sleep until any of the channels has news, or raise TimeoutError.

    A session waits several times per message, so a wait must be cheap: one
    future, and no timer of its own.  The first channel owns the wait and
    keeps one timer for all its waits, moved only when a wait's deadline
    comes sooner than the timer; when the timer fires early for the current
    wait it is set again for that wait's deadline (see Channel._timed_out).

    `news`, if given, is called instead of waking the task when a channel
    has news; it ends the wait with the owner's `wake()` or `fail()`, or
    lets it go on with `extend_wait()`."""
    owner = channels[0]
    loop = owner._loop
    if loop is None:
        loop = owner._loop = asyncio.get_running_loop()
    waiter = owner.waiter = loop.create_future()
    deadline = owner._deadline = loop.time() + timeout
    if owner._timer is None or owner._timer_at > deadline:
        owner._set_timer(deadline)
    ready = owner._set_ready if news is None else news
    for channel in channels:
        if channel._corked is not None:
            channel.uncork()
        channel.on_ready = ready
    try:
        await waiter
    finally:
        # An exception this wait raised holds this frame in its traceback:
        # the future, which holds the exception, must not stay in it.
        owner.waiter = waiter = None
        for channel in channels:
            channel.on_ready = None
