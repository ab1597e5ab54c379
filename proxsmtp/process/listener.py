"""The listening socket, created once by the master and shared by every worker."""

from __future__ import annotations

import os
import socket

from ..net import addresses
from ..net.addresses import Address, AddressError
from ..net.destination import IP_TRANSPARENT, IPV6_TRANSPARENT, SOL_IPV6
from .config import Config
from .log import log


class ListenError(Exception):
    """The socket could not be created or bound (the daemon can't start)."""


def backlog(config: Config) -> int:
    """Queue room for a burst of MaxConnections, within the kernel's somaxconn."""
    try:
        with open("/proc/sys/net/core/somaxconn") as handle:
            ceiling = int(handle.read())
    except (OSError, ValueError):
        ceiling = socket.SOMAXCONN
    return max(128, min(config.MaxConnections, ceiling))


def create(config: Config) -> socket.socket:
    """Bind Listen (SO_REUSEADDR; IP_TRANSPARENT when TransparentProxy is full)."""
    return bind(config.Listen, backlog(config), config.TransparentProxy == "full")


def create_stats(config: Config) -> socket.socket | None:
    """Bind StatsListen, if set (the /metrics endpoint, exporter.py)."""
    if config.StatsListen is None:
        return None
    try:
        return bind(config.StatsListen, 16, False)
    except ListenError as exc:
        raise ListenError("StatsListen: %s" % exc) from None


def bind(addr: Address, queue: int, transparent: bool) -> socket.socket:
    """A non-blocking listening socket on `addr` (a bare port: all addresses)."""
    try:
        if addr.is_unix:
            family, sockaddr = socket.AF_UNIX, addr.path
            try:
                os.unlink(addr.path)
            except FileNotFoundError:
                pass
        elif addr.host is None:
            family, sockaddr = (socket.AF_INET6, ("::", addr.port)) if socket.has_ipv6 \
                else (socket.AF_INET, ("0.0.0.0", addr.port))
        else:
            family, sockaddr = addresses.resolve(addr, passive=True)[0]
    except (AddressError, OSError) as exc:
        raise ListenError("couldn't bind to address: %s: %s" % (addr, exc)) from None
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        if family != socket.AF_INET6 or addr.host is not None:
            raise ListenError("couldn't open socket: %s" % exc.strerror) from None
        family, sockaddr = socket.AF_INET, ("0.0.0.0", addr.port)
        sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and addr.host is None:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if transparent and family != socket.AF_UNIX:
            try:
                if family == socket.AF_INET6:
                    sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
                else:
                    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            except OSError as exc:
                log.warning("couldn't set transparent mode on socket: %s", exc.strerror)
        sock.bind(sockaddr)
        sock.listen(queue)
    except OSError as exc:
        sock.close()
        raise ListenError("couldn't bind to address: %s: %s" % (addr, exc.strerror)) from None
    sock.setblocking(False)
    log.debug("created socket: %s", addr)
    return sock
