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
- `bad_milter(mode, stage="optneg", delay=60.0, unix=False, quit_nc="close",
  idle=None)`: a factory; mode `down` (a free port, no process), `slow`,
  `garbage`, `close` or `good`; quit_nc `keep`: SMFIC_QUIT_NC keeps the
  connection; idle: seconds after which an idle connection is closed
  (tests/milters/badmilter.py).
- `rspamd_milter`: rspamd's proxy worker in milter mode scanning by itself
  (`self_scan`), from a config of its own: DNS pointed at a loopback port
  nobody answers (no message waits on a resolver), a five-entry TLD list
  (the full one takes rspamd half a minute to compile), milter_headers on
  for local clients; GTUBE (`.gtube`) is refused with rspamd's own reply.
- `opendkim_milter`: OpenDKIM signing for example.org with a key made by
  opendkim-genkey; `.dns_txt` is the TXT record and `.verify(message)`
  checks a signature with dkimpy (python3-dkim).
- `clamav_milter`: clamd offline with one custom `.ndb` signature (no
  freshclam, no official database) behind clamav-milter, which refuses a
  message carrying `.signature`.
The real milters are session-scoped (each serves any number of tests) and
skip the test, saying which binary is missing, where one is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
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

    def __init__(self, name: str, directory: Path, unix: bool = False,
                 spec: str | None = None) -> None:
        self.name = name
        self.dir = directory
        self.spec = spec or ("unix:%s" % (directory / ("%s.sock" % name)) if unix
                             else "inet:127.0.0.1:%d" % free_port())
        self.log = directory / ("%s.events" % name)
        self.output = directory / ("%s.out" % name)
        self.proc: subprocess.Popen | None = None
        # libmilter answers SIGTERM only when its accept loop next wakes up
        # (seconds later); a test milter keeps no state worth a clean exit
        self.kill = False

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
        if self.proc is not None and self.kill and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
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
    milter.kill = True
    command = [SYSTEM_PYTHON, str(HERE / "milters" / "testmilter.py"), "--name", name,
               "--log", str(milter.log)]
    if noreply:
        command.append("--noreply")
    if connect:
        command += ["--connect", connect]
    return milter.start(command + [milter.spec])


def start_bad_milter(milters: MilterSet, mode: str, stage: str = "optneg",
                     delay: float = 60.0, unix: bool = False,
                     quit_nc: str = "close", idle: float | None = None) -> MilterProcess:
    milter = milters.add(MilterProcess("bad-" + mode, milters.directory("pxm-bad-"), unix))
    if mode == "down":
        return milter
    extra = ["--idle", str(idle)] if idle is not None else []
    return milter.start([PYTHON, str(HERE / "milters" / "badmilter.py"), "--mode", mode, *extra,
                         "--stage", stage, "--delay", str(delay), "--quit-nc", quit_nc,
                         "--log", str(milter.log), milter.spec])


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


# --- the real milters -----------------------------------------------------------------

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"

RSPAMD_CONF = """\
options {{
  pidfile = "{dir}/rspamd.pid";
  filters = "";
  dns {{ nameserver = ["127.0.0.1:{dns_port}"]; timeout = 0.2s; retransmits = 1; }}
  hs_cache_dir = "{dir}";
  cache_file = "{dir}/symbols.cache";
  history_file = "{dir}/rspamd.history";
  stats_file = "{dir}/stats.ucl";
  dynamic_conf = "{dir}/rspamd_dynamic";
  control_socket = "{dir}/rspamd.sock mode=0600";
  tempdir = "{dir}";
  url_tld = "{dir}/tld.dat";
  local_addrs = [];
}}
logging {{ type = "file"; filename = "{dir}/rspamd.log"; level = "info"; }}
lua = "$RULESDIR/rspamd.lua";
modules {{ path = "$PLUGINSDIR"; }}
actions {{ reject = 15; add_header = 6; greylist = 4; }}
milter_headers {{
  use = ["x-spamd-result", "x-rspamd-server", "x-rspamd-queue-id", "x-spam-status"];
  extended_spam_headers = true;
  skip_local = false;
  skip_authenticated = false;
}}
worker "rspamd_proxy" {{
  bind_socket = "127.0.0.1:{port}";
  milter = yes;
  timeout = 120s;
  count = 1;
  upstream "local" {{ default = yes; self_scan = yes; }}
}}
"""


def silent_udp_port() -> int:
    """A loopback UDP port nobody listens on: a DNS query there fails at once
    (ICMP port unreachable) instead of waiting for a resolver."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def need(*binaries: str) -> None:
    missing = [binary for binary in binaries if not shutil.which(binary)
               and not os.path.exists(binary)]
    if missing:
        pytest.skip("not installed: %s" % ", ".join(missing))


def start_rspamd(milters: MilterSet) -> MilterProcess:
    directory = milters.directory("pxm-rspamd-")
    milter = milters.add(MilterProcess("rspamd", directory))
    port = int(milter.spec.rsplit(":", 1)[1])
    (directory / "tld.dat").write_text("com\norg\nnet\ntest\nexample\n")
    conf = directory / "rspamd.conf"
    conf.write_text(RSPAMD_CONF.format(dir=directory, port=port, dns_port=silent_udp_port()))
    # -i: run the workers as root (the directory is ours alone), -f: no fork
    milter.start(["rspamd", "-f", "-i", "-c", str(conf)], timeout=60)
    milter.gtube = GTUBE
    milter.rspamd_log = directory / "rspamd.log"
    return milter


OPENDKIM_CONF = """\
Mode s
Domain {domain}
Selector {selector}
KeyFile {dir}/{selector}.private
Socket {socket}
PidFile {dir}/opendkim.pid
RequireSafeKeys false
Background no
Syslog no
Canonicalization relaxed/relaxed
"""

DKIM_VERIFY = """\
import sys, dkim
record = sys.argv[1].encode()
message = sys.stdin.buffer.read().replace(b"\\r\\n", b"\\n").replace(b"\\n", b"\\r\\n")
ok = dkim.verify(message, dnsfunc=lambda name, timeout=5: record)
sys.exit(0 if ok else 1)
"""


def start_opendkim(milters: MilterSet, domain: str = "example.org",
                   selector: str = "test") -> MilterProcess:
    directory = milters.directory("pxm-opendkim-")
    milter = milters.add(MilterProcess("opendkim", directory))
    subprocess.run(["opendkim-genkey", "-D", str(directory), "-d", domain, "-s", selector],
                   check=True, capture_output=True, timeout=60)
    txt = (directory / ("%s.txt" % selector)).read_text()
    milter.domain, milter.selector = domain, selector
    milter.dns_txt = "".join(txt.split('"')[1::2])
    milter.public_key = milter.dns_txt.split("p=", 1)[1].split(";")[0].strip()
    host, port = milter.spec[5:].rsplit(":", 1)
    conf = directory / "opendkim.conf"
    conf.write_text(OPENDKIM_CONF.format(domain=domain, selector=selector, dir=directory,
                                         socket="inet:%s@%s" % (port, host)))
    milter.kill = True     # libmilter, as the test milter
    milter.start(["opendkim", "-f", "-x", str(conf)])
    milter.verify = lambda message: dkim_verify(milter.dns_txt, message)
    return milter


def dkim_verify(record: str, message: bytes) -> bool:
    """Whether dkimpy finds a valid DKIM-Signature in `message` (LF or CRLF
    line ends), with `record` as the selector's TXT record."""
    result = subprocess.run([SYSTEM_PYTHON, "-c", DKIM_VERIFY, record], input=message,
                            capture_output=True, timeout=60)
    if result.returncode not in (0, 1):
        raise RuntimeError("dkimpy failed: %s" % result.stderr.decode(errors="replace"))
    return result.returncode == 0


CLAMD_CONF = """\
Foreground yes
LocalSocket {dir}/clamd.sock
DatabaseDirectory {dir}/db
PidFile {dir}/clamd.pid
LogFile {dir}/clamd.log
SelfCheck 0
OfficialDatabaseOnly no
Bytecode no
"""

CLAMAV_MILTER_CONF = """\
MilterSocket {socket}
ClamdSocket unix:{dir}/clamd.sock
Foreground yes
PidFile {dir}/clamav-milter.pid
LogFile {dir}/clamav-milter.log
LogInfected Full
OnInfected Reject
OnFail Defer
RejectMsg Infected with %v
AddHeader Replace
"""

CLAMAV_SIGNATURE = "PROXSMTPD-CLAMAV-TEST-SIGNATURE-7f3a9c"
CLAMAV_NAME = "Proxsmtpd.Test.Signature"
# clamd names a detection by a signature outside its official databases so
CLAMAV_DETECTED = CLAMAV_NAME + ".UNOFFICIAL"


def start_clamav(milters: MilterSet) -> MilterProcess:
    directory = milters.directory("pxm-clamav-")
    (directory / "db").mkdir()
    # an extended signature (clamav's signatures documentation, .ndb):
    # name:target type (0 = any file):offset:hex bytes
    (directory / "db" / "proxsmtpd.ndb").write_text(
        "%s:0:*:%s\n" % (CLAMAV_NAME, CLAMAV_SIGNATURE.encode().hex()))
    (directory / "clamd.conf").write_text(CLAMD_CONF.format(dir=directory))
    clamd = milters.add(MilterProcess("clamd", directory,
                                      spec="unix:%s/clamd.sock" % directory))
    clamd.start(["clamd", "-c", str(directory / "clamd.conf")], timeout=60)
    milter = milters.add(MilterProcess("clamav-milter", directory))
    host, port = milter.spec[5:].rsplit(":", 1)
    (directory / "clamav-milter.conf").write_text(
        CLAMAV_MILTER_CONF.format(dir=directory, socket="inet:%s@%s" % (port, host)))
    milter.kill = True     # libmilter, as the test milter
    milter.start(["clamav-milter", "-c", str(directory / "clamav-milter.conf")])
    milter.clamd = clamd
    milter.signature, milter.virus = CLAMAV_SIGNATURE, CLAMAV_DETECTED
    return milter


@pytest.fixture(scope="session")
def rspamd_milter():
    """rspamd's proxy worker as a milter (see the module's docstring)."""
    need("rspamd")
    milters = MilterSet()
    try:
        yield start_rspamd(milters)
    finally:
        milters.close()


@pytest.fixture(scope="session")
def opendkim_milter():
    """OpenDKIM signing example.org (see the module's docstring)."""
    need("opendkim", "opendkim-genkey", SYSTEM_PYTHON)
    if subprocess.run([SYSTEM_PYTHON, "-c", "import dkim"], capture_output=True).returncode:
        pytest.skip("not installed: python3-dkim (dkimpy) for %s" % SYSTEM_PYTHON)
    milters = MilterSet()
    try:
        yield start_opendkim(milters)
    finally:
        milters.close()


@pytest.fixture(scope="session")
def clamav_milter():
    """clamav-milter over an offline clamd (see the module's docstring)."""
    need("clamd", "clamav-milter")
    milters = MilterSet()
    try:
        yield start_clamav(milters)
    finally:
        milters.close()
