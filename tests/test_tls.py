"""TLS on both legs (TLS in proxsmtpd(8); RFC 3207), with real peers: smtplib
(starttls, SMTP_SSL), swaks --tls, openssl s_client -starttls smtp, aiosmtpd with a TLS context,
and RecordingServer upgrading (or refusing, or injecting behind its 220).
Certificates come from a throwaway CA made by `trustme` for each test module.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import time

import pytest
import trustme
from harness import Client, RecordingServer, free_port, run_proxsmtpd, wait_until, write_config
from hypothesis import given, settings
from hypothesis import strategies as st

from proxsmtp.process import config as configuration
from proxsmtp.session.replyqueue import ServerAnswers
from proxsmtp.session.session import Session
from proxsmtp.smtp.syntax import ehlo_offers

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BODY = b"From: a@x.test\r\nTo: b@y.test\r\nSubject: tls\r\n\r\nover TLS\r\n"


# --- certificates and contexts --------------------------------------------------------------

class Identity:
    """A certificate (chain and key) as files, for the proxy or a peer."""

    def __init__(self, ca: trustme.CA, directory, name: str, *hosts: str) -> None:
        self.cert = ca.issue_cert(*hosts)
        self.chain = directory / ("%s.pem" % name)
        self.key = directory / ("%s.key" % name)
        self.write(self.chain, self.key)

    def write(self, chain, key) -> None:
        chain.write_bytes(b"".join(blob.bytes() for blob in self.cert.cert_chain_pems))
        self.cert.private_key_pem.write_to_path(str(key))

    @property
    def der(self) -> bytes:
        return ssl.PEM_cert_to_DER_cert(self.cert.cert_chain_pems[0].bytes().decode())

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.cert.configure_cert(context)
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, its file, and certificates for the proxy and the upstream servers."""
    directory = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))

    class PKI:
        pass
    pki = PKI()
    pki.ca, pki.ca_file, pki.dir = ca, ca_file, directory
    pki.proxy = Identity(ca, directory, "proxy", "proxy.test", "127.0.0.1")
    pki.upstream = Identity(ca, directory, "upstream", "localhost", "127.0.0.1")
    pki.other_name = Identity(ca, directory, "other", "other.test")
    stranger = trustme.CA()
    pki.stranger = Identity(stranger, directory, "stranger", "localhost", "127.0.0.1")
    return pki


def client_context(pki) -> ssl.SSLContext:
    context = ssl.create_default_context()
    pki.ca.configure_trust(context)
    return context


def tls_settings(pki, **more) -> dict:
    settings = {"TLSCertificate": pki.proxy.chain, "TLSKey": pki.proxy.key}
    settings.update(more)
    return settings


def starttls(client: Client, pki, hostname: str = "proxy.test") -> ssl.SSLSocket:
    """STARTTLS on a raw Client; afterwards it speaks through TLS."""
    assert client.cmd("STARTTLS")[0].startswith("220")
    client.sock = client_context(pki).wrap_socket(client.sock, server_hostname=hostname)
    client.file = client.sock.makefile("rb")
    return client.sock


def tls_of(upstream: RecordingServer, message) -> str | None:
    """The TLS of the upstream connection a message came in on (the proxy's
    readiness probe makes a connection of its own, so not simply the first)."""
    return upstream.connections[message.conn].tls


def tls_upstream(make_upstream, pki, identity=None, **kwargs) -> RecordingServer:
    extensions = kwargs.pop("extensions", ("STARTTLS", "SIZE 10240000", "8BITMIME"))
    return make_upstream(extensions=extensions,
                         tls=(identity or pki.upstream).server_context(), **kwargs)


def env_filter(tmp_path) -> tuple[str, object]:
    """A pipe filter that passes the message and records its TLS environment."""
    out = tmp_path / "env.txt"
    return ('printf "%%s|%%s\\n" "$CLIENT_TLS" "$SERVER_TLS" >>%s; cat' % out), out


# --- the client leg ---------------------------------------------------------------------------

def test_client_starttls_with_smtplib(proxy, upstream, pki, tmp_path):
    command, out = env_filter(tmp_path)
    p = proxy({"OutAddress": upstream.address, "FilterCommand": command, **tls_settings(pki)})
    with p.smtp() as smtp:
        smtp.ehlo("client.example")
        assert smtp.has_extn("starttls")
        code, _ = smtp.starttls(context=client_context(pki))
        assert code == 220
        smtp.ehlo("client.example")
        assert not smtp.has_extn("starttls")     # offered once
        version = smtp.sock.version()
        smtp.sendmail("a@x.test", ["b@y.test"], BODY)
        smtp.quit()
    message = upstream.wait_messages(1)[0]
    assert message.raw.endswith(b"over TLS")
    client_tls, server_tls = out.read_text().strip().split("|")
    assert client_tls.startswith(version + " ") and len(client_tls.split()) == 2
    assert server_tls == ""                       # the upstream offers no STARTTLS
    p.wait_log(r"client_tls=%s/\S+, server_tls=none, status=FILTERED$" % version.replace(".", r"\."))
    # the server saw the client's EHLO before and after; STARTTLS never went there
    assert upstream.verbs() == ["EHLO", "EHLO", "MAIL", "RCPT", "DATA", "QUIT"]


def test_client_tls_off_without_certificate_and_when_off(proxy, upstream, pki):
    for extra in ({}, tls_settings(pki, ClientTLS="off")):
        p = proxy({"OutAddress": upstream.address, **extra})
        with p.connect() as client:
            assert "250-STARTTLS" not in client.cmd("EHLO client.example")
            assert client.cmd("STARTTLS") == ["502 Command not implemented"]
        p.stop()


def test_client_tls_encrypt_refuses_mail_before_starttls(proxy, upstream, pki):
    p = proxy({"OutAddress": upstream.address, **tls_settings(pki, ClientTLS="encrypt")})
    with p.connect() as client:
        reply = client.cmd("EHLO client.example")
        assert "250-STARTTLS" in reply or reply[-1] == "250 STARTTLS"
        assert client.cmd("MAIL FROM:<a@x.test>") == ["530 5.7.0 Must issue a STARTTLS command first"]
        assert client.cmd("AUTH PLAIN AGFAYg==")[0].startswith("530")
        assert client.cmd("NOOP")[0].startswith("250")
        starttls(client, pki)
        assert client.cmd("EHLO client.example")[-1].startswith("250")
        assert client.cmd("MAIL FROM:<a@x.test>")[0].startswith("250")
        assert client.cmd("STARTTLS") == ["503 5.5.1 Error: TLS already active"]
        client.cmd("QUIT")
    assert "MAIL FROM:<a@x.test>" in upstream.commands()
    assert not any(line.startswith("AUTH") for line in upstream.commands())


def test_single_line_ehlo_reply_gets_starttls_well_formed(proxy, make_upstream, pki):
    upstream = make_upstream(replies={"EHLO": "250 upstream.test"})
    p = proxy({"OutAddress": upstream.address, **tls_settings(pki)})
    with p.connect() as client:
        assert client.cmd("EHLO client.example") == ["250-upstream.test", "250 STARTTLS"]


def test_starttls_resets_the_session(proxy, upstream, pki):
    """RFC 3207 4.2: after TLS the client starts over; STARTTLS with parameters,
    inside a transaction or after AUTH is refused."""
    p = proxy({"OutAddress": upstream.address, **tls_settings(pki)})
    with p.connect() as client:
        client.cmd("EHLO client.example")
        assert client.cmd("STARTTLS now") == ["501 5.5.4 Syntax: STARTTLS"]
        assert client.cmd("MAIL FROM:<a@x.test>")[0].startswith("250")
        assert client.cmd("STARTTLS") == ["503 5.5.1 Error: MAIL transaction in progress"]
        assert client.cmd("RSET")[0].startswith("250")
        starttls(client, pki)
        client.cmd("EHLO again.example")
        assert client.cmd("AUTH PLAIN AGFAYg==")[0].startswith("235")
        assert client.cmd("STARTTLS") == ["503 5.5.1 Error: TLS already active"]
        client.cmd("QUIT")
    assert upstream.commands()[-3:] == ["EHLO again.example", "AUTH PLAIN AGFAYg==", "QUIT"]
    with p.connect() as client:         # after a successful AUTH in plaintext: refused
        client.cmd("EHLO client.example")
        assert client.cmd("AUTH PLAIN AGFAYg==")[0].startswith("235")
        assert client.cmd("STARTTLS") == ["503 5.5.1 Error: already authenticated"]


def test_pipelined_starttls_gets_earlier_replies_first(proxy, upstream, pki):
    p = proxy({"OutAddress": upstream.address, **tls_settings(pki)})
    with p.connect() as client:
        client.cmd("EHLO client.example")
        client.send(b"NOOP\r\nXCLIENT ADDR=1.2.3.4\r\nSTARTTLS\r\n")
        assert [client.reply()[0][:3] for _ in range(3)] == ["250", "554", "220"]
        client.sock = client_context(pki).wrap_socket(client.sock, server_hostname="proxy.test")
        client.file = client.sock.makefile("rb")
        assert client.cmd("NOOP")[0].startswith("250")


def test_client_injection_behind_starttls_is_never_run_inside_tls(proxy, upstream, pki):
    """Plaintext in the same packet as STARTTLS (CVE-2011-0411) is dropped:
    neither relayed nor answered inside TLS."""
    p = proxy({"OutAddress": upstream.address, **tls_settings(pki)})
    with p.connect() as client:
        client.cmd("EHLO client.example")
        injected = b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\n"
        client.send(b"STARTTLS\r\n" + injected)
        assert client.line() == b"220 2.0.0 Ready to start TLS\r\n"
        client.sock = client_context(pki).wrap_socket(client.sock, server_hostname="proxy.test")
        client.file = client.sock.makefile("rb")
        # the first reply inside TLS is to our own command, not to the injected ones
        assert client.cmd("NOOP")[0].startswith("250")
        client.cmd("EHLO client.example")
        client.cmd("QUIT")
    upstream.wait_command("QUIT")
    assert not any("evil" in line or "victim" in line for line in upstream.commands())
    p.wait_log("discarded %d bytes the client sent in plaintext behind STARTTLS" % len(injected))


def test_tls_wrapper_with_smtp_ssl(proxy, upstream, pki, tmp_path):
    command, out = env_filter(tmp_path)
    p = proxy({"OutAddress": upstream.address, "TLSWrapper": "on", "FilterCommand": command,
               **tls_settings(pki)})
    with smtplib.SMTP_SSL(p.host, p.port, context=client_context(pki), timeout=20) as smtp:
        smtp.ehlo("client.example")
        assert not smtp.has_extn("starttls")
        smtp.sendmail("a@x.test", ["b@y.test"], BODY)
    upstream.wait_messages(1)
    assert out.read_text().startswith("TLSv1.")


def test_swaks_tls(proxy, upstream, pki):
    if not shutil.which("swaks"):
        pytest.skip("swaks not installed")
    p = proxy({"OutAddress": upstream.address, **tls_settings(pki)})
    ran = subprocess.run(["swaks", "--server", "%s:%d" % p.address, "--tls", "--tls-verify",
                          "--tls-ca-path", str(pki.ca_file), "--tls-sni", "proxy.test",
                          "--from", "a@x.test", "--to", "b@y.test", "--helo", "swaks.test"],
                         capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "TLS started" in ran.stdout
    upstream.wait_messages(1)


def test_openssl_s_client_starttls(proxy, upstream, pki):
    if not shutil.which("openssl"):
        pytest.skip("openssl not installed")
    p = proxy({"OutAddress": upstream.address, **tls_settings(pki)})
    proc = subprocess.Popen(["openssl", "s_client", "-starttls", "smtp", "-crlf", "-quiet",
                             "-connect", "%s:%d" % p.address, "-CAfile", str(pki.ca_file),
                             "-verify_return_error", "-servername", "proxy.test"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = bytearray()

    def say(line: bytes, want: bytes) -> None:
        """One line to s_client, then wait for the reply `want` (a final line)."""
        del seen[:]
        proc.stdin.write(line + b"\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 20
        while not re.search(rb"(^|\n)%s [^\n]*\n" % want, bytes(seen)):
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, "no %r from s_client: %r" % (want, bytes(seen))
            chunk = os.read(proc.stdout.fileno(), 4096)
            assert chunk, "s_client ended: %r" % bytes(seen)
            seen.extend(chunk)
    try:
        say(b"EHLO s-client.test", b"250")
        say(b"MAIL FROM:<a@x.test>", b"250")
        say(b"RCPT TO:<b@y.test>", b"250")
        say(b"DATA", b"354")
        say(b"Subject: s_client\n\nvia openssl\n.", b"250")
        say(b"QUIT", b"221")
        assert b"via openssl" in upstream.wait_messages(1)[0].raw
    finally:
        proc.stdin.close()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


# --- the server leg ---------------------------------------------------------------------------

def test_server_tls_may_upgrades_before_the_client_sees_ehlo(proxy, make_upstream, pki, tmp_path):
    upstream = tls_upstream(make_upstream, pki)
    command, out = env_filter(tmp_path)
    p = proxy({"OutAddress": upstream.address, "FilterCommand": command})
    with p.connect() as client:
        reply = client.cmd("EHLO client.example")
        assert reply == ["250-upstream.test", "250-SIZE 10240000", "250 8BITMIME"]
        client.cmd("MAIL FROM:<a@x.test>")
        client.cmd("RCPT TO:<b@y.test>")
        client.cmd("DATA")
        client.send(BODY + b".\r\n")
        assert client.reply()[0].startswith("250")
        client.cmd("QUIT")
    message = upstream.wait_messages(1)[0]
    assert tls_of(upstream, message).startswith("TLSv1.")
    assert upstream.commands(message.conn) == [
        "EHLO client.example", "STARTTLS", "EHLO client.example",
        "MAIL FROM:<a@x.test>", "RCPT TO:<b@y.test>", "DATA", "QUIT"]
    client_tls, server_tls = out.read_text().strip().split("|")
    assert client_tls == "" and server_tls == tls_of(upstream, message)
    p.wait_log(r"client_tls=none, server_tls=TLSv1\.\d/\S+, status=FILTERED$")


PLAIN = "AUTH PLAIN AGFsaWNlAHNlY3JldA=="       # alice / secret


def tls_only_auth_upstream(make_upstream, pki) -> RecordingServer:
    """A server that offers and takes AUTH only inside TLS, as Postfix with
    smtpd_tls_auth_only = yes; the old `AUTH=` form last in its reply."""
    def ehlo(line, conn):
        keywords = ["STARTTLS", "8BITMIME"] + (["AUTH PLAIN LOGIN", "AUTH=PLAIN LOGIN"]
                                               if conn.tls else [])
        lines = ["250-upstream.test"] + ["250-" + word for word in keywords]
        return "\r\n".join(lines[:-1] + ["250 " + lines[-1][4:]])

    def auth(line, conn):
        return ("235 2.7.0 Authentication successful" if conn.tls
                else "503 5.5.1 Error: authentication not enabled")
    return tls_upstream(make_upstream, pki, replies={"EHLO": ehlo, "AUTH": auth})


def auth_keywords(reply: list[str]) -> list[str]:
    return [line[4:] for line in reply[1:] if line[4:].upper().startswith("AUTH")]


@pytest.mark.parametrize("client_tls", ["off", "may"])
def test_server_auth_under_tls_never_offered_to_a_plaintext_client(proxy, make_upstream, pki,
                                                                  client_tls):
    """ServerTLS may upgrades the server leg: the server's AUTH offer (made
    only under TLS) is not shown to a client in plaintext, whose AUTH is
    answered 538 and never reaches the server; after the client's own
    STARTTLS the offer and the AUTH pass."""
    upstream = tls_only_auth_upstream(make_upstream, pki)
    p = proxy({"OutAddress": upstream.address, **tls_settings(pki, ClientTLS=client_tls)})
    with p.connect() as client:
        reply = client.cmd("EHLO client.example")
        assert reply[-1].startswith("250 ") and all(line.startswith("250-") for line in reply[:-1])
        assert auth_keywords(reply) == [], reply
        assert client.cmd(PLAIN) == [
            "538 5.7.11 Encryption required for requested authentication mechanism"]
        assert client.cmd("AUTH LOGIN")[0].startswith("538 5.7.11 ")
        assert client.code("NOOP") == 250
        if client_tls == "may":
            starttls(client, pki)
            reply = client.cmd("EHLO client.example")
            assert auth_keywords(reply) == ["AUTH PLAIN LOGIN", "AUTH=PLAIN LOGIN"], reply
            assert client.cmd(PLAIN) == ["235 2.7.0 Authentication successful"]
        assert client.code("QUIT") == 221
    conn = upstream.wait_closed("EHLO client.example")
    assert conn.tls
    auths = [line for line in upstream.commands(conn.number) if line.upper().startswith("AUTH")]
    assert auths == ([PLAIN] if client_tls == "may" else [])
    p.wait_log(r"refused AUTH from a client in plaintext")


@pytest.mark.root
def test_postfix_tls_only_auth_never_sees_cleartext_credentials(proxy, postfix, pki):
    """A real Postfix with smtpd_tls_auth_only = yes behind ServerTLS may: the
    proxy's leg is TLS, so Postfix offers AUTH there; a client in plaintext
    does not see it, its AUTH PLAIN gets 538 and Postfix never hears of it.
    After the client's STARTTLS the offer shows and AUTH reaches Postfix
    (which has no account, so it refuses and logs the attempt)."""
    import postfix as throwaway
    if not throwaway.available(sasl=True):
        pytest.skip("Postfix cannot offer AUTH here (libsasl2-modules)")
    server = postfix(tls=(str(pki.upstream.chain), str(pki.upstream.key)), sasl=True)
    p = proxy({"OutAddress": server.address, **tls_settings(pki)})
    with p.connect() as client:
        reply = client.cmd("EHLO client.example")
        assert reply[-1].startswith("250 ") and "250-STARTTLS" in reply, reply
        assert auth_keywords(reply) == [], reply
        assert client.cmd(PLAIN) == [
            "538 5.7.11 Encryption required for requested authentication mechanism"]
        assert client.code("NOOP") == 250
        starttls(client, pki)
        reply = client.cmd("EHLO client.example")
        assert [word.split()[0] for word in auth_keywords(reply)] == ["AUTH"], reply
        assert client.code(PLAIN) in (454, 535)     # reached Postfix, which has no account
        assert client.code("QUIT") == 221
    p.wait_log(r"refused AUTH from a client in plaintext")
    # one session (the fixture's own probe before it said only QUIT): the
    # proxy's EHLO, STARTTLS, the client's two EHLOs (before and after its
    # own STARTTLS), and only the AUTH sent after it
    wait_until(lambda: " noop=1 quit=1 " in server.log(), what="the session's end in Postfix's log")
    log = server.log()
    assert len(re.findall(r"SASL PLAIN authentication failed", log)) == 1, log
    assert re.search(r"disconnect from .* ehlo=3 starttls=1 auth=0/1 noop=1 quit=1 ", log), log


def test_auth_offer_kept_when_both_legs_are_plaintext(proxy, make_upstream):
    """Without TLS to the server the proxy decides nothing about AUTH: the
    server's offer and its answer pass as before."""
    upstream = make_upstream(extensions=("8BITMIME", "AUTH PLAIN"),
                             replies={"AUTH": "235 2.7.0 Authentication successful"})
    p = proxy({"OutAddress": upstream.address})
    with p.connect() as client:
        assert auth_keywords(client.cmd("EHLO client.example")) == ["AUTH PLAIN"]
        assert client.cmd(PLAIN) == ["235 2.7.0 Authentication successful"]
    upstream.wait_command("AUTH")


def test_server_tls_may_refused_goes_on_in_plaintext(proxy, make_upstream):
    """The relay of test_hostile: STARTTLS advertised, answered 502."""
    upstream = make_upstream(extensions=("8BITMIME", "STARTTLS"))
    p = proxy({"OutAddress": upstream.address})
    with p.smtp() as smtp:
        smtp.ehlo("client.example")
        assert not smtp.has_extn("starttls")
        smtp.sendmail("a@x.test", ["b@y.test"], BODY)
    message = upstream.wait_messages(1)[0]
    assert [line.upper() for line in upstream.commands(message.conn)[:3]] == [
        "EHLO CLIENT.EXAMPLE", "STARTTLS", "MAIL FROM:<A@X.TEST>"]
    assert tls_of(upstream, message) is None
    assert "ServerTLS" not in p.log() and "again in plaintext" not in p.log()


def test_server_tls_may_failed_handshake_reconnects_in_plaintext(proxy, make_upstream):
    """A server that says 220 to STARTTLS and then talks plaintext: the
    handshake fails, the proxy connects again and the mail still goes."""
    upstream = make_upstream(extensions=("STARTTLS", "8BITMIME"),
                             replies={"STARTTLS": "220 2.0.0 go ahead"})
    p = proxy({"OutAddress": upstream.address})
    with p.connect() as client:
        assert client.cmd("EHLO client.example")[-1] == "250 8BITMIME"
        client.cmd("MAIL FROM:<a@x.test>")
        client.cmd("RCPT TO:<b@y.test>")
        client.cmd("DATA")
        client.send(BODY + b".\r\n")
        assert client.reply()[0].startswith("250")
    message = upstream.wait_messages(1)[0]
    tried = upstream.connection_with("STARTTLS")
    assert tried.number != message.conn and tried.number == message.conn - 1
    assert upstream.commands(message.conn)[0] == "EHLO client.example"
    assert "STARTTLS" not in upstream.commands(message.conn)
    p.wait_log(r"TLS handshake with the server failed: .*; connecting to the server again in plaintext")


def test_server_injection_behind_220_is_never_read_as_a_reply(proxy, make_upstream, pki):
    """Bytes behind the server's 220 to STARTTLS: under may the proxy starts
    over in plaintext (they are never taken as the EHLO reply inside TLS);
    under encrypt no mail goes at all."""
    injected = b"250-upstream.test\r\n250 AUTH PLAIN INJECTED\r\n"
    upstream = tls_upstream(make_upstream, pki, after_220=injected)
    p = proxy({"OutAddress": upstream.address})
    with p.connect() as client:
        reply = client.cmd("EHLO client.example")
        assert not any("INJECTED" in line for line in reply), reply
        assert send_after_ehlo(client)[0].startswith("250")
    message = upstream.wait_messages(1)[0]
    assert upstream.connection_with("STARTTLS").number == message.conn - 1
    assert tls_of(upstream, message) is None
    p.wait_log(r"the server sent %d bytes behind its 220 to STARTTLS" % len(injected))
    p.stop()
    for policy in ("encrypt", "verify"):
        p = proxy({"OutAddress": upstream.address, "ServerTLS": policy, "TLSCAFile": pki.ca_file})
        with p.connect() as client:
            assert client.cmd("EHLO client.example") == [
                "421 4.7.0 TLS to the server failed, try again later"]
            assert client.closed_by_peer()
        p.stop()
    assert len(upstream.messages) == 1


def send_after_ehlo(client: Client) -> list[str]:
    assert client.cmd("MAIL FROM:<a@x.test>")[0].startswith("250")
    assert client.cmd("RCPT TO:<b@y.test>")[0].startswith("250")
    assert client.cmd("DATA")[0].startswith("354")
    client.send(BODY + b".\r\n")
    return client.reply()


@pytest.mark.parametrize("policy", ["encrypt", "verify"])
def test_server_tls_required_but_not_offered_means_no_mail(proxy, upstream, pki, policy):
    p = proxy({"OutAddress": upstream.address, "ServerTLS": policy})
    with p.connect() as client:
        assert client.cmd("EHLO client.example")[0].startswith("421 4.7.0")
    with p.connect() as client:          # no EHLO at all: MAIL still gets no plaintext server
        assert client.cmd("MAIL FROM:<a@x.test>") == [
            "451 4.7.0 TLS to the server is required and not established"]
        client.cmd("QUIT")
    upstream.wait_command("QUIT")
    assert "MAIL FROM:<a@x.test>" not in upstream.commands()
    p.wait_log("no TLS to the server \\(ServerTLS %s\\): the server offers no STARTTLS" % policy)


def test_server_tls_off_never_sends_starttls(proxy, make_upstream, pki):
    upstream = tls_upstream(make_upstream, pki)
    p = proxy({"OutAddress": upstream.address, "ServerTLS": "off"})
    with p.connect() as client:
        client.cmd("EHLO client.example")
        assert send_after_ehlo(client)[0].startswith("250")
    message = upstream.wait_messages(1)[0]
    assert "STARTTLS" not in upstream.commands() and tls_of(upstream, message) is None


def test_server_tls_encrypt_accepts_any_certificate(proxy, make_upstream, pki):
    upstream = tls_upstream(make_upstream, pki, identity=pki.stranger)
    p = proxy({"OutAddress": upstream.address, "ServerTLS": "encrypt"})
    with p.connect() as client:
        client.cmd("EHLO client.example")
        assert send_after_ehlo(client)[0].startswith("250")
    assert tls_of(upstream, upstream.wait_messages(1)[0])


@pytest.mark.parametrize("out", ["127.0.0.1", "localhost"])
def test_server_tls_verify_success(proxy, make_upstream, pki, out):
    upstream = tls_upstream(make_upstream, pki)
    p = proxy({"OutAddress": "%s:%d" % (out, upstream.port), "ServerTLS": "verify",
               "TLSCAFile": pki.ca_file})
    with p.connect() as client:
        client.cmd("EHLO client.example")
        assert send_after_ehlo(client)[0].startswith("250")
    assert tls_of(upstream, upstream.wait_messages(1)[0])


@pytest.mark.parametrize("identity", ["stranger", "other_name"])
def test_server_tls_verify_failure_means_no_mail(proxy, make_upstream, pki, identity):
    """A certificate from another CA, or for another name: 421, nothing sent."""
    upstream = tls_upstream(make_upstream, pki, identity=getattr(pki, identity))
    p = proxy({"OutAddress": upstream.address, "ServerTLS": "verify", "TLSCAFile": pki.ca_file})
    with p.connect() as client:
        assert client.cmd("EHLO client.example") == [
            "421 4.7.0 TLS to the server failed, try again later"]
    p.wait_log(r"no TLS to the server \(ServerTLS verify\): TLS handshake with the server "
               r"failed: .*CERTIFICATE_VERIFY_FAILED|certificate verify failed")
    assert not upstream.messages and all(c.tls is None for c in upstream.connections)
    # the same server under may: the plaintext retry delivers
    p.stop()
    p = proxy({"OutAddress": upstream.address, "ServerTLS": "may"})
    with p.connect() as client:
        client.cmd("EHLO client.example")
        assert send_after_ehlo(client)[0].startswith("250")


@pytest.mark.parametrize("identity, out, why", [
    ("stranger", "127.0.0.1", "unable to get local issuer certificate"),
    ("other_name", "localhost", "Hostname mismatch, certificate is not valid for 'localhost'"),
    ("other_name", "127.0.0.1", "IP address mismatch, certificate is not valid for '127.0.0.1'"),
])
def test_server_tls_verify_failure_logs_which_check_failed(proxy, make_upstream, pki, identity,
                                                           out, why):
    """The log says which check failed (OpenSSL's verify message): an
    unknown CA and a name mismatch have different fixes."""
    upstream = tls_upstream(make_upstream, pki, identity=getattr(pki, identity))
    p = proxy({"OutAddress": "%s:%d" % (out, upstream.port), "ServerTLS": "verify",
               "TLSCAFile": pki.ca_file})
    with p.connect() as client:
        assert client.cmd("EHLO client.example")[0].startswith("421 4.7.0")
    p.wait_log(r"no TLS to the server \(ServerTLS verify\): TLS handshake with the server "
               r"failed: CERTIFICATE_VERIFY_FAILED \(%s\.?\)$" % re.escape(why))


def test_aiosmtpd_require_starttls_through_both_legs(proxy, pki):
    """aiosmtpd requiring STARTTLS as the server, smtplib with starttls as the
    client, ServerTLS encrypt and ClientTLS encrypt: both legs encrypted."""
    aiosmtpd = pytest.importorskip("aiosmtpd.controller")
    from harness import free_port
    received = []

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            received.append((session.ssl is not None, envelope.content))
            return "250 2.0.0 Ok: queued"
    port = free_port()
    controller = aiosmtpd.Controller(Handler(), hostname="127.0.0.1", port=port,
                                     tls_context=pki.upstream.server_context(),
                                     require_starttls=True)
    controller.start()
    try:
        p = proxy({"OutAddress": "127.0.0.1:%d" % port, "ServerTLS": "encrypt",
                   **tls_settings(pki, ClientTLS="encrypt")})
        with p.smtp() as smtp:
            smtp.ehlo("client.example")
            smtp.starttls(context=client_context(pki))
            smtp.ehlo("client.example")
            smtp.sendmail("a@x.test", ["b@y.test"], BODY)
        wait_until(lambda: received, what="a message at aiosmtpd")
        assert received[0][0] and b"over TLS" in received[0][1]
    finally:
        controller.stop()


def test_xclient_goes_after_starttls(proxy, make_upstream, pki):
    upstream = tls_upstream(make_upstream, pki,
                            extensions=("XCLIENT NAME ADDR HELO", "STARTTLS", "8BITMIME"))
    p = proxy({"OutAddress": upstream.address, "XClient": "on"})
    with p.connect() as client:
        client.cmd("EHLO client.example")
        assert send_after_ehlo(client)[0].startswith("250")
    message = upstream.wait_messages(1)[0]
    assert upstream.verbs(message.conn)[:6] == ["EHLO", "STARTTLS", "EHLO", "XCLIENT", "EHLO", "MAIL"]
    assert tls_of(upstream, message)


def test_filter_node_verdict_over_starttls(proxy, make_upstream, pki):
    node = tls_upstream(make_upstream, pki,
                        extensions=("XCLIENT ADDR HELO", "STARTTLS"),
                        data_reply="250 2.0.0 accepted by node")
    upstream = tls_upstream(make_upstream, pki)
    p = proxy({"OutAddress": upstream.address, "FilterType": "smtp",
               "FilterCommand": node.address, "ServerTLS": "verify", "TLSCAFile": pki.ca_file})
    with p.connect() as client:
        client.cmd("EHLO client.example")
        assert send_after_ehlo(client)[0].startswith("250")
    upstream.wait_messages(1)
    checked = node.wait_messages(1)[0]
    assert tls_of(node, checked) and node.verbs(checked.conn)[:3] == ["EHLO", "STARTTLS", "EHLO"]


def test_filter_node_failed_handshake_under_may_retries_in_plaintext(proxy, make_upstream):
    node = make_upstream(extensions=("STARTTLS", "XCLIENT ADDR HELO"),
                         replies={"STARTTLS": "220 2.0.0 go ahead"},
                         data_reply="250 2.0.0 accepted by node")
    upstream = make_upstream()
    p = proxy({"OutAddress": upstream.address, "FilterType": "smtp",
               "FilterCommand": node.address})
    with p.connect() as client:
        client.cmd("EHLO client.example")
        assert send_after_ehlo(client)[0].startswith("250")
    upstream.wait_messages(1)
    checked = node.wait_messages(1)[0]
    assert "STARTTLS" not in node.commands(checked.conn)
    assert node.connection_with("STARTTLS").number == checked.conn - 1
    p.wait_log("TLS handshake with the filter node failed: .*; connecting to the filter node "
               "again in plaintext")


def test_filter_node_without_starttls_under_encrypt_defers(proxy, make_upstream, pki):
    node = make_upstream(extensions=("XCLIENT ADDR HELO",))
    upstream = tls_upstream(make_upstream, pki)
    p = proxy({"OutAddress": upstream.address, "FilterType": "smtp",
               "FilterCommand": node.address, "ServerTLS": "encrypt"})
    with p.connect() as client:
        client.cmd("EHLO client.example")
        assert send_after_ehlo(client) == ["451 Local Error"]
    p.wait_log("no TLS to the filter node \\(FilterTLS encrypt, as ServerTLS\\): the filter node "
               "offers no STARTTLS")
    assert not upstream.messages and not node.messages


# --- hostile clients during the handshake -----------------------------------------------------

def test_handshake_garbage_stall_and_disconnect_cost_one_session(proxy, upstream, pki):
    p = proxy({"OutAddress": upstream.address, "TimeOut": 2, "Workers": 1, **tls_settings(pki)})
    with p.connect() as client:                           # garbage instead of a ClientHello
        client.cmd("EHLO client.example")
        assert client.cmd("STARTTLS")[0].startswith("220")
        client.send(b"\x16\x03\x01\x00\x05hello" + b"\x00" * 64)
        assert client.closed_by_peer()
    with p.connect() as client:                           # half a ClientHello, then nothing
        client.cmd("EHLO client.example")
        assert client.cmd("STARTTLS")[0].startswith("220")
        client.send(b"\x16\x03\x01\x02\x00\x01")
        assert client.closed_by_peer(timeout=20)
    with p.connect() as client:                           # gone in the middle
        client.cmd("EHLO client.example")
        assert client.cmd("STARTTLS")[0].startswith("220")
        client.send(b"\x16\x03\x01")
    p.wait_log(r"TLS handshake with the client failed", timeout=15)
    wait_until(lambda: p.log().count("TLS handshake with the client failed") >= 3, 15,
               what="three failed handshakes logged")
    with p.smtp() as smtp:                                # the worker still serves
        smtp.ehlo("client.example")
        smtp.starttls(context=client_context(pki))
        smtp.sendmail("a@x.test", ["b@y.test"], BODY)
    upstream.wait_messages(1)
    assert "Traceback" not in p.log() and p.spool_files() == []


def test_tls_wrapper_garbage_costs_one_session(proxy, upstream, pki):
    p = proxy({"OutAddress": upstream.address, "TLSWrapper": "on", "TimeOut": 2, "Workers": 1,
               **tls_settings(pki)})
    sock = socket.create_connection(p.address, timeout=10)
    sock.sendall(b"EHLO plaintext.example\r\n")
    assert sock.recv(100) == b""          # no plaintext answer; the handshake just fails
    sock.close()
    p.wait_log("TLS handshake with client 127.0.0.1 failed")
    with smtplib.SMTP_SSL(p.host, p.port, context=client_context(pki), timeout=20) as smtp:
        smtp.sendmail("a@x.test", ["b@y.test"], BODY)
    upstream.wait_messages(1)


# --- configuration and reload -----------------------------------------------------------------

def test_tls_config_errors_exit_2(tmp_path, pki):
    base = "OutAddress: 127.0.0.1:2525\nTempDirectory: %s\n" % tmp_path
    cases = {
        "TLSCertificate: %s\n" % pki.proxy.chain: "TLSCertificate",
        "TLSKey: %s\n" % pki.proxy.key: "TLSKey",
        "TLSCertificate: %s\nTLSKey: %s\n" % (pki.proxy.chain, pki.upstream.key): "TLSCertificate",
        "TLSCertificate: %s\nTLSKey: %s\n" % (tmp_path / "missing.pem", pki.proxy.key): "TLSCertificate",
        "ClientTLS: may\n": "ClientTLS",
        "TLSWrapper: on\n": "TLSWrapper",
        "ClientTLS: always\n": "ClientTLS",
        "ServerTLS: maybe\n": "ServerTLS",
        "TLSCAFile: %s\n" % (tmp_path / "nothing.pem"): "TLSCAFile",
        "TLSCAFile: %s\n" % pki.proxy.key: "TLSCAFile",
    }
    for text, setting in cases.items():
        conf = write_config(tmp_path / "bad.conf", base + text)
        ran = run_proxsmtpd("-d", "3", "-f", str(conf))
        assert ran.returncode == 2, (text, ran.stderr)
        assert re.search(r"bad\.conf, line \d+: %s: " % setting, ran.stderr), (text, ran.stderr)
        assert "Traceback" not in ran.stderr


def peer_certificate(p, pki) -> bytes:
    with Client(p.host, p.port) as client:
        client.cmd("EHLO client.example")
        sock = starttls(client, pki)
        der = sock.getpeercert(binary_form=True)
        client.cmd("QUIT")
    return der


def test_sighup_picks_up_a_renewed_certificate(proxy, upstream, pki):
    p = proxy({"OutAddress": upstream.address, **tls_settings(pki)})
    assert peer_certificate(p, pki) == pki.proxy.der
    renewed = Identity(pki.ca, pki.dir, "renewed", "proxy.test", "127.0.0.1")
    renewed.write(pki.proxy.chain, pki.proxy.key)
    # a broken certificate on reload: refused, the running one kept
    saved = pki.proxy.chain.read_bytes()
    pki.proxy.chain.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot a certificate\n")
    os.kill(p.proc.pid, signal.SIGHUP)
    p.wait_log(r"reload failed, keeping the running configuration: .*, line \d+: TLSCertificate: "
               r"can't load")
    assert peer_certificate(p, pki) == pki.proxy.der
    pki.proxy.chain.write_bytes(saved)
    os.kill(p.proc.pid, signal.SIGHUP)
    p.wait_log("reloaded configuration")
    wait_until(lambda: peer_certificate(p, pki) == renewed.der, 15, what="the renewed certificate")
    pki.proxy.write(pki.proxy.chain, pki.proxy.key)     # the module's other tests use the first


def test_header_escape_shows_client_tls(proxy, upstream, pki):
    p = proxy({"OutAddress": upstream.address, "Header": "Received: by proxsmtpd (%t)",
               **tls_settings(pki)})
    with p.smtp() as smtp:
        smtp.starttls(context=client_context(pki))
        version, cipher = smtp.sock.version(), smtp.sock.cipher()[0]
        smtp.sendmail("a@x.test", ["b@y.test"], BODY)
    message = upstream.wait_messages(1)[0]
    assert message.raw.startswith(b"Received: by proxsmtpd (%s %s)\r\n"
                                  % (version.encode(), cipher.encode()))
    with p.smtp() as smtp:
        smtp.sendmail("a@x.test", ["b@y.test"], BODY)
    assert upstream.wait_messages(2)[1].raw.startswith(b"Received: by proxsmtpd (none)\r\n")


# --- the EHLO reply the client sees (untrusted server bytes) ----------------------------------

# The place of the client's EHLO: its reply goes through the session's on_reply (ehlo.client_view).
EHLO_PLACE = ServerAnswers(b"EHLO", b"EHLO client.test\r\n")

EHLO_LINES = st.lists(st.one_of(
    st.sampled_from([b"STARTTLS", b"starttls", b"STARTTLS extra", b"PIPELINING", b"XCLIENT ADDR",
                     b"SIZE 100", b"8BITMIME", b"", b" ", b"STARTTLSX"]),
    st.binary(max_size=30).filter(lambda b: b"\n" not in b and b"\r" not in b)), max_size=8)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=20).filter(lambda b: b"\n" not in b and b"\r" not in b), EHLO_LINES,
       st.sampled_from(["off", "may", "encrypt"]), st.booleans())
def test_ehlo_reply_the_client_sees_is_well_formed(first, keywords, client_tls, active):
    """Whatever the server's EHLO reply, the client's is well formed, never
    carries the server's STARTTLS, and carries the proxy's once exactly when
    ClientTLS offers it (and the client has no TLS yet)."""
    cfg = configuration.Config(ClientTLS=client_tls)
    with socket.socket() as sock:
        session = Session(cfg, sock)
        session.envelope.client_tls = "TLSv1.3 X" if active else ""
        lines = [b"250" + (b"-" if keywords else b" ") + first + b"\r\n"]
        lines += [b"250-" + word + b"\r\n" for word in keywords]
        if keywords:
            lines[-1] = b"250 " + lines[-1][4:]
        shown = session.on_reply(EHLO_PLACE, lines)
    assert ehlo_offers(lines, b"STARTTLS") == any(
        word.split()[:1] and word.split()[0].upper() == b"STARTTLS" for word in keywords)
    assert all(line.startswith(b"250-") for line in shown[:-1]), shown
    assert shown[-1].startswith(b"250 ") or shown[-1] in (b"250\r\n",), shown
    assert all(line.endswith(b"\r\n") for line in shown)
    offers = [line for line in shown[1:] if line[4:].split()[:1]
              and line[4:].split()[0].upper() == b"STARTTLS"]
    expected = 1 if client_tls != "off" and not active else 0
    assert len(offers) == expected and all(line[4:] == b"STARTTLS\r\n" for line in offers), shown


def auth_offers(reply: list[bytes]) -> list[bytes]:
    """The AUTH and AUTH= lines of a raw EHLO reply, without their code."""
    return [line[4:] for line in reply[1:] if re.match(rb"(?i)auth(=|\s|$)", line[4:])]


WITH_AUTH = EHLO_LINES.map(lambda words: words + [b"AUTH PLAIN", b"auth=login"])


@settings(max_examples=200, deadline=None)
@given(WITH_AUTH.flatmap(st.permutations), st.booleans(), st.booleans())
def test_ehlo_reply_drops_auth_while_only_the_server_leg_is_encrypted(keywords, client_tls,
                                                                      server_tls):
    """AUTH and AUTH= go from the reply exactly when the server leg is TLS and
    the client leg is not; the reply stays well formed wherever they were."""
    with socket.socket() as sock:
        session = Session(configuration.Config(), sock)
        session.envelope.client_tls = "TLSv1.3 X" if client_tls else ""
        session.envelope.server_tls = "TLSv1.3 X" if server_tls else ""
        lines = [b"250-upstream.test\r\n"] + [b"250-" + word + b"\r\n" for word in keywords]
        lines[-1] = b"250 " + lines[-1][4:]
        shown = session.on_reply(EHLO_PLACE, lines)
    assert all(line.startswith(b"250-") for line in shown[:-1]) and shown[-1].startswith(b"250 ")
    offered = auth_offers(lines)
    assert len(offered) >= 2
    assert auth_offers(shown) == ([] if server_tls and not client_tls else offered), shown


def test_tls_handshakes_counted_in_metrics(proxy, make_upstream, pki):
    """proxsmtpd_client_tls_total and proxsmtpd_server_tls_total, by result."""
    from test_metrics import scrape, value
    with_tls = tls_upstream(make_upstream, pki)
    refusing = make_upstream(extensions=("8BITMIME", "STARTTLS"))      # answers it 502
    plain = make_upstream(extensions=("8BITMIME",))
    proxies = []
    for upstream in (with_tls, refusing, plain):
        stats = "127.0.0.1:%d" % free_port()
        px = proxy({"OutAddress": upstream.address, "StatsListen": stats, "Workers": 1,
                    **tls_settings(pki)})
        px.stats = stats
        proxies.append(px)
    tls_px, refusing_px, plain_px = proxies
    with tls_px.smtp() as smtp:
        smtp.ehlo("client.example")
        smtp.starttls(context=client_context(pki))
        smtp.sendmail("a@x.test", ["b@y.test"], BODY)
    with tls_px.connect() as client:                      # garbage instead of a ClientHello
        client.cmd("EHLO client.example")
        assert client.cmd("STARTTLS")[0].startswith("220")
        client.send(b"\x16\x03\x01\x00\x05hello" + b"\x00" * 64)
        assert client.closed_by_peer()
    for px in (refusing_px, plain_px):
        with px.connect() as client:
            assert client.cmd("EHLO client.example")[0].startswith("250")
    samples = wait_until(lambda: (lambda s: s if value(
        s, "proxsmtpd_client_tls_total", result="failed") == 1 else None)(scrape(tls_px)),
        15, what="the failed client handshake counted")
    assert value(samples, "proxsmtpd_client_tls_total", result="established") == 1
    # the readiness probe's session said no EHLO: only the two EHLO sessions count
    assert value(samples, "proxsmtpd_server_tls_total", result="established") == 2
    assert value(scrape(refusing_px), "proxsmtpd_server_tls_total", result="refused") == 1
    assert value(scrape(plain_px), "proxsmtpd_server_tls_total", result="not_offered") == 1


# --- session resumption where the proxy is the TLS client --------------------------------------

def send_one(p, pki=None) -> None:
    """One message through the proxy, in a session of its own."""
    with p.smtp() as smtp:
        smtp.sendmail("a@x.test", ["b@y.test"], BODY)


def server_handshakes(p) -> list[str]:
    """The server leg's handshakes in the log: the TLS each described, with
    `resumed` when the cached session was taken."""
    return re.findall(r"TLS: (TLSv1\S* \S+(?: resumed)?)$", p.log(), re.M)


def test_server_leg_resumes_the_tls_session_with_postfix(proxy, postfix, pki):
    """ServerTLS may to a real Postfix: the first session's handshake is a full
    one, the next ones resume the session (the TLS 1.3 ticket Postfix sent
    after the handshake, kept once the EHLO reply came inside TLS)."""
    from test_metrics import scrape, value
    server = postfix(tls=(str(pki.upstream.chain), str(pki.upstream.key)))
    p = proxy({"OutAddress": server.address, "Workers": 1,
               "StatsListen": "127.0.0.1:%d" % free_port()})
    p.stats = p.settings["StatsListen"]
    for _ in range(3):
        send_one(p)
    handshakes = wait_until(lambda: (lambda h: h if len(h) == 3 else None)(server_handshakes(p)),
                            what="three server handshakes in the log")
    assert not handshakes[0].endswith("resumed"), handshakes
    assert all(h.endswith(" resumed") for h in handshakes[1:]), handshakes
    samples = scrape(p)         # counted in /metrics, by peer
    assert value(samples, "proxsmtpd_tls_resumed_total", peer="server") == 2
    assert value(samples, "proxsmtpd_tls_resumed_total", peer="filter") == 0


def test_resumed_session_only_offered_to_the_name_it_was_verified_for(proxy, postfix, pki,
                                                                      tmp_path):
    """ServerTLS verify: a resumed handshake checks no certificate (the session
    carries the result of the full one), so a session is only offered to the
    name it was verified for.  One Postfix, certified for `localhost` only, is
    both the server (OutAddress localhost) and the filter node (127.0.0.1):
    the server leg resumes from the second session on, the node's handshake
    at the same address under the other name is never resumed with that
    session and fails its check every time."""
    identity = Identity(pki.ca, tmp_path, "localhost-only", "localhost")
    server = postfix(tls=(str(identity.chain), str(identity.key)))
    p = proxy({"OutAddress": "localhost:%d" % server.port, "FilterType": "smtp",
               "FilterCommand": server.address, "ServerTLS": "verify",
               "TLSCAFile": pki.ca_file, "Workers": 1})
    for _ in range(2):
        with p.connect() as client:
            client.cmd("EHLO client.example")
            assert send_after_ehlo(client) == ["451 Local Error"]
    wait_until(lambda: len(re.findall("IP address mismatch", p.log())) == 2,
               what="the node's check failing twice")
    log = p.log()
    assert re.search(r"TLS handshake with the filter node failed: .*IP address mismatch, "
                     r"certificate is not valid for '127.0.0.1'", log), log
    handshakes = server_handshakes(p)
    assert len(handshakes) == 2 and handshakes[1].endswith(" resumed"), handshakes
    assert not handshakes[0].endswith("resumed"), handshakes


def test_resumed_session_only_offered_under_the_context_it_was_verified_with(proxy, postfix,
                                                                             pki, tmp_path):
    """A session is kept per context too (its policy and CA file): one
    Postfix, certified by the test CA for `localhost`, is both the server
    (ServerTLS verify, TLSCAFile that CA) and the filter node at the same
    address and name (FilterTLS verify, FilterTLSCAFile another CA).  The
    server leg resumes from the second session on; the node's handshake is
    never offered that session, and fails its check every time."""
    stranger_ca = tmp_path / "stranger-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(stranger_ca))
    server = postfix(tls=(str(pki.upstream.chain), str(pki.upstream.key)))
    address = "localhost:%d" % server.port
    p = proxy({"OutAddress": address, "FilterType": "smtp", "FilterCommand": address,
               "ServerTLS": "verify", "TLSCAFile": pki.ca_file, "FilterTLS": "verify",
               "FilterTLSCAFile": str(stranger_ca), "Workers": 1})
    for _ in range(2):
        with p.connect() as client:
            client.cmd("EHLO client.example")
            assert send_after_ehlo(client) == ["451 Local Error"]
    wait_until(lambda: len(re.findall("TLS handshake with the filter node failed", p.log())) == 2,
               what="the node's check failing twice")
    assert "unable to get local issuer certificate" in p.log(), p.log()
    handshakes = server_handshakes(p)
    assert len(handshakes) == 2 and handshakes[1].endswith(" resumed"), handshakes
    assert not handshakes[0].endswith("resumed"), handshakes


def test_server_refusing_the_session_gets_a_full_handshake(proxy, postfix, pki):
    """A Postfix restarted in between has new ticket keys and does not take
    the session: the handshake is a full one, mail flows, and the session it
    gives is the one resumed next."""
    server = postfix(tls=(str(pki.upstream.chain), str(pki.upstream.key)))
    p = proxy({"OutAddress": server.address, "Workers": 1})
    send_one(p)
    master = server.master_pid
    server.postfix("stop")
    wait_until(lambda: not os.path.exists("/proc/%d" % master), what="Postfix stopped")
    server.start()
    for _ in range(2):
        send_one(p)
    handshakes = wait_until(lambda: (lambda h: h if len(h) == 3 else None)(server_handshakes(p)),
                            what="three server handshakes in the log")
    assert [h.endswith(" resumed") for h in handshakes] == [False, False, True], handshakes
    assert len(server.messages(3)) == 3


def test_filter_node_leg_resumes_the_tls_session_with_postfix(proxy, postfix, make_upstream,
                                                              pki):
    """The filter node's leg is a TLS client as the server leg is: a real
    Postfix as the node (XCLIENT from loopback), one message per session; the
    node's handshakes after the first resume.  (A connection per message:
    a kept one, FilterConnections, needs no second handshake at all.)"""
    node = postfix(tls=(str(pki.upstream.chain), str(pki.upstream.key)))
    upstream = make_upstream()
    from test_metrics import scrape, value
    p = proxy({"OutAddress": upstream.address, "FilterType": "smtp",
               "FilterCommand": node.address, "Workers": 1, "FilterConnections": 0,
               "StatsListen": "127.0.0.1:%d" % free_port()})
    p.stats = p.settings["StatsListen"]
    for _ in range(3):
        send_one(p)
    upstream.wait_messages(3)
    handshakes = re.findall(r"FILTER TLS: (TLSv1\S* \S+(?: resumed)?)$", p.log(), re.M)
    assert len(handshakes) == 3 and not handshakes[0].endswith("resumed"), handshakes
    assert all(h.endswith(" resumed") for h in handshakes[1:]), handshakes
    assert value(scrape(p), "proxsmtpd_tls_resumed_total", peer="filter") == 2
