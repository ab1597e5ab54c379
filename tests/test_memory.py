"""Memory per held session: the in-memory spool has one
budget per worker, beyond which messages go to temp files, so memory is not
bounded by MaxConnections alone; the bytes kept for the Message-ID go at the
end of the header block.  The PSS figures are measured by bench/run.py
(`--only middata`), not here: see bench/README.md."""

from __future__ import annotations

import os

import pytest
from harness import freed_without_collector, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

from proxsmtp.message import spool
from proxsmtp.message.envelope import Envelope
from proxsmtp.message.header import HEAD_LIMIT, message_id
from proxsmtp.message.intake import Intake
from proxsmtp.process import config

KIB = 1024


@pytest.mark.unit
def test_spool_budget_spills_to_a_file_and_is_given_back(tmp_path, monkeypatch):
    monkeypatch.setattr(spool, "MEMORY_BUDGET", 100 * KIB)
    start = spool.in_memory()
    first = spool.Spool(str(tmp_path), in_memory=True)
    first.write(b"a" * (60 * KIB))
    assert first.path is None and spool.in_memory() == start + 60 * KIB
    second = spool.Spool(str(tmp_path), in_memory=True)
    second.write(b"b" * (30 * KIB))
    second.write(b"c" * (30 * KIB))         # 120 KiB in memory would pass the budget
    assert second.path is not None and second.memory is None
    assert os.path.basename(second.path).startswith("proxsmtpd.%d." % os.getpid())
    assert spool.in_memory() == start + 60 * KIB
    second.finish()
    with second.reader() as handle:
        assert handle.read() == b"b" * (30 * KIB) + b"c" * (30 * KIB)
    first.remove()
    assert spool.in_memory() == start
    third = spool.Spool(str(tmp_path), in_memory=True)  # room again
    third.write(b"d" * (90 * KIB))
    assert third.path is None
    for message in (second, third):
        message.remove()
    assert spool.in_memory() == start and os.listdir(tmp_path) == []


@pytest.mark.unit
def test_message_over_the_size_limit_leaves_memory(tmp_path):
    start = spool.in_memory()
    message = spool.Spool(str(tmp_path), in_memory=True)
    message.write(b"x" * spool.MEMORY_LIMIT)
    assert message.path is None
    message.write(b"y")
    assert message.path is not None and spool.in_memory() == start
    message.finish()
    with message.reader() as handle:
        assert len(handle.read()) == spool.MEMORY_LIMIT + 1
    message.remove()
    assert not os.path.exists(message.path)


@pytest.mark.e2e
@pytest.mark.slow
def test_held_messages_beyond_the_worker_budget_go_to_temp_files(proxy, upstream):
    """No filter (so messages would be kept in memory), one worker, more held
    500 KiB messages than its budget holds: the rest are spooled to files in
    TempDirectory while held, and every message is delivered intact."""
    px = proxy({"OutAddress": upstream.address, "Workers": 1, "MaxConnections": 200})
    size = 500 * KIB
    fits = spool.MEMORY_BUDGET // size              # whole messages within the budget
    count = fits + 8
    line = b"y" * 78 + b"\r\n"
    clients = []
    try:
        for number in range(count):
            client = px.connect(timeout=60)
            clients.append(client)
            assert client.cmd("EHLO held.example")[-1].startswith("250")
            assert client.code("MAIL FROM:<a@example.org>") == 250
            assert client.code("RCPT TO:<b@example.org>") == 250
            assert client.code("DATA") == 354
            client.send(b"Subject: held %d\r\n\r\n" % number + line * (size // len(line)))
        files = wait_until(lambda: (lambda names: names if len(names) >= count - fits - 1
                                    else None)(px.spool_files()), 30,
                           what="spool files for the messages beyond the budget")
        assert len(files) <= count - fits + 1, files
        for client in clients:
            client.send(b"the end\r\n.\r\n")
            assert client.reply()[-1].startswith("250")
        messages = upstream.wait_messages(count, timeout=60)
        assert len(messages) == count
        for message in messages:
            assert message.raw.endswith(line + b"the end")
            assert len(message.raw) > size - 100
        wait_until(lambda: px.spool_files() == [], 10, what="temp files removed")
    finally:
        for client in clients:
            client.close()


@settings(max_examples=200, deadline=None)
@given(headers=st.lists(st.sampled_from([b"Subject: s\r\n", b"X-A: b\r\n", b" folded\r\n",
                                         b"Message-ID: <a.b@c>\r\n", b"message-id:<d@e>\n",
                                         b"\r\n", b"\n", b"body line\r\n"]), max_size=12),
       cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
       tail=st.integers(min_value=0, max_value=HEAD_LIMIT + 10))
@pytest.mark.unit
def test_message_id_found_however_the_message_is_cut(headers, cuts, tail):
    """The head kept for the Message-ID is let go at the end of the header
    block (or at HEAD_LIMIT); the Message-ID found is the same as from the
    whole first HEAD_LIMIT bytes, however the bytes arrive."""
    message = b"".join(headers) + b"x" * tail
    intake = Intake(Envelope("T"), None, None, 0, True, False)   # info: the Message-ID is for the log
    points = sorted({min(cut, len(message)) for cut in cuts} | {0, len(message)})
    for start, end in zip(points, points[1:]):
        intake.seen(message[start:end])
        if intake.head is not None:
            assert b"\r\n\r\n" not in bytes(intake.head) and b"\n\n" not in bytes(intake.head)
            assert len(intake.head) < HEAD_LIMIT
    intake.seen_all()
    assert intake.head is None
    assert intake.envelope.msgid == message_id(message[:HEAD_LIMIT])
    assert intake.envelope.size == (len(message) or None)


@pytest.mark.session
def test_a_finished_session_is_freed_without_the_cyclic_collector(tmp_path):
    """A session (its channels, transports, reply queue and spooled message)
    is freed by reference counting the moment it ends: nothing of it waits
    for the cyclic collector, whose runs would otherwise cost every worker
    CPU per message and keep finished sessions' buffers resident."""
    import asyncio
    import socket
    import weakref

    from proxsmtp.session.session import Session

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 sink ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"DATA":
                writer.write(b"354 go on\r\n")
                await reader.readuntil(b"\r\n.\r\n")
                writer.write(b"250 queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                break
            else:
                writer.write(b"250-sink\r\n250 PIPELINING\r\n" if verb == b"EHLO" else b"250 ok\r\n")
        writer.close()

    async def one_session() -> weakref.ref:
        server = await asyncio.start_server(sink, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        cfg = config.parse("OutAddress: 127.0.0.1:%d\nTempDirectory: %s\n" % (port, tmp_path))
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            reader, writer = await asyncio.open_connection(*listener.getsockname())
            conn, _ = listener.accept()
        session = Session(cfg, conn)
        task = asyncio.get_running_loop().create_task(session.run())
        conversation = [(await reader.readline())[:3]]
        for command in (b"EHLO me\r\n", b"MAIL FROM:<a@x.test>\r\n", b"RCPT TO:<b@y.test>\r\n",
                        b"DATA\r\n", b"Subject: t\r\n\r\nhello\r\n.\r\n", b"QUIT\r\n"):
            writer.write(command)
            while (line := await reader.readline())[3:4] == b"-":
                pass
            conversation.append(line[:3])
        await task
        writer.close()
        server.close()
        await server.wait_closed()
        assert conversation == [b"220", b"250", b"250", b"250", b"354", b"250", b"221"]
        ref = weakref.ref(session)
        del session, task
        for _ in range(3):          # the transports' connection_lost callbacks
            await asyncio.sleep(0)
        return ref

    freed_without_collector(one_session)
