"""STARTTLS on both legs of a session (RFC 3207, proxsmtpd(8) TLS), mixed into Session.

The client's STARTTLS is ended in the proxy; towards the server the proxy
upgrades at the client's first EHLO, before the client hears the reply.
The two STARTTLS buffering attacks are the reason for the care here:
plaintext a client sends behind its STARTTLS, or a server behind its 220,
is never read as if it had come inside TLS.  tls.py makes the contexts.
"""

from __future__ import annotations

import asyncio
import logging

from ..net import addresses, destination, tls
from ..process import stats
from ..process.log import clean, log
from ..smtp.ends import SessionEnd
from ..smtp.replies import (R_CANTCONNECT, R_NOSERVERTLS, R_NOTSUPP, R_SERVERPLAIN, R_TLSACTIVE,
                            R_TLSAUTHED, R_TLSFIRST, R_TLSINTXN, R_TLSREADY, R_TLSSYNTAX)
from .replyqueue import ServerAnswers

# Commands allowed on a leg that must be encrypted and is not (yet).
BEFORE_TLS = {b"EHLO", b"HELO", b"STARTTLS", b"NOOP", b"RSET", b"QUIT"}


class StartTLS:
    """Session's STARTTLS handling (a mixin: it works on the Session's own
    channels, reply queue and envelope)."""

    def refusal_before_tls(self) -> bytes | None:
        """ClientTLS encrypt before the client's STARTTLS, or ServerTLS
        encrypt/verify without TLS to the server: no mail (nor AUTH) yet."""
        if self.config.ClientTLS == "encrypt" and not self.envelope.client_tls:
            return R_TLSFIRST
        if self.config.ServerTLS in ("encrypt", "verify") and not self.envelope.server_tls:
            log.warning("%s: refused a command: TLS to the server (ServerTLS %s) not established",
                        self.tag, self.config.ServerTLS)
            return R_SERVERPLAIN
        return None

    # --- STARTTLS from the client ------------------------------------------------

    async def client_starttls(self, line: bytes) -> None:
        """Terminate the client's TLS in the proxy (ClientTLS may/encrypt).

        Earlier pipelined commands are answered first; the 220 is the last
        plaintext the client gets, and whatever it sent behind STARTTLS in
        plaintext is thrown away, never read as if it came inside TLS
        (CVE-2011-0411).  Afterwards the client starts over (RFC 3207 4.2):
        the HELO name is forgotten and it must EHLO again."""
        answer = self.replies.answer
        context = self.config.listening_tls
        if context is None or self.config.ClientTLS == "off":
            log.debug("%s: ESMTP feature not supported", self.tag)
            answer(R_NOTSUPP)
            return
        if self.envelope.client_tls:
            answer(R_TLSACTIVE)
            return
        if len(line.split()) > 1:
            answer(R_TLSSYNTAX)
            return
        await self.drain_replies()
        if self.envelope.in_transaction:
            answer(R_TLSINTXN)
            return
        if self.authenticated:      # the server's session stays authenticated
            answer(R_TLSAUTHED)
            return
        self.client.write(R_TLSREADY)
        dropped = self.client.discard()
        if dropped:
            log.warning("%s: discarded %d bytes the client sent in plaintext behind STARTTLS",
                        self.tag, dropped)
        try:
            await self.client.start_tls(context, True, self.handshake_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            stats.client_tls("failed")
            raise SessionEnd("TLS handshake with the client failed: %s" % tls.reason(exc),
                             None, logging.WARNING) from None
        self.envelope.client_tls = tls.describe(self.client.transport)
        stats.client_tls("established")
        log.debug("%s: CLIENT TLS: %s", self.tag, self.envelope.client_tls)
        self.envelope.helo = None
        self.envelope.reset()
        self.auth_started = False

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
        await self.drain_replies()
        policy = self.config.ServerTLS
        reply = await self.server_leg.command(line if verb == b"EHLO" else b"EHLO" + line[4:])
        if reply[-1][:1] != b"2":       # no EHLO: no STARTTLS; try again at the next one
            if verb != b"EHLO":
                reply = await self.server_leg.command(line)
            self.relay(verb, line, reply)
            return
        self.server_tls_tried = True
        if not offers_starttls(reply):
            failure = "the server offers no STARTTLS"
            stats.server_tls("not_offered")
        else:
            failure = await self.server_starttls()
        if failure is None:
            log.debug("%s: SERVER TLS: %s", self.tag, self.envelope.server_tls)
            reply = await self.server_leg.command(line)
        elif policy != "may":
            raise SessionEnd("no TLS to the server (ServerTLS %s): %s" % (policy, failure),
                             R_NOSERVERTLS, logging.WARNING)
        elif self.server.closed:
            log.warning("%s: %s; connecting to the server again in plaintext", self.tag, failure)
            try:
                await self.open_server()
            except destination.DestinationError as exc:
                raise SessionEnd(str(exc), R_CANTCONNECT, server_error="connect") from None
            greeting = await self.server_leg.read_reply()
            if greeting[-1][:1] != b"2":
                raise SessionEnd("server refused the plaintext connection after a failed TLS "
                                 "handshake: %s" % clean(greeting[-1].strip()), R_CANTCONNECT)
            reply = await self.server_leg.command(line)
        else:
            if self.debug:
                log.debug("%s: %s; going on in plaintext", self.tag, failure)
            if verb != b"EHLO":
                reply = await self.server_leg.command(line)
        self.relay(verb, line, reply)

    async def server_starttls(self) -> str | None:
        """STARTTLS on the server connection: None when done, else why not
        (the connection is closed then unless the server merely refused)."""
        reply = await self.server_leg.command(b"STARTTLS\r\n")
        if reply[-1][:3] != b"220":
            stats.server_tls("refused")
            return "the server refused STARTTLS: %s" % clean(reply[-1].strip())
        if self.server.pending:
            self.server.close()
            stats.server_tls("failed")
            return ("the server sent %d bytes behind its 220 to STARTTLS (plaintext injected?), "
                    "not read" % len(self.server.buf))
        try:
            await self.server.start_tls(self.config.connecting_tls, False, self.timeout,
                                        self.server_name())
        except (OSError, asyncio.TimeoutError) as exc:
            self.server.close()
            stats.server_tls("failed")
            return "TLS handshake with the server failed: %s" % tls.reason(exc)
        self.envelope.server_tls = tls.describe(self.server.transport)
        stats.server_tls("established")
        return None

    def server_name(self) -> str | None:
        """The name the server's certificate must match (ServerTLS verify) and
        SNI: OutAddress's host (name or IP literal), else the server's IP."""
        out = self.config.OutAddress
        if self.config.TransparentProxy == "off" and out is not None:
            if out.is_unix:
                return None
            if out.host and not addresses.is_unspecified(out.host):
                return out.host
        return self.envelope.server_ip

    def relay(self, verb: bytes, line: bytes, reply: list[bytes]) -> None:
        """A reply the proxy read itself goes to the client as if relayed."""
        self.replies.expect(ServerAnswers(verb, line))
        for reply_line in reply:
            self.replies.server_line(reply_line, False, self.tag, self.on_reply)


def offers_starttls(reply: list[bytes]) -> bool:
    """Does an EHLO reply advertise STARTTLS?"""
    return any(line[4:].split()[:1] and line[4:].split()[0].upper() == b"STARTTLS"
               for line in reply[1:])
