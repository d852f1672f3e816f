"""The filesystem layer under ``GITDIR/annex``: paths walked without following symlinks,
regular-file opens, atomic small-file writes, frozen (a-w) key directories, and the text
form of the times git-annex writes in its state files.

Used by the object store (`store`), content locks (`contentlock`) and transfer info
(`transferinfo`); synchronous, a handful of system calls per call.

* Every path is walked from GITDIR one component at a time with ``O_NOFOLLOW`` and the
  ``*at`` calls, so a symlink anywhere under ``annex/`` (a symlinked ``objects`` directory,
  hash directory, key directory, object or partial) is never followed: lookups treat it as
  absent, writes refuse it. Components come only from `Key.keyfile` and `Key.hashdir_*`, and
  are re-checked (`component`) to be single names, so nothing is created outside
  ``GITDIR/annex``. GITDIR itself is the administrator's path and may contain symlinks.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK keeps a FIFO planted in the store from blocking the open; it does nothing to
# regular files, the only kind we go on to use.
FILE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# errnos meaning "no such object here" on a lookup: ELOOP/ENOTDIR are what O_NOFOLLOW and
# O_DIRECTORY give for a symlink, ENAMETOOLONG is a key too long to be stored at all, and
# EINVAL is our own refusal of an unsafe name or of something that is not a regular file.
ABSENT = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EINVAL})


def component(name: str) -> str:
    """Check that a name built from untrusted input is exactly one path component."""
    if not name or name in {".", ".."} or "/" in name or "\0" in name:
        raise OSError(errno.EINVAL, f"unsafe path component {name[:64]!r}")
    return name


def open_dir(
    root: Path, parts: Sequence[str], *, create: bool = False, durable: bool = False
) -> int:
    """Open root/parts... one component at a time, never following a symlink.

    With `create`, missing directories are made (0777 minus umask, as git-annex's
    createAnnexDirectory); with `durable`, each creation is fsynced into its parent.
    """
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            component(part)
            try:
                sub = os.open(part, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                with suppress(FileExistsError):
                    os.mkdir(part, 0o777, dir_fd=fd)
                    if durable:
                        os.fsync(fd)
                sub = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = sub
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular(dirfd: int, name: str, flags: int, mode: int = 0o666) -> int:
    """Open `name` in `dirfd` without following a symlink; refuse anything but a file."""
    fd = os.open(component(name), flags | FILE_FLAGS, mode, dir_fd=dirfd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{name[:64]!r} is not a regular file")
    os.set_blocking(fd, True)
    return fd


def unlink_quiet(dirfd: int, name: str) -> None:
    with suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dirfd)


def write_atomically(dirfd: int, name: str, data: bytes, *, durable: bool = True) -> None:
    """Replace `name` in `dirfd` by a file holding `data`; readers never see a torn file.

    `durable` fsyncs before the rename: wanted for retention (a drop proof must survive a
    crash), not for transfer info, which only shows progress while a transfer runs.
    """
    # A short temporary name: `name` may already be near NAME_MAX.
    tmp = f".tmp-{secrets.token_hex(8)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | FILE_FLAGS, 0o666, dir_fd=dirfd)
    try:
        try:
            os.write(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
    except BaseException:
        unlink_quiet(dirfd, tmp)
        raise


# -- frozen key directories --------------------------------------------------------------


@contextmanager
def thawed(dirfd: int) -> Iterator[None]:
    """Make a key directory writable for the block, then freeze it (a-w) as git-annex does."""
    mode = stat.S_IMODE(os.fstat(dirfd).st_mode)
    if not mode & stat.S_IWUSR:
        os.fchmod(dirfd, mode | stat.S_IWUSR)
    try:
        yield
    finally:
        os.fchmod(dirfd, (mode | stat.S_IWUSR) & ~0o222)


def in_thawed(dirfd: int, action: Callable[[], T]) -> T:
    """Run `action` (which must be safe to repeat) in the thawed key directory.

    Another process working in the same directory may freeze it again under us (git-annex
    has the same race); the resulting EACCES is retried with a fresh thaw. Root, which
    ignores the modes, never sees it.
    """
    for attempt in range(3):
        with thawed(dirfd):
            try:
                return action()
            except PermissionError:
                if attempt == 2:
                    raise
    raise AssertionError("unreachable")


# -- times as git-annex writes them ------------------------------------------------------

_TIME = re.compile(r"(\d+)(?:\.(\d+))?s")


def format_time(ns: int) -> str:
    """A POSIX time as Haskell shows a POSIXTime: ``1795563163.808174719s``.

    Trailing zeros of the fraction are dropped (``1.5s``, ``2s``), like Data.Fixed's show.
    """
    seconds, frac = divmod(ns, 10**9)
    digits = f"{frac:09d}".rstrip("0")
    return f"{seconds}.{digits}s" if digits else f"{seconds}s"


def parse_time(text: str) -> int | None:
    """The inverse of `format_time`, in nanoseconds; None if unparsable."""
    m = _TIME.fullmatch(text.strip())
    if m is None:
        return None
    frac = (m.group(2) or "")[:9].ljust(9, "0")
    return int(m.group(1)) * 10**9 + int(frac)
