"""The PROXY protocol parser and builder (proxsmtp/proxyproto.py) as hostile-input
code: hypothesis over random bytes, round trips, every split point, and the
malformed cases one by one; `read()` and `left_at_once()` over a real socket
pair; the settings."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from harness import run_proxsmtpd, write_config
from proxsmtp.net import addresses, proxyproto
from proxsmtp.process import config
from proxsmtp.net.proxyproto import V2_SIGNATURE, ProxyHeader, ProxyHeaderError, build, outbound, parse

ipv4 = st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2**32 - 1))
ipv6 = st.builds(lambda n: str(ipaddress.IPv6Address(n)), st.integers(0, 2**128 - 1))
port = st.integers(0, 65535)


def outcome(data: bytes) -> ProxyHeader | None | str:
    """parse()'s answer; its own error as 'error'; anything else fails the test."""
    try:
        return parse(data)
    except ProxyHeaderError:
        return "error"


def v2(command: int, family: int, body: bytes, version: int = 2) -> bytes:
    return V2_SIGNATURE + struct.pack("!BBH", version << 4 | command, family, len(body)) + body


# --- hypothesis -------------------------------------------------------------------------

@settings(max_examples=3000, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=300),
                 st.builds(lambda b: b"PROXY " + b, st.binary(max_size=150)),
                 st.builds(lambda b: V2_SIGNATURE + b, st.binary(max_size=300))))
@example(b"PROXY TCP4 \xff 1 2 3\r\n")
@example(b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n")
@example(V2_SIGNATURE + b"\x21\x11\x00\x04abcd")
@example(V2_SIGNATURE + b"\x21\x31\x00\x04abcd")
@pytest.mark.unit
@pytest.mark.slow
def test_random_bytes_only_ever_give_a_header_more_or_our_error(data):
    result = outcome(data)
    if isinstance(result, ProxyHeader):
        assert 0 < result.length <= len(data)
        for endpoint in (result.source, result.dest):
            if endpoint is not None:
                assert addresses.is_ip(endpoint[0]) and 0 <= endpoint[1] <= 65535


@settings(max_examples=500)
@given(st.sampled_from([0x00, 0x10, 0x11, 0x12, 0x20, 0x21, 0x22, 0x30, 0x31]),
       st.integers(0, 15), st.binary(max_size=250))
@pytest.mark.unit
def test_random_v2_bodies_with_known_families(family, command, body):
    result = outcome(v2(command, family, body))
    if command not in (0, 1):
        assert result == "error"
    elif command == 0:
        assert result == ProxyHeader(2, 16 + len(body), local=True)


@settings(max_examples=500)
@given(st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6), st.tuples(ipv4, ipv6)),
       port, port, st.sampled_from([1, 2]), st.binary(max_size=40))
@pytest.mark.unit
def test_round_trip_build_parse_with_smtp_bytes_after(ips, sport, dport, version, after):
    header = build(version, (ips[0], sport), (ips[1], dport))
    parsed = parse(header + after)
    assert parsed == ProxyHeader(version, len(header), (addresses.plain_ip(ips[0]), sport),
                                 (addresses.plain_ip(ips[1]), dport))


@settings(max_examples=200)
@given(st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)), port, port,
       st.sampled_from([1, 2]))
@pytest.mark.unit
def test_every_split_point_needs_more_then_parses(ips, sport, dport, version):
    header = build(version, (ips[0], sport), (ips[1], dport))
    for cut in range(len(header)):
        assert parse(header[:cut]) is None, cut
    assert parse(header).length == len(header)


# --- malformed and edge-case headers, one by one --------------------------------------

V4 = build(2, ("203.0.113.7", 40000), ("192.0.2.1", 25))


@pytest.mark.parametrize("data", [
    b"EHLO client.example\r\n",                             # no header at all
    b"PROXX TCP4 1.2.3.4 5.6.7.8 1 25\r\n",                 # wrong v1 signature
    b"\r\n\r\n\x00\r\nQUIX\n" + V4[12:],                    # wrong v2 signature
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 25\n",                   # bare LF
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",                    # a word short
    b"PROXY TCP4  1.2.3.4 5.6.7.8 1 25\r\n",                # double space
    b"PROXY TCP5 1.2.3.4 5.6.7.8 1 25\r\n",                 # unknown v1 family
    b"PROXY TCP4 ::1 ::1 1 25\r\n",                         # family mismatch
    b"PROXY TCP4 1.2.3.256 5.6.7.8 1 25\r\n",
    b"PROXY TCP4 01.2.3.4 5.6.7.8 1 25\r\n",
    b"PROXY TCP6 fe80::1%eth0 ::1 1 25\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 25\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 25\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 025 25\r\n",
    b"PROXY " + b"A" * 101,                                 # 107 bytes, no end of line
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 25" + b" " * 80 + b"\r\n",   # over 107 with CRLF
    V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12),          # version 1 in a v2 header
    V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),          # command 2
    V2_SIGNATURE + b"\x21\x41\x00\x0c" + bytes(12),          # family 4
    V2_SIGNATURE + b"\x21\x13\x00\x0c" + bytes(12),          # protocol 3
    V2_SIGNATURE + b"\x21\x11\x00\x04abcd",                  # IPv4 with 4 address bytes
    V2_SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12),          # IPv6 with 12 address bytes
    V2_SIGNATURE + b"\x21\x31\x00\x04abcd",                  # unix with 4 address bytes
])
@pytest.mark.unit
def test_malformed_headers_are_our_error(data):
    with pytest.raises(ProxyHeaderError):
        parse(data)


@pytest.mark.unit
def test_v2_length_beyond_what_arrived_needs_more():
    assert parse(V2_SIGNATURE + b"\x21\x11\xff\xff" + bytes(1000)) is None
    assert parse(V2_SIGNATURE + b"\x21\x11\xff\xff" + bytes(0xFFFF)).length == 16 + 0xFFFF


@pytest.mark.unit
def test_longest_valid_v1_line_parses():
    longest = b"PROXY TCP6 ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n".replace(
        b"ffff:f...f:ffff", b"ffff:" * 7 + b"ffff")
    assert len(longest) == 104
    assert parse(longest).source == ("ffff:" * 7 + "ffff", 65535)
    unknown = b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n"
    assert len(unknown) == 107 and parse(unknown) == ProxyHeader(1, 107)


@pytest.mark.unit
def test_tlvs_after_the_addresses_are_part_of_the_header():
    body = V4[16:] + b"\x04\x00\x02ab"                       # PP2_TYPE_NOOP TLV
    header = v2(1, 0x11, body)
    assert parse(header + b"EHLO x\r\n") == ProxyHeader(2, len(header), ("203.0.113.7", 40000),
                                                         ("192.0.2.1", 25))


@pytest.mark.parametrize("data, length", [
    (b"PROXY UNKNOWN\r\n", 15),
    (b"PROXY UNKNOWN 1.2.3.4 whatever\r\n", 32),
    (V2_SIGNATURE + b"\x20\x00\x00\x00", 16),                # LOCAL (a health check)
    (V2_SIGNATURE + b"\x20\x11\x00\x0c" + bytes(12), 28),    # LOCAL with addresses
    (V2_SIGNATURE + b"\x21\x00\x00\x00", 16),                # PROXY, family unspecified
    (v2(1, 0x31, bytes(216)), 232),                          # unix socket endpoints
    (v2(1, 0x12, bytes(12)), 28),                            # datagram
])
@pytest.mark.unit
def test_headers_without_a_usable_address_keep_the_peer(data, length):
    local = data[12:13] == b"\x20"
    assert parse(data + b"EHLO x\r\n") == ProxyHeader(data[:6] == b"PROXY " and 1 or 2, length,
                                                       local=local)


@pytest.mark.unit
def test_build_unknown_endpoints():
    assert build(1, None, ("::1", 25)) == b"PROXY UNKNOWN\r\n"
    assert parse(build(2, ("1.2.3.4", 1), None)) == ProxyHeader(2, 16, local=True)


@pytest.mark.unit
def test_build_mixed_families_maps_ipv4():
    assert build(1, ("1.2.3.4", 1), ("::1", 25)).startswith(b"PROXY TCP6 ::ffff:")
    assert parse(build(2, ("::1", 1), ("1.2.3.4", 25))).dest == ("1.2.3.4", 25)


# --- ProxyProtocolFrom ---------------------------------------------------------------------

@pytest.mark.unit
def test_allowed_networks():
    nets = proxyproto.parse_networks("10.0.0.0/8, 127.0.0.1 [::1] 2001:db8::/32")
    assert proxyproto.allowed("10.1.2.3", nets) and proxyproto.allowed("127.0.0.1", nets)
    assert proxyproto.allowed("::1", nets) and proxyproto.allowed("2001:db8::5", nets)
    assert not proxyproto.allowed("127.0.0.2", nets) and not proxyproto.allowed("11.0.0.1", nets)
    assert proxyproto.allowed("192.0.2.1", None)
    assert proxyproto.allowed(None, nets)                    # unix socket: its permissions decide


@pytest.mark.unit
def test_allowed_fails_closed_for_a_tcp_peer_without_an_address():
    """A TCP peer whose address could not be learnt is no unix socket's peer."""
    nets = proxyproto.parse_networks("127.0.0.1/32")
    assert not proxyproto.allowed("UNKNOWN", nets) and not proxyproto.allowed("", nets)
    assert proxyproto.allowed("UNKNOWN", None)


# --- read() on a real socket ------------------------------------------------------------------

async def _read(chunks: list[bytes | None], peer: str | None = "127.0.0.1", networks=None,
                timeout: float = 5.0) -> tuple[ProxyHeader | str, bytes]:
    """Feed `chunks` (None: close) into a socket pair; what read() made of it
    and what it left unread in the socket."""
    ours, theirs = socket.socketpair()

    async def feed() -> None:
        for chunk in chunks:
            await asyncio.sleep(0.01)
            if chunk is None:
                theirs.shutdown(socket.SHUT_WR)
            else:
                theirs.send(chunk)

    feeder = asyncio.get_running_loop().create_task(feed())
    try:
        result: ProxyHeader | str = await proxyproto.read(ours, peer, networks, timeout)
    except ProxyHeaderError as exc:
        result = str(exc)
    await feeder
    if None not in chunks:
        theirs.shutdown(socket.SHUT_WR)
    ours.setblocking(True)
    rest = b""
    try:
        while chunk := ours.recv(4096):
            rest += chunk
    except ConnectionResetError:
        pass
    ours.close()
    theirs.close()
    return result, rest


def read(*args, **kwargs):
    return asyncio.run(_read(*args, **kwargs))


@pytest.mark.unit
def test_read_header_split_byte_by_byte_leaves_smtp_bytes_unread():
    data = V4 + b"EHLO client.example\r\n"
    header, rest = read([data[i:i + 1] for i in range(len(V4) + 3)] + [data[len(V4) + 3:]])
    assert header.source == ("203.0.113.7", 40000)
    assert rest == b"EHLO client.example\r\n"


@pytest.mark.unit
def test_read_header_and_smtp_in_one_packet():
    header, rest = read([b"PROXY TCP4 198.51.100.2 192.0.2.1 5555 25\r\nEHLO a\r\nMAIL"])
    assert header.source == ("198.51.100.2", 5555) and rest == b"EHLO a\r\nMAIL"


@pytest.mark.unit
def test_read_leaves_a_tls_client_hello_behind_a_v2_header_unread():
    """haproxy's header, then the client's TLS bytes in the same segment: they
    are the TLS layer's, to the byte."""
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(200))
    header, rest = read([build(2, ("2001:db8::7", 1), ("2001:db8::25", 465)) + hello])
    assert header.source == ("2001:db8::7", 1) and rest == hello


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=40), st.integers(1, 200))
@pytest.mark.unit
def test_read_takes_exactly_the_header_wherever_the_bytes_split(after, split):
    data = V4 + after
    header, rest = read([data[:split], data[split:]] if split < len(data) else [data])
    assert header.length == len(V4) and rest == after


@pytest.mark.unit
def test_read_times_out_on_a_partial_header():
    result, _ = read([b"PROXY TCP4 1.2."], timeout=0.5)
    assert result == "no complete PROXY header within 0.5 seconds"


@pytest.mark.unit
def test_read_eof():
    assert "closed without a PROXY header" in read([None])[0]
    assert "before a complete PROXY header" in read([b"PROXY TCP4", None])[0]


@pytest.mark.unit
def test_read_refuses_peers_outside_proxy_protocol_from():
    result, rest = read([V4 + b"EHLO x\r\n"], peer="127.0.0.1",
                        networks=proxyproto.parse_networks("10.0.0.0/8"))
    assert "not in ProxyProtocolFrom" in result
    assert rest == V4 + b"EHLO x\r\n"          # refused before a byte was read


@pytest.mark.unit
def test_read_refuses_a_tcp_peer_without_an_address_when_a_list_is_set():
    result, _ = read([V4], peer="UNKNOWN", networks=proxyproto.parse_networks("127.0.0.1"))
    assert "not in ProxyProtocolFrom" in result
    header, _ = read([V4], peer=None, networks=proxyproto.parse_networks("127.0.0.1"))
    assert header.source == ("203.0.113.7", 40000)


LOCAL = V2_SIGNATURE + b"\x20\x00\x00\x00"


async def _left_at_once(after: list[bytes | None], wait: float = 1.0) -> bool:
    ours, theirs = socket.socketpair()
    theirs.send(LOCAL)
    header = await proxyproto.read(ours, None, None, 5)
    assert header.local and header.source is None
    for chunk in after:
        if chunk is None:
            theirs.close()
        else:
            theirs.send(chunk)
    try:
        return await proxyproto.left_at_once(ours, wait)
    finally:
        ours.close()
        theirs.close()


@pytest.mark.unit
def test_left_at_once_after_a_local_header():
    assert asyncio.run(_left_at_once([None]))                     # a TCP check: close
    assert not asyncio.run(_left_at_once([b"EHLO x\r\n", None]))  # a client's bytes
    assert not asyncio.run(_left_at_once([], wait=0.2))           # silence: waits for a greeting


@pytest.mark.unit
def test_only_v2_local_is_local():
    assert parse(LOCAL).local
    assert not parse(b"PROXY UNKNOWN\r\n").local
    assert not parse(v2(1, 0x00, b"")).local and not parse(V4).local


# --- settings -----------------------------------------------------------------------------------

@pytest.mark.unit
def test_settings_parse():
    conf = config.parse("OutAddress: 25\nProxyProtocol: on\n"
                        "ProxyProtocolFrom: 10.0.0.0/8, 127.0.0.1\nOutProxyProtocol: V2\n")
    assert conf.ProxyProtocol and conf.OutProxyProtocol == "v2"
    assert conf.ProxyProtocolFrom == (ipaddress.ip_network("10.0.0.0/8"),
                                      ipaddress.ip_network("127.0.0.1/32"))
    alone = config.parse("OutAddress: 25\nProxyProtocolFrom: 10.0.0.1\nListen: 127.0.0.1:25\n",
                         "test.conf")
    assert alone.warnings == ["test.conf, line 2: ProxyProtocolFrom: ignored unless ProxyProtocol is on"]
    default = config.parse("OutAddress: 25\n")
    assert (default.ProxyProtocol, default.ProxyProtocolFrom, default.OutProxyProtocol) == \
        (False, None, "off")


@pytest.mark.parametrize("line, words", [
    ("ProxyProtocol: maybe", ["ProxyProtocol", "line 2"]),
    ("ProxyProtocolFrom: 10.0.0.1/8", ["ProxyProtocolFrom", "host bits", "line 2"]),
    ("ProxyProtocolFrom: balancer.example", ["ProxyProtocolFrom", "networks (10.0.0.0/8)"]),
    ("OutProxyProtocol: v3", ["OutProxyProtocol", "off, v1 or v2"]),
    ("OutProxyProtocol: on", ["OutProxyProtocol", "off, v1 or v2"]),
    ("TransparentProxy: full\nProxyProtocol: on", ["ProxyProtocol", "TransparentProxy"]),
    ("TransparentProxy: client\nProxyProtocol: yes", ["ProxyProtocol", "TransparentProxy"]),
])
@pytest.mark.e2e
@pytest.mark.slow
def test_invalid_settings_exit_2(tmp_path, line, words):
    conf = write_config(tmp_path / "bad.conf", "OutAddress: 127.0.0.1:10026\n%s\n" % line)
    result = run_proxsmtpd("-d", "2", "-f", str(conf))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


@pytest.mark.unit
def test_outbound_takes_the_client_port_from_accept_not_from_the_socket():
    """The client's port in an OutProxyProtocol header is the one accept(2)
    gave: a client that has reset its connection has no getpeername(2) any
    more, and its header must still name it, not fall back to LOCAL."""
    with socket.socket() as sock:           # bound, never connected: getpeername fails
        sock.bind(("127.0.0.1", 0))
        local_port = sock.getsockname()[1]
        with pytest.raises(OSError):
            sock.getpeername()
        header = parse(outbound(2, "192.0.2.7", "127.0.0.1", None, sock, peer=("192.0.2.7", 40123)))
        assert (header.source, header.dest) == (("192.0.2.7", 40123), ("127.0.0.1", local_port))
        assert parse(outbound(2, "192.0.2.7", "127.0.0.1", None, sock)).source is None
