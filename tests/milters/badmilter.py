#!/usr/bin/env python3
"""A milter that misbehaves on purpose, written by hand on asyncio.

    badmilter.py --mode slow|garbage|close|good [--stage STAGE] [--delay SECONDS]
                 [--quit-nc close|keep] [--idle SECONDS] [--log FILE] SOCKET

SOCKET is `inet:127.0.0.1:PORT` or `unix:/path` (Postfix's syntax).  It
speaks the milter protocol (Sendmail's libmilter/mfdef.h, version 6, no
skipped stages, no no-reply flags) and accepts each message, except at
STAGE (`optneg`, `connect`, `helo`, `mail`, `rcpt`, `data`, `header`,
`eoh`, `body`, `eom`, or `all`; default `optneg`, the first answer due):

- slow: the answer comes after `--delay` seconds (default 60);
- garbage: instead of the answer, an HTTP error page (what a milter address
  pointing at a web server gives back): a 4-byte length field of 1.2 GB;
- close: the connection is closed without an answer;
- good: never misbehaves (with `--quit-nc keep`, a milter that keeps its
  connections across SMTP sessions).

SMFIC_QUIT_NC closes the connection, as a milter that closes an idle one
does; with `--quit-nc keep` the next SMTP session follows on it (SMFIC_CONNECT
again, no OPTNEG).  `--idle SECONDS`: a connection that long without a
packet is closed (a milter's own idle timeout).

A milter that is down needs no process: a free port with no listener.
`--log FILE` appends one JSON line per packet received: its stage, size,
the connection it came on (`conn`, counted from 1) and, for the connect
packet and macros, its strings (`strings`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import struct
import sys

STAGES = {b"O": "optneg", b"C": "connect", b"H": "helo", b"M": "mail", b"R": "rcpt",
          b"T": "data", b"L": "header", b"N": "eoh", b"B": "body", b"E": "eom",
          b"U": "unknown"}
# Commands that get no answer (mfdef.h): SMFIC_MACRO, SMFIC_ABORT, SMFIC_QUIT,
# SMFIC_QUIT_NC.
SILENT = {b"D": "macro", b"A": "abort", b"Q": "quit", b"K": "quit_nc"}
GARBAGE = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def packet(code: bytes, payload: bytes = b"") -> bytes:
    return struct.pack("!I", len(payload) + 1) + code + payload


class BadMilter:
    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.connections = 0

    def record(self, **fields: object) -> None:
        if self.options.log:
            with open(self.options.log, "a") as handle:
                handle.write(json.dumps(dict(fields, pid=os.getpid())) + "\n")

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = self.connections
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readexactly(4), self.options.idle)
                except asyncio.TimeoutError:
                    self.record(event="idle_close", size=0, conn=conn)
                    break
                (length,) = struct.unpack("!I", head)
                body = await reader.readexactly(length)
                code, payload = body[:1], body[1:]
                stage = STAGES.get(code) or SILENT.get(code) or "unknown:%r" % code
                fields = {}
                if code in (b"C", b"D"):
                    fields["strings"] = payload.decode("latin-1").split("\0")
                self.record(event=stage, size=len(payload), conn=conn, **fields)
                if code == b"K" and self.options.quit_nc == "keep":
                    continue
                if code in (b"Q", b"K"):
                    break
                if code not in STAGES:
                    continue
                if not await self.answer(writer, code, stage, payload):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def answer(self, writer: asyncio.StreamWriter, code: bytes, stage: str,
                     payload: bytes) -> bool:
        """Write this packet's answer; False to drop the connection."""
        if code == b"O":
            reply = packet(b"O", struct.pack("!III", 6, 0, 0))
        elif code == b"E":
            reply = packet(b"a")
        else:
            reply = packet(b"c")
        chosen = self.options.stage in (stage, "all")
        if chosen and self.options.mode == "slow":
            await asyncio.sleep(self.options.delay)
        elif chosen and self.options.mode == "garbage":
            writer.write(GARBAGE)
            await writer.drain()
            return False
        elif chosen and self.options.mode == "close":
            return False
        writer.write(reply)
        await writer.drain()
        return True


async def run(options: argparse.Namespace) -> None:
    milter = BadMilter(options)
    if options.socket.startswith("unix:"):
        path = options.socket[5:]
        if os.path.exists(path):
            os.unlink(path)
        server = await asyncio.start_unix_server(milter.serve, path)
    else:
        host, port = options.socket[5:].rsplit(":", 1)
        server = await asyncio.start_server(milter.serve, host.strip("[]"), int(port))
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("slow", "garbage", "close", "good"), required=True)
    parser.add_argument("--stage", default="optneg",
                        choices=sorted(set(STAGES.values()) | {"all"}))
    parser.add_argument("--delay", type=float, default=60.0)
    parser.add_argument("--quit-nc", choices=("close", "keep"), default="close")
    parser.add_argument("--idle", type=float, default=None)
    parser.add_argument("--log")
    parser.add_argument("socket")
    try:
        asyncio.run(run(parser.parse_args(argv)))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main(sys.argv[1:])
