#!/usr/bin/env python3
"""proxsmtpd benchmark: throughput, serial latency, held sessions (idle and mid-DATA),
a large message, TLS.

Postfix's smtp-source (client) and smtp-sink (server) are the peers.  Every
figure is also measured on the direct path (smtp-source straight to
smtp-sink) and through three baselines in front of the same sink:
haproxy in `mode tcp` (the ceiling for any proxy), an empty uvloop byte
relay (bench/barerelay.py, Python's floor) and the least SMTP proxy on
uvloop that keeps proxsmtpd's per-message contract (bench/floor.py, the
contract floor).  FilterType smtp talks to bench/node.py, a filter node
that takes XCLIENT as Postfix does, once in plaintext and once offering
STARTTLS; the pipe row is set against the CPU of spawning `/bin/sh -c cat`
from a worker-sized process (bench/spawn.py).  The configurations are
alternated round by round, so machine noise falls on all of them alike; the
table shows medians over the rounds, ratios against direct and against
haproxy, and CPU per message from /proc.  The TLS section compares a
STARTTLS client through the proxy with the same client straight to a TLS
server (a proxsmtpd that ends TLS in front of smtp-sink).  The bdat section
sets a BDAT message (RFC 3030, bench/pipeline.py --bdat) against a DATA one,
straight to a sink that takes BDAT (bench/node.py --chunking: smtp-sink 3.7
offers no CHUNKING) and through the proxy without a filter.  The milter
section sets a proxy with `Milters:` (bench/milter.py, which accepts at once
and asks for no reply before the end of the message, as rspamd does) beside
one with no filter, and holds sessions through a chain of two.  See
bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import memory  # noqa: E402
import peers  # noqa: E402
import tlsclient  # noqa: E402
from hold import Holder  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 1024 * 1024
REUSED = ", reused"         # label suffix: many messages per session (smtp-source -d)
# The smtp row's general case: one smtp-source process per session, each
# with its own HELO name, so that a kept node connection's next message is
# mostly another client's (XCLIENT and EHLO again); the plain smtp row's
# sessions are all one client (one HELO name), whose kept node session goes
# on with MAIL at once (proxsmtpd(8) FILTERS).
CLIENTS = "smtp, %d clients"
# Its baseline: none under the same load (as many smtp-source processes,
# each its own HELO name).  Twenty client processes on two CPUs cost the
# proxy more per message than one does (scheduling, caches), whatever the
# filter; against the one-client none row the ratio would count that too.
NONE_CLIENTS = "none, %d clients"

# The proxy configurations compared (the smtp filter's address is added at run time:
# NODES says which filter node each one talks to).
FILE_FILTER = "sed -i -e '1s/^/X-Bench: file\\r\\n/' \"$EMAIL\""
FILTERS = {
    "none": {},
    "pipe": {"FilterType": "pipe", "FilterCommand": "cat"},
    "file": {"FilterType": "file", "FilterCommand": FILE_FILTER},
    "smtp": {"FilterType": "smtp"},
    "smtp, node offers STARTTLS": {"FilterType": "smtp"},
}
# bench/node.py, plaintext and offering STARTTLS: the second row pays what the
# default ServerTLS (may) costs against a node that offers it, as Halon's and
# Postfix's do.
NODES = {"smtp": "filter-node", "smtp, node offers STARTTLS": "filter-node-tls"}
# The milter configurations (no FilterCommand): the bench/milter.py peers each
# one's `Milters:` names, in order.
MILTERS = {"milter": ("milter-1",), "milter, no reuse": ("milter-1",),
           "milter chain": ("milter-1", "milter-2")}
# Not in MilterReuse: a connection and an OPTNEG per client session, as for a
# milter on libmilter (OpenDKIM, clamav-milter), which cannot take SMFIC_QUIT_NC.
NO_REUSE = frozenset(("milter, no reuse",))

# The baselines measured beside the proxy: the TCP-relay ceiling (haproxy),
# Python's floor (an empty byte relay) and the contract floor (SMTP, no more).
RELAYS = ("haproxy", "relay", "floor")
SCRIPTS = {"relay": "barerelay.py", "floor": "floor.py"}
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"

FULL = dict(rounds=3, cpu_rounds=5, parallel=20, messages=2000, size=10240, latency_messages=200,
            latency_size=1024, hold=3000, large_mb=50, data_hold=600, data_kb=500,
            tls_messages=600, tls_hold=3000)
QUICK = dict(rounds=1, cpu_rounds=1, parallel=20, messages=200, size=10240, latency_messages=20,
             latency_size=1024, hold=300, large_mb=5, data_hold=100, data_kb=500,
             tls_messages=60, tls_hold=300)
MIDDATA_PATHS = ("none", "pipe", "smtp")

TARGETS = dict(throughput_ratio=0.30, latency_ratio=4.0, pss_kb=64.0, rss_growth_mb=20.0,
               middata_kb=192.0, tls_pss_kb=64.0,
               relay_throughput_ratio=0.75, relay_cpu_ratio=2.0, relay_latency_ratio=1.6,
               smtp_cpu_ratio=1.25, smtp_tls_cpu_ratio=1.5, bdat_cpu_ratio=1.25,
               milter_cpu_ratio=1.5, milter_pss_kb=64.0)
# The bdat section's rows: (the port it goes to, by BDAT?); the proxy's is
# `none` in front of the BDAT-taking sink.
BDAT_ROWS = {"direct": ("bdat-sink", False), "direct, BDAT": ("bdat-sink", True),
             "none": ("bdat-none", False), "none, BDAT": ("bdat-none", True)}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke-test sizes: 1 round, 200 messages, 300 held sessions, "
                        "100 mid-DATA, 5 MB")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--rounds", type=int, help="rounds to take medians over")
    parser.add_argument("--cpu-rounds", type=int,
                        help="rounds of the sections with CPU targets (throughput, latency,"
                        " bdat, milter)")
    parser.add_argument("--messages", type=int, help="throughput: messages per run")
    parser.add_argument("--parallel", type=int, help="throughput: parallel sessions")
    parser.add_argument("--size", type=int, help="throughput: message payload bytes")
    parser.add_argument("--latency-messages", type=int, help="serial latency: messages")
    parser.add_argument("--latency-size", type=int, help="serial latency: message payload bytes")
    parser.add_argument("--hold", type=int, help="concurrency: sessions to hold")
    parser.add_argument("--large-mb", type=int, help="large message: size in MiB")
    parser.add_argument("--data-hold", type=int, help="mid-DATA: sessions to hold")
    parser.add_argument("--data-kb", type=int, help="mid-DATA: unfinished KiB per session")
    parser.add_argument("--tls-messages", type=int, help="TLS: messages per throughput run")
    parser.add_argument("--tls-hold", type=int, help="TLS: sessions to hold")
    parser.add_argument("--only",
                        default="throughput,latency,pipelining,bdat,concurrency,middata,large,"
                        "tls,milter",
                        help="comma-separated sections to run")
    parser.add_argument("--workers", type=int, help="Workers setting (default: the proxy's)")
    parser.add_argument("--proxsmtpd", default=os.path.join(REPO, ".venv", "bin", "proxsmtpd"))
    parser.add_argument("--json", default=os.path.join(REPO, "bench", "results", "latest.json"),
                        help="where to write the results (the table goes next to it as .txt)")
    parser.add_argument("--spool-dir", help="where the proxies' TempDirectory goes "
                        "(default: the work directory in $TMPDIR or /tmp), e.g. /dev/shm")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.only = {part.strip() for part in args.only.split(",") if part.strip()}
    return args


def summary(runs: list[dict], key: str) -> float | None:
    values = [run[key] for run in runs if key in run]
    return statistics.median(values) if values else None


def paired_ratio(runs: list[dict], base: list[dict], key: str = "cpu_us") -> float | None:
    """`runs` against `base`: the median of the per-round ratios, round i of
    one over round i of the other.  Every round measures each path once, in
    rotated order, so the machine's drift from round to round (another
    tenant of the host, its CPU's clock) cancels out of each round's ratio;
    the ratio of the two medians would keep it, as each median may come
    from a different round."""
    ratios = [run[key] / other[key] for run, other in zip(runs, base)
              if key in run and other.get(key)]
    return statistics.median(ratios) if ratios else None


def attempt(runs: list[dict], label: str, measure) -> None:
    """Run one measurement; a failure is recorded (and printed), not fatal."""
    try:
        runs.append(measure())
    except peers.PeerError as exc:
        print("  %s: FAILED: %s" % (label, exc), file=sys.stderr, flush=True)
        runs.append({"error": str(exc)})


def rotated(items: list, round_no: int) -> list:
    shift = round_no % len(items)
    return items[shift:] + items[:shift]


class Bench:
    """Starts the peers, runs the sections, collects results."""

    def __init__(self, args: argparse.Namespace, workdir: str) -> None:
        self.args = args
        self.workdir = workdir
        self.spool_root = tempfile.mkdtemp(prefix="proxsmtpd-bench-spool-", dir=args.spool_dir) \
            if args.spool_dir else workdir
        self.peers: list[peers.Peer] = []
        self.ports: dict[str, int] = {}
        self.pids: dict[str, int] = {}       # path -> the process whose CPU is counted
        self.results: dict = {}
        self.identity: tuple[str, str] = ("", "")     # the made certificate and key

    # -- peers ---------------------------------------------------------------

    def settings(self, name: str) -> dict[str, str]:
        if name in MILTERS:
            settings = {"Milters": ", ".join("inet:%s:%d" % (peers.HOST, self.ports[milter])
                                             for milter in MILTERS[name])}
            # bench/milter.py takes SMFIC_QUIT_NC as rspamd does: its connections
            # are kept across client sessions (proxsmtpd(8) MILTERS)
            if name not in NO_REUSE:
                settings["MilterReuse"] = settings["Milters"]
        else:
            settings = dict(FILTERS[name])
        if name in NODES:
            settings["FilterCommand"] = "%s:%d" % (peers.HOST, self.ports[NODES[name]])
        if self.args.workers is not None:
            settings["Workers"] = str(self.args.workers)
        return settings

    def start_proxy(self, name: str, filter_name: str, out: str = "sink") -> peers.Peer:
        port = peers.free_port()
        slug = name.replace(", ", "-").replace(" ", "-")        # its log, config and spool
        peer = peers.proxy(slug, self.args.proxsmtpd, port, self.ports[out], self.workdir,
                           self.settings(filter_name),
                           max(4000, self.args.hold + 500, self.args.data_hold + 500),
                           self.spool_root)
        self.peers.append(peer)
        self.ports[name] = port
        self.pids[name] = peer.pid
        return peer

    def stop(self, peer: peers.Peer) -> None:
        peer.stop()
        if peer in self.peers:
            self.peers.remove(peer)

    def start(self) -> None:
        self.ports["sink"] = self.ports["direct"] = peers.free_port()
        self.peers.append(peers.sink("sink", self.ports["sink"], self.workdir))
        self.start_nodes()
        if self.args.only & {"throughput", "latency", "pipelining", "large"}:
            for name in FILTERS:
                self.start_proxy(name, name)
        if self.args.only & {"throughput", "latency", "pipelining"}:
            self.start_relays()
        if "bdat" in self.args.only:
            self.ports["bdat-sink"] = peers.free_port()
            self.peers.append(peers.filter_node("bdat-sink", self.python, self.ports["bdat-sink"],
                                                self.workdir, None, self.args.workers,
                                                chunking=True))
            self.start_proxy("bdat-none", "none", out="bdat-sink")

    def start_nodes(self) -> None:
        """The filter nodes (bench/node.py), peers of their own: their CPU is
        not the proxy's.  The STARTTLS one gets a certificate made here."""
        self.identity = tlsclient.make_certificate(self.workdir)
        for name, tls in (("filter-node", None), ("filter-node-tls", self.identity)):
            self.ports[name] = peers.free_port()
            self.peers.append(peers.filter_node(name, self.python, self.ports[name],
                                                self.workdir, tls, self.args.workers))
        if "milter" in self.args.only:
            for name in MILTERS["milter chain"]:
                self.ports[name] = peers.free_port()
                self.peers.append(peers.milter(name, self.python, self.ports[name],
                                               self.workdir))

    def start_relays(self) -> None:
        """haproxy (if installed), the empty uvloop relay and the contract floor,
        in front of the sink."""
        for name in RELAYS:
            port = peers.free_port()
            if name == "haproxy":
                if not os.access(HAPROXY, os.X_OK):
                    print("haproxy not found: no TCP-relay ceiling in this run",
                          file=sys.stderr, flush=True)
                    continue
                peer = peers.haproxy(name, HAPROXY, port, self.ports["sink"], self.workdir)
            else:
                peer = peers.bare_relay(name, self.python, port, self.ports["sink"],
                                        self.workdir, self.args.workers, SCRIPTS[name])
            self.peers.append(peer)
            self.ports[name] = port
            self.pids[name] = peer.pid

    @property
    def python(self) -> str:
        """The proxy's venv interpreter (it has uvloop), else this one."""
        venv = os.path.join(os.path.dirname(self.args.proxsmtpd), "python")
        return venv if os.access(venv, os.X_OK) else sys.executable

    def paths(self) -> list[str]:
        """direct, the relays that are running, then every proxy configuration."""
        return ["direct"] + [name for name in RELAYS if name in self.ports] + list(FILTERS)

    def counted(self, path: str, count: int, run) -> dict:
        """Run `run()` (returns seconds) and take the CPU the path's own
        processes spent meanwhile, per message (not the client's or sink's)."""
        pid = self.pids.get(path)
        before = memory.cpu_seconds(pid) if pid else None
        seconds = run()
        result = {"seconds": seconds, "per_second": count / seconds}
        if pid:
            result["cpu_us"] = 1e6 * (memory.cpu_seconds(pid) - before) / count
        return result

    def stop_all(self) -> None:
        for peer in reversed(self.peers):
            peer.stop()
        self.peers.clear()

    # -- sections ------------------------------------------------------------

    def throughput(self) -> None:
        a = self.args
        print("throughput: %d sessions, %d messages of %d bytes"
              % (a.parallel, a.messages, a.size), file=sys.stderr, flush=True)

        def measure(path: str, same: bool, clients: int = 1) -> dict:
            return self.counted(path, a.messages, lambda: peers.source(
                self.ports[path], a.parallel, a.messages, a.size, same_session=same,
                clients=clients))
        self.results["throughput"] = self.alternate(measure, "per_second", clients=a.parallel)
        count = min(a.messages, 1000)
        print("spawn floor: %d spawns of /bin/sh -c cat and of cat" % count,
              file=sys.stderr, flush=True)
        try:
            self.results["spawn_floor"] = peers.spawn_floor(self.python, count, a.size)
        except peers.PeerError as exc:
            print("  spawn floor: FAILED: %s" % exc, file=sys.stderr, flush=True)

    def latency(self) -> None:
        a = self.args
        print("latency: %d messages of %d bytes, one at a time"
              % (a.latency_messages, a.latency_size), file=sys.stderr, flush=True)

        def measure(path: str, same: bool) -> dict:
            result = self.counted(path, a.latency_messages, lambda: peers.source(
                self.ports[path], 1, a.latency_messages, a.latency_size, same_session=same))
            result["ms"] = 1000.0 * result["seconds"] / a.latency_messages
            return result
        self.results["latency"] = self.alternate(measure, "ms")

    def pipelining(self) -> None:
        """bench/pipeline.py: MAIL, RCPT and DATA in one write, the body after
        the 354; each of the sessions sends message after message."""
        a = self.args
        print("pipelining: %d sessions, %d messages of %d bytes"
              % (a.parallel, a.messages, a.size), file=sys.stderr, flush=True)
        paths = [path for path in ("direct", *RELAYS, "none") if path in self.ports]
        runs: dict[str, list[dict]] = {path: [] for path in paths}
        for round_no in range(a.rounds):
            for path in rotated(paths, round_no):
                attempt(runs[path], path, lambda path=path: self.counted(
                    path, a.messages, lambda: peers.pipeline(
                        self.ports[path], a.parallel, a.messages, a.size, self.python)))
        self.results["pipelining"] = self.table(runs, "per_second", paths)

    def bdat(self) -> None:
        """bench/pipeline.py by DATA and by BDAT (BDAT_ROWS), alternated
        round by round: what a message by BDAT costs the proxy beside one
        by DATA, in the same run."""
        a = self.args
        print("bdat: %d sessions, %d messages of %d bytes, by DATA and by BDAT"
              % (a.parallel, a.messages, a.size), file=sys.stderr, flush=True)
        runs: dict[str, list[dict]] = {label: [] for label in BDAT_ROWS}
        for round_no in range(a.cpu_rounds):
            for label in rotated(list(BDAT_ROWS), round_no):
                port, bdat = BDAT_ROWS[label]
                attempt(runs[label], label, lambda port=port, bdat=bdat: self.counted(
                    port, a.messages, lambda: peers.pipeline(
                        self.ports[port], a.parallel, a.messages, a.size, self.python,
                        bdat=bdat)))
        self.results["bdat"] = self.table(runs, "per_second", list(BDAT_ROWS))

    def alternate(self, measure, key: str, clients: int = 1) -> dict:
        """Every path with one message per session, and direct and none with
        sessions reused (smtp-source -d), in rotating order each round; the
        reused rows are compared with direct reused.  `clients` > 1 adds the
        smtp path with that many clients (CLIENTS), and none so (NONE_CLIENTS)."""
        variants = [(path, path, False, 1) for path in self.paths()]
        if clients > 1 and "smtp" in self.ports:
            variants.append((NONE_CLIENTS % clients, "none", False, clients))
            variants.append((CLIENTS % clients, "smtp", False, clients))
        variants += [(path + REUSED, path, True, 1) for path in ("direct", "none")]
        runs: dict[str, list[dict]] = {label: [] for label, _, _, _ in variants}
        for round_no in range(self.args.cpu_rounds):
            for label, path, same, many in rotated(variants, round_no):
                attempt(runs[label], label,
                        lambda: measure(path, same, many) if many > 1 else measure(path, same))
        table = self.table(runs, key, [label for label, _, same, _ in variants if not same])
        table.update(self.table(runs, key, [label for label, _, same, _ in variants if same]))
        return table

    def table(self, runs: dict[str, list[dict]], key: str, order: list[str]) -> dict:
        """Per path: the runs, the median of `key`, and its ratio to the first
        path; with CPU figures, the median CPU per message; and, when haproxy
        is among the paths, both against haproxy's.  Every ratio is paired
        by round (paired_ratio)."""
        relay = runs["haproxy"] if "haproxy" in order else None
        table = {}
        for path in order:
            median = summary(runs[path], key)
            row = {"runs": runs[path], "median": median,
                   "ratio": paired_ratio(runs[path], runs[order[0]], key)}
            cpu = summary(runs[path], "cpu_us")
            if cpu is not None:
                row["cpu_us"] = cpu
            if relay:
                row["relay_ratio"] = paired_ratio(runs[path], relay, key)
                row["relay_cpu_ratio"] = paired_ratio(runs[path], relay)
            table[path] = row
        return table

    def large(self) -> None:
        a = self.args
        paths = ["direct", "none", "pipe"]
        runs: dict[str, list[dict]] = {path: [] for path in paths}
        size = a.large_mb * MB
        print("large message: %d MiB" % a.large_mb, file=sys.stderr, flush=True)
        for round_no in range(a.rounds):
            for path in rotated(paths, round_no):
                def measure(path=path) -> dict:
                    if path == "direct":
                        return {"seconds": peers.source(self.ports[path], 1, 1, size)}
                    proxy = next(p for p in self.peers if p.name == path)
                    with memory.RssSampler(proxy.pid) as sampler:
                        seconds = peers.source(self.ports[path], 1, 1, size)
                    return {"seconds": seconds, "rss_baseline_mb": sampler.baseline / 1024,
                            "rss_growth_mb": sampler.growth_kb / 1024,
                            "processes": len(sampler.pids), "samples": sampler.samples}
                attempt(runs[path], path, measure)
        table = self.table(runs, "seconds", paths)
        for path in paths[1:]:
            table[path]["rss_growth_mb"] = summary(runs[path], "rss_growth_mb")
            table[path]["rss_growth_max_mb"] = max(
                (run["rss_growth_mb"] for run in runs[path] if "rss_growth_mb" in run),
                default=None)
        self.results["large"] = table

    def concurrency(self) -> None:
        a = self.args
        runs: list[dict] = []
        print("concurrency: %d sessions held" % a.hold, file=sys.stderr, flush=True)
        for round_no in range(a.rounds):
            attempt(runs, "hold", self.hold_once)
        result: dict = {"runs": runs, "sessions": a.hold}
        for key in ("greeted", "seconds_to_greet", "idle_pss_mb", "held_pss_mb",
                    "pss_kb_per_session", "fresh_greeting_ms", "processes"):
            result[key] = summary(runs, key)
        result["fresh_accepted"] = bool(runs) and all(run.get("fresh_accepted") for run in runs)
        result["all_greeted"] = bool(runs) and all(
            run.get("greeted") == a.hold for run in runs)
        self.results["concurrency"] = result

    def hold_once(self, filter_name: str = "none") -> dict:
        """A fresh proxy: warm it up, take the idle PSS, hold the sessions, take
        the PSS again, and check that a new client still gets a greeting."""
        a = self.args
        proxy = self.start_proxy("hold", filter_name)
        try:
            port = self.ports["hold"]
            peers.source(port, 5, 10, 1024)
            time.sleep(0.5)
            idle = memory.pss_kb(proxy.pid)
            with Holder(peers.HOST, port, a.hold).open() as holder:
                time.sleep(1.0)
                held = memory.pss_kb(proxy.pid)
                processes = len(memory.family(proxy.pid))
                started = time.perf_counter()
                try:
                    fresh = peers.greeting(port, timeout=10.0)
                except OSError as exc:
                    fresh = ("error: %s" % exc).encode()
                fresh_ms = 1000.0 * (time.perf_counter() - started)
                greeted, refused = len(holder.greeted), holder.refused
                seconds = holder.seconds
            return {"greeted": greeted, "refused": len(refused),
                    "refused_sample": sorted(set(refused))[:5],
                    "seconds_to_greet": seconds,
                    "idle_pss_mb": idle / 1024, "held_pss_mb": held / 1024,
                    "pss_kb_per_session": (held - idle) / max(1, greeted),
                    "fresh_accepted": fresh.startswith(b"220"),
                    "fresh_reply": fresh.decode("ascii", "replace"),
                    "fresh_greeting_ms": fresh_ms, "processes": processes}
        finally:
            self.stop(proxy)


    def milter(self) -> None:
        """A proxy with one milter (bench/milter.py) against one with no filter,
        alternated in the same run, a message per session (each session
        connects the milter and negotiates) and many over the same sessions;
        CPU per message of each proxy's own processes (the milter is a peer
        of its own).  Then sessions held through a chain of two milters."""
        a = self.args
        print("milter: %d sessions, %d messages of %d bytes, none and one milter; %d sessions"
              " held through two" % (a.parallel, a.messages, a.size, a.hold),
              file=sys.stderr, flush=True)
        # row -> its proxy; the no-reuse row is for information (no target),
        # and has no reused-sessions twin (one connection per session either way)
        paths = {"none": "milter-none", "milter": "milter",
                 "milter, no reuse": "milter-noreuse"}
        started = [self.start_proxy(proxy, row) for row, proxy in paths.items()]
        variants = [(row + (REUSED if same else ""), proxy, same)
                    for same in (False, True) for row, proxy in paths.items()
                    if not (same and row in NO_REUSE)]
        runs: dict[str, list[dict]] = {label: [] for label, _, _ in variants}
        try:
            for round_no in range(a.cpu_rounds):
                for label, path, same in rotated(variants, round_no):
                    attempt(runs[label], label, lambda: self.counted(
                        path, a.messages, lambda: peers.source(
                            self.ports[path], a.parallel, a.messages, a.size,
                            same_session=same)))
        finally:
            for proxy in started:
                self.stop(proxy)
        table = self.table(runs, "per_second", ["none", "milter", "milter, no reuse"])
        table.update(self.table(runs, "per_second", ["none" + REUSED, "milter" + REUSED]))
        holds: list[dict] = []
        for _ in range(a.rounds):
            attempt(holds, "hold, milter chain", lambda: self.hold_once("milter chain"))
        hold: dict = {"runs": holds, "sessions": a.hold}
        for key in ("greeted", "idle_pss_mb", "held_pss_mb", "pss_kb_per_session"):
            hold[key] = summary(holds, key)
        self.results["milter"] = {"throughput": table, "hold": hold}

    def middata(self) -> None:
        a = self.args
        print("mid-DATA: %d sessions holding %d KiB each" % (a.data_hold, a.data_kb),
              file=sys.stderr, flush=True)
        section = {}
        for path in MIDDATA_PATHS:
            runs: list[dict] = []
            for round_no in range(a.rounds):
                attempt(runs, "mid-DATA %s" % path, lambda: self.hold_data_once(path))
            row: dict = {"runs": runs}
            for key in ("in_data", "idle_pss_mb", "held_pss_mb", "pss_kb_per_session",
                        "spool_files", "after_pss_mb"):
                row[key] = summary(runs, key)
            row["worst_kb_per_session"] = max((run["pss_kb_per_session"] for run in runs
                                               if "pss_kb_per_session" in run), default=None)
            section[path] = row
        self.results["middata"] = section

    def hold_data_once(self, path: str) -> dict:
        """A fresh proxy: warm it up, take the idle PSS, take `data_hold`
        sessions into DATA with `data_kb` KiB of unfinished message each, and
        take the PSS again (master and workers, from smaps_rollup)."""
        a = self.args
        proxy = self.start_proxy("middata-" + path, path)
        try:
            port = self.ports["middata-" + path]
            peers.source(port, 5, 10, 1024)
            time.sleep(0.5)
            idle = memory.pss_kb(proxy.pid)
            with Holder(peers.HOST, port, a.data_hold).open() as holder:
                in_data = holder.start_data(a.data_kb * 1024)
                time.sleep(1.0)
                held = memory.pss_kb(proxy.pid)
                spool = os.path.join(self.spool_root, "spool-middata-" + path)
                files = len(os.listdir(spool))
            time.sleep(5.0)         # the sessions are gone: what the workers gave back
            after = memory.pss_kb(proxy.pid)
            return {"in_data": in_data, "refused_sample": sorted(set(holder.refused))[:5],
                    "idle_pss_mb": idle / 1024, "held_pss_mb": held / 1024,
                    "pss_kb_per_session": (held - idle) / max(1, in_data),
                    "spool_files": files, "after_pss_mb": after / 1024}
        finally:
            self.stop(proxy)

    def tls(self) -> None:
        """A STARTTLS client (both legs encrypted through the proxy) against the
        same client straight to the TLS server; then TLS sessions held."""
        a = self.args
        print("tls: %d sessions, %d messages of %d bytes over STARTTLS; %d TLS sessions held"
              % (a.parallel, a.tls_messages, a.size, a.tls_hold), file=sys.stderr, flush=True)
        cert, key = self.identity
        identity = {"TLSCertificate": cert, "TLSKey": key}
        server_port = peers.free_port()
        server = peers.proxy("tls-server", self.args.proxsmtpd, server_port, self.ports["sink"],
                             self.workdir, dict(identity, ServerTLS="off"),
                             max(4000, a.tls_hold + 500), self.spool_root)
        self.peers.append(server)
        self.ports["tls-server"] = server_port
        settings = dict(identity, ServerTLS="encrypt")
        if a.workers is not None:
            settings["Workers"] = str(a.workers)

        def start(name: str) -> peers.Peer:
            port = peers.free_port()
            peer = peers.proxy(name, a.proxsmtpd, port, server_port, self.workdir, settings,
                               max(4000, a.tls_hold + 500), self.spool_root)
            self.peers.append(peer)
            self.ports[name] = port
            return peer
        start("tls-proxy")
        paths = {"direct TLS": "tls-server", "proxy, both legs TLS": "tls-proxy"}
        runs: dict[str, list[dict]] = {label: [] for label in paths}
        for round_no in range(a.rounds):
            for label in rotated(list(paths), round_no):
                def measure(port=self.ports[paths[label]]) -> dict:
                    try:
                        seconds = tlsclient.send(port, a.parallel, a.tls_messages, a.size)
                    except tlsclient.TLSClientError as exc:
                        raise peers.PeerError(str(exc)) from None
                    return {"seconds": seconds, "per_second": a.tls_messages / seconds}
                attempt(runs[label], label, measure)
        result = {"throughput": self.table(runs, "per_second", list(paths))}
        holds: list[dict] = []
        for _ in range(a.rounds):
            attempt(holds, "tls hold", lambda: self.hold_tls(start))
        result["hold"] = {"runs": holds, "sessions": a.tls_hold}
        for key in ("held", "seconds_to_establish", "idle_pss_mb", "held_pss_mb",
                    "pss_kb_per_session"):
            result["hold"][key] = summary(holds, key)
        result["hold"]["all_held"] = bool(holds) and all(
            run.get("held") == a.tls_hold for run in holds)
        self.results["tls"] = result

    def hold_tls(self, start) -> dict:
        """A fresh TLS proxy, warmed up; PSS idle and with the sessions held
        (both legs encrypted: the server is the TLS server)."""
        a = self.args
        proxy = start("tls-hold")
        try:
            port = self.ports["tls-hold"]
            tlsclient.send(port, 5, 10, 1024)
            time.sleep(0.5)
            idle = memory.pss_kb(proxy.pid)
            held = tlsclient.hold(port, a.tls_hold, lambda: memory.pss_kb(proxy.pid))
            if held["failed"] and not held["held"]:
                raise peers.PeerError("no TLS session held: %s" % held["failures"])
            return {"held": held["held"], "failed": held["failed"],
                    "failures": held["failures"], "seconds_to_establish": held["seconds"],
                    "idle_pss_mb": idle / 1024, "held_pss_mb": held["measured"] / 1024,
                    "pss_kb_per_session": (held["measured"] - idle) / max(1, held["held"])}
        except tlsclient.TLSClientError as exc:
            raise peers.PeerError(str(exc)) from None
        finally:
            self.stop(proxy)


def check_targets(results: dict, args: argparse.Namespace) -> list[dict]:
    """Each target: what it is, the measured value, and PASS/FAIL."""
    targets = []

    def target(name: str, value, ok: bool, shown: str) -> None:
        targets.append({"target": name, "value": value, "pass": bool(ok), "shown": shown})

    def fmt(value, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    if "throughput" in results:
        for path in ("none", "none" + REUSED):
            ratio = results["throughput"][path]["ratio"]
            target("throughput, %s >= %.2f x direct" % (path, TARGETS["throughput_ratio"]),
                   ratio, ratio is not None and ratio >= TARGETS["throughput_ratio"],
                   fmt(ratio, ".2f") + " x")
    if "latency" in results:
        for path in ("none", "none" + REUSED):
            ratio = results["latency"][path]["ratio"]
            target("serial latency, %s <= %.0f x direct" % (path, TARGETS["latency_ratio"]),
                   ratio, ratio is not None and ratio <= TARGETS["latency_ratio"],
                   fmt(ratio, ".2f") + " x")
    for name, section, key, limit, op in (
            ("throughput, none >= %.2f x haproxy", "throughput", "relay_ratio",
             TARGETS["relay_throughput_ratio"], "ge"),
            ("CPU per message, none <= %.1f x haproxy", "throughput", "relay_cpu_ratio",
             TARGETS["relay_cpu_ratio"], "le"),
            ("serial latency, none <= %.1f x haproxy", "latency", "relay_ratio",
             TARGETS["relay_latency_ratio"], "le")):
        if section not in results:
            continue
        value = results[section]["none"].get(key)
        ok = value is not None and (value >= limit if op == "ge" else value <= limit)
        shown = fmt(value, ".2f") + " x"
        floors = [(label, results[section].get(path, {}).get(key))
                  for path, label in (("relay", "bare uvloop relay"), ("floor", "contract floor"))]
        floors = ["%s %.2f x" % (label, ratio) for label, ratio in floors if ratio is not None]
        if floors:
            shown += " (%s)" % ", ".join(floors)
        target(name % limit, value, ok, shown)
    if "throughput" in results:
        table = results["throughput"]
        for path, limit, base_name in (
                ("smtp", TARGETS["smtp_cpu_ratio"], "none"),
                (CLIENTS % args.parallel, TARGETS["smtp_cpu_ratio"], NONE_CLIENTS % args.parallel),
                ("smtp, node offers STARTTLS", TARGETS["smtp_tls_cpu_ratio"], "none")):
            if path not in table or base_name not in table:
                continue
            cpu, base = table[path].get("cpu_us"), table[base_name].get("cpu_us")
            ratio = paired_ratio(table[path]["runs"], table[base_name]["runs"])
            target("CPU per message, %s <= %.2f x %s" % (path, limit, base_name), ratio,
                   ratio is not None and ratio <= limit,
                   "%s x (%s us, %s %s us)" % (fmt(ratio, ".2f"), fmt(cpu, ".0f"), base_name,
                                              fmt(base, ".0f")))
    if "bdat" in results:
        data, bdat = (results["bdat"][path].get("cpu_us") for path in ("none", "none, BDAT"))
        ratio = paired_ratio(results["bdat"]["none, BDAT"]["runs"], results["bdat"]["none"]["runs"])
        limit = TARGETS["bdat_cpu_ratio"]
        target("CPU per message, none by BDAT <= %.2f x by DATA" % limit, ratio,
               ratio is not None and ratio <= limit,
               "%s x (%s us, DATA %s us)" % (fmt(ratio, ".2f"), fmt(bdat, ".0f"), fmt(data, ".0f")))
    if "milter" in results:
        table = results["milter"]["throughput"]
        cpu, none = table["milter"].get("cpu_us"), table["none"].get("cpu_us")
        ratio = paired_ratio(table["milter"]["runs"], table["none"]["runs"])
        limit = TARGETS["milter_cpu_ratio"]
        target("CPU per message, milter <= %.1f x none" % limit, ratio,
               ratio is not None and ratio <= limit,
               "%s x (%s us, none %s us)" % (fmt(ratio, ".2f"), fmt(cpu, ".0f"), fmt(none, ".0f")))
        per = results["milter"]["hold"]["pss_kb_per_session"]
        target("PSS per held session, milter chain <= %.0f KB" % TARGETS["milter_pss_kb"], per,
               per is not None and per <= TARGETS["milter_pss_kb"], fmt(per, ".1f") + " KB")
    if "concurrency" in results:
        held = results["concurrency"]
        target("%d sessions held, all greeted" % args.hold, held["greeted"],
               held["all_greeted"], "%s/%d" % (fmt(held["greeted"], ".0f"), args.hold))
        per = held["pss_kb_per_session"]
        target("PSS per held session <= %.0f KB" % TARGETS["pss_kb"], per,
               per is not None and per <= TARGETS["pss_kb"], fmt(per, ".1f") + " KB")
        target("master still accepting while they are held", held["fresh_accepted"],
               held["fresh_accepted"], "yes" if held["fresh_accepted"] else "no")
    if "middata" in results:
        for path, row in results["middata"].items():
            worst = row["worst_kb_per_session"]
            ok = worst is not None and worst <= TARGETS["middata_kb"] \
                and row["in_data"] == args.data_hold
            target("%d sessions mid-DATA (%d KiB), %s: PSS <= %.0f KB each"
                   % (args.data_hold, args.data_kb, path, TARGETS["middata_kb"]),
                   worst, ok, "%s KB, %s/%d (worst run)" % (fmt(worst, ".1f"),
                                                           fmt(row["in_data"], ".0f"),
                                                           args.data_hold))
    if "large" in results:
        for path in ("none", "pipe"):
            row = results["large"][path]
            worst = row["rss_growth_max_mb"]
            ok = (worst is not None and worst < TARGETS["rss_growth_mb"]
                  and not any("error" in run for run in row["runs"]))
            target("%d MiB message, %s: relayed, RSS growth < %.0f MB"
                   % (args.large_mb, path, TARGETS["rss_growth_mb"]),
                   worst, ok, fmt(worst, ".1f") + " MB (worst run)")
    if "tls" in results:
        held = results["tls"]["hold"]
        target("%d TLS sessions held" % args.tls_hold, held["held"], held["all_held"],
               "%s/%d" % (fmt(held["held"], ".0f"), args.tls_hold))
        per = held["pss_kb_per_session"]
        target("PSS per held TLS session <= %.0f KB" % TARGETS["tls_pss_kb"], per,
               per is not None and per <= TARGETS["tls_pss_kb"], fmt(per, ".1f") + " KB")
    return targets


def render(results: dict, targets: list[dict], meta: dict, args: argparse.Namespace) -> str:
    """The human-readable table."""
    out = []

    def fmt(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    def errors(row: dict) -> str:
        failed = sum(1 for run in row["runs"] if "error" in run)
        return "  (%d failed)" % failed if failed else ""

    def rows(table: dict, unit: str, spec: str, ratio_spec: str) -> list[str]:
        lines = ["  %-26s %10s %10s %10s %11s %10s" % ("path", unit, "x direct", "x haproxy",
                                                       "CPU us/msg", "x haproxy")]
        for path, row in table.items():
            lines.append("  %-26s %10s %10s %10s %11s %10s%s" % (
                path, fmt(row["median"], spec), fmt(row["ratio"], ratio_spec),
                fmt(row.get("relay_ratio"), ".2f"), fmt(row.get("cpu_us"), ".0f"),
                fmt(row.get("relay_cpu_ratio"), ".2f"), errors(row)))
        return lines

    out.append("proxsmtpd benchmark: medians of %d round(s), %d where CPU has a target;"
               " ratios: the median of the per-round ratios; %s CPUs; workers %s; spool on %s;"
               " commit %s" % (args.rounds, args.cpu_rounds, meta["cpus"], meta["workers"],
                               meta["spool_fs"], meta["commit"]))
    if "throughput" in results:
        out.append("")
        out.append("throughput: %d parallel sessions, %d messages of %d bytes"
                   % (args.parallel, args.messages, args.size))
        out.extend(rows(results["throughput"], "msg/s", ".1f", ".3f"))
        table = results["throughput"]
        none = table["none"].get("cpu_us")
        floor = results.get("spawn_floor")
        if table["pipe"].get("cpu_us") is not None and none is not None:
            spawn = table["pipe"]["cpu_us"] - none
            out.append("  filter spawn (pipe: cat) costs %.0f us of CPU per message"
                       " (pipe - none, the reaped filter processes included)" % spawn)
            if floor:
                out.append("  spawn floor (bench/spawn.py, from a worker-sized Python process):"
                           " /bin/sh -c cat %.0f us, cat %.0f us; pipe - none is %.2f x the"
                           " /bin/sh -c cat floor" % (floor["shell_us"], floor["exec_us"],
                                                      spawn / floor["shell_us"]))
        for path, base_name in [*((path, "none") for path in NODES),
                                (CLIENTS % args.parallel, NONE_CLIENTS % args.parallel)]:
            cpu = table.get(path, {}).get("cpu_us")
            ratio = paired_ratio(table[path]["runs"], table[base_name]["runs"]) \
                if cpu is not None and base_name in table else None
            if ratio is not None:
                out.append("  filter node (bench/node.py), %s: %.0f us per message, %.2f x %s"
                           % (path, cpu, ratio, base_name))
        for path, what in (("relay", "empty uvloop relay (Python's floor)"),
                           ("floor", "SMTP contract on uvloop (the contract floor)")):
            floor = table.get(path, {}).get("cpu_us")
            if floor and none:
                out.append("  %s %.0f us per message; proxsmtpd (none) is %.2f x that floor"
                           % (what, floor, paired_ratio(table["none"]["runs"],
                                                        table[path]["runs"])))
    if "latency" in results:
        out.append("")
        out.append("serial latency: 1 client, %d messages of %d bytes one after another"
                   % (args.latency_messages, args.latency_size))
        out.extend(rows(results["latency"], "ms/msg", ".3f", ".2f"))
    if "throughput" in results or "latency" in results:
        out.append("  (one message per session; rows marked%s send all messages over the same"
                   " sessions: smtp-source -d; haproxy: mode tcp, the TCP-relay ceiling;"
                   " relay: bench/barerelay.py; floor: bench/floor.py, the SMTP contract and"
                   " nothing else; CPU: user+sys of the path's own processes"
                   " from /proc, clients and sink excluded)" % REUSED.replace(",", ""))
    if "pipelining" in results:
        out.append("")
        out.append("pipelining client (bench/pipeline.py): %d sessions, %d messages of %d bytes,"
                   " MAIL+RCPT+DATA in one write" % (args.parallel, args.messages, args.size))
        out.extend(rows(results["pipelining"], "msg/s", ".1f", ".3f"))
    if "bdat" in results:
        out.append("")
        out.append("bdat (bench/pipeline.py, --bdat: MAIL+RCPT+BDAT LAST in one write): %d"
                   " sessions, %d messages of %d bytes, to bench/node.py --chunking"
                   % (args.parallel, args.messages, args.size))
        out.extend(rows(results["bdat"], "msg/s", ".1f", ".3f"))
    if "concurrency" in results:
        held = results["concurrency"]
        out.append("")
        out.append("concurrency: %d sessions opened through the proxy and held" % args.hold)
        out.append("  greeted %s/%d in %s s; %s proxy processes; PSS idle %s MB, held %s MB"
                   % (fmt(held["greeted"], ".0f"), args.hold, fmt(held["seconds_to_greet"], ".2f"),
                      fmt(held["processes"], ".0f"), fmt(held["idle_pss_mb"], ".1f"),
                      fmt(held["held_pss_mb"], ".1f")))
        out.append("  PSS per held session %s KB; a fresh client greeted while held: %s (%s ms)"
                   % (fmt(held["pss_kb_per_session"], ".1f"),
                      "yes" if held["fresh_accepted"] else "NO",
                      fmt(held["fresh_greeting_ms"], ".1f")))
    if "middata" in results:
        out.append("")
        out.append("mid-DATA: %d sessions, each %d KiB into a message it does not finish"
                   % (args.data_hold, args.data_kb))
        out.append("  %-10s %8s %8s %8s %11s %6s %9s" % ("path", "in DATA", "idle MB", "held MB",
                                                        "KB/session", "files", "after MB"))
        for path, row in results["middata"].items():
            out.append("  %-10s %8s %8s %8s %11s %6s %9s%s"
                       % (path, fmt(row["in_data"], ".0f"), fmt(row["idle_pss_mb"], ".1f"),
                          fmt(row["held_pss_mb"], ".1f"), fmt(row["pss_kb_per_session"], ".1f"),
                          fmt(row["spool_files"], ".0f"), fmt(row["after_pss_mb"], ".1f"),
                          errors(row)))
        out.append("  (PSS of master and workers; files: temp files while held; after: PSS 5 s"
                   " after the sessions closed)")
    if "large" in results:
        out.append("")
        out.append("large message: one message of %d MiB" % args.large_mb)
        out.append("  %-22s %10s %10s %14s" % ("path", "seconds", "x direct", "RSS growth MB"))
        for path, row in results["large"].items():
            out.append("  %-22s %10s %10s %14s%s"
                       % (path, fmt(row["median"], ".2f"), fmt(row["ratio"], ".2f"),
                          fmt(row.get("rss_growth_mb"), ".1f"), errors(row)))
    if "tls" in results:
        out.append("")
        out.append("tls: %d parallel STARTTLS sessions, %d messages of %d bytes, one per session"
                   % (args.parallel, args.tls_messages, args.size))
        out.append("  %-22s %10s %10s" % ("path", "msg/s", "x direct"))
        for path, row in results["tls"]["throughput"].items():
            out.append("  %-22s %10s %10s%s" % (path, fmt(row["median"], ".1f"),
                                                 fmt(row["ratio"], ".3f"), errors(row)))
        held = results["tls"]["hold"]
        out.append("  %s TLS sessions held (both legs) in %s s; PSS idle %s MB, held %s MB,"
                   " per session %s KB" % (fmt(held["held"], ".0f"),
                                           fmt(held["seconds_to_establish"], ".1f"),
                                           fmt(held["idle_pss_mb"], ".1f"),
                                           fmt(held["held_pss_mb"], ".1f"),
                                           fmt(held["pss_kb_per_session"], ".1f")))
    if "milter" in results:
        out.append("")
        out.append("milter (bench/milter.py: accepts at once, no reply asked before the end of"
                   " the message): %d parallel sessions, %d messages of %d bytes"
                   % (args.parallel, args.messages, args.size))
        out.extend(rows(results["milter"]["throughput"], "msg/s", ".1f", ".3f"))
        table = results["milter"]["throughput"]
        ratios = []
        for path, none in (("milter", "none"), ("milter, no reuse", "none"),
                           ("milter" + REUSED, "none" + REUSED)):
            ratio = paired_ratio(table[path]["runs"], table[none]["runs"]) \
                if path in table and none in table else None
            ratios.append("%s %s" % (path, fmt(ratio, ".2f")))
        out.append("  CPU x none: " + ", ".join(ratios))
        held = results["milter"]["hold"]
        out.append("  (x direct: against none; CPU: the proxy's processes, not the milter's)")
        out.append("  milter chain (two): %s/%d sessions held; PSS idle %s MB, held %s MB,"
                   " per session %s KB" % (fmt(held["greeted"], ".0f"), args.hold,
                                           fmt(held["idle_pss_mb"], ".1f"),
                                           fmt(held["held_pss_mb"], ".1f"),
                                           fmt(held["pss_kb_per_session"], ".1f")))
    out.append("")
    out.append("targets:")
    for item in targets:
        out.append("  %s  %-58s %s" % ("PASS" if item["pass"] else "FAIL", item["target"],
                                        item["shown"]))
    return "\n".join(out) + "\n"


def describe(args: argparse.Namespace, spool: str) -> dict:
    """Where and on what the figures were taken."""
    def output(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, cwd=REPO,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    dirty = bool(output(["git", "status", "--porcelain", "--untracked-files=no"]))
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "host": socket.gethostname(),
            "cpus": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "proxsmtpd": args.proxsmtpd,
            "workers": args.workers if args.workers is not None else "default",
            "commit": (output(["git", "rev-parse", "--short", "HEAD"]) or "?")
            + ("+dirty" if dirty else ""),
            "postfix": output(["postconf", "-d", "-h", "mail_version"]),
            "loadavg_at_start": os.getloadavg(), "spool_fs": output(
                ["stat", "-f", "-c", "%T", spool])}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    for tool in ("smtp-sink", "smtp-source"):
        if shutil.which(tool) is None:
            print("%s not found (Debian package postfix)" % tool, file=sys.stderr)
            return 2
    if not os.access(args.proxsmtpd, os.X_OK):
        print("%s not found: run `make venv`" % args.proxsmtpd, file=sys.stderr)
        return 2
    peers.raise_nofile(peers.NOFILE)
    workdir = tempfile.mkdtemp(prefix="proxsmtpd-bench-")
    bench = Bench(args, workdir)
    meta = describe(args, bench.spool_root)
    started = time.monotonic()
    try:
        bench.start()
        for section in ("throughput", "latency", "pipelining", "bdat", "concurrency", "middata",
                        "large", "tls", "milter"):
            if section in args.only:
                getattr(bench, section)()
    except peers.PeerError as exc:
        print("benchmark setup failed: %s" % exc, file=sys.stderr)
        return 2
    finally:
        bench.stop_all()
        if bench.spool_root != workdir:
            shutil.rmtree(bench.spool_root, ignore_errors=True)
        if args.keep:
            print("work directory kept: %s" % workdir, file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    meta["seconds"] = round(time.monotonic() - started, 1)
    targets = check_targets(bench.results, args)
    text = render(bench.results, targets, meta, args)
    sys.stdout.write(text)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        params = {k: getattr(args, k) for k in FULL}
        params.update(quick=args.quick, only=sorted(args.only))
        with open(args.json, "w") as handle:
            json.dump({"meta": meta, "params": params, "results": bench.results,
                       "targets": targets, "limits": TARGETS}, handle, indent=2)
            handle.write("\n")
        with open(os.path.splitext(args.json)[0] + ".txt", "w") as handle:
            handle.write(text)
    if args.check and not all(item["pass"] for item in targets):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
