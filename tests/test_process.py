"""The process model (OPERATION and SIGNALS in proxsmtpd(8)): master, pre-forked
workers, shared MaxConnections, privilege drop, daemon mode and signals — all
with real processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from harness import (PYTHON, REPO, Client, children, detached, free_port, pid_alive,
                     run_proxsmtpd, send_mail, title, wait_until, write_config)

pytestmark = [pytest.mark.system, pytest.mark.slow]

NOBODY_CAPS = "0000000000001000"       # CAP_NET_ADMIN only


def worker_pids(pid: int) -> list[int]:
    """Live child processes of `pid` (zombies excluded)."""
    return sorted(children(pid))


def status(pid: int) -> dict[str, str]:
    with open("/proc/%d/status" % pid) as handle:
        return dict(line.rstrip("\n").split(":\t", 1) for line in handle if ":\t" in line)


def workers(proxy, count: int | None = None) -> list[int]:
    """The master's worker pids, waiting until there are `count` of them."""
    if count is None:
        return worker_pids(proxy.proc.pid)
    return wait_until(lambda: (lambda pids: pids if len(pids) == count else None)(
        worker_pids(proxy.proc.pid)), 15, what="%d workers" % count)


def wait_idle(proxy) -> None:
    """Until every worker's title shows no session (the readiness probe ended)."""
    wait_until(lambda: all("[0 sessions]" in title(pid) for pid in worker_pids(proxy.proc.pid)),
               10, what="idle workers")


def session_holder(proxy) -> int:
    """The worker whose title says it serves one session (call wait_idle first)."""
    return wait_until(lambda: next((pid for pid in worker_pids(proxy.proc.pid)
                                    if "[1 sessions]" in title(pid)), None), 10,
                      what="a worker with one session")


def test_workers_and_titles(proxy, upstream):
    px = proxy({"OutAddress": upstream.address, "Workers": 3})
    pids = workers(px, 3)
    assert "master" in title(px.proc.pid)
    for pid in pids:
        assert "proxsmtpd: worker" in title(pid)
        # the harness's readiness probe was a session too: wait for it to end
        wait_until(lambda: "[0 sessions]" in title(pid), 10, what="an idle title")


def test_max_connections_shared_by_all_workers(proxy, upstream):
    px = proxy({"OutAddress": upstream.address, "Workers": 3, "MaxConnections": 4})
    workers(px, 3)
    held = [px.connect() for _ in range(4)]
    try:
        for client in held:
            assert client.greeting[0].startswith("220"), client.greeting
        for _ in range(3):
            with px.connect() as extra:
                assert extra.greeting == ["421 Server busy, too many connections"]
                assert extra.closed_by_peer()
        held.pop().close()
        later = wait_until(lambda: (lambda c: c if c.greeting[0].startswith("220") else c.close())(
            px.connect()), 10, what="a slot to come free")
        later.close()
    finally:
        for client in held:
            client.close()
    px.wait_log(r"too many connections open \(max 4\)")


def test_killed_worker_is_replaced_and_its_slots_reclaimed(proxy, upstream):
    px = proxy({"OutAddress": upstream.address, "Workers": 2, "MaxConnections": 2})
    before = workers(px, 2)
    wait_idle(px)
    victim_client = px.connect()
    assert victim_client.cmd("EHLO c.example")[-1].startswith("250")
    assert victim_client.cmd("MAIL FROM:<a@example.org>")[-1].startswith("250")
    victim = session_holder(px)
    os.kill(victim, signal.SIGKILL)
    assert victim_client.closed_by_peer()
    victim_client.close()
    after = wait_until(lambda: (lambda pids: pids if len(pids) == 2 and victim not in pids
                                else None)(worker_pids(px.proc.pid)), 15, what="a new worker")
    assert set(after) - set(before)
    px.wait_log(r"worker \d+ \(pid %d\) killed by signal 9; 1 sessions lost" % victim)
    # Both slots are usable again: two sessions at once, and mail flows.
    first, second = px.connect(), px.connect()
    try:
        assert first.greeting[0].startswith("220") and second.greeting[0].startswith("220")
        assert send_mail(first, "a@example.org", ["b@example.org"], b"Subject: x\r\n\r\nhi\r\n")[-1] \
            .startswith("250")
    finally:
        first.close()
        second.close()
    upstream.wait_messages(1)


def test_sigterm_closes_idle_session_with_421_and_exits(proxy, upstream):
    px = proxy({"OutAddress": upstream.address, "Workers": 2})
    pids = workers(px, 2)
    wait_idle(px)
    client = px.connect()
    assert client.cmd("EHLO c.example")[-1].startswith("250")
    session_holder(px)
    px.proc.send_signal(signal.SIGTERM)
    assert client.reply() == ["421 4.3.2 Service shutting down"]
    assert client.closed_by_peer()
    assert px.proc.wait(20) == 0
    for pid in pids:
        wait_until(lambda: not pid_alive(pid), 10, what="worker %d to exit" % pid)


def test_sigterm_lets_a_message_in_progress_finish(proxy, upstream):
    px = proxy({"OutAddress": upstream.address, "Workers": 1, "FilterCommand": "cat"})
    wait_idle(px)
    client = px.connect()
    assert client.cmd("EHLO c.example")[-1].startswith("250")
    assert client.cmd("MAIL FROM:<a@example.org>")[-1].startswith("250")
    assert client.cmd("RCPT TO:<b@example.org>")[-1].startswith("250")
    assert client.cmd("DATA")[0].startswith("354")
    client.send(b"Subject: in flight\r\n\r\nfirst half\r\n")
    session_holder(px)
    px.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert pid_alive(px.proc.pid)
    client.send(b"second half\r\n.\r\n")
    assert client.reply()[-1].startswith("250")
    assert client.reply() == ["421 4.3.2 Service shutting down"]
    assert px.proc.wait(20) == 0
    [message] = upstream.wait_messages(1)
    assert b"first half\r\nsecond half" in message.raw
    assert not worker_pids(px.proc.pid)


def test_sighup_reload_new_sessions_get_new_settings(proxy, upstream):
    px = proxy({"OutAddress": upstream.address, "Workers": 2, "Header": "X-Gen: one"})
    old = workers(px, 2)
    wait_idle(px)
    early = px.connect()
    assert early.cmd("EHLO c.example")[-1].startswith("250")
    session_holder(px)
    settings = dict(px.settings, Header="X-Gen: two")
    write_config(px.conf, settings)
    px.proc.send_signal(signal.SIGHUP)
    # What the daemon promises (proxsmtpd(8), SIGHUP): a connection made after
    # this line reaches a worker with the new settings, never a retiring one.
    px.wait_log(r"^proxsmtpd: reload complete: new connections get the new configuration$", 15)
    assert len([p for p in worker_pids(px.proc.pid) if p not in old]) == 2
    for n in range(5):
        with px.connect() as late:
            assert send_mail(late, "a@x.example", ["b@y.example"],
                             b"Subject: late%d\r\n\r\nl\r\n" % n)[-1].startswith("250")
    # The session opened before the reload is undisturbed and keeps its settings.
    assert send_mail(early, "a@x.example", ["b@y.example"], b"Subject: early\r\n\r\ne\r\n")[-1] \
        .startswith("250")
    early.close()
    messages = {m.body.split(b"Subject: ")[1].split(b"\r\n")[0]: m.body
                for m in upstream.wait_messages(6)}
    assert b"X-Gen: one" in messages[b"early"]
    for n in range(5):
        assert b"X-Gen: two" in messages[b"late%d" % n]
    # Old workers leave once their sessions are done.
    for pid in old:
        wait_until(lambda: not pid_alive(pid), 15, what="old worker %d to exit" % pid)


def test_sighup_with_a_broken_config_keeps_running(proxy, upstream):
    px = proxy({"OutAddress": upstream.address, "Workers": 1})
    before = workers(px, 1)
    px.conf.write_text(px.conf.read_text() + "MaxConnections: lots\n")
    px.proc.send_signal(signal.SIGHUP)
    px.wait_log(r"reload failed, keeping the running configuration: .*proxsmtpd\.conf, line \d+: "
                r"MaxConnections: expected an integer from 2 to \d+, not \"lots\"")
    assert workers(px) == before
    with px.connect() as client:
        assert send_mail(client, "a@x.example", ["b@y.example"], b"\r\nbody\r\n")[-1].startswith("250")


@pytest.fixture
def public_dir():
    """A directory `nobody` can reach and write (pytest's tmp_path is root-only)."""
    path = tempfile.mkdtemp(prefix="proxsmtpd-test-", dir="/tmp")
    os.chmod(path, 0o1777)
    yield path
    shutil.rmtree(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to User: nobody")
@pytest.mark.root
def test_user_nobody_keeps_only_cap_net_admin(proxy, upstream, public_dir):
    report = os.path.join(public_dir, "filter-status")
    px = proxy({"OutAddress": upstream.address, "Workers": 2, "User": "nobody",
                "TempDirectory": public_dir,
                "FilterCommand": "grep -E '^(Uid|CapEff|CapPrm)' /proc/self/status > %s; cat"
                % report})
    for pid in [px.proc.pid] + workers(px, 2):
        info = status(pid)
        assert info["Uid"].split() == ["65534"] * 4, (pid, info["Uid"])
        assert info["CapEff"] == NOBODY_CAPS and info["CapPrm"] == NOBODY_CAPS, (pid, info)
    with px.connect() as client:
        assert send_mail(client, "a@x.example", ["b@y.example"], b"\r\nbody\r\n")[-1].startswith("250")
    with open(report) as handle:
        filter_status = handle.read()
    assert "CapEff:\t0000000000000000" in filter_status
    assert "CapPrm:\t0000000000000000" in filter_status
    assert "65534" in filter_status
    wait_until(lambda: sorted(os.listdir(public_dir)) == ["filter-status"], 10,
               what="temp files to be removed")


@pytest.mark.root
def test_unknown_user_is_a_clear_error(tmp_path, upstream):
    if os.geteuid() != 0:
        pytest.skip("only root switches users")
    conf = write_config(tmp_path / "p.conf", {"OutAddress": upstream.address,
                                             "Listen": "127.0.0.1:%d" % free_port(),
                                             "User": "no-such-user-xyz"})
    result = subprocess.run([PYTHON, "-m", "proxsmtp.cli", "-d", "1", "-f", str(conf)], cwd=REPO,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "couldn't look up user: no-such-user-xyz" in result.stderr
    assert "Traceback" not in result.stderr


def test_daemon_mode_detaches_and_manages_its_pid_file(tmp_path, upstream):
    port = free_port()
    pid_file = tmp_path / "proxsmtpd.pid"
    conf = write_config(tmp_path / "p.conf", {"OutAddress": upstream.address, "Workers": 1,
                                             "Listen": "127.0.0.1:%d" % port,
                                             "TempDirectory": str(tmp_path)})
    with detached(conf, pid_file) as (result, daemon):
        assert result.returncode == 0, result.stderr
        assert pid_alive(daemon)
        assert os.getsid(daemon) != os.getsid(0)       # left the launching session
        assert int(status(daemon)["PPid"]) != os.getpid()
        with Client("127.0.0.1", port) as client:
            assert send_mail(client, "a@x.example", ["b@y.example"], b"\r\nhi\r\n")[-1] \
                .startswith("250")
        # A second instance can't bind: it says so and exits non-zero.
        again = subprocess.run([PYTHON, "-m", "proxsmtp.cli", "-f", str(conf),
                                "-p", str(tmp_path / "second.pid")],
                               cwd=REPO, capture_output=True, text=True, timeout=60)
        assert again.returncode != 0
        assert "Address already in use" in again.stderr
    assert not pid_file.exists()


def pid_file_config(rundir: Path, upstream, public_dir: str) -> Path:
    """A daemon that switches to User nobody, with its config in `rundir`."""
    return write_config(rundir / "p.conf", {"OutAddress": upstream.address, "Workers": 1,
                                           "Listen": "127.0.0.1:%d" % free_port(),
                                           "TempDirectory": public_dir, "User": "nobody"})


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to User: nobody")
@pytest.mark.root
def test_pid_file_where_user_may_not_remove_it_is_warned_of_and_emptied(upstream, public_dir):
    """User nobody, the pid file in a directory only root may write (as /run
    is): the start and -t say so, naming the path, the user and the way out;
    at exit the master, no longer root, empties the file, which then names
    no dead process."""
    rundir = Path(tempfile.mkdtemp(prefix="proxsmtpd-run-", dir="/tmp"))
    try:
        rundir.chmod(0o755)
        pid_file = rundir / "proxsmtpd.pid"
        conf = pid_file_config(rundir, upstream, public_dir)
        warning = ("proxsmtpd: warning: -p %s is in %s, not writable by User nobody: at exit the "
                   "daemon, no longer root, can only empty the file, not remove it (expected a "
                   "directory nobody may write, such as /run/proxsmtpd/: install -d -m 0755 "
                   "-o nobody /run/proxsmtpd)\n" % (pid_file, rundir))
        checked = run_proxsmtpd("-t", "-f", str(conf), "-p", str(pid_file))
        assert checked.returncode == 0 and checked.stderr == warning, checked.stderr
        # systemd's RuntimeDirectory=, which it removes at stop: nothing to warn of
        under_systemd = subprocess.run(
            [PYTHON, "-m", "proxsmtp.cli", "-t", "-f", str(conf), "-p", str(pid_file)], cwd=REPO,
            env={**os.environ, "RUNTIME_DIRECTORY": str(rundir)}, capture_output=True, text=True,
            timeout=20)
        assert under_systemd.returncode == 0 and under_systemd.stderr == "", under_systemd.stderr
        with detached(conf, pid_file) as (result, daemon):
            assert result.returncode == 0, result.stderr
            assert warning in result.stderr
            assert int(status(daemon)["Uid"].split()[0]) == 65534
            assert pid_file.read_text() == "%d\n" % daemon
        assert not pid_alive(daemon)
        assert pid_file.read_text() == ""
        lines = conf.read_text().splitlines()
        with_setting = write_config(rundir / "q.conf", "\n".join(lines + ["PidFile: %s\n" % pid_file]))
        checked = run_proxsmtpd("-t", "-f", str(with_setting))
        assert checked.returncode == 0, checked.stderr
        assert checked.stderr.startswith("proxsmtpd: warning: %s, line %d: PidFile: %s is in %s, "
                                         % (with_setting, len(lines) + 1, pid_file, rundir)), \
            checked.stderr
    finally:
        shutil.rmtree(rundir)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to User: nobody")
@pytest.mark.root
def test_pid_file_in_a_directory_user_owns_is_removed_without_a_warning(upstream, public_dir):
    """User nobody, the pid file in a directory nobody owns (what the init
    script and systemd's RuntimeDirectory= make, /run/proxsmtpd): no warning,
    and the file is gone after SIGTERM."""
    rundir = Path(tempfile.mkdtemp(prefix="proxsmtpd-run-", dir="/tmp"))
    try:
        os.chown(rundir, 65534, 65534)
        rundir.chmod(0o755)
        pid_file = rundir / "proxsmtpd.pid"
        conf = pid_file_config(rundir, upstream, public_dir)
        with detached(conf, pid_file) as (result, daemon):
            assert result.returncode == 0, result.stderr
            assert "warning" not in result.stderr
            assert pid_file.read_text() == "%d\n" % daemon
        assert not pid_alive(daemon)
        assert not pid_file.exists()
    finally:
        shutil.rmtree(rundir)


def test_stdlib_event_loop_when_uvloop_is_missing(proxy, upstream, tmp_path):
    """uvloop is used when installed; without it asyncio's own loop serves,
    filters included (fds 0-2 only, their exit seen)."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "uvloop.py").write_text("raise ImportError('hidden by the test')\n")
    fds = tmp_path / "fds"
    px = proxy({"OutAddress": upstream.address, "Workers": 1,
                "FilterCommand": "ls /proc/self/fd > %s; cat" % fds}, start=False)
    px.wrapper = ("env", "PYTHONPATH=%s" % hide)
    px.start()
    with open("/proc/%d/maps" % workers(px, 1)[0]) as handle:
        assert "uvloop" not in handle.read()
    with px.connect() as client:
        assert send_mail(client, "a@x.example", ["b@y.example"], b"\r\nbody\r\n")[-1] \
            .startswith("250")
    upstream.wait_messages(1)
    # 0-2, plus the one `ls` opens to read the directory
    assert len(fds.read_text().split()) <= 4
