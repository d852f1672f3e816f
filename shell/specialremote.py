"""A special remote the proxy serves itself: git-annex's chunking and encryption on top of
one storage (``specialstore.py``), with the chunk logs on the proxy's git-annex branch.

Follows git-annex's ``Remote/Helper/Special.hs`` and ``Remote/Helper/Chunked.hs``: content
is split into chunks, each chunk is encrypted on its own and stored under the MAC of its
chunk key; the chunk log is written once every chunk is stored. Readers try every layout
the chunk log records plus unchunked storage (``chunks.layouts``).

Content arrives in a ``Spool``: an anonymous temp file in ``annex/othertmp`` (it has no
name, so nothing is left behind however the process ends). Memory use is bounded by the
piece sizes here, whatever the size of the content.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from git_remote_annexproxy import chunks
from git_remote_annexproxy.branch import AnnexBranch, current_clock
from git_remote_annexproxy.crypto import Cipher, Gpg, GpgProcess, encrypted_key
from git_remote_annexproxy.keys import Key, Verifier
from shell.specialstore import ObjectMissing, SpecialStorage, StorageError

READ_SIZE = 1 << 20
# Chunks encrypted at once when storing: one gpg per core, at most this many.
STORE_JOBS = min(4, os.cpu_count() or 1)
# Named spool files (only where O_TMPFILE is unsupported) exist for microseconds; one
# older than this was left by a process that died in between.
STALE_SPOOL_SECONDS = 60.0
_SPOOL_PREFIX = "annexproxy-spool."


class Spool:
    """An anonymous read-write temp file under ``annexdir/othertmp``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = 0

    @classmethod
    def create(cls, annexdir: Path) -> Spool:
        tmpdir = annexdir / "othertmp"
        tmpdir.mkdir(parents=True, exist_ok=True)
        tmpfile = getattr(os, "O_TMPFILE", 0)
        try:
            if not tmpfile:
                raise OSError(errno.EOPNOTSUPP, "no O_TMPFILE")
            # No name at all: the kernel frees it when the last descriptor closes.
            fd = os.open(tmpdir, tmpfile | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            path = tmpdir / (_SPOOL_PREFIX + secrets.token_hex(8))
            flags = os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(path, flags, 0o600)
            os.unlink(path)
        return cls(fd)

    @staticmethod
    def remove_stale(annexdir: Path) -> None:
        """Remove named spool files a killed process left (see STALE_SPOOL_SECONDS)."""
        tmpdir = annexdir / "othertmp"
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for entry in os.scandir(tmpdir):
                if not entry.name.startswith(_SPOOL_PREFIX):
                    continue
                with contextlib.suppress(OSError):
                    if time.time() - entry.stat(follow_symlinks=False).st_mtime > (
                        STALE_SPOOL_SECONDS
                    ):
                        os.unlink(entry.path)

    def append(self, data: bytes, verifier: Verifier | None = None) -> None:
        """Blocking: run it in a worker thread (hashing releases the GIL)."""
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, self.size)
            self.size += n
            view = view[n:]
        if verifier is not None:
            verifier.update(data)

    async def read_range(self, offset: int, length: int) -> AsyncGenerator[bytes, None]:
        end = offset + length
        while offset < end:
            piece = await trio.to_thread.run_sync(
                os.pread, self.fd, min(READ_SIZE, end - offset), offset
            )
            if not piece:
                raise StorageError("temporary file shorter than expected")
            offset += len(piece)
            yield piece

    def reopen(self) -> int:
        """A descriptor reading the spool from its start (for gpg's stdin). It shares the
        file offset, which the spool itself never uses (pread/pwrite only)."""
        fd = os.dup(self.fd)
        os.lseek(fd, 0, os.SEEK_SET)
        return fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True)
class Encryption:
    cipher: Cipher
    mac: str
    gpg: Gpg
    recipients: tuple[str, ...]  # for a MAC-only cipher: the public keys content goes to

    def object_key(self, key: Key) -> Key:
        return encrypted_key(self.cipher, self.mac, key)

    def encrypt_argv(self) -> Callable[[int | None], list[str]]:
        return lambda fd: self.gpg.encrypt_argv(self.cipher, self.recipients, fd)

    def decrypt_argv(self) -> Callable[[int | None], list[str]]:
        return lambda fd: self.gpg.decrypt_argv(self.cipher, fd)


class SpecialRemote:
    """The git-annex special remote ``uuid``: store, check, remove and read content."""

    def __init__(
        self,
        uuid: str,
        storage: SpecialStorage,
        *,
        chunk_size: int | None,
        encryption: Encryption | None,
        branch: AnnexBranch,
        annexdir: Path,
        timeout: float,
    ) -> None:
        self.uuid = uuid
        self.annexdir = annexdir  # the proxy's: spools go to its othertmp
        self.storage = storage
        self.chunk_size = chunk_size
        self.encryption = encryption
        self.branch = branch
        self.timeout = timeout  # the longest any one step may make no progress

    def object_key(self, key: Key) -> Key:
        return key if self.encryption is None else self.encryption.object_key(key)

    def layouts(self, key: Key) -> list[list[Key]]:
        log = self.branch.read(chunks.chunk_log_path(key))
        return chunks.layouts(key, self.chunk_size, chunks.logged_chunkings(log, self.uuid))

    # --- check and remove ----------------------------------------------------------------

    async def present(self, key: Key) -> bool:
        """Whether some layout is complete (checkPresentChunks). An error is raised only
        if no later layout gives a definite answer."""
        error: StorageError | None = None
        for layout in self.layouts(key):
            try:
                for k in layout:
                    if not await self.storage.present(self.object_key(k)):
                        break
                else:
                    return True
                error = None
            except StorageError as exc:
                error = exc
        if error is not None:
            raise error
        return False

    async def remove(self, key: Key) -> None:
        """Remove every object of every layout, then zero the logged chunk counts."""
        layouts = self.layouts(key)
        for layout in layouts:
            for k in layout:
                await self.storage.remove(self.object_key(k))
        for layout in layouts:
            if layout[0].chunk_size is not None:
                await self._log_chunks(key, layout[0].chunk_size, 0)

    async def _log_chunks(self, key: Key, chunk_size: int, count: int) -> None:
        clock = current_clock()
        await trio.to_thread.run_sync(
            self.branch.change,
            chunks.chunk_log_path(key),
            lambda old: chunks.record_chunks(old, self.uuid, chunk_size, count, clock),
        )

    # --- store -----------------------------------------------------------------------------

    async def store(self, key: Key, spool: Spool) -> None:
        """Store the (verified) content in ``spool``: chunk, encrypt, write, then log.

        Chunks are encrypted and written by up to STORE_JOBS tasks at once (gpg is the
        bottleneck, and one gpg uses one core); the chunk log is written after all of
        them, so their order does not matter.
        """
        length = spool.size
        if self.chunk_size is None or not chunks.is_stable(key):
            await self._store_object(self.object_key(key), spool, 0, length)
            return
        size = self.chunk_size
        keys = chunks.chunk_keys(key, size, chunks.chunk_count(length, size))
        targets = [(i, self.object_key(chunk)) for i, chunk in enumerate(keys)]
        if len(targets) > 1:
            # git-annex's seekResume: keep the leading chunks already there.
            while targets and await self.storage.present(targets[0][1]):
                targets.pop(0)
        todo = iter(targets)  # shared by the workers: each chunk is taken once
        created: list[Key] = []

        async def worker() -> None:
            for i, target in todo:
                await self._store_object(target, spool, i * size, min(size, length - i * size))
                created.append(target)

        try:
            async with trio.open_nursery() as nursery:
                for _ in range(min(STORE_JOBS, len(targets))):
                    nursery.start_soon(worker)
        except BaseException as exc:
            # Never leave a partial set behind; chunks stored earlier by others stay.
            with trio.CancelScope(shield=True), contextlib.suppress(StorageError):
                for target in created:
                    await self.storage.remove(target)
            if isinstance(exc, BaseExceptionGroup):
                raise _first_error(exc) from None
            raise
        await self._log_chunks(key, size, len(keys))

    async def _store_object(self, target: Key, spool: Spool, offset: int, length: int) -> None:
        plain = spool.read_range(offset, length)
        enc = self.encryption
        if enc is None:
            await self.storage.store(target, plain)
            return
        gpg = await GpgProcess.start(
            enc.encrypt_argv(), enc.cipher.passphrase, stdin=None, timeout=self.timeout
        )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_feed, gpg, plain)
                # The storage finalizes the object only after the whole output, and
                # _output raises first if gpg failed: no bad object is ever stored.
                await self.storage.store(target, _output(gpg))
        except BaseExceptionGroup as group:
            # Callers handle one error; when both sides failed, the first says why.
            raise _first_error(group) from None
        finally:
            await gpg.aclose()

    # --- read ------------------------------------------------------------------------------

    async def locate(self, key: Key) -> list[Key]:
        """The layout to read: the first whose first object is there (retrieveChunks)."""
        error: StorageError | None = None
        for layout in self.layouts(key):
            try:
                if await self.storage.present(self.object_key(layout[0])):
                    return layout
            except StorageError as exc:
                error = exc
        raise error or ObjectMissing("content not present in the special remote")

    async def read(self, layout: list[Key], offset: int) -> AsyncGenerator[bytes, None]:
        """The content, from ``offset``: each object retrieved, decrypted and joined.

        Raises StorageError or GpgError (a missing, short or damaged object); callers
        have then received part of the content. Holds no nursery across its yields (gpg
        reads each object from a file), so it is an ordinary async generator.
        """
        skip = offset
        for n, k in enumerate(layout, 1):
            expected = k.chunk_size if k.chunk_size and n < len(layout) else chunks.chunk_length(k)
            if expected is not None and skip >= expected and k.chunk_num is not None:
                skip -= expected  # a whole chunk before the offset: not even fetched
                continue
            got = 0
            async with contextlib.aclosing(self._read_object(self.object_key(k))) as it:
                async for piece in it:
                    got += len(piece)
                    if expected is not None and got > expected:
                        raise StorageError(f"{_which(k)} is longer than it should be")
                    cut = min(skip, len(piece))
                    skip -= cut
                    if cut < len(piece):
                        yield piece[cut:] if cut else piece
            if expected is not None and got != expected:
                raise StorageError(f"{_which(k)} is shorter than it should be")

    async def _read_object(self, target: Key) -> AsyncGenerator[bytes, None]:
        enc = self.encryption
        if enc is None:
            async with contextlib.aclosing(self.storage.retrieve(target)) as it:
                async for piece in it:
                    yield piece
            return
        fd = await self.storage.open_local(target)
        spool: Spool | None = None
        try:
            if fd is None:
                # Not a local file: fetch it whole first (one chunk, on disk) so that gpg
                # can read it from a file and no feeding task is needed here.
                spool = Spool.create(self.annexdir)
                async with contextlib.aclosing(self.storage.retrieve(target)) as it:
                    async for piece in it:
                        await trio.to_thread.run_sync(spool.append, piece)
                fd = spool.reopen()
            gpg = await GpgProcess.start(
                enc.decrypt_argv(), enc.cipher.passphrase, stdin=fd, timeout=self.timeout
            )
            os.close(fd)  # gpg has its own copy
            fd = None
            try:
                while piece := await gpg.receive():
                    yield piece
                await gpg.wait()
            finally:
                await gpg.aclose()
        finally:
            if fd is not None:
                os.close(fd)
            if spool is not None:
                spool.close()


async def _feed(gpg: GpgProcess, data: AsyncGenerator[bytes, None]) -> None:
    async with contextlib.aclosing(data) as it:
        async for piece in it:
            await gpg.send(piece)
    await gpg.end_input()


async def _output(gpg: GpgProcess) -> AsyncGenerator[bytes, None]:
    while piece := await gpg.receive():
        yield piece
    await gpg.wait()


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    leaves: list[BaseException] = []
    todo: list[BaseException] = [group]
    while todo:
        exc = todo.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            todo[:0] = exc.exceptions
        else:
            leaves.append(exc)
    return next((e for e in leaves if not isinstance(e, trio.Cancelled)), leaves[0])


def _which(key: Key) -> str:
    return f"chunk {key.chunk_num}" if key.chunk_num is not None else "the object"
