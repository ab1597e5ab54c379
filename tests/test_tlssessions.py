"""TLS session resumption where the proxy is the TLS client (net/tlssessions.py,
tlslayer.upgrade, smtp/peer.py): the cache's rules on fakes, and whole
sessions in this process on uvloop against a STARTTLS server of asyncio's
(TLS 1.3 and TLS 1.2), which must resume and still be freed by reference
counting alone.  The real-Postfix tests are in test_tls.py."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
import types
import weakref
from collections import OrderedDict

import pytest
import trustme
from harness import freed_without_collector

from proxsmtp.net import tls, tlssessions
from proxsmtp.net.channel import Channel
from proxsmtp.net.tlslayer import TLSLayer
from proxsmtp.process import config
from proxsmtp.session.session import Session


@pytest.fixture
def cache(monkeypatch):
    """An empty session cache for the test."""
    fresh: OrderedDict = OrderedDict()
    monkeypatch.setattr(tlssessions, "_cache", fresh)
    return fresh


def fake(version: str = "TLSv1.3", ticket: bool = True, lifetime: float = 7200,
         reused: bool = False, age: float = 0):
    """An established connection's ssl_object, as keep() reads it."""
    session = types.SimpleNamespace(has_ticket=ticket, id=b"\x01" * 32,
                                    time=int(time.time() - age), timeout=lifetime)
    return types.SimpleNamespace(session=session, version=lambda: version, session_reused=reused)


@pytest.mark.unit
def test_only_a_client_context_is_keyed_and_the_key_has_the_name():
    context = tls.connecting_context("may", None)
    assert isinstance(context, tlssessions.ClientContext)
    assert tlssessions.key(ssl.create_default_context(), ("127.0.0.1", 25), "a.test") is None
    assert (tlssessions.key(context, ("127.0.0.1", 25), "a.test")
            != tlssessions.key(context, ("127.0.0.1", 25), "b.test"))
    other = tls.connecting_context("may", None)
    assert (tlssessions.key(context, ("127.0.0.1", 25), "a.test")
            != tlssessions.key(other, ("127.0.0.1", 25), "a.test"))


@pytest.mark.unit
def test_verify_context_still_checks_chain_and_name():
    context = tls.connecting_context("verify", None)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


@pytest.mark.unit
def test_cache_is_bounded_least_recently_used_first(cache, monkeypatch):
    monkeypatch.setattr(tlssessions, "MAX_SESSIONS", 2)
    kept = {name: fake() for name in "abc"}
    tlssessions.keep("a", kept["a"])
    tlssessions.keep("b", kept["b"])
    assert tlssessions.lookup("a") is kept["a"].session      # a is now the most recent
    tlssessions.keep("c", kept["c"])
    assert list(cache) == ["a", "c"]
    assert tlssessions.lookup("b") is None


@pytest.mark.unit
def test_sessions_that_cannot_resume_are_not_kept(cache):
    tlssessions.keep("k", fake())
    tlssessions.keep("k", fake(ticket=False))       # TLS 1.3 before its ticket came
    assert tlssessions.lookup("k") is None
    tlssessions.keep("k", fake("TLSv1.2", ticket=False))   # a TLS 1.2 session id
    assert tlssessions.lookup("k") is not None
    tlssessions.keep("old", fake(lifetime=0))
    assert tlssessions.lookup("old") is None and "old" not in cache
    tlssessions.drop("k")
    assert not cache
    tlssessions.keep(None, fake())          # a context that cannot resume
    assert not cache


class Unread:
    """A resumed connection's ssl_object whose session must not be read
    (reading copies it: tlssessions' docstring)."""

    session_reused = True

    @property
    def session(self):
        raise AssertionError("the session was read")

    def version(self) -> str:
        return "TLSv1.3"


@pytest.mark.unit
def test_a_resumed_handshake_leaves_the_kept_session_unread_until_half_its_life(cache):
    first = fake()
    tlssessions.keep("k", first)
    tlssessions.keep("k", Unread())
    assert tlssessions.lookup("k") is first.session
    aged = fake(lifetime=100, age=60)
    tlssessions.keep("k", aged)
    later = fake(reused=True)           # resumed, but the kept session is past half its life
    tlssessions.keep("k", later)
    assert tlssessions.lookup("k") is later.session
    full = fake()                       # not resumed (another connection's): its own is kept
    tlssessions.keep("k", full)
    assert tlssessions.lookup("k") is full.session


@pytest.mark.unit
def test_a_peer_that_takes_a_session_once_gets_each_new_one(cache):
    tlssessions.keep("k", fake())
    tlssessions.keep("k", Unread())             # taken once
    tlssessions.refused("k")                    # and refused the next time
    assert tlssessions.lookup("k") is None
    fresh = fake()
    tlssessions.keep("k", fresh)                # the full handshake's session
    assert tlssessions.lookup("k") is fresh.session
    again = fake(reused=True)
    tlssessions.keep("k", again)                # resumed: its new ticket is kept
    assert tlssessions.lookup("k") is again.session
    tlssessions.keep("n", fake())
    tlssessions.refused("n")                    # a session never taken: just forgotten
    assert "n" not in cache


# --- whole sessions in this process ------------------------------------------------------------

@pytest.fixture(scope="module")
def identity(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    cert = trustme.CA().issue_cert("127.0.0.1")
    chain, key = directory / "server.pem", directory / "server.key"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key))
    return chain, key


class StartTLSServer:
    """EHLO (offering STARTTLS), STARTTLS, QUIT; every handshake's
    session_reused, as the server saw it."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.reused: list[bool] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 sink ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-sink\r\n250 STARTTLS\r\n" if writer.get_extra_info(
                    "ssl_object") is None else b"250 sink\r\n")
            elif verb == b"STAR":
                writer.write(b"220 go ahead\r\n")
                await writer.start_tls(self.context)
                self.reused.append(writer.get_extra_info("ssl_object").session_reused)
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                break
            else:
                writer.write(b"250 ok\r\n")
        writer.close()


async def one_session(cfg, port: int) -> weakref.ref:
    """A client says EHLO and QUIT through a Session made here; the Session's weakref."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)     # asyncio's own sock_accept needs it
        opening = asyncio.ensure_future(asyncio.open_connection(*listener.getsockname()))
        conn, _ = await asyncio.get_running_loop().sock_accept(listener)
    session = Session(cfg, conn)
    task = asyncio.get_running_loop().create_task(session.run())
    reader, writer = await opening
    assert (await reader.readline())[:3] == b"220"
    writer.write(b"EHLO me\r\n")
    while (line := await reader.readline())[3:4] == b"-":
        pass
    assert line[:3] == b"250", line
    writer.write(b"QUIT\r\n")
    assert (await reader.readline())[:3] == b"221"
    await task
    writer.close()
    ref = weakref.ref(session)
    del session, task
    for _ in range(20):         # the layers' and transports' connection_lost callbacks
        await asyncio.sleep(0.01)
    return ref


@pytest.mark.session
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_server_leg_resumes_and_the_sessions_are_freed(identity, tmp_path, cache, version):
    """ServerTLS may: the first session's handshake is full, the next two
    resume (a TLS 1.3 ticket, a TLS 1.2 session); the cache holds TLS
    sessions only, so each SMTP session is still freed by reference
    counting, and no channel or TLS layer is left."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*identity)
    context.maximum_version = version
    server = StartTLSServer(context)

    async def sessions() -> weakref.ref:
        listening = await asyncio.start_server(server.serve, "127.0.0.1", 0)
        port = listening.sockets[0].getsockname()[1]
        cfg = config.parse("OutAddress: 127.0.0.1:%d\nTempDirectory: %s\nServerTLS: may\n"
                           % (port, tmp_path))
        cfg.connecting_tls = tls.connecting_context("may", None)
        for _ in range(2):
            assert (await one_session(cfg, port))() is None
        ref = await one_session(cfg, port)
        listening.close()
        await listening.wait_closed()
        return ref

    freed_without_collector(sessions, (Channel, TLSLayer))
    assert server.reused == [False, True, True]
    assert len(cache) == 1


@pytest.mark.session
def test_without_uvloop_every_handshake_is_full(identity, tmp_path, cache):
    """asyncio's own loop (the tests' and tools'): its start_tls makes the
    SSLObject in a callback of its own, so no session is offered there nor
    kept: full handshakes, and the sessions work as before."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*identity)
    server = StartTLSServer(context)

    async def sessions() -> None:
        listening = await asyncio.start_server(server.serve, "127.0.0.1", 0)
        port = listening.sockets[0].getsockname()[1]
        cfg = config.parse("OutAddress: 127.0.0.1:%d\nTempDirectory: %s\nServerTLS: may\n"
                           % (port, tmp_path))
        cfg.connecting_tls = tls.connecting_context("may", None)
        for _ in range(2):
            await one_session(cfg, port)
        listening.close()
        await listening.wait_closed()

    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        runner.run(sessions())
    assert server.reused == [False, False] and not cache
