"""The documentation holds: manual pages render cleanly and cover every setting
the parser accepts (names and defaults derived from proxsmtp.config.SPEC), the
sample config and every config example load with the real parser, every
`module:function` that docs/BEHAVIOUR.md names exists, the README's
firewall recipes run under `sh -e` on a fresh host (a new network namespace)
and make TPROXY work, and the example filter scripts do what the man page says
through a real proxsmtpd.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import smtplib
import subprocess
import tempfile
from pathlib import Path

import pytest

import netns
from harness import REPO, RecordingServer
from proxsmtp.process import config, hostcheck

SAMPLE = REPO / "etc" / "proxsmtpd.conf"
MAN8 = REPO / "man" / "proxsmtpd.8"
MAN5 = REPO / "man" / "proxsmtpd.conf.5"
README = REPO / "README.md"
SCRIPTS = REPO / "scripts"
MESSAGE = b"From: a@client.test\r\nTo: b@server.test\r\nSubject: docs\r\n\r\nfirst line\r\n.dotted line\r\n"


def spec_default(name: str) -> str | None:
    """The default written in config.SPEC for a setting (None when it has none)."""
    match = re.search(r"default=(None|'[^']*'|-?\d+)\)$", config.SPEC[name])
    assert match, "can't read the default of %s from %r" % (name, config.SPEC[name])
    value = match.group(1)
    return None if value == "None" else value.strip("'")


# Defaults that depend on another setting (None in config.SPEC), as the documentation writes them.
DEPENDENT_DEFAULTS = {"ClientTLS": "may when TLSCertificate is set, otherwise off",
                      "FilterTLS": "as ServerTLS", "FilterTLSCAFile": "as TLSCAFile",
                      "FilterHelo": "the host name"}

# Sample lines that name files (or need such a setting) which do not exist on a test machine:
# loading them must fail, naming the setting.
NEEDS_FILES = {"TLSCertificate", "TLSKey", "TLSCAFile", "ClientTLS", "FilterTLSCAFile"}


def documented_default(name: str) -> str:
    """How the documentation writes that default."""
    if name in DEPENDENT_DEFAULTS:
        return DEPENDENT_DEFAULTS[name]
    default = spec_default(name)
    return "none" if default is None else default


def unroff(text: str) -> str:
    """The few escapes used in the pages' literal blocks and headings."""
    return text.replace("\\-", "-").replace("\\e", "\\").replace('\\(bu', "*")


def with_out_address(text: str) -> str:
    return text + "\nOutAddress: 127.0.0.1:2525\n"


def looks_like_config(block: str) -> bool:
    """Every line is a comment or `Name: value` with a known name (and there is one)."""
    settings = 0
    for line in block.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        name, colon, _ = stripped.partition(":")
        if not colon or name.strip().lower() not in config.NAMES:
            return False
        settings += 1
    return settings > 0


def parse_example(block: str) -> config.Config:
    values, _ = config.read_lines(block)
    if "OutAddress" not in values and "TransparentProxy" not in values:
        block = with_out_address(block)
    return config.parse(block, "example")


def readme_blocks() -> list[str]:
    """The README's indented code blocks, dedented."""
    blocks, current = [], []
    for line in README.read_text().splitlines() + [""]:
        if line.startswith("    ") or (current and not line.strip()):
            current.append(line[4:])
            continue
        if current:
            blocks.append("\n".join(current).strip("\n") + "\n")
            current = []
    return blocks


def roff_literal_blocks(path: Path) -> list[str]:
    return [unroff(block) for block in re.findall(r"^\.nf\n(.*?)^\.fi$", path.read_text(), re.M | re.S)]


# --- manual pages ------------------------------------------------------------------------------

@pytest.mark.parametrize("page", [MAN8, MAN5], ids=lambda p: p.name)
@pytest.mark.unit
def test_man_page_renders_without_warnings(page):
    if not shutil.which("man") or not shutil.which("groff"):
        pytest.skip("man/groff not installed (apt-get install man-db groff-base)")
    shown = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True,
                           text=True, timeout=60, env={**os.environ, "MANWIDTH": "80"})
    assert shown.returncode == 0 and shown.stderr == "", shown.stderr
    assert "SYNOPSIS" in shown.stdout or "SETTINGS" in shown.stdout
    checked = subprocess.run(["groff", "-ww", "-z", "-man", str(page)], capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0 and checked.stderr == "", checked.stderr


@pytest.mark.unit
def test_every_setting_is_in_both_man_pages_and_the_sample():
    texts = {path.name: path.read_text() for path in (MAN8, MAN5, SAMPLE)}
    for name in config.SPEC:
        for where, text in texts.items():
            assert re.search(r"\b%s\b" % name, text), "%s is not documented in %s" % (name, where)


@pytest.mark.unit
def test_conf5_gives_each_setting_its_syntax_and_default():
    text = MAN5.read_text()
    settings = text.split(".SH SETTINGS\n", 1)[1].split("\n.SH ", 1)[0]
    sections = {}
    for section in ("\n" + settings).split("\n.TP\n")[1:]:
        heading = re.match(r'\.BI? "(\w+):', section)
        assert heading, "a SETTINGS entry without a `Name:` heading: %r" % section[:80]
        sections[heading.group(1)] = unroff(section)
    assert set(sections) == set(config.SPEC), "conf(5) settings differ from config.SPEC"
    for name, section in sections.items():
        wanted = "Default: %s" % documented_default(name)
        assert wanted in section.replace("\n", " "), "%s: %r missing in proxsmtpd.conf(5)" % (name, wanted)


@pytest.mark.unit
def test_man8_lists_each_setting_with_its_default():
    text = MAN8.read_text()
    listed = text.split(".SH CONFIGURATION\n", 1)[1].split("\n.SH ", 1)[0]
    for name in config.SPEC:
        pattern = r'^\.BR %s " \(%s[):]' % (name, re.escape(documented_default(name)))
        assert re.search(pattern, listed, re.M), "%s (default %s) not listed in proxsmtpd(8)" % (
            name, documented_default(name))


@pytest.mark.unit
def test_man8_documents_filter_environment_and_signals():
    text = MAN8.read_text()
    for variable in ("SENDER", "RECIPIENTS", "CLIENT", "SERVER", "HELO", "REMOTE",
                     "REMOTE_HELO", "EMAIL", "TMPDIR", "CLIENT_TLS", "SERVER_TLS"):
        assert re.search(r"^\.B %s$" % variable, text, re.M), variable
    for word in ("SIGTERM", "SIGINT", "SIGHUP", "add_header.sh", "reject_pattern.sh",
                 "spamassassin.sh", "CAP_NET_ADMIN", "/etc/init.d/proxsmtpd"):
        assert word in text, word
    for section in ("SYNOPSIS", "OPTIONS", "FILTERS", "LOGGING", "LOOPBACK FEATURE",
                    "TRANSPARENT PROXY", "SECURITY", "SIGNALS", "FILES", "SEE ALSO"):
        assert re.search(r'^\.SH "?%s"?$' % section, text, re.M), section


@pytest.mark.unit
def test_man_page_config_examples_load():
    examples = [block for page in (MAN5, MAN8) for block in roff_literal_blocks(page)
                if looks_like_config(block)]
    assert len(examples) >= 6, examples
    for block in examples:
        parse_example(block)


# --- docs/BEHAVIOUR.md's references ------------------------------------------------------------

BEHAVIOUR = REPO / "docs" / "BEHAVIOUR.md"
# `module:qualname`, the module dotted below proxsmtp/ (`process.worker:Worker._accept`).
REFERENCE = re.compile(r"`([a-z_][\w.]*):([A-Za-z_][\w.]*)`")
# The header's example of the form, not a reference.
PLACEHOLDERS = {"module:function"}


def references(text: str) -> list[str]:
    """Every backquoted `module:qualname` in `text`, in order, each once."""
    found = ["%s:%s" % match for match in REFERENCE.findall(text)]
    return [ref for ref in dict.fromkeys(found) if ref not in PLACEHOLDERS]


def unresolved(reference: str) -> str | None:
    """Why `module:qualname` names nothing in proxsmtp (None if it resolves):
    the module must import, and each part of the qualname must be an
    attribute of the one before (a method, a property, a nested class, a
    module-level name).  A function or class must be defined in that module:
    one it only imports lives elsewhere."""
    module, qualname = reference.split(":")
    try:
        found = importlib.import_module("proxsmtp." + module)
    except ImportError as exc:
        return "%s: no module proxsmtp.%s (%s)" % (reference, module, exc)
    for part in qualname.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            return "%s: no %s in %s" % (reference, part, getattr(found, "__qualname__", module))
    home = getattr(found, "__module__", None)
    if callable(found) and isinstance(home, str) and home != "proxsmtp." + module:
        return "%s: defined in %s, not in proxsmtp.%s" % (reference, home, module)
    return None


@pytest.mark.unit
def test_behaviour_references_name_existing_code():
    """Each behaviour's `module:function` is where the code is: a function
    moved or renamed takes its line in docs/BEHAVIOUR.md along."""
    named = references(BEHAVIOUR.read_text())
    assert len(named) >= 100, "fewer references than docs/BEHAVIOUR.md holds: %d" % len(named)
    missing = [why for why in map(unresolved, named) if why is not None]
    assert not missing, "\n".join(missing)


@pytest.mark.unit
def test_behaviour_reference_check_catches_a_wrong_one():
    """The check itself: a missing module, function, method or nested part is
    caught; methods, properties, nested classes and constants resolve."""
    assert references("x `module:function` `a.b:C.d` `a.b:C.d` `Received:` `cli:main`") == [
        "a.b:C.d", "cli:main"]
    assert unresolved("cli:main") is None
    assert unresolved("process.worker:Worker._accept") is None
    assert unresolved("process.pool:WorkerInfo.retiring") is None        # a dataclass field
    assert unresolved("process.worker:AcceptedSocket.family") is None    # a descriptor
    assert unresolved("process.config:Config") is None
    assert "no module" in unresolved("process.nowhere:run")
    assert "no main in" in unresolved("process.worker:main")
    assert "no _accepts in" in unresolved("process.worker:Worker._accepts")
    assert "no x in" in unresolved("process.worker:Worker._accept.x")
    assert "defined in proxsmtp.process.slots" in unresolved("process.pool:SharedSlots.bind")


# --- the sample configuration ----------------------------------------------------------------

LIVE = {"OutAddress": "127.0.0.1:10026", "Listen": "127.0.0.1:10025"}   # what ships uncommented


def sample_lines() -> dict[str, str]:
    """{Name: its `Name: value` line} of the sample config, commented out or live."""
    found = {}
    for line in SAMPLE.read_text().splitlines():
        match = re.match(r"#?(\w+):", line)
        if match:
            assert match.group(1) in config.SPEC, "unknown setting in the sample: %s" % line
            assert match.group(1) not in found, "listed twice in the sample: %s" % line
            found[match.group(1)] = line.lstrip("#")
    return found


@pytest.mark.unit
def test_sample_config_is_safe_and_live_as_shipped():
    """Loopback in, loopback out, no warning: it starts as installed and is no open relay."""
    loaded = config.parse(SAMPLE.read_text(), str(SAMPLE))
    assert loaded.named == set(LIVE)
    assert loaded.Listen == config.addresses.Address("127.0.0.1", 10025)
    assert loaded.OutAddress == config.addresses.Address("127.0.0.1", 10026)
    assert loaded.warnings == []
    live = [line for line in SAMPLE.read_text().splitlines() if line and not line.startswith("#")]
    assert live == ["%s: %s" % item for item in LIVE.items()]


@pytest.mark.unit
def test_sample_config_documents_every_setting_with_its_default():
    text = SAMPLE.read_text()
    lines = sample_lines()
    assert set(lines) == set(config.SPEC)
    baseline = config.parse(with_out_address(""))
    for name, line in lines.items():
        marker = "\n%s:" % name if name in LIVE else "\n#%s:" % name
        comment = text.split(marker, 1)[0].rsplit("\n\n", 1)[1]
        wanted = "# Default: %s" % documented_default(name)
        assert wanted in comment, "%s: %r missing above its sample line" % (name, wanted)
        uncommented = line if name == "OutAddress" else with_out_address(line)
        if name in NEEDS_FILES:
            with pytest.raises(config.ConfigError, match=name):
                hostcheck.check_system(config.parse(uncommented, "sample line"))
            continue
        loaded = config.parse(uncommented, "sample line")
        assert name in loaded.named
        if spec_default(name) is not None and name not in LIVE:
            assert getattr(loaded, name) == getattr(baseline, name), \
                "%s: the sample shows %r, not the default" % (name, line)


@pytest.mark.unit
def test_readme_config_examples_load():
    examples = [block for block in readme_blocks() if looks_like_config(block)]
    assert len(examples) >= 3, examples
    for block in examples:
        parse_example(block)
    seed_line = "FilterCommand: 192.168.0.100 # or 127.0.0.1 for haproxy"
    assert any(seed_line in block for block in examples)
    assert any("FilterCommand: 127.0.0.1:20025" in block for block in examples)
    assert "MaxConnections: 3000" in README.read_text()


@pytest.mark.unit
def test_readme_covers_what_a_newcomer_needs():
    text = README.read_text()
    for needed in ("make run", "make test", "make install", "make uninstall", "DESTDIR",
                   "PREFIX", "systemctl reload proxsmtpd", "service proxsmtpd reload",
                   "## Fully transparent", "## High volume", "## Multiple Halon nodes",
                   "Workers", "LimitNOFILE", "option smtpchk", "balance roundrobin",
                   "man/proxsmtpd.8", "man/proxsmtpd.conf.5", "CAP_NET_ADMIN",
                   "adduser --system --no-create-home --group proxsmtpd", "proxsmtpd -t -f",
                   "the example line from Halon's README", "Open relays"):
        assert needed in text, needed
    assert "htons" not in text, "the source patch of Halon's README is a setting now"
    assert "seed" not in text.lower(), "internal shorthand: say which document"


@pytest.mark.unit
def test_man_pages_say_how_to_create_the_user_and_test_the_config():
    man8, man5 = unroff(MAN8.read_text()), unroff(MAN5.read_text())
    assert "adduser --system --no-create-home --group proxsmtpd" in man8
    assert "adduser --system --no-create-home --group proxsmtpd" in man5
    assert re.search(r"^\.B -t$", man8, re.M) and "test is successful" in man8
    assert "proxsmtpd -t" in man5


# --- the README's firewall recipes --------------------------------------------------------------

def readme_recipe(marker: str, exclude: str | None = None) -> str:
    blocks = [block for block in readme_blocks()
              if marker in block and (exclude is None or exclude not in block)]
    assert len(blocks) == 1, (marker, blocks)
    return blocks[0]


def tproxy_recipes() -> tuple[str, str]:
    return (readme_recipe("iptables -t mangle -N DIVERT", exclude="ip6tables"),
            readme_recipe("ip6tables -t mangle -N DIVERT"))


@pytest.mark.system
@pytest.mark.netns
@pytest.mark.root
@pytest.mark.slow
def test_readme_tproxy_recipes_survive_sh_e_on_a_fresh_host():
    """The seed's rc.local aborts under `sh -e` on a fresh host (flushing a table
    that does not exist); the README's corrected one goes through and routes."""
    for feature in ("tproxy", "tproxy6"):
        reason = netns.unavailable(feature)
        if reason:
            pytest.skip(reason)
    ipv4, ipv6 = tproxy_recipes()
    fresh = netns.Namespace("docs")
    try:
        seed = fresh.sh("sh -e -c %s" % shquote(netns.ROUTER_RECIPE_TPROXY), check=False)
        assert seed.returncode != 0, "the seed's recipe was expected to abort under sh -e"
    finally:
        fresh.delete()
    fresh = netns.Namespace("docs")
    try:
        ran = fresh.sh("sh -e -c %s" % shquote(ipv4 + ipv6), check=False)
        assert ran.returncode == 0, ran.stderr
        assert "fwmark 0x1 lookup 100" in fresh.ip("rule").stdout
        assert "fwmark 0x1 lookup 100" in fresh.ip("-6", "rule").stdout
        assert "local default dev lo" in fresh.ip("route", "show", "table", "100").stdout
        assert "local default dev lo" in fresh.ip("-6", "route", "show", "table", "100").stdout
        mangle = fresh.sh("iptables -t mangle -S PREROUTING").stdout
        assert "--on-port 10025" in mangle and "-m socket -j DIVERT" in mangle
    finally:
        fresh.delete()
    assert fresh.name not in netns.namespace_names()


def shquote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def send_through(host: str, port: int = 25) -> tuple[str, str]:
    """One message from inside the client namespace: (own address, peer address)."""
    with smtplib.SMTP(host, port, timeout=20) as client:
        local, peer = client.sock.getsockname()[0], client.sock.getpeername()[0]
        client.sendmail("a@client.test", ["b@server.test"], MESSAGE)
    return local, peer


@pytest.mark.system
@pytest.mark.netns
@pytest.mark.root
@pytest.mark.slow
def test_readme_tproxy_recipe_makes_full_transparency_work():
    """Client -> router (README recipe + proxsmtpd `TransparentProxy: full`,
    `Listen: 10025`) -> server, over IPv4 and IPv6: the server sees the client."""
    for feature in ("tproxy", "tproxy6"):
        reason = netns.unavailable(feature)
        if reason:
            pytest.skip(reason)
    ipv4, ipv6 = tproxy_recipes()
    workdir = Path(tempfile.mkdtemp(prefix="pxs-docs-"))
    topo = netns.Topology()
    servers: list[RecordingServer] = []
    proxy = None
    try:
        ran = topo.router.sh("sh -e -c %s" % shquote(ipv4 + ipv6), check=False)
        assert ran.returncode == 0, ran.stderr
        for host in (netns.SERVER4, netns.SERVER6):
            servers.append(topo.server.call(RecordingServer, host=host, port=25))
        proxy = netns.NamespacedProxy(topo.router, workdir, {
            "TransparentProxy": "full", "Listen": "10025", "TimeOut": 20}).start()
        for client_ip, server_ip, server in ((netns.CLIENT4, netns.SERVER4, servers[0]),
                                             (netns.CLIENT6, netns.SERVER6, servers[1])):
            local, peer = topo.client.call(send_through, server_ip)
            assert (local, peer) == (client_ip, server_ip)
            message = server.wait_messages(1)[0]
            assert server.connections[0].peer[0] == client_ip, proxy.log()
            assert message.body.endswith(b"first line\r\n.dotted line")
        assert proxy.stop() == 0, proxy.log()
        assert proxy.spool_files() == []
    finally:
        if proxy is not None:
            proxy.stop()
        for server in servers:
            server.stop()
        names = topo.names
        topo.close()
        shutil.rmtree(workdir, ignore_errors=True)
    assert not netns.namespace_names() & set(names)


# --- the example filters, through a real proxsmtpd ------------------------------------------

def send(proxy, message: bytes = MESSAGE) -> None:
    with proxy.smtp() as client:
        client.sendmail("a@client.test", ["b@server.test"], message)


def only_tools(directory: Path, *tools: str) -> Path:
    """A PATH directory holding only these programs (so spamc is surely absent)."""
    directory.mkdir(parents=True, exist_ok=True)
    for tool in tools:
        (directory / tool).symlink_to(shutil.which(tool))
    return directory


@pytest.mark.e2e
@pytest.mark.slow
def test_add_header_example(proxy, upstream):
    running = proxy({"OutAddress": upstream.address, "FilterType": "pipe",
                     "FilterCommand": str(SCRIPTS / "add_header.sh"), "FilterTimeout": 10})
    send(running)
    raw = upstream.wait_messages(1)[0].raw
    first, rest = raw.split(b"\r\n", 1)
    assert re.fullmatch(rb"X-Proxsmtpd-Filtered: from 127\.0\.0\.1 by \S+", first), raw
    assert rest == MESSAGE.rstrip(b"\r\n").replace(b"\r\n.dotted", b"\r\n..dotted")


@pytest.mark.e2e
@pytest.mark.slow
def test_reject_pattern_example(proxy, upstream, tmp_path):
    patterns = tmp_path / "patterns"
    patterns.write_text("cheap +pills\n^Subject: .*lottery\n")
    command = "%s %s '554 5.7.1 No thanks'" % (SCRIPTS / "reject_pattern.sh", patterns)
    running = proxy({"OutAddress": upstream.address, "FilterType": "file",
                     "FilterCommand": command, "FilterTimeout": 10})
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(running, MESSAGE.replace(b"first line", b"Buy CHEAP  pills"))
    assert (refused.value.smtp_code, refused.value.smtp_error) == (554, b"5.7.1 No thanks")
    send(running)
    assert len(upstream.wait_messages(1)) == 1
    assert upstream.messages[0].body.endswith(b"first line\r\n.dotted line")
    running.wait_log(r'reply="554 5\.7\.1 No thanks", .*status=REJECTED$')


@pytest.mark.e2e
@pytest.mark.slow
def test_reject_pattern_example_fails_temporarily_without_patterns(proxy, upstream, tmp_path):
    command = "%s %s" % (SCRIPTS / "reject_pattern.sh", tmp_path / "missing")
    running = proxy({"OutAddress": upstream.address, "FilterType": "file",
                     "FilterCommand": command, "FilterTimeout": 10})
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(running)
    assert refused.value.smtp_code == 451
    assert upstream.messages == []


@pytest.mark.e2e
@pytest.mark.slow
def test_spamassassin_example_passes_mail_when_absent(proxy, upstream, tmp_path):
    bindir = only_tools(tmp_path / "bin", "cat")
    command = "PATH=%s /bin/sh %s" % (bindir, SCRIPTS / "spamassassin.sh")
    running = proxy({"OutAddress": upstream.address, "FilterType": "pipe",
                     "FilterCommand": command, "FilterTimeout": 10})
    send(running)
    message = upstream.wait_messages(1)[0]
    assert message.raw == MESSAGE.rstrip(b"\r\n").replace(b"\r\n.dotted", b"\r\n..dotted")
    running.wait_log(r"status=FILTERED")


FAKE_SPAMC = """\
#!/bin/sh
# Stands in for spamc -E: marks the message, exits 1 when it holds the GTUBE text.
message=$(/bin/cat)
if printf '%s' "$message" | /bin/grep -q 'XJS\\*C4JDBQADN1'; then flag=YES; status=1; else flag=NO; status=0; fi
printf 'X-Spam-Flag: %s\\r\\n%s\\r\\n' "$flag" "$message"
exit $status
"""
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


@pytest.mark.parametrize("mode", ["reject", "tag"])
@pytest.mark.e2e
@pytest.mark.slow
def test_spamassassin_example_with_spamc(proxy, upstream, tmp_path, mode):
    bindir = only_tools(tmp_path / "bin", "cat")
    (bindir / "spamc").write_text(FAKE_SPAMC)
    (bindir / "spamc").chmod(0o755)
    command = "PATH=%s /bin/sh %s %s" % (bindir, SCRIPTS / "spamassassin.sh", mode)
    running = proxy({"OutAddress": upstream.address, "FilterType": "pipe",
                     "FilterCommand": command, "FilterTimeout": 10})
    send(running)
    assert upstream.wait_messages(1)[0].raw.startswith(b"X-Spam-Flag: NO\r\nFrom: a@client.test")
    spam = MESSAGE.replace(b"first line", GTUBE)
    if mode == "reject":
        with pytest.raises(smtplib.SMTPDataError) as refused:
            send(running, spam)
        assert (refused.value.smtp_code, refused.value.smtp_error) == (
            550, b"5.7.1 Message looks like spam")
        assert len(upstream.messages) == 1
    else:
        send(running, spam)
        assert upstream.wait_messages(2)[1].raw.startswith(b"X-Spam-Flag: YES\r\n")
