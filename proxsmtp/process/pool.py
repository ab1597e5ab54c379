"""The master's workers: fork them, reap them, retire and drain them, replace
the ones that die (after gunicorn's arbiter, which keeps its workers the same way).

`Workers` workers of the current configuration run.  A reload makes the
running ones stale: each is retired (SIGUSR1: it stops accepting and exits
once its sessions are done) as a replacement starts.  Retired workers are
bounded: at most `Workers` x GENERATIONS worker processes live at any time.
Idle sessions kept open (a NOOP now and then is enough) would otherwise pin
every generation of workers a reload leaves behind, until the worker table
and memory run out.  When a reload needs room, the oldest retired workers
are drained (SIGUSR2): they close their idle sessions with 421 at once and
every other one as soon as its message is done.  Until there is room, old
workers keep accepting in place of the new ones, so the cap holds without
ever leaving the socket unserved.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import prctl
from setproctitle import setproctitle

from ..message import spool
from ..session import session
from ..smtp.replies import FINAL_REPLY_WAIT
from . import stats
from .config import Config
from .log import log, notice
from .slots import SessionIds, SharedSlots
from .worker import SHUTDOWN_GRACE, Worker

# Held back while handlers are not in place (start-up, and a fork until the
# worker's own handlers exist), so that none is lost or kills us half-started.
CONTROL_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2}
GENERATIONS = 3             # workers alive at most: Workers x this (current + two retired)
BACKOFF = 1.0               # seconds without a new worker after one failed to start


@dataclass
class WorkerInfo:
    index: int              # its place in the shared slot books
    number: int             # shown in its process title
    started: float
    generation: int = 0     # the configuration it runs (one per reload)
    retiring: bool = False  # told to stop accepting (SIGUSR1)
    draining: bool = False  # told to close its idle sessions too (SIGUSR2)
    tempdir: str = ""       # its TempDirectory, to clean up after it


class WorkerPool:
    """The workers of one master, keyed by pid; see the module docstring.

    `leave_master` runs first in each forked worker: it lets go of what only
    the master may hold (its wake-up pipe, the launcher's pipe, StatsListen)."""

    def __init__(self, config: Config, sock: socket.socket, book: stats.Book | None,
                 leave_master: Callable[[], None]) -> None:
        self.config = config
        self.sock = sock
        self.slots = SharedSlots(config.MaxConnections)
        self.session_ids = SessionIds()
        self.book = book                # what workers count, when StatsListen is set
        self.leave_master = leave_master
        self.workers: dict[int, WorkerInfo] = {}
        self.numbers = itertools.count(1)
        self.generation = 0
        self.backoff_until = 0.0

    def reload(self, config: Config) -> None:
        """SIGHUP: the running workers become stale, replaced by workers of `config`."""
        self.slots.resize(config.MaxConnections)
        if self.book is not None:
            self.book.max_connections = config.MaxConnections
            self.book.name_milters(milter.spec for milter in config.milters)
        self.config = config
        self.generation += 1
        self.backoff_until = 0.0
        self.maintain()

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
        if missing == 0 or time.monotonic() < self.backoff_until:
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

    # --- a worker's life ----------------------------------------------------------

    def spawn(self) -> bool:
        """Fork a worker of the current configuration; False (logged, and retried
        a second later) if that is not possible now: the master must not die of it."""
        try:
            index = self.slots.free_index({info.index for info in self.workers.values()})
        except RuntimeError as exc:
            log.error("can't start a worker: %s", exc)
            self.backoff_until = time.monotonic() + BACKOFF
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
            self.backoff_until = time.monotonic() + BACKOFF
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
        """In the forked child: the master's signal handlers go, SIGHUP is the
        master's alone, and the worker dies with the master (a worker whose
        master died before this point returns at once)."""
        master = os.getppid()
        self.leave_master()
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
        notice("worker %d (pid %d): closing its idle sessions to keep at most %d workers",
               info.number, pid, cap)
        _kill(pid, signal.SIGUSR2)

    def reap(self) -> None:
        """Collect exited workers; one that died unasked for is logged (and
        replaced by the next `maintain`, a second later if it died at start)."""
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
                notice("worker %d (pid %d) was stopped from outside, replacing it",
                       info.number, pid)
            else:
                how = ("killed by signal %d" % os.WTERMSIG(status) if os.WIFSIGNALED(status)
                       else "exited with code %d" % os.WEXITSTATUS(status))
                log.error("worker %d (pid %d) %s; %d sessions lost, replacing it",
                          info.number, pid, how, lost)
            if time.monotonic() - info.started < BACKOFF:
                self.backoff_until = time.monotonic() + BACKOFF   # crashing at start: don't spin

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

    def stop(self) -> None:
        """SIGTERM to every worker; wait for them to finish their sessions
        (bounded), then SIGKILL what is left."""
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
