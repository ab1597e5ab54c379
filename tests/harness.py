"""End-to-end test harness: proxsmtpd as a subprocess between real peers.

- `Proxy`: writes a config file into a private directory and runs
  `python -m proxsmtp.cli -d 4 -f conf` from the repository root, waits
  until it listens, collects stderr to a file, stops it by pid.
- `RecordingServer`: an upstream SMTP server of our own that records every
  command line and message and can be told how to answer (refuse a
  recipient, advertise extensions, multi-line replies, drop the connection).
- `SmtpSink`: Postfix's smtp-sink, dumping each message to a file.
- `Client`: a raw-socket SMTP client for exact protocol checks.

Everything listens on loopback on free ports and is stopped by its pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Awaitable, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import peers  # noqa: E402  (bench/peers.py: free_port)

# how a foreground log line starts (proxsmtp/log.py)
TIMESTAMP = re.compile(r"(?m)^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (?=proxsmtpd: )")
PYTHON = sys.executable
CRLF = b"\r\n"


# --- sockets ------------------------------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (bench/peers.py: under
    pytest-xdist, from this worker's own range)."""
    return peers.free_port(host)


def connected(host: str, port: int | None, timeout: float = 1.0) -> socket.socket:
    """A socket connected to host:port, or to the unix socket path `host`."""
    if port is None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: object = host
    else:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        target = (host, port)
    try:
        sock.settimeout(timeout)
        sock.connect(target)
    except OSError:
        sock.close()
        raise
    return sock


def can_connect(host: str, port: int | None) -> bool:
    """True once something accepts connections at host:port (or unix path host)."""
    try:
        with connected(host, port):
            return True
    except OSError:
        return False


def answers(host: str, port: int | None, wait: float = 5.0, hello: bytes = b"") -> bool:
    """True once a connection is accepted *and served*: a greeting, a close or
    silence for `wait` seconds.  The kernel accepts into the backlog as soon as
    the socket listens, before the daemon is ready for signals; the first
    bytes (or EOF) come from a worker.  `hello` is sent first (a PROXY header
    for a daemon that waits for one)."""
    try:
        with connected(host, port) as sock:
            sock.settimeout(wait)
            if hello:
                sock.sendall(hello)
            try:
                sock.recv(1)
            except (socket.timeout, ConnectionResetError):
                pass
        return True
    except OSError:
        return False


def closed_silently(address: tuple[str, int], data: bytes = b"", timeout: float = 20.0,
                    source: str | None = None) -> bool:
    """Send `data` and expect the connection closed without a byte in reply."""
    with socket.socket() as sock:
        sock.settimeout(timeout)
        if source:
            sock.bind((source, 0))
        sock.connect(address)
        if data:
            sock.sendall(data)
        received = b""
        try:
            while chunk := sock.recv(4096):
                received += chunk
        except ConnectionResetError:
            pass
        return received == b""


def freed_without_collector(one_session: Callable[[], Awaitable[object]],
                            leftovers: tuple[type, ...] = ()) -> None:
    """Run `one_session()` on uvloop with the cyclic collector off: it runs a
    session in-process and returns a weakref to it.  The session must have
    been freed by reference counting alone (relay.py's promise), and no object
    of a `leftovers` type may be left for the collector to find."""
    import uvloop

    gc.collect()
    gc.disable()
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            ref = runner.run(one_session())
        assert ref() is None, gc.get_referrers(ref())
        left = [thing for thing in gc.get_objects() if isinstance(thing, leftovers)]
        assert not left, left
    finally:
        gc.enable()


def wait_until(predicate: Callable[[], object], timeout: float = 10.0,
               interval: float = 0.05, what: str = "condition") -> object:
    """Poll `predicate` until it returns something true; AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s" % what)
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def title(pid: int) -> str:
    """A process's title (its command line; setproctitle rewrites it), '' if gone."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def children(pid: int) -> dict[int, str]:
    """{pid: title} of the live (not zombie) processes whose parent is `pid`."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found[int(entry)] = title(int(entry))
    return found


def stop_process(proc: subprocess.Popen, timeout: float = 10.0, group: bool = False) -> None:
    """SIGTERM, then SIGKILL (its own process group too when `group`)."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    if group:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout)


# --- proxsmtpd ------------------------------------------------------------------

def write_config(path: Path, settings: dict[str, object] | str) -> Path:
    """A proxsmtpd.conf from {Name: value} (None values skipped) or raw text."""
    if isinstance(settings, str):
        text = settings
    else:
        text = "".join("%s: %s\n" % (name, value) for name, value in settings.items()
                       if value is not None)
    path.write_text(text)
    return path


def run_proxsmtpd(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess:
    """Run proxsmtpd to completion (for options and config errors)."""
    return subprocess.run([PYTHON, "-m", "proxsmtp.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def detached(conf: Path, pid_file: Path):
    """proxsmtpd as a daemon (no -d: it detaches) with `-p pid_file`: yields
    (the launcher's CompletedProcess, the daemon's pid or None); the daemon
    is stopped by its pid on the way out."""
    daemon = None
    try:
        try:
            result = run_proxsmtpd("-f", str(conf), "-p", str(pid_file), timeout=60)
        finally:
            daemon = int(pid_file.read_text()) if pid_file.exists() else None
        yield result, daemon
    finally:
        if daemon is not None:
            os.kill(daemon, signal.SIGTERM)
            wait_until(lambda: not pid_alive(daemon), 30, what="the daemon to exit")


class Proxy:
    """proxsmtpd in the foreground at `-d debug` with a generated config.

    Unless given, Listen is 127.0.0.1 on a free port, TempDirectory a private
    directory (`self.spool`) and TimeOut 20 seconds.
    """

    def __init__(self, workdir: Path, settings: dict[str, object] | None = None,
                 debug: int = 4, args: tuple[str, ...] = (), raw_config: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.spool = self.workdir / "spool"
        self.spool.mkdir(exist_ok=True)
        merged: dict[str, object] = {"TempDirectory": str(self.spool), "TimeOut": 20}
        merged.update(settings or {})
        if "Listen" not in merged:
            merged["Listen"] = "127.0.0.1:%d" % free_port()
        self.settings = merged
        self.listen = str(merged["Listen"])
        self.conf = write_config(self.workdir / "proxsmtpd.conf",
                                 raw_config if raw_config is not None else merged)
        self.debug = debug
        self.args = tuple(args)
        self.stderr_path = self.workdir / "proxsmtpd.stderr"
        self.proc: subprocess.Popen | None = None
        self.wrapper: tuple[str, ...] = ()   # a command that execs the rest (e.g. unshare)

    @property
    def host(self) -> str:
        if self.listen.startswith("/"):
            return self.listen
        if self.listen.startswith("["):
            return self.listen[1:self.listen.index("]")]
        if self.listen.isdigit():
            return "127.0.0.1"
        return self.listen.rsplit(":", 1)[0]

    @property
    def port(self) -> int | None:
        if self.listen.startswith("/"):
            return None
        if self.listen.isdigit():
            return int(self.listen)
        return int(self.listen.rsplit(":", 1)[1])

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def start(self, timeout: float = 15.0) -> "Proxy":
        command = [*self.wrapper, PYTHON, "-m", "proxsmtp.cli", "-d", str(self.debug),
                   "-f", str(self.conf), *self.args]
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL,
                                     stdout=self._stderr, stderr=self._stderr,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        hello = b"PROXY UNKNOWN\r\n" if self.proxy_protocol else b""
        while not answers(self.host, self.port, hello=hello):
            if self.proc.poll() is not None:
                raise RuntimeError("proxsmtpd exited with %d:\n%s" % (self.proc.returncode, self.log()))
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("proxsmtpd didn't listen on %s:\n%s" % (self.listen, self.log()))
            time.sleep(0.05)
        self._wait_workers(deadline)
        return self

    @property
    def proxy_protocol(self) -> bool:
        """ProxyProtocol is on: every connection must start with a PROXY header."""
        return str(self.settings.get("ProxyProtocol", "off")).lower() in ("on", "yes", "true", "1")

    def children(self) -> dict[int, str]:
        """{pid: process title} of the daemon's child processes (its workers)."""
        return children(self.proc.pid)

    def _wait_workers(self, deadline: float) -> None:
        """Best effort: wait until every expected worker has its title, i.e. has
        set up its own signal handling, so that an early SIGTERM is not lost."""
        expected = int(self.settings.get("Workers") or 0) or (os.cpu_count() or 1)
        while time.monotonic() < deadline and self.proc.poll() is None:
            titles = list(self.children().values())
            if len(titles) >= expected and all(t.startswith("proxsmtpd: worker") for t in titles):
                return
            time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait (then SIGKILL its process group); the exit status."""
        if self.proc is None:
            return None
        stop_process(self.proc, timeout, group=True)
        self._stderr.close()
        return self.proc.returncode

    def log(self) -> str:
        """Its stderr, without the timestamp each log line starts with (so that
        patterns can anchor on `^proxsmtpd: `)."""
        try:
            return TIMESTAMP.sub("", self.stderr_path.read_text(errors="replace"))
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern: str, timeout: float = 10.0) -> re.Match:
        """The first match of regex `pattern` in stderr, waiting for it to appear."""
        regex = re.compile(pattern, re.M)
        try:
            return wait_until(lambda: regex.search(self.log()), timeout, what=pattern)
        except AssertionError:
            raise AssertionError("no %r in proxsmtpd's log:\n%s" % (pattern, self.log())) from None

    def spool_files(self) -> list[str]:
        return sorted(os.listdir(self.spool))

    def connect(self, timeout: float = 20.0, source: str | None = None,
                hello: bytes = b"") -> "Client":
        return Client(self.host, self.port, timeout, source, hello)

    def smtp(self, timeout: float = 20.0):
        """An smtplib client connected to the proxy."""
        import smtplib
        if self.port is None:
            raise ValueError("smtplib can't use unix sockets")
        return smtplib.SMTP(self.host, self.port, timeout=timeout)


# --- a raw SMTP client --------------------------------------------------------------

class Client:
    """A plain socket speaking SMTP line by line, for exact protocol checks."""

    def __init__(self, host: str, port: int | None, timeout: float = 20.0,
                 source: str | None = None, hello: bytes = b"") -> None:
        if port is None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: object = host
        else:
            self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            target = (host, port)
            if source is not None:          # e.g. 127.0.0.9: another loopback client
                self.sock.bind((source, 0))
        self.sock.settimeout(timeout)
        self.sock.connect(target)
        if hello:                           # e.g. a PROXY header, before the greeting
            self.sock.sendall(hello)
        self.file = self.sock.makefile("rb")
        self.greeting = self.reply()

    def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def line(self) -> bytes:
        """One raw line (CRLF included); b'' at EOF."""
        return self.file.readline()

    def reply(self) -> list[str]:
        """One whole reply as a list of lines without CRLF; [] at EOF."""
        lines = []
        while True:
            raw = self.file.readline()
            if not raw:
                return lines
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text)
            if not (len(text) > 3 and text[3] == "-"):
                return lines

    def cmd(self, line: str | bytes) -> list[str]:
        """Send one command line and read its reply."""
        if isinstance(line, str):
            line = line.encode()
        self.send(line + CRLF)
        return self.reply()

    def code(self, line: str | bytes) -> int:
        reply = self.cmd(line)
        return int(reply[-1][:3]) if reply else 0

    def closed_by_peer(self, timeout: float = 10.0) -> bool:
        """True if the peer closes the connection (after any pending data)."""
        self.sock.settimeout(timeout)
        try:
            while self.file.readline():
                pass
            return True
        except ConnectionResetError:    # it closed, and our later bytes drew a RST
            return True
        except OSError:
            return False

    def close(self) -> None:
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def send_mail(client: Client, sender: str, recipients: list[str], body: bytes,
              helo: str = "EHLO client.example") -> list[str]:
    """A whole transaction over a raw Client; `body` is sent as is, then `.`.
    Returns the final reply to the message (asserts each step is accepted)."""
    reply = client.cmd(helo)
    assert reply and reply[-1].startswith("250"), reply
    reply = client.cmd("MAIL FROM:<%s>" % sender)
    assert reply[-1].startswith("250"), reply
    for rcpt in recipients:
        reply = client.cmd("RCPT TO:<%s>" % rcpt)
        assert reply[-1].startswith("250"), reply
    reply = client.cmd("DATA")
    assert reply[-1].startswith("354"), reply
    if not body.endswith(CRLF):
        body += CRLF
    client.send(body + b".\r\n")
    return client.reply()


# --- an upstream SMTP server of our own ---------------------------------------------------

class Message:
    """One message received by RecordingServer."""

    def __init__(self, conn: int, sender: str, recipients: list[str], raw: bytes,
                 xclient: list[str]) -> None:
        self.conn = conn
        self.sender = sender
        self.recipients = recipients
        self.raw = raw              # as received: dot-stuffed, without the final `.` line
        self.xclient = xclient      # XCLIENT commands seen before it on its connection

    @property
    def body(self) -> bytes:
        """The message with dot-stuffing undone (what a real MTA would store)."""
        return re.sub(rb"(?m)^\.", b"", self.raw)

    @property
    def lines(self) -> list[bytes]:
        return self.raw.split(CRLF)


Reply = str | Callable[[str, "ServerConnection"], str | None]


class RawServer:
    """A hand-made server on 127.0.0.1 for misbehaviour RecordingServer can't
    act: `handle(conn)` runs in a thread per connection; stop() closes all."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.address = "127.0.0.1:%d" % self.port
        self.conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            self.handle(conn)
        except OSError:
            pass

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)        # wakes the accept()
        except OSError:
            pass
        self.listener.close()
        self._thread.join(5)
        for conn in self.conns:
            try:
                conn.close()
            except OSError:
                pass


class ServerConnection:
    """State of one connection to RecordingServer (passed to reply callables)."""

    def __init__(self, server: "RecordingServer", number: int, sock: socket.socket) -> None:
        self.server = server
        self.number = number
        self.sock = sock
        self.sender = ""
        self.recipients: list[str] = []
        self.xclient: list[str] = []
        self.closed = False
        self.peer = sock.getpeername() if sock.family != socket.AF_UNIX else None
        self.tls: str | None = None        # "TLSv1.3 CIPHER" after STARTTLS


class RecordingServer:
    """An SMTP server on loopback that records what it is told.

    - `extensions`: the EHLO keywords advertised (after the first line);
    - `replies`: {VERB: reply} overriding the default reply to a verb; a reply
      is a string (multi-line with `\\r\\n` between lines) or a callable
      (line, connection) -> reply, or None to drop the connection;
    - `refuse`: recipients answered `550 5.1.1 <addr>: Recipient address rejected`;
    - `data_reply`: the reply after the final `.` (or a callable (message, connection));
    - `drop_at`: a verb at which the connection is closed without a reply
      (`"DATA-END"` means at the final `.` of a message);
    - `idle_timeout`: seconds of silence after which it drops a connection
      (as Postfix's smtpd_timeout does);
    - `tls`: a server-side ssl.SSLContext: STARTTLS is answered 220 and the
      connection upgraded (advertise it with "STARTTLS" in `extensions`);
      `after_220`: bytes sent in the same packet behind that 220 (injection).
    `lines` keeps (connection number, line) for every command line received.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, path: str | None = None,
                 extensions: tuple[str, ...] = ("SIZE 10240000", "8BITMIME", "PIPELINING"),
                 replies: dict[str, Reply] | None = None, refuse: tuple[str, ...] = (),
                 data_reply: str = "250 2.0.0 Ok: queued as TEST",
                 drop_at: str | None = None, greeting: str = "220 upstream.test ESMTP recorder",
                 name: str = "upstream.test", idle_timeout: float | None = None,
                 tls=None, after_220: bytes = b"") -> None:
        self.name = name
        self.idle_timeout = idle_timeout
        self.tls = tls
        self.after_220 = after_220
        self.extensions = list(extensions)
        self.replies = {k.upper(): v for k, v in (replies or {}).items()}
        self.refuse = set(refuse)
        self.data_reply = data_reply
        self.drop_at = drop_at.upper() if drop_at else None
        self.greeting = greeting
        self.lines: list[tuple[int, str]] = []
        self.messages: list[Message] = []
        self.rejected: list[Message] = []     # messages answered other than 2xx
        self.connections: list[ServerConnection] = []
        self.closed_connections = 0
        self.cond = threading.Condition()
        self.path = path
        if path is not None:
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(path)
            self.host, self.port = path, None
        else:
            self.listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind((host, port))
            self.host, self.port = host, self.listener.getsockname()[1]
        self.listener.listen(64)
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._stopped = False
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    @property
    def address(self) -> str:
        """As OutAddress / FilterCommand would say it."""
        if self.path is not None:
            return self.path
        if ":" in self.host:
            return "[%s]:%d" % (self.host, self.port)
        return "%s:%d" % (self.host, self.port)

    # --- what was seen -----------------------------------------------------------

    def commands(self, conn: int | None = None) -> list[str]:
        with self.cond:
            return [line for number, line in self.lines if conn is None or number == conn]

    def verbs(self, conn: int | None = None) -> list[str]:
        return [line.split(" ", 1)[0].upper() for line in self.commands(conn)]

    def wait_for(self, predicate: Callable[[], object], timeout: float = 10.0,
                 what: str = "upstream condition") -> object:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                result = predicate()
                if result:
                    return result
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("timed out waiting for %s; commands: %r"
                                         % (what, [line for _, line in self.lines]))
                self.cond.wait(left)

    def wait_messages(self, count: int, timeout: float = 10.0) -> list[Message]:
        self.wait_for(lambda: len(self.messages) >= count, timeout, "%d messages" % count)
        return list(self.messages)

    def wait_command(self, verb: str, timeout: float = 10.0) -> str:
        verb = verb.upper()
        return self.wait_for(lambda: next((line for _, line in self.lines
                                           if line.upper().startswith(verb)), None),
                             timeout, "command %s" % verb)

    def connection_with(self, line: str) -> ServerConnection | None:
        """The first connection that received the command `line`."""
        with self.cond:
            number = next((n for n, seen in self.lines if seen == line), None)
            return None if number is None else self.connections[number]

    def wait_closed(self, line: str, timeout: float = 10.0) -> ServerConnection:
        """Wait until the connection that received `line` is closed (the proxy's
        readiness probe makes connections of its own, so they are told apart
        by what they were sent)."""
        def closed():
            conn = self.connection_with(line)
            return conn if conn is not None and conn.closed else None
        return self.wait_for(closed, timeout, "connection with %r closed" % line)

    # --- serving -------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stopped:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self.cond:
                conn = ServerConnection(self, len(self.connections), sock)
                self.connections.append(conn)
                self._socks.append(sock)
                self.cond.notify_all()
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _record(self, conn: ServerConnection, line: str) -> None:
        with self.cond:
            self.lines.append((conn.number, line))
            self.cond.notify_all()

    def _reply_for(self, verb: str, line: str, conn: ServerConnection, default: str) -> str | None:
        if self.drop_at == verb:
            return None
        reply = self.replies.get(verb, default)
        if callable(reply):
            reply = reply(line, conn)
        return reply

    def _serve(self, conn: ServerConnection) -> None:
        conn.sock.settimeout(self.idle_timeout)
        reader = conn.sock.makefile("rb")
        try:
            conn.sock.sendall(self.greeting.encode() + CRLF)
            while True:
                raw = reader.readline()
                if not raw:
                    break
                line = raw.decode("utf-8", "surrogateescape").rstrip("\r\n")
                self._record(conn, line)
                if line.upper() == "STARTTLS" and self.tls is not None and conn.tls is None \
                        and "STARTTLS" not in self.replies:
                    reader = self._starttls(conn, reader)
                    continue
                reply = self._answer(conn, line, reader)
                if reply is None:
                    break
                if reply:
                    conn.sock.sendall(reply.encode("utf-8", "surrogateescape") + CRLF)
                if line.upper() == "QUIT":
                    break
        except OSError:
            pass
        finally:
            try:
                reader.close()
                conn.sock.close()
            except OSError:
                pass
            with self.cond:
                conn.closed = True
                self.closed_connections += 1
                self.cond.notify_all()

    def _starttls(self, conn: ServerConnection, reader):
        """220, then the handshake (raises OSError if it fails); a new reader."""
        conn.sock.sendall(b"220 2.0.0 Ready to start TLS\r\n" + self.after_220)
        reader.close()
        plain = conn.sock
        conn.sock = self.tls.wrap_socket(plain, server_side=True)
        with self.cond:
            self._socks.append(conn.sock)
        conn.tls = "%s %s" % (conn.sock.version(), conn.sock.cipher()[0])
        conn.sender, conn.recipients = "", []
        return conn.sock.makefile("rb")

    def _answer(self, conn: ServerConnection, line: str, reader) -> str | None:
        verb = line.split(" ", 1)[0].upper()
        if verb == "EHLO":
            lines = ["250-%s" % self.name] + ["250-%s" % ext for ext in self.extensions]
            lines[-1] = "250 " + lines[-1][4:]
            return self._reply_for(verb, line, conn, "\r\n".join(lines))
        if verb == "HELO":
            return self._reply_for(verb, line, conn, "250 %s" % self.name)
        if verb == "MAIL":
            reply = self._reply_for(verb, line, conn, "250 2.1.0 Ok")
            if reply and reply.startswith("2"):
                conn.sender, conn.recipients = _angle(line), []
            return reply
        if verb == "RCPT":
            address = _angle(line)
            default = ("550 5.1.1 <%s>: Recipient address rejected" % address
                       if address in self.refuse else "250 2.1.5 Ok")
            reply = self._reply_for(verb, line, conn, default)
            if reply and reply.startswith("2"):
                conn.recipients.append(address)
            return reply
        if verb == "RSET":
            conn.sender, conn.recipients = "", []
            return self._reply_for(verb, line, conn, "250 2.0.0 Ok")
        if verb == "XCLIENT":
            conn.xclient.append(line)
            return self._reply_for(verb, line, conn, "220 %s ESMTP after XCLIENT" % self.name)
        if verb == "DATA":
            default = "354 End data with <CR><LF>.<CR><LF>" if conn.recipients \
                else "503 5.5.1 Error: need RCPT command"
            reply = self._reply_for(verb, line, conn, default)
            if reply is None or not reply.startswith("354"):
                return reply
            conn.sock.sendall(reply.encode() + CRLF)
            raw = bytearray()
            while True:         # strictly CRLF.CRLF ends it, as for a careful MTA
                chunk = reader.readline()
                if not chunk:
                    return None
                if chunk == b".\r\n" and (not raw or raw.endswith(CRLF)):
                    break
                raw += chunk
            if self.drop_at == "DATA-END":
                return None
            message = Message(conn.number, conn.sender, list(conn.recipients),
                              bytes(raw[:-2]) if raw.endswith(CRLF) else bytes(raw),
                              list(conn.xclient))
            reply = self.data_reply(message, conn) if callable(self.data_reply) else self.data_reply
            with self.cond:
                (self.messages if reply.startswith("2") else self.rejected).append(message)
                self.cond.notify_all()
            conn.sender, conn.recipients = "", []
            return reply
        if verb == "QUIT":
            return self._reply_for(verb, line, conn, "221 2.0.0 Bye")
        if verb in ("NOOP", "XFORWARD"):
            return self._reply_for(verb, line, conn, "250 2.0.0 Ok")
        if verb == "AUTH":
            return self._reply_for(verb, line, conn, "235 2.7.0 Authentication successful")
        return self._reply_for(verb, line, conn, "502 5.5.2 Error: command not recognized")

    def stop(self) -> None:
        self._stopped = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        with self.cond:
            socks = list(self._socks)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._acceptor.join(5)
        for thread in self._threads:
            thread.join(5)
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "RecordingServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _angle(line: str) -> str:
    """The address of a MAIL FROM / RCPT TO line."""
    arg = line.split(":", 1)[1].strip() if ":" in line else ""
    if arg.startswith("<"):
        return arg[1:arg.find(">")] if ">" in arg else arg[1:]
    return arg.split(" ", 1)[0]


# --- Postfix's smtp-sink ---------------------------------------------------------------

SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"


class SmtpSink:
    """`smtp-sink -u nobody -d dumpdir/...` on loopback; one dump file per message."""

    def __init__(self, host: str = "127.0.0.1", extra: tuple[str, ...] = ()) -> None:
        if not os.path.exists(SMTP_SINK):
            import pytest
            pytest.skip("smtp-sink (postfix) is not installed")
        # smtp-sink writes as `nobody`, which can't reach pytest's 0700 tmp dirs
        self.dumpdir = Path(tempfile.mkdtemp(prefix="proxsmtp-sink."))
        os.chmod(self.dumpdir, 0o777)
        self.host = host
        self.port = free_port(host)
        listen = "[%s]:%d" % (host, self.port) if ":" in host else "%s:%d" % (host, self.port)
        command = [SMTP_SINK, *extra, "-d", str(self.dumpdir) + "/msg.", listen, "64"]
        if os.geteuid() == 0:
            command[1:1] = ["-u", "nobody"]
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_until(lambda: can_connect(host, self.port) or self.proc.poll() is not None,
                       10, what="smtp-sink")
        except AssertionError:
            self.stop()
            raise
        if self.proc.poll() is not None:
            raise RuntimeError("smtp-sink exited: %s" % self.proc.stderr.read().decode())

    @property
    def address(self) -> str:
        return "[%s]:%d" % (self.host, self.port) if ":" in self.host else "%s:%d" % (self.host, self.port)

    def messages(self) -> list[bytes]:
        return [path.read_bytes() for path in sorted(self.dumpdir.iterdir()) if path.is_file()]

    def wait_messages(self, count: int, timeout: float = 10.0) -> list[bytes]:
        wait_until(lambda: len(self.messages()) >= count, timeout, what="%d sink messages" % count)
        # smtp-sink writes the file while the transaction goes on; let it finish
        time.sleep(0.2)
        return self.messages()

    def stop(self) -> None:
        stop_process(self.proc, 5)
        if self.proc.stderr:
            self.proc.stderr.close()
        shutil.rmtree(self.dumpdir, ignore_errors=True)
