"""Milters in the session (proxsmtpd(8) MILTERS), end to end: a real
proxsmtpd between a raw client and a recording server, with the libmilter
test milter (tests/milters/testmilter.py) and broken milters
(tests/milters/badmilter.py) from tests/milterpeers.py.

Each verdict at each stage the test milter can give it, a refusal before
the server sees the command, the envelope the milters change reaching the
server, discard, quarantine, a chain of two feeding a FilterType pipe
filter, the log line and /metrics, a milter down, slow or broken under
each MilterDefaultAction, and a milter that asks for no replies costing
the session no wait before the end of the message."""

from __future__ import annotations

import re
import smtplib
import socket
import urllib.request

import pytest
import test_tls
from harness import Client, free_port, send_mail, wait_until
from prometheus_client.parser import text_string_to_metric_families

from proxsmtp.net.proxyproto import build

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
pki = test_tls.pki              # the test CA and certificates, a fixture

BODY = b"From: a@x.test\r\nSubject: milters\r\n\r\nbody line\r\n"
OK = "250 2.0.0 Ok: queued as TEST"
TEMPFAIL = "451 4.7.1 Service unavailable - try again later"
REJECT = "550 5.7.1 Command rejected"
UNAVAILABLE = "550 5.5.0 Service unavailable"     # MilterDefaultAction reject


def start(proxy, upstream, *milters, **settings):
    conf = {"OutAddress": upstream.address, "Workers": 1,
            "Milters": ", ".join(milter.spec for milter in milters)}
    conf.update(settings)
    return proxy(conf)


def message(*directives: str, body: bytes = BODY) -> bytes:
    return b"".join(b"X-Test-Milter: %s\r\n" % d.encode() for d in directives) + body


def transaction(client: Client, sender: str, recipients: list[str]) -> None:
    assert client.cmd("EHLO client.example")[-1].startswith("250")
    assert client.cmd("MAIL FROM:<%s>" % sender)[-1].startswith("250")
    for rcpt in recipients:
        assert client.cmd("RCPT TO:<%s>" % rcpt)[-1].startswith("250")


def events(milter, kind: str) -> list[dict]:
    return [event for event in milter.events() if event["event"] == kind]


def scrape(address: str) -> dict:
    with urllib.request.urlopen("http://%s/metrics" % address, timeout=10) as answer:
        text = answer.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


# --- before the message: refusals answer the command; the server never sees it --------------

@pytest.mark.parametrize("kind, reply", [
    ("reject", REJECT), ("tempfail", TEMPFAIL),
    ("replycode", "550 5.1.1 replycode@y.test: no such user here")])
def test_a_refused_rcpt_is_answered_by_the_milter_and_never_reaches_the_server(
        proxy, upstream, test_milter, kind, reply):
    milter = test_milter()
    px = start(proxy, upstream, milter)
    with px.connect() as client:
        transaction(client, "a@x.test", ["ok@y.test"])
        assert client.cmd("RCPT TO:<%s@y.test>" % kind) == [reply.replace("replycode", kind)]
        assert client.cmd("DATA")[-1].startswith("354")
        client.send(message() + b".\r\n")
        assert client.reply() == [OK]
    [delivered] = upstream.wait_messages(1)
    assert delivered.recipients == ["ok@y.test"]
    assert not any("%s@y.test" % kind in line for _, line in upstream.lines)
    px.wait_log(r"milter %s refused RCPT: %s" % (re.escape(milter.spec), re.escape(reply)))


@pytest.mark.parametrize("kind, reply", [("reject", REJECT), ("tempfail", TEMPFAIL)])
def test_a_refused_mail_or_helo_never_reaches_the_server(proxy, upstream, test_milter, kind,
                                                         reply):
    milter = test_milter()
    px = start(proxy, upstream, milter)
    with px.connect() as client:
        assert client.cmd("EHLO %s" % kind) == [reply]
        # as Postfix (MILTER8_STAT_REJECT_CON): a refused HELO answers the session's later stages
        assert client.cmd("EHLO client.example") == [reply]
        assert client.cmd("MAIL FROM:<a@x.test>") == [reply]
    with px.connect() as client:
        assert client.cmd("EHLO client.example")[-1].startswith("250")
        assert client.cmd("MAIL FROM:<%s@x.test>" % kind) == [reply]
        assert client.cmd("MAIL FROM:<a@x.test>")[-1].startswith("250")
        assert client.cmd("RSET")[0].startswith("250")
    seen = [line for _, line in upstream.lines]
    assert "EHLO %s" % kind not in seen and "MAIL FROM:<%s@x.test>" % kind not in seen
    assert seen.count("EHLO client.example") == 1 and seen.count("MAIL FROM:<a@x.test>") == 1
    px.wait_log(r"milter %s refused MAIL: %s" % (re.escape(milter.spec), reply))
    # ABORT after the refused MAIL, and on RSET
    wait_until(lambda: events(milter, "abort"), 10, what="ABORT")


def test_a_connect_refusal_ends_the_session_before_the_server_hears_of_it(
        proxy, upstream, test_milter):
    milter = test_milter(connect="reject")
    px = start(proxy, upstream, milter)
    with px.connect() as client:
        assert client.greeting == ["554 5.7.1 Command rejected"]
        assert client.closed_by_peer()
    assert upstream.connections == []
    px.wait_log(r"milter %s refused the connection from 127\.0\.0\.1: 550 5\.7\.1"
                % re.escape(milter.spec))


def test_the_milter_sees_the_real_client_and_the_macros(proxy, upstream, test_milter):
    """Behind a balancer (ProxyProtocol) the connect stage names the client
    of the PROXY header; the macros Postfix sends are there, per stage."""
    milter = test_milter()
    px = start(proxy, upstream, milter, ProxyProtocol="on")
    header = build(1, ("192.0.2.7", 40001), ("198.51.100.1", 25))
    with Client(px.host, px.port, hello=header) as client:
        assert send_mail(client, "a@x.test", ["b@y.test"], message()) == [OK]
        assert client.cmd("MAIL FROM:<c@x.test>")[-1].startswith("250")
        assert client.cmd("RSET")[-1].startswith("250")
    tag = px.wait_log(r"^proxsmtpd: (\w+): client=192\.0\.2\.7,.*status=FILTERED").group(1)
    connect = [e for e in events(milter, "connect") if "192.0.2.7" in str(e["hostaddr"])]
    assert connect and connect[0]["hostname"] == "[192.0.2.7]"
    macros = connect[0]["macros"]
    # as Postfix gives them for a client without a verified reverse name
    assert macros["{client_addr}"] == "192.0.2.7" and macros["{client_name}"] == "unknown"
    assert macros["_"] == "unknown [192.0.2.7]" and macros["{client_port}"] == "40001"
    assert macros["{daemon_addr}"] == "198.51.100.1"
    assert macros["{daemon_name}"] == macros["j"] == socket.getfqdn()
    assert macros["v"].startswith("proxsmtpd ")
    mail = events(milter, "mail")[0]
    assert mail["args"][0] == "<a@x.test>" and mail["macros"]["{mail_addr}"] == "a@x.test"
    assert mail["macros"]["i"] == tag
    assert (mail["macros"]["{mail_host}"], mail["macros"]["{mail_mailer}"]) == ("x.test", "smtp")
    [rcpt] = events(milter, "rcpt")
    assert rcpt["macros"]["{rcpt_addr}"] == "b@y.test"
    assert (rcpt["macros"]["{rcpt_host}"], rcpt["macros"]["{rcpt_mailer}"]) == ("y.test", "smtp")
    # RSET: ABORT (libmilter calls xxfi_abort only inside a transaction)
    wait_until(lambda: events(milter, "abort"), 10, what="ABORT")


def test_the_mail_stage_gets_auth_type_after_the_server_accepted_auth(proxy, upstream,
                                                                       test_milter):
    """{auth_type}: the mechanism of the AUTH the server accepted, as the
    client wrote it (Postfix's sasl_method); no identity (the SASL exchange
    is the server's, never read by the proxy)."""
    milter = test_milter()
    px = start(proxy, upstream, milter)
    with px.connect() as client:
        assert send_mail(client, "a@x.test", ["b@y.test"], message()) == [OK]
        assert client.cmd("AUTH PLAIN AGpvZQBzZWNyZXQ=") == ["235 2.7.0 Authentication successful"]
        assert send_mail(client, "c@x.test", ["b@y.test"], message(), helo="RSET") == [OK]
    upstream.wait_messages(2)
    before, after = events(milter, "mail")
    assert "{auth_type}" not in before["macros"]
    assert after["macros"]["{auth_type}"] == "PLAIN"
    assert "{auth_authen}" not in after["macros"] and "{auth_author}" not in after["macros"]


# --- the end of the message ------------------------------------------------------------------

@pytest.mark.parametrize("directive, reply, status, delivered", [
    ("accept", OK, "FILTERED", True),
    ("reject", REJECT, "REJECTED", False),
    ("tempfail", TEMPFAIL, "REJECTED", False),
    ("replycode 554 5.7.0 first line|second line", "554-5.7.0 first line\n554 5.7.0 second line",
     "REJECTED", False),
    ("discard", "250 2.0.0 Ok", "DISCARDED", False),
    ("quarantine held for review", TEMPFAIL, "REJECTED", False),
])
def test_each_verdict_at_the_end_of_the_message(proxy, upstream, test_milter, directive, reply,
                                                status, delivered):
    milter = test_milter()
    px = start(proxy, upstream, milter)
    with px.connect() as client:
        transaction(client, "a@x.test", ["b@y.test"])
        assert client.cmd("DATA")[-1].startswith("354")
        client.send(message(directive) + b".\r\n")
        assert client.reply() == reply.split("\n")
        assert client.cmd("NOOP")[0].startswith("250")
    px.wait_log(r'status=%s' % status)
    line = px.wait_log(r"^proxsmtpd: \w+: client=.*status=%s$" % status).group(0)
    assert 'reply="%s"' % reply.split("\n")[-1] in line, line
    if directive != "accept":
        assert "milter=%s" % milter.spec in line, line
    if delivered:
        upstream.wait_messages(1)
    else:
        upstream.wait_command("RSET")
        assert upstream.messages == []
    if directive.startswith("quarantine"):
        px.wait_log(r"milter %s quarantined the message \(quarantine: held for review\); a proxy "
                    r"has no queue" % re.escape(milter.spec))


DISCARDS = [("mail", "discard@x.test", ["b@y.test"]), ("rcpt", "a@x.test", ["discard@y.test"]),
            ("data", "discard-data@x.test", ["b@y.test"]),
            ("header", "discard-header@x.test", ["b@y.test"]),
            ("eoh", "discard-eoh@x.test", ["b@y.test"]),
            ("body", "discard-body@x.test", ["b@y.test"])]


@pytest.mark.parametrize("stage, sender, recipients", DISCARDS, ids=[d[0] for d in DISCARDS])
def test_a_discard_before_the_end_of_the_message_discards_the_transaction(
        proxy, upstream, test_milter, stage, sender, recipients):
    """As Postfix: the client hears success at each command and 250 for the
    message, the server never gets DATA (RSET forgets what it had of the
    transaction), the milters hear nothing more of it; logged DISCARDED
    with the milter, and counted."""
    milter = test_milter()
    stats = "127.0.0.1:%d" % free_port()
    px = start(proxy, upstream, milter, StatsListen=stats)
    with px.connect() as client:
        transaction(client, sender, recipients + ["c@y.test"])
        assert client.cmd("DATA")[-1].startswith("354")
        client.send(message() + b".\r\n")
        assert client.reply() == ["250 2.0.0 Ok"]
        # the next transaction is the milters' again
        assert send_mail(client, "a@x.test", ["b@y.test"], message(), helo="RSET") == [OK]
    [delivered] = upstream.wait_messages(1)
    assert delivered.sender == "a@x.test"
    verbs = upstream.verbs()
    assert verbs.count("DATA") == 1 and verbs.index("RSET") < verbs.index("DATA")
    line = px.wait_log(r"^proxsmtpd: \w+: client=.*status=DISCARDED$").group(0)
    assert 'reply="250 2.0.0 Ok", milter=%s' % milter.spec in line, line
    if stage in ("mail", "rcpt", "data"):
        px.wait_log(r"milter %s discards the transaction at %s" % (re.escape(milter.spec),
                                                                   stage.upper()))
    px.wait_log(r"status=FILTERED")
    seen = [e["event"] for e in milter.events()]
    begun = seen.index("mail")
    first = [event for event in seen[begun:seen.index("mail", begun + 1)]
             if event in ("mail", "rcpt", "data", "header", "eoh", "body", "eom")]
    assert first[-1] == stage and "eom" not in first, seen
    samples = scrape(stats)
    assert samples[("proxsmtpd_milter_actions_total",
                    (("action", "discard"), ("milter", milter.spec)))] == 1
    assert samples[("proxsmtpd_messages_total", (("status", "DISCARDED"),))] == 1


@pytest.mark.parametrize("sender", ["discard@x.test", "a@x.test"])
def test_a_nested_mail_is_refused_before_the_milters(proxy, upstream, test_milter, sender):
    """MAIL inside a transaction is refused by the proxy, as Postfix's smtpd
    refuses it before its milters (RFC 5321 4.1.4): neither the milters nor
    the server hear of the second sender, and the transaction (a discard
    of it included) goes on as it was."""
    milter = test_milter()
    px = start(proxy, upstream, milter)
    with px.connect() as client:
        assert client.cmd("EHLO client.example")[-1].startswith("250")
        assert client.cmd("MAIL FROM:<%s>" % sender) == ["250 2.1.0 Ok"]
        assert client.cmd("MAIL FROM:<again@x.test>") == ["503 5.5.1 Error: nested MAIL command"]
        assert client.cmd("RCPT TO:<b@y.test>")[-1].startswith("250")
        assert client.cmd("DATA")[-1].startswith("354")
        client.send(message() + b".\r\n")
        assert client.reply()[-1].startswith("250")
    assert not any("again@x.test" in line for _, line in upstream.lines)
    events = [e for e in milter.events() if e["event"] in ("mail", "rcpt", "eom")]
    if sender.startswith("discard"):
        px.wait_log(r"milter=%s, status=DISCARDED" % re.escape(milter.spec))
        assert upstream.messages == [] and "DATA" not in upstream.verbs()
        assert [e["event"] for e in events] == ["mail"]
    else:
        [delivered] = upstream.wait_messages(1)
        assert delivered.sender == sender
        assert [e["event"] for e in events] == ["mail", "rcpt", "eom"]
    assert "again" not in str(milter.events())


def test_header_and_body_changes_reach_the_server(proxy, upstream, test_milter):
    milter = test_milter()
    px = start(proxy, upstream, milter)
    with px.connect() as client:
        body = message("addheader X-Added first", "insheader 0 X-Inserted top",
                       "chgheader Subject 1 changed", "replbody new body")
        assert send_mail(client, "a@x.test", ["b@y.test"], body) == [OK]
    [delivered] = upstream.wait_messages(1)
    lines = delivered.body.split(b"\r\n")
    assert lines[0] == b"X-Inserted: top"
    assert b"Subject: changed" in lines and b"X-Added: first" in lines
    assert b"X-Test-Milter-Seen: test" in lines
    assert delivered.body.endswith(b"\r\n\r\nnew body")
    assert px.spool_files() == []


def test_envelope_changes_reach_the_server_by_replaying_the_transaction(
        proxy, upstream, test_milter):
    milter = test_milter()
    px = start(proxy, upstream, milter)
    with px.connect() as client:
        body = message("chgfrom <new@x.test>", "addrcpt <added@y.test>", "delrcpt <b@y.test>")
        assert send_mail(client, "a@x.test", ["b@y.test", "c@y.test"], body) == [OK]
    [delivered] = upstream.wait_messages(1)
    assert delivered.sender == "new@x.test"
    assert delivered.recipients == ["c@y.test", "added@y.test"]
    commands = [line for _, line in upstream.lines]
    replayed = commands[commands.index("RSET"):]
    assert replayed[:4] == ["RSET", "MAIL FROM:<new@x.test>", "RCPT TO:<c@y.test>",
                            "RCPT TO:<added@y.test>"]
    px.wait_log(r"client=127\.0\.0\.1, from=new@x\.test, to=c@y\.test, to=added@y\.test, .*"
                r"status=FILTERED")


def test_a_replayed_recipient_the_server_refuses_refuses_the_message(
        proxy, make_upstream, test_milter):
    """Nothing lost: the client heard 250 for its RCPTs, so a recipient the
    milters added that the server refuses makes the whole message fail."""
    upstream = make_upstream(refuse=("added@y.test",))
    milter = test_milter()
    px = start(proxy, upstream, milter)
    with px.connect() as client:
        reply = send_mail(client, "a@x.test", ["b@y.test"], message("addrcpt <added@y.test>"))
    assert reply == ["550 5.1.1 <added@y.test>: Recipient address rejected"]
    assert upstream.messages == []
    px.wait_log(r"the server refused RCPT TO:<added@y\.test> of the milters' envelope")
    px.wait_log(r"status=REJECTED")


def test_a_chain_of_two_feeds_the_pipe_filter(proxy, upstream, test_milter, tmp_path):
    """Each milter sees what the previous left (as Postfix); FilterType's
    filter then sees the message and the envelope as the chain left them."""
    first, second = test_milter(name="one"), test_milter(name="two", unix=True)
    seen, sender = tmp_path / "seen", tmp_path / "sender"
    px = start(proxy, upstream, first, second,
               FilterCommand='echo "$SENDER" > %s; tee %s' % (sender, seen))
    with px.connect() as client:
        body = message("one: addheader X-From-One yes", "two: chgfrom <two@x.test>")
        assert send_mail(client, "a@x.test", ["b@y.test"], body) == [OK]
    [delivered] = upstream.wait_messages(1)
    headers = [h for h in delivered.body.split(b"\r\n") if h.startswith(b"X-")]
    assert headers[-3:] == [b"X-Test-Milter-Seen: one", b"X-From-One: yes",
                            b"X-Test-Milter-Seen: two"]
    # the second milter saw the first one's headers
    assert any(e["name"] == "X-From-One" for e in events(second, "header"))
    assert b"X-Test-Milter-Seen: two" in seen.read_bytes()
    assert sender.read_text().strip() == "two@x.test" == delivered.sender


def test_without_filter_command_the_milters_alone_decide(proxy, upstream, test_milter):
    milter = test_milter()
    px = start(proxy, upstream, milter)
    with px.connect() as client:
        assert send_mail(client, "a@x.test", ["b@y.test"], message()) == [OK]
        assert send_mail(client, "a@x.test", ["b@y.test"], message("reject"),
                         helo="RSET") == [REJECT]
    upstream.wait_messages(1)
    # one connection to the milter per session (the harness's probe is the other),
    # reused for both messages
    assert len(events(milter, "connect")) == 2 and len(events(milter, "eom")) == 2
    px.wait_log(r"status=REJECTED")


# --- broken milters and MilterDefaultAction -----------------------------------------------------

@pytest.mark.parametrize("action, greeting", [("tempfail", "421 4.7.1 Service unavailable - try "
                                                "again later"),
                                               ("reject", "554 5.5.0 Service unavailable"),
                                               ("accept", None)])
def test_a_milter_down_under_each_default_action(proxy, upstream, bad_milter, action, greeting):
    milter = bad_milter("down")
    px = start(proxy, upstream, milter, MilterDefaultAction=action)
    with px.connect() as client:
        if greeting is not None:
            assert client.greeting == [greeting]
        else:
            assert send_mail(client, "a@x.test", ["b@y.test"], BODY) == [OK]
    if greeting is None:
        upstream.wait_messages(1)
    else:
        assert upstream.connections == []
    px.wait_log(r"milter %s: .*; MilterDefaultAction %s" % (re.escape(milter.spec), action))


@pytest.mark.parametrize("mode, action, reply", [
    ("slow", "tempfail", TEMPFAIL), ("garbage", "reject", UNAVAILABLE), ("close", "accept", OK)])
def test_a_milter_broken_at_the_end_of_the_message(proxy, upstream, bad_milter, mode, action,
                                                   reply):
    milter = bad_milter(mode, stage="eom", delay=30)
    px = start(proxy, upstream, milter, MilterDefaultAction=action, MilterTimeout=1)
    with px.connect() as client:
        assert send_mail(client, "a@x.test", ["b@y.test"], BODY) == [reply]
    if reply == OK:
        upstream.wait_messages(1)
    else:
        upstream.wait_command("RSET")
        assert upstream.messages == []
    px.wait_log(r"milter %s: .*; MilterDefaultAction %s" % (re.escape(milter.spec), action))


# --- what operators see: metrics, and no wait for a milter that wants no replies ---------------

def test_metrics_count_actions_and_awaited_steps(proxy, upstream, test_milter):
    milter = test_milter()
    quiet = test_milter(name="quiet", noreply=True)
    stats = "127.0.0.1:%d" % free_port()
    px = start(proxy, upstream, milter, quiet, StatsListen=stats)
    with px.connect() as client:
        transaction(client, "a@x.test", ["b@y.test"])
        assert client.cmd("RCPT TO:<reject@y.test>") == [REJECT]
        assert client.cmd("DATA")[-1].startswith("354")
        client.send(message("addheader X-A b") + b".\r\n")
        assert client.reply() == [OK]
    upstream.wait_messages(1)
    px.wait_log(r"status=FILTERED")
    samples = scrape(stats)

    def count(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    actions = "proxsmtpd_milter_actions_total"
    assert count(actions, milter=milter.spec, action="reject") == 1
    assert count(actions, milter=milter.spec, action="addheader") == 2    # and its Seen
    assert count(actions, milter=milter.spec, action="continue") == 1
    assert count(actions, milter=quiet.spec, action="continue") == 1
    steps = "proxsmtpd_milter_duration_seconds_count"
    assert count(steps, stage="message") == 1 and count(steps, stage="rcpt") == 2


def test_a_milter_that_wants_no_replies_costs_no_wait_before_the_message(
        proxy, upstream, test_milter):
    """rspamd's way (SMFIP_NR_* for every stage but the end of the message):
    the stages are written as they happen and never awaited, so MAIL and
    RCPT stay on the relay's path; only the end of the message waits."""
    milter = test_milter(noreply=True)
    stats = "127.0.0.1:%d" % free_port()
    px = start(proxy, upstream, milter, StatsListen=stats)
    with px.connect() as client:
        body = message("reject")
        transaction(client, "a@x.test", ["b@y.test", "reject@y.test"])     # no reply: no refusal
        assert client.cmd("DATA")[-1].startswith("354")
        client.send(body + b".\r\n")
        assert client.reply() == [REJECT]
    px.wait_log(r"status=REJECTED")
    samples = scrape(stats)
    awaited = {dict(labels)["stage"]: number for (name, labels), number in samples.items()
               if name == "proxsmtpd_milter_duration_seconds_count" and number}
    assert awaited == {"connect": 2, "message": 1}, awaited      # the harness's probe connects too
    assert [e["args"][0] for e in events(milter, "rcpt")] == ["<b@y.test>", "<reject@y.test>"]


def test_a_refusal_at_data_answers_data_and_the_server_forgets_the_transaction(
        proxy, upstream, bad_milter):
    milter = bad_milter("close", stage="data")
    px = start(proxy, upstream, milter, MilterDefaultAction="reject")
    with px.connect() as client:
        transaction(client, "a@x.test", ["b@y.test"])
        assert client.cmd("DATA") == [UNAVAILABLE]
        assert client.cmd("NOOP")[0].startswith("250")
    upstream.wait_command("RSET")
    assert "DATA" not in upstream.verbs()
    line = px.wait_log(r"^proxsmtpd: \w+: client=.*status=REJECTED$").group(0)
    assert 'reply="%s", milter=%s' % (UNAVAILABLE, milter.spec) in line


def test_the_helo_stage_gets_the_tls_macros_after_starttls(proxy, upstream, test_milter, pki):
    milter = test_milter()
    px = start(proxy, upstream, milter, **test_tls.tls_settings(pki))
    with px.smtp() as smtp:
        smtp.ehlo("client.example")
        assert smtp.starttls(context=test_tls.client_context(pki))[0] == 220
        smtp.ehlo("client.example")
        version, cipher, bits = smtp.sock.version(), *smtp.sock.cipher()[::2]
        smtp.sendmail("a@x.test", ["b@y.test"], message())
        smtp.quit()
    upstream.wait_messages(1)
    first, second = events(milter, "helo")
    assert "{tls_version}" not in first["macros"]
    assert second["macros"]["{tls_version}"] == version and second["macros"]["{cipher}"] == cipher
    assert second["macros"]["{cipher_bits}"] == str(bits)
    assert "{cert_subject}" not in second["macros"]


def test_the_helo_stage_gets_the_tls_macros_under_tlswrapper(proxy, upstream, test_milter, pki):
    """Implicit TLS on the client leg (TLSWrapper): the first HELO stage
    already has them, as Postfix's smtpd_tls_wrappermode."""
    milter = test_milter()
    px = start(proxy, upstream, milter, TLSWrapper="on", **test_tls.tls_settings(pki))
    with smtplib.SMTP_SSL(px.host, px.port, context=test_tls.client_context(pki),
                          timeout=20) as smtp:
        smtp.ehlo("client.example")
        version, cipher, bits = smtp.sock.version(), *smtp.sock.cipher()[::2]
        smtp.sendmail("a@x.test", ["b@y.test"], message())
        smtp.ehlo("again.example")
    upstream.wait_messages(1)
    helos = events(milter, "helo")
    assert [e["name"] for e in helos] == ["client.example", "again.example"]
    for helo in helos:
        assert (helo["macros"]["{tls_version}"], helo["macros"]["{cipher}"],
                helo["macros"]["{cipher_bits}"]) == (version, cipher, str(bits))
    assert version.startswith("TLSv1.")


def test_a_mail_the_server_refuses_aborts_the_milters_transaction(proxy, make_upstream,
                                                                  bad_milter):
    """The milters saw MAIL before the server refused it: ABORT, so the next
    MAIL starts a transaction of its own (the packets as the milter got them)."""
    upstream = make_upstream(replies={"MAIL": lambda line, conn: "451 4.3.0 try later"
                                      if "first" in line else "250 2.1.0 Ok"})
    milter = bad_milter("slow", stage="eom")        # answers every stage before the message
    px = start(proxy, upstream, milter)
    with px.connect() as client:
        assert client.cmd("EHLO client.example")[-1].startswith("250")
        assert client.cmd("MAIL FROM:<first@x.test>") == ["451 4.3.0 try later"]
        assert client.cmd("MAIL FROM:<second@x.test>") == ["250 2.1.0 Ok"]
        wait_until(lambda: len(events(milter, "mail")) == 2, 10, what="the second MAIL")
        seen = [e["event"] for e in milter.events() if e["event"] in ("mail", "abort")]
    assert seen == ["mail", "abort", "mail"], seen


def test_rset_and_a_new_ehlo_abort_the_milters_transaction(proxy, upstream, bad_milter):
    milter = bad_milter("slow", stage="eom")        # answers every stage before the message
    px = start(proxy, upstream, milter)
    with px.connect() as client:
        assert client.cmd("EHLO client.example")[-1].startswith("250")
        assert client.cmd("MAIL FROM:<a@x.test>")[-1].startswith("250")
        assert client.cmd("RSET")[-1].startswith("250")
        assert client.cmd("MAIL FROM:<b@x.test>")[-1].startswith("250")
        assert client.cmd("EHLO client.example")[-1].startswith("250")
        assert client.cmd("MAIL FROM:<c@x.test>")[-1].startswith("250")
        wait_until(lambda: len(events(milter, "mail")) == 3, 10, what="the third MAIL")
        seen = [e["event"] for e in milter.events() if e["event"] in ("helo", "mail", "abort")]
    assert seen == ["helo", "mail", "abort", "mail", "abort", "helo", "mail"], seen


# --- connections kept across client sessions (MilterReuse) -----------------------------------

def one_message(px, client_ip: str, sender: str) -> list[str]:
    """One client session from `client_ip` (a PROXY header), one message; its final reply."""
    header = build(1, (client_ip, 40001), ("198.51.100.1", 25))
    with Client(px.host, px.port, hello=header) as client:
        return send_mail(client, sender, ["b@y.test"], message())


def test_a_kept_milter_connection_serves_the_next_client_session(proxy, upstream, bad_milter):
    """MilterReuse: the second client session starts with SMFIC_CONNECT on
    the connection the first one ended with SMFIC_QUIT_NC, with its own
    client and macros; one OPTNEG for both."""
    milter = bad_milter("good", stage="eom", quit_nc="keep")
    px = start(proxy, upstream, milter, MilterReuse=milter.spec, ProxyProtocol="on")
    assert one_message(px, "192.0.2.7", "a@x.test") == [OK]
    assert one_message(px, "192.0.2.9", "b@x.test") == [OK]
    upstream.wait_messages(2)
    # (the harness's start-up probe is a session too, on the same connection;
    # the last session's QUIT_NC waits for the next session's packets)
    wait_until(lambda: len(events(milter, "eom")) == 2, 10, what="the second message")
    assert len(events(milter, "optneg")) == 1 and not events(milter, "quit")
    assert len({e["conn"] for e in milter.events()}) == 1
    assert len(events(milter, "quit_nc")) == len(events(milter, "connect")) - 1
    assert [e["strings"][0] for e in events(milter, "connect")][-2:] \
        == ["[192.0.2.7]", "[192.0.2.9]"]
    macros = [e["strings"] for e in events(milter, "macro") if e["strings"][0].startswith("C")]
    assert [m[m.index("{client_addr}") + 1] for m in macros][-2:] == ["192.0.2.7", "192.0.2.9"]
    order = [e["event"] for e in milter.events() if e["event"] in ("connect", "eom", "quit_nc")]
    assert order[-5:] == ["connect", "eom", "quit_nc", "connect", "eom"]


def test_a_kept_connection_the_milter_closed_while_idle_is_not_used(proxy, upstream,
                                                                     bad_milter):
    """A milter that closes an idle connection (its own idle timeout): the
    next session opens a new one instead of failing on it."""
    milter = bad_milter("good", stage="eom", quit_nc="keep", idle=0.3)
    px = start(proxy, upstream, milter, MilterReuse=milter.spec)
    with px.connect() as client:
        assert send_mail(client, "a@x.test", ["b@y.test"], message()) == [OK]
    wait_until(lambda: events(milter, "idle_close"), 10, what="the idle close")
    with px.connect() as client:
        assert send_mail(client, "c@x.test", ["b@y.test"], message()) == [OK]
    upstream.wait_messages(2)
    assert len(events(milter, "optneg")) >= 2
    assert "MilterDefaultAction" not in px.log()


def test_a_milter_that_closes_at_quit_nc_costs_one_session_its_default_action(
        proxy, upstream, bad_milter):
    """Named in MilterReuse, a milter that does not take SMFIC_QUIT_NC (it
    closes the connection) fails the next session on it as a milter that
    fails does, MilterDefaultAction, and the log says the connection was a
    kept one; the session after opens a new connection."""
    milter = bad_milter("good", stage="eom")        # closes the connection at QUIT_NC
    px = start(proxy, upstream, milter, MilterReuse=milter.spec)
    greetings = []
    for _ in range(5):
        with px.connect() as client:
            greetings.append(client.greeting[0][:3])
            if client.greeting[0].startswith("220"):
                assert send_mail(client, "a@x.test", ["b@y.test"], message()) == [OK]
    # (the harness's start-up probe may have been the first session on it)
    assert greetings.count("421") == 1 and greetings[-3:] == ["220"] * 3, greetings
    px.wait_log(r"milter %s: .* \(on a connection kept from an earlier session\); "
                r"MilterDefaultAction tempfail" % re.escape(milter.spec))
    px.wait_log(r"milter %s: a kept connection failed: its connections are no longer kept"
                % re.escape(milter.spec))


def test_rspamd_takes_a_kept_connection_session_after_session(proxy, upstream, rspamd_milter):
    """rspamd's milter resets its session at SMFIC_QUIT_NC: on one kept
    connection a clean message gets its headers, GTUBE its own refusal, and
    a clean one after it its headers again."""
    px = start(proxy, upstream, rspamd_milter, MilterReuse=rspamd_milter.spec)
    gtube = b"From: a@x.test\r\nSubject: gtube\r\n\r\n%s\r\n" % rspamd_milter.gtube.encode()
    finals = []
    for body in (BODY, gtube, BODY):
        with px.connect() as client:
            assert client.cmd("EHLO client.example")[-1].startswith("250")
            assert client.cmd("MAIL FROM:<a@x.test>")[-1].startswith("250")
            assert client.cmd("RCPT TO:<b@y.test>")[-1].startswith("250")
            assert client.cmd("DATA")[-1].startswith("354")
            client.send(body + b".\r\n")
            finals.append(client.reply()[-1])
    assert finals[0] == finals[2] == OK and finals[1].startswith("554 5.7.1 Gtube pattern"), \
        finals
    for delivered in upstream.wait_messages(2):
        assert b"X-Rspamd-Action: no action" in delivered.raw
    assert len(re.findall(r"milter %s: a kept connection" % re.escape(rspamd_milter.spec),
                          px.log())) >= 2
