"""What is known about one message: who sent it, to whom, from where — and
what became of it.  Also which leg was encrypted (client_tls, server_tls).

The session fills an Envelope as the server accepts MAIL, RCPT and XFORWARD;
filters read it (environment, XCLIENT to a filter node) and never see the
session itself; a filter node's accepting reply is noted in it for the log.
The per-message log line is built from it, so the line and the filter
always agree on the facts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..process.log import clean
from ..smtp.replies import Status


@dataclass
class Envelope:
    """Facts of the connection (kept) and of the current transaction (reset)."""

    tag: str                                 # session id, as in every log line
    client_ip: str = "UNKNOWN"
    local_ip: str = "UNKNOWN"                # the address the client connected to
    server_ip: str = "UNKNOWN"
    helo: str | None = None
    client_tls: str = ""                     # "TLSv1.3 TLS_AES_256_GCM_SHA384"; "" in plaintext
    server_tls: str = ""
    sender: str | None = None
    recipients: list[str] = field(default_factory=list)
    # MAIL and each RCPT as the client wrote them and the server accepted
    # them: their ESMTP parameters (syntax.esmtp_params) are read only when
    # a filter node is offered the message, never on the relay's path
    mail_line: bytes = b""
    rcpt_lines: list[bytes] = field(default_factory=list)     # in `recipients`' order
    xforward_addr: str | None = None
    xforward_helo: str | None = None
    # the message came by BDAT (RFC 3030): its spool holds the bytes as the
    # client sent them, with no dot-stuffing to take off or put back
    chunked: bool = False
    # what became of the message, for the log line (proxsmtpd(8) LOGGING, `status=`)
    size: int | None = None
    msgid: str | None = None
    delay: float | None = None               # seconds from DATA to the final reply
    filter_seconds: float | None = None
    filter_reply: str | None = None          # a filter node's reply accepting the message
    reply: str | None = None                 # its last reply: the server's, or the refusal
    milter: str | None = None                # the milter that decided (its Milters spec)

    def reset(self) -> None:
        """Forget sender, recipients, XFORWARD data and the outcome (RSET, EHLO, after DATA)."""
        self.sender = None
        self.recipients = []
        self.rcpt_lines = []
        self.mail_line = b""
        self.xforward_addr = self.xforward_helo = None
        self.chunked = False
        self.size = self.msgid = self.delay = self.filter_seconds = self.filter_reply = None
        self.reply = self.milter = None

    @property
    def in_transaction(self) -> bool:
        return self.sender is not None

    def log_line(self, status: Status) -> str:
        """`client=..., from=..., to=..., size=..., ..., status=...`: one line,
        every network-supplied value cleaned."""
        parts = ["client=" + self.client_ip]
        if self.sender is not None:
            parts.append("from=" + clean(self.sender, 256))
        parts.extend("to=" + clean(rcpt, 256) for rcpt in self.recipients)
        if self.size is not None:
            parts.append("size=%d" % self.size)
        if self.msgid:
            parts.append("msgid=" + clean(self.msgid, 256))
        if self.delay is not None:              # the server had its say on it
            parts.append("relay=" + self.server_ip)
            parts.append("delay=%.3f" % self.delay)
        if self.filter_seconds is not None:
            parts.append("filter=%.3f" % self.filter_seconds)
        if self.filter_reply is not None:
            parts.append('filter_reply="%s"' % clean(self.filter_reply, 256).replace('"', "'"))
        if self.reply is not None:
            parts.append('reply="%s"' % clean(self.reply, 256).replace('"', "'"))
        if self.milter is not None:
            parts.append("milter=" + clean(self.milter, 256))
        if self.client_tls or self.server_tls:     # both plaintext: the line as upstream's
            parts.append("client_tls=" + _tls(self.client_tls))
            parts.append("server_tls=" + _tls(self.server_tls))
        parts.append("status=" + status)
        return ", ".join(parts)


def _tls(described: str) -> str:
    """`TLSv1.3/TLS_AES_256_GCM_SHA384` (one word in the log line), or `none`."""
    return described.replace(" ", "/") if described else "none"
