"""The Header template: escapes `\\r \\n \\t \\\\`, and `%i %l %d %t %%`.

A template's mistakes are found once, when the configuration is loaded
(`problems()`); rendering it for each message then only leaves them out.
"""

from __future__ import annotations

import re
import time

from ..process.log import log

MAX_HEADER_LENGTH = 1023
_ESCAPES = {"r": "\r", "n": "\n", "t": "\t"}
_SYMBOLS = "ildt%"
_FIELD = re.compile(r"^[\x21-\x39\x3b-\x7e]+:")    # RFC 5322 field name, then a colon


def date() -> str:
    """`Tue Nov 24 17:10:00 2026 +0100 (CET)`: asctime plus offset and zone."""
    now = time.localtime()
    return "%s %s (%s)" % (time.asctime(now), time.strftime("%z", now), time.strftime("%Z", now))


def problems(template: str) -> list[str]:
    """What is wrong with a template, in words, for warnings at load."""
    found = []
    for match in re.finditer(r"%(.)|\\(.)", template, re.S):
        symbol, escape = match.group(1), match.group(2)
        if symbol is not None and symbol not in _SYMBOLS:
            found.append("unknown symbol %%%s is left out (known: %%i %%l %%d %%t %%%%)" % symbol)
        elif escape is not None and escape not in _ESCAPES and escape != "\\":
            found.append("unknown escape \\%s stands for %s (known: \\r \\n \\t \\\\)"
                         % (escape, escape))
    if not _FIELD.match(template):
        found.append('"%s" does not start with a header name and a colon (expected e.g. '
                     '"X-Filtered: by proxsmtpd")' % template[:40])
    return found


def render(template: str, client_ip: str, local_ip: str, tag: str = "",
           client_tls: str = "") -> bytes:
    """Expand the template for one message; an unknown `%x` is left out
    (problems() warned about it at load).  `%t` is the client's TLS
    (`TLSv1.3 TLS_AES_256_GCM_SHA384`), `none` in plaintext, e.g. for a
    Received: line."""
    out: list[str] = []
    i, n = 0, len(template)
    while i < n:
        ch = template[i]
        if ch == "\\" and i + 1 < n:
            i += 1
            out.append(_ESCAPES.get(template[i], template[i]))
        elif ch == "%" and i + 1 < n:
            i += 1
            symbol = template[i]
            if symbol == "i":
                out.append(client_ip)
            elif symbol == "l":
                out.append(local_ip)
            elif symbol == "d":
                out.append(date())
            elif symbol == "t":
                out.append(client_tls or "none")
            elif symbol == "%":
                out.append("%")
            else:
                log.debug("%s: left out unknown header symbol %%%s", tag, symbol)
        else:
            out.append(ch)
        i += 1
    return "".join(out).encode("utf-8", "surrogateescape")[:MAX_HEADER_LENGTH]


def is_received(header: bytes) -> bool:
    """A Received: header goes first in the message, others at the end of the headers."""
    return header[:9].lower() == b"received:"


_MESSAGE_ID = re.compile(rb"^Message-ID[ \t]*:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.I | re.M)
HEAD_LIMIT = 32 * 1024       # bytes of a message looked at for its Message-ID


def message_id(head: bytes) -> str | None:
    """The Message-ID header of a message whose first bytes are `head`
    (unfolded, as sent; None when the header block has none)."""
    end = min((i for i in (head.find(b"\r\n\r\n"), head.find(b"\n\n")) if i >= 0), default=len(head))
    match = _MESSAGE_ID.search(head, 0, end)
    if not match:
        return None
    value = b" ".join(match.group(1).split())
    return value.decode("utf-8", "backslashreplace") or None
