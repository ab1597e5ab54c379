"""Socket I/O for one side of a session (upstream's spio.c).

A Channel is an asyncio Protocol that keeps what arrived in a buffer and
hands it out as lines (with upstream's line-length limit) or, during DATA,
as chunks up to the terminating `.` line.  The session polls both of its
channels and sleeps on one shared wake-up future (upstream's spio_select,
here `waits.wait_any`: a Channel is a `waits.Waitable`), so no task is
created per line.  A pipelined group's lines are written in one piece
(`cork`/`uncork`); every wait and close uncorks first.  TLS on a live
channel is net/tlslayer.py's.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
import struct
from time import monotonic

from ..process.log import clean, log
from . import tlslayer
from .waits import Waitable, within

# Whether the event loop's TCP transports set TCP_NODELAY themselves (uvloop's
# do; the worker says so): then a Channel need not ask the kernel again.
SETS_NODELAY = False

# Longest line, CRLF included, that is relayed; longer client lines get 500.
LINE_LIMIT = 4096
# take_reply takes a reply whole within this many bytes (any real one); a
# longer one is read line by line, under the reader's limits and the reply's
# (smtp.peer: 1000 lines; a line here is 5 bytes at least, so 819 at most).
REPLY_FAST = 4096
# The start of a reply's last line (RFC 5321 4.2.1: the first that is no
# `NNN-` continuation), and a line: what take_reply finds a long reply by.
_LAST_LINE = re.compile(rb"\n(?![0-9]{3}-)")
_LINE = re.compile(rb"[^\n]*\n")
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


class ChannelClosed(Exception):
    """The peer went away, a write failed, or a read or write timed out."""

    def __init__(self, message: str, channel: str = "", timed_out: bool = False) -> None:
        super().__init__(message)
        self.channel = channel          # the Channel's name: CLIENT, SERVER or FILTER
        self.timed_out = timed_out


class Reader:
    """What arrived from the peer, framed: SMTP lines, with upstream's line
    length limit, and a message's DATA up to its final dot.  The bytes are
    Channel's (data_received); so are the slots, declared here."""

    __slots__ = ()

    name: str
    tag: str
    buf: bytearray
    transport: asyncio.Transport | None
    line_started: float | None      # when an unfinished last line began
    _scan: int                      # where take_line looks for the next LF
    _discarding: bytes | None       # the head of an over-long line read to its end
    _data_started: bool             # take_data is past a message's first bytes
    _paused_reading: bool           # the buffer is past _READ_HIGH
    _trace: bool                    # the protocol trace is on (debug level)

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

    def take_reply(self) -> list[bytes] | None:
        """A whole SMTP reply, when all of it is here: its lines up to the
        first that is no `NNN-` continuation (RFC 5321 4.2.1), in one call
        instead of a take_line per line.  None when it is not all here within
        REPLY_FAST bytes (so no line of it reaches LINE_LIMIT): then the
        reader takes it line by line (take_line)."""
        buf = self.buf
        if not buf or self._discarding is not None:
            return None
        end = buf.find(b"\n")
        if end < 0 or end >= REPLY_FAST:
            return None
        line = bytes(buf[:end + 1])
        if line[3:4] != b"-" or not line[:3].isdigit():     # one line: most replies
            lines = [line]
        else:       # the first line that is no continuation ends it
            last = _LAST_LINE.search(buf, end, REPLY_FAST)
            end = -1 if last is None else buf.find(b"\n", last.end(), REPLY_FAST)
            if end < 0:
                return None
            lines = _LINE.findall(buf, 0, end + 1)
        if end + 1 == len(buf):
            buf.clear()
        else:
            del buf[:end + 1]
        self._scan = 0
        if self._paused_reading:
            self._consumed()
        if self._trace:
            for line in lines:
                self.trace("<", line)
        return lines

    def take_known(self, known: bytes) -> bool:
        """Take the next reply when it is `known` byte for byte (a whole
        reply under REPLY_FAST bytes that take_reply took before: the bytes
        make the same lines again): one comparison, for a peer that says the
        same thing every time (a filter node's EHLO reply)."""
        buf = self.buf
        if self._discarding is not None or not buf.startswith(known):
            return False
        if len(known) == len(buf):
            buf.clear()
        else:
            del buf[:len(known)]
        self._scan = 0
        if self._paused_reading:
            self._consumed()
        if self._trace:
            self.trace("<", known)
        return True

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

    def take_count(self, limit: int) -> bytes:
        """Up to `limit` of the bytes that came, as they came: a BDAT chunk
        (RFC 3030), counted and not framed, so a dot line or a command line
        in it is data.  What follows the chunk stays for take_line."""
        buf = self.buf
        if len(buf) <= limit:
            data = bytes(buf)
            buf.clear()
        else:
            data = _cut(buf, limit)
        self._scan = 0
        # The chunk's own bytes are no begun line; what follows it is one at most since now.
        self.line_started = None if not buf or buf.endswith(b"\n") else monotonic()
        self._consumed()
        return data

    @property
    def pending(self) -> int:
        """Bytes received and not yet taken (or a long line being discarded)."""
        return len(self.buf) or int(self._discarding is not None)

    def trace(self, direction: str, data: bytes) -> None:
        """Protocol trace at debug level, one log line per SMTP line."""
        for line in bytes(data).splitlines()[:50]:
            if line:
                log.debug("%s: %s %s %s", self.tag, self.name, direction, clean(line[:120]))


class Channel(Reader, Waitable, asyncio.Protocol):
    """One connection (CLIENT, SERVER or FILTER): what it reads (Reader), its
    waits (Waitable), writing, flow control and close."""

    # Two per session, for as long as it is held: no per-instance dict.
    __slots__ = ("name", "tag", "buf", "eof", "transport", "last_action", "last_sent",
                 "line_started", "_keep_open", "_scan", "_discarding", "_paused_reading",
                 "_paused_writing", "backed_up", "_drain", "_data_started", "_trace", "_corked",
                 "_linger", "tls",
                 # Waitable's
                 "on_ready", "waiter", "_loop", "_deadline", "_timer", "_timer_at")

    def __init__(self, name: str, tag: str = "", keep_open_on_eof: bool = False,
                 loop: asyncio.AbstractEventLoop | None = None, trace: bool | None = None) -> None:
        self.name = name
        self.tag = tag                       # session id for log lines
        self.buf = bytearray()
        self.eof = False
        self.transport = None
        self.last_action = monotonic()
        self.last_sent = self.last_action      # when we last wrote to the peer
        self.line_started = None
        self._keep_open = keep_open_on_eof
        self._scan = 0
        self._discarding = None
        self._paused_reading = False
        self._paused_writing = False
        # The peer is not taking what we write (the transport's buffer is past
        # its high-water mark): stop producing more for it until it drains.
        self.backed_up = False
        self._drain: asyncio.Future | None = None
        self._data_started = False
        # the protocol trace (debug level); None: ask the log
        self._trace = log.isEnabledFor(logging.DEBUG) if trace is None else trace
        self._corked: list[bytes] | None = None   # writes held back by cork()
        self._linger: asyncio.TimerHandle | None = None   # close()'s deadline for the peer
        self.tls: tlslayer.TLSLayer | None = None     # this channel's TLS, under uvloop
        # Waitable's (the waits this channel owns; see wait_any)
        self.on_ready = None
        self.waiter = None
        self._loop = loop                    # None: the running one, at the first wait
        self._deadline = self._timer_at = 0.0
        self._timer = None

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
        self.transport, self.tls = await tlslayer.upgrade(
            self, self.transport, context, server_side, timeout, server_hostname)
        self.last_action = monotonic()

    async def accept_tls(self, sock: socket.socket, context: ssl.SSLContext,
                         timeout: float) -> None:
        """Serve an accepted socket through TLS from its first byte (TLSWrapper):
        the handshake, then this channel's connection_made.  Raises OSError
        (incl. ssl.SSLError) or TimeoutError when the handshake fails or takes
        longer than `timeout`."""
        self._keep_open = False     # as in start_tls
        self.tls = await tlslayer.accept(self, sock, context, timeout)

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
                await within(timeout, self._drain)
            except TimeoutError:
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


def _cut(buf: bytearray, size: int, through: int | None = None) -> bytes:
    """The first `size` bytes of `buf`, removed from it with the next ones up
    to `through`: one copy of a message chunk, not two (`bytes(buf[:size])`)."""
    with memoryview(buf) as view:
        data = bytes(view[:size])
    del buf[:size if through is None else through]
    return data
