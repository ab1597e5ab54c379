"""How a session ends, end to end on loopback: a client that shuts down its
sending side over TLS still gets its replies; a message the server took is
logged and counted even if the client left before hearing so; and an ended
session lets go of its sockets (a peer that never reads, a TLS client that
never answers close_notify) within seconds instead of keeping descriptors
and kernel buffers outside MaxConnections."""

from __future__ import annotations

import os
import re
import socket
import ssl
import struct
import time
import urllib.request

import pytest
import trustme

from harness import free_port, freed_without_collector, send_mail, wait_until

BODY = b"From: a@x.test\r\nTo: b@y.test\r\nSubject: end\r\n\r\nthe end\r\n"
UVLOOP_LINE = "returning true from eof_received() has no effect when using ssl"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    cert = ca.issue_cert("proxy.test", "127.0.0.1")
    chain, key = directory / "proxy.pem", directory / "proxy.key"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key))
    context = ssl.create_default_context()
    ca.configure_trust(context)

    class PKI:
        pass
    pki = PKI()
    pki.chain, pki.key, pki.context = chain, key, context
    return pki


def slow_final(seconds: float):
    """A server's final reply that takes `seconds` (content scanning)."""
    def reply(message, conn):
        time.sleep(seconds)
        return "250 2.0.0 Ok: queued as SLOW"
    return reply


def _hex_address(address: tuple) -> str:
    """An IPv4 (address, port) as /proc/net/tcp writes it."""
    packed = socket.inet_aton(address[0])
    return "%08X:%04X" % (int.from_bytes(packed, "little"), address[1])


def proxy_end(client: socket.socket) -> tuple[str, str]:
    """The proxy's end of `client`'s connection: (local, remote) as
    /proc/net/tcp writes them (taken while it is connected)."""
    return _hex_address(client.getpeername()), _hex_address(client.getsockname())


def worker_holds(pid: int, end: tuple[str, str]) -> bool:
    """Whether process `pid` still has a descriptor for the connection `end`
    (proxy_end), found by its inode in /proc/net/tcp."""
    local, remote = end
    with open("/proc/net/tcp") as table:
        inodes = {fields[9] for fields in (line.split() for line in table)
                  if fields[1] == local and fields[2] == remote}
    links = set()
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            links.add(os.readlink("/proc/%d/fd/%s" % (pid, fd)))
        except OSError:
            pass
    return any("socket:[%s]" % inode in links for inode in inodes if inode != "0")


def only_worker(px) -> int:
    [pid] = [pid for pid, title in px.children().items() if "worker" in title]
    return pid


# --- a TLS client that can shut down its TCP sending side alone ---------------------------

class BioClient:
    """TLS over a raw socket through ssl.MemoryBIO.  SSLSocket.shutdown()
    would drop TLS altogether; here the client can shut down its TCP side
    (or send close_notify) and still decrypt what comes back."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext,
                 hostname: str = "proxy.test") -> None:
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=hostname)
        self.plain = b""
        self.eof = False
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
        self._flush()

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()
            self.eof = True

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()

    def close_notify(self) -> None:
        """Send close_notify (TLS's half-close) without waiting for the answer."""
        try:
            self.tls.unwrap()
        except ssl.SSLWantReadError:
            pass
        self._flush()

    def line(self) -> bytes:
        """One decrypted line; b'' once the connection ended."""
        while b"\n" not in self.plain:
            try:
                chunk = self.tls.read(65536)
            except ssl.SSLWantReadError:
                if self.eof:
                    return b""
                self._fill()
                continue
            except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLError):
                return b""
            if not chunk:
                return b""
            self.plain += chunk
        line, self.plain = self.plain.split(b"\n", 1)
        return line + b"\n"

    def reply(self) -> list[str]:
        lines = []
        while True:
            raw = self.line()
            if not raw:
                return lines
            lines.append(raw.decode().rstrip("\r\n"))
            if lines[-1][3:4] != "-":
                return lines

    def cmd(self, line: str) -> list[str]:
        self.send(line.encode() + b"\r\n")
        return self.reply()


def plain_reply(sock: socket.socket) -> list[str]:
    """A reply read in plaintext a byte at a time (nothing past it is read)."""
    lines, line = [], b""
    while True:
        byte = sock.recv(1)
        if not byte:
            return lines
        line += byte
        if line.endswith(b"\n"):
            lines.append(line.decode().rstrip("\r\n"))
            if lines[-1][3:4] != "-":
                return lines
            line = b""


def tls_client(px, pki, mode: str) -> BioClient:
    """A client through TLS to the proxy: from the first byte (TLSWrapper) or
    after STARTTLS; the greeting, EHLO (and STARTTLS) done."""
    sock = socket.create_connection(px.address, timeout=30)
    if mode == "wrapper":
        client = BioClient(sock, pki.context)
        assert client.reply()[0].startswith("220")
    else:
        assert plain_reply(sock)[0].startswith("220")
        sock.sendall(b"EHLO c.test\r\n")
        assert plain_reply(sock)[-1].startswith("250")
        sock.sendall(b"STARTTLS\r\n")
        assert plain_reply(sock)[0].startswith("220")
        client = BioClient(sock, pki.context)
    assert client.cmd("EHLO c.test")[-1].startswith("250")
    return client


def tls_settings(pki, mode: str) -> dict:
    settings = {"TLSCertificate": pki.chain, "TLSKey": pki.key}
    if mode == "wrapper":
        settings["TLSWrapper"] = "on"
    return settings


# --- the final reply reaches a TLS client that shut down its sending side ---------------------

@pytest.mark.parametrize("mode", ["wrapper", "starttls"])
@pytest.mark.e2e
@pytest.mark.slow
def test_tls_client_that_shuts_down_its_side_still_gets_250_and_221(proxy, make_upstream, pki,
                                                                    mode):
    """`.` and QUIT, then shutdown(SHUT_WR) while the server still scans the
    message: the client reads the server's 250 and the 221 through TLS, as a
    plaintext client does (a client that misses the 250 sends it again)."""
    upstream = make_upstream(data_reply=slow_final(2))
    p = proxy({"OutAddress": upstream.address, **tls_settings(pki, mode)})
    client = tls_client(p, pki, mode)
    try:
        assert client.cmd("MAIL FROM:<a@x.test>")[-1].startswith("250")
        assert client.cmd("RCPT TO:<b@y.test>")[-1].startswith("250")
        assert client.cmd("DATA")[-1].startswith("354")
        client.send(BODY + b".\r\nQUIT\r\n")
        client.sock.shutdown(socket.SHUT_WR)
        replies = []
        while reply := client.reply():
            replies.append(reply[-1])
    finally:
        client.sock.close()
    assert replies == ["250 2.0.0 Ok: queued as SLOW", "221 2.0.0 Bye"]
    assert len(upstream.wait_messages(1)) == 1
    p.wait_log(r"status=FILTERED$")
    assert UVLOOP_LINE not in p.log()


@pytest.mark.parametrize("mode", ["wrapper", "starttls"])
@pytest.mark.e2e
@pytest.mark.slow
def test_close_notify_leaves_nothing_on_stderr(proxy, upstream, pki, mode):
    """A TLS client that sends close_notify behind its QUIT: the session ends
    cleanly, and uvloop's complaint about eof_received never reaches stderr."""
    p = proxy({"OutAddress": upstream.address, **tls_settings(pki, mode)})
    client = tls_client(p, pki, mode)
    try:
        assert client.cmd("MAIL FROM:<a@x.test>")[-1].startswith("250")
        assert client.cmd("RCPT TO:<b@y.test>")[-1].startswith("250")
        assert client.cmd("DATA")[-1].startswith("354")
        client.send(BODY + b".\r\n")
        assert client.reply()[-1].startswith("250")
        client.send(b"QUIT\r\n")
        client.close_notify()
        client.sock.shutdown(socket.SHUT_WR)
        while client.reply():
            pass
    finally:
        client.sock.close()
    upstream.wait_messages(1)
    p.wait_log(r"status=FILTERED$")
    p.wait_log(r"connection closed$")
    time.sleep(0.5)
    assert UVLOOP_LINE not in p.log()


# --- a message the server took is logged and counted, client or no client ----------------------

@pytest.mark.parametrize("filtered", [False, True])
@pytest.mark.e2e
@pytest.mark.slow
def test_message_logged_and_counted_when_the_client_left_before_the_reply(proxy, make_upstream,
                                                                         filtered):
    """The client sends its message and resets the connection while the
    server still scans it; the server takes it: the log line (with its
    status and the server's reply) and /metrics must say so."""
    upstream = make_upstream(data_reply=slow_final(2))
    port = free_port()
    p = proxy({"OutAddress": upstream.address, "StatsListen": "127.0.0.1:%d" % port,
               "FilterCommand": "cat" if filtered else None})
    with p.connect() as client:
        client.cmd("EHLO c.test")
        assert client.cmd("MAIL FROM:<a@x.test>")[-1].startswith("250")
        assert client.cmd("RCPT TO:<b@y.test>")[-1].startswith("250")
        assert client.cmd("DATA")[-1].startswith("354")
        client.send(BODY + b".\r\n")
        upstream.wait_command("DATA")
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert len(upstream.wait_messages(1)) == 1
    p.wait_log(r'from=a@x\.test, to=b@y\.test, .*reply="250 2\.0\.0 Ok: queued as SLOW".*'
               r"status=FILTERED$")

    def filtered_total() -> float:
        url = "http://127.0.0.1:%d/metrics" % port
        with urllib.request.urlopen(url, timeout=10) as answer:
            text = answer.read().decode()
        for line in text.splitlines():
            if line.startswith('proxsmtpd_messages_total{status="FILTERED"}'):
                return float(line.split()[-1])
        return 0.0
    wait_until(lambda: filtered_total() == 1.0, 10, what="the message counted")


@pytest.mark.e2e
@pytest.mark.slow
def test_refused_message_logged_and_counted_when_the_client_left_before_the_refusal(
        proxy, upstream):
    """The client sends its message and resets the connection while the
    filter still judges it; the filter refuses it: the refusal is logged and
    counted as for a client that stayed, not lost with the session."""
    port = free_port()
    p = proxy({"OutAddress": upstream.address, "StatsListen": "127.0.0.1:%d" % port,
               "FilterCommand": "sleep 2; echo '550 5.7.1 no thanks' >&2; exit 1"})
    with p.connect() as client:
        client.cmd("EHLO c.test")
        assert client.cmd("MAIL FROM:<a@x.test>")[-1].startswith("250")
        assert client.cmd("RCPT TO:<b@y.test>")[-1].startswith("250")
        assert client.cmd("DATA")[-1].startswith("354")
        client.send(BODY + b".\r\n")
        p.wait_log(r"executed filter command")
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    p.wait_log(r'from=a@x\.test, to=b@y\.test, .*reply="550 5\.7\.1 no thanks", .*status=REJECTED$')
    assert upstream.messages == []

    def rejected_total() -> float:
        url = "http://127.0.0.1:%d/metrics" % port
        with urllib.request.urlopen(url, timeout=10) as answer:
            text = answer.read().decode()
        for line in text.splitlines():
            if line.startswith('proxsmtpd_messages_total{status="REJECTED"}'):
                return float(line.split()[-1])
        return 0.0
    wait_until(lambda: rejected_total() == 1.0, 10, what="the refusal counted")


# --- an ended session lets go of its sockets ----------------------------------------------------

@pytest.mark.e2e
@pytest.mark.slow
def test_client_that_never_reads_is_dropped_after_the_timeout(proxy, upstream):
    """A client pipelines EHLO lines and never reads a reply: once TimeOut has
    passed the session ends, and its socket must be gone from the worker
    within seconds (not kept to drain for ever, kernel buffers and all)."""
    # (at the info level: the debug trace of every line would slow the
    # proxy down until the flooder's kernel buffers never fill)
    p = proxy({"OutAddress": upstream.address, "Workers": 1, "TimeOut": 3}, debug=3)
    worker = only_worker(p)
    flooder = socket.socket()
    flooder.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    flooder.connect(p.address)
    flooder.setblocking(False)
    try:
        block = b"EHLO flood.test\r\n" * 2000
        end = time.monotonic() + 3
        while time.monotonic() < end:
            try:
                flooder.send(block)
            except BlockingIOError:
                time.sleep(0.05)
        end = proxy_end(flooder)
        assert worker_holds(worker, end)
        p.wait_log(r"network operation timed out", 15)
        wait_until(lambda: not worker_holds(worker, end), 8,
                   what="the worker to let go of the flooder's socket")
        with pytest.raises(ConnectionResetError):
            flooder.setblocking(True)
            flooder.settimeout(10)
            while flooder.recv(1 << 20):
                pass
    finally:
        flooder.close()


@pytest.mark.parametrize("mode", ["wrapper", "starttls"])
@pytest.mark.e2e
@pytest.mark.slow
def test_tls_clients_that_never_answer_close_notify_cost_no_descriptors(proxy, upstream, pki,
                                                                         mode):
    """TLS clients that QUIT, read 221 and then neither send close_notify nor
    close: the worker lets go of their sockets within seconds, not after
    uvloop's 30 s shutdown timeout."""
    p = proxy({"OutAddress": upstream.address, "Workers": 1, **tls_settings(pki, mode)})
    worker = only_worker(p)
    clients, ends = [], []
    try:
        for _ in range(5):
            client = tls_client(p, pki, mode)
            clients.append(client)
            ends.append(proxy_end(client.sock))
            assert worker_holds(worker, ends[-1])
            assert client.cmd("QUIT")[0].startswith("221")
        wait_until(lambda: not any(worker_holds(worker, end) for end in ends), 12,
                   what="the worker to let go of the TLS clients' sockets")
    finally:
        for client in clients:
            client.sock.close()


@pytest.mark.e2e
@pytest.mark.slow
def test_worker_near_its_descriptor_limit_refuses_new_clients_not_held_ones(proxy, upstream):
    """A worker with RLIMIT_NOFILE 64 and more clients than it can serve:
    each new client gets either its greeting or 421 busy at once, and every
    session it took keeps the descriptors it needs to finish (its server
    connection, the filter's pipes and temp file): none fails halfway."""
    p = proxy({"OutAddress": upstream.address, "Workers": 1, "MaxConnections": 200,
               "FilterCommand": "cat"}, start=False)
    p.wrapper = ("prlimit", "--nofile=64:64", "--")
    p.start()
    held, busy = [], 0
    try:
        for _ in range(30):
            client = p.connect(timeout=10)
            if client.greeting == ["421 Server busy, too many connections"]:
                busy += 1
                client.close()
                continue
            assert client.greeting and client.greeting[0].startswith("220"), client.greeting
            held.append(client)
        assert busy and held
        for number, client in enumerate(held):
            reply = send_mail(client, "a@x.test", ["b@y.test"], b"Subject: %d\r\n\r\nhi\r\n" % number)
            assert reply[-1].startswith("250"), reply
        p.wait_log(r"too many descriptors open \(\d+ of RLIMIT_NOFILE 64\)")
    finally:
        for client in held:
            client.close()
    upstream.wait_messages(len(held))
    # once the held sessions are gone, clients are served again
    def served() -> bool:
        with p.connect(timeout=10) as client:
            return client.greeting[0].startswith("220")
    wait_until(served, 10, interval=0.5, what="a client served again")
    assert len(re.findall(r"too many descriptors open", p.log())) == 1


@pytest.mark.session
def test_a_finished_tls_session_is_freed_without_the_cyclic_collector(tmp_path, pki):
    """The TLS layer and its channel hold each other while the connection
    lives; a TLSWrapper session that ended is still freed by reference
    counting alone (as a plaintext one is, see test_memory.py)."""
    import asyncio
    import weakref

    from proxsmtp.process import config
    from proxsmtp.net import tls
    from proxsmtp.session.session import Session
    from proxsmtp.net.channel import Channel
    from proxsmtp.net.tlslayer import TLSLayer

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 sink ESMTP\r\n")
        while line := await reader.readline():
            if line.upper().startswith(b"QUIT"):
                writer.write(b"221 bye\r\n")
                break
            writer.write(b"250 ok\r\n")
        writer.close()

    async def one_session() -> weakref.ref:
        server = await asyncio.start_server(sink, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        cfg = config.parse("OutAddress: 127.0.0.1:%d\nTempDirectory: %s\nTLSWrapper: on\n"
                           "TLSCertificate: %s\nTLSKey: %s\n" % (port, tmp_path, pki.chain, pki.key))
        cfg.listening_tls = tls.listening_context(cfg.TLSCertificate, cfg.TLSKey)
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            opening = asyncio.ensure_future(asyncio.open_connection(
                *listener.getsockname(), ssl=pki.context, server_hostname="proxy.test"))
            conn, _ = await asyncio.get_running_loop().sock_accept(listener)
        session = Session(cfg, conn)
        task = asyncio.get_running_loop().create_task(session.run())
        reader, writer = await opening
        conversation = [(await reader.readline())[:3]]
        for command in (b"HELO me\r\n", b"NOOP\r\n", b"QUIT\r\n"):
            writer.write(command)
            conversation.append((await reader.readline())[:3])
        await task
        writer.close()
        server.close()
        await server.wait_closed()
        assert conversation == [b"220", b"250", b"250", b"221"]
        ref = weakref.ref(session)
        del session, task
        for _ in range(20):         # the layers' and transports' connection_lost callbacks
            await asyncio.sleep(0.01)
        return ref

    # neither a channel nor a TLS layer is left for the collector to find
    freed_without_collector(one_session, (Channel, TLSLayer))
