"""git-annex's special-remote object format: chunk, encrypt, name, read back. One copy,
used by the proxy (``shell/specialremote.py``, content it received in a PUT) and by the
client (``objectclient.py``, which encrypts before anything leaves the machine).

Follows ``Remote/Helper/Special.hs`` and ``Remote/Helper/Chunked.hs``: content is split
into chunks (``chunks.py``), each chunk is encrypted on its own and stored under the MAC of
its chunk key. Where the objects go is the caller's: a storage on the proxy, the P2P
extension on the client.

Encryption with a passphrase (``encryption=shared`` and ``hybrid``) is done in-process in
the OpenPGP format gpg uses (``openpgpsym.py``), without a gpg process per object: what it
writes, git-annex's gpg reads, and it reads what gpg writes. A decrypted object is kept
aside (in memory up to ``MEMORY_PLAINTEXT``, else in a spool) until its MDC has matched,
and only then given out. An object the in-process reader does not handle (a public-key
encrypted one, AEAD, an unknown algorithm) goes to gpg, with the reason in the debug
output (``ANNEXPROXY_DEBUG``); a damaged one is refused. Content encrypted to public keys
(``pubkey``, ``sharedpubkey``), and every remote with ``annex-gnupg-options`` (for
writing) or ``annex-gnupg-decrypt-options`` (for reading), keep running gpg exactly as
git-annex does (``crypto.py``).

``Spool`` is an anonymous temp file in ``annex/othertmp`` (no name: nothing is left behind
however the process ends); memory use is bounded by the piece sizes here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import trio

from git_remote_annexproxy import chunks
from git_remote_annexproxy.crypto import (
    MACS,
    Cipher,
    Gpg,
    GpgError,
    GpgProcess,
    decrypt_cipher,
    encrypted_key,
    mac_name,
    recipients,
    stored_cipher,
)
from git_remote_annexproxy.keys import BadKey, Key
from git_remote_annexproxy.openpgp import S2K, S2K_ITERATED, OpenPGPError, Unsupported, decode_count

if TYPE_CHECKING:
    from git_remote_annexproxy.openpgpsym import Decryptor

READ_SIZE = 1 << 20
# A decrypted object up to this size waits for its MDC in memory, a larger one in a spool.
MEMORY_PLAINTEXT = 8 << 20
# Set (non-empty) in the environment: debug lines on stderr (why gpg was run, for one).
DEBUG_VARIABLE = "ANNEXPROXY_DEBUG"
# Named spool files (only where O_TMPFILE is unsupported) exist for microseconds; one
# older than this was left by a process that died in between.
STALE_SPOOL_SECONDS = 60.0
_SPOOL_PREFIX = "annexproxy-spool."


class StorageError(Exception):
    """The storage failed or cannot be reached; the message is for the user."""


class ObjectMissing(StorageError):
    """The object is not in the storage."""


class ObjectCryptError(GpgError):
    """The in-process OpenPGP code refused an object (damaged, truncated, or not this
    cipher's) or could not encrypt one; handled wherever a gpg failure is."""


def debug(message: str) -> None:
    if os.environ.get(DEBUG_VARIABLE):
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write(f"annexproxy debug: {message}\n")
            sys.stderr.flush()


# --- spools -----------------------------------------------------------------------------------


class Spool:
    """A read-write file read and written only with pread/pwrite: an anonymous temp file
    under ``annexdir/othertmp`` (``create``), or any open file (``Spool(fd, size)``)."""

    def __init__(self, fd: int, size: int = 0) -> None:
        self.fd = fd
        self.size = size

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

    def append(
        self, data: bytes | bytearray | memoryview, verifier: _Updatable | None = None
    ) -> None:
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


class _Updatable(Protocol):
    def update(self, data: bytes | bytearray | memoryview, /) -> None: ...


# --- encryption -------------------------------------------------------------------------------


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

    @property
    def writes_in_process(self) -> bool:
        """Content is encrypted here, not by gpg: a passphrase, and no gpg options to
        honour (the admin asked for gpg's behaviour with ``annex-gnupg-options``)."""
        return not self.cipher.mac_only and not self.gpg.encrypt_options

    @property
    def reads_in_process(self) -> bool:
        """Content is decrypted here first (gpg only for what this cannot read)."""
        return not self.cipher.mac_only and not self.gpg.decrypt_options


async def load_encryption(fields: dict[str, str], gpg: Gpg, timeout: float) -> Encryption | None:
    """The remote's encryption from its remote.log fields (None: unencrypted). Decrypting a
    hybrid or pubkey cipher runs gpg with the caller's keyring (GpgError if it cannot).
    Raises CryptoConfigError for unusable settings."""
    stored = stored_cipher(fields)
    if stored is None:
        return None
    cipher = await trio.to_thread.run_sync(decrypt_cipher, gpg, stored, timeout)
    return Encryption(cipher, mac_name(fields), gpg, recipients(stored))


def object_key(enc: Encryption | None, key: Key) -> Key:
    return key if enc is None else enc.object_key(key)


# --- object names -----------------------------------------------------------------------------

_HEX_LENGTH = {"sha1": 40, "sha224": 56, "sha256": 64, "sha384": 96, "sha512": 128}
_CONTROL_RE = re.compile("[\x00-\x20\x7f]")


def object_name(name: str, mac: str | None) -> Key | None:
    """The object ``name`` a peer sent, if it is one this remote can hold, else None.

    Encrypted remote (``mac`` set): exactly ``GPG<mac>--<hex>`` with the remote's MAC and
    that MAC's digest length, lowercase. Unencrypted: a key (or chunk key) printed as
    git-annex prints it, without spaces or control characters. Either way the storage maps
    it to one file name (``Key.keyfile`` escapes ``/``), never to a path of the peer's, and
    a name with a ``.`` or ``..`` path segment is refused (an S3 URL's path holds it as is).
    """
    if mac is not None:
        m = re.fullmatch(r"GPG(HMACSHA[0-9]+)--([0-9a-f]+)", name)
        if m is None or m.group(1) != mac or mac not in MACS:
            return None
        if len(m.group(2)) != _HEX_LENGTH[MACS[mac]]:
            return None
        return Key("GPG" + mac, m.group(2))
    if _CONTROL_RE.search(name):
        return None
    try:
        key = Key.parse(name)
    except BadKey:
        return None
    if key.canonical() != name or key.backend.startswith("GPGHMAC"):
        return None
    if dot_segment(name):
        return None
    return key


def dot_segment(name: str) -> bool:
    """Whether object ``name`` has a ``.`` or ``..`` path segment. A key may hold "/" (URL
    keys); an S3 object name is the key itself, and a URL path with such a segment could
    be resolved by an HTTP library or a proxy in front of the storage into another object
    or bucket. The one rule for every path to a storage (``object_name`` for the
    extensions, ``shell/s3storage.py`` for every S3 request)."""
    return bool({".", ".."} & set(name.split("/")))


# --- writing ----------------------------------------------------------------------------------

ObjectWriter = Callable[[Key, AsyncIterator[bytes]], Awaitable[None]]


def plan(key: Key, length: int, chunk_size: int | None) -> tuple[int, list[tuple[Key, int, int]]]:
    """How ``key``'s ``length`` bytes are stored: (chunk size or 0, [(key of the piece,
    offset, length)]). Unchunked when the remote is, or the key is not stable."""
    if chunk_size is None or not chunks.is_stable(key):
        return 0, [(key.without_chunk(), 0, length)]
    keys = chunks.chunk_keys(key, chunk_size, chunks.chunk_count(length, chunk_size))
    pieces = [(k, i * chunk_size, min(chunk_size, length - i * chunk_size)) for i, k in
              enumerate(keys)]  # fmt: skip
    return chunk_size, pieces


async def write_object(
    enc: Encryption | None,
    target: Key,
    plain: AsyncGenerator[bytes, None],
    store: ObjectWriter,
    timeout: float,
    *,
    length: int | None = None,
) -> None:
    """Hand ``store`` the object ``target``: ``plain`` itself, or its encryption.
    ``length``, when known, is how long ``plain`` is (then checked)."""
    if enc is None:
        await store(target, plain)
        return
    if enc.writes_in_process:
        await store(target, _sealed(enc, plain, length))
        return
    gpg = await GpgProcess.start(enc.encrypt_argv(), enc.cipher.passphrase, stdin=None,
                                 timeout=timeout)  # fmt: skip
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_feed, gpg, plain)
            # `store` finalizes the object only after the whole output, and _output
            # raises first if gpg failed: no bad object is ever stored.
            await store(target, _output(gpg))
    except BaseExceptionGroup as group:
        # Callers handle one error; when both sides failed, the first says why.
        raise first_error(group) from None
    finally:
        await gpg.aclose()


async def _sealed(
    enc: Encryption, plain: AsyncGenerator[bytes, None], length: int | None
) -> AsyncGenerator[bytes, None]:
    """The object's bytes, encrypted in worker threads (the cipher releases the GIL). An
    error raises before the last piece, so ``store`` never finalizes a bad object."""
    from git_remote_annexproxy.openpgpsym import Encryptor  # noqa: PLC0415 - cryptography

    passphrase = enc.cipher.passphrase
    assert passphrase is not None
    encryptor = Encryptor(passphrase, length)
    try:
        yield encryptor.start()
        async with contextlib.aclosing(plain) as it:
            async for piece in it:
                if out := await trio.to_thread.run_sync(encryptor.update, piece):
                    yield out
        yield encryptor.finish()
    except OpenPGPError as exc:
        raise ObjectCryptError(f"cannot encrypt: {exc}") from None


async def _feed(gpg: GpgProcess, data: AsyncGenerator[bytes, None]) -> None:
    async with contextlib.aclosing(data) as it:
        async for piece in it:
            await gpg.send(piece)
    await gpg.end_input()


async def _output(gpg: GpgProcess) -> AsyncGenerator[bytes, None]:
    while piece := await gpg.receive():
        yield piece
    await gpg.wait()


# --- reading ----------------------------------------------------------------------------------


class ObjectSource(Protocol):
    """Where stored objects are read from (a ``SpecialStorage`` is one)."""

    async def open_local(self, key: Key) -> int | None: ...

    def retrieve(self, key: Key) -> AsyncGenerator[bytes, None]: ...


async def read_object(
    enc: Encryption | None,
    source: ObjectSource,
    target: Key,
    annexdir: Path,
    timeout: float,
    *,
    limit: int | None = None,
) -> AsyncGenerator[bytes, None]:
    """The plaintext of the stored object ``target``. Holds no nursery across its yields
    (gpg reads the object from a file), so it is an ordinary async generator.

    Decrypted in-process, it yields nothing before the whole object is decrypted and its
    MDC matched; ``limit`` (the most plaintext the object may hold) stops a longer one
    early. Raises StorageError or GpgError (ObjectCryptError: refused here)."""
    if enc is None:
        async with contextlib.aclosing(source.retrieve(target)) as it:
            async for piece in it:
                yield piece
        return
    if enc.reads_in_process:
        try:
            plain = await _decrypt(enc, source, target, annexdir, limit)
        except Unsupported as exc:
            debug(f"{target}: {exc}: decrypting it with gpg")
        else:
            try:
                async with contextlib.aclosing(plain.pieces()) as it:
                    async for piece in it:
                        yield piece
            finally:
                plain.close()
            return
    async with contextlib.aclosing(_gpg_read(enc, source, target, annexdir, timeout)) as it:
        async for piece in it:
            yield piece


async def _gpg_read(
    enc: Encryption, source: ObjectSource, target: Key, annexdir: Path, timeout: float
) -> AsyncGenerator[bytes, None]:
    fd = await source.open_local(target)
    spool: Spool | None = None
    try:
        if fd is None:
            # Not a local file: fetch it whole first (one chunk, on disk) so that gpg can
            # read it from a file and no feeding task is needed here.
            spool = Spool.create(annexdir)
            async with contextlib.aclosing(source.retrieve(target)) as it:
                async for piece in it:
                    await trio.to_thread.run_sync(spool.append, piece)
            fd = spool.reopen()
        gpg = await GpgProcess.start(
            enc.decrypt_argv(), enc.cipher.passphrase, stdin=fd, timeout=timeout
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


class _Plaintext:
    """A decrypted object waiting for its MDC: pieces in memory, moved into a spool in
    ``annexdir/othertmp`` once they pass MEMORY_PLAINTEXT. Written from one worker thread
    at a time."""

    def __init__(self, annexdir: Path, limit: int | None) -> None:
        self.annexdir = annexdir
        self.limit = limit
        self.size = 0
        self._memory = bytearray()
        self._spool: Spool | None = None

    def write(self, piece: bytes | memoryview) -> None:
        self.size += len(piece)
        if self.limit is not None and self.size > self.limit:
            raise StorageError("decrypted object longer than its key says")
        if self._spool is None and self.size <= MEMORY_PLAINTEXT:
            self._memory += piece
            return
        if self._spool is None:
            self._spool = Spool.create(self.annexdir)
            self._spool.append(self._memory)
            self._memory = bytearray()
        self._spool.append(piece)

    async def pieces(self) -> AsyncGenerator[bytes, None]:
        if self._spool is not None:
            async with contextlib.aclosing(self._spool.read_range(0, self.size)) as it:
                async for piece in it:
                    yield piece
            return
        for start in range(0, len(self._memory), READ_SIZE):
            yield bytes(self._memory[start : start + READ_SIZE])

    def close(self) -> None:
        self._memory = bytearray()
        if self._spool is not None:
            self._spool.close()
            self._spool = None


async def _decrypt(
    enc: Encryption, source: ObjectSource, target: Key, annexdir: Path, limit: int | None
) -> _Plaintext:
    """The object decrypted into a _Plaintext, its MDC checked. Raises Unsupported (ask
    gpg), ObjectCryptError (refused) or the storage's errors."""
    from git_remote_annexproxy.openpgpsym import Decryptor  # noqa: PLC0415 - cryptography

    passphrase = enc.cipher.passphrase
    assert passphrase is not None
    decryptor = Decryptor(passphrase, derive=derive_key)
    plain = _Plaintext(annexdir, limit)
    try:
        fd = await source.open_local(target)
        if fd is not None:
            try:
                while await trio.to_thread.run_sync(_decrypt_from, fd, decryptor, plain):
                    pass
            finally:
                os.close(fd)
        else:
            # Network pieces are small: gathered to READ_SIZE, one thread hop each.
            pending = bytearray()
            async with contextlib.aclosing(source.retrieve(target)) as it:
                async for piece in it:
                    pending += piece
                    if len(pending) >= READ_SIZE:
                        data, pending = bytes(pending), bytearray()
                        await trio.to_thread.run_sync(_write_all, decryptor.feed(data), plain)
            if pending:
                await trio.to_thread.run_sync(_write_all, decryptor.feed(pending), plain)
        await trio.to_thread.run_sync(_write_all, decryptor.finish(), plain)
    except Unsupported:
        plain.close()
        raise
    except OpenPGPError as exc:
        plain.close()
        raise ObjectCryptError(f"{target}: {exc}") from None
    except BaseException:
        plain.close()
        raise
    return plain


def _decrypt_from(fd: int, decryptor: Decryptor, plain: _Plaintext) -> bool:
    """Read and decrypt the next piece of a local object; False at its end."""
    offset = decryptor.consumed
    piece = os.pread(fd, READ_SIZE, offset)
    if not piece:
        return False
    _write_all(decryptor.feed(piece), plain)
    return True


def _write_all(pieces: Iterator[bytes | memoryview], plain: _Plaintext) -> None:
    for piece in pieces:
        plain.write(piece)


# Below this many hashed bytes a second thread costs more than it saves.
_PARALLEL_S2K = 1 << 20


def derive_key(s2k: S2K, passphrase: bytes, size: int) -> bytes:
    """The S2K key, its hash contexts computed in parallel threads when there are several
    large ones (gpg's default: SHA-1 and AES-256, 2 x 65 MB hashed; hashlib releases the
    GIL), for the objects gpg wrote."""
    contexts = s2k.contexts(size)
    large = s2k.mode == S2K_ITERATED and decode_count(s2k.coded_count) >= _PARALLEL_S2K
    if contexts == 1 or not large:
        return s2k.derive(passphrase, size)
    digests: list[bytes] = [b""] * contexts
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            digests[i] = s2k.context(passphrase, i)
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(1, contexts)]
    for thread in threads:
        thread.start()
    one(0)
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return b"".join(digests)[:size]


def max_length(key: Key) -> int | None:
    """The most content the object of ``key`` (a chunk key, or a whole one) can hold."""
    length = chunks.chunk_length(key)
    return length if length is not None else key.chunk_size


async def read_layout(
    layout: list[Key], offset: int, read: Callable[[Key], AsyncGenerator[bytes, None]]
) -> AsyncGenerator[bytes, None]:
    """The content from ``offset``: the plaintext of each piece of ``layout`` (``read``
    gives it for a piece key), joined, each checked against its expected length.

    Raises StorageError (or the reader's errors); callers have then received part of it.
    """
    skip = offset
    for n, k in enumerate(layout, 1):
        expected = k.chunk_size if k.chunk_size and n < len(layout) else chunks.chunk_length(k)
        if expected is not None and skip >= expected and k.chunk_num is not None:
            skip -= expected  # a whole chunk before the offset: not even fetched
            continue
        got = 0
        async with contextlib.aclosing(read(k)) as it:
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


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
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
