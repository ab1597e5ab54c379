"""FilterConnections and FilterIdleTime: a worker keeps its filter-node
connections between messages (proxsmtp/filters/nodepool.py, FILTERS in
proxsmtpd(8)).

Against a real Postfix as the node (XCLIENT from loopback, smtpd_helo_required,
smtpd_forbid_unauth_pipelining), RecordingServers that close or fail at the
chosen step, and haproxy over two nodes.  Each test runs one worker, so that
"one connection" means one pool.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import trustme
from harness import RecordingServer, send_mail
from test_haproxy import HAPROXY, Haproxy

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BODY = b"Subject: pooled\r\nFrom: a@example.org\r\n\r\nhello\r\n"


def node_filter(upstream, node, **extra) -> dict:
    return {"OutAddress": upstream.address, "FilterType": "smtp",
            "FilterCommand": node if isinstance(node, str) else node.address,
            "Workers": 1, **extra}


def one_message(p, number: int, source: str | None = None, helo: str = "client.example"):
    with p.connect(source=source) as client:
        reply = send_mail(client, "a@example.org", ["rcpt%d@example.net" % number],
                          BODY + b"message %d\r\n" % number, helo="EHLO " + helo)
        client.cmd("QUIT")
    return reply


def established(port: int) -> int:
    """TCP connections to 127.0.0.1:port established now (ss(8))."""
    result = subprocess.run(["ss", "-Htn", "state", "established", "( dport = :%d )" % port],
                            capture_output=True, text=True, timeout=10, check=True)
    return len(result.stdout.splitlines())


def received(content: bytes) -> str:
    header = content.decode("utf-8", "replace").split("\n\n", 1)[0]
    header = header.replace("\n\t", " ").replace("\n ", " ")
    return next(line for line in header.splitlines() if line.startswith("Received:"))


@pytest.mark.root
def test_postfix_node_takes_messages_of_several_sessions_on_one_connection(proxy, upstream,
                                                                            postfix):
    node = postfix()
    p = proxy(node_filter(upstream, node), debug=4)
    clients = [("127.0.0.%d" % (11 + n), "client%d.example" % n) for n in range(4)]
    for number, (source, helo) in enumerate(clients):
        reply = one_message(p, number, source, helo)
        assert reply[-1].startswith("250"), (reply, p.log())
    upstream.wait_messages(4)
    queued = node.messages(4)
    assert len(queued) == 4
    for message in queued:
        number = int(message["recipients"][0][4])
        source, helo = clients[number]
        assert received(message["content"]).startswith(
            "Received: from %s (unknown [%s])" % (helo, source)), received(message["content"])
    # One TCP connection, in Postfix's log (besides the fixture's probe), in
    # the kernel's table and in the proxy's debug lines.
    log = node.log()
    assert log.count("]: connect from") == 2, log
    assert established(node.port) == 1
    assert p.log().count("opened a connection to the filter node") == 1, p.log()
    assert "improper command pipelining" not in log and "503 5.5.1" not in log, log
    assert p.log().count("reusing a connection to the filter node") == 3, p.log()


@pytest.mark.root
def test_postfix_node_keeps_the_session_of_the_same_client(proxy, upstream, postfix):
    """Two messages of one client, then another's, then the first's again:
    Postfix (hardened: smtpd_helo_required, smtpd_forbid_unauth_pipelining)
    takes the second one on the session XCLIENT set up for the first, MAIL
    without XCLIENT or EHLO, and writes the right client into every
    Received: line."""
    node = postfix()
    p = proxy(node_filter(upstream, node), debug=4)
    clients = [("127.0.0.41", "same.example"), ("127.0.0.41", "same.example"),
               ("127.0.0.42", "other.example"), ("127.0.0.41", "same.example")]
    for number, (source, helo) in enumerate(clients):
        reply = one_message(p, number, source, helo)
        assert reply[-1].startswith("250"), (reply, p.log())
    upstream.wait_messages(4)
    queued = node.messages(4)
    assert len(queued) == 4
    for message in queued:
        source, helo = clients[int(message["recipients"][0][4])]
        assert received(message["content"]).startswith(
            "Received: from %s (unknown [%s])" % (helo, source)), received(message["content"])
    log = node.log()
    assert "improper command pipelining" not in log and "503 5.5.1" not in log, log
    assert established(node.port) == 1
    assert p.log().count("opened a connection to the filter node") == 1, p.log()
    assert p.log().count("XCLIENT ADDR=") == 3, p.log()



def replies_of(sock: socket.socket, count: int) -> list[bytes]:
    """The next `count` replies (their last lines), or fewer when the
    connection closes first."""
    data, last = b"", []
    sock.settimeout(15)
    while len(last) < count:
        got = sock.recv(65536)
        if not got:
            break
        data += got
        *lines, data = data.split(b"\n")
        last += [line for line in lines if line[3:4] != b"-"]
    return last


@pytest.mark.root
def test_postfix_node_refuses_ehlo_pipelined_behind_xclient(postfix):
    """Why the proxy waits for XCLIENT's 220 before EHLO (proxsmtpd(8)
    FILTERS): the hardened Postfix takes a command sent behind XCLIENT as
    one sent before its greeting, 554 and the connection closed; sent
    after the 220, the same EHLO is served."""
    node = postfix()
    for pipelined in (True, False):
        with socket.create_connection((node.host, node.port)) as sock:
            assert replies_of(sock, 1)[0].startswith(b"220")
            sock.sendall(b"EHLO proxy.example\r\n")
            assert replies_of(sock, 1)[0].startswith(b"250 ")
            xclient = b"XCLIENT ADDR=127.0.0.9 HELO=client.example\r\n"
            if pipelined:
                sock.sendall(xclient + b"EHLO client.example\r\n")
                assert replies_of(sock, 2) == [b"554 5.5.0 Error: SMTP protocol synchronization\r"]
            else:
                sock.sendall(xclient)
                assert replies_of(sock, 1)[0].startswith(b"220 ")
                sock.sendall(b"EHLO client.example\r\n")
                assert replies_of(sock, 1)[0].startswith(b"250 ")
                sock.sendall(b"QUIT\r\n")
                assert replies_of(sock, 1)[0].startswith(b"221")
    assert node.wait_log("improper command pipelining after XCLIENT")
    assert node.log().count("improper command pipelining") == 1

@pytest.mark.root
def test_postfix_node_with_starttls_keeps_its_tls_connection(proxy, upstream, postfix):
    """Under ServerTLS may a node that offers STARTTLS costs one handshake,
    not one per message."""
    cert = trustme.CA().issue_cert("postfix.test", "127.0.0.1")
    files = Path(tempfile.mkdtemp(prefix="proxsmtp-pool-tls."))
    try:
        os.chmod(files, 0o755)
        chain, key = files / "cert.pem", files / "key.pem"
        chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(key))
        node = postfix(tls=(chain, key))
        p = proxy(node_filter(upstream, node), debug=4)
        for number in range(3):
            assert one_message(p, number, "127.0.0.%d" % (21 + number))[-1].startswith("250")
        assert len(node.messages(3)) == 3
        assert p.log().count("FILTER TLS: TLS") == 1, p.log()
        assert node.log().count("]: connect from") == 2
        assert established(node.port) == 1
    finally:
        shutil.rmtree(files, ignore_errors=True)


def carried_a_message(node: RecordingServer, conn) -> bool:
    return any(message.conn == conn.number for message in node.messages)


@pytest.mark.parametrize("verb, clients", [("MAIL", 1), ("XCLIENT", 3)])
def test_a_kept_connection_the_node_dropped_gets_a_new_one(proxy, upstream, verb, clients):
    """The node closes the kept connection at its first command (as one
    that timed it out would): MAIL when the session speaks for the same
    client already, XCLIENT for another client.  The message still gets its
    verdict, on a new connection."""
    node = RecordingServer(name="node.test", extensions=("XCLIENT ADDR HELO NAME", "8BITMIME"),
                           replies={verb: lambda line, conn: None if carried_a_message(node, conn)
                                    else "220 node.test" if verb == "XCLIENT" else "250 2.1.0 Ok"})
    try:
        p = proxy(node_filter(upstream, node))
        for number in range(3):
            reply = one_message(p, number, helo="client%d.example" % (number % clients))
            assert reply[-1].startswith("250"), (reply, p.log())
        upstream.wait_messages(3)
        assert len(node.messages) == 3
        assert len(node.connections) == 3
        assert "FILTER-ERROR" not in p.log()
        assert p.log().count("trying a new connection") == 2, p.log()
        assert "RSET" not in node.verbs()
    finally:
        node.stop()


@pytest.mark.parametrize("verb, clients", [("MAIL", 1), ("XCLIENT", 2)])
def test_a_kept_connection_that_says_421_gets_a_new_one(proxy, upstream, verb, clients):
    node = RecordingServer(name="node.test", replies={
        verb: lambda line, conn: "421 4.3.2 going away" if carried_a_message(node, conn)
        else "220 node.test ESMTP" if verb == "XCLIENT" else "250 2.1.0 Ok"},
        extensions=("XCLIENT ADDR HELO NAME", "PIPELINING"))
    try:
        p = proxy(node_filter(upstream, node))
        for number in range(2):
            reply = one_message(p, number, helo="client%d.example" % (number % clients))
            assert reply[-1].startswith("250"), p.log()
        upstream.wait_messages(2)
        assert len(node.messages) == 2 and len(node.connections) == 2
        assert p.log().count("trying a new connection") == 1, p.log()
    finally:
        node.stop()


def test_a_kept_session_for_the_same_client_skips_xclient_and_ehlo(proxy, upstream):
    """The node's 2xx to the final dot ended the transaction: no RSET.  A
    message of the client the kept session speaks for (same address, same
    HELO) goes on with MAIL at once; another client's gets XCLIENT and EHLO
    again, and so does the first client after it."""
    node = RecordingServer(name="node.test",
                           extensions=("XCLIENT ADDR HELO NAME", "PIPELINING", "8BITMIME"))
    try:
        p = proxy(node_filter(upstream, node), debug=4)
        sessions = [("127.0.0.31", "one.example"), ("127.0.0.31", "one.example"),
                    ("127.0.0.32", "one.example"), ("127.0.0.32", "two.example"),
                    ("127.0.0.31", "one.example")]
        for number, (source, helo) in enumerate(sessions):
            reply = one_message(p, number, source, helo)
            assert reply[-1].startswith("250"), (reply, p.log())
        upstream.wait_messages(5)
        assert len(node.connections) == 1 and len(node.messages) == 5
        # the XCLIENT each message was offered under, the latest on the connection
        said = [(len(m.xclient), m.xclient[-1]) for m in node.messages]
        assert said == [(1, "XCLIENT ADDR=127.0.0.31 HELO=one.example"),
                        (1, "XCLIENT ADDR=127.0.0.31 HELO=one.example"),
                        (2, "XCLIENT ADDR=127.0.0.32 HELO=one.example"),
                        (3, "XCLIENT ADDR=127.0.0.32 HELO=two.example"),
                        (4, "XCLIENT ADDR=127.0.0.31 HELO=one.example")], said
        verbs = node.verbs(0)
        assert "RSET" not in verbs
        # the greeting's EHLO, then one after each XCLIENT
        assert verbs.count("EHLO") == 5 and verbs.count("XCLIENT") == 4, verbs
    finally:
        node.stop()


def test_a_node_gone_after_the_dot_is_451_and_no_second_offer(proxy, upstream):
    """On a reused connection the node takes the message and dies before its
    reply: 451, the message is not offered again."""
    def reply(message, conn):
        if b"message 1" in message.raw:
            conn.sock.shutdown(socket.SHUT_RDWR)
            return ""
        return "250 2.0.0 Ok: queued"
    node = RecordingServer(name="node.test", data_reply=reply,
                           extensions=("XCLIENT ADDR HELO NAME", "PIPELINING"))
    try:
        p = proxy(node_filter(upstream, node))
        assert one_message(p, 0)[-1].startswith("250")
        assert one_message(p, 1) == ["451 Local Error"]
        upstream.wait_messages(1)
        time.sleep(0.5)
        assert len(upstream.messages) == 1
        offered = [m for m in node.messages + node.rejected if b"message 1" in m.raw]
        assert len(offered) == 1 and len(node.connections) == 1
        p.wait_log("status=FILTER-ERROR")
        assert one_message(p, 2)[-1].startswith("250")      # a new connection
        assert len(node.connections) == 2
    finally:
        node.stop()


def test_filter_idle_time_closes_a_kept_connection(proxy, upstream):
    node = RecordingServer(name="node.test", extensions=("XCLIENT ADDR HELO NAME",))
    try:
        p = proxy(node_filter(upstream, node, FilterIdleTime=2))
        assert one_message(p, 0)[-1].startswith("250")
        assert not node.connections[0].closed       # kept...
        node.wait_for(lambda: node.connections[0].closed, 10,     # ...for 2 s
                      "the idle connection closed")
        assert node.verbs(0)[-1] == "QUIT"
        assert one_message(p, 1)[-1].startswith("250")
        assert len(node.connections) == 2
    finally:
        node.stop()


def test_a_node_closing_an_idle_connection_takes_it_out_of_the_pool(proxy, upstream):
    node = RecordingServer(name="node.test", idle_timeout=0.5,
                           extensions=("XCLIENT ADDR HELO NAME",))
    try:
        p = proxy(node_filter(upstream, node))
        assert one_message(p, 0)[-1].startswith("250")
        p.wait_log("closed it while idle")
        assert one_message(p, 1)[-1].startswith("250")
        assert "trying a new connection" not in p.log()
        assert "RSET" not in node.verbs()
    finally:
        node.stop()


def test_filter_connections_0_is_a_connection_per_message(proxy, upstream):
    node = RecordingServer(name="node.test", extensions=("XCLIENT ADDR HELO NAME",))
    try:
        p = proxy(node_filter(upstream, node, FilterConnections=0))
        for number in range(3):
            assert one_message(p, number)[-1].startswith("250")
        upstream.wait_messages(3)
        node.wait_for(lambda: node.closed_connections == 3, 10, "3 closed connections")
        assert len(node.connections) == 3
        assert [node.verbs(n)[-1] for n in range(3)] == ["QUIT"] * 3
        assert "RSET" not in node.verbs()
    finally:
        node.stop()


def test_a_burst_keeps_its_connections_then_they_close(proxy, upstream, slow_nodes):
    """FilterConnections 1, three sessions at once at a node that takes half a
    second: three connections.  All three are kept when the burst ends, and
    the next burst right after it uses them again (no new connection, no
    handshake); a second later, with none needed, two are closed (QUIT)."""
    node = slow_nodes[0]
    p = proxy(node_filter(upstream, node, FilterConnections=1))
    for burst in range(2):
        replies = concurrently(p, [3 * burst + n for n in range(3)])
        assert all(reply[-1].startswith("250") for reply in replies), (replies, p.log())
    upstream.wait_messages(6)
    assert len(node.connections) == 3, p.log()
    node.wait_for(lambda: sum(c.closed for c in node.connections) == 2, 10,
                  "two of the three connections closed")
    assert [node.verbs(n)[-1] for n in range(3) if node.connections[n].closed] == ["QUIT"] * 2
    assert one_message(p, 6)[-1].startswith("250")
    assert len(node.connections) == 3


def test_the_worker_stop_says_quit_on_kept_connections(proxy, upstream):
    node = RecordingServer(name="node.test", extensions=("XCLIENT ADDR HELO NAME",))
    try:
        p = proxy(node_filter(upstream, node))
        assert one_message(p, 0)[-1].startswith("250")
        assert not node.connections[0].closed
        p.stop()
        node.wait_for(lambda: node.connections[0].closed, 10, "the kept connection closed")
        assert node.verbs(0)[-1] == "QUIT"
    finally:
        node.stop()


@pytest.fixture
def slow_nodes():
    def slowly(message, conn):
        time.sleep(0.5)
        return "250 2.0.0 Ok: queued"
    started = [RecordingServer(name="node%d.test" % n, data_reply=slowly,
                               extensions=("XCLIENT ADDR HELO NAME", "PIPELINING"))
               for n in (1, 2)]
    yield started
    for node in started:
        node.stop()


@pytest.fixture
def balancer(tmp_path, slow_nodes):
    if not shutil.which(HAPROXY):
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    instance = Haproxy(tmp_path, slow_nodes[0].port, slow_nodes[1].port)
    try:
        instance.wait_status({"out1": "UP", "out2": "UP"})
        yield instance
    finally:
        instance.stop()


def concurrently(p, numbers) -> list[list[str]]:
    replies: dict[int, list[str]] = {}
    threads = [threading.Thread(target=lambda n=n: replies.__setitem__(n, one_message(p, n)))
               for n in numbers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return [replies.get(n, ["no reply"]) for n in numbers]


@pytest.mark.parametrize("kept, together, spread", [
    (0, True, (4, 4)), (2, True, (4, 4)), (2, False, (8, 0))])
def test_haproxy_spreads_messages_of_many_sessions_over_two_nodes(proxy, upstream, slow_nodes,
                                                                 balancer, kept, together,
                                                                 spread):
    """What was observed, 8 messages from 8 client sessions through one
    worker: FilterConnections 0, haproxy picks a node per message (4 and
    4).  With a pool it picks per connection: when the first two sessions
    overlap, the worker opens two connections (one to each node) and the
    messages after them go round both, oldest first (4 and 4); one session
    at a time needs only one connection, and every message goes to its node
    (8 and 0)."""
    node1, node2 = slow_nodes
    p = proxy(node_filter(upstream, "127.0.0.1:%d" % balancer.front, FilterConnections=kept))
    replies = concurrently(p, [0, 1]) if together else [one_message(p, 0), one_message(p, 1)]
    for number in range(2, 8):
        replies.append(one_message(p, number))
    assert all(reply[-1].startswith("250") for reply in replies), (replies, p.log())
    upstream.wait_messages(8)
    assert sorted([len(node1.messages), len(node2.messages)], reverse=True) == list(spread)
    # (haproxy's health checks make connections of their own: only those
    # that carried a message count)
    used = len({m.conn for m in node1.messages}) + len({m.conn for m in node2.messages})
    assert used == (8 if kept == 0 else 2 if together else 1)
