"""Hostile input: random bytes into every parser, random command
sequences into real sessions, and the classic attacks end to end (overlong
lines, NUL and 8-bit bytes, bare CR/LF and SMTP smuggling, 10 000 recipients,
log injection, connection floods, slow-loris).
"""

from __future__ import annotations

import concurrent.futures
import io
import itertools
import re
import select
import socket
import threading
import time

import pytest
from harness import TIMESTAMP, Client, Proxy, RecordingServer, send_mail, wait_until
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from postfix import wait_quiet

from proxsmtp import filters
from proxsmtp.message import header, spool
from proxsmtp.net import addresses
from proxsmtp.net.channel import LINE_LIMIT, Channel
from proxsmtp.process import config
from proxsmtp.process import log as logs
from proxsmtp.smtp import syntax

BODY = b"Subject: hostile\r\n\r\nbody\r\n"
FORBIDDEN = ("XCLIENT", "STARTTLS", "BDAT")
FAST = settings(max_examples=300, deadline=None)


# --- the parsers ----------------------------------------------------------------------------

NAMES = st.sampled_from(sorted(config.SPEC)).map(str)
CASED = NAMES.flatmap(lambda name: st.sampled_from([name, name.lower(), name.upper()]))
SPACE = st.sampled_from(["", " ", "\t", "  "])
VALUE = st.text(max_size=40).filter(lambda v: "\n" not in v and "\r" not in v)


def needs_dns(name: str, value: str) -> bool:
    """OutAddress/Listen values that parse as a host name would be looked up."""
    return name.lower() in ("outaddress", "listen") and \
        re.search(r"[A-Za-z_]", value.split("]")[-1]) is not None and not value.strip().startswith("/")


@st.composite
def config_lines(draw) -> str:
    lines = []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.integers(0, 3))
        if kind == 0:
            lines.append(draw(st.text(max_size=40)).replace("\n", " ").replace("\r", " "))
        elif kind == 1:
            lines.append("#" + draw(VALUE))
        else:
            name, value = draw(CASED), draw(VALUE)
            assume(not needs_dns(name, value))
            lines.append(draw(SPACE) + name + draw(SPACE) + ":" + draw(SPACE) + value)
    return "\n".join(lines)


@FAST
@given(config_lines())
@pytest.mark.unit
def test_config_parse_only_raises_config_error(text):
    try:
        parsed = config.parse(text, "random.conf")
    except config.ConfigError as exc:
        assert "\n" not in str(exc)
    else:
        assert parsed.MaxConnections >= 2 and parsed.TimeOut >= 1


@FAST
@given(st.text(max_size=60), st.integers(1, 65535))
@pytest.mark.unit
def test_address_parse_only_raises_address_error(text, port):
    try:
        parsed = addresses.parse(text, port)
    except addresses.AddressError:
        return
    assert parsed.path is not None or 0 < parsed.port < 65536


@FAST
@given(st.binary(max_size=200))
@pytest.mark.unit
def test_command_argument_parsers_never_raise(line):
    assert isinstance(syntax.parse_address(line), str)
    for name, value in syntax.parse_xforward(b"XFORWARD " + line).items():
        assert isinstance(name, str) and isinstance(value, str)
    syntax.verb_of(line)
    syntax.is_continued(line)
    for pattern in (syntax.MAIL, syntax.RCPT):
        match = pattern.match(b"MAIL FROM:" + line) or pattern.match(b"RCPT TO:" + line)
        if match:
            syntax.parse_address(match.group(1))


@FAST
@given(st.binary(max_size=300))
@pytest.mark.unit
def test_rejection_from_stderr_is_one_final_reply_line(stderr):
    """Whatever a filter prints, the client gets exactly one well-formed, final
    reply line (a `550-` would leave it waiting for more)."""
    reply = filters.reject_reply(filters.last_line(stderr))
    assert "\r" not in reply and "\n" not in reply
    assert re.match(r"^[245]\d\d( |$)", reply), reply


@FAST
@given(st.text(max_size=80))
@pytest.mark.unit
def test_reject_setting_is_one_final_reply_line(text):
    reply = filters.reject_reply(text.replace("\r", " ").replace("\n", " "))
    assert re.match(r"^[245]\d\d( |$)", reply), reply


@FAST
@given(st.text(max_size=300))
@pytest.mark.unit
def test_header_template_never_raises(template):
    rendered = header.render(template, "192.0.2.1", "2001:db8::1", "TAG")
    assert isinstance(rendered, bytes) and len(rendered) <= header.MAX_HEADER_LENGTH


@FAST
@given(st.one_of(st.text(max_size=100), st.binary(max_size=100)))
@pytest.mark.unit
def test_logged_values_stay_on_one_line(value):
    cleaned = logs.clean(value)
    assert not re.search(r"[\x00-\x1f\x7f]", cleaned), cleaned


# --- line framing and lone-dot escaping ----------------------------------------------------

def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(data)) for cut in cuts})
    return [data[a:b] for a, b in zip([0] + points, points + [len(data)])]


@FAST
@given(st.binary(max_size=6000), st.lists(st.integers(0, 6000), max_size=8))
@pytest.mark.unit
def test_channel_lines_never_exceed_the_limit(stream, cuts):
    channel = Channel("CLIENT")
    lines = []
    for part in chunked(stream, cuts):
        channel.data_received(part)
        while (got := channel.take_line()) is not None:
            lines.append(got)
    for line, too_long in lines:
        assert line.endswith(b"\n") or too_long
        assert len(line) <= LINE_LIMIT
    if not any(too_long for _, too_long in lines):
        assert b"".join(line for line, _ in lines) + channel.rest() == stream


MESSAGE_BITS = st.sampled_from([b"a", b"Subject: x", b".", b"..", b"\r\n", b"\n", b"\r",
                                b"\x00", b"\xff\xfe", b" ", b"\n.\n", b"\r\n.\n", b"\n.\r\n",
                                b"\r.\r", b"XCLIENT ADDR=10.6.6.6", b"QUIT", b"\r\r",
                                b"\r\n.\r\r\n", b"\n.\r\r\n", b"\r\n.\r\r\r\n", b".\r\r"])


@FAST
@given(st.lists(MESSAGE_BITS, max_size=30).map(b"".join), st.binary(max_size=20),
       st.lists(st.integers(0, 400), max_size=6))
@pytest.mark.unit
def test_channel_data_ends_only_at_crlf_dot_crlf(body, after, cuts):
    """The message ends at the first CRLF.CRLF and nowhere else; it is passed on
    byte for byte; what follows stays for the command reader."""
    stream = body + b"\r\n.\r\n" + after
    channel = Channel("CLIENT")
    channel.start_data()
    got, done = b"", False
    for part in chunked(stream, cuts):
        channel.data_received(part)
        if not done:
            data, done = channel.take_data()
            got += data
    if not done:
        data, done = channel.take_data()
        got += data
    assert done
    end = (b"\r\n" + stream).find(b"\r\n.\r\n")     # 0: a leading `.` line ends it at once
    if end == 0:
        assert got == b"" and bytes(channel.buf) == stream[3:]
    else:
        assert got == stream[:end] and bytes(channel.buf) == stream[end + 3:]


def escaped(message: bytes) -> bytes:
    """Reference: every line that is `.` and nothing but CRs before its LF
    (or the end) gets a second dot."""
    out = []
    for line in message.split(b"\n"):
        out.append(b"." + line if line.rstrip(b"\r") == b"." else line)
    return b"\n".join(out)


def postfix_lines(stream: bytes) -> list[bytes]:
    """DATA as Postfix's smtpd reads it with smtpd_forbid_bare_newline = no
    (smtp_get()): a bare LF ends a line and every CR before the LF is dropped;
    then one leading dot is removed (RFC 5321 4.5.2).  A line that was a lone
    dot comes out as None: the end of DATA."""
    lines = []
    for line in stream.split(b"\n")[:-1]:
        line = line.rstrip(b"\r")
        lines.append(None if line == b"." else line[1:] if line[:1] == b"." else line)
    return lines


@FAST
@given(st.lists(MESSAGE_BITS, max_size=40).map(b"".join),
       st.lists(st.integers(0, 400), max_size=8))
@pytest.mark.unit
def test_dot_guard_matches_reference_and_holds_little(message, cuts):
    guard = spool.DotGuard()
    out = fed = b""
    for part in chunked(message, cuts):
        out += guard.feed(part)
        fed += part     # only a dot and the CRs after it are held, and those as a count
        assert len(guard.tail) <= 1 and guard.crs == len(fed) - len(fed.rstrip(b"\r"))
    out += guard.finish()
    reference = escaped(message)
    if reference.endswith(b"\r"):          # a last line ending in CR gets its LF
        reference += b"\n"
    if message and not reference.endswith(b"\r\n"):
        reference += b"\r\n"
    assert out == reference
    assert b"\r\n.\r\n" not in b"\r\n" + out


SMUGGLING_BITS = st.sampled_from([b"a", b".", b"..", b"\r", b"\n", b"\r\n", b"\r\r\r", b" ",
                                  b"MAIL FROM:<evil@x.test>", b"\r\n.\r\r\n", b"\n.\r\r\n",
                                  b"\r\n.\r\r\r\n", b"\n.\r\r\r\r\r\r\n"])


@FAST
@given(st.lists(SMUGGLING_BITS, max_size=40).map(b"".join),
       st.lists(st.integers(0, 400), max_size=8))
@pytest.mark.unit
def test_dot_guard_leaves_postfix_no_early_end(message, cuts):
    """Whatever the message and wherever it is cut into chunks, a server that
    strips the CRs before LF (Postfix) sees the end of DATA only at the final
    `.`, the guard's output by chunks is its output in one piece, and the
    message comes out as sent but for the second dot of an escaped line."""
    guard = spool.DotGuard()
    out = b"".join(guard.feed(part) for part in chunked(message, cuts)) + guard.finish()
    whole = spool.DotGuard()
    assert out == whole.feed(message) + whole.finish()
    lines = postfix_lines(out + b".\r\n")
    assert lines.index(None) == len(lines) - 1
    escaped_lines = postfix_lines(escaped(message) + b"\n")
    assert lines[:-1] == escaped_lines[:len(lines) - 1]
    assert None not in escaped_lines


@FAST
@given(st.lists(SMUGGLING_BITS, max_size=30).map(b"".join),
       st.sampled_from([None, b"X-Checked: yes"]))
@pytest.mark.unit
def test_every_outgoing_path_escapes_cr_runs(message, header):
    """What goes to the server or the filter node (outgoing(), framed(), the
    header inserted or not) ends DATA for Postfix at its last line only."""
    outputs = [b"".join(spool.outgoing(io.BytesIO(message), header))]
    if header is None:
        outputs.append(spool.framed(message))
    for out in outputs:
        lines = postfix_lines(out)
        assert lines.index(None) == len(lines) - 1, out


@pytest.mark.unit
def test_dot_guard_holds_a_long_cr_run_as_a_count():
    """`.` and a million CRs fed a thousand at a time: nothing is copied over
    and over, and the line is escaped once its LF comes."""
    guard = spool.DotGuard()
    out = guard.feed(b"body\r\n.")
    for _ in range(1000):
        out += guard.feed(b"\r" * 1000)
        assert guard.tail == b"."
    assert guard.crs == 1000000
    out += guard.feed(b"\nMAIL FROM:<evil@x.test>\r\n") + guard.finish()
    assert out == b"body\r\n.." + b"\r" * 1000000 + b"\nMAIL FROM:<evil@x.test>\r\n"


@FAST
@given(st.lists(MESSAGE_BITS, max_size=40).map(b"".join))
@pytest.mark.unit
def test_framed_is_outgoing_in_one_piece(message):
    """The relayed path's shortcut sends exactly what the streamed one would."""
    assert spool.framed(message) == b"".join(spool.outgoing(io.BytesIO(message), None))
    assert spool.framed(message).endswith(b"\r\n.\r\n") or message == b""


# --- random sessions against a real proxy --------------------------------------------------

class QueueIds:
    """Answers each message with a reply naming it, so that a 250 the client
    gets can be traced to exactly one message the server accepted."""

    def __init__(self) -> None:
        self.counter = itertools.count(1)
        self.by_id: dict[str, object] = {}
        self.lock = threading.Lock()

    def __call__(self, message, conn) -> str:
        with self.lock:
            qid = "Q%d" % next(self.counter)
            self.by_id[qid] = message
        return "250 2.0.0 Ok: queued as %s" % qid


@pytest.fixture(scope="module", params=["no filter", "cat"])
def relay(request, tmp_path_factory):
    """One proxy (and upstream) for many random sessions."""
    ids = QueueIds()
    # No CHUNKING: this server takes no BDAT, so the proxy offers none and
    # refuses BDAT with 502 (tests/test_bdat.py has the sessions that use it).
    upstream = RecordingServer(data_reply=ids,
                               extensions=("SIZE 10240000", "8BITMIME", "PIPELINING",
                                           "STARTTLS", "XFORWARD NAME ADDR HELO"))
    settings = {"OutAddress": upstream.address, "TimeOut": 10, "Workers": 2}
    if request.param != "no filter":
        settings["FilterCommand"] = request.param
    px = Proxy(tmp_path_factory.mktemp("relay"), settings, debug=3).start()
    yield px, upstream, ids
    px.stop()
    upstream.stop()
    log = px.log()
    assert "Traceback" not in log and "local error" not in log, log[-3000:]
    assert px.spool_files() == []


ADDRESS = st.text(st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters="<>"),
                  min_size=1, max_size=16).map(lambda s: s + "@x.test")
RAW = st.binary(max_size=80).filter(
    lambda b: b"\n" not in b and syntax.verb_of(b) not in (b"DATA", b"QUIT", b"BDAT"))
FORBIDDEN_LINES = st.sampled_from([b"XCLIENT ADDR=10.6.6.6", b"xclient name=spoof",
                                   b"  XCLIENT ADDR=10.6.6.6", b"XCLIENT\tADDR=1.2.3.4",
                                   b"STARTTLS", b"starttls", b"BDAT 10 LAST", b"bdat 0",
                                   b"NOOP\rXCLIENT ADDR=10.6.6.6", b"RSET\rSTARTTLS"])
BODIES = st.lists(MESSAGE_BITS, max_size=25).map(b"".join)
OPS = st.one_of(
    st.tuples(st.sampled_from(["EHLO", "HELO", "RSET", "NOOP", "LONG", "PIPELINE"])),
    st.tuples(st.just("MAIL"), ADDRESS), st.tuples(st.just("RCPT"), ADDRESS),
    st.tuples(st.just("DATA"), BODIES), st.tuples(st.just("RAW"), RAW),
    st.tuples(st.just("TXN"), ADDRESS, BODIES),
    st.tuples(st.just("FORBIDDEN"), FORBIDDEN_LINES),
    st.tuples(st.just("XFORWARD"), st.binary(max_size=40).filter(lambda b: b"\n" not in b)),
)


def data_stream(body: bytes) -> bytes | None:
    """Body, CRLF if needed, `.` CRLF; None if it would end before its end."""
    stream = body + (b"" if body.endswith(b"\r\n") else b"\r\n") + b".\r\n"
    if (b"\r\n" + stream).find(b"\r\n.\r\n") != len(stream) - 3:
        return None
    return stream


def peer_closed(client) -> bool:
    """After a 421/451: did the proxy end the session (its last word)?"""
    ready, _, _ = select.select([client.sock], [], [], 0.5)
    try:
        return bool(ready) and client.sock.recv(1, socket.MSG_PEEK) == b""
    except ConnectionResetError:
        return True


def reply_code(reply: list[str]) -> int:
    assert reply, "no reply"
    for line in reply:
        assert re.match(r"^\d\d\d[ -]", line) or re.match(r"^\d\d\d$", line), reply
    return int(reply[-1][:3])


@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(OPS, min_size=1, max_size=14))
@pytest.mark.e2e
@pytest.mark.slow
def test_random_sessions(relay, ops):
    """Every command gets one well-formed reply in order; a 250 after a message
    is the server's own reply for that very message, whose bytes arrived
    intact (lone dots escaped); refused messages never arrive; XCLIENT,
    STARTTLS and BDAT from the client never reach the server."""
    px, upstream, ids = relay
    lines_before = len(upstream.lines)
    accepted_before = len(upstream.messages)
    accepted = []
    last = 220
    with px.connect(timeout=15) as client:
        for op in itertools.chain.from_iterable(
                [("MAIL", op[1]), ("RCPT", op[1]), ("DATA", op[2])] if op[0] == "TXN" else [op]
                for op in ops):
            kind = op[0]
            if kind == "DATA":
                stream = data_stream(op[1])
                if stream is None:
                    continue
                reply = client.cmd("DATA")
                if not reply:
                    break
                last = reply_code(reply)
                if last in (421, 451) and peer_closed(client):
                    break
                if last != 354:
                    continue
                client.send(stream)
                final = client.reply()
                last = reply_code(final)
                if last // 100 == 2:
                    match = re.fullmatch(r"250 2\.0\.0 Ok: queued as (Q\d+)", final[-1])
                    assert match, final
                    message = ids.by_id[match.group(1)]
                    stored = stream[:-3]
                    expected = escaped(stored)
                    assert message.raw == (expected[:-2] if expected.endswith(b"\r\n") else expected)
                    accepted.append(match.group(1))
                continue
            if kind == "PIPELINE":
                client.send(b"NOOP\r\nRSET\r\nNOOP\r\n")
                assert [reply_code(client.reply()) for _ in range(3)] == [250, 250, 250]
                continue
            line = {"EHLO": lambda: b"EHLO random.example", "HELO": lambda: b"HELO random.example",
                    "RSET": lambda: b"RSET", "NOOP": lambda: b"NOOP",
                    "LONG": lambda: b"NOOP " + b"x" * 5000,
                    "MAIL": lambda: b"MAIL FROM:<%s>" % op[1].encode(),
                    "RCPT": lambda: b"RCPT TO:<%s>" % op[1].encode(),
                    "RAW": lambda: op[1], "FORBIDDEN": lambda: op[1],
                    "XFORWARD": lambda: b"XFORWARD " + op[1]}[kind]()
            try:
                reply = client.cmd(line)
            except ConnectionResetError:
                reply = []
            if not reply:
                break
            code = last = reply_code(reply)
            if last in (421, 451) and peer_closed(client):
                break
            if kind == "FORBIDDEN":
                assert code in (500, 502, 554)
            if kind == "LONG":
                assert code == 500
        else:
            last = client.code("QUIT")
            assert last == 221
        # Only a failure the proxy announced (e.g. a server accepting DATA with
        # no recipients: its state is unknown) may end the session early.
        assert last in (221, 421, 451), last
    for conn in {number for number, _ in upstream.lines[lines_before:]}:
        assert_only_own_starttls(upstream.commands(conn))
    assert len(upstream.messages) - accepted_before == len(accepted)
    event("messages accepted: %d" % min(len(accepted), 2))
    wait_until(lambda: not px.spool_files(), 10, what="no temp files")


def assert_only_own_starttls(lines: list[str]) -> None:
    """No forbidden verb reached the server, but for the proxy's own STARTTLS
    (ServerTLS may: once per connection, right after the first EHLO)."""
    verbs = [syntax.verb_of(line.encode("utf-8", "surrogateescape")).decode("latin-1")
             for line in lines]
    first_ehlo = verbs.index("EHLO") if "EHLO" in verbs else -2
    for i, line in enumerate(lines):
        if i == first_ehlo + 1 and line == "STARTTLS":
            continue
        for part in line.split("\r"):
            assert syntax.verb_of(part.encode("utf-8", "surrogateescape")).decode(
                "latin-1") not in FORBIDDEN, lines


# --- classic attacks, end to end --------------------------------------------------------------

def envelope(client: Client, recipients=("b@y.test",)) -> None:
    assert client.cmd("EHLO c.example")[-1].startswith("250")
    assert client.cmd("MAIL FROM:<a@x.test>")[-1].startswith("250")
    for rcpt in recipients:
        assert client.cmd("RCPT TO:<%s>" % rcpt)[-1].startswith("250")


@pytest.mark.e2e
@pytest.mark.slow
def test_overlong_lines(proxy, upstream):
    """A 100 KB command line is refused and not relayed, not even its tail;
    a 100 KB line inside a message is data and arrives whole."""
    px = proxy({"OutAddress": upstream.address})
    long_line = b"x" * 100000
    with px.connect() as client:
        assert client.cmd(b"NOOP " + long_line + b" XCLIENT ADDR=1.2.3.4") == ["500 Line too long"]
        assert client.cmd(b"RCPT TO:<" + long_line + b">") == ["500 Line too long"]
        envelope(client)
        assert client.cmd("DATA")[0].startswith("354")
        client.send(b"Subject: long\r\n\r\n" + long_line + b"\r\n.\r\n")
        assert client.reply()[0].startswith("250")
    [message] = upstream.wait_messages(1)
    assert message.raw == b"Subject: long\r\n\r\n" + long_line
    assert all(len(line) < 4096 for line in upstream.commands())
    assert not any("XCLIENT" in line for line in upstream.commands())


@pytest.mark.parametrize("filter_command", [None, "cat", "env"])
@pytest.mark.e2e
@pytest.mark.slow
def test_nul_and_8bit_bytes_pass_intact(proxy, upstream, filter_command, tmp_path):
    """In commands and in the message; a NUL can't be put in the environment,
    so a filter sees the recipient without it."""
    report = tmp_path / "env"
    if filter_command == "env":
        filter_command = "printf '%%s' \"$RECIPIENTS\" > %s; cat" % report
    px = proxy({"OutAddress": upstream.address, "FilterCommand": filter_command})
    body = (b"Subject: \xc3\xa9t\xc3\xa9 \xff\xfe\r\nX-Nul: a\x00b\r\n\r\n"
            + bytes(range(256)).replace(b"\r", b"").replace(b"\n", b"") + b"\r\nend\r\n")
    with px.connect() as client:
        assert client.cmd(b"EHLO \xff\x00host")[-1].startswith("250")
        assert client.cmd(b"MAIL FROM:<\xc3\xa9@x.test>")[-1].startswith("250")
        assert client.cmd(b"RCPT TO:<b\x00@y.test>")[-1].startswith("250")
        assert client.cmd("DATA")[0].startswith("354")
        client.send(body + b".\r\n")
        assert client.reply()[0].startswith("250")
    [message] = upstream.wait_messages(1)
    assert message.raw == body[:-2]
    assert message.sender == "\xe9@x.test".encode().decode("utf-8", "surrogateescape")
    assert message.recipients == ["b\x00@y.test"]
    if report.exists():
        assert report.read_bytes() == b"b@y.test"


SMUGGLING = [
    b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\n.\r", b"\r.\n", b"\r.\r\n",
    b"\r\n.\r\r\n", b"\n.\r\r\n", b"\r\n.\r\r\r\n", b"\n.\r\r\r\n",
]


@pytest.mark.parametrize("filter_command", [None, "cat"])
@pytest.mark.parametrize("pattern", SMUGGLING)
@pytest.mark.e2e
@pytest.mark.slow
def test_smuggling_never_ends_the_message_early(proxy, upstream, pattern, filter_command):
    """`<pattern>MAIL FROM...` inside DATA: the server gets one message with
    the smuggled transaction inside it (a lone dot dot-stuffed), never a second
    transaction of its own."""
    px = proxy({"OutAddress": upstream.address, "FilterCommand": filter_command,
                "Header": "X-Checked: yes"})
    smuggled = (b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\n"
                b"Subject: forged\r\n\r\nforged\r\n")
    body = b"Subject: carrier\r\n\r\nhello" + pattern + smuggled
    with px.connect() as client:
        envelope(client)
        assert client.cmd("DATA")[0].startswith("354")
        client.send(body + b".\r\n")
        assert client.reply()[0].startswith("250")
        assert client.cmd("QUIT")[0].startswith("221")
    upstream.wait_closed("QUIT")
    [message] = upstream.messages
    assert upstream.verbs().count("MAIL") == 1 and upstream.verbs().count("DATA") == 1
    assert not any("evil@" in line for line in upstream.commands())
    assert message.raw.startswith(b"Subject: carrier\r\nX-Checked: yes\r\n\r\nhello")
    assert message.raw.endswith(b"forged")
    sent = body[len(b"Subject: carrier\r\n"):].rstrip(b"\r\n")
    received = message.raw[len(b"Subject: carrier\r\nX-Checked: yes\r\n"):]
    assert received == re.sub(rb"(?m)^\.(?=\r*$)", b"..", sent)


# A dot with several CRs before its LF, or a bare LF around it: Postfix's
# smtpd (smtpd_forbid_bare_newline = no) reads each as the end of DATA.
POSTFIX_SMUGGLING = [b"\r\n.\r\r\n", b"\n.\r\r\n", b"\r\n.\r\r\r\n", b"\n.\r\r\r\n", b"\n.\n"]


@pytest.mark.parametrize("path", ["no filter", "on disk", "cat", "Header"])
@pytest.mark.e2e
@pytest.mark.root
@pytest.mark.slow
def test_smuggling_against_postfix(proxy, postfix, path):
    """A real Postfix with the defaults of 3.7/3.8 (smtpd_forbid_bare_newline
    and smtpd_forbid_unauth_pipelining off) as the server: each carrier
    message is queued once, whole, with its own envelope; the transaction
    smuggled inside it stays body text and no forged envelope is queued.
    Paths: relayed from memory, relayed from disk (too big for memory: sent
    in chunks), a pipe filter's output, Header inserted."""
    server = postfix(smtpd_forbid_unauth_pipelining="no")
    settings = {"OutAddress": server.address}
    if path == "cat":
        settings["FilterCommand"] = "cat"
    elif path == "Header":
        settings["Header"] = "X-Checked: yes"
    px = proxy(settings)
    smuggled = (b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\n"
                b"Subject: forged\r\n\r\nforged\r\n")
    # lines enough to put the message past spool.MEMORY_LIMIT
    padding = b"x" * 78 + b"\r\n" if path == "on disk" else b""
    padding *= spool.MEMORY_LIMIT // 80 + 1
    quits = []
    for number, pattern in enumerate(POSTFIX_SMUGGLING):
        with px.connect() as client:
            envelope(client, ("b%d@y.test" % number,))
            assert client.cmd("DATA")[0].startswith("354")
            client.send(b"Subject: carrier\r\n\r\n" + padding + b"hello" + pattern + smuggled
                        + b".\r\n")
            assert client.reply()[0].startswith("250")
            quits.append(client.cmd("QUIT"))
    server.messages(len(POSTFIX_SMUGGLING))
    wait_quiet(server)          # a smuggled message would come in behind its carrier
    queued = server.messages()
    assert sorted((message["sender"], message["recipients"]) for message in queued) == [
        ("a@x.test", ["b%d@y.test" % number]) for number in range(len(POSTFIX_SMUGGLING))]
    # the replies to the forged transaction did not reach the client either
    assert all(reply[0].startswith("221") for reply in quits), quits
    for message in queued:
        head, body = message["content"].split(b"\n\n", 1)
        assert (b"\nX-Checked: yes\n" in head) == (path == "Header"), head
        assert body == (padding + b"hello\n.\n" + smuggled).replace(b"\r\n", b"\n")
    assert "evil@x.test" not in server.log()


@pytest.mark.e2e
@pytest.mark.slow
def test_10000_recipients(proxy, upstream):
    """Pipelined, all answered in order and relayed; one (long) log line."""
    px = proxy({"OutAddress": upstream.address}, debug=3)
    recipients = ["r%05d@example.test" % n for n in range(10000)]
    with px.connect(timeout=60) as client:
        assert client.cmd("EHLO c.example")[-1].startswith("250")
        assert client.cmd("MAIL FROM:<a@x.test>")[-1].startswith("250")
        client.send("".join("RCPT TO:<%s>\r\n" % rcpt for rcpt in recipients))
        codes = [client.reply()[-1][:3] for _ in recipients]
        assert codes == ["250"] * len(recipients)
        assert client.cmd("DATA")[0].startswith("354")
        client.send(BODY + b".\r\n")
        assert client.reply()[0].startswith("250")
    [message] = upstream.wait_messages(1)
    assert message.recipients == recipients
    px.wait_log(r"status=FILTERED")
    [logged] = [line for line in px.log().splitlines() if "status=FILTERED" in line]
    assert logged.count(", to=") == 10000


@pytest.mark.e2e
@pytest.mark.slow
def test_recipients_too_big_for_the_environment(proxy, upstream):
    """RECIPIENTS above the kernel's limit for one environment string (128 KiB):
    the filter cannot start, so 451 and a clear log line; the worker lives on."""
    px = proxy({"OutAddress": upstream.address, "FilterCommand": "cat"}, debug=3)
    mark = len(px.log())
    recipients = ["recipient-%05d@a-rather-long-domain.example" % n for n in range(4000)]
    with px.connect(timeout=60) as client:
        envelope(client, recipients)
        assert client.cmd("DATA")[0].startswith("354")
        client.send(BODY + b".\r\n")
        assert client.reply() == ["451 Local Error"]
        assert client.cmd("RSET")[0].startswith("250")
        assert send_mail(client, "a@x.test", ["b@y.test"], BODY)[0].startswith("250")
    assert len(upstream.wait_messages(1)) == 1
    log = px.log()[mark:]
    assert re.search(r"couldn't run filter command: Argument list too long", log), log[-2000:]
    assert "status=FILTER-ERROR" in log and "Traceback" not in log


@pytest.mark.e2e
@pytest.mark.slow
def test_log_injection_stays_on_one_line(proxy, make_upstream):
    """Control bytes in everything that is logged (HELO, sender, recipients,
    XFORWARD, a filter's rejection) are escaped: each message is one line."""
    upstream = make_upstream(extensions=("XFORWARD NAME ADDR HELO",))
    px = proxy({"OutAddress": upstream.address,
                "FilterCommand": "cat >/dev/null; printf 'bad\\033[31m\\001 status=FILTERED' >&2; exit 1"},
               debug=4)
    evil = "\x1b[2J\x00\x08\x0b\x0cstatus=FILTERED\x7f"
    with px.connect() as client:
        assert client.cmd("EHLO h%s" % evil.replace(" ", ""))[-1].startswith("250")
        assert client.cmd("XFORWARD HELO=x+0D+0Aforged ADDR=1.2.3.4")[-1].startswith("250")
        assert client.cmd("MAIL FROM:<a%s@x.test>" % evil)[-1].startswith("250")
        assert client.cmd("RCPT TO:<b%s@y.test>" % evil)[-1].startswith("250")
        assert client.cmd("RCPT TO:<c\r@y.test>")[-1].startswith("500")
        assert client.cmd("DATA")[0].startswith("354")
        client.send(BODY + b".\r\n")
        reply = client.reply()
    assert len(reply) == 1 and reply[0].startswith("550 Content Rejected; bad")
    px.wait_log(r'reply="550 Content Rejected.*status=REJECTED$')
    raw = px.stderr_path.read_bytes()
    assert not re.search(rb"[\x00-\x08\x0b-\x1f\x7f]", raw.replace(b"\r\n", b"\n"))
    lines = raw.decode().splitlines()
    status = [line for line in lines if ", status=" in line]
    assert len(status) == 1, status
    assert status[0].endswith('reply="550 Content Rejected; bad\\x1b[31m\\x01 status=FILTERED", '
                              'status=REJECTED')
    assert all(TIMESTAMP.match(line) for line in lines)


@pytest.mark.e2e
@pytest.mark.slow
def test_connection_flood(proxy, upstream):
    """1000 connections against MaxConnections 20: the rest are told 421 at
    once and closed; the upstream never sees them; service resumes after."""
    px = proxy({"OutAddress": upstream.address, "MaxConnections": 20, "Workers": 2})
    wait_until(lambda: all("[0 sessions]" in t for t in px.children().values()), 10,
               what="idle workers")
    held = [px.connect() for _ in range(20)]
    try:
        assert all(client.greeting[0].startswith("220") for client in held)
        connections = len(upstream.connections)

        def knock(_):
            with socket.create_connection(px.address, timeout=30) as sock:
                sock.settimeout(30)
                data = b""
                while chunk := sock.recv(256):
                    data += chunk
                return data

        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(knock, range(1000)))
        elapsed = time.monotonic() - started
        assert set(answers) == {b"421 Server busy, too many connections\r\n"}
        assert elapsed < 60, elapsed
        assert len(upstream.connections) == connections
    finally:
        for client in held:
            client.close()
    later = wait_until(lambda: (lambda c: c if c.greeting[0].startswith("220") else c.close())(
        px.connect()), 15, what="a free slot")
    with later:
        assert send_mail(later, "a@x.test", ["b@y.test"], BODY)[0].startswith("250")
    upstream.wait_messages(1)


@pytest.mark.parametrize("phase", ["command", "data"])
@pytest.mark.e2e
@pytest.mark.slow
def test_slow_loris_closed_at_timeout(proxy, upstream, phase):
    """A client dripping a byte now and then never finishes a line: it is closed
    TimeOut after the line began, not kept forever by the trickle."""
    px = proxy({"OutAddress": upstream.address, "TimeOut": 2, "FilterCommand": "cat"}, debug=3)
    mark = len(px.log())
    client = px.connect(timeout=30)
    stop = threading.Event()
    try:
        if phase == "command":
            assert client.cmd("EHLO c.example")[-1].startswith("250")
        else:
            envelope(client)
            assert client.cmd("DATA")[0].startswith("354")

        def drip():     # the first byte at once: the line, not idleness, must time out
            for byte in b"MAIL FROM:<slow@x.test>" * 4:
                try:
                    client.send(bytes([byte]))
                except OSError:
                    return
                if stop.wait(0.4):
                    return

        dripper = threading.Thread(target=drip, daemon=True)
        started = time.monotonic()
        dripper.start()
        assert client.closed_by_peer(timeout=30)
        assert time.monotonic() - started < 20     # the drip alone would last 37 s
    finally:
        stop.set()
        client.close()
    line = px.wait_log(r"\w+: network operation timed out.* \(a line unfinished for 2 seconds\)$")
    assert line.group(0) in px.log()[mark:]
    assert upstream.messages == [] and "DATA" not in upstream.verbs()
    assert "slow@" not in "".join(upstream.commands())
    wait_until(lambda: not px.spool_files(), 10, what="no temp files")


@pytest.mark.e2e
@pytest.mark.slow
def test_malformed_mail_and_rcpt_accepted_by_a_lax_server(proxy, upstream):
    """`MAIL TO:`, `RCPT FROM:`, a bare `MAIL`: a server that says 250 to them
    (the recorder does) must not cost the session (found by test_random_sessions)."""
    px = proxy({"OutAddress": upstream.address}, debug=3)
    with px.connect() as client:
        assert client.cmd("EHLO c.example")[-1].startswith("250")
        for line in ("MAIL TO:<a@x.test>", "mail", "RCPT FROM:<b@y.test>", "RCPT"):
            assert client.cmd(line)[-1].startswith("250")
        assert send_mail(client, "a@x.test", ["b@y.test"], BODY, helo="NOOP")[0].startswith("250")
    upstream.wait_messages(1)
    assert "local error" not in px.log()
