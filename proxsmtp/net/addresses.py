"""Socket addresses as written in proxsmtpd.conf, and their resolution.

Forms (as upstream's sock_any): `host:port`, `host` (default port), a bare
`port`, `[v6addr]:port`, `[v6addr]`, a bare IPv6 address, `/path/to/socket`.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

_HOSTNAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?$")
# RFC 5321 4.1.2 sub-domain: Let-dig [Ldh-str]
_SUB_DOMAIN = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")


class AddressError(ValueError):
    """An address that cannot be parsed or resolved."""


@dataclass(frozen=True)
class Address:
    """A parsed address; `host` is None for a bare port (all / loopback)."""

    host: str | None = None
    port: int = 0
    path: str | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    # Asked of OutAddress for every connection: worked out once per address.
    @cached_property
    def is_ip(self) -> bool:
        """The host is an IP literal (no name to resolve)."""
        return self.host is not None and is_ip(self.host)

    @cached_property
    def is_unspecified(self) -> bool:
        """An inet address whose host is left open (OutAddress's loopback feature)."""
        return self.path is None and is_unspecified(self.host)

    def __str__(self) -> str:
        if self.path is not None:
            return self.path
        if self.host is None:
            return str(self.port)
        if ":" in self.host:
            return "[%s]:%d" % (self.host, self.port)
        return "%s:%d" % (self.host, self.port)


def _is_number(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes `²`, which int() refuses."""
    return text.isascii() and text.isdigit()


def _port(text: str, whole: str) -> int:
    if not _is_number(text) or not 0 < int(text) < 65536:
        raise AddressError("invalid port in address: %s" % whole)
    return int(text)


def _host(text: str, whole: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if text == "*":
        return "0.0.0.0"
    if not _HOSTNAME.match(text):
        raise AddressError("invalid host in address: %s" % whole)
    return text


def parse(text: str, default_port: int) -> Address:
    """Parse one address as written in the config file."""
    text = text.strip()
    if not text:
        raise AddressError("empty address")
    if text.startswith("/"):
        return Address(path=text)
    if _is_number(text):
        return Address(port=_port(text, text))
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise AddressError("unbalanced brackets in address: %s" % text)
        try:
            host = str(ipaddress.IPv6Address(text[1:end]))
        except ValueError:
            raise AddressError("invalid IPv6 address: %s" % text) from None
        rest = text[end + 1:]
        if not rest:
            return Address(host, default_port)
        if not rest.startswith(":"):
            raise AddressError("invalid address: %s" % text)
        return Address(host, _port(rest[1:], text))
    if text.count(":") > 1:
        try:
            return Address(str(ipaddress.IPv6Address(text)), default_port)
        except ValueError:
            raise AddressError("invalid IPv6 address: %s" % text) from None
    host, sep, port = text.partition(":")
    return Address(_host(host, text), _port(port, text) if sep else default_port)


class MilterAddress(NamedTuple):
    """One milter of the Milters chain, in Postfix's syntax (MILTER_README)."""

    spec: str           # as written: the milter's name in logs and metrics
    family: str         # "inet" or "unix"
    host: str = ""
    port: int = 0
    path: str = ""


def parse_milter(text: str) -> MilterAddress:
    """`inet:host:port`, `inet:[IPv6]:port` or `unix:/path` (Postfix's
    smtpd_milters; `local:` is Postfix's other name for `unix:`)."""
    spec = text.strip()
    family, colon, rest = spec.partition(":")
    family = family.lower()
    if not colon or family not in ("inet", "unix", "local"):
        raise AddressError("a milter needs inet: or unix: first: %s" % spec)
    if family != "inet":
        if not rest.startswith("/") or any(c.isspace() or c == "," for c in rest):
            raise AddressError("unix: needs an absolute path: %s" % spec)
        return MilterAddress(spec, "unix", path=rest)
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0 or rest[end + 1:end + 2] != ":":
            raise AddressError("inet:[IPv6]:port expected: %s" % spec)
        try:
            host = str(ipaddress.IPv6Address(rest[1:end]))
        except ValueError:
            raise AddressError("invalid IPv6 address: %s" % spec) from None
        return MilterAddress(spec, "inet", host, _port(rest[end + 2:], spec))
    host, sep, port = rest.rpartition(":")
    if not sep or not host or ":" in host:
        raise AddressError("inet:host:port expected (an IPv6 address in brackets): %s" % spec)
    if host == "*" or host.startswith("/"):
        raise AddressError("invalid host in address: %s" % spec)
    return MilterAddress(spec, "inet", _host(host, spec), _port(port, spec))


def parse_milters(text: str) -> tuple[MilterAddress, ...]:
    """The Milters chain: milters separated by commas or white space, in order."""
    return tuple(parse_milter(item) for item in re.split(r"[\s,]+", text.strip()) if item)


def is_ip(host: str) -> bool:
    """An IPv4 or IPv6 literal (inet_pton: this runs for every connection)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except (OSError, ValueError, TypeError):
            pass
    return False


def is_hello_name(text: str) -> bool:
    """A name a client may give itself in EHLO (RFC 5321 4.1.1.1): a Domain
    (4.1.2: labels of letters, digits and inner hyphens, 255 octets at
    most) or an address-literal (4.1.3: `[192.0.2.1]`, `[IPv6:2001:db8::1]`)."""
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1]
        if inner[:5].upper() == "IPV6:":
            inner = inner[5:]
            return ":" in inner and _parses(ipaddress.IPv6Address, inner)
        return _parses(ipaddress.IPv4Address, inner)
    return 0 < len(text) <= 255 and all(_SUB_DOMAIN.match(label) for label in text.split("."))


def _parses(kind: type, text: str) -> bool:
    try:
        kind(text)
        return True
    except ValueError:
        return False


def is_unspecified(host: str | None) -> bool:
    """True for a bare port, 0.0.0.0 and ::: the 'loopback feature' of OutAddress.
    (inet_pton, not ipaddress: this runs for every connection.)"""
    if host is None:
        return True
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return not any(socket.inet_pton(family, host))
        except (OSError, ValueError, TypeError):
            pass
    return False


def plain_ip(ip: str) -> str:
    """An IP as clients and filters should see it: IPv4-mapped IPv6 unwrapped."""
    if ":" not in ip:
        return ip           # IPv4 already, the common case
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        return str(addr.ipv4_mapped)
    return str(addr)


def peer_ip(sockaddr: object) -> str:
    """The IP part of a sockaddr tuple (or 'UNKNOWN' for unix sockets)."""
    if isinstance(sockaddr, tuple) and sockaddr:
        return plain_ip(str(sockaddr[0]))
    return "UNKNOWN"


def family_of(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def resolve(addr: Address, passive: bool = False) -> list[tuple[int, tuple]]:
    """(family, sockaddr) pairs for an inet address; blocking (config time)."""
    flags = socket.AI_PASSIVE if passive else 0
    try:
        infos = socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM, flags=flags)
    except (socket.gaierror, UnicodeError) as exc:
        raise AddressError("couldn't resolve %s: %s" % (addr.host, exc)) from None
    return [(family, sockaddr) for family, _, _, _, sockaddr in infos]
