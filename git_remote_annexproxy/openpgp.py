"""OpenPGP packets as git-annex's encrypted objects hold them: framing, S2K, the packets
inside the encryption. Sans-IO: bytes in, events or bytes out; nothing here reads a file,
starts a process or holds more than one piece of a body.

RFC 4880 (OpenPGP) with what RFC 9580 says about the same v4 packets. An object of an
``encryption=shared`` or ``hybrid`` remote is what ``gpg --symmetric`` writes:

    SKESK (tag 3)    symmetric-key encrypted session key: cipher, S2K, optional ESK
    SEIPD (tag 18)   version 1: CFB-encrypted [prefix | packets | MDC packet]
      inside: [compressed (tag 8) [ literal (tag 11) ]] or [literal], then the MDC (tag 19)

The encryption itself (``openpgpsym.py``) uses this module for everything but the cipher.
Errors fall in two classes, and the difference matters to the caller:

* ``PacketError`` (and ``IntegrityError``): the object is malformed, truncated or damaged.
  Refuse it; never ask gpg to try.
* ``Unsupported``: well formed, but uses something this reader does not implement (a
  public-key encrypted session key, AEAD, an unknown algorithm, a signed message). gpg
  may read it: the caller falls back to it.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import bz2

# Packet tags (RFC 4880 4.3).
PKESK = 1
SIGNATURE = 2
SKESK = 3
ONE_PASS = 4
COMPRESSED = 8
SED = 9
MARKER = 10
LITERAL = 11
SEIPD = 18
MDC = 19
AEAD = 20
# Only these may have partial body lengths (RFC 4880 4.2.2.4, RFC 9580 4.2.1.4).
_DATA_TAGS = frozenset({COMPRESSED, SED, LITERAL, SEIPD, AEAD})

# S2K hash algorithms (RFC 4880 9.4) by their hashlib names.
HASHES = {1: "md5", 2: "sha1", 3: "ripemd160", 8: "sha256", 9: "sha384", 10: "sha512",
          11: "sha224"}  # fmt: skip
SHA256 = 8
# Compression algorithms (RFC 4880 9.3).
UNCOMPRESSED, ZIP, ZLIB, BZIP2 = 0, 1, 2, 3

# Decompressed output is produced in pieces of at most this size, so a small compressed
# packet that inflates to gigabytes never sits in memory at once.
OUT_PIECE = 1 << 20


class OpenPGPError(Exception):
    """The in-process reader cannot give this object's plaintext."""


class PacketError(OpenPGPError):
    """Malformed, truncated or damaged: the object is refused."""


class IntegrityError(PacketError):
    """The modification detection code does not match: damaged, or not our cipher's."""


class Unsupported(OpenPGPError):
    """Well formed but beyond this reader (the message says what): gpg may read it."""


# --- framing ------------------------------------------------------------------------------

START, BODY, END = 0, 1, 2
Event = tuple[int, int, memoryview]
_EMPTY = memoryview(b"")


class PacketReader:
    """Splits a stream into packets (RFC 4880 4.2): both header formats, one-, two- and
    five-octet lengths, partial body lengths, and old-format indeterminate lengths (the
    packet runs to the end of the stream). ``feed`` yields ``(START, tag, _)``, then
    ``(BODY, tag, piece)`` for its body (pieces of the caller's data: copy what you keep),
    then ``(END, tag, _)``; ``end`` finishes the stream.
    """

    def __init__(self) -> None:
        self._head = bytearray()  # a header, or the next length of a partial body
        self._tag = -1  # the packet whose body is being read; -1 between packets
        self._left = 0  # bytes left in the current part of the body
        self._more = False  # the current part is partial: another length follows
        self._open = False  # indeterminate length: the body runs to the end of the stream

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[Event]:
        view = memoryview(data).cast("B")
        pos, size = 0, len(view)
        while pos < size:
            if self._tag >= 0 and (self._left or self._open):
                n = size - pos if self._open else min(self._left, size - pos)
                yield (BODY, self._tag, view[pos : pos + n])
                pos += n
                if not self._open:
                    self._left -= n
                    if not self._left and not self._more:
                        yield (END, self._tag, _EMPTY)
                        self._tag = -1
                continue
            self._head.append(view[pos])
            pos += 1
            yield from self._header()

    def end(self) -> Iterator[Event]:
        """The stream ended: only an indeterminate-length packet may be open."""
        if self._tag >= 0 and self._open:
            yield (END, self._tag, _EMPTY)
            self._tag = -1
            self._open = False
        elif self._tag >= 0 or self._head:
            raise PacketError("truncated packet")

    def _header(self) -> Iterator[Event]:
        head = self._head
        if self._tag >= 0:  # the next length of a partial body
            parsed = _new_length(head, 0)
            if parsed is None:
                return
            self._left, self._more = parsed
            head.clear()
        else:
            first = head[0]
            if not first & 0x80:
                raise PacketError("not an OpenPGP packet")
            if first & 0x40:  # new format
                tag = first & 0x3F
                parsed = _new_length(head, 1)
                if parsed is None:
                    return
                self._left, self._more = parsed
                if self._more and tag not in _DATA_TAGS:
                    raise PacketError(f"partial length on a packet of tag {tag}")
            else:
                tag = (first >> 2) & 0x0F
                kind = first & 3
                if kind == 3:
                    self._open = True
                    self._left = 0
                else:
                    width = 1 << kind
                    if len(head) < 1 + width:
                        return
                    self._left = int.from_bytes(head[1 : 1 + width], "big")
                self._more = False
            if tag == 0:
                raise PacketError("packet with the reserved tag 0")
            head.clear()
            self._tag = tag
            yield (START, tag, _EMPTY)
        if not self._left and not self._more and not self._open:
            yield (END, self._tag, _EMPTY)
            self._tag = -1


def _new_length(head: bytearray, at: int) -> tuple[int, bool] | None:
    """A new-format length starting at ``head[at]``: (length, partial), or None until the
    header is complete."""
    if len(head) <= at:
        return None
    first = head[at]
    if first < 192:
        return first, False
    if first < 224:
        if len(head) < at + 2:
            return None
        return ((first - 192) << 8) + head[at + 1] + 192, False
    if first < 255:
        return 1 << (first & 0x1F), True
    if len(head) < at + 5:
        return None
    return int.from_bytes(head[at + 1 : at + 5], "big"), False


def new_length(length: int) -> bytes:
    """A new-format (definite) body length."""
    if length < 192:
        return bytes([length])
    if length < 8384:
        length -= 192
        return bytes([(length >> 8) + 192, length & 0xFF])
    return b"\xff" + length.to_bytes(4, "big")


def packet(tag: int, body: bytes) -> bytes:
    """A whole packet in the new format."""
    return bytes([0xC0 | tag]) + new_length(len(body)) + body


class BodyWriter:
    """One packet written as its body comes, in the new format: with a definite length
    when it is known up front, else in partial parts of ``2**part_bits`` bytes (RFC 4880
    4.2.2.4: a power of two, the first at least 512) and a definite last part."""

    def __init__(self, tag: int, length: int | None, part_bits: int = 16) -> None:
        assert part_bits >= 9 and (length is not None or tag in _DATA_TAGS)
        self.length = length
        self._part = 1 << part_bits
        self._part_head = bytes([0xE0 | part_bits])
        self._pending = bytearray()
        self._written = 0
        head = bytes([0xC0 | tag])
        self.header = head + new_length(length) if length is not None else head

    def write(self, data: bytes | bytearray | memoryview) -> bytes:
        self._written += len(data)
        if self.length is not None:
            if self._written > self.length:
                raise OpenPGPError("more data than the packet's length")
            return bytes(data)
        pending = self._pending
        pending += data
        if len(pending) < self._part:
            return b""
        out = bytearray()
        view = memoryview(pending)
        n = 0
        while len(pending) - n >= self._part:
            out += self._part_head
            out += view[n : n + self._part]
            n += self._part
        view.release()
        del pending[:n]
        return bytes(out)

    def finish(self) -> bytes:
        if self.length is not None:
            if self._written != self.length:
                raise OpenPGPError("less data than the packet's length")
            return b""
        out = new_length(len(self._pending)) + self._pending
        self._pending = bytearray()
        return out


# --- S2K ----------------------------------------------------------------------------------

S2K_SIMPLE, S2K_SALTED, S2K_ITERATED = 0, 1, 3
# The iterated S2K hashes its input repeated to this many bytes per update (fewer calls).
_S2K_BLOCK = 1 << 16


def decode_count(coded: int) -> int:
    """The number of bytes an iterated S2K hashes, from its one-octet coding."""
    return (16 + (coded & 15)) << ((coded >> 4) + 6)


def encode_count(count: int) -> int:
    """The smallest coding of at least ``count`` bytes (at most 65011712)."""
    return next((c for c in range(256) if decode_count(c) >= count), 255)


@dataclass(frozen=True)
class S2K:
    """A string-to-key specifier (RFC 4880 3.7): simple, salted or iterated and salted."""

    mode: int
    hash_algo: int
    salt: bytes = b""
    coded_count: int = 0

    @classmethod
    def parse(cls, data: bytes, at: int) -> tuple[S2K, int]:
        """The specifier at ``data[at:]`` and where it ends."""
        if len(data) < at + 2:
            raise PacketError("truncated S2K specifier")
        mode, algo = data[at], data[at + 1]
        if mode not in (S2K_SIMPLE, S2K_SALTED, S2K_ITERATED):
            raise Unsupported(f"S2K type {mode}")
        end = at + {S2K_SIMPLE: 2, S2K_SALTED: 10, S2K_ITERATED: 11}[mode]
        if len(data) < end:
            raise PacketError("truncated S2K specifier")
        salt = bytes(data[at + 2 : at + 10]) if mode != S2K_SIMPLE else b""
        spec = cls(mode, algo, salt, data[at + 10] if mode == S2K_ITERATED else 0)
        if algo not in HASHES:
            raise Unsupported(f"S2K hash algorithm {algo}")
        return spec, end

    def encode(self) -> bytes:
        out = bytes([self.mode, self.hash_algo]) + self.salt
        return out + bytes([self.coded_count]) if self.mode == S2K_ITERATED else out

    def contexts(self, size: int) -> int:
        """How many hash contexts a key of ``size`` bytes needs (RFC 4880 3.7.1.1)."""
        return -(-size // self._new().digest_size)

    def derive(self, passphrase: bytes, size: int) -> bytes:
        """The ``size``-byte key; each context is independent (``context``), so a caller
        may compute them in parallel and join them instead."""
        digests = [self.context(passphrase, i) for i in range(self.contexts(size))]
        return b"".join(digests)[:size]

    def context(self, passphrase: bytes, index: int) -> bytes:
        """The digest of hash context ``index``: preloaded with ``index`` zero bytes, then
        salt and passphrase (repeated up to the count, for the iterated S2K)."""
        h = self._new()
        h.update(bytes(index))
        data = self.salt + passphrase
        if self.mode != S2K_ITERATED:
            h.update(data)
            return h.digest()
        # The whole of salt and passphrase at least once, even beyond the count.
        count = max(decode_count(self.coded_count), len(data))
        block = data * max(1, _S2K_BLOCK // max(1, len(data)))
        full, rest = divmod(count, len(block))
        for _ in range(full):
            h.update(block)
        h.update(block[:rest])  # block is whole copies of data: its head continues the run
        return h.digest()

    def _new(self) -> hashlib._Hash:
        try:
            return hashlib.new(HASHES[self.hash_algo])
        except ValueError:  # not in this Python's OpenSSL (RIPEMD-160 often is not)
            raise Unsupported(f"S2K hash {HASHES[self.hash_algo]}") from None


# --- the packets inside the encryption ---------------------------------------------------------


class InnerReader:
    """The plaintext of an encrypted packet, less its prefix and MDC: a literal packet,
    alone or in one compressed packet (marker packets are skipped). ``feed`` and ``end``
    yield the literal data; anything else raises.

    Signed messages and nested compression are ``Unsupported`` (gpg reads them); a second
    literal packet, or packets where none belongs, are ``PacketError``.
    """

    def __init__(self) -> None:
        self._outer = PacketReader()
        self._inner: PacketReader | None = None  # the packets inside a compressed one
        self._algo = -1  # of the compressed packet; -1 until its first body byte
        self._zlib: zlib._Decompress | None = None
        self._bz2: bz2.BZ2Decompressor | None = None
        self._literals = 0
        self._literal_head = bytearray()
        self._in_literal_data = False

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[bytes | memoryview]:
        for event in self._outer.feed(data):
            yield from self._outer_event(event)

    def end(self) -> Iterator[bytes | memoryview]:
        for event in self._outer.end():
            yield from self._outer_event(event)
        if self._inner is not None or self._algo >= 0:
            raise PacketError("compressed packet not finished")
        if self._literals != 1:
            raise PacketError("no literal data packet")

    # -- the outer level (directly inside the encryption) ------------------------------------

    def _outer_event(self, event: Event) -> Iterator[bytes | memoryview]:
        kind, tag, data = event
        if tag == COMPRESSED:
            yield from self._compressed(kind, data)
        else:
            yield from self._packet(kind, tag, data)

    def _compressed(self, kind: int, data: memoryview) -> Iterator[bytes | memoryview]:
        if kind == START:
            if self._literals:
                raise PacketError("compressed packet after the literal data")
            return
        if kind == END:
            yield from self._end_compressed()
            return
        if self._algo < 0:
            if not data:
                return
            self._start_compressed(data[0])
            data = data[1:]
        yield from self._inflate(data)

    def _start_compressed(self, algo: int) -> None:
        if self._inner is not None or self._algo == -2:
            raise PacketError("a second compressed packet")
        if algo == ZIP:
            self._zlib = zlib.decompressobj(-15)
        elif algo == ZLIB:
            self._zlib = zlib.decompressobj(15)
        elif algo == BZIP2:
            import bz2  # noqa: PLC0415 - rarely used

            self._bz2 = bz2.BZ2Decompressor()
        elif algo != UNCOMPRESSED:
            raise Unsupported(f"compression algorithm {algo}")
        self._algo = algo
        self._inner = PacketReader()

    def _inflate(self, data: bytes | memoryview) -> Iterator[bytes | memoryview]:
        """Decompressed pieces of at most OUT_PIECE bytes, each handed to the inner level."""
        assert self._inner is not None
        if self._algo == UNCOMPRESSED:
            if data:
                yield from self._inner_pieces(data)
            return
        if self._zlib is not None:
            z = self._zlib
            try:
                while data:
                    if z.eof:
                        raise PacketError("data after the end of the compressed stream")
                    out = z.decompress(data, OUT_PIECE)
                    data = z.unconsumed_tail
                    if out:
                        yield from self._inner_pieces(out)
            except zlib.error as exc:
                raise PacketError(f"bad compressed data: {exc}") from None
            return
        b = self._bz2
        assert b is not None
        try:
            while True:
                if b.eof:
                    if data:
                        raise PacketError("data after the end of the compressed stream")
                    return
                if not data and b.needs_input:
                    return
                out = b.decompress(data, OUT_PIECE)
                data = b""
                if out:
                    yield from self._inner_pieces(out)
        except OSError as exc:
            raise PacketError(f"bad compressed data: {exc}") from None

    def _end_compressed(self) -> Iterator[bytes | memoryview]:
        if self._algo < 0:
            raise PacketError("empty compressed packet")
        if self._zlib is not None and not self._zlib.eof:
            raise PacketError("compressed stream cut short")
        if self._bz2 is not None:
            yield from self._inflate(b"")
            if not self._bz2.eof:
                raise PacketError("compressed stream cut short")
        assert self._inner is not None
        for event in self._inner.end():
            yield from self._packet(*event)
        self._inner = None
        self._zlib = None
        self._bz2 = None
        self._algo = -2  # done: no second one

    def _inner_pieces(self, data: bytes | memoryview) -> Iterator[bytes | memoryview]:
        assert self._inner is not None
        for kind, tag, piece in self._inner.feed(data):
            if tag == COMPRESSED:
                raise Unsupported("nested compressed packets")
            yield from self._packet(kind, tag, piece)

    # -- literal and the rest ----------------------------------------------------------------

    def _packet(self, kind: int, tag: int, data: memoryview) -> Iterator[bytes | memoryview]:
        if tag == LITERAL:
            yield from self._literal(kind, data)
        elif tag == MARKER:
            return
        elif tag in (SIGNATURE, ONE_PASS):
            raise Unsupported("signed message")
        elif tag == MDC:
            raise PacketError("MDC packet in the wrong place")
        else:
            raise PacketError(f"unexpected packet (tag {tag}) in the encrypted data")

    def _literal(self, kind: int, data: memoryview) -> Iterator[bytes | memoryview]:
        if kind == START:
            self._literals += 1
            if self._literals > 1:
                raise PacketError("more than one literal data packet")
            return
        if kind == END:
            if not self._in_literal_data:
                raise PacketError("truncated literal data header")
            return
        head = self._literal_head
        while not self._in_literal_data:
            need = _literal_head_size(head)
            if len(head) >= need:
                if head[0] not in b"btu":
                    raise Unsupported(f"literal data format {bytes(head[:1])!r}")
                self._in_literal_data = True
            elif not data:
                return
            else:
                take = min(len(data), need - len(head))
                head += data[:take]
                data = data[take:]
        if data:
            yield data


def _literal_head_size(head: bytearray) -> int:
    """The size of a literal packet's header, as far as known from its first bytes."""
    return 6 if len(head) < 2 else 6 + head[1]


__all__ = [
    "BODY",
    "END",
    "S2K",
    "START",
    "BodyWriter",
    "InnerReader",
    "IntegrityError",
    "OpenPGPError",
    "PacketError",
    "PacketReader",
    "Unsupported",
    "new_length",
    "packet",
]
