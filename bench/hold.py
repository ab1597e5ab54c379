"""Open many SMTP sessions at once, wait for each greeting, and hold them.

One thread, non-blocking sockets and a selector: thousands of clients cost
the harness little, so the proxy is what gets measured.  `start_data()` then
takes every held session into DATA and sends part of a message that is never
finished: the proxy holds that much unfinished message per session.
"""

from __future__ import annotations

import errno
import selectors
import socket
import time


class Holder:
    """`count` client sessions to host:port, kept open until close()."""

    def __init__(self, host: str, port: int, count: int) -> None:
        self.address = (host, port)
        self.count = count
        self.greeted: list[socket.socket] = []
        self.refused: list[str] = []          # first line of non-220 replies, errors
        self.seconds = 0.0                    # until every session was greeted or failed
        self._selector = selectors.DefaultSelector()
        self._buffers: dict[socket.socket, bytes] = {}

    def open(self, timeout: float = 120.0, batch: int = 100) -> "Holder":
        """Connect `batch` at a time (the accept backlog stays shallow) and
        read greetings; returns when all are answered or `timeout` passes."""
        started = time.monotonic()
        deadline = started + timeout
        opened = 0
        while time.monotonic() < deadline:
            if opened < self.count and len(self._buffers) < batch * 4:
                for _ in range(min(batch, self.count - opened)):
                    self._connect()
                    opened += 1
            if opened >= self.count and not self._buffers:
                break
            for key, _ in self._selector.select(timeout=0.2):
                self._readable(key.fileobj)
        for sock in list(self._buffers):
            self._fail(sock, "no greeting within %.0f s" % timeout)
        self.seconds = time.monotonic() - started
        return self

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex(self.address)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self.refused.append("connect: %s" % errno.errorcode.get(err, err))
            return
        self._buffers[sock] = b""
        self._selector.register(sock, selectors.EVENT_READ)

    def _readable(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(1024)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(sock, "recv: %s" % exc.strerror)
            return
        if not data:
            self._fail(sock, "closed before a greeting")
            return
        buffer = self._buffers[sock] + data
        if b"\n" not in buffer:
            self._buffers[sock] = buffer
            return
        self._selector.unregister(sock)
        del self._buffers[sock]
        if buffer.startswith(b"220"):
            self.greeted.append(sock)
        else:
            self.refused.append(buffer.split(b"\n", 1)[0].strip().decode("ascii", "replace"))
            sock.close()

    def _fail(self, sock: socket.socket, why: str) -> None:
        self._selector.unregister(sock)
        del self._buffers[sock]
        sock.close()
        self.refused.append(why)

    def start_data(self, size: int, timeout: float = 30.0) -> int:
        """EHLO, MAIL, RCPT, DATA and `size` bytes of body (no final `.`) on each
        greeted session, one session after another; the sessions that got that
        far stay in `self.in_data`, the others are closed and noted in `refused`."""
        line = b"x" * 76 + b"\r\n"
        body = b"Subject: held\r\n\r\n" + line * (size // len(line))
        self.in_data: list[socket.socket] = []
        for sock in self.greeted:
            sock.setblocking(True)
            sock.settimeout(timeout)
            try:
                for command, code in ((b"EHLO hold.example", b"250"),
                                      (b"MAIL FROM:<hold@example.com>", b"250"),
                                      (b"RCPT TO:<sink@example.com>", b"250"), (b"DATA", b"354")):
                    sock.sendall(command + b"\r\n")
                    reply = _reply(sock)
                    if not reply.startswith(code):
                        raise OSError("%s: %s" % (command.decode(), reply[:60].decode("ascii", "replace")))
                sock.sendall(body)
            except OSError as exc:
                self.refused.append("data: %s" % (exc.strerror or exc))
                continue
            self.in_data.append(sock)
        return len(self.in_data)

    def close(self) -> None:
        for sock in self.greeted:
            sock.close()
        self.greeted.clear()
        self._selector.close()

    def __enter__(self) -> "Holder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _reply(sock: socket.socket) -> bytes:
    """One whole (multi-line) reply (nothing else is sent to us meanwhile)."""
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            raise OSError("closed")
        data += chunk
        lines = data.split(b"\r\n")
        if len(lines) > 1 and any(line[3:4] == b" " for line in lines[:-1]):
            return data
