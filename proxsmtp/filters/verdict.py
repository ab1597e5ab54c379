"""A filter's verdict, and a refusal as the client hears it.

A filter accepts the message (the server gets it, or the filter's version
of it), rejects it (the client hears the filter's reply, proxsmtpd(8) Exit
status and rejections), or fails: FilterError, which the session turns
into `451 Local Error`, never a bounce.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..process.log import clean
from ..smtp.replies import REJECT_PREFIX

_CODE = re.compile(r"^[245]\d\d(?=[ -]|$)")
_PROTOCOL_STATUS = re.compile(r"^[0-9]{3}[ -]5\.5\.[0-9]{1,3}(?=\s|$)")


class FilterError(Exception):
    """The filter could not give a verdict; the message is deferred (451)."""


@dataclass
class Verdict:
    """Forward the message (accept; `path` when a filter wrote a new one),
    or answer the client with `reply` (reject)."""

    accept: bool
    path: str | None = None
    reply: str = ""
    status: str = "FILTERED"


def reject_reply(text: str) -> str:
    """A rejection as the client sees it: `NNN text` as is, else 550 Content Rejected."""
    text = text.strip()
    if not text:
        return REJECT_PREFIX
    if _CODE.match(text):       # `550-text` would leave the client waiting for more lines
        return (text[:3] + " " + text[4:] if text[3:4] == "-" else text)[:512]
    return "%s; %s" % (REJECT_PREFIX, text[:256])


def protocol_broke(code: int, text: str) -> bool:
    """A reply saying the SMTP conversation itself went wrong, not a verdict on
    the envelope or the message: 500-504 (RFC 5321 4.2.2: syntax, command not
    implemented, bad sequence, parameter not implemented) and 554 with an
    enhanced code of class 5.5 (RFC 3463 3.6, protocol status: Postfix's
    `554 5.5.0 Error: SMTP protocol synchronization`)."""
    return 500 <= code <= 504 or code == 554 and _PROTOCOL_STATUS.match(text) is not None


def as_rejection(code: int, text: str, step: str) -> Verdict:
    """A filter node's refusal of MAIL, RCPT, DATA or the message, as the
    client's rejection; FilterError (451 to the client) when it is no verdict
    at all: the node and the proxy have fallen out of step, and the client's
    message is not to blame (a bounce for it would lose mail)."""
    if not 400 <= code < 600:
        raise FilterError("unexpected reply from filter node to %s: %s" % (step, clean(text)))
    if protocol_broke(code, text):
        raise FilterError("protocol error from filter node at %s: %s" % (step, clean(text)))
    if code == 421:     # the node is going away; the client's session is not
        text = "451" + text[3:]
    return Verdict(False, reply=text, status=text.splitlines()[-1])
