"""The filter callbacks (upstream's proxsmtpd.c): what to do with a spooled message.

`check()` returns a Verdict: forward a file, or reply with a rejection.  A
filter that fails (crash, signal, timeout, cannot start, filter node gone)
raises FilterError, which the session turns into `451 Local Error`.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
from dataclasses import dataclass
from typing import Awaitable, Callable

from ..message import spool
from ..message.envelope import Envelope
from ..net import destination, tls
from ..net.channel import Channel, ChannelClosed
from ..process.config import Config
from ..process.log import clean, log
from ..smtp.peer import ReplyTooLong, read_reply
from ..smtp.replies import REJECT_PREFIX

# Called while a filter works: keeps the server connection alive (KeepAlives).
KeepAlive = Callable[[], Awaitable[None]]

STDERR_KEEP = 4096           # bytes of a filter's stderr kept (its last line matters)
CHATTER_LINES = 3            # lines of stderr from a filter that passed a message, logged
KILL_GRACE = 3.0             # seconds between SIGTERM and SIGKILL
TEMP_MIN_FREE = 64 * 1024    # bytes free in TempDirectory below which it counts as full
_CODE = re.compile(r"^[245]\d\d(?=[ -]|$)")
_PROTOCOL_STATUS = re.compile(r"^[0-9]{3}[ -]5\.5\.[0-9]{1,3}(?=\s|$)")


class FilterError(Exception):
    """The filter could not give a verdict; the message is deferred (451)."""


@dataclass
class Verdict:
    """Forward the message (accept; `path` when a filter wrote a new one),
    or answer the client with `reply` (reject)."""

    accept: bool
    path: str | None = None
    reply: str = ""
    status: str = "FILTERED"


def reject_reply(text: str) -> str:
    """A rejection as the client sees it: `NNN text` as is, else 550 Content Rejected."""
    text = text.strip()
    if not text:
        return REJECT_PREFIX
    if _CODE.match(text):       # `550-text` would leave the client waiting for more lines
        return (text[:3] + " " + text[4:] if text[3:4] == "-" else text)[:512]
    return "%s; %s" % (REJECT_PREFIX, text[:256])


def temp_full(directory: str) -> bool:
    """TempDirectory (nearly) out of space or inodes.  A filter that failed then
    most likely failed for that: the message deserves a retry (451), not a bounce."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < TEMP_MIN_FREE or (st.f_files > 0 and st.f_favail == 0)


def last_line(data: bytes) -> str:
    """The last non-blank line of a filter's stderr."""
    for line in reversed(data.splitlines()):
        if line.strip():
            return line.strip().decode("utf-8", "replace")
    return ""


def _warn_chatter(tag: str, stderr: bytes) -> None:
    """A filter that passed the message but wrote on stderr is often telling
    of trouble the operator should hear of (the SpamAssassin example passes
    mail unscanned when spamd is down): its first lines, as warnings."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for number, line in enumerate(lines[:CHATTER_LINES], 1):
        more = len(lines) - CHATTER_LINES if number == CHATTER_LINES else 0
        log.warning("%s: filter command (exit 0) wrote on stderr: %s%s", tag,
                    clean(line, 256), " (%d more lines)" % more if more > 0 else "")


async def check(config: Config, envelope: Envelope, message: spool.Spool,
                keepalive: KeepAlive) -> Verdict:
    """Run the configured filter over a spooled message."""
    if not config.FilterCommand:
        return Verdict(True)
    if config.FilterType == "smtp":
        return await smtp_verdict(config, envelope, message)
    return await command_verdict(config, envelope, message, keepalive, config.FilterType == "pipe")


def environment(config: Config, envelope: Envelope, email: str | None) -> dict[str, str]:
    """The filter's environment: the daemon's, plus the message's facts."""
    env = dict(os.environ)
    facts = {
        "SENDER": envelope.sender,
        "RECIPIENTS": "\n".join(envelope.recipients) if envelope.recipients else None,
        "CLIENT": envelope.client_ip,
        "SERVER": envelope.server_ip,
        "HELO": envelope.helo,
        "REMOTE": envelope.xforward_addr,
        "REMOTE_HELO": envelope.xforward_helo,
        "EMAIL": email,
        "TMPDIR": config.TempDirectory,
    }
    for name, value in facts.items():
        env.pop(name, None)
        if value:
            env[name] = value.replace("\0", "")     # a NUL can't be in the environment
    # the protocol and cipher of each leg; set but empty for a plaintext leg
    env["CLIENT_TLS"] = envelope.client_tls
    env["SERVER_TLS"] = envelope.server_tls
    return env


async def command_verdict(config: Config, envelope: Envelope, message: spool.Spool,
                          keepalive: KeepAlive, pipe: bool) -> Verdict:
    """FilterType pipe (message on stdin, new one on stdout) or file (EMAIL= rewritten)."""
    tag = envelope.tag
    out_fd, out_path = message.new_file() if pipe else (-1, "")
    stdin = open(message.path, "rb") if pipe else open(os.devnull, "rb")
    try:
        try:
            proc = FilterProcess(config.FilterCommand, stdin, out_fd if pipe else subprocess.DEVNULL,
                                 environment(config, envelope, None if pipe else message.path))
        except OSError as exc:
            raise FilterError("couldn't run filter command: %s" % exc.strerror) from None
        log.debug("%s: executed filter command: %s (pid: %d)", tag, config.FilterCommand, proc.pid)
        try:
            status, stderr = await _supervise(config.FilterTimeout, tag, keepalive, proc, stdin,
                                              out_fd if pipe else message.path)
        finally:
            proc.close()
    finally:
        stdin.close()
        if out_fd >= 0:
            os.close(out_fd)
    if status < 0:
        raise FilterError("filter command terminated abnormally (signal %d)" % -status)
    log.debug("%s: filter exit code: %d", tag, status)
    if status == 0:
        _warn_chatter(tag, stderr)
        if pipe and message.size and not os.path.getsize(out_path):
            raise FilterError("filter command wrote no message (exit 0, no output)")
        return Verdict(True, out_path if pipe else message.path)
    if status in (126, 127):
        raise FilterError("filter command could not be executed (exit %d): %s"
                          % (status, clean(last_line(stderr))))
    if 128 < status <= 128 + signal.SIGRTMAX:  # how /bin/sh reports a program it ran
        raise FilterError("filter command terminated abnormally (exit %d: signal %d)"
                          % (status, status - 128))
    if temp_full(config.TempDirectory):
        raise FilterError("filter command failed (exit %d) with TempDirectory full: %s"
                          % (status, clean(last_line(stderr))))
    reply = reject_reply(last_line(stderr))
    return Verdict(False, reply=reply, status=reply)


class FilterProcess:
    """`/bin/sh -c command` in its own process group, watched from the event loop.

    Spawned with subprocess (close_fds: the filter gets fds 0-2 only), its
    stderr read without blocking (the last STDERR_KEEP bytes kept), and its
    exit seen through a pidfd: only this child's own pid is ever waited for,
    so no session can reap another session's filter."""

    def __init__(self, command: str, stdin, stdout, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=stdin, stdout=stdout,
                                     stderr=subprocess.PIPE, env=env, close_fds=True,
                                     start_new_session=True)
        self.pid = self.proc.pid
        self.loop = asyncio.get_running_loop()
        self.stderr = bytearray()
        self.status: int | None = None
        self._news: asyncio.Future | None = None
        self._err = self.proc.stderr.fileno()
        os.set_blocking(self._err, False)
        self.loop.add_reader(self._err, self._on_stderr)
        self._pidfd = os.pidfd_open(self.pid)
        self.loop.add_reader(self._pidfd, self._on_exit)

    @property
    def exited(self) -> bool:
        return self.status is not None

    @property
    def finished(self) -> bool:
        """Exited, and its stderr read to the end."""
        return self.exited and self._err < 0

    def _wake(self) -> None:
        if self._news is not None and not self._news.done():
            self._news.set_result(None)

    def _on_stderr(self) -> None:
        try:
            chunk = os.read(self._err, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if chunk:
            self.stderr += chunk
            del self.stderr[:-STDERR_KEEP]
            return
        self.loop.remove_reader(self._err)
        self.proc.stderr.close()
        self._err = -1
        self._wake()

    def _on_exit(self) -> None:
        self.loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1
        self.status = self.proc.wait()      # waitpid(this pid): returns at once
        self._wake()

    async def wait(self, timeout: float) -> None:
        """Until it exits or its stderr closes, or `timeout` seconds."""
        self._news = self.loop.create_future()
        try:
            await asyncio.wait_for(self._news, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            self._news = None

    async def wait_exit(self, timeout: float) -> bool:
        deadline = self.loop.time() + timeout
        while not self.exited and self.loop.time() < deadline:
            await self.wait(deadline - self.loop.time())
        return self.exited

    def signal(self, signum: int) -> None:
        """Signal its whole process group (what the shell started too)."""
        try:
            os.killpg(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def close(self) -> None:
        """Stop watching; a filter still running by now is killed and reaped."""
        if self._err >= 0:
            self.loop.remove_reader(self._err)
            self.proc.stderr.close()
            self._err = -1
        if self._pidfd >= 0:
            self.loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        if self.status is None:
            self.signal(signal.SIGKILL)
            self.status = self.proc.wait()


def _progress(stdin, watched) -> tuple:
    """What moves while a filter works: its input offset and its output."""
    try:
        offset = os.lseek(stdin.fileno(), 0, os.SEEK_CUR)
        st = os.fstat(watched) if isinstance(watched, int) else os.stat(watched)
        return offset, st.st_size, st.st_mtime_ns, st.st_ino
    except OSError:
        return ()


async def _supervise(timeout: float, tag: str, keepalive: KeepAlive, proc: FilterProcess,
                     stdin, watched) -> tuple[int, bytes]:
    """Wait for the filter, killing it after FilterTimeout seconds without
    progress (its input read, its output written; stderr chatter alone is no
    progress: a filter that only talks there is stuck)."""
    loop = asyncio.get_running_loop()
    last_change = loop.time()
    marks = _progress(stdin, watched)
    try:
        while not proc.finished:
            await proc.wait(min(1.0, timeout))
            now = loop.time()
            current = _progress(stdin, watched)
            if current != marks:
                marks, last_change = current, now
            await keepalive()
            if now - last_change >= timeout and not proc.finished:
                if proc.exited:     # exited, but something it started holds stderr open
                    proc.signal(signal.SIGKILL)
                    break
                raise FilterError("timeout while waiting for filter command")
        return proc.status, bytes(proc.stderr)
    except BaseException:
        if not proc.exited:
            log.warning("%s: killing filter process (pid %d)", tag, proc.pid)
            await _kill(proc)
        raise


async def _kill(proc: FilterProcess) -> None:
    """SIGTERM the filter's process group, then SIGKILL if it lingers."""
    proc.signal(signal.SIGTERM)
    if not await proc.wait_exit(KILL_GRACE):
        log.error("process wouldn't quit. forced termination (pid %d)", proc.pid)
    proc.signal(signal.SIGKILL)     # it, or anything it left behind
    await proc.wait_exit(KILL_GRACE)


# --- FilterType smtp: a verdict from a filter node (e.g. Halon behind haproxy) ---

def xtext(value: str) -> str:
    """RFC 1891 xtext, as XCLIENT attribute values need."""
    return "".join(c if 33 <= ord(c) <= 126 and c not in "+=" else "+%02X" % ord(c)
                   for c in value.encode("utf-8", "replace").decode("latin-1"))


class _Node:
    """A tiny SMTP client over a Channel, reading multi-line replies whole."""

    def __init__(self, channel: Channel, timeout: float) -> None:
        self.channel = channel
        self.timeout = timeout

    async def reply(self) -> tuple[int, str]:
        try:
            lines = await read_reply(self.channel, self.timeout)
        except ReplyTooLong as exc:
            raise FilterError("filter node: %s" % exc) from None
        except ChannelClosed:
            raise FilterError("filter node closed the connection") from None
        except asyncio.TimeoutError:
            raise FilterError("timeout talking to filter node") from None
        text = "\r\n".join(line.rstrip(b"\r\n").decode("utf-8", "replace") for line in lines)
        code = int(text[:3]) if text[:3].isdigit() else 0
        return code, text

    def send(self, *lines: str) -> None:
        """Commands in one write (a pipelined group when there are several)."""
        try:
            self.channel.write(b"".join(line.encode("utf-8", "surrogateescape") + b"\r\n"
                                        for line in lines))
        except ChannelClosed as exc:
            raise FilterError(str(exc)) from None

    async def command(self, line: str) -> tuple[int, str]:
        self.send(line)
        return await self.reply()


def protocol_broke(code: int, text: str) -> bool:
    """A reply saying the SMTP conversation itself went wrong, not a verdict on
    the envelope or the message: 500-504 (RFC 5321 4.2.2: syntax, command not
    implemented, bad sequence, parameter not implemented) and 554 with an
    enhanced code of class 5.5 (RFC 3463 3.6, protocol status: Postfix's
    `554 5.5.0 Error: SMTP protocol synchronization`)."""
    return 500 <= code <= 504 or code == 554 and _PROTOCOL_STATUS.match(text) is not None


def _as_rejection(code: int, text: str, step: str) -> Verdict:
    """The node's refusal of MAIL, RCPT, DATA or the message, as the client's
    rejection; FilterError (451 to the client) when it is no verdict at all:
    the node and the proxy have fallen out of step, and the client's message
    is not to blame (a bounce for it would lose mail)."""
    if not 400 <= code < 600:
        raise FilterError("unexpected reply from filter node to %s: %s" % (step, clean(text)))
    if protocol_broke(code, text):
        raise FilterError("protocol error from filter node at %s: %s" % (step, clean(text)))
    if code == 421:     # the node is going away; the client's session is not
        text = "451" + text[3:]
    return Verdict(False, reply=text, status=text.splitlines()[-1])


async def smtp_verdict(config: Config, envelope: Envelope, message: spool.Spool) -> Verdict:
    """Offer the message to FilterCommand host[:port]; 2xx after `.` accepts.

    The session uses STARTTLS under ServerTLS as the server leg does; with
    `may`, a failed handshake gets one more try in plaintext."""
    plaintext = config.ServerTLS == "off"
    while True:
        channel = await _connect_node(config.FilterAddress, config.FilterTimeout, envelope.tag)
        try:
            node = _Node(channel, config.FilterTimeout)
            if await _node_hello(config, node, plaintext):
                return await _offer(node, envelope, message)
        finally:
            channel.close()
        plaintext = True


async def _connect_node(target, timeout: float, tag: str) -> Channel:
    channel = Channel("FILTER", tag)
    try:
        await destination.connect_channel(target, timeout, channel, "filter node")
    except destination.DestinationError as exc:
        raise FilterError(str(exc)) from None
    return channel


async def _node_hello(config: Config, node: _Node, plaintext: bool) -> bool:
    """Greeting, EHLO and (ServerTLS) STARTTLS with EHLO again: True when
    done, False when the handshake failed under `may` (try again in
    plaintext).  These are the proxy's own steps, no verdict on the message:
    anything but success is FilterError, but for STARTTLS under `may`."""
    code, text = await node.reply()
    if code != 220:
        raise FilterError("filter node greeting: %s" % clean(text))
    code, ehlo = await node.command("EHLO proxsmtp")
    if code != 250:
        raise FilterError("filter node refused EHLO: %s" % clean(ehlo))
    if plaintext:
        return True
    policy, channel = config.ServerTLS, node.channel
    offered = any(line[4:].split()[:1] == ["STARTTLS"] for line in ehlo.upper().splitlines()[1:])
    if not offered:
        failure = "the filter node offers no STARTTLS"
    else:
        code, text = await node.command("STARTTLS")
        if code != 220:
            failure = "the filter node refused STARTTLS: %s" % clean(text)
        elif channel.pending:
            failure = ("the filter node sent %d bytes behind its 220 to STARTTLS (plaintext "
                       "injected?), not read" % channel.pending)
            channel.close()
        else:
            try:
                await channel.start_tls(config.connecting_tls, False, node.timeout,
                                        config.FilterAddress.host)
                failure = None
            except (OSError, asyncio.TimeoutError) as exc:
                failure = "TLS handshake with the filter node failed: %s" % tls.reason(exc)
                channel.close()
    if failure is None:
        log.debug("%s: FILTER TLS: %s", channel.tag, tls.describe(channel.transport))
        code, text = await node.command("EHLO proxsmtp")
        if code != 250:
            raise FilterError("filter node refused EHLO after STARTTLS: %s" % clean(text))
        return True
    if policy != "may":
        raise FilterError("no TLS to the filter node (ServerTLS %s): %s" % (policy, failure))
    if channel.closed:
        log.warning("%s: %s; connecting to the filter node again in plaintext", channel.tag, failure)
        return False
    log.debug("%s: %s; going on in plaintext", channel.tag, failure)
    return True


def hello_name(envelope: Envelope) -> str:
    """The name the proxy gives the filter node for the client: the client's
    own HELO name, else its address literal, as RFC 5321 4.1.4 has a client
    without a meaningful name of its own say it."""
    if envelope.helo and envelope.helo.isprintable() and " " not in envelope.helo:
        return envelope.helo
    ip = envelope.client_ip
    return "[%s%s]" % ("IPv6:" if ":" in ip else "", ip)


async def _offer(node: _Node, envelope: Envelope, message: spool.Spool) -> Verdict:
    """XCLIENT, EHLO, the envelope and the message; the node's verdict."""
    channel = node.channel
    ip = envelope.client_ip
    xclient = "XCLIENT ADDR=%s%s" % ("IPv6:" if ":" in ip else "", xtext(ip))
    if envelope.helo:
        xclient += " HELO=%s" % xtext(envelope.helo)
    code, text = await node.command(xclient)
    if code // 100 != 2:
        raise FilterError("filter node refused XCLIENT: %s" % clean(text))
    # XCLIENT's 220 starts the session over (Postfix's XCLIENT_README): EHLO
    # again, with the client's name, and its reply read before MAIL; a node
    # with smtpd_helo_required or smtpd_forbid_unauth_pipelining insists.
    code, ehlo = await node.command("EHLO %s" % hello_name(envelope))
    if code != 250:
        raise FilterError("filter node refused EHLO after XCLIENT: %s" % clean(ehlo))
    pipelining = any(line[4:].strip().upper() == "PIPELINING" for line in ehlo.splitlines()[1:])
    sender = "" if envelope.sender in (None, "<>") else envelope.sender
    envelope_lines = (["MAIL FROM:<%s>" % sender]
                      + ["RCPT TO:<%s>" % rcpt for rcpt in envelope.recipients] + ["DATA"])
    if pipelining:      # RFC 2920: one group, the replies read in order
        node.send(*envelope_lines)
    for line in envelope_lines:
        if not pipelining:
            node.send(line)
        code, text = await node.reply()
        step = line.split(":", 1)[0]
        if line == "DATA" and code != 354 or line != "DATA" and code // 100 != 2:
            return _as_rejection(code, text, step)
    try:
        await spool.send(channel, message.reader(), None, node.timeout)
    except ChannelClosed as exc:
        raise FilterError(str(exc)) from None
    code, text = await node.reply()
    try:
        channel.write(b"QUIT\r\n")
    except ChannelClosed:
        pass
    if code // 100 == 2:
        return Verdict(True)
    return _as_rejection(code, text, "the message")
