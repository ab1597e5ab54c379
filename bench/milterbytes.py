#!/usr/bin/env python3
"""Bytecodes and Python calls per message on the milter path, by function:
a deterministic count of the proxy's own Python for one milter that asks
for no reply before the end of the message and accepts at once (what
bench/milter.py does for `bench/run.py --only milter`).

In this process: a milter speaking the protocol (OPTNEG with every
SMFIP_NR_* flag, SMFIR_ACCEPT at SMFIC_BODYEOB) on a loopback socket, and
one session's MilterStages (session/milters.py) driven as a reused
session drives them: per message MAIL, RCPT, DATA, the end of the message
with a 10 KB message, then the transaction's end (ABORT).  Only proxsmtp's
frames are traced (`sys.settrace`, `f_trace_opcodes`): the figures repeat
from run to run, whatever else the machine runs.

    .venv/bin/python bench/milterbytes.py [--tree DIR] [--messages N] [--top N]

`--untraced` runs the same loop on uvloop (as a worker does) without the
trace, for valgrind: the instructions per message are the difference of two
runs, N and N + 400 messages (the fake milter's included, the same in every
tree):

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        .venv/bin/python bench/milterbytes.py --untraced --messages 420 --sessions --reuse
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import struct
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
NR_ALL = 0x1000 | 0x2000 | 0x4000 | 0x8000 | 0x10000 | 0x20000 | 0x40000 | 0x80000 | 0x80


async def milter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The fake milter (not counted: outside proxsmtp)."""
    try:
        while True:
            length = struct.unpack("!I", await reader.readexactly(4))[0]
            data = await reader.readexactly(length)
            code = data[:1]
            if code == b"O":
                _, actions, protocol = struct.unpack("!III", data[1:13])
                reply = b"O" + struct.pack("!III", 6, 0, protocol & NR_ALL)
            elif code == b"E":
                reply = b"a"
            elif code == b"Q":
                break
            else:
                continue
            writer.write(struct.pack("!I", len(reply)) + reply)
    except asyncio.IncompleteReadError:
        pass
    writer.close()


class Counter:
    def __init__(self, root: str) -> None:
        self.root = root
        self.bytecodes: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()

    def __call__(self, frame, event, arg):
        code = frame.f_code
        if not code.co_filename.startswith(self.root):
            return None
        name = code.co_qualname
        self.calls[name] += 1
        frame.f_trace_opcodes = True
        counts = self.bytecodes

        def each(frame, event, arg):
            if event == "opcode":
                counts[name] += 1
            return each
        return each


class Client:
    """What MilterStages.connect reads of the session."""

    proxy_header = None
    peer = ("192.0.2.7", 4321)


async def session(messages: int, counter: Counter, directory: str, sessions: bool,
                  reuse: bool) -> None:
    from proxsmtp.message.envelope import Envelope
    from proxsmtp.net.addresses import parse_milter
    from proxsmtp.process.config import Config
    from proxsmtp.session.milters import MilterStages

    server = await asyncio.start_server(milter, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    spec = (parse_milter("inet:127.0.0.1:%d" % port),)
    config = Config(Milters=spec)
    if reuse:
        config.milter_reuse = frozenset([spec[0].spec])
    body = b"Subject: bench\r\nFrom: <a@example.org>\r\n\r\n" + b"x" * 76 + b"\r\n"
    body = body * (10240 // len(body))
    stages = None
    for number in range(messages + 1):
        if number == 1 and counter is not None:
            sys.settrace(counter)       # the first message warms up
        if stages is None:
            envelope = Envelope(tag="4B2A1C", client_ip="192.0.2.7")
            stages = MilterStages(config, envelope, "4B2A1C")
            await stages.connect(Client)
            assert stages.stage(Client, "helo", ["client.test"], "client.test",
                                lambda: None) is None
        await one_message(stages, envelope, body, directory)
        if sessions:                    # the session ends: its milters closed (or kept)
            stages.close()
            stages = None
            await asyncio.sleep(0)
    sys.settrace(None)
    if stages is not None:
        stages.close()
    await asyncio.sleep(0.05)
    from proxsmtp.filters import milterpool
    milterpool.close_idle()
    server.close()


async def one_message(stages, envelope, body: bytes, directory: str) -> None:
    """MAIL, RCPT, DATA, the end of the message, the transaction's end."""
    from proxsmtp.message import datapath
    from proxsmtp.message.spool import Spool

    envelope.sender, envelope.recipients = "a@example.org", ["b@example.org"]
    assert stages.stage(Client, "mail", ["<a@example.org>"], "a@example.org",
                        lambda: None) is None
    assert stages.stage(Client, "rcpt", ["<b@example.org>"], "b@example.org",
                        lambda: None) is None
    assert await stages.data_stage(Client, datapath.FILTERED) is None
    message = Spool(directory, in_memory=True)
    message.write(body)
    message.finish()
    outcome = await stages.message(message, envelope, directory)
    assert outcome.answer.action in ("accept", "continue"), outcome.answer
    stages.end_transaction()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", default=os.path.dirname(HERE))
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--sessions", action="store_true",
                        help="one message per session: each connects (or, with --reuse, "
                        "takes a kept connection), says connect and HELO, and closes")
    parser.add_argument("--reuse", action="store_true", help="MilterReuse names the milter")
    parser.add_argument("--untraced", action="store_true",
                        help="no trace, on uvloop: for valgrind's instruction count")
    args = parser.parse_args()
    tree = os.path.abspath(args.tree)
    sys.path.insert(0, tree)
    if args.untraced:
        import uvloop
        with tempfile.TemporaryDirectory() as directory:
            uvloop.run(session(args.messages, None, directory, args.sessions, args.reuse))
        return 0
    counter = Counter(os.path.join(tree, "proxsmtp"))
    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(session(args.messages, counter, directory, args.sessions, args.reuse))
    n = args.messages
    print("%s: per message, %d messages, %s%s" % (
        tree, n, "a session each" if args.sessions else "on one session",
        ", MilterReuse" if args.reuse else ""))
    print("bytecodes %.0f, Python calls %.1f" % (sum(counter.bytecodes.values()) / n,
                                                 sum(counter.calls.values()) / n))
    for name, count in counter.bytecodes.most_common(args.top):
        print("  %7.1f %5.2f  %s" % (count / n, counter.calls[name] / n, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
