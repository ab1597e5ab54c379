"""A worker: one asyncio loop accepting on the shared socket and serving sessions.

Each worker waits for the listening socket to become readable and accepts
one connection per wake-up, so that several workers sharing the socket take
turns.  A session only starts once a MaxConnections slot is taken from the
shared Slots; it gives the slot back on every way out.

Signals from the master: SIGTERM stops the worker (idle sessions get 421
at once, one mid-message gets SHUTDOWN_GRACE); SIGUSR1 retires it after a
reload (it stops accepting at once and tells the master so; a session
that was idle then may stay, one
that goes on to finish a message is closed at its next idle point, so it
reconnects to a current worker); SIGUSR2 drains it (every session is closed
at its first idle point, now or after its message).  Once its sessions are
done, its idle filter node connections say QUIT (filters/nodepool.py).
"""

from __future__ import annotations

import _socket
import asyncio
import ctypes
import errno
import gc
import resource
import signal
import socket

# libuv's loop when installed: more sessions per CPU second (bench/README.md,
# How it got there).
try:
    import uvloop
except ImportError:
    uvloop = None

from ..filters import milterpool, nodepool
from ..message import spool
from ..net import channel
from ..session.session import Session
from ..smtp.replies import FINAL_REPLY_WAIT, R_BUSY
from . import stats
from .config import Config
from .log import log

M_MMAP_THRESHOLD = -3        # glibc mallopt(3)
MMAP_THRESHOLD = 128 * 1024
SHUTDOWN_GRACE = 30.0        # seconds a session mid-message gets to finish on SIGTERM
RETIRE_GRACE = 3600.0        # ...and after a reload (SIGUSR1 from the master)
TRIM_EVERY = 2.0             # seconds between chances to give freed memory back
TITLE_EVERY = 0.25           # seconds between updates of the process title's session count
# Descriptors kept free for the sessions a worker already serves: their
# server connections, filters (pipes, temp files) and filter nodes.  A new
# connection that would eat into them is refused with 421: better than a
# session that fails halfway (or a client that never gets an answer).
FD_HEADROOM_MIN = 32
FD_HEADROOM_SHARE = 8        # ...or an eighth of RLIMIT_NOFILE, if more


class Worker:
    """Serves connections from `sock` until stopped."""

    def __init__(self, config: Config, sock: socket.socket, slots, on_change=None,
                 grace: float = SHUTDOWN_GRACE) -> None:
        self.config = config
        self.sock = sock
        self._family, self._proto = int(sock.family), sock.proto     # for each accepted one
        self.slots = slots
        self.on_change = on_change       # called with the live session count
        self.grace = grace
        self.retiring = False
        self.draining = False
        self.sessions: dict[asyncio.Task, Session] = {}
        self._kept: dict[asyncio.Task, int] = {}   # idle when retired: messages done then
        self._changes = 0                           # sessions opened and closed
        self._fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self._fd_ceiling = fd_ceiling(self._fd_limit)
        self._fds_short = False          # said once until descriptors are free again
        self._stopping: asyncio.Future | None = None
        self._change_due = False
        self._loop: asyncio.AbstractEventLoop | None = None   # set by main()

    def run(self) -> None:
        """Run until SIGTERM/SIGINT, then let sessions finish (bounded)."""
        _fixed_mmap_threshold()
        factory = uvloop.new_event_loop if uvloop is not None else None
        channel.SETS_NODELAY = uvloop is not None
        # What the master built before the fork lives as long as we do: the
        # cyclic collector need not look at it again (and copy-on-write pages
        # stay shared).
        gc.freeze()
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(self.main())

    async def main(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._stopping = loop.create_future()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.shut_down)
        loop.add_signal_handler(signal.SIGUSR1, self.retire)
        loop.add_signal_handler(signal.SIGUSR2, self.drain)
        # the master forks us with these blocked: from here on they are handled
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT,
                                                    signal.SIGUSR1, signal.SIGUSR2})
        loop.add_reader(self.sock.fileno(), self._accept)
        self.slots.set_accepting(True)
        trimmer = loop.create_task(self._trim_memory())
        await self._stopping
        self.sock.close()
        await self.finish_sessions()
        await nodepool.close_idle()
        milterpool.close_idle()
        trimmer.cancel()

    def retire(self) -> None:
        """After a reload: stop accepting, let sessions run their course."""
        if not self.retiring:
            self.retiring = True
            self.grace = max(self.grace, RETIRE_GRACE)
            self._kept = {task: session.messages for task, session in self.sessions.items()
                          if session.idle}
        self.stop()

    def drain(self) -> None:
        """Too many workers alive: close every session at its first idle point."""
        self.retire()
        self.draining = True

    def shut_down(self) -> None:
        """SIGTERM: idle sessions are closed at once, retired worker or not."""
        self.draining = True
        self.stop()

    def stop(self) -> None:
        """Stop accepting now, from within the signal's handler: not one more
        connection may be taken once the master counts this worker as
        retired (the reload's promise, proxsmtpd(8) SIGHUP)."""
        if self._stopping is not None and not self._stopping.done():
            self._loop.remove_reader(self.sock.fileno())   # type: ignore[union-attr]
            self.slots.set_accepting(False)
            self._stopping.set_result(None)

    async def finish_sessions(self) -> None:
        """After accepting stopped.  Shutting down: sessions between messages
        are closed with 421 at once, one in the middle of a message gets up to
        `grace` seconds to finish it, then 421 too.  Retiring after a reload:
        sessions go on (for up to `grace`), but one is closed at an idle point
        once it has done a message since (see `_may_close`); draining, all are
        closed at their first idle point.  Either way a session whose message
        the server already has is never cut while its verdict is due (up to
        FINAL_REPLY_WAIT more): cutting it would make the client send the
        message again."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace
        if self.sessions:
            log.debug("waiting for %d sessions to finish", len(self.sessions))
        while self.sessions and loop.time() < deadline:
            for task, session in list(self.sessions.items()):
                if session.idle and self._may_close(task, session):
                    task.cancel()
            await asyncio.wait(set(self.sessions), timeout=0.2)
        last = loop.time() + FINAL_REPLY_WAIT
        while self.sessions and loop.time() < last:
            for task, session in list(self.sessions.items()):
                if not session.finishing:
                    task.cancel()
            await asyncio.wait(set(self.sessions), timeout=0.2)
        for task in list(self.sessions):
            task.cancel()
        if self.sessions:
            await asyncio.wait(set(self.sessions), timeout=5)

    def _may_close(self, task: asyncio.Task, session: Session) -> bool:
        """Whether an idle session is closed now (with 421 4.3.2)."""
        if not self.retiring or self.draining:
            return True
        return self._kept.get(task) != session.messages

    async def _trim_memory(self) -> None:
        """Give the kernel back what a burst left free inside the heap.

        glibc returns only the top of its heap by itself; the buffers of many
        sessions freed in between stay resident until malloc_trim.  Called
        only after something moved (sessions or spooled bytes), so an idle
        worker costs nothing."""
        trim = _malloc_trim()
        if trim is None:
            return
        seen = None
        while True:
            await asyncio.sleep(TRIM_EVERY)
            now = (self._changes, spool.spooled_total())
            if now != seen:
                trim(0)
                seen = now

    def _accept(self) -> None:
        try:
            conn, peer = self._take_connection()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:
            log.error("couldn't accept a connection: %s", exc.strerror)
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self._pause_accepting()
            return
        if conn.fileno() >= self._fd_ceiling:
            self._short_of_fds(conn)
            return
        if self._fds_short:
            self._fds_short = False
            log.info("descriptors available again: accepting connections")
        if not self.slots.acquire():
            log.error("too many connections open (max %d). %s", self.config.MaxConnections,
                      "closed the connection" if self.config.TLSWrapper else "sent busy response")
            stats.connection("busy")
            _busy(conn, self.config.TLSWrapper)
            return
        session = Session(self.config, conn, self._loop, peer)
        task = self._loop.create_task(session.run())   # type: ignore[union-attr]
        self.sessions[task] = session
        task.add_done_callback(self._done)
        self._changed()

    def _take_connection(self) -> tuple[socket.socket, object]:
        """accept(2) one connection: the socket and the peer's sockaddr.  The
        address is kept from here: accept(2) has it even for a peer that has
        already reset the connection, when getpeername(2) fails.  Not
        socket.accept(): its family and type properties are enum
        conversions, and this runs for every connection; the listening
        socket's are known."""
        fd, peer = self.sock._accept()
        return AcceptedSocket(self._family, socket.SOCK_STREAM, self._proto, fileno=fd), peer

    def _short_of_fds(self, conn: socket.socket) -> None:
        """The connection came with a descriptor near RLIMIT_NOFILE (accept(2)
        gives the lowest free one, so all below it are taken): 421 busy, and
        a pause in accepting, so that the sessions held keep their headroom
        and other workers take the next connections."""
        if not self._fds_short:
            self._fds_short = True
            log.error("too many descriptors open (%d of RLIMIT_NOFILE %d): %s, and so until "
                      "sessions end", conn.fileno() + 1, self._fd_limit,
                      "closed the connection" if self.config.TLSWrapper else "sent busy response")
        stats.connection("busy")
        _busy(conn, self.config.TLSWrapper)
        self._pause_accepting()

    def _pause_accepting(self) -> None:
        """Out of descriptors: stop accepting for a moment instead of spinning."""
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.sock.fileno())
        loop.call_later(0.5, lambda: self._stopping.done() or
                        loop.add_reader(self.sock.fileno(), self._accept))

    def _done(self, task: asyncio.Task) -> None:
        """A session ended, however (a task cancelled before it ran too): its
        MaxConnections slot is free again."""
        self.slots.release()
        self.sessions.pop(task, None)
        self._kept.pop(task, None)
        self._changed()

    def _changed(self) -> None:
        """The session count changed: the gauge is set at once, the process
        title (a system call: following every session's start and end would
        make two per session) at most every TITLE_EVERY seconds, with the
        count as it is then."""
        self._changes += 1
        stats.sessions(len(self.sessions))
        if self.on_change is not None and not self._change_due:
            self._change_due = True
            self._loop.call_later(TITLE_EVERY, self._tell_change)   # type: ignore[union-attr]

    def _tell_change(self) -> None:
        self._change_due = False
        self.on_change(len(self.sessions))


class AcceptedSocket(socket.socket):
    """An accepted connection whose `family` and `type` are plain ints.
    socket.socket makes an enum of each every time they are read, and the
    event loop reads them for every connection it is handed."""

    __slots__ = ()
    family = _socket.socket.family      # type: ignore[assignment]
    type = _socket.socket.type          # type: ignore[assignment]


def fd_ceiling(limit: int) -> int:
    """The first descriptor number a new connection may not have: the soft
    RLIMIT_NOFILE `limit` less the headroom (see FD_HEADROOM_MIN)."""
    if limit == resource.RLIM_INFINITY:
        return 1 << 30
    return max(limit - max(FD_HEADROOM_MIN, limit // FD_HEADROOM_SHARE), 1)


def _fixed_mmap_threshold() -> None:
    """Keep glibc's mmap threshold at 128 KiB.  Each TLS connection has a
    256 KiB read buffer (uvloop's and asyncio's SSL protocol) of which a few
    KiB are ever written: mmapped, the untouched pages cost nothing, but
    glibc raises its threshold when the first such buffer is freed, and from
    then on they come from the heap, where more of each stays resident
    (figures: bench/README.md, TLS)."""
    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):     # not glibc: nothing to tune
        pass


def _busy(conn: socket.socket, tls_port: bool = False) -> None:
    """Over MaxConnections: 421, then close.  On a TLSWrapper port the client
    expects a TLS handshake, not plaintext, and a handshake for a connection
    that gets no slot is work a flood could ask for at will: it is closed
    without a word."""
    try:
        if not tls_port:
            conn.setblocking(False)
            conn.send(R_BUSY)
    except OSError:
        pass
    finally:
        conn.close()


def _malloc_trim():
    """glibc's malloc_trim, or None where there is none (another libc)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
