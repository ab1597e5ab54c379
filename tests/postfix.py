"""A real Postfix smtpd for tests: a throwaway instance, hardened as operators run it.

`PostfixServer(**main_cf)` writes a private config directory, queue and log
under a fresh directory of its own (Postfix's daemons run as the `postfix`
user, so it cannot live in pytest's 0700 tmp_path), starts it with
`postfix -c DIR start` on a free loopback port and stops its master by pid.

What it is set up as, unless a keyword overrides it (each keyword is a
main.cf parameter):
- hardened: `smtpd_helo_required`, `smtpd_forbid_unauth_pipelining` (Postfix
  3.9's default), `smtpd_tls_auth_only`, `strict_rfc821_envelopes`;
- `smtpd_forbid_bare_newline = no`, Postfix 3.7/3.8's default, which strips
  every CR before LF (what SMTP smuggling through a proxy relies on);
- XCLIENT allowed from loopback (`smtpd_authorized_xclient_hosts`), as for
  a filter node behind the proxy or a server that trusts it;
- every message is accepted for any domain from anyone and kept in the
  queue (`defer_transports`): `messages()` reads back each one's envelope
  and content with `postqueue -j` and `postcat`;
- `smtpd_upstream_proxy_protocol="haproxy"` makes it expect a PROXY header
  on every connection, as behind a balancer;
- `milters=[spec, ...]` runs them as `smtpd_milters` (Postfix's milter
  client, MILTER_README), protocol 6, `milter_default_action = tempfail`
  unless a keyword says otherwise: the reference a milter test compares the
  proxy with;
- STARTTLS offered with `tls=(cert_file, key_file)` (implicit TLS, as
  for port 465, with `smtpd_tls_wrappermode="yes"` too); AUTH offered with
  `sasl=True` (after STARTTLS only, as `smtpd_tls_auth_only` says; no
  credentials are accepted, and each attempt is logged as failed).

`log()` is Postfix's own log (`maillog_file`), where protocol complaints such
as "improper command pipelining" show.  Needs root and Debian's postfix (and
libsasl2-modules for `sasl`); `available()` says whether they are here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

from harness import free_port, pid_alive, wait_until

POSTFIX = "/usr/sbin/postfix"

# Only the services an smtpd that queues needs; chroot off (column 5) since
# the instance has no chroot tree.
MASTER_CF = """\
{listen} inet n - n - - smtpd
cleanup   unix n - n - 0 cleanup
qmgr      unix n - n 300 1 qmgr
rewrite   unix - - n - - trivial-rewrite
bounce    unix - - n - 0 bounce
defer     unix - - n - 0 bounce
trace     unix - - n - 0 bounce
verify    unix - - n - 1 verify
flush     unix n - n 1000? 0 flush
proxymap  unix - - n - - proxymap
smtp      unix - - n - - smtp
showq     unix n - n - - showq
error     unix - - n - - error
retry     unix - - n - - error
discard   unix - - n - - discard
anvil     unix - - n - 1 anvil
scache    unix - - n - 1 scache
tlsmgr    unix - - n 1000? 1 tlsmgr
postlog   unix-dgram n - n - 1 postlogd
"""


def available(sasl: bool = False) -> bool:
    """Whether a throwaway Postfix (with sasl: one that can offer AUTH) can run here."""
    if os.geteuid() != 0 or not os.path.exists(POSTFIX):
        return False
    return not sasl or bool(list(Path("/usr/lib").glob("*/sasl2/libplain.so*")))


class PostfixServer:
    """A running throwaway Postfix; `address` is "127.0.0.1:port"."""

    def __init__(self, tls: tuple[str, str] | None = None,
                 sasl: bool = False, start: bool = True,
                 milters: tuple[str, ...] | list[str] = (),
                 **main_cf: object) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="proxsmtpd-postfix-"))
        os.chmod(self.dir, 0o755)
        self.config = self.dir / "etc"
        self.queue = self.dir / "queue"
        self.data = self.dir / "data"
        self.maillog = self.dir / "maillog"
        for path in (self.config, self.queue, self.data):
            path.mkdir()
        shutil.chown(self.data, "postfix")
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.master_pid: int | None = None
        settings: dict[str, object] = {
            "compatibility_level": "3.6",
            "config_directory": self.config,
            "queue_directory": self.queue,
            "data_directory": self.data,
            "maillog_file": self.maillog,
            "maillog_file_prefixes": self.dir,
            "myhostname": "postfix.test",
            "mydomain": "test",
            "mydestination": "",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "check_client_access static:OK, reject",
            "smtpd_peername_lookup": "no",
            "smtpd_helo_required": "yes",
            "smtpd_forbid_unauth_pipelining": "yes",
            "smtpd_forbid_bare_newline": "no",
            "smtpd_tls_auth_only": "yes",
            "strict_rfc821_envelopes": "yes",
            "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
            "defer_transports": "smtp",
            "default_transport": "smtp",
            "relayhost": "[127.0.0.1]:9",
            "biff": "no",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "smtputf8_enable": "yes",
            "message_size_limit": 50 * 1024 * 1024,
        }
        if tls is not None:
            settings.update(smtpd_tls_cert_file=tls[0], smtpd_tls_key_file=tls[1],
                            smtpd_tls_security_level="may")
        if sasl:
            # Cyrus SASL with no database of ours: AUTH is offered (with
            # whatever mechanisms libsasl2-modules brings) and every attempt
            # fails and is logged ("SASL ... authentication failed"), which
            # is how a test sees that credentials reached the server.
            settings.update(smtpd_sasl_auth_enable="yes", smtpd_sasl_type="cyrus")
        if milters:
            settings.update(smtpd_milters=", ".join(milters), milter_protocol=6,
                            milter_default_action="tempfail")
        settings.update(main_cf)
        self.proxy_protocol = settings.get("smtpd_upstream_proxy_protocol") == "haproxy"
        self.wrappermode = settings.get("smtpd_tls_wrappermode") == "yes"
        (self.config / "main.cf").write_text(
            "".join("%s = %s\n" % (name, value) for name, value in settings.items()))
        (self.config / "master.cf").write_text(
            MASTER_CF.format(listen="%s:%d" % (self.host, self.port)))
        if start:
            self.start()

    @property
    def address(self) -> str:
        return "%s:%d" % (self.host, self.port)

    def postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([POSTFIX, "-c", str(self.config), *args],
                              capture_output=True, text=True, timeout=60, check=check)

    def start(self, timeout: float = 30.0) -> "PostfixServer":
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> "PostfixServer":
        result = self.postfix("start", check=False)
        if result.returncode != 0:
            raise RuntimeError("postfix start failed: %s%s\n%s"
                               % (result.stdout, result.stderr, self.log()))
        pid_file = self.queue / "pid" / "master.pid"
        wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), timeout,
                   what="Postfix's master pid file")
        self.master_pid = int(pid_file.read_text().split()[0])
        try:
            wait_until(self._answers, timeout, what="Postfix to listen on %s" % self.address)
        except AssertionError:
            raise AssertionError("Postfix didn't answer on %s:\n%s" % (self.address, self.log()))
        return self

    def _answers(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=2) as plain:
                plain.settimeout(5)
                if self.proxy_protocol:     # it says nothing before the header
                    plain.sendall(b"PROXY TCP4 127.0.0.1 127.0.0.1 1 25\r\n")
                sock = plain
                if self.wrappermode:        # implicit TLS: the greeting comes after a handshake
                    context = ssl.create_default_context()
                    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
                    sock = context.wrap_socket(plain)
                greeting = sock.recv(512)
                sock.sendall(b"QUIT\r\n")
                # a milter's refusal at connect (milter_default_action with
                # a milter down) makes the greeting a 4xx or 5xx
                return greeting[:3].isdigit()
        except OSError:
            return False

    def log(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except OSError:
            return ""

    def wait_log(self, text: str, timeout: float = 15.0) -> str:
        wait_until(lambda: text in self.log(), timeout, what="%r in Postfix's log" % text)
        return self.log()

    def queued(self) -> list[dict]:
        """`postqueue -j`: one dict per queued message (queue_id, sender, recipients...).
        showq reads the queue directories one after another, so a message
        that qmgr moves from `active` to `deferred` meanwhile is listed in
        both: one queue id is one message."""
        result = subprocess.run(["postqueue", "-c", str(self.config), "-j"],
                                capture_output=True, text=True, timeout=30)
        entries = {}
        for line in result.stdout.splitlines():
            if line.strip():
                entry = json.loads(line)
                entries.setdefault(entry["queue_id"], entry)
        return list(entries.values())

    def clear(self) -> None:
        """Delete every queued message (held ones too): `postsuper -d ALL`."""
        subprocess.run(["postsuper", "-c", str(self.config), "-d", "ALL"],
                       capture_output=True, timeout=30, check=True)

    def content(self, queue_id: str) -> bytes:
        """The queued message's headers and body as Postfix stored them (LF line ends)."""
        result = subprocess.run(["postcat", "-c", str(self.config), "-h", "-b", "-q", queue_id],
                                capture_output=True, timeout=30, check=True)
        return result.stdout

    def messages(self, count: int | None = None, timeout: float = 15.0) -> list[dict]:
        """Every queued message as {"sender", "recipients", "content"}, oldest
        first; with count, waits until there are at least that many."""
        if count is not None:
            wait_until(lambda: len(self.queued()) >= count, timeout,
                       what="%d message(s) in Postfix's queue" % count)
        found = []
        for entry in sorted(self.queued(), key=lambda entry: entry.get("arrival_time", 0)):
            found.append({"queue_id": entry["queue_id"], "sender": entry["sender"],
                          "recipients": [r["address"] for r in entry["recipients"]],
                          "content": self.content(entry["queue_id"])})
        return found

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the master by its pid (it takes its children down), then remove the instance."""
        try:
            if self.master_pid is not None and pid_alive(self.master_pid):
                os.kill(self.master_pid, signal.SIGTERM)
                wait_until(lambda: not pid_alive(self.master_pid), timeout,
                           what="Postfix's master %d to exit" % self.master_pid)
        finally:
            self.master_pid = None
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "PostfixServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_quiet(server: PostfixServer, seconds: float = 1.0) -> None:
    """Give Postfix time to queue a message it may still be receiving (a
    smuggled second message arrives after the first)."""
    time.sleep(seconds)
