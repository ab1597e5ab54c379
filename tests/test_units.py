"""Unit tests of the parsers: config lines, addresses, replies, header, DotGuard."""

from __future__ import annotations

import re

import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from proxsmtp import filters
from proxsmtp.message import datapath, header, spool
from proxsmtp.message.envelope import Envelope
from proxsmtp.net import addresses
from proxsmtp.net.addresses import Address, AddressError
from proxsmtp.net.channel import LINGER, Channel
from proxsmtp.process import config
from proxsmtp.smtp import syntax

pytestmark = pytest.mark.unit


def parse(text: str) -> config.Config:
    return config.parse(text, "test.conf")


# --- config --------------------------------------------------------------------

def test_config_defaults():
    conf = parse("OutAddress: 127.0.0.1:10026\n")
    assert conf.OutAddress == Address("127.0.0.1", 10026)
    assert conf.Listen == Address("0.0.0.0", 10025)
    assert (conf.MaxConnections, conf.TimeOut, conf.KeepAlives) == (64, 180, 0)
    assert conf.XClient is False and conf.TransparentProxy == "off"
    assert conf.TempDirectory == "/tmp" and conf.User is None and conf.PidFile is None
    assert conf.Skip is None and conf.FilterCommand is None
    assert (conf.FilterType, conf.FilterTimeout) == ("pipe", 30)
    assert conf.FilterReject == "530 Email Rejected" and conf.Header is None


def test_config_syntax_case_whitespace_comments():
    conf = parse("# a comment\n\n   # indented comment\n"
                 "  outaddress  :   10026  \n"
                 "TIMEOUT:5\n"
                 "filtertype :  FILE\n"
                 "Header: X-A: b: c\n")
    assert conf.OutAddress == Address(None, 10026)
    assert conf.TimeOut == 5
    assert conf.FilterType == "file"
    assert conf.Header == "X-A: b: c"      # only the first colon separates


@pytest.mark.parametrize("line", ["OutAddress 10026", "just words", "[section]"])
def test_config_invalid_line_names_the_line(line):
    with pytest.raises(config.ConfigError) as err:
        parse("OutAddress: 10026\n\n" + line + "\n")
    assert str(err.value) == 'test.conf, line 3: invalid config line: %s (expected "Name: value")' % line


@pytest.mark.parametrize("line, message", [
    ("FilterComand: cat", 'unknown setting "FilterComand" (did you mean FilterCommand?)'),
    ("filter command: cat", 'unknown setting "filter command" (did you mean FilterCommand?)'),
    ("Tmeout: 5", 'unknown setting "Tmeout" (did you mean TimeOut?)'),
    ("NoSuchSetting: 1", 'unknown setting "NoSuchSetting"'),
])
def test_config_unknown_setting_suggests_a_close_one(line, message):
    with pytest.raises(config.ConfigError) as err:
        parse("OutAddress: 10026\n" + line + "\n")
    assert str(err.value) == "test.conf, line 2: " + message


@pytest.mark.parametrize("line, message", [
    ("MaxConnections: 1", 'MaxConnections: expected an integer from 2 to 1048576, not "1"'),
    ("MaxConnections: many", 'MaxConnections: expected an integer from 2 to 1048576, not "many"'),
    ("TimeOut: 0", 'TimeOut: expected an integer of at least 1, not "0"'),
    ("FilterType: milter", 'FilterType: expected one of pipe, file, smtp, reject, not "milter"'),
    ("XClient: maybe", 'XClient: expected on or off (yes/no, true/false, 1/0), not "maybe"'),
    ("TransparentProxy: half", 'TransparentProxy: expected off, on, client or full, not "half"'),
    ("Skip: all", 'Skip: expected authenticated, not "all"'),
    ("TempDirectory:", 'TempDirectory: expected a non-empty value, not ""'),
    ("Listen: 1.2.3.4:99999", "Listen: invalid port in address: 1.2.3.4:99999 (expected "
     "address:port, address, port, [IPv6]:port or /path/to/socket)"),
    ("FilterType: smtp", "FilterCommand: FilterType smtp needs the filter node's address "
     "(expected host[:port])"),
])
def test_config_errors_name_file_line_setting_and_what_it_accepts(line, message):
    with pytest.raises(config.ConfigError) as err:
        parse("# comment\nOutAddress: 10026\n" + line + "\n")
    assert str(err.value) == "test.conf, line 3: " + message


def test_config_accepts_describes_every_setting():
    for name in config.SPEC:
        assert config.accepts(name) != "a valid value", name


@pytest.mark.parametrize("listen, transparent, xclient, warns", [
    ("127.0.0.1:10025", "off", "off", False), ("[::1]:10025", "off", "off", False),
    ("/run/proxsmtpd.sock", "off", "off", False), ("localhost:10025", "off", "off", False),
    ("0.0.0.0:10025", "off", "off", True), ("10025", "off", "off", True),
    ("192.0.2.1:10025", "off", "off", True), ("0.0.0.0:10025", "off", "on", False),
    ("0.0.0.0:10025", "full", "off", False), ("0.0.0.0:10025", "client", "off", False),
    ("0.0.0.0:10025", "off", "off v2", False),
])
def test_config_warns_when_listening_beyond_loopback_without_client_addresses(
        listen, transparent, xclient, warns):
    xclient, _, out_proxy = xclient.partition(" ")
    conf = parse("OutAddress: 10026\nListen: %s\nTransparentProxy: %s\nXClient: %s\n"
                 "OutProxyProtocol: %s\n" % (listen, transparent, xclient, out_proxy or "off"))
    found = [w for w in conf.warnings if "accepts connections from other hosts" in w]
    assert bool(found) == warns, conf.warnings
    if warns:
        assert found[0].startswith("test.conf, line 2: Listen: ")
        assert "relays for anyone" in found[0]


def test_config_header_problems_warn_once_at_load():
    conf = parse("OutAddress: 10026\nHeader: X-A: %i %q \\x\nListen: 127.0.0.1:25\n")
    assert conf.warnings == [
        "test.conf, line 2: Header: unknown symbol %q is left out (known: %i %l %d %t %%)",
        "test.conf, line 2: Header: unknown escape \\x stands for x (known: \\r \\n \\t \\\\)"]
    conf = parse("OutAddress: 10026\nHeader: no colon here\nListen: 127.0.0.1:25\n")
    assert conf.warnings == ['test.conf, line 2: Header: "no colon here" does not start with a '
                             'header name and a colon (expected e.g. "X-Filtered: by proxsmtpd")']
    assert parse("OutAddress: 10026\nHeader: X-A: %i %l %d 100%% \\r\\n\\t\\\\\n"
                 "Listen: 127.0.0.1:25\n").warnings == []
    default = parse("OutAddress: 10026\n").warnings
    assert default[0].startswith("test.conf: Listen: 0.0.0.0:10025 (the default) accepts "
                                 "connections from other hosts"), default


@pytest.mark.parametrize("setting, value", [
    ("MaxConnections", "1"), ("MaxConnections", "lots"), ("TimeOut", "0"), ("TimeOut", "-3"),
    ("KeepAlives", "-1"), ("XClient", "maybe"), ("TransparentProxy", "half"),
    ("FilterType", "milter"), ("FilterTimeout", "0"), ("Skip", "everything"),
    ("TempDirectory", ""), ("Listen", "1.2.3.4:99999"), ("OutAddress", "[::1"),
    ("OutAddress", "host name:25"),
])
def test_config_invalid_values(setting, value):
    with pytest.raises(config.ConfigError) as err:
        parse("OutAddress: 10026\n%s: %s\n" % (setting, value))
    assert setting in str(err.value)
    assert "line 2" in str(err.value) or setting == "OutAddress"


@pytest.mark.parametrize("value, expected", [
    ("on", True), ("YES", True), ("true", True), ("t", True), ("1", True),
    ("off", False), ("No", False), ("false", False), ("f", False), ("0", False)])
def test_config_booleans(value, expected):
    assert parse("OutAddress: 25\nXClient: %s\n" % value).XClient is expected


@pytest.mark.parametrize("value, expected", [
    ("on", "client"), ("client", "client"), ("Full", "full"), ("off", "off"), ("no", "off")])
def test_config_transparent(value, expected):
    assert parse("OutAddress: 25\nTransparentProxy: %s\n" % value).TransparentProxy == expected


def test_config_max_connections_bounds():
    assert parse("OutAddress: 25\nMaxConnections: 2\n").MaxConnections == 2
    assert parse("OutAddress: 25\nMaxConnections: 65535\n").MaxConnections == 65535
    assert parse("OutAddress: 25\nMaxConnections: 3000\n").MaxConnections == 3000


def test_config_requires_out_address():
    with pytest.raises(config.ConfigError, match="OutAddress"):
        parse("TimeOut: 5\n")


def test_config_transparent_ignores_out_address_with_warning():
    conf = parse("TransparentProxy: full\nOutAddress: 10026\n")
    assert any("OutAddress" in warning for warning in conf.warnings)
    assert parse("TransparentProxy: full\n").OutAddress is None


def test_config_empty_values_clear():
    conf = parse("OutAddress: 25\nPidFile:\nHeader:\nFilterCommand:\n")
    assert conf.PidFile is None and conf.Header is None and conf.FilterCommand is None


def test_config_skip_authenticated():
    assert parse("OutAddress: 25\nSkip: Authenticated\n").skip_authenticated


def test_config_seed_filter_line():
    conf = parse("TransparentProxy: full\nListen: 0.0.0.0:10025\nFilterType: smtp\n"
                 "FilterCommand: 192.168.0.100 # or 127.0.0.1 for haproxy\n")
    assert conf.FilterAddress == Address("192.168.0.100", 25)
    conf = parse("OutAddress: 25\nFilterType: smtp\nFilterCommand: 127.0.0.1:20025\n")
    assert conf.FilterAddress == Address("127.0.0.1", 20025)


def test_config_smtp_filter_needs_host():
    with pytest.raises(config.ConfigError):
        parse("OutAddress: 25\nFilterType: smtp\n")
    with pytest.raises(config.ConfigError):
        parse("OutAddress: 25\nFilterType: smtp\nFilterCommand: 20025\n")


def test_config_later_line_wins():
    assert parse("OutAddress: 25\nTimeOut: 5\nTimeOut: 7\n").TimeOut == 7


# --- addresses -------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("mail.example.com:2525", Address("mail.example.com", 2525)),
    ("mail.example.com", Address("mail.example.com", 25)),
    ("10026", Address(None, 10026)),
    ("127.0.0.1:10026", Address("127.0.0.1", 10026)),
    ("[::1]:10026", Address("::1", 10026)),
    ("[2001:db8::1]", Address("2001:db8::1", 25)),
    ("2001:db8::1", Address("2001:db8::1", 25)),
    ("/run/proxsmtpd.sock", Address(path="/run/proxsmtpd.sock")),
    ("  127.0.0.1:25  ", Address("127.0.0.1", 25)),
])
def test_address_forms(text, expected):
    assert addresses.parse(text, 25) == expected


@pytest.mark.parametrize("text", ["", "host:", "host:0", "host:65536", "host:abc", "[::1",
                                  "[nothing]:25", "[::1]x", "bad host:25", "1:2:zz::1"])
def test_address_errors(text):
    with pytest.raises(AddressError):
        addresses.parse(text, 25)


def test_address_str_round_trip():
    for text in ("127.0.0.1:25", "[::1]:26", "/tmp/x.sock", "10026"):
        assert str(addresses.parse(text, 25)) == text


def test_unspecified_means_loopback_feature():
    assert addresses.is_unspecified(None)
    assert addresses.is_unspecified("0.0.0.0") and addresses.is_unspecified("::")
    assert not addresses.is_unspecified("127.0.0.1")


def test_plain_ip_unwraps_mapped():
    assert addresses.plain_ip("::ffff:10.1.2.3") == "10.1.2.3"
    assert addresses.plain_ip("fe80::1%eth0") == "fe80::1"
    assert addresses.peer_ip(("::1", 25, 0, 0)) == "::1"
    assert addresses.peer_ip("/a/unix/path") == "UNKNOWN"


# --- rejection replies -----------------------------------------------------------------

@pytest.mark.parametrize("text, reply", [
    ("554 5.7.1 Spam detected", "554 5.7.1 Spam detected"),
    ("250 dropped", "250 dropped"),
    ("451 4.7.1 try later", "451 4.7.1 try later"),
    ("virus found: Eicar", "550 Content Rejected; virus found: Eicar"),
    ("", "550 Content Rejected"),
    ("   ", "550 Content Rejected"),
    ("1234 not a code", "550 Content Rejected; 1234 not a code"),
    ("55 short", "550 Content Rejected; 55 short"),
])
def test_reject_reply(text, reply):
    assert filters.reject_reply(text) == reply


def test_last_line_of_stderr():
    assert filters.last_line(b"first\nsecond line\n\n  \n") == "second line"
    assert filters.last_line(b"") == ""


def test_xtext():
    assert filters.xtext("a+b=c d") == "a+2Bb+3Dc+20d"
    assert filters.xtext("IPv6:::1") == "IPv6:::1"


# --- session parsers -------------------------------------------------------------------

@pytest.mark.parametrize("arg, address", [
    (b"<a@example.com>", "a@example.com"),
    (b" <a@example.com> SIZE=100 BODY=8BITMIME", "a@example.com"),
    (b"<>", "<>"),
    (b"<> SIZE=10", "<>"),
    (b"a@example.com", "a@example.com"),
    (b"a@example.com SIZE=5", "a@example.com"),
    (b"", ""),
])
def test_parse_address(arg, address):
    assert syntax.parse_address(arg) == address


def test_parse_xforward():
    attrs = syntax.parse_xforward(b"XFORWARD ADDR=10.0.0.9 HELO=mx.example.org NAME=[UNAVAILABLE]")
    assert attrs["ADDR"] == "10.0.0.9" and attrs["HELO"] == "mx.example.org"
    assert attrs["NAME"] == "UNAVAILABLE"
    assert syntax.parse_xforward(b"XFORWARD addr=IPv6:2001:db8::5 helo=a+2Bb")["ADDR"] == "IPv6:2001:db8::5"
    assert syntax.parse_xforward(b"XFORWARD helo=a+2Bb")["HELO"] == "a+b"


def test_is_continued():
    assert syntax.is_continued(b"250-PIPELINING\r\n")
    assert not syntax.is_continued(b"250 OK\r\n")
    assert not syntax.is_continued(b"25-x\r\n")


# --- header --------------------------------------------------------------------------

def test_header_escapes():
    rendered = header.render(r"X-A: 1\r\nX-B:\t2 \\ 100%% from %i to %l", "10.0.0.1", "10.0.0.2")
    assert rendered == b"X-A: 1\r\nX-B:\t2 \\ 100% from 10.0.0.1 to 10.0.0.2"


def test_header_date():
    rendered = header.render("X-Date: %d", "a", "b").decode()
    assert re.fullmatch(r"X-Date: \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4} [+-]\d{4} \(\S+\)",
                        rendered), rendered


def test_header_unknown_symbol_is_left_out_without_a_warning_per_message(caplog):
    with caplog.at_level("INFO", logger="proxsmtpd"):
        rendered = header.render("X-A: %q!", "a", "b")
    assert rendered == b"X-A: !"
    assert caplog.records == []


def test_header_length_limit():
    rendered = header.render("X-Long: " + "x" * 5000, "a", "b")
    assert 900 <= len(rendered) <= 1024


def test_header_is_received():
    assert header.is_received(b"Received: from x")
    assert header.is_received(b"received: from x")
    assert not header.is_received(b"X-Received: from x")


# --- DotGuard ---------------------------------------------------------------------------

def guard_all(chunks: list[bytes]) -> bytes:
    guard = spool.DotGuard()
    return b"".join(guard.feed(chunk) for chunk in chunks) + guard.finish()


def test_dotguard_escapes_lone_dot_lines():
    data = b"Subject: x\r\n\r\nbefore\r\n.\r\nafter\r\n..stuffed\r\n.x\r\n"
    out = guard_all([data])
    assert out == b"Subject: x\r\n\r\nbefore\r\n..\r\nafter\r\n..stuffed\r\n.x\r\n"


def test_dotguard_escapes_a_dot_followed_by_crs():
    """Postfix drops every CR before LF: `.` CR CR LF is a lone dot to it."""
    assert guard_all([b"a\r\n.\r\r\nMAIL"]) == b"a\r\n..\r\r\nMAIL\r\n"
    assert guard_all([b"a\n.\r\r\nb\r\n"]) == b"a\n..\r\r\nb\r\n"
    assert guard_all([b"a\r\n.\r\r\r\nb\r\n"]) == b"a\r\n..\r\r\r\nb\r\n"
    assert guard_all([b"a\r\n.", b"\r", b"\r", b"\nb\r\n"]) == b"a\r\n..\r\r\nb\r\n"
    assert guard_all([b"a\r\n.\r\r"]) == b"a\r\n..\r\r\n"
    assert guard_all([b"a\r\n.\r\rx\r\n"]) == b"a\r\n.\r\rx\r\n"


def test_dotguard_bare_lf_and_first_line():
    assert guard_all([b".\nline\n.\r\n"]) == b"..\nline\n..\r\n"


def test_dotguard_unterminated_last_line():
    assert guard_all([b"a\r\nlast"]) == b"a\r\nlast\r\n"
    assert guard_all([b"a\r\n."]) == b"a\r\n..\r\n"
    assert guard_all([b"a\r\nlast\r"]) == b"a\r\nlast\r\n"
    assert guard_all([b""]) == b""


def test_dotguard_bare_lf_end_gets_crlf():
    """`.` CRLF must follow a CRLF, or a strict server never sees the end."""
    assert guard_all([b"a\nb\n"]) == b"a\nb\n\r\n"
    assert guard_all([b"a\r\n"]) == b"a\r\n"


@given(st.lists(st.sampled_from([b"a", b".", b"\r\n", b"\n", b"..", b"x.y", b"\r", b"\r\r"]),
                max_size=40),
       st.data())
def test_dotguard_any_split_same_result(pieces, data):
    """However the stream is cut into chunks, the output is the same, and it
    never contains a line that is just `.`."""
    whole = b"".join(pieces)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(whole)), max_size=6)))
    chunks, last = [], 0
    for cut in cuts + [len(whole)]:
        chunks.append(whole[last:cut])
        last = cut
    out = guard_all(chunks)
    assert out == guard_all([whole])
    assert out == b"" or out.endswith(b"\r\n")
    for line in out.split(b"\n"):
        assert line.rstrip(b"\r") != b"."


def test_config_values_taken_literally():
    """configobj validates, but quotes, commas, `#` and `%(x)s` stay as written."""
    conf = parse("OutAddress: 25\n"
                 "Header: X-Tag: #1, \"quoted\" %(x)s 'single'\n"
                 "FilterCommand: grep -v '#' | sed \"s/a,b/c/\" | awk '{print $1}'\n"
                 "FilterReject: \"554 5.7.1 No\"\n"
                 "TempDirectory: /tmp/with space\n")
    assert conf.Header == "X-Tag: #1, \"quoted\" %(x)s 'single'"
    assert conf.FilterCommand == "grep -v '#' | sed \"s/a,b/c/\" | awk '{print $1}'"
    assert conf.FilterReject == "\"554 5.7.1 No\""
    assert conf.TempDirectory == "/tmp/with space"


class _Transport:
    """What Channel.close() asks of a transport."""

    def __init__(self, buffered: int, closing: bool) -> None:
        self.buffered, self.closing, self.closes = buffered, closing, 0

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def close(self) -> None:
        self.closing = True
        self.closes += 1


@pytest.mark.parametrize("buffered", [0, 10])
@pytest.mark.parametrize("closing", [False, True])
def test_channel_close_lingers_only_for_bytes_still_to_send(buffered, closing):
    """A plaintext connection closed with nothing left to send ends at once,
    whether it is still open or already ending (a server's, after its EOF):
    no LINGER timer.  With bytes still queued it gets one (then a reset)."""
    import asyncio

    loop = asyncio.new_event_loop()
    try:
        channel = Channel("SERVER", loop=loop)
        transport = channel.transport = _Transport(buffered, closing)
        channel.close()
        assert transport.closes == (0 if closing else 1)
        assert (channel._linger is not None) == bool(buffered)
        if channel._linger is not None:
            assert channel._linger.when() - loop.time() > LINGER - 1
            channel._linger.cancel()
    finally:
        loop.close()


@pytest.mark.parametrize("first", ["server", "proxy"])
def test_reply_queue_client_gone_is_no_error_for_any_reply_it_passes_on(first):
    """A client gone when the server's reply comes: neither that reply nor
    a reply of the proxy's own queued behind it raises (the session ends
    at its next step, as for a client that closed between replies)."""
    from proxsmtp.session.replyqueue import ProxyCommand, ReplyQueue, ServerAnswers

    client = Channel("CLIENT")      # no transport: every write fails
    queue = ReplyQueue(client)
    answered = []
    if first == "server":
        queue.expect(ServerAnswers(b"NOOP", b"NOOP\r\n"))
    else:
        queue.expect(ProxyCommand(answered.append))
    queue.answer(b"500 Line too long\r\n")
    queue.server_line(b"250 ok\r\n", False, "T", lambda place, lines: lines)
    assert len(queue) == 0
    assert answered == ([] if first == "server" else [[b"250 ok\r\n"]])


# --- the reply reader: Peer.read_reply and its inlined copy in ReplyQueue.server_line ---

REPLY_CODES = st.sampled_from([b"250", b"220", b"554", b"25", b"abc", b""])
REPLY_TEXT = st.one_of(st.binary(max_size=30), st.integers(900, 5000).map(lambda n: b"x" * n))


@st.composite
def reply_streams(draw) -> list[bytes]:
    """Server reply lines: continuations, final lines, over-long lines (cut
    short by the channel), endings without CR, and runs of continuations past
    REPLY_MAX_LINES or REPLY_MAX_BYTES."""
    lines = []
    for _ in range(draw(st.integers(0, 8))):
        line = (draw(REPLY_CODES) + draw(st.sampled_from([b"-", b" ", b""]))
                + draw(REPLY_TEXT).replace(b"\n", b" ") + draw(st.sampled_from([b"\r\n", b"\n"])))
        lines += [line] * draw(st.sampled_from([1, 1, 1, 2, 17, 999, 1000, 1001]))
    return lines


@settings(max_examples=200, deadline=None)
@given(reply_streams(), st.lists(st.integers(0, 100000), max_size=5))
def test_reply_queue_groups_and_refuses_replies_as_the_peer_reader_does(lines, cuts):
    """ReplyQueue.server_line gathers the server's reply lines and checks
    REPLY_MAX_LINES/REPLY_MAX_BYTES itself (the per-line path calls no
    reader): it makes the same replies of the same lines as Peer.read_reply,
    and ends the session at the same over-long reply with the same reason."""
    from proxsmtp.session.replyqueue import ReplyQueue
    from proxsmtp.smtp.ends import SERVER_GONE, SessionEnd
    from proxsmtp.smtp.peer import ServerLeg
    from proxsmtp.smtp.replies import R_FAILED

    stream = b"".join(lines)
    points = sorted({min(cut, len(stream)) for cut in cuts})
    chunks = [stream[a:b] for a, b in zip([0] + points, points + [len(stream)])]

    relayed, queue_end = [], None
    server = Channel("SERVER")
    queue = ReplyQueue(Channel("CLIENT"))      # no transport: the client is gone
    try:
        for chunk in chunks:                        # as the relay takes them: line by line
            server.data_received(chunk)
            while (got := server.take_line()) is not None:
                queue.server_line(got[0], got[1], "T", lambda place, reply: relayed.append(reply)
                                  or reply)
    except SessionEnd as exc:
        queue_end = (str(exc), exc.reply)

    read, peer_end = [], None
    channel = Channel("SERVER")
    for chunk in chunks:
        channel.data_received(chunk)
    channel.eof_received()
    leg = ServerLeg(channel, 1.0, 0)
    while peer_end is None:
        reader = leg.read_reply()
        try:
            reader.send(None)           # all is there: it never waits
        except StopIteration as done:
            read.append(done.value)
        except SessionEnd as exc:
            peer_end = (str(exc), exc.reply)
        else:
            reader.close()
            raise AssertionError("read_reply waited with the whole stream at hand")

    event("refused as too long" if queue_end else "read to the end")
    assert read == relayed
    # the queue is left with the unfinished reply, if any; the reader finds the EOF
    assert peer_end == (queue_end or (SERVER_GONE, R_FAILED))



@st.composite
def reply_buffers(draw) -> bytes:
    """What may sit in a reader's buffer: reply lines of any codes and
    separators (bare LF and CR inside, lines around REPLY_FAST), and a
    last line cut anywhere."""
    from proxsmtp.net.channel import REPLY_FAST
    code = st.sampled_from([b"250", b"354", b"25", b"abc", b"", b"2500"])
    separator = st.sampled_from([b"-", b" ", b"", b"\r", b"--"])
    text = st.one_of(st.binary(max_size=12), st.binary(max_size=12), st.binary(max_size=12),
                     st.integers(REPLY_FAST - 40, REPLY_FAST + 5).map(lambda n: b"y" * n))
    line = st.one_of(st.just(b"250-"), st.tuples(code, separator).map(b"".join))
    lines = [draw(line) + draw(text).replace(b"\n", b" ") + draw(st.sampled_from([b"\r\n", b"\n"]))
             for _ in range(draw(st.integers(0, 8)))]
    stream = b"".join(lines)
    return stream[:draw(st.one_of(st.just(len(stream)), st.integers(0, len(stream))))]


@settings(max_examples=500, deadline=None)
@given(reply_buffers())
def test_take_reply_is_the_line_by_line_reading(data):
    """Channel.take_reply finds a reply's end by regular expressions: it
    gives the lines RFC 5321 4.2.1 makes a reply of (those up to the first
    that is no `NNN-` continuation) exactly when all of them are here
    within REPLY_FAST bytes, and leaves the rest as it was; else nothing,
    with nothing taken."""
    from proxsmtp.net.channel import REPLY_FAST
    expected, start = [], 0
    while True:
        end = data.find(b"\n", start)
        if end < 0 or end >= REPLY_FAST:
            expected = None
            break
        line = data[start:end + 1]
        expected.append(line)
        start = end + 1
        if line[3:4] != b"-" or not line[:3].isdigit():
            break
    channel = Channel("FILTER", trace=False)
    if data:
        channel.data_received(data)
    got = channel.take_reply()
    event("a reply of %s lines" % ("no" if got is None else min(len(got), 3)))
    assert got == expected
    assert bytes(channel.buf) == (data if got is None else data[start:])


@settings(max_examples=300, deadline=None)
@given(reply_buffers(), reply_buffers(), st.booleans())
def test_take_known_takes_what_take_reply_would(first, data, again):
    """Reader.take_known(bytes of a reply take_reply took before, under
    REPLY_FAST): when the buffer starts with them, it takes what take_reply
    would take (the same bytes, as lines: the same reply), and leaves the
    same rest; else nothing is taken."""
    from proxsmtp.net.channel import REPLY_FAST
    before = Channel("FILTER", trace=False)
    if first:
        before.data_received(first)
    reply = before.take_reply()
    known = b"".join(reply or [b"250 ok\r\n"])
    assume(len(known) < REPLY_FAST)
    if again:       # the same reply once more, then whatever follows
        data = known + data
    reference, channel = Channel("FILTER", trace=False), Channel("FILTER", trace=False)
    if data:
        reference.data_received(data)
        channel.data_received(data)
    taken = channel.take_known(known)
    event("taken" if taken else "not taken")
    assert taken == data.startswith(known)
    if taken:
        assert b"".join(reference.take_reply()) == known
        assert channel.buf == reference.buf
    else:
        assert bytes(channel.buf) == data

# --- which way a DATA goes (message.datapath) -------------------------------------------

def _path(settings: str, recipients: list[str], skip: bool = False) -> datapath.Path:
    envelope = Envelope("T")
    envelope.recipients = recipients
    return datapath.choose(config.parse("OutAddress: 127.0.0.1:25\n" + settings), envelope, skip)


def test_data_path_is_decided_once_in_order():
    rcpt = ["b@y.test"]
    assert _path("FilterCommand: cat\nFilterType: reject\n", rcpt, skip=True) is datapath.SKIPPED
    assert _path("FilterType: reject\n", rcpt) is datapath.REJECTED
    assert _path("FilterType: reject\n", []) is datapath.REJECTED
    assert _path("FilterCommand: cat\n", []) is datapath.NO_RECIPIENT
    assert _path("", rcpt) is datapath.RELAYED
    assert _path("FilterCommand: cat\n", rcpt) is datapath.FILTERED
    assert _path("FilterType: smtp\nFilterCommand: 127.0.0.1:10025\n", rcpt) is datapath.FILTERED


def test_data_taken_in_callbacks_only_when_nothing_waits():
    plain = config.parse("OutAddress: 127.0.0.1:25\n")
    keepalives = config.parse("OutAddress: 127.0.0.1:25\nKeepAlives: 30\n")
    may = datapath.callbacks_may_take
    for path in (datapath.RELAYED, datapath.FILTERED):
        assert may(path, plain, False, False)
        assert not may(path, keepalives, False, False)
        assert not may(path, plain, True, False)
        assert not may(path, plain, False, True)
    for path in (datapath.SKIPPED, datapath.REJECTED, datapath.NO_RECIPIENT):
        assert not may(path, plain, False, False), path


def test_take_reply_takes_a_whole_reply_or_nothing():
    """Channel.take_reply: a reply whose last line is here, in one call, the
    next pipelined reply left for later; nothing when the reply is not all
    here (then take_line reads what is), or runs past REPLY_FAST."""
    from proxsmtp.net.channel import REPLY_FAST
    channel = Channel("FILTER")
    channel.data_received(b"250-node.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n354 go")
    assert channel.take_reply() == [b"250-node.test\r\n", b"250-PIPELINING\r\n",
                                    b"250 8BITMIME\r\n"]
    assert channel.take_reply() is None and channel.pending == 6
    channel.data_received(b" ahead\r\n250-x")
    assert channel.take_reply() == [b"354 go ahead\r\n"]
    assert channel.take_reply() is None
    assert channel.take_line() is None          # no whole line either
    channel.data_received(b"\r\n")
    assert channel.take_line() == (b"250-x\r\n", False)
    long = Channel("FILTER")
    long.data_received(b"250-%s\r\n" % (b"x" * 100) * (REPLY_FAST // 100) + b"250 end\r\n")
    assert long.take_reply() is None
    assert long.take_line() == (b"250-%s\r\n" % (b"x" * 100), False)
