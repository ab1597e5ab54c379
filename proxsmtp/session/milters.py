"""The session's milters (proxsmtpd(8) MILTERS): each stage of the client's
session goes to the chain (filters/milterchain.py) as it happens, before
the server sees the command, as Postfix's smtpd_milters do.

- connect, with the real client (after PROXY or transparency), before the
  server is connected: a refusal ends the session before the server hears
  of the client;
- HELO/EHLO, MAIL with its ESMTP arguments, each RCPT, DATA: a refusal
  answers that command, and the server never sees it;
- ABORT on RSET, a new EHLO and each transaction's end; QUIT at the end.

A stage no milter answers (rspamd asks for no reply before the end of the
message) is written and not waited for: its handler stays on the relay's
path.  Only a stage that some milter answers makes the handler return a
coroutine, which the session's task awaits.  The end of the message is
the Transfer's (message/milterstep.py), handed this object.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable, Coroutine

from .. import __version__
from ..filters.milterchain import Answer, MilterChain, Outcome
from ..message import datapath
from ..message.envelope import Envelope
from ..message.spool import Spool
from ..net import tls
from ..process import stats
from ..process.config import Config
from ..process.log import clean, log
from ..smtp.ends import SessionEnd
from ..smtp.replies import Status
from ..smtp.syntax import esmtp_params

if TYPE_CHECKING:
    import asyncio

    from .session import Session

Then = Callable[[], Coroutine[None, None, None] | None]

VERSION = "proxsmtpd " + __version__        # the `v` macro (Postfix's "Postfix 3.7.11")
MAILER = "smtp"         # {mail_mailer}, {rcpt_mailer}: every address goes on by SMTP
REFUSALS = ("reject", "tempfail", "replycode", "quarantine")


def arguments(line: bytes, address: str) -> list[str]:
    """MAIL's or RCPT's arguments as Postfix gives them to a milter:
    `<address>` then each ESMTP parameter, `KEYWORD=value`."""
    path = "<>" if address == "<>" else "<%s>" % address     # the null sender as it came
    return [path] + [key if value is None else "%s=%s" % (key, value)
                     for key, value in esmtp_params(line)]


class MilterStages:
    """One session's milter chain and what the stages have decided."""

    def __init__(self, config: Config, envelope: Envelope, tag: str) -> None:
        self.chain = MilterChain(config, tag)
        self.envelope = envelope
        self.tag = tag
        self.hostname = config.milter_hostname
        self.discard: Answer | None = None     # a discard before the end of the message
        self.tls: dict[str, str] = {}          # the HELO stage's macros: the client leg's TLS
        self.mechanism = ""                    # of the client's last AUTH command
        self.auth_type = ""                    # {auth_type}: the mechanism that succeeded
        self.in_transaction = False            # the milters have seen MAIL
        self.defaults_counted = 0              # chain.fallbacks already in /metrics
        self.tagged = {"i": tag}               # the DATA and end of message stages' macros

    # --- counting -------------------------------------------------------------

    async def timed(self, stage: str, step: Coroutine[None, None, Answer]) -> Answer:
        """A step the session waits for, timed and counted for /metrics."""
        started = time.monotonic()
        answer = await step
        stats.milter_step(stage, time.monotonic() - started)
        if answer.milter is not None and answer.action != "continue" and not answer.why:
            stats.milter_action(answer.milter, answer.action)    # the milter's own answer
        self.count_defaults()
        return answer

    def count_defaults(self) -> None:
        """MilterDefaultAction applied since the last count."""
        fallbacks = self.chain.fallbacks
        for milter, action in fallbacks[self.defaults_counted:]:
            stats.milter_action(milter, action)
        self.defaults_counted = len(fallbacks)

    def count_outcome(self, outcome: Outcome) -> None:
        """The end of the message's actions; the fallbacks among them that
        were counted at an earlier stage are not counted again."""
        already = self.defaults_counted
        for milter, action in outcome.actions:
            if action.startswith("default:") and already:
                already -= 1
                continue
            stats.milter_action(milter, action)
        self.defaults_counted = 0

    # --- the stages -------------------------------------------------------------

    def macros(self, stage: str, value: str = "") -> dict[str, str]:
        """The macros Postfix sends at each stage by default (its
        milter_*_macros), with the values Postfix gives them where they need
        no DNS and no routing of its own (proxsmtpd(8) MILTERS, Macros).  The
        connect stage's are connect()'s, the HELO stage's hello()'s."""
        if stage == "mail" or stage == "rcpt":
            # the address as Postfix's resolver gives {mail_addr}/{rcpt_addr}
            # (in lower case, the null sender empty), its domain as
            # {mail_host}/{rcpt_host} (this host's name for an address without)
            _, at, domain = value.rpartition("@")
            if at:
                address, host = value.lower(), domain
            else:
                address, host = "" if value == "<>" else value, self.hostname
            if stage == "mail":
                macros = {"i": self.tag, "{mail_addr}": address, "{mail_host}": host,
                          "{mail_mailer}": MAILER}
                if self.auth_type:
                    macros["{auth_type}"] = self.auth_type
                return macros
            return {"i": self.tag, "{rcpt_addr}": address, "{rcpt_host}": host,
                    "{rcpt_mailer}": MAILER}
        if stage == "helo":
            return self.tls
        return self.tagged

    def auth_tried(self, line: bytes) -> None:
        """The client's AUTH command (RFC 4954 4): its mechanism, for
        {auth_type} once the server accepts it.  The SASL exchange itself is
        the server's: the proxy reads no identity from it ({auth_authen},
        {auth_author})."""
        words = line.split()
        self.mechanism = words[1].decode("ascii", "replace") if len(words) > 1 else ""

    def authenticated(self) -> None:
        """The server said 235: the client authenticated with that mechanism."""
        self.auth_type = self.mechanism

    def connect_macros(self, ip: str, port: int) -> dict[str, str]:
        """The connect stage's: Postfix's (j, {daemon_name} as its default
        $myhostname, {daemon_addr}, v, _) and the client's it sends when
        asked ({client_addr}, {client_name}, {client_port}), as Postfix
        gives them for a client without a verified reverse name: the proxy
        looks up no names."""
        address = "unknown" if ip == "UNKNOWN" else ip
        local = self.envelope.local_ip
        return {"j": self.hostname, "{daemon_name}": self.hostname,
                "{daemon_addr}": "unknown" if local == "UNKNOWN" else local, "v": VERSION,
                "_": "unknown [%s]" % address,
                "{client_addr}": "IPv6:" + address if ":" in address else address,
                "{client_name}": "unknown", "{client_port}": str(port)}

    async def connect(self, session: Session) -> None:
        """The connect stage, before the server is connected: the milters
        see the real client.  A refusal ends the session (554 or 421, the
        only codes a greeting may have: RFC 5321 4.3.2), and the server never
        hears of the client."""
        envelope = self.envelope
        ip = envelope.client_ip
        family = "unknown" if ip == "UNKNOWN" else "inet6" if ":" in ip else "inet"
        header = session.proxy_header
        source = header.source if header is not None and header.source is not None \
            else session.peer
        port = source[1] if isinstance(source, tuple) and len(source) > 1 else 0
        answer = await self.timed("connect", self.chain.connect(
            self.connect_macros(ip, int(port)), "[%s]" % ip, family, int(port), ip))
        if answer.action in REFUSALS:
            reply = answer.reply or b"451 4.7.1 Service unavailable - try again later\r\n"
            code = b"554" if reply[:1] == b"5" else b"421"
            stats.connection("refused")
            raise SessionEnd("milter %s refused the connection from %s: %s"
                             % (answer.milter, ip, _last_line(reply)),
                             b"".join(code + line[3:] for line in reply.splitlines(True)),
                             logging.INFO)

    def stage(self, session: Session, stage: str, args: list[str], value: str,
              then: Then) -> Coroutine[None, None, None] | None:
        """HELO (args: the name), MAIL or RCPT through the chain, then the
        command's own handling (`then`).  A stage no milter answers is sent
        and `then` runs now; otherwise the session's task awaits the answer."""
        chain = self.chain
        if stage == "mail":
            self.in_transaction = True
        if self.discard is not None or not chain.active:
            # a discarded transaction is no milter's business any more
            # (Postfix's MILTER_SKIP_FLAGS, smtpd.c)
            return then()
        macros = self.macros(stage, value)
        call = (args[0] if stage == "helo" else args, macros)
        if chain.send_only(stage, *call):
            return then()
        return self._awaited(session, stage, call, then)

    async def _awaited(self, session: Session, stage: str, call: tuple, then: Then) -> None:
        answer = await self.timed(stage, getattr(self.chain, stage)(*call))
        reply = self.refusal(stage, answer)
        if reply is not None:
            session.replies.answer(reply)
            return
        command = then()
        if command is not None:
            await command

    def refusal(self, stage: str, answer: Answer) -> bytes | None:
        """What the client hears instead of the server for a refused stage
        (None: the command goes on); a discard is kept for the message."""
        if answer.action == "discard":
            log.info("%s: milter %s discards the transaction at %s", self.tag, answer.milter,
                     stage.upper())
            self.discard = answer
            return None
        if answer.action not in REFUSALS:
            return None
        reply = answer.reply or b"451 4.7.1 Service unavailable - try again later\r\n"
        log.info("%s: milter %s refused %s%s: %s", self.tag, answer.milter, stage.upper(),
                 " (%s)" % clean(answer.why) if answer.why else "", _last_line(reply))
        if stage == "mail":         # no transaction: the milters forget this one
            self.end_transaction()
        return reply

    def hello(self, session: Session, line: bytes,
              then: Then) -> Coroutine[None, None, None] | None:
        """A new EHLO/HELO ends any transaction (RFC 5321 4.1.4): ABORT, then
        the HELO stage."""
        if self.in_transaction:
            self.end_transaction()
        words = line.split()
        name = words[1].decode("utf-8", "surrogateescape") if len(words) > 1 else ""
        if self.envelope.client_tls:
            self.tls = tls_macros(session.client.transport)
        return self.stage(session, "helo", [name], name, then)

    async def data(self, session: Session) -> None:
        """DATA with milters (datapath says FILTERED): once earlier replies
        are relayed (recipients known), the DATA stage; a refusal answers
        DATA and the server forgets the transaction (RSET), logged REJECTED.
        Then the Transfer, which runs the end of the message."""
        session.in_data = True
        if session.replies.waiting_for_server:
            await session.drain_replies()
        path = datapath.choose(session.config, session.envelope, session.skipping)
        reply = await self.data_stage(session, path)
        if reply is not None:
            transfer = session.new_transfer(path)
            transfer.refuse(reply.decode("utf-8", "surrogateescape").rstrip("\r\n"),
                            Status.REJECTED)
            return
        await session.new_transfer(path).run()

    async def data_stage(self, session: Session, path: datapath.Path) -> bytes | None:
        """The DATA stage, at DATA or at a transaction's first BDAT chunk
        (RFC 3030): a milter's refusal (noted in the envelope), or None."""
        chain = self.chain
        if path is datapath.FILTERED and chain.active and self.discard is None:
            macros = self.macros("data")
            if not chain.send_only("data", macros):
                answer = await self.timed("data", chain.data(macros))
                reply = self.refusal("data", answer)
                if reply is not None:
                    session.envelope.milter = answer.milter
                    return reply
        return None

    # --- the message and after --------------------------------------------------

    async def message(self, message: Spool, envelope: Envelope, directory: str) -> Outcome:
        """The end of the message through the chain (message/milterstep.py)."""
        started = time.monotonic()
        outcome = await self.chain.message(message, self.macros("message"), envelope.sender or "",
                                           list(envelope.recipients), directory,
                                           not envelope.chunked)
        stats.milter_step("message", time.monotonic() - started)
        self.count_outcome(outcome)
        return outcome

    def end_transaction(self) -> None:
        """RSET, a new EHLO, a refused MAIL, the message's end: ABORT."""
        self.count_defaults()
        self.chain.abort()
        self.discard = None
        self.in_transaction = False
        self.defaults_counted = 0

    def close(self) -> None:
        """The session is over: QUIT to each milter (or QUIT_NC, kept), and
        nothing awaited: the session's end waits for nothing."""
        self.chain.close()


def tls_macros(transport: asyncio.BaseTransport | None) -> dict[str, str]:
    """The HELO stage's macros of an encrypted client leg (STARTTLS or
    TLSWrapper), as Postfix's: {tls_version}, {cipher}, {cipher_bits}.
    ({cert_subject} and {cert_issuer} name a trusted client certificate,
    and the proxy asks for none.)"""
    details = tls.details(transport)
    if details is None:
        return {}
    version, cipher, bits = details
    return {"{tls_version}": version, "{cipher}": cipher, "{cipher_bits}": str(bits)}


def _last_line(reply: bytes) -> str:
    return clean(reply.rstrip(b"\r\n").rsplit(b"\n", 1)[-1])
