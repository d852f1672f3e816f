"""The fields of P2P protocol lines, sans-IO: how a message's words are split, read and
written, shared by git-annex's messages (`p2pmessages`) and ours (`p2pext`).

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

Parsing helpers return None for a field that does not parse (the whole line is then
`Unparsable`); sending helpers raise `LocalProtocolError` for a field that cannot be sent.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final, TypeVar

from .keys import BadKey, Key
from .protocolerrors import LocalProtocolError as LocalProtocolError  # noqa: PLC0414 - re-exported
from .protocolerrors import ProtocolError
from .protocolerrors import RemoteProtocolError as RemoteProtocolError  # noqa: PLC0414 - re-exported

_M = TypeVar("_M")


# One hierarchy for every codec (protocolerrors.py); P2PProtocolError is its base.
P2PProtocolError = ProtocolError


# Haskell Data.Char.isSpace, on which upstream splits: \t\n\v\f\r, space, U+00A0, category Zs.
# Not Python's str.isspace(), which also takes \x1c-\x1f, \x85 and U+2028/U+2029. Sending
# checks use the same set, so whatever we parsed we can send on unchanged (a proxy relays).
SPACE_RE: Final = re.compile("[\t\n\v\f\r \xa0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_NAT_RE: Final = re.compile("[0-9]+")  # not \d or str.isdigit(): those take '٣' and '²'
# Decoding an AssociatedFile, left to right like upstream's `deesc`: `%%` -> `%`, a lone
# `%` -> `_`, a control character (Haskell isControl, category Cc) -> `_`.
_AF_DECODE_RE: Final = re.compile("%%|%|[\x00-\x1f\x7f-\x9f]")
_AF_ENCODE_RE: Final = re.compile(f"%|{SPACE_RE.pattern}")


# --- reading ---------------------------------------------------------------------------------


def separate(s: str) -> tuple[str, str]:
    """Split at the first whitespace character, dropping exactly that one character."""
    m = SPACE_RE.search(s)
    return (s, "") if m is None else (s[: m.start()], s[m.end() :])


def words(s: str) -> tuple[str, ...]:
    return tuple(w for w in SPACE_RE.split(s) if w)


def nat(s: str) -> int | None:
    if _NAT_RE.fullmatch(s) is None:
        return None
    try:
        return int(s)
    except ValueError:  # more digits than int() will convert (sys.get_int_max_str_digits)
        return None


def parse_key(s: str) -> Key | None:
    # A key ending in CR would lose it when sent on (the receiver strips one CR before the
    # newline), and a relay would then act on another key: refuse it here.
    if s.endswith("\r"):
        return None
    try:
        return Key.parse(s)
    except BadKey:
        return None


def is_token(s: str) -> bool:
    return s != "" and SPACE_RE.search(s) is None


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


# Parsers of the text after the verb, for the simple message shapes.


def p0(msg: _M) -> Callable[[str], _M | None]:
    return lambda rest: msg if rest == "" else None


def p_nat(make: Callable[[int], _M]) -> Callable[[str], _M | None]:
    def parse(rest: str) -> _M | None:
        n = nat(rest)
        return None if n is None else make(n)

    return parse


def p_key(make: Callable[[Key], _M]) -> Callable[[str], _M | None]:
    def parse(rest: str) -> _M | None:
        k = parse_key(rest)
        return None if k is None else make(k)

    return parse


def p_list(make: Callable[[tuple[str, ...]], _M]) -> Callable[[str], _M | None]:
    return lambda rest: make(words(rest))


def p_token(make: Callable[[str], _M]) -> Callable[[str], _M | None]:
    return lambda rest: make(rest) if is_token(rest) else None


# --- writing ---------------------------------------------------------------------------------


def num(n: int) -> str:
    if n < 0:
        raise LocalProtocolError(f"negative number {n}")
    return str(n)


def token(s: str) -> str:
    if not is_token(s):
        raise LocalProtocolError(f"empty or contains whitespace: {s!r}")
    return s


def key_str(key: Key) -> str:
    s = str(key)
    if "\n" in s or s.endswith("\r"):
        raise LocalProtocolError(f"key cannot be sent: {s!r}")
    return s


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
