"""One client session's milters (the Milters setting), in order, as Postfix's
smtpd_milters: each stage goes to each milter in turn, and the first one
that refuses ends the stage; at the end of the message each milter sees
the message as the ones before it left it.

- A milter is connected at `connect()` and kept for the session.
- One that cannot be reached, times out or breaks the protocol gets
  MilterDefaultAction, logged once: tempfail or reject answer that stage
  and every later one of the session (Postfix's milter_default_action);
  accept carries on as if it were not there.
- SMFIR_ACCEPT at connect or HELO: that milter is done for the session; at
  MAIL, RCPT, DATA or the end of the message: for the transaction.
- Reject, tempfail and replycode at connect or HELO answer every later
  stage of the session too (Postfix's MILTER8_STAT_REJECT_CON).
- Quarantine: the proxy has no queue to hold the message in, so it is
  refused with 451 (Answer "quarantine", its reason in `why`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ..message.spool import Spool
from ..process.config import Config
from ..process.log import clean, log
from . import miltercodec as codec
from . import milterpool
from .milter import Milter, MilterError
from .milteredit import Draft, EnvelopeEdits

REJECTED = b"550 5.7.1 Command rejected\r\n"
TEMPFAILED = b"451 4.7.1 Service unavailable - try again later\r\n"
SHUTDOWN = b"421 4.7.0 Server closing connection\r\n"
# MilterDefaultAction reject: Postfix's words for a milter that failed
# (milter8.c), not those of a milter's own reject.
UNAVAILABLE = b"550 5.5.0 Service unavailable\r\n"
CONTENT_FACTOR = 10            # body and end of message: Postfix's 300 s against 30 s

FAMILIES = {"inet": codec.FAMILY_INET, "inet6": codec.FAMILY_INET6,
            "unix": codec.FAMILY_UNIX, "unknown": codec.FAMILY_UNKNOWN}
SESSION_STAGES = ("connect", "helo")
FINAL = {codec.CONTINUE: "continue", codec.ACCEPT: "accept", codec.REJECT: "reject",
         codec.TEMPFAIL: "tempfail", codec.REPLYCODE: "replycode", codec.DISCARD: "discard",
         codec.SHUTDOWN: "tempfail"}
EDITS = {codec.ADDHEADER: ("addheader", codec.F_ADDHDRS),
         codec.INSHEADER: ("insheader", codec.F_ADDHDRS),
         codec.CHGHEADER: ("chgheader", codec.F_CHGHDRS),
         codec.REPLBODY: ("replbody", codec.F_CHGBODY),
         codec.CHGFROM: ("chgfrom", codec.F_CHGFROM),
         codec.ADDRCPT: ("addrcpt", codec.F_ADDRCPT),
         codec.ADDRCPT_PAR: ("addrcpt", codec.F_ADDRCPT_PAR),
         codec.DELRCPT: ("delrcpt", codec.F_DELRCPT),
         codec.QUARANTINE: ("quarantine", codec.F_QUARANTINE)}


@dataclass
class Answer:
    """A stage's answer after the chain (see the contract in docs/BEHAVIOUR.md)."""

    action: str                 # continue accept reject tempfail replycode discard quarantine
    reply: bytes | None         # what the client hears (CRLF-ended lines); None: nothing
    milter: str | None          # spec of the milter that decided; None: all continued
    why: str = ""               # for the log line


CONTINUE = Answer("continue", None, None)


@dataclass
class Outcome:
    """The end of the message, after the whole chain."""

    answer: Answer
    message: Spool              # as the milters left it (the same object if unchanged)
    sender: str | None = None   # SMFIR_CHGFROM's, or None
    sender_params: str = ""
    recipients: list[str] | None = None     # as the milters left them, or None
    actions: list[tuple[str, str]] = field(default_factory=list)


class _Slot:
    """One milter's place in the chain and what it said for the session."""

    __slots__ = ("spec", "address", "milter", "gone", "sticky", "txn_done")

    def __init__(self, address) -> None:
        self.spec = address.spec
        self.address = address
        self.milter: Milter | None = None
        self.gone = False               # no more packets this session
        self.sticky: Answer | None = None   # the answer to every later stage
        self.txn_done = False           # accepted (or discarded) this transaction

    def takes(self, stage: str) -> bool:
        return (self.sticky is None and not self.gone and self.milter is not None
                and not (self.txn_done and stage not in SESSION_STAGES))


def reply_text(data: bytes) -> bytes | None:
    """SMFIR_REPLYCODE's text as the client gets it, or None if it is no
    4xx/5xx reply (Postfix's test, applied to every line; `%%` is Sendmail's
    format-string escape)."""
    try:
        text = codec.parse_text(data).replace(b"%%", b"%")
    except codec.CodecError:
        return None
    lines = text.rstrip(b"\r\n").split(b"\r\n")
    for number, line in enumerate(lines):
        if (len(line) < 4 or line[:1] not in b"45" or line[:1] != lines[0][:1]
                or not line[1:3].isdigit() or line[3:4] not in b" -"
                or (line[4:5].isdigit() and line[4:5] != line[:1])):
            return None
        if number < len(lines) - 1:
            lines[number] = line[:3] + b"-" + line[4:]
    lines[-1] = lines[-1][:3] + b" " + lines[-1][4:]
    return b"\r\n".join(lines) + b"\r\n"


class MilterChain:
    """The milters of one client session."""

    def __init__(self, config: Config, tag: str) -> None:
        self.slots = [_Slot(address) for address in config.milters]
        self.default = config.MilterDefaultAction
        self.timeout = float(config.MilterTimeout)
        self.tag = tag
        self.fallbacks: list[tuple[str, str]] = []      # default actions this transaction
        self.reuse = config.milter_reuse    # specs whose connections outlive the session
        self.in_mail = False                # MAIL went and no ABORT since
        self.cut = False                    # a step was cut short: nothing is kept

    @property
    def active(self) -> bool:
        """Some milter still takes part (or has an answer for every stage)."""
        for slot in self.slots:
            if slot.sticky is not None or not slot.gone:
                return True
        return False

    def wants_reply(self, stage: str) -> bool:
        return self._takers(stage) is None

    def _takers(self, stage: str) -> list[_Slot] | None:
        """The milters that take this stage's packet, when none of them
        answers it; None when some milter answers it, or will say at connect
        whether it does."""
        takers = []
        for slot in self.slots:
            if slot.sticky is not None:
                return None
            milter = slot.milter
            if milter is None:
                if not slot.gone:
                    return None         # not connected yet: connect() will tell
            elif slot.takes(stage):
                if milter.replies(stage):
                    return None
                takers.append(slot)
        return takers

    def failed(self, slot: _Slot, reason: str) -> Answer | None:
        """MilterDefaultAction for a milter that failed: its answer, or None
        (accept: the chain goes on without it)."""
        if slot.milter is not None and slot.milter.reused:
            reason += " (on a connection kept from an earlier session)"
            milterpool.worker_pool().refuse(slot.spec)
        log.warning("%s: milter %s: %s; MilterDefaultAction %s", self.tag, slot.spec,
                    reason, self.default)
        if slot.milter is not None:
            slot.milter.close()
        slot.gone = True
        self.fallbacks.append((slot.spec, "default:" + self.default))
        if self.default == "accept":
            return None
        slot.sticky = Answer(self.default, UNAVAILABLE if self.default == "reject" else TEMPFAILED,
                             slot.spec, reason)
        return slot.sticky

    def _kept(self, slot: _Slot) -> bool:
        """A connection kept from an earlier session (MilterReuse) taken."""
        if slot.spec in self.reuse:
            milter = milterpool.worker_pool().take(slot.spec)
            if milter is not None:
                milter.reused = True
                slot.milter = milter
                log.debug("%s: milter %s: a kept connection", self.tag, slot.spec)
                return True
        return False

    async def _open(self, slot: _Slot) -> None:
        milter = Milter(slot.address, self.timeout)
        try:
            await milter.open()
        except MilterError as exc:
            slot.milter = milter
            self.failed(slot, str(exc))
            return
        slot.milter = milter
        log.debug("%s: milter %s: version %d, actions %#x, protocol %#x", self.tag, slot.spec,
                  milter.version, milter.actions, milter.protocol)

    def verdict(self, slot: _Slot, stage: str, code: bytes, data: bytes) -> Answer:
        """What one milter's answer to a stage means for the chain."""
        action = FINAL.get(code)
        if action is None or (data and code not in (codec.REPLYCODE,)):
            if code == codec.SKIP:
                return CONTINUE
            return self.failed(slot, "protocol error: %r at %s" % (code, stage)) or CONTINUE
        whole_session = stage in SESSION_STAGES
        if action == "continue":
            return CONTINUE
        if action == "accept":
            if whole_session:
                slot.gone = True
            slot.txn_done = True
            return Answer("accept", None, slot.spec)
        if action == "discard":
            if whole_session:
                log.warning("%s: milter %s: discard at %s is not allowed", self.tag, slot.spec,
                            stage)
                return CONTINUE
            slot.txn_done = True
            return Answer("discard", None, slot.spec)
        if code == codec.REPLYCODE:
            reply = reply_text(data)
            if reply is None:
                return (self.failed(slot, "malformed reply: %s" % clean(data)) or CONTINUE)
        else:
            reply = {codec.REJECT: REJECTED, codec.SHUTDOWN: SHUTDOWN}.get(code, TEMPFAILED)
        answer = Answer(action, reply, slot.spec, "shutdown" if code == codec.SHUTDOWN else "")
        if whole_session or code == codec.SHUTDOWN:
            slot.sticky = answer
        return answer

    async def _stage(self, stage: str, command: bytes, macros: dict[str, str]) -> Answer:
        """One stage through the chain, in order, until a milter refuses."""
        accepted = None
        if stage == "mail":
            self.in_mail = True
        for slot in self.slots:
            if slot.sticky is not None:
                return slot.sticky
            if not slot.takes(stage):
                continue
            try:
                if not slot.milter.send(stage, command, macros):
                    continue
                code, data = await slot.milter.answer(self.timeout)
            except MilterError as exc:
                answer = self.failed(slot, str(exc))
                if answer is not None:
                    return answer
                continue
            except BaseException:       # cancelled mid-step: a reply may still come
                self.cut = True
                raise
            answer = self.verdict(slot, stage, code, data)
            if answer.action == "accept":
                accepted = answer
            elif answer.action != "continue":
                return answer
        return accepted or CONTINUE

    async def connect(self, macros: dict[str, str], hostname: str, family: str,
                      port: int, address: str) -> Answer:
        """`family`: inet, inet6, unix or unknown (an inet address with a
        colon is sent as inet6)."""
        new = []
        for slot in self.slots:
            if slot.milter is None and not slot.gone and not self._kept(slot):
                new.append(slot)
        if len(new) == 1:
            await self._open(new[0])
        elif new:                       # connected side by side
            await asyncio.gather(*(self._open(slot) for slot in new))
        return await self._stage("connect", _command("connect", hostname, family, port, address),
                                 macros)

    async def helo(self, name: str, macros: dict[str, str]) -> Answer:
        return await self._stage("helo", _command("helo", name), macros)

    async def mail(self, args: list[str], macros: dict[str, str]) -> Answer:
        return await self._stage("mail", _command("mail", args), macros)

    async def rcpt(self, args: list[str], macros: dict[str, str]) -> Answer:
        return await self._stage("rcpt", _command("rcpt", args), macros)

    async def data(self, macros: dict[str, str]) -> Answer:
        return await self._stage("data", _command("data"), macros)

    def send_only(self, stage: str, *args) -> bool:
        """A stage no milter answers: its packets written, nothing awaited (a
        failure shows at the next awaited step), and True; False, and nothing
        written, when some milter answers it (wants_reply): the caller awaits
        the stage's method.  `args` as that method takes them (not connect's)."""
        takers = self._takers(stage)
        if takers is None:
            return False
        macros = args[-1]
        command = _ENCODE[stage](*args[:-1])
        if stage == "mail":
            self.in_mail = True
        for slot in takers:
            try:
                slot.milter.send(stage, command, macros)
            except MilterError as exc:
                self.failed(slot, str(exc))
        return True

    async def message(self, message: Spool, macros: dict[str, str], sender: str,
                      recipients: list[str], directory: str, stuffed: bool = True) -> Outcome:
        """Headers, body and end of message through the chain; the changes
        applied.  A message that is refused is returned as it came.
        `stuffed`: the spool is DATA's, dot-stuffed (not BDAT's)."""
        for slot in self.slots:
            if slot.sticky is not None or slot.takes("eob"):
                break
        else:                           # no milter has a say in this message
            outcome = Outcome(CONTINUE, message, actions=self.fallbacks)
            self._transaction_over()
            return outcome
        draft = Draft(message, stuffed)
        envelope = EnvelopeEdits(recipients)
        actions: list[tuple[str, str]] = []
        answer = CONTINUE
        try:
            for slot in self.slots:
                if slot.sticky is not None:
                    answer = slot.sticky
                    break
                if not slot.takes("eob"):
                    continue
                answer = await self._one_message(slot, draft, envelope, macros, actions)
                if answer.action not in ("continue", "accept"):
                    break
            else:
                answer = CONTINUE if answer.action == "accept" else answer
        except BaseException:
            self.cut = True
            draft.discard()
            raise
        finally:
            actions.extend(self.fallbacks)
            self._transaction_over()
        outcome = Outcome(answer, message, actions=actions)
        if answer.action != "continue" and answer.action != "accept":
            draft.discard()
            return outcome
        if draft.changed:
            outcome.message = draft.write(directory)
            message.remove()
        outcome.sender, outcome.sender_params = envelope.sender, envelope.sender_params
        outcome.recipients = envelope.recipients
        return outcome

    async def _one_message(self, slot: _Slot, draft: Draft, envelope: EnvelopeEdits,
                           macros: dict[str, str], actions: list[tuple[str, str]]) -> Answer:
        """One milter's turn at the message; its changes applied if it lets the message on."""
        edits: list[tuple[bytes, tuple]] = []
        body: Spool | None = None
        try:
            code, data = await exchange(slot.milter, draft, macros, self.timeout)
            if code == codec.BODYEOB:
                code, data, body = await _requests(slot.milter, edits, self.timeout,
                                                   draft.message.directory)
        except MilterError as exc:           # (its default action is among the fallbacks)
            if body is not None:
                body.remove()
            return self.failed(slot, str(exc)) or CONTINUE
        answer = self.verdict(slot, "eob", code, data)
        if slot.gone:                           # a malformed verdict: failed() had it
            if body is not None:
                body.remove()
            return answer
        if answer.action in ("continue", "accept"):
            quarantine = apply(slot, edits, body, draft, envelope, actions)
            if quarantine is not None:
                answer = Answer("quarantine", TEMPFAILED, slot.spec, "quarantine: " + quarantine)
        elif body is not None:
            body.remove()
        actions.append((slot.spec, answer.action))
        return answer

    def _transaction_over(self) -> None:
        self.fallbacks = []
        for slot in self.slots:
            slot.txn_done = False

    def abort(self) -> None:
        """SMFIC_ABORT to every milter in the session (RSET, a transaction's
        end, a new EHLO); nothing is awaited."""
        for slot in self.slots:
            if slot.milter is not None and not slot.gone and slot.sticky is None:
                try:
                    slot.milter.abort()
                except MilterError as exc:
                    self.failed(slot, str(exc))
        self.in_mail = False
        self._transaction_over()

    def close(self) -> None:
        """SMFIC_QUIT to each milter, and its connection closed; or, for a
        milter in MilterReuse whose conversation ended cleanly (no step cut
        short, nothing owed or unread), SMFIC_QUIT_NC and the connection
        kept for the worker's next client session (milterpool.py)."""
        for slot in self.slots:
            milter = slot.milter
            if milter is not None:
                link = milter.link
                if (slot.spec in self.reuse and not self.cut and milter.alive
                        and link.waiter is None and not link.packets):
                    if self.in_mail:
                        milter.abort()
                    milterpool.worker_pool().give_back(milter)
                else:
                    milter.close()
                slot.milter = None
            slot.gone = True


EOH, BODYEOB = codec.simple(codec.EOH), codec.simple(codec.BODYEOB)


def _command(stage: str, *args) -> bytes:
    if stage == "connect":
        hostname, family, port, address = args
        code = FAMILIES.get(family, codec.FAMILY_UNKNOWN)
        if code == codec.FAMILY_INET and ":" in address:
            code = codec.FAMILY_INET6
        return codec.connect(hostname, code, port, address)
    return _ENCODE[stage](*args)


DATA = codec.simple(codec.DATA)
# The packet of each stage after connect, from the stage method's arguments.
_ENCODE = {"helo": codec.helo, "mail": codec.mail, "rcpt": codec.rcpt, "data": lambda: DATA}


async def exchange(milter: Milter, draft: Draft, macros: dict[str, str],
                   timeout: float) -> tuple[bytes, bytes]:
    """Header fields, end of headers, body chunks and end of body to one
    milter; a reply that ends the message early (anything but continue, or
    SMFIR_SKIP in the body), or (BODYEOB, b"") when the end of body was sent
    and its answers are to be read.  What expects no reply is held back and
    goes in as few writes as its size allows: what leads up to the body
    (macros, the fields, EOH) as one piece when nothing in it is answered."""
    # (libmilter takes macros for EOH, not for HEADER: they go first)
    given = codec.macro(codec.EOH, macros) if macros else b""
    ahead = [given] if given else []
    protocol = milter.protocol      # (Milter.sends and Milter.replies, read once)
    if not protocol & codec.P_NOHDRS:
        fields = draft.header_values(milter.leadspace)
        if protocol & codec.P_NR_HDR:       # no reply: the fields held back with the rest
            ahead += [codec.header(name, value) for name, value in fields]
        else:
            for name, value in fields:
                ahead.append(codec.header(name, value))
                milter.queue(b"".join(ahead))
                ahead = []
                code, data = await milter.answer(timeout)
                if code == codec.SKIP:          # the rest of the header fields
                    break
                if code != codec.CONTINUE:
                    return code, data
    if not protocol & codec.P_NOEOH:
        ahead.append(EOH)
        if not protocol & codec.P_NR_EOH:
            milter.queue(b"".join(ahead))
            ahead = []
            code, data = await milter.answer(timeout)
            if code != codec.CONTINUE:
                return code, data
    if ahead:
        milter.queue(b"".join(ahead))
    if not protocol & codec.P_NOBODY:
        code, data = await _body(milter, draft, timeout * CONTENT_FACTOR)
        if code not in (codec.CONTINUE, codec.SKIP):
            return code, data
    milter.write(codec.restage(given, codec.BODYEOB) + BODYEOB if given else BODYEOB)
    return codec.BODYEOB, b""


async def _body(milter: Milter, draft: Draft, timeout: float) -> tuple[bytes, bytes]:
    due = milter.replies("body")
    for chunk in draft.body_chunks():
        milter.queue(codec.body(chunk))
        if due:
            code, data = await milter.answer(timeout)
            if code != codec.CONTINUE:
                return code, data
        elif not milter.held:
            await milter.drain(timeout)
    return codec.CONTINUE, b""


async def _requests(milter: Milter, edits: list[tuple[bytes, tuple]], timeout: float,
                    directory: str) -> tuple[bytes, bytes, Spool | None]:
    """The milter's end-of-message requests, up to its verdict: (verdict,
    its data, a replacement body or None); the requests, parsed, go into
    `edits`.  One the milter may not make, or cannot be parsed, is a
    protocol error (Postfix: milter8_conf_error)."""
    body: Spool | None = None
    try:
        while True:
            code, data = await milter.answer(timeout * CONTENT_FACTOR)
            if code in FINAL:
                return code, data, body
            what = EDITS.get(code)
            if what is None or not milter.actions & what[1]:
                raise milter.broken("%r at end of message" % code)
            if code == codec.REPLBODY:
                if body is None:
                    body = Spool(directory, in_memory=True)
                body.write(data)
                continue
            try:
                edits.append((code, PARSERS[code](data)))
            except codec.CodecError as exc:
                raise milter.broken("%s: %s" % (what[0], exc)) from None
    except BaseException:
        if body is not None:
            body.remove()
        raise


PARSERS = {codec.ADDHEADER: codec.parse_header, codec.INSHEADER: codec.parse_index_header,
           codec.CHGHEADER: codec.parse_index_header, codec.CHGFROM: codec.parse_chgfrom,
           codec.ADDRCPT: lambda data: (codec.parse_text(data),),
           codec.ADDRCPT_PAR: codec.parse_chgfrom,
           codec.DELRCPT: lambda data: (codec.parse_text(data),),
           codec.QUARANTINE: lambda data: (codec.parse_text(data),)}


def apply(slot: _Slot, edits: list[tuple[bytes, tuple]], body: Spool | None, draft: Draft,
          envelope: EnvelopeEdits, actions: list[tuple[str, str]]) -> str | None:
    """One milter's requests applied in order; the quarantine reason, if any.
    (ADDRCPT_PAR's ESMTP arguments are not kept: the recipient goes without.)"""
    space = not slot.milter.leadspace
    quarantine = None
    if body is not None:
        body.finish()
        draft.replace_body(body)
        actions.append((slot.spec, "replbody"))
    for code, args in edits:
        if code == codec.ADDHEADER:
            draft.add(args[0], args[1], space)
        elif code == codec.INSHEADER:
            draft.insert(*args, space)
        elif code == codec.CHGHEADER:
            draft.change(*args, space)
        elif code == codec.CHGFROM:
            envelope.change_sender(_text(args[0]), _text(args[1]))
        elif code in (codec.ADDRCPT, codec.ADDRCPT_PAR):
            envelope.add_recipient(_text(args[0]))
        elif code == codec.DELRCPT:
            envelope.delete_recipient(_text(args[0]))
        else:
            quarantine = clean(args[0])
            continue
        actions.append((slot.spec, EDITS[code][0]))
    return quarantine


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")
