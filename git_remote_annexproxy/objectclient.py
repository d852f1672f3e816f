"""Client-side encryption for special remotes behind an annexproxy proxy.

The client chunks and encrypts content itself, in git-annex's exact format (the one
implementation in ``specialformat.py``), and hands the proxy finished objects through the
``annexproxy-objects`` P2P extension; the proxy stores them as they are, reads them back
to prove the key (it decrypts them with the remote's cipher, which it must hold) and logs
the location. Neither content nor cipher crosses the connection in the clear. Downloads
fetch the objects and decrypt here. With ``annexproxy-indirect`` each object goes straight
to the storage over HTTP (``httpput.py``) at a URL the proxy presigned for that object
alone, with every header the proxy gave (one is the presign's upload tag).

What a special remote is (type, cipher, chunk size) comes from remote.log and the chunk
logs of the clone's git-annex branch, as git-annex reads them. A server that does not
offer the extension (real git-annex, or an older annexproxy) gets a plain PUT instead:
``negotiate`` says so in one line, and the caller does the plain upload.

Wire format: HACKING.md, "P2P extensions".
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import trio

from git_remote_annexproxy import chunks, p2p
from git_remote_annexproxy.crypto import Gpg
from git_remote_annexproxy.discovery import BranchLogs
from git_remote_annexproxy.httpput import http_put
from git_remote_annexproxy.keys import Key
from git_remote_annexproxy.p2pclient import P2PRefused, P2PSession, P2PSessionError
from git_remote_annexproxy.repologs import parse_remote_log
from git_remote_annexproxy.specialformat import (
    Encryption,
    ObjectMissing,
    ObjectWriter,
    Spool,
    StorageError,
    load_encryption,
    max_length,
    object_key,
    plan,
    read_layout,
    read_object,
    write_object,
)

GPG_TIMEOUT = 300.0  # gpg making no progress for this long is stuck
WANTED = (p2p.EXT_OBJECTS, p2p.EXT_INDIRECT)


class ObjectError(Exception):
    """An upload or download of objects failed; the message is for the user."""


@dataclass(frozen=True)
class SpecialTarget:
    """A special remote as the client's git-annex branch describes it."""

    uuid: str
    name: str
    chunk_size: int | None
    encryption: Encryption | None
    kind: str = ""  # remote.log's type=, e.g. "S3" (whose storage can take indirect uploads)


def remote_fields(logs: BranchLogs, uuid: str) -> dict[str, str] | None:
    """remote.log's fields for ``uuid``; None when it is no special remote."""
    fields = parse_remote_log(logs.read("remote.log")).get(uuid)
    return fields if fields and "type" in fields else None


async def special_target(
    logs: BranchLogs, uuid: str, name: str, gpg: Gpg | None = None
) -> SpecialTarget | None:
    """The special remote ``uuid`` (None: not one). Decrypting a hybrid or pubkey cipher
    runs gpg with the user's keyring; GpgError/CryptoConfigError/ChunkConfigError when
    that, or the configuration, fails: never a silent plaintext upload."""
    fields = remote_fields(logs, uuid)
    if fields is None:
        return None
    chunk_size = chunks.configured_chunk_size(fields)
    encryption = await load_encryption(fields, gpg or Gpg(), GPG_TIMEOUT)
    return SpecialTarget(uuid, name, chunk_size, encryption, fields["type"])


class ServerClosed(P2PSessionError):
    """The server closed the session on our EXTENSIONS (a git-annex proxy does): open a
    new session for a plain upload; no offer is made again."""


def _fallback_line(name: str) -> str:
    return (f"{name}: the server takes no finished objects (client-side encryption, "
            "direct uploads); falling back to a plain upload through the proxy")  # fmt: skip


class Negotiated:
    """What was agreed on each session to one target (pooled sessions are reused, so the
    offer is made once per session), and whether that target's server knows no extension
    at all: then it is never offered again and ``say`` told the user once."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.unsupported = False
        self._agreed: weakref.WeakKeyDictionary[P2PSession, frozenset[str]] = (
            weakref.WeakKeyDictionary()
        )

    async def agreed(self, session: P2PSession) -> frozenset[str] | None:
        """The extensions ``session`` agreed to; None: do a plain upload on it. Raises
        ServerClosed when the offer cost the session (do the plain upload on another)."""
        if self.unsupported:
            return None
        if session in self._agreed:
            return self._agreed[session]
        got = await session.extensions(WANTED)
        if p2p.EXT_OBJECTS not in got:
            self.unsupported = True
            self.say(_fallback_line(session.name))
            if session.dead:
                raise ServerClosed(f"{session.name}: closed the connection on EXTENSIONS")
            return None
        self._agreed[session] = got
        return got


async def negotiate(
    session: P2PSession,
    reopen: Callable[[], Awaitable[P2PSession]],
    say: Callable[[str], None],
) -> tuple[P2PSession, frozenset[str]]:
    """Offer our extensions once on a fresh session. Returns the session to go on with
    (a new one from ``reopen`` when the server closed on the unknown word) and what was
    agreed. No extension message is ever sent to a server that did not agree."""
    try:
        agreed = await Negotiated(say).agreed(session)
    except ServerClosed:
        await session.aclose()
        return await reopen(), frozenset()
    return session, agreed or frozenset()


# --- upload -------------------------------------------------------------------------------------


async def upload_key(
    session: P2PSession,
    target: SpecialTarget,
    key: Key,
    source: BinaryIO,
    *,
    agreed: frozenset[str],
    annexdir: Path,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> str:
    """Store ``key`` (its content open as ``source``; read with pread, so its position does
    not matter) on ``target`` through ``session``: chunk and encrypt here, send each
    object, then RECORD. "stored" or "already"; ObjectError (nothing logged) or
    P2PSessionError otherwise. ``on_bytes`` counts object bytes as they leave."""
    content = Spool(source.fileno(), os.fstat(source.fileno()).st_size)
    if key.size is not None and content.size != key.size:
        raise ObjectError(f"the local content of {key} has the wrong size (git annex fsck)")
    chunk_size, pieces = plan(key, content.size, target.chunk_size)
    names: list[str] = []
    sent = 0
    for piece_key, offset, length in pieces:
        name = str(object_key(target.encryption, piece_key))
        names.append(name)
        if not await session.checkobject(name):
            job = _Job(session, agreed, target, content, annexdir, on_bytes)
            await _send_object(job, name, offset, length)
            sent += 1
    if not await session.record(key, chunk_size, names):
        raise ObjectError(f"{target.name}: the proxy did not accept the upload of {key}")
    return "stored" if sent else "already"


@dataclass(frozen=True)
class _Job:
    session: P2PSession
    agreed: frozenset[str]
    target: SpecialTarget
    content: Spool
    annexdir: Path
    on_bytes: Callable[[int], None]


async def _send_object(job: _Job, name: str, offset: int, length: int) -> None:
    """One object: encrypted into a spool first (its size must be known before DATA), or
    for an unencrypted remote sent straight from the file."""
    session, target = job.session, job.target
    spool: Spool | None = None
    try:
        source, start = job.content, offset
        if target.encryption is not None:
            spool = Spool.create(job.annexdir)
            await write_object(target.encryption, Key.parse(name),
                               job.content.read_range(offset, length), _into(spool),
                               GPG_TIMEOUT, length=length)  # fmt: skip
            source, start, length = spool, 0, spool.size
        if p2p.EXT_INDIRECT in job.agreed and await _indirect(session, name, source, start, length):
            job.on_bytes(length)
            return
        result = await session.putobject(name, length, _counted(source, start, length, job))
        if result == "failed":
            raise ObjectError(f"{target.name}: the proxy did not store object {name}")
    finally:
        if spool is not None:
            spool.close()


async def _counted(source: Spool, start: int, n: int, job: _Job) -> AsyncGenerator[bytes, None]:
    async with contextlib.aclosing(source.read_range(start, n)) as it:
        async for piece in it:
            yield piece
            job.on_bytes(len(piece))


def _into(spool: Spool) -> ObjectWriter:
    async def store(_target: Key, data: AsyncIterator[bytes]) -> None:
        async for piece in data:
            await trio.to_thread.run_sync(spool.append, piece)

    return store


async def _indirect(session: P2PSession, name: str, source: Spool, start: int, n: int) -> bool:
    """Send one object straight to the storage; False when the proxy gives no URL for it
    (FAILURE: e.g. a key without size, whose objects the proxy checks only as they pass
    through it), and the caller sends it with PUTOBJECT instead."""
    digest = hashlib.sha256()
    async with contextlib.aclosing(source.read_range(start, n)) as it:
        async for piece in it:
            digest.update(piece)
    reply = await session.putindirect(name, n, digest.hexdigest())
    if isinstance(reply, p2p.AlreadyHave):
        return True
    if not isinstance(reply, p2p.Indirect):
        return False
    try:
        await http_put(reply.url, dict(reply.headers), source.fd, start, n)
    except OSError as exc:
        raise ObjectError(f"{session.name}: upload of {name} failed: {exc}") from None
    if not await session.indirectdone(name):
        raise ObjectError(f"{session.name}: the storage did not get {name} intact")
    return True


# --- download -----------------------------------------------------------------------------------


class _SessionObjects:
    """Objects read over the session (an ObjectSource for specialformat.read_object)."""

    def __init__(self, session: P2PSession) -> None:
        self.session = session

    async def open_local(self, key: Key) -> int | None:
        return None

    async def retrieve(self, key: Key) -> AsyncGenerator[bytes, None]:
        try:
            async with contextlib.aclosing(self.session.getobject(str(key))) as it:
                async for piece in it:
                    yield piece
        except P2PRefused as exc:
            raise ObjectMissing(exc.text) from None


async def locate(
    session: P2PSession, target: SpecialTarget, key: Key, logs: BranchLogs
) -> list[Key]:
    """The layout to read: the first (in git-annex's order) whose first object is there."""
    log = logs.read(chunks.chunk_log_path(key)) or None
    logged = chunks.logged_chunkings(log, target.uuid)
    for layout in chunks.layouts(key, target.chunk_size, logged):
        if await session.checkobject(str(object_key(target.encryption, layout[0]))):
            return layout
    raise ObjectError(f"{target.name}: {key} is not there")


def read_key(
    session: P2PSession, target: SpecialTarget, layout: list[Key], annexdir: Path, offset: int
) -> AsyncGenerator[bytes, None]:
    """The plaintext of the content stored as ``layout``, decrypted here. Raises
    StorageError, GpgError or P2PSessionError part way; verify what it gave."""
    source = _SessionObjects(session)

    def one(k: Key) -> AsyncGenerator[bytes, None]:
        name = object_key(target.encryption, k)
        return read_object(target.encryption, source, name, annexdir, GPG_TIMEOUT,
                           limit=max_length(k))  # fmt: skip

    return read_layout(layout, offset, one)


async def download_key(
    session: P2PSession,
    target: SpecialTarget,
    key: Key,
    *,
    logs: BranchLogs,
    annexdir: Path,
    write: Callable[[bytes], Awaitable[None]],
    offset: int = 0,
) -> None:
    """Locate, fetch, decrypt and hand ``key``'s content from ``offset`` to ``write``
    (whole chunks before the offset are not even fetched). The caller verifies it."""
    layout = await locate(session, target, key, logs)
    try:
        async with contextlib.aclosing(read_key(session, target, layout, annexdir, offset)) as it:
            async for piece in it:
                await write(piece)
    except StorageError as exc:
        raise ObjectError(f"{target.name}: {exc}") from None


__all__ = [
    "Negotiated",
    "ObjectError",
    "P2PSessionError",
    "ServerClosed",
    "SpecialTarget",
    "download_key",
    "negotiate",
    "special_target",
    "upload_key",
]
