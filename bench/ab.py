#!/usr/bin/env python3
"""A/B: CPU per message of several proxsmtpd source trees, side by side.

`make bench` measures one build.  To tell whether a change made the relay
cheaper, the builds must be measured in the same run, against the same sink
and the same haproxy, with their rounds interleaved (the machine's noise
moves all of them alike).  Each tree (a checkout or `git worktree`) runs as
its own proxsmtpd (no filter, default Workers); the load is smtp-source
(20 sessions, 10 KB, a new session per message), `--serial` (1 session,
1 KB) or `--pipelining` (bench/pipeline.py).  Prints per path the median
CPU microseconds per message (user + system of the proxy's processes, from
/proc schedstat), its ratio to haproxy's, the median messages per second
and every round's CPU figure, so the spread shows.

    .venv/bin/python bench/ab.py --rounds 7 before=/work/wt/base after=.

`NAME=TREE@PYTHON` runs that tree on another interpreter (a venv's python
with proxsmtpd's dependencies), to compare interpreter builds.
`--tree-setting "smtp/FilterType: smtp"` gives one tree (here the one
labelled smtp) a setting of its own, so that a filter path and none of one
tree are measured side by side; `--clients N` runs N smtp-source processes
at once, each with its own HELO name (a different client from one session
to the next).
`--setting "FilterType: pipe" --setting "FilterCommand: cat"` gives every
tree the same extra settings: the filter paths, which bench/instructions.py
cannot count for pipe (valgrind 3.19 lacks pidfd_open).  A filter
command's CPU counts with its worker's (reaped children).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import memory  # noqa: E402
import peers  # noqa: E402

LAUNCHER = """#!{python}
import sys
sys.path.insert(0, {tree!r})
from proxsmtp.cli import main
sys.exit(main())
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("trees", nargs="+", metavar="NAME=TREE[@PYTHON]",
                        help="a label, the source tree it runs and, optionally, the python")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=1500)
    parser.add_argument("--setting", action="append", default=[], metavar="NAME:VALUE",
                        help="an extra proxsmtpd setting for every tree (repeatable)")
    parser.add_argument("--tree-setting", action="append", default=[],
                        metavar="NAME/SETTING:VALUE",
                        help="an extra proxsmtpd setting for tree NAME only (repeatable)")
    parser.add_argument("--clients", type=int, default=1, metavar="N",
                        help="N smtp-source processes, each with its own HELO name")
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--serial", action="store_true", help="1 session, 1 KB messages")
    load.add_argument("--pipelining", action="store_true", help="bench/pipeline.py, 20 sessions")
    args = parser.parse_args(argv)
    for setting in args.setting:
        if ":" not in setting:
            parser.error("--setting %s: expected NAME:VALUE" % setting)
    for setting in args.tree_setting:
        if "/" not in setting or ":" not in setting:
            parser.error("--tree-setting %s: expected NAME/SETTING:VALUE" % setting)
    for item in args.trees:
        name, tree, python = split_tree(item)
        if not name or not os.path.isdir(os.path.join(tree, "proxsmtp")):
            parser.error("%s: expected NAME=TREE, TREE a checkout with proxsmtp/" % item)
        if not os.access(python, os.X_OK):
            parser.error("%s: %s is no program" % (item, python))
    return args


def split_tree(item: str) -> tuple[str, str, str]:
    """NAME=TREE[@PYTHON] -> (name, tree, python); python defaults to this one."""
    name, _, rest = item.partition("=")
    tree, at, python = rest.partition("@")
    return name, tree, python if at else sys.executable


def run_load(args: argparse.Namespace, port: int) -> float:
    if args.pipelining:
        return peers.pipeline(port, 20, args.messages, 10240, sys.executable)
    if args.serial:
        return peers.source(port, 1, args.messages, 1024)
    return peers.source(port, 20, args.messages, 10240, clients=args.clients)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    peers.raise_nofile()
    workdir = tempfile.mkdtemp(prefix="proxsmtpd-ab-")
    started: list[peers.Peer] = []
    paths: dict[str, peers.Peer] = {}
    ports: dict[str, int] = {}
    try:
        sink_port = peers.free_port()
        started.append(peers.sink("sink", sink_port, workdir))
        ports["haproxy"] = peers.free_port()
        paths["haproxy"] = peers.haproxy("haproxy", "haproxy", ports["haproxy"], sink_port,
                                         workdir)
        started.append(paths["haproxy"])
        for item in args.trees:
            name, tree, python = split_tree(item)
            launcher = os.path.join(workdir, "proxsmtpd-" + name)
            with open(launcher, "w") as handle:
                handle.write(LAUNCHER.format(python=python, tree=os.path.abspath(tree)))
            os.chmod(launcher, 0o755)
            ports[name] = peers.free_port()
            settings = dict(item.split(":", 1) for item in args.setting)
            settings.update(item.split("/", 1)[1].split(":", 1) for item in args.tree_setting
                            if item.split("/", 1)[0] == name)
            settings = {key.strip(): value.strip() for key, value in settings.items()}
            paths[name] = peers.proxy(name, launcher, ports[name], sink_port, workdir, settings,
                                      4000)
            started.append(paths[name])
        cpu: dict[str, list[float]] = {name: [] for name in paths}
        rate: dict[str, list[float]] = {name: [] for name in paths}
        names = list(paths)
        for round_no in range(args.rounds):
            shift = round_no % len(names)
            for name in names[shift:] + names[:shift]:
                before = memory.cpu_seconds(paths[name].pid)
                seconds = run_load(args, ports[name])
                cpu[name].append(1e6 * (memory.cpu_seconds(paths[name].pid) - before)
                                 / args.messages)
                rate[name].append(args.messages / seconds)
        base = statistics.median(cpu["haproxy"])
        for name in names:
            median = statistics.median(cpu[name])
            print("%-12s CPU %6.0f us/msg  %5.2f x haproxy  %8.0f msg/s  rounds %s"
                  % (name, median, median / base, statistics.median(rate[name]),
                     " ".join("%.0f" % value for value in cpu[name])))
    except peers.PeerError as exc:
        print("ab: %s" % exc, file=sys.stderr)
        return 2
    finally:
        for peer in reversed(started):
            peer.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
