#!/usr/bin/env python3
"""Bytecodes and Python calls per message, by function: where the relay's own
Python work goes, without the kernel and without noise.

bench/instructions.py says how many instructions a build costs; this says
which functions they come from.  It serves sessions in this process, on
uvloop, against fake peers: the client side speaks like smtp-source (EHLO,
MAIL, RCPT, DATA with a 10 KB message in two segments, QUIT; `--reuse K`:
K messages per session), the server side like smtp-sink (PIPELINING,
8BITMIME, no STARTTLS); with `--node`, FilterType smtp offers every
message to bench/node.py's node session first, served in this process
without a socket (its own calls are not counted).  Every proxsmtp function is traced with
`sys.settrace` (`f_trace_opcodes`): the figures are exact and repeat from
run to run.  A call into CPython or uvloop costs more than a bytecode, so
the calls column matters as much (a real run costs roughly 60-80
instructions per bytecode and several hundred per call).  The fakes'
own work is not counted; Python functions outside proxsmtp that the relay
calls (logging, dataclass __init__) are listed by calls.

    .venv/bin/python bench/bytecodes.py [--tree DIR] [--messages N] [--reuse K] [--node]
                                        [--helos N] [--top N] [--lines Pump.relay_lines,...]

`--lines` adds the bytecodes per message of each source line of the named
functions (qualified names, as printed).  Needs Python 3.11 and uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import linecache
import os
import socket
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
# The fakes' own files: their calls are not the proxy's.
SKIPPED = (os.path.abspath(__file__), os.path.join(HERE, "node.py"))

BODY_SIZE = 10240
CLIENT_NAME = b"EHLO client.example\r\n"
SINK_EHLO = b"250-sink.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"


def message_body() -> bytes:
    """smtp-source's kind of message: a few headers and short lines."""
    lines = b"From: <bench@example.com>\r\nTo: <sink@example.com>\r\nSubject: bench\r\n\r\n"
    while len(lines) < BODY_SIZE:
        lines += b"La de da de da %d.\r\n" % (len(lines) % 10)
    return lines


class FakeTransport:
    """What a Channel needs of a transport; bytes for the protocol are
    handed over in later loop turns, one data_received per send()."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: asyncio.Protocol) -> None:
        self.loop = loop
        self.protocol = protocol
        self.closing = False
        self.pending = b""

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 25)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self.protocol.connection_lost, None)

    def send(self, data: bytes) -> None:
        if not self.closing:
            self.loop.call_soon(self.protocol.data_received, data)

    def lines(self, data: bytes):
        """Complete lines written to this peer so far."""
        self.pending += data
        while (end := self.pending.find(b"\r\n")) >= 0:
            line, self.pending = self.pending[:end], self.pending[end + 2:]
            yield line


class SinkSide(FakeTransport):
    """The server: answers like smtp-sink."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: asyncio.Protocol) -> None:
        super().__init__(loop, protocol)
        self.in_data = False

    def write(self, data: bytes) -> None:
        if self.in_data:
            self.pending += data
            end = self.pending.find(b"\r\n.\r\n")
            if end < 0:
                return
            self.pending, self.in_data = self.pending[end + 5:], False
            self.send(b"250 2.0.0 Ok: queued as BENCH\r\n")
            data = b""
        for line in self.lines(data):
            verb = line[:4].upper()
            if verb == b"EHLO":
                self.send(SINK_EHLO)
            elif verb == b"DATA":
                self.in_data = True
                self.send(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"QUIT":
                self.send(b"221 2.0.0 Bye\r\n")
                self.loop.call_soon(self.protocol.eof_received)
                self.close()
            else:
                self.send(b"250 2.1.0 Ok\r\n")


class SourceSide(FakeTransport):
    """The client: sends like smtp-source, `messages` per session."""

    body = message_body()
    hello = CLIENT_NAME

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: asyncio.Protocol,
                 messages: int, counter: list[int]) -> None:
        super().__init__(loop, protocol)
        self.state, self.left, self.counter = "greeting", messages, counter

    def write(self, data: bytes) -> None:
        for line in self.lines(data):
            if line[3:4] == b"-":
                continue
            state = self.state
            if state == "greeting":
                self.state = "ehlo"
                self.send(self.hello)
            elif state in ("ehlo", "sent"):
                if state == "sent":
                    self.counter[0] += 1
                    self.left -= 1
                if self.left == 0:
                    self.state = "quit"
                    self.send(b"QUIT\r\n")
                else:
                    self.state = "mail"
                    self.send(b"MAIL FROM:<bench@example.com>\r\n")
            elif state == "mail":
                self.state = "rcpt"
                self.send(b"RCPT TO:<sink@example.com>\r\n")
            elif state == "rcpt":
                self.state = "data"
                self.send(b"DATA\r\n")
            elif state == "data":
                self.state = "sent"
                half = len(self.body) // 2
                self.send(self.body[:half])
                self.send(self.body[half:] + b".\r\n")
            elif state == "quit":
                self.loop.call_soon(self.protocol.eof_received)
                self.close()


class NodeSide(FakeTransport):
    """The filter node: bench/node.py's NodeSession, fed what the proxy
    writes at once; its replies reach the proxy in a later loop turn."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: asyncio.Protocol) -> None:
        super().__init__(loop, protocol)
        import node
        self.node = node.NodeSession(None)
        self.node.connection_made(NodeEnd(self))

    def write(self, data: bytes) -> None:
        if not self.closing:
            self.node.data_received(data)


class NodeEnd:
    """The node session's transport: its replies go to the proxy."""

    def __init__(self, side: NodeSide) -> None:
        self.side = side

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def write(self, data: bytes) -> None:
        self.side.send(data)

    def close(self) -> None:
        self.side.close()


class Counter:
    """sys.settrace hook: bytecodes and calls of every function under `root`,
    calls only of other Python functions."""

    def __init__(self, root: str, lines: set[str]) -> None:
        self.root = root
        self.lines = lines
        self.bytecodes: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()
        self.other: collections.Counter[str] = collections.Counter()
        self.by_line: collections.Counter[tuple[str, int]] = collections.Counter()

    def __call__(self, frame, event, arg):
        if event != "call":
            return None
        code = frame.f_code
        key = "%s:%s" % (os.path.basename(code.co_filename), code.co_qualname)
        if not code.co_filename.startswith(self.root):
            if code.co_filename not in SKIPPED:
                self.other[key] += 1
            return None
        self.calls[key] += 1
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        bytecodes = self.bytecodes
        if code.co_qualname in self.lines:
            by_line = self.by_line

            def each_line(frame, event, arg):
                if event == "opcode":
                    bytecodes[key] += 1
                    by_line[(code.co_filename, frame.f_lineno or 0)] += 1
                return each_line
            return each_line

        def each(frame, event, arg):
            if event == "opcode":
                bytecodes[key] += 1
            return each
        return each


def serve(tree: str, messages: int, reuse: int, counter: Counter, node: bool = False,
          helos: int = 1) -> int:
    """Serve sessions until `messages` are delivered (after a warm-up); how many were."""
    sys.path.insert(0, tree)
    import uvloop

    from proxsmtp.net import channel, destination
    from proxsmtp.process import config as config_module
    from proxsmtp.session.session import Session

    channel.SETS_NODELAY = True            # as the worker says under uvloop
    workdir = tempfile.mkdtemp()
    path = os.path.join(workdir, "bench.conf")
    with open(path, "w") as handle:
        handle.write("Listen: 127.0.0.1:2525\nOutAddress: 127.0.0.1:2526\nTempDirectory: %s\n"
                     % workdir)
        if node:
            handle.write("FilterType: smtp\nFilterCommand: 127.0.0.1:2527\n")
    config = config_module.load(path)
    delivered = [0]
    sessions_made = [0]

    async def dial(dest, timeout, source, tag, what=""):
        """The filter node's connection, without a socket to connect."""
        return socket.socket(), None

    destination.dial = dial

    class Loop(uvloop.Loop):
        """The loop hands the sessions fake peers instead of sockets."""

        async def create_connection(self, factory, host=None, port=None, sock=None, **kwargs):
            protocol = factory()
            if getattr(protocol, "name", None) == "FILTER":
                sock.close()
                transport = NodeSide(self, protocol)
                protocol.connection_made(transport)
                return transport, protocol
            transport = SinkSide(self, protocol)
            protocol.connection_made(transport)
            transport.send(b"220 sink.example ESMTP\r\n")
            return transport, protocol

        async def connect_accepted_socket(self, factory, sock, **kwargs):
            protocol = factory()
            transport = SourceSide(self, protocol, reuse, delivered)
            sessions_made[0] += 1
            if helos > 1:       # a different client (HELO name) per session, in turn
                transport.hello = b"EHLO client%d.example\r\n" % (sessions_made[0] % helos)
            protocol.connection_made(transport)
            return transport, protocol

    async def sessions(count: int) -> None:
        sock = socket.socket()
        try:
            for _ in range(count):
                await Session(config, sock, loop).run()
        finally:
            sock.close()

    loop = Loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(sessions(max(1, messages // reuse // 10)))     # warm-up
        delivered[0] = 0
        sys.settrace(counter)
        try:
            loop.run_until_complete(sessions(max(1, messages // reuse)))
        finally:
            sys.settrace(None)
    finally:
        loop.close()
    return delivered[0]


def report(counter: Counter, delivered: int, top: int) -> None:
    per = max(delivered, 1)
    print("%d messages delivered; per message: %.0f bytecodes, %.0f calls of proxsmtp functions, "
          "%.0f calls of other Python functions"
          % (delivered, sum(counter.bytecodes.values()) / per, sum(counter.calls.values()) / per,
             sum(counter.other.values()) / per))
    print("  bytecodes   calls  function")
    for key, count in counter.bytecodes.most_common(top):
        print("  %9.1f  %6.2f  %s" % (count / per, counter.calls[key] / per, key))
    if counter.other:
        print("  other Python functions called:")
        for key, count in counter.other.most_common(10):
            print("             %6.2f  %s" % (count / per, key))
    for (filename, number), count in sorted(counter.by_line.items()):
        print("  %9.1f  %s:%d  %s" % (count / per, os.path.basename(filename), number,
                                      linecache.getline(filename, number).strip()[:90]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", default=os.path.dirname(HERE),
                        help="proxsmtpd source tree (default: this checkout)")
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--reuse", type=int, default=1, metavar="K",
                        help="messages per session (default 1: a new session per message)")
    parser.add_argument("--node", action="store_true",
                        help="FilterType smtp: every message to bench/node.py's node first")
    parser.add_argument("--helos", type=int, default=1, metavar="N",
                        help="N different client HELO names, one per session in turn")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--lines", default="", help="functions to count by source line")
    args = parser.parse_args()
    tree = os.path.abspath(args.tree)
    counter = Counter(os.path.join(tree, "proxsmtp") + os.sep,
                      {name for name in args.lines.split(",") if name})
    delivered = serve(tree, args.messages, max(1, args.reuse), counter, args.node,
                      max(1, args.helos))
    report(counter, delivered, args.top)
    expected = max(1, args.messages // max(1, args.reuse)) * max(1, args.reuse)
    if delivered != expected:
        print("only %d of %d messages were delivered" % (delivered, expected), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
