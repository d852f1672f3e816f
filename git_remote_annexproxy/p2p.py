"""The git-annex P2P line protocol, versions 0-4, sans-IO: the codec and the one name
space of the protocol (`from git_remote_annexproxy import p2p; p2p.Success()`).

`serialize(msg)` gives the wire line of a message; `P2PConnection` turns received bytes into
events: messages, the payload pieces that follow `DATA n`, and the end of the stream. Nothing
here touches a file descriptor, so the p2pstdio server, both faces of the proxy and our
client share this code, and tests can split the input anywhere (the h11 pattern).

Where the rest lives (all re-exported here):

* `p2pfields`: the field grammar (upstream's `Utility/SimpleProtocol.hs`: the verb and
  words split on Haskell's `isSpace`, numbers, keys, AssociatedFile escaping) and the
  codec's errors;
* `p2pmessages`: git-annex's messages (`P2P/Protocol.hs`; spec §1-4), parsed and written;
* `p2pext`: annexproxy's own extensions (`EXTENSIONS`, `CHECKOBJECT`, `PUTOBJECT`,
  `GETOBJECT`, `RECORD`, `PUTINDIRECT`, `INDIRECT`, `INDIRECTDONE`); they are only ever sent
  after the peer agreed to them (HACKING.md, "P2P extensions"), so git-annex never sees one.

The framing is this module's: after `DATA n` come exactly n raw bytes, in every direction
and context (content, CONNECT tunnels). An unreadable DATA header loses the framing and is
fatal. Wire bytes are decoded as UTF-8 with `surrogateescape`, so every byte survives a
round trip.

Which DATA starts a payload is the reader's one rule about message order: a DATA is framing
only where the reader expects a payload (`next_event(data=True)`, the default: a client
reading answers, a server after its PUT-FROM, RECORD's DATA, a CONNECT relay). A server
reading a request, or any other answer that is no payload, asks with `data=False`; a DATA
there is `UnexpectedData`, its announced bytes are never read (a client cannot make the
server wait for or buffer them), and what follows is read as lines, as git-annex-shell
does: it answers such a DATA at once (`ERROR unexpected command`) and reads on.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeAlias

from . import p2pext, p2pmessages
from .p2pext import (
    EXT_INDIRECT,
    EXT_OBJECTS,
    CheckObject,
    Extensions,
    ExtMessage,
    GetObject,
    Indirect,
    IndirectDone,
    PutIndirect,
    PutObject,
    Record,
)
from .p2pfields import (
    LocalProtocolError,
    P2PProtocolError,
    RemoteProtocolError,
    decode_af,
    encode_af,
    nat,
    separate,
)
from .p2pmessages import (
    MAX_VERSION,
    SERVICES,
    AlreadyHave,
    AlreadyHavePlus,
    AnnexMessage,
    Auth,
    AuthFailure,
    AuthSuccess,
    Bypass,
    Changed,
    CheckPresent,
    Connect,
    ConnectDone,
    Data,
    DataPresent,
    Error,
    Failure,
    FailurePlus,
    Get,
    GetTimestamp,
    Invalid,
    LockContent,
    NotifyChange,
    Put,
    PutFrom,
    Remove,
    RemoveBefore,
    Success,
    SuccessPlus,
    Timestamp,
    UnlockContent,
    Valid,
    Version,
)

# Everything other modules use is named here, wherever it is defined.
__all__ = [
    "DEFAULT_IDLE_TIMEOUT", "EXT_INDIRECT", "EXT_OBJECTS", "MAX_VERSION", "NEED_DATA", "SERVICES",
    "AlreadyHave", "AlreadyHavePlus",
    "AnnexMessage", "Auth", "AuthFailure", "AuthSuccess", "Body", "BodyEnd", "Bypass", "Changed",
    "CheckObject", "CheckPresent", "Connect", "ConnectDone", "ConnectionClosed", "Data",
    "DataPresent", "Error", "Event", "ExtMessage", "Extensions", "Failure", "FailurePlus", "Get",
    "GetObject", "GetTimestamp", "Indirect", "IndirectDone", "Invalid", "LocalProtocolError",
    "LockContent", "Message", "NeedData", "NotifyChange", "P2PConnection", "P2PProtocolError",
    "Put", "PutFrom", "PutIndirect", "PutObject", "Record", "RemoteProtocolError", "Remove",
    "RemoveBefore", "Success", "SuccessPlus", "Timestamp", "UnexpectedData", "UnlockContent",
    "Unparsable", "Valid", "Version", "decode_af", "encode_af", "serialize"
]  # fmt: skip

Message: TypeAlias = AnnexMessage | ExtMessage

#: How long any P2P or node-RPC peer may stay silent (or stop reading) before it is cut
#: off, unless `annexproxy.idletimeout` says otherwise: two hours, long enough for a slow
#: client between files, short enough that a slow-loris peer does not hold a lock forever.
DEFAULT_IDLE_TIMEOUT: Final = 7200.0


# --- reader-only events ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Unparsable:
    """A complete line that is no message (the server answers `ERROR unknown command`).

    `line` is without its `\\n` (and without the one `\\r` stripped before it)."""

    line: bytes


@dataclass(frozen=True, slots=True)
class UnexpectedData:
    """`DATA length` where the reader expected no payload (`next_event(data=False)`).

    None of its bytes were read: the next event comes from the line after the header."""

    length: int


@dataclass(frozen=True, slots=True)
class Body:
    """A piece of the payload after `Data`."""

    data: bytes


@dataclass(frozen=True, slots=True)
class BodyEnd:
    """All `Data.length` payload bytes were delivered (also right after `DATA 0`)."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """End of stream. `truncated`: it came inside a line or a body; body pieces received
    before it were still delivered, since the server keeps a partial upload for resume."""

    truncated: bool


Event: TypeAlias = Message | Unparsable | UnexpectedData | Body | BodyEnd | ConnectionClosed


class NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA


# --- parsing and serializing -----------------------------------------------------------------

# DATA is missing on purpose: the reader handles it, because it switches the framing.
_PARSERS: Final[dict[str, Callable[[str], Message | None]]] = {
    **p2pmessages.PARSERS,
    **p2pext.PARSERS,
}


def serialize(msg: Message) -> bytes:
    """The message as one line ending in `\\n` (for `Data`, only the header line)."""
    words = p2pext.fields(msg) if isinstance(msg, ExtMessage) else p2pmessages.fields(msg)
    try:
        return (" ".join(words) + "\n").encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as e:  # a surrogate that no received byte could produce
        raise LocalProtocolError(f"cannot encode {msg!r}") from e


# --- reader ----------------------------------------------------------------------------------

# Consumed bytes are dropped from the buffer only when they are at least this many and at
# least half of it: every drop then moves no more bytes than it discards, so the total work
# stays linear in the input, and small reads do not shuffle the buffer at all.
_COMPACT_MIN: Final = 1 << 16


class P2PConnection:
    """Incremental reader for one direction of a P2P connection.

    Feed bytes with `receive_data` (b"" = end of stream), then call `next_event` until it
    returns `NEED_DATA`. Any exception other than `RemoteProtocolError` from `next_event` is
    a bug. After a `RemoteProtocolError` the connection stays broken.

    `max_line` bounds a line including its `\\n` (upstream reads at most 32767 characters
    before the newline); `max_body_piece` bounds each `Body`; `max_data` bounds `DATA n`.
    """

    def __init__(
        self, *, max_line: int = 32768, max_body_piece: int = 1 << 20, max_data: int = 1 << 62
    ) -> None:
        if max_line < 2 or max_body_piece < 1 or max_data < 0:
            raise ValueError("limits out of range")
        self._max_line = max_line
        self._max_body_piece = max_body_piece
        self._max_data = max_data
        self._buf = bytearray()
        self._pos = 0  # start of the unconsumed bytes in _buf
        self._scanned = 0  # unconsumed bytes already searched for b"\n"
        self._body_left: int | None = None  # payload bytes still due; None between messages
        self._eof = False
        self._broken: RemoteProtocolError | None = None

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            self._eof = True
        elif self._eof:
            raise LocalProtocolError("data received after end of stream")
        else:
            self._buf += data

    def next_event(self, *, data: bool = True) -> Event | NeedData:
        """The next event. `data`: may a `DATA n` line come here, its n bytes then being
        its payload? If not, it is `UnexpectedData` and none of its bytes are read (see
        the module docstring). Inside a payload `data` does not matter."""
        if self._broken is not None:
            raise RemoteProtocolError(f"connection already failed: {self._broken}")
        try:
            if self._body_left is None:
                return self._next_line(data)
            return self._next_body()
        except RemoteProtocolError as e:
            self._broken = e
            raise

    def _next_line(self, data: bool) -> Event | NeedData:
        buf, pos = self._buf, self._pos
        nl = buf.find(b"\n", pos + self._scanned, pos + self._max_line)
        if nl < 0:
            pending = len(buf) - pos
            if pending >= self._max_line:
                raise RemoteProtocolError(f"line longer than {self._max_line - 1} bytes")
            if self._eof:
                return ConnectionClosed(truncated=pending > 0)
            self._scanned = pending
            return NEED_DATA
        end = nl - 1 if nl > pos and buf[nl - 1] == 0x0D else nl
        line = bytes(buf[pos:end])
        self._pos = nl + 1
        self._scanned = 0
        self._compact()
        return self._parse_line(line, data)

    def _parse_line(self, line: bytes, data: bool) -> Event:
        verb, rest = separate(line.decode("utf-8", "surrogateescape"))
        if verb == "DATA":
            n = nat(rest)
            if n is None or n > self._max_data:
                raise RemoteProtocolError(f"bad DATA header {line[:60]!r}")
            if not data:
                return UnexpectedData(n)
            self._body_left = n
            return Data(n)
        parser = _PARSERS.get(verb)
        msg = None if parser is None else parser(rest)
        return Unparsable(line) if msg is None else msg

    def _next_body(self) -> Event | NeedData:
        left = self._body_left
        assert left is not None
        if left == 0:
            self._body_left = None
            return BodyEnd()
        start = self._pos
        n = min(len(self._buf) - start, left, self._max_body_piece)
        if n == 0:
            return ConnectionClosed(truncated=True) if self._eof else NEED_DATA
        # One copy out of the buffer; the views are released before _compact resizes it.
        with memoryview(self._buf) as view, view[start : start + n] as part:
            piece = bytes(part)
        self._pos = start + n
        self._body_left = left - n
        self._compact()
        return Body(piece)

    def _compact(self) -> None:
        pos = self._pos
        if pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif pos >= _COMPACT_MIN and 2 * pos >= len(self._buf):
            del self._buf[:pos]
            self._pos = 0
