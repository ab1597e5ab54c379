"""Transparent proxying with real routing (TRANSPARENT PROXY in proxsmtpd(8)).

A client namespace sends mail to the *server's* address; the router namespace
in between runs proxsmtpd behind the seed README's iptables lines; the server
namespace runs a recording SMTP server on port 25.  Needs root and the
netfilter TPROXY / REDIRECT targets: skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import pwd
import shutil
import smtplib
import socket
import ssl
import tempfile
from pathlib import Path

import pytest

import netns
from harness import RecordingServer
from netns import (CLIENT4, CLIENT6, ROUTER4_C, ROUTER4_S, ROUTER6_S, SERVER4, SERVER6,
                   NamespacedProxy, Topology)

pytestmark = [pytest.mark.system, pytest.mark.netns, pytest.mark.root, pytest.mark.slow]

CAP_NET_ADMIN = 12
FILTER = "printf 'X-Filter-Env: %s %s\\r\\n' \"$CLIENT\" \"$SERVER\"; cat"
MESSAGE = b"From: a@client.test\r\nSubject: transparent\r\n\r\nbody line\r\n"


def require(feature: str) -> None:
    reason = netns.unavailable(feature)
    if reason:
        pytest.skip(reason)


@pytest.fixture
def workdir():
    """A private directory outside pytest's 0700 tree, so `User: nobody` can use it."""
    path = Path(tempfile.mkdtemp(prefix="pxs-netns-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def topo():
    require("netns")
    topology = Topology()
    try:
        yield topology
    finally:
        names, procs = topology.names, topology.processes()
        topology.close()
    left = netns.namespace_names() & set(names)
    assert not left, "namespaces left behind: %s" % sorted(left)
    assert not [p.pid for p in procs if p.poll() is None], "processes left running"


@pytest.fixture
def servers():
    """Recording servers to stop at teardown (they hold sockets in the namespaces)."""
    started: list[RecordingServer] = []
    yield started
    for server in started:
        server.stop()


def start_server(topo: Topology, servers: list, host: str) -> RecordingServer:
    server = topo.server.call(RecordingServer, host=host, port=25, extensions=("8BITMIME",))
    servers.append(server)
    return server


def start_proxy(topo: Topology, workdir: Path, **settings: object) -> NamespacedProxy:
    base: dict[str, object] = {"Listen": "0.0.0.0:10025", "TimeOut": 20, "FilterTimeout": 20,
                               "FilterType": "pipe", "FilterCommand": FILTER,
                               "Header": "X-Proxied: %i %l"}
    base.update(settings)
    proxy = NamespacedProxy(topo.router, workdir, base)
    return proxy.start()


def send_from_client(host: str) -> dict:
    """One message to host:25 with smtplib; what the client saw."""
    client = smtplib.SMTP(timeout=20)
    code, greeting = client.connect(host, 25)
    seen = {"code": code, "greeting": greeting.decode(), "peer": client.sock.getpeername()[0],
            "local": client.sock.getsockname()[0]}
    if code == 220:
        seen["refused"] = client.sendmail("a@client.test", ["b@server.test"], MESSAGE)
        client.quit()
    client.close()
    return seen


def deliver(topo: Topology, server: RecordingServer, proxy: NamespacedProxy,
            client_ip: str, server_ip: str, server_sees: str) -> None:
    """The client talks to server_ip:25; the proxy must be invisible in between."""
    seen = topo.client.call(send_from_client, server_ip)
    log = proxy.log()
    assert seen["code"] == 220 and "upstream.test" in seen["greeting"], (seen, log)
    assert seen["peer"] == server_ip and seen["local"] == client_ip
    assert seen["refused"] == {}, seen
    messages = server.wait_messages(1)
    assert len(messages) == 1 and len(server.connections) == 1
    assert server.connections[0].peer[0] == server_sees, server.connections[0].peer
    raw = messages[0].raw
    assert b"X-Proxied: %s %s\r\n" % (client_ip.encode(), server_ip.encode()) in raw, raw
    assert b"X-Filter-Env: %s %s\r\n" % (client_ip.encode(), server_ip.encode()) in raw, raw
    assert raw.endswith(b"\r\n\r\nbody line"), raw
    log = proxy.log()
    assert "accepted connection from: %s" % client_ip in log, log
    assert "client=%s" % client_ip in log and "status=FILTERED" in log, log
    assert proxy.stop() == 0, proxy.log()
    assert proxy.spool_files() == []


def connect_expecting_refusal(host: str) -> tuple[str, bool]:
    """(first reply line, closed by the proxy afterwards)."""
    with socket.create_connection((host, 25), timeout=20) as sock:
        reader = sock.makefile("rb")
        first = reader.readline().decode().rstrip()
        closed = reader.readline() == b""
    return first, closed


# --- TransparentProxy: full (TPROXY) ----------------------------------------------------------

def test_full_ipv4_as_root(topo, servers, workdir):
    """The seed recipe as written: the server sees the client, the client sees the server."""
    require("tproxy")
    topo.router.sysctl("net/ipv4/conf/all/rp_filter", "1")     # as strict as a distribution's
    tolerated = topo.router.apply(netns.ROUTER_RECIPE_TPROXY)
    assert all(line.startswith(netns.TOLERATED) for line in tolerated)
    server = start_server(topo, servers, "0.0.0.0")
    proxy = start_proxy(topo, workdir, TransparentProxy="full")
    deliver(topo, server, proxy, CLIENT4, SERVER4, server_sees=CLIENT4)


def test_full_ipv4_on_dual_stack_socket(topo, servers, workdir):
    """`Listen: 10025` is one IPv6 socket (IPV6_TRANSPARENT) that TPROXY also finds for IPv4."""
    require("tproxy")
    topo.router.apply(netns.ROUTER_RECIPE_TPROXY)
    server = start_server(topo, servers, "0.0.0.0")
    proxy = start_proxy(topo, workdir, TransparentProxy="full", Listen="10025")
    deliver(topo, server, proxy, CLIENT4, SERVER4, server_sees=CLIENT4)


def test_full_ipv4_without_conntrack(topo, servers, workdir):
    """Full mode needs no conntrack entry: the router tracks nothing (raw CT --notrack)."""
    require("tproxy")
    require("notrack")
    topo.router.apply(netns.ROUTER_RECIPE_TPROXY)
    topo.router.sh("iptables -t raw -A PREROUTING -p tcp -j CT --notrack")
    topo.router.sh("iptables -t raw -A OUTPUT -p tcp -j CT --notrack")
    server = start_server(topo, servers, "0.0.0.0")
    proxy = start_proxy(topo, workdir, TransparentProxy="full")
    deliver(topo, server, proxy, CLIENT4, SERVER4, server_sees=CLIENT4)


def test_full_ipv4_as_nobody(topo, servers, workdir):
    """After the drop to `User: nobody` only CAP_NET_ADMIN is left, and that is enough."""
    require("tproxy")
    nobody = pwd.getpwnam("nobody")
    topo.router.apply(netns.ROUTER_RECIPE_TPROXY)
    server = start_server(topo, servers, "0.0.0.0")
    (workdir / "spool").mkdir()
    os.chown(workdir / "spool", nobody.pw_uid, nobody.pw_gid)
    proxy = start_proxy(topo, workdir, TransparentProxy="full", User="nobody")
    for pid in proxy.pids():
        uid, caps = process_identity(pid)
        assert uid == nobody.pw_uid, "pid %d still runs as uid %d:\n%s" % (pid, uid, proxy.log())
        assert caps == 1 << CAP_NET_ADMIN, "pid %d has capabilities %#x" % (pid, caps)
    deliver(topo, server, proxy, CLIENT4, SERVER4, server_sees=CLIENT4)


def test_full_ipv6(topo, servers, workdir):
    """ip6tables TPROXY: IPV6_TRANSPARENT on both sockets."""
    require("tproxy6")
    topo.router.apply(netns.ROUTER_RECIPE_TPROXY6)
    server = start_server(topo, servers, "::")
    proxy = start_proxy(topo, workdir, TransparentProxy="full", Listen="[::]:10025")
    deliver(topo, server, proxy, CLIENT6, SERVER6, server_sees=CLIENT6)


def test_full_loop_detected(topo, servers, workdir):
    """A connection from the router to its own address: original destination == client."""
    require("tproxy")
    topo.router.apply(netns.ROUTER_RECIPE_TPROXY)
    server = start_server(topo, servers, "0.0.0.0")
    proxy = start_proxy(topo, workdir, TransparentProxy="full")
    first, closed = topo.router.call(connect_expecting_refusal, ROUTER4_C)
    assert first.startswith("421") and closed, (first, proxy.log())
    assert "loop detected" in proxy.log()
    assert server.connections == []
    assert proxy.stop() == 0 and proxy.spool_files() == []


# --- TransparentProxy: client (REDIRECT) --------------------------------------------------------

def test_client_mode_ipv4(topo, servers, workdir):
    """SO_ORIGINAL_DST after REDIRECT; the proxy connects from the router's address."""
    require("redirect")
    topo.router.apply(netns.ROUTER_RECIPE_REDIRECT)
    server = start_server(topo, servers, "0.0.0.0")
    proxy = start_proxy(topo, workdir, TransparentProxy="client")
    deliver(topo, server, proxy, CLIENT4, SERVER4, server_sees=ROUTER4_S)


def test_client_mode_ipv4_on_dual_stack_socket(topo, servers, workdir):
    """`Listen: 10025` is an IPv6 socket taking IPv4 too: the IPv4 original destination."""
    require("redirect")
    topo.router.apply(netns.ROUTER_RECIPE_REDIRECT)
    server = start_server(topo, servers, "0.0.0.0")
    proxy = start_proxy(topo, workdir, TransparentProxy="client", Listen="10025")
    deliver(topo, server, proxy, CLIENT4, SERVER4, server_sees=ROUTER4_S)


def test_client_mode_ipv6(topo, servers, workdir):
    """IP6T_SO_ORIGINAL_DST after an ip6tables REDIRECT."""
    require("redirect6")
    topo.router.apply(netns.ROUTER_RECIPE_REDIRECT6)
    server = start_server(topo, servers, "::")
    proxy = start_proxy(topo, workdir, TransparentProxy="client", Listen="[::]:10025")
    deliver(topo, server, proxy, CLIENT6, SERVER6, server_sees=ROUTER6_S)


def test_client_mode_loop_detected(topo, servers, workdir):
    """A local connection to the router's own address redirected to the proxy."""
    require("redirect")
    topo.router.apply(netns.ROUTER_RECIPE_REDIRECT)
    topo.router.sh("iptables -t nat -A OUTPUT -p tcp -d %s --dport 25 "
                   "-j REDIRECT --to-ports 10025" % ROUTER4_C)
    server = start_server(topo, servers, "0.0.0.0")
    proxy = start_proxy(topo, workdir, TransparentProxy="client")
    first, closed = topo.router.call(connect_expecting_refusal, ROUTER4_C)
    assert first.startswith("421") and closed, (first, proxy.log())
    assert "loop detected" in proxy.log()
    assert server.connections == []
    assert proxy.stop() == 0 and proxy.spool_files() == []


def process_identity(pid: int) -> tuple[int, int]:
    """(effective uid, effective capability mask) of a process."""
    uid = caps = -1
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            if line.startswith("Uid:"):
                uid = int(line.split()[2])
            elif line.startswith("CapEff:"):
                caps = int(line.split()[1], 16)
    return uid, caps


# --- TLS in full transparency -------------------------------------------------------

def send_over_starttls(host: str, ca_file: str) -> dict:
    """One message to host:25 over STARTTLS, checking the certificate against
    the test CA for that address; the certificate the client saw."""
    context = ssl.create_default_context(cafile=ca_file)
    client = smtplib.SMTP(host, 25, timeout=20)
    client.starttls(context=context)
    seen = {"cert": client.sock.getpeercert(binary_form=True), "tls": client.sock.version()}
    seen["refused"] = client.sendmail("a@client.test", ["b@server.test"], MESSAGE)
    client.quit()
    return seen


def test_full_ipv4_tls_on_both_legs(topo, servers, workdir):
    """The client sees the proxy's certificate (issued for the server's address:
    that is who the client thinks it talks to); the server sees the client's
    address, over TLS checked against the server's certificate."""
    require("tproxy")
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    ca_file = workdir / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    proxy_cert = ca.issue_cert(SERVER4)
    chain, key = workdir / "proxy.pem", workdir / "proxy.key"
    chain.write_bytes(b"".join(blob.bytes() for blob in proxy_cert.cert_chain_pems))
    proxy_cert.private_key_pem.write_to_path(str(key))
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(SERVER4).configure_cert(server_context)
    topo.router.apply(netns.ROUTER_RECIPE_TPROXY)
    server = topo.server.call(RecordingServer, host="0.0.0.0", port=25,
                              extensions=("STARTTLS", "8BITMIME"), tls=server_context)
    servers.append(server)
    proxy = start_proxy(topo, workdir, TransparentProxy="full", TLSCertificate=chain,
                        TLSKey=key, ServerTLS="verify", TLSCAFile=ca_file,
                        FilterCommand='printf "X-TLS: %s|%s\\r\\n" "$CLIENT_TLS" "$SERVER_TLS"; cat')
    seen = topo.client.call(send_over_starttls, SERVER4, str(ca_file))
    assert seen["refused"] == {}, (seen, proxy.log())
    assert seen["cert"] == ssl.PEM_cert_to_DER_cert(proxy_cert.cert_chain_pems[0].bytes().decode())
    message = server.wait_messages(1)[0]
    conn = server.connections[message.conn]
    assert conn.peer[0] == CLIENT4 and conn.tls, (conn.peer, conn.tls)
    assert b"X-TLS: %s " % seen["tls"].encode() in message.raw
    assert b"|%s\r\n" % conn.tls.encode() in message.raw, message.raw
    assert proxy.stop() == 0, proxy.log()
    assert proxy.spool_files() == []
