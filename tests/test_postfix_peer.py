"""The throwaway Postfix of tests/postfix.py behaves as the hardened server
the interoperability tests rely on: it insists on EHLO, it takes XCLIENT
from loopback, and it reports each queued message's envelope and content."""

from __future__ import annotations

import smtplib
import socket

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.slow]


def test_queued_message_comes_back_with_envelope_and_content(postfix):
    server = postfix()
    with smtplib.SMTP(server.host, server.port, timeout=20) as client:
        client.ehlo("client.example")
        client.sendmail("a@example.org", ["b@example.net", "c@example.net"],
                        b"Subject: one\r\n\r\nfirst line\r\n")
    [message] = server.messages(1)
    assert message["sender"] == "a@example.org"
    assert sorted(message["recipients"]) == ["b@example.net", "c@example.net"]
    assert b"\nSubject: one\n" in message["content"]
    assert message["content"].endswith(b"\nfirst line\n")


def test_hardened_as_operators_run_it(postfix):
    server = postfix()
    with smtplib.SMTP(server.host, server.port, timeout=20) as client:
        code, text = client.docmd("MAIL", "FROM:<a@example.org>")
        assert (code, text[:5]) == (503, b"5.5.1"), "smtpd_helo_required is off"
    with smtplib.SMTP(server.host, server.port, timeout=20) as client:
        client.ehlo("proxy.example")
        code, _ = client.docmd("XCLIENT", "ADDR=192.0.2.7")
        assert code == 220
        code, _ = client.docmd("MAIL", "FROM:<a@example.org>")
        assert code == 503, "XCLIENT resets the session: EHLO is due again"
    assert server.queued() == []


def test_unauthenticated_pipelining_is_refused(postfix):
    server = postfix()
    with socket.create_connection((server.host, server.port), timeout=20) as sock:
        sock.recv(512)
        sock.sendall(b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\n")
        seen = b""
        while b"554 5.5.0" not in seen:
            data = sock.recv(4096)
            if not data:
                break
            seen += data
    assert b"554 5.5.0" in seen
    server.wait_log("improper command pipelining")
