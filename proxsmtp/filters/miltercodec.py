"""The milter protocol's packets (Sendmail's libmilter, include/libmilter/mfdef.h; v6).

A packet is a 4-byte length in network order (counting the command byte),
a command byte and its data.  Strings are NUL-terminated; numbers are
32-bit (16-bit for the connect port) in network order.  Pure functions and
a Decoder, no I/O: milter.py does the talking.
"""

from __future__ import annotations

import itertools
import struct
from typing import Iterable, Sequence

VERSION = 6                     # SMFI_PROT_VERSION of libmilter 8.14+
MAX_PACKET = 2 * 1024 * 1024    # past libmilter's largest (MDS_1M body chunks), garbage
BODY_CHUNK = 65535              # MILTER_CHUNK_SIZE: what libmilter accepts by default

# Commands, MTA to milter (SMFIC_*)
ABORT, BODY, CONNECT, MACRO, BODYEOB = b"A", b"B", b"C", b"D", b"E"
HELO, QUIT_NC, HEADER, MAIL, EOH = b"H", b"K", b"L", b"M", b"N"
OPTNEG, QUIT, RCPT, DATA, UNKNOWN = b"O", b"Q", b"R", b"T", b"U"

# Responses, milter to MTA (SMFIR_*)
ADDRCPT, DELRCPT, ADDRCPT_PAR, SHUTDOWN = b"+", b"-", b"2", b"4"
ACCEPT, REPLBODY, CONTINUE, DISCARD, CHGFROM = b"a", b"b", b"c", b"d", b"e"
CONN_FAIL, ADDHEADER, INSHEADER, SETSYMLIST = b"f", b"h", b"i", b"l"
CHGHEADER, PROGRESS, QUARANTINE, REJECT = b"m", b"p", b"q", b"r"
SKIP, TEMPFAIL, REPLYCODE = b"s", b"t", b"y"
RESPONSES = frozenset((ADDRCPT, DELRCPT, ADDRCPT_PAR, SHUTDOWN, ACCEPT, REPLBODY, CONTINUE,
                       DISCARD, CHGFROM, CONN_FAIL, ADDHEADER, INSHEADER, SETSYMLIST,
                       CHGHEADER, PROGRESS, QUARANTINE, REJECT, SKIP, TEMPFAIL, REPLYCODE,
                       OPTNEG))

# Actions the MTA allows (SMFIF_*)
F_ADDHDRS, F_CHGBODY, F_ADDRCPT, F_DELRCPT = 0x01, 0x02, 0x04, 0x08
F_CHGHDRS, F_QUARANTINE, F_CHGFROM, F_ADDRCPT_PAR = 0x10, 0x20, 0x40, 0x80

# Protocol steps (SMFIP_*): NO* = do not send that stage, NR_* = send it, expect no reply
P_NOCONNECT, P_NOHELO, P_NOMAIL, P_NORCPT = 0x1, 0x2, 0x4, 0x8
P_NOBODY, P_NOHDRS, P_NOEOH, P_NR_HDR = 0x10, 0x20, 0x40, 0x80
P_NOUNKNOWN, P_NODATA, P_SKIP, P_RCPT_REJ = 0x100, 0x200, 0x400, 0x800
P_NR_CONN, P_NR_HELO, P_NR_MAIL, P_NR_RCPT = 0x1000, 0x2000, 0x4000, 0x8000
P_NR_DATA, P_NR_UNKN, P_NR_EOH, P_NR_BODY = 0x10000, 0x20000, 0x40000, 0x80000
P_HDR_LEADSPC = 0x100000

# Connect families (SMFIA_*)
FAMILY_UNKNOWN, FAMILY_UNIX, FAMILY_INET, FAMILY_INET6 = b"U", b"L", b"4", b"6"

_LENGTH = struct.Struct("!I")
_OPTNEG = struct.Struct("!III")
_HEAD = struct.Struct("!Ic")            # the length, the command
_pairs = itertools.chain.from_iterable  # a dict's items as one run of strings


class CodecError(ValueError):
    """Bytes that are no milter packet, or a packet whose data is malformed
    (only decoding raises it)."""


def packet(code: bytes, data: bytes = b"") -> bytes:
    """One packet on the wire."""
    return _HEAD.pack(len(data) + 1, code) + data


def _strings(values: Sequence[str | bytes]) -> bytes:
    """Each value NUL-terminated.  Text (what every stage but the header
    fields passes) goes in one join and one encode; a NUL inside a value,
    or bytes among the values, take the value-by-value way."""
    try:
        text = "\0".join(values)
    except TypeError:
        return _each_string(values)
    if text.count("\0") != len(values) - 1 or not values:
        return _each_string(values)
    return text.encode("utf-8", "surrogateescape") + b"\0"


def _each_string(values: Iterable[str | bytes]) -> bytes:
    return b"".join(_bytes(value) + b"\0" for value in values)


def _bytes(value: str | bytes) -> bytes:
    """Text from SMTP is bytes already or ASCII/UTF-8.  A NUL would end the
    string early on the milter's side: NULs are dropped."""
    data = value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
    return data.replace(b"\0", b"") if b"\0" in data else data


def optneg(version: int, actions: int, protocol: int) -> bytes:
    return packet(OPTNEG, _OPTNEG.pack(version, actions, protocol))


def macro(stage: bytes, macros: dict[str, str]) -> bytes:
    """SMFIC_MACRO: the macros for the command `stage` that follows."""
    try:
        text = "\0".join(_pairs(macros.items()))
    except TypeError:
        text = None
    if text is None or text.count("\0") != 2 * len(macros) - 1:
        data = _each_string([item for pair in macros.items() for item in pair])
    else:
        data = text.encode("utf-8", "surrogateescape") + b"\0"
    return _HEAD.pack(len(data) + 2, MACRO) + stage + data


def restage(packet: bytes, stage: bytes) -> bytes:
    """A `macro` packet with the same macros for another command: the end
    of message's macros go at EOH and at BODYEOB, encoded once."""
    return packet[:5] + stage + packet[6:]


def connect(hostname: str, family: bytes, port: int, address: str) -> bytes:
    if family == FAMILY_UNKNOWN:
        return packet(CONNECT, _strings([hostname]) + family)
    return packet(CONNECT, _strings([hostname]) + family + struct.pack("!H", port)
                  + _strings([address]))


def helo(name: str) -> bytes:
    return packet(HELO, _strings([name]))


def mail(args: Iterable[str]) -> bytes:
    return packet(MAIL, _strings(args))


def rcpt(args: Iterable[str]) -> bytes:
    return packet(RCPT, _strings(args))


def header(name: bytes, value: bytes) -> bytes:
    """One header field (the most packets of a message: made without _strings)."""
    data = b"%s\0%s\0" % (name, value)
    if data.count(b"\0") != 2:
        data = _strings([name, value])
    return _HEAD.pack(len(data) + 1, HEADER) + data


def body(chunk: bytes) -> bytes:
    return packet(BODY, chunk)


def simple(code: bytes) -> bytes:
    """A command without data: DATA, EOH, EOB, ABORT, QUIT."""
    return packet(code)


def parse_optneg(data: bytes) -> tuple[int, int, int]:
    """(version, actions, protocol) of the milter's SMFIC_OPTNEG answer; what
    follows them (v6 macro lists, asked for with SMFIF_SETSYMLIST, which we
    do not offer) is left alone."""
    if len(data) < _OPTNEG.size:
        raise CodecError("short OPTNEG reply (%d bytes)" % len(data))
    return _OPTNEG.unpack_from(data)


def split_strings(data: bytes, count: int, more: bool = False) -> list[bytes]:
    """`count` NUL-terminated strings (and, with `more`, any after them)."""
    parts = data.split(b"\0")
    if parts[-1] != b"" or len(parts) - 1 < count or (len(parts) - 1 > count and not more):
        raise CodecError("expected %d NUL-terminated string(s)" % count)
    return parts[:-1]


def parse_index_header(data: bytes) -> tuple[int, bytes, bytes]:
    """INSHEADER / CHGHEADER: (index, name, value)."""
    if len(data) < 4:
        raise CodecError("short header change")
    name, value = split_strings(data[4:], 2)
    return _LENGTH.unpack_from(data)[0], name, value


def parse_header(data: bytes) -> tuple[bytes, bytes]:
    name, value = split_strings(data, 2)
    return name, value


def parse_text(data: bytes) -> bytes:
    """REPLYCODE, QUARANTINE, ADDRCPT, DELRCPT: one string (the NUL may be
    missing at the very end, as some milters send it)."""
    if data.endswith(b"\0"):
        data = data[:-1]
    if b"\0" in data:
        raise CodecError("a NUL inside a string")
    return data


def parse_chgfrom(data: bytes) -> tuple[bytes, bytes]:
    """CHGFROM / ADDRCPT_PAR: (address, ESMTP args or b"")."""
    parts = split_strings(data, 1, more=True)
    return parts[0], parts[1] if len(parts) > 1 else b""


class Decoder:
    """Bytes in, whole packets out, however the bytes were split.

    Raises CodecError (only) on a length of 0 or over `limit`, or a code not
    in `codes` (the responses by default; None: any): the stream is then out
    of step and the milter is given up."""

    def __init__(self, limit: int = MAX_PACKET,
                 codes: frozenset[bytes] | None = RESPONSES) -> None:
        self.limit = limit
        self.codes = codes
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """Each (code, data) that `data` completes, in order."""
        # Most reads are one whole answer (a verdict): taken as it is, without
        # the buffer (tests/test_milter_codec.py holds it to `_split`).
        if not self.buffer and type(data) is bytes and len(data) > 4:
            length = _LENGTH.unpack_from(data)[0]
            if length + 4 == len(data) and length <= self.limit:
                code = data[4:5]
                if self.codes is None or code in self.codes:
                    return [(code, data[5:])]
        return self._split(data)

    def _split(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """`feed`, for any bytes: buffered, packet by packet."""
        buffer = self.buffer
        buffer += data
        start, packets = 0, []
        try:
            while len(buffer) - start >= 4:
                length = _LENGTH.unpack_from(buffer, start)[0]
                if length == 0 or length > self.limit:
                    raise CodecError("bad packet length %d" % length)
                if len(buffer) - start - 4 < length:
                    break
                code = bytes(buffer[start + 4:start + 5])
                if self.codes is not None and code not in self.codes:
                    raise CodecError("unknown response code %r" % code)
                packets.append((code, bytes(buffer[start + 5:start + 4 + length])))
                start += 4 + length
        finally:
            del buffer[:start]
        return packets
