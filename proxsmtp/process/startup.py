"""The master's start-up steps around binding and dropping privileges: the
StatsListen socket, detaching from the terminal (proxsmtpd(8) OPERATION:
the launching `proxsmtpd` exits 0 only once the daemon is ready, else 1
with the reason), and the pid file."""

from __future__ import annotations

import errno
import os
import select
import socket
import sys
import time
from typing import TYPE_CHECKING

import daemon

from . import listener
from . import log as logs
from . import privileges
from .config import Config
from .log import log

if TYPE_CHECKING:
    from .exporter import Exporter

READY_TIMEOUT = 60.0        # how long `proxsmtpd` waits for its daemon to be ready


def open_stats(config: Config) -> tuple[socket.socket | None, Exporter | None]:
    """StatsListen: bound with Listen, before privileges are dropped; served by
    a thread the master starts once they are.  (None, None) without it."""
    sock = listener.create_stats(config)
    if sock is None:
        return None, None
    try:
        from .exporter import Exporter  # prometheus_client only when asked for
    except ImportError as exc:
        raise listener.ListenError("StatsListen needs the prometheus_client package "
                                   "(python3-prometheus-client): %s" % exc) from None
    return sock, Exporter(sock)


class Launcher:
    """The daemon's line back to the `proxsmtpd` that started it: a pipe whose
    one message is `ready` or why the start failed (none with -d)."""

    def __init__(self) -> None:
        self.ready_fd = -1

    def daemonize(self, keep: list[int]) -> None:
        """Detach, keeping the descriptors `keep`; the launching process exits 0
        only once we report ready."""
        missing = logs.syslog_missing()
        if missing:
            sys.stderr.write("proxsmtpd: no syslog daemon to log to (%s); the daemon's log is "
                             "lost until one listens there\n" % missing)
        read_fd, self.ready_fd = os.pipe()
        pid = os.fork()
        if pid:
            os.close(self.ready_fd)
            message = _read_until_closed(read_fd, READY_TIMEOUT)
            os.waitpid(pid, 0)
            if message == b"ready":
                os._exit(0)
            sys.stderr.write("proxsmtpd: %s\n" % (message.decode(errors="replace")
                                                  or "the daemon did not start"))
            os._exit(1)
        os.close(read_fd)
        context = daemon.DaemonContext(files_preserve=[*keep, self.ready_fd],
                                       working_directory="/", umask=0o022, signal_map={})
        context.open()
        logs.setup_syslog()
        log.debug("running as a daemon")

    def tell(self, error: str) -> None:
        """Report readiness (or the reason we could not start) to `proxsmtpd`."""
        if self.ready_fd >= 0:
            try:
                os.write(self.ready_fd, error.encode() if error else b"ready")
            except OSError:
                pass
            self.forget()

    def forget(self) -> None:
        """Close our end of the pipe (told, or in a forked worker)."""
        if self.ready_fd >= 0:
            os.close(self.ready_fd)
            self.ready_fd = -1


class PidFile:
    """-p or PidFile: the master's pid, from start to stop."""

    def __init__(self, path: str | None) -> None:
        self.path = path

    def write(self, user: str | None) -> None:
        """Written as root, and handed to `User:` so that it can be emptied at exit
        even where the directory (e.g. /run) does not let that user remove it."""
        if self.path:
            with open(self.path, "w") as handle:
                handle.write("%d\n" % os.getpid())
                if user and os.geteuid() == 0:
                    entry = privileges.lookup(user)
                    os.fchown(handle.fileno(), entry.pw_uid, entry.pw_gid)

    def remove(self) -> None:
        if not self.path:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("couldn't remove pid file: %s: %s (emptied it)", self.path, exc.strerror)
            try:    # so that nothing reads a pid there that is gone
                open(self.path, "w").close()
            except OSError:
                pass


def _read_until_closed(fd: int, timeout: float) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        try:
            chunk = os.read(fd, 4096)
        except OSError as exc:
            if exc.errno == errno.EINTR:
                continue
            break
        if not chunk:
            break
        data += chunk
    os.close(fd)
    return data
