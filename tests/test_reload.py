"""Reloads under held sessions: the master survives any
number of SIGHUPs, never runs more than Workers x 3 workers, closes idle
sessions of old generations with 421 4.3.2, and never cuts a message."""

from __future__ import annotations

import os
import re
import select
import signal
import threading
import time

import pytest

from harness import children, send_mail, title, wait_until, write_config

pytestmark = [pytest.mark.system, pytest.mark.slow]

R_SHUTDOWN = ["421 4.3.2 Service shutting down"]


class WorkerCounter:
    """Counts the master's live children every few milliseconds, in a thread."""

    def __init__(self, master: int) -> None:
        self.master = master
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.most = max(self.most, len(children(self.master)))
            self._stop.wait(0.005)

    def __enter__(self) -> "WorkerCounter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def held_session(proxy):
    """A client that said EHLO and NOOP and now sits idle."""
    client = proxy.connect(timeout=30)
    assert client.cmd("EHLO idle.example")[-1].startswith("250")
    assert client.code("NOOP") == 250
    return client


def reload(proxy, count: int) -> None:
    """SIGHUP, and wait until the master says it reloaded for the `count`th time
    and a worker of the new generation is up."""
    before = set(children(proxy.proc.pid))
    proxy.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: proxy.log().count("reloaded configuration") >= count, 15,
               what="reload %d" % count)
    wait_until(lambda: any(title(pid).startswith("proxsmtpd: worker") for pid in
                           set(children(proxy.proc.pid)) - before), 15,
               what="a new worker after reload %d" % count)


def _answers_noop(client) -> bool:
    """True if the session still works; False if it was closed with 421 4.3.2
    (anything else fails the test)."""
    if not select.select([client.sock], [], [], 0)[0]:
        return client.code("NOOP") == 250
    assert client.reply() == R_SHUTDOWN
    assert client.closed_by_peer()
    return False


def test_reload_storm_with_held_sessions(proxy, upstream):
    workers, rounds, mid_data_done_at = 2, 12, 8
    px = proxy({"OutAddress": upstream.address, "Workers": workers, "TimeOut": 120})
    held: list[tuple[int, object]] = []
    mid = None
    try:
        with WorkerCounter(px.proc.pid) as counter:
            for round_ in range(rounds + 1):
                if round_:
                    reload(px, round_)
                    assert counter.most <= workers * 3, "%d workers alive" % counter.most
                for _ in range(3):
                    held.append((round_, held_session(px)))
                if round_ == 1:     # a message in progress across most of the storm
                    mid = px.connect(timeout=60)
                    assert mid.cmd("EHLO busy.example")[-1].startswith("250")
                    assert mid.code("MAIL FROM:<a@example.org>") == 250
                    assert mid.code("RCPT TO:<b@example.org>") == 250
                    assert mid.code("DATA") == 354
                    mid.send(b"Subject: storm\r\n\r\nfirst half\r\n")
                if round_ == mid_data_done_at:
                    mid.send(b"second half\r\n.\r\n")
                    assert mid.reply() == ["250 2.0.0 Ok: queued as TEST"]
                    # its worker was drained meanwhile: closed at the next idle point
                    assert mid.reply() == R_SHUTDOWN
                    assert mid.closed_by_peer()
        assert px.proc.poll() is None, px.log()
        assert counter.most <= workers * 3, "%d workers alive at once" % counter.most
        assert len(children(px.proc.pid)) <= workers * 3
        # Sessions held in drained workers were closed with 421 4.3.2, the others
        # still work. The first generation is always drained (the oldest goes
        # first); which later ones are depends on timing, not asserted here.
        for client in (client for round_, client in held if round_ == 0):
            assert client.reply() == R_SHUTDOWN and client.closed_by_peer()
        time.sleep(1)       # any other 421 was sent when its worker was drained
        still_open = {round_ for round_, client in held if round_ and _answers_noop(client)}
        assert rounds in still_open         # the current generation was left alone
        with px.connect() as late:
            assert send_mail(late, "c@example.org", ["d@example.org"],
                             b"Subject: after\r\n\r\nafter\r\n")[-1].startswith("250")
        messages = upstream.wait_messages(2)
        storm = [m for m in messages if b"Subject: storm" in m.raw]
        assert len(storm) == 1 and storm[0].raw.endswith(b"first half\r\nsecond half")
        assert "no free worker slot" not in px.log()
    finally:
        for _, client in held:
            client.close()
        if mid is not None:
            mid.close()


def test_retired_worker_closes_a_session_after_its_message(proxy, upstream):
    """A reload within the cap: the session that was idle stays, the one that
    finishes its message is closed at its next idle point, not an hour later."""
    px = proxy({"OutAddress": upstream.address, "Workers": 1, "Header": "X-Gen: one"})
    idle = held_session(px)
    busy = px.connect()
    assert busy.cmd("EHLO busy.example")[-1].startswith("250")
    assert busy.code("MAIL FROM:<a@example.org>") == 250
    assert busy.code("RCPT TO:<b@example.org>") == 250
    assert busy.code("DATA") == 354
    busy.send(b"Subject: across\r\n\r\nbefore the reload\r\n")
    write_config(px.conf, dict(px.settings, Header="X-Gen: two"))
    reload(px, 1)
    busy.send(b"after the reload\r\n.\r\n")
    assert busy.reply()[-1].startswith("250")
    assert busy.reply() == R_SHUTDOWN
    assert busy.closed_by_peer()
    assert idle.code("NOOP") == 250
    [message] = upstream.wait_messages(1)
    assert b"before the reload\r\nafter the reload" in message.raw
    assert b"X-Gen: one" in message.raw
    idle.close()


def test_session_ids_are_never_reused_across_reloads(proxy, upstream):
    """Each session's id (the first word of its log lines) is unique over the
    daemon's run: workers that replace others after a reload go on counting
    instead of starting again."""
    px = proxy({"OutAddress": upstream.address, "Workers": 1}, debug=3)
    for turn in range(1, 4):
        for n in range(2):
            with px.connect() as client:
                assert send_mail(client, "a@x.example", ["b@y.example"],
                                 b"Subject: %d.%d\r\n\r\nbody\r\n" % (turn, n))[-1].startswith("250")
        old = set(children(px.proc.pid))
        reload(px, turn)
        for pid in old:     # its place (and, before, its ids) free for the next worker
            wait_until(lambda: pid not in children(px.proc.pid), 15, what="worker %d to exit" % pid)
    upstream.wait_messages(6)
    ids = re.findall(r"^proxsmtpd: ([0-9A-F]{6,}): client=127\.0\.0\.1, from=a@x\.example",
                     px.log(), re.M)
    assert len(ids) == 6, px.log()
    assert len(set(ids)) == 6, ids


def test_reload_is_complete_only_once_old_workers_stopped_accepting(proxy, upstream):
    """An old worker that has not yet taken itself off the listening socket
    could still take a new connection with the old settings: until it has,
    the reload is not complete."""
    px = proxy({"OutAddress": upstream.address, "Workers": 1})
    [old] = children(px.proc.pid)
    os.kill(old, signal.SIGSTOP)        # it can't act on being retired yet
    try:
        px.proc.send_signal(signal.SIGHUP)
        px.wait_log(r"reloaded configuration")
        wait_until(lambda: len(children(px.proc.pid)) == 2, 15, what="the new worker")
        time.sleep(1.0)
        assert "reload complete" not in px.log()
    finally:
        os.kill(old, signal.SIGCONT)
    px.wait_log(r"^proxsmtpd: reload complete: new connections get the new configuration$", 15)
    wait_until(lambda: old not in children(px.proc.pid), 15, what="the old worker to exit")
