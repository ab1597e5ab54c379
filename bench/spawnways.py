#!/usr/bin/env python3
"""The ways to spawn a filter command, side by side: CPU per spawn.

(bench/spawn.py gives make bench its one floor figure; this compares the
ways of getting there.)

From a process the size of a worker (proxsmtp imported, a uvloop loop
running), spawns `--count` times a command that reads a 10 KB message on
stdin and writes it to a file, and prints the CPU (user + system, this
process and its reaped children) per spawn, for these ways:

    sh-popen     /bin/sh -c cat with subprocess.Popen as FilterProcess does
                 (close_fds, start_new_session, stderr pipe, env copied,
                 waited for with waitpid)
    cat-popen    the same, `cat` (its full path) without /bin/sh
    sh-smallenv  sh-popen with a 10-variable environment instead of os.environ
    cat-nolocale cat-popen without the locale variables (LANG, LC_*): setlocale(3)
                 of LANG=C.UTF-8 opens some 30 files in every program that calls it
    sh-spawn     os.posix_spawn (glibc: clone(CLONE_VM|CLONE_VFORK)) with setsid
    cat-spawn    the same without /bin/sh
    sh-filter    proxsmtp's FilterProcess and supervise(): the whole pipe path
                 but the spool and the SMTP legs (the pidfd, stderr reader, progress)
    cat-filter   the same for a command run without /bin/sh, as `cat` is now

    .venv/bin/python bench/spawnways.py [--count 400] [--rounds 3] [--tree DIR]

Each way runs `--rounds` times, interleaved; the median is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile

BODY = b"Subject: bench\r\n\r\n" + b"La de da de da.\r\n" * 600


def cpu() -> tuple[float, float]:
    """CPU seconds of this process and its children, of this process alone."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = me.ru_utime + me.ru_stime
    return own + kids.ru_utime + kids.ru_stime, own


def popen(argv: list[str], env: dict[str, str], src: str, dst: str) -> None:
    with open(src, "rb") as stdin, open(dst, "wb") as stdout:
        proc = subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE,
                                env=env, close_fds=True, start_new_session=True)
        proc.stderr.read()
        proc.stderr.close()
        proc.wait()


def spawn(argv: list[str], env: dict[str, str], src: str, dst: str) -> None:
    with open(src, "rb") as stdin, open(dst, "wb") as stdout:
        rd, wr = os.pipe()
        pid = os.posix_spawn(argv[0], argv, env, setsid=True, file_actions=[
            (os.POSIX_SPAWN_DUP2, stdin.fileno(), 0), (os.POSIX_SPAWN_DUP2, stdout.fileno(), 1),
            (os.POSIX_SPAWN_DUP2, wr, 2)])
        os.close(wr)
        while os.read(rd, 65536):
            pass
        os.close(rd)
        os.waitpid(pid, 0)


async def filtered(command: str, env: dict[str, str], src: str, dst: str) -> None:
    from proxsmtp.filters import process

    async def keepalive() -> None:
        pass

    with open(src, "rb") as stdin:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            proc = process.FilterProcess(command, stdin, fd, dict(env))
            try:
                status, _ = await process.supervise(30, "bench", keepalive, proc, stdin, fd)
            finally:
                proc.close()
        finally:
            os.close(fd)
    assert status == 0, status


async def measure(ways: dict, count: int, src: str, dst: str) -> dict[str, tuple]:
    spent = {}
    for name, (func, args) in ways.items():
        before = cpu()
        for _ in range(count):
            result = func(*args, src, dst)
            if asyncio.iscoroutine(result):
                await result
        after = cpu()
        spent[name] = tuple((a - b) / count * 1e6 for a, b in zip(after, before))
        if os.path.getsize(dst) != len(BODY):
            raise SystemExit("%s: the output is not the message" % name)
    return spent


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tree", default=os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), help="the source tree whose proxsmtp is imported")
    args = parser.parse_args()
    sys.path.insert(0, args.tree)
    importlib.import_module("proxsmtp.process.master")._preload()     # a worker's imports
    importlib.import_module("proxsmtp.filters.process")

    cat = shutil.which("cat")
    env = dict(os.environ)
    small = {name: "x" * 20 for name in ("SENDER", "RECIPIENTS", "CLIENT", "SERVER", "HELO",
                                         "EMAIL", "TMPDIR", "CLIENT_TLS", "SERVER_TLS", "PATH")}
    small["PATH"] = os.environ.get("PATH", "/usr/bin:/bin")
    nolocale = {name: value for name, value in env.items()
                if name != "LANG" and not name.startswith("LC_")}
    ways = {
        "sh-popen": (popen, (["/bin/sh", "-c", "cat"], env)),
        "cat-popen": (popen, ([cat], env)),
        "sh-smallenv": (popen, (["/bin/sh", "-c", "cat"], small)),
        "cat-nolocale": (popen, ([cat], nolocale)),
        "sh-spawn": (spawn, (["/bin/sh", "-c", "cat"], env)),
        "cat-spawn": (spawn, ([cat], env)),
        "sh-filter": (filtered, ("cat </dev/stdin", env)),
        "cat-filter": (filtered, ("cat", env)),
    }
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in"), os.path.join(tmp, "out")
        with open(src, "wb") as f:
            f.write(BODY)
        rounds = [await measure(ways, args.count, src, dst) for _ in range(args.rounds)]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("CPU per spawn (user+sys, children included), median of %d rounds of %d; "
          "this process: %d KB max RSS, %d environment variables"
          % (args.rounds, args.count, rss, len(env)))
    floor = statistics.median(r["sh-popen"][0] for r in rounds)
    print("  %-12s %10s %10s %10s" % ("", "all", "", "this process"))
    for name in ways:
        value = statistics.median(r[name][0] for r in rounds)
        own = statistics.median(r[name][1] for r in rounds)
        print("  %-12s %7.0f µs  %5.2f x  %7.0f µs" % (name, value, value / floor, own))


if __name__ == "__main__":
    import uvloop
    uvloop.run(main()) if hasattr(uvloop, "run") else uvloop.install() or asyncio.run(main())
