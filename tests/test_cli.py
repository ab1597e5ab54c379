"""The command line (OPTIONS, EXIT STATUS in proxsmtpd(8)), run as a real process."""

from __future__ import annotations

import os
import signal

import pytest

from harness import Proxy, free_port, run_proxsmtpd, send_mail, wait_until, write_config
from proxsmtp import __version__
from proxsmtp.process import defaults

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_version():
    result = run_proxsmtpd("-v")
    assert result.returncode == 0
    assert "proxsmtpd (version %s)" % __version__ in result.stdout
    assert defaults.CONFIG_FILE in result.stdout


@pytest.mark.parametrize("level", ["5", "-1", "x", "", "10"])
def test_bad_debug_level(level):
    result = run_proxsmtpd("-d", level, "-f", "/nonexistent")
    assert result.returncode == 2
    assert "invalid debug log level" in result.stderr


@pytest.mark.parametrize("args", [("-x",), ("-d",), ("extra",), ("-d", "1", "more", "args"),
                                  ("--frobnicate",)])
def test_usage_errors(args):
    result = run_proxsmtpd(*args)
    assert result.returncode == 2
    assert "usage: proxsmtpd" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("args, said", [
    (("-x",), "option -x not recognized"),
    (("-t", "-q", "-f", "/nonexistent"), "option -q not recognized"),
    (("--frobnicate",), "option --frobnicate not recognized"),
    (("-d",), "option -d requires argument"),
    (("-d", "1", "more", "args"), "unexpected argument: more"),
])
def test_usage_errors_name_the_bad_option(args, said):
    result = run_proxsmtpd(*args)
    assert result.returncode == 2
    assert result.stderr.startswith("proxsmtpd: %s\nusage: proxsmtpd " % said), result.stderr


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help(flag):
    result = run_proxsmtpd(flag)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith("usage: proxsmtpd [-d debuglevel] [-f configfile] [-p pidfile]\n")
    for option in ("-t ", "-d level", "-f configfile", "-p pidfile", "--version", defaults.CONFIG_FILE):
        assert option in result.stdout


def test_long_version_is_v():
    assert run_proxsmtpd("--version").stdout == run_proxsmtpd("-v").stdout


def test_explicit_missing_config_file_is_one_fatal_error(tmp_path):
    missing = tmp_path / "nowhere.conf"
    for level in ("0", "1"):
        result = run_proxsmtpd("-d", level, "-f", str(missing))
        assert result.returncode == 2
        assert result.stderr == "proxsmtpd: configuration file not found: %s\n" % missing


def test_default_config_path(tmp_path):
    """Without -f a missing file is a warning (as upstream), then the checks fail."""
    if os.path.exists(defaults.CONFIG_FILE):
        pytest.skip("%s exists on this machine" % defaults.CONFIG_FILE)
    result = run_proxsmtpd("-d", "1")
    assert "configuration file not found: %s" % defaults.CONFIG_FILE in result.stderr
    assert "no OutAddress specified" in result.stderr
    assert result.returncode == 2
    result = run_proxsmtpd("-d", "0")
    assert "not found" not in result.stderr and "no OutAddress specified" in result.stderr


def test_pid_file_in_a_missing_directory(tmp_path, upstream):
    conf = write_config(tmp_path / "p.conf", {"OutAddress": upstream.address,
                                             "Listen": "127.0.0.1:%d" % free_port(),
                                             "TempDirectory": str(tmp_path)})
    pidfile = tmp_path / "no-such-dir" / "proxsmtpd.pid"
    for args in (("-d", "1"), ("-t",), ()):
        result = run_proxsmtpd(*args, "-f", str(conf), "-p", str(pidfile))
        assert result.returncode == 2, (args, result.stderr)
        assert "proxsmtpd: couldn't write pid file %s: no such directory: %s\n" % (
            pidfile, pidfile.parent) in result.stderr
        assert "Errno" not in result.stderr and "Traceback" not in result.stderr


def test_pid_file_written_and_removed(tmp_path, upstream):
    pidfile = tmp_path / "proxsmtpd.pid"
    p = Proxy(tmp_path / "p", {"OutAddress": upstream.address}, args=("-p", str(pidfile)))
    try:
        p.start()
        wait_until(pidfile.exists, what="the pid file")
        assert int(pidfile.read_text().strip()) == p.proc.pid
    finally:
        code = p.stop()
    assert code == 0
    assert not pidfile.exists()


def test_pid_file_setting_overrides_option(tmp_path, upstream):
    from_config = tmp_path / "config.pid"
    from_option = tmp_path / "option.pid"
    p = Proxy(tmp_path / "p", {"OutAddress": upstream.address, "PidFile": str(from_config)},
              args=("-p", str(from_option)), debug=1)
    try:
        p.start()
        wait_until(from_config.exists, what="the pid file")
        assert int(from_config.read_text()) == p.proc.pid
        assert not from_option.exists()
        assert "ignoring pid file" in p.log()
    finally:
        p.stop()
    assert not from_config.exists()


def test_sigterm_exits_zero(tmp_path, upstream):
    p = Proxy(tmp_path / "p", {"OutAddress": upstream.address}, debug=2)
    try:
        p.start()
        p.proc.send_signal(signal.SIGTERM)
        assert p.proc.wait(20) == 0
    finally:
        p.stop()


def test_foreground_logs_to_stderr_by_level(proxy, upstream):
    p = proxy({"OutAddress": upstream.address}, debug=3)
    with p.connect() as client:
        send_mail(client, "a@x.test", ["b@y.test"], b"Subject: x\r\n\r\nx\r\n")
    p.wait_log(r"^proxsmtpd: [0-9A-F]+: client=127\.0\.0\.1, from=a@x\.test")
    assert "CLIENT <" not in p.log()


def test_config_error_exit_code_and_line(tmp_path):
    conf = write_config(tmp_path / "bad.conf", "# comment\nOutAddress: 10026\nTimeOut: soon\n")
    result = run_proxsmtpd("-d", "2", "-f", str(conf))
    assert result.returncode == 2
    assert "TimeOut" in result.stderr and "line 3" in result.stderr
