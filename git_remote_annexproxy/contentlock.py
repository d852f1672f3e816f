"""Content locks and lock retention of annexed objects, as git-annex keeps them beside the
object in its (frozen) key directory. The store (`store.AnnexStore`) finds the key
directory; everything here works on that opened directory and the key's file name.

* content lock ``<object>.lck`` (v10 repositories): fcntl shared = LOCKCONTENT, exclusive =
  removal; sending content takes none, as in git-annex (see ``PlainSession.get``). The file
  is deleted by whoever ends up holding it exclusively, as git-annex does.
* lock retention ``<object>.rtm`` = POSIX time as git-annex shows it (``1795563163.808174719s``,
  no newline), written atomically under an exclusive lock on ``<object>.rtl``. Removal is
  refused while that time is in the future.

Checked against git-annex 10.20261026 (``Annex/Content.hs``); pre-v10 repositories, which
lock the object file itself, are not handled.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from git_remote_annexproxy.lockfile import (
    delete_lock_file,
    others_hold,
    set_lock,
    try_lock_file,
)
from git_remote_annexproxy.storefs import (
    ABSENT,
    format_time,
    in_thawed,
    open_regular,
    parse_time,
    unlink_quiet,
    write_atomically,
)

RETENTION_SECONDS = 600.0  # what git-annex writes for a LOCKCONTENT (observed: now + 600 s)


class ContentLocked(Exception):
    """The content is locked by someone else, or retained (``.rtm``) until a later time."""


class SharedLocks:
    """The content locks one store holds shared, by key directory.

    clear_retention must tell the store's own lock from other holders' (all OFD locks
    conflict with each other, also within one process).
    """

    def __init__(self) -> None:
        self._held: dict[tuple[str, ...], list[int]] = {}

    @contextmanager
    def hold(self, dirfd: int, parts: tuple[str, ...], kf: str) -> Iterator[None]:
        """Hold a shared lock on ``<kf>.lck`` in the key directory `dirfd` (at `parts`).

        ContentLocked if it is locked for removal. On exit the lock file is deleted if no
        one else holds it, as git-annex does.
        """
        lck = kf + ".lck"
        fd = in_thawed(dirfd, lambda: try_lock_file(dirfd, lck, fcntl.F_RDLCK))
        if fd is None:
            raise ContentLocked("content is locked")
        held = self._held.setdefault(parts, [])
        held.append(fd)
        try:
            yield
        finally:
            held.remove(fd)
            if not held:
                del self._held[parts]
            # The last holder deletes the lock file, as git-annex's lockContentShared
            # does on unlock. Deleting a lock file someone else holds, or is about to
            # take, would leave them locking a file no one else can find; this cannot
            # happen: the conversion to exclusive succeeds only if no one else holds any
            # lock on it, and a process that opened it but has not locked yet finds,
            # once locked, that the name no longer leads to its file (every locker,
            # ours in try_lock_file and git-annex's checkSaneLock, checks) and retries
            # on a fresh one.
            try:
                if set_lock(fd, fcntl.F_WRLCK):
                    in_thawed(dirfd, lambda: delete_lock_file(dirfd, lck, fd))
            finally:
                os.close(fd)

    def clear_retention(self, dirfd: int, parts: tuple[str, ...], kf: str) -> None:
        """Delete ``.rtm``/``.rtl`` on a normal unlock, unless others still hold the lock."""
        if self._held_by_others(dirfd, parts, kf + ".lck"):
            return

        def delete() -> None:
            unlink_quiet(dirfd, kf + ".rtm")
            unlink_quiet(dirfd, kf + ".rtl")

        in_thawed(dirfd, delete)

    def _held_by_others(self, dirfd: int, parts: tuple[str, ...], lck: str) -> bool:
        mine = self._held.get(parts, [])
        if len(mine) > 1:
            return True
        if mine:
            return others_hold(mine[0])
        try:
            fd = open_regular(dirfd, lck, os.O_RDWR)
        except FileNotFoundError:
            return False  # no lock file: no holder
        try:
            return not set_lock(fd, fcntl.F_WRLCK)
        finally:
            os.close(fd)


def write_retention(dirfd: int, kf: str, until: int) -> None:
    """Record in ``<kf>.rtm`` that the object must not be removed before `until` (ns).

    Like git-annex, an existing later time is kept (retention is never shortened).
    """

    def write() -> None:
        rtl = open_regular(dirfd, kf + ".rtl", os.O_RDWR | os.O_CREAT)
        try:
            set_lock(rtl, fcntl.F_WRLCK, wait=True)  # held briefly by any writer
            current = read_retention(dirfd, kf)
            if current is None or current < until:
                write_atomically(dirfd, kf + ".rtm", format_time(until).encode())
        finally:
            os.close(rtl)

    in_thawed(dirfd, write)


def read_retention(dirfd: int, kf: str) -> int | None:
    """The time in ``<object>.rtm`` (ns), or None if there is none or it is unparsable."""
    try:
        fd = open_regular(dirfd, kf + ".rtm", os.O_RDONLY)
    except OSError as exc:
        if exc.errno in ABSENT:
            return None
        raise
    try:
        return parse_time(os.read(fd, 64).decode("ascii", "replace"))
    finally:
        os.close(fd)


def remove_locked(dirfd: int, kf: str, proceed: Callable[[], bool] | None) -> bool:
    """Delete the object `kf` (and its ``.rtm``/``.rtl``) under the exclusive content lock.

    The lock is taken without waiting (ContentLocked if anyone holds it); a retention time
    still in the future refuses with ContentLocked; `proceed`, called with the lock held,
    can still decline (False, nothing removed). The lock file is deleted before unlocking.
    """
    lck = kf + ".lck"

    def attempt() -> bool:
        fd = try_lock_file(dirfd, lck, fcntl.F_WRLCK)
        if fd is None:
            raise ContentLocked("content is locked")
        try:
            # Checked with the lock held: a LOCKCONTENT holder writes its retention
            # while holding the shared lock, so none can appear while we decide.
            until = read_retention(dirfd, kf)
            if until is not None and until > time.time_ns():
                raise ContentLocked(f"content is retained until {format_time(until)}")
            if proceed is not None and not proceed():
                return False
            unlink_quiet(dirfd, kf + ".rtm")
            unlink_quiet(dirfd, kf + ".rtl")
            unlink_quiet(dirfd, kf)
            return True
        finally:
            try:
                delete_lock_file(dirfd, lck, fd)
            finally:
                os.close(fd)

    return in_thawed(dirfd, attempt)
