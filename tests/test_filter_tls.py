"""FilterTLS and FilterTLSCAFile (proxsmtpd.conf(5)): the filter node's TLS
policy of its own, against a real Postfix node offering STARTTLS
(`smtpd_tls_received_header` shows the TLS in its Received line) and
RecordingServer nodes; unset, the node follows ServerTLS (test_tls.py's
filter node tests hold that).  Certificates come from throwaway CAs made by
`trustme` for the module: one for the node, another for the server, a third
that neither uses.
"""

from __future__ import annotations

import re
import ssl

import pytest
import trustme
from harness import run_proxsmtpd, send_mail, wait_until, write_config

from proxsmtp.process import config as configuration
from proxsmtp.process import hostcheck

BODY = b"From: a@x.test\r\nTo: b@y.test\r\nSubject: filter tls\r\n\r\nto the node\r\n"
# Postfix's Received line with smtpd_tls_received_header = yes
TLS_RECEIVED = re.compile(rb"\(using TLSv1\.[23] with cipher ")


class Identity:
    """A certificate (chain and key, as files) issued by `ca` for `hosts`."""

    def __init__(self, ca: trustme.CA, directory, name: str, *hosts: str) -> None:
        self.cert = ca.issue_cert(*hosts)
        self.chain = directory / ("%s.pem" % name)
        self.key = directory / ("%s.key" % name)
        self.chain.write_bytes(b"".join(blob.bytes() for blob in self.cert.cert_chain_pems))
        self.cert.private_key_pem.write_to_path(str(self.key))

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.cert.configure_cert(context)
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")

    class PKI:
        pass
    pki = PKI()
    for name in ("node", "server", "stranger"):
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(directory / ("%s-ca.pem" % name)))
        setattr(pki, "%s_ca" % name, directory / ("%s-ca.pem" % name))
        setattr(pki, name, Identity(ca, directory, name, "localhost", "127.0.0.1"))
    return pki


def tls_node(postfix, pki):
    """A real Postfix node that offers STARTTLS and says so in its Received line."""
    return postfix(tls=(str(pki.node.chain), str(pki.node.key)),
                   smtpd_tls_received_header="yes")


def node_settings(server, node, **more) -> dict:
    settings = {"OutAddress": server.address, "FilterType": "smtp",
                "FilterCommand": node.address}
    settings.update(more)
    return settings


def deliver(p) -> list[str]:
    with p.connect() as client:
        reply = send_mail(client, "a@x.test", ["b@y.test"], BODY)
        client.cmd("QUIT")
    return reply


# --- a real Postfix node ----------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize("filter_tls, node_tls", [(None, True), ("off", False)])
def test_filter_tls_off_keeps_the_node_in_plaintext(proxy, make_upstream, postfix, pki,
                                                    filter_tls, node_tls):
    """ServerTLS may and a node that offers STARTTLS: unset, the node gets
    TLS as the server does; `FilterTLS: off`, it hears no STARTTLS at all
    (no TLS in its Received line), while the server leg keeps its TLS."""
    node = tls_node(postfix, pki)
    server = make_upstream(extensions=("STARTTLS", "8BITMIME"),
                           tls=pki.server.server_context())
    more = {"FilterTLS": filter_tls} if filter_tls else {}
    # a connection per message: Postfix logs the session's counts at its end
    p = proxy(node_settings(server, node, ServerTLS="may", FilterConnections="0", **more))
    assert deliver(p)[0].startswith("250")
    delivered = server.wait_messages(1)[0]
    assert server.connections[delivered.conn].tls, "the server leg lost its TLS"
    checked = node.messages(1)[0]
    assert bool(TLS_RECEIVED.search(checked["content"])) is node_tls, checked["content"]
    # the node session's counts (the fixture's probe said only QUIT)
    wait_until(lambda: " data=1 " in node.log(), what="the node session's end in Postfix's log")
    ended = re.search(r"disconnect from .* data=1 .*", node.log()).group(0)
    assert (" starttls=1 " in ended) is node_tls, ended


@pytest.mark.e2e
@pytest.mark.root
@pytest.mark.slow
def test_filter_tls_verify_checks_the_node_against_its_own_ca(proxy, make_upstream, postfix,
                                                                pki):
    """FilterTLS verify with FilterTLSCAFile the node's CA, ServerTLS verify
    with TLSCAFile the server's: each leg is checked against its own CA, and
    the node's Received line shows TLS."""
    node = tls_node(postfix, pki)
    server = make_upstream(extensions=("STARTTLS", "8BITMIME"),
                           tls=pki.server.server_context())
    p = proxy(node_settings(server, node, ServerTLS="verify", TLSCAFile=pki.server_ca,
                            FilterTLS="verify", FilterTLSCAFile=pki.node_ca))
    assert deliver(p)[0].startswith("250")
    assert server.connections[server.wait_messages(1)[0].conn].tls
    assert TLS_RECEIVED.search(node.messages(1)[0]["content"])


@pytest.mark.e2e
@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize("ca", ["stranger_ca", "server_ca"])
def test_filter_tls_verify_with_the_wrong_ca_defers(proxy, upstream, postfix, pki, ca):
    """A node certificate that does not chain to FilterTLSCAFile (another CA,
    or the server's CA where the node's is needed): 451, nothing delivered,
    nothing queued at the node, and the log says which check failed."""
    node = tls_node(postfix, pki)
    p = proxy(node_settings(upstream, node, ServerTLS="off", FilterTLS="verify",
                            TLSCAFile=pki.node_ca, FilterTLSCAFile=getattr(pki, ca)))
    assert deliver(p) == ["451 Local Error"]
    p.wait_log(r"no TLS to the filter node \(FilterTLS verify\): TLS handshake with the filter "
               r"node failed: CERTIFICATE_VERIFY_FAILED \(unable to get local issuer "
               r"certificate\)")
    p.wait_log("status=FILTER-ERROR")
    upstream.wait_command("RSET")
    assert upstream.messages == [] and node.queued() == []


# --- nodes of our own -------------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.slow
def test_filter_tls_encrypt_without_starttls_at_the_node_defers(proxy, make_upstream):
    """FilterTLS encrypt and a node that offers no STARTTLS: 451 and the
    reason, though ServerTLS (off) asks nothing of the server."""
    node = make_upstream(extensions=("XCLIENT ADDR HELO",))
    server = make_upstream()
    p = proxy(node_settings(server, node, ServerTLS="off", FilterTLS="encrypt"))
    assert deliver(p) == ["451 Local Error"]
    p.wait_log(r"no TLS to the filter node \(FilterTLS encrypt\): the filter node offers no "
               r"STARTTLS")
    server.wait_command("RSET")
    assert not server.messages and not node.messages


@pytest.mark.e2e
@pytest.mark.slow
def test_filter_tls_may_under_server_tls_off(proxy, make_upstream, pki):
    """FilterTLS may with ServerTLS off: the node gets STARTTLS, the server
    (which offers it too) does not."""
    node = make_upstream(extensions=("STARTTLS", "XCLIENT ADDR HELO"),
                         tls=pki.node.server_context(), data_reply="250 2.0.0 accepted by node")
    server = make_upstream(extensions=("STARTTLS", "8BITMIME"), tls=pki.server.server_context())
    p = proxy(node_settings(server, node, ServerTLS="off", FilterTLS="may"))
    assert deliver(p)[0].startswith("250")
    delivered = server.wait_messages(1)[0]
    assert "STARTTLS" not in server.commands() and server.connections[delivered.conn].tls is None
    checked = node.wait_messages(1)[0]
    assert node.connections[checked.conn].tls
    assert node.verbs(checked.conn)[:3] == ["EHLO", "STARTTLS", "EHLO"]


# --- configuration ----------------------------------------------------------------------------

@pytest.mark.system
@pytest.mark.slow
def test_filter_tls_config_errors_exit_2(tmp_path, pki):
    """A start and `-t` both refuse a bad FilterTLS or FilterTLSCAFile,
    exit 2, naming the setting and what it accepts."""
    base = ("OutAddress: 127.0.0.1:2525\nTempDirectory: %s\nFilterType: smtp\n"
            "FilterCommand: 127.0.0.1:2526\n" % tmp_path)
    cases = {
        "FilterTLS: maybe\n": ("FilterTLS", 'expected one of off, may, encrypt, verify, '
                                            'not "maybe"'),
        "FilterTLS: verify\nFilterTLSCAFile: %s\n" % (tmp_path / "nothing.pem"):
            ("FilterTLSCAFile", "can't load CA file .*expected a PEM file of CA certificates"),
        "FilterTLSCAFile: %s\n" % pki.node.key:
            ("FilterTLSCAFile", "can't load CA file .*expected a PEM file of CA certificates"),
    }
    for text, (setting, says) in cases.items():
        conf = write_config(tmp_path / "bad.conf", base + text)
        for args in (("-d", "3"), ("-t",)):
            ran = run_proxsmtpd(*args, "-f", str(conf))
            assert ran.returncode == 2, (text, args, ran.stderr)
            assert re.search(r"bad\.conf, line \d+: %s: %s" % (setting, says), ran.stderr), \
                (text, args, ran.stderr)
            assert "Traceback" not in ran.stderr


@pytest.mark.unit
def test_filter_tls_defaults_follow_server_tls(pki):
    """Unset, FilterTLS and FilterTLSCAFile are ServerTLS's and TLSCAFile's,
    and the node shares the server leg's context; set, the node gets a
    context of its own, made at load."""
    base = ("OutAddress: 127.0.0.1:2525\nFilterType: smtp\nFilterCommand: 127.0.0.1:2526\n"
            "ServerTLS: verify\nTLSCAFile: %s\n" % pki.server_ca)
    unset = configuration.parse(base)
    hostcheck.check_system(unset)
    assert (unset.FilterTLS, unset.FilterTLSCAFile) == ("verify", str(pki.server_ca))
    assert unset.filter_tls is unset.connecting_tls is not None
    own = configuration.parse(base + "FilterTLSCAFile: %s\n" % pki.node_ca)
    hostcheck.check_system(own)
    assert own.filter_tls is not None and own.filter_tls is not own.connecting_tls
    assert own.filter_tls.verify_mode == ssl.CERT_REQUIRED and own.filter_tls.check_hostname
    off = configuration.parse(base + "FilterTLS: off\n")
    hostcheck.check_system(off)
    assert off.filter_tls is None and off.connecting_tls is not None


@pytest.mark.unit
def test_filter_tls_without_a_filter_node_is_ignored_with_a_warning():
    loaded = configuration.parse("OutAddress: 127.0.0.1:2525\nListen: 127.0.0.1:2527\n"
                                 "FilterTLS: off\nFilterTLSCAFile: /nonexistent.pem\n")
    assert loaded.warnings == ["line 3: FilterTLS: ignored unless FilterType is smtp",
                               "line 4: FilterTLSCAFile: ignored unless FilterType is smtp"]
