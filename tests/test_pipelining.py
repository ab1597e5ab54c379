"""PIPELINING (RFC 2920) through the proxy: offered only when the server
offers it, groups forwarded as groups, replies in order (the proxy's own
among them), DATA as the end of a group, and clients out of step."""

from __future__ import annotations

import shutil
import socket
import subprocess

import pytest

from harness import RawServer, send_mail, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BODY = b"Subject: test\r\n\r\nhello\r\n"


class GroupServer(RawServer):
    """A server that, at MAIL, goes on reading WITHOUT replying until DATA
    arrives or nothing more comes for 0.5 s: `groups` then shows what a client
    sent as one group (a lockstep relay would send MAIL alone and wait).
    RCPT of an address in `refuse` gets 550."""

    def __init__(self, refuse: tuple[str, ...] = ()) -> None:
        self.refuse = refuse
        self.groups: list[list[str]] = []
        self.messages: list[bytes] = []
        self.reads: list[bytes] = []        # each recv() as it came
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        buf = bytearray()

        def line(wait: float = 10.0) -> str | None:
            conn.settimeout(wait)
            while b"\r\n" not in buf:
                try:
                    chunk = conn.recv(65536)
                except socket.timeout:
                    return None
                if not chunk:
                    raise EOFError
                self.reads.append(chunk)
                buf.extend(chunk)
            end = buf.index(b"\r\n")
            text = buf[:end].decode()
            del buf[:end + 2]
            return text

        def message() -> None:
            conn.sendall(b"354 go on\r\n")
            raw = []
            while (body := line()) is not None and body != ".":
                raw.append(body)
            self.messages.append("\r\n".join(raw).encode())
            conn.sendall(b"250 2.0.0 Ok: queued as GROUP\r\n")

        accepted = False
        try:
            conn.sendall(b"220 group.test ESMTP\r\n")
            while (text := line()) is not None:
                verb = text.split(" ", 1)[0].upper()
                if verb == "EHLO":
                    conn.sendall(b"250-group.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
                elif verb == "MAIL":
                    group, replies = [text], [b"250 2.1.0 Ok\r\n"]
                    accepted = False
                    while group[-1].upper() != "DATA" and (more := line(0.5)) is not None:
                        group.append(more)
                        if more.upper() != "DATA":
                            refused = more.partition("<")[2].rstrip(">") in self.refuse
                            accepted = accepted or not refused
                            replies.append(b"550 5.1.1 refused\r\n" if refused
                                           else b"250 2.1.5 Ok\r\n")
                    self.groups.append(group)
                    conn.sendall(b"".join(replies))
                    if group[-1].upper() == "DATA":
                        if accepted:
                            message()
                        else:
                            conn.sendall(b"554 5.5.1 no valid recipients\r\n")
                elif verb == "DATA":
                    if accepted:
                        message()
                    else:
                        conn.sendall(b"554 5.5.1 no valid recipients\r\n")
                elif verb == "QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                elif verb == "XCLIENT":
                    conn.sendall(b"220 group.test after XCLIENT\r\n")
                else:
                    conn.sendall(b"250 2.0.0 Ok\r\n")
        except EOFError:
            pass
        finally:
            conn.close()


@pytest.fixture
def group_server():
    server = GroupServer(refuse=("nobody@y.test",))
    yield server
    server.stop()


def replies(client, count: int) -> list[str]:
    return [client.reply()[-1] for _ in range(count)]


def test_pipelining_offered_only_when_the_server_offers_it(proxy, upstream, make_upstream):
    p = proxy({"OutAddress": upstream.address})          # offers PIPELINING
    with p.connect() as client:
        assert "PIPELINING" in [line[4:] for line in client.cmd("EHLO c.test")]
    plain = make_upstream(extensions=("8BITMIME",))
    p2 = proxy({"OutAddress": plain.address})
    with p2.connect() as client:
        assert not any("PIPELINING" in line for line in client.cmd("EHLO c.test"))


def test_group_forwarded_as_a_group(proxy, group_server):
    """MAIL, RCPT, RCPT in one write reach the server before it has answered
    MAIL (a lockstep relay would send MAIL alone and wait).  DATA is the
    proxy's own, once it has the message and the filter's verdict (DESCRIPTION
    in proxsmtpd(8))."""
    p = proxy({"OutAddress": group_server.address})
    with p.connect() as client:
        client.cmd("EHLO c.test")
        client.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n"
                    b"RCPT TO:<c@y.test>\r\nDATA\r\n")
        assert replies(client, 4) == ["250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok",
                                      "354 Start mail input; end with <CRLF>.<CRLF>"]
        client.send(BODY + b".\r\n")
        assert client.reply() == ["250 2.0.0 Ok: queued as GROUP"]
    assert group_server.groups == [["MAIL FROM:<a@x.test>", "RCPT TO:<b@y.test>",
                                    "RCPT TO:<c@y.test>"]]
    assert group_server.messages == [BODY.rstrip(b"\r\n")]


def test_group_leaves_the_proxy_in_one_write_each_way(proxy, group_server):
    """The commands of a group that came in one segment go on to the server in
    one (not one send per line), and the server's replies to them, read in
    one go, go back to the client in one."""
    p = proxy({"OutAddress": group_server.address})
    with p.connect() as client:
        client.cmd("EHLO c.test")
        group = b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>\r\n"
        client.send(group)
        client.sock.settimeout(10)
        first = client.sock.recv(65536)
        assert first == b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n"
    assert group in group_server.reads


def test_replies_in_order_including_the_proxys_own(proxy, upstream):
    """A group mixing relayed commands and ones the proxy answers itself."""
    upstream.refuse.add("nobody@y.test")
    p = proxy({"OutAddress": upstream.address})
    with p.connect() as client:
        client.cmd("EHLO c.test")
        client.send(b"MAIL FROM:<a@x.test>\r\n" b"RCPT TO:<b@y.test>\r\n"
                    b"XCLIENT ADDR=10.6.6.6\r\n" b"RCPT TO:<nobody@y.test>\r\n"
                    b"BDAT 10\r\n" b"NOOP " + b"x" * 5000 + b"\r\n"
                    b"RCPT TO:<c@y.test>\r\n" b"DATA\r\n")
        assert replies(client, 8) == [
            "250 2.1.0 Ok", "250 2.1.5 Ok", "554 Insufficient authorization",
            "550 5.1.1 <nobody@y.test>: Recipient address rejected",
            "502 Command not implemented", "500 Line too long", "250 2.1.5 Ok",
            "354 Start mail input; end with <CRLF>.<CRLF>"]
        client.send(BODY + b".\r\n")
        assert client.reply()[0].startswith("250")
    [message] = upstream.wait_messages(1)
    assert message.recipients == ["b@y.test", "c@y.test"]
    assert "XCLIENT ADDR=10.6.6.6" not in [line for _, line in upstream.lines]


def test_group_with_every_recipient_refused_gets_the_servers_data_answer(proxy, group_server):
    p = proxy({"OutAddress": group_server.address})
    with p.connect() as client:
        client.cmd("EHLO c.test")
        client.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<nobody@y.test>\r\nDATA\r\n")
        assert replies(client, 3) == ["250 2.1.0 Ok", "550 5.1.1 refused",
                                      "554 5.5.1 no valid recipients"]
        assert client.code("QUIT") == 221
    assert group_server.messages == []


@pytest.mark.parametrize("refused", [False, True])
def test_client_out_of_step_after_data(proxy, upstream, refused):
    """Bytes sent behind DATA before its answer: neither taken as commands
    (when DATA is refused) nor as the message: 554 5.5.0 and the session ends."""
    upstream.refuse.add("nobody@y.test")
    p = proxy({"OutAddress": upstream.address})
    rcpt = b"nobody@y.test" if refused else b"b@y.test"
    with p.connect() as client:
        client.cmd("EHLO c.test")
        client.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<" + rcpt + b">\r\nDATA\r\n"
                    b"RSET\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\n"
                    b"DATA\r\nSubject: smuggled\r\n\r\n.\r\n")
        got = replies(client, 3)
        assert got[:2] == ["250 2.1.0 Ok", "550 5.1.1 <nobody@y.test>: Recipient address rejected"
                           if refused else "250 2.1.5 Ok"]
        assert got[2] == "554 5.5.0 Error: SMTP protocol synchronization"
        assert client.closed_by_peer()
    wait_until(lambda: upstream.closed_connections >= 1, 10, what="server connection closed")
    verbs = [line.split(" ")[0].upper() for _, line in upstream.lines]
    assert verbs.count("MAIL") == 1 and "DATA" not in verbs and upstream.messages == []
    p.wait_log("improper pipelining after DATA")


# The relay's callbacks take DATA (Transfer.start) when nothing else is
# waited on, filtered or not; else the session's task does (here KeepAlives
# makes it so): what follows is tried each way.
BOTH_DATA_PATHS = pytest.mark.parametrize(
    "data_path", [{}, {"FilterCommand": "cat"}, {"FilterCommand": "cat", "KeepAlives": 30}],
    ids=["relayed", "filtered", "by-the-task"])


@BOTH_DATA_PATHS
def test_message_sent_along_with_data_is_out_of_step(proxy, upstream, data_path):
    """A lockstep client that sends DATA and its message in one write, not
    waiting for the 354: the same 554 5.5.0, nothing delivered."""
    p = proxy({"OutAddress": upstream.address, **data_path})
    with p.connect() as client:
        client.cmd("EHLO c.test")
        assert client.code("MAIL FROM:<a@x.test>") == 250
        assert client.code("RCPT TO:<b@y.test>") == 250
        client.send(b"DATA\r\n" + BODY + b".\r\n")
        assert client.reply() == ["554 5.5.0 Error: SMTP protocol synchronization"]
        assert client.closed_by_peer()
    wait_until(lambda: upstream.closed_connections >= 1, 10, what="server connection closed")
    assert upstream.messages == [] and "DATA" not in upstream.verbs()


@BOTH_DATA_PATHS
def test_commands_behind_the_dot_wait_for_the_verdict(proxy, upstream, data_path):
    """Commands sent right behind the final dot (Postfix sends its QUIT so,
    a pipelining client its next envelope) wait until the server's verdict on
    the message is relayed; every reply comes in order, and the next message
    is taken as well."""
    p = proxy({"OutAddress": upstream.address, **data_path})
    with p.connect() as client:
        client.cmd("EHLO c.test")
        client.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
        assert replies(client, 3)[2].startswith("354")
        client.send(b"Subject: one\r\n\r\nfirst\r\n.\r\n" b"RSET\r\n" b"MAIL FROM:<c@x.test>\r\n"
                    b"RCPT TO:<d@y.test>\r\n" b"DATA\r\n")
        got = replies(client, 5)
        assert got[0] == "250 2.0.0 Ok: queued as TEST"
        assert [line[:3] for line in got[1:]] == ["250", "250", "250", "354"]
        client.send(b"Subject: two\r\n\r\nsecond\r\n.\r\nQUIT\r\n")
        assert replies(client, 2) == ["250 2.0.0 Ok: queued as TEST", "221 2.0.0 Bye"]
        assert client.closed_by_peer()
    first, second = upstream.wait_messages(2)
    assert (first.sender, first.recipients, first.raw) == ("a@x.test", ["b@y.test"],
                                                          b"Subject: one\r\n\r\nfirst")
    assert (second.sender, second.recipients, second.raw) == ("c@x.test", ["d@y.test"],
                                                             b"Subject: two\r\n\r\nsecond")


def test_swaks_pipeline_through_the_proxy(proxy, upstream, tmp_path):
    if not shutil.which("swaks"):
        pytest.skip("swaks is not installed")
    out = tmp_path / "env"
    p = proxy({"OutAddress": upstream.address,
               "FilterCommand": "echo \"$SENDER $RECIPIENTS\" > %s; cat" % out})
    run = subprocess.run(["swaks", "--pipeline", "--server", p.host, "--port", str(p.port),
                          "--from", "a@x.test", "--to", "b@y.test,c@y.test",
                          "--header", "Subject: pipelined", "--body", "hello"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "<** " not in run.stdout, run.stdout
    [message] = upstream.wait_messages(1)
    assert message.recipients == ["b@y.test", "c@y.test"]
    assert b"Subject: pipelined" in message.raw
    assert out.read_text().split() == ["a@x.test", "b@y.test", "c@y.test"]
    # swaks really pipelined: MAIL, both RCPTs and DATA went out in one write
    assert "~> MAIL FROM:<a@x.test>\n ~> RCPT TO:<b@y.test>" in run.stdout.replace("\r", "") or \
        "-> MAIL FROM:<a@x.test>\n -> RCPT TO:<b@y.test>" in run.stdout.replace("\r", "")


def test_filter_node_gets_a_pipelined_group(proxy, upstream, group_server):
    """FilterType smtp: MAIL, RCPT... and DATA go to a node offering
    PIPELINING in one group."""
    p = proxy({"OutAddress": upstream.address, "FilterType": "smtp",
               "FilterCommand": group_server.address})
    with p.connect() as client:
        assert send_mail(client, "a@x.test", ["b@y.test", "c@y.test"], BODY)[0].startswith("250")
    upstream.wait_messages(1)
    assert group_server.groups == [["MAIL FROM:<a@x.test>", "RCPT TO:<b@y.test>",
                                    "RCPT TO:<c@y.test>", "DATA"]]
