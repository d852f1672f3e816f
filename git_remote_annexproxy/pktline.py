"""git's pkt-line framing (gitprotocol-common(5)), sans-IO: the one reader for every place
that watches a git service's bytes (the server's push guard, the client's push watch).

A pkt-line is 4 hex digits of length (the 4 included) and a payload; `0000` is a flush,
`0001` a delimiter and `0002` a response end (protocol v2). As git's `packet_length`, the
hex digits may be either case; a length of 3, or a payload of LARGE_PACKET_MAX (65520) bytes
or more, is no pkt-line: exactly what git's reader refuses (checked against
`git receive-pack` in tests/test_pktline.py), so a watcher never reads a stream differently
from the git service behind it. Pure module, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final


class Special:
    """A special packet (flush, delimiter, response end); compare with `is`."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"pktline.{self.name.upper()}"


FLUSH: Final = Special("flush")
DELIM: Final = Special("delim")
RESPONSE_END: Final = Special("response_end")
_SPECIAL = {0: FLUSH, 1: DELIM, 2: RESPONSE_END}

#: git's LARGE_PACKET_MAX: git writes no pkt-line longer (header included), and reads no
#: payload this long.
LARGE_PACKET_MAX: Final = 65520
_HEX = frozenset(b"0123456789abcdefABCDEF")

Packet = bytes | Special  # a payload (possibly empty: `0004`), or a Special packet


class PktLineError(ValueError):
    """Bytes that are no pkt-line (a bad header or a length git never sends)."""


def next_pkt(buf: bytes | bytearray, pos: int) -> tuple[Packet | None, int]:
    """The packet at `pos`: (payload or Special, next pos); (None, pos) while incomplete.

    Raises PktLineError for bytes that are no pkt-line.
    """
    if len(buf) - pos < 4:
        return None, pos
    head = bytes(buf[pos : pos + 4])
    if not _HEX.issuperset(head):
        raise PktLineError(f"bad pkt-line header {head!r}")
    size = int(head, 16)
    special = _SPECIAL.get(size)
    if special is not None:
        return special, pos + 4
    if size < 4 or size - 4 >= LARGE_PACKET_MAX:
        raise PktLineError(f"bad pkt-line length {size}")
    if len(buf) - pos < size:
        return None, pos
    return bytes(buf[pos + 4 : pos + size]), pos + size


class PktLineReader:
    """Splits a byte stream into packets. After bytes that are no pkt-line it is `broken`
    and yields nothing more (a watcher stops watching rather than guess)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self.broken = False

    def feed(self, data: bytes | bytearray) -> Iterator[Packet]:
        if self.broken:
            return
        self._buf += data
        try:
            while True:
                packet, self._pos = next_pkt(self._buf, self._pos)
                if packet is None:
                    break
                yield packet
        except PktLineError:
            self.broken = True
        finally:
            del self._buf[: self._pos]
            self._pos = 0

    @property
    def buffered(self) -> int:
        """Bytes held back: at most one incomplete packet, once read to the end."""
        return len(self._buf) - self._pos
