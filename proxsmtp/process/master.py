"""The master process (after gunicorn's arbiter): bind, detach, drop root, pre-fork.

The master binds the listening socket, becomes a daemon unless -d was
given, writes the pid file, drops to `User:` and forks `Workers` workers
that share the socket and one MaxConnections semaphore.  It then only
supervises: a worker that dies is logged, its slots are reclaimed and it
is replaced; SIGHUP re-reads the configuration and replaces the workers
(old ones finish their sessions first); SIGTERM/SIGINT stop everything.
A reload is logged complete once every new worker accepts and every old
one has stopped accepting (each says so in the shared slot books): from
then on no connection can reach a worker with the old settings.

Retired workers are bounded: at most `Workers` x GENERATIONS worker
processes live at any time.  Idle sessions kept open (a NOOP now and then
is enough) would otherwise pin every generation of workers a reload leaves
behind, until the worker table and memory run out.  When a reload needs
room, the oldest retired workers are drained (SIGUSR2): they close their
idle sessions with 421 at once and every other one as soon as its message
is done.  Until there is room, old workers keep accepting in place of the
new ones, so the cap holds without ever leaving the socket unserved.
"""

from __future__ import annotations

import errno
import itertools
import os
import select
import signal
import sys
import time
from dataclasses import dataclass

import daemon
import prctl
from setproctitle import setproctitle

from .. import __version__
from ..message import spool
from ..session import session
from ..smtp.replies import FINAL_REPLY_WAIT
from . import config as configuration
from . import listener
from . import log as logs
from . import privileges, stats
from .config import Config
from .log import log
from .slots import SessionIds, SharedSlots
from .worker import SHUTDOWN_GRACE, Worker

READY_TIMEOUT = 60.0        # how long `proxsmtpd` waits for its daemon to be ready
# Held back while handlers are not in place (start-up, and a fork until the
# worker's own handlers exist), so that none is lost or kills us half-started.
CONTROL_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2}
GENERATIONS = 3             # workers alive at most: Workers x this (current + two retired)
RELOAD_POLL = 0.02          # seconds between looks at a reload under way


@dataclass
class WorkerInfo:
    index: int              # its place in the shared slot books
    number: int             # shown in its process title
    started: float
    generation: int = 0     # the configuration it runs (one per reload)
    retiring: bool = False  # told to stop accepting (SIGUSR1)
    draining: bool = False  # told to close its idle sessions too (SIGUSR2)
    tempdir: str = ""       # its TempDirectory, to clean up after it


class Master:
    """Owns the listening socket and the workers; see the module docstring."""

    def __init__(self, config: Config, options) -> None:
        self.config = config
        self.options = options
        self.config_file = os.path.abspath(options.config_file)
        self.sock = None
        self.stats_sock = None
        self.slots: SharedSlots | None = None
        self.session_ids: SessionIds | None = None
        self.book: stats.Book | None = None     # what workers count, when StatsListen is set
        self.exporter = None
        self.workers: dict[int, WorkerInfo] = {}
        self.signals: list[int] = []
        self.numbers = itertools.count(1)
        self.generation = 0
        self.reloading = False          # reloaded, but not yet complete (reload_done)
        self.ready_fd = -1
        self.pid_file = options.pid_file
        self._wake_r = self._wake_w = -1
        self._backoff_until = 0.0

    # --- start-up -------------------------------------------------------------

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, CONTROL_SIGNALS)
        try:
            if self.config.User and os.geteuid() == 0:
                privileges.lookup(self.config.User)
            self.sock = listener.create(self.config)
            self.open_stats()
        except (listener.ListenError, privileges.PrivilegeError) as exc:
            log.error("%s", exc)
            return 2 if isinstance(exc, privileges.PrivilegeError) else 1
        if self.options.debug is None:
            self.daemonize()
        self.slots = SharedSlots(self.config.MaxConnections)
        self.session_ids = SessionIds()
        if self.exporter is not None:
            self.book = stats.Book()
            self.book.max_connections = self.config.MaxConnections
        _preload()
        try:
            self.write_pid_file()
            privileges.drop(self.config.User)
        except (OSError, privileges.PrivilegeError) as exc:
            if isinstance(exc, OSError):    # from the pid file
                exc = "couldn't write pid file %s: %s" % (self.pid_file, exc.strerror)
            log.error("%s", exc)
            self.tell_launcher("%s" % exc)
            self.remove_pid_file()
            return 1
        try:    # however the start or the run ends, the pid file goes
            if self.exporter is not None:
                self.exporter.start(self.book)  # without capabilities, with our signals blocked
            self.install_signals()
            prctl.set_child_subreaper(True)     # a dead worker's filters become ours
            setproctitle("proxsmtpd: master -f %s" % self.config_file)
            self.maintain()
            self.count_workers()
            logs.notice("proxsmtpd %s started: %s", __version__, self.summary())
            self.tell_launcher("")
            self.supervise()
        finally:
            self.remove_pid_file()
        logs.notice("stopped")
        return 0

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

    def open_stats(self) -> None:
        """StatsListen: bound with Listen, before privileges are dropped; served
        by a thread started once they are."""
        self.stats_sock = listener.create_stats(self.config)
        if self.stats_sock is None:
            return
        try:
            from .exporter import Exporter  # prometheus_client only when asked for
        except ImportError as exc:
            raise listener.ListenError("StatsListen needs the prometheus_client package "
                                       "(python3-prometheus-client): %s" % exc) from None
        self.exporter = Exporter(self.stats_sock)

    def daemonize(self) -> None:
        """Detach; the launching process exits 0 only once we report ready."""
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
        keep = [sock.fileno() for sock in (self.sock, self.stats_sock) if sock is not None]
        context = daemon.DaemonContext(files_preserve=[*keep, self.ready_fd],
                                       working_directory="/", umask=0o022, signal_map={})
        context.open()
        logs.setup_syslog()
        log.debug("running as a daemon")

    def tell_launcher(self, error: str) -> None:
        """Report readiness (or the reason we could not start) to `proxsmtpd`."""
        if self.ready_fd >= 0:
            try:
                os.write(self.ready_fd, error.encode() if error else b"ready")
            except OSError:
                pass
            os.close(self.ready_fd)
            self.ready_fd = -1

    def write_pid_file(self) -> None:
        """Written as root, and handed to `User:` so that it can be emptied at exit
        even where the directory (e.g. /run) does not let that user remove it."""
        if self.pid_file:
            with open(self.pid_file, "w") as handle:
                handle.write("%d\n" % os.getpid())
                if self.config.User and os.geteuid() == 0:
                    entry = privileges.lookup(self.config.User)
                    os.fchown(handle.fileno(), entry.pw_uid, entry.pw_gid)

    def remove_pid_file(self) -> None:
        if not self.pid_file:
            return
        try:
            os.unlink(self.pid_file)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("couldn't remove pid file: %s: %s (emptied it)", self.pid_file, exc.strerror)
            try:    # so that nothing reads a pid there that is gone
                open(self.pid_file, "w").close()
            except OSError:
                pass

    def install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, self._on_signal)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, CONTROL_SIGNALS)

    def _on_signal(self, signum: int, frame) -> None:
        self.signals.append(signum)

    # --- supervision ------------------------------------------------------------

    def supervise(self) -> None:
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
            self.reap()
            self.slots.collect_debt()
            self.maintain()
            self.count_workers()
            if self.reloading and self.reload_done():
                self.reloading = False
                logs.notice("reload complete: new connections get the new configuration")

    def reap(self) -> None:
        """Collect exited workers; one that died unasked for is logged."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            info = self.workers.pop(pid, None)
            if info is None:
                continue
            lost = self.slots.reclaim(info.index)
            if self.book is not None:
                self.book.retire(info.index)
            self.clean_up_after(pid, info, os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0)
            if info.retiring:
                log.debug("worker %d (pid %d) finished", info.number, pid)
                continue
            if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
                logs.notice("worker %d (pid %d) was stopped from outside, replacing it",
                            info.number, pid)
            else:
                how = ("killed by signal %d" % os.WTERMSIG(status) if os.WIFSIGNALED(status)
                       else "exited with code %d" % os.WEXITSTATUS(status))
                log.error("worker %d (pid %d) %s; %d sessions lost, replacing it",
                          info.number, pid, how, lost)
            if time.monotonic() - info.started < 1.0:
                self._backoff_until = time.monotonic() + 1.0   # crashing at start: don't spin

    def clean_up_after(self, pid: int, info: WorkerInfo, clean_exit: bool) -> None:
        """What a worker killed mid-message (SIGKILL, a crash) could not clean up
        itself: its filters, adopted by the master (a child subreaper), and its
        temp files, named after its pid (spool.prefix)."""
        for orphan in [] if clean_exit else _adopted(os.getpid(), set(self.workers)):
            log.warning("killing filter process %d left behind by worker %d (pid %d)",
                        orphan, info.number, pid)
            _kill_group(orphan)
        for name in spool.remove_orphans(info.tempdir, pid):
            log.warning("removed temp file %s left behind by worker %d (pid %d)",
                        name, info.number, pid)

    def maintain(self) -> None:
        """Keep `Workers` workers of the current configuration running, within
        the cap of `Workers` x GENERATIONS live workers (see the module docstring).

        Workers of an older configuration that still accept ("stale") are
        retired one by one as their replacements start; the oldest retired
        workers are drained as far as the replacements need room."""
        wanted = self.config.workers
        cap = wanted * GENERATIONS
        accepting = sorted((info.number, pid) for pid, info in self.workers.items()
                           if not info.retiring)
        current = [pid for _, pid in accepting if self.workers[pid].generation == self.generation]
        stale = [pid for _, pid in accepting if self.workers[pid].generation != self.generation]
        for pid in current[wanted:]:
            self.retire(pid)
        missing = max(0, wanted - len(current))
        keep = len(stale) - missing         # stale workers beyond those still needed
        for pid in stale[:max(0, keep)]:
            self.retire(pid)
        stale = stale[max(0, keep):]
        draining = sum(info.draining for info in self.workers.values())
        excess = len(self.workers) - draining + missing - cap
        if excess > 0:
            quiet = sorted((info.number, pid) for pid, info in self.workers.items()
                           if info.retiring and not info.draining)
            for _, pid in quiet[:excess]:
                self.drain(pid, cap)
        if missing == 0 or time.monotonic() < self._backoff_until:
            return
        for _ in range(missing):
            if len(self.workers) >= cap:
                log.debug("%d workers alive (at most %d): %d new ones wait for old ones to finish",
                          len(self.workers), cap, missing)
                return
            if not self.spawn():
                return
            missing -= 1
            if stale:
                self.retire(stale.pop(0))

    def reload_done(self) -> bool:
        """Every worker of the new configuration accepts, and no older one does
        (each has taken itself off the listening socket, see Worker.stop): a
        connection made from now on can only reach a worker with the new
        settings."""
        current = 0
        for info in self.workers.values():
            accepting = self.slots.accepting(info.index)
            if info.generation != self.generation or info.retiring:
                if accepting:
                    return False
            elif not accepting:
                return False
            else:
                current += 1
        return current >= self.config.workers

    def count_workers(self) -> None:
        """For /metrics: workers serving, and retiring (finishing their sessions)."""
        if self.book is not None:
            retiring = sum(info.retiring for info in self.workers.values())
            self.book.workers = {"serving": len(self.workers) - retiring, "retiring": retiring}

    def spawn(self) -> bool:
        """Fork a worker of the current configuration; False (logged, and retried
        a second later) if that is not possible now: the master must not die of it."""
        try:
            index = self.slots.free_index({info.index for info in self.workers.values()})
        except RuntimeError as exc:
            log.error("can't start a worker: %s", exc)
            self._backoff_until = time.monotonic() + 1.0
            return False
        number = next(self.numbers)
        self.slots.reset(index)
        if self.book is not None:
            self.book.attach(index)
        signal.pthread_sigmask(signal.SIG_BLOCK, CONTROL_SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, CONTROL_SIGNALS)
            log.error("can't start a worker: %s", exc.strerror)
            self._backoff_until = time.monotonic() + 1.0
            return False
        if pid:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, CONTROL_SIGNALS)
            self.workers[pid] = WorkerInfo(index, number, time.monotonic(), self.generation,
                                           tempdir=self.config.TempDirectory)
            return True
        code = 1
        try:
            self._become_worker(index, number)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:
            log.error("worker %d failed: %s", number, exc)
        finally:
            os._exit(code)

    def _become_worker(self, index: int, number: int) -> None:
        master = os.getppid()
        signal.set_wakeup_fd(-1)
        for fd in (self._wake_r, self._wake_w, self.ready_fd):
            if fd >= 0:
                os.close(fd)
        if self.stats_sock is not None:
            self.stats_sock.close()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        prctl.set_pdeathsig(signal.SIGTERM)
        if os.getppid() != master:
            return
        self.slots.bind(index)
        if self.book is not None:
            self.book.bind(index)
        session.set_id_source(self.session_ids.ids())
        title = "proxsmtpd: worker %d" % number

        def show(sessions: int) -> None:
            setproctitle("%s [%d sessions]" % (title, sessions))

        show(0)
        Worker(self.config, self.sock, self.slots, on_change=show).run()

    def retire(self, pid: int) -> None:
        """Ask a worker to stop accepting and exit once its sessions are done."""
        info = self.workers.get(pid)
        if info is not None and not info.retiring:
            info.retiring = True
            _kill(pid, signal.SIGUSR1)

    def drain(self, pid: int, cap: int) -> None:
        """Ask a retired worker to close its idle sessions now (421), every other
        one once its message is done, and exit: room for newer workers."""
        info = self.workers[pid]
        info.draining = True
        logs.notice("worker %d (pid %d): closing its idle sessions to keep at most %d workers",
                    info.number, pid, cap)
        _kill(pid, signal.SIGUSR2)

    # --- signals ----------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: new workers with the new settings; old ones finish their sessions."""
        try:
            new = configuration.load(self.config_file)
        except configuration.ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            return
        for name in ("Listen", "TransparentProxy", "User", "PidFile", "StatsListen"):
            if getattr(new, name) != getattr(self.config, name):
                log.warning("%s changes need a restart; keeping %s", name, getattr(self.config, name))
                setattr(new, name, getattr(self.config, name))
        if new.ProxyProtocol and new.TransparentProxy != "off":
            log.error("reload failed, keeping the running configuration: ProxyProtocol can't "
                      "be on with TransparentProxy, which stays %s until a restart",
                      new.TransparentProxy)
            return
        for warning in new.warnings:
            log.warning("%s", warning)
        self.slots.resize(new.MaxConnections)
        if self.book is not None:
            self.book.max_connections = new.MaxConnections
        self.config = new
        self.generation += 1                # the running workers are now stale
        self._backoff_until = 0.0
        self.maintain()
        self.reloading = True
        logs.notice("reloaded configuration from %s: %s", self.config_file, self.summary())

    def stop(self) -> None:
        """Stop accepting, let workers finish their sessions (bounded), exit."""
        self.sock.close()
        if self.exporter is not None:
            self.exporter.stop()
        for pid, info in self.workers.items():
            info.retiring = True
            _kill(pid, signal.SIGTERM)
        # a worker may wait out a final reply after its grace (worker.py)
        deadline = time.monotonic() + SHUTDOWN_GRACE + FINAL_REPLY_WAIT + 10
        while self.workers and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.05)
        for pid in list(self.workers):
            log.warning("worker pid %d did not stop, killing it", pid)
            _kill(pid, signal.SIGKILL)
        while self.workers:
            try:
                pid, _ = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            self.workers.pop(pid, None)


def _adopted(master: int, workers: set[int]) -> list[int]:
    """Live children of the master that are not workers: orphaned filters."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in workers:
            continue
        try:
            with open("/proc/%s/stat" % entry) as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == master and fields[0] != "Z":
            found.append(int(entry))
    return found


def _kill_group(pid: int) -> None:
    """SIGKILL a filter's process group (a filter leads its own), or just it."""
    try:
        group = os.getpgid(pid)
        if group == pid:
            os.killpg(group, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
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
