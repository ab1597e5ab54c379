"""The filter callbacks (upstream's proxsmtpd.c): what to do with a spooled message.

`check()` returns a Verdict (verdict.py): forward a file, or reply with a
rejection.  The filter is a command (process.py, FilterType pipe and file)
or a filter node (node.py, FilterType smtp).  A filter that fails (crash,
signal, timeout, cannot start, filter node gone) raises FilterError, which
the session turns into `451 Local Error`.
"""

from __future__ import annotations

from typing import Awaitable

from ..message import spool
from ..message.envelope import Envelope
from ..process.config import Config
from ..smtp.syntax import xtext
from .node import smtp_verdict
from .process import KeepAlive, command_verdict, last_line
from .verdict import FilterError, Verdict, protocol_broke, reject_reply

__all__ = ["FilterError", "KeepAlive", "Verdict", "check", "last_line", "protocol_broke",
           "reject_reply", "xtext"]


def check(config: Config, envelope: Envelope, message: spool.Spool,
          keepalive: KeepAlive) -> Awaitable[Verdict]:
    """Run the configured filter over a spooled message: the filter's own
    coroutine, to await (no frame of this function's to resume through at
    each of the filter's waits)."""
    if not config.FilterCommand:
        return _accept()
    if config.FilterType == "smtp":
        return smtp_verdict(config, envelope, message)
    return command_verdict(config, envelope, message, keepalive, config.FilterType == "pipe")


async def _accept() -> Verdict:
    """No FilterCommand (milters only): the message goes on."""
    return Verdict(True)
