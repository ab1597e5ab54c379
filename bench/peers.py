"""The processes a benchmark drives: smtp-sink, proxsmtpd and smtp-source.

Every process is started here with its output in a log file of the run's
work directory, and stopped by its own pid.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import time

NOFILE = 10000        # the seed's "High volume" recipe: ulimit -n 10000
HOST = "127.0.0.1"


class PeerError(Exception):
    """A peer could not be started, or a client run failed."""


# Under pytest-xdist (`make test`) each worker takes its ports from a range
# of its own, below the kernel's ephemeral ports (ip_local_port_range,
# 32768 and up): a port one worker found free and has not bound yet is then
# never another worker's, nor a connection's source port.  Found free and
# then taken by someone else, a port would put one test's traffic into
# another's server.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")     # gw0, gw1, ...
PORTS_PER_WORKER = 1500
_next_port = (os.getpid() * 7) % PORTS_PER_WORKER       # a subprocess of the worker starts elsewhere


def free_port(host: str = HOST) -> int:
    """A port of `host` nobody listens on right now."""
    global _next_port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if not XDIST_WORKER[2:].isdigit():
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            return sock.getsockname()[1]
    base = 20000 + PORTS_PER_WORKER * int(XDIST_WORKER[2:])
    for _ in range(PORTS_PER_WORKER):
        port = base + _next_port
        _next_port = (_next_port + 1) % PORTS_PER_WORKER
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise PeerError("no free port in %d-%d" % (base, base + PORTS_PER_WORKER - 1))


def raise_nofile(limit: int = NOFILE) -> None:
    """Open-file limit of at least `limit` (raising the hard limit needs root)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= limit:
        return
    if hard != resource.RLIM_INFINITY and hard < limit:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
            return
        except (ValueError, OSError):
            limit = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


def greeting(port: int, timeout: float = 5.0) -> bytes:
    """The first reply line a fresh connection to `port` gets (then QUIT)."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        data = b""
        while b"\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        try:
            sock.sendall(b"QUIT\r\n")
            sock.recv(4096)
        except OSError:
            pass
    return data.split(b"\n", 1)[0].rstrip(b"\r")


class Peer:
    """A long-running server process, stopped by its pid."""

    def __init__(self, name: str, argv: list[str], logdir: str) -> None:
        self.name = name
        self.argv = argv
        self.log_path = os.path.join(logdir, name + ".log")
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, port: int, timeout: float = 15.0) -> "Peer":
        """Start and wait until `port` greets with 220."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, preexec_fn=raise_nofile)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise PeerError("%s exited with %s at start: %s"
                                % (self.name, self.proc.returncode, self.log_tail()))
            try:
                line = greeting(port, timeout=2.0)
                if line.startswith(b"220"):
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise PeerError("%s did not greet on port %d: %s"
                                % (self.name, port, self.log_tail()))
            time.sleep(0.05)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, lines: int = 5) -> str:
        try:
            with open(self.log_path, "rb") as handle:
                text = handle.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])


def sink(name: str, port: int, logdir: str, max_sessions: int = 5000) -> Peer:
    """smtp-sink on `port`: accepts and discards everything."""
    argv = ["smtp-sink"]
    if os.geteuid() == 0:
        argv += ["-u", "nobody"]
    argv += ["-m", str(max_sessions), "%s:%d" % (HOST, port), "4096"]
    return Peer(name, argv, logdir).start(port)


def proxy(name: str, program: str, port: int, out_port: int, workdir: str,
          settings: dict[str, str], max_connections: int, spool_root: str | None = None) -> Peer:
    """proxsmtpd in the foreground (-d 0: errors only) with a generated config;
    its TempDirectory is a fresh directory in `spool_root` (default: workdir)."""
    spool = os.path.join(spool_root or workdir, "spool-" + name)
    os.makedirs(spool, exist_ok=True)
    conf = os.path.join(workdir, name + ".conf")
    lines = {"Listen": "%s:%d" % (HOST, port), "OutAddress": "%s:%d" % (HOST, out_port),
             "MaxConnections": str(max_connections), "TempDirectory": spool}
    lines.update(settings)
    with open(conf, "w") as handle:
        handle.writelines("%s: %s\n" % item for item in lines.items())
    return Peer(name, [program, "-d", "0", "-f", conf], workdir).start(port)


def source(port: int, sessions: int, messages: int, size: int, same_session: bool = False,
           timeout: float = 900.0, clients: int = 1) -> float:
    """Run smtp-source; the wall-clock seconds it took.  Raises PeerError when
    it fails (it exits non-zero on any unexpected reply).  `clients` > 1:
    that many smtp-source processes at once, each with its own HELO name
    (client1.example, ...) and its share of the sessions and messages, so
    that the proxy sees a different client from one session to the next."""
    if clients > 1:
        return _sources(port, sessions, messages, size, same_session, timeout, clients)
    argv = source_argv(port, sessions, messages, size, same_session, "bench.example")
    started = time.perf_counter()
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=timeout, preexec_fn=raise_nofile)
    except subprocess.TimeoutExpired:
        raise PeerError("smtp-source timed out after %.0f s" % timeout) from None
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        text = (done.stderr or done.stdout).decode("utf-8", "replace").strip()
        raise PeerError("smtp-source exited %d: %s" % (done.returncode, text[-300:]))
    return elapsed


def source_argv(port: int, sessions: int, messages: int, size: int, same_session: bool,
                helo: str) -> list[str]:
    argv = ["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", str(size),
            "-f", "bench@example.com", "-t", "sink@example.com", "-M", helo]
    if same_session:
        argv.append("-d")
    argv.append("%s:%d" % (HOST, port))
    return argv


def _sources(port: int, sessions: int, messages: int, size: int, same_session: bool,
             timeout: float, clients: int) -> float:
    """smtp-source as `clients` processes, messages and sessions shared out."""
    started = time.perf_counter()
    running = []
    for number in range(clients):
        share = messages // clients + (number < messages % clients)
        if share == 0:
            continue
        argv = source_argv(port, max(1, sessions // clients), share, size, same_session,
                           "client%d.example" % (number + 1))
        running.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, preexec_fn=raise_nofile))
    failed = []
    for process in running:
        try:
            out, _ = process.communicate(timeout=max(1.0, started + timeout - time.perf_counter()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            failed.append("smtp-source timed out after %.0f s" % timeout)
            continue
        if process.returncode != 0:
            failed.append("smtp-source exited %d: %s" % (
                process.returncode, out.decode("utf-8", "replace").strip()[-300:]))
    elapsed = time.perf_counter() - started
    if failed:
        raise PeerError(failed[0])
    return elapsed


HAPROXY_CFG = """\
global
    maxconn 4000

defaults
    mode tcp
    timeout connect 10s
    timeout client 120s
    timeout server 120s

frontend relay
    bind {host}:{port}
    default_backend sink

backend sink
    server sink {host}:{out_port}
"""


def haproxy(name: str, program: str, port: int, out_port: int, workdir: str) -> Peer:
    """haproxy in `mode tcp` (threads: one per CPU, its default) relaying to
    `out_port`: a pure TCP relay, the ceiling for any proxy in the path."""
    conf = os.path.join(workdir, name + ".cfg")
    with open(conf, "w") as handle:
        handle.write(HAPROXY_CFG.format(host=HOST, port=port, out_port=out_port))
    return Peer(name, [program, "-db", "-f", conf], workdir).start(port)


def bare_relay(name: str, python: str, port: int, out_port: int, workdir: str,
               workers: int | None = None, script: str = "barerelay.py") -> Peer:
    """bench/barerelay.py: an empty uvloop byte relay, Python's floor; or
    another script of its command line (`script`: floor.py, the contract floor)."""
    argv = [python, os.path.join(os.path.dirname(os.path.abspath(__file__)), script),
            "%s:%d" % (HOST, port), "%s:%d" % (HOST, out_port)]
    if workers:
        argv += ["--workers", str(workers)]
    return Peer(name, argv, workdir).start(port)


def pipeline(port: int, sessions: int, messages: int, size: int, python: str,
             new_session: bool = False, timeout: float = 900.0, bdat: bool = False) -> float:
    """Run bench/pipeline.py (the pipelining client; `bdat`: by BDAT, RFC 3030);
    the seconds its sessions took."""
    argv = [python, os.path.join(os.path.dirname(os.path.abspath(__file__)), "pipeline.py"),
            "--sessions", str(sessions), "--messages", str(messages), "--size", str(size),
            "%s:%d" % (HOST, port)]
    if new_session:
        argv.append("--new-session")
    if bdat:
        argv.append("--bdat")
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=timeout, preexec_fn=raise_nofile)
    except subprocess.TimeoutExpired:
        raise PeerError("pipeline.py timed out after %.0f s" % timeout) from None
    if done.returncode != 0:
        text = (done.stderr or done.stdout).decode("utf-8", "replace").strip()
        raise PeerError("pipeline.py exited %d: %s" % (done.returncode, text[-300:]))
    return json.loads(done.stdout)["seconds"]      # its own clock: no interpreter start-up


def filter_node(name: str, python: str, port: int, workdir: str,
                tls: tuple[str, str] | None = None, workers: int | None = None,
                chunking: bool = False) -> Peer:
    """bench/node.py, the filter node for FilterType smtp: XCLIENT as Postfix
    does it and, with `tls` (certificate, key), STARTTLS.  A peer of its own,
    never a child of the proxy, so its CPU is not counted as the proxy's."""
    argv = [python, os.path.join(os.path.dirname(os.path.abspath(__file__)), "node.py"),
            "%s:%d" % (HOST, port)]
    if tls:
        argv += ["--tls", *tls]
    if workers:
        argv += ["--workers", str(workers)]
    if chunking:
        argv.append("--chunking")
    return Peer(name, argv, workdir).start(port)


def milter(name: str, python: str, port: int, workdir: str, timeout: float = 15.0) -> Peer:
    """bench/milter.py on `port`: a milter that accepts at once.  A peer of its
    own, so its CPU is not counted as the proxy's.  A milter says nothing
    until the MTA does: it is up when it accepts a connection."""
    argv = [python, os.path.join(os.path.dirname(os.path.abspath(__file__)), "milter.py"),
            "%s:%d" % (HOST, port)]
    peer = Peer(name, argv, workdir)
    with open(peer.log_path, "ab") as log:
        peer.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, preexec_fn=raise_nofile)
    deadline = time.monotonic() + timeout
    while peer.proc.poll() is None and time.monotonic() < deadline:
        try:
            socket.create_connection((HOST, port), timeout=2.0).close()
            return peer
        except OSError:
            time.sleep(0.05)
    peer.stop()
    raise PeerError("%s did not listen on port %d: %s" % (name, port, peer.log_tail()))


def spawn_floor(python: str, count: int, size: int, timeout: float = 300.0) -> dict:
    """bench/spawn.py: CPU per spawn of `/bin/sh -c cat` (and of `cat`) from a
    worker-sized Python process, as JSON."""
    argv = [python, os.path.join(os.path.dirname(os.path.abspath(__file__)), "spawn.py"),
            "--count", str(count), "--size", str(size)]
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise PeerError("spawn.py timed out after %.0f s" % timeout) from None
    if done.returncode != 0:
        text = (done.stderr or done.stdout).decode("utf-8", "replace").strip()
        raise PeerError("spawn.py exited %d: %s" % (done.returncode, text[-300:]))
    return json.loads(done.stdout)
