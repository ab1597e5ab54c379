"""proxsmtpd.conf: `Name: Value` lines, validated by a configobj spec.

The file syntax is upstream's (names case-insensitive, `#` comments, blank
lines), which configobj itself cannot read, so lines are split here (keeping
each setting's line number, which configobj would only know for its own
syntax) and the values validated by configobj's Validator against SPEC below.
Every error names the file, the line and the setting, and says what the
setting accepts.  check_system() then checks what the settings need of this
host; load() does both, for a start, `proxsmtpd -t` and a reload alike.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import socket
import ssl
from dataclasses import dataclass, field

from configobj import ConfigObj, flatten_errors
from validate import ValidateError, Validator, VdtValueError

from ..message import header
from ..net import addresses, proxyproto, tls
from ..net.addresses import Address, AddressError, MilterAddress
from ..net.proxyproto import Networks

# Every setting: configobj check with its default.  The order is the order of
# the sample config and of the manual page.
SPEC = {
    "OutAddress": "address(default=None)",
    "Listen": "listen_address(default='0.0.0.0:10025')",
    "MaxConnections": "integer(min=2, max=1048576, default=64)",
    "Workers": "integer(min=0, max=256, default=0)",
    "TimeOut": "integer(min=1, default=180)",
    "HandshakeTimeOut": "integer(min=1, default=30)",
    "KeepAlives": "integer(min=0, default=0)",
    "MaxMessageSize": "integer(min=0, default=0)",
    "XClient": "flag(default='off')",
    "TransparentProxy": "transparent(default='off')",
    "ProxyProtocol": "flag(default='off')",
    "ProxyProtocolFrom": "networks(default=None)",
    "OutProxyProtocol": "out_proxy(default='off')",
    "TempDirectory": "string(min=1, default='/tmp')",
    "User": "string(min=1, default=None)",
    "PidFile": "string(default=None)",
    "Skip": "skip(default=None)",
    "FilterCommand": "string(default=None)",
    "FilterType": "filter_type(default='pipe')",
    "FilterTimeout": "integer(min=1, default=30)",
    "FilterConnections": "integer(min=0, max=1000, default=4)",
    "FilterIdleTime": "integer(min=1, max=86400, default=30)",
    "FilterReject": "string(min=1, default='530 Email Rejected')",
    "FilterHelo": "hello_name(default=None)",
    "Milters": "milters(default=None)",
    "MilterDefaultAction": "milter_action(default='tempfail')",
    "MilterTimeout": "integer(min=1, max=86400, default=30)",
    "MilterReuse": "milters(default=None)",
    "Header": "string(default=None)",
    "StatsListen": "stats_address(default=None)",

    "TLSCertificate": "string(default=None)",
    "TLSKey": "string(default=None)",
    "ClientTLS": "client_tls(default=None)",
    "TLSWrapper": "flag(default='off')",
    "ServerTLS": "server_tls(default='may')",
    "TLSCAFile": "string(default=None)",
    "FilterTLS": "filter_tls(default=None)",
    "FilterTLSCAFile": "string(default=None)",
}

NAMES = {name.lower(): name for name in SPEC}

FLAGS = {"on": True, "yes": True, "true": True, "t": True, "1": True,
         "off": False, "no": False, "false": False, "f": False, "0": False}

FILTER_TYPES = ("pipe", "file", "smtp", "reject")
MILTER_ACTIONS = ("tempfail", "accept", "reject")

ADDRESS_FORMS = "host:port, host, port, [IPv6]:port or /path/to/socket"
ADD_USER = "adduser --system --no-create-home --group proxsmtpd"


class ConfigError(Exception):
    """A configuration problem; the program exits 2 with this message."""


def located(source: str, line: int | None, text: str) -> str:
    """`file, line N: text`, as postfix says where a setting went wrong."""
    where = ", ".join(part for part in (source, "line %d" % line if line else "") if part)
    return "%s: %s" % (where, text) if where else text


@dataclass
class Config:
    """Validated settings, with the names used in the file as attributes."""

    OutAddress: Address | None = None
    Listen: Address = field(default_factory=lambda: Address("0.0.0.0", 10025))
    MaxConnections: int = 64
    Workers: int = 0
    TimeOut: int = 180
    HandshakeTimeOut: int = 30             # a PROXY header, a client's TLS handshake
    KeepAlives: int = 0
    MaxMessageSize: int = 0                # bytes; 0: the server's SIZE only
    XClient: bool = False
    TransparentProxy: str = "off"
    ProxyProtocol: bool = False
    ProxyProtocolFrom: Networks | None = None    # None: any peer may send a header
    OutProxyProtocol: str = "off"
    TempDirectory: str = "/tmp"
    User: str | None = None
    PidFile: str | None = None
    Skip: str | None = None
    FilterCommand: str | None = None
    FilterType: str = "pipe"
    FilterTimeout: int = 30
    FilterConnections: int = 4             # idle filter-node connections kept per worker; 0: none
    FilterIdleTime: int = 30               # seconds one is kept idle
    FilterReject: str = "530 Email Rejected"
    FilterHelo: str | None = None          # None until _finish: the host name (FilterType smtp)
    # the milter chain in order; empty: no milters
    Milters: tuple[MilterAddress, ...] = ()
    MilterDefaultAction: str = "tempfail"  # a milter down, timed out or broken
    MilterTimeout: int = 30                # seconds per step (10x for the message's)
    # milters among Milters whose connections are kept across client sessions
    MilterReuse: tuple[MilterAddress, ...] = ()
    Header: str | None = None
    StatsListen: Address | None = None     # the /metrics endpoint; None: off

    TLSCertificate: str | None = None
    TLSKey: str | None = None
    ClientTLS: str | None = None           # None until _finish: may with a certificate, else off
    TLSWrapper: bool = False
    ServerTLS: str = "may"
    TLSCAFile: str | None = None
    FilterTLS: str | None = None           # None until _finish: as ServerTLS
    FilterTLSCAFile: str | None = None     # None: as TLSCAFile
    # made from the TLS files by check_system(), once per load (a SIGHUP picks up a
    # renewed certificate)
    listening_tls: ssl.SSLContext | None = field(default=None, compare=False, repr=False)
    connecting_tls: ssl.SSLContext | None = field(default=None, compare=False, repr=False)
    filter_tls: ssl.SSLContext | None = field(default=None, compare=False, repr=False)
    FilterAddress: Address | None = None   # FilterCommand parsed, for FilterType smtp
    milter_hostname: str = ""              # the milters' `j` macro: this host's name
    milter_reuse: frozenset[str] = frozenset()  # MilterReuse, as the specs in Milters
    source: str = ""                       # the file it came from, if any
    named: set[str] = field(default_factory=set)   # settings present in the file
    lines: dict[str, int] = field(default_factory=dict)   # ...and their line numbers
    warnings: list[str] = field(default_factory=list)

    @property
    def skip_authenticated(self) -> bool:
        return self.Skip == "authenticated"

    @property
    def milters(self) -> tuple[MilterAddress, ...]:
        return self.Milters

    @property
    def workers(self) -> int:
        return self.Workers or (os.cpu_count() or 1)

    def at(self, name: str, text: str) -> str:
        """`text` about setting `name`, with the file and the line it is on."""
        return located(self.source, self.lines.get(name), "%s: %s" % (name, text))

    def error(self, name: str, text: str) -> ConfigError:
        return ConfigError(self.at(name, text))


# --- value checks ------------------------------------------------------------
# configobj's integer and string checks are described from their arguments in
# SPEC (accepts()); a check of our own says in words what it accepts.

_CHECKS: dict[str, object] = {}
_ACCEPTS: dict[str, str] = {}


class _Detailed(ValidateError):
    """A refused value with a reason worth more than "expected ..." alone."""


def _check(name: str, what: str):
    """Register a configobj check function under `name`, accepting `what`."""
    def register(function):
        _CHECKS[name] = function
        _ACCEPTS[name] = what
        return function
    return register


@_check("flag", "on or off (yes/no, true/false, 1/0)")
def _flag(value: str | None) -> bool:
    try:
        return FLAGS[str(value).strip().lower()]
    except KeyError:
        raise VdtValueError(value) from None


@_check("transparent", "off, on, client or full")
def _transparent(value: str | None) -> str:
    word = str(value).strip().lower()
    if word in ("client", "full"):
        return word
    return "client" if _flag(word) else "off"


@_check("networks", "IP addresses and networks (10.0.0.0/8), separated by commas or spaces")
def _networks(value: str | None) -> Networks | None:
    if value is None or value == "None" or not str(value).strip():
        return None
    try:
        return proxyproto.parse_networks(str(value))
    except ValueError as exc:
        raise _Detailed(str(exc)) from None


@_check("out_proxy", "off, v1 or v2")
def _out_proxy(value: str | None) -> str:
    word = str(value).strip().lower()
    if word not in ("off", "v1", "v2"):
        raise VdtValueError(value)
    return word


@_check("filter_type", "one of " + ", ".join(FILTER_TYPES))
def _filter_type(value: str | None) -> str:
    word = str(value).strip().lower()
    if word not in FILTER_TYPES:
        raise VdtValueError(value)
    return word


@_check("milters", "milters in Postfix's syntax, inet:host:port, inet:[IPv6]:port or "
        "unix:/path, separated by commas")
def _milters(value: str | None) -> tuple[MilterAddress, ...]:
    if value is None or value == "None":
        return ()
    try:
        return addresses.parse_milters(str(value))
    except AddressError as exc:
        raise _Detailed(str(exc)) from None


@_check("milter_action", "one of " + ", ".join(MILTER_ACTIONS))
def _milter_action(value: str | None) -> str:
    word = str(value).strip().lower()
    if word not in MILTER_ACTIONS:
        raise VdtValueError(value)
    return word


@_check("client_tls", "one of " + ", ".join(tls.CLIENT_POLICIES))
def _client_tls(value: str | None) -> str | None:
    if value is None or value == "None":
        return None
    word = str(value).strip().lower()
    if word not in tls.CLIENT_POLICIES:
        raise VdtValueError(value)
    return word


@_check("server_tls", "one of " + ", ".join(tls.SERVER_POLICIES))
def _server_tls(value: str | None) -> str:
    word = str(value).strip().lower()
    if word not in tls.SERVER_POLICIES:
        raise VdtValueError(value)
    return word


@_check("filter_tls", "one of " + ", ".join(tls.SERVER_POLICIES))
def _filter_tls(value: str | None) -> str | None:
    """ServerTLS's policies; unset is ServerTLS's value (_tls_settings)."""
    if value is None or value == "None":
        return None
    return _server_tls(value)


@_check("skip", "authenticated")
def _skip(value: str | None) -> str | None:
    if value is None or value == "None":
        return None
    if str(value).strip().lower() != "authenticated":
        raise VdtValueError(value)
    return "authenticated"


@_check("hello_name", "a domain name or an address literal such as [192.0.2.1]")
def _hello_name(value: str | None) -> str | None:
    if value is None or value == "None":
        return None
    if not addresses.is_hello_name(str(value).strip()):
        raise VdtValueError(value)
    return str(value).strip()


@_check("address", ADDRESS_FORMS)
def _address(value: str | None, default_port: int = 25) -> Address | None:
    if value is None or value == "None":
        return None
    try:
        return addresses.parse(value, default_port)
    except AddressError as exc:
        raise _Detailed(str(exc)) from None


@_check("listen_address", ADDRESS_FORMS.replace("host:port, host", "address:port, address"))
def _listen_address(value: str | None) -> Address:
    return _address(value, 10025)


@_check("stats_address", "port, address:port, [IPv6]:port or /path/to/socket")
def _stats_address(value: str | None) -> Address | None:
    """Listen's syntax, but a port is needed: there is no customary one."""
    if value is None or str(value).strip() in ("", "None"):
        return None
    addr = _address(value, 0)
    if not addr.is_unix and addr.port == 0:
        raise _Detailed("a port is needed")
    return addr


_VALIDATOR = Validator(_CHECKS)


def accepts(name: str) -> str:
    """What setting `name` accepts, in words, from its check in SPEC."""
    check = SPEC[name]
    function = check.split("(", 1)[0]
    low = re.search(r"\bmin=(-?\d+)", check)
    high = re.search(r"\bmax=(-?\d+)", check)
    if function == "integer":
        if low and high:
            return "an integer from %s to %s" % (low.group(1), high.group(1))
        return "an integer of at least %s" % low.group(1) if low else "an integer"
    if function == "string":
        return "a non-empty value" if low and int(low.group(1)) > 0 else "any text"
    return _ACCEPTS.get(function, "a valid value")


def _refused(name: str, value: str | None, error: object) -> str:
    if isinstance(error, _Detailed):
        return "%s: %s (expected %s)" % (name, error, accepts(name))
    return '%s: expected %s, not "%s"' % (name, accepts(name), value)


# --- reading a file -------------------------------------------------------------

def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name.lower(), list(NAMES), n=1, cutoff=0.75)
    return " (did you mean %s?)" % NAMES[close[0]] if close else ""


def read_lines(text: str, source: str = "") -> tuple[dict[str, str], dict[str, int]]:
    """Split upstream-syntax lines into {canonical name: value} and line numbers."""
    values: dict[str, str] = {}
    lines: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, value = line.partition(":")
        if not colon:
            raise ConfigError(located(source, number, 'invalid config line: %s (expected '
                                      '"Name: value")' % line))
        canonical = NAMES.get(name.strip().lower())
        if canonical is None:
            raise ConfigError(located(source, number, 'unknown setting "%s"%s'
                                      % (name.strip(), _did_you_mean(name.strip()))))
        values[canonical] = value.strip()
        lines[canonical] = number
    return values, lines


def parse(text: str, source: str = "") -> Config:
    """Validate a config file's text into a Config, or raise ConfigError.
    Only the text: what it needs from this host is check_system()'s job."""
    values, lines = read_lines(text, source)
    spec = ConfigObj(["%s = %s" % item for item in SPEC.items()], list_values=False,
                     _inspec=True)
    checked = ConfigObj(values, configspec=spec, list_values=False, interpolation=False)
    result = checked.validate(_VALIDATOR, preserve_errors=True)
    if result is not True:
        for _, name, error in flatten_errors(checked, result):
            raise ConfigError(located(source, lines.get(name), _refused(name, values.get(name), error)))
    config = Config(source=source, named=set(values), lines=lines,
                    **{name: checked[name] for name in SPEC})
    _finish(config)
    return config


def _milter_reuse(config: Config) -> frozenset[str]:
    """MilterReuse's milters, each one of Milters (named by its spec there)."""
    specs = {(m.family, m.host, m.port, m.path): m.spec for m in config.Milters}
    reuse = set()
    for milter in config.MilterReuse or ():
        spec = specs.get((milter.family, milter.host, milter.port, milter.path))
        if spec is None:        # (as ProxyProtocolFrom without ProxyProtocol)
            config.warnings.append(config.at("MilterReuse", "%s ignored, as it is not one of "
                                             "Milters" % milter.spec))
        else:
            reuse.add(spec)
    return frozenset(reuse)


def _finish(config: Config) -> None:
    """Cross-setting rules and the few values that need more than one check."""
    if config.PidFile == "":
        config.PidFile = None
    if not config.Header:
        config.Header = None
    if config.FilterCommand == "":
        config.FilterCommand = None
    if config.Milters is None:
        config.Milters = ()
    if config.Milters:      # looked up once per load, not in a worker's event loop
        config.milter_hostname = socket.getfqdn()
    config.milter_reuse = _milter_reuse(config)
    if config.OutAddress is None and config.TransparentProxy == "off":
        raise ConfigError(located(config.source, None, "no OutAddress specified: it is required "
                                  "unless TransparentProxy is on (expected %s)" % ADDRESS_FORMS))
    if config.OutAddress is not None and config.TransparentProxy != "off":
        config.warnings.append(config.at(
            "OutAddress", "ignored, as TransparentProxy is enabled"))
    if config.ProxyProtocolFrom is not None and not config.ProxyProtocol:
        config.warnings.append(config.at(
            "ProxyProtocolFrom", "ignored unless ProxyProtocol is on"))
    if config.ProxyProtocol and config.TransparentProxy != "off":
        raise config.error("ProxyProtocol", "can't be on with TransparentProxy: behind a load "
                           "balancer the connection's destination is the balancer's, not the "
                           "one the client chose; use OutAddress")
    if config.ProxyProtocol and config.ProxyProtocolFrom is None \
            and _reaches_beyond_loopback(config.Listen):
        config.warnings.append(config.at(
            "ProxyProtocol", "on without ProxyProtocolFrom, and Listen %s%s accepts connections "
            "from other hosts: anyone who reaches it can send a PROXY header and claim any "
            "client address (set ProxyProtocolFrom to the load balancers' addresses)"
            % (config.Listen, "" if "Listen" in config.named else " (the default)")))
    if config.FilterType == "smtp":
        _filter_node(config)
    if config.StatsListen is not None and config.StatsListen == config.Listen:
        raise config.error("StatsListen", "the same address as Listen")
    for name in ("OutAddress", "Listen", "StatsListen"):
        addr = getattr(config, name)
        if addr is not None and not addr.is_unix and addr.host is not None \
                and not addresses.is_ip(addr.host):
            try:
                addresses.resolve(addr)
            except AddressError as exc:
                raise config.error(name, str(exc)) from None
    if config.Header:
        config.warnings += [config.at("Header", problem) for problem in header.problems(config.Header)]
    _tls_settings(config)
    if config.TransparentProxy == "off" and not config.XClient and config.OutProxyProtocol == "off" \
            and _reaches_beyond_loopback(config.Listen):
        config.warnings.append(config.at(
            "Listen", "%s%s accepts connections from other hosts, and with TransparentProxy, "
            "XClient and OutProxyProtocol off the server sees every client as this host: a "
            "server that relays for this host relays for anyone who reaches this port (listen "
            "on 127.0.0.1, or turn XClient on)"
            % (config.Listen, "" if "Listen" in config.named else " (the default)")))


def _tls_settings(config: Config) -> None:
    """Both or neither of TLSCertificate and TLSKey; ClientTLS and TLSWrapper
    need them; ServerTLS verify needs a name or address to check."""
    for name in ("TLSCertificate", "TLSKey", "TLSCAFile", "FilterTLSCAFile"):
        if not getattr(config, name):
            setattr(config, name, None)
    _filter_tls_settings(config)
    if (config.TLSCertificate is None) != (config.TLSKey is None):
        missing = "TLSKey" if config.TLSKey is None else "TLSCertificate"
        present = "TLSCertificate" if missing == "TLSKey" else "TLSKey"
        raise config.error(present, "needs %s as well (expected the certificate chain and its "
                           "private key, PEM files, both or neither)" % missing)
    if config.ClientTLS is None:
        config.ClientTLS = "may" if config.TLSCertificate else "off"
    if config.TLSCertificate is None:
        if config.ClientTLS != "off":
            raise config.error("ClientTLS", "%s needs TLSCertificate and TLSKey (expected off "
                               "without them)" % config.ClientTLS)
        if config.TLSWrapper:
            raise config.error("TLSWrapper", "on needs TLSCertificate and TLSKey (expected off "
                               "without them)")
    out = config.OutAddress
    if config.ServerTLS == "verify" and config.TransparentProxy == "off" and out is not None \
            and out.is_unix:
        raise config.error("ServerTLS", "verify needs a host name or IP address in OutAddress "
                           "to check the certificate against (expected off, may or encrypt "
                           "with a unix socket)")


def _filter_tls_settings(config: Config) -> None:
    """FilterTLS and FilterTLSCAFile are ServerTLS's and TLSCAFile's unless
    set.  verify needs no check of its own here: FilterType smtp needs a host
    in FilterCommand (_filter_node), the name the node's certificate must match."""
    if config.FilterTLS is None:
        config.FilterTLS = config.ServerTLS
    if config.FilterTLSCAFile is None:
        config.FilterTLSCAFile = config.TLSCAFile
    if config.FilterType != "smtp":
        for name in ("FilterTLS", "FilterTLSCAFile"):
            if name in config.named:
                config.warnings.append(config.at(name, "ignored unless FilterType is smtp"))


def tls_contexts(config: Config) -> None:
    """The certificate, its key and the CA file load (and the key matches)
    now, not at the first client: made once per load."""
    try:
        if config.TLSCertificate is not None:
            config.listening_tls = tls.listening_context(config.TLSCertificate, config.TLSKey)
    except tls.TLSSetupError as exc:
        raise config.error("TLSCertificate", "%s (expected a PEM certificate chain and its "
                           "matching private key%s)" % (exc, _as_reader(config.User))) from None
    try:
        config.connecting_tls = tls.connecting_context(config.ServerTLS, config.TLSCAFile)
        if config.connecting_tls is None and config.TLSCAFile:   # checked even when unused
            tls.connecting_context("may", config.TLSCAFile)
    except tls.TLSSetupError as exc:
        raise config.error("TLSCAFile", "%s (expected a PEM file of CA certificates%s)"
                           % (exc, _as_reader(config.User))) from None
    _filter_tls_context(config)


def _filter_tls_context(config: Config) -> None:
    """The filter node's context: the server leg's when the policy and the CA
    file are the same (FilterTLS unset: as before there was a FilterTLS),
    else one of its own, made here once per load like the others."""
    if (config.FilterTLS, config.FilterTLSCAFile) == (config.ServerTLS, config.TLSCAFile):
        config.filter_tls = config.connecting_tls
        return
    try:
        config.filter_tls = tls.connecting_context(config.FilterTLS, config.FilterTLSCAFile)
        if config.filter_tls is None and config.FilterTLSCAFile:   # checked even when unused
            tls.connecting_context("may", config.FilterTLSCAFile)
    except tls.TLSSetupError as exc:
        raise config.error("FilterTLSCAFile", "%s (expected a PEM file of CA certificates%s)"
                           % (exc, _as_reader(config.User))) from None


def _as_reader(user: str | None) -> str:
    return ", readable by %s for reloads" % user if user else ""


def _filter_node(config: Config) -> None:
    """FilterType smtp: FilterCommand is host[:port] of the filter node."""
    if not config.FilterCommand:
        raise ConfigError(located(config.source, config.lines.get("FilterType"),
                                  "FilterCommand: FilterType smtp needs the filter node's "
                                  "address (expected host[:port])"))
    # The example line from Halon's README has a trailing comment:
    # `FilterCommand: 192.168.0.100 # or 127.0.0.1 for haproxy`
    target = config.FilterCommand.split("#", 1)[0].strip()
    try:
        config.FilterAddress = addresses.parse(target, 25)
    except AddressError as exc:
        raise config.error("FilterCommand", "%s (expected host[:port])" % exc) from None
    if config.FilterAddress.host is None:
        raise config.error("FilterCommand", "a host is needed (expected host[:port])")
    if config.FilterHelo is None:   # the name it says EHLO with to the node
        config.FilterHelo = socket.getfqdn()
        if not addresses.is_hello_name(config.FilterHelo):
            config.warnings.append(config.at("FilterHelo", "the host name %s is no domain name "
                                             "to say EHLO with; saying localhost (set FilterHelo)"
                                             % config.FilterHelo))
            config.FilterHelo = "localhost"


def _reaches_beyond_loopback(addr: Address) -> bool:
    """Whether a Listen address takes connections from other hosts."""
    if addr.is_unix:
        return False
    if addr.host is None:
        return True
    try:
        found = [addr.host] if addresses.is_ip(addr.host) else \
            [sockaddr[0] for _, sockaddr in addresses.resolve(addr, passive=True)]
        return any(not ipaddress.ip_address(ip.split("%", 1)[0]).is_loopback for ip in found)
    except (AddressError, ValueError):
        return True


def load(path: str, required: bool = False) -> Config:
    """Read and validate a config file, and what it needs of this host.  A
    missing file reads as empty unless `required`: the caller warns, and the
    checks fail if a setting was needed."""
    try:
        # utf-8-sig: a byte order mark that an editor on another system put
        # first is not part of the first setting's name
        with open(path, encoding="utf-8-sig", errors="surrogateescape") as handle:
            text = handle.read()
    except FileNotFoundError:
        if required:
            raise ConfigError("configuration file not found: %s" % path) from None
        text = ""
    except OSError as exc:
        raise ConfigError("couldn't open config file: %s: %s" % (path, exc.strerror)) from None
    config = parse(text, path)
    from .hostcheck import check_system  # it checks a Config: imported once one exists
    check_system(config)
    return config
