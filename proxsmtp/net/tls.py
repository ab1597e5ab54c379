"""TLS on both legs (proxsmtpd(8) TLS): the policies and the contexts they need.

The contexts are made once per configuration load, in the master, so a
renewed certificate is picked up by the workers a SIGHUP starts, and a
certificate that does not load (or does not match its key) is a
configuration error like any other: exit 2 at start, the old configuration
kept on reload.  The `ssl` module's defaults are kept (its cipher list,
certificate checks) with TLS 1.2 as the oldest protocol on both legs.
"""

from __future__ import annotations

import asyncio
import ssl

from . import tlssessions

CLIENT_POLICIES = ("off", "may", "encrypt")
SERVER_POLICIES = ("off", "may", "encrypt", "verify")


# The most plaintext one TLS record carries (RFC 8446 5.1, RFC 5246 6.2.1).
RECORD_MAX = 16384


class RecordReads(ssl.SSLObject):
    """The loop's TLS protocol asks for up to 256 KiB at each read (uvloop's
    and asyncio's SSL_READ_MAX_SIZE): the ssl module allocates that much for
    every call, above the workers' mmap threshold (process/worker.py), so
    each read of a few bytes cost an mmap, a page fault and a munmap.  One
    read never returns more than one record, so asking for a record's worth
    loses nothing: the protocol reads again while data is pending."""

    def read(self, len: int = 1024, buffer: memoryview | bytearray | None = None):
        if buffer is None and len > RECORD_MAX:
            len = RECORD_MAX
        return super().read(len, buffer)


class TLSSetupError(Exception):
    """A certificate, key or CA file that cannot be used (says which and why)."""


def reason(exc: BaseException) -> str:
    """A short why for the log: the OpenSSL reason, the errno text, or the message.
    A failed certificate check says which check failed (OpenSSL's verify
    message: an unknown CA, an expired certificate, a host name mismatch):
    the operator's fix differs for each."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return "%s (%s)" % (exc.reason or "certificate verify failed", exc.verify_message)
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def listening_context(certificate: str, key: str) -> ssl.SSLContext:
    """The proxy's identity towards clients (STARTTLS and TLSWrapper).
    load_cert_chain checks that the key matches the certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.sslobject_class = RecordReads
    try:
        context.load_cert_chain(certificate, key)
    except (OSError, ValueError) as exc:
        raise TLSSetupError("can't load %s with key %s: %s"
                            % (certificate, key, reason(exc))) from None
    return context


def connecting_context(policy: str, cafile: str | None) -> ssl.SSLContext | None:
    """The context for STARTTLS towards servers (and a filter node), or None
    when the policy is off.  may/encrypt accept any certificate (encryption
    against passive listeners, as opportunistic SMTP TLS does); verify checks
    the chain against `cafile` (or the system store) and the host name."""
    if policy == "off":
        return None
    try:
        # a ClientContext: it resumes sessions (tlssessions)
        if policy == "verify":
            context = tlssessions.client_context(cafile)
        else:
            context = tlssessions.client_context(None)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            if cafile:      # a broken file is an error whatever the policy
                context.load_verify_locations(cafile)
    except (OSError, ValueError) as exc:
        raise TLSSetupError("can't load CA file %s: %s" % (cafile, reason(exc))) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.sslobject_class = RecordReads
    return context


def resumed(transport: asyncio.BaseTransport | None) -> bool:
    """The TLS of `transport` resumed a session (an abbreviated handshake)."""
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    return ssl_object is not None and ssl_object.session_reused


def details(transport: asyncio.BaseTransport | None) -> tuple[str, str, int] | None:
    """(protocol version, cipher, its secret bits) of a TLS transport, as
    OpenSSL names them; None for plaintext."""
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher() or ("", "", 0)
    return ssl_object.version() or "", cipher[0], cipher[2]


def describe(transport: asyncio.BaseTransport | None) -> str:
    """`TLSv1.3 TLS_AES_256_GCM_SHA384` for a TLS transport, '' for plaintext."""
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return ""
    cipher = ssl_object.cipher()
    return "%s %s" % (ssl_object.version(), cipher[0] if cipher else "")

