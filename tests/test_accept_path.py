"""What happens between accept(2) and the server connection, end to end:
ProxyProtocolFrom against the address accept gave (a peer that resets at
once), the PROXY header read before TLSWrapper's handshake (a raw client and
haproxy `send-proxy-v2` in front), the short deadline of handshakes and
headers (HandshakeTimeOut), health checks that send a LOCAL header and
leave, MaxConnections on a TLSWrapper port, and the start-up warning for a
PROXY header anyone may send.
"""

from __future__ import annotations

import shutil
import smtplib
import socket
import ssl
import struct
import subprocess
import time

import pytest
import trustme

from harness import (Client, closed_silently, free_port, run_proxsmtpd,
                     send_mail, stop_process, wait_until, write_config)
from proxsmtp.net.proxyproto import V2_SIGNATURE, build

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BODY = b"From: a@x.test\r\nTo: b@y.test\r\nSubject: accept\r\n\r\nbody\r\n"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
LOCAL_V2 = V2_SIGNATURE + b"\x20\x00\x00\x00"


def header(version: int, client: str, dest: str = "192.0.2.25", sport: int = 40000,
           dport: int = 25) -> bytes:
    return build(version, (client, sport), (dest, dport))


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends RST, not FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# --- certificates -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    cert = ca.issue_cert("proxy.test", "127.0.0.1")

    class PKI:
        pass
    pki = PKI()
    pki.ca = ca
    pki.chain, pki.key = directory / "proxy.pem", directory / "proxy.key"
    pki.chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(pki.key))
    return pki


def client_context(pki) -> ssl.SSLContext:
    context = ssl.create_default_context()
    pki.ca.configure_trust(context)
    return context


def tls_settings(pki) -> dict:
    return {"TLSCertificate": pki.chain, "TLSKey": pki.key}


# --- ProxyProtocolFrom: the address accept(2) gave ------------------------------------------

def test_proxy_protocol_from_holds_for_a_peer_that_resets_at_once(proxy, make_upstream):
    """A peer outside ProxyProtocolFrom sends a header naming 6.6.6.6, a whole
    transaction, and an RST before the worker has accepted: getpeername()
    fails by then, but the address accept(2) gave is the peer's.  It never
    becomes the session's client, nor reaches the server."""
    upstream = make_upstream(extensions=("XCLIENT ADDR NAME HELO", "PIPELINING"))
    px = proxy({"OutAddress": upstream.address, "ProxyProtocol": "on", "XClient": "on",
                "ProxyProtocolFrom": "127.0.0.1/32", "Workers": 1}, debug=4)
    before = len(upstream.connections)
    attempts = 20
    for _ in range(attempts):
        sock = socket.socket()
        sock.bind(("127.0.0.2", 0))
        sock.connect(px.address)
        sock.sendall(header(1, "6.6.6.6") + b"EHLO forged.example\r\nMAIL FROM:<a@x.test>\r\n"
                     b"RCPT TO:<b@y.test>\r\n")
        reset(sock)
    wait_until(lambda: px.log().count("PROXY header refused") + px.log().count("6.6.6.6")
               >= attempts, 30, what="every forged connection handled:\n" + px.log())
    time.sleep(0.5)         # a server connection still on its way would show now
    assert "6.6.6.6" not in px.log()
    assert px.log().count("127.0.0.2: PROXY header refused: the peer is not in "
                          "ProxyProtocolFrom") == attempts
    assert len(upstream.connections) == before, upstream.commands()
    assert not any("6.6.6.6" in line or "forged" in line for line in upstream.commands())
    with px.connect(hello=header(2, "203.0.113.5")) as smtp:       # a listed peer still works
        assert send_mail(smtp, "a@x.test", ["b@y.test"], BODY)[-1].startswith("250")
    assert upstream.wait_messages(1)[0].xclient == ["XCLIENT ADDR=203.0.113.5"]


# --- TLSWrapper behind a PROXY header ---------------------------------------------------------

def tls_after_header(px, pki, hello: bytes, source: str | None = None,
                     one_segment: bool = False) -> Client:
    """A Client that sends `hello` (a PROXY header) in plaintext, then starts
    TLS on the same socket, as a balancer in front of an implicit-TLS port
    does.  `one_segment`: the header and the ClientHello leave together
    (TCP_CORK holds the header back until the handshake's first flight)."""
    sock = socket.socket()
    sock.settimeout(20)
    if source:
        sock.bind((source, 0))
    sock.connect(px.address)
    if one_segment:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    sock.sendall(hello)
    client = Client.__new__(Client)
    client.sock = client_context(pki).wrap_socket(sock, server_hostname="proxy.test",
                                                  do_handshake_on_connect=False)
    if one_segment:
        # the ClientHello joins the corked header; uncorking sends both at once
        client.sock.setblocking(False)
        try:
            client.sock.do_handshake()
        except ssl.SSLWantReadError:
            pass
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
        client.sock.settimeout(20)
    client.sock.do_handshake()
    client.file = client.sock.makefile("rb")
    client.greeting = client.reply()
    return client


@pytest.mark.parametrize("version, one_segment", [(1, False), (2, False), (2, True)])
def test_tls_wrapper_reads_the_proxy_header_before_the_handshake(proxy, make_upstream, pki,
                                                                 version, one_segment):
    upstream = make_upstream(extensions=("XCLIENT ADDR NAME HELO", "8BITMIME"))
    px = proxy({"OutAddress": upstream.address, "TLSWrapper": "on", "ProxyProtocol": "on",
                "ProxyProtocolFrom": "127.0.0.1", "XClient": "on", **tls_settings(pki)})
    with tls_after_header(px, pki, header(version, "203.0.113.9"),
                          one_segment=one_segment) as smtp:
        assert smtp.greeting[-1].startswith("220"), smtp.greeting
        assert smtp.sock.version().startswith("TLSv1.")
        assert send_mail(smtp, "a@x.test", ["b@y.test"], BODY)[-1].startswith("250")
    [message] = upstream.wait_messages(1)
    assert message.xclient == ["XCLIENT ADDR=203.0.113.9"]
    px.wait_log(r"client=203\.0\.113\.9, from=a@x\.test, .*status=")
    assert "TLS handshake with client 203.0.113.9" not in px.log()


def test_tls_wrapper_refuses_a_header_from_outside_the_list_before_any_handshake(
        proxy, upstream, pki):
    px = proxy({"OutAddress": upstream.address, "TLSWrapper": "on", "ProxyProtocol": "on",
                "ProxyProtocolFrom": "127.0.0.1/32", **tls_settings(pki)})
    before = len(upstream.connections)
    with pytest.raises((ssl.SSLError, OSError)):
        tls_after_header(px, pki, header(2, "203.0.113.10"), source="127.0.0.2")
    px.wait_log(r"127\.0\.0\.2: PROXY header refused: the peer is not in ProxyProtocolFrom")
    assert "TLS handshake with client 127.0.0.2" not in px.log()
    assert "TLS handshake with client 203.0.113.10" not in px.log()
    assert len(upstream.connections) == before


HAPROXY_FRONT = """\
global
    stats socket {stats} mode 600 level admin

defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout check 5s

frontend smtps
    bind 127.0.0.1:{front}
    default_backend gateways

backend gateways
    {backend}
"""


class FrontHaproxy:
    """haproxy -db in front of the proxy: `backend` lines for backend `gateways`."""

    def __init__(self, workdir, backend: str) -> None:
        if not shutil.which(HAPROXY):
            pytest.skip("haproxy is not installed (apt-get install haproxy)")
        self.front = free_port()
        self.stats = workdir / "haproxy.sock"
        cfg = workdir / "haproxy.cfg"
        cfg.write_text(HAPROXY_FRONT.format(stats=self.stats, front=self.front,
                                            backend="\n    ".join(backend.splitlines())))
        self.log = workdir / "haproxy.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        wait_until(lambda: self.proc.poll() is not None or self.status(), 15,
                   what="haproxy's stats socket")
        assert self.proc.poll() is None, self.log.read_text()

    def status(self) -> str:
        """The status of server `px` in backend `gateways` ('' before it answers)."""
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(5)
                sock.connect(str(self.stats))
                sock.sendall(b"show stat\n")
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
        except OSError:
            return ""
        rows = data.decode().splitlines()
        names = rows[0][2:].split(",") if rows and rows[0].startswith("# ") else []
        for row in rows[1:]:
            fields = dict(zip(names, row.split(",")))
            if fields.get("pxname") == "gateways" and fields.get("svname") == "px":
                return fields["status"]
        return ""

    def stop(self) -> None:
        stop_process(self.proc, 10)


@pytest.fixture
def front_haproxy(tmp_path):
    started = []

    def make(backend: str) -> FrontHaproxy:
        instance = FrontHaproxy(tmp_path, backend)
        started.append(instance)
        return instance

    yield make
    for instance in started:
        instance.stop()


def test_haproxy_send_proxy_v2_in_front_of_tls_wrapper(proxy, make_upstream, pki, front_haproxy):
    """haproxy in mode tcp, `send-proxy-v2`, in front of an implicit-TLS port:
    the client's TLS goes through haproxy untouched, behind its header."""
    upstream = make_upstream(extensions=("XCLIENT ADDR NAME HELO", "8BITMIME"))
    px = proxy({"OutAddress": upstream.address, "TLSWrapper": "on", "ProxyProtocol": "on",
                "ProxyProtocolFrom": "127.0.0.1", "XClient": "on", **tls_settings(pki)})
    balancer = front_haproxy("server px %s:%d send-proxy-v2" % px.address)
    with smtplib.SMTP_SSL("127.0.0.1", balancer.front, context=client_context(pki), timeout=20,
                          source_address=("127.0.0.9", 0)) as smtp:
        smtp.ehlo("client.example")
        smtp.sendmail("a@x.test", ["b@y.test"], BODY)
    [message] = upstream.wait_messages(1)
    assert message.xclient == ["XCLIENT ADDR=127.0.0.9"]
    px.wait_log(r"client=127\.0\.0\.9, from=a@x\.test")


# --- health checks: a LOCAL header, then gone ----------------------------------------------------

def test_local_header_then_close_or_reset_opens_no_server_connection(proxy, upstream):
    px = proxy({"OutAddress": upstream.address, "ProxyProtocol": "on"}, debug=3)
    before = len(upstream.connections)
    for leave in (socket.socket.close, reset) * 3:
        sock = socket.create_connection(px.address, timeout=10)
        sock.sendall(LOCAL_V2)
        leave(sock)
    wait_until(lambda: px.log().count("after a PROXY LOCAL header") >= 6, 20,
               what="six health checks logged:\n" + px.log())
    time.sleep(0.5)
    assert len(upstream.connections) == before, upstream.connections
    assert px.log().count("closed the connection after a PROXY LOCAL header (a health check); "
                          "no server connection opened") == 6
    assert px.log().count("accepted connection from") == 1       # the start-up probe's


def test_local_header_then_smtp_still_gets_a_session(proxy, upstream):
    """A LOCAL connection that speaks (or waits for the greeting, as haproxy's
    `option smtpchk` does) is served."""
    px = proxy({"OutAddress": upstream.address, "ProxyProtocol": "on"})
    with px.connect(hello=LOCAL_V2) as smtp:                   # silent: greeted all the same
        assert smtp.greeting[-1].startswith("220")
        assert smtp.cmd("EHLO check.example")[0].startswith("250")
    with socket.create_connection(px.address, timeout=20) as sock:   # speaks first
        sock.sendall(LOCAL_V2 + b"EHLO early.example\r\n")
        assert sock.makefile("rb").readline().startswith(b"220 ")
    upstream.wait_command("EHLO early.example")


def test_haproxy_health_checks_cost_no_server_connection(proxy, upstream, front_haproxy):
    """`check send-proxy-v2 check-send-proxy`: haproxy connects, sends a LOCAL
    header and closes, every 300 ms; none of that reaches the server."""
    px = proxy({"OutAddress": upstream.address, "ProxyProtocol": "on",
                "ProxyProtocolFrom": "127.0.0.1"}, debug=3)
    before = len(upstream.connections)
    balancer = front_haproxy("server px %s:%d send-proxy-v2 check check-send-proxy inter 300ms"
                             % px.address)
    wait_until(lambda: balancer.status().startswith("UP"), 15, what="haproxy's check UP")
    wait_until(lambda: px.log().count("after a PROXY LOCAL header") >= 8, 20,
               what="eight health checks:\n" + px.log())
    assert len(upstream.connections) == before, px.log()
    assert balancer.status().startswith("UP")


def test_haproxy_smtpchk_with_a_local_header_stays_up(proxy, upstream, front_haproxy):
    """`option smtpchk` waits for the greeting behind its LOCAL header: it gets it."""
    px = proxy({"OutAddress": upstream.address, "ProxyProtocol": "on",
                "ProxyProtocolFrom": "127.0.0.1"})
    balancer = front_haproxy("option smtpchk\nserver px %s:%d send-proxy-v2 check "
                             "check-send-proxy inter 1s fall 1" % px.address)
    wait_until(lambda: balancer.status().startswith("UP"), 15, what="haproxy's smtpchk UP")
    upstream.wait_for(lambda: sum(1 for _, line in upstream.lines if line.upper().startswith(
        ("HELO", "EHLO"))) >= 2, 15, "two smtpchk HELOs")
    assert balancer.status().startswith("UP")


# --- HandshakeTimeOut ----------------------------------------------------------------------------

def dropped_within(px, what: str, limit: float) -> float:
    """Seconds until the proxy closes a connection that stalls at `what`
    (nothing more is sent); asserts it does so within `limit` seconds."""
    started = time.monotonic()
    with px.connect(timeout=limit) if what == "starttls" else \
            socket.create_connection(px.address, timeout=limit) as conn:
        if what == "starttls":
            assert conn.cmd("EHLO client.example")[-1].startswith("250")
            assert conn.cmd("STARTTLS")[0].startswith("220")
            assert conn.closed_by_peer(timeout=limit)
        else:
            try:
                assert conn.recv(100) == b""
            except ConnectionResetError:
                pass
    return time.monotonic() - started


@pytest.mark.parametrize("what", ["proxy", "tlswrapper", "starttls"])
def test_handshakes_and_headers_have_their_own_short_deadline(proxy, upstream, pki, what):
    """HandshakeTimeOut 1 with TimeOut 60: a client silent at the PROXY header,
    at TLSWrapper's handshake or at its STARTTLS handshake is dropped at the
    handshake deadline, long before TimeOut."""
    settings = {"OutAddress": upstream.address, "TimeOut": 60, "HandshakeTimeOut": 1,
                **tls_settings(pki)}
    if what == "proxy":
        settings["ProxyProtocol"] = "on"
    elif what == "tlswrapper":
        settings["TLSWrapper"] = "on"
    px = proxy(settings)
    assert dropped_within(px, what, 40) < 30
    px.wait_log({"proxy": r"no complete PROXY header within 1 seconds",
                 "tlswrapper": r"TLS handshake with client 127\.0\.0\.1 failed",
                 "starttls": r"TLS handshake with the client failed"}[what])


def test_handshake_timeout_setting_is_checked(tmp_path):
    base = "OutAddress: 127.0.0.1:2525\nTempDirectory: %s\n" % tmp_path
    for value in ("0", "-1", "soon"):
        conf = write_config(tmp_path / "bad.conf", base + "HandshakeTimeOut: %s\n" % value)
        ran = run_proxsmtpd("-t", "-f", str(conf))
        assert ran.returncode == 2, ran.stderr
        assert 'line 3: HandshakeTimeOut: expected an integer of at least 1, not "%s"' % value \
            in ran.stderr
    conf = write_config(tmp_path / "good.conf", base + "HandshakeTimeOut: 10\n")
    assert run_proxsmtpd("-t", "-f", str(conf)).returncode == 0


# --- MaxConnections on a TLSWrapper port ---------------------------------------------------------

def test_busy_on_a_tls_wrapper_port_sends_no_plaintext(proxy, upstream, pki):
    px = proxy({"OutAddress": upstream.address, "TLSWrapper": "on", "MaxConnections": 2,
                "Workers": 1, **tls_settings(pki)})
    # the start-up probe connected without a handshake: its slot is free once that failed
    px.wait_log(r"TLS handshake with client 127\.0\.0\.1 failed", timeout=20)
    held = [smtplib.SMTP_SSL(px.host, px.port, context=client_context(pki), timeout=20)
            for _ in range(2)]
    try:
        for smtp in held:
            assert smtp.ehlo("client.example")[0] == 250
        assert closed_silently(px.address)          # no plaintext 421 in front of a TLS client
        with pytest.raises((ssl.SSLError, OSError, smtplib.SMTPServerDisconnected)):
            smtplib.SMTP_SSL(px.host, px.port, context=client_context(pki), timeout=20)
        px.wait_log(r"too many connections open \(max 2\)")
    finally:
        for smtp in held:
            smtp.close()


# --- the start-up warning --------------------------------------------------------------------

@pytest.mark.parametrize("listen, more, warned", [
    ("0.0.0.0:10025", "", True),
    ("[::]:10025", "", True),
    ("10025", "", True),
    ("0.0.0.0:10025", "ProxyProtocolFrom: 10.0.0.5\n", False),
    ("127.0.0.1:10025", "", False),
    ("/run/proxsmtpd.sock", "", False),
])
def test_proxy_protocol_open_to_anyone_is_warned_about(tmp_path, listen, more, warned):
    conf = write_config(tmp_path / "proxsmtpd.conf", "OutAddress: 127.0.0.1:2525\nXClient: on\n"
                        "TempDirectory: %s\nListen: %s\nProxyProtocol: on\n%s"
                        % (tmp_path, listen, more))
    ran = run_proxsmtpd("-t", "-f", str(conf))
    assert ran.returncode == 0, ran.stderr
    said = "line 5: ProxyProtocol: on without ProxyProtocolFrom" in ran.stderr
    assert said == warned, ran.stderr
    if warned:
        assert "anyone who reaches it can send a PROXY header and claim any client address" \
            in ran.stderr


def test_proxy_protocol_open_to_anyone_is_warned_about_at_start(proxy, upstream):
    px = proxy({"OutAddress": upstream.address, "ProxyProtocol": "on", "XClient": "on",
                "Listen": "0.0.0.0:%d" % free_port()})
    px.wait_log(r"ProxyProtocol: on without ProxyProtocolFrom, and Listen 0\.0\.0\.0:\d+ "
                r"accepts connections from other hosts")
