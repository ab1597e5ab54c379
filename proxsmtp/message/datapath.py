"""Which way a DATA goes: the one decision, made from the settings and the
envelope (proxsmtpd(8) FILTERS, proxsmtpd.conf(5) FilterType and Skip).

The session asks it at the client's DATA; the Transfer follows the answer.
Whether the relay's callbacks may take the message in without waking the
session's task is a second question (`callbacks_may_take`), asked the same
way of every message that is taken in, filtered or not: what a filter
needs comes after the final dot.
"""

from __future__ import annotations

import enum

from ..process.config import Config
from .envelope import Envelope


class Path(enum.Enum):
    """The ways a DATA can go, in the order they are decided."""

    SKIPPED = "skipped"            # Skip: the client authenticated; relayed unfiltered
    REJECTED = "rejected"          # FilterType reject: refused without taking the message
    NO_RECIPIENT = "no-recipient"  # no RCPT accepted: the server says why (RFC 5321 3.3)
    RELAYED = "relayed"            # no filter: taken in, then offered as it came
    FILTERED = "filtered"          # taken in, filtered (milters, then FilterCommand), then
                                   # offered or refused


# Module names, not Path.X: read once per message.
SKIPPED, REJECTED, NO_RECIPIENT, RELAYED, FILTERED = (
    Path.SKIPPED, Path.REJECTED, Path.NO_RECIPIENT, Path.RELAYED, Path.FILTERED)


def choose(config: Config, envelope: Envelope, skip: bool) -> Path:
    """The way this DATA goes; `skip`: the client authenticated and Skip
    says so."""
    if skip:
        return SKIPPED
    if config.FilterType == "reject":
        return REJECTED
    if not envelope.recipients:
        return NO_RECIPIENT
    if not config.FilterCommand and not config.Milters:
        return RELAYED
    return FILTERED


def callbacks_may_take(path: Path, config: Config, replies_due: bool, xclient_due: bool) -> bool:
    """The relay's callbacks may take this DATA's message in (no task
    wake-up per step): one that is taken in (relayed or filtered), while
    nothing is waited on meanwhile.  Not so with keepalives to send
    (KeepAlives), replies to earlier commands still due, or XCLIENT still
    to be sent first."""
    # `is` twice, not a set: an Enum member's hash is a Python call.
    return ((path is RELAYED or path is FILTERED) and config.KeepAlives == 0
            and not replies_due and not xclient_due)
