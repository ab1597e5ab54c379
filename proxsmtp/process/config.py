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
import grp
import ipaddress
import os
import re
import shlex
import shutil
import ssl
import stat
from dataclasses import dataclass, field

from configobj import ConfigObj, flatten_errors
from validate import ValidateError, Validator, VdtValueError

from ..message import header
from ..net import addresses, proxyproto, tls
from ..net.addresses import Address, AddressError
from ..net.proxyproto import Networks
from . import privileges

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
    "Header": "string(default=None)",
    "StatsListen": "stats_address(default=None)",

    "TLSCertificate": "string(default=None)",
    "TLSKey": "string(default=None)",
    "ClientTLS": "client_tls(default=None)",
    "TLSWrapper": "flag(default='off')",
    "ServerTLS": "server_tls(default='may')",
    "TLSCAFile": "string(default=None)",
}

NAMES = {name.lower(): name for name in SPEC}

FLAGS = {"on": True, "yes": True, "true": True, "t": True, "1": True,
         "off": False, "no": False, "false": False, "f": False, "0": False}

FILTER_TYPES = ("pipe", "file", "smtp", "reject")

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
    Header: str | None = None
    StatsListen: Address | None = None     # the /metrics endpoint; None: off

    TLSCertificate: str | None = None
    TLSKey: str | None = None
    ClientTLS: str | None = None           # None until _finish: may with a certificate, else off
    TLSWrapper: bool = False
    ServerTLS: str = "may"
    TLSCAFile: str | None = None
    # made from the TLS files by check_system(), once per load (a SIGHUP picks up a
    # renewed certificate)
    listening_tls: ssl.SSLContext | None = field(default=None, compare=False, repr=False)
    connecting_tls: ssl.SSLContext | None = field(default=None, compare=False, repr=False)
    FilterAddress: Address | None = None   # FilterCommand parsed, for FilterType smtp
    source: str = ""                       # the file it came from, if any
    named: set[str] = field(default_factory=set)   # settings present in the file
    lines: dict[str, int] = field(default_factory=dict)   # ...and their line numbers
    warnings: list[str] = field(default_factory=list)

    @property
    def skip_authenticated(self) -> bool:
        return self.Skip == "authenticated"

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


@_check("skip", "authenticated")
def _skip(value: str | None) -> str | None:
    if value is None or value == "None":
        return None
    if str(value).strip().lower() != "authenticated":
        raise VdtValueError(value)
    return "authenticated"


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


def _finish(config: Config) -> None:
    """Cross-setting rules and the few values that need more than one check."""
    if config.PidFile == "":
        config.PidFile = None
    if not config.Header:
        config.Header = None
    if config.FilterCommand == "":
        config.FilterCommand = None
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
    for name in ("TLSCertificate", "TLSKey", "TLSCAFile"):
        if not getattr(config, name):
            setattr(config, name, None)
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


def _tls_contexts(config: Config) -> None:
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


# --- what a start needs from this host ----------------------------------------------

def check_system(config: Config) -> None:
    """The User account, a TempDirectory that User can write, a filter program
    that exists: checked at start, by `-t` and on every reload, so that none
    of them first shows as a 451 on every message."""
    user = None
    if config.User:
        try:
            user = privileges.lookup(config.User)
        except privileges.PrivilegeError as exc:
            raise config.error("User", "%s (expected an existing user name or uid; create one "
                               "with: %s)" % (exc, ADD_USER)) from None
    _check_temp_directory(config, user)
    _tls_contexts(config)
    if user is not None and os.geteuid() == 0:
        _check_tls_files_for(config, user)
    if config.FilterCommand and config.FilterType in ("pipe", "file"):
        program = _missing_program(config.FilterCommand, user)
        if program:
            raise config.error("FilterCommand", "%s: no such program%s (expected a shell "
                               "command)" % (program, _as(config.User)))


def _check_tls_files_for(config: Config, user) -> None:
    """The TLS files must be readable by User, not only by root.  The master
    reads them as root at start, but a reload (SIGHUP) reads them again after
    the switch to User: a key only root can read (certbot writes its keys
    0600 root) would let the start succeed and every later reload fail, so a
    renewed certificate would never be used.  Refused at start and by -t
    alike, -t being what the init script and the systemd unit run before a
    reload."""
    for name in ("TLSCertificate", "TLSKey", "TLSCAFile"):
        path = getattr(config, name)
        if path is None:
            continue
        why = privileges.unreadable(path, user)
        if why:
            raise config.error(name, "%s is not readable by %s (%s): the master reads it again "
                               "as %s on every reload (SIGHUP), so a reload would fail and a "
                               "renewed certificate never be used (expected a file %s can read, "
                               "e.g. with chgrp %s %s; chmod g+r %s)"
                               % (path, config.User, why, config.User, config.User,
                                  _group_name(user.pw_gid), path, path))


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _as(user: str | None) -> str:
    return " that %s may run" % user if user else ""


def _check_temp_directory(config: Config, user) -> None:
    """TempDirectory exists, is a directory, `User` may create files in it, and
    it is not world-writable without the sticky bit (anyone could rename or
    replace the spooled messages there)."""
    path = config.TempDirectory
    try:
        mode = os.stat(path).st_mode
        read_only = os.statvfs(path).f_flag & os.ST_RDONLY
    except FileNotFoundError:
        raise config.error("TempDirectory", "%s does not exist (expected a directory "
                           "%s can write)" % (path, config.User or "proxsmtpd")) from None
    except (OSError, ValueError) as exc:
        raise config.error("TempDirectory", "%s: %s" % (
            path, getattr(exc, "strerror", None) or exc)) from None
    if not stat.S_ISDIR(mode):
        raise config.error("TempDirectory", "%s is not a directory" % path)
    if read_only:
        raise config.error("TempDirectory", "%s is on a read-only file system (under systemd, "
                           "ProtectSystem=strict: add it to ReadWritePaths=)" % path)
    if not privileges.allowed(path, user, write=True):
        raise config.error("TempDirectory", "%s is not writable by %s" % (
            path, config.User or "this user"))
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        raise config.error("TempDirectory", "%s is world-writable without the sticky bit "
                           "(chmod +t, or use a private directory)" % path)


# Words a shell command may start with that are not a program to look for.
_SHELL_WORDS = frozenset(
    "! { } [ [[ . : alias bg break case cd command continue do done echo elif else esac "
    "eval exec exit export false fg fi for function getopts hash if in jobs kill local "
    "printf pwd read readonly return select set shift source test then time times trap "
    "true type ulimit umask unalias unset until wait while".split())


def _missing_program(command: str, user) -> str | None:
    """The program a filter command starts with, if it clearly is not there
    (or `user` may not run it); None when it is, or when the shell decides."""
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    if not words:
        return None
    first = words[0]
    if first in _SHELL_WORDS or "=" in first or any(c in first for c in "$`*?()[]{};|&<>~"):
        return None
    path = first if "/" in first else shutil.which(first)
    if path and os.path.isfile(path) and privileges.allowed(path, user, write=False):
        return None
    return first


def check_pid_file(path: str, config: Config, setting: str) -> None:
    """The pid file's directory exists: the daemon writes it after binding.

    Started as root with `User:`, the master writes the file as root but is
    `User` at exit: where `User` may not write the directory (root's /run),
    it can only empty the file, and an empty pid file stays behind.  Said at
    start and by -t (`setting` names where the path came from), unless the
    directory is a systemd RuntimeDirectory=, which systemd removes at stop."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ConfigError("couldn't write pid file %s: no such directory: %s" % (path, directory))
    if not config.User or os.geteuid() != 0:
        return
    try:
        user = privileges.lookup(config.User)
    except privileges.PrivilegeError:
        return      # check_system() refused it already
    if privileges.allowed(directory, user, write=True) or _systemd_runtime_directory(directory):
        return
    text = ("%s is in %s, not writable by User %s: at exit the daemon, no longer root, can "
            "only empty the file, not remove it (expected a directory %s may write, such as "
            "/run/proxsmtpd/: install -d -m 0755 -o %s /run/proxsmtpd)"
            % (path, directory, config.User, config.User, config.User))
    config.warnings.append(config.at("PidFile", text) if setting == "PidFile"
                           else "%s %s" % (setting, text))


def _systemd_runtime_directory(directory: str) -> bool:
    """Whether `directory` is one systemd made for this service with
    RuntimeDirectory= ($RUNTIME_DIRECTORY, systemd.exec(5)) and removes once
    it has stopped."""
    made = os.environ.get("RUNTIME_DIRECTORY", "")
    real = os.path.realpath(directory)
    return any(os.path.realpath(entry) == real for entry in made.split(":") if entry)


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
    check_system(config)
    return config
