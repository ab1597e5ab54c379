"""Fault injection: break the server, the filter, the client, the temp
directory and the worker on purpose, end to end.

Each test checks four things: what the client is told (a 4xx or a closed
connection, never a 250 the server did not give for that very message), what
the server got, the log line that gives the reason, and that no temp file is
left behind (here, while the proxy still runs; the `proxy` fixture checks
again after it stops).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from harness import Client, RawServer, free_port, pid_alive, wait_until

BODY = b"Subject: fault\r\nFrom: a@x.test\r\n\r\nhello\r\n"

# DATA's message comes in two ways: the relay's callbacks take it
# (Transfer.start) when nothing else is waited on, filtered or not; else the
# session's task does (Transfer.run; here KeepAlives makes it so).  The faults
# around DATA are tried each way, with and without a filter.
BOTH_DATA_PATHS = pytest.mark.parametrize(
    "data_path", [{}, {"FilterCommand": "cat"}, {"FilterCommand": "cat", "KeepAlives": 30}],
    ids=["relayed", "filtered", "by-the-task"])


def envelope(client: Client, rcpt: str = "b@y.test") -> None:
    """EHLO, MAIL FROM, RCPT TO, each accepted."""
    assert client.cmd("EHLO client.example")[-1].startswith("250")
    assert client.cmd("MAIL FROM:<a@x.test>")[-1].startswith("250")
    assert client.cmd("RCPT TO:<%s>" % rcpt)[-1].startswith("250")


def message(client: Client, body: bytes = BODY) -> list[str]:
    """DATA (answered 354 by the proxy), the body and `.`; the final reply."""
    assert client.cmd("DATA")[0].startswith("354")
    client.send(body + b".\r\n")
    return client.reply()


def no_temp_files(px) -> None:
    wait_until(lambda: not px.spool_files(), 10, what="the temp files to be removed")


def one_line(px, pattern: str, since: int = 0) -> str:
    """The single log line matching `pattern` after offset `since` of the log
    (the readiness probe of the harness is a session too); fails if there are
    none or several."""
    regex = re.compile(pattern)
    wait_until(lambda: regex.search(px.log()[since:]), 10, what=pattern)
    lines = [line for line in px.log()[since:].splitlines() if regex.search(line)]
    assert len(lines) == 1, lines
    return lines[0]


class ClosingServer(RawServer):
    """Accepts connections and closes each at once, before any greeting."""

    def __init__(self) -> None:
        self.accepted = 0
        self.received = b""
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        self.accepted += 1
        conn.settimeout(0.2)
        try:
            self.received += conn.recv(4096)
        except OSError:
            pass
        conn.close()


# --- the server -----------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.slow
def test_server_unreachable(proxy):
    px = proxy({"OutAddress": "127.0.0.1:%d" % free_port()}, debug=3)
    mark = len(px.log())
    with px.connect() as client:
        assert client.greeting == ["421 Local Error, cannot connect to server"]
        assert client.closed_by_peer()
    one_line(px, r"connect to 127\.0\.0\.1:\d+ failed: Connection refused$", mark)
    no_temp_files(px)


@pytest.fixture
def closing_server():
    server = ClosingServer()
    yield server
    server.stop()


@pytest.mark.e2e
@pytest.mark.slow
def test_server_closes_before_greeting(proxy, closing_server):
    px = proxy({"OutAddress": closing_server.address}, debug=3)
    mark = len(px.log())
    with px.connect() as client:
        assert client.greeting[-1][:1] == "4", client.greeting
        assert client.closed_by_peer()
    assert closing_server.accepted >= 1 and closing_server.received == b""
    one_line(px, r"server closed the connection before replying", mark)
    no_temp_files(px)


@pytest.mark.e2e
@pytest.mark.slow
def test_server_closes_during_envelope(proxy, make_upstream):
    server = make_upstream(drop_at="RCPT")
    px = proxy({"OutAddress": server.address}, debug=3)
    with px.connect() as client:
        assert client.cmd("EHLO client.example")[-1].startswith("250")
        assert client.cmd("MAIL FROM:<a@x.test>")[-1].startswith("250")
        reply = client.cmd("RCPT TO:<b@y.test>")
        assert reply and reply[-1][:1] == "4", reply
        assert client.closed_by_peer()
    server.wait_closed("RCPT TO:<b@y.test>")
    assert server.verbs() == ["EHLO", "MAIL", "RCPT"] and server.messages == []
    one_line(px, r"server closed the connection before replying")
    no_temp_files(px)


def _354_then_close(line, conn):
    conn.sock.sendall(b"354 go ahead\r\n")
    return None


@BOTH_DATA_PATHS
@pytest.mark.e2e
@pytest.mark.slow
def test_server_closes_after_354(proxy, make_upstream, data_path):
    server = make_upstream(replies={"DATA": _354_then_close})
    px = proxy({"OutAddress": server.address, **data_path}, debug=3)
    with px.connect() as client:
        envelope(client)
        assert message(client, BODY + b"x" * 300000 + b"\r\n") == ["451 Local Error"]
        assert client.closed_by_peer()
    server.wait_closed("DATA")
    assert server.messages == [] and server.rejected == []
    one_line(px, r"server disconnected unexpectedly")
    no_temp_files(px)


@BOTH_DATA_PATHS
@pytest.mark.e2e
@pytest.mark.slow
def test_server_closes_before_final_reply(proxy, make_upstream, data_path):
    server = make_upstream(drop_at="DATA-END")
    px = proxy({"OutAddress": server.address, **data_path}, debug=3)
    with px.connect() as client:
        envelope(client)
        assert message(client) == ["451 Local Error"]
        assert client.closed_by_peer()
    server.wait_closed("DATA")
    assert server.messages == []
    one_line(px, r"server disconnected unexpectedly")
    no_temp_files(px)


@BOTH_DATA_PATHS
@pytest.mark.e2e
@pytest.mark.slow
def test_server_421_at_final_reply_is_passed_on(proxy, make_upstream, data_path):
    server = make_upstream(data_reply="421 4.3.0 shutting down")
    px = proxy({"OutAddress": server.address, **data_path}, debug=3)
    with px.connect() as client:
        envelope(client)
        assert message(client) == ["421 4.3.0 shutting down"]
    assert server.messages == [] and len(server.rejected) == 1
    no_temp_files(px)


# --- the filter ------------------------------------------------------------------------

def filter_proxy(proxy, upstream, command: str, **extra):
    settings = {"OutAddress": upstream.address, "FilterCommand": command, "FilterTimeout": 2}
    settings.update(extra)
    return proxy(settings, debug=3)


def refused(px, upstream, reply: list[str], status: str, reason: str | None) -> None:
    """The message was refused with `reply`; nothing reached the server, which
    was told RSET; one status line, with the refusal as its `reply=` (and one
    line with the reason), was logged."""
    mark = len(px.log())
    with px.connect() as client:
        envelope(client)
        assert message(client) == reply
        assert client.cmd("NOOP")[0].startswith("250")       # the session goes on
    upstream.wait_command("RSET")
    assert upstream.messages == [] and "DATA" not in upstream.verbs()
    one_line(px, r'from=a@x\.test, to=b@y\.test, (?:.*, )?reply="%s", (?:.*, )?status=%s$'
             % (re.escape(reply[-1]), re.escape(status)), mark)
    if reason:
        one_line(px, reason, mark)
    no_temp_files(px)


@pytest.mark.e2e
@pytest.mark.slow
def test_filter_exits_non_zero(proxy, upstream):
    px = filter_proxy(proxy, upstream, "cat >/dev/null; echo 'no thanks' >&2; exit 3")
    refused(px, upstream, ["550 Content Rejected; no thanks"], "REJECTED", None)


@pytest.mark.e2e
@pytest.mark.slow
def test_filter_killed_by_signal(proxy, upstream):
    px = filter_proxy(proxy, upstream, "cat >/dev/null; kill -SEGV $$")
    refused(px, upstream, ["451 Local Error"], "FILTER-ERROR",
            r"filter command terminated abnormally \(signal 11\)")


@pytest.mark.e2e
@pytest.mark.slow
def test_filter_hangs_past_filter_timeout(proxy, upstream, tmp_path):
    pidfile = tmp_path / "pid"
    px = filter_proxy(proxy, upstream, "echo $$ > %s; exec sleep 60" % pidfile, FilterTimeout=1)
    refused(px, upstream, ["451 Local Error"], "FILTER-ERROR",
            r"timeout while waiting for filter command")
    pid = int(pidfile.read_text())
    wait_until(lambda: not pid_alive(pid), 10, what="the filter to be killed")


@pytest.mark.e2e
@pytest.mark.slow
def test_filter_closes_stdin_early_and_writes_nothing(proxy, upstream):
    """Exit 0 with no output for a non-empty message is a broken filter, not
    an order to deliver an empty message."""
    px = filter_proxy(proxy, upstream, "exec <&-; exit 0")
    refused(px, upstream, ["451 Local Error"], "FILTER-ERROR",
            r"filter command wrote no message")


@pytest.mark.e2e
@pytest.mark.slow
def test_filter_writes_endless_stderr(proxy, upstream, tmp_path):
    pidfile = tmp_path / "pid"
    px = filter_proxy(proxy, upstream,
                      "echo $$ > %s; cat >/dev/null; exec yes 'noise on stderr' >&2" % pidfile,
                      FilterTimeout=1)
    refused(px, upstream, ["451 Local Error"], "FILTER-ERROR",
            r"timeout while waiting for filter command")
    pid = int(pidfile.read_text())
    wait_until(lambda: not pid_alive(pid), 10, what="the filter to be killed")
    assert "forced termination" not in px.log()     # it obeyed SIGTERM, and that was seen


# A plain command runs without /bin/sh (when it is dash); quoted, the same
# program runs under it: what the shell would report, both ways.
WAYS = pytest.mark.parametrize("quote", ["", "'"], ids=["direct", "shell"])


@pytest.mark.parametrize("command, code, words", [("missing", 127, "not found"),
                                                  ("not-executable", 126, "Permission denied")])
@WAYS
@pytest.mark.e2e
@pytest.mark.slow
def test_filter_cannot_be_executed(proxy, upstream, tmp_path, command, code, words, quote):
    """Refused at start (tests/test_config.py); here it breaks while running.
    Exit 126/127 and the shell's own words on stderr, with the shell or without."""
    path = tmp_path / command
    path.write_text("#!/bin/sh\ncat\n")
    path.chmod(0o755)
    px = filter_proxy(proxy, upstream, "%s%s%s" % (quote, path, quote))
    if command == "not-executable":
        path.chmod(0o644)
    else:
        path.unlink()
    refused(px, upstream, ["451 Local Error"], "FILTER-ERROR",
            r"filter command could not be executed \(exit %d\): /bin/sh: 1: %s: %s"
            % (code, re.escape(str(path)), words))


@WAYS
@pytest.mark.e2e
@pytest.mark.slow
def test_filter_program_killed_by_signal(proxy, upstream, tmp_path, quote):
    """A program the filter command runs dies of a signal: reported as the
    shell reports it (exit 128+N), whether the shell ran it or not."""
    path = tmp_path / "crash"
    path.write_text("#!/bin/sh\ncat >/dev/null\nkill -SEGV $$\n")
    path.chmod(0o755)
    px = filter_proxy(proxy, upstream, "%s%s%s" % (quote, path, quote))
    refused(px, upstream, ["451 Local Error"], "FILTER-ERROR",
            r"filter command terminated abnormally \(exit 139: signal 11\)")


def worker_peak_kib(px) -> list[int]:
    peaks = []
    for pid in px.children():
        with open("/proc/%d/status" % pid) as handle:
            peaks += [int(line.split()[1]) for line in handle if line.startswith("VmHWM:")]
    return peaks


@pytest.mark.parametrize("source", ["/dev/zero", "lines"])
@pytest.mark.e2e
@pytest.mark.slow
def test_filter_writes_100_mb(proxy, make_upstream, source):
    """A filter's output is streamed from disk: 100 MB (one single line, or
    many) reach the server whole, and no worker holds it in memory."""
    size = 100 * 1000 * 1000
    produce = ("head -c %d /dev/zero" % size if source == "/dev/zero"
               else "yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c %d" % size)
    upstream = make_upstream(extensions=())
    px = filter_proxy(proxy, upstream, "cat >/dev/null; " + produce, FilterTimeout=20)
    mark = len(px.log())
    with px.connect(timeout=120) as client:
        envelope(client)
        assert message(client) == ["250 2.0.0 Ok: queued as TEST"]
    [received] = upstream.wait_messages(1)
    assert len(received.raw) == size
    one_line(px, r"status=FILTERED$", mark)
    assert max(worker_peak_kib(px)) < 80 * 1024
    no_temp_files(px)


# --- the client ------------------------------------------------------------------------

@BOTH_DATA_PATHS
@pytest.mark.e2e
@pytest.mark.slow
def test_client_disconnects_mid_data(proxy, upstream, data_path):
    px = proxy({"OutAddress": upstream.address, **data_path}, debug=3)
    mark = len(px.log())
    client = px.connect()
    envelope(client)
    assert client.cmd("DATA")[0].startswith("354")
    # (past spool.MEMORY_LIMIT: without a filter too, the message is in a file)
    client.send(b"Subject: partial\r\n\r\n" + b"x" * 600000 + b"\r\nmore")
    wait_until(lambda: px.spool_files(), what="the message being spooled")
    client.close()
    upstream.wait_closed("RCPT TO:<b@y.test>")
    assert upstream.messages == [] and "DATA" not in upstream.verbs()
    one_line(px, r"unexpected end of data from client", mark)
    no_temp_files(px)


@BOTH_DATA_PATHS
@pytest.mark.e2e
@pytest.mark.slow
def test_client_stalls_mid_line_in_data(proxy, upstream, data_path):
    px = proxy({"OutAddress": upstream.address, **data_path, "TimeOut": 2},
               debug=3)
    mark = len(px.log())
    with px.connect() as client:
        envelope(client)
        assert client.cmd("DATA")[0].startswith("354")
        client.send(b"Subject: stall\r\n\r\nhalf a li")
        assert client.closed_by_peer(timeout=30)
    upstream.wait_closed("RCPT TO:<b@y.test>")
    assert upstream.messages == [] and "DATA" not in upstream.verbs()
    one_line(px, r"network operation timed out reading message", mark)
    no_temp_files(px)


@pytest.mark.e2e
@pytest.mark.slow
def test_client_stalls_mid_command_line(proxy, upstream):
    px = proxy({"OutAddress": upstream.address, "TimeOut": 2}, debug=3)
    mark = len(px.log())
    with px.connect() as client:
        assert client.cmd("EHLO client.example")[-1].startswith("250")
        client.send(b"MAIL FROM:<a@x.t")
        assert client.closed_by_peer(timeout=30)
    upstream.wait_closed("EHLO client.example")
    assert upstream.verbs() == ["EHLO"]
    one_line(px, r"network operation timed out \(a line unfinished for 2 seconds\)$", mark)
    no_temp_files(px)


@pytest.mark.e2e
@pytest.mark.slow
def test_client_command_without_crlf_at_eof_is_not_relayed(proxy, upstream):
    """A message sent whole is delivered; the unfinished `QUIT` after it is not
    a command (nor is an unfinished MAIL FROM in another session)."""
    px = proxy({"OutAddress": upstream.address}, debug=3)
    with px.connect() as client:
        envelope(client)
        assert client.cmd("DATA")[0].startswith("354")
        client.send(BODY + b".\r\nQUIT")
        client.sock.shutdown(socket.SHUT_WR)
        assert client.reply() == ["250 2.0.0 Ok: queued as TEST"]
        assert client.closed_by_peer()
    with px.connect() as client:
        assert client.cmd("EHLO second.example")[-1].startswith("250")
        client.send(b"MAIL FROM:<c@x.test>")
        client.sock.shutdown(socket.SHUT_WR)
        assert client.closed_by_peer()
    upstream.wait_closed("EHLO second.example")
    assert len(upstream.messages) == 1 and upstream.messages[0].raw == BODY.rstrip(b"\r\n")
    assert "QUIT" not in upstream.verbs()
    assert not any(line.startswith("MAIL FROM:<c@") for line in upstream.commands())
    no_temp_files(px)


@BOTH_DATA_PATHS
@pytest.mark.e2e
@pytest.mark.slow
def test_client_data_without_end_at_eof_is_not_delivered(proxy, upstream, data_path):
    px = proxy({"OutAddress": upstream.address, **data_path}, debug=3)
    mark = len(px.log())
    with px.connect() as client:
        envelope(client)
        assert client.cmd("DATA")[0].startswith("354")
        client.send(BODY + b"last line without CRLF")
        client.sock.shutdown(socket.SHUT_WR)
        assert client.closed_by_peer()
    upstream.wait_closed("RCPT TO:<b@y.test>")
    assert upstream.messages == [] and "DATA" not in upstream.verbs()
    one_line(px, r"unexpected end of data from client", mark)
    no_temp_files(px)


# --- a worker killed mid-message --------------------------------------------------------

def worker_with_session(px) -> int:
    """The worker whose title shows one session, once the others show none."""
    def find():
        titles = px.children()
        busy = [pid for pid, title in titles.items() if "[1 sessions]" in title]
        idle = [pid for pid, title in titles.items() if "[0 sessions]" in title]
        return busy[0] if len(busy) == 1 and len(busy) + len(idle) == len(titles) else None
    return wait_until(find, 10, what="a worker holding one session")


@pytest.mark.e2e
@pytest.mark.slow
def test_worker_killed_mid_message(proxy, upstream, tmp_path):
    """SIGKILL leaves the worker no chance to clean up: the client sees the
    connection close (never a 250), and the master reclaims the slot, kills the
    orphaned filter and removes the temp files named after the dead worker."""
    pidfile = tmp_path / "filter.pid"
    px = proxy({"OutAddress": upstream.address, "Workers": 2, "MaxConnections": 2,
                "FilterTimeout": 60, "FilterCommand": "echo $$ > %s; exec sleep 60" % pidfile},
               debug=3)
    wait_until(lambda: len(px.children()) == 2 and all("[0 sessions]" in t for t in
                                                       px.children().values()),
               10, what="two idle workers")
    client = px.connect()
    envelope(client)
    assert client.cmd("DATA")[0].startswith("354")
    client.send(BODY + b".\r\n")
    wait_until(pidfile.exists, 10, what="the filter to start")
    filter_pid = int(pidfile.read_text())
    victim = worker_with_session(px)
    files = px.spool_files()
    assert len(files) == 2 and all(name.startswith("proxsmtpd.%d." % victim) for name in files)
    os.kill(victim, signal.SIGKILL)
    assert client.reply() == []                     # closed: no reply at all
    client.close()
    px.wait_log(r"worker \d+ \(pid %d\) killed by signal 9; 1 sessions lost" % victim)
    for name in files:
        one_line(px, r"removed temp file %s left behind by worker \d+ \(pid %d\)"
                 % (re.escape(name), victim))
    one_line(px, r"killing filter process %d left behind" % filter_pid)
    wait_until(lambda: not pid_alive(filter_pid), 10, what="the orphaned filter to die")
    no_temp_files(px)
    assert upstream.messages == []
    # Both slots are free again: two sessions at once, and mail flows.
    pidfile.unlink()
    wait_until(lambda: len(px.children()) == 2, 15, what="a replacement worker")
    first, second = px.connect(), px.connect()
    try:
        assert first.greeting[0].startswith("220") and second.greeting[0].startswith("220")
    finally:
        first.close()
        second.close()


# --- TempDirectory ---------------------------------------------------------------------

def deferred(px, upstream, body: bytes, reason: str, mark: int) -> None:
    """One message answered 451 (at DATA when no temp file can be made, else
    after the message), with the reason logged and nothing delivered."""
    with px.connect() as client:
        envelope(client)
        reply = client.cmd("DATA")
        if reply[0].startswith("354"):
            client.send(body + b".\r\n")
            reply = client.reply()
        assert reply == ["451 Local Error"]
        assert client.cmd("NOOP")[0].startswith("250")
    one_line(px, reason, mark)
    one_line(px, r"status=FILTER-ERROR$", mark)
    assert upstream.messages == []


def delivered(px, upstream, body: bytes = BODY) -> None:
    count = len(upstream.messages)
    with px.connect() as client:
        envelope(client)
        assert message(client, body) == ["250 2.0.0 Ok: queued as TEST"]
    assert upstream.wait_messages(count + 1)[-1].raw == body.rstrip(b"\r\n")


@pytest.mark.e2e
@pytest.mark.slow
def test_temp_directory_missing(proxy, upstream, tmp_path):
    """Refused at start (tests/test_config.py); here it goes away while running."""
    missing = tmp_path / "missing"
    missing.mkdir()
    px = proxy({"OutAddress": upstream.address, "FilterCommand": "cat",
                "TempDirectory": str(missing)}, debug=3)
    missing.rmdir()
    mark = len(px.log())
    deferred(px, upstream, BODY, r"couldn't open cache file in .*/missing: No such file", mark)
    upstream.wait_command("RSET")
    missing.mkdir()
    delivered(px, upstream)
    wait_until(lambda: not os.listdir(missing), 10, what="the temp files to be removed")


@pytest.fixture
def nobody_dir():
    """A root-owned 0755 directory under a 1777 one: `nobody` may enter, not write."""
    top = tempfile.mkdtemp(prefix="proxsmtpd-test-", dir="/tmp")
    os.chmod(top, 0o1777)
    locked = os.path.join(top, "locked")
    os.mkdir(locked, 0o755)
    yield locked
    shutil.rmtree(top)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as User: nobody")
@pytest.mark.e2e
@pytest.mark.root
@pytest.mark.slow
def test_temp_directory_unwritable(proxy, upstream, nobody_dir):
    """Checked at start (tests/test_config.py); here it turns unwritable later."""
    os.chmod(nobody_dir, 0o1777)
    px = proxy({"OutAddress": upstream.address, "FilterCommand": "cat", "User": "nobody",
                "TempDirectory": nobody_dir}, debug=3)
    os.chmod(nobody_dir, 0o755)
    mark = len(px.log())
    deferred(px, upstream, BODY, r"couldn't open cache file in .*: Permission denied", mark)
    os.chmod(nobody_dir, 0o1777)
    delivered(px, upstream)
    wait_until(lambda: not os.listdir(nobody_dir), 10, what="the temp files to be removed")


def _can_mount_tmpfs() -> str:
    """'' if `unshare -m` and a tmpfs mount work here, else why not."""
    if not shutil.which("unshare"):
        return "unshare(1) is not installed"
    probe = tempfile.mkdtemp(prefix="proxsmtpd-probe-")
    try:
        result = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                                 'mount -t tmpfs -o size=1m tmpfs "$0"', probe],
                                capture_output=True, text=True, timeout=10)
        return "" if result.returncode == 0 else \
            "no private tmpfs (unshare -m / mount): %s" % result.stderr.strip()
    finally:
        os.rmdir(probe)


@pytest.fixture
def full_disk_proxy(request, proxy, upstream):
    """proxsmtpd in a private mount namespace whose TempDirectory is a 1 MB tmpfs
    (FilterCommand cat, or what the test's parameter says)."""
    why = _can_mount_tmpfs()
    if why:
        pytest.skip(why)
    px = proxy({"OutAddress": upstream.address, "FilterCommand": getattr(request, "param", "cat"),
                "Workers": 1},
               debug=3, start=False)
    px.wrapper = ("unshare", "-m", "--propagation", "private", "sh", "-c",
                  'mount -t tmpfs -o size=1m,mode=0700 proxsmtpd-test "$0" && exec "$@"',
                  str(px.spool))
    px.start()
    px.inside = Path("/proc/%d/root%s" % (px.proc.pid, px.spool))   # the tmpfs, seen from here
    assert os.statvfs(px.inside).f_blocks * os.statvfs(px.inside).f_frsize <= 1024 * 1024
    yield px
    wait_until(lambda: not os.listdir(px.inside), 10,   # before the namespace goes away
               what="the temp files to be removed")


@pytest.mark.parametrize("full_disk_proxy", [None, "cat"], ids=["relayed", "filtered"],
                         indirect=True)
@pytest.mark.e2e
@pytest.mark.root
@pytest.mark.slow
def test_temp_directory_full_message_too_big(full_disk_proxy, upstream):
    px = full_disk_proxy
    mark = len(px.log())
    big = BODY + (b"x" * 998 + b"\r\n") * 2000          # 2 MB into 1 MB
    deferred(px, upstream, big, r"couldn't write to cache file: No space left on device", mark)
    wait_until(lambda: not os.listdir(px.inside), 10, what="the temp files to be removed")
    delivered(px, upstream)                             # the space is back


@pytest.mark.e2e
@pytest.mark.root
@pytest.mark.slow
def test_temp_directory_full_of_other_files(full_disk_proxy, upstream):
    px = full_disk_proxy
    mark = len(px.log())
    ballast = px.inside / "ballast"
    with open(ballast, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    deferred(px, upstream, BODY + b"y" * 70000 + b"\r\n",
             r"couldn't write to cache file: No space left on device", mark)
    wait_until(lambda: os.listdir(px.inside) == ["ballast"], 10, what="the temp file removed")
    ballast.unlink()
    delivered(px, upstream)


@pytest.mark.e2e
@pytest.mark.root
@pytest.mark.slow
def test_temp_directory_filled_by_filter_output(full_disk_proxy, upstream):
    """The message fits, the filter's copy does not: its failure is the full
    disk's, so 451 (try again), not the 550 of a rejection."""
    px = full_disk_proxy
    mark = len(px.log())
    body = BODY + (b"z" * 998 + b"\r\n") * 600           # 600 KB, twice is too much
    deferred(px, upstream, body, r"filter command failed \(exit 1\) with TempDirectory full", mark)
    wait_until(lambda: not os.listdir(px.inside), 10, what="the temp files to be removed")
    delivered(px, upstream, BODY + (b"z" * 998 + b"\r\n") * 300)


@pytest.mark.unit
def test_reliability_doc_names_real_tests():
    """docs/RELIABILITY.md names the test proving each fault: they all exist,
    and every test of this file is named there."""
    tests = Path(__file__).resolve().parent
    doc = (tests.parent / "docs" / "RELIABILITY.md").read_text()
    named = re.findall(r"tests/(test_\w+\.py)::(test_\w+)", doc)
    assert len(named) > 30
    for module, name in named:
        source = (tests / module).read_text()
        assert re.search(r"^def %s\(" % name, source, re.M), (module, name)
    here = re.findall(r"^def (test_\w+)\(", Path(__file__).read_text(), re.M)
    missing = [name for name in here if name not in {n for _, n in named}
               and name != "test_reliability_doc_names_real_tests"]
    assert missing == []
