"""OpenPGP symmetric encryption with a passphrase, in-process: what ``gpg --symmetric
--force-mdc`` writes and reads, as git-annex runs it for ``encryption=shared`` and
``hybrid`` content (``crypto.py``). Sans-IO: bytes in, bytes out.

Framing, S2K and the inner packets are ``openpgp.py``'s; this module adds the cipher
(``cryptography``'s AES and Camellia in CFB mode; imported by the caller only when an
object is encrypted or decrypted, never at start-up) and the MDC.

Reading (``Decryptor``): one SKESK v4 (any S2K of RFC 4880, with or without an encrypted
session key), then a SEIPD v1 packet: CFB with an IV of zeros over a random prefix, the
packets and the MDC packet (plain CFB: OpenPGP's resynchronising CFB variant belongs to the
old SED packet only). Plaintext comes out as it is decrypted and is NOT verified until
``finish`` returns: the MDC covers all of it, so the caller keeps it aside (a spool) and
trusts it only then. Anything this reader does not do raises ``Unsupported`` before any
judgement on the data is made, so that gpg can be asked instead.

Writing (``Encryptor``): SKESK v4 (AES-256, iterated and salted S2K with SHA-256) and a
SEIPD v1 holding one uncompressed binary literal packet: what gpg 2.2 and later read.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable, Iterator

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.ciphers import (
    BlockCipherAlgorithm,
    Cipher,
    CipherContext,
    algorithms,
)

from git_remote_annexproxy.openpgp import (
    AEAD,
    BODY,
    END,
    LITERAL,
    MARKER,
    PKESK,
    S2K,
    S2K_ITERATED,
    SED,
    SEIPD,
    SHA256,
    SKESK,
    START,
    BodyWriter,
    InnerReader,
    IntegrityError,
    OpenPGPError,
    PacketError,
    PacketReader,
    Unsupported,
    encode_count,
    packet,
)

try:  # cryptography >= 43 keeps CFB and the older ciphers as "decrepit", warning elsewhere
    from cryptography.hazmat.decrepit.ciphers import algorithms as old_algorithms
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers import (  # type: ignore[no-redef]
        algorithms as old_algorithms,
    )
    from cryptography.hazmat.primitives.ciphers.modes import CFB

# Symmetric algorithms (RFC 4880 9.2) this reader has: id -> (class, key size). Twofish
# (10) is not in cryptography, and an OpenSSL without its legacy provider lacks the 64-bit
# block ones at run time: objects using those go to gpg.
_CIPHERS: dict[int, tuple[Callable[[bytes], BlockCipherAlgorithm], int]] = {
    2: (old_algorithms.TripleDES, 24),
    3: (old_algorithms.CAST5, 16),
    4: (old_algorithms.Blowfish, 16),
    7: (algorithms.AES, 16),
    8: (algorithms.AES, 24),
    9: (algorithms.AES, 32),
    11: (old_algorithms.Camellia, 16),
    12: (old_algorithms.Camellia, 24),
    13: (old_algorithms.Camellia, 32),
}
if hasattr(old_algorithms, "IDEA"):
    _CIPHERS[1] = (old_algorithms.IDEA, 16)
AES256 = 9
_BLOCK = 16  # AES's block size, for the writer
_MDC_HEAD = b"\xd3\x14"  # the MDC packet's header: new format, tag 19, 20 bytes
_MDC_SIZE = 22
# An SKESK is a few dozen bytes; a longer one is garbage (v5/v6 ones are refused first).
_MAX_SKESK = 1024

# What our writer's S2K hashes: see Encryptor.
WRITE_S2K_COUNT = 65536

KeyDerivation = Callable[[S2K, bytes, int], bytes]


def gpg_passphrase(passphrase: bytes) -> bytes:
    """The passphrase gpg uses when given ``passphrase`` on ``--passphrase-fd``: up to the
    first newline (git-annex's cipher ends with one)."""
    return passphrase.split(b"\n", 1)[0]


def _cfb(algo: int, key: bytes) -> tuple[Cipher[CFB], int]:
    """The cipher in CFB mode with an IV of zeros (OpenPGP's for SEIPD v1 and for an ESK),
    and its block size in bytes."""
    make, size = _CIPHERS[algo]
    if len(key) != size:
        raise PacketError("session key of the wrong size")
    try:
        cipher = make(key)
        block = cipher.block_size // 8
        return Cipher(cipher, CFB(bytes(block))), block
    except UnsupportedAlgorithm:
        raise Unsupported(f"cipher algorithm {algo} (not in this OpenSSL)") from None


class Decryptor:
    """Reads one object. ``feed`` and ``finish`` yield plaintext pieces (memory views
    valid until the next step: copy or write them out); ``finish`` raises unless the whole
    object was read and its MDC matched. ``passphrase`` as given to gpg."""

    def __init__(self, passphrase: bytes, derive: KeyDerivation | None = None) -> None:
        self._passphrase = gpg_passphrase(passphrase)
        self._derive: KeyDerivation = derive or (lambda s2k, pw, n: s2k.derive(pw, n))
        self._packets = PacketReader()
        self._started = False
        self._skesk = bytearray()
        self._skesks = 0
        self._algo = 0
        self._s2k: S2K | None = None
        self._esk = b""
        self._seen_version = False
        self._cfb: CipherContext | None = None
        self._mdc = hashlib.sha1()  # noqa: S324 - the MDC is SHA-1 (RFC 4880 5.14)
        self._prefix_left = -1  # the random prefix: a block and two bytes
        self._held = b""  # the last bytes decrypted: the MDC packet, once all is in
        self._inner = InnerReader()
        self._inner_failure: OpenPGPError | None = None
        self._done = False  # the encrypted packet ended and its MDC matched
        self.plaintext = 0  # bytes yielded so far
        self.consumed = 0  # bytes fed so far

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[bytes | memoryview]:
        self.consumed += len(data)
        if not self._started and data:
            self._started = True
            if data[0] == ord("-"):  # "-----BEGIN PGP MESSAGE-----" (gpg's --armor)
                raise Unsupported("ASCII-armored message")
        for event in self._packets.feed(data):
            yield from self._event(event)

    def finish(self) -> Iterator[bytes | memoryview]:
        for event in self._packets.end():
            yield from self._event(event)
        if not self._done:
            raise PacketError("no complete encrypted data packet")
        if self._inner_failure is not None:
            # Authentic (the MDC matched) but not readable here: gpg may read it.
            raise Unsupported(str(self._inner_failure))

    # -- top level ---------------------------------------------------------------------------

    def _event(self, event: tuple[int, int, memoryview]) -> Iterator[bytes | memoryview]:
        kind, tag, data = event
        if self._done:
            raise PacketError("data after the encrypted data packet")
        if tag == SKESK:
            self._session_key_packet(kind, data)
        elif tag == SEIPD:
            yield from self._encrypted(kind, data)
        elif tag == MARKER:
            pass
        elif tag == PKESK:
            raise Unsupported("encrypted to a public key")
        elif tag == SED:
            raise Unsupported("encrypted without integrity protection (SED packet)")
        elif tag == AEAD:
            raise Unsupported("AEAD encrypted data packet")
        else:
            raise PacketError(f"unexpected packet (tag {tag})")

    def _session_key_packet(self, kind: int, data: memoryview) -> None:
        if kind == START:
            self._skesks += 1
            if self._skesks > 1:
                raise Unsupported("more than one session key packet")
            if self._seen_version:
                raise PacketError("session key packet after the encrypted data")
        elif kind == BODY:
            self._skesk += data
            if len(self._skesk) > _MAX_SKESK:
                raise PacketError("session key packet too long")
        else:
            self._parse_skesk(bytes(self._skesk))

    def _parse_skesk(self, body: bytes) -> None:
        if not body:
            raise PacketError("empty session key packet")
        if body[0] in (5, 6):
            raise Unsupported(f"version {body[0]} session key packet (AEAD)")
        if body[0] != 4 or len(body) < 2:
            raise PacketError(f"session key packet of version {body[0]}")
        if body[1] not in _CIPHERS:
            raise Unsupported(f"cipher algorithm {body[1]}")
        self._algo = body[1]
        self._s2k, end = S2K.parse(body, 2)
        self._esk = body[end:]

    def _session_key(self) -> tuple[int, bytes]:
        assert self._s2k is not None
        kek = self._derive(self._s2k, self._passphrase, _CIPHERS[self._algo][1])
        if not self._esk:
            return self._algo, kek
        decryptor = _cfb(self._algo, kek)[0].decryptor()
        plain = decryptor.update(self._esk) + decryptor.finalize()
        if plain[0] not in _CIPHERS:
            raise Unsupported(f"session key for cipher algorithm {plain[0]}")
        return plain[0], plain[1:]

    # -- the encrypted data ----------------------------------------------------------------------

    def _encrypted(self, kind: int, data: memoryview) -> Iterator[bytes | memoryview]:
        if kind == START:
            if not self._skesks:
                raise PacketError("encrypted data without a session key packet")
            return
        if kind == END:
            if not self._seen_version:
                raise PacketError("empty encrypted data packet")
            yield from self._end()
            return
        if not data:
            return
        if not self._seen_version:
            if data[0] == 2:
                raise Unsupported("version 2 encrypted data packet (AEAD)")
            if data[0] != 1:
                raise PacketError(f"encrypted data packet of version {data[0]}")
            self._seen_version = True
            algo, key = self._session_key()
            cipher, block = _cfb(algo, key)
            self._cfb = cipher.decryptor()
            self._prefix_left = block + 2
            data = data[1:]
            if not data:
                return
        assert self._cfb is not None
        plain = self._cfb.update(data)
        # Hold back the last 22 bytes: they are the MDC packet once the data ends.
        if len(plain) >= _MDC_SIZE:
            view = memoryview(plain)
            held, self._held = self._held, bytes(view[-_MDC_SIZE:])
            yield from self._plain(held)
            yield from self._plain(view[:-_MDC_SIZE])
        else:
            joined = self._held + plain
            release = len(joined) - _MDC_SIZE
            self._held = joined[max(0, release) :]
            if release > 0:
                yield from self._plain(memoryview(joined)[:release])

    def _plain(self, data: bytes | memoryview) -> Iterator[bytes | memoryview]:
        if not data:
            return
        self._mdc.update(data)
        if self._prefix_left:
            # The random prefix (a block and a repeat of its last two bytes). Its "quick
            # check" is deliberately not used: answering early on it is the oracle RFC
            # 4880's security considerations warn about. Only the MDC decides.
            cut = min(self._prefix_left, len(data))
            self._prefix_left -= cut
            data = data[cut:]
            if not data:
                return
        if self._inner_failure is not None:
            return
        try:
            for piece in self._inner.feed(data):
                self.plaintext += len(piece)
                yield piece
        except OpenPGPError as exc:
            # Keep decrypting: whether the object is damaged (refused) or only unusual
            # (gpg's to read) is known once the MDC is checked.
            self._inner_failure = exc

    def _end(self) -> Iterator[bytes | memoryview]:
        assert self._cfb is not None
        rest = self._cfb.finalize()  # CFB: nothing buffered
        assert not rest
        held = self._held
        if self._prefix_left or len(held) != _MDC_SIZE:
            raise PacketError("encrypted data too short")
        self._mdc.update(held[:2])
        if held[:2] != _MDC_HEAD or not hmac.compare_digest(self._mdc.digest(), held[2:]):
            raise IntegrityError("modification detection code mismatch (damaged object, or "
                                 "not encrypted with this remote's cipher)")  # fmt: skip
        self._done = True
        if self._inner_failure is None:
            try:
                for piece in self._inner.end():
                    self.plaintext += len(piece)
                    yield piece
            except OpenPGPError as exc:
                self._inner_failure = exc


class Encryptor:
    """Writes one object: ``start()``, ``update(data)``..., ``finish()``, the pieces of
    ciphertext to store in that order. With ``length`` the packets get definite lengths and
    exactly that many bytes must come; without it, partial lengths.

    Key derivation. Every object gets a fresh random salt, hence its own S2K key (the
    session key: no ESK, as gpg writes it), with a small iteration count. That is sound
    here: the passphrase is git-annex's cipher, hundreds of random base64 characters and
    never a human secret, so a work factor against guessing buys nothing (the count only
    makes guessing a weak passphrase slower), while gpg's calibrated count costs tens of
    millions of hashed bytes per object. The cheap per-object derivation (a few
    microseconds) is preferred to deriving one key-encryption key per session and
    wrapping a fresh session key per object: v4 SKESKs encrypt the session key in CFB
    mode with an IV of zeros, so objects sharing a key-encryption key would share the
    first keystream block, leaking the XOR of their session keys' first bytes.
    """

    def __init__(
        self,
        passphrase: bytes,
        length: int | None = None,
        *,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._passphrase = gpg_passphrase(passphrase)
        self._random = random
        self.length = length
        self._mdc = hashlib.sha1()  # noqa: S324 - the MDC is SHA-1 (RFC 4880 5.14)
        self._cfb: CipherContext | None = None
        self._literal = BodyWriter(LITERAL, None if length is None else 6 + length)
        inner = None if length is None else _BLOCK + 2 + len(self._literal.header) + 6 + length
        self._outer = BodyWriter(SEIPD, None if inner is None else 1 + inner + _MDC_SIZE)

    def start(self) -> bytes:
        s2k = S2K(S2K_ITERATED, SHA256, self._random(8), encode_count(WRITE_S2K_COUNT))
        key = s2k.derive(self._passphrase, 32)
        self._cfb = _cfb(AES256, key)[0].encryptor()
        prefix = self._random(_BLOCK)
        # A binary literal packet with no file name and a zero date (nothing to leak).
        literal = self._literal.header + self._literal.write(b"b\x00\x00\x00\x00\x00")
        head = packet(SKESK, bytes([4, AES256]) + s2k.encode()) + self._outer.header
        return head + self._outer.write(b"\x01" + self._seal(prefix + prefix[-2:] + literal))

    def update(self, data: bytes | bytearray | memoryview) -> bytes:
        return self._outer.write(self._seal(self._literal.write(data)))

    def finish(self) -> bytes:
        sealed = self._seal(self._literal.finish())
        self._mdc.update(_MDC_HEAD)
        assert self._cfb is not None
        tail = self._cfb.update(_MDC_HEAD + self._mdc.digest()) + self._cfb.finalize()
        return self._outer.write(sealed + tail) + self._outer.finish()

    def _seal(self, plain: bytes) -> bytes:
        if not plain:
            return b""
        assert self._cfb is not None
        self._mdc.update(plain)
        return self._cfb.update(plain)


__all__ = [
    "Decryptor",
    "Encryptor",
    "IntegrityError",
    "OpenPGPError",
    "PacketError",
    "Unsupported",
    "gpg_passphrase",
]
