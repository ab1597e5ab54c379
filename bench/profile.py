#!/usr/bin/env python3
"""Profile proxsmtpd under the throughput load, with py-spy.

Starts smtp-sink and one proxy configuration (as bench/run.py does), drives
it with smtp-source, records every proxy process with `py-spy record
--subprocesses`, and prints where the samples fall: functions by their own
time and by inclusive time.  py-spy is not a dependency of the project:
`.venv/bin/pip install py-spy`.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peers  # noqa: E402
from run import FILTERS, REPO  # noqa: E402

# Frames every stack shares (process entry, event loop plumbing): not news.
_SKIP = re.compile(r"^(process \d+|<module>|main \(|run \(|Master\.|WorkerPool\.|Worker\.run"
                   r"|Runner\.run|BaseEventLoop\.run_)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--filter", default="none", choices=sorted(FILTERS))
    parser.add_argument("--seconds", type=int, default=15, help="how long to record")
    parser.add_argument("--parallel", type=int, default=20)
    parser.add_argument("--size", type=int, default=10240)
    parser.add_argument("--same-session", action="store_true",
                        help="smtp-source -d: many messages per session")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--proxsmtpd", default=os.path.join(REPO, ".venv", "bin", "proxsmtpd"))
    parser.add_argument("--py-spy", default=shutil.which("py-spy")
                        or os.path.join(REPO, ".venv", "bin", "py-spy"))
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results"),
                        help="directory for profile-<filter>.txt (collapsed stacks) and .svg")
    return parser.parse_args(argv)


def report(collapsed: str, top: int) -> str:
    """Own and inclusive shares per function (line numbers folded)."""
    own: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    total = 0
    with open(collapsed) as handle:
        for line in handle:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            samples = int(count)
            total += samples
            frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
            own[frames[-1]] += samples
            for frame in set(frames):
                if not _SKIP.match(frame):
                    inclusive[frame] += samples
    out = ["%d samples of busy proxy processes (idle waits excluded)" % total, "", "own time:"]
    out += ["  %5.1f%%  %s" % (100.0 * n / total, f) for f, n in own.most_common(top)]
    out += ["", "inclusive time:"]
    out += ["  %5.1f%%  %s" % (100.0 * n / total, f) for f, n in inclusive.most_common(top)]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not os.access(args.py_spy, os.X_OK):
        print("py-spy not found: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    peers.raise_nofile()
    workdir = tempfile.mkdtemp(prefix="proxsmtpd-profile-")
    os.makedirs(args.out, exist_ok=True)
    collapsed = os.path.join(args.out, "profile-%s.txt" % args.filter)
    started: list[peers.Peer] = []
    load = None
    try:
        sink_port, filter_port = peers.free_port(), peers.free_port()
        started.append(peers.sink("sink", sink_port, workdir))
        settings = dict(FILTERS[args.filter])
        if args.filter == "smtp":
            started.append(peers.sink("filter-sink", filter_port, workdir))
            settings["FilterCommand"] = "%s:%d" % (peers.HOST, filter_port)
        if args.workers is not None:
            settings["Workers"] = str(args.workers)
        port = peers.free_port()
        proxy = peers.proxy(args.filter, args.proxsmtpd, port, sink_port, workdir, settings, 4000)
        started.append(proxy)
        # More messages than can pass in the recording time: the load outlasts it.
        argv = ["smtp-source", "-s", str(args.parallel), "-m", "10000000", "-l", str(args.size),
                "-f", "bench@example.com", "-t", "sink@example.com", "-M", "bench.example"]
        if args.same_session:
            argv.append("-d")
        load = subprocess.Popen(argv + ["%s:%d" % (peers.HOST, port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        for fmt, path in (("raw", collapsed), ("flamegraph", collapsed[:-4] + ".svg")):
            subprocess.run([args.py_spy, "record", "--subprocesses", "--pid", str(proxy.pid),
                            "--rate", str(args.rate), "--duration",
                            str(args.seconds if fmt == "raw" else max(3, args.seconds // 3)),
                            "--format", fmt, "--output", path, "--nonblocking"],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except (peers.PeerError, subprocess.CalledProcessError) as exc:
        print("profiling failed: %s" % exc, file=sys.stderr)
        return 2
    finally:
        if load is not None:
            load.terminate()
            load.wait()
        for peer in reversed(started):
            peer.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    sys.stdout.write(report(collapsed, args.top))
    print("\ncollapsed stacks: %s; flame graph: %s" % (collapsed, collapsed[:-4] + ".svg"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
