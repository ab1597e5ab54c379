"""Dropping root: switch to `User:` keeping only CAP_NET_ADMIN.

CAP_NET_ADMIN is what transparent proxying needs (IP_TRANSPARENT on the
outgoing sockets).  Filters are exec'd by the unprivileged user without
ambient capabilities, so they run with none.
"""

from __future__ import annotations

import os
import pwd

import prctl

from .log import log


class PrivilegeError(Exception):
    """The switch to User: failed; the daemon must not run half-privileged."""


def lookup(user: str) -> pwd.struct_passwd:
    """The passwd entry of a user name or numeric uid."""
    try:
        return pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError("couldn't look up user: %s" % user) from None


def allowed(path: str, user: pwd.struct_passwd | None, write: bool) -> bool:
    """Whether `user` (None: this process) may run `path`, or with `write`
    create files in the directory `path`.  For `user` by the mode bits, as the
    workers will meet them: with that uid, its own group only, and no
    capability that overrides file permissions (ACLs are not consulted)."""
    if user is None:
        return os.access(path, os.X_OK | (os.W_OK if write else 0))
    try:
        st = os.stat(path)
    except OSError:
        return False
    if st.st_uid == user.pw_uid:
        shift = 6
    elif st.st_gid == user.pw_gid:
        shift = 3
    else:
        shift = 0
    needed = 0o3 if write else 0o1
    return (st.st_mode >> shift) & needed == needed


def unreadable(path: str, user: pwd.struct_passwd) -> str | None:
    """Why `user` can't read `path` (the errno text), or None if it can, or if
    this process can't become `user` to find out.  Tried for real, in a child
    that switches as drop() does (that uid, its own group only, no
    capabilities left): directories on the way, ACLs and symbolic links
    count as they will for the master after the switch."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        answer = b""
        try:
            os.close(read_end)
            os.setgroups([user.pw_gid])
            os.setresgid(user.pw_gid, user.pw_gid, user.pw_gid)
            os.setresuid(user.pw_uid, user.pw_uid, user.pw_uid)
        except OSError:
            answer = b"?"
        else:
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                answer = str(exc.errno).encode()
        finally:
            try:
                os.write(write_end, answer)
            finally:
                os._exit(0)
    os.close(write_end)
    try:
        answer = os.read(read_end, 64)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    if not answer or answer == b"?":
        return None
    return os.strerror(int(answer))


def drop(user: str | None) -> None:
    """Become `user` (if given and we are root) with only CAP_NET_ADMIN left."""
    if user and os.geteuid() != 0:
        log.warning("must be started as root to switch to user: %s", user)
    elif user:
        entry = lookup(user)
        try:
            prctl.set_keepcaps(True)
            os.setgroups([entry.pw_gid])
            os.setresgid(entry.pw_gid, entry.pw_gid, entry.pw_gid)
            os.setresuid(entry.pw_uid, entry.pw_uid, entry.pw_uid)
            prctl.set_keepcaps(False)
            prctl.cap_inheritable.limit()
            prctl.cap_permitted.limit(prctl.CAP_NET_ADMIN)
            prctl.cap_effective.limit(prctl.CAP_NET_ADMIN)
            prctl.cap_effective.net_admin = True    # the uid switch cleared it
        except OSError as exc:
            raise PrivilegeError("unable to switch to user: %s (uid %d, gid %d): %s" % (
                user, entry.pw_uid, entry.pw_gid, exc.strerror)) from None
        try:
            os.setreuid(-1, 0)
        except PermissionError:
            pass
        else:
            raise PrivilegeError("unable to completely drop privileges")
        log.debug("switched to user %s (uid %d, gid %d)", user, entry.pw_uid, entry.pw_gid)
    if os.geteuid() == 0:
        log.warning("running as root is NOT recommended")
