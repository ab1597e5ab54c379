"""The milters operators run, against Postfix's own milter client (Postfix 3.7,
smtpd_milters, protocol 6): what Postfix answers and what it queues when
rspamd, OpenDKIM, clamav-milter and the libmilter test milter (each verdict
and each modification, early refusals, a chain of two) have their say.

`through_postfix()` runs one message (a `Case`) through a Postfix with
milters and gives back an `Outcome`: the reply at each stage, the envelope
and headers as queued, the body.  These are the reference the proxy is held
to: the same messages through proxsmtpd with `Milters:` set must give the
same verdicts and the same headers (the side-by-side tests at the end).
"""

from __future__ import annotations

import dataclasses
import re
import smtplib
import socket

import postfix as throwaway
import pytest
import test_tls

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.slow]
pki = test_tls.pki              # the test CA and certificates, a fixture

SENDER = "sender@example.org"
RECIPIENT = "rcpt@example.net"


@dataclasses.dataclass
class Case:
    """One message: its envelope and the X-Test-Milter lines that script it."""
    id: str
    script: tuple[str, ...] = ()
    sender: str = SENDER
    recipients: tuple[str, ...] = (RECIPIENT,)
    headers: tuple[str, ...] = ()
    body: str = "A body line.\r\nAnother one.\r\n"

    def message(self) -> bytes:
        lines = ["From: Sender <%s>" % SENDER, "To: <%s>" % RECIPIENT,
                 "Subject: milter case %s" % self.id,
                 "Message-ID: <%s@proxsmtpd.test>" % self.id,
                 "Date: Mon, 07 Dec 2026 05:00:00 +0000",
                 *self.headers, *("X-Test-Milter: %s" % line for line in self.script)]
        return ("\r\n".join(lines) + "\r\n\r\n" + self.body).encode()


@dataclasses.dataclass
class Outcome:
    """What an MTA made of a Case: replies per stage as (code, [text lines]),
    and, when it took the message, the envelope, headers and body it kept."""
    replies: dict[str, tuple[int, list[str]]]
    sender: str | None = None
    recipients: list[str] | None = None
    headers: list[tuple[str, str]] | None = None
    body: bytes | None = None
    held: bool = False

    @property
    def final(self) -> tuple[int, list[str]]:
        return list(self.replies.values())[-1]


def parse(content: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """Headers as (name, value with folding kept, LF line ends) and the body."""
    content = content.replace(b"\r\n", b"\n")
    head, _, body = content.partition(b"\n\n")
    headers: list[tuple[str, str]] = []
    for line in head.decode("utf-8", "replace").split("\n"):
        if line[:1] in (" ", "\t") and headers:
            headers[-1] = (headers[-1][0], headers[-1][1] + "\n" + line)
        elif line:
            name, _, value = line.partition(":")
            headers.append((name, value))
    return headers, body


def without_own_received(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Postfix's own Received: header (milters never see it) left out."""
    return [(n, v) for n, v in headers
            if not (n.lower() == "received" and "by postfix.test" in v)]


def added(outcome: Outcome, case: Case) -> list[tuple[str, str]]:
    """The headers the milters added or changed, in the message's order."""
    sent, _ = parse(case.message())
    return [header for header in outcome.headers or [] if header not in sent]


def transact(host: str, port: int, case: Case) -> dict[str, tuple[int, list[str]]]:
    """Send a Case, stopping at the first refusal that ends it; each stage's
    reply (`closed`: the connection was closed instead)."""
    replies: dict[str, tuple[int, list[str]]] = {}

    def note(stage: str, reply: tuple[int, bytes]) -> int:
        replies[stage] = (reply[0], reply[1].decode("utf-8", "replace").split("\n"))
        return reply[0]

    client = smtplib.SMTP(timeout=60)
    try:
        if note("connect", client.connect(host, port)) != 220:
            return replies
        if note("ehlo", client.ehlo("client.example")) != 250:
            return replies
        if note("mail", client.mail(case.sender)) != 250:
            return replies
        taken = [r for r in case.recipients if note("rcpt " + r, client.rcpt(r)) == 250]
        if taken:
            if note("data", client.docmd("DATA")) == 354:
                note("message", data_end(client, case.message()))
        client.rset()
    except smtplib.SMTPServerDisconnected:
        replies["closed"] = (0, [])
    finally:
        client.close()
    return replies


def data_end(client: smtplib.SMTP, message: bytes) -> tuple[int, bytes]:
    """After DATA's 354: the message (CRLF lines, dot-stuffed), the dot, the reply."""
    client.send(re.sub(rb"(?m)^\.", b"..", message) + b".\r\n")
    return client.getreply()


def through_postfix(server: throwaway.PostfixServer, case: Case) -> Outcome:
    """Run a Case through a Postfix with milters; what it answered and queued.
    Postfix's queue is emptied first, so the message found is this Case's."""
    server.clear()
    outcome = Outcome(transact(server.host, server.port, case))
    if outcome.final[0] != 250 or "message" not in outcome.replies:
        return outcome
    queue_id = re.search(r"queued as (\w+)", " ".join(outcome.final[1]))
    entries = [entry for entry in server.queued() if entry["queue_id"] == queue_id.group(1)]
    if not entries:                 # discarded: answered 250, never queued
        return outcome
    [entry] = entries
    outcome.sender = entry["sender"]
    outcome.recipients = sorted(r["address"] for r in entry["recipients"])
    outcome.held = entry["queue_name"] == "hold"
    headers, outcome.body = parse(server.content(entry["queue_id"]))
    outcome.headers = without_own_received(headers)
    return outcome


# --- the libmilter test milter: each verdict and modification -------------------------------

TWO = (RECIPIENT, "second@example.net")
REJECTED = [550, ["5.7.1 Command rejected"]]
TEMPFAILED = [451, ["4.7.1 Service unavailable - try again later"]]

# (case, what Postfix does with it): the reply to the message (or the refused
# command), and what it queued.
CASES = [
    (Case("continue"), {"headers": [("X-Test-Milter-Seen", " test")]}),
    (Case("accept", ("accept",)), {"headers": [("X-Test-Milter-Seen", " test")]}),
    (Case("reject", ("reject",)), {"message": REJECTED}),
    (Case("tempfail", ("tempfail",)), {"message": TEMPFAILED}),
    (Case("replycode", ("replycode 554 5.7.0 Not wanted here",)),
     {"message": [554, ["5.7.0 Not wanted here"]]}),
    (Case("replycode-multiline", ("replycode 550 5.7.1 first line|second line|third",)),
     {"message": [550, ["5.7.1 first line", "5.7.1 second line", "5.7.1 third"]]}),
    (Case("replycode-4xx", ("replycode 452 4.3.1 Come back later",)),
     {"message": [452, ["4.3.1 Come back later"]]}),
    (Case("discard", ("discard",)), {"discarded": True}),
    (Case("quarantine", ("quarantine held for review",)), {"held": True}),
    (Case("addheader", ("addheader X-Added first value",)),
     {"headers": [("X-Test-Milter-Seen", " test"), ("X-Added", " first value")]}),
    (Case("insheader", ("insheader 0 X-Inserted at the top",)),
     {"headers": [("X-Inserted", " at the top"), ("X-Test-Milter-Seen", " test")],
      "first": "X-Inserted"}),
    (Case("chgheader", ("chgheader Subject 1 changed subject",)),
     {"headers": [("Subject", " changed subject"), ("X-Test-Milter-Seen", " test")]}),
    (Case("chgheader-delete", ("chgheader X-Remove-Me 1",), headers=("X-Remove-Me: yes",)),
     {"headers": [("X-Test-Milter-Seen", " test")], "removed": "X-Remove-Me"}),
    (Case("replbody", ("replbody The new body.",)),
     {"headers": [("X-Test-Milter-Seen", " test")], "body": b"The new body.\n"}),
    (Case("chgfrom", ("chgfrom <new-sender@example.org>",)),
     {"sender": "new-sender@example.org"}),
    (Case("addrcpt", ("addrcpt <added@example.net>",)),
     {"recipients": ["added@example.net", RECIPIENT]}),
    (Case("delrcpt", ("delrcpt <second@example.net>",), recipients=TWO),
     {"recipients": [RECIPIENT]}),
    (Case("rcpt-reject", recipients=("reject@example.net", RECIPIENT)),
     {"rcpt reject@example.net": REJECTED, "recipients": [RECIPIENT]}),
    (Case("rcpt-tempfail", recipients=("tempfail@example.net", RECIPIENT)),
     {"rcpt tempfail@example.net": TEMPFAILED, "recipients": [RECIPIENT]}),
    (Case("rcpt-replycode", recipients=("replycode@example.net",)),
     {"rcpt replycode@example.net":
      [550, ["5.1.1 replycode@example.net: no such user here"]]}),
    (Case("mail-reject", sender="reject@example.org"), {"mail": REJECTED}),
]

# SMFIR_DISCARD before the end of the message: Postfix discards the whole
# transaction (smtpd.c's check_milter_reply sets CLEANUP_FLAG_DISCARD, and
# MILTER_SKIP_FLAGS then keeps every later stage of it from every milter);
# the client hears success at each stage and nothing is queued.
DISCARD_STAGES = ("mail", "rcpt", "data", "header", "eoh", "body")


def discard_case(stage: str) -> Case:
    if stage == "mail":
        return Case("discard-mail", sender="discard@example.org")
    if stage == "rcpt":
        return Case("discard-rcpt", recipients=("discard@example.net", RECIPIENT))
    return Case("discard-" + stage, sender="discard-%s@example.org" % stage)


CASES += [(discard_case(stage), {"discarded": True}) for stage in DISCARD_STAGES]
# what the milter is told of a transaction (not ABORT or QUIT, which come
# when each MTA gets to them)
TRANSACTION_EVENTS = ("mail", "rcpt", "data", "header", "eoh", "body", "eom")


def check_postfix(outcome: Outcome, expected: dict) -> None:
    """Postfix's outcome is what the CASES table says."""
    for stage in ("mail", "message") + tuple(k for k in expected if k.startswith("rcpt ")):
        if stage in expected:
            assert list(outcome.replies[stage]) == expected[stage], outcome.replies
    if "message" not in outcome.replies or "message" in expected:
        assert outcome.headers is None
        return
    assert outcome.replies["message"][0] == 250, outcome.replies
    if expected.get("discarded"):
        assert outcome.headers is None, "a discarded message was queued"
        # success at every stage: the client cannot tell
        assert {code for code, _ in outcome.replies.values()} == {220, 250, 354}, \
            outcome.replies
        return
    assert outcome.held == expected.get("held", False)
    assert outcome.sender == expected.get("sender", SENDER)
    if "recipients" in expected:
        assert outcome.recipients == expected["recipients"]
    for header in expected.get("headers", []):
        assert header in outcome.headers, (header, outcome.headers)
    if "first" in expected:
        assert outcome.headers[0][0] == expected["first"], outcome.headers
    if "removed" in expected:
        assert expected["removed"] not in [name for name, _ in outcome.headers]
    if "body" in expected:
        assert outcome.body == expected["body"]


@pytest.fixture(scope="module")
def postfix_test_milter(tmp_path_factory):
    """One Postfix with one test milter, shared by the CASES."""
    import milterpeers
    if not throwaway.available():
        pytest.skip("a throwaway Postfix needs root and Debian's postfix")
    if not milterpeers.has_libmilter():
        pytest.skip("the test milter needs Debian's python3-milter")
    milters = milterpeers.MilterSet()
    server = None
    try:
        milter = milterpeers.start_test_milter(milters, name="test")
        server = throwaway.PostfixServer(milters=[milter.spec])
        yield server, milter
    finally:
        if server is not None:
            server.stop()
        milters.close()


@pytest.mark.parametrize("case,expected", CASES, ids=[case.id for case, _ in CASES])
def test_postfix_with_the_test_milter(postfix_test_milter, case, expected):
    server, _ = postfix_test_milter
    check_postfix(through_postfix(server, case), expected)


def test_postfix_chain_of_two(postfix, test_milter):
    """Each milter of the chain sees what the previous one left; the first
    refusal ends it (the second milter is not asked)."""
    first, second = test_milter(name="first"), test_milter(name="second", noreply=True)
    server = postfix(milters=[first.spec, second.spec])
    outcome = through_postfix(server, Case("chain", ("first: addheader X-From-First yes",)))
    assert outcome.final[0] == 250
    assert added(outcome, Case("chain", ("first: addheader X-From-First yes",))) == [
        ("X-Test-Milter-Seen", " first"), ("X-From-First", " yes"),
        ("X-Test-Milter-Seen", " second")]
    seen_by_second = [(e["name"], e["value"]) for e in second.events() if e["event"] == "header"]
    assert ("X-From-First", "yes") in seen_by_second, \
        "Postfix sends each milter the message as the previous ones left it"
    outcome = through_postfix(server, Case("chain-reject", ("first: reject",)))
    assert list(outcome.final) == REJECTED
    assert [e for e in second.events() if e["event"] == "eom"
            and "first: reject" in e["directives"]] == []


# --- the real milters -------------------------------------------------------------------

def test_postfix_rspamd_refuses_gtube_with_its_reply(postfix, rspamd_milter):
    server = postfix(milters=[rspamd_milter.spec])
    outcome = through_postfix(server, Case("gtube", body=rspamd_milter.gtube + "\r\n"))
    assert list(outcome.final) == [554, ["5.7.1 Gtube pattern"]]


def test_postfix_rspamd_adds_its_headers(postfix, rspamd_milter):
    server = postfix(milters=[rspamd_milter.spec])
    outcome = through_postfix(server, Case("clean"))
    assert outcome.final[0] == 250
    names = {name for name, _ in added(outcome, Case("clean"))}
    assert {"X-Spamd-Result", "X-Rspamd-Server", "X-Rspamd-Queue-Id", "X-Rspamd-Action",
            "X-Spam-Status"} <= names
    assert ("X-Rspamd-Action", " no action") in outcome.headers
    assert "dns req: 0" in rspamd_milter.rspamd_log.read_text(), "rspamd waited on DNS"


def test_postfix_opendkim_signature_verifies(postfix, opendkim_milter):
    server = postfix(milters=[opendkim_milter.spec])
    case = Case("dkim", headers=("X-Folded: one\r\n\ttwo", "X-Leading:   three spaces"))
    outcome = through_postfix(server, case)
    assert outcome.final[0] == 250
    assert outcome.headers[0][0] == "DKIM-Signature"
    assert "d=example.org" in outcome.headers[0][1] and "s=test" in outcome.headers[0][1]
    queued = "".join("%s:%s\n" % header for header in outcome.headers).encode()
    assert opendkim_milter.verify(queued + b"\n" + outcome.body)
    assert not opendkim_milter.verify(queued + b"\n" + outcome.body + b"tampered\n")


def test_postfix_clamav_rejects_the_signature(postfix, clamav_milter):
    server = postfix(milters=[clamav_milter.spec])
    outcome = through_postfix(server, Case("virus", body=clamav_milter.signature + "\r\n"))
    assert list(outcome.final) == [550, ["5.7.1 Infected with %s" % clamav_milter.virus]]
    outcome = through_postfix(server, Case("clean"))
    assert outcome.final[0] == 250
    assert ("X-Virus-Status", " Clean") in outcome.headers


# --- side by side: the same milters, the same messages, through proxsmtpd ---------------------

def through_proxy(proxy, upstream, case: Case) -> Outcome:
    """Run a Case through a running proxsmtpd (OutAddress: `upstream`, a
    RecordingServer); what it answered and what the server got."""
    before = len(upstream.messages)
    outcome = Outcome(transact(proxy.host, proxy.port, case))
    delivered = upstream.messages[before:]
    if delivered:
        [message] = delivered
        outcome.sender = message.sender
        outcome.recipients = sorted(message.recipients)
        # the server's copy ends at the CRLF before the final dot, which it drops
        outcome.headers, outcome.body = parse(message.body + b"\r\n")
    return outcome


def milter_proxy(proxy, upstream, *milters) -> object:
    return proxy({"OutAddress": upstream.address,
                  "Milters": ", ".join(milter.spec for milter in milters)})


def verdicts(outcome: Outcome) -> dict[str, tuple[int, list[str] | None]]:
    """Each stage's reply code, with the text of a refusal (an acceptance's
    text is each MTA's own: Postfix's 250 names its queue id)."""
    return {stage: (code, text if code >= 400 else None)
            for stage, (code, text) in outcome.replies.items()}


def seen_by(milter, since: int) -> list[str]:
    """The transaction's callbacks the test milter had, from event `since`
    to the first transaction's end (the proxy's start-up probe and the
    client's RSET after it make no callbacks of these)."""
    seen = []
    for event in milter.events()[since:]:
        if event["event"] in ("abort", "close") and seen:
            break
        if event["event"] in TRANSACTION_EVENTS:
            seen.append(event["event"])
    return seen


def same_as_postfix(ours: Outcome, postfix: Outcome) -> None:
    """The same verdict at each stage, and what was passed on: envelope,
    headers (names, values, order), body."""
    assert verdicts(ours) == verdicts(postfix)
    assert (ours.sender, ours.recipients) == (postfix.sender, postfix.recipients)
    assert ours.headers == postfix.headers
    assert ours.body == postfix.body


@pytest.mark.parametrize("case,expected", CASES, ids=[case.id for case, _ in CASES])
def test_proxy_as_postfix_with_the_test_milter(postfix_test_milter, proxy, upstream, case,
                                               expected):
    server, milter = postfix_test_milter
    reference_from = len(milter.events())
    reference = through_postfix(server, case)
    px = milter_proxy(proxy, upstream, milter)
    ours_from = len(milter.events())
    ours = through_proxy(px, upstream, case)
    if expected.get("discarded"):
        # the milter heard nothing of the transaction after its discard
        # from either (a discard at the header or body stage: nothing after
        # the discarding header field or chunk)
        assert seen_by(milter, ours_from) == seen_by(milter, reference_from), case.id
    if expected.get("held"):
        # Postfix holds a quarantined message in its queue; a proxy has none,
        # so it answers 451 (proxsmtpd.conf(5), Milters) and passes nothing on
        assert reference.final[0] == 250 and reference.held
        assert list(ours.final) == TEMPFAILED and ours.headers is None
        return
    same_as_postfix(ours, reference)


def test_proxy_as_postfix_with_a_chain_of_two(postfix, test_milter, proxy, upstream):
    first, second = test_milter(name="first"), test_milter(name="second", noreply=True)
    server = postfix(milters=[first.spec, second.spec])
    ours = milter_proxy(proxy, upstream, first, second)
    for case in (Case("chain", ("first: addheader X-From-First yes",
                                "second: chgheader X-From-First 1 changed by second")),
                 Case("chain-reject", ("first: reject", "second: addheader X-Never no")),
                 Case("chain-second", ("second: replycode 550 5.7.1 second says no",))):
        same_as_postfix(through_proxy(ours, upstream, case), through_postfix(server, case))


def test_proxy_as_postfix_with_a_discard_in_a_chain_of_two(postfix, test_milter, proxy,
                                                           upstream):
    """A discard before the end of the message ends the transaction for the
    whole chain: the second milter is not asked at that stage, nor at any
    later one (it never sees a RCPT without its MAIL)."""
    first, second = test_milter(name="first"), test_milter(name="second")
    server = postfix(milters=[first.spec, second.spec])
    ours = milter_proxy(proxy, upstream, first, second)
    for stage in DISCARD_STAGES:
        case = discard_case(stage)
        since = len(first.events()), len(second.events())
        reference = through_postfix(server, case)
        middle = len(first.events()), len(second.events())
        outcome = through_proxy(ours, upstream, case)
        assert verdicts(outcome) == verdicts(reference), stage
        assert outcome.headers is None and reference.headers is None
        for milter, start, between in zip((first, second), since, middle):
            assert seen_by(milter, between) == seen_by(milter, start), (stage, milter.name)
    assert upstream.messages == []


# The client's macros the proxy sends at connect besides Postfix's defaults
# (milter_connect_macros): Postfix is asked for them too, to compare values.
CONNECT_MACROS = "j {daemon_name} {daemon_addr} v _ {client_addr} {client_name} {client_port}"
CALLBACKS = ("connect", "helo", "mail", "rcpt", "data", "header", "eoh", "body", "eom")


def macros_seen(milter, since: int) -> list[tuple[str, object, dict[str, str]]]:
    """(callback, its arguments, the macros libmilter had for it) from event `since`."""
    seen = []
    for event in milter.events()[since:]:
        if event["event"] not in CALLBACKS:
            continue
        arguments = {key: value for key, value in event.items()
                     if key not in ("event", "macros", "milter", "pid")}
        if event["event"] == "connect":     # (the client's port: each connection's own)
            arguments["hostaddr"] = arguments["hostaddr"][0]
        seen.append((event["event"], arguments, dict(event["macros"])))
    return seen


def without_differences(seen: list[tuple[str, object, dict[str, str]]], mta: str) -> list:
    """The documented differences (proxsmtpd(8) MILTERS, Macros) checked and
    taken out: `v` names each MTA; `i` is Postfix's queue id, which it has
    only once its queue file is open (after the first accepted RCPT's milter
    stage: smtpd_delay_open_until_valid_rcpt), and the proxy's session id
    from MAIL on; {client_port} is each connection's own."""
    kept = []
    for callback, arguments, macros in seen:
        assert macros.pop("v").startswith(mta + " "), macros
        assert macros.pop("{client_port}").isdigit()
        queue_id = macros.pop("i", None)
        if callback in ("data", "eoh", "eom") or (mta == "proxsmtpd" and callback != "connect"
                                                 and callback != "helo"):
            assert queue_id, (mta, callback)
        kept.append((callback, arguments, macros))
    return kept


def test_proxy_sends_the_macros_postfix_sends(postfix, test_milter, proxy, upstream):
    """The same milter records every macro each MTA sends for the same client
    and messages (Postfix with its default milter_*_macros, its own name the
    proxy's, and no relayhost, so that {mail_host} and {rcpt_host} are the
    domains): the same values, but for the documented differences."""
    milter = test_milter(name="macros")
    hostname = socket.getfqdn()
    server = postfix(milters=[milter.spec], relayhost="", myhostname=hostname,
                     milter_connect_macros=CONNECT_MACROS)
    ours = milter_proxy(proxy, upstream, milter)
    cases = [Case("macros", recipients=(RECIPIENT, "Second@Example.NET")),
             Case("null-sender", sender="")]
    seen = {}
    for mta, run in (("Postfix", lambda case: through_postfix(server, case)),
                     ("proxsmtpd", lambda case: through_proxy(ours, upstream, case))):
        since = len(milter.events())
        for case in cases:
            assert run(case).final[0] == 250
        seen[mta] = without_differences(macros_seen(milter, since), mta)
    assert seen["proxsmtpd"] == seen["Postfix"]
    connect = seen["Postfix"][0][2]
    assert connect["{client_name}"] == "unknown" and connect["_"] == "unknown [127.0.0.1]"
    assert connect["j"] == connect["{daemon_name}"] == hostname
    rcpts = [macros for callback, _, macros in seen["Postfix"] if callback == "rcpt"]
    assert [(m["{rcpt_addr}"], m["{rcpt_host}"]) for m in rcpts] == [
        (RECIPIENT, "example.net"), ("second@example.net", "Example.NET"),
        (RECIPIENT, "example.net")]
    mails = [macros for callback, _, macros in seen["Postfix"] if callback == "mail"]
    assert [(m["{mail_addr}"], m["{mail_host}"]) for m in mails] == [
        (SENDER, "example.org"), ("", hostname)]


TLS_MACROS = ("{tls_version}", "{cipher}", "{cipher_bits}", "{cert_subject}", "{cert_issuer}")


@pytest.mark.parametrize("implicit", [True, False], ids=["tlswrapper", "starttls"])
def test_proxy_sends_the_tls_macros_postfix_sends(postfix, test_milter, proxy, upstream, pki,
                                                  implicit):
    """The same TLS client through Postfix (smtpd_tls_wrappermode, or
    STARTTLS) and through the proxy (TLSWrapper, or STARTTLS): the HELO
    stage's TLS macros, as the client saw its TLS, alike from both."""
    milter = test_milter(name="tls")
    wrapper = {"smtpd_tls_wrappermode": "yes"} if implicit else {}
    server = postfix(milters=[milter.spec], tls=(str(pki.proxy.chain), str(pki.proxy.key)),
                     **wrapper)
    ours = proxy({"OutAddress": upstream.address, "Milters": milter.spec,
                  "TLSWrapper": "on" if implicit else "off", **test_tls.tls_settings(pki)})
    context = test_tls.client_context(pki)
    seen = {}
    for mta, host, port in (("Postfix", server.host, server.port),
                            ("proxsmtpd", ours.host, ours.port)):
        since = len(milter.events())
        smtp = (smtplib.SMTP_SSL(host, port, context=context, timeout=30) if implicit
                else smtplib.SMTP(host, port, timeout=30))
        with smtp:
            if not implicit:
                smtp.ehlo("client.example")
                smtp.starttls(context=context)
            smtp.ehlo("client.example")
            version, cipher, bits = smtp.sock.version(), *smtp.sock.cipher()[::2]
            smtp.sendmail(SENDER, [RECIPIENT], Case("tls").message())
        helo = [event["macros"] for event in milter.events()[since:]
                if event["event"] == "helo"][-1]
        seen[mta] = {name: helo[name] for name in TLS_MACROS if name in helo}
        assert seen[mta] == {"{tls_version}": version, "{cipher}": cipher,
                             "{cipher_bits}": str(bits)}, mta
    assert seen["proxsmtpd"] == seen["Postfix"]


def test_proxy_as_postfix_with_rspamd(postfix, rspamd_milter, proxy, upstream):
    server = postfix(milters=[rspamd_milter.spec])
    ours = milter_proxy(proxy, upstream, rspamd_milter)
    gtube = Case("gtube", body=rspamd_milter.gtube + "\r\n")
    assert verdicts(through_proxy(ours, upstream, gtube)) == \
        verdicts(through_postfix(server, gtube))
    reference, outcome = through_postfix(server, Case("clean")), through_proxy(ours, upstream,
                                                                                Case("clean"))
    assert outcome.final[0] == reference.final[0] == 250
    # the same headers; their values name the queue id and the symbols that
    # hit, which differ (Postfix's queue id, its Received header)
    assert [n for n, _ in added(outcome, Case("clean"))] == \
        [n for n, _ in added(reference, Case("clean"))]
    for name in ("X-Rspamd-Action", "X-Spam-Status", "X-Rspamd-Server"):
        assert dict(outcome.headers)[name] == dict(reference.headers)[name]


def test_proxy_as_postfix_with_opendkim(postfix, opendkim_milter, proxy, upstream):
    server = postfix(milters=[opendkim_milter.spec])
    ours = milter_proxy(proxy, upstream, opendkim_milter)
    case = Case("dkim", headers=("X-Folded: one\r\n\ttwo", "X-Leading:   three spaces"))
    reference, outcome = through_postfix(server, case), through_proxy(ours, upstream, case)
    assert [n for n, _ in added(outcome, case)] == [n for n, _ in added(reference, case)] \
        == ["DKIM-Signature"]
    delivered = "".join("%s:%s\n" % header for header in outcome.headers).encode()
    assert opendkim_milter.verify(delivered + b"\n" + outcome.body)


def test_proxy_as_postfix_with_clamav(postfix, clamav_milter, proxy, upstream):
    server = postfix(milters=[clamav_milter.spec])
    ours = milter_proxy(proxy, upstream, clamav_milter)
    virus = Case("virus", body=clamav_milter.signature + "\r\n")
    assert verdicts(through_proxy(ours, upstream, virus)) == \
        verdicts(through_postfix(server, virus))
    reference, outcome = through_postfix(server, Case("clean")), through_proxy(ours, upstream,
                                                                                Case("clean"))
    assert added(outcome, Case("clean")) == added(reference, Case("clean"))


BROKEN = [("down", "optneg"), ("garbage", "optneg"), ("close", "mail"), ("slow", "mail")]


@pytest.mark.parametrize("action", ["tempfail", "accept", "reject"])
@pytest.mark.parametrize("mode,stage", BROKEN, ids=["%s-%s" % item for item in BROKEN])
def test_proxy_as_postfix_with_a_broken_milter(postfix, bad_milter, proxy, upstream, mode,
                                               stage, action):
    """A milter down, speaking garbage, closing, or too slow: Postfix's
    milter_default_action and our MilterDefaultAction decide alike (the
    same timeouts: 2 s a step, 10 x that for the message, as ours)."""
    milter = bad_milter(mode, stage=stage, delay=4.0)
    server = postfix(milters=[milter.spec], milter_default_action=action,
                     milter_connect_timeout="2s", milter_command_timeout="2s",
                     milter_content_timeout="20s")
    ours = proxy({"OutAddress": upstream.address, "Milters": milter.spec,
                  "MilterDefaultAction": action, "MilterTimeout": 2})
    reference, outcome = through_postfix(server, Case(mode)), through_proxy(ours, upstream,
                                                                           Case(mode))
    codes = {stage: code for stage, (code, _) in reference.replies.items()}
    if action == "tempfail" and stage == "optneg":
        # Postfix greets and refuses at MAIL (smtpd_delay_reject); the proxy
        # refuses at once, before it connects the server (proxsmtpd(8))
        assert codes == {"connect": 220, "ehlo": 250, "mail": 451}
        assert list(outcome.replies) == ["connect"]
        assert outcome.replies["connect"] == (421, reference.replies["mail"][1])
        return
    assert {stage: code for stage, (code, _) in outcome.replies.items()} == codes
    # Postfix's words, but at connect, where it refuses with its greeting's
    refusals = {stage: reply for stage, reply in reference.replies.items()
                if reply[0] >= 400 and stage != "connect"}
    assert {stage: outcome.replies[stage] for stage in refusals} == refusals
    if action == "tempfail":
        assert outcome.final == reference.final
    assert upstream.messages == [] or action == "accept"
