"""Network namespaces for the transparent-proxy tests: client <-> router <-> server.

- `unavailable(feature)`: why a feature can't be tested here (None if it can),
  found out by really creating a namespace and trying the iptables targets in it.
- `Namespace`: a uniquely named namespace; `call()` runs a function in it on a
  short-lived thread (setns affects only that thread), so test clients and
  recording servers are plain in-process sockets living in the namespace.
- `Topology`: three namespaces, two veth links, IPv4 + IPv6 addresses, default
  routes, forwarding on the router; deleted (with every process started in
  them, by pid) by `close()`, even when setting up failed half way.
- `ROUTER_RECIPE_*`: the seed README's router lines, applied as written.
- `NamespacedProxy`: proxsmtpd run with `ip netns exec` in the router.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from harness import REPO, TIMESTAMP, pid_alive, stop_process, wait_until, write_config

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

CLIENT4, ROUTER4_C, ROUTER4_S, SERVER4 = "10.251.1.2", "10.251.1.1", "10.251.2.1", "10.251.2.2"
CLIENT6, ROUTER6_C, ROUTER6_S, SERVER6 = ("fd00:251:1::2", "fd00:251:1::1",
                                          "fd00:251:2::1", "fd00:251:2::2")

# The seed README's "Fully transparent" rc.local lines, verbatim.
ROUTER_RECIPE_TPROXY = """\
modprobe nf_conntrack_ipv4
iptables -t mangle -N DIVERT
iptables -t mangle -A DIVERT -j MARK --set-mark 0x01/0x01
iptables -t mangle -A DIVERT -j ACCEPT
iptables -t mangle -A PREROUTING -p tcp -m socket -j DIVERT
iptables -t mangle -A PREROUTING -p tcp --dport 25 -j TPROXY --tproxy-mark 0x1/0x1 --on-port 10025
ip route flush table 100
ip rule add fwmark 1 lookup 100
ip route add local 0.0.0.0/0 dev lo table 100
echo 0 > /proc/sys/net/ipv4/conf/lo/rp_filter
echo 1 > /proc/sys/net/ipv4/ip_forward
"""

# The same for IPv6 (ip6tables has the same DIVERT / TPROXY targets; table 100
# is new, so there is nothing to flush).
ROUTER_RECIPE_TPROXY6 = """\
ip6tables -t mangle -N DIVERT
ip6tables -t mangle -A DIVERT -j MARK --set-mark 0x01/0x01
ip6tables -t mangle -A DIVERT -j ACCEPT
ip6tables -t mangle -A PREROUTING -p tcp -m socket -j DIVERT
ip6tables -t mangle -A PREROUTING -p tcp --dport 25 -j TPROXY --tproxy-mark 0x1/0x1 --on-port 10025
ip -6 rule add fwmark 1 lookup 100
ip -6 route add local ::/0 dev lo table 100
echo 1 > /proc/sys/net/ipv6/conf/all/forwarding
"""

# TransparentProxy: client, behind a NAT REDIRECT.
ROUTER_RECIPE_REDIRECT = """\
iptables -t nat -A PREROUTING -p tcp --dport 25 -j REDIRECT --to-ports 10025
echo 1 > /proc/sys/net/ipv4/ip_forward
"""

ROUTER_RECIPE_REDIRECT6 = """\
ip6tables -t nat -A PREROUTING -p tcp --dport 25 -j REDIRECT --to-ports 10025
echo 1 > /proc/sys/net/ipv6/conf/all/forwarding
"""

# Lines of the recipes allowed to fail: there is no nf_conntrack_ipv4 module on
# kernels >= 4.19 (and maybe no modprobe), and table 100 doesn't exist yet in a
# fresh namespace, so flushing it fails ("FIB table does not exist").
TOLERATED = ("modprobe ", "ip route flush table 100")


def _run(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError("%s failed (%d): %s" % (" ".join(args), result.returncode,
                                                  result.stderr.strip()))
    return result


def unique_name(role: str) -> str:
    return "pxs-%s-%s" % (role, secrets.token_hex(4))


def namespace_names() -> set[str]:
    try:
        return set(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return set()


# --- can we test here? ------------------------------------------------------------

_PROBES = {
    "tproxy": ["iptables -t mangle -N DIVERT",
               "iptables -t mangle -A PREROUTING -p tcp -m socket -j DIVERT",
               "iptables -t mangle -A PREROUTING -p tcp --dport 25 -j TPROXY "
               "--tproxy-mark 0x1/0x1 --on-port 10025"],
    "tproxy6": ["ip6tables -t mangle -N DIVERT",
                "ip6tables -t mangle -A PREROUTING -p tcp -m socket -j DIVERT",
                "ip6tables -t mangle -A PREROUTING -p tcp --dport 25 -j TPROXY "
                "--tproxy-mark 0x1/0x1 --on-port 10025"],
    "notrack": ["iptables -t raw -A PREROUTING -p tcp -j CT --notrack"],
    "redirect": ["iptables -t nat -A PREROUTING -p tcp --dport 25 -j REDIRECT --to-ports 10025"],
    "redirect6": ["ip6tables -t nat -A PREROUTING -p tcp --dport 25 -j REDIRECT --to-ports 10025"],
}
_probe_results: dict[str, str | None] | None = None


def unavailable(feature: str = "netns") -> str | None:
    """Why `feature` ("netns", or a key of _PROBES) can't be tested here; None if it can."""
    global _probe_results
    if _probe_results is None:
        _probe_results = _probe()
    return _probe_results.get("netns") or _probe_results.get(feature)


def _probe() -> dict[str, str | None]:
    if os.geteuid() != 0:
        return {"netns": "needs root (network namespaces, iptables, CAP_NET_ADMIN)"}
    missing = [tool for tool in ("ip", "iptables", "ip6tables") if shutil.which(tool) is None]
    if missing:
        return {"netns": "missing tools: %s (apt-get install iproute2 iptables)" % " ".join(missing)}
    name = unique_name("probe")
    try:
        _run("ip", "netns", "add", name)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return {"netns": "can't create a network namespace (root with CAP_SYS_ADMIN and "
                         "CAP_NET_ADMIN needed): %s" % exc}
    results: dict[str, str | None] = {"netns": None}
    try:
        for feature, lines in _PROBES.items():
            results[feature] = None
            for line in lines:
                got = _run("ip", "netns", "exec", name, *line.split(), check=False)
                if got.returncode != 0:
                    results[feature] = "kernel/iptables can't do `%s`: %s" % (line, got.stderr.strip())
                    break
    finally:
        _run("ip", "netns", "del", name, check=False)
    return results


# --- one namespace ----------------------------------------------------------------

def _enter(name: str) -> None:
    fd = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, "setns(%s): %s" % (name, os.strerror(err)))
    finally:
        os.close(fd)


class Namespace:
    """A network namespace with a unique name (deleted by `delete()`)."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.name = unique_name(role)
        _run("ip", "netns", "add", self.name)
        self.processes: list[subprocess.Popen] = []
        self.ip("link", "set", "lo", "up")

    def ip(self, *args: str) -> subprocess.CompletedProcess:
        return _run("ip", "-n", self.name, *args)

    def sh(self, line: str, check: bool = True) -> subprocess.CompletedProcess:
        """One shell line inside the namespace (as an operator's rc.local would run it)."""
        return _run("ip", "netns", "exec", self.name, "/bin/sh", "-c", line, check=check)

    def sysctl(self, path: str, value: str) -> None:
        self.sh("echo %s > /proc/sys/%s" % (value, path))

    def apply(self, recipe: str) -> list[str]:
        """Run a recipe line by line, failing on any error but the TOLERATED ones;
        returns the tolerated lines that failed."""
        tolerated = []
        for line in recipe.splitlines():
            result = self.sh(line, check=False)
            if result.returncode == 0:
                continue
            if line.startswith(TOLERATED):
                tolerated.append(line)
                continue
            raise RuntimeError("router recipe line failed: %s: %s" % (line, result.stderr.strip()))
        return tolerated

    def popen(self, args: list[str], **kwargs: Any) -> subprocess.Popen:
        """A process inside the namespace (ip netns exec execs it: same pid), own session."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.name, *args],
                                start_new_session=True, **kwargs)
        self.processes.append(proc)
        return proc

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 60, **kwargs: Any) -> Any:
        """fn(*args, **kwargs) on a thread inside the namespace; sockets it creates
        stay in the namespace after it returns."""
        outcome: dict[str, Any] = {}

        def body() -> None:
            try:
                _enter(self.name)
                outcome["value"] = fn(*args, **kwargs)
            except BaseException as exc:   # handed over to the caller
                outcome["error"] = exc

        thread = threading.Thread(target=body, name="netns-%s" % self.role, daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise AssertionError("call in namespace %s didn't return within %ss" % (self.name, timeout))
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("value")

    def stop_processes(self) -> None:
        for proc in self.processes:
            stop_process(proc, 10, group=True)

    def delete(self) -> None:
        self.stop_processes()
        _run("ip", "netns", "del", self.name, check=False)


# --- three namespaces in a row ------------------------------------------------------------

class Topology:
    """client (eth0) <-> (eth0) router (eth1) <-> (eth0) server, IPv4 and IPv6."""

    def __init__(self) -> None:
        self.namespaces: list[Namespace] = []
        try:
            self.client = self._add("client")
            self.router = self._add("router")
            self.server = self._add("server")
            self._link(self.client, CLIENT4, CLIENT6, self.router, "eth0", ROUTER4_C, ROUTER6_C)
            self._link(self.server, SERVER4, SERVER6, self.router, "eth1", ROUTER4_S, ROUTER6_S)
        except BaseException:
            self.close()
            raise

    @property
    def names(self) -> list[str]:
        return [ns.name for ns in self.namespaces]

    def _add(self, role: str) -> Namespace:
        ns = Namespace(role)
        self.namespaces.append(ns)
        return ns

    @staticmethod
    def _link(end: Namespace, ip4: str, ip6: str, router: Namespace, router_if: str,
              router4: str, router6: str) -> None:
        end.ip("link", "add", "eth0", "type", "veth", "peer", "name", router_if,
               "netns", router.name)
        end.ip("addr", "add", ip4 + "/24", "dev", "eth0")
        end.ip("-6", "addr", "add", ip6 + "/64", "dev", "eth0", "nodad")
        end.ip("link", "set", "eth0", "up")
        end.ip("route", "add", "default", "via", router4)
        end.ip("-6", "route", "add", "default", "via", router6)
        router.ip("addr", "add", router4 + "/24", "dev", router_if)
        router.ip("-6", "addr", "add", router6 + "/64", "dev", router_if, "nodad")
        router.ip("link", "set", router_if, "up")

    def processes(self) -> list[subprocess.Popen]:
        return [proc for ns in self.namespaces for proc in ns.processes]

    def close(self) -> None:
        """Stop every process started in the namespaces (by pid), delete them all."""
        for ns in self.namespaces:
            ns.stop_processes()
        for ns in self.namespaces:
            ns.delete()


# --- proxsmtpd in the router ------------------------------------------------------------

class NamespacedProxy:
    """proxsmtpd -d 4 in a namespace, with a generated config; stopped by pid."""

    def __init__(self, ns: Namespace, workdir: Path, settings: dict[str, object]) -> None:
        self.ns = ns
        self.workdir = Path(workdir)
        self.spool = self.workdir / "spool"
        self.spool.mkdir(exist_ok=True)
        merged: dict[str, object] = {"TempDirectory": str(self.spool), "TimeOut": 20}
        merged.update(settings)
        self.settings = merged
        self.conf = write_config(self.workdir / "proxsmtpd.conf", merged)
        self.stderr_path = self.workdir / "proxsmtpd.stderr"
        self.proc: subprocess.Popen | None = None

    @property
    def port(self) -> int:
        return int(str(self.settings["Listen"]).rsplit(":", 1)[-1])

    def start(self, timeout: float = 15.0) -> "NamespacedProxy":
        with open(self.stderr_path, "wb") as stderr:
            self.proc = self.ns.popen([sys.executable, "-m", "proxsmtp.cli", "-d", "4",
                                       "-f", str(self.conf)],
                                      cwd=REPO, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
        try:
            wait_until(lambda: self.listening() or self.proc.poll() is not None, timeout,
                       what="proxsmtpd listening in %s" % self.ns.name)
        except AssertionError:
            raise AssertionError("proxsmtpd didn't listen:\n%s" % self.log()) from None
        if self.proc.poll() is not None:
            raise AssertionError("proxsmtpd exited with %d:\n%s" % (self.proc.returncode, self.log()))
        return self

    def listening(self) -> bool:
        """A LISTEN socket on our port in the namespace (read through the process's
        own /proc/PID/net, so no test connection is needed)."""
        wanted = ":%04X" % self.port
        for table in ("tcp", "tcp6"):
            try:
                with open("/proc/%d/net/%s" % (self.proc.pid, table)) as handle:
                    rows = handle.read().splitlines()[1:]
            except OSError:
                continue
            for row in rows:
                fields = row.split()
                if fields[1].endswith(wanted) and fields[3] == "0A":
                    return True
        return False

    def pids(self) -> list[int]:
        """The daemon and every process below it."""
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            try:
                for task in os.listdir("/proc/%d/task" % pid):
                    with open("/proc/%d/task/%s/children" % (pid, task)) as handle:
                        todo.extend(int(child) for child in handle.read().split())
            except OSError:
                continue
        return found

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        pids = self.pids()
        stop_process(self.proc, 15, group=True)
        for pid in pids[1:]:      # a child that left our process group
            try:
                if pid_alive(pid) and os.getpgid(pid) != self.proc.pid:
                    os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return self.proc.returncode

    def log(self) -> str:
        """Its stderr, without the timestamps (as harness.Proxy.log)."""
        try:
            return TIMESTAMP.sub("", self.stderr_path.read_text(errors="replace"))
        except FileNotFoundError:
            return ""

    def spool_files(self) -> list[str]:
        return sorted(os.listdir(self.spool))
