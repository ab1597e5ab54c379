"""STARTTLS on both legs of a session (RFC 3207, proxsmtpd(8) TLS).

The client's STARTTLS is ended in the proxy; towards the server the proxy
upgrades at the client's first EHLO, before the client hears the reply.
The two STARTTLS buffering attacks are the reason for the care here:
plaintext a client sends behind its STARTTLS, or a server behind its 220,
is never read as if it had come inside TLS.  tls.py makes the contexts;
smtp.peer does the server's STARTTLS, as it does the filter node's.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ..net import addresses, destination, tls
from ..process import stats
from ..process.log import clean, log
from ..smtp.ends import SessionEnd
from ..smtp.peer import Refused
from ..smtp.replies import (R_CANTCONNECT, R_NOSERVERTLS, R_NOTSUPP, R_SERVERPLAIN, R_TLSACTIVE,
                            R_TLSAUTHED, R_TLSFIRST, R_TLSINTXN, R_TLSREADY, R_TLSSYNTAX)
from ..smtp.syntax import ehlo_offers
from .replyqueue import ServerAnswers

if TYPE_CHECKING:
    from .session import Session

# Commands allowed on a leg that must be encrypted and is not (yet).
BEFORE_TLS = {b"EHLO", b"HELO", b"STARTTLS", b"NOOP", b"RSET", b"QUIT"}


def refusal_before_tls(session: Session) -> bytes | None:
    """ClientTLS encrypt before the client's STARTTLS, or ServerTLS
    encrypt/verify without TLS to the server: no mail (nor AUTH) yet."""
    config, envelope = session.config, session.envelope
    if config.ClientTLS == "encrypt" and not envelope.client_tls:
        return R_TLSFIRST
    if config.ServerTLS in ("encrypt", "verify") and not envelope.server_tls:
        log.warning("%s: refused a command: TLS to the server (ServerTLS %s) not established",
                    session.tag, config.ServerTLS)
        return R_SERVERPLAIN
    return None


class StartTLS:
    """One STARTTLS step of a session: made for it, and let go when it is
    done (the session never holds it, so the two make no cycle)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    # --- STARTTLS from the client ------------------------------------------------

    async def client(self, line: bytes) -> None:
        """Terminate the client's TLS in the proxy (ClientTLS may/encrypt).

        Earlier pipelined commands are answered first; the 220 is the last
        plaintext the client gets, and whatever it sent behind STARTTLS in
        plaintext is thrown away, never read as if it came inside TLS
        (CVE-2011-0411).  Afterwards the client starts over (RFC 3207 4.2):
        the HELO name is forgotten and it must EHLO again."""
        session = self.session
        answer, envelope, client = session.replies.answer, session.envelope, session.client
        context = session.config.listening_tls
        if context is None or session.config.ClientTLS == "off":
            log.debug("%s: ESMTP feature not supported", session.tag)
            answer(R_NOTSUPP)
            return
        if envelope.client_tls:
            answer(R_TLSACTIVE)
            return
        if len(line.split()) > 1:
            answer(R_TLSSYNTAX)
            return
        await session.drain_replies()
        if envelope.in_transaction:
            answer(R_TLSINTXN)
            return
        if session.authenticated:      # the server's session stays authenticated
            answer(R_TLSAUTHED)
            return
        client.write(R_TLSREADY)
        dropped = client.discard()
        if dropped:
            log.warning("%s: discarded %d bytes the client sent in plaintext behind STARTTLS",
                        session.tag, dropped)
        try:
            await client.start_tls(context, True, session.handshake_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            stats.client_tls("failed")
            raise SessionEnd("TLS handshake with the client failed: %s" % tls.reason(exc),
                             None, logging.WARNING) from None
        envelope.client_tls = tls.describe(client.transport)
        stats.client_tls("established")
        log.debug("%s: CLIENT TLS: %s", session.tag, envelope.client_tls)
        envelope.helo = None
        envelope.reset()
        session.auth_started = False

    # --- STARTTLS to the server --------------------------------------------------

    async def hello(self, verb: bytes, line: bytes) -> None:
        """The client's first EHLO/HELO with ServerTLS on: upgrade the server
        connection before the client hears a reply, so it sees one answer.

        The proxy sends EHLO (the client's; for a HELO client, with encrypt
        or verify only, EHLO with its name);
        if the server offers STARTTLS, it is done and the client's own command
        goes to the server again inside TLS, and that reply is relayed.  With
        `may`, a refused STARTTLS carries on in plaintext, and a failed
        handshake (or plaintext behind the server's 220) gets a new plaintext
        connection: opportunistic TLS never delivers less mail than none.
        With encrypt/verify, no TLS means 421 and no mail."""
        session = self.session
        await session.drain_replies()
        policy, leg = session.config.ServerTLS, session.server_leg
        reply = await leg.command(line if verb == b"EHLO" else b"EHLO" + line[4:])
        if reply[-1][:1] != b"2":       # no EHLO: no STARTTLS; try again at the next one
            if verb != b"EHLO":
                reply = await leg.command(line)
            self.relay(verb, line, reply)
            return
        session.server_tls_tried = True
        if not ehlo_offers(reply, b"STARTTLS"):
            failure = "the server offers no STARTTLS"
            stats.server_tls("not_offered")
        else:
            failure = await self.server_starttls()
        if failure is None:
            reply = await leg.command(line)
        elif policy != "may":
            raise SessionEnd("no TLS to the server (ServerTLS %s): %s" % (policy, failure),
                             R_NOSERVERTLS, logging.WARNING)
        elif leg.channel.closed:
            log.warning("%s: %s; connecting to the server again in plaintext", session.tag, failure)
            try:
                await session.open_server()
            except destination.DestinationError as exc:
                raise SessionEnd(str(exc), R_CANTCONNECT, server_error="connect") from None
            greeting = await leg.read_reply()
            if greeting[-1][:1] != b"2":
                raise SessionEnd("server refused the plaintext connection after a failed TLS "
                                 "handshake: %s" % clean(greeting[-1].strip()), R_CANTCONNECT)
            reply = await leg.command(line)
        else:
            if session.debug:
                log.debug("%s: %s; going on in plaintext", session.tag, failure)
            if verb != b"EHLO":
                reply = await leg.command(line)
        self.relay(verb, line, reply)

    async def server_starttls(self) -> str | None:
        """STARTTLS on the server connection (Peer.starttls), counted for
        /metrics: None when done, else why not."""
        session = self.session
        leg = session.server_leg
        failure = await leg.starttls(session.config.connecting_tls, self.server_name(),
                                     leg.timeout)
        if failure is not None:
            stats.server_tls("refused" if isinstance(failure, Refused) else "failed")
            return failure
        session.envelope.server_tls = tls.describe(leg.channel.transport)
        stats.server_tls("established")
        if tls.resumed(leg.channel.transport):
            stats.tls_resumed("server")
        return None

    def server_name(self) -> str | None:
        """The name the server's certificate must match (ServerTLS verify) and
        SNI: OutAddress's host (name or IP literal), else the server's IP."""
        config = self.session.config
        out = config.OutAddress
        if config.TransparentProxy == "off" and out is not None:
            if out.is_unix:
                return None
            if out.host and not addresses.is_unspecified(out.host):
                return out.host
        return self.session.envelope.server_ip

    def relay(self, verb: bytes, line: bytes, reply: list[bytes]) -> None:
        """A reply the proxy read itself goes to the client as if relayed."""
        session = self.session
        session.replies.expect(ServerAnswers(verb, line))
        for reply_line in reply:
            session.replies.server_line(reply_line, False, session.tag, session.on_reply)
