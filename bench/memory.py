"""Memory of the proxy: its master process and every descendant (workers,
and whatever they spawn), read from /proc."""

from __future__ import annotations

import os
import threading
import time


def _parents() -> dict[int, int]:
    """pid -> parent pid for every process visible in /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry, "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces: split after it.
        fields = stat[stat.rfind(b")") + 2:].split()
        parents[int(entry)] = int(fields[1])
    return parents


def family(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, ()))
    return found


def _field_kb(path: str, name: bytes) -> int:
    """A `Name:  1234 kB` field of a /proc file; 0 if the process is gone."""
    try:
        with open(path, "rb") as handle:
            for line in handle:
                if line.startswith(name):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def pss_kb(pid: int) -> int:
    """Proportional set size of `pid` and its descendants, in KiB."""
    return sum(_field_kb("/proc/%d/smaps_rollup" % p, b"Pss:") for p in family(pid))


def rss_kb(pid: int) -> int:
    """Resident set size of `pid` and its descendants, in KiB."""
    return sum(_field_kb("/proc/%d/status" % p, b"VmRSS:") for p in family(pid))


class RssSampler:
    """Samples the summed VmRSS of the proxy's processes in a thread, to catch
    the peak during a transfer (VmHWM alone cannot be reset between runs).

    The processes are those alive at the start, when the proxy is idle: its
    master and workers.  Filters spawned later are not the proxy's memory, and
    a child caught between vfork and exec would count its parent twice."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.pids = family(pid)
        self.interval = interval
        self.baseline = sum(self._read(b"VmRSS:").values())
        self.hwm_before = self._read(b"VmHWM:")
        self.peak = self.baseline
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def _read(self, name: bytes) -> dict[int, int]:
        return {p: _field_kb("/proc/%d/status" % p, name) for p in self.pids}

    def _sample(self) -> None:
        self.peak = max(self.peak, sum(self._read(b"VmRSS:").values()))
        self.samples += 1

    @property
    def growth_kb(self) -> int:
        """Peak growth over the baseline: the sampled peak, or the rise of the
        high-water marks of processes that lived through it, whichever is larger."""
        hwm_after = self._read(b"VmHWM:")
        hwm_rise = sum(max(0, hwm_after[p] - before) for p, before in self.hwm_before.items())
        return max(self.peak - self.baseline, hwm_rise)


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of `pid` and its descendants, in seconds: each live
    thread's run time from /proc/PID/task/TID/schedstat (nanoseconds, where
    /proc/PID/stat counts 10 ms ticks), plus the children they have reaped
    (a filter program that ran and exited is in its worker's cutime and
    cstime).  Clients and sinks are not descendants, so not counted."""
    total = 0.0
    for member in family(pid):
        try:
            with open("/proc/%d/stat" % member, "rb") as handle:
                stat = handle.read()
            tasks = os.listdir("/proc/%d/task" % member)
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        total += (int(fields[13]) + int(fields[14])) / CLOCK_TICKS     # cutime, cstime
        run_ns = None
        for task in tasks:
            try:
                with open("/proc/%d/task/%s/schedstat" % (member, task), "rb") as handle:
                    run_ns = (run_ns or 0) + int(handle.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
        if run_ns is None:          # a kernel without schedstat: the ticks, then
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        else:
            total += run_ns / 1e9
    return total
