"""git-annex keys: parse/print, keyFile escaping, object hash directories, content checks.

Pure module: no I/O. Follows git-annex 10.20261026 (``Types/Key.hs``, ``Annex/Locations.hs``
keyFile, ``Annex/DirHashes.hs``, ``Backend/Hash.hs``); every rule below was checked against
the real binary (see ``tests/test_keys.py``).

Strings are ``str`` decoded from UTF-8 with ``surrogateescape`` (see HACKING.md); every
length or hash is computed on the re-encoded bytes, as git-annex works on bytes.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

# Longer keys are refused outright. git-annex has no cap, but nothing legitimate comes close
# (a keyfile is a single path component, 255 bytes on most filesystems).
MAX_KEY_LENGTH = 8192
# git-annex's validKeyName: for backends ending in "E", the name from its first "." (the dot
# included) is at most 64 bytes, so a key cannot smuggle SHA1-collision data into git.
MAX_EXTENSION_LENGTH = 64
# git-annex stores the mtime in a 64-bit time_t and silently wraps larger values into a
# different key; we refuse them instead.
_MAX_MTIME = 2**63 - 1
# git-annex's sizes are unbounded, but Python refuses int<->str conversions past 4300 digits
# (with a plain ValueError), so numeric fields are capped well below that.
MAX_FIELD_DIGITS = 100

_FIELDS = (("s", "size"), ("m", "mtime"), ("S", "chunk_size"), ("C", "chunk_num"))


class BadKey(ValueError):
    """A string that is not a key (git-annex would answer ``ERROR unknown command``)."""


def _encode(s: str) -> bytes:
    try:
        return s.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that no byte string decodes to
        raise BadKey("key is not encodable") from None


@dataclass(frozen=True, slots=True)
class Key:
    """A parsed key. Equality and hashing ignore ``raw``, so ``-s03`` equals ``-s3``."""

    backend: str
    name: str
    size: int | None = None
    mtime: int | None = None
    chunk_size: int | None = None
    chunk_num: int | None = None
    raw: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Validating here (not only in parse) means a directly built Key is always one that
        # parse would accept, so str() of it can never produce an unparsable or unsafe key.
        if not self.backend or "-" in self.backend:
            raise BadKey("key backend is empty or contains '-'")
        for v in (self.backend, self.name):
            if "\n" in v or "\0" in v:
                raise BadKey("key contains a newline or NUL")
        for letter, attr in _FIELDS:
            n = getattr(self, attr)
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
                raise BadKey(f"key field -{letter} is not a non-negative integer")
            if n is not None and n >= 10**MAX_FIELD_DIGITS:
                raise BadKey(f"key field -{letter} too long")
        if self.mtime is not None and self.mtime > _MAX_MTIME:
            raise BadKey("key mtime out of range")
        if len(_encode(self.canonical())) > MAX_KEY_LENGTH:
            raise BadKey("key too long")
        # git-annex applies this to every backend whose name ends in "E", even unknown ones.
        if self.backend.endswith("E"):
            dot = self.name.find(".")
            if dot >= 0 and len(_encode(self.name[dot:])) > MAX_EXTENSION_LENGTH:
                raise BadKey("key extension longer than 64 bytes")
        # dataclasses.replace() copies raw; a stale one would make str() print another key.
        if self.raw is not None and self.raw != self.canonical() and _split(self.raw) != self:
            raise BadKey("raw does not match the key's fields")

    @classmethod
    def parse(cls, s: str) -> Key:
        """Parse ``BACKEND[-sN][-mN][-SN][-CN]--NAME`` as strictly as git-annex does.

        Fields are optional but in this order, each ``-`` + letter + ASCII digits (leading
        zeros allowed, as git-annex accepts them; at most MAX_FIELD_DIGITS). The name is
        everything after the first ``--`` and may be empty. Raises BadKey.
        """
        k = _split(s)
        return cls(k.backend, k.name, k.size, k.mtime, k.chunk_size, k.chunk_num, raw=s)

    def canonical(self) -> str:
        """The serialization git-annex itself produces (no leading zeros).

        git-annex re-serializes every key it parses, so object paths and branch logs use
        this form, never the raw wire string.
        """
        out = [self.backend]
        for letter, attr in _FIELDS:
            v = getattr(self, attr)
            if v is not None:
                out.append(f"-{letter}{v}")
        out.append("--")
        out.append(self.name)
        return "".join(out)

    def __str__(self) -> str:
        """The key as received, if parsed (the wire echoes it verbatim), else canonical."""
        return self.raw if self.raw is not None else self.canonical()

    def keyfile(self) -> str:
        """git-annex's keyFile: one path component naming the object file and its directory.

        Exactly these four characters are escaped; ``&`` and ``%`` first so the mapping is
        one to one. The result never contains ``/`` and is never ``.``/``..`` (it contains
        ``--``).
        """
        k = self.canonical()
        return k.replace("&", "&a").replace("%", "&s").replace(":", "&c").replace("/", "%")

    def without_chunk(self) -> Key:
        return replace(self, chunk_size=None, chunk_num=None, raw=None)

    def _md5(self) -> bytes:
        # Chunks of one key share its object directory.
        data = _encode(self.without_chunk().canonical())
        return hashlib.md5(data, usedforsecurity=False).digest()

    def hashdir_lower(self) -> str:
        """Bare-repository object dir, e.g. ``e7d/d01``: the first 6 hex digits of the md5."""
        h = self._md5().hex()
        return f"{h[0:3]}/{h[3:6]}"

    def hashdir_mixed(self) -> str:
        """Non-bare object dir, e.g. ``vK/z8``: git-annex's display_32bits_as_dir."""
        s = "".join(_word_as_dir(w) for w in struct.unpack("<4I", self._md5()))
        return f"{s[0:2]}/{s[2:4]}"

    @property
    def verifiable(self) -> bool:
        """True when ``verifier()`` checks a hash, not only the size."""
        return self.chunk_num is None and self.chunk_size is None and _hasher(self) is not None

    def verifier(self) -> Verifier:
        return Verifier(self)


def _split(s: str) -> Key:
    """The grammar of Key.parse; returns a Key without raw."""
    # On the string as received, before any other work on it (the canonical form checked
    # in __post_init__ can be shorter).
    if len(s) > MAX_KEY_LENGTH or len(_encode(s)) > MAX_KEY_LENGTH:
        raise BadKey("key too long")
    # The backend cannot contain "-" and the fields cannot contain "--", so the first "--"
    # is always the one before the name.
    head, sep, name = s.partition("--")
    if not sep:
        raise BadKey("key has no '--'")
    backend, *fields = head.split("-")
    nums: list[int | None] = [None] * len(_FIELDS)
    nxt = 0  # index into _FIELDS of the first letter still allowed
    for f in fields:
        letters = [letter for letter, _ in _FIELDS[nxt:]]
        digits = f[1:]
        if f[:1] not in letters or not (digits.isascii() and digits.isdigit()):
            raise BadKey(f"bad key field {f[:16]!r}")
        if len(digits) > MAX_FIELD_DIGITS:
            raise BadKey("key field too long")
        i = nxt + letters.index(f[0])
        nums[i] = int(digits)
        nxt = i + 1
    size, mtime, chunk_size, chunk_num = nums
    return Key(backend, name, size, mtime, chunk_size, chunk_num)


# Letters chosen by git-annex to avoid making real words.
_DIR_CHARS = "0123456789zqjxkmvwgpfZQJXKMVWGPF"


def _word_as_dir(w: int) -> str:
    # Eight 5-bit digits from bits 0,6,12,..., pairs swapped; only the first 6 are kept.
    cs = [_DIR_CHARS[(w >> (6 * x)) & 31] for x in range(8)]
    return "".join(cs[i + 1] + cs[i] for i in range(0, 8, 2))[:6]


class _Hash(Protocol):
    def update(self, data: bytes | bytearray | memoryview, /) -> None: ...
    def hexdigest(self) -> str: ...


def _blake(fn: Callable[..., _Hash], bits: int) -> Callable[[], _Hash]:
    return lambda: fn(digest_size=bits // 8)


# Backend name without its "E" -> fresh hash object. Python's blake2b/2s with a reduced
# digest_size are exactly git-annex's (cryptonite) BLAKE2B160 etc.; checked in the tests.
_HASHES: dict[str, Callable[[], _Hash]] = {
    "MD5": lambda: hashlib.md5(usedforsecurity=False),
    "SHA1": lambda: hashlib.sha1(usedforsecurity=False),
    "SHA224": hashlib.sha224,
    "SHA256": hashlib.sha256,
    "SHA384": hashlib.sha384,
    "SHA512": hashlib.sha512,
    "SHA3_224": hashlib.sha3_224,
    "SHA3_256": hashlib.sha3_256,
    "SHA3_384": hashlib.sha3_384,
    "SHA3_512": hashlib.sha3_512,
    **{f"BLAKE2B{n}": _blake(hashlib.blake2b, n) for n in (160, 224, 256, 384, 512)},
    **{f"BLAKE2S{n}": _blake(hashlib.blake2s, n) for n in (160, 224, 256)},
}


def _hasher(key: Key) -> Callable[[], _Hash] | None:
    b = key.backend
    return _HASHES.get(b) or (_HASHES.get(b[:-1]) if b.endswith("E") else None)


class Verifier:
    """Incremental content check for one key: feed ``update()``, then ask ``ok()``.

    Checks the size when the key has one, and for MD5, SHA1, SHA2, SHA3, BLAKE2B and BLAKE2S
    keys (with or without ``E``) the lowercase hex digest. Content of every other key (WORM,
    URL, VURL, SKEIN*, BLAKE2BP512, BLAKE2SP*, BLAKE3_256, XXH3, external X* and unknown
    backends) is NOT hash-verified, only size-checked: anything of the right length passes.
    Chunk keys get no hash check (the digest is of the whole object); their size check uses
    the chunk's own length when it can be derived.
    """

    __slots__ = ("_expected_size", "_hash", "_key", "_length")

    def __init__(self, key: Key) -> None:
        self._key = key
        self._length = 0
        self._expected_size = key.size
        if key.chunk_size is not None or key.chunk_num is not None:
            self._expected_size = _chunk_length(key)
            self._hash: _Hash | None = None
        else:
            factory = _hasher(key)
            self._hash = factory() if factory else None

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._length += len(data)
        if self._hash is not None:
            self._hash.update(data)

    @property
    def length(self) -> int:
        return self._length

    def ok(self) -> bool:
        if self._expected_size is not None and self._length != self._expected_size:
            return False
        if self._hash is None:
            return True
        # Like git-annex's keyHash, the digest is the name up to its first "." for every hash
        # backend (old migrations left extensions on non-E keys). A "\" prefix from an old
        # git-annex bug is still accepted, as git-annex does.
        expected = self._key.name.partition(".")[0]
        digest = self._hash.hexdigest()
        return expected in (digest, "\\" + digest)


def _chunk_length(key: Key) -> int | None:
    # git-annex numbers chunks from 1, each chunk_size bytes except a shorter last one.
    if key.size is None or key.chunk_size is None or not key.chunk_num:
        return None
    return max(0, min(key.chunk_size, key.size - (key.chunk_num - 1) * key.chunk_size))
