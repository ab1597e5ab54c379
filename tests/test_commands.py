"""The session's command table and the relay's choice of handler, in
process: lines put in a session's client buffer, what reached the server
and what the client heard."""

from __future__ import annotations

import logging
import socket

import pytest

from proxsmtp.net.channel import LINE_LIMIT, ChannelClosed
from proxsmtp.process import config as configuration
from proxsmtp.session import commands
from proxsmtp.session.pump import COMMAND, WAIT
from proxsmtp.session.session import Session
from proxsmtp.smtp import ends
from proxsmtp.smtp.replies import R_BARECR, R_FAILED, R_NOTAUTH, R_NOTSUPP, R_TLSFIRST, R_TOOLONG

pytestmark = pytest.mark.session


class Transport:
    """What a Channel writes to: the bytes, kept."""

    def __init__(self) -> None:
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


@pytest.fixture
def sock():
    with socket.socket() as sock:
        yield sock


def session_with(sock: socket.socket, **settings: object) -> Session:
    session = Session(configuration.Config(**settings), sock)
    session.client.connection_made(Transport())
    session.server.connection_made(Transport())
    session.server_tls_tried = True      # no STARTTLS to the server at the first EHLO
    return session


def relay(session: Session, data: bytes) -> tuple[bytes, bytes]:
    """Feed the client's bytes to relay_lines: (to the server, to the client)."""
    session.client.buf += data
    assert session.relay_lines() is WAIT
    return session.server.transport.written, session.client.transport.written


def test_the_table_is_in_aiosmtpd_shape():
    for verb, handler in commands.HANDLERS.items():
        assert handler.__name__ == "smtp_" + verb.decode() or (verb, handler) == (
            b"HELO", commands.smtp_EHLO)


def test_a_plain_command_is_relayed_and_awaits_its_reply(sock):
    session = session_with(sock)
    assert relay(session, b"NOOP\r\nVRFY x\r\n") == (b"NOOP\r\nVRFY x\r\n", b"")
    assert [place.verb for place in session.replies.places] == [b"NOOP", b"VRFY"]


@pytest.mark.parametrize("line, reply", [
    (b"XCLIENT ADDR=192.0.2.1\r\n", R_NOTAUTH),
    (b"BDAT 10 LAST\r\n", R_NOTSUPP),
    (b"NOOP\rRSET\r\n", R_BARECR),
    (b"NOOP " + b"x" * LINE_LIMIT + b"\r\n", R_TOOLONG),
])
def test_refused_commands_never_reach_the_server(sock, line, reply):
    session = session_with(sock)
    assert relay(session, line) == (b"", reply)


def test_a_command_before_tls_is_refused_and_the_gate_lifts_once_tls_is_there(sock):
    session = session_with(sock, ClientTLS="encrypt")
    assert relay(session, b"EHLO c\r\n") == (b"EHLO c\r\n", b"")
    session.replies.places.clear()      # as if the server had answered
    assert relay(session, b"MAIL FROM:<a@x.test>\r\n") == (b"EHLO c\r\n", R_TLSFIRST)
    assert session.tls_gate
    session.envelope.client_tls = "TLSv1.3"
    relay(session, b"MAIL FROM:<a@x.test>\r\n")
    assert not session.tls_gate
    assert session.server.transport.written.endswith(b"MAIL FROM:<a@x.test>\r\n")


def test_a_command_that_waits_goes_to_the_task(sock):
    session = session_with(sock)
    session.client.buf += b"STARTTLS\r\nNOOP\r\n"
    assert session.relay_lines() is COMMAND
    assert session.deferred is not None and session.client.buf == bytearray(b"NOOP\r\n")
    session.deferred.close()


def test_a_server_gone_on_a_write_ends_as_on_a_read():
    gone = ends.channel_closed(ChannelClosed("SERVER: connection closed, can't write data",
                                             "SERVER"), "SERVER")
    assert (str(gone), gone.level, gone.reply, gone.server_error) == (
        ends.SERVER_GONE, logging.ERROR, R_FAILED, "closed")
    slow = ends.channel_closed(ChannelClosed("SERVER: timed out", "SERVER", True), "SERVER")
    assert (str(slow), slow.server_error) == (ends.SERVER_TIMEOUT, "timeout")
    client = ends.channel_closed(ChannelClosed("CLIENT: gone", "CLIENT"), "SERVER")
    assert (str(client), client.level, client.server_error) == (
        "CLIENT: gone", logging.WARNING, None)
