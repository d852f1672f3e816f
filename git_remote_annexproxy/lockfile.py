"""Lock files as git-annex uses them: whole-file fcntl locks, its checkSaneLock, and the
deletion of a lock file by whoever ends up holding it exclusively.

Locks are Linux open-file-description locks (``F_OFD_SETLK``). They conflict with the
classic fcntl locks git-annex takes, and unlike those they belong to one open file, not to
the process: closing some other descriptor of the same file does not drop them, and two
locks taken in this process conflict like two processes' would.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import sys

from git_remote_annexproxy.storefs import open_regular, unlink_quiet

_OFD = sys.platform == "linux" and struct.calcsize("P") == 8
# struct flock on 64-bit Linux: short l_type, short l_whence, off_t l_start, off_t l_len,
# pid_t l_pid, padded to 32 bytes. Start 0 + length 0 = the whole file, as git-annex locks.
_FLOCK = "hhqqi4x"


def set_lock(fd: int, ltype: int, *, wait: bool = False) -> bool:
    """Take (or convert to) a whole-file lock; False if another holder conflicts."""
    try:
        if sys.platform == "linux" and _OFD:
            cmd = fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK
            fcntl.fcntl(fd, cmd, struct.pack(_FLOCK, ltype, os.SEEK_SET, 0, 0, 0))
        else:  # pragma: no cover - classic per-process locks: a lesser fallback
            op = fcntl.LOCK_EX if ltype == fcntl.F_WRLCK else fcntl.LOCK_SH
            fcntl.lockf(fd, op if wait else op | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in {errno.EAGAIN, errno.EACCES}:
            return False
        raise
    return True


def others_hold(fd: int) -> bool:
    """Does anyone but the lock held through `fd` hold a lock on its file?"""
    if sys.platform == "linux" and _OFD:
        probe = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        ltype = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe))[0]
        return bool(ltype != fcntl.F_UNLCK)
    return True  # pragma: no cover - cannot tell: assume so (retention then just expires)


def same_file(dirfd: int, name: str, fd: int) -> bool:
    """git-annex's checkSaneLock: is `name` still the file we locked through `fd`?

    An unlocker deletes the lock file once it holds it exclusively, so a lock taken on a
    file opened just before that deletion protects nothing.
    """
    try:
        now = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def try_lock_file(dirfd: int, name: str, ltype: int) -> int | None:
    """Create/open the lock file `name` and lock it; the fd, or None if held by another."""
    for _ in range(3):  # a lost race with a deleting unlocker is retried on a fresh file
        fd = open_regular(dirfd, name, os.O_RDWR | os.O_CREAT)
        if not set_lock(fd, ltype):
            os.close(fd)
            return None
        if same_file(dirfd, name, fd):
            return fd
        os.close(fd)
    return None


def delete_lock_file(dirfd: int, name: str, fd: int) -> None:
    """Delete the lock file we hold exclusively through `fd`, before dropping the lock.

    git-annex does the same; it is safe because every locker checks `same_file` after
    locking, so no one can be left holding a lock on the deleted file.
    """
    if same_file(dirfd, name, fd):
        unlink_quiet(dirfd, name)


def release_exclusive(dirfd: int, name: str, fd: int) -> None:
    """Delete the lock file (outside key directories: no thawing needed) and unlock."""
    try:
        delete_lock_file(dirfd, name, fd)
    finally:
        os.close(fd)
