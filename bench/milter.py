#!/usr/bin/env python3
"""A milter for the benchmark that accepts every message at once.

    milter.py HOST:PORT

The milter protocol by hand (Sendmail's libmilter/mfdef.h, version 6), on
uvloop when it is there: it negotiates no reply for every stage but the end
of message (SMFIP_NR_*, what rspamd's proxy worker asks for), so the MTA
sends connect, HELO, MAIL, RCPT, DATA, the headers and the body without
waiting; the end of message gets SMFIR_ACCEPT.  It asks for no actions (it
changes nothing).  bench/run.py starts it as a peer of its own, so its CPU
is never counted as the proxy's; one process is enough, since it does next
to nothing per packet.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
import struct

try:
    import uvloop
except ImportError:     # the stdlib loop: slower, but the row still runs
    uvloop = None

VERSION = 6
# mfdef.h: the no-reply flags of every stage before the end of message
SMFIP_NR_HDR = 0x80
SMFIP_NR_CONN = 0x1000
SMFIP_NR_HELO = 0x2000
SMFIP_NR_MAIL = 0x4000
SMFIP_NR_RCPT = 0x8000
SMFIP_NR_DATA = 0x10000
SMFIP_NR_UNKN = 0x20000
SMFIP_NR_EOH = 0x40000
SMFIP_NR_BODY = 0x80000
NO_REPLY = (SMFIP_NR_HDR | SMFIP_NR_CONN | SMFIP_NR_HELO | SMFIP_NR_MAIL | SMFIP_NR_RCPT
            | SMFIP_NR_DATA | SMFIP_NR_UNKN | SMFIP_NR_EOH | SMFIP_NR_BODY)
# the command each no-reply flag silences
SILENCED = {b"L": SMFIP_NR_HDR, b"C": SMFIP_NR_CONN, b"H": SMFIP_NR_HELO, b"M": SMFIP_NR_MAIL,
            b"R": SMFIP_NR_RCPT, b"T": SMFIP_NR_DATA, b"U": SMFIP_NR_UNKN, b"N": SMFIP_NR_EOH,
            b"B": SMFIP_NR_BODY}
# SMFIC_MACRO, SMFIC_ABORT and SMFIC_QUIT_NC never get an answer
NEVER = frozenset((b"D", b"A", b"K"))
ACCEPT = struct.pack("!I", 1) + b"a"
CONTINUE = struct.pack("!I", 1) + b"c"
LENGTH_LIMIT = 1 << 20      # a packet longer than this ends the connection


class Milter(asyncio.Protocol):
    """One MTA connection: packets in, answers out, one write per read."""

    def __init__(self) -> None:
        self.buffer = b""
        self.silent = 0         # the no-reply flags the MTA agreed to
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        out = []
        offset, size = 0, len(buffer)
        while size - offset >= 5:
            (length,) = struct.unpack_from("!I", buffer, offset)
            if not 0 < length <= LENGTH_LIMIT:
                self.transport.close()
                return
            if size - offset - 4 < length:
                break
            code = buffer[offset + 4:offset + 5]
            payload = buffer[offset + 5:offset + 4 + length]
            offset += 4 + length
            if code == b"E":
                out.append(ACCEPT)
            elif code == b"O":
                out.append(self.negotiate(payload))
            elif code == b"Q":
                self.transport.close()
                return
            elif code not in NEVER and not self.silent & SILENCED.get(code, 0):
                out.append(CONTINUE)
        self.buffer = buffer[offset:]
        if out:
            self.transport.write(b"".join(out))

    def negotiate(self, payload: bytes) -> bytes:
        """SMFIC_OPTNEG: version 6, no actions, every no-reply flag the MTA offers."""
        _, _, offered = struct.unpack("!III", payload[:12])
        self.silent = offered & NO_REPLY
        body = b"O" + struct.pack("!III", VERSION, 0, self.silent)
        return struct.pack("!I", len(body)) + body


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set_result, None)
    server = await loop.create_server(Milter, host, port, backlog=4096, reuse_address=True)
    async with server:
        await stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("listen", help="HOST:PORT")
    args = parser.parse_args()
    host, port = args.listen.rsplit(":", 1)
    # one connection per milter per held client session: thousands of them
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    (uvloop.run if uvloop is not None else asyncio.run)(serve(host.strip("[]"), int(port)))


if __name__ == "__main__":
    main()
