"""Several filter nodes behind haproxy (the seed README's "Multiple Halon nodes").

proxsmtpd asks `FilterType: smtp` / `FilterCommand: 127.0.0.1:<port>` for each
verdict; a real haproxy (`mode tcp`, `balance roundrobin`, `option smtpchk`)
spreads those sessions over two filter nodes (RecordingServers answering
XCLIENT with 220 and accepting), and takes a node out once its health check
fails.  Everything is on loopback; haproxy is stopped by pid.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from harness import RecordingServer, free_port, send_mail, stop_process, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
MESSAGE = b"From: a@client.test\r\nSubject: verdict\r\n\r\nbody\r\n"

HAPROXY_CFG = """\
global
    stats socket {stats} mode 600 level admin

defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s

frontend localnodes
    bind 127.0.0.1:{front}
    mode tcp
    default_backend halons

backend halons
    mode tcp
    balance roundrobin
    option smtpchk
    server out1 127.0.0.1:{port1} check inter 200ms fall 2 rise 1
    server out2 127.0.0.1:{port2} check inter 200ms fall 2 rise 1
"""


class Haproxy:
    """haproxy -db (foreground) with a generated config; its state from the stats socket.
    `template` is formatted with stats, front, port1 and port2; its backend is `backend`."""

    def __init__(self, workdir: Path, port1: int, port2: int, template: str = HAPROXY_CFG,
                 backend: str = "halons") -> None:
        self.front = free_port()
        self.backend = backend
        self.stats = workdir / "haproxy.sock"
        self.cfg = workdir / "haproxy.cfg"
        self.cfg.write_text(template.format(stats=self.stats, front=self.front,
                                            port1=port1, port2=port2))
        self.log = workdir / "haproxy.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(self.cfg)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    def status(self) -> dict[str, str]:
        """{server name: UP/DOWN/...} of the backend, from `show stat`."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(str(self.stats))
                sock.sendall(b"show stat\n")
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
        except OSError:
            return {}
        rows = data.decode().splitlines()
        if not rows or not rows[0].startswith("# "):
            return {}
        header = rows[0][2:].split(",")
        result = {}
        for row in rows[1:]:
            fields = dict(zip(header, row.split(",")))
            if fields.get("pxname") == self.backend and fields.get("svname") not in ("BACKEND", None):
                result[fields["svname"]] = fields["status"]
        return result

    def wait_status(self, wanted: dict[str, str], timeout: float = 15.0) -> None:
        try:
            wait_until(lambda: self.proc.poll() is not None or
                       all(self.status().get(name, "").startswith(state)
                           for name, state in wanted.items()), timeout, what=str(wanted))
        except AssertionError:
            raise AssertionError("haproxy never reported %s (now %s):\n%s"
                                 % (wanted, self.status(), self.log.read_text())) from None
        assert self.proc.poll() is None, "haproxy exited:\n%s" % self.log.read_text()

    def stop(self) -> None:
        stop_process(self.proc, 10)


@pytest.fixture
def nodes():
    started = [RecordingServer(name="node1.test"), RecordingServer(name="node2.test")]
    yield started
    for node in started:
        node.stop()


@pytest.fixture
def haproxy(tmp_path, nodes):
    if not shutil.which(HAPROXY):
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    instance = Haproxy(tmp_path, nodes[0].port, nodes[1].port)
    try:
        instance.wait_status({"out1": "UP", "out2": "UP"})
        yield instance
    finally:
        instance.stop()
    assert instance.proc.returncode is not None


def send(proxy, number: int) -> list[str]:
    """One message through the proxy; the client's final reply."""
    with proxy.connect() as client:
        reply = send_mail(client, "a@client.test", ["rcpt%d@server.test" % number],
                          MESSAGE + b"message %d\r\n" % number)
        client.cmd("QUIT")
    return reply


def test_verdicts_balanced_and_failed_over(proxy, upstream, nodes, haproxy):
    """Both nodes get work; one down: the other takes it all; none: 4xx, nothing delivered.
    (A connection per message, FilterConnections 0: haproxy picks a node for each;
    with kept connections see tests/test_filter_pool.py.)"""
    node1, node2 = nodes
    instance = proxy({"OutAddress": upstream.address, "FilterType": "smtp",
                      "FilterCommand": "127.0.0.1:%d" % haproxy.front, "FilterTimeout": 5,
                      "FilterConnections": 0})

    for number in range(4):
        reply = send(instance, number)
        assert reply[-1].startswith("250"), (reply, instance.log())
    upstream.wait_messages(4)
    assert len(node1.messages) > 0 and len(node2.messages) > 0, \
        "roundrobin didn't spread: %d/%d" % (len(node1.messages), len(node2.messages))
    assert len(node1.messages) + len(node2.messages) == 4
    assert all(m.xclient and m.xclient[0].startswith("XCLIENT ADDR=127.0.0.1")
               for m in node1.messages + node2.messages)

    node1.stop()
    haproxy.wait_status({"out1": "DOWN", "out2": "UP"})
    before = len(node2.messages)
    for number in range(4, 8):
        reply = send(instance, number)
        assert reply[-1].startswith("250"), (reply, instance.log())
    assert len(node2.messages) == before + 4
    delivered = upstream.wait_messages(8)
    assert sorted(m.recipients[0] for m in delivered) == \
        ["rcpt%d@server.test" % n for n in range(8)]

    node2.stop()
    haproxy.wait_status({"out1": "DOWN", "out2": "DOWN"})
    for number in range(8, 10):
        reply = send(instance, number)
        assert reply[-1][:1] == "4", (reply, instance.log())
    assert len(upstream.messages) == 8
    assert instance.log().count("status=FILTER-ERROR") == 2, instance.log()
