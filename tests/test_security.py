"""Security (SECURITY in proxsmtpd(8)): private temp files, a safe TempDirectory,
what a filter inherits, SMTP values only ever as environment, and no XCLIENT from clients."""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import tempfile

import pytest

from harness import run_proxsmtpd, send_mail, wait_until, write_config
from proxsmtp.process import config
from proxsmtp.message import spool

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BODY = b"Subject: sec\r\n\r\nbody\r\n"


# --- temp files --------------------------------------------------------------------------

def test_spool_files_are_exclusive_and_private(tmp_path, monkeypatch):
    """mkstemp: O_EXCL|O_NOFOLLOW, mode 0600 whatever the umask; a name that
    exists already (here a planted symlink) is never opened, another is taken."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    planted = tmp_path / (spool.prefix() + "taken")
    planted.symlink_to(victim)
    names = iter(["taken", "fresh", "other"])
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: names)
    old = os.umask(0)
    try:
        message = spool.Spool(str(tmp_path))
        message.write(b"hello")
        message.finish()
        fd, extra = message.new_file()
        os.close(fd)
    finally:
        os.umask(old)
    try:
        assert os.path.basename(message.path) == spool.prefix() + "fresh"
        assert os.path.basename(extra) == spool.prefix() + "other"
        for path in (message.path, extra):
            info = os.lstat(path)
            assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
        assert victim.read_bytes() == b"untouched"
    finally:
        message.remove()
    assert not os.path.exists(message.path) and not os.path.exists(extra)


def test_temp_files_private_with_umask_000(proxy, upstream, tmp_path):
    """Even a daemon started with umask 000 spools to 0600 files named after
    its worker's pid (the message and the pipe filter's output)."""
    report = tmp_path / "modes"
    px = proxy({"OutAddress": upstream.address, "Workers": 1,
                "FilterCommand": "stat -c '%%a %%n' \"$TMPDIR\"/* > %s; cat" % report},
               start=False)
    px.wrapper = ("sh", "-c", 'umask 000 && exec "$@"', "sh")
    px.start()
    [worker] = px.children()
    with px.connect() as client:
        assert send_mail(client, "a@x.test", ["b@y.test"], BODY)[-1].startswith("250")
    lines = report.read_text().split("\n")[:-1]
    assert len(lines) == 2
    for line in lines:
        mode, path = line.split(" ", 1)
        assert mode == "600"
        assert os.path.basename(path).startswith("proxsmtpd.%d." % worker)


# --- TempDirectory that anyone may write -------------------------------------------------

@pytest.fixture
def open_dir():
    path = tempfile.mkdtemp(prefix="proxsmtpd-test-")
    os.chmod(path, 0o777)
    yield path
    os.rmdir(path)


def test_world_writable_temp_directory_refused_at_start(tmp_path, upstream, open_dir):
    conf = write_config(tmp_path / "p.conf", {"OutAddress": upstream.address,
                                             "TempDirectory": open_dir})
    result = run_proxsmtpd("-d", "1", "-f", str(conf))
    assert result.returncode == 2
    assert ("%s, line 2: TempDirectory: %s is world-writable without the sticky bit"
            % (conf, open_dir)) in result.stderr
    assert "Traceback" not in result.stderr
    os.chmod(open_dir, 0o1777)                  # /tmp's mode is fine
    assert config.load(str(conf)).TempDirectory == open_dir


def test_world_writable_temp_directory_refused_at_reload(proxy, upstream, open_dir):
    px = proxy({"OutAddress": upstream.address, "Workers": 1})
    before = list(px.children())
    write_config(px.conf, dict(px.settings, TempDirectory=open_dir))
    px.proc.send_signal(signal.SIGHUP)
    px.wait_log(r"reload failed, keeping the running configuration: .*, line \d+: "
                r"TempDirectory: .* is world-writable without the sticky bit")
    assert list(px.children()) == before
    with px.connect() as client:
        assert send_mail(client, "a@x.test", ["b@y.test"], BODY)[-1].startswith("250")
    assert os.listdir(open_dir) == []


# --- what a filter gets -----------------------------------------------------------------

FD_REPORT = r"""
import json, os, sys
fds = {}
for name in os.listdir("/proc/self/fd"):
    try:
        fds[int(name)] = os.readlink("/proc/self/fd/" + name)
    except OSError:
        pass                        # the directory listdir had open
with open(sys.argv[1], "w") as out:
    json.dump(fds, out)
sys.stdout.buffer.write(sys.stdin.buffer.read())
"""


def test_filter_gets_only_fds_0_to_2(proxy, upstream, tmp_path):
    """Seen by the filter program itself: stdin (the message), stdout (its
    output file), stderr (to the worker) and nothing of the daemon's."""
    script, report = tmp_path / "fds.py", tmp_path / "fds.json"
    script.write_text(FD_REPORT)
    px = proxy({"OutAddress": upstream.address,
                "FilterCommand": "exec %s %s %s" % (sys.executable, script, report)})
    with px.connect() as client:
        assert send_mail(client, "a@x.test", ["b@y.test"], BODY)[-1].startswith("250")
    fds = {int(fd): target for fd, target in json.loads(report.read_text()).items()
           if not target.startswith("/proc/")}
    assert sorted(fds) == [0, 1, 2], fds
    assert fds[0].startswith(str(px.spool) + "/proxsmtpd.")
    assert fds[1].startswith(str(px.spool) + "/proxsmtpd.") and fds[1] != fds[0]
    assert fds[2].startswith(("pipe:", "socket:"))


HOSTILE = [
    "$(touch {m})",
    "`touch {m}`",
    ";touch {m};",
    "'$(touch {m})'",
    '"$(touch {m})"',
    "|touch {m}|",
    "&&touch${{IFS}}{m}",
    "${{IFS}}$(touch${{IFS}}{m})",
]


def test_smtp_values_reach_filter_only_as_environment(proxy, make_upstream, tmp_path):
    """Sender, recipients, HELO and XFORWARD values full of shell syntax are
    passed literally in the environment and never run."""
    marker = tmp_path / "pwned"
    dump = tmp_path / "env.json"
    script = tmp_path / "dump.py"
    script.write_text("import json, os, sys\n"
                      "json.dump(dict(os.environ), open(sys.argv[1], 'w'))\n"
                      "sys.stdout.buffer.write(sys.stdin.buffer.read())\n")
    values = [value.format(m=marker) for value in HOSTILE]
    nospace = [value.replace(" ", "${IFS}") for value in values]
    upstream = make_upstream(extensions=("XFORWARD NAME ADDR PROTO HELO",))
    px = proxy({"OutAddress": upstream.address,
                "FilterCommand": "%s %s %s" % (sys.executable, script, dump)})
    sender = "s" + "".join(nospace) + "@x.test"
    recipients = ["r%d%s@y.test" % (i, value) for i, value in enumerate(nospace)]
    helo = "".join(nospace)
    with px.connect() as client:
        assert client.cmd("EHLO " + helo)[-1].startswith("250")
        assert client.cmd("XFORWARD ADDR=%s HELO=%s" % (helo, helo))[-1].startswith("250")
        assert client.cmd("MAIL FROM:<%s>" % sender)[-1].startswith("250")
        for rcpt in recipients:
            assert client.cmd("RCPT TO:<%s>" % rcpt)[-1].startswith("250")
        assert client.cmd("DATA")[0].startswith("354")
        client.send(BODY + b".\r\n")
        assert client.reply()[-1].startswith("250")
    upstream.wait_messages(1)
    env = json.loads(dump.read_text())
    assert env["SENDER"] == sender
    assert env["RECIPIENTS"] == "\n".join(recipients)
    assert env["HELO"] == helo
    assert env["REMOTE"] == helo and env["REMOTE_HELO"] == helo
    assert not marker.exists()


# --- XCLIENT --------------------------------------------------------------------------------

def test_client_xclient_never_forwarded_even_with_xclient_on(proxy, make_upstream):
    """With XClient on, the server hears exactly one XCLIENT: the proxy's own,
    with the real client address, whatever the client tries."""
    upstream = make_upstream(extensions=("XCLIENT ADDR HELO NAME", "8BITMIME"))
    px = proxy({"OutAddress": upstream.address, "XClient": "on"})
    attempts = ["XCLIENT ADDR=10.6.6.6", "xclient addr=10.6.6.6", "  XCLIENT ADDR=10.6.6.6",
                "XCLIENT\tADDR=10.6.6.6", "XCLIENT"]
    with px.connect() as client:
        assert client.cmd("EHLO c.example")[-1].startswith("250")
        for line in attempts:
            assert client.cmd(line) == ["554 Insufficient authorization"]
        assert client.cmd("NOOP\rXCLIENT ADDR=10.6.6.6")[0].startswith("500")
        assert send_mail(client, "a@x.test", ["b@y.test"], BODY, helo="RSET")[-1] \
            .startswith("250")
    [message] = upstream.wait_messages(1)
    assert message.xclient == ["XCLIENT ADDR=127.0.0.1"]
    seen = [line for line in upstream.commands() if "XCLIENT" in line.upper()]
    assert seen == ["XCLIENT ADDR=127.0.0.1"]
    assert not any("10.6.6.6" in line for line in upstream.commands())
    wait_until(lambda: not px.spool_files(), 10, what="no temp files")
