"""The annex object store of one repository, laid out exactly as git-annex does.

Synchronous and filesystem-only: the p2pstdio server calls it directly, so every call is a
handful of system calls (hashing a resumed partial is the one exception, see `Receive`).
Checked against git-annex 10.20261026 (``Annex/Locations.hs``, ``Annex/Content.hs``,
``Logs/Transfer.hs`` and observation of the binary; ``tests/test_store.py`` is the oracle).
The state kept beside objects has its own modules: content locks and lock retention in
`contentlock`, transfer info in `transferinfo`; the symlink-safe filesystem calls are in
`storefs`, lock files in `lockfile`.

On-disk state handled here, relative to GITDIR (a bare repository, or WORKTREE/.git):

* objects: ``annex/objects/<h1>/<h2>/<keyfile>/<keyfile>``; new objects go to the lower-case
  md5 dirs (``e7d/d01``) in a bare repository and to the mixed-case ones (``J7/0G``)
  otherwise, and both are searched, like git-annex. Object file mode 0444, key directory
  0555 ("frozen"); hash directories are plain (0777 minus umask). The key directory is
  thawed (u+w) for every change in it and frozen again after.
* partial ``annex/tmp/<keyfile>``: its size is the PUT-FROM offset.

Safety rules:

* No symlink under ``annex/`` is ever followed, and nothing is created outside
  ``GITDIR/annex`` (see `storefs`).
* Object commit: write the partial, verify size and hash, fsync it, make it 0444, rename it
  into the key directory, fsync that directory (and any directory just created), and only
  then return True, after which the caller answers SUCCESS and logs the location. A SIGKILL
  at any point leaves either no object or a complete one, plus perhaps a resumable partial.

Not handled: ``core.sharedRepository`` (modes follow the umask, as in an unshared repository)
and ``annex.freezecontent-command`` hooks.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from git_remote_annexproxy.contentlock import (
    RETENTION_SECONDS,
    ContentLocked,
    SharedLocks,
    remove_locked,
    write_retention,
)
from git_remote_annexproxy.keys import Key, Verifier
from git_remote_annexproxy.lockfile import release_exclusive, try_lock_file
from git_remote_annexproxy.storefs import ABSENT, in_thawed, open_dir, open_regular, unlink_quiet
from git_remote_annexproxy.transferinfo import (
    DOWNLOAD_LOCKS,
    Direction,
    TransferInfo,
    TransferInProgress,
    record_transfer,
)

# Part of AnnexStore's interface (raised by its methods, or its arguments), so importable
# from here too.
__all__ = ["AnnexStore", "ContentLocked", "Direction", "Receive", "TransferInProgress"]

_READ_CHUNK = 1 << 20


class AnnexStore:
    """The object store of the repository whose git directory is `gitdir`."""

    def __init__(self, gitdir: Path, *, bare: bool) -> None:
        self.gitdir = Path(gitdir)
        self.bare = bare
        self.annexdir = self.gitdir / "annex"
        self._locks = SharedLocks()  # the content locks this store holds shared

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
        """Open GITDIR/parts... without following a symlink (see `storefs.open_dir`)."""
        return open_dir(self.gitdir, parts, create=create, durable=durable)

    def _find(self, key: Key) -> tuple[int, tuple[str, ...]] | None:
        """The opened key directory holding `key`'s object (a regular file), and its parts."""
        kf = key.keyfile()
        for parts in self._keydirs(key):
            try:
                fd = self._open_dir(parts)
            except OSError as exc:
                if exc.errno in ABSENT:
                    continue
                raise
            try:
                st = os.stat(kf, dir_fd=fd, follow_symlinks=False)
            except OSError as exc:
                os.close(fd)
                if exc.errno in ABSENT:
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
            if exc.errno in ABSENT:
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
            fd = open_regular(dirfd, key.keyfile(), os.O_RDONLY)
        except OSError as exc:
            if exc.errno in ABSENT:
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
                in_thawed(keydir, lambda: os.rename(tmp, kf, src_dir_fd=tmpdir, dst_dir_fd=keydir))
                os.fsync(keydir)
            finally:
                os.close(keydir)
        finally:
            os.close(tmpdir)

    # content locks and retention

    @contextmanager
    def lock_shared(self, key: Key) -> Iterator[Path]:
        """Hold a shared lock on ``<object>.lck`` (LOCKCONTENT; sending takes none).

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
        try:
            with self._locks.hold(dirfd, parts, kf):
                # A remover may have deleted the object between our lookup and our lock.
                if not stat.S_ISREG(os.stat(kf, dir_fd=dirfd, follow_symlinks=False).st_mode):
                    raise FileNotFoundError(errno.ENOENT, "content not present", str(key))
                yield self.gitdir.joinpath(*parts, kf)
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
        until = time.time_ns() + int(seconds * 1e9)
        try:
            write_retention(dirfd, key.keyfile(), until)
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
        try:
            self._locks.clear_retention(dirfd, parts, key.keyfile())
        finally:
            os.close(dirfd)

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
        try:
            if not remove_locked(dirfd, key.keyfile(), proceed):
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

    def transfer(
        self, direction: Direction, remote_uuid: str, key: Key, af: str | None
    ) -> AbstractContextManager[TransferInfo]:
        """Record a running transfer as git-annex does, for ``git annex info`` and friends.

        Writes ``annex/transfer/<direction>/<remote_uuid>/<keyfile>`` and holds an exclusive
        lock on ``lck.<keyfile>`` beside it (TransferInProgress if already held); both are
        deleted at the end. For a download the key-wide lock git-annex also takes
        (``download/lck/lck.<keyfile>``) belongs to the Receive, so wrap a Receive in this:
        ``with store.begin_receive(k) as r, store.transfer("download", uuid, k, af): ...``.
        """
        return record_transfer(self.gitdir, direction, remote_uuid, key, af)


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
        self._lockdir = self._keep(store._open_dir(DOWNLOAD_LOCKS, create=True))
        try:
            lockfd = try_lock_file(self._lockdir, "lck." + self._kf, fcntl.F_WRLCK)
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
            return open_regular(self._tmpdir, self._kf, os.O_RDWR)
        except FileNotFoundError:
            return open_regular(self._tmpdir, self._kf, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        except PermissionError:
            # A partial left read-only (git-annex thaws these too): make it writable
            # through a descriptor, never through the path, which could be swapped.
            fd = open_regular(self._tmpdir, self._kf, os.O_RDONLY)
            try:
                os.fchmod(fd, stat.S_IMODE(os.fstat(fd).st_mode) | stat.S_IWUSR)
            finally:
                os.close(fd)
            return open_regular(self._tmpdir, self._kf, os.O_RDWR)

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
            in_thawed(keydir, lambda: os.rename(kf, kf, src_dir_fd=self._tmpdir, dst_dir_fd=keydir))
            os.fsync(keydir)
        finally:
            os.close(keydir)
        self._close()
        return True

    def discard(self) -> None:
        """Delete the partial and end the receive."""
        if self._open:
            unlink_quiet(self._tmpdir, self._kf)
        self._close()

    def _close(self) -> None:
        self._open = False
        fds, self._fds = self._fds, []
        if hasattr(self, "_lockfd"):
            with suppress(OSError):
                release_exclusive(self._lockdir, "lck." + self._kf, self._lockfd)
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
