"""One connection to one milter (Sendmail's milter protocol v6; the packets
are in miltercodec.py).

Opened once per client session and kept for its messages, as Postfix's
milter8.c does: connect (inet through net/destination.py's `dial`, or a
unix socket), then OPTNEG, offering only the actions that milterchain.py
carries out.  The milter's answer says which stages it wants (SMFIP_NO*:
no packet at all) and which it wants without a reply (SMFIP_NR_*: the
packet goes, nobody waits).  A step is the stage's macros (SMFIC_MACRO, sent
even for a stage the milter skips, as Postfix does), its packet, and, when
a reply is due, the wait for it, which SMFIR_PROGRESS restarts.

TCP_NODELAY: every step is a small packet the milter waits for (the event
loop sets it on the connections it makes; uvloop on every TCP transport).
TCP_QUICKACK, set again after every read that leaves the milter's answer
unfinished (Linux clears it when it sees a request/response pattern): most
milters write their answers in several small packets (edits, then the
verdict) without TCP_NODELAY, so the second one waits for our ACK, which a
delayed ACK holds back for up to 40 ms (bench/milterack.py; the figures are
in docs/BEHAVIOUR.md, "Milters").  A read that ends with the answer's last
packet (a verdict, OPTNEG's) leaves nothing waiting for that ACK.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque

from ..net import addresses, channel, destination
from ..net.waits import within
from . import miltercodec as codec

TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", 12)

# stage: (command, SMFIP_NO* that skips it, SMFIP_NR_* that asks for no reply)
STAGES = {
    "connect": (codec.CONNECT, codec.P_NOCONNECT, codec.P_NR_CONN),
    "helo": (codec.HELO, codec.P_NOHELO, codec.P_NR_HELO),
    "mail": (codec.MAIL, codec.P_NOMAIL, codec.P_NR_MAIL),
    "rcpt": (codec.RCPT, codec.P_NORCPT, codec.P_NR_RCPT),
    "data": (codec.DATA, codec.P_NODATA, codec.P_NR_DATA),
    "header": (codec.HEADER, codec.P_NOHDRS, codec.P_NR_HDR),
    "eoh": (codec.EOH, codec.P_NOEOH, codec.P_NR_EOH),
    "body": (codec.BODY, codec.P_NOBODY, codec.P_NR_BODY),
    "eob": (codec.BODYEOB, 0, 0),
}

# stage: the SMFIP_* bits that mean no reply to it (skipped, or sent without reply)
NO_REPLY = {stage: skip | no_reply for stage, (_, skip, no_reply) in STAGES.items()}

# What milterchain.py does with a milter's end-of-message requests.
ACTIONS = (codec.F_ADDHDRS | codec.F_CHGBODY | codec.F_ADDRCPT | codec.F_DELRCPT
           | codec.F_CHGHDRS | codec.F_QUARANTINE | codec.F_CHGFROM | codec.F_ADDRCPT_PAR)
# Every stage may be skipped or left without reply; SMFIR_SKIP in the body is
# honoured; header values may keep their leading space.  Not offered:
# SMFIP_RCPT_REJ (recipients the server refused are not known at RCPT time).
PROTOCOL = (codec.P_NOCONNECT | codec.P_NOHELO | codec.P_NOMAIL | codec.P_NORCPT
            | codec.P_NOBODY | codec.P_NOHDRS | codec.P_NOEOH | codec.P_NR_HDR
            | codec.P_NOUNKNOWN | codec.P_NODATA | codec.P_SKIP | codec.P_NR_CONN
            | codec.P_NR_HELO | codec.P_NR_MAIL | codec.P_NR_RCPT | codec.P_NR_DATA
            | codec.P_NR_UNKN | codec.P_NR_EOH | codec.P_NR_BODY | codec.P_HDR_LEADSPC)

# Packets after which the milter has more to say (SMFIR_PROGRESS, an end of
# message's change requests): a read that ends with one wants its ACK now.
MORE = frozenset((codec.PROGRESS, codec.ADDHEADER, codec.INSHEADER, codec.CHGHEADER,
                  codec.REPLBODY, codec.CHGFROM, codec.ADDRCPT, codec.ADDRCPT_PAR,
                  codec.DELRCPT, codec.QUARANTINE, codec.SETSYMLIST))

QUIT_NC, QUIT, ABORT = (codec.simple(codec.QUIT_NC), codec.simple(codec.QUIT),
                        codec.simple(codec.ABORT))
OPTNEG = codec.optneg(codec.VERSION, ACTIONS, PROTOCOL)
NODELAY = QUICKACK = True       # bench/milterack.py turns them off to measure them
HELD = 64 * 1024                # bytes of packets without reply held back at most


def _destination(address: addresses.MilterAddress) -> addresses.Address:
    """Where a milter is, as an Address (made once per milter: its `is_ip`
    is worked out once)."""
    dest = _DESTINATIONS.get(address)
    if dest is None:
        dest = _DESTINATIONS[address] = (
            addresses.Address(path=address.path) if address.family == "unix"
            else addresses.Address(address.host, address.port))
    return dest


_DESTINATIONS: dict[addresses.MilterAddress, addresses.Address] = {}


class MilterError(Exception):
    """The milter cannot be used: unreachable, timed out, closed, or garbage
    (the text says which, for the one log line)."""


class _Link(asyncio.Protocol):
    """The connection's bytes: packets decoded as they come, one waiter."""

    def __init__(self) -> None:
        self.decoder = codec.Decoder()
        self.packets: deque[tuple[bytes, bytes]] = deque()
        self.waiter: asyncio.Future | None = None
        self.error = ""
        self.transport: asyncio.Transport | None = None
        self.sock = None
        self.paused = False             # the milter is behind: wait before more body

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.sock = transport.get_extra_info("socket")
        if self.sock is not None and self.sock.family != socket.AF_UNIX:
            if not (NODELAY and channel.SETS_NODELAY):
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(NODELAY))
        else:
            self.sock = None

    def quickack(self) -> None:
        if self.sock is not None and QUICKACK:
            try:
                self.sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
            except OSError:
                self.sock = None

    def data_received(self, data: bytes) -> None:
        decoder = self.decoder
        try:
            packets = decoder.feed(data)
        except codec.CodecError as exc:
            self.fail("protocol error: %s" % exc)
            return
        if decoder.buffer or not packets or packets[-1][0] in MORE:
            self.quickack()
        self.packets.extend(packets)
        self.wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail("connection closed by the milter" if exc is None
                  else "connection lost: %s" % (getattr(exc, "strerror", None) or exc))

    def fail(self, reason: str) -> None:
        if not self.error:
            self.error = reason
        if self.transport is not None:
            self.transport.abort()
        self.wake()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.wake()

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result("timed out")


class Milter:
    """One milter, for one client session."""

    def __init__(self, address: addresses.MilterAddress, timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self.link: _Link | None = None
        self.version = 0
        self.actions = 0
        self.protocol = 0
        # Packets that expect no reply wait here for the next write (a step
        # that waits, or HELD bytes): a milter that answers only at the end
        # of the message costs one send per message, not one per command.
        self.held: list[bytes] = []
        self.held_size = 0
        self.loop: asyncio.AbstractEventLoop | None = None     # the one it was opened on
        self.reused = False             # taken from the worker's pool (milterpool.py)
        self.expires = 0.0           # in the pool: loop time it is to be closed

    @property
    def name(self) -> str:
        return self.address.spec

    async def open(self) -> None:
        """Connect and negotiate; MilterError if either fails."""
        dest = _destination(self.address)
        loop = self.loop = asyncio.get_running_loop()
        link = _Link()
        if dest.is_unix or dest.is_ip:
            # The event loop's own connect (uvloop: libuv's), as the server's
            # connection is made: no Python socket to make and watch.
            connecting = (loop.create_unix_connection(lambda: link, dest.path) if dest.is_unix
                          else loop.create_connection(lambda: link, dest.host, dest.port))
            try:
                await within(self.timeout, connecting, loop)
            except OSError as exc:       # TimeoutError included
                raise MilterError("connect to milter %s failed: %s"
                                  % (dest, destination.connect_failure(exc))) from None
        else:
            try:
                sock, _ = await destination.dial(dest, self.timeout, None, "", "milter")
            except destination.DestinationError as exc:
                raise MilterError(str(exc)) from None
            try:
                await loop.create_connection(lambda: link, sock=sock)
            except OSError as exc:
                sock.close()
                raise MilterError("connect failed: %s"
                                  % destination.connect_failure(exc)) from None
        self.link = link
        self.write(OPTNEG)
        code, data = await self.answer(self.timeout)
        if code != codec.OPTNEG:
            raise self.broken("OPTNEG answered with %r" % code)
        try:
            version, actions, protocol = codec.parse_optneg(data)
        except codec.CodecError as exc:
            raise self.broken(str(exc)) from None
        if version < 2 or version > codec.VERSION:
            raise self.broken("protocol version %d" % version)
        # Bits we did not offer are not used: the milter cannot ask for them.
        self.version, self.actions, self.protocol = version, actions & ACTIONS, protocol & PROTOCOL

    def broken(self, reason: str) -> MilterError:
        """The milter broke the protocol: closed, and the error to raise."""
        if self.link is not None:
            self.link.fail("protocol error: %s" % reason)
        return MilterError("protocol error: %s" % reason)

    def sends(self, stage: str) -> bool:
        """The milter wants this stage's packet."""
        return not self.protocol & STAGES[stage][1]

    def replies(self, stage: str) -> bool:
        """The milter answers this stage (so the step waits)."""
        return not self.protocol & NO_REPLY[stage]

    @property
    def leadspace(self) -> bool:
        """SMFIP_HDR_LEADSPC: header values go and come with their leading space."""
        return bool(self.protocol & codec.P_HDR_LEADSPC)

    @property
    def alive(self) -> bool:
        return self.link is not None and not self.link.error

    def _link(self) -> _Link:
        link = self.link
        if link is None or link.error:
            raise MilterError(link.error if link else "not connected")
        return link

    def queue(self, data: bytes) -> None:
        """A packet that expects no reply: held back (see `held`)."""
        link = self.link
        if link is None or link.error:
            self._link()
        self.held.append(data)
        self.held_size += len(data)
        if self.held_size >= HELD:
            self.write(b"")

    def write(self, data: bytes) -> None:
        """`data` now, after what was held back."""
        link = self.link
        if link is None or link.error:
            self._link()
        if self.held:
            self.held.append(data)
            data = b"".join(self.held)
            self.held.clear()
            self.held_size = 0
        if data:
            link.transport.write(data)

    def send(self, stage: str, command: bytes | None, macros: dict[str, str] | None) -> bool:
        """The stage's macros and its packet (when the milter takes it); whether
        a reply is due (then they are written at once, else held back).
        `command`: the packet, made by the caller."""
        code, skip, no_reply = STAGES[stage]
        protocol = self.protocol
        if command is None or protocol & skip:
            due, command = False, b""
        else:
            due = not protocol & no_reply
        if macros:
            command = codec.macro(code, macros) + command
        if due:
            self.write(command)
        elif command:
            self.queue(command)
        return due

    async def answer(self, timeout: float) -> tuple[bytes, bytes]:
        """The milter's next packet but SMFIR_PROGRESS, which restarts the wait."""
        if self.held:
            self.write(b"")
        link = self.link
        loop = self.loop
        while True:
            while not link.packets:
                if link.error:
                    raise MilterError(link.error)
                waiter = link.waiter = loop.create_future()
                timer = loop.call_later(timeout, _expire, waiter)
                try:
                    if await waiter:
                        link.fail("timed out")
                        raise MilterError("timed out")
                finally:
                    timer.cancel()
                    link.waiter = None
            code, data = link.packets.popleft()
            if code != codec.PROGRESS:
                return code, data

    async def drain(self, timeout: float) -> None:
        """Wait until the milter has taken what was written (body chunks sent
        without a reply due): a slow milter does not make the message pile
        up in memory."""
        link = self.link
        if link is None or not link.paused:
            return
        loop = self.loop
        while link.paused and not link.error:
            waiter = link.waiter = loop.create_future()
            timer = loop.call_later(timeout, _expire, waiter)
            try:
                if await waiter:
                    link.fail("timed out")
            finally:
                timer.cancel()
                link.waiter = None
        if link.error:
            raise MilterError(link.error)

    def abort(self) -> None:
        """SMFIC_ABORT: the transaction is over; no reply."""
        if self.alive:
            self.queue(ABORT)

    def quit_nc(self) -> None:
        """SMFIC_QUIT_NC: the client session's conversation is over, the
        connection stays for another (milterpool.py); no reply.  Held back
        like any packet without reply: it goes with the next session's first
        packets, a write less per session (or gives way to QUIT if the
        connection is closed idle)."""
        self.queue(QUIT_NC)

    def close(self) -> None:
        """SMFIC_QUIT and the connection closed (the milter answers nothing)."""
        link = self.link
        if link is None or link.transport is None:
            return
        if not link.error:
            if self.held and self.held[-1] is QUIT_NC:
                self.held.pop()
            link.transport.write(b"".join(self.held) + QUIT)
            link.error = "closed"
            link.transport.close()
        self.link = None
