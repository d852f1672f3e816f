"""The rules of one local repository's annex, whatever the transport: the repository
service.

p2pstdio (shell/p2pserver.py), the node RPC worker (shell/noderpc.py) and any later
transport are adapters: they decode a request, call one method here, and encode what it
returns. Everything a request means for the repository lives here once: the restrictions
(GIT_ANNEX_SHELL_READONLY/APPENDONLY), presence, content locks and their retention,
removal with a deadline checked under the content lock, uploads verified and made durable
before the location log names this repository, downloads under a shared lock, and the
transfer records git-annex keeps beside them.

Synchronous on purpose: each call is a few filesystem operations on one repository, and
an adapter decides when and how to wait on its peer.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import ExitStack, suppress
from typing import BinaryIO

from git_remote_annexproxy.branch import AnnexBranch
from git_remote_annexproxy.keys import Key
from git_remote_annexproxy.store import (
    AnnexStore,
    ContentLocked,
    Direction,
    Receive,
    TransferInProgress,
)
from shell import restrict
from shell.repo import Repo

__all__ = [
    "ContentLocked",
    "Download",
    "Hold",
    "LocationLogError",
    "NotPresent",
    "Refused",
    "RemoveOutcome",
    "RepositoryService",
    "TransferInProgress",
    "Upload",
    "monotonic_seconds",
]


def monotonic_seconds() -> int:
    """git-annex's timestamps: whole seconds of the monotonic clock (seconds since boot on
    Linux), so REMOVE-BEFORE deadlines agree across sessions on the same machine."""
    return int(time.monotonic())


class Refused(Exception):
    """The restrictions forbid the request; the message is git-annex's own. `readonly`:
    refused because the session is read-only (else: append-only and this is a removal)."""

    def __init__(self, message: str, *, readonly: bool) -> None:
        super().__init__(message)
        self.readonly = readonly


class NotPresent(Exception):
    """The content is not here (or vanished while it was being opened)."""


class LocationLogError(OSError):
    """The content was changed on disk but the location log could not be written (a key
    whose journal file name is longer than the filesystem allows, though its object fits):
    the request fails, as git-annex-shell fails a PUT whose log write fails."""


class RemoveOutcome:
    """What `remove` did. Plain constants: no enum import on the session's start-up."""

    REMOVED = "removed"  # removed, and the removal logged
    ABSENT = "absent"  # was not here: nothing to do (a success to the client)
    LOCKED = "locked"  # someone holds it, or its retention time is not over
    TOO_LATE = "too late"  # REMOVE-BEFORE's deadline had passed when the lock was held


class Hold:
    """A content lock held for a client (LOCKCONTENT / the RPC's `lock`), with the
    retention file that keeps the content for a drop proof if we vanish."""

    def __init__(self, service: RepositoryService, key: Key, stack: ExitStack) -> None:
        self._service = service
        self.key = key
        self._stack = stack

    def release(self) -> None:
        """The client unlocked: clear the retention, then drop the lock."""
        with self._stack:
            self._service.store.clear_retention(self.key)

    def abandon(self) -> None:
        """The client vanished: drop the lock, keep the retention file (a drop proof may
        rely on it outliving us)."""
        self._stack.close()


class Upload:
    """One PUT in progress: a partial object that a cut transfer leaves for a resume."""

    def __init__(self, service: RepositoryService, key: Key, receive: Receive,
                 stack: ExitStack) -> None:
        self._service = service
        self.key = key
        self.receive = receive
        self._stack = stack
        self.offset = receive.offset  # what is already here (PUT-FROM)
        self.written = 0  # bytes this upload wrote after the offset

    def fits(self, length: int) -> bool:
        """Can a body of `length` bytes complete the object? (A wrong size is refused
        before anything is written.) Chunk keys name the whole object's size: no check."""
        expected = self._service.expected_size(self.key)
        return expected is None or self.offset + length == expected

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Raises OSError (disk full, EIO, EFBIG past the key's size); the store then has
        kept the intact prefix for a resume (ENOSPC) or dropped it (EIO)."""
        self.receive.write(data)
        self.written += len(data)

    @property
    def complete(self) -> bool:
        expected = self._service.expected_size(self.key)
        return expected is None or self.receive.size >= expected

    def finish(self, *, valid: bool = True) -> bool:
        """Verify, make durable and log: True when the object is stored and this
        repository is in its location log. Raises OSError when it cannot be stored.

        `valid=False` is the sender's INVALID (the file changed while it was sent). As
        git-annex-shell does, the content is verified all the same and stored when it
        verifies (for a key without a hash, when its size is right); only an empty body
        with INVALID ("the sender had nothing") fails at once, leaving the partial alone.
        """
        with self._stack:
            if not valid and self.written == 0:
                return False
            if not self.receive.finish():
                return False
        # Only now, with the object durable on disk, is the location recorded.
        self._service.log(self.key, present=True)
        return True

    def keep(self) -> None:
        """End without storing; the partial stays for a resumed upload."""
        self._stack.close()


class Download:
    """An object open for sending; `close` when done.

    No content lock is held while sending, as git-annex's sendAnnex takes none: a lock
    file made here would stay beside the object when the session is killed mid-transfer
    (sshd or systemd ending it, SIGKILL), and would keep REMOVE out for as long as a
    stalled client holds the GET. Nothing is lost without it: a removal meanwhile unlinks
    the object, but the open file goes on reading the same inode, whole; a change in place
    (an unlocked work-tree file hard-linked to the object) shows in its size or mtime and
    makes the sender say INVALID, as git-annex's inode-cache check does.
    """

    def __init__(self, fh: BinaryIO, offset: int, stack: ExitStack) -> None:
        self.fh = fh
        self.offset = offset
        self._stamp = _stamp(fh)
        self.size = self._stamp[0]
        self.length = max(self.size - offset, 0)
        self._stack = stack

    def changed(self) -> bool:
        """Did the object change while it was sent? (The sender's INVALID.)"""
        return _stamp(self.fh) != self._stamp

    def close(self) -> None:
        self._stack.close()


class RepositoryService:
    """One repository's annex as its clients may use it, under the session's mode."""

    def __init__(
        self,
        repo: Repo,
        *,
        client_uuid: str | None,
        mode: int | None = None,
        clock: Callable[[], int] = monotonic_seconds,
    ) -> None:
        assert repo.uuid is not None
        self.repo = repo
        self.uuid: str = repo.uuid
        self.client_uuid = client_uuid
        self.store = AnnexStore(repo.gitdir, bare=repo.bare)
        self.branch = AnnexBranch(repo.gitdir, repo.annexdir)
        self.mode = restrict.server_mode() if mode is None else mode
        self.clock = clock

    # -- the restrictions ------------------------------------------------------------------

    def check_write(self, *, removal: bool) -> None:
        """Raise Refused when the mode forbids this write (a removal needs read-write)."""
        if self.mode == restrict.Mode.READONLY:
            raise Refused(restrict.READONLY_DENIED, readonly=True)
        if removal and self.mode == restrict.Mode.APPENDONLY:
            raise Refused(restrict.APPENDONLY_DENIED, readonly=False)

    @staticmethod
    def expected_size(key: Key) -> int | None:
        """The object's size as the key names it; None when unknown or when the key is a
        chunk key (its size field is the whole object's)."""
        if key.chunk_size is not None or key.chunk_num is not None:
            return None
        return key.size

    # -- requests --------------------------------------------------------------------------

    def timestamp(self) -> int:
        return self.clock()

    def has(self, key: Key) -> bool:
        return self.store.has(key)

    def hold(self, key: Key) -> Hold:
        """Lock the content for a client. Raises NotPresent, ContentLocked when a removal
        holds it, or OSError when the lock or retention file cannot be made (a key file
        name within 4 bytes of the limit, a read-only store)."""
        if not self.store.has(key):
            raise NotPresent("content not present")
        try:
            with ExitStack() as stack:  # released here unless the Hold takes it over
                stack.enter_context(self.store.lock_shared(key))
                self.store.write_retention(key)
                return Hold(self, key, stack.pop_all())
        except FileNotFoundError:
            raise NotPresent("content not present") from None

    def remove(self, key: Key, *, before: int | None = None) -> str:
        """Remove the content (REMOVE, or REMOVE-BEFORE `before`); a RemoveOutcome.

        The deadline is checked before and again with the exclusive content lock held, so
        it still holds at the moment of removal. Raises Refused, or OSError when the
        filesystem refuses.
        """
        self.check_write(removal=True)
        if not self.store.has(key):
            return RemoveOutcome.ABSENT

        def in_time() -> bool:
            return before is None or self.clock() < before

        if not in_time():
            return RemoveOutcome.TOO_LATE
        try:
            gone = self.store.remove(key, proceed=in_time)
        except ContentLocked:
            return RemoveOutcome.LOCKED
        if not gone:
            return RemoveOutcome.TOO_LATE
        self.log(key, present=False)
        return RemoveOutcome.REMOVED

    def begin_put(self, key: Key, af: str | None) -> Upload | None:
        """Start receiving `key`; None when it is already here (ALREADY-HAVE).

        Raises Refused, TransferInProgress (another upload of the key runs), or OSError
        when the partial cannot be opened (a key too long for a file name, a symlink
        planted at annex/tmp: refused, never followed).
        """
        self.check_write(removal=False)
        if self.store.has(key):
            return None
        with ExitStack() as stack:  # closed here unless the Upload takes it over
            receive = stack.enter_context(self.store.begin_receive(key))
            self._record(stack, "download", key, af)
            return Upload(self, key, receive, stack.pop_all())

    def open_get(self, key: Key, offset: int, af: str | None) -> Download:
        """Open `key` for sending from `offset` (see Download on why no lock). Raises
        NotPresent."""
        try:
            fh = self.store.open_object(key)
        except FileNotFoundError:
            fh = None
        if fh is None:
            raise NotPresent("content not present")
        with ExitStack() as stack:  # closed here unless the Download takes it over
            stack.enter_context(fh)
            self._record(stack, "upload", key, af)
            return Download(fh, offset, stack.pop_all())

    def log(self, key: Key, *, present: bool) -> None:
        """This repository's location log for `key`; LocationLogError if it cannot be
        written."""
        try:
            self.branch.log_presence(key, self.uuid, present=present)
        except OSError as exc:
            raise LocationLogError(
                exc.errno, f"cannot write the location log: {exc.strerror or exc}"
            ) from None

    def commit(self) -> None:
        """Commit the journal to the git-annex branch (at the end of a session)."""
        self.branch.commit()

    # -- helpers ---------------------------------------------------------------------------

    def _record(self, stack: ExitStack, direction: Direction, key: Key, af: str | None) -> None:
        """git-annex's transfer information file for the rest of the request.

        Informational (`git annex info` shows it), so a client UUID that cannot be a file
        name (any non-empty string is a valid CLIENTUUID), a second transfer of the same key
        by the same client, or a filesystem error only leave it unwritten.
        """
        if self.client_uuid is None:
            return
        with suppress(ValueError, OSError, TransferInProgress):
            stack.enter_context(self.store.transfer(direction, self.client_uuid, key, af))


def _stamp(fh: BinaryIO) -> tuple[int, int]:
    """Size and mtime (ns) of an open file: what a change while sending shows in."""
    st = os.fstat(fh.fileno())
    return st.st_size, st.st_mtime_ns
