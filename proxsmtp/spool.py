"""Private temp files for messages, and sending a spooled message on.

Every message is spooled to a file created with O_EXCL and mode 0600 in
TempDirectory; `Spool.remove()` is called on every path out of DATA.
Sending escapes any line that is a lone `.` (however it ends) so that
neither a filter's output nor a bare-LF trick can end the DATA early.
"""

from __future__ import annotations

import os
import re
import tempfile

from . import header as headers
from .spio import Channel

CHUNK = 64 * 1024
_LONE_DOT = re.compile(rb"^\.(?=\r?$)", re.M)


class Spool:
    """A temp file holding one message (and, for pipe filters, its output)."""

    def __init__(self, directory: str) -> None:
        fd, self.path = tempfile.mkstemp(prefix="proxsmtpd.", dir=directory)
        self.file = os.fdopen(fd, "wb", buffering=CHUNK)
        self.size = 0
        self.extra: list[str] = []          # more files to remove with this one

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.size += len(data)

    def finish(self) -> None:
        """Flush and close for writing; raises OSError on disk trouble."""
        if not self.file.closed:
            self.file.close()

    def new_file(self) -> tuple[int, str]:
        """Another private file beside this one (a filter's output)."""
        fd, path = tempfile.mkstemp(prefix="proxsmtpd.", dir=os.path.dirname(self.path))
        self.extra.append(path)
        return fd, path

    def remove(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass
        for path in [self.path] + self.extra:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.extra = []


class DotGuard:
    """Escapes lone-dot lines in a stream of chunks split anywhere."""

    def __init__(self) -> None:
        self.tail = b""
        self.ends_with_crlf = True          # nothing sent yet counts as a clean end

    def feed(self, data: bytes) -> bytes:
        data = self.tail + data
        cut = data.rfind(b"\n") + 1
        self.tail = data[cut:]
        block = data[:cut]
        if block:
            self.ends_with_crlf = block.endswith(b"\r\n")
        return _LONE_DOT.sub(b". ", block) if b"\n." in block or block[:1] == b"." else block

    def finish(self) -> bytes:
        """The rest, ending in CRLF so that the final `.` stands on its own line.

        A stream ending in a bare LF (a filter writing LF line ends) gets a
        CRLF too: only CRLF.CRLF ends DATA for a strict server.
        """
        tail, self.tail = self.tail, b""
        clean, self.ends_with_crlf = self.ends_with_crlf, True
        if tail:
            if tail.endswith(b"\r"):
                tail = tail[:-1]
            if tail == b".":
                tail = b". "
            return tail + b"\r\n"
        return b"" if clean else b"\r\n"


async def send(channel: Channel, path: str, header: bytes | None, timeout: float) -> None:
    """Stream a spooled message to `channel`, header inserted, then `.`.

    The header goes first when it is a Received: line, else before the first
    blank line (or at the end of a message that has no body).
    """
    guard = DotGuard()
    with open(path, "rb") as message:
        if header is not None:
            header = header + b"\r\n"
            if headers.is_received(header):
                channel.write(header, False)
            else:
                block = bytearray()
                for line in message:
                    if not line.strip():
                        block += header
                        header = None
                        block += line
                        break
                    block += line
                    if len(block) >= CHUNK:
                        channel.write(guard.feed(bytes(block)), False)
                        del block[:]
                        await channel.drain(timeout)
                channel.write(guard.feed(bytes(block)), False)
                if header is not None:      # no blank line: all of it was headers
                    channel.write(guard.finish() + header, False)
        while True:
            chunk = message.read(CHUNK)
            if not chunk:
                break
            channel.write(guard.feed(chunk), False)
            await channel.drain(timeout)
    channel.write(guard.finish(), False)
    channel.write(b".\r\n")
    await channel.drain(timeout)
