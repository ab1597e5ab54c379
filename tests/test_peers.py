"""Real third-party peers on both sides: swaks, smtplib and Postfix's
smtp-source as clients; Postfix's smtp-sink and aiosmtpd as servers."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from harness import free_port, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def swaks(proxy, *args: str) -> subprocess.CompletedProcess:
    if not shutil.which("swaks"):
        pytest.skip("swaks is not installed")
    return subprocess.run(["swaks", "--server", "%s:%d" % proxy.address, "--timeout", "20",
                           "--helo", "swaks.example", *args],
                          capture_output=True, text=True, timeout=60)


def test_swaks_to_smtp_sink_with_filter_and_header(proxy, sink):
    p = proxy({"OutAddress": sink.address, "Header": "X-Proxied: %i",
               "FilterCommand": "sed 's/secret/[removed]/'"}, debug=3)
    result = swaks(p, "--from", "a@x.test", "--to", "b@y.test", "--header", "Subject: swaks",
                   "--body", "line one\n.dotted line\nthe secret word\n")
    assert result.returncode == 0, result.stdout + result.stderr
    dump = sink.wait_messages(1)[0].decode(errors="replace")
    assert "X-Proxied: 127.0.0.1" in dump
    assert "the [removed] word" in dump and "secret" not in dump
    assert "\n.dotted line\n" in dump           # unstuffed by the sink: the dot survived
    p.wait_log(r"from=a@x\.test, to=b@y\.test, (?:.*, )?status=FILTERED")


def test_swaks_sees_filter_rejection(proxy, sink):
    p = proxy({"OutAddress": sink.address,
               "FilterCommand": "cat >/dev/null; echo 'spam detected' >&2; exit 1"})
    result = swaks(p, "--from", "a@x.test", "--to", "b@y.test")
    assert "550 Content Rejected; spam detected" in result.stdout
    assert result.returncode != 0
    assert sink.messages() == []


def test_smtp_source_many_parallel_sessions(proxy, sink):
    source = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    p = proxy({"OutAddress": sink.address, "FilterCommand": "cat"})
    result = subprocess.run([source, "-m", "40", "-s", "8", "-l", "2000", "-f", "a@x.test",
                             "-t", "b@y.test", "%s:%d" % p.address],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(sink.wait_messages(40, timeout=60)) == 40


def test_smtplib_to_aiosmtpd(proxy):
    aiosmtpd = pytest.importorskip("aiosmtpd.controller")
    received = []

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            received.append(envelope)
            return "250 OK stored"

    port = free_port()
    controller = aiosmtpd.Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        p = proxy({"OutAddress": "127.0.0.1:%d" % port, "Header": "X-Checked: yes"})
        smtp = p.smtp()
        try:
            smtp.ehlo("client.example")
            assert not smtp.has_extn("pipelining") and not smtp.has_extn("starttls")
            refused = smtp.sendmail("a@x.test", ["b@y.test", "c@y.test"],
                                    b"Subject: hi\r\n\r\n.starts with a dot\r\nbye\r\n")
            assert refused == {}
        finally:
            smtp.quit()
        wait_until(lambda: received, what="aiosmtpd to receive the message")
    finally:
        controller.stop()
    envelope = received[0]
    assert envelope.mail_from == "a@x.test"
    assert envelope.rcpt_tos == ["b@y.test", "c@y.test"]
    assert envelope.content == b"Subject: hi\r\nX-Checked: yes\r\n\r\n.starts with a dot\r\nbye\r\n"
