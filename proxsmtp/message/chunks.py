"""One BDAT transaction's chunks, taken from the client (RFC 3030 2).

A chunk is counted, not framed: `BDAT n [LAST]` and exactly n bytes, with
no dot-stuffing and no end line, so a `.` line or a command line inside a
chunk is message data, whatever it looks like (no SMTP smuggling across
chunk boundaries).  Every chunk of a transaction goes into one Spool
through the Transfer's Intake: the same size limit (552), Message-ID,
spool errors (451), memory budget and temp-file rules as DATA.  The spool
holds the bytes exactly as the client sent them (envelope.chunked).

The server sees nothing of the message until the LAST chunk is in: the
proxy answers each earlier chunk itself (chunk_received), and at the LAST
the Transfer takes the whole message on as after DATA's final dot
(Transfer.taken: the filter, then the offer), so the LAST chunk's reply is
the real verdict.  A chunk that fails the transaction (over the limit, the
spool failing) ends it there with its refusal: RFC 3030 2 has the client
send no more chunks, and those already pipelined find no transaction.
"""

from __future__ import annotations

from ..smtp.replies import FAILED, Status
from . import spool
from .intake import discard_chunk
from .transfer import Transfer


class Chunks:
    """The chunks of one BDAT transaction, into the message's spool."""

    def __init__(self, transfer: Transfer) -> None:
        self.transfer = transfer
        self.message: spool.Spool | None = transfer.open_spool()
        transfer.envelope.chunked = True

    @property
    def failed(self) -> bool:
        """The transaction cannot succeed: no spool, a spool error, past the
        size limit.  Its refusal is due now (finish), not at the LAST."""
        intake = self.transfer.intake
        return self.message is None or intake.too_big or bool(intake.error)

    async def take(self, size: int) -> None:
        """Read one chunk of `size` bytes into the spool (or drop it, once
        the transaction has failed): all of it, before its reply."""
        transfer = self.transfer
        if self.message is None:
            await discard_chunk(transfer.client, size, transfer.timeout)
            return
        await transfer.intake.take_chunk(self.message, size, transfer.timeout,
                                         transfer.config.KeepAlives)

    async def finish(self) -> None:
        """The LAST chunk is in, or the transaction failed: the Transfer
        gives the verdict (its final reply, or the refusal) and ends."""
        if self.message is None:
            self.transfer.refuse(FAILED, Status.FILTER_ERROR)
            return
        await self.transfer.taken(self.message)

    def close(self) -> None:
        """RSET, a new EHLO, or the session's end, mid-chunks: the spool goes."""
        self.transfer.close()
