"""Transfer information files, as git-annex writes them for ``git annex info`` and friends
(``Logs/Transfer.hs``, checked against git-annex 10.20261026).

* transfer info ``annex/transfer/<direction>/<uuid>/<keyfile>`` (+ ``lck.<keyfile>``), and the
  key-wide download lock ``annex/transfer/download/lck/lck.<keyfile>`` (`DOWNLOAD_LOCKS`)
  that git-annex (since 10.20240227) takes for every download into the repository; real
  git-annex-shell answers a PUT with "transfer already in progress" while it is held. That
  lock is taken by `store.Receive`.

Not handled: the failed-transfer log (``annex/transfer/failed``), which is informational.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from git_remote_annexproxy.keys import Key
from git_remote_annexproxy.lockfile import release_exclusive, try_lock_file
from git_remote_annexproxy.storefs import (
    component,
    format_time,
    open_dir,
    unlink_quiet,
    write_atomically,
)

Direction = Literal["upload", "download"]

# Where the key-wide download locks live, relative to GITDIR.
DOWNLOAD_LOCKS = ("annex", "transfer", "download", "lck")


class TransferInProgress(Exception):
    """Another process (or another Receive/transfer here) holds this transfer's lock."""


@contextmanager
def record_transfer(
    gitdir: Path, direction: Direction, remote_uuid: str, key: Key, af: str | None
) -> Iterator[TransferInfo]:
    """Record a running transfer in the repository at `gitdir` (see AnnexStore.transfer).

    Writes ``annex/transfer/<direction>/<remote_uuid>/<keyfile>`` and holds an exclusive
    lock on ``lck.<keyfile>`` beside it (TransferInProgress if already held); both are
    deleted at the end.
    """
    if direction not in ("upload", "download"):
        raise ValueError(f"bad transfer direction {direction!r}")
    try:
        component(remote_uuid)
    except OSError:
        raise ValueError(f"bad remote uuid {remote_uuid[:64]!r}") from None
    kf = key.keyfile()
    dirfd = open_dir(gitdir, ("annex", "transfer", direction, remote_uuid), create=True)
    try:
        lockfd = try_lock_file(dirfd, "lck." + kf, fcntl.F_WRLCK)
        if lockfd is None:
            raise TransferInProgress("transfer already in progress")
        try:
            info = TransferInfo(dirfd, kf, key, af)
            try:
                yield info
            finally:
                unlink_quiet(dirfd, kf)
        finally:
            release_exclusive(dirfd, "lck." + kf, lockfd)
    finally:
        os.close(dirfd)


class TransferInfo:
    """The transfer information file of one running transfer (see `record_transfer`).

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
        write_atomically(
            self._dirfd, self._kf, text.encode("utf-8", "surrogateescape"), durable=False
        )
        self._written = done

    def update(self, bytes_complete: int) -> None:
        """Report progress; the file is rewritten at git-annex's granularity."""
        if bytes_complete - (self._written or 0) >= max(self._step, 1):
            self._write(bytes_complete)
