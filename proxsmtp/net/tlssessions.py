"""TLS session resumption where the proxy is the TLS client (the server leg,
a filter node): a session cache per worker (RFC 8446 2.2 tickets, RFC 5077
tickets and RFC 5246 session ids), and the context that offers a session.

A session is offered only to the peer it came from: the same address, the
same server_hostname (SNI, and the name ServerTLS verify checks) and the
same context (the same policy and CA file).  OpenSSL does not check a
certificate again on a resumed handshake: the session carries the result of
the full handshake that made it, so a session from one name offered to
another would pass that name unchecked.  Hence the key.

uvloop's TLS protocol (and asyncio's) makes its SSLObject with
`context.wrap_bio(...)` and passes no session; ClientContext.wrap_bio adds
the one `offering` holds for the duration of that synchronous call
(tlslayer.upgrade).  Without uvloop nothing is offered (full handshakes).

The cache holds ssl.SSLSession objects only (each holds its context, never
a channel or an SMTP session); the key has id(context), which cannot be
reused while a session of that context is kept.

A connection's session is read only when the cache needs it: reading
`SSLObject.session` makes a copy (CPython serializes and parses the
session again, the peer's certificate with it: an OpenSSL 1.1.0 bug's
workaround), and that copy per connection, made and freed among the
connections being held, left about 4 KB more resident per held TLS
session.  So a handshake that resumed the kept session leaves it kept
until half its lifetime is gone, unless the peer has shown that it takes a
session once only (RFC 8446 8.1 single-use tickets): then each connection's
fresh session is kept.
"""

from __future__ import annotations

import os
import ssl
import sys
import time
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Hashable, Iterator

# Peers remembered per worker (a few hundred servers and nodes).
MAX_SESSIONS = 256

Key = Hashable


class Kept:
    """A peer's session, and what its handshakes showed of the peer."""

    __slots__ = ("session", "taken", "single_use")

    def __init__(self, session: ssl.SSLSession | None, single_use: bool) -> None:
        self.session = session          # None: a single-use peer's, taken, none new yet
        self.taken = False              # a handshake resumed it
        self.single_use = single_use    # the peer refused a session it had taken once


_cache: OrderedDict[Key, Kept] = OrderedDict()
_offered: ssl.SSLSession | None = None


class ClientContext(ssl.SSLContext):
    """An SSLContext that gives the SSLObject it makes the session being
    offered, if any (set before the first handshake step, as OpenSSL's
    SSL_set_session requires)."""

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
                 server_side: bool = False, server_hostname: str | None = None,
                 session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        if session is None and not server_side:
            session = _offered
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)


def client_context(cafile: str | None) -> ClientContext:
    """ssl.create_default_context() for a server (chain and host name
    checked, against `cafile` or the system store; SSLKEYLOGFILE honoured),
    as a ClientContext."""
    context = ClientContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile:
        context.load_verify_locations(cafile)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    keylog = os.environ.get("SSLKEYLOGFILE")
    if keylog and not sys.flags.ignore_environment:
        context.keylog_filename = keylog
    return context


def key(context: ssl.SSLContext, address: Any, server_hostname: str | None) -> Key | None:
    """The cache key for a handshake, or None when the context cannot resume."""
    if not isinstance(context, ClientContext):
        return None
    return (id(context), address, server_hostname)


def lookup(cache_key: Key | None) -> ssl.SSLSession | None:
    """The session to offer this peer, if a live one is kept."""
    if cache_key is None:
        return None
    kept = _cache.get(cache_key)
    if kept is None or kept.session is None:
        return None
    session = kept.session
    if session.time + session.timeout <= time.time():
        del _cache[cache_key]
        return None
    _cache.move_to_end(cache_key)
    return session


@contextmanager
def offering(session: ssl.SSLSession | None) -> Iterator[None]:
    """ClientContext.wrap_bio offers `session` within this block (which makes
    the SSLObject: a synchronous call, so no other handshake can take it)."""
    global _offered
    _offered = session
    try:
        yield
    finally:
        _offered = None


def keep(cache_key: Key | None, ssl_object: ssl.SSLObject | None) -> None:
    """Remember the session of an established connection.  Called once a
    reply came inside TLS: TLS 1.3 tickets come after the handshake
    (NewSessionTicket, RFC 8446 4.6.1), and only a session with a ticket
    (or a TLS 1.2 session id) can be resumed."""
    if cache_key is None or ssl_object is None:
        return
    kept = _cache.get(cache_key)
    if kept is not None and ssl_object.session_reused:
        kept.taken = True
        if not kept.single_use and _young(kept.session):
            return      # the kept session serves again: no copy read (module docstring)
    session = ssl_object.session
    if session is None:
        return
    if not session.has_ticket and (ssl_object.version() == "TLSv1.3" or not session.id):
        drop(cache_key)
        return
    _cache[cache_key] = Kept(session, kept is not None and kept.single_use)
    _cache.move_to_end(cache_key)
    while len(_cache) > MAX_SESSIONS:
        _cache.popitem(last=False)


def _young(session: ssl.SSLSession | None) -> bool:
    """Less than half the session's lifetime gone."""
    return session is not None and session.time + session.timeout / 2 > time.time()


def refused(cache_key: Key | None) -> None:
    """The peer did not resume the session offered.  Forgotten; and if a
    handshake had resumed that session before, the peer takes a session
    once only: from now on each connection's new session is kept."""
    kept = _cache.pop(cache_key, None) if cache_key is not None else None
    if kept is not None and (kept.taken or kept.single_use):
        _cache[cache_key] = Kept(None, True)


def drop(cache_key: Key | None) -> None:
    """Forget a peer's session: its handshake failed."""
    if cache_key is not None:
        _cache.pop(cache_key, None)
