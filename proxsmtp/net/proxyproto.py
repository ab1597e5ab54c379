"""haproxy's PROXY protocol (v1 text, v2 binary): reading it on Listen, writing
it towards the server.

A load balancer in TCP mode hides the client: proxsmtpd sees the balancer's
address.  With ProxyProtocol on, each connection starts with a header naming
the real client (and the address it connected to); `read()` takes it from
the accepted socket before any transport exists, exactly its bytes: what
came after it (SMTP, or with TLSWrapper the TLS ClientHello, as haproxy
sends the header in plaintext before the client's TLS) stays in the kernel
for the transport.
With OutProxyProtocol, `build()` makes the header the server connection
starts with, so the server (Postfix `smtpd_upstream_proxy_protocol`, Halon,
...) sees the client instead of proxsmtpd.

The parser is hostile-input code: `parse()` takes whatever bytes arrived so
far and either returns a header, None ("need more bytes") or raises
ProxyHeaderError -- never anything else.  It is our own rather than the
`proxy-protocol` package's, because that one frames the header by reading
from an asyncio StreamReader, while here the header must be taken from the
socket to the byte, before the transport (and
its unpack misreads SMTP bytes after a v2 header as TLVs and lets
struct/Unicode/address errors escape on malformed input).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
from dataclasses import dataclass

from ..process.log import clean
from . import addresses
from .waits import within

V1_PREFIX = b"PROXY "
# the longest v1 line, CRLF included (haproxy proxy-protocol.txt 2.1)
V1_MAX = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16                   # signature, version/command, family/protocol, length
_PEEK = 1024                    # bytes looked at per read: a header with the usual TLVs

_V2_LOCAL, _V2_PROXY = 0x0, 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_STREAM = 0x1
_V2_ADDRESS_LENGTH = {_AF_UNSPEC: 0, _AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}

Endpoint = tuple[str, int]       # (IP, port)


class ProxyHeaderError(Exception):
    """No valid PROXY header: that connection is closed.  `level` is the log
    level: a peer that connects and closes without a byte is a balancer's
    health check, not worth a warning each time.  `kind` is how /metrics
    counts it: invalid, closed (that health check) or refused (a peer not
    in ProxyProtocolFrom)."""

    def __init__(self, reason: str, level: int = logging.WARNING, kind: str = "invalid") -> None:
        super().__init__(reason)
        self.level = level
        self.kind = kind


@dataclass(frozen=True)
class ProxyHeader:
    """A parsed header.  `source`/`dest` are None for LOCAL (v2), UNKNOWN
    (v1) and address families without an IP (unix, unspecified): the
    connection's own endpoints then stand.  `local`: the v2 LOCAL command,
    a connection the balancer made itself (its health check), not a
    client's."""

    version: int
    length: int                  # bytes the header took in the stream
    source: Endpoint | None = None
    dest: Endpoint | None = None
    local: bool = False


def parse(data: bytes | bytearray | memoryview) -> ProxyHeader | None:
    """The header at the start of `data`, or None if more bytes are needed.

    Raises ProxyHeaderError when `data` can't be the start of a valid header.
    Bytes after the header are not looked at.
    """
    data = bytes(data[:V1_MAX]) if data[:1] == b"P" else bytes(data[:V2_FIXED + 0xFFFF])
    if data.startswith(V2_SIGNATURE[:len(data)]) and len(data) < len(V2_SIGNATURE):
        return None
    if data.startswith(V1_PREFIX[:len(data)]) and len(data) < len(V1_PREFIX):
        return None
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    if data.startswith(V1_PREFIX):
        return _parse_v1(data)
    raise ProxyHeaderError("no PROXY header: connection starts with %s" % clean(data[:16]))


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\n")
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError("PROXY v1 line longer than %d bytes" % V1_MAX)
        return None
    if end == 0 or data[end - 1:end] != b"\r":
        raise ProxyHeaderError("PROXY v1 line doesn't end with CRLF")
    line = data[:end - 1]
    words = line.split(b" ")
    if len(words) >= 2 and words[1] == b"UNKNOWN":
        return ProxyHeader(1, end + 1)       # the rest of an UNKNOWN line is ignored
    if len(words) != 6 or words[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("malformed PROXY v1 line: %s" % clean(line))
    version = 4 if words[1] == b"TCP4" else 6
    source = _ip_text(words[2], version), _port_text(words[4])
    dest = _ip_text(words[3], version), _port_text(words[5])
    return ProxyHeader(1, end + 1, source, dest)


def _ip_text(word: bytes, version: int) -> str:
    if b"%" in word:                          # a scope id means nothing to the receiver
        raise ProxyHeaderError("invalid address in PROXY v1 line: %s" % clean(word))
    try:
        ip = ipaddress.ip_address(word.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProxyHeaderError("invalid address in PROXY v1 line: %s" % clean(word)) from None
    if ip.version != version:
        raise ProxyHeaderError("IPv%d address in a TCP%d PROXY line" % (ip.version, version))
    return addresses.plain_ip(str(ip))


def _port_text(word: bytes) -> int:
    if not (word.isdigit() and 0 < len(word) <= 5) or (len(word) > 1 and word[:1] == b"0") \
            or int(word) > 65535:
        raise ProxyHeaderError("invalid port in PROXY v1 line: %s" % clean(word))
    return int(word)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < V2_FIXED:
        return None
    version_command, family_protocol, length = struct.unpack_from("!BBH", data, 12)
    if version_command >> 4 != 2:
        raise ProxyHeaderError("PROXY v2 header with version %d" % (version_command >> 4))
    command = version_command & 0xF
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyHeaderError("PROXY v2 header with unknown command %d" % command)
    family, protocol = family_protocol >> 4, family_protocol & 0xF
    if family not in _V2_ADDRESS_LENGTH or protocol > 2:
        raise ProxyHeaderError("PROXY v2 header with unknown family/protocol 0x%02x"
                               % family_protocol)
    total = V2_FIXED + length
    if len(data) < total:
        return None
    if command == _V2_LOCAL:
        return ProxyHeader(2, total, local=True)
    if length < _V2_ADDRESS_LENGTH[family]:
        raise ProxyHeaderError("PROXY v2 header too short (%d bytes) for its address family"
                               % length)
    if family not in (_AF_INET, _AF_INET6) or protocol != _STREAM:
        return ProxyHeader(2, total)         # unix / unspecified / datagram: no IP to use
    size = 4 if family == _AF_INET else 16
    body = data[V2_FIXED:]
    source_ip = ipaddress.ip_address(body[:size])
    dest_ip = ipaddress.ip_address(body[size:2 * size])
    source_port, dest_port = struct.unpack_from("!HH", body, 2 * size)
    return ProxyHeader(2, total, (addresses.plain_ip(str(source_ip)), source_port),
                       (addresses.plain_ip(str(dest_ip)), dest_port))


def build(version: int, source: Endpoint | None, dest: Endpoint | None) -> bytes:
    """The header naming `source` as the client of a connection to `dest`.

    Without both endpoints (a client on a unix socket) it says so: v1
    UNKNOWN, v2 LOCAL, and the receiver keeps the connection's own addresses.
    An IPv4 endpoint next to an IPv6 one is written IPv4-mapped.
    """
    if source is None or dest is None:
        if version == 1:
            return b"PROXY UNKNOWN\r\n"
        return V2_SIGNATURE + struct.pack("!BBH", 0x20 | _V2_LOCAL, 0, 0)
    source_ip = ipaddress.ip_address(source[0].split("%", 1)[0])
    dest_ip = ipaddress.ip_address(dest[0].split("%", 1)[0])
    if source_ip.version != dest_ip.version:
        source_ip, dest_ip = _as_v6(source_ip), _as_v6(dest_ip)
    if version == 1:
        return b"PROXY TCP%d %s %s %d %d\r\n" % (source_ip.version, str(source_ip).encode(),
                                                 str(dest_ip).encode(), source[1], dest[1])
    family = _AF_INET if source_ip.version == 4 else _AF_INET6
    body = source_ip.packed + dest_ip.packed + struct.pack("!HH", source[1], dest[1])
    return V2_SIGNATURE + struct.pack("!BBH", 0x20 | _V2_PROXY, family << 4 | _STREAM,
                                      len(body)) + body


def _as_v6(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    return ip if ip.version == 6 else ipaddress.IPv6Address("::ffff:%s" % ip)


# --- networks allowed to send a header (ProxyProtocolFrom) -------------------

Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


def parse_networks(text: str) -> Networks:
    """`10.0.0.0/8, 127.0.0.1 ::1`: addresses or networks, comma or space
    separated.  ValueError names the first entry that is neither."""
    words = text.replace(",", " ").split()
    if not words:
        raise ValueError("an address or network is needed")
    networks = []
    for word in words:
        try:
            networks.append(ipaddress.ip_network(word.strip("[]")))
        except ValueError as exc:
            raise ValueError("%s is not an address or network (%s)" % (word, exc)) from None
    return tuple(networks)


def allowed(peer_ip: str | None, networks: Networks | None) -> bool:
    """May this peer send a header?  Everyone when no list is set.  `peer_ip`
    None: a peer on a unix socket, always allowed (the socket file's
    permissions decide who connects).  A TCP peer whose address is not an
    IP (UNKNOWN: it could not be learnt) is refused: the list fails closed."""
    if networks is None or peer_ip is None:
        return True
    try:
        ip = ipaddress.ip_address(peer_ip.split("%", 1)[0])
    except ValueError:
        return False
    return any(ip in network for network in networks)


# --- the session side ----------------------------------------------------------

async def read(sock: socket.socket, peer_ip: str | None, networks: Networks | None,
               timeout: float, loop: asyncio.AbstractEventLoop | None = None) -> ProxyHeader:
    """Read the header at the start of the accepted `sock` (made
    non-blocking), taking exactly its bytes: whatever follows stays unread
    in the kernel.  `peer_ip` is the peer's address as accept(2) gave it
    (None on a unix socket); a peer not in `networks` is refused before a
    byte is read.
    The whole header must arrive within `timeout` seconds (a trickle of
    bytes doesn't restart the clock).

    Raises ProxyHeaderError: a peer not in `networks`, a malformed header,
    end of file or reset, or the time running out.
    """
    if not allowed(peer_ip, networks):
        raise ProxyHeaderError("PROXY header refused: the peer is not in ProxyProtocolFrom",
                               kind="refused")
    loop = loop or asyncio.get_running_loop()
    sock.setblocking(False)     # as accept(2) made it, it would stall the worker
    try:
        return await within(timeout, _read_header(sock, loop), loop)
    except TimeoutError:
        raise ProxyHeaderError("no complete PROXY header within %g seconds" % timeout) from None


async def _read_header(sock: socket.socket, loop: asyncio.AbstractEventLoop) -> ProxyHeader:
    """read()'s work, under its deadline: peek, parse, take the header's bytes."""
    taken = bytearray()         # the start of a header, read already
    while True:
        try:
            # Peeked, not read: only the header's own bytes are taken.
            seen = sock.recv(_PEEK, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            await readable(sock, loop)
            continue
        except OSError as exc:
            raise _gone(taken, exc) from None
        if not seen:
            raise _gone(taken)
        header = parse(taken + seen)
        if header is not None:
            _take(sock, header.length - len(taken))
            return header
        # All of it belongs to the header: taken, so that the next wait
        # waits for new bytes.
        taken += _take(sock, len(seen))


def _take(sock: socket.socket, count: int) -> bytes:
    """Read `count` bytes a peek has shown are there."""
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ProxyHeaderError("connection closed before a complete PROXY header")
        data += chunk
    return data


def _gone(taken: bytes | bytearray, exc: OSError | None = None) -> ProxyHeaderError:
    """The peer closed (or reset) the connection before a whole header."""
    how = "reset" if exc is not None else "closed"
    if not taken:
        return ProxyHeaderError("connection %s without a PROXY header" % how, logging.INFO,
                                kind="closed")
    return ProxyHeaderError("connection %s before a complete PROXY header" % how)


def discard_unread(sock: socket.socket) -> None:
    """Before closing a connection refused at its header: drop what the peer
    has sent so far (a little of it), so that the close is a FIN, as for any
    other end of session, not the RST that unread bytes would draw."""
    try:
        sock.setblocking(False)
        for _ in range(4):
            if not sock.recv(65536):
                return
    except OSError:
        pass


def _ready(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def readable(sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
    """Sleep until `sock` has something to read: bytes, end of file or an error."""
    fd = sock.fileno()
    waiter = loop.create_future()
    loop.add_reader(fd, _ready, waiter)
    try:
        await waiter
    finally:
        loop.remove_reader(fd)


async def left_at_once(sock: socket.socket, wait: float,
                       loop: asyncio.AbstractEventLoop | None = None) -> bool:
    """After a LOCAL header: did the balancer close (or reset) the connection
    within `wait` seconds, without sending anything?  That is a TCP health
    check, which needs no server connection.  Bytes, or silence (a check
    such as haproxy's `option smtpchk` waiting for the greeting), mean the
    session goes on."""
    loop = loop or asyncio.get_running_loop()
    try:
        await within(wait, readable(sock, loop), loop)
    except TimeoutError:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:             # reset
        return True


def outbound(version: int, client_ip: str, local_ip: str, header: ProxyHeader | None,
             sock: socket.socket, local_port: int | None = None,
             peer: object = None) -> bytes:
    """The header for a server connection on behalf of the client on `sock`.

    IPs are the session's (so whatever an inbound header said); ports come
    from the inbound header if it named the client, else the client's from
    `peer`, the address accept(2) gave (getpeername(2) fails once the client
    has reset the connection), and the local one from `sock` (`local_port`
    overrides it, e.g. the original destination's).
    """
    if client_ip == "UNKNOWN" or local_ip == "UNKNOWN":
        return build(version, None, None)
    if header is not None and header.source is not None and header.dest is not None:
        ports = header.source[1], header.dest[1]
    else:
        try:
            if not isinstance(peer, tuple):
                peer = sock.getpeername()
            ports = peer[1], local_port or sock.getsockname()[1]
        except (OSError, IndexError, TypeError):
            return build(version, None, None)
    return build(version, (client_ip, ports[0]), (local_ip, ports[1]))


def describe(header: ProxyHeader) -> str:
    """For the debug log."""
    if header.source is None:
        return "PROXY v%d header without addresses (the peer's own stand)" % header.version
    return "PROXY v%d header: client %s port %d, connected to %s port %d" % (
        header.version, header.source[0], header.source[1], header.dest[0], header.dest[1])

