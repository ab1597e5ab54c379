"""How a session ends, and the reasons its log line gives.

A session ends by raising SessionEnd wherever it finds it must: the
reason (logged once, at the level given), the last reply the client hears
(or none), and for /metrics whether the server failed us.  A peer found
gone is said the same way wherever it is found: on a read (ServerLeg, the
relay) or on a write (a Channel's ChannelClosed, see channel_closed).  The
time rule for a client's lines is here too: a begun line must be finished
TimeOut after its first byte.
"""

from __future__ import annotations

import logging
import time

from ..net.channel import Channel, ChannelClosed
from .replies import R_FAILED

SERVER_GONE = "server disconnected unexpectedly"
SERVER_TIMEOUT = "network operation timed out waiting for server"
CLIENT_GONE = "unexpected end of data from client"
READ_TIMEOUT = "network operation timed out reading message"
IDLE = "network operation timed out"


class SessionEnd(Exception):
    """Ends the session; `reply` (if any) is the last thing the client hears.
    `server_error` (connect, closed, timeout) when the server failed us: counted
    for /metrics (stats.server_error)."""

    def __init__(self, reason: str, reply: bytes | None = R_FAILED, level: int = logging.ERROR,
                 server_error: str | None = None):
        super().__init__(reason)
        self.reply = reply
        self.level = level
        self.server_error = server_error


def channel_closed(exc: ChannelClosed, server: str) -> SessionEnd:
    """The end a ChannelClosed means, for a session whose server channel is
    named `server`.  The server found gone (or too slow) on a write is said
    as on a read: SERVER_GONE or SERVER_TIMEOUT, an error, 451, counted.  A
    client gone is a warning with the channel's words; it hears nothing more."""
    if exc.channel == server:
        if exc.timed_out:
            return SessionEnd(SERVER_TIMEOUT, server_error="timeout")
        return SessionEnd(SERVER_GONE, server_error="closed")
    return SessionEnd(str(exc), R_FAILED, logging.WARNING)


def client_wait(client: Channel, timeout: float, reason: str) -> float:
    """How long to wait for the client: TimeOut, but a line it has begun must
    be finished TimeOut after its first byte (a slow-loris trickle of bytes
    does not start the clock again); raises SessionEnd once that is past."""
    started = client.line_started
    if started is None:
        return timeout
    left = started + timeout - time.monotonic()
    if left <= 0:
        raise unfinished_line(reason, timeout)
    return min(timeout, left)


def unfinished_line(reason: str, timeout: float) -> SessionEnd:
    return SessionEnd(reason + " (a line unfinished for %d seconds)" % timeout, None)
