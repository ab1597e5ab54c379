"""MaxConnections across all workers: one shared semaphore, with per-worker books.

Every worker takes a unit of the semaphore for each live session.  Each
worker also counts its own units in a shared array, so that when a worker
dies (even by SIGKILL) the master can give its units back.  The count goes
up before the semaphore is taken and down after it is given back, so a
worker killed in between errs towards one slot too many, never one lost.
"""

from __future__ import annotations

import multiprocessing
from typing import Iterator

MAX_WORKER_SLOTS = 1024          # workers alive at once, draining ones included
ID_BLOCK = 256                   # session ids a worker takes from SessionIds at a time
ID_LOCK_WAIT = 1.0               # seconds; see SessionIds.ids


class SharedSlots:
    """Created by the master before forking; each worker calls `bind(index)`."""

    def __init__(self, limit: int) -> None:
        ctx = multiprocessing.get_context("fork")
        self.limit = limit
        self._sem = ctx.Semaphore(limit)
        self._counts = ctx.RawArray("i", MAX_WORKER_SLOTS)
        # 1 while a worker watches the listening socket: the master's reload
        # is complete when the new workers do and the old ones no longer do
        self._accepting = ctx.RawArray("b", MAX_WORKER_SLOTS)
        self._index = -1
        self._debt = 0               # units to withdraw after MaxConnections shrank

    # --- in a worker ----------------------------------------------------------

    def bind(self, index: int) -> None:
        self._index = index
        self._counts[index] = 0
        self._accepting[index] = 0

    def set_accepting(self, accepting: bool) -> None:
        """This worker now accepts connections, or has stopped for good."""
        self._accepting[self._index] = accepting

    def acquire(self) -> bool:
        """Take a slot for a new session, without waiting."""
        self._counts[self._index] += 1
        if self._sem.acquire(False):
            return True
        self._counts[self._index] -= 1
        return False

    def release(self) -> None:
        self._sem.release()
        self._counts[self._index] -= 1

    # --- in the master --------------------------------------------------------

    def free_index(self, used: set[int]) -> int:
        for index in range(MAX_WORKER_SLOTS):
            if index not in used:
                return index
        raise RuntimeError("no free worker slot")

    def accepting(self, index: int) -> bool:
        return bool(self._accepting[index])

    def reset(self, index: int) -> None:
        """Before a new worker takes `index`: nothing left from the last one."""
        self._accepting[index] = 0

    def reclaim(self, index: int) -> int:
        """A worker is gone: give back the units it held.  Returns how many."""
        self._accepting[index] = 0
        count = max(0, self._counts[index])
        self._counts[index] = 0
        for _ in range(count):
            self._give_back()
        return count

    def resize(self, limit: int) -> None:
        """A reload changed MaxConnections: grow now, shrink as slots come free."""
        change, self.limit = limit - self.limit, limit
        while change > 0 and self._debt > 0:
            self._debt -= 1
            change -= 1
        for _ in range(max(0, change)):
            self._sem.release()
        self._debt += max(0, -change)
        self.collect_debt()

    def collect_debt(self) -> None:
        while self._debt > 0 and self._sem.acquire(False):
            self._debt -= 1

    def _give_back(self) -> None:
        if self._debt > 0:
            self._debt -= 1
        else:
            self._sem.release()


class SessionIds:
    """Session ids unique over a daemon run.  The master makes one before its
    first fork; every worker, of every configuration a reload brings, takes
    blocks of ID_BLOCK ids from the one shared counter, so that no id is
    handed out twice, however many reloads and replaced workers there are."""

    def __init__(self, block: int = ID_BLOCK) -> None:
        self._next = multiprocessing.get_context("fork").Value("Q", 1)
        self._block = block

    def ids(self) -> Iterator[int]:
        """This worker's ids, in order, a block at a time."""
        lock = self._next.get_lock()
        while True:
            # A worker killed inside these two lines would hold the lock for
            # good; past the wait the others go on without it rather than
            # stop serving (the window is two lines every ID_BLOCK sessions).
            locked = lock.acquire(timeout=ID_LOCK_WAIT)
            try:
                start = self._next.value
                self._next.value = start + self._block
            finally:
                if locked:
                    lock.release()
            yield from range(start, start + self._block)
