"""What the proxy does with each client command: the verb -> handler table.

Command lines go to the server as the client wrote them (RFC 5321), with
the exceptions docs/BEHAVIOUR.md lists under Commands.  Each exception is a
handler in aiosmtpd's `smtp_<VERB>` shape; a verb without one is relayed.
A handler is `handler(session, line, verb)`: it runs in the relay's
callbacks (see pump.py for what one may do there) and returns None when
it is done, or a coroutine for the session's task to run when the command
waits on something (STARTTLS, XCLIENT due first, the first EHLO under
ServerTLS, a DATA that is not taken in the callbacks).

Server replies change the session's state here too (`on_reply`): the
envelope as the server accepted it (with MAIL's and RCPT's lines, whose
ESMTP parameters a filter node gets), AUTH's success, XFORWARD, RSET.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Callable, Coroutine

from .. import filters
from ..message import datapath
from ..message.chunks import Chunks
from ..message.envelope import Envelope
from ..message.intake import discard_chunk
from ..message.transfer import Transfer
from ..net.channel import CRLF
from ..process.log import clean, log
from ..smtp.replies import (R_AUTHTLS, R_BARECR, R_BDATSYNTAX, R_BINARYMIME, R_DATAAFTERBDAT,
                            R_MAILAFTERBDAT, R_NEEDMAIL, R_NEEDRCPT, R_NESTEDMAIL, R_NOTAUTH,
                            R_NOTSUPP, R_RCPTAFTERBDAT, R_SIZE, R_TOOLONG, Status, chunk_received)
from ..smtp.syntax import bdat_args, ehlo_keywords, ehlo_offers, envelope_address, parse_xforward
from .ehlo import binary_ok, client_view
from .milters import arguments
from .replyqueue import ServerAnswers
from .starttls import StartTLS, refusal_before_tls

if TYPE_CHECKING:
    from .session import Session

Handler = Callable[["Session", bytes, bytes], Coroutine[None, None, None] | None]

_SIZE_PARAM = re.compile(rb"\sSIZE=(\d{1,20})(?=\s|$)", re.I)
_BINARYMIME = re.compile(rb"\sBODY=BINARYMIME(?=\s|$)", re.I)


# --- the handlers --------------------------------------------------------------

def relay(session: Session, line: bytes, verb: bytes) -> None:
    """A command the proxy has nothing to add to: to the server, its reply
    to the client in its place (on_reply still sees RSET, XFORWARD, AUTH's 235)."""
    session.server.write(line)
    session.replies.expect(ServerAnswers(verb, line))


def smtp_EHLO(session: Session, line: bytes, verb: bytes) -> Coroutine[None, None, None] | None:
    """EHLO and HELO (RFC 5321 4.1.1.1).  The first one with ServerTLS on
    goes to the task: STARTTLS to the server before the client hears a
    reply (starttls.StartTLS.hello); under `may` only an EHLO, a HELO client gets
    plaintext."""
    note_hello(session, verb, line)
    drop_chunks(session)
    if session.milters is not None:
        return session.milters.hello(session, line, lambda: hello(session, line, verb))
    return hello(session, line, verb)


def hello(session: Session, line: bytes, verb: bytes) -> Coroutine[None, None, None] | None:
    """EHLO/HELO past the milters: to the server (with STARTTLS first, as said above)."""
    if not session.server_tls_tried and (verb == b"EHLO" or session.config.ServerTLS != "may"):
        return StartTLS(session).hello(verb, line)
    session.server.write(line)
    session.replies.expect(ServerAnswers(verb, line))
    return None


smtp_HELO = smtp_EHLO


def smtp_MAIL(session: Session, line: bytes, verb: bytes) -> Coroutine[None, None, None] | None:
    """MAIL FROM (RFC 5321 4.1.1.2): refused outright with FilterType
    reject, or with a SIZE= over the limit (RFC 1870); else relayed, its
    address kept for on_reply.  `MAIL TO:` and the like are relayed as
    they are: no envelope command."""
    if session.chunks is not None:      # the server knows nothing of the chunks so far
        session.replies.answer(R_MAILAFTERBDAT)
        return
    address = envelope_address(line)
    if address is None:
        session.server.write(line)
        session.replies.expect(ServerAnswers(verb, line))
        return
    if session.config.FilterType == "reject" and not session.skipping:
        reject_envelope(session, verb, address[1])
        return
    if too_big(session, line):
        session.replies.answer(R_SIZE)
        return
    if _BINARYMIME.search(line) and not binarymime_offered(session):
        session.replies.answer(R_BINARYMIME)
        return
    if session.milters is not None:       # the milters first: the server sees what they let by
        if session.envelope.in_transaction:
            # refused before the milters, as Postfix's smtpd does: a second
            # MAIL would tell them of a sender the server never takes
            session.replies.answer(R_NESTEDMAIL)
            return
        return session.milters.stage(session, "mail", arguments(line, address[1]), address[1],
                                     lambda: relay_envelope(session, line, verb, address[1]))
    session.server.write(line)
    session.replies.expect(ServerAnswers(verb, line, address[1]))


def smtp_RCPT(session: Session, line: bytes, verb: bytes) -> Coroutine[None, None, None] | None:
    """RCPT TO (RFC 5321 4.1.1.3): refused outright with FilterType reject;
    else relayed, its address kept for on_reply.  Not between BDAT chunks
    (RFC 3030 2: the recipients are settled by the first chunk)."""
    if session.chunks is not None:
        session.replies.answer(R_RCPTAFTERBDAT)
        return
    address = envelope_address(line)
    if address is None:
        session.server.write(line)
        session.replies.expect(ServerAnswers(verb, line))
        return
    if session.config.FilterType == "reject" and not session.skipping:
        reject_envelope(session, verb, address[1])
        return
    if session.milters is not None:
        return session.milters.stage(session, "rcpt", arguments(line, address[1]), address[1],
                                     lambda: relay_envelope(session, line, verb, address[1]))
    session.server.write(line)
    session.replies.expect(ServerAnswers(verb, line, address[1]))


def relay_envelope(session: Session, line: bytes, verb: bytes, address: str) -> None:
    """MAIL or RCPT the milters let by, to the server."""
    session.server.write(line)
    session.replies.expect(ServerAnswers(verb, line, address))


def smtp_DATA(session: Session, line: bytes, verb: bytes) -> Coroutine[None, None, None] | None:
    """DATA: its message taken in by the relay's callbacks when nothing is
    waited on meanwhile (Session.callbacks_data), else by the task
    (Session.data; with milters, their DATA stage first).  Not after BDAT
    in one transaction (RFC 3030 2: 503)."""
    if session.chunks is not None:
        session.replies.answer(R_DATAAFTERBDAT)
        return None
    if session.milters is not None:
        return session.milters.data(session)
    path = session.callbacks_data
    if path is not None:
        session.start_data(path)
        return None
    return session.data()


def smtp_STARTTLS(session: Session, line: bytes, verb: bytes) -> Coroutine[None, None, None]:
    """STARTTLS is ended in the proxy, never relayed (RFC 3207): the task
    does it (starttls.StartTLS.client)."""
    return StartTLS(session).client(line)


def smtp_AUTH(session: Session, line: bytes, verb: bytes) -> None:
    """AUTH (RFC 4954) is relayed, but not while only the server leg is
    encrypted: 538, as for a mechanism that needs encryption."""
    if auth_needs_client_tls(session.envelope):
        log.info("%s: refused AUTH from a client in plaintext: the server leg is encrypted",
                 session.tag)
        session.replies.answer(R_AUTHTLS)
        return
    session.auth_started = True
    if session.milters is not None:
        session.milters.auth_tried(line)
    session.server.write(line)
    session.replies.expect(ServerAnswers(verb, line))


def smtp_XCLIENT(session: Session, line: bytes, verb: bytes) -> None:
    """Only the proxy speaks for the client (Postfix's XCLIENT_README)."""
    log.warning("%s: client attempted use of privileged XCLIENT feature", session.tag)
    session.replies.answer(R_NOTAUTH)


def smtp_BDAT(session: Session, line: bytes, verb: bytes) -> Coroutine[None, None, None] | None:
    """BDAT (RFC 3030): by the task (bdat), once CHUNKING was offered.
    Without the offer it is not implemented: 502 at once, the line's bytes
    after it read as commands, as the server (which never sees it) and
    Postfix's smtpd read them."""
    if not session.chunking:
        log.debug("%s: ESMTP feature not supported", session.tag)
        session.replies.answer(R_NOTSUPP)
        return None
    return bdat(session, line)


def smtp_RSET(session: Session, line: bytes, verb: bytes) -> None:
    """RSET (RFC 5321 4.1.1.5) is relayed; mid-chunks the BDAT
    transaction's spool goes with it (RFC 3030 2)."""
    drop_chunks(session)
    session.server.write(line)
    session.replies.expect(ServerAnswers(verb, line))


async def bdat(session: Session, line: bytes) -> None:
    """One `BDAT n [LAST]` and its chunk, in the task: after every earlier
    reply (the envelope then is the server's), the chunk's n bytes are
    read whatever the answer (RFC 3030 2: never as commands), then answered:
    501 for a bad count (no bytes known to read), 503 without MAIL or RCPT,
    250 for a chunk that is not the LAST; the LAST's reply is the verdict
    (the filter's, then the server's), through the Transfer (Chunks.finish)."""
    if session.replies.waiting_for_server:
        await session.drain_replies()
    args = bdat_args(line)
    if args is None:
        session.replies.answer(R_BDATSYNTAX)
        return
    size, last = args
    chunks = session.chunks
    if chunks is None:
        envelope = session.envelope
        refusal = (R_NEEDMAIL if envelope.sender is None
                   else R_NEEDRCPT if not envelope.recipients else None)
        if refusal is not None:
            await discard_chunk(session.client, size, session.timeout)
            session.replies.answer(refusal)
            return
        chunks = new_chunks(session)
        if session.milters is not None:     # their DATA stage, as at DATA
            refusal = await session.milters.data_stage(session, chunks.transfer.path)
            if refusal is not None:
                await discard_chunk(session.client, size, session.timeout)
                session.transfer, session.chunks = chunks.transfer, None
                chunks.transfer.refuse(refusal.decode("utf-8", "surrogateescape").rstrip("\r\n"),
                                       Status.REJECTED)
                return
    await chunks.take(size)
    if last or chunks.failed:
        session.transfer = chunks.transfer
        session.chunks = None
        await chunks.finish()
        return
    session.replies.answer(chunk_received(size))


HANDLERS: dict[bytes, Handler] = {
    b"EHLO": smtp_EHLO,
    b"HELO": smtp_HELO,
    b"MAIL": smtp_MAIL,
    b"RCPT": smtp_RCPT,
    b"DATA": smtp_DATA,
    b"STARTTLS": smtp_STARTTLS,
    b"AUTH": smtp_AUTH,
    b"XCLIENT": smtp_XCLIENT,
    b"BDAT": smtp_BDAT,
    b"RSET": smtp_RSET,
}


def new_chunks(session: Session) -> Chunks:
    """The first BDAT chunk of a transaction: its Transfer, which takes the
    message on at the LAST chunk.  Unlike DATA, commands may follow a chunk
    in the same write (RFC 3030 4: BDAT with PIPELINING)."""
    config, envelope = session.config, session.envelope
    session.in_data = True
    session.chunks = Chunks(Transfer(
        config, envelope, session.client, session.server_leg, session.replies,
        session.data_done, datapath.choose(config, envelope, session.skipping),
        session.size_limit, session.info, session.debug, session.milters))
    return session.chunks


def drop_chunks(session: Session) -> None:
    """RSET or a new EHLO/HELO mid-chunks: the transaction's spool goes."""
    if session.chunks is not None:
        session.chunks.close()
        session.chunks = None
        session.in_data = False


# --- the screens: a line the table never sees (Pump.relay_lines chooses) -------

def too_long(session: Session, line: bytes, verb: bytes) -> None:
    """A line over LINE_LIMIT (read to its end by the channel): never relayed."""
    session.replies.answer(R_TOOLONG)


def bare_cr(session: Session, line: bytes, verb: bytes) -> None:
    """A CR not right before the LF (RFC 5321 2.3.8): a server may end the
    line there, and read the rest as another command."""
    log.warning("%s: bare CR in a command from the client: %s", session.tag, clean(line[:80]))
    session.replies.answer(R_BARECR)


def tls_first(session: Session, line: bytes, verb: bytes) -> Coroutine[None, None, None] | None:
    """A command that must wait for TLS (ClientTLS encrypt, ServerTLS
    encrypt/verify; see starttls.refusal_before_tls).  Once TLS is in place
    on the legs that must have it, it stays so for the session: the gate
    is lifted and this command takes its usual way."""
    refusal = refusal_before_tls(session)
    if refusal is not None:
        session.replies.answer(refusal)
        return None
    session.tls_gate = False
    if session.xclient_due and verb != b"STARTTLS":
        return xclient_first(session, line, verb)
    return HANDLERS.get(verb, relay)(session, line, verb)


async def xclient_first(session: Session, line: bytes, verb: bytes) -> None:
    """XClient: XCLIENT goes to the server before the client's command
    (send_xclient); then the command, in the task."""
    await send_xclient(session, verb in (b"EHLO", b"HELO"))
    if verb == b"DATA":
        await session.data()
        return
    command = HANDLERS.get(verb, relay)(session, line, verb)
    if command is not None:
        await command


# --- what the handlers share ---------------------------------------------------

def auth_needs_client_tls(envelope: Envelope) -> bool:
    """The server leg is encrypted and the client leg is not.  A server
    may offer AUTH only over TLS (Postfix's smtpd_tls_auth_only), and
    would then take credentials that crossed the client leg in cleartext:
    AUTH is neither offered to nor taken from such a client (RFC 4954 4:
    538 when the mechanism needs encryption)."""
    return not envelope.client_tls and bool(envelope.server_tls)


def note_hello(session: Session, verb: bytes, line: bytes) -> None:
    """EHLO/HELO: the client's name (and its command, said again to the
    server after XCLIENT); a HELO client gets XCLIENT anyway."""
    session.hello_line = line
    words = line.split()
    session.envelope.helo = words[1].decode("utf-8", "surrogateescape") if len(words) > 1 else ""
    if verb == b"HELO":
        log.debug("%s: XCLIENT support assumed", session.tag)
        xclient_offered(session)


def xclient_offered(session: Session) -> None:
    """The server takes XCLIENT (or is assumed to): with XClient it is due
    before the client's next command, once a session."""
    if session.config.XClient and not session.xclient_sent:
        session.xclient_due = True


def binarymime_offered(session: Session) -> bool:
    """The client's last EHLO reply offered BINARYMIME (ehlo.client_view
    keeps it only with CHUNKING and when binary_ok): a BODY=BINARYMIME
    otherwise would bring a binary body past a filter that reads text, or
    to a server that never offered it (RFC 3030 3)."""
    return (session.chunking and binary_ok(session.config)
            and "BINARYMIME" in session.server_leg.offers)


def too_big(session: Session, mail: bytes) -> bool:
    """MAIL FROM with a SIZE= above the limit: refused before any data."""
    match = _SIZE_PARAM.search(mail)
    limit = session.size_limit
    return bool(match and limit and int(match.group(1)) > limit)


def reject_envelope(session: Session, verb: bytes, address: str) -> None:
    """FilterType reject: refuse MAIL and RCPT outright, log it as the
    message: REJECTED, with the reply the client hears."""
    envelope = session.envelope
    if verb == b"MAIL":
        envelope.sender = address
    else:
        envelope.recipients = [address]
        envelope.sender = None
    reply = envelope.reply = filters.reject_reply(session.config.FilterReject)
    session.log_message(Status.REJECTED)
    envelope.reset()
    session.replies.answer(reply.encode("utf-8", "surrogateescape") + CRLF)


async def send_xclient(session: Session, hello_follows: bool) -> None:
    """XClient: tell the server who the client really is, once.

    A server that takes XCLIENT answers with a new greeting and starts
    the session over (Postfix's XCLIENT_README): the client's EHLO/HELO
    is said again, and its reply read here, before anything else.
    Without it Postfix refuses MAIL (smtpd_helo_required), or takes what
    follows as improper pipelining (smtpd_forbid_unauth_pipelining), and
    its Received line has no HELO name.  `hello_follows`: the command at
    hand is the client's own EHLO/HELO, which does it; the client then
    hears that reply, and one reply per command as ever."""
    await session.drain_replies()
    session.xclient_sent = True
    session.xclient_due = False
    tag, ip = session.tag, session.envelope.client_ip
    log.debug("%s: sending XCLIENT", tag)
    reply = await session.server_leg.command(
        b"XCLIENT ADDR=%s%s\r\n" % (b"IPv6:" if ":" in ip else b"", ip.encode()))
    if not reply[-1][:1] == b"2":
        log.warning("%s: server didn't accept XCLIENT: %s", tag, clean(reply[-1].strip()))
        return
    if hello_follows:
        return
    if not session.envelope.helo:      # the client gave no name: the server judges that
        log.debug("%s: no HELO name to give the server after XCLIENT", tag)
        return
    reply = await session.server_leg.command(session.hello_line)
    if reply[-1][:1] != b"2":       # its answer to the client's next command says the rest
        log.warning("%s: server refused %s after XCLIENT: %s", tag,
                    clean(session.hello_line.split()[0]), clean(reply[-1].strip()))


# --- server replies --------------------------------------------------------------

def on_reply(session: Session, place: ServerAnswers, lines: list[bytes]) -> list[bytes]:
    """State changes for a whole server reply; what the client gets of it.
    (Session.on_reply: the reply queue calls it for each reply it places.)"""
    if lines[-1][:1] != b"2":
        # a refused MAIL leaves the milters no transaction, but for a nested
        # one refused inside the server's (RFC 5321 4.1.4)
        if (place.verb == b"MAIL" and session.milters is not None
                and session.envelope.sender is None):
            session.milters.end_transaction()
        return lines
    verb, envelope = place.verb, session.envelope
    if verb in (b"EHLO", b"HELO"):
        envelope.reset()
        session.server_leg.offers = ehlo_keywords(lines)
        if verb == b"EHLO":
            hide_auth = auth_needs_client_tls(envelope) if envelope.server_tls else False
            lines, session.size_limit, xclient = client_view(
                lines, session.config, bool(envelope.client_tls), hide_auth, session.tag)
            session.chunking = ehlo_offers(lines, b"CHUNKING")
            if xclient:
                xclient_offered(session)
        else:
            session.chunking = False
    elif verb == b"MAIL" and place.address is not None:
        envelope.sender = place.address
        envelope.mail_line = place.line
    elif verb == b"RCPT" and place.address is not None:
        envelope.recipients.append(place.address)
        envelope.rcpt_lines.append(place.line)
    elif verb == b"XFORWARD":
        attrs = parse_xforward(place.line)
        envelope.xforward_addr = attrs.get("ADDR", envelope.xforward_addr)
        envelope.xforward_helo = attrs.get("HELO", envelope.xforward_helo)
    elif verb == b"RSET":
        envelope.reset()
        if session.milters is not None and session.milters.in_transaction:
            session.milters.end_transaction()
    elif lines[-1][:3] == b"235":
        if session.auth_started:
            log.debug("%s: client authenticated successfully", session.tag)
            session.authenticated = True
            if session.milters is not None:
                session.milters.authenticated()
        else:
            log.warning("%s: authentication success code without AUTH", session.tag)
    return lines
