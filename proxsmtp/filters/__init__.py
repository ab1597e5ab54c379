"""The filter callbacks (upstream's proxsmtpd.c): what to do with a spooled message.

`check()` returns a Verdict (verdict.py): forward a file, or reply with a
rejection.  The filter is a command (process.py, FilterType pipe and file)
or a filter node (node.py, FilterType smtp).  A filter that fails (crash,
signal, timeout, cannot start, filter node gone) raises FilterError, which
the session turns into `451 Local Error`.
"""

from __future__ import annotations

from ..message import spool
from ..message.envelope import Envelope
from ..process.config import Config
from ..smtp.syntax import xtext
from .node import smtp_verdict
from .process import KeepAlive, command_verdict, last_line
from .verdict import FilterError, Verdict, protocol_broke, reject_reply

__all__ = ["FilterError", "KeepAlive", "Verdict", "check", "last_line", "protocol_broke",
           "reject_reply", "xtext"]


async def check(config: Config, envelope: Envelope, message: spool.Spool,
                keepalive: KeepAlive) -> Verdict:
    """Run the configured filter over a spooled message."""
    if not config.FilterCommand:
        return Verdict(True)
    if config.FilterType == "smtp":
        return await smtp_verdict(config, envelope, message)
    return await command_verdict(config, envelope, message, keepalive, config.FilterType == "pipe")
