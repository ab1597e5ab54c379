"""Private temp files for messages, and sending a spooled message on.

Every message is spooled to a file created with O_EXCL and mode 0600 in
TempDirectory; `Spool.remove()` is called on every path out of DATA.
Sending by DATA escapes any line that is a lone `.` (however many CRs end
it, or a bare LF) so that neither a filter's output nor a smuggling trick
can end the DATA early.  Sending by BDAT (RFC 3030) sends the bytes as they
are, in chunks whose sizes are said first: no line ends anything there.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from typing import BinaryIO, Iterator

from ..net.channel import Channel
from . import header as headers

CHUNK = 64 * 1024
# The largest BDAT chunk of a message streamed from disk to a server that
# takes pipelined commands (RFC 2920, RFC 3030 4.2); one reply each.
BDAT_CHUNK = 1024 * 1024
MEMORY_LIMIT = 512 * 1024     # largest message kept in memory (when allowed)
MEMORY_BUDGET = 16 * 1024 * 1024    # all messages in memory in this process together

_held = 0                     # bytes of messages now in memory, in this process
_spooled = 0                  # bytes ever spooled, in this process
_LONE_DOT = re.compile(rb"^\.(?=\r*$)", re.M)    # see DotGuard
# A line that begins with a dot: searched in every chunk of every message,
# so with re, which finds it sooner than `b"\n." in` (bench/README.md, Profiling).
_DOT_LINE = re.compile(rb"\n\.")


def prefix(pid: int | None = None) -> str:
    """Temp file names carry the worker's pid: what a worker killed mid-message
    leaves behind is found and removed by the master (`remove_orphans`)."""
    return "proxsmtpd.%d." % (os.getpid() if pid is None else pid)


def remove_orphans(directory: str, pid: int) -> list[str]:
    """Remove the temp files of the dead process `pid`; the names removed."""
    start = prefix(pid)
    removed = []
    try:
        names = [name for name in os.listdir(directory) if name.startswith(start)]
    except OSError:
        return removed
    for name in names:
        try:
            os.unlink(os.path.join(directory, name))
            removed.append(name)
        except OSError:
            pass
    return removed


def in_memory() -> int:
    """Bytes of messages held in memory by this process now."""
    return _held


def spooled_total() -> int:
    """Bytes spooled by this process so far (memory or file)."""
    return _spooled


class Spool:
    """One message: a private temp file, or memory while small when asked.

    `in_memory` is for filter types that never hand the message to a program
    (none, smtp): a message up to MEMORY_LIMIT then costs no file at all, as
    long as all messages in memory in this worker stay within MEMORY_BUDGET
    (so that memory is bounded per worker, not by MaxConnections).  Beyond
    either, or for pipe/file filters, it lives in a temp file, written
    without a buffer of its own (a buffer per held session adds up)."""

    def __init__(self, directory: str, in_memory: bool = False) -> None:
        self.directory = directory
        self.size = 0
        self.path: str | None = None
        self.file = None
        self.memory: bytearray | bytes | None = bytearray() if in_memory else None
        self.extra: list[str] = []          # more files to remove with this one
        self._framed: bytes | None = None   # as_sent(), once made
        if not in_memory:
            self._to_file(b"")

    def _to_file(self, data: bytes) -> None:
        fd, self.path = tempfile.mkstemp(prefix=prefix(), dir=self.directory)
        self.file = os.fdopen(fd, "wb", buffering=0)
        self._write_file(data)

    def _write_file(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[self.file.write(view):]

    def write(self, data: bytes) -> None:
        global _held, _spooled
        self.size += len(data)
        _spooled += len(data)
        if self.memory is None:
            self._write_file(data)
            return
        if self.size <= MEMORY_LIMIT and _held + len(data) <= MEMORY_BUDGET:
            self.memory += data
            _held += len(data)
            return
        self._to_file(self._forget_memory())
        self._write_file(data)

    def _forget_memory(self) -> bytearray | bytes:
        global _held
        memory, self.memory = self.memory or bytearray(), None
        _held -= len(memory)
        return memory

    def finish(self) -> None:
        """Flush and close for writing; raises OSError on disk trouble.

        A message in memory becomes bytes: a BytesIO over bytes shares them,
        and reading it whole hands them back, where a bytearray is copied
        twice more on its way to the server."""
        if self.file is not None and not self.file.closed:
            self.file.close()
        if self.memory is not None:
            self.memory = bytes(self.memory)

    def as_sent(self) -> bytes:
        """A finished message in memory as a peer gets it with no header
        inserted (framed()): made once, for the filter node and the server."""
        if self._framed is None:
            self._framed = framed(self.memory)
        return self._framed

    def reader(self) -> BinaryIO:
        """The message, to read from the start."""
        if self.memory is not None:
            return io.BytesIO(self.memory)
        return open(self.path, "rb")

    def new_file(self) -> tuple[int, str]:
        """Another private file beside this one (a filter's output)."""
        fd, path = tempfile.mkstemp(prefix=prefix(), dir=self.directory)
        self.extra.append(path)
        return fd, path

    def copy(self, pieces: Iterator[bytes]) -> str:
        """Another private file beside this one holding `pieces` (the message
        in another form); raises OSError on disk trouble."""
        fd, path = self.new_file()
        with os.fdopen(fd, "wb", buffering=0) as out:
            for piece in pieces:
                view = memoryview(piece)
                while view:
                    view = view[out.write(view):]
        return path

    def remove(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass
        for path in ([self.path] if self.path else []) + self.extra:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.extra = []
        self._framed = None
        self._forget_memory()


class DotGuard:
    """Escapes lone-dot lines in a stream of chunks split anywhere.

    A lone-dot line is a `.` followed by nothing but CRs up to its LF (or up
    to the end): a server that drops every CR before an LF and takes a bare
    LF as a line end (Postfix's smtpd with `smtpd_forbid_bare_newline = no`,
    the default before 3.9) reads `.` CR CR LF, `.` LF and the like as the end
    of DATA, and what follows as commands: SMTP smuggling.  Such a line is
    dot-stuffed (RFC 5321 4.5.2): a second dot, which that server takes off
    again, so it stores the line the client sent."""

    def __init__(self) -> None:
        self.tail = b""                     # held back at a line's start: b"" or b"."
        self.crs = 0                        # CRs held back after `tail`
        self.midline = False                # what is held continues a line partly sent
        self.ends_with_crlf = True          # nothing sent yet counts as a clean end

    def feed(self, data: bytes) -> bytes:
        """Only what could still become a lone-dot line (`.` and the CRs
        after it) or the CRs at the end are held back: a huge line without
        LF passes through, and a run of CRs is held as a count, not copied
        again with every chunk that adds to it."""
        if self.crs or self.tail:
            if data[-1:] == b"\r" and data.count(b"\r") == len(data):
                self.crs += len(data)
                return b""
            data = self.tail + b"\r" * self.crs + data
            self.tail, self.crs = b"", 0
        cut = data.rfind(b"\n") + 1
        tail = data[cut:]
        hold = 0
        if tail:                            # the end of the stream, or a chunk cut mid-line
            line = tail.rstrip(b"\r")
            self.crs = hold = len(tail) - len(line)
            if line == b"." and (cut or not self.midline):
                self.tail = b"."
                hold += 1
        block = data[:len(data) - hold]
        skip = 0
        if self.midline:                    # the first line was begun in an earlier feed
            skip = block.find(b"\n") + 1 or len(block)
        self.midline = len(tail) > hold or (self.midline and not cut)
        if block:
            self.ends_with_crlf = block.endswith(b"\r\n")
        end = max(skip, cut)                # a partial last line sent on is no lone dot
        rest = block[skip:end]
        if rest[:1] == b"." or _DOT_LINE.search(rest):
            return block[:skip] + _LONE_DOT.sub(b"..", rest) + block[end:]
        return block

    def finish(self) -> bytes:
        """The rest, ending in CRLF so that the final `.` stands on its own line.

        A stream ending in a bare LF (a filter writing LF line ends) gets a
        CRLF too: only CRLF.CRLF ends DATA for a strict server.
        """
        clean, self.ends_with_crlf, self.midline = self.ends_with_crlf, True, False
        if self.crs or self.tail:
            # the last CR held becomes the CRLF; a held dot is a lone one
            held = (b".." if self.tail else b"") + b"\r" * max(self.crs - 1, 0)
            self.tail, self.crs = b"", 0
            return held + b"\r\n"
        return b"" if clean else b"\r\n"


def outgoing(message: BinaryIO, header: bytes | None) -> Iterator[bytes]:
    """The message as the server gets it, in pieces: `header` inserted,
    lone dots escaped, the final `.` last.

    The header goes first when it is a Received: line, else before the first
    blank line (or at the end of a message that has no body)."""
    guard = DotGuard()
    with message:
        if header is not None:
            header += b"\r\n"
            if headers.is_received(header):
                yield header
            else:
                for line in message:
                    if not line.strip():
                        yield guard.feed(header + line)
                        header = None
                        break
                    yield guard.feed(line)
                if header is not None:      # no blank line: all of it was headers
                    yield guard.finish() + header
        while chunk := message.read(CHUNK):
            yield guard.feed(chunk)
    yield guard.finish() + b".\r\n"


def dot_stuffed(pieces: Iterator[bytes]) -> Iterator[bytes]:
    """A message that came by BDAT (bytes as they are), dot-stuffed for DATA
    (RFC 5321 4.5.2): every line that begins with a dot gets another, a line
    begun after a bare LF too, as a server that takes a bare LF for a line
    end (Postfix's) takes the dot off again."""
    at_start = True                         # the next byte begins a line
    for piece in pieces:
        if not piece:
            continue
        if at_start and piece[:1] == b".":
            piece = b"." + piece
        if _DOT_LINE.search(piece):
            piece = piece.replace(b"\n.", b"\n..")
        at_start = piece[-1:] == b"\n"
        yield piece


def _guarded(pieces: Iterator[bytes]) -> Iterator[bytes]:
    """`pieces` through a DotGuard, its finish() last: outgoing() without
    the header and the final dot."""
    guard = DotGuard()
    for piece in pieces:
        if piece:
            yield guard.feed(piece)
    yield guard.finish()


def stored_by_data(pieces: Iterator[bytes]) -> Iterator[bytes]:
    """A message in DATA's form (its writer's dot-stuffing in it: a pipe or
    file filter's output for a message that came by BDAT) as a server
    stores it had it been sent by DATA: outgoing()'s DotGuard first (lone
    dots escaped, a CRLF at the end), then the first dot of every line that
    begins with one taken off (RFC 5321 4.5.2), a line begun after a bare LF
    too: the inverse of dot_stuffed(), for the message to go on by BDAT as
    it would have by DATA."""
    at_start = True                         # the next byte begins a line
    for piece in _guarded(pieces):
        if not piece:
            continue
        yield unstuff(piece, at_start)
        at_start = piece[-1:] == b"\n"


def unstuff(block: bytes, at_line_start: bool) -> bytes:
    """Take off the dot RFC 5321 4.5.2 put before a line beginning with one
    (`at_line_start`: `block` begins a line)."""
    if at_line_start and block[:1] == b".":
        block = block[1:]
    return block.replace(b"\n.", b"\n") if b"\n." in block else block


def data_pieces(message: BinaryIO, header: bytes | None, chunked: bool) -> Iterator[bytes]:
    """The message as a server gets it after DATA's 354: outgoing() for a
    message that came by DATA (its dot-stuffing is the client's, kept in
    the spool); one that came by BDAT (`chunked`) is dot-stuffed first."""
    if not chunked:
        yield from outgoing(message, header)
        return
    guard = DotGuard()
    for piece in dot_stuffed(with_header(message, header)):
        yield guard.feed(piece)
    yield guard.finish() + b".\r\n"


def framed(message: bytes) -> bytes:
    """A whole message held in memory, with no header to insert, as the
    server gets it: what outgoing() makes of it, in one piece, without a
    reader, a generator and a join per message (the common relayed case)."""
    guard = DotGuard()
    return b"".join((guard.feed(message), guard.finish(), b".\r\n"))


def with_header(message: BinaryIO, header: bytes | None) -> Iterator[bytes]:
    """The message's bytes as they are (BDAT: no dot-stuffing, no line end
    added, RFC 3030 2), with `header` where outgoing() puts it; a message
    that is all headers and has no line end at its end gets CRLF before it."""
    with message:
        if header is not None:
            header += b"\r\n"
            if headers.is_received(header):
                yield header
            else:
                line = b""
                for line in message:
                    if not line.strip():
                        yield header + line
                        header = None
                        break
                    yield line
                if header is not None:
                    yield (b"\r\n" if line and not line.endswith(b"\n") else b"") + header
        while chunk := message.read(CHUNK):
            yield chunk


def with_header_size(message: BinaryIO, size: int, header: bytes | None) -> int:
    """What with_header() makes of the `size` bytes of `message`, in bytes
    (the BDAT count must be said before the bytes): only the headers are
    read, and only for a header that is not a Received: line."""
    with message:
        if header is None:
            return size
        size += len(header) + 2
        if headers.is_received(header):
            return size
        line = b""
        for line in message:
            if not line.strip():
                return size
        return size + (2 if line and not line.endswith(b"\n") else 0)


def bdat_chunks(total: int, chunk: int) -> int:
    """How many BDAT commands carry `total` bytes in chunks of `chunk`."""
    return max(1, -(-total // chunk))


def bdat_framed(pieces: Iterator[bytes], total: int, chunk: int) -> Iterator[bytes]:
    """`pieces` (`total` bytes in all) as BDAT chunks of `chunk` bytes, the
    last one `BDAT n LAST` (RFC 3030 2): each command line before its
    bytes.  ValueError if the pieces do not come to `total`: the counts
    already said would be wrong."""
    sent = left = 0
    if total == 0:
        yield b"BDAT 0 LAST\r\n"
    for piece in pieces:
        while piece:
            if left == 0:
                if sent == total:
                    raise ValueError("the message grew while it was sent")
                left = min(chunk, total - sent)
                yield b"BDAT %d%s\r\n" % (left, b" LAST" if sent + left == total else b"")
            if len(piece) > left:
                piece, rest = piece[:left], piece[left:]
            else:
                rest = b""
            yield piece
            left -= len(piece)
            sent += len(piece)
            piece = rest
    if sent != total:
        raise ValueError("the message shrank while it was sent")


async def send(channel: Channel, message: BinaryIO, header: bytes | None, timeout: float,
               chunked: bool = False) -> None:
    """Stream a spooled message to `channel` by DATA (see data_pieces())."""
    await send_pieces(channel, data_pieces(message, header, chunked), timeout)


async def send_bdat(channel: Channel, message: BinaryIO, header: bytes | None, total: int,
                    chunk: int, timeout: float) -> None:
    """Stream a spooled message to `channel` by BDAT: with_header() in
    bdat_framed() chunks; `total` is with_header_size()'s."""
    await send_pieces(channel, bdat_framed(with_header(message, header), total, chunk), timeout)


async def send_pieces(channel: Channel, pieces: Iterator[bytes], timeout: float) -> None:
    """Write `pieces` to `channel`, waiting for the peer to take each CHUNK:
    a message on disk is never all in memory.  A small message leaves in
    one send."""
    out: list[bytes] = []
    size = 0
    for piece in pieces:
        out.append(piece)
        size += len(piece)
        if size >= CHUNK:
            channel.write(b"".join(out), False)
            out.clear()
            size = 0
            await channel.drain(timeout)
    channel.write(b"".join(out), False)
    await channel.drain(timeout)
