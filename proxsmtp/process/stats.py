"""What the gateway counts for /metrics: workers add to shared memory, the master sums.

Each worker owns one row of a shared array of doubles, at the same index as
its MaxConnections books (slots.py), and is the only writer of that row; a
count costs one in-process addition, no system call, no lock and no message
to the master.  The master (exporter.py) sums the rows when scraped.  When
a worker exits, however it died (SIGKILL included: its counts are already in
shared memory), the master folds its counters into its own `retired` totals
and clears the row before the index is used again, under the lock the
scrape takes: counters never go backwards and lose nothing, and the dead
worker's sessions gauge goes with it.

prometheus_client's own multiprocess mode was the alternative.  It keeps one
mmap'd file per process and metric type in a directory that must be named
in the environment before the library is imported; the files of every
replaced worker must stay (their counters count), so the directory, and the
work of every scrape, grows with each reload.  Here the memory is fixed
(MAX_WORKER_SLOTS rows) and the library only formats the totals.

The recording functions (`connection`, `message`, ...) are no-ops until a
worker is bound to a Book, i.e. whenever StatsListen is off.
"""

from __future__ import annotations

import bisect
import multiprocessing
import threading
from typing import Iterable

from .slots import MAX_WORKER_SLOTS

CONNECTION_RESULTS = ("accepted", "busy", "refused")
MESSAGE_STATUSES = ("FILTERED", "REJECTED", "SKIPPED", "FILTER-ERROR", "DISCARDED")
SERVER_ERRORS = ("connect", "closed", "timeout")
PROXY_RESULTS = ("proxied", "local", "closed", "invalid", "refused")
CLIENT_TLS_RESULTS = ("established", "failed")
SERVER_TLS_RESULTS = ("established", "failed", "refused", "not_offered")
TLS_RESUMED_PEERS = ("server", "filter")
FILTER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
SIZE_BUCKETS = tuple(float(1024 * 4 ** n) for n in range(10))      # 1 KiB .. 256 MiB
# Milters: what each one did (its spec is the label), and how long the
# session waited for each step, by stage.  The specs get their rows in the
# master (Book.name_milters) before workers fork; a spec beyond the first
# MAX_MILTERS - 1 named since the start is counted as OTHER_MILTER.
MILTER_ACTIONS = ("accept", "continue", "reject", "tempfail", "replycode", "discard",
                  "quarantine", "addheader", "insheader", "chgheader", "replbody", "chgfrom",
                  "addrcpt", "delrcpt", "default:tempfail", "default:accept", "default:reject")
MILTER_STAGES = ("connect", "helo", "mail", "rcpt", "data", "message")
MILTER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0,
                  300.0)
MAX_MILTERS = 8
OTHER_MILTER = "other"


class _Layout:
    """Where each value lives in a row: the gauge first, then the counters."""

    def __init__(self) -> None:
        self.width = 0
        self.sessions = self._take(1)
        self.connections = dict(zip(CONNECTION_RESULTS, self._take(len(CONNECTION_RESULTS))))
        self.messages = dict(zip(MESSAGE_STATUSES, self._take(len(MESSAGE_STATUSES))))
        self.server_errors = dict(zip(SERVER_ERRORS, self._take(len(SERVER_ERRORS))))
        self.proxy_headers = dict(zip(PROXY_RESULTS, self._take(len(PROXY_RESULTS))))
        self.client_tls = dict(zip(CLIENT_TLS_RESULTS, self._take(len(CLIENT_TLS_RESULTS))))
        self.server_tls = dict(zip(SERVER_TLS_RESULTS, self._take(len(SERVER_TLS_RESULTS))))
        self.tls_resumed = dict(zip(TLS_RESUMED_PEERS, self._take(len(TLS_RESUMED_PEERS))))
        # a histogram: one cell per bucket (not cumulative), one for +Inf, one for the sum
        self.filter = self._take(len(FILTER_BUCKETS) + 2)[0]
        self.size = self._take(len(SIZE_BUCKETS) + 2)[0]
        # MAX_MILTERS rows of MILTER_ACTIONS cells; a histogram per stage
        self.milter_actions = self._take(MAX_MILTERS * len(MILTER_ACTIONS))[0]
        self.milter_steps = {stage: self._take(len(MILTER_BUCKETS) + 2)[0]
                             for stage in MILTER_STAGES}
        self.counters = range(self.sessions[0] + 1, self.width)

    def _take(self, count: int) -> list[int]:
        cells = list(range(self.width, self.width + count))
        self.width += count
        return cells


LAYOUT = _Layout()
WIDTH = LAYOUT.width

_cells = None        # the shared array, in a worker bound to a Book
_base = 0            # this worker's row offset in it
_milter_rows: dict[str, int] = {}     # a milter's spec -> its row of MILTER_ACTIONS
_MILTER_ACTION_CELLS = {action: cell for cell, action in enumerate(MILTER_ACTIONS)}


# --- in a worker: the recording API ---------------------------------------------

def sessions(count: int) -> None:
    """This worker's live sessions (a gauge)."""
    if _cells is not None:
        _cells[_base + LAYOUT.sessions[0]] = count


def connection(result: str) -> None:
    """A connection was `accepted` (the session tries the server), `busy`
    (MaxConnections: 421) or `refused` (turned away before any server was
    tried: no client address, no usable PROXY header, no original
    destination, a loop)."""
    if _cells is not None:
        _cells[_base + LAYOUT.connections[result]] += 1


def message(status: str, size: int | None = None, filter_seconds: float | None = None) -> None:
    """One message's outcome: the log line's status word, its size in bytes
    and the filter's run time, each where known."""
    if _cells is None:
        return
    _cells[_base + LAYOUT.messages[status]] += 1
    if size is not None:
        _observe(LAYOUT.size, SIZE_BUCKETS, float(size))
    if filter_seconds is not None:
        _observe(LAYOUT.filter, FILTER_BUCKETS, filter_seconds)


def server_error(reason: str) -> None:
    """The server could not be reached (`connect`), closed the connection
    unasked (`closed`) or did not answer in time (`timeout`)."""
    if _cells is not None:
        _cells[_base + LAYOUT.server_errors[reason]] += 1


def proxy_header(result: str) -> None:
    """ProxyProtocol: a header named the client (`proxied`), named none
    (`local`: LOCAL or UNKNOWN, a balancer's check), or there was none: the
    peer closed without a byte (`closed`), sent something else (`invalid`),
    or is not in ProxyProtocolFrom (`refused`)."""
    if _cells is not None:
        _cells[_base + LAYOUT.proxy_headers[result]] += 1


def client_tls(result: str) -> None:
    """A client's TLS handshake (STARTTLS or TLSWrapper) `established` or `failed`."""
    if _cells is not None:
        _cells[_base + LAYOUT.client_tls[result]] += 1


def server_tls(result: str) -> None:
    """TLS to the server (ServerTLS): `established`, handshake `failed` (or
    plaintext injected behind its 220), STARTTLS `refused`, or `not_offered`."""
    if _cells is not None:
        _cells[_base + LAYOUT.server_tls[result]] += 1


def milter_action(milter: str, action: str) -> None:
    """What a milter (its Milters spec) answered or did to a message
    (MILTER_ACTIONS; `default:<action>`: MilterDefaultAction applied)."""
    if _cells is None:
        return
    cell = _MILTER_ACTION_CELLS.get(action)
    if cell is not None:
        row = _milter_rows.get(milter, MAX_MILTERS - 1)
        _cells[_base + LAYOUT.milter_actions + row * len(MILTER_ACTIONS) + cell] += 1


def milter_step(stage: str, seconds: float) -> None:
    """A milter step the session waited for (MILTER_STAGES), and how long."""
    if _cells is not None:
        _observe(LAYOUT.milter_steps[stage], MILTER_BUCKETS, seconds)


def tls_resumed(peer: str) -> None:
    """A TLS handshake as the client, with the `server` or the `filter` node,
    that resumed a kept session (net/tlssessions.py)."""
    if _cells is not None:
        _cells[_base + LAYOUT.tls_resumed[peer]] += 1


def _observe(start: int, bounds: tuple[float, ...], value: float) -> None:
    row = _base + start
    _cells[row + bisect.bisect_left(bounds, value)] += 1
    _cells[row + len(bounds) + 1] += value


# --- in the master ------------------------------------------------------------------

class Book:
    """The shared rows, created by the master before it forks workers."""

    def __init__(self) -> None:
        self._cells = multiprocessing.get_context("fork").RawArray("d", MAX_WORKER_SLOTS * WIDTH)
        self._retired = [0.0] * WIDTH
        self._rows = 0                      # rows ever handed out (free_index keeps them low)
        self._lock = threading.Lock()
        self.workers = {"serving": 0, "retiring": 0}
        self.max_connections = 0
        self.milters: list[str] = []        # the specs counted, by row (the last: OTHER_MILTER)

    def name_milters(self, specs: Iterable[str]) -> None:
        """Before forking workers of a configuration: give its milters their
        rows.  A row stays its milter's across reloads, so a counter never
        changes hands; the last row counts whatever comes after the others."""
        for spec in specs:
            if spec not in self.milters and len(self.milters) < MAX_MILTERS - 1:
                self.milters.append(spec)

    def attach(self, index: int) -> None:
        """Before forking the worker that will own row `index`: start it at zero."""
        with self._lock:
            self._clear(index)
            self._rows = max(self._rows, index + 1)

    def bind(self, index: int) -> None:
        """In the new worker: from now on the recording functions count in its row."""
        global _cells, _base, _milter_rows
        _cells, _base = self._cells, index * WIDTH
        _milter_rows = {spec: row for row, spec in enumerate(self.milters)}

    def retire(self, index: int) -> None:
        """The worker of row `index` has exited: keep its counters, drop its gauge."""
        with self._lock:
            base = index * WIDTH
            for cell in LAYOUT.counters:
                self._retired[cell] += self._cells[base + cell]
            self._clear(index)

    def totals(self) -> list[float]:
        """Every cell summed over the live rows and the retired totals."""
        with self._lock:
            rows = self._cells[:self._rows * WIDTH]
            return [self._retired[cell] + sum(rows[cell::WIDTH]) for cell in range(WIDTH)]

    def _clear(self, index: int) -> None:
        base = index * WIDTH
        self._cells[base:base + WIDTH] = [0.0] * WIDTH


def unbind() -> None:
    """Stop counting in this process (tests; a worker never needs it)."""
    global _cells, _base
    _cells, _base = None, 0
