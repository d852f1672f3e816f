"""The one reader of git-annex's per-repository branch logs: both UUID-log layouts, map
logs and single-value logs.

Pure module. Follows git-annex 10.20261026's ``Logs/UUIDBased.hs`` (``parseLogOld``,
``parseLogNew``), ``Logs/MapLog.hs`` (``mapLogParser``, ``best``), ``Logs/SingleValue/Pure.hs``
and ``Logs/Line.hs``; ``tests/test_maplog.py`` checks each rule against the real binary.

- A line ends at any run of ``\\r`` and ``\\n``; a line that does not parse (including one
  whose value the caller's value parser refuses) is skipped, as if it were not there.
- Old layout, ``UUID[ VALUE][ timestamp=T]`` (trust.log, group.log, remote.log, the
  preferred/required content logs): the value is everything between the UUID and a final
  ``timestamp=`` word that parses as a clock; a line without one has the Unknown clock,
  older than every timestamp.
- New layout, ``T FIELD VALUE`` (proxy.log, cluster.log, maxsize.log, and the map log
  group-preferred-content.log): both spaces are required, the value may be empty.
- Newest per UUID/field wins; on equal clocks the LATER line wins (``M.fromListWith best``
  keeps the new element unless the old one is strictly newer).
- Single-value logs, ``T VALUE`` (numcopies.log, mincopies.log): the greatest
  (clock, value) pair wins, so on equal clocks the greater value.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

from git_remote_annexproxy.annexlog import VectorClock

T = TypeVar("T")

# Logs/Line.hs: any run of \r and \n ends a line.
_LINE_SPLIT_RE = re.compile(rb"[\r\n]+")
_TIMESTAMP = b" timestamp="

#: A clock key that sorts like git-annex's VectorClock: Unknown before every timestamp.
ClockKey = tuple[int, int]
UNKNOWN: ClockKey = (0, 0)


def _clock_key(clock: VectorClock) -> ClockKey:
    return (1, clock.picos)


def _dec(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def lines(data: bytes) -> list[bytes]:
    return [ln for ln in _LINE_SPLIT_RE.split(data) if ln]


def _newest(entries: list[tuple[str, ClockKey, T]]) -> dict[str, T]:
    """`M.fromListWith best`: the greatest clock per field, the later line on a tie."""
    best: dict[str, tuple[ClockKey, T]] = {}
    for field, clock, value in entries:
        old = best.get(field)
        if old is None or not old[0] > clock:
            best[field] = (clock, value)
    return {field: value for field, (_, value) in best.items()}


def split_old_line(line: bytes) -> tuple[bytes, bytes, ClockKey] | None:
    """One old-layout line -> (uuid, raw value, clock), or None when it has no UUID."""
    uuid, sep, rest = line.partition(b" ")
    if not uuid:
        return None
    rest = sep + rest
    cut = rest.rfind(_TIMESTAMP)
    if cut >= 0:
        clock = VectorClock.parse(rest[cut + len(_TIMESTAMP) :])
        if clock is not None:
            return uuid, rest[1:cut] if cut > 0 else b"", _clock_key(clock)
    return uuid, rest[1:], UNKNOWN


def parse_old(data: bytes, value: Callable[[bytes], T | None]) -> dict[str, T]:
    """Old layout -> {uuid: parsed value}, newest per UUID; lines whose value ``value``
    refuses (returns None for) are skipped before the newest is chosen."""
    entries: list[tuple[str, ClockKey, T]] = []
    for line in lines(data):
        split = split_old_line(line)
        if split is None:
            continue
        uuid, raw, clock = split
        parsed = value(raw)
        if parsed is not None:
            entries.append((_dec(uuid), clock, parsed))
    return _newest(entries)


def parse_new(data: bytes, value: Callable[[bytes], T | None]) -> dict[str, T]:
    """New layout / map log -> {field: parsed value}, newest per field."""
    entries: list[tuple[str, ClockKey, T]] = []
    for line in lines(data):
        stamp, sep1, rest = line.partition(b" ")
        field, sep2, raw = rest.partition(b" ")
        if not (sep1 and sep2):
            continue
        clock = VectorClock.parse(stamp)
        if clock is None:
            continue
        parsed = value(raw)
        if parsed is not None:
            entries.append((_dec(field), _clock_key(clock), parsed))
    return _newest(entries)


def text_value(raw: bytes) -> str:
    """The value as text, unparsed (preferred content expressions, free text)."""
    return _dec(raw)


def word_set(raw: bytes) -> frozenset[str] | None:
    """``many (word <* (' ' | end))``: words separated by single spaces; an empty word (two
    spaces, or a leading or trailing one) makes the whole line unparseable."""
    if not raw:
        return frozenset()
    words = raw.split(b" ")
    if raw.endswith(b" "):
        words.pop()  # the separator may be followed by the end
    if not words or any(not w for w in words):
        return None
    return frozenset(_dec(w) for w in words)


def loose_word_set(raw: bytes) -> frozenset[str]:
    """group.log's parser: words, allowing extra spaces before, between and after them."""
    return frozenset(_dec(w) for w in raw.split(b" ") if w)


# Haskell's `reads` for an integer: leading white space, an optional minus, digits, and not
# the start of a fractional or exponent literal (lex would read "1.5" or "1e3" as one token).
_READISH_INT = re.compile(rb"\s*(-?[0-9]+)(?![0-9]|\.[0-9]|[eE][-+]?[0-9])")


def readish_int(raw: bytes) -> int | None:
    m = _READISH_INT.match(raw)
    return int(m.group(1)) if m else None


def configured_copies(data: bytes) -> int | None:
    """numcopies.log / mincopies.log: the newest value, below 1 read as 1
    (``configuredNumCopies``); None when the log sets nothing."""
    entries: list[tuple[ClockKey, int]] = []
    for line in lines(data):
        stamp, sep, raw = line.partition(b" ")
        clock = VectorClock.parse(stamp)
        value = readish_int(raw) if sep and clock is not None else None
        if clock is not None and value is not None:
            entries.append((_clock_key(clock), value))
    if not entries:
        return None
    # newestValue: the greatest (clock, value), so the greater value on equal clocks.
    return max(max(entries)[1], 1)
