"""CPU per message of the server leg with TLS against a real Postfix that
offers STARTTLS, with and without TLS session resumption.  ServerTLS
encrypt (may's handshake, with no certificate check): smtp-source says HELO,
and only encrypt and verify upgrade a HELO client's server leg.

One proxsmtpd (Workers 1, -d 2) relays to a throwaway Postfix with TLS
(tests/postfix.py: needs root); the load is smtp-source (20 sessions,
10 KB, a new session per message); the CPU is the proxy's process tree
(memory.cpu_seconds).  "full" is the same tree with the session cache
held at 0 entries (tlssessions.MAX_SESSIONS), so every handshake is a full
one; "plain" is ServerTLS off, for the share of TLS.  The rounds alternate
so that all see the same machine.  A last short run at -d 4 counts the
handshakes the log calls resumed.

    python bench/tlsresume.py [--messages 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import memory  # noqa: E402
import peers  # noqa: E402
import trustme  # noqa: E402
from harness import PYTHON, Proxy  # noqa: E402
from postfix import PostfixServer  # noqa: E402

# `python -c NO_CACHE python -m proxsmtp.cli ARGS`: the proxy without a session cache
NO_CACHE = ("import runpy, sys; import proxsmtp.net.tlssessions as t; t.MAX_SESSIONS = 0; "
            "sys.argv = ['proxsmtpd'] + sys.argv[4:]; "
            "runpy.run_module('proxsmtp.cli', run_name='__main__')")


def run(proxy: Proxy, messages: int) -> float:
    """Microseconds of the proxy's CPU per message for one smtp-source run."""
    before = memory.cpu_seconds(proxy.proc.pid)
    peers.source(proxy.port, 20, messages, 10240)
    return (memory.cpu_seconds(proxy.proc.pid) - before) / messages * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="proxsmtpd-tlsresume-"))
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    chain, key = work / "server.pem", work / "server.key"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key))
    server = PostfixServer(tls=(str(chain), str(key)))
    proxies: dict[str, Proxy] = {}
    try:
        for name in ("resumed", "full", "plain", "counted"):
            proxies[name] = Proxy(work / name, {"OutAddress": server.address, "Workers": 1,
                                                "ServerTLS": "off" if name == "plain" else
                                                "encrypt"},
                                  debug=4 if name == "counted" else 2)
        proxies["full"].wrapper = (PYTHON, "-c", NO_CACHE)
        for proxy in proxies.values():
            proxy.start()
        figures: dict[str, list[float]] = {"resumed": [], "full": [], "plain": []}
        for _ in range(args.rounds):
            for name in figures:
                figures[name].append(run(proxies[name], args.messages))
        for name, values in figures.items():
            print("%-8s CPU us/msg: median %.0f (%s)" % (
                name, statistics.median(values), ", ".join("%.0f" % v for v in values)))
        peers.source(proxies["counted"].port, 20, 100, 10240)
        log = proxies["counted"].log()
        handshakes = re.findall(r"TLS: (TLSv1\S* \S+)( resumed)?$", log, re.M)
        print("-d 4, 100 messages: %d server handshakes, %d resumed (%s)" % (
            len(handshakes), sum(1 for h in handshakes if h[1]),
            handshakes[0][0] if handshakes else "-"))
    finally:
        for proxy in proxies.values():
            if proxy.proc is not None:
                proxy.stop()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
