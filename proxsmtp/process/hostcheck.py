"""What a start needs from this host, beyond valid settings (proxsmtpd.conf(5)).

A configuration can be valid and still fail on every message: a User that
does not exist, a TempDirectory User cannot write, a TLS key only root can
read (a reload reads it again as User), a filter program that is not
there, a pid file in a directory that goes away.  These are checked at
start, by `-t` and on every reload, each failure a ConfigError naming the
setting.
"""

from __future__ import annotations

import grp
import os
import shlex
import shutil
import stat

from . import privileges
from .config import ADD_USER, Config, ConfigError, tls_contexts

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
    tls_contexts(config)
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
    for name in ("TLSCertificate", "TLSKey", "TLSCAFile", "FilterTLSCAFile"):
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


