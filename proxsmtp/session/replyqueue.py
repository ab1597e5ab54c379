"""The command/reply relay: which reply belongs to which command.

Every command line the session passes to the server, and every reply the
proxy makes itself, takes a place in one queue, in the order the client
sent the commands.  Server replies fill the places in turn; a proxy reply
is sent as soon as everything before it has been answered.  So a client
that pipelines gets every reply in order, whoever made it.

"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Callable

from ..net.channel import CRLF, Channel, ChannelClosed
from ..process.log import log
from ..smtp.ends import SessionEnd
from ..smtp.peer import REPLY_MAX_BYTES, REPLY_MAX_LINES, too_long_reply
from ..smtp.replies import R_REPLYTOOLONG


@dataclass(slots=True)
class ServerAnswers:
    """A place for the server's reply to a command the proxy relayed."""

    verb: bytes              # EHLO, MAIL, RCPT, ... (b"" for the greeting)
    line: bytes              # the command as the client sent it
    address: str | None = None   # MAIL's or RCPT's address, parsed once


@dataclass(slots=True)
class ProxyAnswers:
    """A reply the proxy makes itself, sent when its turn comes."""

    reply: bytes


@dataclass(slots=True)
class ProxyCommand:
    """A place for the server's reply to a command of the proxy's own (the
    DATA of a message taken in the relay's callbacks, its final dot, an
    RSET): the reply goes to `on_reply`, never to the client."""

    on_reply: Callable[[list[bytes]], None]


GREETING = ServerAnswers(b"", b"")

# What to send the client for a whole server reply: (the command it answers, its lines).
OnReply = Callable[[ServerAnswers, list[bytes]], list[bytes]]


class ReplyQueue:
    """The places of replies still due to the client, in command order.

    It keeps no reference to the session (its `on_reply` comes with each
    line): a session and all it holds are freed by reference counting the
    moment it ends, not left for the cyclic garbage collector."""

    def __init__(self, client: Channel) -> None:
        self.client = client
        self.places: collections.deque[ServerAnswers | ProxyAnswers | ProxyCommand] = \
            collections.deque()
        self.lines: list[bytes] = []            # the server reply read so far
        self.size = 0                           # ...and its bytes

    def __len__(self) -> int:
        return len(self.places)

    @property
    def waiting_for_server(self) -> bool:
        """Some reply due to the client can only come from the server."""
        return any(not isinstance(place, ProxyAnswers) for place in self.places)

    @property
    def proxy_command_due(self) -> bool:
        """The next server reply answers a command of the proxy's own."""
        return bool(self.places) and isinstance(self.places[0], ProxyCommand)

    def expect(self, place: ServerAnswers | ProxyCommand) -> None:
        """A command went to the server: its reply takes the next place."""
        self.places.append(place)

    def expect_own(self, on_reply: Callable[[list[bytes]], None]) -> None:
        """A command of the proxy's own went to the server: its reply takes
        the next place and goes to `on_reply`, never to the client."""
        self.places.append(ProxyCommand(on_reply))

    def answer(self, reply: bytes) -> None:
        """A reply made by the proxy, kept in order behind outstanding ones."""
        if self.places:
            self.places.append(ProxyAnswers(reply))
            return
        try:
            self.client.write(reply)
        except ChannelClosed:       # as in server_line
            pass

    def server_line(self, line: bytes, too_long: bool, tag: str, on_reply: OnReply) -> None:
        """One line from the server; a whole reply goes to the client in its
        place, as `on_reply` makes it."""
        if too_long:
            log.warning("%s: SMTP response line too long. discarded extra", tag)
            line = line[:-2].rstrip(b"\r\n") + CRLF
        lines = self.lines
        lines.append(line)
        size = self.size = self.size + len(line)
        if len(lines) > REPLY_MAX_LINES or size > REPLY_MAX_BYTES:
            raise SessionEnd(str(too_long_reply("SERVER")), R_REPLYTOOLONG)
        if line[3:4] == b"-" and line[:3].isdigit():     # is_continued(), inline: once per line
            return
        self.lines, self.size = [], 0
        places = self.places
        place = places.popleft() if places else GREETING
        if isinstance(place, ProxyAnswers):      # no reply was due: unsolicited
            places.appendleft(place)
            place = GREETING
        client = self.client
        if isinstance(place, ProxyCommand):
            place.on_reply(lines)
        else:
            lines = on_reply(place, lines)
            try:
                client.write(lines[0] if len(lines) == 1 else b"".join(lines))
            except ChannelClosed:       # the client is gone: the session ends at its next step
                pass                    # (it finds the client's EOF), as after every write here
        try:
            while places and isinstance(places[0], ProxyAnswers):
                client.write(places.popleft().reply)
        except ChannelClosed:           # as above
            pass


