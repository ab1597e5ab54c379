#!/usr/bin/env python3
"""The empty relay: Python's floor for relaying the benchmark's traffic.

A byte relay on uvloop with asyncio Protocols and nothing else: no SMTP
parsing, no spooling, no per-line work.  Each accepted connection gets a
connection to the target, and whatever either side sends is written to the
other from `data_received`.  Pre-forked like proxsmtpd (one process per CPU
sharing one listening socket), so its CPU per message is the least any
Python proxy on this event loop can cost: bench/run.py reports it beside
haproxy's (the C ceiling) and proxsmtpd's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket

import uvloop


class Leg(asyncio.Protocol):
    """One side of a relayed connection; `other` is the opposite leg."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: Leg | None = None
        self.pending: list[bytes] = []      # what arrived before the other leg was up

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        other = self.other
        if other is None or other.transport is None:
            self.pending.append(data)
        else:
            other.transport.write(data)

    def eof_received(self) -> bool:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.close()
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.close()

    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()

    def joined(self, other: "Leg") -> None:
        """The other leg is connected: flush what waited for it."""
        self.other = other
        if self.pending and other.transport is not None:
            other.transport.write(b"".join(self.pending))
        self.pending = []


class ClientLeg(Leg):
    """The accepted side: opens the server side as soon as it is made."""

    server_leg: type[Leg] = Leg         # the protocol of the server side

    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__()
        self.target = target

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self.open())

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, server = await loop.create_connection(self.server_leg, *self.target)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        if self.transport is None or self.transport.is_closing():
            server.transport.close()
            return
        server.joined(self)
        self.joined(server)


async def serve(sock: socket.socket, target: tuple[str, int], client_leg: type[ClientLeg]) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    server = await loop.create_server(lambda: client_leg(target), sock=sock, backlog=4096)
    await stop
    server.close()


def main(client_leg: type[ClientLeg] = ClientLeg, doc: str = __doc__) -> None:
    """Parse `[--workers N] LISTEN TARGET`, fork the workers, each serving
    `client_leg` sessions, and wait for them (SIGTERM stops them all)."""
    parser = argparse.ArgumentParser(description=doc.split("\n", 1)[0])
    parser.add_argument("listen", help="host:port to listen on")
    parser.add_argument("target", help="host:port to relay to")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    host, port = args.listen.rsplit(":", 1)
    thost, tport = args.target.rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(4096)
    sock.setblocking(False)
    children = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            uvloop.run(serve(sock, (thost, int(tport)), client_leg))
            os._exit(0)
        children.append(pid)
    signal.signal(signal.SIGTERM, lambda *_: [os.kill(pid, signal.SIGTERM) for pid in children])
    for pid in children:
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
