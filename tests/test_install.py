"""`make install` / `make uninstall`, the installed program, the SysV init script
and the systemd unit.

Installs are staged with DESTDIR in temporary directories.  The installed
program runs on /usr/bin/python3 when Debian's python3-* dependencies are
there (what `make install-deps` sets up), else on the test's own Python.
Daemons started by the init script are stopped by pid at the end of each test.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest

import netns
from harness import (REPO, RecordingServer, children, free_port, pid_alive, stop_process,
                     title, wait_until)

pytestmark = [pytest.mark.system, pytest.mark.slow]

MESSAGE = b"From: a@client.test\r\nTo: b@server.test\r\nSubject: installed\r\n\r\nbody\r\n"
DEPENDENCIES = "import configobj, daemon, setproctitle, prctl, prometheus_client"


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
    """The package's modules, rooms included, relative to proxsmtp/."""
    package = REPO / "proxsmtp"
    return sorted(str(path.relative_to(package)) for path in package.rglob("*.py"))


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
        "%s/lib/proxsmtpd/installed-directories" % prefix: 0o644,
        "%s/share/proxsmtpd/grafana-dashboard.json" % prefix: 0o644,
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
    assert dirs_of(destdir) == ["etc"], "uninstall left directories it created"


def dirs_of(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_dir())


def test_uninstall_removes_only_the_directories_install_created(destdir):
    """Directories that were there before (and whatever else is in them) stay."""
    (destdir / "opt/pxs/share/man/man8").mkdir(parents=True)
    (destdir / "opt/pxs/sbin").mkdir(parents=True)
    (destdir / "opt/pxs/sbin/other-program").write_text("")
    make("install", destdir, "/opt/pxs")
    make("install", destdir, "/opt/pxs")        # an upgrade keeps the first install's list
    listed = (destdir / "opt/pxs/lib/proxsmtpd/installed-directories").read_text().split()
    assert "/opt/pxs/share/man/man5" in listed and "/opt/pxs/lib/proxsmtpd" in listed
    assert "/opt/pxs/share/man/man8" not in listed and "/opt/pxs/sbin" not in listed
    output = make("uninstall", destdir, "/opt/pxs")
    assert "removed directory %s/opt/pxs/lib/proxsmtpd\n" % destdir in output
    assert tree_of(destdir) == {"opt/pxs/etc/proxsmtpd.conf": 0o644,
                                "opt/pxs/sbin/other-program": 0o644}
    assert dirs_of(destdir) == ["opt", "opt/pxs", "opt/pxs/etc", "opt/pxs/sbin", "opt/pxs/share",
                                "opt/pxs/share/man", "opt/pxs/share/man/man8"]


def make_or_kill(destdir: Path, timeout: float = 90) -> subprocess.CompletedProcess:
    """`make install PREFIX=/usr DESTDIR=destdir`, in its own process group so that,
    should it hang, the shell it spawned is killed with it rather than left spinning."""
    args = ["make", "-C", str(REPO), "--no-print-directory", "install", "PREFIX=/usr",
            "INSTALL_PYTHON=%s" % runtime_python(), "DESTDIR=%s" % destdir]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("make install DESTDIR=%s did not finish in %d s" % (destdir, timeout))
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


def test_install_into_a_missing_destdir_creates_it(tmp_path):
    """README's own `make install DESTDIR=/tmp/stage` works when the stage isn't there yet."""
    destdir = tmp_path / "not" / "yet" / "stage"
    done = make_or_kill(destdir)
    assert done.returncode == 0, done.stdout + done.stderr
    assert tree_of(destdir) == expected_tree("/usr", "/etc")
    make("uninstall", destdir, "/usr")
    assert tree_of(destdir) == {"etc/proxsmtpd.conf": 0o644}
    assert dirs_of(destdir) == ["etc"], "uninstall left directories it created"


def test_install_into_a_destdir_that_cant_be_made_says_so(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = make_or_kill(blocker / "stage")
    assert done.returncode != 0
    assert "make install: can't create DESTDIR %s; nothing was installed." % (blocker / "stage") \
        in done.stderr, done.stderr
    assert blocker.read_text() == ""


def as_nobody(*command: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                           "--inh-caps=-all", "--bounding-set=-all", *command], cwd=cwd,
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent"})


@pytest.mark.root
def test_install_as_non_root_without_initdir_stops_before_writing(tmp_path):
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to try it as nobody")
    if as_nobody("test", "-r", str(REPO / "Makefile")).returncode != 0:
        pytest.skip("nobody can't read the source tree here")
    prefix = Path(tempfile.mkdtemp(prefix="pxs-prefix-"))
    try:
        prefix.chmod(0o777)
        done = as_nobody("make", "-C", str(REPO), "--no-print-directory", "install",
                         "PREFIX=%s" % prefix, "INSTALL_PYTHON=%s" % runtime_python())
        assert done.returncode != 0
        assert done.stderr.startswith(
            "make install: /etc/init.d is not writable by nobody, so /etc/init.d can't be made; "
            "nothing was installed.\n  Run it as root, or, as nobody, give INITDIR (where the "
            "init script goes) a directory you can write:\n"), done.stderr
        assert "make install PREFIX=/nonexistent/proxsmtpd INITDIR=/nonexistent/proxsmtpd/etc/init.d" \
            in done.stderr
        assert list(prefix.iterdir()) == [], "wrote before stopping"
    finally:
        shutil.rmtree(prefix)


def test_install_prints_next_steps_that_fit_the_prefix(tmp_path):
    prefix, initdir = tmp_path / "prefix", tmp_path / "init.d"
    output = make("install", None, str(prefix), INITDIR=str(initdir))
    unit = prefix / "lib/systemd/system/proxsmtpd.service"
    for line in ("installed.  %s/etc/proxsmtpd.conf listens on 127.0.0.1:10025 and relays to" % prefix,
                 "adduser --system --no-create-home --group proxsmtpd",
                 "2. check the configuration:  %s/sbin/proxsmtpd -t -f %s/etc/proxsmtpd.conf"
                 % (prefix, prefix),
                 "systemctl link %s   # systemd does not look in %s" % (unit, unit.parent),
                 "systemctl daemon-reload && systemctl enable --now proxsmtpd",
                 "or with the init script:  %s/proxsmtpd start" % initdir):
        assert line in output, (line, output)
    assert "update-rc.d" not in output
    make("uninstall", None, str(prefix), INITDIR=str(initdir))
    output = make("install", None, str(prefix), INITDIR=str(initdir), SYSTEMD_PATHS=str(unit.parent))
    assert "systemctl link" not in output and "systemctl daemon-reload" in output
    make("uninstall", None, str(prefix), INITDIR=str(initdir))
    assert dirs_of(tmp_path) == ["prefix", "prefix/etc"]


# --- the installed program ---------------------------------------------------------------

def test_installed_program_relays_through_installed_filter(staged, tmp_path):
    """The staged copy runs the config of the test, with an installed example filter,
    and serves /metrics (with Debian's prometheus_client when it runs on /usr/bin/python3)."""
    server = RecordingServer()
    port, stats_port = free_port(), free_port()
    conf = tmp_path / "proxsmtpd.conf"
    conf.write_text("OutAddress: %s\nListen: 127.0.0.1:%d\nTempDirectory: %s\nTimeOut: 20\n"
                    "FilterTimeout: 10\nFilterCommand: %s\nStatsListen: 127.0.0.1:%d\n"
                    % (server.address, port, tmp_path,
                       staged / "usr/local/share/proxsmtpd/add_header.sh", stats_port))
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
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % stats_port, timeout=10) as answer:
            metrics = answer.read().decode()
        assert 'proxsmtpd_messages_total{status="FILTERED"} 1.0' in metrics, metrics
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

    def __init__(self, staged: Path, workdir: Path, config_text: str | None,
                 netns: str | None = None, rundir: Path | None = None) -> None:
        self.script = staged / "etc/init.d/proxsmtpd"
        self.config = workdir / "proxsmtpd.conf"
        if config_text is None:         # the configuration as `make install` put it
            self.config = staged / "usr/local/etc/proxsmtpd.conf"
        else:
            self.config.write_text(config_text)
        self.netns = netns
        if rundir is None:
            self.pidfile = workdir / "run" / "proxsmtpd.pid"
            self.pidfile.parent.mkdir()
        else:                           # the script makes it, as it makes /run/proxsmtpd
            self.pidfile = rundir / "proxsmtpd.pid"
        self.defaults = workdir / "default"
        self.defaults.write_text("DAEMON=%s\nCONFIG=%s\nPIDFILE=%s\nSTOP_TIMEOUT=20\n" % (
            staged / "usr/local/sbin/proxsmtpd", self.config, self.pidfile))
        if rundir is not None:
            with self.defaults.open("a") as defaults:
                defaults.write("RUNDIR=%s\n" % rundir)
        self.started: set[int] = set()

    def __call__(self, action: str) -> subprocess.CompletedProcess:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PROXSMTPD_DEFAULTS": str(self.defaults)}
        inside = ["ip", "netns", "exec", self.netns] if self.netns else []
        done = subprocess.run([*inside, "/bin/sh", str(self.script), action], capture_output=True,
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


def settled_workers(master: int, wanted, what: str = "two workers") -> dict[int, str]:
    """The master's two workers once each has its own title: a worker just
    forked still carries the master's until it sets its own (pool.py), so
    a count of children alone can be taken before that."""
    def found() -> dict[int, str]:
        workers = children(master)
        named = all(name.startswith("proxsmtpd: worker ") for name in workers.values())
        return workers if len(workers) == 2 and named and wanted(workers) else {}
    return wait_until(found, 20, what=what)


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
        workers = settled_workers(master, lambda found: True)
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
        # workers are replaced one by one (at most Workers x 3 alive): wait for all
        fresh = settled_workers(master, lambda found: not set(found) & set(workers),
                                "workers replaced after SIGHUP")
        assert sorted(fresh.values()) == ["proxsmtpd: worker 3 [0 sessions]",
                                          "proxsmtpd: worker 4 [0 sessions]"]
        assert init.pid() == master and init("status").returncode == 0
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
            client.sendmail("a@client.test", ["b@server.test"], MESSAGE)
        assert b"X-Reloaded: yes\r\n" in server.wait_messages(2)[1].raw

        good = init.config.read_text()
        init.config.write_text(good + "FilterComand: cat\n")
        refused = init("reload")
        assert refused.returncode == 6, refused.stdout + refused.stderr
        assert refused.stderr == (
            'proxsmtpd: %s, line 7: unknown setting "FilterComand" (did you mean FilterCommand?)\n'
            "proxsmtpd: configuration file %s test failed\n"
            "proxsmtpd: %s has errors; the running daemon was left alone\n"
            % (init.config, init.config, init.config))
        for action in ("restart", "try-restart", "force-reload"):
            assert init(action).returncode == 6, action
        assert init.pid() == master and children(master) == fresh, "a broken file reached the daemon"
        init.config.write_text(good)

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


@pytest.mark.netns
@pytest.mark.root
def test_installed_config_starts_as_installed_on_loopback(staged, tmp_path):
    """`service proxsmtpd start` with no edits: a daemon on 127.0.0.1:10025 relaying to
    127.0.0.1:10026, without a warning (in a network namespace of its own: fixed ports)."""
    reason = netns.unavailable()
    if reason:
        pytest.skip(reason)
    installed = staged / "usr/local/etc/proxsmtpd.conf"
    assert installed.read_text() == (REPO / "etc/proxsmtpd.conf").read_text()
    ns = netns.Namespace("install")
    init = InitScript(staged, tmp_path, None, netns=ns.name)
    try:
        server = ns.call(RecordingServer, "127.0.0.1", 10026)
        started = init("start")
        assert started.returncode == 0, started.stdout + started.stderr
        warnings = [line for line in started.stderr.splitlines()
                    if os.path.exists("/dev/log") or "no syslog daemon to log to" not in line]
        assert warnings == [], "warnings at start: %s" % started.stderr
        assert title(init.pid()) == "proxsmtpd: master -f %s" % installed

        def relay() -> None:
            with smtplib.SMTP("127.0.0.1", 10025, timeout=20) as client:
                client.sendmail("a@client.test", ["b@server.test"], MESSAGE)
        ns.call(relay)
        assert server.wait_messages(1)[0].raw == MESSAGE.rstrip(b"\r\n")
        assert init("stop").returncode == 0
        server.stop()
    finally:
        init.cleanup()
        ns.delete()


@pytest.fixture
def public_dir():
    """A directory `nobody` can reach and write (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="proxsmtpd-test-", dir="/tmp"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to User: nobody")
@pytest.mark.root
def test_init_script_makes_the_run_directory_for_user_and_stop_leaves_no_pid_file(
        staged, tmp_path, public_dir):
    """start makes RUNDIR (/run/proxsmtpd by default, gone after a reboot)
    owned by the User: of the configuration, so that the daemon may remove
    its own pid file there; stop leaves no pid file behind, whether the
    daemon was killed (the file names a dead pid) or could only empty it (a
    PidFile: in a directory only root may write)."""
    nobody = pwd.getpwnam("nobody")
    runroot = public_dir / "run"
    runroot.mkdir(mode=0o755)
    rundir = runroot / "proxsmtpd"
    settings = ("OutAddress: 127.0.0.1:9\nListen: 127.0.0.1:%d\nTempDirectory: %s\nWorkers: 1\n"
                "User: nobody\n" % (free_port(), public_dir))
    init = InitScript(staged, tmp_path, settings, rundir=rundir)
    try:
        started = init("start")
        assert started.returncode == 0, started.stdout + started.stderr
        assert "warning" not in started.stderr
        made = rundir.stat()
        assert (made.st_uid, made.st_mode & 0o7777) == (nobody.pw_uid, 0o755)
        master = init.pid()
        assert init("stop").returncode == 0
        assert not pid_alive(master) and not init.pidfile.exists()

        rundir.rmdir()                  # a reboot empties /run
        assert init("start").returncode == 0
        assert rundir.stat().st_uid == nobody.pw_uid
        master = init.pid()
        workers = list(children(master))
        os.kill(master, signal.SIGKILL)
        wait_until(lambda: not pid_alive(master) and not any(map(pid_alive, workers)), 30,
                   what="the daemon and its workers to exit")
        assert init.pidfile.read_text() == "%d\n" % master
        assert init("status").returncode == 1       # dead, with a pid file left
        assert init("stop").returncode == 0
        assert not init.pidfile.exists()
        assert init("status").returncode == 3

        rootonly = runroot / "rootonly"
        rootonly.mkdir(mode=0o755)
        init.pidfile = rootonly / "proxsmtpd.pid"
        init.config.write_text(settings + "PidFile: %s\n" % init.pidfile)
        started = init("start")
        assert started.returncode == 0, started.stdout + started.stderr
        assert "warning: %s, line 6: PidFile: %s is in %s, not writable by User nobody" % (
            init.config, init.pidfile, rootonly) in started.stderr
        master = init.pid()
        assert init("stop").returncode == 0
        assert not pid_alive(master) and not init.pidfile.exists()
    finally:
        init.cleanup()


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
    assert failed.returncode == 6, failed.stderr
    assert 'proxsmtpd: %s, line 1: unknown setting "NoSuchSetting"\n' % init.config in failed.stderr
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


@pytest.mark.root
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

class Unit(dict):
    """{section: {key: [values]}} of a unit file (a key may repeat, as ExecReload does)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        section: dict[str, list[str]] = {}
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = self.setdefault(line.strip("[]"), {})
                continue
            key, _, value = line.partition("=")
            section.setdefault(key.strip(), []).append(value.strip())


def unit_of(root: Path, prefix: str = "usr/local") -> Unit:
    return Unit(root / prefix / "lib/systemd/system/proxsmtpd.service")


def one(service: dict[str, list[str]], key: str) -> str:
    assert len(service[key]) == 1, (key, service[key])
    return service[key][0]


# What the master does as root before it drops to User:, and the capability each needs.
MASTER_NEEDS = {"CAP_NET_BIND_SERVICE",        # Listen on a port below 1024
                "CAP_CHOWN",                   # hand the pid file to User:
                "CAP_SETUID", "CAP_SETGID",    # become User:
                "CAP_NET_ADMIN"}               # IP_TRANSPARENT, kept after the switch


def test_systemd_unit_matches_the_daemon_contract(staged):
    unit = unit_of(staged)
    service = unit["Service"]
    assert one(service, "Type") == "forking"
    start = one(service, "ExecStart").split()
    assert start[:3] == ["/usr/local/sbin/proxsmtpd", "-f", "/usr/local/etc/proxsmtpd.conf"]
    pid_file = one(service, "PIDFile")
    assert start[3:] == ["-p", pid_file]
    assert service["ExecReload"] == ["/usr/local/sbin/proxsmtpd -t -f /usr/local/etc/proxsmtpd.conf",
                                     "/bin/kill -HUP $MAINPID"], "reload must check the file first"
    assert int(one(service, "LimitNOFILE")) >= 6 * 3000
    assert set(one(service, "CapabilityBoundingSet").split()) == MASTER_NEEDS
    assert set(one(service, "AmbientCapabilities").split()) <= {"CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"}
    assert "User" not in service, "proxsmtpd drops to User: itself"
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_systemd_unit_sandbox_leaves_the_daemon_what_it_needs(staged):
    """The hardening directives that could break it, checked against what it does."""
    service = unit_of(staged)["Service"]
    # ProtectSystem=strict: the pid file in RuntimeDirectory, the default TempDirectory
    # (/tmp) private but writable, the README's /var/spool/proxsmtpd writable if present.
    assert one(service, "ProtectSystem") == "strict"
    assert one(service, "PIDFile") == "/run/%s/proxsmtpd.pid" % one(service, "RuntimeDirectory")
    assert one(service, "PrivateTmp") == "yes" and config_default("TempDirectory") == "/tmp"
    assert "-/var/spool/proxsmtpd" in one(service, "ReadWritePaths").split()
    # sockets: TCP over IPv4/IPv6, unix for /dev/log and unix-socket OutAddress/Listen
    assert set(one(service, "RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert one(service, "SystemCallFilter") == "@system-service"
    assert one(service, "NoNewPrivileges") == "yes"
    # Filters may JIT (PCRE in grep -P, perl): no MemoryDenyWriteExecute
    assert "MemoryDenyWriteExecute" not in service


def config_default(name: str) -> str:
    from proxsmtp.process import config
    return config.Config().__dict__[name]


def test_systemd_analyze_security_exposure_at_most_4_5(staged):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed (package systemd): can't rate the unit")
    unit = staged / "usr/local/lib/systemd/system/proxsmtpd.service"
    rated = subprocess.run([tool, "security", "--offline=yes", "--no-pager", str(unit)],
                           capture_output=True, text=True, timeout=120)
    match = re.search(r"Overall exposure level for proxsmtpd\.service: (\d+\.\d+) (\w+)", rated.stdout)
    assert match, rated.stdout + rated.stderr
    assert float(match.group(1)) <= 4.5, rated.stdout
    before = staged / "unhardened.service"
    before.write_text("\n".join(line for line in unit.read_text().splitlines()
                                if not line.startswith(("Protect", "Private", "Restrict", "System",
                                                        "NoNew", "Lock", "UMask"))) + "\n")
    rated = subprocess.run([tool, "security", "--offline=yes", "--no-pager", str(before)],
                           capture_output=True, text=True, timeout=120)
    assert float(re.search(r"exposure level for \S+: (\d+\.\d+)", rated.stdout).group(1)) > 4.5, \
        "the rating can't tell a hardened unit from a bare one"
    before.unlink()


@pytest.mark.root
def test_daemon_runs_in_the_units_capability_bounding_set(staged, tmp_path):
    """ExecStart as systemd would run it (bounding set, no new privileges, UMask) with
    `User: nobody`: it binds, hands the pid file over, drops, relays; ExecReload's
    two commands reload a good file and refuse a broken one.  Without CAP_CHOWN in
    the set the start fails: the set is checked, not assumed.  The pid file is in
    the RuntimeDirectory=, root's, which systemd removes at stop and names in
    $RUNTIME_DIRECTORY: no warning that nobody may not remove the file there."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv")
    service = unit_of(staged)["Service"]
    caps = one(service, "CapabilityBoundingSet").split()
    workdir = Path(tempfile.mkdtemp(prefix="pxs-unit-"))
    server = RecordingServer()
    try:
        workdir.chmod(0o755)
        rundir = workdir / "run"              # RuntimeDirectory: root's, 0755
        rundir.mkdir(mode=0o755)
        spool = workdir / "tmp"               # PrivateTmp: a 1777 /tmp
        spool.mkdir()
        spool.chmod(0o1777)
        port = free_port()
        conf = workdir / "proxsmtpd.conf"
        settings = ("OutAddress: %s\nListen: 127.0.0.1:%d\nTempDirectory: %s\nUser: nobody\n"
                    "Workers: 1\n" % (server.address, port, spool))
        conf.write_text(settings)
        pid_file = rundir / "proxsmtpd.pid"
        program = str(staged / "usr/local/sbin/proxsmtpd")

        def sandboxed(args: list[str], bounding: list[str]) -> subprocess.CompletedProcess:
            allowed = ",".join("+" + cap[4:].lower() for cap in bounding)
            return subprocess.run(["setpriv", "--bounding-set=-all," + allowed,
                                   "--inh-caps=-all", "--no-new-privs", "sh", "-c",
                                   'umask %s && exec "$@"' % one(service, "UMask"), "sh",
                                   program, *args], capture_output=True, text=True, timeout=60,
                                  env={**os.environ, "RUNTIME_DIRECTORY": str(rundir)})

        without_chown = sandboxed(["-f", str(conf), "-p", str(pid_file)],
                                  [cap for cap in caps if cap != "CAP_CHOWN"])
        assert without_chown.returncode == 1
        assert "couldn't write pid file %s: Operation not permitted" % pid_file in without_chown.stderr
        started = sandboxed(["-f", str(conf), "-p", str(pid_file)], caps)
        assert started.returncode == 0, started.stderr
        assert "warning" not in started.stderr, started.stderr
        master = int(pid_file.read_text())
        try:
            assert pid_file.stat().st_uid == pwd_uid("nobody")
            status = Path("/proc/%d/status" % master).read_text()
            fields = dict(line.split(":", 1) for line in status.splitlines())
            assert set(fields["Uid"].split()) == {str(pwd_uid("nobody"))}
            assert int(fields["CapEff"], 16) == 1 << 12        # CAP_NET_ADMIN only
            assert fields["NoNewPrivs"].strip() == "1"
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
                client.sendmail("a@client.test", ["b@server.test"], MESSAGE)
            server.wait_messages(1)
            workers = children(master)
            conf.write_text(settings + "FilterComand: cat\n")
            checked = sandboxed(["-t", "-f", str(conf)], caps)
            assert checked.returncode == 2 and "unknown setting" in checked.stderr
            conf.write_text(settings + "Header: X-Unit: reloaded\n")
            checked = sandboxed(["-t", "-f", str(conf)], caps)
            assert checked.returncode == 0, checked.stderr
            os.kill(master, signal.SIGHUP)
            wait_until(lambda: children(master) and not set(children(master)) & set(workers), 20,
                       what="the old worker replaced")
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
                client.sendmail("a@client.test", ["b@server.test"], MESSAGE)
            assert b"X-Unit: reloaded\r\n" in server.wait_messages(2)[1].raw
        finally:
            os.kill(master, signal.SIGTERM)
            wait_until(lambda: not pid_alive(master), 30, what="the daemon to stop")
    finally:
        server.stop()
        shutil.rmtree(workdir)


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


# --- make run -------------------------------------------------------------------------------

def netns_pids(name: str) -> list[int]:
    listed = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=30)
    return [int(pid) for pid in listed.stdout.split()]


@pytest.mark.netns
@pytest.mark.root
def test_make_run_as_root_drops_to_nobody_and_ctrl_c_is_no_make_error():
    """`make run` on a terminal (script(1) gives it one), in a namespace of its own
    (its ports are fixed): no "running as root" noise, mail goes through, and
    Ctrl-C ends it without "make: *** ... Error" and leaves no process behind."""
    reason = netns.unavailable()
    if reason or not shutil.which("script"):
        pytest.skip(reason or "script(1) is not installed (bsdutils)")
    ns = netns.Namespace("run")
    proc = None
    try:
        proc = subprocess.Popen(["ip", "netns", "exec", ns.name, "script", "-qfec",
                                 "make --no-print-directory -C %s run PY=%s" % (REPO, sys.executable),
                                 "/dev/null"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)

        def relay() -> bool:
            try:
                with smtplib.SMTP("127.0.0.1", 2525, timeout=10) as client:
                    client.sendmail("a@example.org", ["b@example.org"], b"Subject: hi\r\n\r\nhello demo\r\n")
                return True
            except OSError:
                return False
        wait_until(lambda: ns.call(relay), 60, what="make run to relay a message")
        masters = [pid for pid in netns_pids(ns.name) if title(pid).startswith("proxsmtpd: master")]
        assert len(masters) == 1
        status = Path("/proc/%d/status" % masters[0]).read_text()
        assert "\nUid:\t%d\t" % pwd_uid("nobody") in status
        proc.stdin.write(b"\x03")
        proc.stdin.flush()
        output = proc.communicate(timeout=60)[0].decode(errors="replace")
        assert "hello demo" in output, output       # the printing server got it
        assert "Ctrl-C stops both" in output
        assert "make: ***" not in output and "Error" not in output, output
        assert "running as root" not in output and "Traceback" not in output, output
        wait_until(lambda: not netns_pids(ns.name), 20, what="every process of make run to end")
    finally:
        if proc is not None and proc.poll() is None:
            stop_process(proc, 10, group=True)
        for pid in netns_pids(ns.name):
            os.kill(pid, signal.SIGKILL)
        ns.delete()
