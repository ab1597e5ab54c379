#!/usr/bin/env python3
"""The contract floor: the least a uvloop proxy does to keep proxsmtpd's contract per message.

bench/barerelay.py relays bytes and knows nothing of SMTP.  proxsmtpd (no
filter) must do more for every message (docs/BEHAVIOUR.md: Commands, DATA), and this program
does that and no more, as asyncio Protocol callbacks on uvloop, pre-forked
like barerelay.py (whose legs, connect and process set-up it reuses), so
that bench/run.py can show how much of proxsmtpd's cost the contract
itself imposes on a Python program.

What it does, like proxsmtpd:
- connects to TARGET on accept and relays the server's greeting;
- cuts the client's input into lines: a line over 4096 bytes gets `500 Line
  too long`, a bare CR `500 5.5.2`, STARTTLS and BDAT `502`, XCLIENT `554`
  (none forwarded); every other command is forwarded, those of one read in
  one write;
- relays the server's replies whole (multi-line aware), each in its
  command's place: a client that pipelines gets every reply in order, the
  proxy's own included; the EHLO reply loses STARTTLS, CHUNKING,
  BINARYMIME, CHECKPOINT, XCLIENT and XEXCH50 (a removed last line becomes
  `250 XFILTERED`); a 2xx to RCPT is noted, and forgotten after RSET, HELO,
  EHLO and each message;
- DATA, once every earlier reply is relayed: bytes the client sent after
  DATA before that end the session with 554 5.5.0; without an accepted
  recipient DATA goes to the server, which says why not; otherwise the proxy
  answers 354, keeps the message in memory up to CRLF.CRLF, then sends DATA
  to the server, the message and its dot on the server's 354 (any other
  reply goes to the client, the message dropped), and relays the server's
  final reply: the client hears 2xx only after the server said it.  Commands
  sent after the dot wait until then.

What it leaves out of proxsmtpd's work: what the benchmark's configuration
does not use (filters, TLS, XClient, Header, FilterType reject, PROXY
headers, transparent proxying, skipping authenticated sessions), and what
the contract asks for once per session or message rather than per line, or
what proxsmtpd does beyond it: timeouts (TimeOut, the final reply's 10
minutes), logging (the per-message line, errors), metrics, the process
title, MaxConnections slots, the client's address and the server address
choice (OutAddress), MAIL/RCPT address parsing (for the filter's environment and
the log), SIZE, the Message-ID, spilling large messages to disk, replies
still due after the client closed, and back-pressure on a client that
pipelines without reading.  A server reply over 64 KiB or a 354 to DATA
without recipients ends the session (451); so does an overlong client line
with no CRLF in sight (proxsmtpd discards to the line's end).
"""

from __future__ import annotations

import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import barerelay  # noqa: E402

LINE_LIMIT = 4096           # as proxsmtp/net/channel.py
REPLY_LIMIT = 64 * 1024     # a server reply (all its lines) longer than this ends the session

R_354 = b"354 Start mail input; end with <CRLF>.<CRLF>\r\n"
R_TOOLONG = b"500 Line too long\r\n"
R_BARECR = b"500 5.5.2 Syntax error: bare CR in command\r\n"
R_NOTSUPP = b"502 Command not implemented\r\n"
R_NOTAUTH = b"554 Insufficient authorization\r\n"
R_SYNC = b"554 5.5.0 Error: SMTP protocol synchronization\r\n"
R_FAILED = b"451 Local Error\r\n"
R_FEATURE = b"250 XFILTERED\r\n"
REFUSED = {b"STARTTLS": R_NOTSUPP, b"BDAT": R_NOTSUPP, b"XCLIENT": R_NOTAUTH}
FILTERED = frozenset((b"STARTTLS", b"CHUNKING", b"BINARYMIME", b"CHECKPOINT", b"XCLIENT",
                      b"XEXCH50"))

# A place in the reply queue: an int is a server reply due to a command of
# that kind; bytes, a reply of the proxy's own sent when its turn comes;
# DATA_TURN, the client's DATA (nothing follows it in the queue).
OTHER, EHLO, RCPT, RESET, LONE_DATA = range(5)
KINDS = {b"EHLO": EHLO, b"RCPT": RCPT, b"RSET": RESET, b"HELO": RESET}
DATA_TURN = None

# Where the client's session is.
COMMANDS, DATA_WAIT, BODY, SERVER_354, FINAL, CLOSED = range(6)


class ServerSide(barerelay.Leg):
    """The server connection: its bytes go to the client side's `server_data`."""

    def data_received(self, data: bytes) -> None:
        if self.other is None:
            self.pending.append(data)
        else:
            self.other.server_data(data)        # type: ignore[attr-defined]

    def joined(self, other: barerelay.Leg) -> None:
        self.other = other          # what came before is taken by the client side's joined()


class ClientSide(barerelay.ClientLeg):
    """The accepted connection, and the session's whole state."""

    server_leg = ServerSide

    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__(target)
        self.state = COMMANDS
        self.inbuf = b""            # client bytes not yet taken as commands
        self.rbuf = b""             # the server's reply so far
        self.places: collections.deque = collections.deque([OTHER])    # the greeting
        self.rcpt = False           # a recipient was accepted
        self.body = bytearray()
        self.message: bytes | memoryview = b""
        self.out: list[bytes] = []  # to the client, written at the end of the callback
        self.sout: list[bytes] = []  # to the server, likewise

    def joined(self, other: barerelay.Leg) -> None:
        self.other = other
        if other.pending:
            data, other.pending = b"".join(other.pending), []
            self.server_data(data)
        elif self.inbuf:
            self.commands()
            self.flush()

    def data_received(self, data: bytes) -> None:
        if self.state == BODY:
            self.take_body(data)
        elif self.state != CLOSED:
            self.inbuf += data
            if self.state == COMMANDS and self.other is not None:
                self.commands()
        self.flush()

    def flush(self) -> None:
        if self.out:
            self.transport.write(b"".join(self.out))      # type: ignore[union-attr]
            self.out.clear()
        if self.sout:
            self.other.transport.write(b"".join(self.sout))  # type: ignore[union-attr]
            self.sout.clear()

    def close_both(self, last_word: bytes) -> None:
        self.out.append(last_word)
        self.flush()
        self.state = CLOSED
        self.transport.close()          # type: ignore[union-attr]
        self.other.transport.close()    # type: ignore[union-attr]

    def answer(self, reply: bytes) -> None:
        """A reply of the proxy's own: now, or after the replies still due."""
        if self.places:
            self.places.append(reply)
        else:
            self.out.append(reply)

    def commands(self) -> None:
        """Take the client's whole lines as commands, up to DATA."""
        buf, start, places = self.inbuf, 0, self.places
        while True:
            end = buf.find(b"\n", start) + 1
            if not end:
                break
            line, start = buf[start:end], end
            if len(line) > LINE_LIMIT:
                self.answer(R_TOOLONG)
                continue
            cr = line.find(b"\r")
            if cr >= 0 and cr != len(line) - 2:
                self.answer(R_BARECR)
                continue
            words = line.split(None, 1)
            verb = words[0].upper() if words else b""
            if verb == b"DATA":
                self.inbuf, self.state = buf[start:], DATA_WAIT
                if places:
                    places.append(DATA_TURN)
                else:
                    self.data_turn()
                return
            refusal = REFUSED.get(verb)
            if refusal is not None:
                self.answer(refusal)
                continue
            self.sout.append(line)
            places.append(KINDS.get(verb, OTHER))
        self.inbuf = buf[start:]
        if len(self.inbuf) > LINE_LIMIT:
            self.close_both(R_TOOLONG)

    def data_turn(self) -> None:
        """Every reply before DATA's is relayed: answer DATA."""
        if self.inbuf:
            self.close_both(R_SYNC)
        elif self.rcpt:
            self.out.append(R_354)
            self.state, self.body = BODY, bytearray(b"\r\n")    # CRLF: the DATA line's
        else:
            self.sout.append(b"DATA\r\n")
            self.places.append(LONE_DATA)
            self.state = COMMANDS

    def take_body(self, data: bytes) -> None:
        """The message, kept in memory until CRLF.CRLF; then DATA to the server."""
        body = self.body
        scan = len(body) - 4
        body += data
        end = body.find(b"\r\n.\r\n", scan if scan > 0 else 0)
        if end < 0:
            return
        end += 5
        self.message, self.inbuf = memoryview(body)[2:end], bytes(body[end:])
        self.body = bytearray()
        self.state = SERVER_354
        self.sout.append(b"DATA\r\n")

    def server_data(self, data: bytes) -> None:
        """Cut the server's bytes into whole replies, each to its place."""
        buf = self.rbuf + data if self.rbuf else data
        start = first = 0
        while True:
            end = buf.find(b"\n", start) + 1
            if not end:
                break
            if buf[start + 3:start + 4] == b"-":
                start = end
                continue
            self.reply(buf[first:end])
            first = start = end
            if self.state == CLOSED:
                return
        self.rbuf = buf[first:]
        if len(self.rbuf) > REPLY_LIMIT:
            self.close_both(R_FAILED)
            return
        if self.state == COMMANDS and self.inbuf:
            self.commands()
        self.flush()

    def reply(self, reply: bytes) -> None:
        state = self.state
        if state == SERVER_354:
            if reply[:3] == b"354":
                self.sout.append(self.message)
                self.state = FINAL
            else:
                self.out.append(reply)
                self.state = COMMANDS
            self.message = b""
            return
        if state == FINAL:
            self.out.append(reply)
            self.state, self.rcpt = COMMANDS, False
            return
        places = self.places
        kind = places.popleft() if places else OTHER        # unasked (421): relayed
        if reply[:1] == b"2":
            if kind == EHLO:
                reply, self.rcpt = filter_ehlo(reply), False
            elif kind == RCPT:
                self.rcpt = True
            elif kind == RESET:
                self.rcpt = False
        elif kind == LONE_DATA and reply[:3] == b"354":
            self.close_both(R_FAILED)
            return
        self.out.append(reply)
        while places and type(places[0]) is not int:      # the proxy's own, and DATA
            place = places.popleft()
            if place is DATA_TURN:
                self.data_turn()
            else:
                self.out.append(place)


def filter_ehlo(reply: bytes) -> bytes:
    """The EHLO reply without the extensions the proxy does not pass."""
    lines = reply.splitlines(keepends=True)
    kept = lines[:1]
    for line in lines[1:]:
        words = line[4:].split(None, 1)
        if words and words[0].upper() in FILTERED:
            if line is lines[-1]:
                kept.append(R_FEATURE)
            continue
        kept.append(line)
    return b"".join(kept)


if __name__ == "__main__":
    barerelay.main(ClientSide, __doc__)
