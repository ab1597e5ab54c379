"""What the operator reads: start, reload and stop at notice level, timestamps in
the foreground, the pid in syslog lines, and a word on stderr when there is no
syslog to detach to."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess

import pytest

from harness import PYTHON, REPO, TIMESTAMP, detached, free_port, write_config
from proxsmtp import __version__

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_start_reload_and_stop_are_notices_with_timestamps(proxy, upstream):
    px = proxy({"OutAddress": upstream.address, "Workers": 2, "MaxConnections": 7}, debug=2)
    px.wait_log(r"^proxsmtpd: proxsmtpd %s started: Listen %s, OutAddress %s, 2 workers, "
                r"MaxConnections 7$" % (re.escape(__version__), re.escape(px.listen),
                                        re.escape(upstream.address)))
    px.conf.write_text(px.conf.read_text().replace("MaxConnections: 7", "MaxConnections: 9"))
    px.proc.send_signal(signal.SIGHUP)
    px.wait_log(r"^proxsmtpd: reloaded configuration from .*: .*MaxConnections 9$")
    assert px.stop() == 0
    text = px.log()
    assert re.search(r"^proxsmtpd: received SIGTERM, stopping$", text, re.M)
    assert re.search(r"^proxsmtpd: stopped$", text, re.M)
    raw = px.stderr_path.read_text().splitlines()
    assert raw and all(TIMESTAMP.match(line) for line in raw), raw


def test_start_line_names_transparent_mode_and_metrics(proxy):
    stats = "127.0.0.1:%d" % free_port()
    px = proxy({"TransparentProxy": "client", "Workers": 1, "StatsListen": stats}, debug=2)
    px.wait_log(r"started: Listen .*, TransparentProxy client, 1 worker, MaxConnections 64, "
                r"metrics at %s/metrics$" % re.escape(stats))


SYSLOG_PROBE = r"""
import os, sys
from proxsmtp.process import log as logs
logs.setup_syslog(sys.argv[1])
logs.notice("from the master")
logs.log.debug("never sent to syslog")
pid = os.fork()
if pid == 0:
    logs.log.info("from a worker")
    os._exit(0)
os.waitpid(pid, 0)
print(os.getpid(), pid)
"""


def test_syslog_lines_carry_the_pid_of_their_process(tmp_path):
    path = str(tmp_path / "log")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog:
        syslog.bind(path)
        syslog.settimeout(10)
        probe = subprocess.run([PYTHON, "-c", SYSLOG_PROBE, path], cwd=REPO,
                               capture_output=True, text=True, timeout=30)
        assert probe.returncode == 0, probe.stderr
        lines = [syslog.recv(4096).decode(), syslog.recv(4096).decode()]
        syslog.settimeout(0.5)
        with pytest.raises(socket.timeout):
            syslog.recv(4096)
    master, child = map(int, probe.stdout.split())
    # facility mail (2): notice 2*8+5, info 2*8+6
    assert lines == ["<21>proxsmtpd[%d]: from the master\0" % master,
                     "<22>proxsmtpd[%d]: from a worker\0" % child]


@pytest.mark.skipif(os.path.exists("/dev/log"), reason="this machine has a syslog socket")
def test_daemon_without_syslog_says_so_before_detaching(tmp_path, upstream):
    pid_file = tmp_path / "proxsmtpd.pid"
    conf = write_config(tmp_path / "p.conf", {"OutAddress": upstream.address, "Workers": 1,
                                             "Listen": "127.0.0.1:%d" % free_port(),
                                             "TempDirectory": str(tmp_path)})
    with detached(conf, pid_file) as (result, daemon):
        assert result.returncode == 0, result.stderr
        assert "no syslog daemon to log to (/dev/log: No such file or directory)" in result.stderr
