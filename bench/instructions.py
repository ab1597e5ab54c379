#!/usr/bin/env python3
"""Instructions per message: a cost figure without the machine's noise.

CPU time per message moves by ±5-15 % between rounds on a shared 2-core
machine, so a change worth 3 % cannot be told from noise by bench/ab.py
without many rounds.  Counted instructions do not move: this runs each
proxy under valgrind's callgrind (`Workers: 1`, or `--workers 1` for
floor.py), sends a warm-up, zeroes the counters, sends the load
(smtp-source, 20 sessions, 10 KB, a new session per message), dumps the
counters and prints the user-space instructions the serving process
executed per message, split by where they ran (the interpreter, libc, uvloop).
Two runs of the same tree give the same figure to within 0.1 %.

    .venv/bin/python bench/instructions.py before=/work/wt/base after=. --floor

What it does not count: the kernel (system calls, TCP, wake-ups: about
half of the CPU time in `make bench`), and time (a cheap instruction and a
cache miss count alike).  It is for comparing builds, not for the targets.
Needs valgrind (`apt-get install valgrind`); the proxy runs about 50 times
slower under it, so the load is small (`--messages`, default 300).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import memory  # noqa: E402
import peers  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
LAUNCHER = """#!{python}
import sys
sys.path.insert(0, {tree!r})
from proxsmtp.cli import main
sys.exit(main())
"""
WARM_UP = 60
# The objects a figure is split by, matched on their paths (the rest is
# "other"): the interpreter is libpython*.so, or the python binary itself
# where it is linked statically (Debian's /usr/bin/python3.11).
PARTS = (("python", re.compile(r"/(lib)?python3[^/]*$")), ("libc", re.compile(r"/libc\.so[^/]*$")),
         ("uvloop", re.compile(r"/uvloop/")))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("trees", nargs="*", metavar="NAME=TREE",
                        help="a label and the source tree (with proxsmtp/) it runs")
    parser.add_argument("--floor", action="store_true", help="also bench/floor.py, the contract floor")
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--clients", type=int, default=1, metavar="N",
                        help="N smtp-source processes, each with its own HELO name")
    parser.add_argument("--setting", action="append", default=[], metavar="NAME:VALUE",
                        help="an extra proxsmtpd setting (repeatable)")
    args = parser.parse_args(argv)
    for item in args.trees:
        name, _, tree = item.partition("=")
        if not name or not os.path.isdir(os.path.join(tree, "proxsmtp")):
            parser.error("%s: expected NAME=TREE, TREE a checkout with proxsmtp/" % item)
    if not args.trees and not args.floor:
        parser.error("nothing to measure: give NAME=TREE or --floor")
    return args


def proxy_argv(name: str, tree: str, port: int, sink_port: int, workdir: str,
               settings: list[str]) -> list[str]:
    """proxsmtpd from `tree` with one worker, in the foreground."""
    launcher = os.path.join(workdir, "proxsmtpd-" + name)
    with open(launcher, "w") as handle:
        handle.write(LAUNCHER.format(python=sys.executable, tree=os.path.abspath(tree)))
    os.chmod(launcher, 0o755)
    spool = os.path.join(workdir, "spool-" + name)
    os.makedirs(spool, exist_ok=True)
    conf = os.path.join(workdir, name + ".conf")
    with open(conf, "w") as handle:
        handle.write("Listen: %s:%d\nOutAddress: %s:%d\nMaxConnections: 4000\n"
                     "TempDirectory: %s\nWorkers: 1\n" % (peers.HOST, port, peers.HOST, sink_port, spool))
        handle.writelines(setting + "\n" for setting in settings)
    return [launcher, "-d", "0", "-f", conf]


def floor_argv(port: int, sink_port: int) -> list[str]:
    return [sys.executable, os.path.join(HERE, "floor.py"), "%s:%d" % (peers.HOST, port),
            "%s:%d" % (peers.HOST, sink_port), "--workers", "1"]


def measure(name: str, argv: list[str], port: int, sink_port: int, workdir: str,
            messages: int, clients: int = 1) -> dict[str, float]:
    """Instructions per message of the busiest process of `argv` under callgrind."""
    out = os.path.join(workdir, "callgrind-%s.%%p" % name)
    # --trace-children: without it the forked worker ignores callgrind_control.
    peer = peers.Peer(name, ["valgrind", "--tool=callgrind", "--trace-children=yes",
                       "--callgrind-out-file=" + out] + argv,
                      workdir)
    peer.start(port, timeout=180)
    try:
        peers.source(port, 20, WARM_UP, 10240, clients=clients)
        # The proxy's own processes by pid (the master and the worker it
        # forked): without pids callgrind_control acts on every callgrind run
        # on the machine, another bench's too, and the figures go wrong.
        pids = [str(pid) for pid in memory.family(peer.pid)]
        subprocess.run(["callgrind_control", "--zero", *pids], capture_output=True, check=False)
        peers.source(port, 20, messages, 10240, clients=clients)
        subprocess.run(["callgrind_control", "--dump", *pids], capture_output=True, check=False)
        time.sleep(2)       # the dump is written when the process next runs
    finally:
        peer.stop(timeout=60)
    dumps = [path for path in glob.glob(out.replace("%p", "*")) if path.endswith(".1")]
    if not dumps:
        raise peers.PeerError("%s: callgrind left no dump" % name)
    costs = max((by_object(path) for path in dumps), key=lambda cost: sum(cost.values()))
    return split(costs, messages)


def split(costs: collections.Counter, messages: int) -> dict[str, float]:
    """Instructions per message: the total, and the share of each of PARTS."""
    figures = {"total": sum(costs.values()) / messages}
    for part, name in PARTS:
        figures[part] = sum(cost for obj, cost in costs.items()
                            if name.search(obj)) / messages
    return figures


_NAMED = re.compile(r"c?ob=\((\d+)\)(?: (.*))?")


def by_object(path: str) -> collections.Counter:
    """The self cost (instructions) of each shared object in a callgrind dump.

    The format names an object once (`ob=(7) /usr/lib/...`) and refers to it
    by number later; a `calls=` line is followed by the inclusive cost of
    that call, which is the callee's and is skipped here."""
    names: dict[str, str] = {}
    costs: collections.Counter = collections.Counter()
    current = ""
    after_call = False
    with open(path, errors="replace") as handle:
        for line in handle:
            if line.startswith(("ob=", "cob=")):
                match = _NAMED.match(line.strip())
                if match:
                    if match.group(2):
                        names[match.group(1)] = match.group(2)
                    if line.startswith("ob="):
                        current = names.get(match.group(1), "?")
            elif line.startswith("calls="):
                after_call = True
            elif line[:1].isdigit() or line[:1] in "+-*":
                if after_call:
                    after_call = False
                    continue
                fields = line.split()
                if len(fields) > 1:
                    costs[current] += int(fields[1])
    return costs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("instructions: needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    peers.raise_nofile()
    workdir = tempfile.mkdtemp(prefix="proxsmtpd-instructions-")
    sink = None
    try:
        sink_port = peers.free_port()
        sink = peers.sink("sink", sink_port, workdir)
        runs = [(name, tree) for name, _, tree in (item.partition("=") for item in args.trees)]
        if args.floor:
            runs.append(("floor", None))
        print("user-space instructions per message (k), %d messages of 10240 bytes, "
              "20 sessions, one process" % args.messages)
        print("  %-12s %8s %10s %8s %8s %8s" % ("path", "total", "python", "libc", "uvloop",
                                             "x floor" if args.floor else ""))
        results = {}
        for name, tree in runs:
            port = peers.free_port()
            argv = (floor_argv(port, sink_port) if tree is None else
                    proxy_argv(name, tree, port, sink_port, workdir, args.setting))
            results[name] = measure(name, argv, port, sink_port, workdir, args.messages,
                                    args.clients)
        for name, figures in results.items():
            ratio = ("%8.2f" % (figures["total"] / results["floor"]["total"])
                     if args.floor else "")
            print("  %-12s %8.0f %10.0f %8.0f %8.0f %s" % (
                name, figures["total"] / 1000, figures["python"] / 1000,
                figures["libc"] / 1000, figures["uvloop"] / 1000, ratio))
    except peers.PeerError as exc:
        print("instructions: %s" % exc, file=sys.stderr)
        return 2
    finally:
        if sink is not None:
            sink.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
