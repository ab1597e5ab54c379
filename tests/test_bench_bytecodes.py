"""bench/bytecodes.py: the relay's bytecodes and calls per message, by
function, counted in-process against fake peers."""

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.session

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args: str) -> str:
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bytecodes.py"),
                           "--tree", ROOT, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def per_message(output: str) -> tuple[int, int]:
    match = re.search(r"(\d+) messages delivered; per message: (\d+) bytecodes, (\d+) calls", output)
    assert match, output
    return int(match.group(2)), int(match.group(3))


def test_every_message_is_delivered_and_counted_by_function():
    output = run("--messages", "40", "--lines", "Pump.on_news")
    assert output.startswith("40 messages delivered")
    bytecodes, calls = per_message(output)
    assert bytecodes > 1000 and calls > 50
    # the relay's hot functions are there, and on_news line by line
    assert "pump.py:Pump.relay_lines" in output
    assert "channel.py:Channel.data_received" in output
    assert re.search(r"pump\.py:\d+  if self\.relay_lines\(\) is WAIT:", output)


def test_the_count_repeats_and_a_reused_session_costs_less_per_message():
    first, second = per_message(run("--messages", "40")), per_message(run("--messages", "40"))
    assert first == second
    reused = per_message(run("--messages", "40", "--reuse", "10"))
    assert reused[0] < first[0] and reused[1] < first[1]


def test_the_node_leg_is_counted_and_another_client_costs_xclient_and_ehlo():
    none = per_message(run("--messages", "40"))
    output = run("--messages", "40", "--node")
    assert output.startswith("40 messages delivered")
    node = per_message(output)
    assert "node.py:_offer" in output and "nodepool.py:NodePeer.heard" in output
    clients = per_message(run("--messages", "40", "--node", "--helos", "5"))
    assert none[0] < node[0] < clients[0] and none[1] < node[1] < clients[1]
