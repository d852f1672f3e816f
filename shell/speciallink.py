"""The proxy plays a special-remote node itself (p2p-protocol.md §9, "Special-remote nodes").

`SpecialLink` implements the `NodeLink` interface in-process, so the proxy session and the
cluster gateway relay to a special remote exactly as to a repository:

* PUT answers offset 0 (no resume); the DATA goes into a spool in the proxy's
  ``annex/othertmp``, is verified against the key, then stored (``SpecialRemote.store``:
  chunked, encrypted, written, chunk log). Bad content or INVALID -> FAILURE.
* GET streams while retrieving, decrypting and joining when the length is known from the
  key; otherwise the content is spooled first to learn it. A failure after DATA has
  started pads the promised length and answers INVALID, so the session stays usable.
  The content is verified against the key as it goes (from its start, also for a GET
  at an offset): VALID only for content that is the key's, however the objects came to
  be in the storage (a client of our extensions, another writer, a damaged disk).
* CHECKPRESENT and REMOVE act on the remote; LOCKCONTENT fails (special remotes cannot
  lock). Storage and gpg errors become ``ERROR proxied special remote reports: <msg>``.

The location log is the proxy session's business, as for any node; the chunk log is
written here. Every step is bounded by the node timeout *of no progress*: storing a large
file takes as long as it takes, as long as it moves.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from pathlib import Path

import trio

from git_remote_annexproxy.branch import AnnexBranch
from git_remote_annexproxy.chunks import ChunkConfigError, configured_chunk_size
from git_remote_annexproxy.crypto import (
    SHARED,
    SHAREDPUBKEY,
    CryptoConfigError,
    Gpg,
    GpgError,
    StoredCipher,
    mac_name,
    stored_cipher,
)
from git_remote_annexproxy.gitconfig import GitConfig
from git_remote_annexproxy.keys import Key, Verifier
from git_remote_annexproxy.specialformat import load_encryption
from shell.nodelink import (
    MAX_VERSION,
    AlreadyHave,
    Download,
    NodeError,
    NodeLink,
    NodeRefused,
    Outcome,
    Upload,
)
from shell.p2pserver import warn
from shell.proxyselect import Remote
from shell.service.repository import monotonic_seconds
from shell.specialremote import Encryption, SpecialRemote, Spool
from shell.specialstore import CountingStorage, DirectoryStorage, SpecialStorage, StorageError

# Received content is gathered into pieces this large before a worker thread hashes and
# writes them; also the size of the zero padding after a failed GET.
PIECE = 1 << 20
REPORT = "proxied special remote reports: "


def make_storage(
    remote: Remote, fields: dict[str, str], gitdir: Path | None = None,
    timeout: float | None = None,
) -> SpecialStorage:  # fmt: skip
    """The storage of a special remote, by its remote.log ``type=``. A new type is one
    more branch here and a `SpecialStorage` subclass; nothing else changes. ``timeout``
    (the node timeout) bounds each network step of a storage that has them (S3)."""
    kind = fields.get("type")
    if kind == "directory":
        # As in git-annex, the directory is the proxy's own git config, not remote.log.
        directory = remote.config.get("directory")
        if not directory:
            raise NodeError(f"{remote.name}: remote.{remote.name}.annex-directory is not set")
        return DirectoryStorage(directory)
    if kind == "S3":
        from shell.s3storage import S3Storage  # noqa: PLC0415 - only S3 remotes need it

        try:
            return S3Storage.from_remote(remote.uuid, fields, remote.config, gitdir,
                                         timeout=timeout)  # fmt: skip
        except StorageError as exc:
            raise NodeError(f"{remote.name}: {exc}") from None
    raise NodeError(f"{remote.name}: special remote type {kind} is not supported")


class SpecialLink(NodeLink):
    def __init__(
        self, remote: Remote, *, gitdir: Path | None, config: GitConfig | None, timeout: float
    ) -> None:
        super().__init__(remote)
        self.gitdir = gitdir
        self.annexdir = Path(gitdir or ".") / "annex"
        self.config = config or GitConfig()
        self.timeout = timeout
        self.special: SpecialRemote | None = None
        # Set by open. The cipher is decrypted only when a request needs it (_remote), so
        # a session that only moves finished objects (shell/objectserve.py) never does.
        self.storage: CountingStorage | None = None
        self.stored: StoredCipher | None = None
        self.chunk_size: int | None = None
        # Open spools and streams, closed by aclose however the session ends.
        self._spools: set[Spool] = set()
        self._streams: set[AsyncGenerator[bytes, None]] = set()

    # -- setting up --------------------------------------------------------------------------

    async def open(self, version: int | None, bypass: frozenset[str] = frozenset()) -> None:
        gitdir = self.gitdir
        if gitdir is None:
            raise NodeError(f"{self.remote.name}: a special remote needs the proxy's repository")
        fields = self.remote.special or {}
        try:
            self.chunk_size = configured_chunk_size(fields)
            self.stored = stored_cipher(fields)
        except (ChunkConfigError, CryptoConfigError) as exc:
            raise NodeError(f"{self.remote.name}: {exc}") from None
        self.storage = CountingStorage(make_storage(self.remote, fields, gitdir, self.timeout))
        await trio.to_thread.run_sync(Spool.remove_stale, self.annexdir)
        await self.storage.cleanup()
        self.branch = AnnexBranch(gitdir, self.annexdir)
        self.version = 0 if version is None else min(version, MAX_VERSION)

    @property
    def mac(self) -> str | None:
        """The MAC of object names (None: unencrypted remote, objects named by keys)."""
        return None if self.stored is None else mac_name(self.remote.special or {})

    async def _remote(self) -> SpecialRemote:
        if self.special is not None:
            return self.special
        if self.storage is None:
            raise NodeError(f"{self.remote.name}: not open")
        encryption: Encryption | None = None
        if self.stored is not None:
            gpg = Gpg(
                program=self.config.get("gpg.program") or "gpg",
                encrypt_options=tuple((self.remote.get("gnupg-options") or "").split()),
                decrypt_options=tuple((self.remote.get("gnupg-decrypt-options") or "").split()),
            )
            try:
                encryption = await load_encryption(self.remote.special or {}, gpg, self.timeout)
            except (GpgError, CryptoConfigError) as exc:
                raise NodeError(f"{self.remote.name}: {exc}") from None
        self.special = SpecialRemote(
            self.uuid,
            self.storage,
            chunk_size=self.chunk_size,
            encryption=encryption,
            branch=self.branch,
            annexdir=self.annexdir,
            timeout=self.timeout,
        )
        return self.special

    async def encryption(self) -> Encryption | None:
        """The remote's encryption, its cipher decrypted (NodeError if the proxy cannot)."""
        return (await self._remote()).encryption

    async def readable(self) -> bool:
        """Whether the proxy can read back the content of objects a client encrypted and
        stored itself (``shell/objectserve.py`` proves every RECORD that way): always for
        an unencrypted or shared-cipher remote; for hybrid and pubkey when the proxy's
        keyring opens the cipher (it then holds a secret key the content is encrypted
        to); never for sharedpubkey, which needs no secret key to be written to and whose
        content only a secret key opens."""
        if self.stored is None or self.stored.method == SHARED:
            return True
        if self.stored.method == SHAREDPUBKEY:
            return False
        try:
            await self._remote()
        except NodeError:
            return False
        return True

    def _refused(self, exc: Exception) -> NodeRefused:
        return NodeRefused(self.remote.name, REPORT + str(exc))

    # -- requests ------------------------------------------------------------------------------

    async def checkpresent(self, key: Key) -> bool:
        try:
            return await (await self._remote()).present(key)
        except (StorageError, GpgError) as exc:
            raise self._refused(exc) from None

    async def lockcontent(self, key: Key) -> bool:
        return False  # special remotes cannot lock content

    async def unlockcontent(self) -> None:
        pass

    async def remove(self, key: Key, before: int | None) -> Outcome:
        if before is not None and monotonic_seconds() >= before:
            return Outcome(False)
        try:
            await (await self._remote()).remove(key)
        except (StorageError, GpgError, OSError) as exc:
            raise self._refused(exc) from None
        return Outcome(True)

    async def timestamp(self) -> int:
        return monotonic_seconds()

    async def put(self, af: str | None, key: Key) -> Upload | AlreadyHave:
        return _SpecialUpload(self, key)

    async def get(self, offset: int, af: str | None, key: Key) -> Download:
        special = await self._remote()
        try:
            layout = await special.locate(key)
        except (StorageError, GpgError) as exc:
            raise self._refused(exc) from None
        verifier = key.verifier()
        if key.size is not None:
            # Read from the start even for an offset: the key's hash covers all of it.
            length = max(0, key.size - offset)
            stream = self._track(special.read(layout, 0))
            return _SpecialDownload(self, stream, length, verifier=verifier, skip=offset)
        # Unknown length: retrieve it all into a spool first. That may take longer than
        # one request may, so it is bounded per step (as the storing of a PUT) instead.
        spool: Spool | None = None
        try:
            spool = self.new_spool()
            with trio.CancelScope(shield=True):
                async with contextlib.aclosing(special.read(layout, 0)) as content:
                    async for piece in content:
                        await trio.to_thread.run_sync(spool.append, piece, verifier)
        except (StorageError, GpgError, OSError) as exc:
            if spool is not None:
                self.drop_spool(spool)
            raise self._refused(exc) from None
        length = max(0, spool.size - offset)
        stream = self._track(_then_drop(self, spool, spool.read_range(offset, length)))
        download = _SpecialDownload(self, stream, length)
        if not verifier.ok():
            warn(f"  {REPORT}content in the special remote does not verify as {key}")
            download.ok = False
        return download

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            for stream in list(self._streams):
                with contextlib.suppress(Exception):
                    await stream.aclose()
            for spool in list(self._spools):
                self.drop_spool(spool)
            if self.storage is not None:
                with contextlib.suppress(Exception):
                    await self.storage.aclose()

    # -- resources -----------------------------------------------------------------------------

    def new_spool(self) -> Spool:
        spool = Spool.create(self.annexdir)
        self._spools.add(spool)
        return spool

    def drop_spool(self, spool: Spool) -> None:
        spool.close()
        self._spools.discard(spool)

    def _track(self, stream: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
        self._streams.add(stream)
        return stream

    def untrack(self, stream: AsyncGenerator[bytes, None]) -> None:
        self._streams.discard(stream)


async def _then_drop(
    link: SpecialLink, spool: Spool, stream: AsyncGenerator[bytes, None]
) -> AsyncGenerator[bytes, None]:
    try:
        async with contextlib.aclosing(stream) as it:
            async for piece in it:
                yield piece
    finally:
        link.drop_spool(spool)


class _SpecialUpload(Upload):
    """A PUT: the DATA is spooled and hashed as it arrives, stored at `finish`.

    Nothing here fails in the middle of the DATA (the client is still sending it; an
    ERROR now would be read as payload): a spool that cannot be written is remembered and
    reported as the answer to the PUT.
    """

    def __init__(self, link: SpecialLink, key: Key) -> None:
        self.link = link
        self.key = key
        self.offset = 0  # a special remote never resumes
        self.spool: Spool | None = None
        self.verifier: Verifier | None = None
        self.pending = bytearray()
        self.error: OSError | None = None

    async def send_data(self, length: int) -> None:
        if self.key.size is not None and length != self.key.size:
            return  # cannot be the content: not even spooled, and finish says FAILURE
        try:
            self.spool = self.link.new_spool()
        except OSError as exc:
            self.error = exc
            return
        self.verifier = self.key.verifier()

    async def send_piece(self, data: bytes) -> None:
        if self.spool is None:
            return
        self.pending += data
        if len(self.pending) >= PIECE:
            await self._flush()

    async def _flush(self) -> None:
        assert self.spool is not None
        data, self.pending = bytes(self.pending), bytearray()
        try:
            await trio.to_thread.run_sync(self.spool.append, data, self.verifier)
        except OSError as exc:
            self.error = exc
            self._drop()

    def _drop(self) -> None:
        if self.spool is not None:
            self.link.drop_spool(self.spool)
            self.spool = None

    async def finish(self, valid: bool | None) -> Outcome:
        try:
            if self.spool is not None:
                await self._flush()
            if self.error is not None:
                raise self.link._refused(self.error)
            if self.spool is None:
                return Outcome(False)
            assert self.verifier is not None
            if valid is False or not self.verifier.ok():
                warn("  Verification of content failed")
                return Outcome(False)
            # The caller bounds one reply by the node timeout; storing a large file takes
            # longer, and each of its steps is bounded by that timeout instead.
            with trio.CancelScope(shield=True):
                await (await self.link._remote()).store(self.key, self.spool)
            return Outcome(True)
        except (StorageError, GpgError, OSError) as exc:
            raise self.link._refused(exc) from None
        finally:
            self._drop()

    async def data_present(self) -> Outcome:
        return Outcome(await self.link.checkpresent(self.key))


class _SpecialDownload(Download):
    """A GET: exactly ``length`` bytes whatever happens, then the verdict on them.

    With a ``verifier``, ``source`` is the whole content (its first ``skip`` bytes are
    verified, not sent) and the verdict includes the key's check."""

    def __init__(
        self, link: SpecialLink, source: AsyncGenerator[bytes, None], length: int, *,
        verifier: Verifier | None = None, skip: int = 0,
    ) -> None:  # fmt: skip
        self.link = link
        self.source = source
        self.length = length
        self.verifier = verifier
        self.skip = skip
        self.ok = True

    async def pieces(self) -> AsyncGenerator[bytes, None]:
        sent = 0
        skip = self.skip
        try:
            async with contextlib.aclosing(self.source) as it:
                async for data in it:
                    if self.verifier is not None:
                        self.verifier.update(data)
                    cut = min(skip, len(data))
                    skip -= cut
                    piece = data[cut:] if cut else data
                    if not piece:
                        continue
                    if sent + len(piece) > self.length:
                        raise StorageError("content longer than its key's size")
                    sent += len(piece)
                    yield piece
            if self.verifier is not None and not self.verifier.ok():
                raise StorageError("content does not verify against its key")
        except (StorageError, GpgError, OSError) as exc:
            warn(f"  {REPORT}{exc}")
            self.ok = False
        finally:
            self.link.untrack(self.source)
        if sent < self.length:
            # DATA promised this many bytes: keep the framing, and say INVALID after.
            self.ok = False
            while sent < self.length:
                n = min(PIECE, self.length - sent)
                sent += n
                yield bytes(n)

    async def validity(self) -> bool | None:
        return self.ok if self.link.version >= 1 else None

    async def verdict(self, ok: bool) -> None:
        pass
