"""SPEC §2 and §4: configuration files as the daemon reads them, and where
the server connection goes for each OutAddress / Listen form."""

from __future__ import annotations

import socket

import pytest

from harness import Client, Proxy, RecordingServer, free_port, run_proxsmtpd, send_mail, write_config

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
    ("Skip: unauthenticated", ["Skip"]),
    ("Listen: 127.0.0.1:70000", ["Listen"]),
    ("TempDirectory:", ["TempDirectory"]),
])
def test_invalid_values(tmp_path, line, words):
    stderr = start_fails(tmp_path, "# test\nOutAddress: 10026\n\n%s\n" % line)
    for word in words:
        assert word in stderr
    assert "line 4" in stderr


@pytest.mark.parametrize("line", ["Frobnicate: yes", "OutAddress 10026", "[section]"])
def test_invalid_lines(tmp_path, line):
    stderr = start_fails(tmp_path, "OutAddress: 10026\n%s\n" % line)
    assert "invalid config line: %s" % line in stderr
    assert "line 2" in stderr


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
        assert "OutAddress option will be ignored" in p.log()
    finally:
        p.stop()


# --- OutAddress forms (SPEC §4) ---------------------------------------------------------

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
