"""The filters (pipe, file, smtp), their environment and verdicts (FILTERS in
proxsmtpd(8))."""

from __future__ import annotations

import json
import os
import re
import socket
import sys

import pytest

from harness import REPO, RecordingServer, free_port, pid_alive, send_mail, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BODY = b"Subject: test\r\nFrom: a@x.test\r\n\r\nhello world\r\n"

# Dumps its environment and open descriptors as JSON to argv[1], copies stdin to stdout.
ENV_DUMP = r'''
import json, os, sys
fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
with open(sys.argv[1], "w") as out:
    json.dump({"env": dict(os.environ), "fds": fds}, out)
sys.stdout.buffer.write(sys.stdin.buffer.read())
'''


def transaction(client, sender="a@x.test", recipients=("b@y.test",), body=BODY) -> list[str]:
    return send_mail(client, sender, list(recipients), body)


# --- pipe and file ---------------------------------------------------------------

def test_pipe_filter_output_is_forwarded(proxy, upstream):
    p = proxy({"OutAddress": upstream.address, "FilterType": "pipe",
               "FilterCommand": "sed 's/hello/HELLO/'"}, debug=3)
    with p.connect() as client:
        assert transaction(client)[0].startswith("250")
    assert upstream.wait_messages(1)[0].raw == BODY.replace(b"hello", b"HELLO").rstrip(b"\r\n")
    p.wait_log("status=FILTERED")


def test_file_filter_rewrites_in_place(proxy, upstream):
    p = proxy({"OutAddress": upstream.address, "FilterType": "file",
               "FilterCommand": "sed -i 's/hello/HELLO/' \"$EMAIL\""})
    with p.connect() as client:
        assert transaction(client)[0].startswith("250")
    assert upstream.wait_messages(1)[0].raw == BODY.replace(b"hello", b"HELLO").rstrip(b"\r\n")


def test_pipe_filter_environment(proxy, upstream, tmp_path):
    script = tmp_path / "dump.py"
    script.write_text(ENV_DUMP)
    out = tmp_path / "env.json"
    p = proxy({"OutAddress": upstream.address,
               "FilterCommand": "%s %s %s" % (sys.executable, script, out)})
    with p.connect() as client:
        assert transaction(client, "s@x.test", ("r1@y.test", "r2@y.test"))[0].startswith("250")
    upstream.wait_messages(1)
    dump = json.loads(out.read_text())
    env = dump["env"]
    assert env["SENDER"] == "s@x.test"
    assert env["RECIPIENTS"] == "r1@y.test\nr2@y.test"
    assert env["CLIENT"] == "127.0.0.1"
    assert env["SERVER"] == "127.0.0.1"
    assert env["HELO"] == "client.example"
    assert env["TMPDIR"] == str(p.spool)
    assert "EMAIL" not in env and "REMOTE" not in env and "REMOTE_HELO" not in env
    assert dump["fds"][:3] == [0, 1, 2] and len(dump["fds"]) <= 4   # 3: the listdir itself


# The same program, named plainly (run without /bin/sh when it is dash) or
# quoted (shell syntax: run by /bin/sh -c).
WAYS = pytest.mark.parametrize("quote", ["", "'"], ids=["direct", "shell"])


@WAYS
def test_plain_command_runs_without_the_shell(proxy, upstream, tmp_path, quote):
    """A plain command's parent is the worker itself; a quoted one's, the shell."""
    script = tmp_path / "parent"
    script.write_text("#!/bin/sh\necho $PPID > %s/ppid\nexec cat\n" % tmp_path)
    script.chmod(0o755)
    p = proxy({"OutAddress": upstream.address, "FilterCommand": "%s%s%s" % (quote, script, quote)})
    with p.connect() as client:
        assert transaction(client)[0].startswith("250")
    assert upstream.wait_messages(1)[0].raw == BODY.rstrip(b"\r\n")
    parent = int((tmp_path / "ppid").read_text())
    assert (parent in p.children()) == (quote == "")


def test_environment_is_the_same_with_and_without_the_shell(proxy, upstream, tmp_path,
                                                            monkeypatch):
    """What the shell would give the program (its PWD included) is what it gets
    without the shell: the whole environment compared, variable by variable.
    The daemon inherits a PWD that is not its directory: dash exports getcwd()."""
    monkeypatch.setenv("PWD", str(tmp_path))
    script = tmp_path / "dump.py"
    script.write_text(ENV_DUMP)
    dumps = []
    for number, quote in enumerate(("", "'")):
        out = tmp_path / ("env%d.json" % number)
        p = proxy({"OutAddress": upstream.address, "FilterCommand": "%s%s%s %s %s" % (
            quote, sys.executable, quote, script, out)})
        with p.connect() as client:
            assert transaction(client, "s@x.test")[0].startswith("250")
        upstream.wait_messages(number + 1)
        dumps.append(json.loads(out.read_text()))
    direct, shell = (dump["env"] for dump in dumps)
    assert direct["PWD"] == str(REPO) and direct["SENDER"] == "s@x.test"
    assert direct.pop("TMPDIR").endswith("proxy0/spool")        # each proxy its own
    assert shell.pop("TMPDIR").endswith("proxy1/spool")
    assert direct == shell
    assert dumps[0]["fds"] == dumps[1]["fds"]


def test_file_filter_environment(proxy, upstream, tmp_path):
    out = tmp_path / "env"
    p = proxy({"OutAddress": upstream.address, "FilterType": "file",
               "FilterCommand": "{ echo \"$EMAIL\"; cat \"$EMAIL\"; } > %s" % out})
    with p.connect() as client:
        assert transaction(client)[0].startswith("250")
    upstream.wait_messages(1)
    email, _, content = out.read_bytes().partition(b"\n")
    assert os.path.dirname(email.decode()) == str(p.spool)
    assert content == BODY


def test_values_are_never_interpolated(proxy, upstream, tmp_path):
    out = tmp_path / "sender"
    marker = tmp_path / "pwned"
    sender = "$(touch %s)`touch %s`@x.test" % (marker, marker)
    p = proxy({"OutAddress": upstream.address,
               "FilterCommand": "printf '%%s' \"$SENDER\" > %s; cat" % out})
    with p.connect() as client:
        assert transaction(client, sender)[0].startswith("250")
    upstream.wait_messages(1)
    assert out.read_text() == sender
    assert not marker.exists()


def test_filter_lone_dot_output_escaped(proxy, upstream):
    """A filter printing a line that is just `.` must not end the DATA early."""
    p = proxy({"OutAddress": upstream.address,
               "FilterCommand": r"cat >/dev/null; printf 'Subject: x\r\n\r\nbefore\r\n.\r\nafter\r\n.\nlast\r\n'"})
    with p.connect() as client:
        assert transaction(client)[0].startswith("250")
        assert client.cmd("NOOP")[0].startswith("250")
    message = upstream.wait_messages(1)[0]
    assert message.raw == b"Subject: x\r\n\r\nbefore\r\n..\r\nafter\r\n..\nlast"
    assert "after" not in upstream.commands() and "last" not in upstream.commands()


# --- rejections ---------------------------------------------------------------------

@pytest.mark.parametrize("stderr, reply", [
    ("554 5.7.1 Spam detected", "554 5.7.1 Spam detected"),
    ("virus found: Eicar-Test", "550 Content Rejected; virus found: Eicar-Test"),
    ("", "550 Content Rejected"),
    ("first line\\nlast line\\n\\n", "550 Content Rejected; last line"),
    ("451 4.7.1 Greylisted, try later", "451 4.7.1 Greylisted, try later"),
])
def test_rejection_text(proxy, upstream, stderr, reply):
    command = "cat >/dev/null; printf '%s' >&2; exit 1" % stderr if stderr else "cat >/dev/null; exit 3"
    p = proxy({"OutAddress": upstream.address, "FilterCommand": command}, debug=3)
    with p.connect() as client:
        assert transaction(client) == [reply]
        # the session goes on: the next message is filtered again
        assert client.cmd("MAIL FROM:<c@x.test>")[0].startswith("250")
    upstream.wait_command("RSET")
    assert upstream.messages == [] and "DATA" not in upstream.verbs()
    p.wait_log(r'from=a@x\.test, to=b@y\.test, (?:.*, )?reply="%s", (?:.*, )?status=REJECTED$'
               % re.escape(reply))


def test_rejection_after_lots_of_stderr(proxy, upstream):
    """More stderr than a pipe holds: the filter is not blocked, its last line counts."""
    p = proxy({"OutAddress": upstream.address,
               "FilterCommand": "cat; head -c 300000 /dev/zero | tr '\\0' 'e' >&2; "
                                "printf '\\n554 5.7.1 last words\\n' >&2; exit 1"})
    with p.connect() as client:
        assert transaction(client) == ["554 5.7.1 last words"]
    assert upstream.messages == []


def test_250_from_filter_drops_silently(proxy, upstream):
    p = proxy({"OutAddress": upstream.address,
               "FilterCommand": "cat >/dev/null; echo '250 2.0.0 Ok: dropped' >&2; exit 1"})
    with p.connect() as client:
        assert transaction(client) == ["250 2.0.0 Ok: dropped"]
        client.cmd("QUIT")
    upstream.wait_closed("QUIT")
    assert upstream.messages == []
    assert upstream.verbs() == ["EHLO", "MAIL", "RCPT", "RSET", "QUIT"]


def test_second_message_after_rejection(proxy, upstream):
    p = proxy({"OutAddress": upstream.address,
               "FilterCommand": "if grep -q SPAM; then echo spam >&2; exit 1; fi; printf 'Subject: ok\\r\\n\\r\\nok\\r\\n'"})
    with p.connect() as client:
        assert transaction(client, body=b"Subject: x\r\n\r\nSPAM\r\n") == ["550 Content Rejected; spam"]
        client.cmd("MAIL FROM:<c@x.test>")
        client.cmd("RCPT TO:<d@y.test>")
        assert client.cmd("DATA")[0].startswith("354")
        client.send(b"Subject: fine\r\n\r\nfine\r\n.\r\n")
        assert client.reply()[0].startswith("250")
    message = upstream.wait_messages(1)[0]
    assert (message.sender, message.recipients) == ("c@x.test", ["d@y.test"])


# --- failures: 451 Local Error --------------------------------------------------------

@pytest.mark.parametrize("signal_name", ["KILL", "SEGV"])
def test_filter_killed_by_signal(proxy, upstream, signal_name):
    p = proxy({"OutAddress": upstream.address,
               "FilterCommand": "cat >/dev/null; kill -%s $$" % signal_name}, debug=3)
    with p.connect() as client:
        assert transaction(client) == ["451 Local Error"]
        assert client.cmd("NOOP")[0].startswith("250")
    upstream.wait_command("RSET")
    assert upstream.messages == []
    p.wait_log("status=FILTER-ERROR")


@pytest.mark.parametrize("filter_type, command", [
    ("pipe", "for i in 1 2 3 4 5; do echo \"spamc: problem $i\" >&2; done; cat"),
    ("file", "for i in 1 2 3 4 5; do echo \"spamc: problem $i\" >&2; done"),
])
def test_filter_stderr_on_exit_0_is_a_warning_of_a_few_lines(proxy, upstream, filter_type, command):
    """E.g. the SpamAssassin example passing mail unscanned because spamd is down."""
    p = proxy({"OutAddress": upstream.address, "FilterType": filter_type, "FilterCommand": command},
              debug=1)
    with p.connect() as client:
        assert transaction(client)[0].startswith("250")
    upstream.wait_messages(1)
    line = r"^proxsmtpd: [0-9A-F]+: filter command \(exit 0\) wrote on stderr: spamc: problem "
    p.wait_log(line + r"3 \(2 more lines\)$")
    assert [int(n) for n in re.findall(line + r"(\d)", p.log(), re.M)] == [1, 2, 3]


def test_quiet_filter_on_exit_0_logs_no_warning(proxy, upstream):
    p = proxy({"OutAddress": upstream.address, "FilterCommand": "cat"}, debug=1)
    with p.connect() as client:
        assert transaction(client)[0].startswith("250")
    upstream.wait_messages(1)
    assert "filter command" not in p.log()


def test_filter_that_cannot_start(proxy, upstream, tmp_path):
    """A filter missing at start is a config error (tests/test_config.py); here it goes later."""
    script = tmp_path / "filter-gone-later"
    script.write_text("#!/bin/sh\ncat\n")
    script.chmod(0o755)
    p = proxy({"OutAddress": upstream.address, "FilterCommand": str(script)}, debug=3)
    script.unlink()
    with p.connect() as client:
        assert transaction(client) == ["451 Local Error"]
    upstream.wait_command("RSET")
    assert upstream.messages == []
    p.wait_log("status=FILTER-ERROR")


def test_filter_timeout_terminates_filter(proxy, upstream, tmp_path):
    pidfile = tmp_path / "pid"
    p = proxy({"OutAddress": upstream.address, "FilterTimeout": 2,
               "FilterCommand": "echo $$ > %s; exec sleep 60" % pidfile}, debug=3)
    with p.connect() as client:
        assert transaction(client) == ["451 Local Error"]
    pid = int(pidfile.read_text())
    wait_until(lambda: not pid_alive(pid), timeout=10, what="the filter to be gone")
    upstream.wait_command("RSET")
    assert upstream.messages == []
    p.wait_log("status=FILTER-ERROR")
    assert "timeout" in p.log()


def test_filter_ignoring_term_is_killed(proxy, upstream, tmp_path):
    pids = tmp_path / "pids"
    p = proxy({"OutAddress": upstream.address, "FilterTimeout": 1,
               "FilterCommand": "trap '' TERM; sleep 60 & echo $$ $! > %s; wait; wait" % pids},
              debug=3)
    with p.connect() as client:
        assert transaction(client) == ["451 Local Error"]
    for pid in map(int, pids.read_text().split()):
        wait_until(lambda: not pid_alive(pid), timeout=10, what="filter process %d gone" % pid)
    p.wait_log("forced termination")
    p.wait_log("status=FILTER-ERROR")
    assert upstream.messages == []


def test_slow_filter_making_progress_is_not_killed(proxy, upstream):
    p = proxy({"OutAddress": upstream.address, "FilterTimeout": 2,
               "FilterCommand": "cat; for i in 1 2 3 4 5 6 7 8; do sleep 0.4; echo \"X-Step: $i\"; done"})
    with p.connect() as client:
        assert transaction(client, body=b"Subject: slow\r\n")[0].startswith("250")
    assert upstream.wait_messages(1)[0].raw.endswith(b"X-Step: 7\nX-Step: 8\n")


# --- FilterType smtp ---------------------------------------------------------------

@pytest.fixture
def node(make_upstream):
    """A filter node: a recording server that accepts everything (XCLIENT too)."""
    return make_upstream(extensions=("SIZE 1000000", "XCLIENT ADDR HELO NAME", "8BITMIME"),
                         name="node.test", greeting="220 node.test ESMTP")


def smtp_filter(upstream, node, **extra) -> dict:
    return {"OutAddress": upstream.address, "FilterType": "smtp",
            "FilterCommand": node.address, **extra}


def test_smtp_filter_accepts(proxy, upstream, node):
    body = b"Subject: node\r\n\r\n..dot line\r\nbody\r\n"
    p = proxy(smtp_filter(upstream, node), debug=3)
    with p.connect() as client:
        assert send_mail(client, "a@x.test", ["b@y.test", "c@y.test"], body)[0].startswith("250")
    message = upstream.wait_messages(1)[0]
    assert message.raw == body.rstrip(b"\r\n")
    checked = node.wait_messages(1)[0]
    assert checked.raw == body.rstrip(b"\r\n")
    assert checked.xclient == ["XCLIENT ADDR=127.0.0.1 HELO=client.example"]
    assert node.verbs()[:7] == ["EHLO", "XCLIENT", "EHLO", "MAIL", "RCPT", "RCPT", "DATA"]
    assert node.commands()[2:6] == ["EHLO client.example", "MAIL FROM:<a@x.test>",
                                    "RCPT TO:<b@y.test>", "RCPT TO:<c@y.test>"]
    p.wait_log("status=FILTERED")


def test_smtp_filter_multiline_replies(proxy, upstream, make_upstream):
    node = make_upstream(replies={"MAIL": "250-2.1.0 first\r\n250-2.1.0 second\r\n250 2.1.0 Ok",
                                  "XCLIENT": "220-node.test\r\n220 ESMTP ready"},
                         data_reply="250-2.0.0 scanned\r\n250 2.0.0 Ok")
    p = proxy(smtp_filter(upstream, node))
    with p.connect() as client:
        assert transaction(client)[0].startswith("250")
    # a reader taking only first lines would get out of step and see "250"
    # in answer to DATA: the message would never reach the server
    upstream.wait_messages(1)
    assert len(node.messages) == 1


def test_smtp_filter_null_sender(proxy, upstream, node):
    p = proxy(smtp_filter(upstream, node))
    with p.connect() as client:
        assert transaction(client, sender="")[0].startswith("250")
    upstream.wait_messages(1)
    assert "MAIL FROM:<>" in node.commands()


def test_smtp_filter_rejects_recipient(proxy, upstream, make_upstream):
    node = make_upstream(refuse=("b@y.test",))
    p = proxy(smtp_filter(upstream, node), debug=3)
    with p.connect() as client:
        assert transaction(client) == ["550 5.1.1 <b@y.test>: Recipient address rejected"]
    upstream.wait_command("RSET")
    assert upstream.messages == [] and "DATA" not in upstream.verbs()
    p.wait_log(r'reply="550 5\.1\.1 <b@y\.test>: Recipient address rejected", .*status=REJECTED$')


def test_smtp_filter_rejects_message_multiline(proxy, upstream, make_upstream):
    node = make_upstream(data_reply="554-5.7.1 Message rejected\r\n554 5.7.1 Spam score too high")
    p = proxy(smtp_filter(upstream, node))
    with p.connect() as client:
        assert transaction(client) == ["554-5.7.1 Message rejected", "554 5.7.1 Spam score too high"]
        assert client.cmd("NOOP")[0].startswith("250")
    upstream.wait_command("RSET")
    assert upstream.messages == []
    assert len(node.rejected) == 1


def test_smtp_filter_node_down(proxy, upstream):
    port = free_port()
    p = proxy({"OutAddress": upstream.address, "FilterType": "smtp",
               "FilterCommand": "127.0.0.1:%d" % port}, debug=3)
    with p.connect() as client:
        assert transaction(client) == ["451 Local Error"]
    upstream.wait_command("RSET")
    assert upstream.messages == []
    p.wait_log("status=FILTER-ERROR")
    p.wait_log(r"connect to filter node 127\.0\.0\.1:%d failed: Connection refused$" % port)


def test_smtp_filter_node_drops_connection(proxy, upstream, make_upstream):
    node = make_upstream(drop_at="DATA-END")
    p = proxy(smtp_filter(upstream, node))
    with p.connect() as client:
        assert transaction(client) == ["451 Local Error"]
    upstream.wait_command("RSET")
    assert upstream.messages == []


def test_smtp_filter_node_421_becomes_451(proxy, upstream, make_upstream):
    node = make_upstream(data_reply="421 4.3.2 node shutting down")
    p = proxy(smtp_filter(upstream, node))
    with p.connect() as client:
        reply = transaction(client)
    assert reply[0].startswith("451") and "node shutting down" in reply[0]
    assert upstream.messages == []


def test_smtp_filter_default_port_25_and_seed_comment(proxy, upstream, tmp_path):
    """The seed's `FilterCommand: 192.168.0.100 # or 127.0.0.1 for haproxy`
    form: host only (port 25) with a trailing comment."""
    try:
        node = RecordingServer(host="127.0.0.26", port=25)
    except OSError as exc:
        pytest.skip("can't listen on 127.0.0.26:25: %s" % exc)
    try:
        p = proxy({"OutAddress": upstream.address, "FilterType": "smtp",
                   "FilterCommand": "127.0.0.26 # or 127.0.0.1 for haproxy"})
        with p.connect() as client:
            assert transaction(client)[0].startswith("250")
        upstream.wait_messages(1)
        assert len(node.wait_messages(1)) == 1
    finally:
        node.stop()


def test_smtp_filter_with_ipv6_client(proxy, upstream, node):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    port = free_port("::1")
    proxy(smtp_filter(upstream, node, Listen="[::1]:%d" % port))
    from harness import Client
    with Client("::1", port) as client:
        assert transaction(client)[0].startswith("250")
    upstream.wait_messages(1)
    assert node.messages[0].xclient == ["XCLIENT ADDR=IPv6:::1 HELO=client.example"]
