#!/usr/bin/env python3
"""The spawn floor: CPU to run a filter program from a worker-sized Python process.

FilterType pipe spawns `/bin/sh -c FilterCommand` per message
(proxsmtp/filters/process.py: subprocess with close_fds and a session of
its own, pipes for stdin, stdout and stderr).  This program imports what a
proxsmtpd worker imports (so the process it forks from is about as big),
then spawns COMMAND as the worker does, COUNT times, writes a message of
SIZE bytes to it, reads its output and waits for it, and prints as JSON
the CPU per spawn of itself and its reaped children (user,
system, children's user and system, from getrusage).  bench/run.py puts the pipe row's
cost over `none` beside it: how far the pipe path is above the floor.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys


def worker_sized(tree: str) -> None:
    """Import the modules a proxsmtpd worker runs with (the tree's own)."""
    sys.path.insert(0, tree)
    for module in ("proxsmtp.cli", "proxsmtp.process.worker", "uvloop"):
        try:
            importlib.import_module(module)
        except ImportError:
            pass


def spawn_once(argv: list[str], message: bytes) -> None:
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={"PATH": "/usr/bin:/bin"},
                            close_fds=True, start_new_session=True)
    out, _ = proc.communicate(message)
    if proc.returncode != 0 or len(out) != len(message):
        raise SystemExit("%s: exit %s, %d bytes out" % (argv, proc.returncode, len(out)))


def cpu_per_spawn(argv: list[str], count: int, size: int) -> float:
    """Microseconds of CPU (this process and its reaped children) per spawn."""
    message = b"x" * (size - 2) + b"\r\n"
    spawn_once(argv, message)       # warm-up: the page cache, the shell's first start
    before = cpu_seconds()
    for _ in range(count):
        spawn_once(argv, message)
    return 1e6 * (cpu_seconds() - before) / count


def cpu_seconds() -> float:
    """User and system time of this process and its reaped children (rusage:
    microseconds, where os.times() has clock ticks)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), \
        resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--size", type=int, default=10240)
    parser.add_argument("--tree", default=os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), help="the source tree whose modules are imported")
    args = parser.parse_args()
    worker_sized(args.tree)
    result = {"shell_us": cpu_per_spawn(["/bin/sh", "-c", "cat"], args.count, args.size),
              "exec_us": cpu_per_spawn(["cat"], args.count, args.size),
              "count": args.count, "size": args.size}
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
