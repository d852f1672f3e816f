"""A special remote the proxy serves itself: git-annex's chunking and encryption on top of
one storage (``specialstore.py``), with the chunk logs on the proxy's git-annex branch.

The object format (chunk keys, gpg, MAC'd names, reading back) is the shared one in
``git_remote_annexproxy/specialformat.py``, which the client uses too; this module adds
what only the proxy does: storing several chunks at once, git-annex's resume, the chunk
log, and choosing the layout to read (``chunks.layouts``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncGenerator
from pathlib import Path

import trio

from git_remote_annexproxy import chunks
from git_remote_annexproxy.branch import AnnexBranch, current_clock
from git_remote_annexproxy.keys import Key
from git_remote_annexproxy.specialformat import (
    Encryption,
    Spool,
    first_error,
    max_length,
    object_key,
    plan,
    read_layout,
    read_object,
    write_object,
)
from shell.specialstore import ObjectMissing, SpecialStorage, StorageError

__all__ = ["Encryption", "SpecialRemote", "Spool"]

# Chunks encrypted at once when storing: one per core (gpg, or a worker thread of the
# in-process cipher), at most this many.
STORE_JOBS = min(4, os.cpu_count() or 1)


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
        return object_key(self.encryption, key)

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
                await self.log_chunks(key, layout[0].chunk_size, 0)

    async def log_chunks(self, key: Key, chunk_size: int, count: int) -> None:
        clock = current_clock()
        await trio.to_thread.run_sync(
            self.branch.change,
            chunks.chunk_log_path(key),
            lambda old: chunks.record_chunks(old, self.uuid, chunk_size, count, clock),
        )

    # --- store -----------------------------------------------------------------------------

    async def store(self, key: Key, spool: Spool) -> None:
        """Store the (verified) content in ``spool``: chunk, encrypt, write, then log.

        Chunks are encrypted and written by up to STORE_JOBS tasks at once (encryption
        is the bottleneck, and each uses one core); the chunk log is written after all
        of them, so their order does not matter.

        Every chunk is written, also one already there (git-annex's seekResume keeps
        those): a chunk present but not logged may be anyone's, e.g. a client of our
        extensions that never proved it (``shell/objectserve.py``), and this content was
        verified. A store replaces an object atomically.
        """
        size, pieces = plan(key, spool.size, self.chunk_size)
        targets = [(self.object_key(k), offset, n) for k, offset, n in pieces]
        todo = iter(targets)  # shared by the workers: each chunk is taken once
        created: list[Key] = []

        async def worker() -> None:
            for target, offset, n in todo:
                # (One object: no later failure can make it be removed; no need to ask.)
                fresh = len(targets) == 1 or not await self.storage.present(target)
                await write_object(self.encryption, target, spool.read_range(offset, n),
                                   self.storage.store, self.timeout, length=n)  # fmt: skip
                if fresh:
                    created.append(target)

        try:
            async with trio.open_nursery() as nursery:
                for _ in range(min(STORE_JOBS, len(targets))):
                    nursery.start_soon(worker)
        except BaseException as exc:
            # Never leave a partial set behind; chunks that were there before stay (now
            # with this verified content: they may belong to a layout already logged).
            with trio.CancelScope(shield=True), contextlib.suppress(StorageError):
                for target in created:
                    await self.storage.remove(target)
            if isinstance(exc, BaseExceptionGroup):
                raise first_error(exc) from None
            raise
        if size:
            await self.log_chunks(key, size, len(pieces))

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

    def read(self, layout: list[Key], offset: int) -> AsyncGenerator[bytes, None]:
        """The content, from ``offset``: each object retrieved, decrypted and joined.

        Raises StorageError or GpgError (a missing, short or damaged object); callers
        have then received part of the content."""
        return read_layout(layout, offset, self._read_object)

    def _read_object(self, k: Key) -> AsyncGenerator[bytes, None]:
        return read_object(self.encryption, self.storage, self.object_key(k), self.annexdir,
                           self.timeout, limit=max_length(k))  # fmt: skip
