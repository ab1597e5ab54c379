"""Every reply the proxy makes itself, and the status words of a message.

A reply the client hears from the proxy (rather than relayed from the
server) is one of these, in one place, so that its code, its enhanced
status code (RFC 3463) and its text agree across the code paths that send
it.  The texts follow upstream proxsmtp's where it had one, and Postfix's
smtpd otherwise, so that a client's logs read as they would for either.
"""

from __future__ import annotations

import enum

# --- the connection ---------------------------------------------------------

R_BUSY = b"421 Server busy, too many connections\r\n"
R_SHUTDOWN = b"421 4.3.2 Service shutting down\r\n"
R_CANTCONNECT = b"421 Local Error, cannot connect to server\r\n"
R_SERVERGONE = b"421 Local Error, server closed the connection\r\n"
R_REPLYTOOLONG = b"421 4.4.2 Local Error, server reply too long\r\n"
R_FAILED = b"451 Local Error\r\n"

# --- commands (RFC 5321 4.2, RFC 2920) -------------------------------------

R_TOOLONG = b"500 Line too long\r\n"
R_BARECR = b"500 5.5.2 Syntax error: bare CR in command\r\n"
R_NOTSUPP = b"502 Command not implemented\r\n"
R_NOTAUTH = b"554 Insufficient authorization\r\n"
R_SYNC = b"554 5.5.0 Error: SMTP protocol synchronization\r\n"
R_SIZE = b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
# RFC 1869 6 / RFC 5321 4.2.2: a parameter of an extension the client was not offered
R_BINARYMIME = b"555 5.5.4 BODY=BINARYMIME not offered\r\n"
# RFC 4954 4: the mechanism needs an encrypted leg to the client
R_AUTHTLS = b"538 5.7.11 Encryption required for requested authentication mechanism\r\n"
# RFC 5321 4.1.4: MAIL inside a transaction, in Postfix's smtpd's words (said
# by the proxy only with Milters, whose transaction it must keep the server's)
R_NESTEDMAIL = b"503 5.5.1 Error: nested MAIL command\r\n"

# --- BDAT (RFC 3030), in Postfix's smtpd's words -----------------------------

R_BDATSYNTAX = b"501 5.5.4 Syntax: BDAT count [LAST]\r\n"
R_NEEDMAIL = b"503 5.5.1 Error: need MAIL command\r\n"
R_NEEDRCPT = b"503 5.5.1 Error: need RCPT command\r\n"
R_DATAAFTERBDAT = b"503 5.5.1 Error: DATA after BDAT\r\n"
R_MAILAFTERBDAT = b"503 5.5.1 Error: MAIL after BDAT\r\n"
R_RCPTAFTERBDAT = b"503 5.5.1 Error: RCPT after BDAT\r\n"


def chunk_received(size: int) -> bytes:
    """The proxy's reply to a chunk that is not the LAST: the message is
    not complete, so there is no verdict yet to wait for."""
    return b"250 2.0.0 %d octets received\r\n" % size


# --- EHLO (what the proxy changes in the server's reply) ---------------------

R_FEATURE = b"250 XFILTERED\r\n"          # the last line, when the server's last was dropped
R_STARTTLS = b"250-STARTTLS\r\n"

# --- STARTTLS (RFC 3207) ----------------------------------------------------

R_TLSREADY = b"220 2.0.0 Ready to start TLS\r\n"
R_TLSACTIVE = b"503 5.5.1 Error: TLS already active\r\n"
R_TLSSYNTAX = b"501 5.5.4 Syntax: STARTTLS\r\n"
R_TLSINTXN = b"503 5.5.1 Error: MAIL transaction in progress\r\n"
R_TLSAUTHED = b"503 5.5.1 Error: already authenticated\r\n"
R_TLSFIRST = b"530 5.7.0 Must issue a STARTTLS command first\r\n"
R_NOSERVERTLS = b"421 4.7.0 TLS to the server failed, try again later\r\n"
R_SERVERPLAIN = b"451 4.7.0 TLS to the server is required and not established\r\n"

# --- DATA -------------------------------------------------------------------

# RFC 5321 4.5.3.2.6: a client waits 10 minutes for the reply to the final
# dot.  Giving up sooner makes the client retry a message the server may
# already have taken: a duplicate.
FINAL_REPLY_WAIT = 600.0

R_DATAINTERMED = b"354 Start mail input; end with <CRLF>.<CRLF>\r\n"
# the size limit, found while the message came in (after 354: RFC 1870 6.3)
TOO_BIG = "552 5.3.4 Message size exceeds fixed limit"
FAILED = "451 Local Error"
# FilterType's own refusal, when the filter gives no reply text
REJECT_PREFIX = "550 Content Rejected"
# A UTF-8 address for a filter node without SMTPUTF8: RFC 6531 3.2 forbids
# sending it; refused with the enhanced code RFC 6531 registers (5.6.7).
# (Sent anyway, Postfix answers `501 5.1.7 Bad sender address syntax`, which
# reads as a broken protocol: 451, again and again, and never a bounce.)
NOT_UTF8 = "553 5.6.7 Non-ASCII addresses not permitted by the filter node"
# A milter's discard (SMFIR_DISCARD): the message is accepted and dropped,
# silently to the sender, as Postfix does (MILTER_README)
DISCARDED = "250 2.0.0 Ok"


class Status(enum.StrEnum):
    """What became of a message: the `status=` of its log line and the
    `status` label of proxsmtpd_messages_total (proxsmtpd(8) LOGGING)."""

    FILTERED = "FILTERED"          # offered to the server (after the filter, if any); `reply=` says what it did
    REJECTED = "REJECTED"          # refused: by the filter, FilterType reject, or the size limit
    SKIPPED = "SKIPPED"            # relayed unfiltered (Skip: authenticated)
    FILTER_ERROR = "FILTER-ERROR"  # no verdict: the filter or the spool failed (451)
    DISCARDED = "DISCARDED"        # a milter discarded it: the client heard 250, nothing delivered
