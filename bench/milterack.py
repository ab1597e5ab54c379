#!/usr/bin/env python3
"""What TCP_NODELAY and TCP_QUICKACK are worth on a milter connection.

Starts tests/milters/testmilter.py (Sendmail's libmilter, python3-milter,
run by /usr/bin/python3) on a free loopback port, then sends `--count`
messages one after another through one MilterChain (one connection, as a
client session with many messages keeps it): MAIL, RCPT, DATA, headers,
body, end of message, where the milter adds a header (two answer packets:
the change, then the verdict), then ABORT.  Prints messages per second for:

    plain       neither option
    nodelay     TCP_NODELAY
    quickack    TCP_NODELAY and TCP_QUICKACK (set again after every read): the engine's way

    .venv/bin/python bench/milterack.py [--count 300] [--rounds 3]

Each way runs `--rounds` times, interleaved; the median is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "tests")]

from harness import free_port, stop_process, wait_until  # noqa: E402
from milterpeers import reachable  # noqa: E402

from proxsmtp.filters import milter  # noqa: E402
from proxsmtp.filters.milterchain import MilterChain  # noqa: E402
from proxsmtp.message.spool import Spool  # noqa: E402
from proxsmtp.net.addresses import parse_milter  # noqa: E402
from proxsmtp.process.config import Config  # noqa: E402

MESSAGE = (b"Subject: bench\r\nFrom: <a@example.org>\r\nTo: <b@example.org>\r\n"
           b"X-Test-Milter: addheader X-Bench yes\r\n\r\n" + b"line of a body\r\n" * 60)
WAYS = {"plain": (False, False), "nodelay": (True, False), "quickack": (True, True)}


async def messages(spec: str, count: int, directory: str) -> float:
    chain = MilterChain(Config(Milters=(parse_milter(spec),)), "bench")
    await chain.connect({}, "client", "inet", 1, "192.0.2.1")
    await chain.helo("client", {})
    start = time.perf_counter()
    for _ in range(count):
        await chain.mail(["<a@example.org>"], {})
        await chain.rcpt(["<b@example.org>"], {})
        await chain.data({})
        spool = Spool(directory, in_memory=True)
        spool.write(MESSAGE)
        spool.finish()
        outcome = await chain.message(spool, {}, "<a@example.org>", ["<b@example.org>"],
                                      directory)
        assert outcome.answer.action == "continue", outcome.answer
        outcome.message.remove()
        chain.abort()
    elapsed = time.perf_counter() - start
    chain.close()
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    spec = "inet:127.0.0.1:%d" % free_port()
    proc = subprocess.Popen(["/usr/bin/python3",
                             os.path.join(os.path.dirname(HERE), "tests", "milters",
                                          "testmilter.py"), spec],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    results: dict[str, list[float]] = {way: [] for way in WAYS}
    try:
        wait_until(lambda: reachable(spec), 20, what="the test milter")
        with tempfile.TemporaryDirectory() as directory:
            for _ in range(args.rounds):
                for way, (nodelay, quickack) in WAYS.items():
                    milter.NODELAY, milter.QUICKACK = nodelay, quickack
                    results[way].append(asyncio.run(messages(spec, args.count, directory)))
    finally:
        stop_process(proc, group=True)
    for way, rates in results.items():
        print("%-9s %8.1f msg/s  (%s)" % (way, statistics.median(rates),
                                         " ".join("%.1f" % rate for rate in rates)))


if __name__ == "__main__":
    main()
