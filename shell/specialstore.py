"""Where a special remote keeps objects: the storage side of one remote type.

A storage holds opaque objects, each named by a key (for an encrypted remote, the
``GPGHMAC…`` key of an encrypted chunk). Chunking, encryption and the git-annex branch are
the caller's business (``shell/specialremote.py``), so a new remote type (S3 is next)
only implements this interface. Methods are async; blocking filesystem work runs in worker
threads, in pieces of bounded size.

``DirectoryStorage`` is git-annex's ``type=directory`` (``Remote/Directory.hs``): the
object of key K is ``<dir>/<hashdirlower K>/<keyfile K>/<keyfile K>``; reads also look in
the mixed-case hash directory older versions used.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator
from typing import NamedTuple

import trio

from git_remote_annexproxy.keys import Key
from git_remote_annexproxy.specialformat import ObjectMissing, StorageError

__all__ = ["DirectoryStorage", "ObjectMissing", "ObjectStat", "SpecialStorage", "StorageError"]

# Writes are gathered into pieces of this size before a worker thread writes them.
WRITE_SIZE = 1 << 20
READ_SIZE = 1 << 20
# A store in progress writes its temp file at least every node timeout; one untouched for
# this long was left by a process that was killed.
STALE_TMP_SECONDS = 3600.0
_TMP_PREFIX = "annexproxy."


class ObjectStat(NamedTuple):
    """What a storage that presigns uploads (S3) tells of one stored object."""

    size: int
    sha256: str | None  # hex, when the storage reports the object's checksum
    tag: str | None  # the upload tag a presigned URL signed in (see `presign_put`)


class SpecialStorage(ABC):
    """The objects of one special remote."""

    @abstractmethod
    async def store(self, key: Key, data: AsyncIterator[bytes]) -> None:
        """Store the bytes ``data`` yields as ``key``'s object, replacing any old one.
        Atomic: a reader sees the old object or the whole new one, never part of it."""

    @abstractmethod
    def retrieve(self, key: Key) -> AsyncGenerator[bytes, None]:
        """The object's bytes in pieces; raises ObjectMissing if it is not there."""

    async def open_local(self, key: Key) -> int | None:
        """A readable file descriptor of the object when it is a local file (saves a
        copy: gpg reads it directly), else None. Raises ObjectMissing."""
        return None

    async def cleanup(self) -> None:  # noqa: B027 - optional: not every storage has temp files
        """Remove what stores interrupted by a killed process left behind."""

    @abstractmethod
    async def present(self, key: Key) -> bool:
        """Whether the object is there; StorageError if that cannot be known."""

    @abstractmethod
    async def remove(self, key: Key) -> None:
        """Remove the object; success if it was not there (but not if the storage is
        unreachable: it may still hold the object)."""


class CountingStorage(SpecialStorage):
    """Another storage, counting the bytes written to it and read from it (the proxy's
    traffic log). ``inner`` is the storage itself, for what only some types offer."""

    def __init__(self, inner: SpecialStorage) -> None:
        self.inner = inner
        self.written = 0
        self.read = 0

    async def store(self, key: Key, data: AsyncIterator[bytes]) -> None:
        async def counted() -> AsyncIterator[bytes]:
            async for piece in data:
                self.written += len(piece)
                yield piece

        await self.inner.store(key, counted())

    async def retrieve(self, key: Key) -> AsyncGenerator[bytes, None]:
        async with contextlib.aclosing(self.inner.retrieve(key)) as it:
            async for piece in it:
                self.read += len(piece)
                yield piece

    async def open_local(self, key: Key) -> int | None:
        fd = await self.inner.open_local(key)
        if fd is not None:
            self.read += os.fstat(fd).st_size  # whoever gets it reads it whole
        return fd

    async def cleanup(self) -> None:
        await self.inner.cleanup()

    async def present(self, key: Key) -> bool:
        return await self.inner.present(key)

    async def remove(self, key: Key) -> None:
        await self.inner.remove(key)

    async def aclose(self) -> None:
        """Release what the storage holds (S3: idle connections), if it holds anything."""
        close = getattr(self.inner, "aclose", None)
        if close is not None:
            await close()


class DirectoryStorage(SpecialStorage):
    def __init__(self, directory: str) -> None:
        if not directory:
            raise StorageError("missing directory")
        self.directory = os.path.abspath(directory)

    def _dirs(self, key: Key) -> list[str]:
        kf = key.keyfile()
        return [
            os.path.join(self.directory, h, kf) for h in (key.hashdir_lower(), key.hashdir_mixed())
        ]

    def _find(self, key: Key) -> str | None:
        kf = key.keyfile()
        for d in self._dirs(key):
            path = os.path.join(d, kf)
            if os.path.isfile(path):
                return path
        if not os.path.isdir(self.directory):
            raise StorageError(f"directory {self.directory} is not accessible")
        return None

    # --- store --------------------------------------------------------------------------

    async def store(self, key: Key, data: AsyncIterator[bytes]) -> None:
        if not await trio.to_thread.run_sync(os.path.isdir, self.directory):
            raise StorageError(f"directory {self.directory} is not accessible")
        kf = key.keyfile()
        # git-annex writes to tmp/<keyfile>/<keyfile> and renames the directory into place;
        # the random name keeps two concurrent stores of one object apart.
        tmpdir = os.path.join(self.directory, "tmp", _TMP_PREFIX + secrets.token_hex(8))
        try:
            await trio.to_thread.run_sync(os.makedirs, tmpdir)
            await self._write(os.path.join(tmpdir, kf), data)
            await trio.to_thread.run_sync(self._finalize, tmpdir, self._dirs(key)[0])
        except OSError as exc:
            raise StorageError(f"cannot store in {self.directory}: {exc}") from None
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_remove_tree, tmpdir)

    async def _write(self, path: str, data: AsyncIterator[bytes]) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, 0o666)
        try:
            pending = bytearray()
            async for piece in data:
                pending += piece
                if len(pending) >= WRITE_SIZE:
                    await trio.to_thread.run_sync(_write_all, fd, bytes(pending))
                    pending.clear()
            await trio.to_thread.run_sync(_write_all, fd, bytes(pending))
            await trio.to_thread.run_sync(os.fsync, fd)
        finally:
            os.close(fd)

    def _finalize(self, tmpdir: str, dest: str) -> None:
        # Remote/Directory.hs finalizeStoreGeneric: replace the destination directory,
        # then take away write permission as git-annex does.
        _remove_tree(dest)
        parent = os.path.dirname(dest)
        os.makedirs(parent, exist_ok=True)
        os.rename(tmpdir, dest)
        for name in os.listdir(dest):
            _prevent_write(os.path.join(dest, name))
        _prevent_write(dest)
        _fsync_dir(parent)

    async def cleanup(self) -> None:
        await trio.to_thread.run_sync(self._cleanup)

    def _cleanup(self) -> None:
        tmp = os.path.join(self.directory, "tmp")
        try:
            entries = [e for e in os.scandir(tmp) if e.name.startswith(_TMP_PREFIX)]
        except OSError:
            return
        for entry in entries:
            with contextlib.suppress(OSError):
                stamps = [entry.stat(follow_symlinks=False).st_mtime]
                stamps += [e.stat(follow_symlinks=False).st_mtime for e in os.scandir(entry)]
                if time.time() - max(stamps) > STALE_TMP_SECONDS:
                    _remove_tree(entry.path)

    # --- read -----------------------------------------------------------------------------

    async def open_local(self, key: Key) -> int | None:
        path = await trio.to_thread.run_sync(self._find, key)
        if path is None:
            raise ObjectMissing(f"{key} is not in {self.directory}")
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ObjectMissing(f"{key} is not in {self.directory}") from None
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc}") from None

    async def retrieve(self, key: Key) -> AsyncGenerator[bytes, None]:
        fd = await self.open_local(key)
        assert fd is not None
        try:
            while piece := await trio.to_thread.run_sync(os.read, fd, READ_SIZE):
                yield piece
        finally:
            os.close(fd)

    async def present(self, key: Key) -> bool:
        return await trio.to_thread.run_sync(self._find, key) is not None

    # --- remove ---------------------------------------------------------------------------

    async def remove(self, key: Key) -> None:
        try:
            await trio.to_thread.run_sync(self._remove, key)
        except OSError as exc:
            raise StorageError(f"cannot remove from {self.directory}: {exc}") from None

    def _remove(self, key: Key) -> None:
        # Remote/Directory.hs removeDirGeneric: a missing object is fine, a missing
        # top directory is not (the remote is unreachable, not empty).
        if not os.path.isdir(self.directory):
            raise StorageError(f"directory {self.directory} is not accessible")
        for d in self._dirs(key):
            _remove_tree(d)
            # Then empty parent directories up to (not including) the top.
            parent = os.path.dirname(d)
            while parent != self.directory and parent.startswith(self.directory + os.sep):
                try:
                    os.rmdir(parent)
                except OSError:
                    break
                parent = os.path.dirname(parent)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _prevent_write(path: str) -> None:
    with contextlib.suppress(OSError):  # as git-annex: may fail on some filesystems
        mode = os.lstat(path).st_mode
        os.chmod(path, stat.S_IMODE(mode) & ~0o222)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_tree(path: str) -> None:
    """Remove a directory tree that may have lost its write permission; absent is fine."""
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path) or os.path.islink(path):
        os.unlink(path)
        return
    with contextlib.suppress(OSError):
        os.chmod(path, stat.S_IMODE(os.lstat(path).st_mode) | 0o700)
    shutil.rmtree(path)
