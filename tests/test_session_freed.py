"""A session that ends in any way, mid-DATA included, is freed by reference
counting the moment it ends (relay.py's promise): nothing of it waits for
the cyclic collector.  Each test runs one session in this process on uvloop
with the collector off, ends it one way, and then looks for the session
(a weak reference) and for any Channel left behind.

A message is taken in the relay's callbacks (no filter, no keepalives)
unless KeepAlives says otherwise: the transfer and the session's reply
queue are then tied to the session by callbacks, which an ended transfer
must let go of.  A session ended by an exception raised in those callbacks
or in a wait must not be kept by the exception's traceback either."""

from __future__ import annotations

import asyncio
import logging
import socket
import weakref
from typing import Awaitable, Callable

import pytest

from harness import freed_without_collector
from proxsmtp.process import config
from proxsmtp.process.log import log
from proxsmtp.session.session import Session
from proxsmtp.net.channel import Channel

pytestmark = pytest.mark.session

ENVELOPE = (b"EHLO me\r\n", b"MAIL FROM:<a@x.test>\r\n", b"RCPT TO:<b@y.test>\r\n", b"DATA\r\n")
HEAD = b"Subject: t\r\n\r\nthe first line\r\n"


class Sink:
    """A server that answers every command with 250 (DATA with 354, then
    250 at the dot), but goes away without a reply to the command `close_at`
    and, unless `verdict`, before its verdict on a message; setting `leave`
    makes it go away at once."""

    def __init__(self, close_at: bytes = b"", verdict: bool = True) -> None:
        self.close_at = close_at
        self.verdict = verdict
        self.leave = asyncio.Event()
        self.gone = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 sink ESMTP\r\n")
        leave = asyncio.ensure_future(self.leave.wait())
        try:
            while True:
                line = asyncio.ensure_future(reader.readline())
                await asyncio.wait((line, leave), return_when=asyncio.FIRST_COMPLETED)
                if leave.done():
                    line.cancel()
                    break
                verb = line.result()[:4].upper()
                if not verb or verb == self.close_at:
                    break
                if verb == b"DATA":
                    writer.write(b"354 go on\r\n")
                    await reader.readuntil(b"\r\n.\r\n")
                    if not self.verdict:
                        break
                    writer.write(b"250 queued\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                else:
                    writer.write(b"250-sink\r\n250 PIPELINING\r\n" if verb == b"EHLO"
                                 else b"250 ok\r\n")
        finally:
            leave.cancel()
            writer.close()
            await writer.wait_closed()
            self.gone.set()


async def reply(reader: asyncio.StreamReader) -> bytes:
    """The code of the next whole reply (b"" at EOF)."""
    while (line := await reader.readline())[3:4] == b"-":
        pass
    return line[:3]


async def into_data(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Greeting, envelope and DATA; the first lines of the message."""
    assert await reply(reader) == b"220"
    for command, code in zip(ENVELOPE, (b"250", b"250", b"250", b"354")):
        writer.write(command)
        assert await reply(reader) == code
    writer.write(HEAD)
    await writer.drain()


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, asyncio.Task, Sink],
                  Awaitable[None]]


class Lines(logging.Handler):
    """The log as the daemon's handlers see it: each record formatted and
    let go (pytest's own capture keeps records, and with them the objects
    their arguments name)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def freed_after(script: Script, tmp_path, sink: Sink | None = None,
                settings: str = "") -> list[str]:
    """Run one session through `script` (which ends it), then assert that
    the session was freed without the cyclic collector and that no channel
    is left for it to find; the session's log lines (INFO and up)."""

    async def one_session() -> weakref.ref:
        server_sink = sink or Sink()
        server = await asyncio.start_server(server_sink.serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        cfg = config.parse("OutAddress: 127.0.0.1:%d\nTempDirectory: %s\n%s"
                           % (port, tmp_path, settings))
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            reader, writer = await asyncio.open_connection(*listener.getsockname())
            conn, _ = listener.accept()
        session = Session(cfg, conn)
        task = asyncio.get_running_loop().create_task(session.run())
        try:
            await asyncio.wait_for(script(reader, writer, task, server_sink), 30)
            try:
                await asyncio.wait_for(task, 30)
            except asyncio.CancelledError:
                assert task.cancelled()
        finally:
            writer.close()
            server.close()
            await server.wait_closed()
        ref = weakref.ref(session)
        del session, task
        for _ in range(5):          # the transports' connection_lost callbacks
            await asyncio.sleep(0.01)
        return ref

    lines = Lines()
    propagate, level = log.propagate, log.level
    log.addHandler(lines)
    log.propagate = False
    log.setLevel(logging.INFO)
    try:
        freed_without_collector(one_session, (Channel,))
    finally:
        log.removeHandler(lines)
        log.propagate = propagate
        log.setLevel(level)
    assert list(tmp_path.iterdir()) == []
    return lines.lines


def test_client_gone_mid_data(tmp_path):
    """The client closes its connection in the middle of its message."""
    async def script(reader, writer, task, sink):
        await into_data(reader, writer)
        writer.close()
        await writer.wait_closed()
    assert logged(freed_after(script, tmp_path), "unexpected end of data from client")


def logged(lines: list[str], reason: str) -> bool:
    """`reason` is in the session's log once (it ended for that reason)."""
    return sum(reason in line for line in lines) == 1


def test_client_reset_mid_data(tmp_path):
    """The client's connection is reset in the middle of its message."""
    async def script(reader, writer, task, sink):
        await into_data(reader, writer)
        writer.transport.abort()
    assert logged(freed_after(script, tmp_path), "unexpected end of data from client")


def test_server_gone_while_the_message_comes_in(tmp_path):
    """The server goes away while the client is still sending: at the dot
    the client hears 451 and the session ends, logged as when the server
    is found gone on a read (here the proxy finds it writing DATA)."""
    async def script(reader, writer, task, sink):
        await into_data(reader, writer)
        sink.leave.set()
        await sink.gone.wait()
        await asyncio.sleep(0.05)       # the proxy's server leg sees the end
        writer.write(b"the end\r\n.\r\n")
        assert await reply(reader) == b"451"
        assert await reply(reader) == b""
    assert logged(freed_after(script, tmp_path), "server disconnected unexpectedly")


@pytest.mark.parametrize("settings", ["", "KeepAlives: 5\n"])
def test_server_gone_at_data(tmp_path, settings):
    """The server goes away instead of answering the proxy's DATA (offered
    from the callbacks, or by the task: the same reply-queue steps)."""
    async def script(reader, writer, task, sink):
        await into_data(reader, writer)
        writer.write(b"the end\r\n.\r\n")
        assert await reply(reader) == b"451"
    assert logged(freed_after(script, tmp_path, Sink(close_at=b"DATA"), settings),
                  "server disconnected unexpectedly")


@pytest.mark.parametrize("settings", ["", "KeepAlives: 5\n"])
def test_server_gone_before_its_verdict(tmp_path, settings):
    """The server takes the message and goes away before its final reply."""
    async def script(reader, writer, task, sink):
        await into_data(reader, writer)
        writer.write(b"the end\r\n.\r\n")
        assert await reply(reader) == b"451"
    assert logged(freed_after(script, tmp_path, Sink(verdict=False), settings),
                  "server disconnected unexpectedly")


def test_client_times_out_mid_data(tmp_path):
    """The client stops sending in the middle of its message: TimeOut."""
    async def script(reader, writer, task, sink):
        await into_data(reader, writer)
        assert await reply(reader) == b""
    assert logged(freed_after(script, tmp_path, settings="TimeOut: 1\n"),
                  "timed out reading message")


def test_cancelled_mid_data(tmp_path):
    """The worker shuts down (the session's task is cancelled) mid-DATA."""
    async def script(reader, writer, task, sink):
        await into_data(reader, writer)
        await asyncio.sleep(0.05)
        task.cancel()
        assert await reply(reader) == b"421"
    freed_after(script, tmp_path)


@pytest.mark.parametrize("settings", ["", "KeepAlives: 5\n"])
def test_message_then_quit(tmp_path, settings):
    """A whole message, relayed in the callbacks or by the task, then QUIT."""
    async def script(reader, writer, task, sink):
        await into_data(reader, writer)
        writer.write(b"the end\r\n.\r\n")
        assert await reply(reader) == b"250"
        writer.write(b"QUIT\r\n")
        assert await reply(reader) == b"221"
    freed_after(script, tmp_path, settings=settings)


@pytest.mark.parametrize("settings", ["", "KeepAlives: 5\n"])
def test_client_gone_between_commands(tmp_path, settings):
    """The client leaves after the envelope, without DATA."""
    async def script(reader, writer, task, sink):
        assert await reply(reader) == b"220"
        for command in ENVELOPE[:3]:
            writer.write(command)
            assert await reply(reader) == b"250"
        writer.close()
    freed_after(script, tmp_path, settings=settings)


def test_idle_timeout(tmp_path):
    """Client and server both idle for TimeOut between commands."""
    async def script(reader, writer, task, sink):
        assert await reply(reader) == b"220"
        writer.write(ENVELOPE[0])
        assert await reply(reader) == b"250"
        assert await reply(reader) == b""
    assert logged(freed_after(script, tmp_path, settings="TimeOut: 1\n"),
                  "network operation timed out")


def test_server_gone_between_commands(tmp_path):
    """The server goes away while a command's reply is due."""
    async def script(reader, writer, task, sink):
        assert await reply(reader) == b"220"
        writer.write(ENVELOPE[0])
        assert await reply(reader) == b"250"
        writer.write(ENVELOPE[1])
        assert await reply(reader) == b"421"
    assert logged(freed_after(script, tmp_path, Sink(close_at=b"MAIL")),
                  "server closed the connection before replying")


def test_cancelled_between_commands(tmp_path):
    """The worker shuts down while the session is idle."""
    async def script(reader, writer, task, sink):
        assert await reply(reader) == b"220"
        writer.write(ENVELOPE[0])
        assert await reply(reader) == b"250"
        task.cancel()
        assert await reply(reader) == b"421"
    freed_after(script, tmp_path)


def test_cancelled_mid_data_in_the_task(tmp_path):
    """Cancelled mid-DATA while the session's task reads the message
    (KeepAlives: not taken in the callbacks)."""
    async def script(reader, writer, task, sink):
        await into_data(reader, writer)
        await asyncio.sleep(0.05)
        task.cancel()
        assert await reply(reader) == b"421"
    freed_after(script, tmp_path, settings="KeepAlives: 5\n")


def test_server_gone_mid_data_in_the_task(tmp_path):
    """The server goes away after 354 while the task sends the message
    (KeepAlives: not taken in the callbacks)."""
    async def script(reader, writer, task, sink):
        await into_data(reader, writer)
        writer.write(b"the end\r\n.\r\n")
        assert await reply(reader) == b"451"
    freed_after(script, tmp_path, Sink(verdict=False), settings="KeepAlives: 5\n")


@pytest.mark.parametrize("noreply", [False, True])
def test_message_through_milters_then_quit(tmp_path, test_milter, noreply):
    """With Milters: the chain, its stages' coroutines and the end of the
    message let go of the session too."""
    milter = test_milter(noreply=noreply)

    async def script(reader, writer, task, sink):
        await into_data(reader, writer)
        writer.write(b"the end\r\n.\r\n")
        assert await reply(reader) == b"250"
        writer.write(b"RSET\r\nQUIT\r\n")
        assert await reply(reader) == b"250"
        assert await reply(reader) == b"221"
    lines = freed_after(script, tmp_path, settings="Milters: %s\n" % milter.spec)
    assert any("status=FILTERED" in line for line in lines), lines
