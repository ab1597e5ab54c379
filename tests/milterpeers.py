"""Milters as test peers: a scriptable libmilter milter, broken milters, and
the real ones operators run (rspamd, OpenDKIM, clamav-milter).

Each is started from a throwaway directory of its own (mode 0755, so that
Postfix's smtpd, running as `postfix`, can reach a unix socket there), on a
free loopback port or a unix socket in that directory, and stopped by pid.
Nothing under /etc is read for configuration or written.  Every fixture
yields an object with `.spec` (the string for proxsmtpd's `Milters:` and
Postfix's `smtpd_milters`) and `.pid` (None for a milter that is down).

Fixtures (registered in tests/conftest.py):
- `test_milter(name="test", unix=False, noreply=False, connect=None)`: a
  factory of tests/milters/testmilter.py processes (/usr/bin/python3 with
  python3-milter); `.events()` is what each saw, callback by callback.
- `bad_milter(mode, stage="optneg", delay=60.0, unix=False)`: a factory;
  mode `down` (a free port, no process), `slow`, `garbage` or `close`
  (tests/milters/badmilter.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from harness import PYTHON, connected, free_port, stop_process, wait_until

HERE = Path(__file__).resolve().parent
SYSTEM_PYTHON = "/usr/bin/python3"


def workdir(prefix: str) -> Path:
    """A fresh directory others (Postfix's `postfix` user, a daemon run as
    nobody) may enter; short, so that unix socket paths fit in sun_path."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(path, 0o755)
    return path


def reachable(spec: str) -> bool:
    """Whether something accepts connections at a milter address."""
    try:
        if spec.startswith("unix:"):
            sock = connected(spec[5:], None)
        else:
            host, port = spec[5:].rsplit(":", 1)
            sock = connected(host.strip("[]"), int(port))
    except OSError:
        return False
    sock.close()
    return True


class MilterProcess:
    """A milter we started (or, with no command, a milter that is down)."""

    def __init__(self, name: str, directory: Path, unix: bool = False) -> None:
        self.name = name
        self.dir = directory
        self.spec = ("unix:%s" % (directory / ("%s.sock" % name)) if unix
                     else "inet:127.0.0.1:%d" % free_port())
        self.log = directory / ("%s.events" % name)
        self.output = directory / ("%s.out" % name)
        self.proc: subprocess.Popen | None = None
        self.pids: list[int] = []

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, command: list[str], timeout: float = 20.0, **popen) -> "MilterProcess":
        """Run `command` until the milter answers at `spec`."""
        with open(self.output, "ab") as out:
            self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         **popen)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited with %s:\n%s"
                                   % (self.name, self.proc.returncode, self.text()))
            return reachable(self.spec)

        try:
            wait_until(up, timeout, what="milter %s at %s" % (self.name, self.spec))
        except BaseException:
            self.stop()
            raise
        return self

    def text(self) -> str:
        """What the milter wrote on stdout/stderr."""
        try:
            return self.output.read_text(errors="replace")
        except OSError:
            return ""

    def events(self) -> list[dict]:
        """One dict per callback (testmilter) or packet (badmilter), in order."""
        try:
            lines = self.log.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, group=True)


class MilterSet:
    """Every milter one test started, stopped and removed at teardown."""

    def __init__(self) -> None:
        self.milters: list[MilterProcess] = []
        self.dirs: list[Path] = []

    def directory(self, prefix: str) -> Path:
        path = workdir(prefix)
        self.dirs.append(path)
        return path

    def add(self, milter: MilterProcess) -> MilterProcess:
        self.milters.append(milter)
        return milter

    def close(self) -> None:
        for milter in self.milters:
            milter.stop()
        for path in self.dirs:
            shutil.rmtree(path, ignore_errors=True)


def has_libmilter() -> bool:
    return subprocess.run([SYSTEM_PYTHON, "-c", "import Milter"],
                          capture_output=True).returncode == 0


def start_test_milter(milters: MilterSet, name: str = "test", unix: bool = False,
                      noreply: bool = False, connect: str | None = None) -> MilterProcess:
    milter = milters.add(MilterProcess(name, milters.directory("pxm-test-"), unix))
    command = [SYSTEM_PYTHON, str(HERE / "milters" / "testmilter.py"), "--name", name,
               "--log", str(milter.log)]
    if noreply:
        command.append("--noreply")
    if connect:
        command += ["--connect", connect]
    return milter.start(command + [milter.spec])


def start_bad_milter(milters: MilterSet, mode: str, stage: str = "optneg",
                     delay: float = 60.0, unix: bool = False) -> MilterProcess:
    milter = milters.add(MilterProcess("bad-" + mode, milters.directory("pxm-bad-"), unix))
    if mode == "down":
        return milter
    return milter.start([PYTHON, str(HERE / "milters" / "badmilter.py"), "--mode", mode,
                         "--stage", stage, "--delay", str(delay), "--log", str(milter.log),
                         milter.spec])


@pytest.fixture
def test_milter():
    """Factory: `test_milter(name="test", unix=False, noreply=False, connect=None)`
    -> a running tests/milters/testmilter.py; all stopped at teardown."""
    if not os.path.exists(SYSTEM_PYTHON) or not has_libmilter():
        pytest.skip("the test milter needs Debian's python3-milter for /usr/bin/python3")
    milters = MilterSet()
    yield lambda **options: start_test_milter(milters, **options)
    milters.close()


@pytest.fixture
def bad_milter():
    """Factory: `bad_milter(mode, stage="optneg", delay=60.0, unix=False)`, mode
    down | slow | garbage | close -> a misbehaving milter; stopped at teardown."""
    milters = MilterSet()
    yield lambda mode, **options: start_bad_milter(milters, mode, **options)
    milters.close()
