"""FilterType smtp (proxsmtpd(8) FILTERS): the message offered to a filter node.

The proxy speaks SMTP to FilterCommand host[:port] (e.g. Halon behind
haproxy) as a client (smtp.peer): the greeting, EHLO and, under FilterTLS
(by default ServerTLS), STARTTLS as the server leg does; then XCLIENT for
the client, EHLO with the client's name, the envelope and the message (by
BDAT, byte for byte, when it came by BDAT and the node offers CHUNKING, RFC
3030; else by DATA, dot-stuffed).  2xx after the final dot or chunk
accepts; the node's refusal is the client's rejection (verdict.as_rejection).
The connection is then kept for the worker's next message (nodepool.py,
FilterConnections), which starts with XCLIENT on it, or with MAIL when its
session already speaks for that message's client.
"""

from __future__ import annotations

import asyncio

from ..message import spool
from ..message.envelope import Envelope
from ..net import destination, tls
from ..net.channel import Channel, ChannelClosed
from ..net.waits import wait_any
from ..process import stats
from ..process.config import Config
from ..process.log import clean, log
from ..smtp.peer import Peer, ReplyTooLong
from ..smtp.replies import NOT_UTF8
from ..smtp.syntax import ehlo_offers, esmtp_params
from . import nodepool
from .verdict import FilterError, Verdict, as_rejection


def node_failure(exc: Exception) -> FilterError:
    """A reply the node did not give whole: no verdict (451 to the client)."""
    if isinstance(exc, ReplyTooLong):
        return FilterError("filter node: %s" % exc)
    if isinstance(exc, ChannelClosed):
        return FilterError("filter node closed the connection")
    return FilterError("timeout talking to filter node")


def code_text(lines: list[bytes]) -> tuple[int, str]:
    """A reply's code, and its text (lines joined by CRLF) for the log and the client."""
    text = "\r\n".join(line.rstrip(b"\r\n").decode("utf-8", "replace") for line in lines)
    return int(text[:3]) if text[:3].isdigit() else 0, text


def pool_key(config: Config) -> tuple:
    """What makes a pooled connection fit for a message: the node, and the
    TLS policy and context it was opened under."""
    return (config.FilterAddress, config.FilterTLS, config.filter_tls)


async def smtp_verdict(config: Config, envelope: Envelope, message: spool.Spool) -> Verdict:
    """Offer the message to FilterCommand host[:port]; 2xx after `.` accepts.

    On a connection from the worker's pool (nodepool.py) if one is idle;
    one that turns out dead before the message left (Stale) gives way to a
    new connection (_open_node).  Then the connection goes back to the
    pool, or is closed.  The offer is awaited here and nowhere else, so
    that each of its waits resumes through one frame fewer."""
    pool = nodepool.worker_pool() if config.FilterConnections else None
    key = pool_key(config)
    node = pool.take(key, envelope.tag) if pool is not None else None
    while True:
        if node is None:
            node = await _open_node(config, envelope.tag, key)
        offered = False
        try:
            verdict = await _offer(node, envelope, message)
            offered = True
            return verdict
        except ChannelClosed as exc:    # a write to a node gone
            stale = node.stale(exc)
            if stale is None:
                raise FilterError(str(exc)) from None
        except nodepool.Stale as exc:   # only ever on a reused connection (NodePeer)
            stale = exc
        finally:
            nodepool.done(node, pool, config.FilterConnections, config.FilterIdleTime, offered)
        log.debug("%s: FILTER: %s; trying a new connection", envelope.tag, stale)
        node = None


async def _open_node(config: Config, tag: str, key: tuple) -> nodepool.NodePeer:
    """A new connection, ready for a message: STARTTLS under FilterTLS as
    the server leg does under ServerTLS; with `may`, a failed handshake
    gets one more try in plaintext."""
    plaintext = config.FilterTLS == "off"
    while True:
        node = await _connect_node(config, tag, key)
        try:
            ready = await _node_hello(config, node, plaintext)
        except ChannelClosed as exc:    # a write to a node gone
            node.channel.close()
            raise FilterError(str(exc)) from None
        except BaseException:
            node.channel.close()
            raise
        if ready:
            return node
        node.channel.close()
        plaintext = True


async def _connect_node(config: Config, tag: str, key: tuple) -> nodepool.NodePeer:
    channel = Channel("FILTER", tag)
    try:
        await destination.connect_channel(config.FilterAddress, config.FilterTimeout, channel,
                                          "filter node")
    except destination.DestinationError as exc:
        raise FilterError(str(exc)) from None
    log.debug("%s: FILTER: opened a connection to the filter node %s", tag,
              config.FilterAddress)
    return nodepool.NodePeer(channel, config.FilterTimeout, key, node_failure)


async def _node_hello(config: Config, node: Peer, plaintext: bool) -> bool:
    """Greeting, EHLO and (FilterTLS) STARTTLS with EHLO again: True when
    done, False when the handshake failed under `may` (try again in
    plaintext).  These are the proxy's own steps, no verdict on the message:
    anything but success is FilterError, but for STARTTLS under `may`."""
    code, text = code_text(await node.read_reply())
    if code != 220:
        raise FilterError("filter node greeting: %s" % clean(text))
    ehlo = await node.ehlo(config.FilterHelo)
    code, text = code_text(ehlo)
    if code != 250:
        raise FilterError("filter node refused EHLO: %s" % clean(text))
    if plaintext:
        return True
    policy, channel = config.FilterTLS, node.channel
    if not ehlo_offers(ehlo, b"STARTTLS"):
        failure = "the filter node offers no STARTTLS"
    else:
        failure = await node.starttls(config.filter_tls, config.FilterAddress.host,
                                      node.timeout)
    if failure is None:
        if tls.resumed(channel.transport):
            stats.tls_resumed("filter")
        code, text = code_text(await node.ehlo(config.FilterHelo))
        if code != 250:
            raise FilterError("filter node refused EHLO after STARTTLS: %s" % clean(text))
        return True
    if policy != "may":
        raise FilterError("no TLS to the filter node (%s): %s" % (_policy(config), failure))
    if channel.closed:
        log.warning("%s: %s; connecting to the filter node again in plaintext",
                    channel.tag, failure)
        return False
    log.debug("%s: %s; going on in plaintext", channel.tag, failure)
    return True


def _policy(config: Config) -> str:
    """`FilterTLS verify`, and whence it came when unset, for the log."""
    unset = "FilterTLS" not in config.named
    return "FilterTLS %s%s" % (config.FilterTLS, ", as ServerTLS" if unset else "")


def hello_name(envelope: Envelope) -> str:
    """The name the proxy gives the filter node for the client: the client's
    own HELO name, else its address literal, as RFC 5321 4.1.4 has a client
    without a meaningful name of its own say it."""
    if envelope.helo and envelope.helo.isprintable() and " " not in envelope.helo:
        return envelope.helo
    ip = envelope.client_ip
    return "[%s%s]" % ("IPv6:" if ":" in ip else "", ip)


async def _offer(node: nodepool.NodePeer, envelope: Envelope,
                 message: spool.Spool) -> Verdict:
    """XCLIENT and EHLO (unless the session speaks for this client already),
    the envelope and the message; the node's verdict."""
    client = (envelope.client_ip, envelope.helo)
    if node.client != client:
        await _speak_for(node, client, hello_name(envelope))
    offered = node.offered
    sender = "" if envelope.sender in (None, "<>") else envelope.sender
    if "SMTPUTF8" not in offered and not all(address.isascii() for address
                                             in [sender, *envelope.recipients]):
        return Verdict(False, reply=NOT_UTF8, status=NOT_UTF8)
    chunked = envelope.chunked and "CHUNKING" in offered
    steps = envelope_steps(envelope, sender, offered, message.size)
    if chunked:         # RFC 3030: no DATA, no 354; the envelope's replies first
        steps.pop()
    offer = Offer(node, envelope, message, steps, chunked)
    offer.begin()
    channel = node.channel
    try:
        while True:
            if not offer.take():    # what is here already; the rest as it comes
                await wait_any((channel,), node.timeout, offer.news)
            if offer.verdict is not None:
                return offer.verdict
            if offer.sending:
                await offer.send()
    except (ChannelClosed, asyncio.TimeoutError) as exc:
        raise node.failed(exc) from None


class Offer:
    """The envelope and the message to the node, on a connection that speaks
    for the message's client, and the node's verdict.

    The envelope goes as one group under PIPELINING (RFC 2920), else one
    command per reply.  The message follows the 354 to DATA or, by BDAT
    (RFC 3030), the envelope's last reply: never before the node answered
    on this connection for this message, so that a reused connection that
    turns out dead before it left still gets its retry (nodepool.Stale).
    The replies are taken as they come, in the node channel's news
    callback (`news`), so the task that awaits the offer wakes once for
    the verdict (and once more to send a message from disk or by BDAT
    under flow control).
    """

    __slots__ = ("node", "envelope", "message", "steps", "lines", "chunked", "at",
                 "verdict", "sending")

    def __init__(self, node: nodepool.NodePeer, envelope: Envelope, message: spool.Spool,
                 steps: list[str], chunked: bool) -> None:
        self.node = node
        self.envelope = envelope
        self.message = message
        self.steps = steps
        self.lines = [step.encode("utf-8", "surrogateescape") + b"\r\n" for step in steps]
        self.chunked = chunked          # by BDAT, byte for byte
        self.at = 0                     # the step whose reply is next; len(steps): the verdict's
        self.verdict: Verdict | None = None
        self.sending = False            # the task is to send the message (send())

    def begin(self) -> None:
        """The envelope: all of it in one group, or its first command."""
        node = self.node
        if node.pipelining:
            node.send(*self.lines)
        else:
            node.send(self.lines[0])

    def news(self) -> None:
        """The node channel's news (wait_any's callback): its replies taken,
        and the task woken once it has something to do; what fails is
        raised in the task, which knows what it means."""
        channel = self.node.channel
        try:
            if self.take():
                channel.wake()
            else:
                channel.extend_wait(self.node.timeout)
        except Exception as exc:
            channel.fail(exc)

    def take(self) -> bool:
        """The replies that are here, in order; True once the task has
        something to do: the verdict, or the message to send."""
        take_reply, heard = self.node.take_reply, self.heard
        while (reply := take_reply()) is not None:
            if heard(reply):
                return True
        return False

    def heard(self, reply: list[bytes]) -> bool:
        """The next reply: an envelope step's (a refusal is the verdict; the
        last one's success sends the message), or the verdict's; True when
        the task has something to do.  A message in memory is written here:
        the node's verdict cannot come before it has read all of it, so the
        wait for the verdict (FilterTimeout between news) is its drain too."""
        at, steps = self.at, self.steps
        if at == len(steps):        # the verdict on the message
            code, text = code_text(reply)
            if code // 100 == 2:
                self.envelope.filter_reply = text.splitlines()[-1]
                self.verdict = Verdict(True)
            else:
                self.verdict = as_rejection(code, text, "the message")
            return True
        code = reply[0][:3]         # as code_text reads it: the first line's
        last = at == len(steps) - 1
        if code != b"354" if last and not self.chunked else code[:1] != b"2" or not code.isdigit():
            number, text = code_text(reply)
            self.verdict = as_rejection(number, text, steps[at].split(":", 1)[0])
            return True
        self.at = at + 1
        node = self.node
        if not last:
            if not node.pipelining:
                node.send(self.lines[at + 1])
            return False
        message = self.message
        if self.chunked or message.memory is None or self.envelope.chunked:
            self.sending = True
            return True
        node.write(message.as_sent(), False)    # framed once, for the server too
        return False

    async def send(self) -> None:
        """The message under flow control, by the task: by BDAT in one chunk
        (its reply is the verdict); else by DATA, from disk, or dot-stuffed
        from one that came by BDAT."""
        self.sending = False
        node, message = self.node, self.message
        if self.chunked:
            node.sending_chunk()
            await spool.send_bdat(node.channel, message.reader(), None, message.size,
                                  max(message.size, 1), node.timeout)
        else:
            await spool.send(node.channel, message.reader(), None, node.timeout,
                             self.envelope.chunked)


async def _speak_for(node: nodepool.NodePeer, client: tuple[str, str | None],
                     name: str) -> None:
    """XCLIENT with the client's attributes, then EHLO as `name`: the node's
    session is then the client's (FilterError if the node refuses either)."""
    node.client = None
    reply = await node.xclient(*client)
    if reply[0][:1] != b"2" or not reply[0][:3].isdigit():     # code_text's code // 100 != 2
        raise FilterError("filter node refused XCLIENT: %s" % clean(code_text(reply)[1]))
    # XCLIENT's 220 starts the session over (Postfix's XCLIENT_README): EHLO
    # again, with the client's name, and its reply read before MAIL; a node
    # with smtpd_helo_required or smtpd_forbid_unauth_pipelining insists.
    # EHLO waits for that 220: Postfix's smtpd takes a command sent behind
    # XCLIENT for one sent before its greeting (proxsmtpd(8) FILTERS).
    reply = await node.ehlo(name)
    if reply[0][:3] != b"250":
        raise FilterError("filter node refused EHLO after XCLIENT: %s"
                          % clean(code_text(reply)[1]))
    node.client = client


# The client's ESMTP parameters a node gets, each only when its EHLO offers
# the extension named: SIZE (RFC 1870), BODY (RFC 6152; BINARYMIME also
# needs that keyword, RFC 3030), SMTPUTF8 (RFC 6531), DSN's (RFC 3461),
# REQUIRETLS (RFC 8689).
MAIL_PARAMS = {"SIZE": "SIZE", "BODY": "8BITMIME", "SMTPUTF8": "SMTPUTF8",
               "RET": "DSN", "ENVID": "DSN", "REQUIRETLS": "REQUIRETLS"}
RCPT_PARAMS = {"NOTIFY": "DSN", "ORCPT": "DSN"}


def envelope_steps(envelope: Envelope, sender: str, offered: set[str], size: int) -> list[str]:
    """MAIL FROM, RCPT TO for each recipient (with the client's parameters
    the node takes) and DATA."""
    accepted = envelope.rcpt_lines
    return (["MAIL FROM:<%s>%s" % (sender, node_params(envelope.mail_line, MAIL_PARAMS,
                                                        offered, size))]
            + ["RCPT TO:<%s>%s" % (rcpt, node_params(accepted[at] if at < len(accepted) else b"",
                                                      RCPT_PARAMS, offered))
               for at, rcpt in enumerate(envelope.recipients)]
            + ["DATA"])


def node_params(line: bytes, known: dict[str, str], offered: set[str],
                size: int | None = None) -> str:
    """` KEY=value ...`: the parameters of the client's MAIL or RCPT `line`
    (as the server accepted it) that the node offers the extension of,
    as the client wrote them; SIZE says the message's real size, now known
    (the client's is an estimate, RFC 1870 4)."""
    words = []
    for keyword, value in esmtp_params(line):
        name = keyword.upper()
        if known.get(name) not in offered:
            continue
        if name == "BODY" and value is not None and value.upper() == "BINARYMIME" \
                and "BINARYMIME" not in offered:
            continue
        if name == "SIZE" and size is not None:
            value = str(size)
        words.append(keyword if value is None else "%s=%s" % (keyword, value))
    return "".join(" " + word for word in words)
