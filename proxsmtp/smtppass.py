"""One SMTP session relayed between a client and the real server.

This is upstream's smtp_passthru: lines from whichever side is ready are
relayed, with the exceptions in SPEC §3, and DATA is taken over by the
proxy (§5), which spools the message, asks the filter (filters.py) and only
then offers the message to the server.

Replies are matched to commands through a queue, so a client that pipelines
anyway still gets its replies in order, including ones the proxy makes itself.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import re
import socket
import time

from . import destination, filters, spool
from .config import Config
from .header import render as render_header
from .log import clean, log
from .spio import Channel, ChannelClosed, is_continued, wait_any

CRLF = b"\r\n"
R_TOOLONG = b"500 Line too long\r\n"
R_DATAINTERMED = b"354 Start mail input; end with <CRLF>.<CRLF>\r\n"
R_FAILED = b"451 Local Error\r\n"
R_NOTSUPP = b"502 Command not implemented\r\n"
R_NOTAUTH = b"554 Insufficient authorization\r\n"
R_FEATURE = b"250 XFILTERED\r\n"
R_CANTCONNECT = b"421 Local Error, cannot connect to server\r\n"
R_SERVERGONE = b"421 Local Error, server closed the connection\r\n"
R_BARECR = b"500 5.5.2 Syntax error: bare CR in command\r\n"

FILTERED_FEATURES = {b"PIPELINING", b"STARTTLS", b"CHUNKING", b"BINARYMIME",
                     b"CHECKPOINT", b"XCLIENT", b"XEXCH50"}

_MAIL = re.compile(rb"^\s*MAIL\s+FROM\s*:(.*)$", re.I | re.S)
_RCPT = re.compile(rb"^\s*RCPT\s+TO\s*:(.*)$", re.I | re.S)

_ids = itertools.count(0x100000)


def next_id() -> str:
    """A short id for log lines; `set_id_source()` makes it unique across workers."""
    return "%06X" % (next(_ids) & 0xFFFFFF)


def set_id_source(counter) -> None:
    """Use another counter (an iterator of ints) for session ids."""
    global _ids
    _ids = counter


class SessionEnd(Exception):
    """Ends the session; `reply` (if any) is the last thing the client hears."""

    def __init__(self, reason: str, reply: bytes | None = R_FAILED, level: int = logging.ERROR):
        super().__init__(reason)
        self.reply = reply
        self.level = level


def parse_address(arg: bytes) -> str:
    """The address of a MAIL FROM/RCPT TO argument, without angle brackets."""
    text = arg.decode("utf-8", "surrogateescape").strip()
    if text.startswith("<>"):
        return "<>"
    if text.startswith("<"):
        end = text.find(">")
        if end > 0:
            return text[1:end]
    return text.split()[0] if text.split() else ""


def parse_xforward(line: bytes) -> dict[str, str]:
    """ATTR=value pairs of an XFORWARD command (xtext decoded, [brackets] removed)."""
    attrs = {}
    for word in line.decode("utf-8", "surrogateescape").split()[1:]:
        name, eq, value = word.partition("=")
        if not eq:
            continue
        value = re.sub(r"\+([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), value)
        if value.startswith("[") and value.endswith("]"):
            value = value[1:-1]
        attrs[name.upper()] = value
    return attrs


def verb_of(line: bytes) -> bytes:
    words = line.split(None, 1)
    return words[0].upper() if words else b""


class Session:
    """State of one client connection; `run()` serves it to the end."""

    def __init__(self, config: Config, sock: socket.socket) -> None:
        self.config = config
        self.sock = sock
        self.tag = next_id()
        self.client_ip = "UNKNOWN"
        self.local_ip = "UNKNOWN"
        self.server_ip = "UNKNOWN"
        self.client = Channel("CLIENT", self.tag, keep_open_on_eof=True)
        self.server = Channel("SERVER", self.tag)
        self.pending: collections.deque = collections.deque()
        self.reply_lines: list[bytes] = []
        self.helo: str | None = None
        self.authenticated = False
        self.auth_started = False
        self.xclient_supported = False
        self.xclient_sent = False
        self.in_data = False
        self.reset()

    # --- the message (transaction) state ------------------------------------

    def reset(self) -> None:
        """Forget sender, recipients and XFORWARD data (RSET, EHLO, after DATA)."""
        self.sender: str | None = None
        self.recipients: list[str] = []
        self.xforward_addr: str | None = None
        self.xforward_helo: str | None = None
        self.logline = ["client=" + self.client_ip]

    def note(self, key: str, value: str) -> None:
        self.logline.append("%s=%s" % (key, clean(value, 256)))

    def log_message(self, status: str) -> None:
        """The one info line per message: client, from, to..., status."""
        self.note("status", status)
        log.info("%s: %s", self.tag, ", ".join(self.logline))

    @property
    def message_in_memory(self) -> bool:
        """Only filter programs need the message in a file."""
        return not self.config.FilterCommand or self.config.FilterType == "smtp"

    @property
    def idle(self) -> bool:
        """Between messages with nothing outstanding: safe to close at shutdown."""
        return not self.in_data and self.sender is None and not self.pending

    @property
    def timeout(self) -> float:
        return float(self.config.TimeOut)

    @property
    def skipping(self) -> bool:
        if self.authenticated and self.config.skip_authenticated:
            log.debug("%s: skipping processing because client is authenticated", self.tag)
            return True
        return False

    # --- life cycle -----------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection; never raises (but for cancellation)."""
        loop = asyncio.get_running_loop()
        try:
            self.client_ip, self.local_ip = destination.client_addresses(self.sock, self.config)
            self.reset()
            await loop.connect_accepted_socket(lambda: self.client, self.sock)
        except OSError as exc:
            log.error("%s: couldn't set up the client connection: %s", self.tag, exc)
            self.sock.close()
            return
        log.info("%s: accepted connection from: %s", self.tag, self.client_ip)
        try:
            await self.connect()
            await self.passthru()
        except SessionEnd as end:
            log.log(end.level, "%s: %s", self.tag, end)
            self._last_word(end.reply)
        except ChannelClosed as exc:
            log.warning("%s: %s", self.tag, exc)
            self._last_word(R_FAILED)
        except asyncio.CancelledError:
            self._last_word(b"421 Server shutting down\r\n")
            raise
        except Exception as exc:   # a bug must cost one session, not the worker
            log.error("%s: local error: %s", self.tag, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            self._last_word(R_FAILED)
        finally:
            self.client.close()
            self.server.close()
            log.debug("%s: connection closed", self.tag)

    def _last_word(self, reply: bytes | None) -> None:
        if reply and not self.client.closed:
            try:
                self.client.write(reply)
            except ChannelClosed:
                pass

    async def connect(self) -> None:
        """Open the server connection (SPEC §4), or tell the client 421."""
        try:
            sock, self.server_ip = await destination.connect(self, self.sock)
        except destination.DestinationError as exc:
            raise SessionEnd(str(exc), R_CANTCONNECT) from None
        await asyncio.get_running_loop().create_connection(lambda: self.server, sock=sock)
        log.debug("%s: SERVER connected to: %s", self.tag, self.server_ip)
        self.pending.append(b"")          # the greeting answers no command

    async def passthru(self) -> None:
        """Relay until either side closes or both are idle for TimeOut."""
        client, server = self.client, self.server
        while True:
            got = server.take_line()
            if got is not None:
                self.on_server_line(*got)
                continue
            if server.eof:
                rest = server.rest()
                if rest.strip() and not client.closed:
                    client.write(rest.rstrip(b"\r\n") + CRLF)
                elif self.waiting_for_server():     # the client must not wait forever
                    raise SessionEnd("server closed the connection before replying",
                                     R_SERVERGONE, logging.WARNING)
                log.debug("%s: server closed the connection", self.tag)
                return
            got = client.take_line()
            if got is not None:
                await self.on_client_line(*got)
                continue
            if client.eof and not self.waiting_for_server():
                log.debug("%s: client closed the connection", self.tag)
                return
            reason = "network operation timed out"
            try:
                await wait_any((client, server), self.client_wait(reason))
            except asyncio.TimeoutError:
                self.client_wait(reason)        # says so if a line was left unfinished
                raise SessionEnd(reason, None) from None

    def waiting_for_server(self) -> bool:
        return any(isinstance(entry, bytes) for entry in self.pending)

    # --- client commands ------------------------------------------------------

    def answer(self, reply: bytes) -> None:
        """A reply made by the proxy, kept in order behind outstanding ones."""
        if self.pending:
            self.pending.append(bytearray(reply))
        else:
            self.client.write(reply)

    async def on_client_line(self, line: bytes, too_long: bool) -> None:
        if too_long:
            self.answer(R_TOOLONG)
            return
        if b"\r" in line[:-1].removesuffix(b"\r"):    # a server may split the line there
            log.warning("%s: bare CR in a command from the client: %s", self.tag, clean(line[:80]))
            self.answer(R_BARECR)
            return
        if self.xclient_supported and not self.xclient_sent and self.config.XClient:
            await self.send_xclient()
        verb = verb_of(line)
        kind = verb
        if verb == b"DATA":
            self.in_data = True
            try:
                await self.drain_replies()
                await self.data()
            finally:
                self.in_data = False
            self.reset()
            return
        if verb in (b"EHLO", b"HELO"):
            words = line.split()
            self.helo = words[1].decode("utf-8", "surrogateescape") if len(words) > 1 else ""
            if verb == b"HELO":
                log.debug("%s: XCLIENT support assumed", self.tag)
                self.xclient_supported = True
        elif verb in (b"STARTTLS", b"BDAT"):
            log.debug("%s: ESMTP feature not supported", self.tag)
            self.answer(R_NOTSUPP)
            return
        elif verb == b"XCLIENT":
            log.warning("%s: client attempted use of privileged XCLIENT feature", self.tag)
            self.answer(R_NOTAUTH)
            return
        elif verb == b"AUTH":
            self.auth_started = True
        elif _MAIL.match(line) or _RCPT.match(line):
            kind = b"MAIL" if _MAIL.match(line) else b"RCPT"
            if self.config.FilterType == "reject" and not self.skipping:
                reply = filters.reject_reply(self.config.FilterReject)
                self.note("from" if kind == b"MAIL" else "to", parse_address(
                    (_MAIL.match(line) or _RCPT.match(line)).group(1)))
                self.log_message("REJECTED")
                self.reset()
                self.answer(reply.encode("utf-8", "surrogateescape") + CRLF)
                return
        self.server.write(line)
        self.pending.append(kind + b" " + line)

    async def send_xclient(self) -> None:
        """XClient: tell the server who the client really is, once."""
        await self.drain_replies()
        self.xclient_sent = True
        ip = self.client_ip
        log.debug("%s: sending XCLIENT", self.tag)
        self.server.write(b"XCLIENT ADDR=%s%s\r\n" % (b"IPv6:" if ":" in ip else b"", ip.encode()))
        reply = await self.read_reply()
        if not reply[-1][:1] == b"2":
            log.warning("%s: server didn't accept XCLIENT", self.tag)

    # --- server replies -------------------------------------------------------

    def on_server_line(self, line: bytes, too_long: bool) -> None:
        if too_long:
            log.warning("%s: SMTP response line too long. discarded extra", self.tag)
            line = line[:-2].rstrip(b"\r\n") + CRLF
        self.reply_lines.append(line)
        if is_continued(line):
            return
        lines, self.reply_lines = self.reply_lines, []
        entry = self.pending.popleft() if self.pending else b""
        if isinstance(entry, bytearray):            # a proxy reply can't be due here
            self.pending.appendleft(entry)
            entry = b""
        if lines[-1][:1] == b"2":
            lines = self.on_success(entry, lines)
        if not self.client.closed:
            self.client.write(b"".join(lines))
        while self.pending and isinstance(self.pending[0], bytearray):
            self.client.write(bytes(self.pending.popleft()))

    def on_success(self, entry: bytes, lines: list[bytes]) -> list[bytes]:
        """State changes for a 2xx reply to the command `entry` (kind + line)."""
        kind, _, command = entry.partition(b" ")
        if kind in (b"EHLO", b"HELO"):
            self.reset()
            if kind == b"EHLO":
                return self.filter_features(lines)
        # A lax server may accept `MAIL TO:` or a bare `RCPT`: nothing to record.
        elif kind == b"MAIL" and (match := _MAIL.match(command)):
            self.sender = parse_address(match.group(1))
            self.note("from", self.sender)
        elif kind == b"RCPT" and (match := _RCPT.match(command)):
            recipient = parse_address(match.group(1))
            self.recipients.append(recipient)
            self.note("to", recipient)
        elif kind == b"XFORWARD":
            attrs = parse_xforward(command)
            self.xforward_addr = attrs.get("ADDR", self.xforward_addr)
            self.xforward_helo = attrs.get("HELO", self.xforward_helo)
        elif kind == b"RSET":
            self.reset()
        elif lines[-1][:3] == b"235":
            if self.auth_started:
                log.debug("%s: client authenticated successfully", self.tag)
                self.authenticated = True
            else:
                log.warning("%s: authentication success code without AUTH", self.tag)
        return lines

    def filter_features(self, lines: list[bytes]) -> list[bytes]:
        """Drop EHLO keywords we can't pass through; keep the reply well formed."""
        kept = lines[:1]
        for line in lines[1:]:
            keyword = line[4:].split(None, 1)[0].upper() if line[4:].split() else b""
            if keyword == b"XCLIENT":
                log.debug("%s: XCLIENT supported", self.tag)
                self.xclient_supported = True
            if keyword in FILTERED_FEATURES:
                log.debug("%s: filtered ESMTP feature: %s", self.tag, clean(line.strip()))
                if line is lines[-1]:
                    kept.append(R_FEATURE)
                continue
            kept.append(line)
        return kept

    # --- sequential reads, for the proxy's own commands -----------------------

    async def read_reply(self) -> list[bytes]:
        """One whole (multi-line) reply from the server."""
        try:
            return await self.server.read_reply(self.timeout)
        except ChannelClosed:
            raise SessionEnd("server disconnected unexpectedly") from None
        except asyncio.TimeoutError:
            raise SessionEnd("network operation timed out waiting for server") from None

    async def drain_replies(self) -> None:
        """Relay every reply still due, so the proxy may speak to the server."""
        while self.waiting_for_server():
            for line in await self.read_reply():
                self.on_server_line(line, False)

    async def keepalive(self) -> None:
        """KeepAlives: NOOP to a server left idle while the client or filter works."""
        every = self.config.KeepAlives
        if every > 0 and time.monotonic() - self.server.last_action > every and not self.server.closed:
            log.debug("%s: sending NOOP to server as keepalive", self.tag)
            self.server.write(b"NOOP\r\n")
            await self.read_reply()

    # --- DATA -------------------------------------------------------------------

    async def data(self) -> None:
        """The DATA command: skip, reject, or spool, filter and forward."""
        if self.skipping:
            await self.pass_data()
            self.log_message("SKIPPED")
            return
        if self.config.FilterType == "reject":
            reply = filters.reject_reply(self.config.FilterReject)
            self.client.write(reply.encode("utf-8", "surrogateescape") + CRLF)
            self.log_message("REJECTED")
            return
        if not self.recipients:
            await self.refused_data()
            return
        try:
            message = spool.Spool(self.config.TempDirectory, in_memory=self.message_in_memory)
        except OSError as exc:
            log.error("%s: couldn't open cache file in %s: %s", self.tag,
                      self.config.TempDirectory, exc.strerror)
            await self.fail_data(R_FAILED.decode().strip())
            self.log_message("FILTER-ERROR")
            return
        try:
            await self.handle_message(message)
        finally:
            message.remove()

    async def handle_message(self, message: spool.Spool) -> None:
        self.client.write(R_DATAINTERMED)
        error = await self.cache_data(message)
        if error:
            log.error("%s: %s", self.tag, error)
            await self.fail_data(R_FAILED.decode().strip())
            self.log_message("FILTER-ERROR")
            return
        try:
            verdict = await filters.check(self, message)
        except filters.FilterError as exc:
            log.error("%s: %s", self.tag, exc)
            await self.fail_data(R_FAILED.decode().strip())
            self.log_message("FILTER-ERROR")
            return
        if verdict.accept:
            await self.done_data(message, verdict.path)
            self.log_message("FILTERED")
        else:
            await self.fail_data(verdict.reply)
            self.log_message(verdict.status)

    async def cache_data(self, message: spool.Spool) -> str:
        """Read the client's message into the spool; returns an error or ''.

        On a disk error the rest of the message is still read (and dropped)
        so that the client can be told 451 in step with the protocol.
        """
        client = self.client
        client.start_data()
        error = ""
        while True:
            data, done = client.take_data()
            if data and not error:
                try:
                    message.write(data)
                except OSError as exc:
                    error = "couldn't write to cache file: %s" % exc.strerror
            if done:
                break
            if client.eof:
                raise SessionEnd("unexpected end of data from client", None)
            await self.wait_client_data()
        try:
            message.finish()
        except OSError as exc:
            error = error or "couldn't write to cache file: %s" % exc.strerror
        log.debug("%s: wrote %d bytes to cache", self.tag, message.size)
        return error

    async def wait_client_data(self) -> None:
        """Wait for more of the message, keeping the server alive meanwhile.

        Returns after each keepalive too: data that arrives while the NOOP's
        reply is awaited wakes no one, so the caller must look at the buffer.
        """
        every = self.config.KeepAlives
        step = min(self.timeout, every) if every > 0 else self.timeout
        reason = "network operation timed out reading message"
        try:
            await self.client.wait(min(step, self.client_wait(reason)))
        except asyncio.TimeoutError:
            if time.monotonic() >= self.client.last_action + self.timeout:
                raise SessionEnd(reason, None) from None
            self.client_wait(reason)
            await self.keepalive()

    def client_wait(self, reason: str) -> float:
        """How long to wait for the client: TimeOut, but a line it has begun must
        be finished TimeOut after its first byte (a slow-loris trickle of bytes
        does not start the clock again); raises SessionEnd once that is past."""
        started = self.client.line_started
        if started is None:
            return self.timeout
        left = started + self.timeout - time.monotonic()
        if left <= 0:
            raise SessionEnd(reason + " (a line unfinished for %d seconds)" % self.timeout, None)
        return min(self.timeout, left)

    async def done_data(self, message: spool.Spool, path: str | None) -> None:
        """Offer the message (or the filter's new version at `path`) to the
        server; relay its verdict verbatim."""
        self.server.write(b"DATA\r\n")
        reply = await self.read_reply()
        if reply[-1][:3] != b"354":
            log.debug("%s: server refused data transfer", self.tag)
            self.client.write(b"".join(reply))
            return
        header = None
        if self.config.Header:
            header = render_header(self.config.Header, self.client_ip, self.local_ip, self.tag)
        source = open(path, "rb") if path else message.reader()
        await spool.send(self.server, source, header, self.timeout)
        final = await self.read_reply()
        self.client.write(b"".join(final))

    async def fail_data(self, reply: str) -> None:
        """Answer the client with a rejection and make the server forget the message."""
        self.client.write(reply.encode("utf-8", "surrogateescape") + CRLF)
        self.server.write(b"RSET\r\n")
        await self.read_reply()

    async def pass_data(self) -> None:
        """Skip: relay DATA and the message straight to the server."""
        self.server.write(b"DATA\r\n")
        reply = await self.read_reply()
        self.client.write(b"".join(reply))
        if reply[-1][:3] != b"354":
            return
        client, guard = self.client, spool.DotGuard()
        client.start_data()
        while True:
            data, done = client.take_data()
            if data:
                self.server.write(guard.feed(data), False)
                await self.server.drain(self.timeout)
            if done:
                break
            if client.eof:
                raise SessionEnd("unexpected end of data from client", None)
            await self.wait_client_data()
        self.server.write(guard.finish(), False)
        self.server.write(b".\r\n")
        self.client.write(b"".join(await self.read_reply()))

    async def refused_data(self) -> None:
        """DATA without accepted recipients: the server says why (503...)."""
        self.server.write(b"DATA\r\n")
        reply = await self.read_reply()
        if reply[-1][:3] == b"354":
            raise SessionEnd("server accepted DATA without recipients")
        self.client.write(b"".join(reply))
