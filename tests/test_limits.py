"""Session limits, end to end on loopback: mail lost on retry
(keepalive during an upload, the wait for the final reply, SIGTERM while
it is due), and a client or server that would exhaust a worker (back-pressure,
a flooding client, endless replies, messages over the size limit)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest

from harness import Client, RawServer, send_mail, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BODY = b"Subject: test\r\n\r\nhello\r\n"

CHUNK = b"X" * 78 + b"\r\n"


def rss_kib(pid: int) -> int:
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for %d" % pid)


def only_worker(px) -> int:
    [pid] = [pid for pid, title in px.children().items() if "worker" in title]
    return pid


# --- 1. KeepAlives by time since the server last heard from us ----------------

def test_keepalive_during_a_steady_upload(proxy, make_upstream):
    """A server that drops a connection idle for 3 s; the client uploads 40 KB
    every 0.4 s for 7 s (never silent for KeepAlives seconds): the NOOPs must
    still go out, and the message must be delivered."""
    upstream = make_upstream(idle_timeout=3)
    p = proxy({"OutAddress": upstream.address, "KeepAlives": 1, "TimeOut": 10})
    piece = CHUNK * (40 * 1024 // len(CHUNK))
    with p.connect() as client:
        client.cmd("EHLO c.test")
        assert client.cmd("MAIL FROM:<a@x.test>")[0][:3] == "250"
        assert client.cmd("RCPT TO:<b@y.test>")[0][:3] == "250"
        assert client.cmd("DATA")[0][:3] == "354"
        client.send(b"Subject: slow\r\n\r\n")
        end = time.monotonic() + 7
        sent = 0
        while time.monotonic() < end:
            client.send(piece)
            sent += len(piece)
            time.sleep(0.4)
        client.send(b".\r\n")
        assert client.reply() == ["250 2.0.0 Ok: queued as TEST"]
    [message] = upstream.wait_messages(1)
    assert len(message.raw) >= sent
    noops = [line for _, line in upstream.lines if line == "NOOP"]
    assert len(noops) >= 4, upstream.lines[:12]


# --- 8. the final reply is worth waiting for -----------------------------------

def slow_final(seconds: float):
    def reply(message, conn):
        time.sleep(seconds)
        return "250 2.0.0 Ok: queued as SLOW"
    return reply


def test_final_reply_waited_for_beyond_timeout(proxy, make_upstream):
    """A server scanning content for 7 s with TimeOut 3: the client gets the
    server's 250, not a 451 that would make it send the message again."""
    upstream = make_upstream(data_reply=slow_final(7))
    p = proxy({"OutAddress": upstream.address, "TimeOut": 3})
    with p.connect(timeout=30) as client:
        reply = send_mail(client, "a@x.test", ["b@y.test"], BODY)
        assert reply == ["250 2.0.0 Ok: queued as SLOW"]
        assert client.code("QUIT") == 221
    assert len(upstream.messages) == 1
    p.wait_log(r'reply="250 2\.0\.0 Ok: queued as SLOW", status=FILTERED')


def test_sigterm_never_cuts_a_session_waiting_for_its_final_reply(proxy, make_upstream):
    """SIGTERM while the server takes longer than the 30 s shutdown grace for
    its final reply: the client still gets that reply, then the proxy exits."""
    upstream = make_upstream(data_reply=slow_final(34))
    p = proxy({"OutAddress": upstream.address, "TimeOut": 5})
    with p.connect(timeout=60) as client:
        client.cmd("EHLO c.test")
        client.cmd("MAIL FROM:<a@x.test>")
        client.cmd("RCPT TO:<b@y.test>")
        assert client.cmd("DATA")[0][:3] == "354"
        client.send(BODY + b".\r\n")
        wait_until(lambda: upstream.lines and upstream.lines[-1][1] == "RCPT TO:<b@y.test>"
                   or any(line == "DATA" for _, line in upstream.lines), 10, what="DATA at server")
        time.sleep(1)
        os.kill(p.proc.pid, signal.SIGTERM)
        assert client.reply() == ["250 2.0.0 Ok: queued as SLOW"]
    assert p.proc.wait(timeout=30) == 0
    assert len(upstream.messages) == 1


# --- 6. endless replies --------------------------------------------------------

def test_endless_ehlo_reply_is_cut(proxy, make_upstream):
    """5000 lines of 250- for EHLO: the proxy stops at its cap, tells the
    client 421 and closes the server connection; the worker keeps serving."""
    endless = "\r\n".join(["250-%s" % ("x" * 60)] * 5000 + ["250 END"])
    bad = make_upstream(replies={"EHLO": endless})
    p = proxy({"OutAddress": bad.address})
    with p.connect() as client:
        reply = client.cmd("EHLO c.test")
        assert reply[-1].startswith("421 4.4.2"), reply[-3:]
        assert len(reply) < 1001
        assert client.closed_by_peer()
    bad.wait_closed("EHLO c.test")      # the proxy gave that server connection up
    assert "reply longer than 1000 lines" in p.log()
    with p.connect() as client:        # the worker is fine
        assert client.code("NOOP") == 250


def test_endless_reply_from_a_filter_node_defers(proxy, upstream, make_upstream):
    endless = "\r\n".join(["250-%s" % ("y" * 60)] * 5000 + ["250 END"])
    node = make_upstream(replies={"EHLO": endless})
    p = proxy({"OutAddress": upstream.address, "FilterType": "smtp",
               "FilterCommand": node.address})
    with p.connect() as client:
        assert send_mail(client, "a@x.test", ["b@y.test"], BODY)[0].startswith("451")
    p.wait_log("filter node: FILTER: reply longer than 1000 lines")
    assert upstream.messages == []


# --- 7. SIZE and MaxMessageSize ----------------------------------------------------

def ehlo_size(client: Client) -> list[str]:
    return [line[4:] for line in client.cmd("EHLO c.test") if line[4:].upper().startswith("SIZE")]


def test_max_message_size_advertised_as_the_smaller_limit(proxy, make_upstream):
    big = make_upstream(extensions=("SIZE 10240000", "8BITMIME"))
    p = proxy({"OutAddress": big.address, "MaxMessageSize": 5000})
    with p.connect() as client:
        assert ehlo_size(client) == ["SIZE 5000"]
    small = make_upstream(extensions=("8BITMIME", "SIZE 3000"))
    p2 = proxy({"OutAddress": small.address, "MaxMessageSize": 5000})
    with p2.connect() as client:
        reply = client.cmd("EHLO c.test")
        assert reply[-2:] == ["250-8BITMIME", "250 SIZE 3000"]
    none = make_upstream(extensions=())
    p3 = proxy({"OutAddress": none.address, "MaxMessageSize": 5000})
    with p3.connect() as client:
        assert client.cmd("EHLO c.test") == ["250-upstream.test", "250 SIZE 5000"]
    p4 = proxy({"OutAddress": big.address})        # no setting: the server's own line
    with p4.connect() as client:
        assert ehlo_size(client) == ["SIZE 10240000"]


def test_size_parameter_above_the_limit_refused_at_mail(proxy, upstream):
    p = proxy({"OutAddress": upstream.address, "MaxMessageSize": 5000})
    with p.connect() as client:
        client.cmd("EHLO c.test")
        assert client.cmd("MAIL FROM:<a@x.test> SIZE=5001") == [
            "552 5.3.4 Message size exceeds fixed maximum message size"]
        assert client.cmd("MAIL FROM:<a@x.test> SIZE=4000")[0].startswith("250")
    assert not any("SIZE=5001" in line for _, line in upstream.lines)


@pytest.mark.parametrize("settings", [
    {"MaxMessageSize": 100000},                       # our own limit, in memory
    {"MaxMessageSize": 100000, "FilterCommand": "cat"},   # ...spooled to a file
    {},                                                # the server's SIZE only
])
def test_message_over_the_limit_is_refused_and_never_sent_on(proxy, make_upstream, settings):
    """A client ignoring SIZE (no SIZE= on MAIL) sends 400 KB: 552 5.3.4, the
    server gets nothing (RSET), the temp file is gone, the session goes on."""
    upstream = make_upstream(extensions=("SIZE 100000", "8BITMIME"))
    p = proxy({"OutAddress": upstream.address, **settings})
    body = b"Subject: big\r\n\r\n" + CHUNK * (400 * 1024 // len(CHUNK))
    with p.connect() as client:
        assert send_mail(client, "a@x.test", ["b@y.test"], body) == [
            "552 5.3.4 Message size exceeds fixed limit"]
        assert send_mail(client, "a@x.test", ["b@y.test"], BODY)[0].startswith("250")
    [message] = upstream.wait_messages(1)
    assert message.raw == BODY.rstrip(b"\r\n") or message.raw.endswith(b"hello")
    assert "RSET" in [line for _, line in upstream.lines]
    p.wait_log(r'reply="552 5\.3\.4 Message size exceeds fixed limit", .*status=REJECTED$')
    wait_until(lambda: not p.spool_files(), 10, what="no temp files")


# --- 3. back-pressure -------------------------------------------------------------

class DeafServer(RawServer):
    """Greets, then never reads again (a server that stopped reading)."""

    def handle(self, conn: socket.socket) -> None:
        conn.sendall(b"220 deaf.test ESMTP\r\n")


def test_backpressure_when_the_server_stops_reading(proxy):
    """NOOPs as fast as the client can send them to a server that reads
    nothing: the proxy stops reading the client instead of buffering."""
    deaf = DeafServer()
    try:
        p = proxy({"OutAddress": "127.0.0.1:%d" % deaf.port, "Workers": 1, "TimeOut": 20})
        worker = only_worker(p)
        before = rss_kib(worker)
        with p.connect() as client:
            client.sock.setblocking(False)
            block = b"NOOP\r\n" * 10000
            sent, end = 0, time.monotonic() + 8
            while sent < 42 * 1024 * 1024 and time.monotonic() < end:
                try:
                    sent += client.sock.send(block)
                except BlockingIOError:
                    time.sleep(0.05)
            time.sleep(0.5)
            grown = rss_kib(worker) - before
            # without back-pressure: about 6 KiB of worker memory per KiB sent
            assert grown < 16 * 1024, "worker grew %d KiB after %d bytes" % (grown, sent)
    finally:
        deaf.stop()


# --- 4. one flooding client must not starve its worker ---------------------------

def test_flooding_client_does_not_starve_its_worker(proxy, upstream):
    """A client pipelines EHLO lines without reading a reply; on the same
    worker, another client's messages still go through at once."""
    p = proxy({"OutAddress": upstream.address, "Workers": 1, "TimeOut": 30})
    stop = threading.Event()
    flooder = socket.create_connection(p.address)
    flooder.setblocking(False)

    def flood() -> None:
        block = b"EHLO flood.test\r\n" * 2000
        while not stop.is_set():
            try:
                flooder.send(block)
            except BlockingIOError:
                time.sleep(0.01)
            except OSError:
                return

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    try:
        time.sleep(1)
        start = time.monotonic()
        with p.connect(timeout=30) as client:
            for n in range(5):
                assert send_mail(client, "a@x.test", ["b@y.test"], BODY)[0].startswith("250")
        took = time.monotonic() - start
        assert took < 15, "5 messages took %.1f s beside the flooder" % took
    finally:
        stop.set()
        thread.join(5)
        flooder.close()
