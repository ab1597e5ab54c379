"""The message's turn at the milters (proxsmtpd(8) MILTERS), in the
Transfer's task path, before FilterType's filter.

At the final dot the whole message goes through the chain; each milter sees
it as the ones before it left it, and FilterType's filter (if any) then sees
it as the chain left it.  The verdict:

- continue or accept: the message goes on, with the milters' changes;
- reject, tempfail, replycode: the client hears the milter's reply, the
  server RSET; logged REJECTED with `milter=`;
- quarantine: Postfix holds such a message in its queue; a proxy has no
  queue, so it is refused with 451 (the client keeps it and tries again),
  and a warning says so;
- discard (at the end, or at an earlier stage): the client hears 250, the
  server RSET, nothing is delivered; logged DISCARDED.

A changed envelope (SMFIR_CHGFROM, ADDRCPT, DELRCPT) must reach the server
as the milters left it, but the client's MAIL and RCPTs were relayed to it
live, as they came: before DATA the server's transaction is reset (RSET)
and MAIL and RCPT are said again with the new envelope (`replay`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ..process.log import clean, log
from ..smtp.replies import DISCARDED, Status
from . import spool
from .envelope import Envelope

if TYPE_CHECKING:
    from ..filters.milterchain import Answer, Outcome
    from .transfer import Transfer

REFUSALS = ("reject", "tempfail", "replycode", "quarantine")


class Milters(Protocol):
    """What the Transfer needs of the session's milters (session/milters.py)."""

    discard: Answer | None      # a discard at MAIL, RCPT or DATA

    async def message(self, message: spool.Spool, envelope: Envelope,
                      directory: str) -> Outcome: ...

    def end_transaction(self) -> None: ...


async def run(transfer: Transfer, milters: Milters) -> spool.Spool | None:
    """The chain's verdict on the transfer's message: the message as the
    milters left it (the transfer holds it from now on), or None when they
    decided its fate (refused or discarded: the transfer is ending)."""
    envelope = transfer.envelope
    if milters.discard is not None:
        discard(transfer, milters.discard)
        return None
    outcome = await milters.message(transfer.message, envelope, transfer.config.TempDirectory)
    transfer.message = outcome.message
    answer = outcome.answer
    if answer.milter is not None:
        envelope.milter = answer.milter
    if answer.action == "discard":
        discard(transfer, answer)
        return None
    if answer.action in REFUSALS:
        reply = (answer.reply or b"").decode("utf-8", "surrogateescape").rstrip("\r\n")
        if answer.action == "quarantine":
            log.warning("%s: milter %s quarantined the message (%s); a proxy has no queue to "
                        "hold it in: refused with a temporary error", transfer.tag,
                        answer.milter, clean(answer.why))
        transfer.refuse(reply, Status.REJECTED)
        return None
    transfer.replay = change_envelope(envelope, outcome)
    return outcome.message


def discard(transfer: Transfer, answer: Answer) -> None:
    """A milter's discard: silent to the sender (250), nothing delivered."""
    transfer.envelope.milter = answer.milter
    log.info("%s: milter %s discarded the message", transfer.tag, answer.milter)
    transfer.refuse(DISCARDED, Status.DISCARDED)


def bare(address: str) -> str:
    address = address.strip()
    return address[1:-1] if address.startswith("<") and address.endswith(">") else address


def change_envelope(envelope: Envelope, outcome: Outcome) -> bool:
    """The envelope as the milters left it, with the MAIL and RCPT lines the
    server is to get (FilterType's filter sees the same); True if changed."""
    if outcome.sender is None and outcome.recipients is None:
        return False
    if outcome.sender is not None:
        envelope.sender = bare(outcome.sender)
        params = " " + outcome.sender_params if outcome.sender_params.strip() else ""
        envelope.mail_line = ("MAIL FROM:<%s>%s\r\n" % (envelope.sender, params)).encode(
            "utf-8", "surrogateescape")
    if outcome.recipients is not None:
        kept = dict(zip(envelope.recipients, envelope.rcpt_lines))
        recipients = list(dict.fromkeys(bare(rcpt) for rcpt in outcome.recipients))
        envelope.recipients = recipients
        envelope.rcpt_lines = [kept.get(rcpt) or ("RCPT TO:<%s>\r\n" % rcpt).encode(
            "utf-8", "surrogateescape") for rcpt in recipients]
    return True


async def replay(transfer: Transfer) -> bool:
    """The server's transaction said again with the envelope the milters
    left: RSET, MAIL, each RCPT, one at a time.  Any refusal refuses the
    whole message with the server's reply (the client heard 250 for its
    RCPTs, and a proxy cannot bounce a part of it later): False."""
    envelope, server = transfer.envelope, transfer.server
    if not envelope.recipients:
        transfer.refuse("554 5.5.1 Error: no valid recipients", Status.REJECTED)
        log.warning("%s: the milters left the message without recipients", transfer.tag)
        return False
    for line in (b"RSET\r\n", envelope.mail_line, *envelope.rcpt_lines):
        reply = await server.command(line)
        if reply[-1][:1] != b"2":
            text = b"".join(reply).decode("utf-8", "backslashreplace").rstrip("\r\n")
            log.warning("%s: the server refused %s of the milters' envelope: %s",
                    transfer.tag, clean(line.rstrip(b"\r\n")), clean(reply[-1].rstrip()))
            transfer.refuse(text, Status.REJECTED)
            return False
    return True

