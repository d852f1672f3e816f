"""The `annexproxy-objects` and `annexproxy-indirect` P2P extensions on the proxy.

A client that chunks and encrypts content itself (``objectclient.py``) hands the proxy the
finished objects of a special remote; the proxy stores them as they are, under the names
the client gives. Every name is checked (``specialformat.object_name``) before it reaches
the storage. Then `RECORD` makes the proxy prove the key before it logs anything: the
names must be the ones the proxy computes for the key, every object must be there, and
the objects, read back (and decrypted), must be the key's content: its hash, or for a key
without one (WORM, URL) its size, as a plain PUT checks it. Only then the chunk log and
the location log. Deletion and logging never follow from a client's claim.

So uploads need a proxy that can read the remote's objects: unencrypted and shared-cipher
remotes always, hybrid and pubkey ones when the proxy's keyring opens the cipher, never
sharedpubkey (``SpecialLink.readable``). Elsewhere PUTOBJECT, PUTINDIRECT and RECORD are
refused (``UNPROVABLE``); CHECKOBJECT and GETOBJECT are served.

A RECORD that fails its proof removes the objects of that RECORD this session stored
itself, and only those, and only with full write access; append-only sessions remove
nothing. Whatever is left is never logged and never served as VALID (a GET verifies the
key as it streams, ``shell/speciallink.py``), and a plain PUT of the key overwrites it
(``SpecialRemote.store`` writes every chunk).

With `annexproxy-indirect` (a storage that can presign uploads: S3) the bytes bypass the
proxy: it answers `PUTINDIRECT` with a presigned URL for that one object, and on
`INDIRECTDONE` checks the stored object's size and SHA-256 against what it presigned. On
a mismatch it removes the object only in a session with full write access, and only when
the object carries the random tag signed into that one URL (so it is the client's own
upload, not one another writer stored meanwhile). Only names presigned in this session
are accepted there; unencrypted objects whose size the key does not bind get no URL.

For an unencrypted remote the names are keys, so the proxy also checks each object as it
arrives, as a plain PUT does: its size (whole key or chunk), a whole key's hash
(PUTOBJECT while spooling; PUTINDIRECT's SHA-256 for SHA256(E) keys, else read back at
INDIRECTDONE). A whole key this session hashed itself is not read again at RECORD.

PUTOBJECT has no size limit of its own (an encrypted object's size is not known from its
name): the DATA streams into an anonymous spool in ``annex/othertmp``, as a plain PUT of a
key without size would, and is gone however the session ends (idle timeout included). A
DATA whose length is not the announced size (or the key's) is drained without a write.

Wire format: HACKING.md, "P2P extensions".
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from git_remote_annexproxy import chunks, p2p
from git_remote_annexproxy.branch import current_clock
from git_remote_annexproxy.crypto import GpgError
from git_remote_annexproxy.keys import Key, Verifier
from git_remote_annexproxy.specialformat import (
    Encryption,
    ObjectMissing,
    Spool,
    object_key,
    object_name,
    plan,
    read_object,
)
from shell import restrict
from shell.front import FrontSession
from shell.nodelink import NodeError
from shell.p2pserver import SessionEnd, warn
from shell.speciallink import PIECE, SpecialLink
from shell.specialstore import ObjectStat, StorageError

# Presigned URLs live this long (git config annexproxy.presignexpiry, seconds, at most a
# day): long enough to start one chunk's upload, short enough to be useless later.
DEFAULT_PRESIGN_EXPIRY = 900
MAX_PRESIGN_EXPIRY = 86400
# RECORD's list of names: at most this many bytes per object, and in all.
MAX_NAME = 512
MAX_RECORD_DATA = 64 << 20
# Names presigned and not yet confirmed, per session.
MAX_PENDING = 4096
# The answer to PUTOBJECT, PUTINDIRECT and RECORD where the proxy cannot read back the
# content of the remote's objects (SpecialLink.readable): it would have only the client's
# word for them, and a location log never rests on that. Downloads are served still.
UNPROVABLE = ("the proxy cannot verify objects of this special remote (it holds no key "
              "to decrypt them); it stores none from a client")  # fmt: skip
# Objects a session remembers having written itself, and having verified itself; beyond
# this many it forgets nothing but notes no more (RECORD then reads back, and a failed
# proof removes only what was noted).
MAX_TRACKED = 1 << 16


class Presigner(Protocol):
    def presign_put(
        self, name: str, size: int, sha256_hex: str, expires: int, tag: str
    ) -> tuple[str, dict[str, str]]: ...

    async def stat(self, name: str) -> ObjectStat | None: ...


@dataclass(frozen=True)
class _Pending:
    key: Key
    size: int
    sha256: str
    tag: str  # random, signed into the URL: what only an upload through it carries
    verify: bool  # read the object back and verify it against its key at INDIRECTDONE
    sha_key: bool  # an unencrypted whole SHA256(E) key: the presigned SHA-256 is its hash


def offered(link: object) -> tuple[str, ...]:
    """The extensions a session to this node can serve. (Where the proxy cannot read back
    what a client stores, their uploads are refused one by one: see UNPROVABLE.)"""
    if not isinstance(link, SpecialLink) or link.storage is None:
        return ()
    if _presigner(link) is None:
        return (p2p.EXT_OBJECTS,)
    return (p2p.EXT_OBJECTS, p2p.EXT_INDIRECT)


def _presigner(link: SpecialLink) -> Presigner | None:
    inner = link.storage.inner if link.storage is not None else None
    if inner is None or not callable(getattr(inner, "presign_put", None)):
        return None
    if not callable(getattr(inner, "stat", None)):
        return None
    return inner  # type: ignore[return-value]  # checked just above, structurally


class ObjectService:
    """Serves the extension requests of one proxy session to one special remote."""

    def __init__(self, front: FrontSession, link: SpecialLink, words: tuple[str, ...]) -> None:
        assert link.storage is not None
        self.front = front
        self.link = link
        self.storage = link.storage
        self.words = frozenset(words)
        self.presigner = _presigner(link) if p2p.EXT_INDIRECT in words else None
        self.pending: dict[str, _Pending] = {}
        # Objects this session stored itself (PUTOBJECT, or an upload through its URL that
        # carried the presign's tag): the only ones a failed RECORD may remove.
        self.written: set[Key] = set()
        # Unencrypted whole keys this session hashed itself and found to be the key's:
        # RECORD need not read them back.
        self.proven: set[Key] = set()
        self.provable: bool | None = None  # SpecialLink.readable, asked at the first write
        value = (front.repo.config.get("annexproxy.presignexpiry") or "").strip()
        # isascii: "²".isdigit() is true and int() refuses it.
        ok = value.isascii() and value.isdigit()
        expiry = int(value) if ok else DEFAULT_PRESIGN_EXPIRY
        self.expiry = max(1, min(expiry, MAX_PRESIGN_EXPIRY))

    def serves(self, event: p2p.Event) -> bool:
        if isinstance(event, p2p.PutIndirect | p2p.IndirectDone):
            return self.presigner is not None
        kinds = p2p.CheckObject | p2p.PutObject | p2p.GetObject | p2p.Record
        return isinstance(event, kinds) and p2p.EXT_OBJECTS in self.words

    async def handle(self, event: p2p.Event) -> None:
        try:
            match event:
                case p2p.CheckObject(name):
                    key = await self._name(name)
                    if key is not None:
                        ok = await self.storage.present(key)
                        await self.front.send(p2p.Success() if ok else p2p.Failure())
                case p2p.PutObject(name, size):
                    await self.put_object(name, size)
                case p2p.GetObject(name):
                    await self.get_object(name)
                case p2p.Record(chunk_size, count, key):
                    await self.record(chunk_size, count, key)
                case p2p.PutIndirect(name, size, sha256):
                    await self.put_indirect(name, size, sha256)
                case p2p.IndirectDone(name):
                    await self.indirect_done(name)
        except (StorageError, OSError) as exc:
            await self.front.send(p2p.Error(f"proxied special remote reports: {exc}"))

    async def _name(self, name: str) -> Key | None:
        key = object_name(name, self.link.mac) if len(name) <= MAX_NAME else None
        if key is None:
            await self.front.send(p2p.Error("bad object name"))
        return key

    def _length(self, key: Key) -> int | None:
        """The size an object must have, when its name tells (an unencrypted remote's
        object is the key's content, or one chunk of it)."""
        if self.link.mac is not None:
            return None
        if key.chunk_num is None and key.chunk_size is None:
            return key.size
        if key.size is None or key.chunk_size is None or not key.chunk_num:
            return None
        return max(0, min(key.chunk_size, key.size - (key.chunk_num - 1) * key.chunk_size))

    async def _stored_size(self, key: Key) -> int | None:
        """The stored object's size; -1 when the storage cannot tell; None if absent."""
        stat = _presigner(self.link)
        if stat is not None:
            found = await stat.stat(key.canonical())
            return None if found is None else found.size
        if not await self.storage.present(key):
            return None
        try:
            fd = await self.storage.open_local(key)
        except ObjectMissing:  # removed in between
            return None
        if fd is None:
            return -1
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    # -- objects through the proxy -----------------------------------------------------------

    async def _unprovable(self) -> bool:
        """Answer ERROR and return True where no upload can be proven (see UNPROVABLE)."""
        if self.provable is None:
            self.provable = await self.link.readable()
        if not self.provable:
            await self.front.send(p2p.Error(UNPROVABLE))
        return not self.provable

    async def put_object(self, name: str, size: int) -> None:
        if await self.front.refuse_write(removal=False):
            return
        key = await self._name(name)
        if key is None or await self._unprovable():
            return
        if await self.storage.present(key):
            await self.front.send(p2p.AlreadyHave())
            return
        await self.front.send(p2p.PutFrom(0))
        event = await self.front.event(data=True)
        if isinstance(event, p2p.DataPresent):
            await self.front.send(p2p.Failure())  # nothing of it was ever sent
            return
        if not isinstance(event, p2p.Data):
            await self.front.send(p2p.Error("expected DATA"))
            raise SessionEnd(1, "client sent no DATA after PUT-FROM")
        # Decided before a byte is written: a DATA of another length than announced (or
        # than the key says, unencrypted) is drained, never spooled, so the disk used is
        # never more than a consistent request asked for.
        expected = self._length(key)
        wanted = event.length == size and expected in (None, size)
        spool = self.link.new_spool() if wanted else None
        # Unencrypted: the object is the key's content (or a chunk of it), checked as a
        # plain PUT checks it, so a RECORD can never log other content under the key.
        verifier = key.verifier() if self.link.mac is None else None
        try:
            error = await self._spool_body(spool, verifier)
            valid = await self.front.client_validity()
            if error is not None:
                raise error
            if spool is None or valid is False or spool.size != size:
                await self.front.send(p2p.Failure())
                return
            if verifier is not None and not verifier.ok():
                warn(f"  {name}: verification of content failed")
                await self.front.send(p2p.Failure())
                return
            # Stored by another writer while this DATA came in: same name, same content
            # (the MAC or key of one chunk); never overwrite it with what this client says.
            if await self.storage.present(key):
                await self.front.send(p2p.Success())
                return
            with trio.CancelScope(shield=True):  # each write step is bounded by the storage
                await self.storage.store(key, spool.read_range(0, spool.size))
            _note(self.written, key)
            if verifier is not None and key.verifiable:
                _note(self.proven, key)
            await self.front.send(p2p.Success())
        finally:
            if spool is not None:
                self.link.drop_spool(spool)

    async def _spool_body(self, spool: Spool | None, verifier: Verifier | None) -> OSError | None:
        """Take the DATA payload into ``spool`` (None: read and drop it); a write error is
        kept until the end (an ERROR in the middle of the payload would be read as
        payload)."""
        pending = bytearray()
        error: OSError | None = None
        while not isinstance(event := await self.front.event(), p2p.BodyEnd):
            assert isinstance(event, p2p.Body)
            if spool is None:
                continue
            pending += event.data
            if len(pending) >= PIECE or error is not None:
                data, pending = bytes(pending), bytearray()
                if error is None:
                    try:
                        await trio.to_thread.run_sync(spool.append, data, verifier)
                    except OSError as exc:
                        error = exc
        if spool is not None and pending and error is None:
            try:
                await trio.to_thread.run_sync(spool.append, bytes(pending), verifier)
            except OSError as exc:
                error = exc
        return error

    async def get_object(self, name: str) -> None:
        key = await self._name(name)
        if key is None:
            return
        if not await self.storage.present(key):
            await self.front.send(p2p.Failure())
            return
        fd = await self.storage.open_local(key)
        spool: Spool | None = None
        try:
            if fd is None:
                spool = self.link.new_spool()
                async with contextlib.aclosing(self.storage.retrieve(key)) as it:
                    async for piece in it:
                        await trio.to_thread.run_sync(spool.append, piece)
                source = spool
            else:
                source = Spool(fd, os.fstat(fd).st_size)
            await self.front.send(p2p.Data(source.size))
            ok = await self._send_range(source)
            if self.front.v >= 1:
                await self.front.send(p2p.Valid() if ok else p2p.Invalid())
        finally:
            if fd is not None:
                os.close(fd)
            if spool is not None:
                self.link.drop_spool(spool)

    async def _send_range(self, source: Spool) -> bool:
        sent, ok = 0, True
        try:
            async with contextlib.aclosing(source.read_range(0, source.size)) as it:
                async for piece in it:
                    await self.front.channel.send_raw(piece)
                    sent += len(piece)
        except (StorageError, OSError) as exc:
            warn(f"  proxied special remote reports: {exc}")
            ok = False
        while sent < source.size:  # DATA promised this many bytes: keep the framing
            n = min(PIECE, source.size - sent)
            await self.front.channel.send_raw(bytes(n))
            sent += n
        return ok

    # -- recording -----------------------------------------------------------------------------

    async def record(self, chunk_size: int, count: int, key: Key) -> None:
        names = await self._record_names(count)
        if await self.front.refuse_write(removal=False) or await self._unprovable():
            return
        try:
            enc = await self.link.encryption()
        except NodeError as exc:  # offered only where it could be loaded; gone since
            warn(f"  RECORD {key}: {exc}")
            await self.front.send(p2p.Failure())
            return
        problem = self._check_record(chunk_size, count, key, names)
        # Only now (count is bounded by the names received, and matches the key's size).
        pieces = _pieces(key, chunk_size, count) if problem is None else []
        if problem is None and [object_key(enc, k) for k in pieces] != names:
            problem = "object names do not belong to the key"
        for obj in names if names is not None and problem is None else []:
            expected = self._length(obj)
            if expected is None:
                if not await self.storage.present(obj):
                    problem = f"object {obj} is not in the special remote"
                    break
                continue
            # Unencrypted: present is not enough, it must be the size the key says.
            found = await self._stored_size(obj)
            if found is None:
                problem = f"object {obj} is not in the special remote"
                break
            if found >= 0 and found != expected:
                problem = f"object {obj} has size {found}, not {expected}"
                break
        if problem is None and names is not None:
            problem = await self._prove(key, pieces, names, enc)
            if problem is not None:
                await self._discard_own(names)
        if problem is not None:
            warn(f"  RECORD {key}: {problem}")
            await self.front.send(p2p.Failure())
            return
        if chunk_size:
            clock = current_clock()
            uuid = self.link.uuid
            try:
                await trio.to_thread.run_sync(
                    self.link.branch.change,
                    chunks.chunk_log_path(key),
                    lambda old: chunks.record_chunks(old, uuid, chunk_size, count, clock),
                )
            except OSError as exc:  # e.g. a key too long for a journal file name
                warn(f"  cannot write the chunk log: {exc.strerror or exc}")
                await self.front.send(p2p.Failure())
                return
        logged = self.front.log_present(key, [self.link.uuid], present=True)
        await self.front.send(p2p.Success() if logged else p2p.Failure())

    async def _prove(
        self, key: Key, pieces: list[Key], names: list[Key], enc: Encryption | None
    ) -> str | None:
        """Read the objects back (decrypted: the proxy holds the cipher wherever the
        extension is offered) and verify the key's content; None when proven. A key of a
        backend without a hash (WORM, URL) is proven by its size alone, as a plain PUT of
        it is. An unencrypted whole key this session hashed itself is not read again."""
        if enc is None and names == [key] and key in self.proven:
            return None
        verifier = key.verifier()
        for n, (piece, name) in enumerate(zip(pieces, names, strict=True), 1):
            # The object of a chunk (not the last) of a key without size is chunk_size.
            last = n == len(pieces)
            expected = chunks.chunk_length(piece)
            if expected is None and piece.chunk_size is not None and not last:
                expected = piece.chunk_size
            got = 0
            try:
                async with contextlib.aclosing(read_object(
                    enc, self.storage, name, self.link.annexdir, self.link.timeout
                )) as it:  # fmt: skip
                    async for data in it:
                        got += len(data)
                        if expected is not None and got > expected:
                            return f"object {name} holds more than {expected} bytes"
                        verifier.update(data)
            except GpgError as exc:
                return f"object {name} does not decrypt: {exc}"
            if expected is not None and got != expected:
                return f"object {name} holds {got} bytes, not {expected}"
        if not verifier.ok():
            return "the objects' content is not the key's"
        return None

    async def _discard_own(self, names: list[Key]) -> None:
        """After a failed proof: remove the objects of ``names`` this session stored itself
        (and only those; in a session with full write access only), so that nothing it
        failed to prove stays behind."""
        own = [n for n in names if n in self.written]
        if not own or self.front.mode < restrict.Mode.READWRITE:
            return
        with trio.CancelScope(shield=True):  # each removal is bounded by the storage
            for name in own:
                with contextlib.suppress(StorageError):
                    await self.storage.remove(name)
                self.written.discard(name)
                self.proven.discard(name)
        warn(f"  removed {len(own)} object(s) this session stored and did not prove")

    async def _record_names(self, count: int) -> list[Key] | None:
        """The DATA after RECORD: one object name per line (None if unusable). Always
        consumed whole, so the session stays in step whatever the answer."""
        event = await self.front.event(data=True)
        if not isinstance(event, p2p.Data):
            await self.front.send(p2p.Error("expected DATA after RECORD"))
            raise SessionEnd(1, "client sent no DATA after RECORD")
        limit = min(MAX_RECORD_DATA, count * (MAX_NAME + 1))
        data = bytearray()
        while not isinstance(event := await self.front.event(), p2p.BodyEnd):
            assert isinstance(event, p2p.Body)
            if len(data) + len(event.data) <= limit:
                data += event.data
            else:
                limit = -1  # too long: read to the end, then refuse
        if limit < 0 or (data and not data.endswith(b"\n")):
            return None
        keys: list[Key] = []
        for line in bytes(data).split(b"\n")[:-1]:
            if len(line) > MAX_NAME:  # the same bound as a name in a request line
                return None
            key = object_name(line.decode("utf-8", "surrogateescape"), self.link.mac)
            if key is None:
                return None
            keys.append(key)
        return keys

    def _check_record(
        self, chunk_size: int, count: int, key: Key, names: list[Key] | None
    ) -> str | None:
        if names is None:
            return "bad object names"
        if key.chunk_num is not None or key.chunk_size is not None:
            return "a chunk key cannot be recorded"
        if len(names) != count or len(set(names)) != count or count == 0:
            return "wrong number of objects"
        if chunk_size == 0:
            expected_count = 1
        elif not chunks.is_stable(key):
            return "this key is never chunked"
        else:
            expected_count = chunks.chunk_count(key.size or 0, chunk_size)
        if key.size is not None and count != expected_count:
            return "wrong number of objects for the key's size"
        return None

    # -- indirect uploads --------------------------------------------------------------------------

    async def put_indirect(self, name: str, size: int, sha256: str) -> None:
        if await self.front.refuse_write(removal=False):
            return
        key = await self._name(name)
        if key is None or await self._unprovable():
            return
        assert self.presigner is not None
        if await self.storage.present(key):
            await self.front.send(p2p.AlreadyHave())
            return
        # Unencrypted: the URL may only carry the key's content. Its size, and for a
        # SHA256(E) whole key its hash, are what the storage will hold the upload to;
        # another hash is verified by reading the object back at INDIRECTDONE. A key
        # without size binds no length at all: no URL (PUTOBJECT is checked here).
        expected = self._length(key)
        whole = key.chunk_num is None and key.chunk_size is None
        sha_key = self.link.mac is None and whole and key.backend in ("SHA256", "SHA256E")
        if (self.link.mac is None and expected is None) or (
            (expected is not None and size != expected)
            or (sha_key and sha256 != key.name.partition(".")[0])
        ):
            await self.front.send(p2p.Failure())
            return
        if len(self.pending) >= MAX_PENDING:
            await self.front.send(p2p.Failure())
            return
        tag = secrets.token_hex(16)
        url, headers = await trio.to_thread.run_sync(
            self.presigner.presign_put, str(key), size, sha256, self.expiry, tag
        )
        verify = self.link.mac is None and key.verifiable and not sha_key
        self.pending[str(key)] = _Pending(key, size, sha256, tag, verify, sha_key)
        await self.front.send(p2p.Indirect(url, tuple(headers.items())))

    async def indirect_done(self, name: str) -> None:
        # As PUT: a read-only session never presigned anything, and says so as PUT does.
        if await self.front.refuse_write(removal=False):
            return
        pending = self.pending.pop(name, None)
        if pending is None:
            await self.front.send(p2p.Error("no upload of that object was presigned"))
            return
        assert self.presigner is not None
        found = await self.presigner.stat(str(pending.key))
        if found is None:
            await self.front.send(p2p.Failure())
            return
        ok = found.size == pending.size and (
            found.sha256 or await self._digest(pending.key)
        ) == pending.sha256
        # Hashed here (not the storage's word): a whole unencrypted key, its own hash
        # (read back, or the SHA-256 that is its hash) is proven for RECORD.
        hashed_here = found.sha256 is None and pending.sha_key
        if ok and pending.verify:
            ok = hashed_here = await self._verifies(pending.key)
        ours = found.tag == pending.tag
        if ok:
            if ours:
                _note(self.written, pending.key)
            if hashed_here:
                _note(self.proven, pending.key)
            await self.front.send(p2p.Success())
            return
        # Deletion never follows from a client's claim. The name was absent when presigned,
        # but another writer may have stored it since (a good object, which a wrong claim
        # must not delete): only an object carrying this presign's random tag (a signed
        # header, kept as metadata) came through this URL. A checksum proves nothing of
        # the sort (the proxy's own PUT sends the same one for the same bytes). And an
        # append-only session removes nothing at all.
        if ours and self.front.mode >= restrict.Mode.READWRITE:
            warn(f"  {name}: stored object does not match what was presigned; removed")
            with contextlib.suppress(StorageError):
                await self.storage.remove(pending.key)
        else:
            warn(f"  {name}: stored object does not match what was presigned; kept")
        await self.front.send(p2p.Failure())

    async def _read_back(self, key: Key, update: Callable[[bytes], object]) -> None:
        """Stream a stored object through ``update`` (the checks below read it back)."""
        async with contextlib.aclosing(self.storage.retrieve(key)) as it:
            async for piece in it:
                update(piece)

    async def _digest(self, key: Key) -> str:
        """SHA-256 of a stored object, read back (a storage that reports none)."""
        h = hashlib.sha256()
        await self._read_back(key, h.update)
        return h.hexdigest()

    async def _verifies(self, key: Key) -> bool:
        """The stored object, read back, is the content of ``key`` (its hash)."""
        verifier = key.verifier()
        await self._read_back(key, verifier.update)
        return verifier.ok()


def _pieces(key: Key, chunk_size: int, count: int) -> list[Key]:
    """The keys whose contents, joined, are ``key``'s, as a RECORD of ``count`` objects
    in chunks of ``chunk_size`` (0: unchunked) stores them."""
    if chunk_size and key.size is None:
        return chunks.chunk_keys(key, chunk_size, count)
    return [k for k, _, _ in plan(key, key.size or 0, chunk_size or None)[1]]


def _note(tracked: set[Key], key: Key) -> None:
    if len(tracked) < MAX_TRACKED:
        tracked.add(key)
