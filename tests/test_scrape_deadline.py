"""/metrics under slowloris: each scrape has SCRAPE_TIMEOUT seconds in all,
so scrapers that trickle a byte every few seconds cannot hold every place
for ever and keep the real scraper out."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

import pytest

from harness import free_port, wait_until
from proxsmtp.process import exporter

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def holding_a_place(port: int, stop: threading.Event) -> socket.socket:
    """A connection the exporter serves.  One that comes while a place is
    still held by an earlier scrape (its thread releases the place after the
    scraper has its answer) is closed unanswered; that one is made again."""
    while not stop.is_set():
        sock = socket.create_connection(("127.0.0.1", port), timeout=0.5)
        try:
            refused = sock.recv(1) == b""
        except TimeoutError:    # the exporter waits for the request: a place is held
            sock.settimeout(5)
            return sock
        except OSError:
            refused = True
        sock.close()
        assert refused, "the exporter answered a request never sent"
    raise AssertionError("stopped before a place was held")


def test_slowloris_scrapers_lose_their_place_at_the_deadline(proxy, upstream):
    port = free_port()
    p = proxy({"OutAddress": upstream.address, "StatsListen": "127.0.0.1:%d" % port})
    url = "http://127.0.0.1:%d/metrics" % port
    wait_until(lambda: urllib.request.urlopen(url, timeout=10).status == 200, 10,
               what="the stats port")
    stop = threading.Event()
    trickled = []

    def trickle() -> None:
        """A request that never ends: a byte every second, far inside the
        per-read timeout, for longer than the deadline."""
        with holding_a_place(port, stop) as sock:
            trickled.append(sock)
            for byte in b"GET /metrics HTTP/1.0\r\nX-Slow: " + b"a" * 1000:
                if stop.wait(1):
                    return
                try:
                    sock.send(bytes([byte]))
                except OSError:
                    return

    threads = [threading.Thread(target=trickle, daemon=True) for _ in range(exporter.MAX_SCRAPERS)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(trickled) == exporter.MAX_SCRAPERS, 10, what="the slow scrapers")
        time.sleep(1)

        def scraped() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=5) as answer:
                    return answer.status == 200 and b"proxsmtpd_sessions" in answer.read()
            except OSError:         # closed unanswered: every place is taken
                return False
        started = time.monotonic()
        assert not scraped()        # the slow ones hold every place now...
        # ...but only until their deadline (the ones that came first must go)
        wait_until(scraped, exporter.SCRAPE_TIMEOUT + 10, interval=0.5,
                   what="a scrape beside %d slow scrapers" % exporter.MAX_SCRAPERS)
        assert time.monotonic() - started < exporter.SCRAPE_TIMEOUT + 10
    finally:
        stop.set()
        for thread in threads:
            thread.join(5)
    assert p.proc.poll() is None
