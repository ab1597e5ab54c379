"""PROXY protocol end to end: ProxyProtocol / ProxyProtocolFrom on Listen,
OutProxyProtocol towards aiosmtpd and a real Postfix smtpd, and SIGHUP.

Clients send the header themselves (as a balancer would) with raw sockets;
the filter's environment, XCLIENT, the Header and the log must all name the
client the header names.  Malformed headers must each cost one connection,
never a server connection, never the worker.
"""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from harness import (Client, children, closed_silently, free_port, pid_alive, send_mail,
                     wait_until, write_config)
from proxsmtp.net.proxyproto import V2_SIGNATURE, build

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BODY = b"Subject: proxied\r\n\r\nbody\r\n"


def header(version: int, client: str, dest: str, sport: int = 40000, dport: int = 25) -> bytes:
    return build(version, (client, sport), (dest, dport))


def proxied(px, hello: bytes, source: str | None = None) -> Client:
    return px.connect(hello=hello, source=source)


# --- inbound ----------------------------------------------------------------------------

@pytest.mark.parametrize("version, client, dest, xclient", [
    (1, "203.0.113.7", "192.0.2.25", "XCLIENT ADDR=203.0.113.7"),
    (2, "203.0.113.7", "192.0.2.25", "XCLIENT ADDR=203.0.113.7"),
    (2, "2001:db8::7", "2001:db8::25", "XCLIENT ADDR=IPv6:2001:db8::7"),
    (1, "2001:db8::7", "2001:db8::25", "XCLIENT ADDR=IPv6:2001:db8::7"),
])
def test_header_names_the_client_everywhere(proxy, make_upstream, tmp_path, version, client,
                                            dest, xclient):
    upstream = make_upstream(extensions=("XCLIENT ADDR NAME HELO", "8BITMIME"))
    seen = tmp_path / "filter-client"
    px = proxy({"OutAddress": upstream.address, "ProxyProtocol": "on", "XClient": "on",
                "Header": "X-Client: %i to %l",
                "FilterCommand": 'printf %%s "$CLIENT" > %s; cat' % seen}, debug=4)
    with proxied(px, header(version, client, dest)) as smtp:
        assert smtp.greeting[-1].startswith("220"), smtp.greeting
        assert send_mail(smtp, "a@x.test", ["b@y.test"], BODY)[-1].startswith("250")
    [message] = upstream.wait_messages(1)
    assert message.xclient == [xclient]
    assert b"X-Client: %s to %s" % (client.encode(), dest.encode()) in message.raw
    assert seen.read_text() == client
    px.wait_log(r"accepted connection from: %s$" % client)
    px.wait_log(r"client=%s, from=a@x\.test, to=b@y\.test, .*status=FILTERED" % client)


def test_header_and_first_smtp_bytes_in_one_packet(proxy, upstream):
    """A client that speaks before the greeting, in the header's packet: its bytes
    are the session's, relayed after the greeting."""
    px = proxy({"OutAddress": upstream.address, "ProxyProtocol": "on"})
    with socket.create_connection(px.address, timeout=20) as sock:
        sock.sendall(header(2, "198.51.100.9", "192.0.2.1") + b"EHLO early.example\r\n")
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220 ")
        line = reader.readline()
        while line[3:4] == b"-":
            line = reader.readline()
        assert line.startswith(b"250 ")
    upstream.wait_command("EHLO early.example")


def test_header_split_across_packets(proxy, upstream):
    px = proxy({"OutAddress": upstream.address, "ProxyProtocol": "on", "XClient": "off"})
    data = header(1, "198.51.100.10", "192.0.2.1")
    with socket.create_connection(px.address, timeout=20) as sock:
        for byte in data:
            sock.sendall(bytes([byte]))
            time.sleep(0.005)
        assert sock.makefile("rb").readline().startswith(b"220 ")
    px.wait_log(r"accepted connection from: 198\.51\.100\.10$")


@pytest.mark.parametrize("hello", [b"PROXY UNKNOWN\r\n", V2_SIGNATURE + b"\x20\x00\x00\x00"])
def test_unknown_and_local_headers_keep_the_peer(proxy, upstream, tmp_path, hello):
    seen = tmp_path / "filter-client"
    px = proxy({"OutAddress": upstream.address, "ProxyProtocol": "on",
                "FilterCommand": 'printf %%s "$CLIENT" > %s; cat' % seen})
    with proxied(px, hello, source="127.0.0.7") as smtp:
        assert send_mail(smtp, "a@x.test", ["b@y.test"], BODY)[-1].startswith("250")
    upstream.wait_messages(1)
    assert seen.read_text() == "127.0.0.7"


def test_loopback_feature_uses_the_headers_client(proxy, make_upstream):
    """OutAddress a bare port: the server is that port on the client's address,
    the one the header names (127.0.0.9 here, not the connecting 127.0.0.1)."""
    port = free_port("127.0.0.9")
    there = make_upstream(host="127.0.0.9", port=port)
    px = proxy({"OutAddress": port, "ProxyProtocol": "on"})
    with proxied(px, header(2, "127.0.0.9", "127.0.0.1")) as smtp:
        assert send_mail(smtp, "a@x.test", ["b@y.test"], BODY)[-1].startswith("250")
    assert there.wait_messages(1)[0].recipients == ["b@y.test"]


BAD_HEADERS = [
    b"EHLO no-header.example\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
    b"PROXY TCP4 1.2.3.4 ::1 1 25\r\n",
    b"PROXY " + b"9" * 120 + b"\r\n",
    b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c" + bytes(12),
    V2_SIGNATURE + b"\x21\x51\x00\x0c" + bytes(12),
    V2_SIGNATURE + b"\x21\x11\x00\x04abcd",
    V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12),
    bytes(range(256)),
]


def test_malformed_headers_cost_one_connection_each(proxy, upstream):
    px = proxy({"OutAddress": upstream.address, "ProxyProtocol": "on", "Workers": 1})
    [worker] = children(px.proc.pid)
    before = len(upstream.connections)
    for bad in BAD_HEADERS:
        assert closed_silently(px.address, bad), bad
    assert len(upstream.connections) == before, "a server connection was opened"
    assert px.log().count("PROXY") >= len(BAD_HEADERS)
    with proxied(px, header(1, "198.51.100.11", "192.0.2.1")) as smtp:
        assert send_mail(smtp, "a@x.test", ["b@y.test"], BODY)[-1].startswith("250")
    assert list(children(px.proc.pid)) == [worker] and pid_alive(worker)
    assert "Traceback" not in px.log()


def test_no_header_within_timeout_closes_without_a_server_connection(proxy, upstream):
    px = proxy({"OutAddress": upstream.address, "ProxyProtocol": "on", "TimeOut": 2})
    before = len(upstream.connections)
    started = time.monotonic()
    assert closed_silently(px.address, b"")                    # silence
    assert closed_silently(px.address, b"PROXY TCP4 1.2.")     # a header begun, never ended
    assert time.monotonic() - started >= 2
    px.wait_log(r"no complete PROXY header within 2 seconds")
    assert len(upstream.connections) == before


def test_proxy_protocol_from_refuses_other_peers(proxy, upstream):
    px = proxy({"OutAddress": upstream.address, "ProxyProtocol": "on",
                "ProxyProtocolFrom": "10.0.0.0/8, 127.0.0.5"})
    before = len(upstream.connections)
    assert closed_silently(px.address, header(2, "203.0.113.1", "192.0.2.1"))
    px.wait_log(r"127\.0\.0\.1: PROXY header refused: the peer is not in ProxyProtocolFrom")
    assert len(upstream.connections) == before
    with proxied(px, header(2, "203.0.113.2", "192.0.2.1"), source="127.0.0.5") as smtp:
        assert send_mail(smtp, "a@x.test", ["b@y.test"], BODY)[-1].startswith("250")
    px.wait_log(r"client=203\.0\.113\.2, ")


def test_without_proxy_protocol_a_header_is_just_a_bad_command(proxy, upstream):
    """Off (the default): a header is not trusted; it goes to the server as a
    line like any other and the session's client stays the peer."""
    px = proxy({"OutAddress": upstream.address})
    with px.connect() as smtp:
        smtp.send(b"PROXY TCP4 203.0.113.1 192.0.2.1 1 25\r\n")
        smtp.reply()
        assert send_mail(smtp, "a@x.test", ["b@y.test"], BODY)[-1].startswith("250")
    px.wait_log(r"client=127\.0\.0\.1, ")
    upstream.wait_command("PROXY TCP4")


# --- SIGHUP --------------------------------------------------------------------------------

def listener_inode(port: int) -> str:
    """The socket inode of the TCP socket listening on `port` (/proc/net/tcp)."""
    with open("/proc/net/tcp") as table:
        for row in table.readlines()[1:]:
            fields = row.split()
            if fields[1].endswith(":%04X" % port) and fields[3] == "0A":
                return fields[9]
    raise AssertionError("nothing listens on port %d" % port)


def accepting(pid: int, inode: str) -> bool:
    """Does process `pid` still hold the listening socket (a retired worker closes it)?"""
    try:
        return any(os.readlink("/proc/%d/fd/%s" % (pid, fd)) == "socket:[%s]" % inode
                   for fd in os.listdir("/proc/%d/fd" % pid))
    except OSError:
        return False


def test_sighup_turning_proxy_protocol_on_and_off_applies_to_new_connections(proxy, upstream):
    px = proxy({"OutAddress": upstream.address, "Workers": 1})
    old = list(children(px.proc.pid))
    plain = px.connect()                                 # opened while off
    assert plain.cmd("EHLO plain.example")[-1].startswith("250")

    def reload(on: bool, previous: list[int]) -> list[int]:
        write_config(px.conf, dict(px.settings, ProxyProtocol="on" if on else "off"))
        mark = px.log().count("reloaded configuration")
        px.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: px.log().count("reloaded configuration") > mark, 15, what="reload")
        inode = listener_inode(px.port)
        wait_until(lambda: not any(accepting(pid, inode) for pid in previous), 15,
                   what="the old workers to stop accepting")
        return wait_until(lambda: [pid for pid in children(px.proc.pid) if pid not in previous
                                   and accepting(pid, inode)], 15, what="a new worker")

    new = reload(True, old)
    assert closed_silently(px.address, b"EHLO no-header.example\r\n")
    with_header = proxied(px, header(2, "203.0.113.20", "192.0.2.1"))
    assert with_header.cmd("EHLO proxied.example")[-1].startswith("250")
    # the session from before the reload needs no header and keeps its address
    assert send_mail(plain, "a@x.test", ["b@y.test"], BODY, helo="EHLO plain.example")[-1] \
        .startswith("250")
    plain.close()
    px.wait_log(r"client=127\.0\.0\.1, from=a@x\.test")

    reload(False, old + new)
    with px.connect() as after:
        assert send_mail(after, "c@x.test", ["d@y.test"], BODY)[-1].startswith("250")
    # the session from while it was on goes on with the header's address
    assert send_mail(with_header, "e@x.test", ["f@y.test"], BODY,
                     helo="EHLO proxied.example")[-1].startswith("250")
    with_header.close()
    px.wait_log(r"client=203\.0\.113\.20, from=e@x\.test")
    px.wait_log(r"client=127\.0\.0\.1, from=c@x\.test")
    assert len(upstream.wait_messages(3)) == 3


# --- outbound: aiosmtpd ----------------------------------------------------------------------

@pytest.fixture
def aiosmtpd_proxied():
    """aiosmtpd with proxy_protocol_timeout: every connection must start with a
    header; records (proxy data, envelope) per message."""
    controller_mod = pytest.importorskip("aiosmtpd.controller")
    received = []

    class Handler:
        async def handle_PROXY(self, server, session, envelope, proxy_data):
            return True

        async def handle_DATA(self, server, session, envelope):
            received.append((session.proxy_data, envelope))
            return "250 OK stored"

    port = free_port()
    controller = controller_mod.Controller(Handler(), hostname="127.0.0.1", port=port,
                                           proxy_protocol_timeout=10)
    controller.received = received
    controller.address = "127.0.0.1:%d" % port
    controller.start()
    yield controller
    controller.stop()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_out_proxy_protocol_to_aiosmtpd(proxy, aiosmtpd_proxied, version):
    px = proxy({"OutAddress": aiosmtpd_proxied.address, "OutProxyProtocol": version})
    with px.connect(source="127.0.0.23") as smtp:
        sport = smtp.sock.getsockname()[1]
        assert send_mail(smtp, "a@x.test", ["b@y.test"], BODY)[-1].startswith("250")
    wait_until(lambda: aiosmtpd_proxied.received, what="aiosmtpd to receive the message")
    data, envelope = aiosmtpd_proxied.received[-1]
    assert data.valid and data.version == int(version[1])
    assert (str(data.src_addr), data.src_port) == ("127.0.0.23", sport)
    assert (str(data.dst_addr), data.dst_port) == (px.host, px.port)
    assert envelope.rcpt_tos == ["b@y.test"]


@pytest.mark.parametrize("inbound, outbound", [(1, "v2"), (2, "v1")])
def test_header_in_header_out(proxy, aiosmtpd_proxied, inbound, outbound):
    """Behind a balancer and in front of a PROXY-aware server: the server gets
    the client (and its port) the balancer named."""
    px = proxy({"OutAddress": aiosmtpd_proxied.address, "ProxyProtocol": "on",
                "OutProxyProtocol": outbound})
    with proxied(px, header(inbound, "2001:db8::99", "2001:db8::25", 51515, 2525)) as smtp:
        assert send_mail(smtp, "a@x.test", ["b@y.test"], BODY)[-1].startswith("250")
    wait_until(lambda: aiosmtpd_proxied.received, what="aiosmtpd to receive the message")
    data, _ = aiosmtpd_proxied.received[-1]
    assert (str(data.src_addr), data.src_port) == ("2001:db8::99", 51515)
    assert (str(data.dst_addr), data.dst_port) == ("2001:db8::25", 2525)


def test_out_proxy_protocol_connection_refused_is_421(proxy):
    px = proxy({"OutAddress": "127.0.0.1:%d" % free_port(), "OutProxyProtocol": "v2"})
    with px.connect() as smtp:
        assert smtp.greeting[0].startswith("421")


# --- outbound: a real Postfix smtpd ---------------------------------------------------------------

@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.root
def test_out_proxy_protocol_to_postfix(proxy, postfix, version):
    server = postfix(smtpd_upstream_proxy_protocol="haproxy")
    px = proxy({"OutAddress": server.address, "OutProxyProtocol": version})
    with px.connect(source="127.0.0.42") as smtp:
        assert send_mail(smtp, "a@x.test", ["b@remote.test"], BODY)[-1].startswith("250")
        smtp.cmd("QUIT")
    wait_until(lambda: "client=unknown[127.0.0.42]" in server.log(), 20,
               what="postfix to log the message from 127.0.0.42:\n" + server.log())
    assert "connect from unknown[127.0.0.42]" in server.log()


@pytest.mark.root
def test_balancer_header_through_to_postfix(proxy, postfix):
    """haproxy's header in, proxsmtpd's header out: Postfix logs the address the
    balancer named, not proxsmtpd's nor the balancer's."""
    server = postfix(smtpd_upstream_proxy_protocol="haproxy")
    px = proxy({"OutAddress": server.address, "ProxyProtocol": "on",
                "OutProxyProtocol": "v2"})
    with proxied(px, header(2, "127.0.0.77", "127.0.0.1")) as smtp:
        assert send_mail(smtp, "a@x.test", ["b@remote.test"], BODY)[-1].startswith("250")
        smtp.cmd("QUIT")
    wait_until(lambda: "client=unknown[127.0.0.77]" in server.log(), 20,
               what="postfix to log the message from 127.0.0.77:\n" + server.log())


def test_sighup_cannot_combine_proxy_protocol_with_a_running_transparent_proxy(proxy, upstream):
    """TransparentProxy needs a restart to change, so a reload that turns it off
    and ProxyProtocol on would run both: it is refused, the old config kept."""
    px = proxy({"TransparentProxy": "client", "OutAddress": None, "Workers": 1})
    before = list(children(px.proc.pid))
    write_config(px.conf, dict(px.settings, TransparentProxy="off", ProxyProtocol="on",
                               OutAddress=upstream.address))
    px.proc.send_signal(signal.SIGHUP)
    px.wait_log(r"reload failed, keeping the running configuration: ProxyProtocol can't be on "
                r"with TransparentProxy, which stays client until a restart")
    assert list(children(px.proc.pid)) == before


def test_header_on_a_unix_socket_listen(proxy, upstream, tmp_path):
    """haproxy `server gw unix@/path send-proxy-v2`: the peer has no address; the
    header's is used (and ProxyProtocolFrom doesn't apply to socket-file peers)."""
    px = proxy({"OutAddress": upstream.address, "Listen": str(tmp_path / "smtp.sock"),
                "ProxyProtocol": "on", "ProxyProtocolFrom": "10.0.0.0/8"})
    with proxied(px, header(2, "203.0.113.30", "192.0.2.1")) as smtp:
        assert send_mail(smtp, "a@x.test", ["b@y.test"], BODY)[-1].startswith("250")
    px.wait_log(r"client=203\.0\.113\.30, from=a@x\.test")
