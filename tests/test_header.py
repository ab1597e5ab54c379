"""The Header template (Header in proxsmtpd.conf(5)), as the server receives it."""

from __future__ import annotations

import re

import pytest

from harness import send_mail

pytestmark = pytest.mark.e2e

BODY = b"Subject: test\r\nFrom: a@x.test\r\n\r\nbody line\r\n"


def deliver(proxy, upstream, header: str, body: bytes = BODY, source: str | None = None,
            **settings) -> bytes:
    p = proxy({"OutAddress": upstream.address, "Header": header, **settings})
    with p.connect(source=source) as client:
        assert send_mail(client, "a@x.test", ["b@y.test"], body)[0].startswith("250")
    return upstream.wait_messages(1)[0].raw


def test_header_inserted_before_blank_line(proxy, upstream):
    raw = deliver(proxy, upstream, "X-Filtered: from %i via %l at 100%%", source="127.0.0.9")
    assert raw == (b"Subject: test\r\nFrom: a@x.test\r\n"
                   b"X-Filtered: from 127.0.0.9 via 127.0.0.1 at 100%\r\n\r\nbody line")


def test_received_header_prepended(proxy, upstream):
    raw = deliver(proxy, upstream, "Received: from [%i] by proxsmtpd; %d")
    first, rest = raw.split(b"\r\n", 1)
    assert re.fullmatch(rb"Received: from \[127\.0\.0\.1\] by proxsmtpd; \w{3} \w{3} [ \d]\d "
                        rb"\d\d:\d\d:\d\d \d{4} [+-]\d{4} \(\S+\)", first), first
    assert rest == BODY.rstrip(b"\r\n")


def test_header_escapes(proxy, upstream):
    raw = deliver(proxy, upstream, r"X-One: 1\r\nX-Two:\ttab \\ slash")
    assert b"From: a@x.test\r\nX-One: 1\r\nX-Two:\ttab \\ slash\r\n\r\nbody line" in raw


def test_header_when_message_has_no_body(proxy, upstream):
    raw = deliver(proxy, upstream, "X-Filtered: yes", body=b"Subject: only headers\r\n")
    assert raw == b"Subject: only headers\r\nX-Filtered: yes"


def test_header_added_to_filter_output(proxy, upstream):
    raw = deliver(proxy, upstream, "X-Filtered: yes", FilterCommand="sed 's/body/BODY/'")
    assert raw == b"Subject: test\r\nFrom: a@x.test\r\nX-Filtered: yes\r\n\r\nBODY line"


def test_header_with_dot_lines_in_body(proxy, upstream):
    body = b"Subject: dots\r\n\r\n..x\r\n..\r\nend\r\n"
    raw = deliver(proxy, upstream, "X-Filtered: yes", body=body)
    assert raw == b"Subject: dots\r\nX-Filtered: yes\r\n\r\n..x\r\n..\r\nend"


def test_unknown_symbol_warns_once_at_start_not_per_message(proxy, upstream):
    p = proxy({"OutAddress": upstream.address, "Header": "X-Odd: %q here"}, debug=1)
    for _ in range(3):
        with p.connect() as client:
            assert send_mail(client, "a@x.test", ["b@y.test"], BODY)[0].startswith("250")
    raw = upstream.wait_messages(3)[0].raw
    assert b"X-Odd:  here" in raw and b"%q" not in raw
    assert p.log().count("%q") == 1
    p.wait_log(r"proxsmtpd\.conf, line \d+: Header: unknown symbol %q is left out \(known: "
               r"%i %l %d %t %%\)$")


def test_no_header_by_default(proxy, upstream):
    p = proxy({"OutAddress": upstream.address})
    with p.connect() as client:
        send_mail(client, "a@x.test", ["b@y.test"], BODY)
    assert upstream.wait_messages(1)[0].raw == BODY.rstrip(b"\r\n")
