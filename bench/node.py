#!/usr/bin/env python3
"""A filter node for the benchmark: the SMTP a Halon node or Postfix speaks to FilterType smtp.

smtp-sink offers no STARTTLS, and its XCLIENT does not start the session
over as Postfix's does; this node does both, as cheaply as it can, so that
bench/run.py can measure the proxy's filter path against a node that
behaves like the real ones.  asyncio Protocol callbacks on uvloop, pre-forked
like bench/barerelay.py (one process per CPU sharing one listening socket);
bench/run.py starts it as a peer of its own, so its CPU is never counted as
the proxy's.

What it speaks (RFC 5321, RFC 2920, RFC 3207, Postfix's XCLIENT_README):
- a 220 greeting; EHLO offers PIPELINING, SIZE, 8BITMIME, SMTPUTF8,
  ENHANCEDSTATUSCODES, XCLIENT (NAME ADDR PORT PROTO HELO LOGIN DESTADDR
  DESTPORT) and, with --tls CERT KEY and until TLS is up, STARTTLS; HELO
  works too;
- STARTTLS: 220, then the handshake (TLS 1.3 tickets from one context made
  before the fork, so a ticket resumes on any process); what the client
  sent behind the command is discarded (RFC 3207 section 4.2) and EHLO is
  required again;
- XCLIENT between transactions (503 inside one): 220 and the session starts
  over, as Postfix's does: MAIL before the next EHLO or HELO is 503;
- RSET, NOOP, MAIL, RCPT (ESMTP parameters accepted and ignored), DATA (354,
  the message read to its final dot and dropped, 250 with a queue id),
  QUIT; commands may be pipelined, the replies of one read go out in one
  write;
- with --chunking, CHUNKING (RFC 3030): `BDAT n [LAST]`, the n bytes read
  and dropped, 250 for each chunk (with a queue id for the LAST).  smtp-sink
  (Postfix 3.7) offers no CHUNKING, so this node is the sink of
  bench/run.py's bdat section.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import ssl

try:
    import uvloop
except ImportError:     # the stdlib loop: slower, but tests/test_bench_node.py still runs
    uvloop = None

NAME = b"node.bench"
LINE_LIMIT = 64 * 1024      # a command line longer than this ends the session
XCLIENT_NAMES = frozenset((b"NAME", b"ADDR", b"PORT", b"PROTO", b"HELO", b"LOGIN",
                           b"DESTADDR", b"DESTPORT"))
EXTENSIONS = (b"PIPELINING", b"SIZE 104857600", b"8BITMIME", b"SMTPUTF8",
              b"ENHANCEDSTATUSCODES", b"XCLIENT " + b" ".join(sorted(XCLIENT_NAMES)))
EOM = b"\r\n.\r\n"

R_GREETING = b"220 " + NAME + b" ESMTP bench/node.py\r\n"
R_OK = b"250 2.0.0 Ok\r\n"
R_MAIL = b"250 2.1.0 Ok\r\n"
R_RCPT = b"250 2.1.5 Ok\r\n"
R_DATA = b"354 End data with <CR><LF>.<CR><LF>\r\n"
R_BYE = b"221 2.0.0 Bye\r\n"
R_TLS = b"220 2.0.0 Ready to start TLS\r\n"
R_HELO_FIRST = b"503 5.5.1 Error: send HELO/EHLO first\r\n"
R_NESTED = b"503 5.5.1 Error: nested MAIL command\r\n"
R_NEED_MAIL = b"503 5.5.1 Error: need MAIL command\r\n"
R_NEED_RCPT = b"503 5.5.1 Error: need RCPT command\r\n"
R_IN_MAIL = b"503 5.5.1 Error: MAIL transaction in progress\r\n"
R_XCLIENT_SYNTAX = b"501 5.5.4 Bad XCLIENT attribute name\r\n"
R_NO_TLS = b"502 5.5.1 Error: command not implemented\r\n"
R_UNKNOWN = b"502 5.5.2 Error: command not recognized\r\n"
R_TOO_LONG = b"500 5.5.0 Error: line too long\r\n"
R_BDAT_SYNTAX = b"501 5.5.4 Syntax: BDAT count [LAST]\r\n"


class NodeSession(asyncio.Protocol):
    """One connection to the node: commands, or a message being read."""

    queued = 0      # messages taken by this process: the queue ids

    def __init__(self, context: ssl.SSLContext | None, chunking: bool = False) -> None:
        self.context = context
        self.chunking = chunking
        self.chunk = 0              # BDAT: bytes of the chunk still to read
        self.chunk_reply = b""      # and its reply, once they are read
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.greeted = False        # EHLO or HELO since the start, STARTTLS or XCLIENT
        self.sender = False
        self.recipients = 0
        self.body: bytearray | None = None      # the message, while in DATA
        self.tls = False
        self.handshaking = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport.write(R_GREETING)

    def data_received(self, data: bytes) -> None:
        if self.handshaking:
            return
        replies: list[bytes] = []
        data = self.buffer + data
        while data or self.chunk_reply:
            if self.chunk:
                taken = min(self.chunk, len(data))
                self.chunk -= taken
                data = data[taken:]
                if self.chunk:
                    break
            if self.chunk_reply:
                replies.append(self.chunk_reply)
                self.chunk_reply = b""
                continue
            if self.body is not None:
                data = self.take_body(data, replies)
                continue
            end = data.find(b"\n")
            if end < 0:
                break
            line, data = data[:end + 1], data[end + 1:]
            reply = self.command(line.rstrip(b"\r\n"))
            replies.append(reply)
            if reply is R_BYE:
                data = b""
            elif reply is R_TLS:
                data = b""          # RFC 3207 4.2: nothing sent before TLS counts
        self.buffer = data
        if replies:
            self.transport.write(b"".join(replies))
        if len(self.buffer) > LINE_LIMIT:
            self.transport.write(R_TOO_LONG)
            self.transport.close()
        elif replies and replies[-1] is R_BYE:
            self.transport.close()
        elif replies and replies[-1] is R_TLS:
            self.handshaking = True
            self.transport.pause_reading()      # the ClientHello is for the TLS layer
            asyncio.get_running_loop().create_task(self.start_tls())

    def take_body(self, data: bytes, replies: list[bytes]) -> bytes:
        """The message up to its final dot; what follows it (a pipelined
        command) is returned."""
        body = self.body
        start = max(0, len(body) - 4)
        body += data
        end = body.find(EOM, start)
        if end < 0:
            return b""
        rest = bytes(body[end + len(EOM):])
        self.body = None
        self.sender, self.recipients = False, 0
        NodeSession.queued += 1
        replies.append(b"250 2.0.0 Ok: queued as %05X%07X\r\n" % (os.getpid(), self.queued))
        return rest

    def command(self, line: bytes) -> bytes:
        """The reply to one command line."""
        verb, _, arg = line.partition(b" ")
        verb = verb.upper()
        if verb == b"EHLO":
            self.greeted, self.sender, self.recipients = True, False, 0
            offers = list(EXTENSIONS) + ([b"CHUNKING"] if self.chunking else [])
            if self.context is not None and not self.tls:
                offers.append(b"STARTTLS")
            return b"".join(b"250-%s\r\n" % item for item in [NAME] + offers[:-1]) \
                + b"250 %s\r\n" % offers[-1]
        if verb == b"HELO":
            self.greeted, self.sender, self.recipients = True, False, 0
            return b"250 %s\r\n" % NAME
        if verb == b"MAIL":
            if not self.greeted:
                return R_HELO_FIRST
            if self.sender:
                return R_NESTED
            self.sender = True
            return R_MAIL
        if verb == b"RCPT":
            if not self.sender:
                return R_NEED_MAIL
            self.recipients += 1
            return R_RCPT
        if verb == b"DATA":
            if not self.recipients:
                return R_NEED_RCPT if self.sender else R_NEED_MAIL
            self.body = bytearray(b"\r\n")      # so that an empty message ends at once
            return R_DATA
        if verb == b"BDAT" and self.chunking:
            return self.bdat(arg)
        if verb == b"RSET":
            self.sender, self.recipients = False, 0
            return R_OK
        if verb == b"XCLIENT":
            return self.xclient(arg)
        if verb == b"STARTTLS":
            if self.context is None or self.tls:
                return R_NO_TLS
            return R_TLS
        if verb == b"NOOP":
            return R_OK
        if verb == b"QUIT":
            return R_BYE
        return R_UNKNOWN

    def bdat(self, arg: bytes) -> bytes:
        """RFC 3030: the chunk's bytes are read before its reply, which is
        held back until then (b"" now)."""
        words = arg.split()
        if not 1 <= len(words) <= 2 or not words[0].isdigit() or \
                len(words) == 2 and words[1].upper() != b"LAST":
            return R_BDAT_SYNTAX
        self.chunk = int(words[0])
        if not self.recipients:
            self.chunk_reply = R_NEED_RCPT if self.sender else R_NEED_MAIL
        elif len(words) == 2:
            self.sender, self.recipients = False, 0
            NodeSession.queued += 1
            self.chunk_reply = b"250 2.0.0 Ok: queued as %05X%07X\r\n" % (os.getpid(),
                                                                          self.queued)
        else:
            self.chunk_reply = b"250 2.0.0 %d octets received\r\n" % self.chunk
        return b""

    def xclient(self, arg: bytes) -> bytes:
        """XCLIENT_README: between transactions only; attributes by name; the
        session starts over with a new greeting, EHLO required again."""
        if self.sender:
            return R_IN_MAIL
        names = [item.partition(b"=")[0].upper() for item in arg.split()]
        if not names or any(name not in XCLIENT_NAMES for name in names):
            return R_XCLIENT_SYNTAX
        self.greeted, self.sender, self.recipients = False, False, 0
        return R_GREETING

    async def start_tls(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.transport = await loop.start_tls(self.transport, self, self.context,
                                                  server_side=True)
        except (OSError, asyncio.TimeoutError):     # ssl.SSLError is an OSError
            self.transport.close()
            return
        self.tls, self.handshaking, self.greeted = True, False, False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.body = None


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """The node's TLS identity; made once, before the fork, so that every
    process shares its session-ticket key."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


async def serve(sock: socket.socket, context: ssl.SSLContext | None, chunking: bool) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    server = await loop.create_server(lambda: NodeSession(context, chunking), sock=sock,
                                      backlog=4096)
    await stop
    server.close()


def run(sock: socket.socket, context: ssl.SSLContext | None, chunking: bool) -> None:
    if uvloop is not None:
        uvloop.run(serve(sock, context, chunking))
    else:
        asyncio.run(serve(sock, context, chunking))


def main() -> None:
    """Parse `[--workers N] [--tls CERT KEY] [--chunking] LISTEN`, fork the processes and
    wait for them (SIGTERM stops them all)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("listen", help="host:port to listen on")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"),
                        help="offer STARTTLS with this certificate and key (PEM files)")
    parser.add_argument("--chunking", action="store_true", help="offer CHUNKING (BDAT)")
    args = parser.parse_args()
    context = server_context(*args.tls) if args.tls else None
    host, port = args.listen.rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(4096)
    sock.setblocking(False)
    children = []
    for _ in range(max(1, args.workers)):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            run(sock, context, args.chunking)
            os._exit(0)
        children.append(pid)
    signal.signal(signal.SIGTERM, lambda *_: [os.kill(pid, signal.SIGTERM) for pid in children])
    for pid in children:
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
