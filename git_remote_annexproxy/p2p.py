"""The git-annex P2P line protocol, versions 0-4, sans-IO.

`serialize(msg)` gives the wire line of a message; `P2PConnection` turns received bytes into
events: messages, the payload pieces that follow `DATA n`, and the end of the stream. Nothing
here touches a file descriptor, so the p2pstdio server, both faces of the proxy and our
client share this code, and tests can split the input anywhere (the h11 pattern).

The grammar is upstream's (`Utility/SimpleProtocol.hs`, `P2P/Protocol.hs`; spec §1-4):

* The verb is everything before the first whitespace character, and exactly that one
  character is dropped (Haskell `separate`), so `SUCCESS ` parses but `SUCCESS  ` does not.
  An N-argument message takes N-1 such words and the rest of the line verbatim as the last
  argument, which is why a key (always last) may contain spaces. UUID and sha lists are
  split on runs of whitespace and may be empty.
* "Whitespace" is Haskell's `isSpace`: `\\t\\n\\v\\f\\r`, space, NBSP and the other Unicode
  space separators, applied to the UTF-8 decoded line as upstream does.
* Numbers are ASCII digits without sign. Upstream's `reads` also takes `-5`, which made
  `GET -5` desynchronise the real server's stream (security.md row 19); we refuse that.
* After `DATA n` come exactly n raw bytes, in every direction and context (content,
  CONNECT tunnels). An unreadable DATA header loses the framing and is fatal.

Wire bytes are decoded as UTF-8 with `surrogateescape`, so every byte survives a round trip.

Besides upstream's messages, the codec knows annexproxy's own extensions (`EXTENSIONS`,
`CHECKOBJECT`, `PUTOBJECT`, `GETOBJECT`, `RECORD`, `PUTINDIRECT`, `INDIRECT`,
`INDIRECTDONE`); they are only ever sent after the peer agreed to them (HACKING.md, "P2P
extensions"), so git-annex never sees one.
"""

from __future__ import annotations

import enum
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeAlias, assert_never

from .keys import BadKey, Key

SERVICES: Final = frozenset({"git-upload-pack", "git-receive-pack"})
# Our protocol extensions (negotiated with EXTENSIONS right after VERSION; see the section
# "extension messages" below). A server that does not know the word never gets more.
EXT_OBJECTS: Final = "annexproxy-objects"
EXT_INDIRECT: Final = "annexproxy-indirect"


class P2PProtocolError(Exception):
    """Base of the codec's errors."""


class RemoteProtocolError(P2PProtocolError):
    """The peer broke the framing (overlong line, bad DATA header): close the connection."""


class LocalProtocolError(P2PProtocolError):
    """We asked to send or do something the protocol cannot express: a bug on our side."""


# --- messages -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Auth:
    uuid: str
    token: str  # upstream AuthToken: ASCII letters and digits only, may be empty


@dataclass(frozen=True, slots=True)
class AuthSuccess:
    uuid: str


@dataclass(frozen=True, slots=True)
class AuthFailure:
    pass


@dataclass(frozen=True, slots=True)
class Version:
    n: int


@dataclass(frozen=True, slots=True)
class Bypass:
    uuids: tuple[str, ...]  # sent in this order; upstream sends a sorted set


@dataclass(frozen=True, slots=True)
class CheckPresent:
    key: Key


@dataclass(frozen=True, slots=True)
class LockContent:
    key: Key


@dataclass(frozen=True, slots=True)
class UnlockContent:
    pass


@dataclass(frozen=True, slots=True)
class Remove:
    key: Key


@dataclass(frozen=True, slots=True)
class RemoveBefore:
    ts: int
    key: Key


@dataclass(frozen=True, slots=True)
class GetTimestamp:
    pass


@dataclass(frozen=True, slots=True)
class Timestamp:
    ts: int


@dataclass(frozen=True, slots=True)
class Put:
    af: str | None
    key: Key


@dataclass(frozen=True, slots=True)
class PutFrom:
    offset: int


@dataclass(frozen=True, slots=True)
class Data:
    """Only the header line; the caller writes (or the reader delivers) the payload."""

    length: int


@dataclass(frozen=True, slots=True)
class DataPresent:
    pass


@dataclass(frozen=True, slots=True)
class Valid:
    pass


@dataclass(frozen=True, slots=True)
class Invalid:
    pass


@dataclass(frozen=True, slots=True)
class Get:
    offset: int
    af: str | None
    key: Key


@dataclass(frozen=True, slots=True)
class Success:
    pass


@dataclass(frozen=True, slots=True)
class Failure:
    pass


@dataclass(frozen=True, slots=True)
class SuccessPlus:
    uuids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class FailurePlus:
    uuids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AlreadyHave:
    pass


@dataclass(frozen=True, slots=True)
class AlreadyHavePlus:
    uuids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Connect:
    service: str


@dataclass(frozen=True, slots=True)
class ConnectDone:
    code: int


@dataclass(frozen=True, slots=True)
class NotifyChange:
    pass


@dataclass(frozen=True, slots=True)
class Changed:
    shas: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Error:
    text: str


# --- extension messages (annexproxy's own; never sent unless EXTENSIONS agreed on them) ---
#
# `EXTENSIONS word...` both ways: the client offers, the server answers with the subset it
# serves in this session (possibly none). An object name is a token: no whitespace, never
# empty; what names are acceptable is the server's business (`specialformat.object_name`).


@dataclass(frozen=True, slots=True)
class Extensions:
    words: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CheckObject:
    name: str


@dataclass(frozen=True, slots=True)
class PutObject:
    """`PUTOBJECT name size`: answered ALREADY-HAVE or PUT-FROM 0, then DATA as for PUT."""

    name: str
    size: int


@dataclass(frozen=True, slots=True)
class GetObject:
    """`GETOBJECT name`: answered DATA n + bytes + VALID/INVALID, or FAILURE (absent)."""

    name: str


@dataclass(frozen=True, slots=True)
class Record:
    """`RECORD chunksize count key` (chunksize 0: unchunked), then `DATA n` with the
    object names, one per line: the server checks them and logs the key's location."""

    chunk_size: int
    count: int
    key: Key


@dataclass(frozen=True, slots=True)
class PutIndirect:
    """`PUTINDIRECT name size sha256hex`: answered INDIRECT, ALREADY-HAVE or FAILURE."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class Indirect:
    """`INDIRECT url headers`: where to PUT the object and the HTTP headers to send, the
    headers form-encoded (`a=b&c=d`, percent-escaped; empty when none)."""

    url: str
    headers: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class IndirectDone:
    name: str


Message: TypeAlias = (
    Auth | AuthSuccess | AuthFailure | Version | Bypass | CheckPresent | LockContent
    | UnlockContent | Remove | RemoveBefore | GetTimestamp | Timestamp | Put | PutFrom | Data
    | DataPresent | Valid | Invalid | Get | Success | Failure | SuccessPlus | FailurePlus
    | AlreadyHave | AlreadyHavePlus | Connect | ConnectDone | NotifyChange | Changed | Error
    | Extensions | CheckObject | PutObject | GetObject | Record | PutIndirect | Indirect
    | IndirectDone
)  # fmt: skip


# --- reader-only events ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Unparsable:
    """A complete line that is no message (the server answers `ERROR unknown command`).

    `line` is without its `\\n` (and without the one `\\r` stripped before it)."""

    line: bytes


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


Event: TypeAlias = Message | Unparsable | Body | BodyEnd | ConnectionClosed


class NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA


# --- fields ----------------------------------------------------------------------------------

# Haskell Data.Char.isSpace, on which upstream splits: \t\n\v\f\r, space, U+00A0, category Zs.
# Not Python's str.isspace(), which also takes \x1c-\x1f, \x85 and U+2028/U+2029. Sending
# checks use the same set, so whatever we parsed we can send on unchanged (a proxy relays).
_SPACE_RE: Final = re.compile("[\t\n\v\f\r \xa0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_NAT_RE: Final = re.compile("[0-9]+")  # not \d or str.isdigit(): those take '٣' and '²'
_AUTH_TOKEN_RE: Final = re.compile("[A-Za-z0-9]*")
# Decoding an AssociatedFile, left to right like upstream's `deesc`: `%%` -> `%`, a lone
# `%` -> `_`, a control character (Haskell isControl, category Cc) -> `_`.
_AF_DECODE_RE: Final = re.compile("%%|%|[\x00-\x1f\x7f-\x9f]")
_AF_ENCODE_RE: Final = re.compile(f"%|{_SPACE_RE.pattern}")
_SHA256_RE: Final = re.compile("[0-9a-f]{64}")
# RFC 9110 token characters for header names; values are visible ASCII and inner spaces.
_HEADER_NAME_RE: Final = re.compile("[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_VALUE_RE: Final = re.compile("[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?|")


def _separate(s: str) -> tuple[str, str]:
    """Split at the first whitespace character, dropping exactly that one character."""
    m = _SPACE_RE.search(s)
    return (s, "") if m is None else (s[: m.start()], s[m.end() :])


def _words(s: str) -> tuple[str, ...]:
    return tuple(w for w in _SPACE_RE.split(s) if w)


def _nat(s: str) -> int | None:
    if _NAT_RE.fullmatch(s) is None:
        return None
    try:
        return int(s)
    except ValueError:  # more digits than int() will convert (sys.get_int_max_str_digits)
        return None


def _key(s: str) -> Key | None:
    # A key ending in CR would lose it when sent on (the receiver strips one CR before the
    # newline), and a relay would then act on another key: refuse it here.
    if s.endswith("\r"):
        return None
    try:
        return Key.parse(s)
    except BadKey:
        return None


def _is_token(s: str) -> bool:
    return s != "" and _SPACE_RE.search(s) is None


def decode_af(s: str) -> str | None:
    """Decode a received AssociatedFile, lossily as upstream does (so `a%file.txt`, i.e.
    "a file.txt", comes out as `a_file.txt`). Empty means none.

    Raises ValueError for an absolute path, which makes the whole message unparsable."""
    af = _AF_DECODE_RE.sub(lambda m: "%" if m.group() == "%%" else "_", s)
    if not af:
        return None
    if af.startswith("/"):
        raise ValueError("absolute AssociatedFile")
    return af


def encode_af(af: str | None) -> str:
    """Encode an AssociatedFile for the wire: whitespace -> `%`, `%` -> `%%`, none -> ``.

    (Upstream tests single bytes for whitespace, so it also mangles the 0xA0 byte inside
    UTF-8 characters such as "à"; we test characters, which every receiver decodes the same.)
    """
    if af is None:
        return ""
    if af.startswith("/"):
        raise LocalProtocolError("an absolute AssociatedFile would make the message unparsable")
    return _AF_ENCODE_RE.sub(lambda m: "%%" if m.group() == "%" else "%", af)


# --- parsing ---------------------------------------------------------------------------------

_Parser: TypeAlias = Callable[[str], Message | None]


def _p0(msg: Message) -> _Parser:
    return lambda rest: msg if rest == "" else None


def _p_nat(make: Callable[[int], Message]) -> _Parser:
    def parse(rest: str) -> Message | None:
        n = _nat(rest)
        return None if n is None else make(n)

    return parse


def _p_key(make: Callable[[Key], Message]) -> _Parser:
    def parse(rest: str) -> Message | None:
        key = _key(rest)
        return None if key is None else make(key)

    return parse


def _p_list(make: Callable[[tuple[str, ...]], Message]) -> _Parser:
    return lambda rest: make(_words(rest))


def _parse_auth(rest: str) -> Message | None:
    uuid, token = _separate(rest)
    if uuid and _AUTH_TOKEN_RE.fullmatch(token):
        return Auth(uuid, token)
    return None


def _parse_remove_before(rest: str) -> Message | None:
    ts_s, key_s = _separate(rest)
    ts, key = _nat(ts_s), _key(key_s)
    return None if ts is None or key is None else RemoveBefore(ts, key)


def _parse_put(rest: str) -> Message | None:
    af_s, key_s = _separate(rest)
    key = _key(key_s)
    try:
        return None if key is None else Put(decode_af(af_s), key)
    except ValueError:
        return None


def _parse_get(rest: str) -> Message | None:
    offset_s, rest = _separate(rest)
    af_s, key_s = _separate(rest)
    offset, key = _nat(offset_s), _key(key_s)
    try:
        return None if offset is None or key is None else Get(offset, decode_af(af_s), key)
    except ValueError:
        return None


def _parse_put_object(rest: str) -> Message | None:
    name, size_s = _separate(rest)
    size = _nat(size_s)
    return PutObject(name, size) if _is_token(name) and size is not None else None


def _parse_record(rest: str) -> Message | None:
    size_s, rest = _separate(rest)
    count_s, key_s = _separate(rest)
    size, count, key = _nat(size_s), _nat(count_s), _key(key_s)
    if size is None or count is None or key is None:
        return None
    return Record(size, count, key)


def _parse_put_indirect(rest: str) -> Message | None:
    name, rest = _separate(rest)
    size_s, sha = _separate(rest)
    size = _nat(size_s)
    if not _is_token(name) or size is None or _SHA256_RE.fullmatch(sha) is None:
        return None
    return PutIndirect(name, size, sha)


def _good_header(name: str, value: str) -> bool:
    return bool(_HEADER_NAME_RE.fullmatch(name)) and bool(_HEADER_VALUE_RE.fullmatch(value))


def _parse_indirect(rest: str) -> Message | None:
    url, form = _separate(rest)
    if not _is_token(url) or (form and not _is_token(form)):
        return None
    try:
        pairs = (
            urllib.parse.parse_qsl(
                form, keep_blank_values=True, strict_parsing=True, errors="strict"
            )
            if form
            else []
        )
    except (ValueError, UnicodeDecodeError):
        return None
    if not all(_good_header(n, v) for n, v in pairs):
        return None  # a CR or LF in a value would be header injection on the client side
    return Indirect(url, tuple(pairs))


def _p_token(make: Callable[[str], Message]) -> _Parser:
    return lambda rest: make(rest) if _is_token(rest) else None


# DATA is missing on purpose: the reader handles it, because it switches the framing.
_PARSERS: Final[dict[str, _Parser]] = {
    "AUTH": _parse_auth,
    "AUTH-SUCCESS": lambda rest: AuthSuccess(rest) if _is_token(rest) else None,
    "AUTH-FAILURE": _p0(AuthFailure()),
    "VERSION": _p_nat(Version),
    "BYPASS": _p_list(Bypass),
    "CHECKPRESENT": _p_key(CheckPresent),
    "LOCKCONTENT": _p_key(LockContent),
    "UNLOCKCONTENT": _p0(UnlockContent()),
    "REMOVE": _p_key(Remove),
    "REMOVE-BEFORE": _parse_remove_before,
    "GETTIMESTAMP": _p0(GetTimestamp()),
    "TIMESTAMP": _p_nat(Timestamp),
    "PUT": _parse_put,
    "PUT-FROM": _p_nat(PutFrom),
    "DATA-PRESENT": _p0(DataPresent()),
    "VALID": _p0(Valid()),
    "INVALID": _p0(Invalid()),
    "GET": _parse_get,
    "SUCCESS": _p0(Success()),
    "FAILURE": _p0(Failure()),
    "SUCCESS-PLUS": _p_list(SuccessPlus),
    "FAILURE-PLUS": _p_list(FailurePlus),
    "ALREADY-HAVE": _p0(AlreadyHave()),
    "ALREADY-HAVE-PLUS": _p_list(AlreadyHavePlus),
    "CONNECT": lambda rest: Connect(rest) if rest in SERVICES else None,
    "CONNECTDONE": _p_nat(ConnectDone),
    "NOTIFYCHANGE": _p0(NotifyChange()),
    "CHANGED": _p_list(Changed),
    "ERROR": Error,
    "EXTENSIONS": _p_list(Extensions),
    "CHECKOBJECT": _p_token(CheckObject),
    "PUTOBJECT": _parse_put_object,
    "GETOBJECT": _p_token(GetObject),
    "RECORD": _parse_record,
    "PUTINDIRECT": _parse_put_indirect,
    "INDIRECT": _parse_indirect,
    "INDIRECTDONE": _p_token(IndirectDone),
}


# --- serializing -----------------------------------------------------------------------------


def _num(n: int) -> str:
    if n < 0:
        raise LocalProtocolError(f"negative number {n}")
    return str(n)


def _token(s: str) -> str:
    if not _is_token(s):
        raise LocalProtocolError(f"empty or contains whitespace: {s!r}")
    return s


def _key_str(key: Key) -> str:
    s = str(key)
    if "\n" in s or s.endswith("\r"):
        raise LocalProtocolError(f"key cannot be sent: {s!r}")
    return s


def _fields(msg: Message) -> list[str]:
    # Joined with single spaces like upstream's `unwords`, empty fields included, so an
    # absent AssociatedFile gives `GET 0  KEY` and `ERROR` with no text gives `ERROR `.
    match msg:
        case Auth(uuid, token):
            if not _AUTH_TOKEN_RE.fullmatch(token):
                raise LocalProtocolError("AUTH token must be ASCII letters and digits")
            return ["AUTH", _token(uuid), token]
        case AuthSuccess(uuid):
            return ["AUTH-SUCCESS", _token(uuid)]
        case AuthFailure():
            return ["AUTH-FAILURE"]
        case Version(n):
            return ["VERSION", _num(n)]
        case Bypass(uuids):
            return ["BYPASS", *map(_token, uuids)]
        case CheckPresent(key):
            return ["CHECKPRESENT", _key_str(key)]
        case LockContent(key):
            return ["LOCKCONTENT", _key_str(key)]
        case UnlockContent():
            return ["UNLOCKCONTENT"]
        case Remove(key):
            return ["REMOVE", _key_str(key)]
        case RemoveBefore(ts, key):
            return ["REMOVE-BEFORE", _num(ts), _key_str(key)]
        case GetTimestamp():
            return ["GETTIMESTAMP"]
        case Timestamp(ts):
            return ["TIMESTAMP", _num(ts)]
        case Put(af, key):
            return ["PUT", encode_af(af), _key_str(key)]
        case PutFrom(offset):
            return ["PUT-FROM", _num(offset)]
        case Data(length):
            return ["DATA", _num(length)]
        case DataPresent():
            return ["DATA-PRESENT"]
        case Valid():
            return ["VALID"]
        case Invalid():
            return ["INVALID"]
        case Get(offset, af, key):
            return ["GET", _num(offset), encode_af(af), _key_str(key)]
        case Success():
            return ["SUCCESS"]
        case Failure():
            return ["FAILURE"]
        # Upstream builds the three -PLUS lists and BYPASS as separate words (an empty list
        # is the bare verb) but CHANGED as one `unwords` field (empty: `CHANGED `).
        case SuccessPlus(uuids):
            return ["SUCCESS-PLUS", *map(_token, uuids)]
        case FailurePlus(uuids):
            return ["FAILURE-PLUS", *map(_token, uuids)]
        case AlreadyHave():
            return ["ALREADY-HAVE"]
        case AlreadyHavePlus(uuids):
            return ["ALREADY-HAVE-PLUS", *map(_token, uuids)]
        case Connect(service):
            if service not in SERVICES:
                raise LocalProtocolError(f"unknown service {service!r}")
            return ["CONNECT", service]
        case ConnectDone(code):
            return ["CONNECTDONE", _num(code)]
        case NotifyChange():
            return ["NOTIFYCHANGE"]
        case Changed(shas):
            return ["CHANGED", " ".join(map(_token, shas))]
        case Error(text):
            # A trailing CR is allowed: it is lost on the way, as upstream loses it, which
            # is harmless for a message text and lets a relay pass on any ERROR it got.
            if "\n" in text:
                raise LocalProtocolError(f"newline in ERROR text: {text!r}")
            return ["ERROR", text]
        case Extensions(words):
            return ["EXTENSIONS", *map(_token, words)]
        case CheckObject(name):
            return ["CHECKOBJECT", _token(name)]
        case PutObject(name, size):
            return ["PUTOBJECT", _token(name), _num(size)]
        case GetObject(name):
            return ["GETOBJECT", _token(name)]
        case Record(chunk_size, count, key):
            return ["RECORD", _num(chunk_size), _num(count), _key_str(key)]
        case PutIndirect(name, size, sha256):
            if _SHA256_RE.fullmatch(sha256) is None:
                raise LocalProtocolError(f"not a lowercase SHA-256: {sha256!r}")
            return ["PUTINDIRECT", _token(name), _num(size), sha256]
        case Indirect(url, headers):
            if not all(_good_header(n, v) for n, v in headers):
                raise LocalProtocolError(f"headers cannot be sent: {headers!r}")
            return ["INDIRECT", _token(url), urllib.parse.urlencode(headers, safe="")]
        case IndirectDone(name):
            return ["INDIRECTDONE", _token(name)]
    assert_never(msg)


def serialize(msg: Message) -> bytes:
    """The message as one line ending in `\\n` (for `Data`, only the header line)."""
    try:
        return (" ".join(_fields(msg)) + "\n").encode("utf-8", "surrogateescape")
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

    def next_event(self) -> Event | NeedData:
        if self._broken is not None:
            raise RemoteProtocolError(f"connection already failed: {self._broken}")
        try:
            if self._body_left is None:
                return self._next_line()
            return self._next_body()
        except RemoteProtocolError as e:
            self._broken = e
            raise

    def _next_line(self) -> Event | NeedData:
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
        return self._parse_line(line)

    def _parse_line(self, line: bytes) -> Event:
        verb, rest = _separate(line.decode("utf-8", "surrogateescape"))
        if verb == "DATA":
            n = _nat(rest)
            if n is None or n > self._max_data:
                raise RemoteProtocolError(f"bad DATA header {line[:60]!r}")
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
