"""`make install` / `make uninstall`, the installed program, the SysV init script
and the systemd unit (issue 5).

Installs are staged with DESTDIR in temporary directories.  The installed
program runs on /usr/bin/python3 when Debian's python3-* dependencies are
there (what `make install-deps` sets up), else on the test's own Python.
Daemons started by the init script are stopped by pid at the end of each test.
"""

from __future__ import annotations

import configparser
import os
import pwd
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from harness import (REPO, RecordingServer, children, free_port, pid_alive, stop_process,
                     title, wait_until)

MESSAGE = b"From: a@client.test\r\nTo: b@server.test\r\nSubject: installed\r\n\r\nbody\r\n"
DEPENDENCIES = "import configobj, daemon, setproctitle, prctl"


def runtime_python() -> str:
    """The interpreter the installed wrapper is pointed at."""
    debian = subprocess.run(["/usr/bin/python3", "-c", DEPENDENCIES], capture_output=True)
    return "/usr/bin/python3" if debian.returncode == 0 else sys.executable


def make(target: str, destdir: Path | None, prefix: str = "/usr/local", **variables: str) -> str:
    args = ["make", "-C", str(REPO), "--no-print-directory", target, "PREFIX=%s" % prefix,
            "INSTALL_PYTHON=%s" % runtime_python()]
    if destdir is not None:
        args.append("DESTDIR=%s" % destdir)
    args += ["%s=%s" % item for item in variables.items()]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def modules() -> list[str]:
    return sorted(path.name for path in (REPO / "proxsmtp").glob("*.py"))


def expected_tree(prefix: str, sysconfdir: str) -> dict[str, int]:
    """Every file `make install` must create, relative to DESTDIR, with its mode."""
    prefix = prefix.lstrip("/")
    tree = {
        "etc/init.d/proxsmtpd": 0o755,
        "%s/proxsmtpd.conf" % sysconfdir.lstrip("/"): 0o644,
        "%s/sbin/proxsmtpd" % prefix: 0o755,
        "%s/lib/systemd/system/proxsmtpd.service" % prefix: 0o644,
        "%s/share/man/man8/proxsmtpd.8" % prefix: 0o644,
        "%s/share/man/man5/proxsmtpd.conf.5" % prefix: 0o644,
        "%s/share/proxsmtpd/add_header.sh" % prefix: 0o755,
        "%s/share/proxsmtpd/reject_pattern.sh" % prefix: 0o755,
        "%s/share/proxsmtpd/spamassassin.sh" % prefix: 0o755,
        "%s/share/proxsmtpd/proxsmtpd.conf" % prefix: 0o644,
        "%s/share/proxsmtpd/proxsmtpd.default" % prefix: 0o644,
    }
    for name in modules():
        tree["%s/lib/proxsmtpd/proxsmtp/%s" % (prefix, name)] = 0o644
    return tree


def tree_of(root: Path) -> dict[str, int]:
    return {str(path.relative_to(root)): path.stat().st_mode & 0o7777
            for path in root.rglob("*") if path.is_file() or path.is_symlink()}


@pytest.fixture
def destdir(tmp_path):
    root = tmp_path / "stage"
    root.mkdir()
    return root


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """One staged install with the defaults (PREFIX=/usr/local) for the read-only tests."""
    root = tmp_path_factory.mktemp("staged")
    make("install", root)
    return root


# --- make install / uninstall ---------------------------------------------------------------

def test_install_creates_exactly_the_expected_tree(staged):
    assert tree_of(staged) == expected_tree("/usr/local", "/usr/local/etc")


@pytest.mark.parametrize("prefix, sysconfdir", [("/usr/local", "/usr/local/etc"),
                                                ("/usr", "/etc"),
                                                ("/opt/pxs", "/opt/pxs/etc")])
def test_installed_paths_follow_prefix(destdir, prefix, sysconfdir):
    make("install", destdir, prefix)
    assert tree_of(destdir) == expected_tree(prefix, sysconfdir)
    program = destdir / prefix.lstrip("/") / "sbin" / "proxsmtpd"
    shown = subprocess.run([str(program), "-v"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[0].startswith("proxsmtpd (version ")
    assert "(config: %s/proxsmtpd.conf)" % sysconfdir in shown.stdout
    default_config = Path(sysconfdir) / "proxsmtpd.conf"
    if not default_config.exists():     # don't start a daemon on a host's real config
        ran = subprocess.run([str(program), "-d", "1"], capture_output=True, text=True, timeout=60)
        assert ran.returncode == 2, ran.stderr
        assert "configuration file not found: %s" % default_config in ran.stderr
    root = Path(destdir)
    man5 = (root / prefix.lstrip("/") / "share/man/man5/proxsmtpd.conf.5").read_text()
    assert "%s/proxsmtpd.conf" % sysconfdir in man5
    init = (root / "etc/init.d/proxsmtpd").read_text()
    assert "\nDAEMON=%s/sbin/proxsmtpd\n" % prefix in init
    assert "\nCONFIG=%s/proxsmtpd.conf\n" % sysconfdir in init
    unit = (root / prefix.lstrip("/") / "lib/systemd/system/proxsmtpd.service").read_text()
    assert "ExecStart=%s/sbin/proxsmtpd -f %s/proxsmtpd.conf " % (prefix, sysconfdir) in unit
    if prefix != "/usr/local":
        stale = [name for name in expected_tree(prefix, sysconfdir)
                 if "/usr/local" in (root / name).read_text()]
        assert stale == [], "files still naming /usr/local: %s" % stale


def test_install_keeps_an_existing_config_and_uninstall_keeps_the_config(destdir):
    config = destdir / "usr/local/etc/proxsmtpd.conf"
    config.parent.mkdir(parents=True)
    config.write_text("OutAddress: 10.9.8.7:25\n")
    output = make("install", destdir)
    assert "kept the existing" in output
    assert config.read_text() == "OutAddress: 10.9.8.7:25\n"
    sample = destdir / "usr/local/share/proxsmtpd/proxsmtpd.conf"
    assert sample.read_text() == (REPO / "etc/proxsmtpd.conf").read_text()
    program = destdir / "usr/local/sbin/proxsmtpd"
    subprocess.run([str(program), "-v"], check=True, capture_output=True, timeout=60)
    make("uninstall", destdir)
    assert tree_of(destdir) == {"usr/local/etc/proxsmtpd.conf": 0o644}
    assert not (destdir / "usr/local/lib/proxsmtpd").exists()
    assert not (destdir / "usr/local/share/proxsmtpd").exists()


def test_install_then_uninstall_leaves_only_the_config(destdir):
    make("install", destdir, "/usr")
    make("uninstall", destdir, "/usr")
    assert tree_of(destdir) == {"etc/proxsmtpd.conf": 0o644}


# --- the installed program ---------------------------------------------------------------

def test_installed_program_relays_through_installed_filter(staged, tmp_path):
    """The staged copy runs the config of the test, with an installed example filter."""
    server = RecordingServer()
    port = free_port()
    conf = tmp_path / "proxsmtpd.conf"
    conf.write_text("OutAddress: %s\nListen: 127.0.0.1:%d\nTempDirectory: %s\nTimeOut: 20\n"
                    "FilterTimeout: 10\nFilterCommand: %s\n"
                    % (server.address, port, tmp_path,
                       staged / "usr/local/share/proxsmtpd/add_header.sh"))
    log = tmp_path / "stderr"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen([str(staged / "usr/local/sbin/proxsmtpd"), "-d", "3", "-f", str(conf)],
                                stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                                start_new_session=True)
    try:
        wait_until(lambda: proc.poll() is not None or listening(port), 20, what="proxsmtpd")
        assert proc.poll() is None, log.read_text()
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
            client.sendmail("a@client.test", ["b@server.test"], MESSAGE)
        raw = server.wait_messages(1)[0].raw
        assert raw.startswith(b"X-Proxsmtpd-Filtered: from 127.0.0.1 by "), raw
        assert raw.endswith(MESSAGE.rstrip(b"\r\n")), raw
        wait_until(lambda: "status=FILTERED" in log.read_text(), 10, what="the message log line")
    finally:
        stop_process(proc, 15, group=True)
        server.stop()
    assert proc.returncode == 0, log.read_text()


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


# --- the SysV init script -----------------------------------------------------------------

class InitScript:
    """The staged /etc/init.d/proxsmtpd, pointed at the staged program, a test
    config and a pid file in a temporary directory via PROXSMTPD_DEFAULTS."""

    def __init__(self, staged: Path, workdir: Path, config_text: str) -> None:
        self.script = staged / "etc/init.d/proxsmtpd"
        self.config = workdir / "proxsmtpd.conf"
        self.config.write_text(config_text)
        self.pidfile = workdir / "run" / "proxsmtpd.pid"
        self.pidfile.parent.mkdir()
        self.defaults = workdir / "default"
        self.defaults.write_text("DAEMON=%s\nCONFIG=%s\nPIDFILE=%s\nSTOP_TIMEOUT=20\n" % (
            staged / "usr/local/sbin/proxsmtpd", self.config, self.pidfile))
        self.started: set[int] = set()

    def __call__(self, action: str) -> subprocess.CompletedProcess:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PROXSMTPD_DEFAULTS": str(self.defaults)}
        done = subprocess.run(["/bin/sh", str(self.script), action], capture_output=True,
                              text=True, timeout=90, env=env)
        if self.pidfile.exists() and self.pidfile.read_text().strip().isdigit():
            self.started.add(int(self.pidfile.read_text()))
        return done

    def pid(self) -> int:
        return int(self.pidfile.read_text())

    def cleanup(self) -> None:
        """Whatever the test did: no daemon of ours survives it."""
        for pid in self.started:
            if not pid_alive(pid):
                continue
            group = os.getpgid(pid)
            os.kill(pid, signal.SIGTERM)
            try:
                wait_until(lambda: not pid_alive(pid), 20, what="daemon exit")
            except AssertionError:
                if group != os.getpgrp():
                    os.killpg(group, signal.SIGKILL)
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def init_script(staged, tmp_path):
    made: list[InitScript] = []

    def create(config_text: str) -> InitScript:
        script = InitScript(staged, tmp_path, config_text)
        made.append(script)
        return script

    yield create
    for script in made:
        script.cleanup()


def test_init_script_start_status_reload_stop(init_script, tmp_path):
    server = RecordingServer()
    port = free_port()
    spool = tmp_path / "spool"
    spool.mkdir()
    settings = ("OutAddress: %s\nListen: 127.0.0.1:%d\nTempDirectory: %s\nTimeOut: 20\nWorkers: 2\n"
                % (server.address, port, spool))
    init = init_script(settings)
    try:
        assert init("status").returncode == 3
        started = init("start")
        assert started.returncode == 0, started.stdout + started.stderr
        assert init.pidfile.exists()
        master = init.pid()
        assert pid_alive(master)
        assert title(master) == "proxsmtpd: master -f %s" % init.config
        workers = wait_until(lambda: len(children(master)) == 2 and children(master), 20,
                             what="two workers")
        assert sorted(workers.values()) == ["proxsmtpd: worker 1 [0 sessions]",
                                            "proxsmtpd: worker 2 [0 sessions]"]
        status = init("status")
        assert status.returncode == 0 and "running (pid %d)" % master in status.stdout
        again = init("start")
        assert again.returncode == 0 and init.pid() == master

        with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
            client.sendmail("a@client.test", ["b@server.test"], MESSAGE)
        assert b"X-Reloaded" not in server.wait_messages(1)[0].raw

        init.config.write_text(settings + "Header: X-Reloaded: yes\n")
        reloaded = init("reload")
        assert reloaded.returncode == 0, reloaded.stderr
        fresh = wait_until(lambda: (set(children(master)) - set(workers)) and
                           len(children(master)) == 2 and children(master), 20,
                           what="workers replaced after SIGHUP")
        assert sorted(fresh.values()) == ["proxsmtpd: worker 3 [0 sessions]",
                                          "proxsmtpd: worker 4 [0 sessions]"]
        assert init.pid() == master and init("status").returncode == 0
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
            client.sendmail("a@client.test", ["b@server.test"], MESSAGE)
        assert b"X-Reloaded: yes\r\n" in server.wait_messages(2)[1].raw

        stopped = init("stop")
        assert stopped.returncode == 0, stopped.stderr
        assert not init.pidfile.exists()
        assert not pid_alive(master)
        assert not [pid for pid in fresh if pid_alive(pid)]
        status = init("status")
        assert status.returncode == 3 and "not running" in status.stdout
        assert init("stop").returncode == 0
        assert init("reload").returncode == 7
        assert os.listdir(spool) == []
    finally:
        server.stop()


def test_init_script_restart_and_force_reload(init_script, tmp_path):
    port = free_port()
    init = init_script("OutAddress: 127.0.0.1:9\nListen: 127.0.0.1:%d\nTempDirectory: %s\nWorkers: 1\n"
                       % (port, tmp_path))
    assert init("force-reload").returncode == 0           # not running: starts it
    first = init.pid()
    assert init("try-restart").returncode == 0
    second = init.pid()
    assert second != first and not pid_alive(first) and pid_alive(second)
    assert init("restart").returncode == 0
    assert init.pid() != second and init("status").returncode == 0
    assert init("stop").returncode == 0
    assert init("try-restart").returncode == 0 and init("status").returncode == 3


def test_init_script_reports_start_failures(init_script, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        init = init_script("OutAddress: 127.0.0.1:9\nListen: 127.0.0.1:%d\nTempDirectory: %s\n"
                           % (port, tmp_path))
        failed = init("start")
        assert failed.returncode == 1, failed.stdout + failed.stderr
        assert "couldn't bind" in failed.stderr
        assert init("status").returncode == 3
    init.config.write_text("NoSuchSetting: 1\n")
    failed = init("start")
    assert failed.returncode == 6 and "invalid config line" in failed.stderr
    assert init("bogus").returncode == 2


def test_init_script_follows_pidfile_setting(init_script, tmp_path):
    pidfile = tmp_path / "from-config.pid"
    init = init_script("OutAddress: 127.0.0.1:9\nListen: 127.0.0.1:%d\nTempDirectory: %s\n"
                       "Workers: 1\nPidFile: %s\n" % (free_port(), tmp_path, pidfile))
    started = init("start")
    assert started.returncode == 0, started.stderr
    assert "ignoring pid file" not in started.stderr
    assert pidfile.exists() and not init.pidfile.exists()
    init.started.add(int(pidfile.read_text()))
    assert init("status").returncode == 0
    assert init("stop").returncode == 0 and not pidfile.exists()


def test_init_script_with_user_drops_root_and_cleans_up(staged):
    """User: nobody: the pid file is handed to nobody and the daemon cannot remove
    it from a root-owned directory; stop still leaves nothing behind."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to User: nobody")
    workdir = Path(tempfile.mkdtemp(prefix="pxs-init-"))
    workdir.chmod(0o755)
    spool = workdir / "spool"
    spool.mkdir(mode=0o1777)
    spool.chmod(0o1777)
    init = InitScript(staged, workdir, "OutAddress: 127.0.0.1:9\nListen: 127.0.0.1:%d\n"
                      "TempDirectory: %s\nUser: nobody\nWorkers: 1\n" % (free_port(), spool))
    try:
        started = init("start")
        assert started.returncode == 0, started.stdout + started.stderr
        master = init.pid()
        status = Path("/proc/%d/status" % master).read_text()
        uid = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
        assert set(uid) == {str(pwd_uid("nobody"))}, status
        effective = next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:"))
        assert int(effective, 16) == 1 << 12, "only CAP_NET_ADMIN should be left: %s" % effective
        assert init.pidfile.stat().st_uid == pwd_uid("nobody")
        assert init("reload").returncode == 0 and init("status").returncode == 0
        assert init("stop").returncode == 0
        assert not pid_alive(master) and not init.pidfile.exists()
        assert init("status").returncode == 3
    finally:
        init.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


def pwd_uid(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


def test_init_script_has_an_lsb_header(staged):
    text = (staged / "etc/init.d/proxsmtpd").read_text()
    header = text.split("### BEGIN INIT INFO\n", 1)[1].split("### END INIT INFO", 1)[0]
    fields = dict(line[2:].split(":", 1) for line in header.splitlines() if ":" in line)
    assert fields["Provides"].strip() == "proxsmtpd"
    assert fields["Default-Start"].split() == ["2", "3", "4", "5"]
    assert fields["Default-Stop"].split() == ["0", "1", "6"]
    assert "$network" in fields["Required-Start"]


# --- the systemd unit ---------------------------------------------------------------------

def unit_of(root: Path, prefix: str = "usr/local") -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str
    parser.read(root / prefix / "lib/systemd/system/proxsmtpd.service")
    return parser


def test_systemd_unit_matches_the_daemon_contract(staged):
    service = unit_of(staged)["Service"]
    assert service["Type"] == "forking"
    start = service["ExecStart"].split()
    assert start[:3] == ["/usr/local/sbin/proxsmtpd", "-f", "/usr/local/etc/proxsmtpd.conf"]
    assert start[3:] == ["-p", service["PIDFile"]]
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert int(service["LimitNOFILE"]) >= 6 * 3000
    bounding = set(service["CapabilityBoundingSet"].split())
    assert bounding == {"CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE", "CAP_SETUID", "CAP_SETGID"}
    assert set(service["AmbientCapabilities"].split()) <= {"CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"}
    assert "User" not in service, "proxsmtpd drops to User: itself"
    assert unit_of(staged)["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed (package systemd): can't verify the unit")
    prefix = tmp_path / "prefix"
    make("install", None, str(prefix), INITDIR=str(tmp_path / "init.d"))
    unit = prefix / "lib/systemd/system/proxsmtpd.service"
    env = {**os.environ, "MANPATH": str(prefix / "share/man")}
    checked = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True,
                             timeout=120, env=env)
    assert checked.returncode == 0 and checked.stderr.strip() == "", checked.stderr
    broken = tmp_path / "broken.service"
    broken.write_text(unit.read_text().replace("KillMode=mixed", "KillMode=bogus"))
    checked = subprocess.run([tool, "verify", str(broken)], capture_output=True, text=True,
                             timeout=120, env=env)
    assert "bogus" in checked.stderr, "verify didn't notice a broken unit: can't trust it"
