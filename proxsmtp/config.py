"""proxsmtpd.conf: `Name: Value` lines, validated by a configobj spec.

The file syntax is upstream's (names case-insensitive, `#` comments, blank
lines), which configobj itself cannot read, so lines are split here and the
values validated by configobj's Validator against SPEC below.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from configobj import ConfigObj, flatten_errors
from validate import Validator, ValidateError, VdtValueError

from . import addresses, proxyproto
from .addresses import Address, AddressError
from .proxyproto import Networks

# Every setting: configobj check with its default.  The order is the order of
# the sample config and of the manual page.
SPEC = {
    "OutAddress": "address(default=None)",
    "Listen": "listen_address(default='0.0.0.0:10025')",
    "MaxConnections": "integer(min=2, max=1048576, default=64)",
    "Workers": "integer(min=0, max=256, default=0)",
    "TimeOut": "integer(min=1, default=180)",
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
    "FilterReject": "string(min=1, default='530 Email Rejected')",
    "Header": "string(default=None)",
}

NAMES = {name.lower(): name for name in SPEC}

FLAGS = {"on": True, "yes": True, "true": True, "t": True, "1": True,
         "off": False, "no": False, "false": False, "f": False, "0": False}

FILTER_TYPES = ("pipe", "file", "smtp", "reject")


class ConfigError(Exception):
    """A configuration problem; the program exits 2 with this message."""


@dataclass
class Config:
    """Validated settings, with the names used in the file as attributes."""

    OutAddress: Address | None = None
    Listen: Address = field(default_factory=lambda: Address("0.0.0.0", 10025))
    MaxConnections: int = 64
    Workers: int = 0
    TimeOut: int = 180
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
    FilterReject: str = "530 Email Rejected"
    Header: str | None = None
    FilterAddress: Address | None = None   # FilterCommand parsed, for FilterType smtp
    source: str = ""                       # the file it came from, if any
    named: set[str] = field(default_factory=set)   # settings present in the file
    warnings: list[str] = field(default_factory=list)

    @property
    def skip_authenticated(self) -> bool:
        return self.Skip == "authenticated"

    @property
    def workers(self) -> int:
        return self.Workers or (os.cpu_count() or 1)


def _flag(value: str | None) -> bool:
    try:
        return FLAGS[str(value).strip().lower()]
    except KeyError:
        raise VdtValueError(value) from None


def _transparent(value: str | None) -> str:
    word = str(value).strip().lower()
    if word in ("client", "full"):
        return word
    return "client" if _flag(word) else "off"


def _networks(value: str | None) -> Networks | None:
    if value is None or value == "None" or not str(value).strip():
        return None
    try:
        return proxyproto.parse_networks(str(value))
    except ValueError as exc:
        raise ValidateError("%s; it accepts IP addresses and networks (10.0.0.0/8), "
                            "separated by commas or spaces" % exc) from None


def _out_proxy(value: str | None) -> str:
    word = str(value).strip().lower()
    if word not in ("off", "v1", "v2"):
        raise ValidateError("%s: it accepts off, v1 or v2" % value)
    return word


def _filter_type(value: str | None) -> str:
    word = str(value).strip().lower()
    if word not in FILTER_TYPES:
        raise VdtValueError(value)
    return word


def _skip(value: str | None) -> str | None:
    if value is None or value == "None":
        return None
    if str(value).strip().lower() != "authenticated":
        raise VdtValueError(value)
    return "authenticated"


def _address(value: str | None, default_port: int = 25) -> Address | None:
    if value is None or value == "None":
        return None
    try:
        return addresses.parse(value, default_port)
    except AddressError as exc:
        raise ValidateError(str(exc)) from None


def _listen_address(value: str | None) -> Address:
    return _address(value, 10025)


_VALIDATOR = Validator({"flag": _flag, "transparent": _transparent,
                        "filter_type": _filter_type, "address": _address, "skip": _skip,
                        "listen_address": _listen_address, "networks": _networks,
                        "out_proxy": _out_proxy})


def read_lines(text: str) -> tuple[dict[str, str], dict[str, int]]:
    """Split upstream-syntax lines into {canonical name: value} and line numbers."""
    values: dict[str, str] = {}
    lines: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, value = line.partition(":")
        canonical = NAMES.get(name.strip().lower())
        if not colon or canonical is None:
            raise ConfigError("invalid config line: %s (line %d)" % (line, number))
        values[canonical] = value.strip()
        lines[canonical] = number
    return values, lines


def parse(text: str, source: str = "") -> Config:
    """Validate a config file's text into a Config, or raise ConfigError."""
    values, lines = read_lines(text)

    def where(name: str) -> str:
        return " (line %d)" % lines[name] if name in lines else ""

    spec = ConfigObj(["%s = %s" % item for item in SPEC.items()], list_values=False,
                     _inspec=True)
    checked = ConfigObj(values, configspec=spec, list_values=False, interpolation=False)
    result = checked.validate(_VALIDATOR, preserve_errors=True)
    if result is not True:
        for _, name, error in flatten_errors(checked, result):
            reason = str(error) if isinstance(error, Exception) and str(error) else "invalid value"
            raise ConfigError("invalid setting: %s: %s%s" % (name, reason, where(name)))
    config = Config(source=source, named=set(values), **{name: checked[name] for name in SPEC})
    _finish(config, where)
    return config


def _finish(config: Config, where) -> None:
    """Cross-setting rules and the few values that need more than one check."""
    if config.PidFile == "":
        config.PidFile = None
    if not config.Header:
        config.Header = None
    if config.FilterCommand == "":
        config.FilterCommand = None
    _check_temp_directory(config.TempDirectory, where("TempDirectory"))
    if config.OutAddress is None and config.TransparentProxy == "off":
        raise ConfigError("no OutAddress specified.")
    if config.OutAddress is not None and config.TransparentProxy != "off":
        config.warnings.append(
            "the OutAddress option will be ignored when TransparentProxy is enabled")
    if config.ProxyProtocolFrom is not None and not config.ProxyProtocol:
        config.warnings.append("the ProxyProtocolFrom option is ignored unless ProxyProtocol is on")
    if config.ProxyProtocol and config.TransparentProxy != "off":
        raise ConfigError("invalid setting: ProxyProtocol: can't be on with TransparentProxy: "
                          "behind a load balancer the connection's destination is the "
                          "balancer's, not the one the client chose; use OutAddress%s"
                          % where("ProxyProtocol"))
    if config.FilterType == "smtp":
        if not config.FilterCommand:
            raise ConfigError("FilterType smtp needs FilterCommand: host[:port]")
        # The seed's example line carries a trailing comment: `192.168.0.100 # or ...`
        target = config.FilterCommand.split("#", 1)[0].strip()
        try:
            config.FilterAddress = addresses.parse(target, 25)
        except AddressError as exc:
            raise ConfigError("invalid setting: FilterCommand: %s%s"
                              % (exc, where("FilterCommand"))) from None
        if config.FilterAddress.host is None:
            raise ConfigError("invalid setting: FilterCommand: a host is needed%s"
                              % where("FilterCommand"))
    for name in ("OutAddress", "Listen"):
        addr = getattr(config, name)
        if addr is not None and not addr.is_unix and addr.host is not None \
                and not addresses.is_ip(addr.host):
            try:
                addresses.resolve(addr)
            except AddressError as exc:
                raise ConfigError("invalid setting: %s: %s" % (name, exc)) from None


def _check_temp_directory(path: str, where: str) -> None:
    """Refuse a world-writable TempDirectory without the sticky bit: anyone could
    rename or replace the spooled messages there (between spooling and filtering
    or sending).  A directory that is missing now is only an error per message."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):       # missing, or not a path at all (NUL)
        return
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        raise ConfigError("invalid setting: TempDirectory: %s is world-writable without the "
                          "sticky bit (chmod +t, or use a private directory)%s" % (path, where))


def load(path: str) -> Config:
    """Read and validate a config file.  A missing file reads as empty: the
    caller warns, and the checks above fail if a setting was needed."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as handle:
            text = handle.read()
    except FileNotFoundError:
        text = ""
    except OSError as exc:
        raise ConfigError("couldn't open config file: %s: %s" % (path, exc.strerror)) from None
    return parse(text, path)
