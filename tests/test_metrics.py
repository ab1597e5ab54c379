"""StatsListen: /metrics scraped with a real HTTP client (urllib) and parsed with
prometheus_client's own parser, against a real proxsmtpd with several workers:
counts equal what was sent, the sessions gauge follows held connections,
counters survive a reload and a SIGKILLed worker, and hostile scrapers cost
the mail nothing."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import urllib.error
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from prometheus_client.parser import text_string_to_metric_families

from harness import (REPO, Client, detached, free_port, run_proxsmtpd, send_mail, title,
                     wait_until, write_config)
from proxsmtp.process import exporter, stats
from proxsmtp.net.proxyproto import build


def scrape(px, path: str = "/metrics") -> dict:
    """{(sample name, ((label, value), ...)): value} from GET /metrics."""
    with urllib.request.urlopen("http://%s%s" % (px.stats, path), timeout=10) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = answer.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def scrape_when(px, predicate, what: str) -> dict:
    """The first scrape for which predicate(samples) holds (gauges settle)."""
    return wait_until(lambda: (lambda samples: samples if predicate(samples) else None)(
        scrape(px)), 15, what=what)


def idle(px) -> dict:
    return scrape_when(px, lambda s: value(s, "proxsmtpd_sessions") == 0, "no sessions")


def counters(samples: dict) -> dict:
    return {key: number for key, number in samples.items()
            if key[0].endswith(("_total", "_bucket", "_count", "_sum"))}


@pytest.fixture
def metered(proxy, upstream):
    """Factory: a proxy with StatsListen on a free loopback port (`px.stats`)."""
    def make(settings: dict | None = None, **kwargs):
        port = free_port()
        merged = {"OutAddress": upstream.address, "Workers": 2,
                  "StatsListen": "127.0.0.1:%d" % port}
        merged.update(settings or {})
        px = proxy(merged, **kwargs)
        px.stats = "127.0.0.1:%d" % port
        # The start's own probe (harness.answers) is a session that ends
        # after the proxy returned; a worker's title shows its count only a
        # moment later (worker.TITLE_EVERY), the gauge at once.
        idle(px)
        wait_until(lambda: all("[0 sessions]" in t for t in px.children().values()), 10,
                   what="idle workers")
        return px
    return make


def spread(px) -> list[Client]:
    """One held session on every worker.  Which worker wins an accept is the
    kernel's choice, and on a busy machine one worker can win forty races in
    a row, so the other workers are stopped (SIGSTOP) while each client
    connects: the one left running must be the one that accepts."""
    clients: list[Client] = []
    workers = sorted(px.children())
    for pid in workers:
        others = [other for other in workers if other != pid]
        for other in others:
            os.kill(other, signal.SIGSTOP)
        try:
            clients.append(px.connect())
        finally:
            for other in others:
                os.kill(other, signal.SIGCONT)
        wait_until(lambda: "[0 sessions]" not in title(pid), 10,
                   what="worker %d serving its client" % pid)
    return clients


# --- gauges ------------------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.slow
def test_sessions_gauge_follows_held_connections_and_busy_is_counted(metered):
    px = metered({"MaxConnections": 3})
    before = scrape(px)
    assert value(before, "proxsmtpd_sessions") == 0
    assert value(before, "proxsmtpd_workers", state="serving") == 2
    assert value(before, "proxsmtpd_max_connections") == 3
    held = [px.connect() for _ in range(3)]
    try:
        assert value(scrape(px), "proxsmtpd_sessions") == 3
        with Client(px.host, px.port) as extra:      # the fourth: 421 busy
            assert extra.greeting[0].startswith("421")
        now = scrape(px)
        assert value(now, "proxsmtpd_connections_total", result="busy") == \
            value(before, "proxsmtpd_connections_total", result="busy") + 1
        held.pop().close()
        wait_until(lambda: value(scrape(px), "proxsmtpd_sessions") == 2, 10, what="2 sessions")
    finally:
        for client in held:
            client.close()
    idle(px)


@pytest.mark.e2e
@pytest.mark.slow
def test_metrics_answers_404_elsewhere_and_head(metered):
    px = metered()
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen("http://%s/" % px.stats, timeout=10)
    assert error.value.code == 404
    request = urllib.request.Request("http://%s/metrics?x=1" % px.stats, method="HEAD")
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200 and int(answer.headers["Content-Length"]) > 0


# --- counters over workers, reloads and a killed worker --------------------------------------

@pytest.mark.e2e
@pytest.mark.slow
def test_sigkilled_worker_leaves_no_stale_gauge_and_no_counter_goes_back(metered, upstream):
    px = metered()
    clients = spread(px)
    for client in clients:
        assert send_mail(client, "a@x.test", ["b@y.test"], b"Subject: k\r\n\r\nbody\r\n")[-1] \
            .startswith("250")
    upstream.wait_messages(len(clients))
    before = scrape(px)
    assert value(before, "proxsmtpd_sessions") == len(clients)
    victim = min(px.children())
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in px.children() and len(px.children()) == 2, 15,
               what="the killed worker replaced")
    survivors = sum(int(title(pid).split("[")[1].split()[0]) for pid in px.children())
    after = scrape_when(px, lambda s: value(s, "proxsmtpd_sessions") == survivors,
                        "the dead worker's sessions gone")
    assert value(after, "proxsmtpd_workers", state="serving") == 2
    for key, number in counters(before).items():
        assert after[key] >= number, key
    for client in clients:
        client.close()


@pytest.mark.e2e
@pytest.mark.slow
def test_counters_survive_a_reload(metered, upstream):
    """Messages counted by the old workers stay counted after SIGHUP replaced
    them; a session held across the reload keeps its retiring worker (and the
    gauge) until it ends."""
    px = metered()
    clients = spread(px)
    for client in clients:
        assert send_mail(client, "a@x.test", ["b@y.test"], b"Subject: r\r\n\r\nbody\r\n")[-1] \
            .startswith("250")
    held = clients.pop()
    for client in clients:
        client.close()
    wait_until(lambda: value(scrape(px), "proxsmtpd_sessions") == 1, 10, what="one session")
    before = scrape(px)
    old = set(px.children())
    px.proc.send_signal(signal.SIGHUP)
    px.wait_log(r"reloaded configuration")
    during = scrape_when(px, lambda s: value(s, "proxsmtpd_workers", state="serving") == 2
                         and value(s, "proxsmtpd_workers", state="retiring") == 1,
                         "new workers, one retiring")
    assert value(during, "proxsmtpd_sessions") == 1
    assert counters(during) == counters(before)
    assert send_mail(held, "a@x.test", ["b@y.test"], b"Subject: r\r\n\r\nbody\r\n")[-1] \
        .startswith("250")
    held.close()
    wait_until(lambda: not old & set(px.children()), 15, what="the old workers gone")
    with px.connect() as client:
        assert send_mail(client, "a@x.test", ["b@y.test"], b"Subject: r\r\n\r\nbody\r\n")[-1] \
            .startswith("250")
    after = scrape_when(px, lambda s: value(s, "proxsmtpd_sessions") == 0
                        and value(s, "proxsmtpd_workers", state="retiring") == 0,
                        "no sessions, none retiring")
    messages = ("proxsmtpd_messages_total", (("status", "FILTERED"),))
    assert after[messages] == before[messages] + 2
    accepted = ("proxsmtpd_connections_total", (("result", "accepted"),))
    assert after[accepted] == before[accepted] + 1
    for key, number in counters(before).items():
        assert after[key] >= number, key


# --- messages, connections and server errors, end to end --------------------------------

FILTER = """#!/bin/sh
# FILTERED, unless the message asks to be rejected (550) or to break the filter
m=$(mktemp -p "%s")
cat > "$m"
if grep -q REJECTME "$m"; then rm -f "$m"; echo "550 5.7.1 no thanks" >&2; exit 1; fi
if grep -q FAILME "$m"; then rm -f "$m"; echo "filter broke" >&2; exit 127; fi
cat "$m"
rm -f "$m"
"""


@pytest.mark.e2e
@pytest.mark.slow
def test_messages_counted_by_status_size_and_filter_time_over_several_workers(
        metered, make_upstream, tmp_path):
    upstream = make_upstream(extensions=("AUTH PLAIN",))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    script = tmp_path / "filter.sh"
    script.write_text(FILTER % scratch)
    script.chmod(0o755)
    px = metered({"OutAddress": upstream.address, "FilterCommand": str(script),
                  "Skip": "authenticated"})
    before = scrape(px)
    clients = spread(px)
    sizes = []
    for number, client in enumerate(clients):
        for word in ("fine", "REJECTME", "FAILME"):
            body = b"Subject: %s\r\n\r\n%s\r\n" % (word.encode(), b"x" * (100 * number))
            sizes.append(len(body))
            reply = send_mail(client, "a@x.test", ["b@y.test"], body)[-1]
            assert reply[:3] == {"fine": "250", "REJECTME": "550", "FAILME": "451"}[word], reply
        assert client.cmd("AUTH PLAIN AHVzZXIAcGFzcw==")[0].startswith("235")
        body = b"Subject: skipped\r\n\r\n" + b"y" * 5000 + b"\r\n"
        sizes.append(len(body))
        assert send_mail(client, "a@x.test", ["b@y.test"], body)[-1].startswith("250")
    for client in clients:
        client.close()
    upstream.wait_messages(2 * len(clients))
    after = idle(px)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    n = len(clients)
    for status in ("FILTERED", "REJECTED", "FILTER-ERROR", "SKIPPED"):
        assert grew("proxsmtpd_messages_total", status=status) == n, status
    assert grew("proxsmtpd_connections_total", result="accepted") == n
    assert grew("proxsmtpd_filter_duration_seconds_count") == 3 * n
    assert grew("proxsmtpd_filter_duration_seconds_sum") > 0
    assert grew("proxsmtpd_message_size_bytes_count") == 4 * n
    assert grew("proxsmtpd_message_size_bytes_sum") == sum(sizes)
    assert grew("proxsmtpd_message_size_bytes_bucket", le="4096") == 3 * n
    assert value(after, "proxsmtpd_message_size_bytes_bucket", le="+Inf") == \
        value(after, "proxsmtpd_message_size_bytes_count")


@pytest.mark.e2e
@pytest.mark.slow
def test_server_errors_by_reason(metered, make_upstream):
    """connect: nothing listens; closed: the server hangs up at RCPT (a relayed
    command) or at the final dot (the proxy's own read); timeout: a server that
    never greets (TimeOut 2)."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        cases = [("connect", "127.0.0.1:%d" % free_port(), None),
                 ("closed", make_upstream(drop_at="RCPT").address, "RCPT"),
                 ("closed", make_upstream(drop_at="DATA-END").address, "DATA"),
                 ("timeout", "127.0.0.1:%d" % silent.getsockname()[1], None)]
        for reason, address, until in cases:
            px = metered({"OutAddress": address, "TimeOut": 2, "Workers": 1})
            before = scrape(px)
            with px.connect(timeout=30) as client:
                if until == "RCPT":                 # relayed: the server hangs up instead of a reply
                    assert client.code("EHLO c.test") == 250
                    assert client.code("MAIL FROM:<a@x.test>") == 250
                    client.send("RCPT TO:<b@y.test>\r\n")
                elif until == "DATA":               # at the final dot: the proxy's own read
                    assert send_mail(client, "a@x.test", ["b@y.test"], b"\r\nhi\r\n")[-1] \
                        .startswith("4")
                assert client.closed_by_peer(30)
            after = idle(px)
            for other in stats.SERVER_ERRORS:
                grown = value(after, "proxsmtpd_server_errors_total", reason=other) - \
                    value(before, "proxsmtpd_server_errors_total", reason=other)
                assert grown == (1 if other == reason else 0), (reason, other, grown)
            px.stop()
    finally:
        silent.close()


@pytest.mark.e2e
@pytest.mark.slow
def test_refused_connections_are_counted(metered, upstream):
    """TransparentProxy with a client that connects to the proxy itself: the loop
    is refused before any server is contacted."""
    px = metered({"OutAddress": None, "TransparentProxy": "client", "Workers": 1})
    before = scrape(px)
    with px.connect() as client:
        assert client.closed_by_peer()
    after = idle(px)
    grew = {result: value(after, "proxsmtpd_connections_total", result=result) -
            value(before, "proxsmtpd_connections_total", result=result)
            for result in stats.CONNECTION_RESULTS}
    assert grew == {"accepted": 0, "busy": 0, "refused": 1}
    assert value(after, "proxsmtpd_server_errors_total", reason="connect") == \
        value(before, "proxsmtpd_server_errors_total", reason="connect")


@pytest.mark.e2e
@pytest.mark.slow
def test_proxy_protocol_headers_counted(metered, upstream):
    """Each way a PROXY header can go, once: the header count by result, and
    the connections without a usable one counted as refused."""
    px = metered({"ProxyProtocol": "on", "ProxyProtocolFrom": "127.0.0.1", "Workers": 1})
    before = idle(px)
    with px.connect(hello=build(1, ("203.0.113.7", 40000), ("192.0.2.25", 25))) as client:
        assert send_mail(client, "a@x.test", ["b@y.test"], b"\r\nhi\r\n")[-1].startswith("250")
    with px.connect(hello=b"PROXY UNKNOWN\r\n") as client:
        assert client.code("QUIT") == 221
    for hello, source in ((b"", "127.0.0.1"), (b"GARBAGE\r\n\r\n", "127.0.0.1"),
                          (build(2, ("203.0.113.8", 40000), ("192.0.2.25", 25)), "127.0.0.9")):
        with socket.create_connection(px.address, timeout=20, source_address=(source, 0)) as sock:
            sock.sendall(hello)
            if not hello:
                continue                    # connects and closes: a balancer's check
            assert sock.recv(100) == b""
    after = scrape_when(px, lambda s: value(s, "proxsmtpd_sessions") == 0 and sum(
        value(s, "proxsmtpd_proxy_headers_total", result=r) for r in stats.PROXY_RESULTS) ==
        sum(value(before, "proxsmtpd_proxy_headers_total", result=r)
            for r in stats.PROXY_RESULTS) + 5, "five headers counted")

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    for result in stats.PROXY_RESULTS:
        assert grew("proxsmtpd_proxy_headers_total", result=result) == 1, result
    assert grew("proxsmtpd_connections_total", result="accepted") == 2
    assert grew("proxsmtpd_connections_total", result="refused") == 3


# --- hostile scrapers ---------------------------------------------------------------------

def stats_socket(px) -> socket.socket:
    host, port = px.stats.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=20)


@pytest.mark.e2e
@pytest.mark.slow
def test_junk_and_idle_scrapers_cost_the_mail_nothing(metered, upstream):
    px = metered()
    with stats_socket(px) as junk:
        junk.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n")
        assert junk.recv(100).startswith(b"HTTP/1.0 400")
    idle = [stats_socket(px) for _ in range(exporter.MAX_SCRAPERS + 3)]
    try:
        for number in range(3):             # mail flows while every scraper slot is held
            with px.connect() as client:
                assert send_mail(client, "a@x.test", ["b@y.test"],
                                 b"Subject: %d\r\n\r\nbody\r\n" % number)[-1].startswith("250")
        upstream.wait_messages(3)
        for sock in idle:                   # ...and the idle ones are dropped, not kept
            sock.settimeout(exporter.SCRAPE_TIMEOUT + 10)
            assert sock.recv(100) == b""
    finally:
        for sock in idle:
            sock.close()
    assert value(scrape(px), "proxsmtpd_workers", state="serving") == 2


@pytest.mark.e2e
@pytest.mark.slow
def test_random_bytes_on_the_stats_port_are_answered_or_closed(metered):
    px = metered()

    requests = st.builds(lambda verb, path, rest: verb + b" " + path + b" HTTP/1.1\r\n" + rest,
                         st.sampled_from([b"GET", b"HEAD", b"POST", b"get", b"\x00GET"]),
                         st.sampled_from([b"/metrics", b"/"]) | st.binary(max_size=40),
                         st.binary(max_size=200))

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=300) | requests | requests.map(lambda r: r + b"\r\n\r\n"))
    def check(data: bytes) -> None:
        with stats_socket(px) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(exporter.SCRAPE_TIMEOUT + 5)
            answer = b""
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
            assert answer == b"" or answer.startswith(b"HTTP/1.0 "), answer[:80]

    check()
    assert value(scrape(px), "proxsmtpd_sessions") == 0


# --- configuration -------------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.slow
def test_stats_listen_needs_a_port_and_a_free_address(tmp_path, upstream):
    conf = write_config(tmp_path / "p.conf", {"OutAddress": upstream.address,
                                              "StatsListen": "127.0.0.1"})
    result = run_proxsmtpd("-d", "1", "-f", str(conf))
    assert result.returncode == 2
    assert "StatsListen: a port is needed" in result.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        conf = write_config(tmp_path / "p.conf", {
            "OutAddress": upstream.address, "Listen": "127.0.0.1:%d" % free_port(),
            "StatsListen": "127.0.0.1:%d" % taken.getsockname()[1],
            "TempDirectory": str(tmp_path)})
        result = run_proxsmtpd("-d", "1", "-f", str(conf))
    assert result.returncode == 1
    assert "StatsListen: couldn't bind to address" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.e2e
@pytest.mark.slow
def test_daemon_mode_serves_metrics(tmp_path, upstream):
    """Detached (its descriptors closed, syslog), the endpoint still answers."""
    port, stats_port = free_port(), free_port()
    pid_file = tmp_path / "proxsmtpd.pid"
    conf = write_config(tmp_path / "p.conf", {
        "OutAddress": upstream.address, "Workers": 1, "Listen": "127.0.0.1:%d" % port,
        "StatsListen": "127.0.0.1:%d" % stats_port, "TempDirectory": str(tmp_path)})
    with detached(conf, pid_file) as (result, daemon):
        assert result.returncode == 0, result.stderr
        target = type("Target", (), {"stats": "127.0.0.1:%d" % stats_port})
        with Client("127.0.0.1", port) as client:
            assert send_mail(client, "a@x.test", ["b@y.test"], b"\r\nhi\r\n")[-1].startswith("250")
            assert value(scrape(target), "proxsmtpd_sessions") == 1
        assert value(scrape(target), "proxsmtpd_workers", state="serving") == 1


# --- the shared rows, in process ---------------------------------------------------------------

@pytest.mark.unit
def test_book_folds_a_dead_rows_counters_and_drops_its_gauge():
    book = stats.Book()
    try:
        book.attach(3)
        book.bind(3)
        stats.sessions(2)
        stats.connection("accepted")
        stats.message("REJECTED", 5000, 0.5)
        stats.message("FILTERED", 1024, 0.005)
        stats.server_error("timeout")
        live = book.totals()
        book.retire(3)
        dead = book.totals()
    finally:
        stats.unbind()
    layout = stats.LAYOUT
    assert live[layout.sessions[0]] == 2 and dead[layout.sessions[0]] == 0
    for cell in layout.counters:
        assert dead[cell] == live[cell]
    assert dead[layout.messages["REJECTED"]] == 1 and dead[layout.messages["FILTERED"]] == 1
    assert dead[layout.server_errors["timeout"]] == 1
    size = dead[layout.size:layout.size + len(stats.SIZE_BUCKETS) + 2]
    assert size[0] == 1 and size[2] == 1 and size[-1] == 6024      # le=1024 holds 1024
    duration = dead[layout.filter:layout.filter + len(stats.FILTER_BUCKETS) + 2]
    assert duration[0] == 1 and duration[stats.FILTER_BUCKETS.index(0.5)] == 1


@pytest.mark.unit
def test_recording_is_a_no_op_when_off():
    book = stats.Book()
    book.attach(0)
    stats.unbind()
    stats.connection("accepted")
    stats.message("FILTERED", 10, 0.1)
    stats.sessions(5)
    assert book.totals() == [0.0] * stats.WIDTH


def milter_book() -> stats.Book:
    """A Book that knows a milter, so that the milter counters have samples."""
    book = stats.Book()
    book.name_milters(["inet:127.0.0.1:11332"])
    return book


@pytest.mark.unit
def test_milter_counters_keep_their_rows_across_reloads():
    book = stats.Book()
    try:
        book.name_milters(["inet:127.0.0.1:1", "unix:/run/b.sock"])
        book.name_milters(["unix:/run/b.sock", "inet:127.0.0.1:3"])    # a reload
        book.name_milters("inet:127.0.0.1:%d" % port for port in range(10, 20))
        assert book.milters[:3] == ["inet:127.0.0.1:1", "unix:/run/b.sock", "inet:127.0.0.1:3"]
        assert len(book.milters) == stats.MAX_MILTERS - 1
        book.attach(0)
        book.bind(0)
        stats.milter_action("unix:/run/b.sock", "reject")
        stats.milter_action("inet:127.0.0.1:19", "addheader")     # past the rows: "other"
        stats.milter_action("unix:/run/b.sock", "no-such-action")
        stats.milter_step("rcpt", 0.002)
        samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                   for family in exporter.Collector(book).collect() for sample in family.samples}
    finally:
        stats.unbind()
    actions = "proxsmtpd_milter_actions_total"
    assert samples[(actions, (("action", "reject"), ("milter", "unix:/run/b.sock")))] == 1
    assert samples[(actions, (("action", "addheader"), ("milter", "other")))] == 1
    assert sum(value for (name, _), value in samples.items() if name == actions) == 2
    steps = "proxsmtpd_milter_duration_seconds"
    assert samples[(steps + "_count", (("stage", "rcpt"),))] == 1
    assert samples[(steps + "_bucket", (("le", "0.0025"), ("stage", "rcpt")))] == 1
    assert samples[(steps + "_bucket", (("le", "0.001"), ("stage", "rcpt")))] == 0


@pytest.mark.unit
def test_dashboard_queries_only_exported_metrics():
    """share/grafana-dashboard.json is valid JSON whose queries name metrics that
    /metrics really has (a renamed metric would leave a panel empty)."""
    dashboard = json.loads((REPO / "share" / "grafana-dashboard.json").read_text())
    exported = {sample.name for family in exporter.Collector(milter_book()).collect()
                for sample in family.samples}
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(queries) >= 7
    for query in queries:
        names = re.findall(r"proxsmtpd_\w+", query)
        assert names and set(names) <= exported, query


@pytest.mark.unit
def test_every_metric_is_documented_in_proxsmtpd_8():
    text = (REPO / "man" / "proxsmtpd.8").read_text()
    for family in exporter.Collector(milter_book()).collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        assert re.search(r"^\.BR? %s\b" % name, text, re.M), name
        for label in {key for sample in family.samples for key in sample.labels} - {"le"}:
            # `name { label }`, or `name { label ", " other }` for two labels
            assert re.search(r"%s \{ ([^}\n]* )?%s( [^}\n]*)? \}" % (name, label), text), (
                name, label)
