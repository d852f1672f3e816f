"""The annex object store of one repository, laid out and locked exactly as git-annex does.

Synchronous and filesystem-only: the p2pstdio server calls it directly, so every call is a
handful of system calls (hashing a resumed partial is the one exception, see `Receive`).
Checked against git-annex 10.20261026 (``Annex/Locations.hs``, ``Annex/Content.hs``,
``Logs/Transfer.hs`` and observation of the binary; ``tests/test_store.py`` is the oracle).

On-disk state handled here, relative to GITDIR (a bare repository, or WORKTREE/.git):

* objects: ``annex/objects/<h1>/<h2>/<keyfile>/<keyfile>``; new objects go to the lower-case
  md5 dirs (``e7d/d01``) in a bare repository and to the mixed-case ones (``J7/0G``)
  otherwise, and both are searched, like git-annex. Object file mode 0444, key directory
  0555 ("frozen"); hash directories are plain (0777 minus umask). The key directory is
  thawed (u+w) for every change in it and frozen again after.
* content lock ``<object>.lck`` (v10 repositories): fcntl shared = LOCKCONTENT or sending,
  exclusive = removal. The file is deleted by whoever ends up holding it exclusively.
* lock retention ``<object>.rtm`` = POSIX time as git-annex shows it (``1795563163.808174719s``,
  no newline), written atomically under an exclusive lock on ``<object>.rtl``. Removal is
  refused while that time is in the future.
* partial ``annex/tmp/<keyfile>``: its size is the PUT-FROM offset.
* transfer info ``annex/transfer/<direction>/<uuid>/<keyfile>`` (+ ``lck.<keyfile>``), and the
  key-wide download lock ``annex/transfer/download/lck/lck.<keyfile>`` that git-annex (since
  10.20240227) takes for every download into the repository; real git-annex-shell answers a
  PUT with "transfer already in progress" while it is held.

Safety rules:

* Every path is walked from GITDIR one component at a time with ``O_NOFOLLOW`` and the
  ``*at`` calls, so a symlink anywhere under ``annex/`` (a symlinked ``objects`` directory,
  hash directory, key directory, object or partial) is never followed: lookups treat it as
  absent, writes refuse it. Components come only from `Key.keyfile` and `Key.hashdir_*`, and
  are re-checked (`_component`) to be single names, so nothing is created outside
  ``GITDIR/annex``. GITDIR itself is the administrator's path and may contain symlinks.
* Locks are Linux open-file-description locks (``F_OFD_SETLK``). They conflict with the
  classic fcntl locks git-annex takes, and unlike those they belong to one open file, not to
  the process: closing some other descriptor of the same file does not drop them, and two
  locks taken in this process conflict like two processes' would.
* Object commit: write the partial, verify size and hash, fsync it, make it 0444, rename it
  into the key directory, fsync that directory (and any directory just created), and only
  then return True, after which the caller answers SUCCESS and logs the location. A SIGKILL
  at any point leaves either no object or a complete one, plus perhaps a resumable partial.

Not handled: ``core.sharedRepository`` (modes follow the umask, as in an unshared repository),
``annex.freezecontent-command`` hooks, pre-v10 repositories (they lock the object file itself),
and the failed-transfer log (``annex/transfer/failed``), which is informational.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import stat
import struct
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Literal, TypeVar

from git_remote_annexproxy.keys import Key, Verifier

RETENTION_SECONDS = 600.0  # what git-annex writes for a LOCKCONTENT (observed: now + 600 s)

Direction = Literal["upload", "download"]
T = TypeVar("T")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK keeps a FIFO planted in the store from blocking the open; it does nothing to
# regular files, the only kind we go on to use.
_FILE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# errnos meaning "no such object here" on a lookup: ELOOP/ENOTDIR are what O_NOFOLLOW and
# O_DIRECTORY give for a symlink, ENAMETOOLONG is a key too long to be stored at all, and
# EINVAL is our own refusal of an unsafe name or of something that is not a regular file.
_ABSENT = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EINVAL})
_READ_CHUNK = 1 << 20


class ContentLocked(Exception):
    """The content is locked by someone else, or retained (``.rtm``) until a later time."""


class TransferInProgress(Exception):
    """Another process (or another Receive/transfer here) holds this transfer's lock."""


def _component(name: str) -> str:
    """Check that a name built from untrusted input is exactly one path component."""
    if not name or name in {".", ".."} or "/" in name or "\0" in name:
        raise OSError(errno.EINVAL, f"unsafe path component {name[:64]!r}")
    return name


# -- locks -------------------------------------------------------------------------------

_OFD = sys.platform == "linux" and struct.calcsize("P") == 8
# struct flock on 64-bit Linux: short l_type, short l_whence, off_t l_start, off_t l_len,
# pid_t l_pid, padded to 32 bytes. Start 0 + length 0 = the whole file, as git-annex locks.
_FLOCK = "hhqqi4x"


def _lock(fd: int, ltype: int, *, wait: bool = False) -> bool:
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


def _others_hold(fd: int) -> bool:
    """Does anyone but the lock held through `fd` hold a lock on its file?"""
    if sys.platform == "linux" and _OFD:
        probe = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        ltype = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe))[0]
        return bool(ltype != fcntl.F_UNLCK)
    return True  # pragma: no cover - cannot tell: assume so (retention then just expires)


def _open_regular(dirfd: int, name: str, flags: int, mode: int = 0o666) -> int:
    """Open `name` in `dirfd` without following a symlink; refuse anything but a file."""
    fd = os.open(_component(name), flags | _FILE_FLAGS, mode, dir_fd=dirfd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{name[:64]!r} is not a regular file")
    os.set_blocking(fd, True)
    return fd


def _same_file(dirfd: int, name: str, fd: int) -> bool:
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


def _try_lock_file(dirfd: int, name: str, ltype: int) -> int | None:
    """Create/open the lock file `name` and lock it; the fd, or None if held by another."""
    for _ in range(3):  # a lost race with a deleting unlocker is retried on a fresh file
        fd = _open_regular(dirfd, name, os.O_RDWR | os.O_CREAT)
        if not _lock(fd, ltype):
            os.close(fd)
            return None
        if _same_file(dirfd, name, fd):
            return fd
        os.close(fd)
    return None


def _delete_lock_file(dirfd: int, name: str, fd: int) -> None:
    """Delete the lock file we hold exclusively through `fd`, before dropping the lock.

    git-annex does the same; it is safe because every locker checks `_same_file` after
    locking, so no one can be left holding a lock on the deleted file.
    """
    if _same_file(dirfd, name, fd):
        _unlink_quiet(dirfd, name)


def _release_exclusive(dirfd: int, name: str, fd: int) -> None:
    """Delete the lock file (outside key directories: no thawing needed) and unlock."""
    try:
        _delete_lock_file(dirfd, name, fd)
    finally:
        os.close(fd)


def _unlink_quiet(dirfd: int, name: str) -> None:
    with suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dirfd)


# -- frozen key directories --------------------------------------------------------------


@contextmanager
def _thawed(dirfd: int) -> Iterator[None]:
    """Make a key directory writable for the block, then freeze it (a-w) as git-annex does."""
    mode = stat.S_IMODE(os.fstat(dirfd).st_mode)
    if not mode & stat.S_IWUSR:
        os.fchmod(dirfd, mode | stat.S_IWUSR)
    try:
        yield
    finally:
        os.fchmod(dirfd, (mode | stat.S_IWUSR) & ~0o222)


def _in_thawed(dirfd: int, action: Callable[[], T]) -> T:
    """Run `action` (which must be safe to repeat) in the thawed key directory.

    Another process working in the same directory may freeze it again under us (git-annex
    has the same race); the resulting EACCES is retried with a fresh thaw. Root, which
    ignores the modes, never sees it.
    """
    for attempt in range(3):
        with _thawed(dirfd):
            try:
                return action()
            except PermissionError:
                if attempt == 2:
                    raise
    raise AssertionError("unreachable")


# -- retention timestamps ----------------------------------------------------------------

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


# -- the store ---------------------------------------------------------------------------


class AnnexStore:
    """The object store of the repository whose git directory is `gitdir`."""

    def __init__(self, gitdir: Path, *, bare: bool) -> None:
        self.gitdir = Path(gitdir)
        self.bare = bare
        self.annexdir = self.gitdir / "annex"
        # Content locks this store holds shared, by key directory: clear_retention must
        # tell its own lock from other holders' (all OFD locks conflict with each other).
        self._shared: dict[tuple[str, ...], list[int]] = {}

    # paths

    def _keydirs(self, key: Key) -> list[tuple[str, ...]]:
        """Key directory parts in search order; the first is where new objects go."""
        kf = key.keyfile()
        lower = ("annex", "objects", *key.hashdir_lower().split("/"), kf)
        mixed = ("annex", "objects", *key.hashdir_mixed().split("/"), kf)
        return [lower, mixed] if self.bare else [mixed, lower]

    def object_path(self, key: Key) -> Path:
        """Where a new object for `key` goes (lower-case hash dirs if bare, else mixed)."""
        return self.gitdir.joinpath(*self._keydirs(key)[0], key.keyfile())

    def partial_path(self, key: Key) -> Path:
        return self.gitdir.joinpath("annex", "tmp", key.keyfile())

    def _open_dir(
        self, parts: Sequence[str], *, create: bool = False, durable: bool = False
    ) -> int:
        """Open GITDIR/parts... one component at a time, never following a symlink.

        With `create`, missing directories are made (0777 minus umask, as git-annex's
        createAnnexDirectory); with `durable`, each creation is fsynced into its parent.
        """
        fd = os.open(self.gitdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parts:
                _component(part)
                try:
                    sub = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    with suppress(FileExistsError):
                        os.mkdir(part, 0o777, dir_fd=fd)
                        if durable:
                            os.fsync(fd)
                    sub = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = sub
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _find(self, key: Key) -> tuple[int, tuple[str, ...]] | None:
        """The opened key directory holding `key`'s object (a regular file), and its parts."""
        kf = key.keyfile()
        for parts in self._keydirs(key):
            try:
                fd = self._open_dir(parts)
            except OSError as exc:
                if exc.errno in _ABSENT:
                    continue
                raise
            try:
                st = os.stat(kf, dir_fd=fd, follow_symlinks=False)
            except OSError as exc:
                os.close(fd)
                if exc.errno in _ABSENT:
                    continue
                raise
            if stat.S_ISREG(st.st_mode):
                return fd, parts
            os.close(fd)
        return None

    def _keydir(self, key: Key) -> tuple[int, tuple[str, ...]] | None:
        """Where `key`'s lock files live: beside the object, else the default key directory.

        (git-annex's gitAnnexLocation: the existing object's location, else the default.)
        """
        found = self._find(key)
        if found is not None:
            return found
        parts = self._keydirs(key)[0]
        try:
            return self._open_dir(parts), parts
        except OSError as exc:
            if exc.errno in _ABSENT:
                return None
            raise

    # presence and reading

    def find_object(self, key: Key) -> Path | None:
        """The path of `key`'s object if present as a regular file (no symlink on the way)."""
        found = self._find(key)
        if found is None:
            return None
        os.close(found[0])
        return self.gitdir.joinpath(*found[1], key.keyfile())

    def has(self, key: Key) -> bool:
        return self.find_object(key) is not None

    def open_object(self, key: Key) -> BinaryIO | None:
        """`key`'s object opened for reading (O_NOFOLLOW), or None if absent."""
        found = self._find(key)
        if found is None:
            return None
        dirfd, _ = found
        try:
            fd = _open_regular(dirfd, key.keyfile(), os.O_RDONLY)
        except OSError as exc:
            if exc.errno in _ABSENT:
                return None
            raise
        finally:
            os.close(dirfd)
        return open(fd, "rb")

    # receiving

    def begin_receive(self, key: Key) -> Receive:
        """Start (or resume) receiving `key` into ``annex/tmp/<keyfile>``.

        Holds git-annex's key-wide download lock until the Receive is closed, so a second
        receiver of the same key, ours or real git-annex's, is refused with
        TransferInProgress. Raises OSError if the partial is a symlink or not a regular
        file (refused, left for the administrator) or the key is too long for a file name.
        """
        return Receive(self, key)

    def adopt(self, key: Key, src_dirfd: int, src_name: str, fd: int, mtime_ns: int) -> None:
        """Move a work-tree file in as `key`'s object, as ``git annex add`` does (moveAnnex).

        `fd` is the file opened by the caller, who hashed its content through it to make
        `key`, `mtime_ns` its mtime from before the hashing. The file is first renamed into
        ``annex/tmp`` so that no one can open it by its old name any more; it must then
        still be the file behind `fd`, with the key's size and that mtime (git-annex's
        "changed while it was being added" check), else it is moved back and
        OSError(EAGAIN) raised. Then, as in
        `Receive.finish`: fsync, a-w, rename into the key directory, fsync of that
        directory. An object already present is kept and the file simply removed.
        EXDEV (nothing moved) if ``annex/`` is on another filesystem: use begin_receive.
        """
        hashed = os.fstat(fd)
        kf = key.keyfile()
        tmp = f"add-{secrets.token_hex(8)}"
        tmpdir = self._open_dir(("annex", "tmp"), create=True)
        try:
            os.rename(src_name, tmp, src_dir_fd=src_dirfd, dst_dir_fd=tmpdir)
            try:
                now = os.stat(tmp, dir_fd=tmpdir, follow_symlinks=False)
                same = (now.st_dev, now.st_ino) == (hashed.st_dev, hashed.st_ino)
                if not same or (now.st_size, now.st_mtime_ns) != (key.size, mtime_ns):
                    raise OSError(errno.EAGAIN, "changed while it was being added")
                if self.has(key):
                    os.unlink(tmp, dir_fd=tmpdir)
                    return
                os.fsync(fd)
                os.fchmod(fd, stat.S_IMODE(hashed.st_mode) & ~0o222)
                keydir = self._open_dir(self._keydirs(key)[0], create=True, durable=True)
            except BaseException:
                # Back under its name (a link: never over something new that took the name).
                try:
                    os.link(tmp, src_name, src_dir_fd=tmpdir, dst_dir_fd=src_dirfd)
                    os.unlink(tmp, dir_fd=tmpdir)
                except OSError:
                    kept = self.gitdir / "annex" / "tmp" / tmp
                    raise OSError(errno.EEXIST, f"could not be put back: it is {kept}") from None
                raise
            try:
                _in_thawed(keydir, lambda: os.rename(tmp, kf, src_dir_fd=tmpdir, dst_dir_fd=keydir))
                os.fsync(keydir)
            finally:
                os.close(keydir)
        finally:
            os.close(tmpdir)

    # content locks and retention

    @contextmanager
    def lock_shared(self, key: Key) -> Iterator[Path]:
        """Hold a shared lock on ``<object>.lck`` (LOCKCONTENT, or while sending).

        Raises FileNotFoundError if the content is absent (also when it was removed just
        before we got the lock), ContentLocked if it is locked for removal. On exit the
        lock file is deleted if no one else holds it, as git-annex does. Retention is
        separate: see write_retention / clear_retention.
        """
        found = self._find(key)
        if found is None:
            raise FileNotFoundError(errno.ENOENT, "content not present", str(key))
        dirfd, parts = found
        kf = key.keyfile()
        lck = kf + ".lck"
        try:
            fd = _in_thawed(dirfd, lambda: _try_lock_file(dirfd, lck, fcntl.F_RDLCK))
            if fd is None:
                raise ContentLocked("content is locked")
            held = self._shared.setdefault(parts, [])
            held.append(fd)
            try:
                # A remover may have deleted the object between our lookup and our lock.
                if not stat.S_ISREG(os.stat(kf, dir_fd=dirfd, follow_symlinks=False).st_mode):
                    raise FileNotFoundError(errno.ENOENT, "content not present", str(key))
                yield self.gitdir.joinpath(*parts, kf)
            finally:
                held.remove(fd)
                if not held:
                    del self._shared[parts]
                # The last holder (the conversion succeeds) deletes the lock file.
                try:
                    if _lock(fd, fcntl.F_WRLCK):
                        _in_thawed(dirfd, lambda: _delete_lock_file(dirfd, lck, fd))
                finally:
                    os.close(fd)
        finally:
            os.close(dirfd)

    def write_retention(self, key: Key, seconds: float = RETENTION_SECONDS) -> None:
        """Record that `key` must not be removed before now + `seconds` (``<object>.rtm``).

        Like git-annex, an existing later time is kept (retention is never shortened).
        Raises FileNotFoundError if the content is absent.
        """
        found = self._find(key)
        if found is None:
            raise FileNotFoundError(errno.ENOENT, "content not present", str(key))
        dirfd, _ = found
        kf = key.keyfile()
        until = time.time_ns() + int(seconds * 1e9)

        def write() -> None:
            rtl = _open_regular(dirfd, kf + ".rtl", os.O_RDWR | os.O_CREAT)
            try:
                _lock(rtl, fcntl.F_WRLCK, wait=True)  # held briefly by any writer
                current = _read_retention(dirfd, kf)
                if current is None or current < until:
                    _write_atomically(dirfd, kf + ".rtm", format_time(until).encode())
            finally:
                os.close(rtl)

        try:
            _in_thawed(dirfd, write)
        finally:
            os.close(dirfd)

    def clear_retention(self, key: Key) -> None:
        """Delete ``.rtm``/``.rtl`` on a normal unlock, unless others still hold the lock.

        Called by a LOCKCONTENT holder (inside or after lock_shared). Like git-annex, the
        retention is dropped only by the last holder; other holders' own retention writes
        are then lost too, which is git-annex's behaviour.
        """
        located = self._keydir(key)
        if located is None:
            return
        dirfd, parts = located
        kf = key.keyfile()
        try:
            if self._content_lock_held_by_others(dirfd, parts, kf + ".lck"):
                return

            def delete() -> None:
                _unlink_quiet(dirfd, kf + ".rtm")
                _unlink_quiet(dirfd, kf + ".rtl")

            _in_thawed(dirfd, delete)
        finally:
            os.close(dirfd)

    def _content_lock_held_by_others(self, dirfd: int, parts: tuple[str, ...], lck: str) -> bool:
        mine = self._shared.get(parts, [])
        if len(mine) > 1:
            return True
        if mine:
            return _others_hold(mine[0])
        try:
            fd = _open_regular(dirfd, lck, os.O_RDWR)
        except FileNotFoundError:
            return False  # no lock file: no holder
        try:
            return not _lock(fd, fcntl.F_WRLCK)
        finally:
            os.close(fd)

    # removal

    def remove(self, key: Key, *, proceed: Callable[[], bool] | None = None) -> bool:
        """Remove `key`'s object; True if it is gone afterwards (also if never present).

        Takes the exclusive content lock without waiting (ContentLocked if anyone holds
        it), then refuses with ContentLocked if a retention time is still in the future;
        stale ``.rtm``/``.rtl`` are deleted. `proceed`, if given, is called with the lock
        held and can still decline (REMOVE-BEFORE's deadline check): then nothing is
        removed and False is returned. Empty key and hash directories are removed too,
        as git-annex's cleanObjectDirs does.
        """
        found = self._find(key)
        if found is None:
            return True
        dirfd, parts = found
        kf = key.keyfile()
        lck = kf + ".lck"

        def attempt() -> bool:
            fd = _try_lock_file(dirfd, lck, fcntl.F_WRLCK)
            if fd is None:
                raise ContentLocked("content is locked")
            try:
                # Checked with the lock held: a LOCKCONTENT holder writes its retention
                # while holding the shared lock, so none can appear while we decide.
                until = _read_retention(dirfd, kf)
                if until is not None and until > time.time_ns():
                    raise ContentLocked(f"content is retained until {format_time(until)}")
                if proceed is not None and not proceed():
                    return False
                _unlink_quiet(dirfd, kf + ".rtm")
                _unlink_quiet(dirfd, kf + ".rtl")
                _unlink_quiet(dirfd, kf)
                return True
            finally:
                try:
                    _delete_lock_file(dirfd, lck, fd)
                finally:
                    os.close(fd)

        try:
            if not _in_thawed(dirfd, attempt):
                return False
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
        self._prune(parts)
        return True

    def _prune(self, parts: tuple[str, ...]) -> None:
        """Remove the key directory and then its hash directories while they are empty."""
        for depth in range(len(parts) - 1, 1, -1):  # keydir, h2, h1; never annex/objects
            try:
                parent = self._open_dir(parts[:depth])
            except OSError:
                return
            try:
                os.rmdir(parts[depth], dir_fd=parent)
            except OSError:
                return  # not empty (or already gone): stop, like git-annex
            finally:
                os.close(parent)

    # transfer info

    @contextmanager
    def transfer(
        self, direction: Direction, remote_uuid: str, key: Key, af: str | None
    ) -> Iterator[TransferInfo]:
        """Record a running transfer as git-annex does, for ``git annex info`` and friends.

        Writes ``annex/transfer/<direction>/<remote_uuid>/<keyfile>`` and holds an exclusive
        lock on ``lck.<keyfile>`` beside it (TransferInProgress if already held); both are
        deleted at the end. For a download the key-wide lock git-annex also takes
        (``download/lck/lck.<keyfile>``) belongs to the Receive, so wrap a Receive in this:
        ``with store.begin_receive(k) as r, store.transfer("download", uuid, k, af): ...``.
        """
        if direction not in ("upload", "download"):
            raise ValueError(f"bad transfer direction {direction!r}")
        try:
            _component(remote_uuid)
        except OSError:
            raise ValueError(f"bad remote uuid {remote_uuid[:64]!r}") from None
        kf = key.keyfile()
        dirfd = self._open_dir(("annex", "transfer", direction, remote_uuid), create=True)
        try:
            lockfd = _try_lock_file(dirfd, "lck." + kf, fcntl.F_WRLCK)
            if lockfd is None:
                raise TransferInProgress("transfer already in progress")
            try:
                info = TransferInfo(dirfd, kf, key, af)
                try:
                    yield info
                finally:
                    _unlink_quiet(dirfd, kf)
            finally:
                _release_exclusive(dirfd, "lck." + kf, lockfd)
        finally:
            os.close(dirfd)


def _read_retention(dirfd: int, kf: str) -> int | None:
    """The time in ``<object>.rtm`` (ns), or None if there is none or it is unparsable."""
    try:
        fd = _open_regular(dirfd, kf + ".rtm", os.O_RDONLY)
    except OSError as exc:
        if exc.errno in _ABSENT:
            return None
        raise
    try:
        return parse_time(os.read(fd, 64).decode("ascii", "replace"))
    finally:
        os.close(fd)


def _write_atomically(dirfd: int, name: str, data: bytes, *, durable: bool = True) -> None:
    """Replace `name` in `dirfd` by a file holding `data`; readers never see a torn file.

    `durable` fsyncs before the rename: wanted for retention (a drop proof must survive a
    crash), not for transfer info, which only shows progress while a transfer runs.
    """
    # A short temporary name: `name` may already be near NAME_MAX.
    tmp = f".tmp-{secrets.token_hex(8)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _FILE_FLAGS, 0o666, dir_fd=dirfd)
    try:
        try:
            os.write(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
    except BaseException:
        _unlink_quiet(dirfd, tmp)
        raise


class TransferInfo:
    """The transfer information file of one running transfer (see AnnexStore.transfer).

    Format (Logs/Transfer.hs writeTransferInfo, unix): the start time as git-annex shows a
    POSIXTime, then `` <bytes>`` once progress is known, a newline, the associated file (or
    nothing) and a newline: ``1795623533.590384975s 98256\\nsome_dir/big.bin\\n``.
    """

    def __init__(self, dirfd: int, kf: str, key: Key, af: str | None) -> None:
        self._dirfd = dirfd
        self._kf = kf
        self._af = af
        self._started = time.time_ns()
        self._written: int | None = None
        # git-annex rewrites the file only when progress moved by 1% of the size (100 KiB
        # for unsized keys): it is a progress display, not a resume point.
        self._step = key.size // 100 if key.size is not None else 100 * 1024
        self._write(None)

    def _write(self, done: int | None) -> None:
        head = format_time(self._started) + ("" if done is None else f" {done}")
        text = f"{head}\n{self._af or ''}\n"
        _write_atomically(
            self._dirfd, self._kf, text.encode("utf-8", "surrogateescape"), durable=False
        )
        self._written = done

    def update(self, bytes_complete: int) -> None:
        """Report progress; the file is rewritten at git-annex's granularity."""
        if bytes_complete - (self._written or 0) >= max(self._step, 1):
            self._write(bytes_complete)


class Receive:
    """One resumable receive of a key's content into ``annex/tmp/<keyfile>``.

    Use as a context manager. Leaving it without `finish()` or `discard()` keeps the
    partial, so the next PUT resumes at `offset` (a client that went away mid-DATA).
    Errors (all OSError):

    * ENOSPC/EDQUOT while writing: the partial is kept, cut back to the bytes written so
      far, which are intact and resumable;
    * any other write error (EIO...): the partial is deleted, as its contents are suspect;
    * more bytes than the key's size: EFBIG, nothing of that write is written;
    * an error in `finish()` (fsync, rename): the partial is kept; it is complete and is
      verified again when resumed.
    """

    def __init__(self, store: AnnexStore, key: Key) -> None:
        self._store = store
        self.key = key
        self._kf = key.keyfile()
        self._fds: list[int] = []  # closed in reverse order by _close
        self._open = False
        self._lockdir = self._keep(
            store._open_dir(("annex", "transfer", "download", "lck"), create=True)
        )
        try:
            lockfd = _try_lock_file(self._lockdir, "lck." + self._kf, fcntl.F_WRLCK)
            if lockfd is None:
                raise TransferInProgress("transfer already in progress")
            self._lockfd = lockfd
            self._tmpdir = self._keep(store._open_dir(("annex", "tmp"), create=True))
            self._fd = self._keep(self._open_partial())
            size = os.fstat(self._fd).st_size
            if key.size is not None and size > key.size:
                os.ftruncate(self._fd, 0)  # cannot be a prefix of the content
                size = 0
        except BaseException:
            self._close()
            raise
        self.offset = size  # bytes already there: the PUT-FROM offset
        self.size = size  # bytes in the partial now
        self._verifier: Verifier | None = None  # primed with the first `offset` bytes lazily
        self._open = True

    def _keep(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def _open_partial(self) -> int:
        try:
            return _open_regular(self._tmpdir, self._kf, os.O_RDWR)
        except FileNotFoundError:
            return _open_regular(self._tmpdir, self._kf, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        except PermissionError:
            # A partial left read-only (git-annex thaws these too): make it writable
            # through a descriptor, never through the path, which could be swapped.
            fd = _open_regular(self._tmpdir, self._kf, os.O_RDONLY)
            try:
                os.fchmod(fd, stat.S_IMODE(os.fstat(fd).st_mode) | stat.S_IWUSR)
            finally:
                os.close(fd)
            return _open_regular(self._tmpdir, self._kf, os.O_RDWR)

    def _verifier_primed(self) -> Verifier:
        """The content check, fed first with the bytes a previous session left.

        Hashing the old part costs a read of it; it is done on first use rather than in
        begin_receive so that answering PUT-FROM stays quick.
        """
        if self._verifier is None:
            verifier = self.key.verifier()
            pos = 0
            while pos < self.offset:
                chunk = os.pread(self._fd, min(_READ_CHUNK, self.offset - pos), pos)
                if not chunk:
                    break  # shrank under us: the length check in finish() fails
                verifier.update(chunk)
                pos += len(chunk)
            self._verifier = verifier
        return self._verifier

    def _check_open(self) -> None:
        if not self._open:
            raise ValueError("receive already finished or discarded")

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append `data` to the partial (see the class docstring for errors)."""
        self._check_open()
        view = memoryview(data).cast("B")
        if self.key.size is not None and self.size + len(view) > self.key.size:
            raise OSError(errno.EFBIG, "more data than the key's size")
        verifier = self._verifier_primed()
        try:
            while view:
                n = os.pwrite(self._fd, view, self.size)
                verifier.update(view[:n])
                self.size += n
                view = view[n:]
        except OSError as exc:
            if exc.errno in {errno.ENOSPC, errno.EDQUOT}:
                with suppress(OSError):
                    os.ftruncate(self._fd, self.size)  # drop a torn tail, if any
            else:
                with suppress(OSError):
                    self.discard()
            raise

    def finish(self) -> bool:
        """Verify and commit the object. False (partial deleted) if the content is wrong.

        True once the object is durably in place, or if it already was (a concurrent
        receiver won; ours is then discarded).
        """
        self._check_open()
        if not self._verifier_primed().ok():
            self.discard()
            return False
        store, kf = self._store, self._kf
        if store.has(self.key):
            self.discard()
            return True
        os.fsync(self._fd)
        os.fchmod(self._fd, stat.S_IMODE(os.fstat(self._fd).st_mode) & ~0o222)
        keydir = store._open_dir(store._keydirs(self.key)[0], create=True, durable=True)
        try:
            # Replaces nothing but a non-file squatting the name (a planted symlink is
            # replaced, not followed) or a racing identical object.
            _in_thawed(
                keydir, lambda: os.rename(kf, kf, src_dir_fd=self._tmpdir, dst_dir_fd=keydir)
            )
            os.fsync(keydir)
        finally:
            os.close(keydir)
        self._close()
        return True

    def discard(self) -> None:
        """Delete the partial and end the receive."""
        if self._open:
            _unlink_quiet(self._tmpdir, self._kf)
        self._close()

    def _close(self) -> None:
        self._open = False
        fds, self._fds = self._fds, []
        if hasattr(self, "_lockfd"):
            with suppress(OSError):
                _release_exclusive(self._lockdir, "lck." + self._kf, self._lockfd)
            del self._lockfd
        for fd in reversed(fds):
            with suppress(OSError):
                os.close(fd)

    def __enter__(self) -> Receive:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close()
