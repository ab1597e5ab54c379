"""Where a session's server connection goes (proxsmtpd.conf(5) OutAddress), and opening it.

- OutAddress (resolved again for every connection);
- a bare port (or 0.0.0.0 / ::): that port on the client's own address;
- TransparentProxy client: the original destination from netfilter
  (SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST), after an iptables REDIRECT;
- TransparentProxy full: the accepted socket's local address (TPROXY), with
  the outgoing socket bound to the client's address (IP_TRANSPARENT).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import struct
from typing import Protocol

from ..process.config import Config
from ..process.log import log
from . import addresses, proxyproto
from .waits import within

SO_ORIGINAL_DST = 80            # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80       # linux/netfilter_ipv6/ip6_tables.h
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = 75
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)


class ClientFacts(Protocol):
    """What a server connection needs to know of the session's client (the
    session's message.envelope.Envelope is passed): whom it is for, and the
    session id for the log."""

    client_ip: str      # the client's IP, or UNKNOWN
    local_ip: str       # the IP the client connected to, or UNKNOWN
    tag: str            # session id, as in every log line


class DestinationError(Exception):
    """No server connection for this session (the client gets 421)."""


class Refused(DestinationError):
    """No server to try: transparent proxying found no original destination,
    or the client would be connected to itself (counted as a refused
    connection, not a server error)."""


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """The address the client meant to reach, before an iptables REDIRECT.

    Asked of the IPv4 or IPv6 conntrack by the connection's own family: an
    IPv4 client on a dual-stack IPv6 socket (`Listen: port`) is IPv4 to it.
    """
    if sock.family == socket.AF_INET6 and not _ipv4_mapped(sock.getpeername()[0]):
        raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        port = struct.unpack_from("!H", raw, 2)[0]
        return str(ipaddress.IPv6Address(raw[8:24])), port
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntoa(raw[4:8]), port


def _ipv4_mapped(ip: str) -> bool:
    return ipaddress.IPv6Address(ip.split("%", 1)[0]).ipv4_mapped is not None


def client_addresses(peer: object, local_end: object, sock: socket.socket,
                     config: Config) -> tuple[str, str]:
    """(client IP, the IP the client connected to) for logs, filters and %l,
    from the connection's peer and local sockaddr."""
    # (peer_ip says UNKNOWN for a unix socket's address, a string)
    client, local = addresses.peer_ip(peer), addresses.peer_ip(local_end)
    if config.TransparentProxy == "client":
        try:
            local = addresses.plain_ip(original_destination(sock)[0])
        except OSError:
            pass
    return client, local


def target(config: Config, client_ip: str, sock: socket.socket) -> tuple[object, tuple | None]:
    """(where to connect, local address to bind or None) for this client."""
    if config.TransparentProxy != "off":
        try:
            if config.TransparentProxy == "client":
                host, port = original_destination(sock)
            else:
                host, port = sock.getsockname()[:2]
        except OSError as exc:
            raise Refused("couldn't get original destination for transparent "
                          "proxying: %s" % exc.strerror) from None
        host = addresses.plain_ip(host)
        if host == client_ip:
            raise Refused("loop detected in transparent proxying")
        source = (client_ip, 0) if config.TransparentProxy == "full" else None
        return addresses.Address(host, port), source
    out = config.OutAddress
    if out.is_unspecified:
        return addresses.Address(client_ip, out.port), None
    return out, None


async def open_channel(config: Config, envelope: ClientFacts, client_sock: socket.socket,
                       proxy_header: proxyproto.ProxyHeader | None,
                       channel: asyncio.Protocol,
                       loop: asyncio.AbstractEventLoop | None = None,
                       peer: object = None) -> str:
    """Connect `channel` (the session's SERVER side) to the server; its IP.

    The common case, an IP literal with no source address to bind and no
    PROXY header to send, is left to the event loop's own connect (with
    uvloop: libuv's, no Python socket and no extra loop iteration); the
    others take a socket from `connect()`.  `peer`: the client's address
    as accept(2) gave it (for the OutProxyProtocol header)."""
    loop = loop or asyncio.get_running_loop()
    dest, source = target(config, envelope.client_ip, client_sock)
    if (source is None and config.OutProxyProtocol == "off" and not dest.is_unix
            and dest.is_ip):
        try:
            await within(config.TimeOut,
                         loop.create_connection(lambda: channel, dest.host, dest.port), loop)
        except OSError as exc:       # TimeoutError included
            raise DestinationError("connect to %s failed: %s"
                                   % (dest, connect_failure(exc))) from None
        return addresses.plain_ip(dest.host)
    sock, server_ip = await connect(config, envelope, client_sock, proxy_header, peer)
    await loop.create_connection(lambda: channel, sock=sock)
    return server_ip


async def connect(config: Config, envelope: ClientFacts, client_sock: socket.socket,
                  proxy_header: proxyproto.ProxyHeader | None = None, peer: object = None,
                  ) -> tuple[socket.socket, str]:
    """A connected, non-blocking socket to the server, and the server's IP.
    `proxy_header`: the one the client's connection began with, if any (its
    ports go into the OutProxyProtocol header)."""
    dest, source = target(config, envelope.client_ip, client_sock)
    sock, sockaddr = await dial(dest, config.TimeOut, source, envelope.tag)
    if config.OutProxyProtocol != "off":
        await send_proxy_header(config, envelope, proxy_header, client_sock, sock, dest, peer)
    if sock.family == socket.AF_UNIX:
        return sock, "127.0.0.1"
    return sock, addresses.peer_ip(sockaddr)


async def connect_channel(dest: addresses.Address, timeout: float, channel: asyncio.Protocol,
                          what: str) -> None:
    """Connect `channel` to `dest` (a host name is resolved): the filter
    node's connection, made as the server's is.  DestinationError, naming
    `what` (\"filter node\"), if it fails."""
    sock, _ = await dial(dest, timeout, None, "", what)
    try:
        await asyncio.get_running_loop().create_connection(lambda: channel, sock=sock)
    except OSError as exc:
        sock.close()
        raise DestinationError("connect to %s %s failed: %s"
                               % (what, dest, connect_failure(exc))) from None


async def dial(dest: addresses.Address, timeout: float, source: tuple | None,
               tag: str, what: str = "") -> tuple[socket.socket, object]:
    """A connected, non-blocking socket to `dest` (bound to `source` with
    IP_TRANSPARENT when given) and the address it reached; DestinationError
    if `dest` does not resolve or does not answer within `timeout`.  `what`
    names the peer in that error (the server's is not named)."""
    name = "%s %s" % (what, dest) if what else str(dest)
    loop = asyncio.get_running_loop()
    try:
        if dest.is_unix:
            family, sockaddr = socket.AF_UNIX, dest.path
        elif addresses.is_ip(dest.host):
            family, sockaddr = addresses.family_of(dest.host), (dest.host, dest.port)
        else:
            infos = await loop.getaddrinfo(dest.host, dest.port, type=socket.SOCK_STREAM)
            family, _, _, _, sockaddr = infos[0]
    except (OSError, UnicodeError) as exc:
        raise DestinationError("couldn't resolve %s: %s" % (name, exc)) from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if source is not None:
            bind_transparent(sock, family, source, tag)
        await sock_connect(sock, sockaddr, timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        sock.close()
        raise DestinationError("connect to %s failed: %s" % (name, connect_failure(exc))) from None
    except BaseException:
        sock.close()
        raise
    return sock, sockaddr


async def sock_connect(sock: socket.socket, sockaddr: object, timeout: float) -> None:
    """Connect the non-blocking `sock` to an address already resolved.

    Not loop.sock_connect: uvloop's asks its thread pool for getaddrinfo
    even for an IP literal, a thread hand-off for every session."""
    try:
        sock.connect(sockaddr)
        return
    except (BlockingIOError, InterruptedError):
        pass
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    fd = sock.fileno()
    loop.add_writer(fd, _connected, waiter)
    try:
        await within(timeout, waiter, loop)
    finally:
        loop.remove_writer(fd)
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, os.strerror(error))


def _connected(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def send_proxy_header(config: Config, envelope: ClientFacts,
                            proxy_header: proxyproto.ProxyHeader | None,
                            client_sock: socket.socket, sock: socket.socket,
                            dest: addresses.Address, peer: object = None) -> None:
    """OutProxyProtocol: the header naming the client goes first on the new
    connection, before the server has said anything."""
    local_port = dest.port if config.TransparentProxy == "client" else None
    header = proxyproto.outbound(1 if config.OutProxyProtocol == "v1" else 2,
                                 envelope.client_ip, envelope.local_ip, proxy_header,
                                 client_sock, local_port, peer)
    try:
        await within(config.TimeOut, asyncio.get_running_loop().sock_sendall(sock, header))
    except (OSError, asyncio.TimeoutError) as exc:
        sock.close()
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "timed out"
        raise DestinationError("SERVER: couldn't send the PROXY header: %s" % reason) from None
    except BaseException:
        sock.close()
        raise
    log.debug("%s: SERVER: sent PROXY %s header", envelope.tag, config.OutProxyProtocol)


def connect_failure(exc: BaseException) -> str:
    """Why a connect failed, as strerror says it: asyncio's own text for a
    refused connection is `Connect call failed ('127.0.0.1', 2799)`."""
    if isinstance(exc, OSError) and isinstance(exc.errno, int) and exc.errno > 0:
        return os.strerror(exc.errno)       # (a resolver error's errno is negative)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return "timed out" if isinstance(exc, (asyncio.TimeoutError, TimeoutError)) else str(exc)


def bind_transparent(sock: socket.socket, family: int, source: tuple, tag: str) -> None:
    """Make the server see the client's address: IP_TRANSPARENT and bind to it."""
    source_ip = source[0]
    if family == socket.AF_INET6 and ":" not in source_ip:
        source_ip = "::ffff:" + source_ip
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    sock.bind((source_ip, 0))
    log.debug("%s: SERVER: setup source of transparent connection: %s", tag, source[0])
