"""The scale-out topology of the README ("Many proxsmtpd nodes behind a load
balancer"): a real haproxy with the README's configuration (`mode tcp`,
`balance roundrobin`, `send-proxy-v2`, `check`) in front of two proxsmtpd
instances with `ProxyProtocol: on`.

Clients bind different 127.0.0.x sources, so the address each filter run and
the server see can be told apart from haproxy's own (127.0.0.1).  One
instance stopped: haproxy's check takes it out and mail keeps flowing; both
stopped: no client hears 250 and nothing is delivered.
"""

from __future__ import annotations

import shutil

import pytest

from harness import Client, send_mail
from test_docs import readme_blocks
from test_haproxy import HAPROXY, Haproxy

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

GLOBAL = """\
global
    stats socket {stats} mode 600 level admin

defaults
    timeout connect 2s
    timeout client 60s
    timeout server 60s

"""


def readme_haproxy() -> str:
    """The README's haproxy configuration, on loopback ports, checking often."""
    [block] = [block for block in readme_blocks() if "send-proxy-v2 check" in block]
    config = (block.replace("bind 10.0.0.5:25", "bind 127.0.0.1:{front}")
              .replace("10.0.0.11:10025", "127.0.0.1:{port1}")
              .replace("10.0.0.12:10025", "127.0.0.1:{port2}")
              .replace(" check\n", " check inter 200ms fall 2 rise 1\n"))
    assert config.count("127.0.0.1:{port") == 2 and config.count("inter 200ms") == 2, config
    return GLOBAL + config


@pytest.fixture
def nodes(proxy, make_upstream, tmp_path):
    """Two proxsmtpd instances behind the balancer, one server advertising XCLIENT."""
    if not shutil.which(HAPROXY):
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    server = make_upstream(extensions=("XCLIENT ADDR NAME HELO", "8BITMIME"))
    instances = []
    for number in (1, 2):
        seen = tmp_path / ("clients%d" % number)
        seen.touch()
        instances.append(proxy({
            "OutAddress": server.address, "ProxyProtocol": "on",
            "ProxyProtocolFrom": "127.0.0.1", "XClient": "on", "Workers": 1,
            "Header": "X-Node: node%d for %%i" % number,
            "FilterCommand": 'echo "$CLIENT" >> %s; cat' % seen}, debug=3))
        instances[-1].seen = seen
    return server, instances


@pytest.fixture
def balancer(tmp_path, nodes):
    _, (node1, node2) = nodes
    instance = Haproxy(tmp_path, node1.port, node2.port, readme_haproxy(), backend="proxsmtpd")
    try:
        instance.wait_status({"gw1": "UP", "gw2": "UP"})
        yield instance
    finally:
        instance.stop()


def mail_from(balancer, source: str, number: int) -> list[str]:
    with Client("127.0.0.1", balancer.front, 20, source) as client:
        assert client.greeting and client.greeting[-1].startswith("220"), client.greeting
        reply = send_mail(client, "a@client.test", ["rcpt%d@server.test" % number],
                          b"Subject: %d\r\n\r\nmessage %d\r\n" % (number, number))
        client.cmd("QUIT")
    return reply


def test_two_nodes_behind_haproxy(nodes, balancer):
    server, (node1, node2) = nodes
    sources = ["127.0.0.%d" % (11 + n) for n in range(4)]
    for number, source in enumerate(sources):
        assert mail_from(balancer, source, number)[-1].startswith("250")
    delivered = server.wait_messages(4)
    # Each message: the server heard the original client in XCLIENT and in the Header.
    for message in delivered:
        number = int(message.recipients[0][4:].split("@")[0])
        assert message.xclient == ["XCLIENT ADDR=%s" % sources[number]]
        assert b" for %s\r\n" % sources[number].encode() in message.raw
    # roundrobin: both nodes filtered mail, and their filters saw the clients' addresses.
    seen1, seen2 = node1.seen.read_text().split(), node2.seen.read_text().split()
    assert seen1 and seen2, (seen1, seen2)
    assert sorted(seen1 + seen2) == sources
    for node in (node1, node2):              # never haproxy's own address
        assert "client=127.0.0.1," not in node.log()

    node1.stop()
    balancer.wait_status({"gw1": "DOWN", "gw2": "UP"})
    for number in range(4, 8):
        assert mail_from(balancer, "127.0.0.20", number)[-1].startswith("250")
    assert node2.seen.read_text().split().count("127.0.0.20") == 4
    assert len(server.wait_messages(8)) == 8

    node2.stop()
    balancer.wait_status({"gw1": "DOWN", "gw2": "DOWN"})
    for number in range(8, 10):
        with Client("127.0.0.1", balancer.front, 20, "127.0.0.21") as client:
            replies = [client.greeting]
            if client.greeting:              # haproxy has nowhere to send it: it closes
                replies.append(client.cmd("EHLO x.example"))
            assert not any(reply and reply[-1].startswith("250") for reply in replies), replies
    assert len(server.messages) == 8
