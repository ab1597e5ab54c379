"""DATA end to end (RFC 5321 section 4.1.1.4 and 4.5.2; DESCRIPTION in proxsmtpd(8)):
spooling, forwarding, dots, temp files, keepalives."""

from __future__ import annotations

import os
import socket
import time

import pytest

from harness import send_mail, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BODY = b"Subject: test\r\n\r\nhello\r\n"


def test_dot_lines_passed_verbatim(proxy, upstream):
    """Dot-stuffed lines are stored and forwarded as the client sent them."""
    body = (b"Subject: dots\r\n\r\n..leading dot\r\n...two dots\r\n..\r\n"
            b"middle.line\r\n. space\r\n.\tx\r\nend\r\n")
    p = proxy({"OutAddress": upstream.address})
    with p.connect() as client:
        assert send_mail(client, "a@x.test", ["b@y.test"], body)[0].startswith("250")
    message = upstream.wait_messages(1)[0]
    assert message.raw == body.rstrip(b"\r\n")
    assert b"\r\n.leading dot\r\n" in b"\r\n" + message.body


def test_dot_lines_with_smtplib_through_pipe_filter(proxy, upstream):
    """smtplib stuffs dots; `cat` as a filter must keep them so the server sees
    exactly the original message after unstuffing."""
    p = proxy({"OutAddress": upstream.address, "FilterCommand": "cat"})
    text = "Subject: dots\r\n\r\n.hidden\r\n..two\r\n.\r\nlast line\r\n"
    smtp = p.smtp()
    smtp.sendmail("a@x.test", ["b@y.test"], text)
    smtp.quit()
    message = upstream.wait_messages(1)[0]
    assert message.body == text.encode().rstrip(b"\r\n")
    assert "last line" not in upstream.commands()


def test_big_message(proxy, upstream):
    line = b"0123456789" * 7 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * 40000          # about 2.9 MB
    p = proxy({"OutAddress": upstream.address, "FilterCommand": "cat"})
    with p.connect() as client:
        assert send_mail(client, "a@x.test", ["b@y.test"], body)[0].startswith("250")
    message = upstream.wait_messages(1, timeout=60)[0]
    assert message.raw == body.rstrip(b"\r\n")


def test_big_message_pass_through(proxy, upstream):
    body = b"Subject: big\r\n\r\n" + b"..dotted " * 20 + b"\r\n" + b"y" * 70 + b"\r\n" * 1 \
        + (b"z" * 998 + b"\r\n") * 1500                    # 1.5 MB, more than fits in memory
    p = proxy({"OutAddress": upstream.address})
    with p.connect() as client:
        assert send_mail(client, "a@x.test", ["b@y.test"], body)[0].startswith("250")
    assert upstream.wait_messages(1, timeout=60)[0].raw == body.rstrip(b"\r\n")


def test_message_without_final_crlf_before_dot(proxy, upstream):
    p = proxy({"OutAddress": upstream.address})
    with p.connect() as client:
        send_mail(client, "a@x.test", ["b@y.test"], b"Subject: x\r\n\r\nno blank")
    assert upstream.wait_messages(1)[0].raw == b"Subject: x\r\n\r\nno blank"


def test_empty_message(proxy, upstream):
    p = proxy({"OutAddress": upstream.address})
    with p.connect() as client:
        client.cmd("EHLO client.example")
        client.cmd("MAIL FROM:<a@x.test>")
        client.cmd("RCPT TO:<b@y.test>")
        assert client.cmd("DATA")[0].startswith("354")
        client.send(b".\r\n")
        assert client.reply()[0].startswith("250")
    assert upstream.wait_messages(1)[0].raw == b""


def test_proxy_answers_354_itself(proxy, upstream):
    p = proxy({"OutAddress": upstream.address})
    with p.connect() as client:
        client.cmd("EHLO client.example")
        client.cmd("MAIL FROM:<a@x.test>")
        client.cmd("RCPT TO:<b@y.test>")
        assert client.cmd("DATA") == ["354 Start mail input; end with <CRLF>.<CRLF>"]
        # the server hears DATA only once the whole message is spooled
        time.sleep(0.3)
        assert "DATA" not in upstream.verbs()
        client.send(BODY + b".\r\n")
        assert client.reply()[0].startswith("250")
    assert upstream.verbs()[-1] == "DATA"


@pytest.mark.parametrize("filter_command", ["", "cat"])
def test_server_refuses_data(proxy, make_upstream, filter_command):
    """A DATA the server refuses (with or without a filter, the same offer
    steps) is relayed, and logged FILTERED with the server's reply."""
    upstream = make_upstream(replies={"DATA": "451 4.3.0 Try again later"})
    p = proxy({"OutAddress": upstream.address, "FilterCommand": filter_command}, debug=3)
    with p.connect() as client:
        assert send_mail(client, "a@x.test", ["b@y.test"], BODY) == ["451 4.3.0 Try again later"]
        assert client.cmd("NOOP")[0].startswith("250")
    assert upstream.messages == []
    p.wait_log(r'to=b@y\.test, .*relay=.*reply="451 4\.3\.0 Try again later", status=FILTERED$')


def test_final_reply_passed_verbatim(proxy, make_upstream):
    upstream = make_upstream(data_reply="552-5.3.4 Message too big\r\n552 5.3.4 Really too big")
    p = proxy({"OutAddress": upstream.address}, debug=3)
    with p.connect() as client:
        final = send_mail(client, "a@x.test", ["b@y.test"], BODY)
    assert final == ["552-5.3.4 Message too big", "552 5.3.4 Really too big"]
    assert len(upstream.rejected) == 1 and upstream.messages == []


def test_client_disconnects_mid_data(proxy, upstream):
    p = proxy({"OutAddress": upstream.address, "FilterCommand": "cat"})
    client = p.connect()
    client.cmd("EHLO client.example")
    client.cmd("MAIL FROM:<a@x.test>")
    client.cmd("RCPT TO:<b@y.test>")
    assert client.cmd("DATA")[0].startswith("354")
    client.send(b"Subject: partial\r\n\r\n" + b"x" * 100000 + b"\r\nmore\r\n")
    wait_until(lambda: p.spool_files(), what="the spool file")
    client.close()
    upstream.wait_closed("RCPT TO:<b@y.test>")
    wait_until(lambda: not p.spool_files(), what="the spool file to be removed")
    assert upstream.messages == [] and "DATA" not in upstream.verbs()


def test_client_stalls_mid_data_times_out(proxy, upstream):
    p = proxy({"OutAddress": upstream.address, "TimeOut": 2})
    with p.connect() as client:
        client.cmd("EHLO client.example")
        client.cmd("MAIL FROM:<a@x.test>")
        client.cmd("RCPT TO:<b@y.test>")
        client.cmd("DATA")
        client.send(b"Subject: stall\r\n\r\nsome")
        assert client.closed_by_peer(timeout=30)
    upstream.wait_closed("RCPT TO:<b@y.test>")
    wait_until(lambda: not p.spool_files(), what="the spool file to be removed")
    assert upstream.messages == []


def test_temp_file_private_and_removed(proxy, upstream, tmp_path):
    out = tmp_path / "mode"
    p = proxy({"OutAddress": upstream.address, "FilterType": "file",
               "FilterCommand": "stat -c '%%a %%n' \"$EMAIL\" > %s" % out})
    with p.connect() as client:
        assert send_mail(client, "a@x.test", ["b@y.test"], BODY)[0].startswith("250")
    upstream.wait_messages(1)
    mode, path = out.read_text().split()
    assert mode == "600"
    assert os.path.dirname(path) == str(p.spool)
    wait_until(lambda: not os.path.exists(path), what="the temp file to be removed")
    assert p.spool_files() == []


def test_pipe_filter_files_private(proxy, upstream, tmp_path):
    out = tmp_path / "modes"
    p = proxy({"OutAddress": upstream.address,
               "FilterCommand": "stat -c '%%a' \"$TMPDIR\"/* > %s; cat" % out})
    with p.connect() as client:
        assert send_mail(client, "a@x.test", ["b@y.test"], BODY)[0].startswith("250")
    upstream.wait_messages(1)
    modes = out.read_text().split()
    assert len(modes) == 2 and set(modes) == {"600"}     # the message and the filter's output
    wait_until(lambda: not p.spool_files(), what="the temp files to be removed")


def test_temp_directory_missing_gives_451(proxy, upstream, tmp_path):
    # A filter program needs the message in a file (without one, a small
    # message is kept in memory and TempDirectory is not used at all).  A missing
    # one is refused at start (tests/test_config.py): here it goes while running.
    missing = tmp_path / "missing"
    missing.mkdir()
    p = proxy({"OutAddress": upstream.address, "TempDirectory": str(missing),
               "FilterCommand": "cat"}, debug=3)
    missing.rmdir()
    with p.connect() as client:
        client.cmd("EHLO client.example")
        client.cmd("MAIL FROM:<a@x.test>")
        client.cmd("RCPT TO:<b@y.test>")
        assert client.cmd("DATA") == ["451 Local Error"]
    upstream.wait_command("RSET")
    assert upstream.messages == []
    p.wait_log("status=FILTER-ERROR")


def test_keepalives_while_client_is_slow(proxy, upstream):
    p = proxy({"OutAddress": upstream.address, "KeepAlives": 1, "TimeOut": 20})
    with p.connect() as client:
        client.cmd("EHLO client.example")
        client.cmd("MAIL FROM:<a@x.test>")
        client.cmd("RCPT TO:<b@y.test>")
        assert client.cmd("DATA")[0].startswith("354")
        client.send(b"Subject: slow\r\n\r\n")
        for number in range(4):
            time.sleep(0.8)
            client.send(b"line %d\r\n" % number)
        upstream.wait_command("NOOP", timeout=10)
        client.send(b".\r\n")
        assert client.reply()[0].startswith("250")
    message = upstream.wait_messages(1)[0]
    assert message.raw.endswith(b"line 3")
    verbs = upstream.verbs()
    assert verbs.index("NOOP") < verbs.index("DATA")


def test_no_keepalives_by_default(proxy, upstream):
    p = proxy({"OutAddress": upstream.address})
    with p.connect() as client:
        client.cmd("EHLO client.example")
        client.cmd("MAIL FROM:<a@x.test>")
        client.cmd("RCPT TO:<b@y.test>")
        client.cmd("DATA")
        client.send(b"Subject: slow\r\n\r\n")
        time.sleep(2.5)
        client.send(b"end\r\n.\r\n")
        assert client.reply()[0].startswith("250")
    assert "NOOP" not in upstream.verbs()


def test_keepalives_while_filter_is_slow(proxy, upstream):
    p = proxy({"OutAddress": upstream.address, "KeepAlives": 1, "FilterTimeout": 20,
               "FilterCommand": "sleep 3; cat"})
    with p.connect() as client:
        assert send_mail(client, "a@x.test", ["b@y.test"], BODY)[0].startswith("250")
    upstream.wait_messages(1)
    assert "NOOP" in upstream.verbs()


def test_data_through_unix_socket_listener(proxy, upstream, tmp_path):
    path = str(tmp_path / "listen.sock")
    p = proxy({"OutAddress": upstream.address, "Listen": path}, debug=3)
    with p.connect() as client:
        assert send_mail(client, "a@x.test", ["b@y.test"], BODY)[0].startswith("250")
    upstream.wait_messages(1)
    p.wait_log(r"client=UNKNOWN, from=a@x\.test, to=b@y\.test, (?:.*, )?status=FILTERED")


def test_half_closed_client_still_gets_reply(proxy, upstream):
    """A client that sends its whole transaction and shuts down its side still
    has its message delivered and its replies sent."""
    p = proxy({"OutAddress": upstream.address})
    with p.connect() as client:
        client.send(b"EHLO c.example\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
        replies = [client.reply()[-1][:3] for _ in range(4)]
        client.send(BODY + b".\r\nQUIT\r\n")     # DATA ends a group: the rest after 354
        client.sock.shutdown(socket.SHUT_WR)
        while True:
            reply = client.reply()
            if not reply:
                break
            replies.append(reply[-1][:3])
    assert replies == ["250", "250", "250", "354", "250", "221"]
    assert len(upstream.wait_messages(1)) == 1


def test_message_end_split_across_packets(proxy, upstream):
    """The final CRLF.CRLF may arrive a byte at a time."""
    p = proxy({"OutAddress": upstream.address})
    with p.connect() as client:
        client.cmd("EHLO client.example")
        client.cmd("MAIL FROM:<a@x.test>")
        client.cmd("RCPT TO:<b@y.test>")
        assert client.cmd("DATA")[0].startswith("354")
        for piece in (b"Subject: split\r\n\r\n.", b".x\r", b"\n", b".", b"y\r", b"\n",
                      b"end\r", b"\n", b".", b"\r", b"\n"):
            client.send(piece)
            time.sleep(0.05)
        assert client.reply()[0].startswith("250")
    assert upstream.wait_messages(1)[0].raw == b"Subject: split\r\n\r\n..x\r\n.y\r\nend"
