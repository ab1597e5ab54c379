"""StatsListen: the master serves GET /metrics in Prometheus' text format.

The socket is bound with the SMTP one, before privileges are dropped; a
thread of the master serves it (started after the drop, so it has no
capabilities).  Sessions run in the workers, so a scraper can only ever
cost the master a few threads: at most MAX_SCRAPERS connections are served
at once (more are closed at once), each for at most SCRAPE_TIMEOUT seconds
from its accept to the end of our answer, however it trickles its request;
what is not an HTTP request gets 400 from the stdlib's request parser.
"""

from __future__ import annotations

import http.server
import io
import socket
import socketserver
import threading
import time
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from . import stats
from .log import clean, log
from .stats import LAYOUT, Book

MAX_SCRAPERS = 4             # connections served at once; more are closed unanswered
SCRAPE_TIMEOUT = 10.0        # seconds a scraper gets for its whole request and our answer
# The classic text format, which every Prometheus reads; our names need nothing newer
# (recent prometheus_client versions announce 1.0.0 for the same text).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Collector:
    """prometheus_client collector over the Book's totals; names in proxsmtpd(8)."""

    def __init__(self, book: Book) -> None:
        self.book = book

    def collect(self):
        cells = self.book.totals()
        yield GaugeMetricFamily("proxsmtpd_sessions", "Live SMTP sessions over all workers.",
                                value=cells[LAYOUT.sessions[0]])
        workers = GaugeMetricFamily("proxsmtpd_workers", "Worker processes alive: serving, or "
                                    "retiring (finishing their sessions after a reload).",
                                    labels=["state"])
        for state, count in self.book.workers.items():
            workers.add_metric([state], count)
        yield workers
        yield GaugeMetricFamily("proxsmtpd_max_connections",
                                "The MaxConnections setting: sessions allowed at once.",
                                value=self.book.max_connections)
        yield _counter("proxsmtpd_connections", "Connections by what became of them: accepted "
                       "(the server was tried), busy (421, MaxConnections reached), refused "
                       "(turned away before that).",
                       "result", LAYOUT.connections, cells)
        yield _counter("proxsmtpd_messages", "Messages by the status word of their log line.",
                       "status", LAYOUT.messages, cells)
        yield _counter("proxsmtpd_server_errors", "Failures of the server connection: connect, "
                       "closed (unasked), timeout.", "reason", LAYOUT.server_errors, cells)
        yield _counter("proxsmtpd_proxy_headers", "ProxyProtocol: headers naming the "
                       "client (proxied) or none (local), and connections without one: closed, "
                       "invalid, refused (peer not in ProxyProtocolFrom).", "result",
                       LAYOUT.proxy_headers, cells)
        yield _counter("proxsmtpd_client_tls", "TLS handshakes with clients (STARTTLS or "
                       "TLSWrapper): established, failed.", "result", LAYOUT.client_tls, cells)
        yield _counter("proxsmtpd_server_tls", "TLS to the server at the first EHLO: "
                       "established, failed (handshake, or plaintext behind its 220), refused "
                       "(STARTTLS answered with an error), not_offered.", "result",
                       LAYOUT.server_tls, cells)
        yield _counter("proxsmtpd_tls_resumed", "TLS handshakes as the client that resumed "
                       "a kept session: with the server, with the filter node.", "peer",
                       LAYOUT.tls_resumed, cells)
        yield _histogram("proxsmtpd_filter_duration_seconds", "Time the filter took per message.",
                         stats.FILTER_BUCKETS, LAYOUT.filter, cells)
        yield _histogram("proxsmtpd_message_size_bytes", "Size of the messages received, in bytes.",
                         stats.SIZE_BUCKETS, LAYOUT.size, cells)
        yield self._milter_actions(cells)
        steps = HistogramMetricFamily("proxsmtpd_milter_duration_seconds", "Time the session "
                                      "waited for each milter step, by stage.", labels=["stage"])
        for stage, start in LAYOUT.milter_steps.items():
            buckets, total = _buckets(stats.MILTER_BUCKETS, start, cells)
            steps.add_metric([stage], buckets, sum_value=total)
        yield steps

    def _milter_actions(self, cells: list[float]) -> CounterMetricFamily:
        family = CounterMetricFamily("proxsmtpd_milter_actions", "What each milter answered or "
                                     "did to messages (accept, reject, discard, addheader, ...; "
                                     "default:<action> when MilterDefaultAction applied).",
                                     labels=["milter", "action"])
        width = len(stats.MILTER_ACTIONS)
        names = list(self.book.milters)
        names += [stats.OTHER_MILTER] if len(names) == stats.MAX_MILTERS - 1 else []
        for row, milter in enumerate(names):
            start = LAYOUT.milter_actions + row * width
            for number, action in enumerate(stats.MILTER_ACTIONS):
                family.add_metric([milter, action], cells[start + number])
        return family


def _counter(name: str, documentation: str, label: str, where: dict[str, int],
             cells: list[float]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, cell in where.items():
        family.add_metric([value], cells[cell])
    return family


def _histogram(name: str, documentation: str, bounds: tuple[float, ...], start: int,
               cells: list[float]) -> HistogramMetricFamily:
    buckets, total = _buckets(bounds, start, cells)
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=total)


def _buckets(bounds: tuple[float, ...], start: int,
             cells: list[float]) -> tuple[list[tuple[str, float]], float]:
    """A histogram's cumulative buckets from its cells, and its sum."""
    buckets, total = [], 0.0
    for number, bound in enumerate((*bounds, float("inf"))):
        total += cells[start + number]
        buckets.append(("+Inf" if bound == float("inf") else _number(bound), total))
    return buckets, cells[start + len(bounds) + 1]


def _number(value: float) -> str:
    return str(int(value)) if value.is_integer() else str(value)


class _Deadline(io.RawIOBase):
    """A scraper's socket read until one deadline.  A socket timeout alone
    bounds each recv, so a byte every few seconds would hold the connection
    (and one of the MAX_SCRAPERS places) for ever."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self.sock = sock
        self.deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("scrape took longer than %g seconds" % SCRAPE_TIMEOUT)
        self.sock.settimeout(left)
        return self.sock.recv_into(buffer)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    default_request_version = "HTTP/1.0"    # junk is answered with a status line too
    timeout = SCRAPE_TIMEOUT

    def setup(self) -> None:
        self.deadline = time.monotonic() + SCRAPE_TIMEOUT
        super().setup()
        self.rfile.close()
        self.rfile = io.BufferedReader(_Deadline(self.connection, self.deadline))

    def end_headers(self) -> None:
        """The answer gets what is left of the deadline (the request took the rest)."""
        self.connection.settimeout(max(0.001, self.deadline - time.monotonic()))
        super().end_headers()

    def version_string(self) -> str:
        return "proxsmtpd"

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, send_body: bool) -> None:
        if urlsplit(self.path).path != "/metrics":
            self.send_error(404, explain="proxsmtpd serves /metrics")
            return
        body = generate_latest(self.server.registry)
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("stats: %s", clean(format % args))


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """HTTPServer on a socket bound elsewhere, with a bound on its threads."""

    daemon_threads = True

    def __init__(self, sock: socket.socket, registry: CollectorRegistry) -> None:
        socketserver.BaseServer.__init__(self, sock.getsockname(), _Handler)
        self.socket = sock
        self.registry = registry
        self._room = threading.BoundedSemaphore(MAX_SCRAPERS)

    def process_request(self, request, client_address) -> None:
        if not self._room.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._room.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._room.release()

    def handle_error(self, request, client_address) -> None:
        log.debug("stats: a scraper's connection failed")


class Exporter:
    """The /metrics endpoint on a bound socket; `start(book)` once privileges are
    dropped and the Book exists (after daemonizing: see SharedSlots)."""

    def __init__(self, sock: socket.socket) -> None:
        self.server = _Server(sock, CollectorRegistry(auto_describe=False))
        self._thread: threading.Thread | None = None

    def start(self, book: Book) -> None:
        self.server.registry.register(Collector(book))
        self._thread = threading.Thread(target=self.server.serve_forever, name="stats",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self.server.shutdown()
            self._thread = None
        self.server.server_close()

