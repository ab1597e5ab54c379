"""TLS on a live Channel: STARTTLS (RFC 3207) on a connection that began in
plaintext, and TLSWrapper (implicit TLS, RFC 8314 3.3) on an accepted one.

Under uvloop (the worker's loop) the TLS is uvloop's own protocol with one
change (TLSLayer: a peer's EOF does not end the connection), put in the
place uvloop's start_tls and connect_accepted_socket would put theirs.
Without uvloop it is the loop's TLS as it is (only the tests and tools run
so).  As the client, under uvloop, the handshake offers the session kept
for that peer (tlssessions).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import TYPE_CHECKING

from . import tlssessions

if TYPE_CHECKING:
    from .channel import Channel

try:
    from uvloop import Loop as _UVLoop
    from uvloop.loop import SSLProtocol as _UVSSLProtocol
except ImportError:
    _UVLoop = _UVSSLProtocol = None

# Without uvloop TLSLayer is never made (see upgrade and accept).
_TLSBase = _UVSSLProtocol if _UVSSLProtocol is not None else object


def _on_uvloop(loop: asyncio.AbstractEventLoop) -> bool:
    return _UVLoop is not None and isinstance(loop, _UVLoop)


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

    __slots__ = ("channel", "peer_eof", "resume_key")

    def __init__(self, loop: asyncio.AbstractEventLoop, channel: Channel, context: ssl.SSLContext,
                 waiter: asyncio.Future, server_side: bool, server_hostname: str | None,
                 call_connection_made: bool = True,
                 ssl_handshake_timeout: float | None = None) -> None:
        super().__init__(loop, channel, context, waiter, server_side, server_hostname,
                         call_connection_made=call_connection_made,
                         ssl_handshake_timeout=ssl_handshake_timeout)
        self.channel: Channel | None = channel
        self.peer_eof = False
        # the session cache's key for this peer (tlssessions), as the client
        self.resume_key: tlssessions.Key | None = None

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


def _closed_in_handshake(channel: Channel) -> ConnectionResetError:
    return ConnectionResetError("%s: connection closed during TLS handshake" % channel.name)


async def upgrade(channel: Channel, plain: asyncio.Transport | None, context: ssl.SSLContext,
                  server_side: bool, timeout: float, server_hostname: str | None,
                  ) -> tuple[asyncio.Transport, TLSLayer | None]:
    """The TLS handshake on `channel`'s plaintext transport `plain`
    (Channel.start_tls): the transport the channel writes to from now on,
    and the TLSLayer under it (None without uvloop).  OSError (incl.
    ssl.SSLError) or TimeoutError if the handshake fails or takes longer
    than `timeout`; the connection is closed then."""
    loop = asyncio.get_running_loop()
    if not _on_uvloop(loop) or plain is None:
        transport = await loop.start_tls(plain, channel, context, server_side=server_side,
                                         server_hostname=server_hostname,
                                         ssl_handshake_timeout=timeout)
        if transport is None:       # the peer went away during the handshake
            raise _closed_in_handshake(channel)
        return transport, None
    # uvloop's start_tls, with our TLS layer in the place of its own
    waiter = loop.create_future()
    layer = TLSLayer(loop, channel, context, waiter, server_side, server_hostname,
                     call_connection_made=False, ssl_handshake_timeout=timeout)
    offer = None
    if not server_side:
        layer.resume_key = tlssessions.key(context, plain.get_extra_info("peername"),
                                           server_hostname)
        offer = tlssessions.lookup(layer.resume_key)
    transport = layer._get_app_transport()
    plain.pause_reading()
    plain.set_protocol(layer)
    made = loop.call_soon(_made, layer, plain, offer)
    resume = loop.call_soon(plain.resume_reading)
    try:
        await waiter
    except BaseException:
        tlssessions.drop(layer.resume_key)
        transport.close()
        made.cancel()
        resume.cancel()
        layer.channel = None
        raise
    if plain.is_closing():      # the handshake ended with the connection
        tlssessions.drop(layer.resume_key)
        layer.channel = None
        raise _closed_in_handshake(channel)
    if offer is not None and not transport.get_extra_info("ssl_object").session_reused:
        tlssessions.refused(layer.resume_key)      # a new one is kept when it comes
    return transport, layer


def _made(layer: TLSLayer, plain: asyncio.Transport, offer: ssl.SSLSession | None) -> None:
    """The handshake starts (uvloop makes its SSLObject here, through the
    context's wrap_bio), offering the cached session to resume."""
    with tlssessions.offering(offer):
        layer.connection_made(plain)


async def accept(channel: Channel, sock: socket.socket, context: ssl.SSLContext,
                 timeout: float) -> TLSLayer | None:
    """Serve the accepted `sock` through TLS from its first byte
    (Channel.accept_tls): the handshake, then `channel`'s connection_made.
    The TLSLayer under the channel's transport (None without uvloop).
    OSError (incl. ssl.SSLError) or TimeoutError if the handshake fails or
    takes longer than `timeout`."""
    loop = asyncio.get_running_loop()
    if not _on_uvloop(loop):
        await loop.connect_accepted_socket(lambda: channel, sock, ssl=context,
                                           ssl_handshake_timeout=timeout)
        return None
    waiter = loop.create_future()
    layer = TLSLayer(loop, channel, context, waiter, True, None,
                     ssl_handshake_timeout=timeout)
    transport = layer._get_app_transport()     # the one connection_made will get
    try:
        await loop.connect_accepted_socket(lambda: layer, sock)
        await waiter
    except BaseException:
        transport.close()
        layer.channel = None
        raise
    if channel.transport is None:      # the handshake ended with the connection
        layer.channel = None
        raise _closed_in_handshake(channel)
    return layer
