#!/usr/bin/python3
"""A scriptable test milter on Sendmail's own libmilter (python3-milter).

Run with Debian's /usr/bin/python3 (the venv has no `Milter` module):

    testmilter.py [--name NAME] [--log FILE] [--noreply] [--connect VERDICT] SOCKET

SOCKET is written in Postfix's syntax (`inet:127.0.0.1:PORT`,
`inet:[::1]:PORT`, `unix:/path`) and converted to libmilter's
(smfi_setconn(3): `inet:PORT@HOST`, `inet6:PORT@HOST`, `unix:/path`).

What it does is chosen by what the test sends:

- HELO/EHLO name `reject` or `tempfail`, a sender or a recipient whose
  local part is `reject` or `tempfail` (`reject@example.org`): refused at
  that stage with no text of its own (the MTA gives its default text);
  local part `replycode`: refused with `550 5.1.1 <addr>: no such user here`;
  local part `discard`: SMFIR_DISCARD at that stage (MAIL or RCPT).
- a sender whose local part is `discard-data`, `discard-header`,
  `discard-eoh` or `discard-body`: SMFIR_DISCARD at that later stage of
  its transaction (at the first header field, the first body chunk).
- each header `X-Test-Milter: [NAME:] ACTION [ARGS]`, acted on at the end of
  the message in the order given (only by the milter called NAME when a
  name is given):
  accept | reject | tempfail | discard  -- the verdict (ends the list)
  replycode CODE XCODE TEXT[|TEXT...]   -- smfi_setmlreply(3), then reject
                                           (4xx: tempfail); `|` splits lines
  quarantine REASON                     -- smfi_quarantine(3)
  addheader NAME VALUE                  -- smfi_addheader(3)
  insheader INDEX NAME VALUE            -- smfi_insheader(3)
  chgheader NAME INDEX [VALUE]          -- smfi_chgheader(3); no VALUE deletes
  replbody TEXT                         -- the body becomes TEXT CRLF
  chgfrom ADDR [ESMTP-ARGS]             -- smfi_chgfrom(3)
  addrcpt ADDR                          -- smfi_addrcpt(3)
  delrcpt ADDR                          -- smfi_delrcpt(3)
- every message that reaches the end gets `X-Test-Milter-Seen: NAME` first,
  so that a chain of two shows both, in order.

`--noreply` negotiates SMFIP_NR_* for every stage but the end of message, as
rspamd's proxy worker does (the MTA sends those stages without waiting).
`--connect reject|tempfail|accept` answers the connect stage so.
`--log FILE` appends one JSON object per callback (with the macros the MTA
sent for it), so a test can see what the milter saw.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading

import Milter

# Every macro Postfix's milter_*_macros send by default, and the client's
# that it sends when asked (a test compares what each MTA sends)
MACROS = ("j", "_", "v", "i", "{daemon_name}", "{daemon_addr}", "{client_addr}",
          "{client_name}", "{client_port}", "{client_ptr}", "{tls_version}", "{cipher}",
          "{cipher_bits}", "{cert_subject}", "{cert_issuer}", "{auth_type}", "{auth_authen}",
          "{auth_author}", "{mail_addr}", "{mail_host}", "{mail_mailer}", "{rcpt_addr}",
          "{rcpt_host}", "{rcpt_mailer}")
DISCARD_LATER = ("data", "header", "eoh", "body")
NOREPLY = (Milter.P_NR_CONN | Milter.P_NR_HELO | Milter.P_NR_MAIL | Milter.P_NR_RCPT
           | Milter.P_NR_DATA | Milter.P_NR_UNKN | Milter.P_NR_EOH | Milter.P_NR_BODY
           | Milter.P_NR_HDR)
VERDICTS = {"accept": Milter.ACCEPT, "reject": Milter.REJECT, "tempfail": Milter.TEMPFAIL,
            "discard": Milter.DISCARD}
OPTIONS = argparse.Namespace(name="test", log=None, noreply=False, connect=None)
LOCK = threading.Lock()


def libmilter_socket(spec: str) -> str:
    """Postfix's milter address syntax to libmilter's."""
    if spec.startswith("unix:"):
        return spec
    if not spec.startswith("inet:"):
        raise SystemExit("testmilter: unsupported socket %r" % spec)
    host, port = spec[5:].rsplit(":", 1)
    if host.startswith("["):
        return "inet6:%s@%s" % (port, host[1:-1])
    return "inet:%s@%s" % (port, host)


def refusal(address: str) -> str | None:
    """The refusal asked for by an address's (or a HELO name's) local part."""
    local = address.strip("<>").split("@", 1)[0].lower()
    return local if local in ("reject", "tempfail", "replycode", "discard") else None


class TestMilter(Milter.Base):
    """One MTA connection (libmilter runs each in its own thread)."""

    def __init__(self) -> None:
        self.directives: list[str] = []
        self.discard_at = ""        # a later stage of the transaction that discards it
        self._protocol = 0

    def record(self, event: str, **fields: object) -> None:
        if not OPTIONS.log:
            return
        macros = {}
        for name in MACROS:
            value = self.getsymval(name)
            if value is not None:
                macros[name] = value
        fields.update(milter=OPTIONS.name, event=event, macros=macros, pid=os.getpid())
        line = json.dumps(fields, default=repr) + "\n"
        with LOCK, open(OPTIONS.log, "a") as handle:
            handle.write(line)

    def answer(self, flag: int, verdict: int) -> int:
        """Libmilter must not answer a stage negotiated as no-reply."""
        return Milter.NOREPLY if self._protocol & flag else verdict

    def refuse(self, what: str, address: str) -> int:
        kind = refusal(address)
        if kind == "replycode":
            self.setreply("550", "5.1.1", "%s: no such user here" % address.strip("<>"))
            return Milter.REJECT
        return VERDICTS.get(kind or "", Milter.CONTINUE)

    def negotiate(self, opts: list[int]) -> int:
        offered = opts[1]
        rc = super().negotiate(opts)
        if OPTIONS.noreply:
            opts[1] = self._protocol = self._protocol | (offered & NOREPLY)
        self.record("negotiate", actions=self._actions, protocol=self._protocol)
        return rc

    def connect(self, hostname, family, hostaddr) -> int:
        self.record("connect", hostname=hostname, family=family, hostaddr=hostaddr)
        return self.answer(Milter.P_NR_CONN, VERDICTS.get(OPTIONS.connect or "", Milter.CONTINUE))

    def hello(self, name) -> int:
        self.record("helo", name=name)
        return self.answer(Milter.P_NR_HELO, self.refuse("helo", name))

    def envfrom(self, sender, *params) -> int:
        self.directives = []
        local = sender.strip("<>").split("@", 1)[0].lower()
        stage = local[len("discard-"):] if local.startswith("discard-") else ""
        self.discard_at = stage if stage in DISCARD_LATER else ""
        self.record("mail", args=[sender, *params])
        return self.answer(Milter.P_NR_MAIL, self.refuse("mail", sender))

    def later(self, stage: str, flag: int) -> int:
        """A later stage's answer: DISCARD if the sender asked for it here."""
        return self.answer(flag, Milter.DISCARD if self.discard_at == stage else Milter.CONTINUE)

    def envrcpt(self, recipient, *params) -> int:
        self.record("rcpt", args=[recipient, *params])
        return self.answer(Milter.P_NR_RCPT, self.refuse("rcpt", recipient))

    def data(self) -> int:
        self.record("data")
        return self.later("data", Milter.P_NR_DATA)

    def header(self, name, value) -> int:
        self.record("header", name=name, value=value)
        if name.lower() == "x-test-milter":
            self.directives.append(value.strip())
        return self.later("header", Milter.P_NR_HDR)

    def eoh(self) -> int:
        self.record("eoh")
        return self.later("eoh", Milter.P_NR_EOH)

    def body(self, chunk) -> int:
        self.record("body", size=len(chunk), data=chunk.decode("utf-8", "replace"))
        return self.later("body", Milter.P_NR_BODY)

    def eom(self) -> int:
        self.record("eom", directives=self.directives)
        self.addheader("X-Test-Milter-Seen", OPTIONS.name)
        for directive in self.directives:
            words = directive.split()
            if words and words[0].endswith(":"):
                if words[0][:-1] != OPTIONS.name:
                    continue
                words = words[1:]
            if words:
                verdict = self.act(words[0].lower(), words[1:], directive)
                if verdict is not None:
                    return verdict
        return Milter.CONTINUE

    def act(self, action: str, args: list[str], directive: str) -> int | None:
        """Carry out one directive; a verdict ends the message's list."""
        if action in VERDICTS:
            return VERDICTS[action]
        if action == "replycode":
            code, xcode, text = args[0], args[1], " ".join(args[2:])
            self.setreply(code, xcode, *text.split("|"))
            return Milter.TEMPFAIL if code.startswith("4") else Milter.REJECT
        if action == "quarantine":
            self.quarantine(" ".join(args) or "test")
        elif action == "addheader":
            self.addheader(args[0], " ".join(args[1:]))
        elif action == "insheader":
            self.addheader(args[1], " ".join(args[2:]), int(args[0]))
        elif action == "chgheader":
            self.chgheader(args[0], int(args[1]), " ".join(args[2:]) or None)
        elif action == "replbody":
            self.replacebody((" ".join(args) + "\r\n").encode())
        elif action == "chgfrom":
            self.chgfrom(args[0], " ".join(args[1:]) or None)
        elif action == "addrcpt":
            self.addrcpt(args[0])
        elif action == "delrcpt":
            self.delrcpt(args[0])
        else:
            self.record("unknown-directive", directive=directive)
        return None

    def abort(self) -> int:
        self.record("abort")
        return Milter.CONTINUE

    def close(self) -> int:
        self.record("close")
        return Milter.CONTINUE


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", default="test")
    parser.add_argument("--log")
    parser.add_argument("--noreply", action="store_true")
    parser.add_argument("--connect", choices=sorted(VERDICTS))
    parser.add_argument("socket")
    args = parser.parse_args(argv, namespace=OPTIONS)
    Milter.factory = TestMilter
    Milter.set_flags(Milter.ADDHDRS | Milter.CHGHDRS | Milter.MODBODY | Milter.ADDRCPT
                     | Milter.DELRCPT | Milter.QUARANTINE | Milter.CHGFROM)
    sys.stdout.flush()
    Milter.runmilter("testmilter-" + args.name, libmilter_socket(args.socket), 60)


if __name__ == "__main__":
    main(sys.argv[1:])
