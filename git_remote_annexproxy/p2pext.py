"""annexproxy's own P2P messages, sans-IO: `EXTENSIONS` and what it may agree on.

They are only ever sent after the peer agreed to them (HACKING.md, "P2P extensions"), so
git-annex never sees one: the client offers `EXTENSIONS word...` right after `VERSION`, the
server answers with the subset it serves in this session (possibly none), and neither side
sends a message of an extension that is not in that answer. An object name is a token: no
whitespace, never empty; what names are acceptable is the server's business
(`specialformat.object_name`).

Like `p2pmessages` for git-annex's messages: the dataclasses, `PARSERS` and `fields`; the
framing and the whole vocabulary are `p2p`'s.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeAlias, assert_never

from .keys import Key
from .p2pfields import (
    LocalProtocolError,
    is_token,
    key_str,
    nat,
    num,
    p_list,
    p_token,
    parse_key,
    separate,
    token,
)

# The extension words. A server that does not know the word never gets more.
EXT_OBJECTS: Final = "annexproxy-objects"
EXT_INDIRECT: Final = "annexproxy-indirect"

_SHA256_RE: Final = re.compile("[0-9a-f]{64}")
# RFC 9110 token characters for header names; values are visible ASCII and inner spaces.
_HEADER_NAME_RE: Final = re.compile("[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_VALUE_RE: Final = re.compile("[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?|")


# --- messages --------------------------------------------------------------------------------


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


ExtMessage: TypeAlias = (
    Extensions | CheckObject | PutObject | GetObject | Record | PutIndirect | Indirect
    | IndirectDone
)  # fmt: skip


# --- parsing ---------------------------------------------------------------------------------


def _parse_put_object(rest: str) -> ExtMessage | None:
    name, size_s = separate(rest)
    size = nat(size_s)
    return PutObject(name, size) if is_token(name) and size is not None else None


def _parse_record(rest: str) -> ExtMessage | None:
    size_s, rest = separate(rest)
    count_s, key_s = separate(rest)
    size, count, key = nat(size_s), nat(count_s), parse_key(key_s)
    if size is None or count is None or key is None:
        return None
    return Record(size, count, key)


def _parse_put_indirect(rest: str) -> ExtMessage | None:
    name, rest = separate(rest)
    size_s, sha = separate(rest)
    size = nat(size_s)
    if not is_token(name) or size is None or _SHA256_RE.fullmatch(sha) is None:
        return None
    return PutIndirect(name, size, sha)


def _good_header(name: str, value: str) -> bool:
    return bool(_HEADER_NAME_RE.fullmatch(name)) and bool(_HEADER_VALUE_RE.fullmatch(value))


def _parse_indirect(rest: str) -> ExtMessage | None:
    url, form = separate(rest)
    if not is_token(url) or (form and not is_token(form)):
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


PARSERS: Final[dict[str, Callable[[str], ExtMessage | None]]] = {
    "EXTENSIONS": p_list(Extensions),
    "CHECKOBJECT": p_token(CheckObject),
    "PUTOBJECT": _parse_put_object,
    "GETOBJECT": p_token(GetObject),
    "RECORD": _parse_record,
    "PUTINDIRECT": _parse_put_indirect,
    "INDIRECT": _parse_indirect,
    "INDIRECTDONE": p_token(IndirectDone),
}


# --- writing ---------------------------------------------------------------------------------


def fields(msg: ExtMessage) -> list[str]:
    """The words of the message's line, verb first (`p2p.serialize` joins them)."""
    match msg:
        case Extensions(words):
            return ["EXTENSIONS", *map(token, words)]
        case CheckObject(name):
            return ["CHECKOBJECT", token(name)]
        case PutObject(name, size):
            return ["PUTOBJECT", token(name), num(size)]
        case GetObject(name):
            return ["GETOBJECT", token(name)]
        case Record(chunk_size, count, key):
            return ["RECORD", num(chunk_size), num(count), key_str(key)]
        case PutIndirect(name, size, sha256):
            if _SHA256_RE.fullmatch(sha256) is None:
                raise LocalProtocolError(f"not a lowercase SHA-256: {sha256!r}")
            return ["PUTINDIRECT", token(name), num(size), sha256]
        case Indirect(url, headers):
            if not all(_good_header(n, v) for n, v in headers):
                raise LocalProtocolError(f"headers cannot be sent: {headers!r}")
            return ["INDIRECT", token(url), urllib.parse.urlencode(headers, safe="")]
        case IndirectDone(name):
            return ["INDIRECTDONE", token(name)]
    assert_never(msg)
