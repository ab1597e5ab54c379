"""Memory per held session (issue 10, finding 5): the in-memory spool has one
budget per worker, beyond which messages go to temp files, so memory is not
bounded by MaxConnections alone.  The PSS figures are measured by bench/run.py
(`--only middata`), not here: see bench/README.md."""

from __future__ import annotations

import os

from harness import wait_until

from proxsmtp import spool

KIB = 1024


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
