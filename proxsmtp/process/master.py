"""The master process (after gunicorn's arbiter): bind, detach, drop root, pre-fork.

The master binds the listening socket, becomes a daemon unless -d was
given, writes the pid file, drops to `User:` and forks `Workers` workers
that share the socket and one MaxConnections semaphore (process/pool.py
keeps them).  It then only supervises: a worker that dies is logged, its
slots are reclaimed and it is replaced; SIGHUP re-reads the configuration
and replaces the workers (old ones finish their sessions first);
SIGTERM/SIGINT stop everything.  A reload is logged complete once every new
worker accepts and every old one has stopped accepting (each says so in the
shared slot books): from then on no connection can reach a worker with the
old settings.
"""

from __future__ import annotations

import os
import select
import signal

import prctl
from setproctitle import setproctitle

from .. import __version__
from . import config as configuration
from . import listener
from . import log as logs
from . import privileges, stats
from .config import Config
from .log import log
from .pool import CONTROL_SIGNALS, WorkerPool
from .startup import Launcher, PidFile, open_stats

RELOAD_POLL = 0.02          # seconds between looks at a reload under way
# Settings bound or applied once, at the start: a reload keeps their values.
RESTART_ONLY = ("Listen", "TransparentProxy", "User", "PidFile", "StatsListen")


class Master:
    """Owns the listening socket and the workers' pool; see the module docstring."""

    def __init__(self, config: Config, options) -> None:
        self.config = config
        self.config_file = os.path.abspath(options.config_file)
        self.foreground = options.debug is not None
        self.sock = None
        self.stats_sock = None
        self.exporter = None
        self.pool: WorkerPool | None = None
        self.launcher = Launcher()
        self.pid_file = PidFile(options.pid_file)
        self.signals: list[int] = []
        self.reloading = False          # reloaded, but not yet complete (pool.reload_done)
        self._wake_r = self._wake_w = -1

    def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT, stop: 0, or 1 (2 for an unknown
        User) when the start fails."""
        signal.pthread_sigmask(signal.SIG_BLOCK, CONTROL_SIGNALS)
        try:
            if self.config.User and os.geteuid() == 0:
                privileges.lookup(self.config.User)
            self.sock = listener.create(self.config)
            self.stats_sock, self.exporter = open_stats(self.config)
        except (listener.ListenError, privileges.PrivilegeError) as exc:
            log.error("%s", exc)
            return 2 if isinstance(exc, privileges.PrivilegeError) else 1
        if not self.foreground:
            self.launcher.daemonize([sock.fileno() for sock in (self.sock, self.stats_sock)
                                     if sock is not None])
        book = None                     # what workers count, when StatsListen is set
        if self.exporter is not None:
            book = stats.Book()
            book.max_connections = self.config.MaxConnections
            book.name_milters(milter.spec for milter in self.config.milters)
        self.pool = WorkerPool(self.config, self.sock, book, self._leave_master)
        _preload()
        try:
            self.pid_file.write(self.config.User)
            privileges.drop(self.config.User)
        except (OSError, privileges.PrivilegeError) as exc:
            if isinstance(exc, OSError):    # from the pid file
                exc = "couldn't write pid file %s: %s" % (self.pid_file.path, exc.strerror)
            log.error("%s", exc)
            self.launcher.tell("%s" % exc)
            self.pid_file.remove()
            return 1
        try:    # however the start or the run ends, the pid file goes
            self.serve(book)
        finally:
            self.pid_file.remove()
        logs.notice("stopped")
        return 0

    def serve(self, book: stats.Book | None) -> None:
        """Privileges dropped: the metrics thread, the signals, the first
        workers, the launcher told, then the supervision loop."""
        if self.exporter is not None:
            self.exporter.start(book)   # without capabilities, with our signals blocked
        self.install_signals()
        prctl.set_child_subreaper(True)     # a dead worker's filters become ours
        setproctitle("proxsmtpd: master -f %s" % self.config_file)
        self.pool.maintain()
        self.pool.count_workers()
        logs.notice("proxsmtpd %s started: %s", __version__, self.summary())
        self.launcher.tell("")
        self.supervise()

    def summary(self) -> str:
        """The settings an operator looks for first, for the start and reload lines."""
        config = self.config
        parts = ["Listen %s" % config.Listen]
        if config.TransparentProxy != "off":
            parts.append("TransparentProxy %s" % config.TransparentProxy)
        else:
            parts.append("OutAddress %s" % config.OutAddress)
        parts.append("%d worker%s, MaxConnections %d" % (
            config.workers, "" if config.workers == 1 else "s", config.MaxConnections))
        if config.StatsListen is not None:
            parts.append("metrics at %s/metrics" % config.StatsListen)
        return ", ".join(parts)

    # --- signals ----------------------------------------------------------------

    def install_signals(self) -> None:
        """Handlers only note the signal and wake the loop (a self-pipe); the
        loop acts on it."""
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, self._on_signal)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, CONTROL_SIGNALS)

    def _on_signal(self, signum: int, frame) -> None:
        self.signals.append(signum)

    def _leave_master(self) -> None:
        """In a forked worker: what only the master holds is closed there."""
        signal.set_wakeup_fd(-1)
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self.launcher.forget()
        if self.stats_sock is not None:
            self.stats_sock.close()

    def supervise(self) -> None:
        """The loop: wake on a signal (SIGCHLD included) or every second, act on
        the signals, reap and replace workers, say when a reload is complete."""
        while True:
            try:    # a reload under way is looked at more often, to say when it is complete
                select.select([self._wake_r], [], [], RELOAD_POLL if self.reloading else 1.0)
            except InterruptedError:
                pass
            try:
                while os.read(self._wake_r, 512):
                    pass
            except BlockingIOError:
                pass
            while self.signals:
                signum = self.signals.pop(0)
                if signum in (signal.SIGTERM, signal.SIGINT):
                    logs.notice("received %s, stopping", signal.Signals(signum).name)
                    self.stop()
                    return
                if signum == signal.SIGHUP:
                    self.reload()
            self.pool.reap()
            self.pool.slots.collect_debt()
            self.pool.maintain()
            self.pool.count_workers()
            if self.reloading and self.pool.reload_done():
                self.reloading = False
                logs.notice("reload complete: new connections get the new configuration")

    def reload(self) -> None:
        """SIGHUP: new workers with the new settings; old ones finish their sessions."""
        try:
            new = configuration.load(self.config_file)
        except configuration.ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            return
        for name in RESTART_ONLY:
            running = getattr(self.config, name)
            if getattr(new, name) != running:
                log.warning("%s changes need a restart; keeping %s", name, running)
                setattr(new, name, running)
        if new.ProxyProtocol and new.TransparentProxy != "off":
            log.error("reload failed, keeping the running configuration: ProxyProtocol can't "
                      "be on with TransparentProxy, which stays %s until a restart",
                      new.TransparentProxy)
            return
        for warning in new.warnings:
            log.warning("%s", warning)
        self.config = new
        self.pool.reload(new)
        self.reloading = True
        logs.notice("reloaded configuration from %s: %s", self.config_file, self.summary())

    def stop(self) -> None:
        """Stop accepting, let workers finish their sessions (bounded), exit."""
        self.sock.close()
        if self.exporter is not None:
            self.exporter.stop()
        self.pool.stop()


def _preload() -> None:
    """Import now what sessions import lazily: after the switch to `User:` the
    interpreter's own library directory may no longer be readable."""
    import concurrent.futures.thread  # noqa: F401
    import encodings.idna  # noqa: F401
    import multiprocessing.synchronize  # noqa: F401
    import tempfile  # noqa: F401
    import unicodedata  # noqa: F401


def run(config: Config, options) -> int:
    """Entry point from the command line."""
    return Master(config, options).run()
