"""Chunked storage on special remotes: chunk sizes, chunk keys, chunk logs, read layouts.

Pure module: no I/O. Follows git-annex 10.20261026 (``Remote/Helper/Chunked.hs``,
``Logs/Chunk.hs``, ``Logs/Chunk/Pure.hs``, ``Logs/MapLog.hs``, ``Utility/DataUnits.hs``);
the rules were checked against chunk files and logs the binary wrote
(``tests/test_special.py``).

* ``chunk=SIZE`` in remote.log splits content into pieces of SIZE bytes, stored under
  *chunk keys*: the key with ``-S<SIZE>-C<n>`` added, n from 1. Every chunk is SIZE bytes
  but the last; empty content is one empty chunk. Only "stable" keys are chunked.
* After all chunks are stored, the chunk log ``<hashdir>/<keyfile>.log.cnk`` on the
  git-annex branch records ``<clock> <uuid>:<SIZE> <count>``; removal sets the count to 0.
* A reader does not trust the remote's current ``chunk=``: content may sit there with any
  chunk size the log records, or unchunked (stored before chunking was configured).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from git_remote_annexproxy.annexlog import VectorClock, location_log_path
from git_remote_annexproxy.keys import Key

# --- chunk sizes (Utility/DataUnits.hs readSize with dataUnits) ---------------------------

_STORAGE = [("QB", "quettabyte", 10), ("RB", "ronnabyte", 9), ("YB", "yottabyte", 8),
            ("ZB", "zettabyte", 7), ("EB", "exabyte", 6), ("PB", "petabyte", 5),
            ("TB", "terabyte", 4), ("GB", "gigabyte", 3), ("MB", "megabyte", 2),
            ("kB", "kilobyte", 1), ("B", "byte", 0)]
_COMMITTEE = [("YiB", "yobibyte", 8), ("ZiB", "zebibyte", 7), ("EiB", "exbibyte", 6),
              ("PiB", "pebibyte", 5), ("TiB", "tebibyte", 4), ("GiB", "gibibyte", 3),
              ("MiB", "mebibyte", 2), ("KiB", "kibibyte", 1), ("B", "byte", 0)]
_BANDWIDTH = [("Ybit", "yottabit", 8), ("Zbit", "zettabit", 7), ("Ebit", "exabit", 6),
              ("Pbit", "petabit", 5), ("Tbit", "terabit", 4), ("Gbit", "gigabit", 3),
              ("Mbit", "megabit", 2), ("kbit", "kilobit", 1)]
# In git-annex's order: the first unit whose name matches wins ("mb" is a megabyte).
_UNITS: list[tuple[str, str, int]] = [
    *((a, n, 1000**p) for a, n, p in _STORAGE),
    *((a, n, 1024**p) for a, n, p in _COMMITTEE),
    *((a, n, 1000**p // 8) for a, n, p in _BANDWIDTH),
]
# Haskell's `reads :: Double`: optional sign, digits, optional fraction and exponent.
_NUMBER_RE = re.compile(r"\s*(-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)")
_UNIT_RE = re.compile(r"\s*([A-Za-z]*)")


def parse_size(text: str) -> int | None:
    """git-annex's readSize dataUnits: ``1MiB`` -> 1048576, ``0.5 GB`` -> 500000000.

    The unit (letters after the number, case-insensitive) matches an abbreviation, a name,
    a plural name, or an abbreviation without its final ``b``; no unit means bytes.
    Anything after the unit's letters is ignored, as git-annex ignores it.
    """
    m = _NUMBER_RE.match(text)
    if m is None:
        return None
    number = float(m.group(1))
    unit_m = _UNIT_RE.match(text, m.end())
    unit = unit_m.group(1).lower() if unit_m else ""
    if not unit:
        return round(number)
    for abbrev, name, multiplier in _UNITS:
        a, n = abbrev.lower(), name.lower()
        if unit in (a, n, n + "s") or a == unit + "b":
            # Haskell's round, like Python's, rounds halves to even.
            return round(number * multiplier)
    return None


class ChunkConfigError(ValueError):
    """A remote.log chunk setting this proxy cannot use."""


def configured_chunk_size(fields: dict[str, str]) -> int | None:
    """The chunk size new content is stored with (None: unchunked), from remote.log.

    ``chunksize=`` is git-annex's legacy chunking (a different on-disk format), refused
    rather than misread; ``chunk=0`` means unchunked, as in git-annex.
    """
    if "chunksize" in fields:
        raise ChunkConfigError("legacy chunksize= chunking is not supported")
    value = fields.get("chunk")
    if value is None:
        return None
    size = parse_size(value)
    if size is None or size < 0:
        raise ChunkConfigError(f"bad configuration chunk={value}")
    return size or None


# --- chunk keys ---------------------------------------------------------------------------

# Backends git-annex considers unstable (the same key may name different content): URL
# keys, and external backends, which we cannot ask. Their content is stored unchunked.
def is_stable(key: Key) -> bool:
    return key.backend != "URL" and not key.backend.startswith("X")


def chunk_count(length: int, chunk_size: int) -> int:
    """How many chunks ``length`` bytes take; empty content is one empty chunk."""
    return max(1, -(-length // chunk_size))


def chunk_keys(key: Key, chunk_size: int, count: int) -> list[Key]:
    base = replace(key.without_chunk(), chunk_size=chunk_size)
    return [replace(base, chunk_num=n) for n in range(1, count + 1)]


def chunk_length(key: Key) -> int | None:
    """Content length of one chunk key, when its key's size is known."""
    if key.size is None or key.chunk_size is None or not key.chunk_num:
        return key.size
    return max(0, min(key.chunk_size, key.size - (key.chunk_num - 1) * key.chunk_size))


# --- chunk logs (a MapLog from (uuid, chunk method) to a count) ----------------------------


def chunk_log_path(key: Key) -> str:
    """``aef/39f/SHA256E-s6--….txt.log.cnk``: next to the key's location log."""
    return location_log_path(key.without_chunk()) + ".cnk"


@dataclass(frozen=True, order=True)
class _Field:
    """A chunk log field ``uuid:method``. Methods that are not a decimal size (a newer
    git-annex's) are kept verbatim and sort after the sizes, as git-annex orders them."""

    uuid: bytes
    unknown: bool
    size: int
    raw: bytes

    @classmethod
    def parse(cls, text: bytes) -> _Field | None:
        uuid, sep, method = text.partition(b":")
        if not uuid or not sep or not method:
            return None
        if method.isdigit():
            return cls(uuid, False, int(method), b"")
        return cls(uuid, True, 0, method)

    def format(self) -> bytes:
        return self.uuid + b":" + (self.raw if self.unknown else b"%d" % self.size)


ChunkLog = dict[_Field, tuple[VectorClock, int]]


def parse_chunk_log(data: bytes) -> ChunkLog:
    """Lines ``<clock> <uuid>:<size> <count>``; per field the newest line wins, a later
    line on equal clocks (MapLog's ``best``). Unparsable lines are skipped."""
    log: ChunkLog = {}
    for line in re.split(rb"[\r\n]+", data):
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[2].isdigit():
            continue
        clock = VectorClock.parse(parts[0])
        field = _Field.parse(parts[1])
        if clock is None or field is None:
            continue
        old = log.get(field)
        if old is None or not old[0] > clock:
            log[field] = (clock, int(parts[2]))
    return log


def format_chunk_log(log: ChunkLog) -> bytes:
    return b"".join(
        b"%s %s %d\n" % (clock.format(), field.format(), count)
        for field, (clock, count) in sorted(log.items())
    )


def record_chunks(
    old: bytes | None, uuid: str, chunk_size: int, count: int, now: VectorClock
) -> bytes:
    """New chunk log content after git-annex's chunksStored (count 0: chunksRemoved).

    The field's clock is ``now`` advanced past its previous one, and the file is written
    compacted, one line per field, sorted.
    """
    log = parse_chunk_log(old or b"")
    field = _Field(uuid.encode("utf-8", "surrogateescape"), False, chunk_size, b"")
    previous = log.get(field)
    log[field] = (now.advance([previous[0]] if previous else []), count)
    return format_chunk_log(log)


def logged_chunkings(data: bytes | None, uuid: str) -> list[tuple[int, int]]:
    """``(chunk size, count)`` pairs the log records for ``uuid`` with a count above 0,
    smallest size first (git-annex's getCurrentChunks order)."""
    u = uuid.encode("utf-8", "surrogateescape")
    return [
        (field.size, count)
        for field, (_, count) in sorted(parse_chunk_log(data or b"").items())
        if field.uuid == u and not field.unknown and count > 0
    ]


def layouts(key: Key, configured: int | None, logged: list[tuple[int, int]]) -> list[list[Key]]:
    """Every way ``key`` may be stored on the remote, most likely first (chunkKeys).

    Each layout is the list of keys whose contents, joined, are the content: the chunk
    keys of each logged chunking, and ``[key]`` itself for unchunked storage, tried first
    when the remote is not configured for chunking and last when it is.
    """
    chunked = [chunk_keys(key, size, count) for size, count in logged]
    unchunked = [key.without_chunk()]
    return [unchunked, *chunked] if configured is None else [*chunked, unchunked]
