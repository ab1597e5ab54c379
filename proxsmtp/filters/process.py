"""FilterType pipe and file (proxsmtpd(8) FILTERS): the filter command, supervised.

The command runs under /bin/sh in its own process group, with the
message's facts in its environment; FilterTimeout without progress kills
it.  Its exit status is the verdict: 0 accepts, another rejects with its
last line on stderr, a crash or a signal is FilterError.  A command that
the shell would only look up and run (no shell syntax, no builtin) is run
without it, as the shell would have run it, when /bin/sh is dash: that
saves an exec and a fork per message, half the cost of the spawn.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
from typing import Awaitable, Callable

from ..message import spool
from ..message.envelope import Envelope
from ..net.waits import within
from ..process.config import Config
from ..process.log import clean, log
from .verdict import FilterError, Verdict, reject_reply

# Called while a filter works: keeps the server connection alive (KeepAlives).
KeepAlive = Callable[[], Awaitable[None]]

STDERR_KEEP = 4096           # bytes of a filter's stderr kept (its last line matters)
CHATTER_LINES = 3            # lines of stderr from a filter that passed a message, logged
KILL_GRACE = 3.0             # seconds between SIGTERM and SIGKILL
TEMP_MIN_FREE = 64 * 1024    # bytes free in TempDirectory below which it counts as full

SHELL = "/bin/sh"
# Words without shell syntax: no quoting, expansion, redirection, globbing,
# comment, operator or tilde (POSIX.1 XCU 2.2-2.6, 2.9, 2.13).
PLAIN = re.compile(r"[ \t]*[A-Za-z0-9_./,:+@%-]+(?:[ \t]+[A-Za-z0-9_./,:+@%=-]+)*[ \t]*\Z")
# dash(1)'s builtins and reserved words: such a command is the shell's own.
SHELL_WORDS = frozenset(
    ". : [ alias bg break cd chdir command continue echo eval exec exit export false fc fg "
    "getopts hash jobs kill local printf pwd read readonly return set shift test times trap "
    "true type ulimit umask unalias unset wait case do done elif else esac fi for if in then "
    "until while".split())
# Names of variables, NUL-separated: dash passes on no others.
NAMES = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\0[A-Za-z_][A-Za-z0-9_]*)*\Z")
# Variables dash sets for itself, which a program it runs gets in its environment.
SHELL_SETS = frozenset(("IFS", "OPTIND", "PPID"))


def _shell_is_dash() -> bool:
    try:
        return os.path.basename(os.path.realpath(SHELL)) == "dash"
    except OSError:
        return False


SHELL_IS_DASH = _shell_is_dash()


def temp_full(directory: str) -> bool:
    """TempDirectory (nearly) out of space or inodes.  A filter that failed then
    most likely failed for that: the message deserves a retry (451), not a bounce."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < TEMP_MIN_FREE or (st.f_files > 0 and st.f_favail == 0)


def last_line(data: bytes) -> str:
    """The last non-blank line of a filter's stderr."""
    for line in reversed(data.splitlines()):
        if line.strip():
            return line.strip().decode("utf-8", "replace")
    return ""


def _warn_chatter(tag: str, stderr: bytes) -> None:
    """A filter that passed the message but wrote on stderr is often telling
    of trouble the operator should hear of (the SpamAssassin example passes
    mail unscanned when spamd is down): its first lines, as warnings."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for number, line in enumerate(lines[:CHATTER_LINES], 1):
        more = len(lines) - CHATTER_LINES if number == CHATTER_LINES else 0
        log.warning("%s: filter command (exit 0) wrote on stderr: %s%s", tag,
                    clean(line, 256), " (%d more lines)" % more if more > 0 else "")


_inherited: tuple[int, dict[str, str]] = (0, {})


def _daemon_environment() -> dict[str, str]:
    """The daemon's environment, copied from os.environ once per process (a
    third of environment()'s time): nothing in the daemon changes it."""
    global _inherited
    if _inherited[0] != os.getpid():
        _inherited = (os.getpid(), dict(os.environ))
    return _inherited[1]


def environment(config: Config, envelope: Envelope, email: str | None) -> dict[str, str]:
    """The filter's environment: the daemon's, plus the message's facts."""
    env = _daemon_environment().copy()
    facts = {
        "SENDER": envelope.sender,
        "RECIPIENTS": "\n".join(envelope.recipients) if envelope.recipients else None,
        "CLIENT": envelope.client_ip,
        "SERVER": envelope.server_ip,
        "HELO": envelope.helo,
        "REMOTE": envelope.xforward_addr,
        "REMOTE_HELO": envelope.xforward_helo,
        "EMAIL": email,
        "TMPDIR": config.TempDirectory,
    }
    for name, value in facts.items():
        env.pop(name, None)
        if value:
            env[name] = value.replace("\0", "")     # a NUL can't be in the environment
    # the protocol and cipher of each leg; set but empty for a plaintext leg
    env["CLIENT_TLS"] = envelope.client_tls
    env["SERVER_TLS"] = envelope.server_tls
    return env


def direct_argv(command: str, env: dict[str, str]) -> list[str] | None:
    """The words of a command that `dash -c` would only look up in PATH and run,
    with an environment it would pass on as it is (but PWD); None otherwise.
    Behaviour the shell adds (126/127 and its message when the program can't be
    run, a script without #!) comes from running the shell when exec fails."""
    if not SHELL_IS_DASH or not PLAIN.match(command) or "PATH" not in env:
        return None
    words = command.split()
    if "=" in words[0] or words[0] in SHELL_WORDS:     # an assignment, or the shell's own
        return None
    if not SHELL_SETS.isdisjoint(env) or not NAMES.match("\0".join(env)):
        return None                  # dash would change these (or drop invalid names)
    return words


def shell_pwd(env: dict[str, str]) -> str:
    """PWD as dash exports it: the inherited one if it names the working
    directory, else getcwd(3)."""
    pwd = env.get("PWD", "")
    if pwd.startswith("/"):
        try:
            if os.path.samestat(os.stat(pwd), os.stat(".")):
                return pwd
        except OSError:
            pass
    return os.getcwd()


async def command_verdict(config: Config, envelope: Envelope, message: spool.Spool,
                          keepalive: KeepAlive, pipe: bool) -> Verdict:
    """FilterType pipe (message on stdin, new one on stdout) or file (EMAIL= rewritten)."""
    tag = envelope.tag
    source = as_data(message) if envelope.chunked else message.path
    out_fd, out_path = message.new_file() if pipe else (-1, "")
    stdin = open(source, "rb") if pipe else open(os.devnull, "rb")
    try:
        try:
            proc = FilterProcess(config.FilterCommand, stdin,
                                 out_fd if pipe else subprocess.DEVNULL,
                                 environment(config, envelope, None if pipe else source))
        except OSError as exc:
            raise FilterError("couldn't run filter command: %s" % exc.strerror) from None
        log.debug("%s: executed filter command: %s (pid: %d)", tag, config.FilterCommand, proc.pid)
        try:
            status, stderr = await supervise(config.FilterTimeout, tag, keepalive, proc, stdin,
                                              out_fd if pipe else source)
        finally:
            proc.close()
    finally:
        stdin.close()
        if out_fd >= 0:
            os.close(out_fd)
    if status < 0:
        raise FilterError("filter command terminated abnormally (signal %d)" % -status)
    log.debug("%s: filter exit code: %d", tag, status)
    if status == 0:
        _warn_chatter(tag, stderr)
        if pipe and message.size and not os.path.getsize(out_path):
            raise FilterError("filter command wrote no message (exit 0, no output)")
        result = out_path if pipe else source
        return Verdict(True, as_bdat(message, result) if envelope.chunked else result)
    if status in (126, 127):
        raise FilterError("filter command could not be executed (exit %d): %s"
                          % (status, clean(last_line(stderr))))
    if 128 < status <= 128 + signal.SIGRTMAX:  # how /bin/sh reports a program it ran
        raise FilterError("filter command terminated abnormally (exit %d: signal %d)"
                          % (status, status - 128))
    if temp_full(config.TempDirectory):
        raise FilterError("filter command failed (exit %d) with TempDirectory full: %s"
                          % (status, clean(last_line(stderr))))
    reply = reject_reply(last_line(stderr))
    return Verdict(False, reply=reply, status=reply)


def as_data(message: spool.Spool) -> str:
    """A message that came by BDAT, for a pipe or file filter: dot-stuffed,
    as a DATA client would have sent it (proxsmtpd(8) FILTERS), in a file
    of its own: the filter sees one form whichever way the message came."""
    try:
        return message.copy(spool.dot_stuffed(spool.with_header(message.reader(), None)))
    except OSError as exc:
        raise FilterError("couldn't write the message for the filter: %s" % exc.strerror) from None


def as_bdat(message: spool.Spool, path: str) -> str:
    """The filter's version of a message that came by BDAT (in DATA's form,
    as as_data() gave it) in a file of its own, as the bytes to send by
    BDAT: what the server would have stored of it sent by DATA."""
    try:
        return message.copy(spool.stored_by_data(spool.with_header(open(path, "rb"), None)))
    except OSError as exc:
        raise FilterError("couldn't store the filter's message: %s" % exc.strerror) from None


class FilterProcess:
    """`/bin/sh -c command` in its own process group, watched from the event loop.

    A command direct_argv() finds plain is run as the shell would have run it:
    with PWD set, its death by signal N reported as exit 128+N as dash reports
    a program it ran, and the shell itself run if exec fails (so 126/127 and
    their message on stderr are the shell's).
    Spawned with subprocess (close_fds: the filter gets fds 0-2 only), its
    stderr read without blocking (the last STDERR_KEEP bytes kept), and its
    exit seen through a pidfd: only this child's own pid is ever waited for,
    so no session can reap another session's filter."""

    def __init__(self, command: str, stdin, stdout, env: dict[str, str]) -> None:
        argv = direct_argv(command, env)
        self.direct = False
        if argv is not None:
            try:
                self.proc = self._spawn(argv, stdin, stdout, dict(env, PWD=shell_pwd(env)))
                self.direct = True
            except OSError:         # not found, not executable, no #!: the shell says how
                pass
        if not self.direct:
            self.proc = self._spawn([SHELL, "-c", command], stdin, stdout, env)
        self.pid = self.proc.pid
        self.loop = asyncio.get_running_loop()
        self.stderr = bytearray()
        self.status: int | None = None
        self._news: asyncio.Future | None = None
        self._err = self.proc.stderr.fileno()
        os.set_blocking(self._err, False)
        self.loop.add_reader(self._err, self._on_stderr)
        self._pidfd = os.pidfd_open(self.pid)
        self.loop.add_reader(self._pidfd, self._on_exit)

    @staticmethod
    def _spawn(argv: list[str], stdin, stdout, env: dict[str, str]) -> subprocess.Popen:
        return subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE,
                                env=env, close_fds=True, start_new_session=True)

    @property
    def exited(self) -> bool:
        return self.status is not None

    @property
    def finished(self) -> bool:
        """Exited, and its stderr read to the end."""
        return self.exited and self._err < 0

    def _wake(self) -> None:
        if self._news is not None and not self._news.done():
            self._news.set_result(None)

    def _on_stderr(self) -> None:
        try:
            chunk = os.read(self._err, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if chunk:
            self.stderr += chunk
            del self.stderr[:-STDERR_KEEP]
            return
        self.loop.remove_reader(self._err)
        self.proc.stderr.close()
        self._err = -1
        self._wake()

    def _on_exit(self) -> None:
        self.loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1
        status = self.proc.wait()           # waitpid(this pid): returns at once
        self.status = 128 - status if self.direct and status < 0 else status
        self._wake()

    async def wait(self, timeout: float) -> None:
        """Until it exits or its stderr closes, or `timeout` seconds."""
        self._news = self.loop.create_future()
        try:
            await within(timeout, self._news, self.loop)
        except TimeoutError:
            pass
        finally:
            self._news = None

    async def wait_exit(self, timeout: float) -> bool:
        deadline = self.loop.time() + timeout
        while not self.exited and self.loop.time() < deadline:
            await self.wait(deadline - self.loop.time())
        return self.exited

    def signal(self, signum: int) -> None:
        """Signal its whole process group (what the shell started too)."""
        try:
            os.killpg(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def close(self) -> None:
        """Stop watching; a filter still running by now is killed and reaped."""
        if self._err >= 0:
            self.loop.remove_reader(self._err)
            self.proc.stderr.close()
            self._err = -1
        if self._pidfd >= 0:
            self.loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        if self.status is None:
            self.signal(signal.SIGKILL)
            self.status = self.proc.wait()


def _progress(stdin, watched) -> tuple:
    """What moves while a filter works: its input offset and its output."""
    try:
        offset = os.lseek(stdin.fileno(), 0, os.SEEK_CUR)
        st = os.fstat(watched) if isinstance(watched, int) else os.stat(watched)
        return offset, st.st_size, st.st_mtime_ns, st.st_ino
    except OSError:
        return ()


async def supervise(timeout: float, tag: str, keepalive: KeepAlive, proc: FilterProcess,
                     stdin, watched) -> tuple[int, bytes]:
    """Wait for the filter, killing it after FilterTimeout seconds without
    progress (its input read, its output written; stderr chatter alone is no
    progress: a filter that only talks there is stuck)."""
    loop = asyncio.get_running_loop()
    last_change = loop.time()
    marks = _progress(stdin, watched)
    try:
        while not proc.finished:
            await proc.wait(min(1.0, timeout))
            now = loop.time()
            current = _progress(stdin, watched)
            if current != marks:
                marks, last_change = current, now
            await keepalive()
            if now - last_change >= timeout and not proc.finished:
                if proc.exited:     # exited, but something it started holds stderr open
                    proc.signal(signal.SIGKILL)
                    break
                raise FilterError("timeout while waiting for filter command")
        return proc.status, bytes(proc.stderr)
    except BaseException:
        if not proc.exited:
            log.warning("%s: killing filter process (pid %d)", tag, proc.pid)
            await kill(proc)
        raise


async def kill(proc: FilterProcess) -> None:
    """SIGTERM the filter's process group, then SIGKILL if it lingers."""
    proc.signal(signal.SIGTERM)
    if not await proc.wait_exit(KILL_GRACE):
        log.error("process wouldn't quit. forced termination (pid %d)", proc.pid)
    proc.signal(signal.SIGKILL)     # it, or anything it left behind
    await proc.wait_exit(KILL_GRACE)
