"""Logging: syslog's levels on top of the stdlib, to stderr (-d) or syslog (daemon).

`-d N` shows LOG_ERR + N, so there is a NOTICE level between WARNING and INFO
as in syslog: start, reload and stop are logged at NOTICE, so they reach
syslog.  Foreground lines start with the local time (to the millisecond);
syslog lines carry the pid of the process that wrote them, as syslog(3)'s
LOG_PID would, which tells a worker's lines from another's.  Values that
came from the network are passed through `clean()` before they are logged,
so a hostile client cannot forge log lines.
"""

from __future__ import annotations

import logging
import logging.handlers
import re
import socket
import sys

NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")

# -d 0..4 → the lowest level shown
DEBUG_LEVELS = {0: logging.ERROR, 1: logging.WARNING, 2: NOTICE, 3: logging.INFO, 4: logging.DEBUG}

SYSLOG_SOCKET = "/dev/log"

log = logging.getLogger("proxsmtpd")

_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")


def clean(value: str | bytes, limit: int = 512) -> str:
    """Make a network-supplied value safe for a single log line."""
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", "backslashreplace")
    if len(value) > limit:
        value = value[:limit] + "..."
    return _UNPRINTABLE.sub(lambda m: "\\x%02x" % ord(m.group()), value)


class _SysLogHandler(logging.handlers.SysLogHandler):
    """SysLogHandler that knows NOTICE and never sends debug messages."""

    def mapPriority(self, levelName: str) -> str:
        return {"NOTICE": "notice"}.get(levelName, super().mapPriority(levelName))

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno > logging.DEBUG:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        """No syslog daemon (yet): the line is lost, as with syslog(3); a
        daemon's stderr is /dev/null anyway.  Each line tries to reconnect."""


class _CommandLineFormatter(logging.Formatter):
    """`proxsmtpd: warning: message` for a warning, as postfix marks its own:
    what the command line says (-t, a refused start) is read by a person,
    and nothing else there tells a warning from the error that ends it."""

    def __init__(self) -> None:
        super().__init__("proxsmtpd: %(message)s")
        self._warning = logging.Formatter("proxsmtpd: warning: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.WARNING:
            return self._warning.format(record)
        return super().format(record)


def setup_stderr(level: int, timestamps: bool = False) -> None:
    """`proxsmtpd: message` on stderr, from `level` up; with the local time
    first when `timestamps` (a daemon in the foreground, -d), not for what
    the command line itself says (-t, a refused start), where a warning
    says so."""
    _reset()
    handler = logging.StreamHandler(sys.stderr)
    if timestamps:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s.%(msecs)03d proxsmtpd: %(message)s", "%Y-%m-%d %H:%M:%S"))
    else:
        handler.setFormatter(_CommandLineFormatter())
    log.addHandler(handler)
    log.setLevel(level)


def syslog_missing(address: str = SYSLOG_SOCKET) -> str:
    """Why the syslog socket can't be reached ('' if it can), said on stderr
    before detaching: afterwards there is nowhere to say it."""
    reason = ""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):     # as SysLogHandler tries
        with socket.socket(socket.AF_UNIX, kind) as probe:
            try:
                probe.connect(address)
                return ""
            except OSError as exc:
                reason = reason or "%s: %s" % (address, exc.strerror)
    return reason


def setup_syslog(address: str = SYSLOG_SOCKET) -> None:
    """Daemon mode: facility mail, `proxsmtpd[pid]: ` before each line, no
    debug messages.  A socket missing now is tried again for each line."""
    _reset()
    try:
        handler: logging.Handler = _SysLogHandler(
            address=address, facility=logging.handlers.SysLogHandler.LOG_MAIL)
    except OSError:
        handler = logging.NullHandler()   # an older Python that gives up at once
    handler.setFormatter(logging.Formatter("proxsmtpd[%(process)d]: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def _reset() -> None:
    for old in list(log.handlers):
        log.removeHandler(old)
        old.close()
    log.propagate = False


def notice(msg: str, *args: object) -> None:
    log.log(NOTICE, msg, *args)
