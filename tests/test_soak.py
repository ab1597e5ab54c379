"""Conservation under load: parallel clients, a filter whose verdict
is random per message, an upstream that now and then drops the connection or
defers, and an exact account of every message afterwards.

Every message carries a unique id, its fate (chosen at random) and a checksum
of its body.  At the end: each message the client was told 250 for is at the
server exactly once and intact; no refused message is there; every message
got exactly one final answer; no temp file is left.

`make soak` runs a longer variant (SOAK_SCALE=10: ten times the messages).
"""

from __future__ import annotations

import collections
import hashlib
import os
import random
import re
import socket
import threading
import zlib

import pytest

from harness import Client, RecordingServer, wait_until

pytestmark = [pytest.mark.system, pytest.mark.slow]

SCALE = max(1, int(os.environ.get("SOAK_SCALE", "1")))
CLIENTS = 8
PER_CLIENT = 55 * SCALE             # 440 messages at scale 1

# How a message should fare, and how often (per cent).
FATES = {"pass": 62, "reject-code": 10, "reject-text": 10, "crash": 8, "timeout": 2,
         "upstream-drop": 4, "upstream-defer": 2, "envelope-drop": 2}

FILTER = r"""
fate=$(grep -m1 '^X-Soak-Fate:' /dev/stdin)
case "$fate" in
  *reject-code*) echo '554 5.7.1 soak reject' >&2; exit 1 ;;
  *reject-text*) echo 'soak says no' >&2; exit 1 ;;
  *crash*) kill -SEGV $$ ;;
  *timeout*) exec sleep 30 ;;
esac
exec cat
"""

EXPECTED = {"reject-code": "554 5.7.1 soak reject", "reject-text": "550 Content Rejected; soak says no",
            "crash": "451 Local Error", "timeout": "451 Local Error"}


def fate_of(raw: bytes) -> str:
    match = re.search(rb"^X-Soak-Fate: (\S+)", raw, re.M)
    return match.group(1).decode() if match else ""


def id_of(raw: bytes) -> str:
    match = re.search(rb"^X-Soak-Id: (\S+)", raw, re.M)
    return match.group(1).decode() if match else ""


def upstream_data_reply(message, conn) -> str:
    """Drops the connection before its final reply, or defers, when the
    message says so; else accepts it."""
    fate = fate_of(message.raw)
    if fate == "upstream-drop":
        conn.sock.shutdown(socket.SHUT_RDWR)
        return ""
    if fate == "upstream-defer":
        return "451 4.3.0 soak upstream busy"
    return "250 2.0.0 Ok: queued as %s" % id_of(message.raw)


def upstream_rcpt_reply(line, conn) -> str | None:
    return None if "envelope-drop" in line else "250 2.1.5 Ok"


def make_body(rng: random.Random, ident: str, fate: str) -> bytes:
    """Headers naming the message, then a body of random size and shape (lone
    dots, dot-stuffed lines, long lines) with its CRC in a header."""
    lines = []
    for _ in range(rng.choice([1, 5, 40, 400] + [3000] * (rng.random() < 0.05))):
        kind = rng.random()
        if kind < 0.05:
            lines.append(b"..")                  # a stuffed lone dot
        elif kind < 0.1:
            lines.append(b"..stuffed")
        elif kind < 0.12:
            lines.append(b"x" * rng.randint(900, 3000))
        else:
            line = bytes(rng.choice(b"abcdefghij .,") for _ in range(rng.randint(0, 76)))
            lines.append(b"." + line if line.startswith(b".") else line)     # dot-stuffed
    body = b"\r\n".join(lines) + b"\r\n"
    head = (b"Subject: soak\r\nX-Soak-Id: %s\r\nX-Soak-Fate: %s\r\nX-Soak-Sum: %08x\r\n\r\n"
            % (ident.encode(), fate.encode(), zlib.crc32(body)))
    return head + body


class Ledger:
    """What each client was told, per message id."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.told: dict[str, str] = {}
        self.fate: dict[str, str] = {}
        self.bodies: dict[str, str] = {}

    def record(self, ident: str, fate: str, answer: str, body: bytes) -> None:
        with self.lock:
            assert ident not in self.told
            self.told[ident] = answer
            self.fate[ident] = fate
            self.bodies[ident] = hashlib.sha256(body).hexdigest()


def run_client(number: int, address: tuple[str, int], ledger: Ledger, errors: list) -> None:
    rng = random.Random(7919 * number + SCALE)
    fates, weights = zip(*FATES.items())
    client = None
    try:
        for n in range(PER_CLIENT):
            ident = "c%d-%d" % (number, n)
            fate = rng.choices(fates, weights)[0]
            body = make_body(rng, ident, fate)
            if client is None or rng.random() < 0.2:
                if client is not None:
                    client.cmd("QUIT")
                    client.close()
                client = Client(*address, timeout=60)
                assert client.greeting[0].startswith("220"), client.greeting
                assert client.cmd("EHLO soak%d.example" % number)[-1].startswith("250")
            answer = transaction(client, ident, fate, body)
            ledger.record(ident, fate, answer, body)
            if not answer.startswith(("2", "5")) or fate == "envelope-drop":
                client.close()          # after a 4xx the proxy may have closed: start over
                client = None
    except BaseException as exc:        # reported by the test, not lost in the thread
        errors.append((number, repr(exc)))
    finally:
        if client is not None:
            client.close()


def transaction(client: Client, ident: str, fate: str, body: bytes) -> str:
    """MAIL, RCPT, DATA, the body: the one final answer (or `closed`)."""
    rcpt = "envelope-drop-%s@y.test" % ident if fate == "envelope-drop" else "%s@y.test" % ident
    for line in ("MAIL FROM:<%s@x.test>" % ident, "RCPT TO:<%s>" % rcpt):
        reply = client.cmd(line)
        if not reply:
            return "closed"
        if not reply[-1].startswith("250"):
            return reply[-1]
    reply = client.cmd("DATA")
    if not reply or not reply[-1].startswith("354"):
        return reply[-1] if reply else "closed"
    client.send(body + b".\r\n")
    reply = client.reply()
    return "\n".join(reply) if reply else "closed"


def test_conservation_under_load(proxy, tmp_path):
    upstream = RecordingServer(data_reply=upstream_data_reply,
                               replies={"RCPT": upstream_rcpt_reply})
    script = tmp_path / "soak-filter.sh"
    script.write_text(FILTER)
    try:
        px = proxy({"OutAddress": upstream.address, "FilterCommand": "sh %s" % script,
                    "FilterTimeout": 1, "TimeOut": 30, "Workers": 2, "MaxConnections": 64},
                   debug=3)
        ledger, errors = Ledger(), []
        threads = [threading.Thread(target=run_client, args=(n, px.address, ledger, errors))
                   for n in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(600 * SCALE)
        assert not any(thread.is_alive() for thread in threads)
        assert errors == []
        check_ledger(ledger, upstream)
        wait_until(lambda: not px.spool_files(), 10, what="no temp files")
        log = px.log()
        assert "Traceback" not in log and "local error" not in log
    finally:
        upstream.stop()


def ledger_count(ledger: Ledger, fate: str) -> int:
    return sum(1 for f in ledger.fate.values() if f == fate)


def check_ledger(ledger: Ledger, upstream: RecordingServer) -> None:
    total = CLIENTS * PER_CLIENT
    assert len(ledger.told) == total                    # one final answer per message
    delivered = collections.Counter(id_of(m.raw) for m in upstream.messages)
    told_250 = {i for i, answer in ledger.told.items() if answer.startswith("250")}
    refused = set(ledger.told) - told_250
    # Every 250 is the server's own, for that message, which it holds exactly once.
    for ident in told_250:
        assert ledger.told[ident] == "250 2.0.0 Ok: queued as %s" % ident, ledger.told[ident]
        assert delivered[ident] == 1, (ident, delivered[ident])
    assert set(delivered) == told_250, set(delivered) ^ told_250
    # What arrived is what was sent (dot-stuffing as on the wire), CRC inside.
    for message in upstream.messages:
        ident = id_of(message.raw)
        assert hashlib.sha256(message.raw + b"\r\n").hexdigest() == ledger.bodies[ident], ident
        head, _, body = message.raw.partition(b"\r\n\r\n")
        crc = int(re.search(rb"^X-Soak-Sum: (\w+)", head, re.M).group(1), 16)
        assert zlib.crc32(body + b"\r\n") == crc, ident
    # Each fate got the answer it asks for.
    for ident in refused:
        fate, answer = ledger.fate[ident], ledger.told[ident]
        if fate in EXPECTED:
            assert answer == EXPECTED[fate], (ident, fate, answer)
        elif fate == "upstream-drop":
            assert answer == "451 Local Error", (ident, answer)
        elif fate == "upstream-defer":
            assert answer == "451 4.3.0 soak upstream busy", (ident, answer)
        elif fate == "envelope-drop":
            assert answer.startswith("421"), (ident, answer)
        else:
            raise AssertionError("a message to pass was refused: %s %r" % (ident, answer))
    for ident in told_250:
        assert ledger.fate[ident] == "pass", ident
    # The dropped and deferred ones reached the server, which never accepted them.
    accepted_or_not = collections.Counter(fate_of(m.raw) for m in upstream.rejected)
    assert accepted_or_not["upstream-drop"] == ledger_count(ledger, "upstream-drop")
    assert accepted_or_not["upstream-defer"] == ledger_count(ledger, "upstream-defer")
    for fate in FATES:
        assert ledger_count(ledger, fate) > 0, fate
    print("soak: %d messages, %d delivered; fates %s" % (
        total, len(told_250), dict(collections.Counter(ledger.fate.values()))))
