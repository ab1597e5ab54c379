"""The message as the milters see it and change it, one milter after another.

The spool holds the message as the client sent it: dot-stuffed after DATA
(net/channel.py keeps the bytes), as it is after BDAT, which has no
dot-stuffing (RFC 3030 2; `stuffed` False).  Milters see it as an MTA stores it: the
header fields one by one, values as they follow the colon (the leading
space kept; folded lines joined with CRLF), and the body without
dot-stuffing, with its CRLF line ends.  Their end-of-message requests are
applied here, in the order they came (Postfix's cleanup_milter.c rules):

- add: at the end of the header block;
- insert at index i: before the (i+1)-th header field (0 is the top), at
  the end when there are fewer;
- change the i-th field of that name (1-based, case-insensitive, 0 taken as
  1, as Sendmail does): an empty value deletes it, a missing one is added;
- a value a milter folded with bare LF is written with CRLF, and a
  continuation line that does not begin with white space gets a space, so
  that a value can neither end the header block nor start another field;
- replace body: the new body as given, dot-stuffed again when written
  (unless the message came by BDAT).

Without SMFIP_HDR_LEADSPC the milter gets values without their first
space, and its new values get one, as Sendmail and Postfix do.
"""

from __future__ import annotations

import re
from typing import BinaryIO, Iterator

from ..message.spool import Spool, unstuff
from . import miltercodec as codec

_LINE_END = re.compile(rb"\r?\n")
LINE_LIMIT = 64 * 1024         # a longer "header line" (no LF in sight) is read as body


def stuff(block: bytes, at_line_start: bool) -> bytes:
    """Put it back (for a body or header a milter gave)."""
    if b"\n." in block:
        block = block.replace(b"\n.", b"\n..")
    return b"." + block if at_line_start and block[:1] == b"." else block


def _as_is(block: bytes, at_line_start: bool) -> bytes:
    """A BDAT message's bytes: no dot-stuffing to put back."""
    return block


def fold(value: bytes, space: bool) -> bytes:
    """A header value from a milter, as it goes into the message (see above)."""
    lines = _LINE_END.split(value.rstrip(b"\r\n"))
    for number in range(1, len(lines)):
        if lines[number][:1] not in (b" ", b"\t"):
            lines[number] = b" " + lines[number]
    value = b"\r\n".join(lines)
    return b" " + value if space else value


def _read_headers(reader: BinaryIO) -> tuple[list[list[bytes]], int]:
    """The header fields ([name, value]) and where the body begins."""
    headers: list[list[bytes]] = []
    offset = 0
    while line := reader.readline(LINE_LIMIT):
        if line[-1:] != b"\n" and len(line) == LINE_LIMIT:
            return headers, offset         # no header line is that long: the body
        text = line.rstrip(b"\r\n")
        if not text:
            return headers, offset + len(line)
        if text[:1] == b".":
            text = text[1:]
        if text[:1] in (b" ", b"\t") and headers:
            headers[-1][1] += b"\r\n" + text
        elif b":" in text and text[:1] not in (b" ", b"\t", b":"):
            name, value = text.split(b":", 1)
            headers.append([name.rstrip(b" \t"), value])
        else:                          # no header: the body begins here (no blank line)
            return headers, offset
        offset += len(line)
    return headers, offset


class Draft:
    """The message with the milters' changes so far: header fields in memory,
    the body still in the spool unless a milter replaced it."""

    def __init__(self, message: Spool, stuffed: bool = True) -> None:
        self.message = message
        self.stuffed = stuffed               # the spool's bytes are DATA's, not BDAT's
        with message.reader() as reader:
            self.headers, self.body_start = _read_headers(reader)
        self.body: Spool | None = None       # a replacement body, not dot-stuffed
        self.changed = False

    def header_values(self, leadspace: bool) -> list[tuple[bytes, bytes]]:
        """(name, value) of each field, the value's first space dropped
        unless the milter takes it (SMFIP_HDR_LEADSPC)."""
        if leadspace:
            return [(name, value) for name, value in self.headers]
        return [(name, value[1:] if value[:1] == b" " else value) for name, value in self.headers]

    def body_chunks(self) -> Iterator[bytes]:
        """The body as milters get it, in chunks of at most BODY_CHUNK."""
        if self.body is not None:
            reader, at_start, stuffed = self.body.reader(), True, False
        else:
            reader, at_start, stuffed = self.message.reader(), True, self.stuffed
            reader.seek(self.body_start)
        with reader:
            while block := reader.read(codec.BODY_CHUNK):
                chunk = unstuff(block, at_start) if stuffed else block
                at_start = block[-1:] == b"\n"
                if chunk:
                    yield chunk

    def add(self, name: bytes, value: bytes, space: bool) -> None:
        self.headers.append([name, fold(value, space)])
        self.changed = True

    def insert(self, index: int, name: bytes, value: bytes, space: bool) -> None:
        self.headers.insert(min(index, len(self.headers)), [name, fold(value, space)])
        self.changed = True

    def change(self, index: int, name: bytes, value: bytes, space: bool) -> None:
        index = max(index, 1)
        wanted = name.lower()
        for number, field in enumerate(self.headers):
            if field[0].lower() == wanted:
                index -= 1
                if index == 0:
                    if value:
                        self.headers[number] = [name, fold(value, space)]
                    else:
                        del self.headers[number]
                    self.changed = True
                    return
        if value:
            self.add(name, value, space)

    def replace_body(self, body: Spool) -> None:
        if self.body is not None:
            self.body.remove()
        self.body = body
        self.changed = True

    def discard(self) -> None:
        """The replacement body's file, when the draft is not used."""
        if self.body is not None:
            self.body.remove()
            self.body = None

    def write(self, directory: str) -> Spool:
        """A new spool with the message as changed (dot-stuffed, as the client's
        is, unless it came by BDAT)."""
        out = Spool(directory, in_memory=self.message.memory is not None)
        framed = stuff if self.stuffed else _as_is
        try:
            out.write(b"".join(framed(name + b":" + value + b"\r\n", True)
                               for name, value in self.headers) + b"\r\n")
            at_start = True
            for chunk in self.body_chunks():
                out.write(framed(chunk, at_start))
                at_start = chunk[-1:] == b"\n"
            out.finish()
        except BaseException:
            out.remove()
            raise
        finally:
            self.discard()
        return out


class EnvelopeEdits:
    """The envelope as the milters leave it (SMFIR_CHGFROM, ADDRCPT, DELRCPT)."""

    def __init__(self, recipients: list[str]) -> None:
        self.given = recipients
        self.sender: str | None = None
        self.sender_params = ""
        self.recipients: list[str] | None = None

    def change_sender(self, sender: str, params: str) -> None:
        self.sender, self.sender_params = sender, params

    def add_recipient(self, recipient: str) -> None:
        if self.recipients is None:
            self.recipients = list(self.given)
        self.recipients.append(recipient)

    def delete_recipient(self, recipient: str) -> None:
        """Every recipient that is this address (with or without its <>)."""
        if self.recipients is None:
            self.recipients = list(self.given)
        wanted = _bare(recipient)
        self.recipients = [rcpt for rcpt in self.recipients if _bare(rcpt) != wanted]


def _bare(address: str) -> str:
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    return address.lower()
