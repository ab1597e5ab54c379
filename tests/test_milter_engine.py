"""The milter engine (proxsmtp/filters/milter*.py) against real milters:
Sendmail's libmilter (tests/milters/testmilter.py, python3-milter) for the
verdicts, the changes, the no-reply flags and a chain of two;
tests/milters/badmilter.py and a free port for a milter that is slow,
speaks garbage or is down, under each MilterDefaultAction.  A milter
scripted here, on the packets themselves, covers what libmilter's Python
binding cannot be made to send: SMFIR_PROGRESS, SMFIR_SKIP, SMFIP_HDR_LEADSPC
and a header value folded with a bare LF (as OpenDKIM folds its signature)."""

from __future__ import annotations

import asyncio
import struct

import pytest

from proxsmtp.filters import milter as milter_module
from proxsmtp.filters import miltercodec as codec
from proxsmtp.filters.milterchain import MilterChain
from proxsmtp.message.spool import Spool
from proxsmtp.net.addresses import parse_milter
from proxsmtp.process.config import Config

pytestmark = pytest.mark.session

MESSAGE = (b"Subject: hello\r\nFrom: <a@example.org>\r\nX-Folded: one\r\n\ttwo\r\n"
           b"%s\r\nbody line\r\n..a stuffed dot\r\n")


def chain_of(*specs: str, default: str = "tempfail", timeout: float = 5) -> MilterChain:
    config = Config(Milters=tuple(parse_milter(spec) for spec in specs),
                    MilterDefaultAction=default, MilterTimeout=timeout)
    return MilterChain(config, "T")


def spool(tmp_path, directives: list[str], body: bytes | None = None) -> Spool:
    message = Spool(str(tmp_path), in_memory=True)
    lines = b"".join(b"X-Test-Milter: %s\r\n" % line.encode() for line in directives)
    message.write(MESSAGE % lines if body is None else MESSAGE.split(b"%s")[0] + lines + body)
    message.finish()
    return message


async def envelope(chain: MilterChain, rcpt: str = "<b@example.org>"):
    """connect, HELO, MAIL, RCPT, DATA: the first answer that is not continue."""
    steps = [chain.connect({"j": "proxy.test"}, "client.test", "inet", 4321, "192.0.2.7"),
             chain.helo("client.test", {}),
             chain.mail(["<a@example.org>", "SIZE=100"], {"{mail_addr}": "a@example.org"}),
             chain.rcpt([rcpt], {"{rcpt_addr}": rcpt.strip("<>")}),
             chain.data({"i": "T.1"})]
    for step in steps:
        answer = await step
        if answer.action not in ("continue", "accept"):
            for rest in steps[steps.index(step) + 1:]:
                rest.close()
            return answer
    return None


def run_message(tmp_path, specs, directives, **options):
    """One whole transaction through a chain; (the last stage's answer or
    the Outcome, the message's bytes after it)."""
    async def go():
        chain = chain_of(*specs, **options)
        try:
            refused = await envelope(chain)
            if refused is not None:
                return refused, None
            message = spool(tmp_path, directives)
            outcome = await chain.message(message, {"i": "T.1"}, "<a@example.org>",
                                          ["<b@example.org>"], str(tmp_path))
            with outcome.message.reader() as reader:
                data = reader.read()
            outcome.message.remove()
            chain.abort()
            return outcome, data
        finally:
            chain.close()
    return asyncio.run(go())


@pytest.mark.parametrize("directive, action, reply", [
    ("accept", "continue", None),
    ("reject", "reject", b"550 5.7.1 Command rejected\r\n"),
    ("tempfail", "tempfail", b"451 4.7.1 Service unavailable - try again later\r\n"),
    ("replycode 554 5.7.0 first line|second line", "replycode",
     b"554-5.7.0 first line\r\n554 5.7.0 second line\r\n"),
    ("replycode 421 4.3.2 come back", "replycode", b"421 4.3.2 come back\r\n"),
    ("discard", "discard", None),
    ("quarantine held for review", "quarantine",
     b"451 4.7.1 Service unavailable - try again later\r\n"),
])
def test_each_verdict_at_the_end_of_the_message(tmp_path, test_milter, directive, action,
                                                 reply):
    milter = test_milter()
    outcome, data = run_message(tmp_path, [milter.spec], [directive])
    assert outcome.answer.action == action
    assert outcome.answer.reply == reply
    assert outcome.answer.milter == (None if action == "continue" else milter.spec)
    if action == "quarantine":
        assert outcome.answer.why == "quarantine: held for review"
    assert (milter.spec, "accept" if directive == "accept" else action) in outcome.actions
    assert not list(tmp_path.iterdir())


def test_the_message_the_milter_sees(tmp_path, test_milter):
    """Header fields one by one (the first space eaten: no SMFIP_HDR_LEADSPC),
    folded with CRLF; the body without dot-stuffing; the macros of each stage."""
    milter = test_milter()
    outcome, data = run_message(tmp_path, [milter.spec], [])
    assert outcome.answer.action == "continue"
    events = {event["event"]: event for event in milter.events()}
    headers = [(e["name"], e["value"]) for e in milter.events() if e["event"] == "header"]
    assert headers == [("Subject", "hello"), ("From", "<a@example.org>"),
                       ("X-Folded", "one\r\n\ttwo")]
    assert events["body"]["data"] == "body line\r\n.a stuffed dot\r\n"
    assert events["connect"]["hostaddr"] == ["192.0.2.7", 4321]
    assert events["connect"]["hostname"] == "client.test"
    assert events["mail"]["args"] == ["<a@example.org>", "SIZE=100"]
    assert events["rcpt"]["macros"]["{rcpt_addr}"] == "b@example.org"
    assert events["eom"]["macros"]["i"] == "T.1"
    assert data.endswith(b"X-Test-Milter-Seen: test\r\n\r\nbody line\r\n..a stuffed dot\r\n")


def test_each_change_is_applied(tmp_path, test_milter):
    milter = test_milter()
    outcome, data = run_message(tmp_path, [milter.spec], [
        "addheader X-Added added value", "insheader 0 X-Top at the top",
        "chgheader Subject 1 changed subject", "chgheader X-Folded 1",
        "chgfrom <new@example.org> BODY=8BITMIME", "addrcpt <c@example.org>",
        "delrcpt <b@example.org>"])
    assert outcome.answer.action == "continue"
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    assert lines[0] == b"X-Top: at the top"
    assert lines[1] == b"Subject: changed subject"
    assert b"\r\nX-Folded:" not in head and b"\ttwo" not in head
    assert lines[-2:] == [b"X-Test-Milter-Seen: test", b"X-Added: added value"]
    assert body == b"body line\r\n..a stuffed dot\r\n"
    assert (outcome.sender, outcome.sender_params) == ("<new@example.org>", "BODY=8BITMIME")
    assert outcome.recipients == ["<c@example.org>"]
    words = [action for _, action in outcome.actions]
    assert words == ["addheader", "addheader", "insheader", "chgheader", "chgheader",
                     "chgfrom", "addrcpt", "delrcpt", "continue"]


def test_replace_body_keeps_dot_stuffing(tmp_path, test_milter):
    milter = test_milter()
    outcome, data = run_message(tmp_path, [milter.spec], ["replbody .new body"])
    assert data.endswith(b"\r\n\r\n..new body\r\n")
    assert (milter.spec, "replbody") in outcome.actions


def test_an_unchanged_message_is_the_same_spool(tmp_path):
    async def go():
        chain = chain_of()
        message = spool(tmp_path, [])
        outcome = await chain.message(message, {}, "<a@b>", ["<c@d>"], str(tmp_path))
        assert outcome.message is message and outcome.recipients is None
        message.remove()
    asyncio.run(go())


def test_early_refusals_answer_their_stage(tmp_path, test_milter):
    milter = test_milter()
    outcome, _ = run_message(tmp_path, [milter.spec], [])
    for rcpt, reply in [("<reject@example.org>", b"550 5.7.1 Command rejected\r\n"),
                        ("<replycode@example.org>",
                         b"550 5.1.1 replycode@example.org: no such user here\r\n")]:
        async def go():
            chain = chain_of(milter.spec)
            try:
                return await envelope(chain, rcpt)
            finally:
                chain.close()
        answer = asyncio.run(go())
        assert (answer.action, answer.reply) == (reject_word(rcpt), reply)


def reject_word(rcpt: str) -> str:
    return "replycode" if rcpt.startswith("<replycode") else "reject"


def test_a_refusal_at_connect_answers_every_later_stage(test_milter):
    milter = test_milter(connect="reject")

    async def go():
        chain = chain_of(milter.spec)
        answers = [await chain.connect({}, "c", "inet", 1, "192.0.2.1"),
                   await chain.helo("c", {}), await chain.mail(["<a@b>"], {})]
        chain.close()
        return answers
    answers = asyncio.run(go())
    assert {(a.action, a.reply) for a in answers} == {("reject", b"550 5.7.1 Command rejected\r\n")}


def test_accept_at_connect_drops_the_milter_for_the_session(tmp_path, test_milter):
    milter = test_milter(connect="accept")
    outcome, data = run_message(tmp_path, [milter.spec], ["reject"])
    assert outcome.answer.action == "continue" and b"X-Test-Milter-Seen" not in data
    events = [e["event"] for e in milter.events() if e["event"] != "close"]
    assert events == ["negotiate", "connect"]


def test_no_reply_stages_cost_no_wait(tmp_path, test_milter):
    """A milter that asks for no replies (rspamd's way) is sent every stage
    before the end of the message without a wait: wants_reply is False, and
    send_only writes each stage (True)."""
    milter = test_milter(noreply=True)

    async def go():
        chain = chain_of(milter.spec)
        await chain.connect({}, "c", "inet", 1, "192.0.2.1")
        wanted = [chain.wants_reply(stage) for stage in ("helo", "mail", "rcpt", "data")]
        assert chain.send_only("helo", "c", {})
        assert chain.send_only("mail", ["<a@b>"], {"{mail_addr}": "a@b"})
        assert chain.send_only("rcpt", ["<c@d>"], {})
        assert chain.send_only("data", {"i": "T.2"})
        outcome = await chain.message(spool(tmp_path, ["addheader X-Late yes"]), {}, "<a@b>",
                                      ["<c@d>"], str(tmp_path))
        outcome.message.remove()
        chain.close()
        return wanted, outcome
    wanted, outcome = asyncio.run(go())
    assert wanted == [False] * 4
    assert ("addheader" in [action for _, action in outcome.actions])
    events = [e["event"] for e in milter.events()]
    for stage in ("helo", "mail", "rcpt", "data", "eoh", "body", "eom"):
        assert stage in events


def test_a_milter_without_replies_sees_the_message_as_one_with_replies(tmp_path, test_milter):
    """The header fields of a milter that asks for no reply go held back as
    one piece: the milter sees the same fields, body and macros, in order."""
    seen = []
    for noreply in (False, True):
        milter = test_milter(noreply=noreply)
        outcome, data = run_message(tmp_path, [milter.spec], [])
        assert outcome.answer.action == "continue"
        seen.append(([(e["event"], e.get("name"), e.get("value"), e.get("data"))
                      for e in milter.events() if e["event"] in ("header", "eoh", "body")],
                     [e.get("macros") for e in milter.events() if e["event"] == "eom"], data))
    assert seen[0] == seen[1]
    assert [name for _, name, _, _ in seen[1][0][:3]] == ["Subject", "From", "X-Folded"]


def test_a_chain_of_two_each_sees_what_the_first_left(tmp_path, test_milter):
    one, two = test_milter(name="one"), test_milter(name="two")
    outcome, data = run_message(tmp_path, [one.spec, two.spec],
                                ["one: addheader X-From-One yes"])
    assert data.split(b"\r\n\r\n")[0].endswith(
        b"X-Test-Milter-Seen: one\r\nX-From-One: yes\r\nX-Test-Milter-Seen: two")
    seen = [(e["name"], e["value"]) for e in two.events() if e["event"] == "header"]
    assert ("X-Test-Milter-Seen", "one") in seen and ("X-From-One", "yes") in seen


def test_the_first_refusal_ends_the_chain(tmp_path, test_milter):
    one, two = test_milter(name="one"), test_milter(name="two")
    outcome, _ = run_message(tmp_path, [one.spec, two.spec], ["one: reject"])
    assert (outcome.answer.action, outcome.answer.milter) == ("reject", one.spec)
    assert "eom" not in [e["event"] for e in two.events()]


def test_a_unix_socket_milter(tmp_path, test_milter):
    milter = test_milter(unix=True)
    outcome, data = run_message(tmp_path, [milter.spec], ["addheader X-Unix yes"])
    assert b"X-Unix: yes" in data


def test_body_chunks_are_at_most_65535_bytes(tmp_path, test_milter):
    milter = test_milter()
    body = b"".join(b"%05d %s\r\n" % (n, b"x" * 90) for n in range(2000))

    async def go():
        chain = chain_of(milter.spec)
        await envelope(chain)
        message = spool(tmp_path, [], body)
        outcome = await chain.message(message, {}, "<a@b>", ["<c@d>"], str(tmp_path))
        outcome.message.remove()
        chain.close()
    asyncio.run(go())
    sizes = [e["size"] for e in milter.events() if e["event"] == "body"]
    assert max(sizes) == codec.BODY_CHUNK and sum(sizes) == len(body)


@pytest.mark.parametrize("default, action, reply", [
    ("tempfail", "tempfail", b"451 4.7.1 Service unavailable - try again later\r\n"),
    ("reject", "reject", b"550 5.5.0 Service unavailable\r\n"),
    ("accept", "continue", None),
])
@pytest.mark.parametrize("mode, stage", [("down", "optneg"), ("garbage", "optneg"),
                                         ("slow", "mail"), ("close", "rcpt"),
                                         ("garbage", "eom")])
def test_a_broken_milter_gets_the_default_action(tmp_path, bad_milter, test_milter, caplog,
                                                 default, action, reply, mode, stage):
    bad = bad_milter(mode, stage=stage, delay=30)
    good = test_milter(name="good")
    outcome, data = run_message(tmp_path, [bad.spec, good.spec], ["addheader X-Good yes"],
                                default=default, timeout=0.5)
    answer = getattr(outcome, "answer", outcome)
    assert (answer.action, answer.reply) == (action, reply)
    if default == "accept":
        assert b"X-Good: yes" in data
        assert (bad.spec, "default:accept") in outcome.actions
    else:
        assert answer.milter == bad.spec and answer.why
    warnings = [r.getMessage() for r in caplog.records if bad.spec in r.getMessage()]
    assert len(warnings) == 1 and "MilterDefaultAction " + default in warnings[0]


class Scripted:
    """A milter on the packets: OPTNEG with `protocol`, then `script[code]`
    answers each command (a list of packets), continue by default."""

    def __init__(self, protocol: int, script: dict[bytes, list[bytes]]) -> None:
        self.protocol, self.script = protocol, script
        self.seen: list[tuple[bytes, bytes]] = []

    async def serve(self, reader, writer) -> None:
        decoder = codec.Decoder(codes=None)
        while data := await reader.read(65536):
            for code, payload in decoder.feed(data):
                self.seen.append((code, payload))
                if code == codec.OPTNEG:
                    writer.write(codec.optneg(6, milter_module.ACTIONS, self.protocol))
                elif code in (codec.MACRO, codec.ABORT, codec.QUIT):
                    continue
                else:
                    writer.write(b"".join(self.script.get(code, [codec.packet(b"c")])))


def run_scripted(tmp_path, scripted: Scripted, directives: list[str], body=None):
    async def go():
        server = await asyncio.start_server(scripted.serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        chain = chain_of("inet:127.0.0.1:%d" % port, timeout=0.5)
        try:
            assert await envelope(chain) is None
            outcome = await chain.message(spool(tmp_path, directives, body), {}, "<a@b>",
                                          ["<c@d>"], str(tmp_path))
            with outcome.message.reader() as reader:
                data = reader.read()
            outcome.message.remove()
            return outcome, data
        finally:
            chain.close()
            server.close()
    return asyncio.run(go())


def test_leadspace_is_kept_and_a_bare_lf_fold_becomes_crlf(tmp_path):
    """SMFIP_HDR_LEADSPC: values go with their space, and the milter's value
    is written as given; its bare LF fold (OpenDKIM's) is written as CRLF."""
    signature = b" v=1; a=rsa-sha256;\n\tb=abc"
    eom = [codec.packet(codec.INSHEADER, struct.pack("!I", 0) + b"DKIM-Signature\0"
                        + signature + b"\0"), codec.packet(codec.CONTINUE)]
    scripted = Scripted(codec.P_HDR_LEADSPC, {codec.BODYEOB: eom})
    outcome, data = run_scripted(tmp_path, scripted, [])
    headers = [codec.parse_header(p) for c, p in scripted.seen if c == codec.HEADER]
    assert headers[0] == (b"Subject", b" hello")
    assert headers[2] == (b"X-Folded", b" one\r\n\ttwo")
    assert data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;\r\n\tb=abc\r\nSubject: hello")
    assert outcome.actions == [(outcome.actions[0][0], "insheader"),
                               (outcome.actions[0][0], "continue")]


def test_progress_restarts_the_timer(tmp_path):
    """Three SMFIR_PROGRESS 0.3 s apart, the answer 1.2 s after the RCPT: more
    than the 0.5 s MilterTimeout, no more than 0.5 s between two packets."""
    class Slow(Scripted):
        async def serve(self, reader, writer) -> None:
            decoder = codec.Decoder(codes=None)
            while data := await reader.read(65536):
                for code, payload in decoder.feed(data):
                    if code == codec.OPTNEG:
                        writer.write(codec.optneg(6, milter_module.ACTIONS, 0))
                    elif code == codec.RCPT:
                        for _ in range(3):
                            await asyncio.sleep(0.3)
                            writer.write(codec.packet(codec.PROGRESS))
                        writer.write(codec.packet(codec.CONTINUE))
                    elif code not in (codec.MACRO, codec.ABORT, codec.QUIT):
                        writer.write(codec.packet(codec.CONTINUE))
    outcome, _ = run_scripted(tmp_path, Slow(0, {}), [])
    assert outcome.answer.action == "continue"


def test_skip_ends_the_body(tmp_path):
    body = b"x" * 200000 + b"\r\n"
    scripted = Scripted(codec.P_SKIP, {codec.BODY: [codec.packet(codec.SKIP)]})
    outcome, data = run_scripted(tmp_path, scripted, [], body)
    codes = [code for code, _ in scripted.seen]
    assert codes.count(codec.BODY) == 1 and codec.BODYEOB in codes
    assert data.endswith(body)


def test_no_reply_and_skip_flags_are_honoured(tmp_path):
    """A milter that never answers before the end of the message and asked
    for that (SMFIP_NR_*), and skips HELO and the body (SMFIP_NOHELO,
    NOBODY): the awaited stages do not wait (a wait would time out into
    MilterDefaultAction's 451), HELO and the body are not sent, HELO's
    macros are."""
    quiet = [codec.CONNECT, codec.HELO, codec.MAIL, codec.RCPT, codec.DATA, codec.HEADER,
             codec.EOH, codec.BODY]
    protocol = (codec.P_NR_CONN | codec.P_NOHELO | codec.P_NR_MAIL | codec.P_NR_RCPT
                | codec.P_NR_DATA | codec.P_NR_HDR | codec.P_NR_EOH | codec.P_NOBODY)
    scripted = Scripted(protocol, {code: [] for code in quiet})

    async def go():
        server = await asyncio.start_server(scripted.serve, "127.0.0.1", 0)
        chain = chain_of("inet:127.0.0.1:%d" % server.sockets[0].getsockname()[1],
                         timeout=0.5)
        try:
            answers = [await chain.connect({}, "c", "inet", 1, "192.0.2.1"),
                       await chain.helo("c", {"j": "proxy"}),
                       await chain.mail(["<a@b>"], {}), await chain.rcpt(["<c@d>"], {}),
                       await chain.data({})]
            wanted = [chain.wants_reply(stage) for stage in ("helo", "mail", "rcpt", "data")]
            outcome = await chain.message(spool(tmp_path, []), {}, "<a@b>", ["<c@d>"],
                                          str(tmp_path))
            outcome.message.remove()
            return answers, wanted, outcome
        finally:
            chain.close()
            server.close()
    answers, wanted, outcome = asyncio.run(go())
    assert [answer.action for answer in answers] == ["continue"] * 5
    assert wanted == [False] * 4 and outcome.answer.action == "continue"
    codes = [code for code, _ in scripted.seen]
    assert codec.HELO not in codes and codec.BODY not in codes
    assert codec.MAIL in codes and codec.HEADER in codes and codec.BODYEOB in codes
    assert (codec.MACRO, codec.HELO + b"j\0proxy\0") in scripted.seen


@pytest.mark.parametrize("default, action", [("accept", "continue"), ("tempfail", "tempfail")])
def test_a_malformed_verdict_is_a_protocol_error(tmp_path, caplog, default, action):
    """A replycode that is no 4xx/5xx reply: MilterDefaultAction, and the
    changes that milter asked for before it are not made."""
    eom = [codec.packet(codec.ADDHEADER, b"X-Broken\0yes\0"),
           codec.packet(codec.REPLYCODE, b"250 all fine\0")]
    scripted = Scripted(0, {codec.BODYEOB: eom})

    async def go():
        server = await asyncio.start_server(scripted.serve, "127.0.0.1", 0)
        spec = "inet:127.0.0.1:%d" % server.sockets[0].getsockname()[1]
        chain = chain_of(spec, default=default, timeout=0.5)
        try:
            await envelope(chain)
            outcome = await chain.message(spool(tmp_path, []), {}, "<a@b>", ["<c@d>"],
                                          str(tmp_path))
            with outcome.message.reader() as reader:
                data = reader.read()
            outcome.message.remove()
            return spec, outcome, data
        finally:
            chain.close()
            server.close()
    spec, outcome, data = asyncio.run(go())
    assert outcome.answer.action == action and b"X-Broken" not in data
    assert outcome.actions == [(spec, "default:" + default)]
    assert "malformed reply: 250 all fine" in caplog.text


def test_skip_in_the_headers_goes_on_with_the_end_of_headers(tmp_path):
    scripted = Scripted(codec.P_SKIP, {codec.HEADER: [codec.packet(codec.SKIP)]})
    outcome, _ = run_scripted(tmp_path, scripted, [])
    codes = [code for code, _ in scripted.seen]
    assert codes.count(codec.HEADER) == 1 and codec.EOH in codes and codec.BODYEOB in codes
    assert outcome.answer.action == "continue"
