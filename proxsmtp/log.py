"""Logging: syslog's levels on top of the stdlib, to stderr (-d) or syslog (daemon).

`-d N` shows LOG_ERR + N, so there is a NOTICE level between WARNING and INFO
as in syslog.  Values that came from the network are passed through `clean()`
before they are logged, so a hostile client cannot forge log lines.
"""

from __future__ import annotations

import logging
import logging.handlers
import re
import sys

NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")

# -d 0..4 → the lowest level shown
DEBUG_LEVELS = {0: logging.ERROR, 1: logging.WARNING, 2: NOTICE, 3: logging.INFO, 4: logging.DEBUG}

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


def setup_stderr(level: int) -> None:
    """Foreground mode: `proxsmtpd: message` on stderr, from `level` up."""
    _reset()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("proxsmtpd: %(message)s"))
    log.addHandler(handler)
    log.setLevel(level)


def setup_syslog(address: str = "/dev/log") -> None:
    """Daemon mode: facility mail, ident proxsmtpd, no debug messages."""
    _reset()
    try:
        handler: logging.Handler = _SysLogHandler(
            address=address, facility=logging.handlers.SysLogHandler.LOG_MAIL)
        handler.ident = "proxsmtpd: "
    except OSError:
        handler = logging.NullHandler()   # no syslog daemon: nowhere to log
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def _reset() -> None:
    for old in list(log.handlers):
        log.removeHandler(old)
        old.close()
    log.propagate = False


def notice(msg: str, *args: object) -> None:
    log.log(NOTICE, msg, *args)
