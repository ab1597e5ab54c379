#!/usr/bin/env python3
"""A pipelining SMTP load generator (RFC 2920), for bench/run.py.

smtp-source talks in lockstep, so this client is the one that pipelines:
`--sessions` connections at once, each says EHLO (and insists on PIPELINING
in the answer), then per message writes MAIL, RCPT and DATA in one group,
reads their three replies (250, 250, 354), writes the body with the final
`.` and reads the verdict.  With `--new-session` every message has its own
connection (EHLO, group, body, QUIT); otherwise each connection carries
message after message.  With `--bdat` (RFC 3030) the EHLO answer must offer
CHUNKING too, and the group is MAIL, RCPT and `BDAT n LAST` with the
message, with no dot-stuffing and no final dot: three replies, all 250.
Any unexpected reply fails the run (exit 1).
Prints one JSON line: messages, seconds, messages per second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

try:
    import uvloop
except ImportError:     # the stdlib loop will do, only slower
    uvloop = None


class Failed(Exception):
    """The server said something a well-behaved run does not hear."""


async def reply(reader: asyncio.StreamReader) -> bytes:
    """One whole (multi-line) reply; the last line."""
    while True:
        line = await reader.readline()
        if not line:
            raise Failed("connection closed")
        if line[3:4] != b"-":
            return line


def expect(line: bytes, code: bytes, what: str) -> None:
    if not line.startswith(code):
        raise Failed("%s: %r" % (what, line[:80]))


async def session(host: str, port: int, messages: int, body: bytes, bdat: bool = False) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        expect(await reply(reader), b"220", "greeting")
        writer.write(b"EHLO pipeline.bench\r\n")
        ehlo = []
        while True:
            line = await reader.readline()
            ehlo.append(line[4:].strip().upper())
            if line[3:4] != b"-":
                break
        expect(line, b"250", "EHLO")
        if b"PIPELINING" not in ehlo:
            raise Failed("no PIPELINING in the EHLO reply")
        group = b"MAIL FROM:<bench@example.com>\r\nRCPT TO:<sink@example.com>\r\n"
        if bdat:
            if b"CHUNKING" not in ehlo:
                raise Failed("no CHUNKING in the EHLO reply")
            message = body[:-3]     # no final dot
            group += b"BDAT %d LAST\r\n" % len(message) + message
            for _ in range(messages):
                writer.write(group)
                expect(await reply(reader), b"250", "MAIL")
                expect(await reply(reader), b"250", "RCPT")
                expect(await reply(reader), b"250", "BDAT LAST")
            messages = 0
        group += b"DATA\r\n"
        for _ in range(messages):
            writer.write(group)
            expect(await reply(reader), b"250", "MAIL")
            expect(await reply(reader), b"250", "RCPT")
            expect(await reply(reader), b"354", "DATA")
            writer.write(body)
            expect(await reply(reader), b"250", "end of data")
        writer.write(b"QUIT\r\n")
        await reply(reader)
    finally:
        writer.close()


def make_body(size: int) -> bytes:
    """Headers, `size` bytes of 78-character lines, and the final dot."""
    line = b"x" * 78 + b"\r\n"
    lines = line * (size // len(line) + 1)
    return (b"From: bench@example.com\r\nTo: sink@example.com\r\nSubject: pipelining\r\n\r\n"
            + lines[:size].rstrip(b"x\r\n") + b"\r\n.\r\n")


async def run(host: str, port: int, sessions: int, messages: int, size: int,
              new_session: bool, bdat: bool = False) -> None:
    body = make_body(size)
    if not new_session:
        counts = [messages // sessions + (1 if i < messages % sessions else 0)
                  for i in range(sessions)]
        await asyncio.gather(*(session(host, port, n, body, bdat) for n in counts if n))
        return
    left = [messages]

    async def one_at_a_time() -> None:
        while left[0] > 0:
            left[0] -= 1
            await session(host, port, 1, body, bdat)

    await asyncio.gather(*(one_at_a_time() for _ in range(sessions)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("target", help="host:port")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--size", type=int, default=10240)
    parser.add_argument("--new-session", action="store_true", help="one connection per message")
    parser.add_argument("--bdat", action="store_true", help="send each message by BDAT (RFC 3030)")
    args = parser.parse_args(argv)
    host, port = args.target.rsplit(":", 1)
    started = time.perf_counter()
    coro = run(host, int(port), args.sessions, args.messages, args.size, args.new_session,
               args.bdat)
    try:
        if uvloop is not None:
            uvloop.run(coro)
        else:
            asyncio.run(coro)
    except (Failed, OSError) as exc:
        print("pipeline: %s" % exc, file=sys.stderr)
        return 1
    seconds = time.perf_counter() - started
    print(json.dumps({"messages": args.messages, "seconds": seconds,
                      "per_second": args.messages / seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
