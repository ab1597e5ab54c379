"""Configuration files as the daemon reads them (proxsmtpd.conf(5)), and where
the server connection goes for each OutAddress / Listen form (ADDRESSES in
proxsmtpd.conf(5))."""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from proxsmtp.process import config
from harness import (PYTHON, REPO, Client, Proxy, RecordingServer, free_port, run_proxsmtpd,
                     send_mail, write_config)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BODY = b"Subject: x\r\n\r\nbody\r\n"


def start_fails(tmp_path, text: str) -> str:
    conf = write_config(tmp_path / "test.conf", text)
    result = run_proxsmtpd("-d", "2", "-f", str(conf))
    assert result.returncode == 2, result.stderr
    return result.stderr


# --- errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("line, words", [
    ("MaxConnections: 1", ["MaxConnections"]),
    ("MaxConnections: many", ["MaxConnections"]),
    ("TimeOut: 0", ["TimeOut"]),
    ("KeepAlives: -5", ["KeepAlives"]),
    ("XClient: perhaps", ["XClient"]),
    ("TransparentProxy: sideways", ["TransparentProxy"]),
    ("FilterType: milter", ["FilterType"]),
    ("FilterTimeout: none", ["FilterTimeout"]),
    ("FilterConnections: -1", ["FilterConnections", "an integer from 0 to 1000"]),
    ("FilterConnections: some", ["FilterConnections"]),
    ("FilterIdleTime: 0", ["FilterIdleTime", "an integer from 1 to 86400"]),
    ("Skip: unauthenticated", ["Skip"]),
    ("Listen: 127.0.0.1:70000", ["Listen"]),
    ("TempDirectory:", ["TempDirectory"]),
    ("Milters: inet:127.0.0.1", ["Milters", "inet:host:port"]),
    ("MilterDefaultAction: bounce", ["MilterDefaultAction", "tempfail, accept, reject"]),
    ("MilterTimeout: 0", ["MilterTimeout", "an integer from 1 to 86400"]),
])
def test_invalid_values(tmp_path, line, words):
    stderr = start_fails(tmp_path, "# test\nOutAddress: 10026\n\n%s\n" % line)
    for word in words:
        assert word in stderr
    assert "line 4" in stderr


@pytest.mark.parametrize("line", ["OutAddress 10026", "[section]"])
def test_invalid_lines(tmp_path, line):
    stderr = start_fails(tmp_path, "OutAddress: 10026\n%s\n" % line)
    assert "test.conf, line 2: invalid config line: %s" % line in stderr


def test_unknown_setting_with_did_you_mean(tmp_path):
    stderr = start_fails(tmp_path, "OutAddress: 10026\nFilterComand: cat\n")
    assert stderr == ('proxsmtpd: %s, line 2: unknown setting "FilterComand" (did you mean '
                      'FilterCommand?)\n' % (tmp_path / "test.conf"))


def test_missing_out_address(tmp_path):
    assert "OutAddress" in start_fails(tmp_path, "TimeOut: 10\n")


def test_smtp_filter_without_host(tmp_path):
    assert "FilterCommand" in start_fails(tmp_path, "OutAddress: 10026\nFilterType: smtp\n")


def test_unresolvable_out_address(tmp_path):
    assert "OutAddress" in start_fails(tmp_path, "OutAddress: no-such-host.invalid:25\n")


# --- files that load --------------------------------------------------------------

UPSTREAM_STYLE = """\
# ------------------------------------------------------------------
#        a proxsmtpd.conf written the way upstream's sample is
# ------------------------------------------------------------------
# - Comments are lines that start with a #

# Where filtered mail goes
OutAddress: {out}

# The filter and how long it may take
FilterCommand: cat
FilterTimeout: 10
FilterType: pipe

# The maximum number of connections at once
MaxConnections: 3000

# Network timeout
TimeOut: 180

Header: X-Filtered: By ProxSMTP
KeepAlives: 0
XClient: off
Listen: {listen}
TempDirectory: {spool}
TransparentProxy: off
    FilterReject :  530 Email Rejected
#User: nobody
"""


def test_upstream_style_config_loads_and_works(tmp_path, upstream):
    listen = "127.0.0.1:%d" % free_port()
    spool = tmp_path / "spool"
    spool.mkdir()
    text = UPSTREAM_STYLE.format(out=upstream.address, listen=listen, spool=spool)
    p = Proxy(tmp_path / "p", raw_config=text, settings={"Listen": listen})
    try:
        p.start()
        with p.connect() as client:
            assert send_mail(client, "a@x.test", ["b@y.test"], BODY)[0].startswith("250")
        raw = upstream.wait_messages(1)[0].raw
        assert raw == b"Subject: x\r\nX-Filtered: By ProxSMTP\r\n\r\nbody"
    finally:
        p.stop()
    assert list(spool.iterdir()) == []


def test_seed_transparent_config_starts(tmp_path):
    """The seed README's four lines (with a test port) start the daemon."""
    port = free_port()
    text = ("TransparentProxy: full\nListen: 127.0.0.1:%d\nFilterType: smtp\n"
            "FilterCommand: 192.168.0.100 # or 127.0.0.1 for haproxy\n" % port)
    p = Proxy(tmp_path / "p", raw_config=text, settings={"Listen": "127.0.0.1:%d" % port})
    try:
        p.start()
        # connecting to the proxy itself is a loop in transparent mode
        with p.connect() as client:
            assert client.greeting == [] or client.greeting[0][:1] == "4"
        p.wait_log("loop detected")
    finally:
        assert p.stop() == 0


def test_transparent_with_out_address_warns(tmp_path):
    listen = "127.0.0.1:%d" % free_port()
    p = Proxy(tmp_path / "p", raw_config="TransparentProxy: on\nOutAddress: 10026\nListen: %s\n"
              % listen, settings={"Listen": listen}, debug=1)
    try:
        p.start()
        assert "line 2: OutAddress: ignored, as TransparentProxy is enabled" in p.log()
    finally:
        p.stop()


# --- OutAddress forms (ADDRESSES in proxsmtpd.conf(5)) -----------------------------------

def relay_one(proxy, out_address: str, source: str | None = None, **settings):
    p = proxy({"OutAddress": out_address, **settings})
    with p.connect(source=source) as client:
        assert client.greeting[0].startswith("220"), client.greeting
        assert send_mail(client, "a@x.test", ["b@y.test"], BODY)[0].startswith("250")
    return p


def test_out_address_hostname_and_port(proxy, upstream):
    relay_one(proxy, "localhost:%d" % upstream.port)
    assert len(upstream.wait_messages(1)) == 1


def test_out_address_host_only_means_port_25(proxy):
    try:
        server = RecordingServer(host="127.0.0.25", port=25)
    except OSError as exc:
        pytest.skip("can't listen on 127.0.0.25:25: %s" % exc)
    try:
        relay_one(proxy, "127.0.0.25")
        assert len(server.wait_messages(1)) == 1
    finally:
        server.stop()


def test_out_address_bare_port_connects_back_to_client(proxy, make_upstream):
    """Loopback feature: the server is the client's own IP on that port."""
    server = make_upstream(host="127.0.0.7")
    relay_one(proxy, str(server.port), source="127.0.0.7")
    assert len(server.wait_messages(1)) == 1
    # the same port on another address is not where it goes
    other = make_upstream(host="127.0.0.8", port=server.port)
    relay_one(proxy, str(server.port), source="127.0.0.8")
    assert len(other.wait_messages(1)) == 1 and len(server.messages) == 1


def test_out_address_ipv6(proxy, make_upstream):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    server = make_upstream(host="::1")
    assert server.address.startswith("[::1]:")
    relay_one(proxy, server.address)
    assert len(server.wait_messages(1)) == 1


def test_out_address_unix_socket(proxy, make_upstream, tmp_path):
    server = make_upstream(path=str(tmp_path / "upstream.sock"))
    relay_one(proxy, server.address)
    assert len(server.wait_messages(1)) == 1


def test_listen_bare_port_means_all_addresses(proxy, upstream):
    port = free_port()
    p = proxy({"OutAddress": upstream.address, "Listen": str(port)})
    with Client("127.0.0.1", port) as client:
        assert send_mail(client, "a@x.test", ["b@y.test"], BODY)[0].startswith("250")
    if socket.has_ipv6:
        with Client("::1", port) as client:
            assert send_mail(client, "c@x.test", ["d@y.test"], BODY)[0].startswith("250")
    assert p.port == port
    upstream.wait_messages(2 if socket.has_ipv6 else 1)


# --- `proxsmtpd -t`: the same checks as a start -------------------------------------

NOBODY_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: checks for User: nobody")


@pytest.fixture
def shared_dir():
    """A directory outside pytest's 0700 tree, so that `nobody` can be let in or kept out."""
    path = tempfile.mkdtemp(prefix="proxsmtpd-test-", dir="/tmp")
    os.chmod(path, 0o755)
    yield Path(path)
    shutil.rmtree(path)


def check(conf: Path, *more: str) -> subprocess.CompletedProcess:
    return run_proxsmtpd("-t", "-f", str(conf), *more)


def refused_alike(conf: Path, message: str) -> None:
    """`-t` and a start refuse the file with the same message, exit 2."""
    tested = check(conf)
    assert tested.returncode == 2, tested.stderr
    assert tested.stdout == ""
    assert tested.stderr == "proxsmtpd: %s\nproxsmtpd: configuration file %s test failed\n" % (
        message, conf)
    started = run_proxsmtpd("-d", "1", "-f", str(conf))
    assert started.returncode == 2, started.stderr
    assert started.stderr.endswith("proxsmtpd: %s\n" % message), started.stderr


def test_config_test_successful(tmp_path):
    conf = write_config(tmp_path / "good.conf", "OutAddress: 127.0.0.1:10026\nListen: 127.0.0.1:%d\n"
                        "TempDirectory: %s\n" % (free_port(), tmp_path))
    tested = check(conf)
    assert tested.returncode == 0, tested.stderr
    assert tested.stdout == "proxsmtpd: configuration file %s test is successful\n" % conf
    assert tested.stderr == ""


def test_config_test_prints_warnings_and_still_succeeds(tmp_path):
    conf = write_config(tmp_path / "warn.conf", "OutAddress: 10026\nListen: 0.0.0.0:%d\n"
                        "TempDirectory: %s\nHeader: X-A: %%q\n" % (free_port(), tmp_path))
    tested = check(conf)
    assert tested.returncode == 0, tested.stderr
    assert "%s, line 2: Listen: 0.0.0.0:" % conf in tested.stderr
    assert "accepts connections from other hosts" in tested.stderr
    assert "%s, line 4: Header: unknown symbol %%q is left out" % conf in tested.stderr
    assert "test is successful" in tested.stdout


def test_config_test_marks_every_warning_as_one(tmp_path):
    conf = write_config(tmp_path / "warn.conf", "OutAddress: 10026\nListen: 0.0.0.0:%d\n"
                        "TempDirectory: %s\nHeader: X-A: %%q\nProxyProtocolFrom: 10.0.0.0/8\n"
                        "PidFile: %s\n" % (free_port(), tmp_path, tmp_path / "conf.pid"))
    tested = run_proxsmtpd("-t", "-f", str(conf), "-p", str(tmp_path / "cli.pid"))
    assert tested.returncode == 0, tested.stderr
    lines = tested.stderr.splitlines()
    assert len(lines) == 4, lines
    assert all(line.startswith("proxsmtpd: warning: ") for line in lines), lines
    assert any(line.startswith("proxsmtpd: warning: %s, line 4: Header: unknown symbol %%q"
                               % conf) for line in lines), lines
    assert "proxsmtpd: warning: ignoring pid file specified on the command line." in lines


def test_a_byte_order_mark_before_the_first_setting_is_ignored(tmp_path):
    text = "OutAddress: 127.0.0.1:10026\nListen: 127.0.0.1:%d\nTempDirectory: %s\n" % (
        free_port(), tmp_path)
    plain = write_config(tmp_path / "plain.conf", text)
    marked = tmp_path / "bom.conf"
    marked.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert config.load(str(marked)) == dataclasses.replace(config.load(str(plain)),
                                                           source=str(marked))
    tested = check(marked)
    assert tested.returncode == 0, tested.stderr
    assert tested.stderr == ""


@pytest.mark.parametrize("text, line, message", [
    ("FilterComand: cat", 2, 'unknown setting "FilterComand" (did you mean FilterCommand?)'),
    ("FilterType: milter", 2, 'FilterType: expected one of pipe, file, smtp, reject, not "milter"'),
    ("MaxConnections: 1", 2, 'MaxConnections: expected an integer from 2 to 1048576, not "1"'),
    ("Milters: unix:milter.sock", 2, "Milters: unix: needs an absolute path: unix:milter.sock "
     "(expected milters in Postfix's syntax, inet:host:port, inet:[IPv6]:port or unix:/path, "
     "separated by commas)"),
    ("Listen: 127.0.0.1:99999", 2, "Listen: invalid port in address: 127.0.0.1:99999 (expected "
     "address:port, address, port, [IPv6]:port or /path/to/socket)"),
    ("OutAddress: host name", 1, "OutAddress: invalid host in address: host name (expected "
     "host:port, host, port, [IPv6]:port or /path/to/socket)"),
    ("User: no-such-user-xyz", 2, "User: couldn't look up user: no-such-user-xyz (expected an "
     "existing user name or uid; create one with: adduser --system --no-create-home --group "
     "proxsmtpd)"),
    ("FilterCommand: /no/such/filter --flag", 2, "FilterCommand: /no/such/filter: no such program "
     "(expected a shell command)"),
    ("FilterCommand: no-such-program-xyz | cat", 2, "FilterCommand: no-such-program-xyz: no such "
     "program (expected a shell command)"),
])
def test_config_errors_from_test_and_start(tmp_path, text, line, message):
    if text.startswith("OutAddress"):
        body = text + "\n"
    else:
        body = "OutAddress: 10026\n" + text + "\n"
    conf = write_config(tmp_path / "bad.conf", body + "TempDirectory: %s\n" % tmp_path)
    refused_alike(conf, "%s, line %d: %s" % (conf, line, message))


def test_config_test_missing_file(tmp_path):
    missing = tmp_path / "missing.conf"
    tested = check(missing)
    assert tested.returncode == 2
    assert tested.stderr == ("proxsmtpd: configuration file not found: %s\n"
                             "proxsmtpd: configuration file %s test failed\n" % (missing, missing))


@pytest.mark.parametrize("command", ["if true; then cat; fi", "exec cat", "cat | sed s/a/b/",
                                     "FOO=1 cat", "$HOME/bin/filter", "(cat)",
                                     "echo x >&2; cat", "/bin/sh -c cat"])
def test_filter_commands_the_shell_decides_pass(tmp_path, command):
    conf = write_config(tmp_path / "ok.conf", "OutAddress: 10026\nListen: 127.0.0.1:1\n"
                        "TempDirectory: %s\nFilterCommand: %s\n" % (tmp_path, command))
    tested = check(conf)
    assert tested.returncode == 0, tested.stderr


def test_temp_directory_missing_or_not_a_directory(tmp_path):
    missing = tmp_path / "spool"
    conf = write_config(tmp_path / "t.conf", "OutAddress: 10026\nTempDirectory: %s\n" % missing)
    refused_alike(conf, "%s, line 2: TempDirectory: %s does not exist (expected a directory "
                  "proxsmtpd can write)" % (conf, missing))
    missing.write_text("")
    refused_alike(conf, "%s, line 2: TempDirectory: %s is not a directory" % (conf, missing))


@NOBODY_ONLY
@pytest.mark.root
def test_temp_directory_not_writable_by_user(tmp_path, shared_dir):
    conf = write_config(tmp_path / "t.conf", "OutAddress: 10026\nListen: 127.0.0.1:%d\n"
                        "User: nobody\nTempDirectory: %s\n" % (free_port(), shared_dir))
    refused_alike(conf, "%s, line 4: TempDirectory: %s is not writable by nobody" % (conf, shared_dir))
    os.chown(shared_dir, pwd.getpwnam("nobody").pw_uid, -1)
    assert check(conf).returncode == 0


@NOBODY_ONLY
@pytest.mark.root
def test_filter_program_not_executable_by_user(tmp_path, shared_dir):
    script = shared_dir / "filter.sh"
    script.write_text("#!/bin/sh\ncat\n")
    script.chmod(0o700)
    spool = shared_dir / "spool"
    spool.mkdir(mode=0o1777)
    spool.chmod(0o1777)
    conf = write_config(tmp_path / "f.conf", "OutAddress: 10026\nUser: nobody\nTempDirectory: %s\n"
                        "FilterCommand: %s\n" % (spool, script))
    refused_alike(conf, "%s, line 4: FilterCommand: %s: no such program that nobody may run "
                  "(expected a shell command)" % (conf, script))
    script.chmod(0o755)
    assert check(conf).returncode == 0


@NOBODY_ONLY
@pytest.mark.root
def test_tls_key_only_root_can_read_is_refused_when_user_would_reload_it(tmp_path, shared_dir):
    """certbot writes keys 0600 root: a start as root could read it, but every
    reload, made as User after the switch, could not."""
    import trustme
    cert = trustme.CA().issue_cert("proxy.test")
    chain, key = shared_dir / "chain.pem", shared_dir / "key.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key))
    chain.chmod(0o644)
    key.chmod(0o600)
    assert key.stat().st_uid == 0
    spool = shared_dir / "spool"
    spool.mkdir(mode=0o1777)
    spool.chmod(0o1777)
    conf = write_config(tmp_path / "k.conf", "OutAddress: 10026\nListen: 127.0.0.1:%d\n"
                        "User: nobody\nTempDirectory: %s\nTLSCertificate: %s\nTLSKey: %s\n"
                        % (free_port(), spool, chain, key))
    group = grp.getgrgid(pwd.getpwnam("nobody").pw_gid).gr_name
    refused_alike(conf, "%s, line 6: TLSKey: %s is not readable by nobody (Permission denied): "
                  "the master reads it again as nobody on every reload (SIGHUP), so a reload "
                  "would fail and a renewed certificate never be used (expected a file nobody "
                  "can read, e.g. with chgrp %s %s; chmod g+r %s)" % (conf, key, group, key, key))
    os.chown(key, -1, pwd.getpwnam("nobody").pw_gid)
    key.chmod(0o640)
    tested = check(conf)
    assert tested.returncode == 0, tested.stderr
    shared_dir.chmod(0o700)         # the directory on the way counts too
    tested = check(conf)
    assert tested.returncode == 2
    assert "TLSCertificate: %s is not readable by nobody (Permission denied)" % chain \
        in tested.stderr, tested.stderr


@pytest.mark.root
def test_temp_directory_on_a_read_only_file_system(tmp_path):
    """What ProtectSystem=strict makes of a TempDirectory not in ReadWritePaths."""
    if not shutil.which("unshare"):
        pytest.skip("unshare(1) is not installed")
    spool = tmp_path / "ro"
    spool.mkdir()
    conf = write_config(tmp_path / "ro.conf", "OutAddress: 10026\nTempDirectory: %s\n" % spool)
    script = 'mount -t tmpfs -o ro tmpfs "$1" && exec "$2" -m proxsmtp.cli -t -f "$3"'
    done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
                           str(spool), PYTHON, str(conf)], cwd=REPO, capture_output=True,
                          text=True, timeout=30)
    if "mount" in done.stderr and done.returncode != 2:
        pytest.skip("no private mount namespace here: %s" % done.stderr.strip())
    assert done.returncode == 2
    assert ("%s, line 2: TempDirectory: %s is on a read-only file system (under systemd, "
            "ProtectSystem=strict: add it to ReadWritePaths=)" % (conf, spool)) in done.stderr


def test_reload_refuses_a_temp_directory_that_is_gone(tmp_path, upstream):
    p = Proxy(tmp_path / "p", {"OutAddress": upstream.address, "Workers": 1}, debug=1)
    try:
        p.start()
        gone = tmp_path / "gone"
        write_config(p.conf, dict(p.settings, TempDirectory=str(gone)))
        p.proc.send_signal(signal.SIGHUP)
        p.wait_log(r"reload failed, keeping the running configuration: .*, line \d+: "
                   r"TempDirectory: %s does not exist" % re.escape(str(gone)))
        with p.connect() as client:
            assert send_mail(client, "a@x.test", ["b@y.test"], BODY)[-1].startswith("250")
    finally:
        assert p.stop() == 0


def test_listening_beyond_loopback_warns_at_start(tmp_path, upstream):
    port = free_port("0.0.0.0")
    p = Proxy(tmp_path / "p", {"OutAddress": upstream.address, "Listen": "0.0.0.0:%d" % port},
              debug=1)
    try:
        p.start()
        p.wait_log(r"line \d+: Listen: 0\.0\.0\.0:%d accepts connections from other hosts, and "
                   r"with TransparentProxy, XClient and OutProxyProtocol off the server sees every "
                   r"client as this host" % port)
    finally:
        assert p.stop() == 0
    q = Proxy(tmp_path / "q", {"OutAddress": upstream.address, "XClient": "on",
                               "Listen": "0.0.0.0:%d" % port}, debug=1)
    try:
        q.start()
        assert "accepts connections from other hosts" not in q.log()
    finally:
        assert q.stop() == 0
