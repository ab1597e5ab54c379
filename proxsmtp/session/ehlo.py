"""The server's EHLO reply as the client sees it.

The proxy passes what it can pass through and hides what it cannot: the
keywords of FILTERED_FEATURES, the server's STARTTLS (the client's TLS is
the proxy's own offer, ClientTLS), AUTH while only the server leg is
encrypted (RFC 4954 4).  CHUNKING passes (RFC 3030): a BDAT message goes
on by BDAT, byte for byte.  BINARYMIME passes only with CHUNKING and only
when no filter reads the message (`binary_ok`).  SIZE (RFC 1870) is noted, since the proxy enforces
the server's limit too, and with MaxMessageSize it says the smaller one.
PIPELINING passes (RFC 2920): the reply queue keeps every reply in order.
"""

from __future__ import annotations

from ..process.config import Config
from ..process.log import clean, log
from ..smtp.replies import R_FEATURE, R_STARTTLS
from ..smtp.syntax import ehlo_offers

FILTERED_FEATURES = {b"STARTTLS", b"CHECKPOINT", b"XCLIENT", b"XEXCH50"}


def binary_ok(config: Config) -> bool:
    """Can every configured filter take a binary message (RFC 3030 3)?
    Without a filter (or with FilterType reject, which reads nothing) the
    server alone decides.  Not FilterType pipe or file: their commands are
    mail filters that read and rewrite text lines.  Not FilterType smtp:
    the node's extensions are learnt per message, after the client's EHLO,
    and a node without BINARYMIME could only be given the message by DATA,
    which a binary body cannot take (RFC 3030 3).  Not with Milters: they
    read the message as text (headers, DKIM's canonical lines), and
    Postfix, whose milter client they are written for, offers no
    BINARYMIME."""
    return (not config.FilterCommand or config.FilterType == "reject") and not config.Milters


def size_limit(mine: int, server: int) -> int:
    """The largest message taken: the smaller of MaxMessageSize (`mine`)
    and the server's SIZE (0: none given); 0 for no limit."""
    if mine > 0 and server > 0:
        return min(mine, server)
    return mine if mine > 0 else max(server, 0)


def client_view(lines: list[bytes], config: Config, client_tls: bool, hide_auth: bool,
                tag: str) -> tuple[list[bytes], int, bool]:
    """(the reply the client gets, the size limit now, whether the server
    takes XCLIENT) for the server's `250` EHLO reply `lines`.

    The reply stays well formed: a dropped last line becomes `250
    XFILTERED`, SIZE is added if the server gave none, and a one-line reply
    becomes two when STARTTLS is offered.  `client_tls`: the client leg is
    encrypted already; `hide_auth`: AUTH and the old `AUTH=` go."""
    kept = lines[:1]
    binary = binary_ok(config) and ehlo_offers(lines, b"CHUNKING")
    server_size = 0
    size_at = None
    xclient = False
    for line in lines[1:]:
        words = line[4:].split()
        keyword = words[0].upper() if words else b""
        if keyword == b"XCLIENT":
            log.debug("%s: XCLIENT supported", tag)
            xclient = True
        if keyword in FILTERED_FEATURES or (keyword == b"BINARYMIME" and not binary) or (
                hide_auth and (keyword == b"AUTH" or keyword.startswith(b"AUTH="))):
            log.debug("%s: filtered ESMTP feature: %s", tag, clean(line.strip()))
            if line is lines[-1]:
                kept.append(R_FEATURE)
            continue
        if keyword == b"SIZE":
            size_at = len(kept)
            if len(words) > 1 and words[1].isdigit() and len(words[1]) <= 20:
                server_size = int(words[1])
        kept.append(line)
    limit = size_limit(config.MaxMessageSize, server_size)
    if config.MaxMessageSize:
        size = b"250-SIZE %d\r\n" % limit
        if size_at is not None:
            kept[size_at] = kept[size_at][:4] + size[4:]
        elif len(kept) > 1:
            kept.insert(len(kept) - 1, size)
        else:
            kept = [b"250-" + kept[0][4:], b"250 " + size[4:]]
    if config.ClientTLS != "off" and not client_tls:
        first = kept[0]
        if len(kept) == 1:          # `250 name` becomes `250-name`, STARTTLS goes last
            kept = [first[:3] + b"-" + first[4 if first[3:4] == b" " else 3:],
                    b"250 STARTTLS\r\n"]
        else:
            kept.insert(1, R_STARTTLS)
    return kept, limit, xclient
