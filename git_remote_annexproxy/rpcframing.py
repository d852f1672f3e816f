"""Bounded msgpack framing for the node RPC (`rpc.py`): bytes in, decoded frames out.

A frame is one msgpack value (the RPC makes it an array). Every received string, bin,
array and frame is bounded by the MAX_* below, and a frame over a limit fails on its header,
before its payload arrives or anything is allocated for it: the C `msgpack.Unpacker` checks
a declared str/bin length only once the whole payload is buffered, and lets one frame hold
millions of tiny values (each a Python object of 30-60 bytes). So `_Guard` walks the
msgpack headers ahead of the Unpacker and refuses both on sight; the Unpacker's own limits
stay on as a second line. Memory per connection is then at most MAX_FRAME + _FEED bytes of
buffer and MAX_ITEMS decoded values, plus whatever the caller passes to `receive_data`.

Ext types (and 0xc1) are refused: we never send them, and the Timestamp ext would decode
to an object no validator expects.
"""

from __future__ import annotations

import enum
from typing import Final

import msgpack

# The one hierarchy of every codec, re-exported as the RPC's own names.
from git_remote_annexproxy.protocolerrors import LocalProtocolError as LocalProtocolError  # noqa: PLC0414 - re-exported
from git_remote_annexproxy.protocolerrors import ProtocolError as ProtocolError  # noqa: PLC0414 - re-exported
from git_remote_annexproxy.protocolerrors import RemoteProtocolError as RemoteProtocolError  # noqa: PLC0414 - re-exported

MAX_CHUNK: Final = 256 << 10  # bytes in one bin: a body chunk
MAX_STR: Final = 8192  # bytes in one str: a key may be this long (keys.MAX_KEY_LENGTH)
MAX_ITEMS: Final = 1024  # values in one frame, nested ones included (rpcmethods.MAX_BATCH + slack)
MAX_FRAME: Final = 4 << 20  # bytes in one frame: MAX_BATCH keys of MAX_STR (2.1 MB) fit
_FEED: Final = 64 << 10  # bytes handed to the Unpacker at a time




class NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA


# --- the header guard ------------------------------------------------------------------------

_SCALAR, _STR, _BIN, _ARRAY, _MAP = range(5)


def _header_table() -> list[tuple[int, int, int] | None]:
    """First byte -> (header size, kind, count), count -1 = read from the header's tail.

    None for the bytes we refuse: 0xc1 (never used) and the ext types, which we never send."""
    t: list[tuple[int, int, int] | None] = [None] * 256
    for b in [*range(0x00, 0x80), *range(0xE0, 0x100), 0xC0, 0xC2, 0xC3]:
        t[b] = (1, _SCALAR, 0)
    for b in range(0x80, 0x90):
        t[b] = (1, _MAP, b & 0x0F)
    for b in range(0x90, 0xA0):
        t[b] = (1, _ARRAY, b & 0x0F)
    for b in range(0xA0, 0xC0):
        t[b] = (1, _STR, b & 0x1F)
    for b, size in zip(range(0xCA, 0xD4), (5, 9, 2, 3, 5, 9, 2, 3, 5, 9), strict=True):
        t[b] = (size, _SCALAR, 0)  # float32/64, uint8-64, int8-64
    for first, kind in ((0xC4, _BIN), (0xD9, _STR)):
        for i, size in enumerate((2, 3, 5)):
            t[first + i] = (size, kind, -1)
    for b, size, kind in ((0xDC, 3, _ARRAY), (0xDD, 5, _ARRAY), (0xDE, 3, _MAP), (0xDF, 5, _MAP)):
        t[b] = (size, kind, -1)
    return t


_HEADERS: Final = _header_table()


class _Guard:
    """Reads msgpack headers ahead of the Unpacker and stops a frame over a limit on its header.

    The C Unpacker checks a declared str/bin length only once the whole payload is buffered,
    and lets one frame hold millions of small values; this walk refuses both as soon as the
    header arrives, so memory stays bounded by MAX_FRAME bytes and MAX_ITEMS values.
    Payloads are skipped, so the cost is per value, not per byte."""

    def __init__(self) -> None:
        self.error: str | None = None
        self._skip = 0  # payload bytes of the current str/bin still to pass over
        self._head = bytearray()  # a header split between two feeds
        self._left = 0  # values still due in the current frame; 0 between frames
        self._items = 0
        self._bytes = 0

    @property
    def mid_frame(self) -> bool:
        return bool(self._left or self._skip or self._head)

    def scan(self, data: bytes | memoryview) -> int:
        """How many leading bytes of `data` are safe to unpack; on less than all, `error`."""
        if self.error is not None:
            return 0
        i, n = 0, len(data)
        while i < n:
            if self._skip:
                step = min(self._skip, n - i)
                self._skip -= step
                i += step
                continue
            info = _HEADERS[self._head[0] if self._head else data[i]]
            if info is None:
                self.error = f"msgpack type byte 0x{data[i]:02x} is not allowed"
                return i
            size = info[0]
            start = i - len(self._head)  # negative: the header began in an earlier feed
            head: bytes | memoryview
            if not self._head and i + size <= n:
                head = data[i : i + size]
                i += size
            else:
                take = min(size - len(self._head), n - i)
                self._head += data[i : i + take]
                i += take
                if len(self._head) < size:
                    return n  # the rest of the header comes with the next feed
                head = bytes(self._head)
                self._head.clear()
            if not self._value(head):
                return max(start, 0)
        return n

    def _value(self, head: bytes | memoryview) -> bool:
        info = _HEADERS[head[0]]
        assert info is not None
        size, kind, count = info
        if count < 0:
            count = int.from_bytes(head[1:size], "big")
        if self._left == 0:  # the first value of a frame
            self._left, self._items, self._bytes = 1, 0, 0
        self._left -= 1
        self._items += 1
        self._bytes += size
        if kind in (_STR, _BIN):
            limit = MAX_STR if kind == _STR else MAX_CHUNK
            if count > limit:
                self.error = f"{'bin' if kind == _BIN else 'str'} of {count} bytes (limit {limit})"
                return False
            self._skip = count
            self._bytes += count
        elif kind == _ARRAY:
            self._left += count
        elif kind == _MAP:
            self._left += 2 * count
        if self._items + self._left > MAX_ITEMS:
            self.error = f"frame of more than {MAX_ITEMS} values"
        elif self._bytes > MAX_FRAME:
            self.error = f"frame of more than {MAX_FRAME} bytes"
        return self.error is None


def check_outgoing(frame: bytes) -> str | None:
    """Why the peer's guard would refuse this packed frame, or None if it would take it."""
    guard = _Guard()
    if guard.scan(frame) == len(frame) and not guard.mid_frame:
        return None
    return guard.error or "not one whole frame"


class FrameReader:
    """Received bytes to decoded frames, one direction of a connection."""

    def __init__(self) -> None:
        self.eof = False
        self._buf = bytearray()
        self._pos = 0  # start of the bytes not yet handed to the Unpacker
        self._guard = _Guard()
        self._unpacker = msgpack.Unpacker(
            max_buffer_size=MAX_FRAME + _FEED,  # one partial frame + one feed
            raw=False,
            unicode_errors="surrogateescape",  # wire strings round-trip any byte (HACKING.md)
            strict_map_key=True,
            use_list=True,
            max_str_len=MAX_STR,
            max_bin_len=MAX_CHUNK,
            max_array_len=MAX_ITEMS,
            max_map_len=MAX_ITEMS // 2,
            max_ext_len=0,
        )

    @property
    def mid_frame(self) -> bool:
        """Part of a frame has arrived (at EOF: the stream was cut inside a frame)."""
        return self._guard.mid_frame or self._pos < len(self._buf)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self.eof:
            raise LocalProtocolError("data received after end of stream")
        if data:
            self._buf += data
        else:
            self.eof = True

    def next_frame(self) -> object:
        """The next decoded frame, or NEED_DATA (at EOF too: see `eof`, `mid_frame`).

        Frames before a bad one are all delivered; then RemoteProtocolError."""
        while True:
            try:
                return self._unpacker.unpack()
            except msgpack.OutOfData:
                if not self._feed():
                    if self._guard.error is not None:
                        raise RemoteProtocolError(self._guard.error) from None
                    return NEED_DATA
            except ValueError as e:  # every msgpack decoding error is one
                raise RemoteProtocolError(f"malformed frame: {e}") from None

    def _feed(self) -> bool:
        """Hand the Unpacker the next input the guard passes; False if there is none."""
        start = self._pos
        end = min(len(self._buf), start + _FEED)
        if start == end or self._guard.error is not None:
            return False
        with memoryview(self._buf) as view, view[start:end] as piece:
            ok = self._guard.scan(piece)
            self._unpacker.feed(piece[:ok])
        self._pos = end
        if end == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif end >= 2 * _FEED and 2 * end >= len(self._buf):
            del self._buf[:end]  # moves no more than it drops: linear overall
            self._pos = 0
        return ok > 0
