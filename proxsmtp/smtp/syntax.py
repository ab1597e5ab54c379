"""Reading SMTP command lines: the verb, MAIL/RCPT addresses and ESMTP
parameters, XFORWARD attributes.

The relay passes command lines on as the client wrote them; these helpers
only extract what the proxy must know (the envelope for the filter and the
log line, RFC 5321 4.1.1.2-3) and never rewrite a line.
"""

from __future__ import annotations

import re

# RFC 3030 2: bdat-cmd = "BDAT" SP chunk-size [ SP end-marker ] CR LF, chunk-size = 1*DIGIT,
# end-marker = "LAST" (case-insensitive, as every SMTP keyword).  Twenty digits bound the
# number a client may make the proxy parse; no message comes near it.
_BDAT = re.compile(rb"BDAT[ \t]+(\d{1,20})(?:[ \t]+(LAST))?", re.I)
MAIL = re.compile(rb"^\s*MAIL\s+FROM\s*:(.*)$", re.I | re.S)
RCPT = re.compile(rb"^\s*RCPT\s+TO\s*:(.*)$", re.I | re.S)

# RFC 5321 4.1.2: esmtp-keyword, and esmtp-value (any CHAR but "=", SP and
# controls; RFC 6531 3.3 adds UTF-8).  Surrogates stand for bytes that were
# no UTF-8 (surrogateescape): no value.
_ESMTP_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_ESMTP_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e\u0080-\ud7ff\ue000-\U0010ffff]+\Z")


def verb_of(line: bytes) -> bytes:
    """The command's first word, upper-cased (b"" for a blank line)."""
    words = line.split(None, 1)
    return words[0].upper() if words else b""


def parse_address(arg: bytes) -> str:
    """The address of a MAIL FROM/RCPT TO argument, without angle brackets.

    Without brackets it is the first word: what follows are ESMTP parameters."""
    text = arg.decode("utf-8", "surrogateescape").strip()
    if text.startswith("<>"):
        return "<>"
    if text.startswith("<"):
        end = text.find(">")
        if end > 0:
            return text[1:end]
    return text.split()[0] if text.split() else ""


def envelope_address(line: bytes) -> tuple[bytes, str] | None:
    """(b"MAIL" or b"RCPT", address) for a MAIL FROM:/RCPT TO: line, else None.

    A lax server may accept `MAIL TO:` or a bare `RCPT`: those are no
    envelope commands here, so nothing is recorded for them."""
    match = MAIL.match(line)
    if match:
        return b"MAIL", parse_address(match.group(1))
    match = RCPT.match(line)
    if match:
        return b"RCPT", parse_address(match.group(1))
    return None


def esmtp_params(line: bytes) -> list[tuple[str, str | None]]:
    """The ESMTP parameters of a MAIL FROM/RCPT TO line (RFC 5321 4.1.2
    Mail-parameters, Rcpt-parameters): (keyword, value or None), as the
    client wrote them, in order, the first of a keyword repeated.  A word
    that is no esmtp-param is left out; any line gives a list, never an
    exception."""
    text = line.decode("utf-8", "surrogateescape").rstrip("\r\n")
    _, colon, arg = text.partition(":")
    params: list[tuple[str, str | None]] = []
    if not colon:
        return params
    rest = _after_path(arg.lstrip(" \t"))
    if not rest.strip(" \t"):      # the path alone: the common case
        return params
    seen = set()
    for word in re.split(r"[ \t]+", rest):
        keyword, eq, value = word.partition("=")
        if not _ESMTP_KEYWORD.match(keyword) or eq and not _ESMTP_VALUE.match(value):
            continue
        if keyword.upper() not in seen:
            seen.add(keyword.upper())
            params.append((keyword, value if eq else None))
    return params


def _after_path(arg: str) -> str:
    """What follows the reverse-path or forward-path at the start of `arg`:
    `<...>` up to its `>` outside a quoted local part (RFC 5321 4.1.2
    Quoted-string), else the first word (a lax client's bare address)."""
    if not arg.startswith("<"):
        parts = re.split(r"[ \t]+", arg, 1)
        return parts[1] if len(parts) > 1 else ""
    if '"' not in arg:      # no quoted local part: the first `>` ends the path
        end = arg.find(">")
        return arg[end + 1:] if end >= 0 else ""
    quoted = escaped = False
    for at, char in enumerate(arg):
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return arg[at + 1:]
    return ""


def parse_xforward(line: bytes) -> dict[str, str]:
    """ATTR=value pairs of an XFORWARD command (xtext decoded, [brackets] removed)."""
    attrs = {}
    for word in line.decode("utf-8", "surrogateescape").split()[1:]:
        name, eq, value = word.partition("=")
        if not eq:
            continue
        value = re.sub(r"\+([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), value)
        if value.startswith("[") and value.endswith("]"):
            value = value[1:-1]
        attrs[name.upper()] = value
    return attrs


def bdat_args(line: bytes) -> tuple[int, bool] | None:
    """(chunk size, whether it is the LAST) of a BDAT command line, or None
    for a line that is no `BDAT n [LAST]` (RFC 3030 2; 501 for the client)."""
    match = _BDAT.fullmatch(line.strip(b" \t\r\n"))
    if match is None:
        return None
    return int(match.group(1)), match.group(2) is not None


def is_continued(line: bytes) -> bool:
    """`250-...`: more lines of this reply follow."""
    return len(line) > 3 and line[3:4] == b"-" and line[:3].isdigit()


def ehlo_offers(reply: list[bytes], keyword: bytes) -> bool:
    """Does an EHLO reply advertise `keyword` (upper case)?  Each line after
    the first is a keyword and its parameters (RFC 5321 4.1.1.1)."""
    for line in reply[1:]:
        words = line[4:].split(None, 1)
        if words and words[0].upper() == keyword:
            return True
    return False


def ehlo_keywords(reply: list[bytes]) -> set[str]:
    """The keywords (upper case) an EHLO reply advertises, one per line
    after the first (RFC 5321 4.1.1.1)."""
    found = set()
    for line in reply[1:]:
        words = line[4:].split(None, 1)
        if words:
            found.add(words[0].decode("ascii", "replace").upper())
    return found


def xtext(value: str) -> str:
    """RFC 1891 xtext, as XCLIENT attribute values need."""
    if value.isascii() and value.isprintable() and " " not in value and "+" not in value \
            and "=" not in value:
        return value        # every character stands for itself (33-126 but + and =)
    return "".join(c if 33 <= ord(c) <= 126 and c not in "+=" else "+%02X" % ord(c)
                   for c in value.encode("utf-8", "replace").decode("latin-1"))
