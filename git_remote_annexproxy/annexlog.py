"""git-annex branch file formats: location (presence) logs, uuid.log, journal file names.

Pure module: no I/O. Follows git-annex 10.20261026 (``Logs/Presence.hs``,
``Logs/Presence/Pure.hs``, ``Logs/Line.hs``, ``Logs/UUIDBased.hs``, ``Logs/MapLog.hs``,
``Annex/VectorClock.hs``, ``Utility/TimeStamp.hs``, ``Annex/Journal.hs``); every rule
below was checked against the real binary (recorded vectors in ``tests/test_annexlog.py``,
live comparisons in ``tests/test_branch.py``).

Log contents are ``bytes`` (git-annex works on bytes); UUIDs, descriptions and branch paths
are ``str`` decoded from UTF-8 with ``surrogateescape`` (HACKING.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from git_remote_annexproxy.keys import Key

# git-annex keeps timestamps as Haskell POSIXTime, a fixed-point number of picoseconds.
_PICO = 10**12
# Haskell's `show` of a POSIXTime: "1795562601s", "1700000000.5s" (no trailing zeros).
_CLOCK_RE = re.compile(rb"([+-]?)([0-9]+)(?:\.([0-9]+))?s?")
# Logs/Line.hs: any run of \r and \n ends a line (old Windows builds wrote \r\n).
_LINE_SPLIT_RE = re.compile(rb"[\r\n]+")

PRESENT = "1"
MISSING = "0"
DEAD = "X"
_STATUSES = (PRESENT, MISSING, DEAD)


@dataclass(frozen=True, order=True, slots=True)
class VectorClock:
    """A git-annex "vector clock": really a timestamp, in picoseconds since the epoch."""

    picos: int

    @classmethod
    def from_seconds(cls, seconds: int) -> VectorClock:
        return cls(seconds * _PICO)

    @classmethod
    def parse(cls, text: bytes) -> VectorClock | None:
        """Parse like git-annex's parserPOSIXTime; None if it would not parse.

        Sign, digits, optional ``.digits``, optional ``s``. A fraction longer than 12 digits
        is truncated (Pico precision). Quirk kept from git-annex: the sign belongs to the
        integer part only, so ``-0.5s`` reads as +0.5.
        """
        m = _CLOCK_RE.fullmatch(text)
        if m is None:
            return None
        sign, whole, frac = m.groups()
        try:
            n = int(whole)
        except ValueError:  # beyond Python's int-from-string digit limit: garbage anyway
            return None
        if sign == b"-":
            n = -n
        r = 0
        if frac:
            r = int(frac[:12].ljust(12, b"0"))
        return cls(n * _PICO - r if n < 0 else n * _PICO + r)

    def format(self) -> bytes:
        """Haskell's ``show`` of the POSIXTime, which is what git-annex writes."""
        sign = "-" if self.picos < 0 else ""
        whole, frac = divmod(abs(self.picos), _PICO)
        digits = f"{frac:012d}".rstrip("0")
        return f"{sign}{whole}{'.' + digits if digits else ''}s".encode("ascii")

    def advance(self, previous: Iterable[VectorClock | None]) -> VectorClock:
        """git-annex's advanceVectorClock: self, unless an earlier clock is at or past it.

        ``previous`` are the clocks already logged *for the same item* (same UUID), not
        every line of the file: a UUID's new line must beat only its own older lines, so a
        peer with a fast clock cannot push everybody else's timestamps forward (checked
        against the binary). ``None`` is git-annex's ``Unknown`` (a line without a
        timestamp), which is older than anything.
        """
        known = [c for c in previous if c is not None]
        if not known:
            return self
        newest = max(known)
        return VectorClock(newest.picos + _PICO) if newest >= self else self


def _split_lines(data: bytes) -> list[bytes]:
    return [line for line in _LINE_SPLIT_RE.split(data) if line]


# --- presence logs (location logs and other "Ts S INFO" files) -------------------------


@dataclass(frozen=True, slots=True)
class LogLine:
    """One line ``<clock> <status> <info>``; for location logs ``info`` is a UUID."""

    clock: VectorClock
    status: str  # PRESENT, MISSING or DEAD
    info: bytes

    def format(self) -> bytes:
        return b"%s %s %s\n" % (self.clock.format(), self.status.encode("ascii"), self.info)

    @property
    def uuid(self) -> str:
        return self.info.decode("utf-8", "surrogateescape")


def _parse_presence_line(line: bytes) -> LogLine | None:
    clock_text, sep, rest = line.partition(b" ")
    if not sep:
        return None
    clock = VectorClock.parse(clock_text)
    # The status is exactly one character followed by a space; the info is the rest of the
    # line, spaces and all, and may be empty.
    if clock is None or len(rest) < 2 or rest[1:2] != b" ":
        return None
    status = rest[:1].decode("latin-1")
    if status not in _STATUSES:
        return None
    return LogLine(clock, status, rest[2:])


def parse_presence_log(data: bytes) -> list[LogLine]:
    """All well-formed lines in file order. Lines git-annex cannot parse are skipped, as
    git-annex skips them (a newer git-annex may have written a format we do not know)."""
    out = []
    for line in _split_lines(data):
        parsed = _parse_presence_line(line)
        if parsed is not None:
            out.append(parsed)
    return out


def format_presence_log(lines: Iterable[LogLine]) -> bytes:
    return b"".join(line.format() for line in lines)


def compact(lines: Iterable[LogLine]) -> list[LogLine]:
    """git-annex's compactLog: the newest line per info, sorted by info bytes.

    On equal clocks the line that comes first in the file wins (git-annex folds from the
    right and lets an equal clock replace; checked against the binary).
    """
    newest: dict[bytes, LogLine] = {}
    for line in reversed(list(lines)):
        old = newest.get(line.info)
        if old is None or old.clock <= line.clock:
            newest[line.info] = line
    return [newest[info] for info in sorted(newest)]


def add_presence(old: bytes | None, uuid: str, present: bool, now: VectorClock | int) -> bytes:
    """New content of a location log after recording ``uuid`` present or missing.

    This is git-annex's logChange (maybeAddLog): when the UUID's current status already
    is the one asked for, the log is returned unchanged (byte for byte, so the caller can
    skip the write, as git-annex does); otherwise the result is the compacted log with a
    new line whose clock is ``now`` advanced past that UUID's own older lines.
    """
    old = old or b""
    if isinstance(now, int):
        now = VectorClock.from_seconds(now)
    info = uuid.encode("utf-8", "surrogateescape")
    status = PRESENT if present else MISSING
    lines = parse_presence_log(old)
    current = {line.info: line for line in compact(lines)}
    if info in current and current[info].status == status:
        return old
    clock = now.advance(line.clock for line in lines if line.info == info)
    current[info] = LogLine(clock, status, info)
    return format_presence_log(current[i] for i in sorted(current))


def present_uuids(data: bytes) -> set[str]:
    """UUIDs whose newest line says present."""
    return {line.uuid for line in compact(parse_presence_log(data)) if line.status == PRESENT}


def is_cluster_uuid(uuid: str) -> bool:
    """Types/Cluster.hs isClusterUUID: starts with ``ac`` and has ``8`` at index 14.

    git-annex never writes such a UUID into a location log (a cluster's locations are
    derived from its nodes), so writers must skip it.
    """
    return uuid.startswith("ac") and uuid[14:15] == "8"


def location_log_path(key: Key) -> str:
    """Branch path of a key's location log, e.g. ``d91/b11/SHA256E-s6--….txt.log``."""
    return f"{key.hashdir_lower()}/{key.keyfile()}.log"


# --- uuid.log ("UUID VALUE timestamp=Ts", the old UUID-first layout) -------------------


@dataclass(frozen=True, slots=True)
class UUIDLogEntry:
    value: bytes
    clock: VectorClock | None  # None: a very old line without timestamp ("Unknown")


def _newer(new: UUIDLogEntry, old: UUIDLogEntry) -> UUIDLogEntry:
    # MapLog's `best`: the later line wins unless the earlier one is strictly newer;
    # Unknown (None) is older than any clock.
    if old.clock is not None and (new.clock is None or old.clock > new.clock):
        return old
    return new


def parse_uuid_log_entries(data: bytes) -> dict[bytes, UUIDLogEntry]:
    """UUID -> newest entry, as git-annex's parseLogOld reads it.

    The UUID is the first word (non-empty). The timestamp counts only as the very last
    ``" timestamp=<clock>"`` of the line; everything between is the value, with its
    spacing preserved. A line without a valid trailing timestamp is an Unknown-time entry
    whose value is the whole rest of the line.
    """
    entries: dict[bytes, UUIDLogEntry] = {}
    for line in _split_lines(data):
        uuid, _, rest = line.partition(b" ")
        if not uuid:
            continue
        value = rest
        clock = None
        # git-annex tries " timestamp=<clock><end>" at every space; only the last
        # space can be followed by a clock that runs to the end of the line.
        head, marker, tail = (b" " + rest).rpartition(b" timestamp=")
        if marker and b" " not in tail:
            parsed = VectorClock.parse(tail)
            if parsed is not None:
                value, clock = head[1:], parsed
        entry = UUIDLogEntry(value, clock)
        old = entries.get(uuid)
        entries[uuid] = entry if old is None else _newer(entry, old)
    return entries


def parse_uuid_log(data: bytes) -> dict[str, str]:
    """UUID -> description (newest per UUID)."""

    def dec(b: bytes) -> str:
        return b.decode("utf-8", "surrogateescape")

    return {dec(u): dec(e.value) for u, e in parse_uuid_log_entries(data).items()}


def format_uuid_log(entries: dict[bytes, UUIDLogEntry]) -> bytes:
    """buildLogOld: sorted by UUID; ``UUID VALUE timestamp=Ts`` or ``UUID VALUE``."""
    out = []
    for uuid in sorted(entries):
        e = entries[uuid]
        if e.clock is None:
            out.append(b"%s %s\n" % (uuid, e.value))
        else:
            out.append(b"%s %s timestamp=%s\n" % (uuid, e.value, e.clock.format()))
    return b"".join(out)


def describe_uuid(old: bytes | None, uuid: str, description: str, now: VectorClock | int) -> bytes:
    """New uuid.log content after git-annex's describeUUID: the whole file is rewritten
    (compacted, sorted), the UUID's entry replaced with a clock advanced past its old one."""
    if isinstance(now, int):
        now = VectorClock.from_seconds(now)
    entries = parse_uuid_log_entries(old or b"")
    u = uuid.encode("utf-8", "surrogateescape")
    previous = entries.get(u)
    clock = now.advance([previous.clock] if previous else [])
    entries[u] = UUIDLogEntry(description.encode("utf-8", "surrogateescape"), clock)
    return format_uuid_log(entries)


# --- journal file names ------------------------------------------------------------------


def journal_name(path: str) -> str:
    """Annex/Journal.hs journalFile: a branch path as one file name in annex/journal/.

    ``/`` -> ``_`` and ``_`` -> ``__`` (``2ff/78e/K_x.log`` -> ``2ff_78e_K__x.log``).
    """
    return path.replace("_", "__").replace("/", "_")


def branch_path(name: str) -> str:
    """Annex/Journal.hs fileJournal, the inverse of journal_name, quirks included: ``__``
    -> ``_``, any other ``_`` -> ``/``, and a single ``_`` at the very end is dropped."""
    out: list[str] = []
    i = 0
    n = len(name)
    while i < n:
        c = name[i]
        if c != "_":
            out.append(c)
            i += 1
        elif i + 1 == n:
            break
        elif name[i + 1] == "_":
            out.append("_")
            i += 2
        else:
            out.append("/")
            i += 1
    return "".join(out)
